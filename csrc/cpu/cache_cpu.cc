// CPU backend of the KV cache: the reference semantics of SPEC sections 4-7 in plain C++.
// Storage is per (layer, sequence, KV head), tokens in slots in arrival order; attention
// converts rows to float32 and computes in float32; eviction ranks by (score, position).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "common/errors.h"
#include "common/score.h"
#include "cpu/attention_cpu.h"
#include "cpu/parallel.h"
#include "ops/cache.h"
#include "runtime/device.h"

namespace trimkv {
namespace {

struct HeadStore {
  std::vector<uint8_t> k, v;  // [len, D] in the cache dtype
  std::vector<int32_t> pos;
  std::vector<float> lam, lognorm;
  int len = 0;
};

// A token competing for a place in a pool of heads.
struct Candidate {
  float score;
  int32_t pos;
  int order;  // (layer * kv_heads + head): lower wins a full tie across heads
  int head;   // index into the pool
  int slot;
};

bool better(const Candidate& a, const Candidate& b) {
  if (ranks_above(a.score, a.pos, b.score, b.pos)) return true;
  if (ranks_above(b.score, b.pos, a.score, a.pos)) return false;
  return a.order < b.order;
}

class CpuCache final : public Cache {
 public:
  explicit CpuCache(const cache_config_t& cfg)
      : Cache(Backend::kCpu, cfg),
        row_bytes_(static_cast<size_t>(cfg.head_dim) * dtype_size(cfg.dtype)),
        heads_(static_cast<size_t>(cfg.layers) * cfg.batch * cfg.kv_heads) {
    if (cfg.scope == Scope::kHead) {
      const size_t cap = static_cast<size_t>(cfg.memory) + cfg.buffer + 1;
      check_host_allocation(heads_.size() * cap * token_bytes(), "the KV cache");
      for (HeadStore& h : heads_) reserve(h, cap);
    }
  }

  size_t used_bytes() const override {
    size_t n = 0;
    for (const HeadStore& h : heads_) n += static_cast<size_t>(h.len) * token_bytes();
    return n;
  }

  size_t reserved_bytes() const override {
    size_t n = 0;
    for (const HeadStore& h : heads_) n += h.pos.capacity() * token_bytes();
    return n;
  }

 protected:
  void do_decode(int layer, const decode_args_t& a) override {
    const int Hq = cfg_.q_heads, Hkv = cfg_.kv_heads, D = cfg_.head_dim, G = cfg_.group();
    const float scale = cfg_.softmax_scale();
    const DType dt = cfg_.dtype;
    const float* lam_in = static_cast<const float*>(a.lam->data());
    std::vector<int> tasks;  // b * Hkv + h of every active (sequence, KV head)
    for (int b = 0; b < cfg_.batch; ++b) {
      if (a.positions[b] < 0) {  // inactive slot: no token, zero output rows
        for (size_t i = 0; i < static_cast<size_t>(Hq) * D; ++i)
          store_from_float(a.out->data(), dt, static_cast<size_t>(b) * Hq * D + i, 0.f);
        continue;
      }
      for (int h = 0; h < Hkv; ++h) tasks.push_back(b * Hkv + h);
    }
    // Each task owns one head's storage and its G output rows: no two tasks share memory.
    cpu::parallel_for(static_cast<int>(tasks.size()), [&](int t) {
      thread_local std::vector<float> keys, values, qrow, orow, logits;
      const int b = tasks[t] / Hkv, h = tasks[t] % Hkv;
      qrow.resize(D);
      orow.resize(D);
      HeadStore& hs = at(layer, b, h);
      const size_t new_row = static_cast<size_t>(tasks[t]) * D;
      gather_rows(hs, a.k->data(), a.v->data(), new_row, 1, keys, values);
      for (int g = 0; g < G; ++g) {
        const size_t qoff = static_cast<size_t>(b * Hq + h * G + g) * D;
        to_float_n(a.q->data(), dt, qoff, D, qrow.data());
        cpu::attend_row(qrow.data(), keys.data(), values.data(), hs.len + 1, D, scale, orow.data(),
                        logits);
        for (int d = 0; d < D; ++d) store_from_float(a.out->data(), dt, qoff + d, orow[d]);
      }
      append(hs, a.k->data(), a.v->data(), new_row, a.positions[b], lam_in[tasks[t]]);
      if (cfg_.scope == Scope::kHead) evict_head(layer, b, h);
    });
    if (cfg_.scope != Scope::kHead) {
      for (int b = 0; b < cfg_.batch; ++b)
        if (a.positions[b] >= 0) evict_after_pass(layer, b);
    }
  }

