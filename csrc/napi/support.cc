// The native support query (ops/support.h): cacheSupport(backend, config) and
// gateSupport(backend, inputSize) return { ok, reason? }.
#include "ops/support.h"

#include "napi/common.h"

namespace trimkv::napi {
namespace {

Napi::Value result(Napi::Env env, const support_t& s) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("ok", s.ok);
  if (!s.ok) o.Set("reason", s.reason);
  return o;
}

// cacheSupport(backend, config): config with layers, qHeads, kvHeads, headDim, dtype, scope
// (a resolved configuration: lib/cache.ts validates it first).
Napi::Value CacheSupport(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    const Backend backend = static_cast<Backend>(int_arg(info, 0, "backend"));
    TRIMKV_CHECK(info.Length() > 1 && info[1].IsObject(), code::kInvalidArgument,
                 "cacheSupport(backend, config)");
    Napi::Object o = info[1].As<Napi::Object>();
    cache_config_t c;
    c.layers = static_cast<int>(number_prop(o, "layers"));
    c.q_heads = static_cast<int>(number_prop(o, "qHeads"));
    c.kv_heads = static_cast<int>(number_prop(o, "kvHeads"));
    c.head_dim = static_cast<int>(number_prop(o, "headDim"));
    c.dtype = parse_dtype(string_prop(o, "dtype"));
    c.scope = parse_scope(string_prop(o, "scope"));
    return result(info.Env(), cache_support(backend, c));
  });
}

// gateSupport(backend, inputSize)
Napi::Value GateSupport(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    const Backend backend = static_cast<Backend>(int_arg(info, 0, "backend"));
    TRIMKV_CHECK(info.Length() > 1 && info[1].IsNumber(), code::kInvalidArgument,
                 "gateSupport(backend, inputSize)");
    return result(info.Env(), gate_support(backend, info[1].As<Napi::Number>().DoubleValue()));
  });
}

}  // namespace

void register_support(Napi::Env env, Napi::Object exports) {
  exports.Set("cacheSupport", Napi::Function::New(env, CacheSupport, "cacheSupport"));
  exports.Set("gateSupport", Napi::Function::New(env, GateSupport, "gateSupport"));
}

}  // namespace trimkv::napi
