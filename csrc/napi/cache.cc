// KV-cache handles: decode / prefill enqueue synchronously (fast); queries return copies.
#include "ops/cache.h"

#include "napi/common.h"

namespace trimkv::napi {
namespace {

constexpr napi_type_tag kCacheTag = {0x7472696d6b765f63ULL, 0x616368655f763120ULL};

class CacheWrap : public Napi::ObjectWrap<CacheWrap> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(
        env, "NativeCache",
        {InstanceMethod("decode", &CacheWrap::Decode),
         InstanceMethod("prefill", &CacheWrap::Prefill), InstanceMethod("reset", &CacheWrap::Reset),
         InstanceMethod("seen", &CacheWrap::Seen), InstanceMethod("length", &CacheWrap::Length),
         InstanceMethod("lengths", &CacheWrap::Lengths),
         InstanceMethod("inspect", &CacheWrap::Inspect),
         InstanceMethod("memoryBytes", &CacheWrap::MemoryBytes),
         InstanceMethod("dispose", &CacheWrap::Dispose)});
  }

  // new NativeCache(backend, config) with the fields of cache_config_t under their TS names.
  explicit CacheWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<CacheWrap>(info) {
    guard(info.Env(), [&]() -> Napi::Value {
      const Backend backend = static_cast<Backend>(int_arg(info, 0, "backend"));
      TRIMKV_CHECK(info.Length() > 1 && info[1].IsObject(), code::kInvalidArgument,
                   "NativeCache(backend, config)");
      Napi::Object o = info[1].As<Napi::Object>();
      cache_config_t c;
      c.layers = static_cast<int>(number_prop(o, "layers"));
      c.batch = static_cast<int>(number_prop(o, "batch"));
      c.q_heads = static_cast<int>(number_prop(o, "qHeads"));
      c.kv_heads = static_cast<int>(number_prop(o, "kvHeads"));
      c.head_dim = static_cast<int>(number_prop(o, "headDim"));
      c.memory = static_cast<int>(number_prop(o, "memory"));
      c.buffer = static_cast<int>(number_prop(o, "buffer"));
      c.window = static_cast<int>(number_prop(o, "window"));
      c.dtype = parse_dtype(string_prop(o, "dtype"));
      c.strategy = parse_strategy(string_prop(o, "strategy"));
      c.scope = parse_scope(string_prop(o, "scope"));
      c.floor = number_prop(o, "floor");
      c.threshold = number_prop(o, "threshold");
      c.scale = static_cast<float>(number_prop(o, "scale"));
      cache_ = Cache::create(backend, c);
      info.This().As<Napi::Object>().TypeTag(&kCacheTag);
      return info.Env().Undefined();
    });
  }

 private:
  Cache* get() {
    TRIMKV_CHECK(cache_ != nullptr, code::kDisposed, "the KV cache has been disposed");
    return cache_.get();
  }

  // decode(layer, q, k, v, lam, out, positions: Int32Array)
  Napi::Value Decode(const Napi::CallbackInfo& info) {
    return guard(info.Env(), [&]() -> Napi::Value {
      Cache* c = get();
      TRIMKV_CHECK(info.Length() >= 7 && info[6].IsTypedArray(), code::kInvalidArgument,
                   "decode(layer, q, k, v, lam, out, positions)");
      decode_args_t a;
      const int layer = static_cast<int>(int_arg(info, 0, "layer"));
      a.q = unwrap_tensor(info[1], "q");
      a.k = unwrap_tensor(info[2], "k");
      a.v = unwrap_tensor(info[3], "v");
      a.lam = unwrap_tensor(info[4], "lam");
      a.out = unwrap_tensor(info[5], "out");
      Napi::TypedArray pa = info[6].As<Napi::TypedArray>();
      TRIMKV_CHECK(pa.TypedArrayType() == napi_int32_array, code::kInvalidArgument,
                   "positions must be an Int32Array");
      Napi::Int32Array p = pa.As<Napi::Int32Array>();
      a.positions = {p.Data(), p.ElementLength()};
      c->decode(layer, a);
      return info.Env().Undefined();
    });
  }

