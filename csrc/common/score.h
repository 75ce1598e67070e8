// The decayed score of SPEC section 4, shared by host code and kernels.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define TRIMKV_HD __host__ __device__ __forceinline__
#else
#define TRIMKV_HD inline
#endif

namespace trimkv {

/// score = lam * (T + 1 - p) (+ ln max(||k||, 1e-12) for "knorm_alpha", passed as lognorm,
/// 0 otherwise). The reference measures age against index T + 1, so the newest token
/// (p = T - 1) has age 2, not 1: keep the +1, it changes which token loses a tie in decay.
TRIMKV_HD float decayed_score(float lam, int32_t pos, int64_t T, float lognorm) {
  return lam * static_cast<float>(T + 1 - pos) + lognorm;
}

/// Eviction order: a token `a` ranks above `b` when its score is higher; equal scores keep
/// the larger position (the older token goes first). NaN scores rank lowest so that a bad
/// lam can never break the ordering. Sliding-window tokens carry +inf.
TRIMKV_HD bool ranks_above(float sa, int32_t pa, float sb, int32_t pb) {
  const bool na = sa != sa, nb = sb != sb;
  if (na || nb) return !na && nb ? true : (na == nb ? pa > pb : false);
  return sa > sb || (sa == sb && pa > pb);
}

}  // namespace trimkv
