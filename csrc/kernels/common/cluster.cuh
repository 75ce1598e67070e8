// Thread-block cluster primitives (sm_90+): the split barrier and the distributed shared memory
// stores with which the blocks of a cluster push partials into one block (the decode split
// merge). Defined only when compiled for sm_90+; callers guard their use the same way.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace trimkv {
namespace cluster {
namespace {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
/// Arrives at the cluster barrier without ordering memory (phase 0: every block started).
__device__ __forceinline__ void arrive_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
}
/// Arrives at the cluster barrier, releasing this block's shared-memory writes.
__device__ __forceinline__ void arrive_release() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
}
/// Waits at the cluster barrier, acquiring the other blocks' released writes.
__device__ __forceinline__ void wait_acquire() {
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
/// Address of the same shared-memory offset in the block of cluster rank `rank`.
__device__ __forceinline__ uint32_t map_shared(uint32_t addr, uint32_t rank) {
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(addr), "r"(rank));
  return r;
}
/// 16-byte store into another block's shared memory (address from map_shared).
__device__ __forceinline__ void st_f4(uint32_t addr, float a, float b, float c, float d) {
  asm volatile("st.shared::cluster.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "f"(a), "f"(b),
               "f"(c), "f"(d)
               : "memory");
}
/// As st_f4, two 64-bit values.
__device__ __forceinline__ void st_u64x2(uint32_t addr, unsigned long long a,
                                         unsigned long long b) {
  asm volatile("st.shared::cluster.v2.u64 [%0], {%1, %2};\n" ::"r"(addr), "l"(a), "l"(b)
               : "memory");
}
#endif  // __CUDA_ARCH__ >= 900

}  // namespace
}  // namespace cluster
}  // namespace trimkv
