// Benchmark timing of the CUDA build (bench/timing.h): CUDA events around queued calls behind a
// spin kernel, the runtime's own enqueue costs, and the device-to-device copy ceiling. Kept out
// of the device services (cuda/device_cuda.cu), which the library needs in every call.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <memory>

#include "bench/timing.h"
#include "common/cuda_check.h"
#include "common/errors.h"
#include "runtime/device.h"

namespace trimkv {

namespace {

// Keeps the GPU busy for `ns` nanoseconds (globaltimer) so queued work starts back to back.
__global__ void SpinKernel(unsigned long long ns) {
  unsigned long long start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < ns);
}

void check(cudaError_t e, const char* what) { cuda_check(e, what); }

struct Events {
  std::vector<cudaEvent_t> ev;
  explicit Events(size_t n) : ev(n, nullptr) {
    for (auto& e : ev) check(cudaEventCreate(&e), "cudaEventCreate");
  }
  ~Events() {
    for (auto e : ev)
      if (e) cudaEventDestroy(e);
  }
};

/// Frees a CUDA handle through `Free` when it goes out of scope, on every exit path.
template <auto Free>
struct cuda_deleter_t {
  template <typename P>
  void operator()(P* p) const noexcept {
    Free(p);
  }
};
using stream_ptr = std::unique_ptr<CUstream_st, cuda_deleter_t<cudaStreamDestroy>>;
using device_ptr = std::unique_ptr<void, cuda_deleter_t<cudaFree>>;
using pinned_ptr = std::unique_ptr<void, cuda_deleter_t<cudaFreeHost>>;

}  // namespace

std::vector<double> cuda_time_calls(int n, double spin_ms, const std::function<void(int)>& fn,
                                    int group) {
  if (!cuda_status().available) fail(code::kBackendUnavailable, cuda_status().reason);
  if (group < 1 || n % group != 0)
    fail(code::kRange, "timed calls (", n, ") must be a multiple of the group (", group, ")");
  const int runs = n / group;
  Events events(static_cast<size_t>(runs) + 1);
  SpinKernel<<<1, 1>>>(static_cast<unsigned long long>(spin_ms * 1e6));
  check(cudaGetLastError(), "spin kernel launch");
  check(cudaEventRecord(events.ev[0], nullptr), "cudaEventRecord");
  for (int i = 0; i < n; ++i) {
    fn(i);
    if ((i + 1) % group == 0)
      check(cudaEventRecord(events.ev[(i + 1) / group], nullptr), "cudaEventRecord");
  }
  check(cudaEventSynchronize(events.ev[runs]), "cudaEventSynchronize");
  std::vector<double> ms(runs);
  for (int i = 0; i < runs; ++i) {
    float t = 0.f;
    check(cudaEventElapsedTime(&t, events.ev[i], events.ev[i + 1]), "cudaEventElapsedTime");
    ms[i] = static_cast<double>(t) / group;
  }
  return ms;
}

namespace {

/// About the size of the decode kernel's parameters, so the probe pays the same copy.
struct probe_params_t {
  unsigned long long words[28];
};

__global__ void EmptyKernel(probe_params_t p) {
  if (p.words[0] == 1 && threadIdx.x == 0) p.words[1] = 2;  // never true: keeps p alive
}

double median_of(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

/// Host microseconds of `op` (median), `iters` calls in rounds of 32 with the device drained in
/// between (untimed), so the launch queue never fills and blocks the host.
template <typename Op>
double host_us(int iters, Op&& op) {
  std::vector<double> us;
  us.reserve(iters);
  for (int done = 0; done < iters; done += 32) {
    check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    for (int i = 0; i < 32 && done + i < iters; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      op();
      us.push_back(
          std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
    }
  }
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  return median_of(us);
}

}  // namespace

launch_cost_t cuda_launch_cost(int iters) {
  if (!cuda_status().available) fail(code::kBackendUnavailable, cuda_status().reason);
  launch_cost_t r;
  probe_params_t params = {};
  r.kernel_us = host_us(iters, [&] {
    EmptyKernel<<<1, 128>>>(params);
    check(cudaGetLastError(), "empty kernel launch");
  });
  int dev = 0, major = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev),
        "cudaDeviceGetAttribute");
  if (major >= 9) {
    r.cluster_us = host_us(iters, [&] {
      cudaLaunchConfig_t cfg = {};
      cfg.gridDim = dim3(2, 1, 1);
      cfg.blockDim = dim3(128);
      cudaLaunchAttribute attr[1];
      attr[0].id = cudaLaunchAttributeClusterDimension;
      attr[0].val.clusterDim.x = 2;
      attr[0].val.clusterDim.y = 1;
      attr[0].val.clusterDim.z = 1;
      cfg.attrs = attr;
      cfg.numAttrs = 1;
      check(cudaLaunchKernelEx(&cfg, EmptyKernel, params), "cluster launch");
    });
  }
  {
    cudaStream_t s = nullptr;
    check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
    const stream_ptr stream(s);  // scoped: the probes below run with no extra stream alive
    r.stream_kernel_us = host_us(iters, [&] {
      EmptyKernel<<<1, 128, 0, stream.get()>>>(params);
      check(cudaGetLastError(), "empty kernel launch");
    });
  }
  Events ev(1);
  r.event_us =
      host_us(iters, [&] { check(cudaEventRecord(ev.ev[0], nullptr), "cudaEventRecord"); });
  void* h = nullptr;
  check(cudaMallocHost(&h, 512), "cudaMallocHost");
  const pinned_ptr host(h);
  void* d = nullptr;
  check(cudaMalloc(&d, 512), "cudaMalloc");
  const device_ptr dev_buf(d);
  r.upload_us = host_us(iters, [&] {
    check(cudaMemcpyAsync(dev_buf.get(), host.get(), 512, cudaMemcpyHostToDevice, nullptr),
          "cudaMemcpyAsync");
  });
  return r;
}

double cuda_copy_bandwidth(size_t bytes, int iters) {
  void* a = device_alloc(bytes);
  void* b = nullptr;
  try {
    b = device_alloc(bytes);
  } catch (...) {
    device_free(a);
    throw;
  }
  std::vector<double> ms;
  try {
    check(cudaMemset(a, 1, bytes), "cudaMemset");
    check(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice), "warm-up copy");
    ms = cuda_time_calls(iters, 2.0, [&](int i) {
      check(cudaMemcpyAsync(i % 2 ? a : b, i % 2 ? b : a, bytes, cudaMemcpyDeviceToDevice, nullptr),
            "copy");
    });
  } catch (...) {
    device_free(a);
    device_free(b);
    throw;
  }
  device_free(a);
  device_free(b);
  std::sort(ms.begin(), ms.end());
  const double med = ms[ms.size() / 2];
  return 2.0 * static_cast<double>(bytes) / (med * 1e-3) / 1e9;
}

}  // namespace trimkv
