// The CPU reference forward: fp32 arithmetic with every activation rounded to the model's
// dtype where the reference (transformers in that dtype) holds a tensor of it: after each
// linear layer, norm, RoPE, attention output, activation product and residual add. Matmuls
// and the norms' mean of squares accumulate in fp32; RoPE angles and the logits are fp32.
#include <algorithm>
#include <cmath>
#include <vector>

#include "common/dtype.h"
#include "common/errors.h"
#include "cpu/attention_cpu.h"
#include "cpu/dot.h"
#include "model/model.h"

namespace trimkv::model {
namespace {

/// A weight matrix [rows, cols] (a vector is one row) in its storage dtype.
struct matrix_t {
  const void* data = nullptr;
  DType dtype = DType::kF32;
  int64_t rows = 0;
  int64_t cols = 0;

  void row(int64_t r, float* out) const {
    const size_t off = static_cast<size_t>(r * cols);
    to_float_n(data, dtype, off, static_cast<size_t>(cols), out);
  }
};

struct layer_t {
  matrix_t input_norm, post_norm, q, k, v, qkv, q_norm, k_norm, o, gate, up, gate_up, down;
  std::vector<std::vector<float>> keys, values;  // per KV head: [position][head_dim]
};

class CpuModel final : public Model {
 public:
  CpuModel(const model_config_t& cfg, weight_map_t weights, model_cache_t cache)
      : Model(cfg, std::move(cache)), weights_(std::move(weights)) {
    embed_ = get("model.embed_tokens.weight");
    norm_ = get("model.norm.weight");
    lm_head_ = get(cfg.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight");
    layers_.resize(static_cast<size_t>(cfg.layers));
    for (int l = 0; l < cfg.layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      layer_t& L = layers_[static_cast<size_t>(l)];
      L.input_norm = get(p + "input_layernorm.weight");
      L.post_norm = get(p + "post_attention_layernorm.weight");
      L.o = get(p + "self_attn.o_proj.weight");
      L.down = get(p + "mlp.down_proj.weight");
      if (cfg.arch == Arch::kPhi3) {
        L.qkv = get(p + "self_attn.qkv_proj.weight");
        L.gate_up = get(p + "mlp.gate_up_proj.weight");
      } else {
        L.q = get(p + "self_attn.q_proj.weight");
        L.k = get(p + "self_attn.k_proj.weight");
        L.v = get(p + "self_attn.v_proj.weight");
        L.gate = get(p + "mlp.gate_proj.weight");
        L.up = get(p + "mlp.up_proj.weight");
      }
      if (cfg.arch == Arch::kQwen3) {
        L.q_norm = get(p + "self_attn.q_norm.weight");
        L.k_norm = get(p + "self_attn.k_norm.weight");
      }
      L.keys.resize(static_cast<size_t>(cfg.kv_heads));
      L.values.resize(static_cast<size_t>(cfg.kv_heads));
    }
  }

  int length() const override { return length_; }

  void forward(const int32_t* tokens, int n, int start, int max_length, float* logits,
               const float* const* lam) override {
    const model_config_t& c = cfg_;
    TRIMKV_CHECK(n >= 1, code::kInvalidArgument, "forward needs at least one token");
    TRIMKV_CHECK(start >= 0 && start <= length_, code::kRange, "start position ", start,
                 " is outside [0, ", length_, "] (the positions the sequence holds)");
    TRIMKV_CHECK(max_length >= start + n && max_length <= c.max_positions, code::kRange,
                 "maxLength ", max_length, " must be in [", start + n, ", ", c.max_positions,
                 "] (start + tokens, max_position_embeddings)");
    for (int i = 0; i < n; ++i) {
      TRIMKV_CHECK(tokens[i] >= 0 && tokens[i] < c.vocab, code::kRange, "token ", tokens[i],
                   " at index ", i, " is outside [0, ", c.vocab, ")");
    }
    // longrope: one factor set per sequence, chosen from its maximum length at its start.
    const bool want_long =
        !c.inv_freq_long.empty() && c.rope_original_max > 0 && max_length > c.rope_original_max;
    if (start == 0) {
      long_factors_ = want_long;
    } else {
      TRIMKV_CHECK(want_long == long_factors_, code::kState, "maxLength ", max_length,
                   " would switch the sequence's longrope factors to ",
                   want_long ? "long" : "short",
                   " mid-way; start the sequence again at position 0 with its maximum length");
    }
    if (cache_.cache) {
      TRIMKV_CHECK(start == 0 || start == length_, code::kState, "start position ", start,
                   ": a sequence in a KV cache continues at its length ", length_,
                   " or starts again at 0");
      if (start == 0) cache_.cache->reset(0);
    } else {
      for (layer_t& L : layers_) {
        for (auto& k : L.keys) k.resize(static_cast<size_t>(start) * c.head_dim);
        for (auto& v : L.values) v.resize(static_cast<size_t>(start) * c.head_dim);
      }
    }
    length_ = start;

    const int D = c.hidden, hd = c.head_dim, Hq = c.q_heads, Hkv = c.kv_heads;
    const int I = c.intermediate;
    std::vector<float> h(static_cast<size_t>(n) * D), x(h.size());
    for (int t = 0; t < n; ++t) embed_.row(tokens[t], &h[static_cast<size_t>(t) * D]);

    std::vector<float> q, k, v, qkv, attn(static_cast<size_t>(n) * Hq * hd), proj, gu, g, u;
    for (int l = 0; l < c.layers; ++l) {
      layer_t& L = layers_[static_cast<size_t>(l)];
      rms_norm(h.data(), n, D, L.input_norm, x.data());
      if (c.arch == Arch::kPhi3) {
        linear(x.data(), n, L.qkv, qkv);
        const int qw = Hq * hd, kw = Hkv * hd;
        q.resize(static_cast<size_t>(n) * qw);
        k.resize(static_cast<size_t>(n) * kw);
        v.resize(static_cast<size_t>(n) * kw);
        for (int t = 0; t < n; ++t) {
          const float* r = &qkv[static_cast<size_t>(t) * (qw + 2 * kw)];
          std::copy(r, r + qw, &q[static_cast<size_t>(t) * qw]);
          std::copy(r + qw, r + qw + kw, &k[static_cast<size_t>(t) * kw]);
          std::copy(r + qw + kw, r + qw + 2 * kw, &v[static_cast<size_t>(t) * kw]);
        }
      } else {
        linear(x.data(), n, L.q, q);
        linear(x.data(), n, L.k, k);
        linear(x.data(), n, L.v, v);
      }
      if (c.arch == Arch::kQwen3) {  // per-head RMSNorm before RoPE
        rms_norm(q.data(), n * Hq, hd, L.q_norm, q.data());
        rms_norm(k.data(), n * Hkv, hd, L.k_norm, k.data());
      }
      for (int t = 0; t < n; ++t) {
        rope(&q[static_cast<size_t>(t) * Hq * hd], Hq, start + t);
        rope(&k[static_cast<size_t>(t) * Hkv * hd], Hkv, start + t);
      }
      if (cache_.cache) {
        attend_cache(l, x, q, k, v, n, start, lam ? lam[l] : nullptr, attn);
      } else {
        attend_full(L, q, k, v, n, start, attn);
      }
      linear(attn.data(), n, L.o, proj);
      for (size_t i = 0; i < h.size(); ++i) h[i] = round(h[i] + proj[i]);

      rms_norm(h.data(), n, D, L.post_norm, x.data());
      if (c.arch == Arch::kPhi3) {
        linear(x.data(), n, L.gate_up, gu);
        g.resize(static_cast<size_t>(n) * I);
        u.resize(static_cast<size_t>(n) * I);
        for (int t = 0; t < n; ++t) {
          const float* r = &gu[static_cast<size_t>(t) * 2 * I];
          std::copy(r, r + I, &g[static_cast<size_t>(t) * I]);
          std::copy(r + I, r + 2 * I, &u[static_cast<size_t>(t) * I]);
        }
      } else {
        linear(x.data(), n, L.gate, g);
        linear(x.data(), n, L.up, u);
      }
      for (size_t i = 0; i < g.size(); ++i) {
        const float a = round(g[i] / (1.f + std::exp(-g[i])));  // SiLU
        g[i] = round(a * u[i]);
      }
      linear(g.data(), n, L.down, proj);
      for (size_t i = 0; i < h.size(); ++i) h[i] = round(h[i] + proj[i]);
    }
    length_ = start + n;

    // Final norm and lm_head on the last position only, logits in fp32 (not rounded).
    std::vector<float> last(static_cast<size_t>(D)), row(static_cast<size_t>(D));
    rms_norm(&h[static_cast<size_t>(n - 1) * D], 1, D, norm_, last.data());
    for (int r = 0; r < c.vocab; ++r) {
      lm_head_.row(r, row.data());
      logits[r] = dot(last.data(), row.data(), D);
    }
  }

 private:
  matrix_t get(const std::string& name) const {
    const Tensor& t = weights_.at(name);
    matrix_t m;
    m.data = t.data();
    m.dtype = t.dtype();
    m.rows = t.shape().size() == 2 ? t.shape()[0] : 1;
    m.cols = t.shape().back();
    return m;
  }

  /// Rounds to the model's dtype (the identity for fp32).
  float round(float f) const {
    switch (cfg_.dtype) {
      case DType::kBF16:
        return bf16_to_float(float_to_bf16(f));
      case DType::kF16:
        return fp16_to_float(float_to_fp16(f));
      case DType::kF32:
        break;
    }
    return f;
  }

  /// out[t] = round(round(x[t] / rms(x[t])) * w) for `rows` rows of `width` (in place allowed).
  void rms_norm(const float* x, int rows, int width, const matrix_t& w, float* out) {
    wrow_.resize(static_cast<size_t>(width));
    w.row(0, wrow_.data());
    for (int r = 0; r < rows; ++r) {
      const float* xr = x + static_cast<size_t>(r) * width;
      float* o = out + static_cast<size_t>(r) * width;
      const float inv = 1.f / std::sqrt(dot(xr, xr, width) / static_cast<float>(width) + cfg_.eps);
      for (int i = 0; i < width; ++i) o[i] = round(wrow_[i] * round(xr[i] * inv));
    }
  }

  /// y[t] = round(W x[t]) for n rows of x (W is [out, in]).
  void linear(const float* x, int n, const matrix_t& w, std::vector<float>& y) {
    y.resize(static_cast<size_t>(n) * w.rows);
    wrow_.resize(static_cast<size_t>(w.cols));
    for (int64_t r = 0; r < w.rows; ++r) {
      w.row(r, wrow_.data());
      for (int t = 0; t < n; ++t) {
        y[static_cast<size_t>(t * w.rows + r)] =
            round(dot(x + static_cast<size_t>(t) * w.cols, wrow_.data(), w.cols));
      }
    }
  }

  /// RoPE in the rotate_half layout on `heads` rows of head_dim at `pos`: cos and sin from
  /// fp32 angles (times the attention factor) rounded to the model dtype, then
  /// x * cos + rotate_half(x) * sin with each product and the sum in the model dtype.
  void rope(float* x, int heads, int pos) {
    const int hd = cfg_.head_dim, half = hd / 2;
    const std::vector<float>& inv = long_factors_ ? cfg_.inv_freq_long : cfg_.inv_freq;
    cos_.resize(static_cast<size_t>(half));
    sin_.resize(static_cast<size_t>(half));
    for (int i = 0; i < half; ++i) {
      const float angle = static_cast<float>(pos) * inv[i];
      cos_[i] = round(std::cos(angle) * cfg_.attention_factor);
      sin_[i] = round(std::sin(angle) * cfg_.attention_factor);
    }
    for (int h = 0; h < heads; ++h) {
      float* r = x + static_cast<size_t>(h) * hd;
      for (int i = 0; i < half; ++i) {
        const float a = r[i], b = r[i + half];
        r[i] = round(round(a * cos_[i]) + round(-b * sin_[i]));
        r[i + half] = round(round(b * cos_[i]) + round(a * sin_[i]));
      }
    }
  }

  /// The plain full cache: append, then token t sees positions [0, start + t].
  void attend_full(layer_t& L, const std::vector<float>& q, const std::vector<float>& k,
                   const std::vector<float>& v, int n, int start, std::vector<float>& attn) {
    const int hd = cfg_.head_dim, Hq = cfg_.q_heads, Hkv = cfg_.kv_heads, group = Hq / Hkv;
    const float scale = 1.f / std::sqrt(static_cast<float>(hd));
    for (int t = 0; t < n; ++t) {
      for (int j = 0; j < Hkv; ++j) {
        const float* kr = &k[(static_cast<size_t>(t) * Hkv + j) * hd];
        const float* vr = &v[(static_cast<size_t>(t) * Hkv + j) * hd];
        L.keys[j].insert(L.keys[j].end(), kr, kr + hd);
        L.values[j].insert(L.values[j].end(), vr, vr + hd);
      }
    }
    for (int t = 0; t < n; ++t) {
      for (int hq = 0; hq < Hq; ++hq) {
        const int j = hq / group;
        float* out = &attn[(static_cast<size_t>(t) * Hq + hq) * hd];
        cpu::attend_row(&q[(static_cast<size_t>(t) * Hq + hq) * hd], L.keys[j].data(),
                        L.values[j].data(), start + t + 1, hd, scale, out, scratch_);
        for (int d = 0; d < hd; ++d) out[d] = round(out[d]);
      }
    }
  }

  /// The layer's gate on n tokens: "rg" on x; "rg2"/"rg3" on [k_0; v_0; k_1; v_1; ...] with the
  /// rotated keys and raw values. Writes lam [n][Hkv] (fp32, not rounded) to the front of `lam`.
  void run_gate(Gate& gate, int in, const std::vector<float>& x, const std::vector<float>& k,
                const std::vector<float>& v, int n, std::vector<float>& lam) {
    const int hd = cfg_.head_dim, Hkv = cfg_.kv_heads;
    std::vector<float> gx(static_cast<size_t>(n) * in);
    if (gate.spec().kind == GateKind::kRg) {
      std::copy(x.begin(), x.begin() + static_cast<std::ptrdiff_t>(gx.size()), gx.begin());
    } else {
      for (int t = 0; t < n; ++t) {
        for (int j = 0; j < Hkv; ++j) {
          const size_t src = (static_cast<size_t>(t) * Hkv + j) * hd;
          float* dst = &gx[static_cast<size_t>(t) * in + static_cast<size_t>(2 * j) * hd];
          std::copy(&k[src], &k[src] + hd, dst);
          std::copy(&v[src], &v[src] + hd, dst + hd);
        }
      }
    }
    Tensor gxt(Backend::kCpu, DType::kF32, {n, in});
    gxt.write_f32(gx.data(), gx.size());
    Tensor lam_n(Backend::kCpu, DType::kF32, {n, Hkv});
    gate.run(gxt, lam_n);
    std::vector<float> out(static_cast<size_t>(n) * Hkv);
    lam_n.read_f32(out.data());
    std::copy(out.begin(), out.end(), lam.begin());
  }

  /// The TRIM-KV cache (sequence slot 0): lam from the layer's gate ("rg" on x; "rg2"/"rg3" on
  /// [k_0; v_0; k_1; v_1; ...] with the rotated keys and raw values), rounded to the model
  /// dtype unless lam_fp32; then one prefill chunk (start 0 or several tokens) or one decode
  /// step, which append, attend and evict (SPEC sections 4, 5). `forced` (test only): n * Hkv
  /// values that replace the gate's lam (then rounded and stored the same way).
  void attend_cache(int layer, const std::vector<float>& x, const std::vector<float>& q,
                    const std::vector<float>& k, const std::vector<float>& v, int n, int start,
                    const float* forced, std::vector<float>& attn) {
    const int hd = cfg_.head_dim, Hq = cfg_.q_heads, Hkv = cfg_.kv_heads;
    Cache& cache = *cache_.cache;
    Gate& gate = *cache_.gates[static_cast<size_t>(layer)];
    const int in = gate.spec().input_size;
    const bool decode = start > 0 && n == 1;
    const int rows = decode ? cache.config().batch : n;  // decode: every slot, only 0 active
    std::vector<float> lam(static_cast<size_t>(rows) * Hkv, 0.f);
    if (forced != nullptr) {
      std::copy(forced, forced + static_cast<size_t>(n) * Hkv, lam.begin());
    } else {
      run_gate(gate, in, x, k, v, n, lam);
    }
    if (!cache_.lam_fp32)
      for (int i = 0; i < n * Hkv; ++i)
        lam[static_cast<size_t>(i)] = round(lam[static_cast<size_t>(i)]);

    const DType dt = cache.config().dtype;
    auto upload = [&](const std::vector<float>& src, int heads) {
      Tensor t(Backend::kCpu, dt, {rows, heads, hd});
      std::vector<float> buf(static_cast<size_t>(rows) * heads * hd, 0.f);
      std::copy(src.begin(), src.begin() + static_cast<std::ptrdiff_t>(n) * heads * hd,
                buf.begin());
      t.write_f32(buf.data(), buf.size());
      return t;
    };
    Tensor qt = upload(q, Hq), kt = upload(k, Hkv), vt = upload(v, Hkv);
    Tensor lamt(Backend::kCpu, DType::kF32, {rows, Hkv});
    lamt.write_f32(lam.data(), lam.size());
    Tensor outt(Backend::kCpu, dt, {rows, Hq, hd});
    if (decode) {
      std::vector<int32_t> positions(static_cast<size_t>(rows), -1);
      positions[0] = start;
      decode_args_t a;
      a.q = &qt;
      a.k = &kt;
      a.v = &vt;
      a.lam = &lamt;
      a.out = &outt;
      a.positions = {positions.data(), positions.size()};
      cache.decode(layer, a);
    } else {
      prefill_args_t a;
      prefill_chunk_t chunk;
      chunk.seq = 0;
      chunk.start = start;
      chunk.length = n;
      a.chunks = {chunk};
      a.q = &qt;
      a.k = &kt;
      a.v = &vt;
      a.lam = &lamt;
      a.out = &outt;
      cache.prefill(layer, a);
    }
    std::vector<float> out(static_cast<size_t>(rows) * Hq * hd);
    outt.read_f32(out.data());
    for (size_t i = 0; i < attn.size(); ++i) attn[i] = round(out[i]);
  }

  weight_map_t weights_;
  matrix_t embed_, norm_, lm_head_;
  std::vector<layer_t> layers_;
  int length_ = 0;
  bool long_factors_ = false;
  std::vector<float> wrow_, cos_, sin_, scratch_;
};

}  // namespace

std::unique_ptr<Model> create_cpu_model(const model_config_t& cfg, weight_map_t weights,
                                        model_cache_t cache) {
  return std::make_unique<CpuModel>(cfg, std::move(weights), std::move(cache));
}

}  // namespace trimkv::model
