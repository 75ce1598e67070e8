// Timing primitives for bench/: device time measured inside the addon (CUDA events), or a
// steady clock for the CPU backend. Benchmarks only; nothing here is on a hot path.
#include <algorithm>
#include <chrono>
#include <string>

#include "bench/select_bench.h"
#include "bench/timing.h"
#include "napi/common.h"
#include "runtime/device.h"

namespace trimkv::napi {
namespace {

// timeCalls(backend, n, spinMs, fn, group = 1): times in ms of fn(i) for i < n: per call, or
// (CUDA, group > 1) one value per run of `group` back-to-back calls, its time / group.
Napi::Value TimeCalls(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guard(env, [&]() -> Napi::Value {
    const Backend backend = static_cast<Backend>(int_arg(info, 0, "backend"));
    const int n = static_cast<int>(int_arg(info, 1, "n"));
    TRIMKV_CHECK(n >= 1 && n <= 1000000, code::kRange, "n must be in [1, 1e6]");
    TRIMKV_CHECK(info.Length() > 3 && info[2].IsNumber() && info[3].IsFunction(),
                 code::kInvalidArgument, "timeCalls(backend, n, spinMs, fn)");
    const double spin_ms = info[2].As<Napi::Number>().DoubleValue();
    Napi::Function fn = info[3].As<Napi::Function>();
    const int group = info.Length() > 4 && !info[4].IsUndefined()
                          ? static_cast<int>(int_arg(info, 4, "group"))
                          : 1;
    TRIMKV_CHECK(group >= 1 && n % group == 0, code::kRange, "n (", n,
                 ") must be a multiple of group (", group, ")");
    auto call = [&](int i) {
      fn.Call({Napi::Number::New(env, i)});
      if (env.IsExceptionPending()) throw env.GetAndClearPendingException();
    };
    std::vector<double> ms;
    if (backend == Backend::kCuda) {
      ms = cuda_time_calls(n, spin_ms, call, group);
    } else {
      ms.resize(n / group);
      for (int r = 0; r < n / group; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < group; ++i) call(r * group + i);
        ms[r] = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
                    .count() /
                group;
      }
    }
    Napi::Float64Array out = Napi::Float64Array::New(env, ms.size());
    std::copy(ms.begin(), ms.end(), out.Data());
    return out;
  });
}

// hostTimes(backend, n, group, fn): host wall time of each call fn(i), microseconds. On CUDA the
// device is drained (untimed) after every `group` calls, so the launch queue never fills and
// blocks the host: what is measured is the enqueue cost alone.
Napi::Value HostTimes(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guard(env, [&]() -> Napi::Value {
    const Backend backend = static_cast<Backend>(int_arg(info, 0, "backend"));
    const int n = static_cast<int>(int_arg(info, 1, "n"));
    const int group = static_cast<int>(int_arg(info, 2, "group"));
    TRIMKV_CHECK(n >= 1 && n <= 1000000 && group >= 1, code::kRange,
                 "n must be in [1, 1e6] and group >= 1");
    TRIMKV_CHECK(info.Length() > 3 && info[3].IsFunction(), code::kInvalidArgument,
                 "hostTimes(backend, n, group, fn)");
    Napi::Function fn = info[3].As<Napi::Function>();
    Napi::Float64Array out = Napi::Float64Array::New(env, n);
    for (int i = 0; i < n; ++i) {
      if (backend == Backend::kCuda && i % group == 0) device_synchronize();
      const auto t0 = std::chrono::steady_clock::now();
      fn.Call({Napi::Number::New(env, i)});
      const auto t1 = std::chrono::steady_clock::now();
      if (env.IsExceptionPending()) throw env.GetAndClearPendingException();
      out[i] = std::chrono::duration<double, std::micro>(t1 - t0).count();
    }
    if (backend == Backend::kCuda) device_synchronize();
    return out;
  });
}

// launchCost(iters): {kernelUs, clusterUs, streamKernelUs, eventUs, uploadUs}, the CUDA runtime's
// own host cost per enqueue on this machine (bench/timing.h launch_cost_t); clusterUs is NaN before
// sm_90.
Napi::Value LaunchCost(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guard(env, [&]() -> Napi::Value {
    const int iters = static_cast<int>(int_arg(info, 0, "iters"));
    TRIMKV_CHECK(iters >= 1 && iters <= 1000000, code::kRange, "iters must be in [1, 1e6]");
    const launch_cost_t c = cuda_launch_cost(iters);
    Napi::Object o = Napi::Object::New(env);
    o.Set("kernelUs", c.kernel_us);
    o.Set("clusterUs", c.cluster_us);
    o.Set("streamKernelUs", c.stream_kernel_us);
    o.Set("eventUs", c.event_us);
    o.Set("uploadUs", c.upload_us);
    return o;
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
    TRIMKV_CHECK(
        backend == Backend::kCuda, code::kUnsupported,
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
  exports.Set("hostTimes", Napi::Function::New(env, HostTimes, "hostTimes"));
  exports.Set("launchCost", Napi::Function::New(env, LaunchCost, "launchCost"));
  exports.Set("selectBench", Napi::Function::New(env, SelectBench, "selectBench"));
  exports.Set("deviceMemoryUsed", Napi::Function::New(env, DeviceMemoryUsed, "deviceMemoryUsed"));
}

}  // namespace trimkv::napi
