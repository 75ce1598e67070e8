// The decayed score of SPEC section 4, shared by host code and kernels.
#pragma once

#include <cmath>
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

/// "knorm_alpha": ln(max(||k||_2, 1e-12)) from the key's sum of squares `ss`, as
/// 0.5 ln(max(ss, 1e-24)) in double, rounded once to float32. Every backend must get the same
/// bits (a last-bit difference flips near-tied scores, and the backends then keep different
/// tokens), so `ss` is summed in the canonical order of key_sumsq below and the log is taken
/// in double, where the host's and CUDA's log agree after the rounding to float.
TRIMKV_HD float lognorm_of_sumsq(double ss) {
  return static_cast<float>(0.5 * log(ss > 1e-24 ? ss : 1e-24));
}

/// The canonical sum of squares of a key of D elements (x(d) its d-th element as float), in
/// double: element d goes to partial sum (d / 8) % 32, in order of d; then partials combine as
/// p[l] + p[l ^ o] for o = 16, 8, 4, 2, 1 (a warp's xor-shuffle reduction, lane l holding
/// p[l]), and the result is p[0]. Squares of float32 values are exact in double, so a kernel
/// may contract x * x + s into one FMA without changing a bit.
template <typename Load>
inline double key_sumsq(int D, Load&& x) {
  double p[32] = {};
  for (int d = 0; d < D; ++d) {
    const double v = static_cast<double>(x(d));
    p[(d / 8) % 32] += v * v;
  }
  for (int o = 16; o > 0; o >>= 1) {
    double q[32];
    for (int l = 0; l < 32; ++l) q[l] = p[l] + p[l ^ o];
    for (int l = 0; l < 32; ++l) p[l] = q[l];
  }
  return p[0];
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
