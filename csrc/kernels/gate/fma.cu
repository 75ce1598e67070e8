// The hidden layer on CUDA cores, GateFmaKernel (any dtypes, any architecture), and its
// launcher.
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "kernels/gate/gate_common.cuh"
#include "kernels/gate/plan.h"

namespace trimkv {

/// Hidden layer on CUDA cores (any dtypes, any arch): raw partial products
/// u[s, t, r] = W[r, K_s] . x[t, K_s] over K slice s = blockIdx.y. One warp per row r, every
/// token, so each weight row slice is read from memory once per call.
/// grid (ceil(inter / 8), splits), block 256.
/// \param x  [n, in_dim] TX
/// \param wa [inter, in_dim] TW (W1 or W_gate), wb [inter, in_dim] TW (W_up; GLU only)
/// \param u  [splits, n, inter] float (GLU: W_gate's, then W_up's)
template <typename TX, typename TW, bool GLU>
__global__ void __launch_bounds__(kFmaThreads)
    GateFmaKernel(const TX* __restrict__ x, const TW* __restrict__ wa, const TW* __restrict__ wb,
                  float* __restrict__ u, int n, int in_dim, int inter, int kslice) {
  pdl_launch_dependents();
  const int lane = threadIdx.x & 31;
  const int r = blockIdx.x * kFmaRows + (threadIdx.x >> 5);
  if (r >= inter) return;
  const TW* ra = wa + static_cast<size_t>(r) * in_dim;
  const TW* rb = GLU ? wb + static_cast<size_t>(r) * in_dim : nullptr;
  const int c_begin = blockIdx.y * kslice / 8;
  const int c_end = min(in_dim, (blockIdx.y + 1) * kslice) / 8;
  float* ua = u + static_cast<size_t>(blockIdx.y) * n * inter + r;
  float* ub = ua + static_cast<size_t>(gridDim.y) * n * inter;
  for (int t0 = 0; t0 < n; t0 += kTokChunk) {
    float sa[kTokChunk], sb[kTokChunk];
#pragma unroll
    for (int j = 0; j < kTokChunk; ++j) {
      sa[j] = 0.f;
      sb[j] = 0.f;
    }
    for (int c = c_begin + lane; c < c_end; c += 32) {
      float w[8], w2[8];
      load8<TW>(ra + c * 8, w);
      if (GLU) load8<TW>(rb + c * 8, w2);
#pragma unroll
      for (int j = 0; j < kTokChunk; ++j) {
        if (t0 + j < n) {
          float xv[8];
          load8<TX>(x + static_cast<size_t>(t0 + j) * in_dim + c * 8, xv);
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            sa[j] = fmaf(w[e], xv[e], sa[j]);
            if (GLU) sb[j] = fmaf(w2[e], xv[e], sb[j]);
          }
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kTokChunk; ++j) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        sa[j] += __shfl_xor_sync(0xffffffffu, sa[j], o);
        if (GLU) sb[j] += __shfl_xor_sync(0xffffffffu, sb[j], o);
      }
    }
    if (lane < kTokChunk && t0 + lane < n) {
      float va = 0.f, vb = 0.f;
#pragma unroll
      for (int j = 0; j < kTokChunk; ++j)
        if (j == lane) {
          va = sa[j];
          vb = sb[j];
        }
      ua[static_cast<size_t>(t0 + lane) * inter] = va;
      if (GLU) ub[static_cast<size_t>(t0 + lane) * inter] = vb;
    }
  }
}

namespace gate_detail {

namespace {

template <typename TX, typename TW>
cudaError_t launch_fma_typed(const gate_params_t& p, const gate_plan_t& plan, float* ws,
                             cudaStream_t stream) {
  const dim3 grid(ceil_div(p.inter, kFmaRows), plan.splits);
  if (grid.y > 65535u) return cudaErrorInvalidValue;
  const TX* x = static_cast<const TX*>(p.x);
  if (p.kind == kGateGlu) {
    GateFmaKernel<TX, TW, true><<<grid, kFmaThreads, 0, stream>>>(
        x, static_cast<const TW*>(p.w_gate), static_cast<const TW*>(p.w_up), ws, p.n, p.in_dim,
        p.inter, plan.kslice);
  } else {
    GateFmaKernel<TX, TW, false><<<grid, kFmaThreads, 0, stream>>>(
        x, static_cast<const TW*>(p.w1), nullptr, ws, p.n, p.in_dim, p.inter, plan.kslice);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_fma(const gate_params_t& p, const gate_plan_t& plan, float* ws,
                       cudaStream_t stream) {
  return with_dtypes(p, [&](auto tx, auto tw) {
    return launch_fma_typed<decltype(tx), decltype(tw)>(p, plan, ws, stream);
  });
}

}  // namespace gate_detail

}  // namespace trimkv
