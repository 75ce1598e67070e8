#include "model/model.h"

#include "common/errors.h"

namespace trimkv::model {

Arch parse_arch(const std::string& s) {
  if (s == "qwen3") return Arch::kQwen3;
  if (s == "llama") return Arch::kLlama;
  if (s == "phi3") return Arch::kPhi3;
  fail(code::kInvalidArgument,
       "Expected 'qwen3', 'llama' or 'phi3' for architecture but received '", s, "'");
}

namespace {

void check_weight(const weight_map_t& w, const std::string& name, std::vector<int64_t> shape) {
  auto it = w.find(name);
  TRIMKV_CHECK(it != w.end(), code::kInvalidArgument, "model weight '", name, "' is missing");
  const Tensor& t = it->second;
  TRIMKV_CHECK(t.backend() == Backend::kCpu, code::kInvalidArgument, "model weight '", name,
               "' must be a cpu tensor");
  std::string want = "[";
  for (size_t i = 0; i < shape.size(); ++i) want += (i ? ", " : "") + std::to_string(shape[i]);
  want += "]";
  TRIMKV_CHECK(t.shape() == shape, code::kShape, "model weight '", name, "' is ", t.describe(),
               ", expected ", want);
}

}  // namespace

std::unique_ptr<Model> Model::create(Backend backend, const model_config_t& c,
                                     weight_map_t weights) {
  TRIMKV_CHECK(backend == Backend::kCpu, code::kUnsupported,
               "the model forward runs on the cpu backend only (no CUDA implementation yet)");
  TRIMKV_CHECK(c.hidden >= 1 && c.layers >= 1 && c.q_heads >= 1 && c.kv_heads >= 1 &&
                   c.head_dim >= 2 && c.head_dim % 2 == 0 && c.intermediate >= 1 && c.vocab >= 1 &&
                   c.max_positions >= 1,
               code::kInvalidArgument, "model sizes must be positive (head_dim even)");
  TRIMKV_CHECK(c.q_heads % c.kv_heads == 0, code::kInvalidArgument,
               "q heads must be a multiple of kv heads");
  TRIMKV_CHECK(c.eps > 0.f, code::kInvalidArgument, "rms_norm_eps must be > 0");
  const size_t half = static_cast<size_t>(c.head_dim / 2);
  TRIMKV_CHECK(c.inv_freq.size() == half, code::kInvalidArgument, "expected ", half,
               " RoPE inverse frequencies but received ", c.inv_freq.size());
  TRIMKV_CHECK(c.inv_freq_long.empty() || c.inv_freq_long.size() == half, code::kInvalidArgument,
               "expected ", half, " long RoPE inverse frequencies but received ",
               c.inv_freq_long.size());

  const int64_t D = c.hidden, hd = c.head_dim, Hq = c.q_heads, Hkv = c.kv_heads, I = c.intermediate,
                V = c.vocab;
  check_weight(weights, "model.embed_tokens.weight", {V, D});
  for (int l = 0; l < c.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    check_weight(weights, p + "input_layernorm.weight", {D});
    check_weight(weights, p + "post_attention_layernorm.weight", {D});
    if (c.arch == Arch::kPhi3) {
      check_weight(weights, p + "self_attn.qkv_proj.weight", {(Hq + 2 * Hkv) * hd, D});
      check_weight(weights, p + "mlp.gate_up_proj.weight", {2 * I, D});
    } else {
      check_weight(weights, p + "self_attn.q_proj.weight", {Hq * hd, D});
      check_weight(weights, p + "self_attn.k_proj.weight", {Hkv * hd, D});
      check_weight(weights, p + "self_attn.v_proj.weight", {Hkv * hd, D});
      check_weight(weights, p + "mlp.gate_proj.weight", {I, D});
      check_weight(weights, p + "mlp.up_proj.weight", {I, D});
    }
    if (c.arch == Arch::kQwen3) {
      check_weight(weights, p + "self_attn.q_norm.weight", {hd});
      check_weight(weights, p + "self_attn.k_norm.weight", {hd});
    }
    check_weight(weights, p + "self_attn.o_proj.weight", {D, Hq * hd});
    check_weight(weights, p + "mlp.down_proj.weight", {D, I});
  }
  check_weight(weights, "model.norm.weight", {D});
  if (!c.tie_word_embeddings) check_weight(weights, "lm_head.weight", {V, D});
  return create_cpu_model(c, std::move(weights));
}

}  // namespace trimkv::model
