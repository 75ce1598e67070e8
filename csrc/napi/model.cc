// Model handles: new NativeModel(backend, config, weights) and forward(tokens, start, maxLength).
#include "model/model.h"

#include "common/config.h"
#include "napi/common.h"
#include "ops/cache.h"
#include "ops/gate.h"

namespace trimkv::napi {
namespace {

std::vector<float> floats_prop(const Napi::Object& o, const char* key, bool optional) {
  Napi::Value v = o.Get(key);
  if (optional && (v.IsUndefined() || v.IsNull())) return {};
  TRIMKV_CHECK(v.IsTypedArray() && v.As<Napi::TypedArray>().TypedArrayType() == napi_float32_array,
               code::kInvalidArgument, "Expected a Float32Array for ", key);
  Napi::Float32Array a = v.As<Napi::Float32Array>();
  return std::vector<float>(a.Data(), a.Data() + a.ElementLength());
}

class ModelWrap : public Napi::ObjectWrap<ModelWrap> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "NativeModel",
                       {InstanceMethod("forward", &ModelWrap::Forward),
                        InstanceMethod("length", &ModelWrap::Length),
                        InstanceMethod("dispose", &ModelWrap::Dispose)});
  }

  // new NativeModel(backend, config, weights: { [name]: NativeTensor })
  explicit ModelWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<ModelWrap>(info) {
    guard(info.Env(), [&]() -> Napi::Value {
      const Backend backend = static_cast<Backend>(int_arg(info, 0, "backend"));
      TRIMKV_CHECK(info.Length() > 2 && info[1].IsObject() && info[2].IsObject(),
                   code::kInvalidArgument, "NativeModel(backend, config, weights)");
      Napi::Object o = info[1].As<Napi::Object>();
      model::model_config_t c;
      c.arch = model::parse_arch(string_prop(o, "architecture"));
      c.hidden = static_cast<int>(number_prop(o, "hiddenSize"));
      c.layers = static_cast<int>(number_prop(o, "layers"));
      c.q_heads = static_cast<int>(number_prop(o, "qHeads"));
      c.kv_heads = static_cast<int>(number_prop(o, "kvHeads"));
      c.head_dim = static_cast<int>(number_prop(o, "headDim"));
      c.intermediate = static_cast<int>(number_prop(o, "intermediateSize"));
      c.vocab = static_cast<int>(number_prop(o, "vocabSize"));
      c.max_positions = static_cast<int>(number_prop(o, "maxPositionEmbeddings"));
      c.eps = static_cast<float>(number_prop(o, "rmsNormEps"));
      Napi::Value tie = o.Get("tieWordEmbeddings");
      TRIMKV_CHECK(tie.IsBoolean(), code::kInvalidArgument,
                   "Expected a boolean for tieWordEmbeddings");
      c.tie_word_embeddings = tie.As<Napi::Boolean>().Value();
      c.dtype = parse_dtype(string_prop(o, "dtype"));
      c.inv_freq = floats_prop(o, "invFreq", false);
      c.inv_freq_long = floats_prop(o, "invFreqLong", true);
      c.rope_original_max = static_cast<int>(number_prop(o, "ropeOriginalMax"));
      c.attention_factor = static_cast<float>(number_prop(o, "attentionFactor"));

      Napi::Object w = info[2].As<Napi::Object>();
      model::weight_map_t weights;
      Napi::Array names = w.GetPropertyNames();
      for (uint32_t i = 0; i < names.Length(); ++i) {
        const std::string name = names.Get(i).As<Napi::String>().Utf8Value();
        weights.emplace(name, *unwrap_tensor(w.Get(name), name.c_str()));
      }
      // Optional 4th argument: { cache: NativeCache, gates: NativeGate[], lamFp32: boolean }.
      model::model_cache_t mc;
      if (info.Length() > 3 && !info[3].IsUndefined()) {
        TRIMKV_CHECK(info[3].IsObject(), code::kInvalidArgument,
                     "Expected an object { cache, gates, lamFp32 } for the cache argument");
        Napi::Object k = info[3].As<Napi::Object>();
        mc.cache = shared_cache(k.Get("cache"), "cache");
        Napi::Value gv = k.Get("gates");
        TRIMKV_CHECK(gv.IsArray(), code::kInvalidArgument, "Expected an array of gates for gates");
        Napi::Array ga = gv.As<Napi::Array>();
        for (uint32_t i = 0; i < ga.Length(); ++i)
          mc.gates.push_back(shared_gate(ga.Get(i), "gates"));
        Napi::Value lf = k.Get("lamFp32");
        mc.lam_fp32 = lf.IsBoolean() && lf.As<Napi::Boolean>().Value();
      }
      model_ = model::Model::create(backend, c, std::move(weights), std::move(mc));
      return info.Env().Undefined();
    });
  }

 private:
  model::Model* get() {
    TRIMKV_CHECK(model_ != nullptr, code::kDisposed, "the model has been disposed");
    return model_.get();
  }

  // forward(tokens: Int32Array, start, maxLength, lam?) -> Float32Array logits of the last token
  Napi::Value Forward(const Napi::CallbackInfo& info) {
    return guard(info.Env(), [&]() -> Napi::Value {
      model::Model* m = get();
      TRIMKV_CHECK(info.Length() >= 3 && info[0].IsTypedArray() &&
                       info[0].As<Napi::TypedArray>().TypedArrayType() == napi_int32_array,
                   code::kInvalidArgument, "forward(tokens: Int32Array, start, maxLength)");
      Napi::Int32Array tokens = info[0].As<Napi::Int32Array>();
      const int64_t start = int_arg(info, 1, "start");
      const int64_t max_length = int_arg(info, 2, "maxLength");
      TRIMKV_CHECK(start >= 0 && start <= INT32_MAX && max_length >= 0 && max_length <= INT32_MAX &&
                       tokens.ElementLength() <= INT32_MAX,
                   code::kRange, "start / maxLength / tokens out of range");
      const int n = static_cast<int>(tokens.ElementLength());
      // Optional 4th argument (test only): lam per layer, each a Float32Array [n, kvHeads] or
      // undefined / null (that layer's gate computes it). The arrays stay alive in `info`.
      std::vector<const float*> lam;
      if (info.Length() > 3 && !info[3].IsUndefined() && !info[3].IsNull()) {
        TRIMKV_CHECK(info[3].IsArray(), code::kInvalidArgument,
                     "Expected an array (one entry per layer) for lam");
        Napi::Array la = info[3].As<Napi::Array>();
        const model::model_config_t& c = m->config();
        TRIMKV_CHECK(la.Length() == static_cast<uint32_t>(c.layers), code::kInvalidArgument,
                     "lam needs one entry per layer: expected ", c.layers, " but received ",
                     la.Length());
        for (uint32_t l = 0; l < la.Length(); ++l) {
          Napi::Value e = la.Get(l);
          if (e.IsUndefined() || e.IsNull()) {
            lam.push_back(nullptr);
            continue;
          }
          TRIMKV_CHECK(
              e.IsTypedArray() && e.As<Napi::TypedArray>().TypedArrayType() == napi_float32_array,
              code::kInvalidArgument, "Expected a Float32Array or undefined for lam[", l, "]");
          Napi::Float32Array a = e.As<Napi::Float32Array>();
          TRIMKV_CHECK(
              a.ElementLength() == static_cast<size_t>(n) * c.kv_heads, code::kShape, "lam[", l,
              "] has ", a.ElementLength(),
              " values; expected tokens * kvHeads = ", static_cast<size_t>(n) * c.kv_heads);
          lam.push_back(a.Data());
        }
      }
      Napi::Float32Array logits = Napi::Float32Array::New(info.Env(), m->config().vocab);
      m->forward(tokens.Data(), n, static_cast<int>(start), static_cast<int>(max_length),
                 logits.Data(), lam.empty() ? nullptr : lam.data());
      return logits;
    });
  }

  Napi::Value Length(const Napi::CallbackInfo& info) {
    return guard(info.Env(),
                 [&]() -> Napi::Value { return Napi::Number::New(info.Env(), get()->length()); });
  }

  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    model_.reset();
    return info.Env().Undefined();
  }

  std::unique_ptr<model::Model> model_;
};

}  // namespace

void register_model(Napi::Env env, Napi::Object exports) {
  exports.Set("NativeModel", ModelWrap::Define(env));
}

}  // namespace trimkv::napi
