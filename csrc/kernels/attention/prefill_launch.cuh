// Tile choice and dispatch of the prefill attention: the per-dtype entry point that the
// generated instances/prefill_*.cu instantiate.
#pragma once

#include <cuda_runtime.h>

#include <type_traits>

#include "kernels/attention/prefill_mma.cuh"
#include "kernels/attention/prefill_simt.cuh"
#include "kernels/attention/prefill_traits.cuh"

namespace trimkv {

namespace prefill_detail {

/// Shared memory and SMs of the current device, for the tile choice.
struct mma_device_t {
  int major = 0, sms = 0, smem_block = 0, smem_sm = 0;
};

inline cudaError_t mma_device(mma_device_t* d) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess)
    e = cudaDeviceGetAttribute(&d->major, cudaDevAttrComputeCapabilityMajor, dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&d->sms, cudaDevAttrMultiProcessorCount, dev);
  if (e == cudaSuccess)
    e = cudaDeviceGetAttribute(&d->smem_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (e == cudaSuccess)
    e = cudaDeviceGetAttribute(&d->smem_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev);
  return e;
}

/// Whether `blocks` blocks of `bytes` dynamic shared memory fit one SM (1 KB reserved each).
inline bool mma_fits(const mma_device_t& d, int bytes, int blocks) {
  return bytes <= d.smem_block && blocks * (bytes + 1024) <= d.smem_sm;
}

template <typename T, int DPAD>
cudaError_t launch_attention(const prefill_params_t& p, cudaStream_t stream) {
  if constexpr (std::is_same<T, float>::value) {
    return launch_attention_simt<T, DPAD>(p, stream);
  } else {
    mma_device_t d;
    const cudaError_t e = mma_device(&d);
    if (e != cudaSuccess) return e;
    if (d.major < 8) return launch_attention_simt<T, DPAD>(p, stream);  // no bf16/f16 m16n8k16
    using C = mma_config<DPAD>;
    constexpr int MT = C::MT, BK = C::BK, BKS = C::BK_SMALL;
    if (mma_grid_blocks(p, MT) * 64 * MT <= kMmaSplitRowsPerSm * d.sms &&
        mma_fits(d, mma_smem_bytes<DPAD, MT, BK, 2>(), 1))
      return launch_attention_mma<T, DPAD, MT, BK, 2, true>(p, stream);
    if (mma_fits(d, mma_smem_bytes<DPAD, MT, BK, 1>(), 2))
      return launch_attention_mma<T, DPAD, MT, BK, 1>(p, stream);
    if constexpr (BKS != BK) {
      if (mma_fits(d, mma_smem_bytes<DPAD, MT, BKS, 1>(), 1))
        return launch_attention_mma<T, DPAD, MT, BKS, 1>(p, stream);
    } else {
      if (mma_fits(d, mma_smem_bytes<DPAD, MT, BK, 1>(), 1))
        return launch_attention_mma<T, DPAD, MT, BK, 1>(p, stream);
    }
    return launch_attention_simt<T, DPAD>(p, stream);  // too little shared memory for tiles
  }
}

template <typename T>
cudaError_t prefill_attention_typed(const prefill_params_t& p, float* lognorm,
                                    cudaStream_t stream) {
  if (p.knorm) {
    const int nrow = p.longest() * p.kv_heads;
    const dim3 grid((nrow + 7) / 8, 1, p.segments());
    PrefillLognormKernel<T><<<grid, 256, 0, stream>>>(p, lognorm);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return TRIMKV_DISPATCH_PADDED_HEAD_DIM(p.head_dim, DPAD,
                                         [&] { return launch_attention<T, DPAD>(p, stream); });
}

}  // namespace prefill_detail

}  // namespace trimkv
