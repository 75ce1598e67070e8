// Backend discovery and device-wide operations.
#include "napi/common.h"
#include "runtime/device.h"

namespace trimkv::napi {
namespace {

Napi::Value CudaStatus(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guard(env, [&]() -> Napi::Value {
    const cuda_status_t& s = cuda_status();
    Napi::Object o = Napi::Object::New(env);
    o.Set("compiled", s.compiled);
    o.Set("available", s.available);
    o.Set("reason", s.reason);
    o.Set("archs", s.archs);
    o.Set("runtimeVersion", s.runtime_version);
    o.Set("driverVersion", s.driver_version);
    Napi::Array devices = Napi::Array::New(env, s.devices.size());
    for (size_t i = 0; i < s.devices.size(); ++i) {
      const device_info_t& d = s.devices[i];
      Napi::Object od = Napi::Object::New(env);
      od.Set("index", d.index);
      od.Set("name", d.name);
      od.Set("computeCapability", std::to_string(d.major) + "." + std::to_string(d.minor));
      od.Set("totalMemory", static_cast<double>(d.total_memory));
      od.Set("multiprocessors", d.multiprocessors);
      devices.Set(static_cast<uint32_t>(i), od);
    }
    o.Set("devices", devices);
    return o;
  });
}

class SyncWorker : public Napi::AsyncWorker {
 public:
  explicit SyncWorker(Napi::Env env)
      : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)) {}
  Napi::Promise promise() { return deferred_.Promise(); }
  void Execute() override {
    try {
      device_synchronize();
    } catch (const Error& e) {
      code_ = e.code();
      SetError(e.what());
    }
  }
  void OnOK() override { deferred_.Resolve(Env().Undefined()); }
  void OnError(const Napi::Error& e) override {
    deferred_.Reject(make_error(Env(), code_, e.Message()).Value());
  }

 private:
  Napi::Promise::Deferred deferred_;
  const char* code_ = code::kNative;
};

Napi::Value Synchronize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guard(env, [&]() -> Napi::Value {
    auto* w = new SyncWorker(env);
    Napi::Promise p = w->promise();
    w->Queue();
    return p;
  });
}

}  // namespace

void register_runtime(Napi::Env env, Napi::Object exports) {
  exports.Set("cudaStatus", Napi::Function::New(env, CudaStatus, "cudaStatus"));
  exports.Set("synchronize", Napi::Function::New(env, Synchronize, "synchronize"));
}

}  // namespace trimkv::napi
