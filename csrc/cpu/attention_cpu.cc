#include "cpu/attention_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace trimkv::cpu {

void attend_row(const float* q, const float* keys, const float* values, int n, int D, float scale,
                float* out, std::vector<float>& logits) {
  std::fill(out, out + D, 0.f);
  if (n == 0) return;
  logits.resize(static_cast<size_t>(n));
  float m = -std::numeric_limits<float>::infinity();
  for (int t = 0; t < n; ++t) {
    const float* k = keys + static_cast<size_t>(t) * D;
    // Eight independent partial sums: the compiler keeps them in vector registers.
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    int d = 0;
    for (; d + 8 <= D; d += 8)
      for (int j = 0; j < 8; ++j) acc[j] += q[d + j] * k[d + j];
    for (; d < D; ++d) acc[0] += q[d] * k[d];
    logits[t] =
        (((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))) * scale;
    m = std::max(m, logits[t]);
  }
  float denom = 0.f;
  for (int t = 0; t < n; ++t) {
    logits[t] = std::exp(logits[t] - m);
    denom += logits[t];
  }
  const float inv = 1.f / denom;
  for (int t = 0; t < n; ++t) {
    const float w = logits[t] * inv;
    const float* v = values + static_cast<size_t>(t) * D;
    for (int d = 0; d < D; ++d) out[d] += w * v[d];
  }
}

}  // namespace trimkv::cpu
