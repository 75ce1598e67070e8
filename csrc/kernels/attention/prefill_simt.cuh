// The CUDA-core prefill attention kernel (fp32, and fp16/bf16 before sm_80), the chunk-key
// norm kernel (knorm), and their launchers.
#pragma once

#include <cuda_runtime.h>

#include "common/score.h"
#include "kernels/attention/prefill_traits.cuh"
#include "kernels/common/cp_async.cuh"
#include "kernels/common/math.cuh"
#include "kernels/common/softmax_state.cuh"
#include "kernels/common/vec_dtypes.cuh"

namespace trimkv {

/// Causal GQA attention of one chunk with fp32 FMA (fp32 storage; fp16/bf16 before sm_80).
/// Each packed query row is owned by 4 lanes (a quarter of the head dim each); K and V tiles
/// are widened to fp32 in shared memory.
/// grid (ceil(chunk * G / 32), kv_heads), block 128, dynamic smem simt_smem_bytes<DPAD>().
/// \param p  as PrefillAttnMmaKernel
template <typename T, int DPAD>
__global__ void __launch_bounds__(prefill_detail::kSimtThreads)
    PrefillAttnSimtKernel(const prefill_params_t p) {
  using namespace prefill_detail;
  constexpr int BQ = kSimtBQ, BK = kSimtBK, VEC = vec_size<T>::value;
  constexpr int NC = DPAD / 16;  // float4 column groups per lane
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* sK = reinterpret_cast<float*>(smem_raw);
  float* sV = sK + BK * DPAD;

  const int h = blockIdx.y;
  const int G = p.q_heads / p.kv_heads;
  const int D = p.head_dim;
  const prefill_seg_t sg = p.segment(blockIdx.z);
  const int bh = sg.seq * p.kv_heads + h;
  const size_t base = p.head_base(bh);
  const int tid = threadIdx.x;
  const int r = tid >> 2, quarter = tid & 3;
  const prefill_tile_t tile = prefill_tile(sg.chunk, G, BQ, p.lens[bh]);
  if (tile.rows <= 0) return;
  const int len = tile.len;
  const size_t qrow0 = static_cast<size_t>(sg.first) * p.q_heads * D;   // this chunk in q / out
  const size_t krow0 = static_cast<size_t>(sg.first) * p.kv_heads * D;  // and in k / v
  const int lim = len + (tile.row0 + min(r, tile.rows - 1)) / G + 1;
  const T* kc = static_cast<const T*>(p.k_cache);
  const T* vc = static_cast<const T*>(p.v_cache);
  const T* kin = static_cast<const T*>(p.k) + krow0;
  const T* vin = static_cast<const T*>(p.v) + krow0;
  const float sl2 = p.scale * kLog2e;

  // This lane's columns: 16 c + 4 quarter + 0..3, c < NC.
  float q[NC][4], acc[NC][4];
  {
    const T* qrow = static_cast<const T*>(p.q) + qrow0 +
                    prefill_row_offset(tile.row0 + min(r, tile.rows - 1), G, p.kv_heads, h, D);
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      const int col = c * 16 + quarter * 4;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        q[c][e] = col + e < D ? to_f32(qrow[col + e]) * sl2 : 0.f;
        acc[c][e] = 0.f;
      }
    }
  }
  float m = -INFINITY, l = 0.f;

  const int ntiles = (tile.n_end + BK - 1) / BK;
  for (int j = 0; j < ntiles; ++j) {
    const int n0 = j * BK;
    __syncthreads();  // previous tile fully consumed
    for (int e = tid; e < BK * (DPAD / VEC); e += kSimtThreads) {
      const int rr = e / (DPAD / VEC), c = e - rr * (DPAD / VEC);
      const int n = n0 + rr;
      float kf[VEC], vf[VEC];
      if (n < tile.n_end && c * VEC < D) {
        load_vec_f32<T>(prefill_key_row(kc, kin, p, base, h, len, n, c * VEC), kf);
        load_vec_f32<T>(prefill_key_row(vc, vin, p, base, h, len, n, c * VEC), vf);
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) kf[i] = vf[i] = 0.f;
      }
#pragma unroll
      for (int i = 0; i < VEC; i += 4) {
        *reinterpret_cast<float4*>(sK + rr * DPAD + c * VEC + i) =
            make_float4(kf[i], kf[i + 1], kf[i + 2], kf[i + 3]);
        *reinterpret_cast<float4*>(sV + rr * DPAD + c * VEC + i) =
            make_float4(vf[i], vf[i + 1], vf[i + 2], vf[i + 3]);
      }
    }
    __syncthreads();
    float s[BK];
    float mx = -INFINITY;
