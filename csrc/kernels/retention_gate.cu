// Retention-gate kernels: see retention_gate.cuh.
#include "retention_gate.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "vec_dtypes.cuh"

namespace trimkv {

namespace {

constexpr int kGateThreads = 256;
constexpr int kRowsPerBlock = kGateThreads / 32;  // one warp per intermediate row
constexpr int kTokChunk = 8;                      // tokens per register pass

/// 8 consecutive elements as float (16 bytes for 2-byte types, 32 for float).
template <typename T>
__device__ __forceinline__ void load8(const T* p, float* f) {
  load_vec_f32<T>(p, f);
}
template <>
__device__ __forceinline__ void load8<float>(const float* p, float* f) {
  load_vec_f32<float>(p, f);
  load_vec_f32<float>(p + 4, f + 4);
}

__device__ __forceinline__ float gate_act(float u, int act) {
  switch (act) {
    case kGateSilu: return u / (1.f + expf(-u));
    case kGateGelu: return 0.5f * u * (1.f + erff(u * 0.70710678118654752f));
    case kGateGeluTanh: {
      const float c = 0.7978845608028654f;  // sqrt(2/pi)
      return 0.5f * u * (1.f + tanhf(c * (u + 0.044715f * u * u * u)));
    }
    default: return fmaxf(u, 0.f);
  }
}

/// Stable logsigmoid: min(z, 0) - log1p(exp(-|z|)) never overflows.
__device__ __forceinline__ float log_sigmoid(float z) {
  return fminf(z, 0.f) - log1pf(expf(-fabsf(z)));
}

}  // namespace

/// Hidden layer of the gate: a[t, r] = act(W1[r] . x[t] + b1[r]) (MLP) or
/// act(W_gate[r] . x[t]) * (W_up[r] . x[t]) (GLU). One warp per row r, every token, so that
/// each weight row is read from memory once per call.
/// grid ceil(inter / 8), block 256.
/// \param x  [n, in_dim] TX
/// \param wa [inter, in_dim] TW (W1 or W_gate), wb [inter, in_dim] TW (W_up; GLU only)
/// \param b1 [inter] TW or null (MLP only)
/// \param a  [n, inter] float output
template <typename TX, typename TW, bool GLU>
__global__ void __launch_bounds__(kGateThreads)
    GateHiddenKernel(const TX* __restrict__ x, const TW* __restrict__ wa,
                     const TW* __restrict__ wb, const TW* __restrict__ b1, float* __restrict__ a,
                     int n, int in_dim, int inter, int act) {
  const int lane = threadIdx.x & 31;
  const int r = blockIdx.x * kRowsPerBlock + (threadIdx.x >> 5);
  if (r >= inter) return;
  const TW* ra = wa + static_cast<size_t>(r) * in_dim;
  const TW* rb = GLU ? wb + static_cast<size_t>(r) * in_dim : nullptr;
  const float bias = (!GLU && b1 != nullptr) ? to_f32(b1[r]) : 0.f;
  const int nchunk = in_dim / 8;
  for (int t0 = 0; t0 < n; t0 += kTokChunk) {
    float ua[kTokChunk], ub[kTokChunk];
#pragma unroll
    for (int j = 0; j < kTokChunk; ++j) { ua[j] = 0.f; ub[j] = 0.f; }
    for (int c = lane; c < nchunk; c += 32) {
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
            ua[j] = fmaf(w[e], xv[e], ua[j]);
            if (GLU) ub[j] = fmaf(w2[e], xv[e], ub[j]);
          }
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kTokChunk; ++j) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        ua[j] += __shfl_xor_sync(0xffffffffu, ua[j], o);
        if (GLU) ub[j] += __shfl_xor_sync(0xffffffffu, ub[j], o);
      }
    }
    if (lane < kTokChunk && t0 + lane < n) {
      float va = 0.f, vb = 0.f;
#pragma unroll
      for (int j = 0; j < kTokChunk; ++j)
        if (j == lane) { va = ua[j]; vb = ub[j]; }
      const float out = GLU ? gate_act(va, act) * vb : gate_act(va + bias, act);
      a[static_cast<size_t>(t0 + lane) * inter + r] = out;
    }
  }
}

