// Asynchronous global -> shared copies (cp.async, sm_80+; plain loads and stores before) and
// their group commits and waits, shared by every pipelined kernel.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/common/mma.cuh"

namespace trimkv {
namespace {

/// Asynchronous 16-byte global -> shared copy; when !pred the 16 bytes are zero-filled and
/// nothing is read (src must still be a valid address). cp.async exists from sm_80 on; on
/// Turing (sm_75) the copy is a plain load and store, and commit / wait are no-ops: callers
/// already put a __syncthreads() between the wait and the first read of the tile.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
#else
  *reinterpret_cast<uint4*>(smem) =
      pred ? *reinterpret_cast<const uint4*>(gmem) : make_uint4(0, 0, 0, 0);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

/// 4-byte asynchronous global -> shared copy, zero-filled when !pred (src must stay valid).
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool pred) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(mma::smem_u32(smem)),
               "l"(gmem), "r"(pred ? 4 : 0));
#else
  *static_cast<uint32_t*>(smem) = pred ? *static_cast<const uint32_t*>(gmem) : 0u;
#endif
}

/// cp.async.wait_group with a run-time count (0 .. 7): the immediate operand takes a switch.
__device__ __forceinline__ void cp_async_wait_dyn(int n) {
  switch (n) {
    case 0:
      cp_async_wait<0>();
      break;
    case 1:
      cp_async_wait<1>();
      break;
    case 2:
      cp_async_wait<2>();
      break;
    case 3:
      cp_async_wait<3>();
      break;
    case 4:
      cp_async_wait<4>();
      break;
    case 5:
      cp_async_wait<5>();
      break;
    case 6:
      cp_async_wait<6>();
      break;
    default:
      cp_async_wait<7>();
      break;
  }
}

}  // namespace
}  // namespace trimkv
