// The native support query: what a backend can run, answered from common/limits.h, so that lib/
// asks the addon (lib/native.ts cacheSupport / gateSupport) instead of mirroring the kernels'
// limits. Shape-only: no device is needed, and the CPU-only build answers for CUDA too.
#pragma once

#include <string>

#include "common/config.h"
#include "common/enums.h"

namespace trimkv {

/// ok, or why not (a sentence for ERR_UNSUPPORTED).
struct support_t {
  bool ok = true;
  std::string reason;
};

/// Whether `backend` runs a cache of this (valid) configuration on a GPU with tensor cores
/// (sm_80+; the CUDA cache re-checks the group on the device it is created on).
support_t cache_support(Backend backend, const cache_config_t& c);

/// Whether `backend` runs a gate of input width input_size.
support_t gate_support(Backend backend, double input_size);

}  // namespace trimkv
