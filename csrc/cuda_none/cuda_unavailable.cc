// The CUDA ops when their kernels are not part of this build: they report why they cannot run.
#include "common/errors.h"
#include "ops/cache.h"
#include "ops/gate.h"
#include "runtime/device.h"

namespace trimkv {

namespace {
[[noreturn]] void unavailable(const char* what) {
  const cuda_status_t& s = cuda_status();
  fail(code::kBackendUnavailable, "the CUDA ", what,
       " is not available: ", s.available ? "this build has no CUDA kernels for it" : s.reason);
}
}  // namespace

std::unique_ptr<Cache> create_cuda_cache(const cache_config_t&) { unavailable("KV cache"); }

std::unique_ptr<Gate> create_cuda_gate(const gate_spec_t&, const gate_weights_t&) {
  unavailable("retention gate");
}

}  // namespace trimkv
