// CPU-only build: the CUDA backend reports itself unavailable with the reason.
#include "common/errors.h"
#include "runtime/device.h"

namespace trimkv {

const cuda_status_t& cuda_status() {
  static const cuda_status_t status = [] {
    cuda_status_t s;
    s.reason = "this build of trimkv has no CUDA support (built without nvcc)";
    return s;
  }();
  return status;
}

void* device_alloc(size_t) { fail(code::kBackendUnavailable, cuda_status().reason); }
void device_free(void*) noexcept {}
void copy_to_device(void*, const void*, size_t) {
  fail(code::kBackendUnavailable, cuda_status().reason);
}
void copy_to_host(void*, const void*, size_t) {
  fail(code::kBackendUnavailable, cuda_status().reason);
}
void device_synchronize() {}

}  // namespace trimkv
