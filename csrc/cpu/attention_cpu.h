// Reference-grade CPU attention for one (sequence, KV head): float32 math on rows already
// converted to float. Used by the CPU backend for decode and prefill.
#pragma once

#include <vector>

namespace trimkv::cpu {

/// Softmax attention of one query row over `n` keys/values.
/// \param q [D]  \param keys [n, D]  \param values [n, D]  \param out [D]
/// With n == 0 the output is zero (an empty softmax state has no mass).
void attend_row(const float* q, const float* keys, const float* values, int n, int D, float scale,
                float* out, std::vector<float>& logits);

}  // namespace trimkv::cpu
