// Shared pieces of the binding: turning C++ failures into JS errors with a stable `code`,
// and reading arguments. No N-API call ever lets a C++ exception escape to Node.
#pragma once

#include <napi.h>

#include <memory>
#include <new>
#include <string>
#include <vector>

#include "common/errors.h"
#include "runtime/tensor.h"

namespace trimkv {
class Cache;
class Gate;
}  // namespace trimkv

namespace trimkv::napi {

inline Napi::Error make_error(Napi::Env env, const char* code, const std::string& message) {
  Napi::Error e = Napi::Error::New(env, message);
  e.Set("code", Napi::String::New(env, code));
  return e;
}

/// Runs `fn` and converts every C++ exception into a thrown JS error with a code.
template <typename Fn>
Napi::Value guard(Napi::Env env, Fn&& fn) {
  try {
    return fn();
  } catch (const Error& e) {
    make_error(env, e.code(), e.what()).ThrowAsJavaScriptException();
  } catch (const std::bad_alloc&) {
    make_error(env, code::kOutOfMemory, "out of host memory").ThrowAsJavaScriptException();
  } catch (const Napi::Error& e) {
    e.ThrowAsJavaScriptException();
  } catch (const std::exception& e) {
    make_error(env, code::kNative, e.what()).ThrowAsJavaScriptException();
  }
  return env.Undefined();
}

inline int64_t int_arg(const Napi::CallbackInfo& info, size_t i, const char* name) {
  TRIMKV_CHECK(info.Length() > i && info[i].IsNumber(), code::kInvalidArgument,
               "Expected a number for ", name);
  const double v = info[i].As<Napi::Number>().DoubleValue();
  // Range first: casting NaN or a double beyond int64 to int64 is undefined behaviour.
  TRIMKV_CHECK(v >= -9007199254740991.0 && v <= 9007199254740991.0 &&
                   v == static_cast<double>(static_cast<int64_t>(v)),
               code::kInvalidArgument, "Expected an integer for ", name, " but received ", v);
  return static_cast<int64_t>(v);
}

inline std::string string_prop(const Napi::Object& o, const char* key) {
  Napi::Value v = o.Get(key);
  TRIMKV_CHECK(v.IsString(), code::kInvalidArgument, "Expected a string for ", key);
  return v.As<Napi::String>().Utf8Value();
}

inline double number_prop(const Napi::Object& o, const char* key) {
  Napi::Value v = o.Get(key);
  TRIMKV_CHECK(v.IsNumber(), code::kInvalidArgument, "Expected a number for ", key);
  return v.As<Napi::Number>().DoubleValue();
}

/// The bytes of a typed array argument.
inline std::vector<uint8_t> bytes_of(const Napi::Value& v, const char* name) {
  TRIMKV_CHECK(v.IsTypedArray(), code::kInvalidArgument, "Expected a typed array for ", name);
  Napi::TypedArray t = v.As<Napi::TypedArray>();
  const uint8_t* p = static_cast<const uint8_t*>(t.ArrayBuffer().Data()) + t.ByteOffset();
  return std::vector<uint8_t>(p, p + t.ByteLength());
}

// Per-addon state: constructors used for instanceof checks.
struct addon_data_t {
  Napi::FunctionReference tensor_ctor;
};

/// The native tensor behind a JS Tensor handle; throws ERR_INVALID_ARGUMENT / ERR_DISPOSED.
Tensor* unwrap_tensor(const Napi::Value& v, const char* name);
/// The cache / gate behind a JS handle, shared (a model holds them); throws as unwrap_tensor.
std::shared_ptr<Cache> shared_cache(const Napi::Value& v, const char* name);
std::shared_ptr<Gate> shared_gate(const Napi::Value& v, const char* name);

void register_tensor(Napi::Env env, Napi::Object exports, addon_data_t* data);
void register_gate(Napi::Env env, Napi::Object exports);
void register_cache(Napi::Env env, Napi::Object exports);
void register_runtime(Napi::Env env, Napi::Object exports);
void register_bench(Napi::Env env, Napi::Object exports);
void register_support(Napi::Env env, Napi::Object exports);
void register_model(Napi::Env env, Napi::Object exports);

}  // namespace trimkv::napi