#pragma unroll
    for (int n = 0; n < BK; ++n) {
      float a = 0.f;
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        const float4 kv = *reinterpret_cast<const float4*>(sK + n * DPAD + c * 16 + quarter * 4);
        a = fmaf(q[c][0], kv.x, a);
        a = fmaf(q[c][1], kv.y, a);
        a = fmaf(q[c][2], kv.z, a);
        a = fmaf(q[c][3], kv.w, a);
      }
      a += __shfl_xor_sync(0xffffffffu, a, 1);
      a += __shfl_xor_sync(0xffffffffu, a, 2);
      s[n] = n0 + n < lim ? a : -INFINITY;
      mx = fmaxf(mx, s[n]);
    }
    const float mnew = fmaxf(m, mx);
    const float ref = softmax_ref(mnew);  // see PrefillAttnMmaKernel
    const float alpha = exp2f(m - ref);
    m = mnew;
    float sum = 0.f;
#pragma unroll
    for (int c = 0; c < NC; ++c)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[c][e] *= alpha;
#pragma unroll
    for (int n = 0; n < BK; ++n) {
      const float pr = exp2f(s[n] - ref);
      sum += pr;
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        const float4 vv = *reinterpret_cast<const float4*>(sV + n * DPAD + c * 16 + quarter * 4);
        acc[c][0] = fmaf(pr, vv.x, acc[c][0]);
        acc[c][1] = fmaf(pr, vv.y, acc[c][1]);
        acc[c][2] = fmaf(pr, vv.z, acc[c][2]);
        acc[c][3] = fmaf(pr, vv.w, acc[c][3]);
      }
    }
    l = l * alpha + sum;
  }
  if (r >= tile.rows) return;
  const float inv = 1.f / l;
  T* orow = static_cast<T*>(p.out) + qrow0 + prefill_row_offset(tile.row0 + r, G, p.kv_heads, h, D);
  // 4 consecutive columns per store (16 bytes for fp32); D % 8 == 0 keeps a group whole.
#pragma unroll
  for (int c = 0; c < NC; ++c) {
    const int col = c * 16 + quarter * 4;
    if (col < D) {
      if constexpr (std::is_same<T, float>::value) {
        *reinterpret_cast<float4*>(orow + col) =
            make_float4(acc[c][0] * inv, acc[c][1] * inv, acc[c][2] * inv, acc[c][3] * inv);
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) orow[col + e] = static_cast<T>(acc[c][e] * inv);
      }
    }
  }
}

/// ln(max(||k||_2, 1e-12)) of every chunk key, in fp32 from the stored-dtype key (knorm).
/// grid (ceil(longest chunk * kv_heads / 8), 1, segments), block 256: one warp per (token, kv
/// head) of chunk blockIdx.z.
/// \param p        k [tokens, kv_heads, D] dtype
/// \param lognorm  per chunk, [kv_heads, chunk] at row offset first * kv_heads
template <typename T>
__global__ void PrefillLognormKernel(const prefill_params_t p, float* __restrict__ lognorm) {
  const prefill_seg_t sg = p.segment(blockIdx.z);
  const int row = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (row >= sg.chunk * p.kv_heads) return;
  const int D = p.head_dim;
  const T* kr = static_cast<const T*>(p.k) + (static_cast<size_t>(sg.first) * p.kv_heads + row) * D;
  // The canonical order: the bits equal the CPU backend's and decode's.
  const double ss = warp_key_sumsq<T>(kr, D, lane);
  if (lane == 0) {
    const int i = row / p.kv_heads, h = row - i * p.kv_heads;
    lognorm[static_cast<size_t>(sg.first) * p.kv_heads + static_cast<size_t>(h) * sg.chunk + i] =
        lognorm_of_sumsq(ss);
  }
}

namespace prefill_detail {

template <typename T, int DPAD>
cudaError_t launch_attention_simt(const prefill_params_t& p, cudaStream_t stream) {
  const long long rows = static_cast<long long>(p.longest()) * (p.q_heads / p.kv_heads);
  constexpr int smem = simt_smem_bytes<DPAD>();
  auto kern = PrefillAttnSimtKernel<T, DPAD>;
  const cudaError_t e =
      cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>((rows + kSimtBQ - 1) / kSimtBQ), p.kv_heads, p.segments());
  kern<<<grid, kSimtThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace prefill_detail

}  // namespace trimkv
