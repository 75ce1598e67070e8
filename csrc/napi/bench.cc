// Timing primitives for bench/: device time measured inside the addon (CUDA events), or a
// steady clock for the CPU backend. Benchmarks only; nothing here is on a hot path.
#include <algorithm>
#include <chrono>
#include <string>

#include "kernels/select_bench.h"
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

int int_prop(const Napi::Object& o, const char* key) {
  const double v = number_prop(o, key);
  TRIMKV_CHECK(v == static_cast<double>(static_cast<int>(v)), code::kInvalidArgument,
               "Expected an integer for ", key, " but received ", v);
  return static_cast<int>(v);
}

// selectBench(backend, {rows, n, k, threads, iters, warmup, keys: 'random' | 'scores', seed}):
// {ms: Float64Array (per launch), keptMin, keptMax}. The top-k selection of the evictions on its
// own (kernels/select_bench.cu); the CPU backend has no such kernel: ERR_UNSUPPORTED.
Napi::Value SelectBench(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guard(env, [&]() -> Napi::Value {
    const Backend backend = static_cast<Backend>(int_arg(info, 0, "backend"));
    TRIMKV_CHECK(info.Length() > 1 && info[1].IsObject(), code::kInvalidArgument,
                 "selectBench(backend, options)");
    TRIMKV_CHECK(backend == Backend::kCuda, code::kUnsupported,
                 "selectBench times a CUDA kernel; the CPU backend has no separate selection kernel");
    const Napi::Object o = info[1].As<Napi::Object>();
    select_bench_params_t p;
    p.rows = int_prop(o, "rows");
    p.n = int_prop(o, "n");
    p.k = int_prop(o, "k");
    p.threads = int_prop(o, "threads");
    p.iters = int_prop(o, "iters");
    p.warmup = int_prop(o, "warmup");
    p.seed = static_cast<uint64_t>(int_prop(o, "seed"));
    const std::string keys = string_prop(o, "keys");
    TRIMKV_CHECK(keys == "random" || keys == "scores", code::kInvalidArgument,
                 "Expected 'random' or 'scores' for keys but received ", keys);
    p.keys = keys == "scores" ? select_keys_t::kScores : select_keys_t::kRandom;
    const select_bench_result_t r = cuda_select_bench(p);
    Napi::Float64Array ms = Napi::Float64Array::New(env, r.ms.size());
    std::copy(r.ms.begin(), r.ms.end(), ms.Data());
    Napi::Object out = Napi::Object::New(env);
    out.Set("ms", ms);
    out.Set("keptMin", Napi::Number::New(env, r.kept_min));
    out.Set("keptMax", Napi::Number::New(env, r.kept_max));
    return out;
  });
}

// deviceMemoryUsed(backend): bytes in use on the GPU (cudaMemGetInfo: total - free).
Napi::Value DeviceMemoryUsed(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guard(env, [&]() -> Napi::Value {
    const Backend backend = static_cast<Backend>(int_arg(info, 0, "backend"));
    TRIMKV_CHECK(backend == Backend::kCuda, code::kUnsupported,
                 "deviceMemoryUsed is a CUDA query; the CPU backend has none");
    return Napi::Number::New(env, static_cast<double>(cuda_memory_used()));
  });
}

}  // namespace

void register_bench(Napi::Env env, Napi::Object exports) {
  exports.Set("timeCalls", Napi::Function::New(env, TimeCalls, "timeCalls"));
  exports.Set("copyBandwidth", Napi::Function::New(env, CopyBandwidth, "copyBandwidth"));
  exports.Set("selectBench", Napi::Function::New(env, SelectBench, "selectBench"));
  exports.Set("deviceMemoryUsed", Napi::Function::New(env, DeviceMemoryUsed, "deviceMemoryUsed"));
}

}  // namespace trimkv::napi
