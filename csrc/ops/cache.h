// The KV cache op: one contract, two implementations (cpu/cache_cpu.cc, cuda/cache_cuda.cu).
// This front checks shapes, dtypes, ranges and the order of layers within a step before any
// state changes, so a rejected call leaves the cache exactly as it was.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "common/config.h"
#include "runtime/tensor.h"

namespace trimkv {

/// A borrowed run of positions (the caller's array, valid for the duration of the call).
struct positions_view_t {
  const int32_t* data = nullptr;
  size_t size = 0;
  int32_t operator[](size_t i) const { return data[i]; }
};

/// One decode step of one layer: a new token for every sequence slot (position -1: inactive).
struct decode_args_t {
  const Tensor* q = nullptr;    // [batch, q_heads, head_dim]
  const Tensor* k = nullptr;    // [batch, kv_heads, head_dim]
  const Tensor* v = nullptr;    // [batch, kv_heads, head_dim]
  const Tensor* lam = nullptr;  // [batch, kv_heads] fp32
  Tensor* out = nullptr;        // [batch, q_heads, head_dim]
  positions_view_t positions;   // [batch], borrowed: no copy on the hot path
};

/// One sequence's chunk in a prefill call: rows [first, first + length) of the inputs.
struct prefill_chunk_t {
  int seq = 0;
  int64_t start = 0;  // position of its first token
  int length = 0;     // tokens, >= 1
  int first = 0;      // set by Cache::prefill: the running sum of the earlier lengths
  bool operator==(const prefill_chunk_t& o) const {
    return seq == o.seq && start == o.start && length == o.length;
  }
};

/// One prefill call for one layer: a chunk for each of one or more distinct sequences, their
/// tokens packed one chunk after the other (varlen), N = the sum of the lengths.
struct prefill_args_t {
  std::vector<prefill_chunk_t> chunks;
  const Tensor* q = nullptr;    // [N, q_heads, head_dim]
  const Tensor* k = nullptr;    // [N, kv_heads, head_dim]
  const Tensor* v = nullptr;    // [N, kv_heads, head_dim]
  const Tensor* lam = nullptr;  // [N, kv_heads] fp32
  Tensor* out = nullptr;        // [N, q_heads, head_dim]
  int tokens() const { return static_cast<int>(q->shape()[0]); }
};

struct head_snapshot_t {
  std::vector<int32_t> positions;  // sorted ascending
  std::vector<float> scores;       // decayed score at the sequence's T
};

class Cache {
 public:
  static std::unique_ptr<Cache> create(Backend backend, const cache_config_t& cfg);
  virtual ~Cache() = default;

  const cache_config_t& config() const { return cfg_; }
  Backend backend() const { return backend_; }

  void decode(int layer, const decode_args_t& args);
  void prefill(int layer, prefill_args_t& args);  // sets each chunk's `first`
  void reset(int seq);
  int64_t seen(int seq) const;
  int length(int seq, int layer, int head) const;
  head_snapshot_t inspect(int seq, int layer, int head) const;
  virtual size_t used_bytes() const = 0;
  virtual size_t reserved_bytes() const = 0;

 protected:
  Cache(Backend backend, const cache_config_t& cfg);

  // Implementations may assume validated arguments. `seen` already holds the step's T.
  virtual void do_decode(int layer, const decode_args_t& args) = 0;
  virtual void do_prefill(int layer, const prefill_args_t& args) = 0;
  virtual void do_reset(int seq) = 0;
  virtual int do_length(int seq, int layer, int head) const = 0;
  /// Unsorted positions, lam and log-norm (0 for "alpha") of the retained tokens.
  virtual void do_snapshot(int seq, int layer, int head, std::vector<int32_t>& pos,
                           std::vector<float>& lam, std::vector<float>& lognorm) const = 0;

  Backend backend_;
  cache_config_t cfg_;
  std::vector<int64_t> seen_;  // T per sequence

 private:
  void check_step(int layer, bool is_decode, const positions_view_t* positions,
                  const std::vector<prefill_chunk_t>* chunks) const;
  void advance_step(int layer, bool is_decode, const positions_view_t* positions,
                    const std::vector<prefill_chunk_t>* chunks);

  enum class Step { kNone, kDecode, kPrefill };
  Step step_ = Step::kNone;
  int next_layer_ = 0;
  std::vector<int32_t> step_positions_;
  std::vector<prefill_chunk_t> step_chunks_;
};

std::unique_ptr<Cache> create_cpu_cache(const cache_config_t& cfg);
std::unique_ptr<Cache> create_cuda_cache(const cache_config_t& cfg);

}  // namespace trimkv
