// Programmatic dependent launch (sm_90+). A kernel launched with
// cudaLaunchAttributeProgrammaticStreamSerialization may start while the kernel before it in
// the stream is still running, as soon as every block of that kernel has called
// pdl_launch_dependents() (or exited). Its blocks then get resident and set up early, which
// hides the launch gap between back-to-back kernels.
//
// The contract for such a kernel: before pdl_wait() it touches no global memory that an
// earlier kernel may write (only immutable data such as weights uploaded at creation); after
// pdl_wait() every earlier kernel of the stream has completed and its writes are visible.
// Without the attribute, or compiled for an older architecture, both calls are no-ops and
// ordinary stream order applies; launch with the attribute only where the loaded image was
// compiled for sm_90+ (cudaFuncAttributes::ptxVersion >= 90), or the wait is missing.
#pragma once

namespace trimkv {

/// Blocks until every earlier kernel of the stream has completed, its memory visible.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

/// Lets the next kernel of the stream (if launched as a programmatic dependent) start.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

}  // namespace trimkv
