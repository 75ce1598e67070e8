// Native timing for the benchmark suite (lib/bench, bench/): device time from CUDA events inside
// the addon, never JS wall-clock time around asynchronous launches. Plain C++ with no CUDA
// headers, so that the binding (napi/bench.cc) includes it in every build: the CUDA build
// defines it in bench/timing_cuda.cu, the CPU-only build in cuda_none/bench_none.cc (throwing
// ERR_BACKEND_UNAVAILABLE).
#pragma once

#include <cstddef>
#include <functional>
#include <limits>
#include <vector>

namespace trimkv {

/// GPU time of `n` calls of `fn` (ms), from CUDA events recorded on the default stream after
/// every `group` calls: one value per group, its elapsed time / group (group 1: per call; a
/// larger group times back-to-back runs without events between the calls). A spin kernel of
/// `spin_ms` runs first so that the host can enqueue all the calls before the GPU reaches
/// them: the times are device time, not launch gaps. n must be a multiple of group.
std::vector<double> cuda_time_calls(int n, double spin_ms, const std::function<void(int)>& fn,
                                    int group = 1);

/// Host cost of the CUDA runtime's own enqueue operations on this machine, microseconds
/// (medians): the floor under any call that launches work. cluster_us is NaN before sm_90.
struct launch_cost_t {
  double kernel_us = 0;  ///< kernel<<<>>> with ~220 bytes of parameters
  double cluster_us =
      std::numeric_limits<double>::quiet_NaN();  ///< cudaLaunchKernelEx, cluster of 2
  double stream_kernel_us = 0;  ///< the same launch on a created non-blocking stream
  double event_us = 0;          ///< cudaEventRecord
  double upload_us = 0;         ///< cudaMemcpyAsync of 512 bytes from page-locked memory
};
launch_cost_t cuda_launch_cost(int iters);

/// Device-to-device copy bandwidth (GB/s, bytes read plus bytes written), median of `iters`.
double cuda_copy_bandwidth(size_t bytes, int iters);

}  // namespace trimkv
