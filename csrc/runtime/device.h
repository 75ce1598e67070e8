// Backend memory and device queries (no timing: bench/timing.h). Two implementations:
// cuda/device_cuda.cu (CUDA builds) and cuda_none/device_none.cc (CPU-only builds), so nothing
// outside them includes CUDA headers.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "common/enums.h"

namespace trimkv {

struct device_info_t {
  int index = 0;
  std::string name;
  int major = 0, minor = 0;
  size_t total_memory = 0;
  int multiprocessors = 0;
};

/// What the CUDA backend can do on this machine. Computed once; never throws.
struct cuda_status_t {
  bool compiled = false;   // the addon was built with CUDA
  bool available = false;  // a usable device and driver were found
  std::string reason;      // why not, when !available
  std::vector<device_info_t> devices;
  std::string archs;        // architectures compiled into the binary, e.g. "sm_75 sm_90"
  int runtime_version = 0;  // CUDA runtime linked in (e.g. 13000)
  int driver_version = 0;   // 0 when no driver
};

const cuda_status_t& cuda_status();

/// Device memory: throw trimkv::Error (ERR_OUT_OF_MEMORY / ERR_NATIVE), never abort.
void* device_alloc(size_t bytes);
void device_free(void* p) noexcept;
void copy_to_device(void* dst, const void* src, size_t bytes);
void copy_to_host(void* dst, const void* src, size_t bytes);
void device_synchronize();

/// Physical memory of this machine in bytes (0 if unknown). Host allocations larger than this
/// fail with ERR_OUT_OF_MEMORY up front, whatever the kernel's overcommit policy would allow.
size_t host_memory_bytes();
/// Throws ERR_OUT_OF_MEMORY when `bytes` of host memory can never be had here.
void check_host_allocation(size_t bytes, const char* what);

}  // namespace trimkv
