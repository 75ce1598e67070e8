// The one conversion of a failed CUDA runtime call into a trimkv::Error (common/errors.h), for
// the CUDA backend's host code (cuda/, bench/). Kernels never throw: their launchers return the
// cudaError_t and the caller of the launcher converts it here, naming what failed.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "common/errors.h"

namespace trimkv {

/// "cudaErrorName: description" of e.
inline std::string cuda_error_text(cudaError_t e) {
  return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
}

/// Throws for e != cudaSuccess: ERR_OUT_OF_MEMORY "<what>: out of GPU memory" for an allocation
/// failure, else ERR_NATIVE "<what> failed: <cuda_error_text>". The runtime's last error is
/// cleared first, so that a later call is not blamed for a non-sticky error of this one.
inline void cuda_check(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return;
  (void)cudaGetLastError();
  if (e == cudaErrorMemoryAllocation) fail(code::kOutOfMemory, what, ": out of GPU memory");
  fail(code::kNative, what, " failed: ", cuda_error_text(e));
}

}  // namespace trimkv
