// The online softmax's one -inf rule, shared by every attention kernel (decode, prefill) and
// their merges of partial states (lane groups, warps, key groups, splits). Scores are in the
// exp2 domain (q pre-scaled by log2 e). A state (m, d, acc) with m = -inf is empty: it has seen
// only masked scores, d = 0 and acc = 0.
//   - Updating a state by new scores, or merging states, rescales by exp2(m_old - ref) and
//     weighs scores by exp2(s - ref) with ref = softmax_ref(max): when every input is empty the
//     max is -inf and ref 0, so the factors are exp2(-inf) = 0, not exp2(-inf + inf) = NaN.
//   - A partial state weighs softmax_weight(m_part, m_max) in a merge: 0 for an empty partial.
// normalize: out = acc / d, where d >= 1 always holds for the decode (the new token is in every
// head's attention) and for the prefill (each query sees itself).
#pragma once

#include <cuda_runtime.h>

#include <cmath>

namespace trimkv {
namespace {

/// The reference maximum of an update or merge whose running maximum is mx.
__device__ __forceinline__ float softmax_ref(float mx) { return mx == -INFINITY ? 0.f : mx; }

/// exp2(m_part - m_max): the weight of a partial state of maximum m_part in a merge of maximum
/// m_max; 0 for an empty partial (m_part = -inf).
__device__ __forceinline__ float softmax_weight(float m_part, float m_max) {
  return m_part == -INFINITY ? 0.f : exp2f(m_part - m_max);
}

}  // namespace
}  // namespace trimkv
