// The finishing kernels of the two-kernel plans (GateFinishFewKernel, GateFinishManyKernel over
// K-split partials; GateFinishZKernel after a fused hidden layer) and their launcher.
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "kernels/gate/gate_common.cuh"
#include "kernels/gate/plan.h"

namespace trimkv {

/// Sums the K-split partials and finishes the gate for token t = blockIdx.x, for few tokens:
/// a = act(u + b1) (MLP) or act(u_gate) * u_up (GLU), lam[t, h] = logsigmoid(W2[h] . a + bias).
/// One thread per row (strided), heads kHeadGroup at a time in registers, then a block
/// reduction; any inter and kv_heads work (a is recomputed per group beyond the first).
/// The loads of a row (partials, b1, W2) are independent, so a row costs one memory round
/// trip, and W2 / b1 are prefetched into L2 before the wait for the hidden layer.
/// grid n, block 512; launched as a programmatic dependent of the hidden layer.
/// \param u [splits, n, inter] float (GLU: W_gate's, then W_up's)
/// \param b1 [inter] TW or null, w2 [kv_heads, inter] TW, bias [kv_heads] TW or null
/// \param lam [n, kv_heads] float
template <typename TW, bool GLU>
__global__ void __launch_bounds__(kFinishFewThreads)
    GateFinishFewKernel(const float* __restrict__ u, const TW* __restrict__ b1,
                        const TW* __restrict__ w2, const TW* __restrict__ bias,
                        float* __restrict__ lam, int n, int inter, int kv_heads, int splits,
                        int act) {
  constexpr int kWarps = kFinishFewThreads / 32;
  __shared__ float red[kWarps][kHeadGroup];
  const int t = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int r = threadIdx.x; r < inter; r += kFinishFewThreads) {
    for (int h = 0; h < min(kv_heads, kHeadGroup); ++h)
      prefetch_l2(w2 + static_cast<size_t>(h) * inter + r);
    if (b1 != nullptr) prefetch_l2(b1 + r);
  }
  pdl_wait();
  const size_t split_stride = static_cast<size_t>(n) * inter;
  const size_t mat_stride = split_stride * splits;
  const float* ut = u + static_cast<size_t>(t) * inter;
  for (int h0 = 0; h0 < kv_heads; h0 += kHeadGroup) {
    float z[kHeadGroup];
#pragma unroll
    for (int k = 0; k < kHeadGroup; ++k) z[k] = 0.f;
    for (int r = threadIdx.x; r < inter; r += kFinishFewThreads) {
      float sa = 0.f, sb = 0.f;  // summed in split order: deterministic
      for (int s0 = 0; s0 < splits; s0 += kSplitBatch) {
        float va[kSplitBatch], vb[kSplitBatch];
#pragma unroll
        for (int k = 0; k < kSplitBatch; ++k) {
          const bool ok = s0 + k < splits;
          const size_t off = static_cast<size_t>(s0 + k) * split_stride + r;
          va[k] = ok ? ut[off] : 0.f;
          vb[k] = (GLU && ok) ? ut[mat_stride + off] : 0.f;
        }
#pragma unroll
        for (int k = 0; k < kSplitBatch; ++k) {
          sa += va[k];
          sb += vb[k];
        }
      }
      const float a =
          GLU ? gate_act(sa, act) * sb : gate_act(sa + (b1 != nullptr ? to_f32(b1[r]) : 0.f), act);
#pragma unroll
      for (int k = 0; k < kHeadGroup; ++k)
        if (h0 + k < kv_heads)
          z[k] = fmaf(to_f32(w2[static_cast<size_t>(h0 + k) * inter + r]), a, z[k]);
    }
#pragma unroll
    for (int k = 0; k < kHeadGroup; ++k) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) z[k] += __shfl_xor_sync(0xffffffffu, z[k], o);
    }
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < kHeadGroup; ++k) red[warp][k] = z[k];
    }
    __syncthreads();
    const int h = h0 + threadIdx.x;
    if (threadIdx.x < kHeadGroup && h < kv_heads) {
      float v = bias != nullptr ? to_f32(bias[h]) : 0.f;
      for (int w = 0; w < kWarps; ++w) v += red[w][threadIdx.x];
      lam[static_cast<size_t>(t) * kv_heads + h] = log_sigmoid(v);
    }
    __syncthreads();  // red is reused by the next head group
  }
}

