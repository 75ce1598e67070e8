// Run-time values that shape the code (dtype, head dim, group size) turned into template
// arguments, each by one switch whose default names the unsupported value.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/dtype.h"
#include "common/limits.h"

/// Maps DType to the device element type inside a dispatch body.
#define TRIMKV_DISPATCH_DTYPE(dtype, T, ...)                  \
  [&]() -> cudaError_t {                                      \
    switch (dtype) {                                          \
      case ::trimkv::DType::kF32: {                           \
        using T = float;                                      \
        return __VA_ARGS__();                                 \
      }                                                       \
      case ::trimkv::DType::kF16: {                           \
        using T = __half;                                     \
        return __VA_ARGS__();                                 \
      }                                                       \
      case ::trimkv::DType::kBF16: {                          \
        using T = __nv_bfloat16;                              \
        return __VA_ARGS__();                                 \
      }                                                       \
      default:                                                \
        return cudaErrorInvalidValue; /* Unsupported dtype */ \
    }                                                         \
  }()

/// Maps a head dim to the padded tile width DPAD of the kernel that serves it (64, 128 or 256,
/// zero-padded columns; limits::padded_head_dim) inside a dispatch body. An unsupported head dim
/// (limits::head_dim_supported) returns cudaErrorInvalidValue: kernels cannot throw, so the op
/// that called the launcher names the value (the CUDA ops check it first).
#define TRIMKV_DISPATCH_PADDED_HEAD_DIM(head_dim, DPAD, ...)   \
  [&]() -> cudaError_t {                                       \
    if (!::trimkv::limits::head_dim_supported(head_dim))       \
      return cudaErrorInvalidValue; /* Unsupported head_dim */ \
    if ((head_dim) <= 64) {                                    \
      constexpr int DPAD = 64;                                 \
      return __VA_ARGS__();                                    \
    }                                                          \
    if ((head_dim) <= 128) {                                   \
      constexpr int DPAD = 128;                                \
      return __VA_ARGS__();                                    \
    }                                                          \
    constexpr int DPAD = 256;                                  \
    return __VA_ARGS__();                                      \
  }()