  // prefill(layer, chunks: Int32Array [seq, start, length] per chunk, q, k, v, lam, out)
  Napi::Value Prefill(const Napi::CallbackInfo& info) {
    return guard(info.Env(), [&]() -> Napi::Value {
      Cache* c = get();
      TRIMKV_CHECK(info.Length() >= 7 && info[1].IsTypedArray(), code::kInvalidArgument,
                   "prefill(layer, chunks, q, k, v, lam, out)");
      prefill_args_t a;
      const int layer = static_cast<int>(int_arg(info, 0, "layer"));
      Napi::TypedArray ta = info[1].As<Napi::TypedArray>();
      TRIMKV_CHECK(ta.TypedArrayType() == napi_int32_array && ta.ElementLength() % 3 == 0,
                   code::kInvalidArgument,
                   "chunks must be an Int32Array of (seq, start, length) triples");
      Napi::Int32Array t = ta.As<Napi::Int32Array>();
      for (size_t i = 0; i + 2 < t.ElementLength(); i += 3) {
        prefill_chunk_t ch;
        ch.seq = t[i];
        ch.start = t[i + 1];
        ch.length = t[i + 2];
        a.chunks.push_back(ch);
      }
      a.q = unwrap_tensor(info[2], "q");
      a.k = unwrap_tensor(info[3], "k");
      a.v = unwrap_tensor(info[4], "v");
      a.lam = unwrap_tensor(info[5], "lam");
      a.out = unwrap_tensor(info[6], "out");
      c->prefill(layer, a);
      return info.Env().Undefined();
    });
  }

  Napi::Value Reset(const Napi::CallbackInfo& info) {
    return guard(info.Env(), [&]() -> Napi::Value {
      get()->reset(static_cast<int>(int_arg(info, 0, "seq")));
      return info.Env().Undefined();
    });
  }

  Napi::Value Seen(const Napi::CallbackInfo& info) {
    return guard(info.Env(), [&]() -> Napi::Value {
      return Napi::Number::New(
          info.Env(), static_cast<double>(get()->seen(static_cast<int>(int_arg(info, 0, "seq")))));
    });
  }

  Napi::Value Length(const Napi::CallbackInfo& info) {
    return guard(info.Env(), [&]() -> Napi::Value {
      return Napi::Number::New(info.Env(),
                               get()->length(static_cast<int>(int_arg(info, 0, "seq")),
                                             static_cast<int>(int_arg(info, 1, "layer")),
                                             static_cast<int>(int_arg(info, 2, "head"))));
    });
  }

  // [batch, layers, kv_heads]
  Napi::Value Lengths(const Napi::CallbackInfo& info) {
    return guard(info.Env(), [&]() -> Napi::Value {
      Cache* c = get();
      const cache_config_t& cfg = c->config();
      Napi::Int32Array out = Napi::Int32Array::New(
          info.Env(), static_cast<size_t>(cfg.batch) * cfg.layers * cfg.kv_heads);
      size_t i = 0;
      for (int b = 0; b < cfg.batch; ++b)
        for (int l = 0; l < cfg.layers; ++l)
          for (int h = 0; h < cfg.kv_heads; ++h) out[i++] = c->length(b, l, h);
      return out;
    });
  }

  Napi::Value Inspect(const Napi::CallbackInfo& info) {
    return guard(info.Env(), [&]() -> Napi::Value {
      head_snapshot_t s = get()->inspect(static_cast<int>(int_arg(info, 0, "seq")),
                                         static_cast<int>(int_arg(info, 1, "layer")),
                                         static_cast<int>(int_arg(info, 2, "head")));
      Napi::Int32Array pos = Napi::Int32Array::New(info.Env(), s.positions.size());
      Napi::Float32Array sc = Napi::Float32Array::New(info.Env(), s.scores.size());
      std::copy(s.positions.begin(), s.positions.end(), pos.Data());
      std::copy(s.scores.begin(), s.scores.end(), sc.Data());
      Napi::Object o = Napi::Object::New(info.Env());
      o.Set("positions", pos);
      o.Set("scores", sc);
      return o;
    });
  }

  Napi::Value MemoryBytes(const Napi::CallbackInfo& info) {
    return guard(info.Env(), [&]() -> Napi::Value {
      Cache* c = get();
      Napi::Object o = Napi::Object::New(info.Env());
      o.Set("used", static_cast<double>(c->used_bytes()));
      o.Set("reserved", static_cast<double>(c->reserved_bytes()));
      return o;
    });
  }

  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    cache_.reset();
    return info.Env().Undefined();
  }

  friend std::shared_ptr<Cache> trimkv::napi::shared_cache(const Napi::Value&, const char*);
  // Shared: a model using this cache keeps it alive after a dispose here.
  std::shared_ptr<Cache> cache_;
};

}  // namespace

std::shared_ptr<Cache> shared_cache(const Napi::Value& v, const char* name) {
  TRIMKV_CHECK(v.IsObject() && v.As<Napi::Object>().CheckTypeTag(&kCacheTag),
               code::kInvalidArgument, "Expected a KV cache for ", name);
  CacheWrap* w = CacheWrap::Unwrap(v.As<Napi::Object>());
  TRIMKV_CHECK(w->cache_ != nullptr, code::kDisposed, "the KV cache has been disposed");
  return w->cache_;
}

void register_cache(Napi::Env env, Napi::Object exports) {
  exports.Set("NativeCache", CacheWrap::Define(env));
}

}  // namespace trimkv::napi
