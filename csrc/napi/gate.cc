// Retention-gate handles.
#include "ops/gate.h"

#include "napi/common.h"

namespace trimkv::napi {
namespace {

constexpr napi_type_tag kGateTag = {0x7472696d6b765f67ULL, 0x6174655f76312020ULL};

class GateWrap : public Napi::ObjectWrap<GateWrap> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(
        env, "NativeGate",
        {InstanceMethod("run", &GateWrap::Run), InstanceMethod("dispose", &GateWrap::Dispose)});
  }

  // new NativeGate(backend, spec: {kind, activation, inputSize, intermediateSize, kvHeads},
  //                dtype, a, b, out, bias)   (weights as typed arrays of raw stored values)
  explicit GateWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<GateWrap>(info) {
    guard(info.Env(), [&]() -> Napi::Value {
      const Backend backend = static_cast<Backend>(int_arg(info, 0, "backend"));
      TRIMKV_CHECK(info.Length() >= 7 && info[1].IsObject() && info[2].IsString(),
                   code::kInvalidArgument, "NativeGate(backend, spec, dtype, a, b, out, bias)");
      Napi::Object s = info[1].As<Napi::Object>();
      gate_spec_t spec;
      spec.kind = parse_gate_kind(string_prop(s, "kind"));
      spec.activation = parse_activation(string_prop(s, "activation"));
      spec.input_size = static_cast<int>(number_prop(s, "inputSize"));
      spec.intermediate_size = static_cast<int>(number_prop(s, "intermediateSize"));
      spec.kv_heads = static_cast<int>(number_prop(s, "kvHeads"));
      gate_weights_t w;
      w.dtype = parse_dtype(info[2].As<Napi::String>().Utf8Value());
      w.a = bytes_of(info[3], "a");
      w.b = bytes_of(info[4], "b");
      w.out = bytes_of(info[5], "out");
      w.bias = bytes_of(info[6], "bias");
      gate_ = Gate::create(backend, spec, w);
      info.This().As<Napi::Object>().TypeTag(&kGateTag);
      return info.Env().Undefined();
    });
  }

 private:
  Napi::Value Run(const Napi::CallbackInfo& info) {
    return guard(info.Env(), [&]() -> Napi::Value {
      TRIMKV_CHECK(gate_ != nullptr, code::kDisposed, "the retention gate has been disposed");
      TRIMKV_CHECK(info.Length() >= 2, code::kInvalidArgument, "run(x, lam)");
      Tensor* x = unwrap_tensor(info[0], "x");
      Tensor* lam = unwrap_tensor(info[1], "lam");
      gate_->run(*x, *lam);
      return info.Env().Undefined();
    });
  }

  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    gate_.reset();
    return info.Env().Undefined();
  }

  friend std::shared_ptr<Gate> trimkv::napi::shared_gate(const Napi::Value&, const char*);
  // Shared: a model using this gate keeps it alive after a dispose here.
  std::shared_ptr<Gate> gate_;
};

}  // namespace

std::shared_ptr<Gate> shared_gate(const Napi::Value& v, const char* name) {
  TRIMKV_CHECK(v.IsObject() && v.As<Napi::Object>().CheckTypeTag(&kGateTag), code::kInvalidArgument,
               "Expected a retention gate for ", name);
  GateWrap* w = GateWrap::Unwrap(v.As<Napi::Object>());
  TRIMKV_CHECK(w->gate_ != nullptr, code::kDisposed, "the retention gate has been disposed");
  return w->gate_;
}

void register_gate(Napi::Env env, Napi::Object exports) {
  exports.Set("NativeGate", GateWrap::Define(env));
}

}  // namespace trimkv::napi
