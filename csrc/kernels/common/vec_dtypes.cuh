// 16-byte vector loads/stores with float conversion, shared by the TRIM-KV kernels (cp.async:
// cp_async.cuh; dtype dispatch: dispatch.cuh; the key norm: math.cuh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

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
  f[0] = v.x;
  f[1] = v.y;
  f[2] = v.z;
  f[3] = v.w;
}

template <>
__device__ __forceinline__ void load_vec_f32<__half>(const __half* ptr, float* f) {
  const uint4 v = *reinterpret_cast<const uint4*>(ptr);
  const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __half22float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
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

}  // namespace

}  // namespace trimkv
