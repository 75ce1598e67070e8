// What the three kernel harnesses (decode/, gate/, prefill/) share: the CUDA error macro, the
// random source, timing statistics and the float64 reference helpers. Harnesses exit on a CUDA
// error (they are standalone programs, never part of the addon).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "common/dtype.h"

/// Exits with the call, its place and the CUDA error text when x fails.
#define CK(x)                                                                                 \
  do {                                                                                        \
    cudaError_t e_ = (x);                                                                     \
    if (e_ != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(2);                                                                           \
    }                                                                                         \
  } while (0)

namespace harness {

/// The harness's random source; each main() seeds it (the seed is part of a run's record).
inline std::mt19937_64 rng;
inline double urand() { return std::uniform_real_distribution<double>(0, 1)(rng); }
inline double nrand() { return std::normal_distribution<double>(0, 1)(rng); }

/// Median of v (the upper one of an even count).
inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

/// The gate activation in float64 (SPEC.md section 3): 0 silu, 1 gelu, 2 gelu_tanh, 3 relu.
inline double act_ref(double u, int act) {
  switch (act) {
    case 0:
      return u / (1 + std::exp(-u));
    case 1:
      return 0.5 * u * (1 + std::erf(u / std::sqrt(2.0)));
    case 2:
      return 0.5 * u * (1 + std::tanh(std::sqrt(2 / M_PI) * (u + 0.044715 * u * u * u)));
    default:
      return std::max(u, 0.0);
  }
}

/// Output tolerance of a storage dtype (SPEC.md section 8).
inline double tolerance(trimkv::DType t) {
  return t == trimkv::DType::kF32 ? 1e-5 : t == trimkv::DType::kF16 ? 2e-3 : 1e-2;
}

}  // namespace harness
