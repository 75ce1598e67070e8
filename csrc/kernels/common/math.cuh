// Small numeric device helpers shared by the kernels: the canonical key norm (bit-equal to the
// CPU backend's).
#pragma once

#include <cuda_runtime.h>

#include "kernels/common/vec_dtypes.cuh"

namespace trimkv {

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
