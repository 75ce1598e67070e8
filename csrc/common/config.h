// Runtime options of the cache and the gate, and the single list of supported values.
// lib/constants.ts mirrors these lists so that bad values are refused before a native call.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "common/dtype.h"
#include "common/enums.h"
#include "common/errors.h"

namespace trimkv {

inline DType parse_dtype(const std::string& s) {
  if (s == "fp32") return DType::kF32;
  if (s == "fp16") return DType::kF16;
  if (s == "bf16") return DType::kBF16;
  fail(code::kDType, "Unsupported dtype: ", s, " (expected fp32, fp16 or bf16)");
}

inline Strategy parse_strategy(const std::string& s) {
  if (s == "alpha") return Strategy::kAlpha;
  if (s == "knorm_alpha") return Strategy::kKnormAlpha;
  fail(code::kInvalidArgument, "Unsupported strategy: ", s);
}

inline Scope parse_scope(const std::string& s) {
  if (s == "head") return Scope::kHead;
  if (s == "layer") return Scope::kLayer;
  if (s == "global") return Scope::kGlobal;
  fail(code::kInvalidArgument, "Unsupported scope: ", s);
}

inline GateKind parse_gate_kind(const std::string& s) {
  if (s == "rg") return GateKind::kRg;
  if (s == "rg2") return GateKind::kRg2;
  if (s == "rg3") return GateKind::kRg3;
  fail(code::kInvalidArgument, "Unsupported gate kind: ", s);
}

/// Hugging Face `hidden_act` names.
inline Activation parse_activation(const std::string& s) {
  if (s == "silu" || s == "swish") return Activation::kSilu;
  if (s == "gelu") return Activation::kGelu;
  if (s == "gelu_new" || s == "gelu_pytorch_tanh") return Activation::kGeluTanh;
  if (s == "relu") return Activation::kRelu;
  fail(code::kInvalidArgument, "Unsupported activation: ", s);
}

/// Cache configuration (SPEC sections 4, 5, 7). Validated by validate().
struct cache_config_t {
  int layers = 0, batch = 0, q_heads = 0, kv_heads = 0, head_dim = 0;
  int memory = 0, buffer = 0, window = 0;
  DType dtype = DType::kF16;
  Strategy strategy = Strategy::kAlpha;
  Scope scope = Scope::kHead;
  double floor = 0.0;
  double threshold = 0.0;  // 0 = none
  float scale = 0.f;       // 0 = 1 / sqrt(head_dim)

  int group() const { return q_heads / kv_heads; }
  float softmax_scale() const {
    return scale > 0.f ? scale : 1.0f / std::sqrt(static_cast<float>(head_dim));
  }

  void validate() const {
    TRIMKV_CHECK(layers >= 1 && layers <= 4096, code::kRange, "layers must be in [1, 4096], got ",
                 layers);
    TRIMKV_CHECK(batch >= 1 && batch <= 65536, code::kRange, "batch must be in [1, 65536], got ",
                 batch);
    TRIMKV_CHECK(kv_heads >= 1 && kv_heads <= 1024, code::kRange,
                 "kvHeads must be in [1, 1024], got ", kv_heads);
    TRIMKV_CHECK(q_heads >= kv_heads && q_heads % kv_heads == 0, code::kRange,
                 "qHeads must be a multiple of kvHeads, got qHeads=", q_heads,
                 " kvHeads=", kv_heads);
    TRIMKV_CHECK(head_dim >= 1 && head_dim <= 1024, code::kRange,
                 "headDim must be in [1, 1024], got ", head_dim);
    TRIMKV_CHECK(memory >= 1, code::kRange, "memory must be >= 1, got ", memory);
    TRIMKV_CHECK(buffer >= 0, code::kRange, "buffer must be >= 0, got ", buffer);
    TRIMKV_CHECK(window >= 0, code::kRange, "window must be >= 0, got ", window);
    TRIMKV_CHECK(floor >= 0.0 && floor < 1.0, code::kRange, "floor must be in [0, 1), got ", floor);
    TRIMKV_CHECK(threshold >= 0.0 && threshold <= 1.0, code::kRange,
                 "threshold must be in (0, 1], got ", threshold);
    TRIMKV_CHECK(scale >= 0.f && std::isfinite(scale), code::kRange,
                 "scale must be a positive finite number");
  }
};

}  // namespace trimkv
