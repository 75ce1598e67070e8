// Benchmark-only entry points of the CUDA build (select_bench.cu): the top-k selection of the
// evictions timed on its own, and the device memory in use. Plain C++ with no CUDA headers, so
// that the binding (napi/bench.cc) can include it in every build; the CPU-only build's
// definitions are in cuda_none/bench_none.cc and throw ERR_UNSUPPORTED.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace trimkv {

/// How the benchmark's keys are drawn.
enum class select_keys_t : int {
  /// High 32 bits uniform random, low 32 bits the candidate's index (keys are distinct).
  kRandom = 0,
  /// keep_key(lam * (T + 1 - p), p) with lam uniform in [-0.05, 0), p the index and T = n:
  /// the decayed scores of SPEC.md section 4, whose top bits agree (more radix passes).
  kScores = 1,
};

struct select_bench_params_t {
  int rows = 0;        ///< independent selections, one block each (batch x KV heads)
  int n = 0;           ///< candidates per row (M + B for decode, M + C for a prefill chunk)
  int k = 0;           ///< survivors per row, 1 <= k <= n (M)
  int threads = 1024;  ///< block size, a multiple of 32 up to 1024
  int iters = 100;     ///< timed launches
  int warmup = 5;      ///< untimed launches before them
  select_keys_t keys = select_keys_t::kRandom;
  uint64_t seed = 1;
};

struct select_bench_result_t {
  std::vector<double> ms;  ///< device time of each timed launch (CUDA events)
  int kept_min = 0;        ///< fewest / most keys marked kept in one row (k with distinct keys)
  int kept_max = 0;
};

/// Fills rows x n keys on the GPU, then times `iters` launches of a kernel in which block r
/// finds the k-th largest key of row r with topk::block_select_kth_largest and marks the keys
/// >= it as kept. Checks afterwards that every row kept exactly k.
/// \throws Error ERR_RANGE (bad sizes), ERR_BACKEND_UNAVAILABLE, ERR_OUT_OF_MEMORY, ERR_NATIVE
///         (a CUDA error, or a row that kept other than k keys); ERR_UNSUPPORTED in CPU builds
select_bench_result_t cuda_select_bench(const select_bench_params_t& p);

/// Device memory in use on the current device, bytes (total - free, cudaMemGetInfo): every
/// process's allocations, in the driver's page granularity.
/// \throws Error ERR_BACKEND_UNAVAILABLE, ERR_NATIVE; ERR_UNSUPPORTED in CPU builds
size_t cuda_memory_used();

}  // namespace trimkv
