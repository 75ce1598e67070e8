// CUDA build: device queries and memory through the statically linked CUDA runtime. With no
// driver (or an old one, or no device) the runtime returns an error, reported as the reason.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <sstream>

#include "common/errors.h"
#include "ops/device.h"

#ifndef TRIMKV_CUDA_ARCHS
#define TRIMKV_CUDA_ARCHS ""
#endif

namespace trimkv {

namespace {

std::string cuda_error_text(cudaError_t e) {
  std::ostringstream os;
  os << cudaGetErrorName(e) << ": " << cudaGetErrorString(e);
  return os.str();
}

// Compute capabilities (major*10+minor) this binary has SASS for, and the newest PTX.
bool binary_runs_on(int cc, const std::string& archs) {
  std::istringstream is(archs);
  std::string tok;
  int best_ptx = 0;
  while (is >> tok) {
    bool ptx = tok.rfind("compute_", 0) == 0;
    int v = std::atoi(tok.c_str() + (ptx ? 8 : 3));
    if (!ptx && v == cc) return true;
    // SASS of the same major version and lower minor runs too (e.g. sm_80 on sm_86).
    if (!ptx && v / 10 == cc / 10 && v <= cc) return true;
    if (ptx) best_ptx = std::max(best_ptx, v);
  }
  return best_ptx > 0 && best_ptx <= cc;
}

}  // namespace

const cuda_status_t& cuda_status() {
  static const cuda_status_t status = [] {
    cuda_status_t s;
    s.compiled = true;
    s.archs = TRIMKV_CUDA_ARCHS;
    cudaRuntimeGetVersion(&s.runtime_version);
    cudaError_t e = cudaDriverGetVersion(&s.driver_version);
    if (e != cudaSuccess || s.driver_version == 0) {
      s.reason = "no NVIDIA driver found (" + cuda_error_text(e == cudaSuccess ? cudaErrorNoDevice : e) + ")";
      cudaGetLastError();
      return s;
    }
    if (s.driver_version < s.runtime_version) {
      std::ostringstream os;
      os << "the NVIDIA driver supports CUDA " << s.driver_version / 1000 << "." << (s.driver_version % 1000) / 10
         << " but this binary needs CUDA " << s.runtime_version / 1000 << "." << (s.runtime_version % 1000) / 10
         << "; update the driver";
      s.reason = os.str();
      return s;
    }
    int n = 0;
    e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
      s.reason = "no CUDA device (" + cuda_error_text(e == cudaSuccess ? cudaErrorNoDevice : e) + ")";
      cudaGetLastError();
      return s;
    }
    for (int i = 0; i < n; ++i) {
      cudaDeviceProp p{};
      if (cudaGetDeviceProperties(&p, i) != cudaSuccess) continue;
      device_info_t d;
      d.index = i;
      d.name = p.name;
      d.major = p.major;
      d.minor = p.minor;
      d.total_memory = p.totalGlobalMem;
      d.multiprocessors = p.multiProcessorCount;
      s.devices.push_back(d);
    }
    if (s.devices.empty()) {
      s.reason = "CUDA devices could not be queried";
      return s;
    }
    const device_info_t& d0 = s.devices[0];
    if (!binary_runs_on(d0.major * 10 + d0.minor, s.archs)) {
      std::ostringstream os;
      os << "GPU " << d0.name << " (sm_" << d0.major << d0.minor << ") is not among the architectures compiled in ("
         << s.archs << "); rebuild with TRIMKV_CUDA_ARCHS=" << d0.major << d0.minor;
      s.reason = os.str();
      return s;
    }
    s.available = true;
    return s;
  }();
  return status;
}

void* device_alloc(size_t bytes) {
  if (!cuda_status().available) fail(code::kBackendUnavailable, cuda_status().reason);
  void* p = nullptr;
  cudaError_t e = cudaMalloc(&p, bytes == 0 ? 1 : bytes);
  if (e == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    fail(code::kOutOfMemory, "out of GPU memory allocating ", bytes, " bytes");
  }
  if (e != cudaSuccess) fail(code::kNative, "cudaMalloc failed: ", cuda_error_text(e));
  return p;
}

void device_free(void* p) noexcept {
  if (p) cudaFree(p);
}

void copy_to_device(void* dst, const void* src, size_t bytes) {
  cudaError_t e = cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice);
  if (e != cudaSuccess) fail(code::kNative, "copy to device failed: ", cuda_error_text(e));
}

void copy_to_host(void* dst, const void* src, size_t bytes) {
  cudaError_t e = cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost);
  if (e != cudaSuccess) fail(code::kNative, "copy to host failed: ", cuda_error_text(e));
}

void device_synchronize() {
  cudaError_t e = cudaDeviceSynchronize();
  if (e != cudaSuccess) fail(code::kNative, "CUDA synchronize failed: ", cuda_error_text(e));
}

namespace {

// Keeps the GPU busy for `ns` nanoseconds (globaltimer) so queued work starts back to back.
__global__ void SpinKernel(unsigned long long ns) {
  unsigned long long start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < ns);
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    cudaGetLastError();
    fail(code::kNative, what, " failed: ", cuda_error_text(e));
  }
}

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

std::vector<double> cuda_time_calls(int n, double spin_ms, const std::function<void(int)>& fn, int group) {
  if (!cuda_status().available) fail(code::kBackendUnavailable, cuda_status().reason);
  if (group < 1 || n % group != 0) fail(code::kRange, "timed calls (", n, ") must be a multiple of the group (", group, ")");
  const int runs = n / group;
  Events events(static_cast<size_t>(runs) + 1);
  SpinKernel<<<1, 1>>>(static_cast<unsigned long long>(spin_ms * 1e6));
  check(cudaGetLastError(), "spin kernel launch");
  check(cudaEventRecord(events.ev[0], nullptr), "cudaEventRecord");
  for (int i = 0; i < n; ++i) {
    fn(i);
    if ((i + 1) % group == 0) check(cudaEventRecord(events.ev[(i + 1) / group], nullptr), "cudaEventRecord");
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
      us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
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
  check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "cudaDeviceGetAttribute");
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
  r.event_us = host_us(iters, [&] { check(cudaEventRecord(ev.ev[0], nullptr), "cudaEventRecord"); });
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
      check(cudaMemcpyAsync(i % 2 ? a : b, i % 2 ? b : a, bytes, cudaMemcpyDeviceToDevice, nullptr), "copy");
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
