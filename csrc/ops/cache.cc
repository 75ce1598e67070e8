#include "ops/cache.h"

#include <algorithm>
#include <numeric>

#include "common/errors.h"
#include "common/score.h"

namespace trimkv {

Cache::Cache(Backend backend, const cache_config_t& cfg) : backend_(backend), cfg_(cfg) {
  cfg_.validate();
  seen_.assign(static_cast<size_t>(cfg_.batch), 0);
}

std::unique_ptr<Cache> Cache::create(Backend backend, const cache_config_t& cfg) {
  cfg.validate();
  return backend == Backend::kCuda ? create_cuda_cache(cfg) : create_cpu_cache(cfg);
}

namespace {

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

void check_tensor(const Tensor* t, const char* name, Backend backend, DType dtype,
                  std::initializer_list<int64_t> shape) {
  TRIMKV_CHECK(t != nullptr, code::kInvalidArgument, name, " is missing");
  TRIMKV_CHECK(t->backend() == backend, code::kInvalidArgument, name, " lives on the ",
               backend_name(t->backend()), " backend but the cache on ", backend_name(backend));
  TRIMKV_CHECK(t->dtype() == dtype, code::kDType, "Expected dtype ", dtype_name(dtype), " for ",
               name, " but received ", t->describe());
  // Compared in place: this runs for every tensor of every call.
  const bool same = t->shape().size() == shape.size() &&
                    std::equal(shape.begin(), shape.end(), t->shape().begin());
  TRIMKV_CHECK(same, code::kShape, "Expected shape ", shape_text(std::vector<int64_t>(shape)),
               " for ", name, " but received ", t->describe());
}

}  // namespace

void Cache::check_step(int layer, bool is_decode, const positions_view_t* positions,
                       const std::vector<prefill_chunk_t>* chunks) const {
  TRIMKV_CHECK(layer >= 0 && layer < cfg_.layers, code::kRange, "layer ", layer,
               " out of range [0, ", cfg_.layers, ")");
  if (layer == 0) {
    TRIMKV_CHECK(step_ == Step::kNone, code::kState, "a step is in progress: layer ", next_layer_,
                 " must be called next (layers of one step run in order 0..", cfg_.layers - 1, ")");
    return;
  }
  TRIMKV_CHECK(step_ != Step::kNone && layer == next_layer_, code::kState, "layer ", layer,
               " called out of order: expected layer ", step_ == Step::kNone ? 0 : next_layer_);
  TRIMKV_CHECK((step_ == Step::kDecode) == is_decode, code::kState, "layer ", layer, " of a ",
               step_ == Step::kDecode ? "decode" : "prefill", " step was called with ",
               is_decode ? "decode" : "prefill");
  if (is_decode) {
    const bool same = positions->size == step_positions_.size() &&
                      std::equal(step_positions_.begin(), step_positions_.end(), positions->data);
    TRIMKV_CHECK(same, code::kState, "positions differ from those of layer 0 of this step");
  } else {
    TRIMKV_CHECK(*chunks == step_chunks_, code::kState,
                 "prefill chunks differ from those of layer 0 of this step (seq, start, length)");
  }
}

void Cache::advance_step(int layer, bool is_decode, const positions_view_t* positions,
                         const std::vector<prefill_chunk_t>* chunks) {
  if (layer == 0) {
    step_ = is_decode ? Step::kDecode : Step::kPrefill;
    if (is_decode) {
      step_positions_.assign(positions->data,
                             positions->data + positions->size);  // reuses capacity
      for (int b = 0; b < cfg_.batch; ++b) {
        if ((*positions)[b] >= 0) seen_[b] = int64_t{(*positions)[b]} + 1;
      }
    } else {
      step_chunks_ = *chunks;
      for (const prefill_chunk_t& c : *chunks) seen_[c.seq] = c.start + c.length;
    }
  }
  next_layer_ = layer + 1;
  if (next_layer_ == cfg_.layers) {
    step_ = Step::kNone;
    next_layer_ = 0;
  }
}

void Cache::decode(int layer, const decode_args_t& a) {
  const int B = cfg_.batch, Hq = cfg_.q_heads, Hkv = cfg_.kv_heads, D = cfg_.head_dim;
  TRIMKV_CHECK(static_cast<int>(a.positions.size) == B, code::kShape, "Expected ", B,
               " positions but received ", a.positions.size);
  check_step(layer, true, &a.positions, nullptr);
  check_tensor(a.q, "q", backend_, cfg_.dtype, {B, Hq, D});
  check_tensor(a.k, "k", backend_, cfg_.dtype, {B, Hkv, D});
  check_tensor(a.v, "v", backend_, cfg_.dtype, {B, Hkv, D});
  check_tensor(a.lam, "lam", backend_, DType::kF32, {B, Hkv});
  check_tensor(a.out, "out", backend_, cfg_.dtype, {B, Hq, D});
  if (layer == 0) {
    for (int b = 0; b < B; ++b) {
      int32_t p = a.positions[b];
      TRIMKV_CHECK(p >= -1, code::kRange, "position ", p, " of sequence ", b,
                   " is negative (use -1 for inactive)");
      TRIMKV_CHECK(p < 0 || p >= seen_[b], code::kRange, "position ", p, " of sequence ", b,
                   " is not new: the sequence has already seen ", seen_[b],
                   " tokens (reset it to start over)");
    }
  }
  advance_step(layer, true, &a.positions, nullptr);
  do_decode(layer, a);
}

void Cache::prefill(int layer, prefill_args_t& a) {
  const int Hq = cfg_.q_heads, Hkv = cfg_.kv_heads, D = cfg_.head_dim;
  TRIMKV_CHECK(!a.chunks.empty(), code::kInvalidArgument,
               "a prefill call needs at least one chunk");
  TRIMKV_CHECK(a.chunks.size() <= static_cast<size_t>(cfg_.batch), code::kRange,
               "a prefill call takes at most ", cfg_.batch, " chunks (one per sequence), got ",
               a.chunks.size());
  std::vector<char> taken(static_cast<size_t>(cfg_.batch), 0);
  int64_t total = 0;
  for (prefill_chunk_t& c : a.chunks) {
    TRIMKV_CHECK(c.seq >= 0 && c.seq < cfg_.batch, code::kRange, "seq ", c.seq,
                 " out of range [0, ", cfg_.batch, ")");
    TRIMKV_CHECK(!taken[c.seq], code::kInvalidArgument, "sequence ", c.seq,
                 " has two chunks in one prefill call (one chunk per sequence)");
    taken[c.seq] = 1;
    TRIMKV_CHECK(c.length >= 1, code::kRange, "chunk length ", c.length, " of sequence ", c.seq,
                 " must be >= 1");
    c.first = static_cast<int>(std::min<int64_t>(total, INT32_MAX));
    total += c.length;
  }
  TRIMKV_CHECK(total <= (int64_t{1} << 24), code::kRange, "prefill call of ", total,
               " tokens is too long");
  TRIMKV_CHECK(a.q != nullptr, code::kInvalidArgument, "q is missing");
  TRIMKV_CHECK(a.q->shape().size() == 3 && a.q->shape()[0] == total, code::kShape,
               "Expected q of shape [", total, ", ", Hq, ", ", D,
               "] (the chunks' tokens) but received ", a.q->describe());
  check_step(layer, false, nullptr, &a.chunks);
  check_tensor(a.q, "q", backend_, cfg_.dtype, {total, Hq, D});
  check_tensor(a.k, "k", backend_, cfg_.dtype, {total, Hkv, D});
  check_tensor(a.v, "v", backend_, cfg_.dtype, {total, Hkv, D});
  check_tensor(a.lam, "lam", backend_, DType::kF32, {total, Hkv});
  check_tensor(a.out, "out", backend_, cfg_.dtype, {total, Hq, D});
  if (layer == 0) {
    for (const prefill_chunk_t& c : a.chunks) {
      TRIMKV_CHECK(c.start >= seen_[c.seq], code::kRange, "start ", c.start, " of sequence ", c.seq,
                   " is not new: the sequence has already seen ", seen_[c.seq],
                   " tokens (reset it to start over)");
      TRIMKV_CHECK(c.start + c.length <= INT32_MAX, code::kRange,
                   "positions beyond 2^31 - 1 are not supported");
    }
  }
  advance_step(layer, false, nullptr, &a.chunks);
  do_prefill(layer, a);
}

void Cache::reset(int seq) {
  TRIMKV_CHECK(seq >= 0 && seq < cfg_.batch, code::kRange, "seq ", seq, " out of range [0, ",
               cfg_.batch, ")");
  TRIMKV_CHECK(step_ == Step::kNone, code::kState,
               "cannot reset a sequence while a step is in progress (layer ", next_layer_,
               " is next)");
  do_reset(seq);
  seen_[seq] = 0;
}

int64_t Cache::seen(int seq) const {
  TRIMKV_CHECK(seq >= 0 && seq < cfg_.batch, code::kRange, "seq ", seq, " out of range [0, ",
               cfg_.batch, ")");
  return seen_[seq];
}

int Cache::length(int seq, int layer, int head) const {
  TRIMKV_CHECK(seq >= 0 && seq < cfg_.batch, code::kRange, "seq ", seq, " out of range [0, ",
               cfg_.batch, ")");
  TRIMKV_CHECK(layer >= 0 && layer < cfg_.layers, code::kRange, "layer ", layer,
               " out of range [0, ", cfg_.layers, ")");
  TRIMKV_CHECK(head >= 0 && head < cfg_.kv_heads, code::kRange, "head ", head, " out of range [0, ",
               cfg_.kv_heads, ")");
  return do_length(seq, layer, head);
}

head_snapshot_t Cache::inspect(int seq, int layer, int head) const {
  length(seq, layer, head);  // range checks
  std::vector<int32_t> pos;
  std::vector<float> lam, lognorm;
  do_snapshot(seq, layer, head, pos, lam, lognorm);
  std::vector<size_t> order(pos.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return pos[a] < pos[b]; });
  head_snapshot_t s;
  const int64_t T = seen_[seq];
  for (size_t i : order) {
    s.positions.push_back(pos[i]);
    s.scores.push_back(decayed_score(lam[i], pos[i], T, lognorm[i]));
  }
  return s;
}

}  // namespace trimkv
