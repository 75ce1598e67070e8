// The model runner's contract (issue 15): a decoder-only transformer of one of the three
// architectures trimkv runs (Qwen3, Llama, Phi-3), its configuration and its weights, and the
// forward pass of one sequence. The CPU implementation (model/forward_cpu.cc) is the reference
// the CUDA one will be checked against; the CUDA backend reports ERR_UNSUPPORTED for now.
//
// Attention runs over a TRIM-KV cache (ops/cache.h, one sequence in its slot 0, lam from a
// retention gate per layer, ops/gate.h) or, without one, over a plain full KV cache inside the
// model (every position, no eviction).
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/enums.h"
#include "ops/cache.h"
#include "ops/gate.h"
#include "runtime/tensor.h"

namespace trimkv::model {

enum class Arch : int { kQwen3 = 0, kLlama = 1, kPhi3 = 2 };

Arch parse_arch(const std::string& s);

/// config.json, as lib/model/config.ts normalises it. RoPE comes as its inverse frequencies
/// (head_dim / 2 of them, computed bit-exactly as transformers does, in lib/model/config.ts),
/// so one table serves every backend.
struct model_config_t {
  Arch arch = Arch::kQwen3;
  int hidden = 0;
  int layers = 0;
  int q_heads = 0;
  int kv_heads = 0;
  int head_dim = 0;
  int intermediate = 0;
  int vocab = 0;
  int max_positions = 0;
  float eps = 1e-6f;
  bool tie_word_embeddings = false;
  DType dtype = DType::kBF16;        // the activations' dtype (the embedding's)
  std::vector<float> inv_freq;       // default / llama3; longrope: its short factors
  std::vector<float> inv_freq_long;  // longrope only: its long factors
  /// longrope: a sequence whose maximum length exceeds this uses the long factors (0: never).
  int rope_original_max = 0;
  float attention_factor = 1.f;  // multiplies cos and sin (longrope)
};

/// The weights, by their Hugging Face names (model.layers.{l}. ...), each a host tensor.
using weight_map_t = std::map<std::string, Tensor>;

/// The bounded cache a model attends over, shared with its JS handles (which may inspect it).
struct model_cache_t {
  std::shared_ptr<Cache> cache;              // null: the plain full cache
  std::vector<std::shared_ptr<Gate>> gates;  // one per layer: lam of every new token
  bool lam_fp32 = false;  // keep lam in fp32 (default: rounded to the model dtype, as stored)
};

class Model {
 public:
  /// Checks the configuration and every tensor's presence and shape.
  /// \throws Error ERR_UNSUPPORTED for the CUDA backend (not written yet), ERR_INVALID_ARGUMENT
  ///   / ERR_SHAPE naming the field or tensor.
  static std::unique_ptr<Model> create(Backend backend, const model_config_t& cfg,
                                       weight_map_t weights, model_cache_t cache = {});
  virtual ~Model() = default;

  const model_config_t& config() const { return cfg_; }
  /// Positions held in the sequence's cache.
  virtual int length() const = 0;

  /// Runs `n` tokens at positions [start, start + n) of the sequence: its cache is cut to
  /// `start` positions first (so `start` <= length(); with a TRIM-KV cache, which cannot be
  /// cut, `start` is 0 or length()), then the tokens attend over it and
  /// causally among themselves. `max_length` is the sequence's maximum length (longrope picks
  /// its factors from it at start 0, once). Writes the fp32 logits of the last token to
  /// `logits` (vocab floats).
  ///
  /// `lam` (test only, for teacher-forcing the cache bookkeeping against a reference whose gate
  /// numerics differ by rounding): null, or one entry per layer, each null (that layer's gate
  /// computes lam) or `n * kv_heads` floats ([token][kv head]) used instead of the gate's output,
  /// rounded and stored exactly as the gate's lam would be. Ignored without a TRIM-KV cache.
  virtual void forward(const int32_t* tokens, int n, int start, int max_length, float* logits,
                       const float* const* lam = nullptr) = 0;

 protected:
  explicit Model(const model_config_t& cfg, model_cache_t cache)
      : cfg_(cfg), cache_(std::move(cache)) {}
  model_config_t cfg_;
  model_cache_t cache_;
};

std::unique_ptr<Model> create_cpu_model(const model_config_t& cfg, weight_map_t weights,
                                        model_cache_t cache);

}  // namespace trimkv::model
