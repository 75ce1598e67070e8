// Launch policy and dispatch of the decode step: the per-device facts of the tensor-core kernel
// (read once), its stage / cluster choice, the group-size and head-dim switches, and the
// per-dtype entry point that the generated instances/decode_*.cu instantiate.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels/attention/decode_core.cuh"
#include "kernels/attention/decode_mma.cuh"
#include "kernels/attention/decode_traits.cuh"

namespace trimkv {

namespace decode_detail {

/// What the current device can do with DecodeMmaKernel<T, DPAD, DCONST>, read once.
struct mma_info_t {
  bool usable = false;   ///< the loaded image was built for sm_80+ (not JIT from older PTX)
  bool cluster = false;  ///< ... for sm_90+ on an sm_90+ device: cluster launches
  bool pdl = false;      ///< ... the same: programmatic dependent launches (pdl.cuh)
  int max_dyn = 0;       ///< most dynamic shared memory a block may take
  int sm_smem = 0;       ///< shared memory of an SM
  int block_fixed = 0;   ///< static + reserved shared memory of a block
  int sms = 0;           ///< multiprocessors
};

template <typename T, int DPAD, int DCONST>
const mma_info_t& mma_info() {
  static const mma_info_t info = [] {
    mma_info_t m;
    auto kern = DecodeMmaKernel<T, DPAD, DCONST>;
    cudaFuncAttributes fa;
    int dev = 0, optin = 0, major = 0, reserved = 0;
    if (cudaFuncGetAttributes(&fa, kern) != cudaSuccess || cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) !=
            cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&m.sm_smem, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev) !=
            cudaSuccess ||
        cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, dev) !=
            cudaSuccess ||
        cudaDeviceGetAttribute(&m.sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
      (void)cudaGetLastError();
      return m;
    }
    // The kernel body exists only when compiled for sm_80+; an image JIT-compiled from older
    // PTX has none, so the PTX version decides, not the device.
    if (fa.ptxVersion < 80) return m;
    m.max_dyn = optin - static_cast<int>(fa.sharedSizeBytes);
    m.block_fixed = static_cast<int>(fa.sharedSizeBytes) + reserved;
    if (m.max_dyn < mma_traits<DPAD>::STAGE_BYTES ||
        cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, m.max_dyn) !=
            cudaSuccess) {
      (void)cudaGetLastError();
      return m;
    }
    m.usable = true;
    m.pdl = fa.ptxVersion >= 90 && major >= 9;  // the image has the griddepcontrol.wait
    m.cluster = fa.ptxVersion >= 90 && major >= 9 &&
                cudaFuncSetAttribute(kern, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) ==
                    cudaSuccess;
    if (!m.cluster) (void)cudaGetLastError();
    return m;
  }();
  return info;
}

/// How many clusters of S blocks with dyn bytes of dynamic shared memory can be resident at
/// once (cached per (S, dyn); 0: none).
template <typename T, int DPAD, int DCONST>
int mma_max_clusters(const decode_params_t& p, int S, int dyn) {
  static std::mutex mu;
  static std::vector<std::pair<long long, int>> cache;
  const long long key = (static_cast<long long>(S) << 32) | static_cast<unsigned>(dyn);
  std::lock_guard<std::mutex> lock(mu);
  for (const auto& e : cache)
    if (e.first == key) return e.second;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(S, p.kv_heads, p.batch);
  cfg.blockDim = dim3(mma_traits<DPAD>::kThreads);
  cfg.dynamicSmemBytes = dyn;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = S;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, DecodeMmaKernel<T, DPAD, DCONST>, &cfg) != cudaSuccess) {
    (void)cudaGetLastError();
    n = 0;
  }
  cache.emplace_back(key, n);
  return n;
}

