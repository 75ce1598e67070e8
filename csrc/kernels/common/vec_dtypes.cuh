// 16-byte vector loads/stores with float conversion, cp.async helpers and small math helpers
// shared by the TRIM-KV kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"

namespace trimkv {

/// Elements of T in one 16-byte vector.
template <typename T>
struct vec_size {
  static constexpr int value = 16 / static_cast<int>(sizeof(T));
};

namespace {

/// Loads 16 bytes (VEC elements of T) and widens them to float.
template <typename T>
__device__ __forceinline__ void load_vec_f32(const T* ptr, float* f);

template <>
__device__ __forceinline__ void load_vec_f32<float>(const float* ptr, float* f) {
  const float4 v = *reinterpret_cast<const float4*>(ptr);
  f[0] = v.x; f[1] = v.y; f[2] = v.z; f[3] = v.w;
}

template <>
__device__ __forceinline__ void load_vec_f32<__half>(const __half* ptr, float* f) {
  const uint4 v = *reinterpret_cast<const uint4*>(ptr);
  const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __half22float2(h[i]);
    f[2 * i] = t.x; f[2 * i + 1] = t.y;
  }
}

template <>
__device__ __forceinline__ void load_vec_f32<__nv_bfloat16>(const __nv_bfloat16* ptr, float* f) {
  const uint4 v = *reinterpret_cast<const uint4*>(ptr);
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // bf16 -> f32 is a shift: cheaper than cvt
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

/// Narrows VEC floats to T (round to nearest even) and stores 16 bytes.
template <typename T>
__device__ __forceinline__ void store_vec_f32(T* ptr, const float* f);

template <>
__device__ __forceinline__ void store_vec_f32<float>(float* ptr, const float* f) {
  *reinterpret_cast<float4*>(ptr) = make_float4(f[0], f[1], f[2], f[3]);
}

template <>
__device__ __forceinline__ void store_vec_f32<__half>(__half* ptr, const float* f) {
  uint4 v;
  __half2* h = reinterpret_cast<__half2*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
  *reinterpret_cast<uint4*>(ptr) = v;
}

template <>
__device__ __forceinline__ void store_vec_f32<__nv_bfloat16>(__nv_bfloat16* ptr, const float* f) {
  uint4 v;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  *reinterpret_cast<uint4*>(ptr) = v;
}

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

/// Copies 16 bytes.
__device__ __forceinline__ void copy16(void* dst, const void* src) {
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
}

/// Asynchronous 16-byte global -> shared copy; when !pred the 16 bytes are zero-filled and
/// nothing is read (src must still be a valid address). cp.async exists from sm_80 on; on
/// Turing (sm_75) the copy is a plain load and store, and commit / wait are no-ops: callers
/// already put a __syncthreads() between the wait and the first read of the tile.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
#else
  *reinterpret_cast<uint4*>(smem) = pred ? *reinterpret_cast<const uint4*>(gmem) : make_uint4(0, 0, 0, 0);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

}  // namespace

/// Maps DType to the device element type inside a dispatch body.
#define TRIMKV_DISPATCH_DTYPE(dtype, T, ...)                      \
  [&]() -> cudaError_t {                                         \
    switch (dtype) {                                             \
      case ::trimkv::DType::kF32: {                              \
        using T = float;                                         \
        return __VA_ARGS__();                                    \
      }                                                          \
      case ::trimkv::DType::kF16: {                              \
        using T = __half;                                        \
        return __VA_ARGS__();                                    \
      }                                                          \
      case ::trimkv::DType::kBF16: {                             \
        using T = __nv_bfloat16;                                 \
        return __VA_ARGS__();                                    \
      }                                                          \
      default:                                                   \
        return cudaErrorInvalidValue; /* Unsupported dtype */    \
    }                                                            \
  }()

/// The canonical sum of squares of a key of D elements (key_sumsq in common/score.h), by one
/// warp: lane l sums the 8-element chunks l, l + 32, ... in double, in order of the element,
/// then the xor-shuffle tree. Every lane returns the total, so the bits equal the CPU
/// backend's. D % 8 == 0; k 16-byte aligned, in global or shared memory.
template <typename T>
__device__ __forceinline__ double warp_key_sumsq(const T* k, int D, int lane) {
  constexpr int VEC = vec_size<T>::value;
  static_assert(8 % VEC == 0, "a chunk of 8 elements is whole vectors");
  double ss = 0.0;
  for (int c = lane; c < D / 8; c += 32) {
#pragma unroll
    for (int v = 0; v < 8 / VEC; ++v) {
      float f[VEC];
      load_vec_f32<T>(k + c * 8 + v * VEC, f);
#pragma unroll
      for (int e = 0; e < VEC; ++e) ss += static_cast<double>(f[e]) * static_cast<double>(f[e]);
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  return ss;
}

}  // namespace trimkv
