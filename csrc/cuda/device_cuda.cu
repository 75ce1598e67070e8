// CUDA build: device queries and memory through the statically linked CUDA runtime. With no
// driver (or an old one, or no device) the runtime returns an error, reported as the reason.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <sstream>

#include "common/cuda_check.h"
#include "common/errors.h"
#include "runtime/device.h"

#ifndef TRIMKV_CUDA_ARCHS
#define TRIMKV_CUDA_ARCHS ""
#endif

namespace trimkv {

namespace {

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
      s.reason = "no NVIDIA driver found (" +
                 cuda_error_text(e == cudaSuccess ? cudaErrorNoDevice : e) + ")";
      cudaGetLastError();
      return s;
    }
    if (s.driver_version < s.runtime_version) {
      std::ostringstream os;
      os << "the NVIDIA driver supports CUDA " << s.driver_version / 1000 << "."
         << (s.driver_version % 1000) / 10 << " but this binary needs CUDA "
         << s.runtime_version / 1000 << "." << (s.runtime_version % 1000) / 10
         << "; update the driver";
      s.reason = os.str();
      return s;
    }
    int n = 0;
    e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
      s.reason =
          "no CUDA device (" + cuda_error_text(e == cudaSuccess ? cudaErrorNoDevice : e) + ")";
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
      os << "GPU " << d0.name << " (sm_" << d0.major << d0.minor
         << ") is not among the architectures compiled in (" << s.archs
         << "); rebuild with TRIMKV_CUDA_ARCHS=" << d0.major << d0.minor;
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

}  // namespace trimkv