  void do_prefill(int layer, const prefill_args_t& a) override {
    for (const prefill_chunk_t& c : a.chunks) prefill_chunk(layer, a, c);
  }

  void do_reset(int seq) override {
    for (int l = 0; l < cfg_.layers; ++l)
      for (int h = 0; h < cfg_.kv_heads; ++h) at(l, seq, h).len = 0;
  }

  int do_length(int seq, int layer, int head) const override {
    return const_cast<CpuCache*>(this)->at(layer, seq, head).len;
  }

  void do_snapshot(int seq, int layer, int head, std::vector<int32_t>& pos, std::vector<float>& lam,
                   std::vector<float>& lognorm) const override {
    const HeadStore& hs = const_cast<CpuCache*>(this)->at(layer, seq, head);
    pos.assign(hs.pos.begin(), hs.pos.begin() + hs.len);
    lam.assign(hs.lam.begin(), hs.lam.begin() + hs.len);
    lognorm.assign(hs.lognorm.begin(), hs.lognorm.begin() + hs.len);
  }

 private:
  // One sequence's chunk of a prefill call: rows [c.first, c.first + c.length) of the inputs.
  void prefill_chunk(int layer, const prefill_args_t& a, const prefill_chunk_t& c) {
    const int Hq = cfg_.q_heads, Hkv = cfg_.kv_heads, D = cfg_.head_dim, G = cfg_.group();
    const int C = c.length;
    const size_t row0 = static_cast<size_t>(c.first);
    const float scale = cfg_.softmax_scale();
    const DType dt = cfg_.dtype;
    const float* lam_in = static_cast<const float*>(a.lam->data());
    cpu::parallel_for(Hkv, [&](int h) {
      thread_local std::vector<float> keys, values, qrow, orow, logits;
      qrow.resize(D);
      orow.resize(D);
      HeadStore& hs = at(layer, c.seq, h);
      gather_rows(hs, a.k->data(), a.v->data(), (row0 * Hkv + h) * D, C, keys, values);
      const int cached = hs.len;
      for (int i = 0; i < C; ++i) {
        for (int g = 0; g < G; ++g) {
          const size_t qoff = ((row0 + i) * Hq + h * G + g) * D;
          to_float_n(a.q->data(), dt, qoff, D, qrow.data());
          // Causal within the chunk: query i sees every cached token and chunk tokens 0..i.
          cpu::attend_row(qrow.data(), keys.data(), values.data(), cached + i + 1, D, scale,
                          orow.data(), logits);
          for (int d = 0; d < D; ++d) store_from_float(a.out->data(), dt, qoff + d, orow[d]);
        }
      }
      for (int i = 0; i < C; ++i) {
        append(hs, a.k->data(), a.v->data(), ((row0 + i) * Hkv + h) * D,
               static_cast<int32_t>(c.start + i), lam_in[(row0 + i) * Hkv + h]);
      }
      if (cfg_.scope == Scope::kHead) evict_head(layer, c.seq, h);
    });
    if (cfg_.scope != Scope::kHead) evict_after_pass(layer, c.seq);
  }

  size_t token_bytes() const { return 2 * row_bytes_ + 3 * sizeof(float); }

  HeadStore& at(int layer, int seq, int head) {
    return heads_[(static_cast<size_t>(layer) * cfg_.batch + seq) * cfg_.kv_heads + head];
  }

  void reserve(HeadStore& h, size_t cap) {
    h.k.reserve(cap * row_bytes_);
    h.v.reserve(cap * row_bytes_);
    h.pos.reserve(cap);
    h.lam.reserve(cap);
    h.lognorm.reserve(cap);
  }