/// Launches DecodeMmaKernel. Pipeline depth: every tile of a split in flight when it fits,
/// else as many stages as the SM holds with the blocks of one wave (one block per SM when the
/// grid fits the SMs once, two otherwise). Splits of a head form a cluster when S <= 16 (but
/// see below for the steps that follow another layer's) and every cluster of the grid can be
/// resident at once (fewer stages first, then no cluster: the arrival-counter merge).
template <typename T, int DPAD, int DCONST>
cudaError_t launch_mma(const decode_params_t& p, int S, const decode_ws_t& ws, cudaStream_t stream,
                       const mma_info_t& mi) {
  using Tr = mma_traits<DPAD>;
  const int G = p.q_heads / p.kv_heads;
  const int bh = p.batch * p.kv_heads;
  int want = Tr::kMaxStages;
  if (!p.pooled()) {  // pooled heads may be longer than cap: keep the deepest pipeline
    const int chunk = (p.cap + S - 1) / S;
    want = std::min(Tr::kMaxStages, std::max(1, (chunk + Tr::TK - 1) / Tr::TK));
  }
  const long long blocks = static_cast<long long>(S) * bh;
  const int per_sm = blocks <= mi.sms ? 1 : 2;
  const int budget = std::min(mi.max_dyn, mi.sm_smem / per_sm - mi.block_fixed);
  // Clusters merge the splits wherever they fit, except right after another layer's decode
  // step at two blocks per SM: with the tiles requested before the wait, the counter merge
  // was faster there for splits of kCounterChunkTokens or more, clusters of more than two
  // blocks slower (H100 back to back, batch 8, M 8192: 99.4 against 102.3 us a step; batch
  // 4, M 512, 72-slot splits: clusters 7.8 against 9.7 us). Elsewhere (a lone step, or after
  // a gate) clusters are 1.5-2.5 us a step faster at batch 8.
  bool cl = mi.cluster && (g_launch_diag & 1) == 0 && S > 1 && S <= kMaxClusterSplits;
  if (cl && per_sm == 2 && S > kPairedClusterSplits && p.prefetch_before_wait != 0 && !p.pooled() &&
      (p.cap + S - 1) / S >= kCounterChunkTokens && (g_launch_diag & 4) == 0)
    cl = false;
  const int recv = Tr::cluster_recv_bytes(S, G);
  const int merge = S > 1 ? merge_smem_bytes(S, G, DPAD) : 0;
  auto dyn_of = [&](int n) {
    return cl ? n * Tr::STAGE_BYTES + recv : std::max(n * Tr::STAGE_BYTES, merge);
  };
  auto stages_for = [&]() {
    int n = want;
    while (n > 1 && dyn_of(n) > budget) --n;
    if (per_sm == 2) n = std::min(n, Tr::kSharedStages);
    return n;
  };
  int nst = stages_for();
  if (cl) {
    while (nst > 1 && mma_max_clusters<T, DPAD, DCONST>(p, S, dyn_of(nst)) < bh) --nst;
    if (dyn_of(nst) > mi.max_dyn || mma_max_clusters<T, DPAD, DCONST>(p, S, dyn_of(nst)) < bh) {
      cl = false;
      nst = stages_for();
    }
  }
  const int dyn = dyn_of(nst);
  if (dyn > mi.max_dyn) return cudaErrorInvalidValue;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(S, p.kv_heads, p.batch);
  cfg.blockDim = dim3(Tr::kThreads);
  cfg.dynamicSmemBytes = dyn;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  unsigned na = 0;
  if (cl) {
    attr[na].id = cudaLaunchAttributeClusterDimension;
    attr[na].val.clusterDim.x = S;
    attr[na].val.clusterDim.y = 1;
    attr[na].val.clusterDim.z = 1;
    ++na;
  }
  if (mi.pdl && (g_launch_diag & 2) == 0) {
    // Start while the previous kernel finishes: the kernel waits before it reads anything but
    // the tiles p.prefetch_before_wait allows.
    attr[na].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[na].val.programmaticStreamSerializationAllowed = 1;
    ++na;
  }
  cfg.attrs = attr;
  cfg.numAttrs = na;
  return cudaLaunchKernelEx(&cfg, DecodeMmaKernel<T, DPAD, DCONST>, p, S, ws, nst, cl ? 1 : 0, dyn);
}

/// Group-size switch: fp16/bf16 with G <= 8 run the tensor-core kernel where the device and
/// the loaded image allow; everything else the CUDA-core kernel, HPT heads per lane group.
template <typename T, int DPAD, int DCONST>
cudaError_t dispatch_group(const decode_params_t& p, int splits, const decode_ws_t& ws,
                           cudaStream_t stream) {
  const int G = p.q_heads / p.kv_heads;
  if constexpr (!std::is_same<T, float>::value) {
    if (G <= kMmaMaxGroup) {
      const mma_info_t& mi = mma_info<T, DPAD, DCONST>();
      if (mi.usable) return launch_mma<T, DPAD, DCONST>(p, splits, ws, stream, mi);
    }
  }
  if (G % 4 == 0) return launch_decode<T, DPAD, DCONST, 4>(p, splits, ws, stream);
  if (G % 2 == 0) return launch_decode<T, DPAD, DCONST, 2>(p, splits, ws, stream);
  return launch_decode<T, DPAD, DCONST, 1>(p, splits, ws, stream);
}

/// Head-dim switch: 64/128/256 are exact fast paths; any other multiple of 8 up to 256 runs
/// the padded generic path of the next larger size.
template <typename T>
cudaError_t decode_step_typed(const decode_params_t& p, int splits, const decode_ws_t& ws,
                              cudaStream_t stream) {
  switch (p.head_dim) {
    case 64:
      return dispatch_group<T, 64, 64>(p, splits, ws, stream);
    case 128:
      return dispatch_group<T, 128, 128>(p, splits, ws, stream);
    case 256:
      return dispatch_group<T, 256, 256>(p, splits, ws, stream);
    default:
      if (!limits::head_dim_supported(p.head_dim))
        return cudaErrorInvalidValue;  // Unsupported head_dim
      if (p.head_dim < 64) return dispatch_group<T, 64, 0>(p, splits, ws, stream);
      if (p.head_dim < 128) return dispatch_group<T, 128, 0>(p, splits, ws, stream);
      return dispatch_group<T, 256, 0>(p, splits, ws, stream);
  }
}

extern template cudaError_t decode_step_typed<float>(const decode_params_t&, int,
                                                     const decode_ws_t&, cudaStream_t);
extern template cudaError_t decode_step_typed<__half>(const decode_params_t&, int,
                                                      const decode_ws_t&, cudaStream_t);
extern template cudaError_t decode_step_typed<__nv_bfloat16>(const decode_params_t&, int,
                                                             const decode_ws_t&, cudaStream_t);

}  // namespace decode_detail

}  // namespace trimkv