/// The same as GateFinishFewKernel for many tokens: activations are staged kFinishChunk rows
/// at a time in shared memory and one warp computes one head (a recomputed per group of 8
/// heads beyond the first). grid n, block 256; launched as a programmatic dependent of the
/// hidden layer.
template <typename TW, bool GLU>
__global__ void __launch_bounds__(kFinishManyThreads)
    GateFinishManyKernel(const float* __restrict__ u, const TW* __restrict__ b1,
                         const TW* __restrict__ w2, const TW* __restrict__ bias,
                         float* __restrict__ lam, int n, int inter, int kv_heads, int splits,
                         int act) {
  constexpr int kWarps = kFinishManyThreads / 32;
  __shared__ float a_s[kFinishChunk];
  pdl_wait();
  const int t = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const size_t split_stride = static_cast<size_t>(n) * inter;
  const size_t mat_stride = split_stride * splits;
  const float* ut = u + static_cast<size_t>(t) * inter;
  for (int h0 = 0; h0 < kv_heads; h0 += kWarps) {
    const int h = h0 + warp;
    float z = 0.f;
    for (int r0 = 0; r0 < inter; r0 += kFinishChunk) {
      const int len = min(kFinishChunk, inter - r0);
      __syncthreads();  // the previous pass's readers are done with a_s
      for (int i = threadIdx.x; i < len; i += kFinishManyThreads) {
        const int r = r0 + i;
        float sa = 0.f, sb = 0.f;
#pragma unroll 4
        for (int s = 0; s < splits; ++s) {
          sa += ut[s * split_stride + r];
          if (GLU) sb += ut[mat_stride + s * split_stride + r];
        }
        a_s[i] = GLU ? gate_act(sa, act) * sb
                     : gate_act(sa + (b1 != nullptr ? to_f32(b1[r]) : 0.f), act);
      }
      __syncthreads();
      if (h < kv_heads) {
        const TW* w = w2 + static_cast<size_t>(h) * inter + r0;
        for (int i = lane; i < len; i += 32) z = fmaf(to_f32(w[i]), a_s[i], z);
      }
    }
    if (h < kv_heads) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) z += __shfl_xor_sync(0xffffffffu, z, o);
      if (lane == 0) {
        if (bias != nullptr) z += to_f32(bias[h]);
        lam[static_cast<size_t>(t) * kv_heads + h] = log_sigmoid(z);
      }
    }
  }
}

/// lam[i] = logsigmoid(bias[i % kv_heads] + sum over slots of zp[slot, i]) for the flat index
/// i = t * kv_heads + h, summed in slot order (deterministic). grid ceil(n kv_heads / 256);
/// launched as a programmatic dependent of GateTcKernel.
/// \param zp [slots, n, kv_heads] float, bias [kv_heads] TW or null, lam [n, kv_heads] float
template <typename TW>
__global__ void __launch_bounds__(kFinishZThreads)
    GateFinishZKernel(const float* __restrict__ zp, const TW* __restrict__ bias,
                      float* __restrict__ lam, size_t count, int kv_heads, int slots) {
  const size_t i = blockIdx.x * static_cast<size_t>(kFinishZThreads) + threadIdx.x;
  const float b = (i < count && bias != nullptr) ? to_f32(bias[i % kv_heads]) : 0.f;
  pdl_wait();
  if (i >= count) return;
  float z = b;
  for (int s0 = 0; s0 < slots; s0 += kSplitBatch) {
    float v[kSplitBatch];
#pragma unroll
    for (int k = 0; k < kSplitBatch; ++k)
      v[k] = s0 + k < slots ? zp[static_cast<size_t>(s0 + k) * count + i] : 0.f;
#pragma unroll
    for (int k = 0; k < kSplitBatch; ++k) z += v[k];
  }
  lam[i] = log_sigmoid(z);
}

namespace gate_detail {

namespace {

/// The finishing kernel of a plan: GateFinishZKernel after a fused GateTcKernel (slots > 0:
/// its number of z partials), else GateFinishFewKernel / GateFinishManyKernel over the K-split
/// partials.
template <typename TW>
cudaError_t launch_finish_typed(const gate_params_t& p, const gate_plan_t& plan, int slots,
                                const float* ws, bool pdl, cudaStream_t stream) {
  const TW* bias = static_cast<const TW*>(p.bias);
  if (slots > 0) {
    const size_t count = static_cast<size_t>(p.n) * p.kv_heads;
    const unsigned blocks = static_cast<unsigned>((count + kFinishZThreads - 1) / kFinishZThreads);
    return launch_dependent(pdl, GateFinishZKernel<TW>, blocks, kFinishZThreads, 0, stream, ws,
                            bias, p.lam, count, p.kv_heads, slots);
  }
  const TW* w2 = static_cast<const TW*>(p.kind == kGateGlu ? p.w_down : p.w2);
  const TW* b1 = static_cast<const TW*>(p.kind == kGateGlu ? nullptr : p.b1);
  const bool glu = p.kind == kGateGlu;
  if (p.n < kFewTokens) {
    auto kernel = glu ? GateFinishFewKernel<TW, true> : GateFinishFewKernel<TW, false>;
    return launch_dependent(pdl, kernel, p.n, kFinishFewThreads, 0, stream, ws, b1, w2, bias, p.lam,
                            p.n, p.inter, p.kv_heads, plan.splits, p.act);
  }
  auto kernel = glu ? GateFinishManyKernel<TW, true> : GateFinishManyKernel<TW, false>;
  return launch_dependent(pdl, kernel, p.n, kFinishManyThreads, 0, stream, ws, b1, w2, bias, p.lam,
                          p.n, p.inter, p.kv_heads, plan.splits, p.act);
}

}  // namespace

cudaError_t launch_finish(const gate_params_t& p, const gate_plan_t& plan, int slots,
                          const float* ws, bool pdl, cudaStream_t stream) {
  return TRIMKV_DISPATCH_DTYPE(
      p.w_dtype, TW, [&] { return launch_finish_typed<TW>(p, plan, slots, ws, pdl, stream); });
}

}  // namespace gate_detail

}  // namespace trimkv