  // Cached rows of `hs`, then `n_new` input rows (row stride kv_heads * D), as float32.
  void gather_rows(const HeadStore& hs, const void* k_in, const void* v_in, size_t first_row,
                   int n_new, std::vector<float>& keys, std::vector<float>& values) const {
    const int D = cfg_.head_dim;
    const size_t stride = static_cast<size_t>(cfg_.kv_heads) * D;
    const size_t total = static_cast<size_t>(hs.len + n_new) * D;
    keys.resize(total);
    values.resize(total);
    const size_t cached = static_cast<size_t>(hs.len) * D;
    to_float_n(hs.k.data(), cfg_.dtype, 0, cached, keys.data());
    to_float_n(hs.v.data(), cfg_.dtype, 0, cached, values.data());
    for (int t = 0; t < n_new; ++t) {
      to_float_n(k_in, cfg_.dtype, first_row + t * stride, D,
                 keys.data() + cached + static_cast<size_t>(t) * D);
      to_float_n(v_in, cfg_.dtype, first_row + t * stride, D,
                 values.data() + cached + static_cast<size_t>(t) * D);
    }
  }

  void append(HeadStore& hs, const void* k_in, const void* v_in, size_t row, int32_t pos,
              float lam) {
    const size_t off = row * dtype_size(cfg_.dtype);
    const uint8_t* kp = static_cast<const uint8_t*>(k_in) + off;
    const uint8_t* vp = static_cast<const uint8_t*>(v_in) + off;
    hs.k.resize(static_cast<size_t>(hs.len) * row_bytes_);
    hs.v.resize(static_cast<size_t>(hs.len) * row_bytes_);
    hs.pos.resize(hs.len);
    hs.lam.resize(hs.len);
    hs.lognorm.resize(hs.len);
    hs.k.insert(hs.k.end(), kp, kp + row_bytes_);
    hs.v.insert(hs.v.end(), vp, vp + row_bytes_);
    hs.pos.push_back(pos);
    hs.lam.push_back(lam);
    float lognorm = 0.f;
    if (cfg_.strategy == Strategy::kKnormAlpha) {
      // Norm of the key as stored (after rounding to the cache dtype), in the canonical order
      // the CUDA kernels use too (common/score.h), so both keep the same tokens.
      lognorm = lognorm_of_sumsq(
          key_sumsq(cfg_.head_dim, [&](int d) { return load_as_float(kp, cfg_.dtype, d); }));
    }
    hs.lognorm.push_back(lognorm);
    hs.len += 1;
  }

  // Scope "head": the head is its own pool.
  void evict_head(int layer, int seq, int head) {
    evict_pool({{&at(layer, seq, head), layer * cfg_.kv_heads + head}}, seq);
  }

  // Runs the eviction that follows a pass of `layer` for sequence `seq`, per scope.
  void evict_after_pass(int layer, int seq) {
    std::vector<std::pair<HeadStore*, int>> pool;
    switch (cfg_.scope) {
      case Scope::kHead:
        for (int h = 0; h < cfg_.kv_heads; ++h) evict_head(layer, seq, h);
        break;
      case Scope::kLayer:
        for (int h = 0; h < cfg_.kv_heads; ++h)
          pool.push_back({&at(layer, seq, h), layer * cfg_.kv_heads + h});
        evict_pool(pool, seq);
        break;
      case Scope::kGlobal:
        if (layer != cfg_.layers - 1)
          break;  // the whole sequence is one pool, after the last layer
        for (int l = 0; l < cfg_.layers; ++l)
          for (int h = 0; h < cfg_.kv_heads; ++h)
            pool.push_back({&at(l, seq, h), l * cfg_.kv_heads + h});
        evict_pool(pool, seq);
        break;
    }
  }

