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

std::unique_ptr<Model> Model::create(Backend backend, const model_config_t& c, weight_map_t weights,
                                     model_cache_t mc) {
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
  if (mc.cache) {
    const cache_config_t& k = mc.cache->config();
    TRIMKV_CHECK(mc.cache->backend() == backend, code::kInvalidArgument,
                 "the KV cache is on another backend than the model");
    TRIMKV_CHECK(k.layers == c.layers && k.q_heads == c.q_heads && k.kv_heads == c.kv_heads &&
                     k.head_dim == c.head_dim,
                 code::kShape, "the KV cache has layers=", k.layers, " qHeads=", k.q_heads,
                 " kvHeads=", k.kv_heads, " headDim=", k.head_dim,
                 "; the model has layers=", c.layers, " qHeads=", c.q_heads,
                 " kvHeads=", c.kv_heads, " headDim=", c.head_dim);
    TRIMKV_CHECK(k.dtype == c.dtype, code::kDType, "the KV cache's dtype ", dtype_name(k.dtype),
                 " is not the model's ", dtype_name(c.dtype));
    TRIMKV_CHECK(mc.gates.size() == static_cast<size_t>(c.layers), code::kInvalidArgument,
                 "a KV cache needs one retention gate per layer: expected ", c.layers,
                 " but received ", mc.gates.size());
    for (size_t l = 0; l < mc.gates.size(); ++l) {
      TRIMKV_CHECK(mc.gates[l] != nullptr, code::kInvalidArgument, "gate ", l, " is missing");
      const gate_spec_t& g = mc.gates[l]->spec();
      const int want = g.kind == GateKind::kRg ? c.hidden : 2 * c.kv_heads * c.head_dim;
      TRIMKV_CHECK(mc.gates[l]->backend() == backend, code::kInvalidArgument, "gate ", l,
                   " is on another backend than the model");
      TRIMKV_CHECK(g.kv_heads == c.kv_heads && g.input_size == want, code::kShape, "gate ", l,
                   " has kvHeads=", g.kv_heads, " inputSize=", g.input_size, "; the model needs ",
                   c.kv_heads, " and ", want);
    }
  } else {
    TRIMKV_CHECK(mc.gates.empty(), code::kInvalidArgument,
                 "retention gates were given without a KV cache");
  }
  return create_cpu_model(c, std::move(weights), std::move(mc));
}

}  // namespace trimkv::model
