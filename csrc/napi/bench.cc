// Timing primitives for bench/: device time measured inside the addon (CUDA events), or a
// steady clock for the CPU backend. Benchmarks only; nothing here is on a hot path.
#include <chrono>

#include "napi/common.h"
#include "ops/device.h"

namespace trimkv::napi {
namespace {

// timeCalls(backend, n, spinMs, fn): per-call times in ms of fn(i) for i < n.
Napi::Value TimeCalls(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guard(env, [&]() -> Napi::Value {
    const Backend backend = static_cast<Backend>(int_arg(info, 0, "backend"));
    const int n = static_cast<int>(int_arg(info, 1, "n"));
    TRIMKV_CHECK(n >= 1 && n <= 1000000, code::kRange, "n must be in [1, 1e6]");
    TRIMKV_CHECK(info.Length() > 3 && info[2].IsNumber() && info[3].IsFunction(), code::kInvalidArgument,
                 "timeCalls(backend, n, spinMs, fn)");
    const double spin_ms = info[2].As<Napi::Number>().DoubleValue();
    Napi::Function fn = info[3].As<Napi::Function>();
    auto call = [&](int i) {
      fn.Call({Napi::Number::New(env, i)});
      if (env.IsExceptionPending()) throw env.GetAndClearPendingException();
    };
    std::vector<double> ms;
    if (backend == Backend::kCuda) {
      ms = cuda_time_calls(n, spin_ms, call);
    } else {
      ms.resize(n);
      for (int i = 0; i < n; ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        call(i);
        ms[i] = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      }
    }
    Napi::Float64Array out = Napi::Float64Array::New(env, ms.size());
    std::copy(ms.begin(), ms.end(), out.Data());
    return out;
  });
}

// copyBandwidth(bytes, iters): device-to-device GB/s (read + write), median.
Napi::Value CopyBandwidth(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guard(env, [&]() -> Napi::Value {
    const int64_t bytes = int_arg(info, 0, "bytes");
    const int iters = static_cast<int>(int_arg(info, 1, "iters"));
    TRIMKV_CHECK(bytes > 0 && iters > 0, code::kRange, "bytes and iters must be positive");
    return Napi::Number::New(env, cuda_copy_bandwidth(static_cast<size_t>(bytes), iters));
  });
}

}  // namespace

void register_bench(Napi::Env env, Napi::Object exports) {
  exports.Set("timeCalls", Napi::Function::New(env, TimeCalls, "timeCalls"));
  exports.Set("copyBandwidth", Napi::Function::New(env, CopyBandwidth, "copyBandwidth"));
}

}  // namespace trimkv::napi