  void evict_pool(const std::vector<std::pair<HeadStore*, int>>& pool, int seq) {
    const int64_t T = seen_[seq];
    const int64_t n_heads = static_cast<int64_t>(pool.size());
    const bool thresholded = cfg_.threshold > 0.0;
    const float log_tau = thresholded ? static_cast<float>(std::log(cfg_.threshold)) : 0.f;

    std::vector<Candidate> cands;
    std::vector<std::vector<char>> keep(pool.size());
    for (size_t i = 0; i < pool.size(); ++i) {
      const HeadStore& hs = *pool[i].first;
      keep[i].assign(hs.len, 1);
      for (int s = 0; s < hs.len; ++s) {
        float score = decayed_score(hs.lam[s], hs.pos[s], T, hs.lognorm[s]);
        const bool in_window = hs.pos[s] >= T - cfg_.window;
        if (!in_window && thresholded && !(score >= log_tau)) {
          keep[i][s] = 0;  // below the threshold: dropped whatever the budget
          continue;
        }
        if (in_window) score = std::numeric_limits<float>::infinity();
        if (score != score) score = -std::numeric_limits<float>::infinity();
        cands.push_back({score, hs.pos[s], pool[i].second, static_cast<int>(i), s});
      }
    }
    const int64_t total = static_cast<int64_t>(cands.size());
    if (total >= n_heads * (cfg_.memory + cfg_.buffer)) {
      const int64_t budget = n_heads * cfg_.memory;
      for (auto& k : keep) std::fill(k.begin(), k.end(), 0);
      if (cfg_.scope == Scope::kHead || cfg_.floor <= 0.0) {
        keep_best(cands, budget, keep);
      } else {
        // Floor ratio: the pool keeps its best floor(budget * (1 - f)); each head then keeps
        // its own best (that count + floor(M * f)), so no head is wiped out.
        const int64_t pooled =
            static_cast<int64_t>(std::floor(static_cast<double>(budget) * (1.0 - cfg_.floor)));
        const int64_t extra =
            static_cast<int64_t>(std::floor(static_cast<double>(cfg_.memory) * cfg_.floor));
        std::vector<std::vector<char>> first(pool.size());
        for (size_t i = 0; i < pool.size(); ++i) first[i].assign(pool[i].first->len, 0);
        keep_best(cands, pooled, first);
        std::vector<std::vector<Candidate>> per_head(pool.size());
        std::vector<int64_t> count(pool.size(), extra);
        for (const Candidate& c : cands) {
          per_head[c.head].push_back(c);
          if (first[c.head][c.slot]) count[c.head] += 1;
        }
        for (size_t i = 0; i < pool.size(); ++i) keep_best(per_head[i], count[i], keep);
      }
    }
    for (size_t i = 0; i < pool.size(); ++i) compact(*pool[i].first, keep[i]);
  }

  // Marks the k best candidates (all of them when there are fewer) in `keep`.
  static void keep_best(std::vector<Candidate>& cands, int64_t k,
                        std::vector<std::vector<char>>& keep) {
    if (k <= 0) return;
    if (k < static_cast<int64_t>(cands.size())) {
      std::nth_element(cands.begin(), cands.begin() + (k - 1), cands.end(), better);
    }
    const int64_t n = std::min<int64_t>(k, static_cast<int64_t>(cands.size()));
    for (int64_t i = 0; i < n; ++i) keep[cands[i].head][cands[i].slot] = 1;
  }

  void compact(HeadStore& hs, const std::vector<char>& keep) const {
    int w = 0;
    for (int s = 0; s < hs.len; ++s) {
      if (!keep[s]) continue;
      if (w != s) {
        std::memcpy(hs.k.data() + w * row_bytes_, hs.k.data() + s * row_bytes_, row_bytes_);
        std::memcpy(hs.v.data() + w * row_bytes_, hs.v.data() + s * row_bytes_, row_bytes_);
        hs.pos[w] = hs.pos[s];
        hs.lam[w] = hs.lam[s];
        hs.lognorm[w] = hs.lognorm[s];
      }
      ++w;
    }
    hs.len = w;
  }

  size_t row_bytes_;
  std::vector<HeadStore> heads_;
};

}  // namespace

std::unique_ptr<Cache> create_cpu_cache(const cache_config_t& cfg) {
  return std::make_unique<CpuCache>(cfg);
}

}  // namespace trimkv
