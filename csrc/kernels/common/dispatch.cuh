// Run-time values that shape the code (dtype, head dim, group size) turned into template
// arguments, each by one switch whose default names the unsupported value.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/dtype.h"

/// Maps DType to the device element type inside a dispatch body.
#define TRIMKV_DISPATCH_DTYPE(dtype, T, ...)                      \
  [&]() -> cudaError_t {                                         \
    switch (dtype) {                                             \
      case ::trimkv::DType::kF32: {                              \
        using T = float;                                         \
        return __VA_ARGS__();                                    \
      }                                                          \
      case ::trimkv::DType::kF16: {                              \
        using T = __half;                                        \
        return __VA_ARGS__();                                    \
      }                                                          \
      case ::trimkv::DType::kBF16: {                             \
        using T = __nv_bfloat16;                                 \
        return __VA_ARGS__();                                    \
      }                                                          \
      default:                                                   \
        return cudaErrorInvalidValue; /* Unsupported dtype */    \
    }                                                            \
  }()
