// CPU-only build: the native benchmark timing (bench/timing.h, bench/select_bench.h) reports
// that it needs the CUDA backend.
#include "bench/select_bench.h"
#include "bench/timing.h"
#include "common/errors.h"
#include "runtime/device.h"

namespace trimkv {

std::vector<double> cuda_time_calls(int, double, const std::function<void(int)>&, int) {
  fail(code::kBackendUnavailable, cuda_status().reason);
}

launch_cost_t cuda_launch_cost(int) { fail(code::kBackendUnavailable, cuda_status().reason); }

double cuda_copy_bandwidth(size_t, int) { fail(code::kBackendUnavailable, cuda_status().reason); }

// Benchmark-only entry points (bench/select_bench.h): unsupported rather than unavailable,
// since no driver or device would make them run in this build.
select_bench_result_t cuda_select_bench(const select_bench_params_t&) {
  fail(code::kUnsupported, "selectBench needs the CUDA kernels: ", cuda_status().reason);
}

size_t cuda_memory_used() {
  fail(code::kUnsupported, "deviceMemoryUsed needs the CUDA backend: ", cuda_status().reason);
}

}  // namespace trimkv