/// Output layer: lam[t, h] = logsigmoid(W2[h] . a[t] + bias[h]). grid n, block 256 (a warp per
/// head).
/// \param a  [n, inter] float, w2 [kv_heads, inter] TW, bias [kv_heads] TW or null
/// \param lam [n, kv_heads] float
template <typename TW>
__global__ void __launch_bounds__(kGateThreads)
    GateOutKernel(const float* __restrict__ a, const TW* __restrict__ w2,
                  const TW* __restrict__ bias, float* __restrict__ lam, int inter,
                  int kv_heads) {
  const int t = blockIdx.x;
  const int lane = threadIdx.x & 31;
  const float* at = a + static_cast<size_t>(t) * inter;
  for (int h = threadIdx.x >> 5; h < kv_heads; h += kGateThreads / 32) {
    const TW* w = w2 + static_cast<size_t>(h) * inter;
    float z = 0.f;
    for (int i = lane; i < inter; i += 32) z = fmaf(to_f32(w[i]), at[i], z);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) z += __shfl_xor_sync(0xffffffffu, z, o);
    if (lane == 0) {
      if (bias != nullptr) z += to_f32(bias[h]);
      lam[static_cast<size_t>(t) * kv_heads + h] = log_sigmoid(z);
    }
  }
}

size_t RetentionGateWorkspaceBytes(const gate_params_t& p) {
  return static_cast<size_t>(p.n > 0 ? p.n : 0) * (p.inter > 0 ? p.inter : 0) * sizeof(float);
}

namespace {

template <typename TX, typename TW>
cudaError_t launch_gate(const gate_params_t& p, float* a, cudaStream_t stream) {
  const dim3 grid((p.inter + kRowsPerBlock - 1) / kRowsPerBlock);
  if (p.kind == kGateGlu) {
    GateHiddenKernel<TX, TW, true><<<grid, kGateThreads, 0, stream>>>(
        static_cast<const TX*>(p.x), static_cast<const TW*>(p.w_gate),
        static_cast<const TW*>(p.w_up), nullptr, a, p.n, p.in_dim, p.inter, p.act);
  } else {
    GateHiddenKernel<TX, TW, false><<<grid, kGateThreads, 0, stream>>>(
        static_cast<const TX*>(p.x), static_cast<const TW*>(p.w1), nullptr,
        static_cast<const TW*>(p.b1), a, p.n, p.in_dim, p.inter, p.act);
  }
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  const TW* w2 = static_cast<const TW*>(p.kind == kGateGlu ? p.w_down : p.w2);
  GateOutKernel<TW><<<p.n, kGateThreads, 0, stream>>>(a, w2, static_cast<const TW*>(p.bias),
                                                       p.lam, p.inter, p.kv_heads);
  return cudaGetLastError();
}

template <typename TX>
cudaError_t dispatch_w(const gate_params_t& p, float* a, cudaStream_t stream) {
  switch (p.w_dtype) {
    case DType::kF32: return launch_gate<TX, float>(p, a, stream);
    case DType::kF16: return launch_gate<TX, __half>(p, a, stream);
    case DType::kBF16: return launch_gate<TX, __nv_bfloat16>(p, a, stream);
  }
  return cudaErrorInvalidValue;  // Unsupported weight dtype
}

}  // namespace

cudaError_t RetentionGate(const gate_params_t& p, void* workspace, cudaStream_t stream) {
  if (p.n <= 0 || p.in_dim <= 0 || p.in_dim % 8 != 0 || p.inter <= 0 || p.kv_heads <= 0 ||
      p.act < 0 || p.act > 3 || (p.kind != kGateMlp && p.kind != kGateGlu) ||
      workspace == nullptr || p.x == nullptr || p.lam == nullptr)
    return cudaErrorInvalidValue;
  if (p.kind == kGateMlp && (p.w1 == nullptr || p.w2 == nullptr)) return cudaErrorInvalidValue;
  if (p.kind == kGateGlu && (p.w_gate == nullptr || p.w_up == nullptr || p.w_down == nullptr))
    return cudaErrorInvalidValue;
  float* a = static_cast<float*>(workspace);
  switch (p.x_dtype) {
    case DType::kF32: return dispatch_w<float>(p, a, stream);
    case DType::kF16: return dispatch_w<__half>(p, a, stream);
    case DType::kBF16: return dispatch_w<__nv_bfloat16>(p, a, stream);
  }
  return cudaErrorInvalidValue;  // Unsupported input dtype
}

}  // namespace trimkv
