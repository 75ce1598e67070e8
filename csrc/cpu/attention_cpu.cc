#include "cpu/attention_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace trimkv::cpu {

void attend_row(const float* q, const float* keys, const float* values, int n, int D, float scale, float* out,
                std::vector<float>& logits) {
  std::fill(out, out + D, 0.f);
  if (n == 0) return;
  logits.resize(static_cast<size_t>(n));
  float m = -std::numeric_limits<float>::infinity();
  for (int t = 0; t < n; ++t) {
    const float* k = keys + static_cast<size_t>(t) * D;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    int d = 0;
    for (; d + 4 <= D; d += 4) {
      acc[0] += q[d] * k[d];
      acc[1] += q[d + 1] * k[d + 1];
      acc[2] += q[d + 2] * k[d + 2];
      acc[3] += q[d + 3] * k[d + 3];
    }
    for (; d < D; ++d) acc[0] += q[d] * k[d];
    logits[t] = (acc[0] + acc[1] + acc[2] + acc[3]) * scale;
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
