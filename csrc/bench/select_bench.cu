// The eviction's top-k selection on its own, for `trimkv bench` (select_bench.h): random keys
// filled on the GPU, then one launch in which every block selects the k-th largest key of its
// row with the radix select that the decode and prefill evictions use (select_topk.cuh).
#include <cuda_runtime.h>

#include <algorithm>
#include <memory>
#include <string>

#include "bench/select_bench.h"
#include "bench/timing.h"
#include "common/cuda_check.h"
#include "common/errors.h"
#include "kernels/common/select_topk.cuh"
#include "runtime/device.h"

namespace trimkv {

namespace {

constexpr int kFillThreads = 256;

/// 32 well-mixed bits of (seed, i) (splitmix64's finaliser): no state, any launch shape.
__device__ __forceinline__ uint32_t hash32(unsigned long long seed, unsigned long long i) {
  unsigned long long z = seed + (i + 1) * 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return static_cast<uint32_t>((z ^ (z >> 31)) >> 32);
}

/// Fills keys [rows, n]. The low 32 bits are the index in the row, as positions are in the
/// real keys, so keys of a row are distinct and exactly k of them are >= the k-th largest.
__global__ void FillSelectKeysKernel(unsigned long long* keys, int rows, int n, select_keys_t kind,
                                     unsigned long long seed) {
  const size_t total = static_cast<size_t>(rows) * n;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const int s = static_cast<int>(i % n);
    const uint32_t r = hash32(seed, i);
    if (kind == select_keys_t::kScores) {
      // lam in [-0.05, 0) (24 random bits); age T + 1 - p with T = n tokens seen, so 1 .. n + 1.
      const float lam = -0.05f * (static_cast<float>((r >> 8) + 1u) * (1.f / 16777216.f));
      keys[i] = topk::keep_key(lam * static_cast<float>(n + 1 - s), s);
    } else {
      keys[i] = (static_cast<unsigned long long>(r) << 32) | static_cast<uint32_t>(s);
    }
  }
}

/// One selection per block: the k-th largest key of row blockIdx.x, then keep flags.
/// \param keys [rows, n] distinct keys (read once per radix pass: L2-resident after the first)
/// \param keep [rows, n] written: 1 for the keys >= the k-th largest, else 0
/// \param kth  [rows] written: the k-th largest key of each row
/// grid (rows), block (threads, a multiple of 32)
__global__ void __launch_bounds__(1024)
    SelectKthLargestKernel(const unsigned long long* __restrict__ keys, int n, int k,
                           unsigned char* __restrict__ keep, unsigned long long* __restrict__ kth) {
  __shared__ topk::select_smem_t sm;
  const size_t base = static_cast<size_t>(blockIdx.x) * n;
  const unsigned long long* row = keys + base;
  // k == n keeps everything; block_select_kth_largest would still find the smallest key.
  const unsigned long long thr =
      k >= n ? 0ull : topk::block_select_kth_largest([row](int s) { return row[s]; }, n, k, sm);
  for (int s = threadIdx.x; s < n; s += blockDim.x) keep[base + s] = row[s] >= thr ? 1 : 0;
  if (threadIdx.x == 0) kth[blockIdx.x] = thr;
}

/// Launcher of FillSelectKeysKernel.
cudaError_t FillSelectKeys(unsigned long long* keys, int rows, int n, select_keys_t kind,
                           unsigned long long seed, cudaStream_t stream) {
  const size_t total = static_cast<size_t>(rows) * n;
  const int blocks =
      static_cast<int>(std::min<size_t>((total + kFillThreads - 1) / kFillThreads, 65535));
  FillSelectKeysKernel<<<blocks, kFillThreads, 0, stream>>>(keys, rows, n, kind, seed);
  return cudaGetLastError();
}

/// Launcher of SelectKthLargestKernel.
cudaError_t SelectKthLargest(const unsigned long long* keys, int rows, int n, int k, int threads,
                             unsigned char* keep, unsigned long long* kth, cudaStream_t stream) {
  if (rows < 1 || n < 1 || k < 1 || k > n || threads < 32 || threads > 1024 || threads % 32 != 0)
    return cudaErrorInvalidValue;
  SelectKthLargestKernel<<<rows, threads, 0, stream>>>(keys, n, k, keep, kth);
  return cudaGetLastError();
}

/// Turns a CUDA error into a trimkv::Error naming the entry point (op) and the step.
void check(cudaError_t e, const char* op, const char* what) {
  cuda_check(e, (std::string(op) + ": " + what).c_str());
}

struct device_free_t {
  void operator()(void* p) const noexcept { device_free(p); }
};
using device_ptr = std::unique_ptr<void, device_free_t>;

}  // namespace

select_bench_result_t cuda_select_bench(const select_bench_params_t& p) {
  TRIMKV_CHECK(p.rows >= 1 && p.rows <= (1 << 20), code::kRange,
               "selectBench: rows must be in [1, 2^20], got ", p.rows);
  TRIMKV_CHECK(p.n >= 1 && p.n <= (1 << 24), code::kRange,
               "selectBench: n must be in [1, 2^24], got ", p.n);
  TRIMKV_CHECK(p.k >= 1 && p.k <= p.n, code::kRange, "selectBench: k must be in [1, n = ", p.n,
               "], got ", p.k);
  TRIMKV_CHECK(p.threads >= 32 && p.threads <= 1024 && p.threads % 32 == 0, code::kRange,
               "selectBench: threads must be a multiple of 32 in [32, 1024], got ", p.threads);
  TRIMKV_CHECK(p.iters >= 1 && p.iters <= 100000 && p.warmup >= 0 && p.warmup <= 1000, code::kRange,
               "selectBench: iters must be in [1, 1e5] and warmup in [0, 1000]");
  const size_t count = static_cast<size_t>(p.rows) * p.n;
  TRIMKV_CHECK(count <= (size_t{1} << 31), code::kRange,
               "selectBench: rows x n must be at most 2^31");
  device_ptr keys(device_alloc(count * sizeof(unsigned long long)));
  device_ptr keep(device_alloc(count));
  device_ptr kth(device_alloc(static_cast<size_t>(p.rows) * sizeof(unsigned long long)));
  auto* k64 = static_cast<unsigned long long*>(keys.get());
  auto* kp = static_cast<unsigned char*>(keep.get());
  auto* th = static_cast<unsigned long long*>(kth.get());
  auto launch = [&] {
    check(SelectKthLargest(k64, p.rows, p.n, p.k, p.threads, kp, th, nullptr), "selectBench",
          "selection kernel");
  };

  check(FillSelectKeys(k64, p.rows, p.n, p.keys, p.seed, nullptr), "selectBench",
        "key fill kernel");
  for (int i = 0; i < p.warmup; ++i) launch();
  check(cudaDeviceSynchronize(), "selectBench", "warm-up");
  select_bench_result_t r;
  // The spin covers the host enqueueing every launch (a few us each), so the events time the
  // kernels back to back.
  r.ms = cuda_time_calls(p.iters, 2.0 + 0.02 * p.iters, [&](int) { launch(); });

  std::vector<unsigned char> flags(count);
  copy_to_host(flags.data(), kp, count);
  r.kept_min = p.n;
  r.kept_max = 0;
  for (int row = 0; row < p.rows; ++row) {
    int kept = 0;
    for (int s = 0; s < p.n; ++s) kept += flags[static_cast<size_t>(row) * p.n + s];
    r.kept_min = std::min(r.kept_min, kept);
    r.kept_max = std::max(r.kept_max, kept);
  }
  TRIMKV_CHECK(r.kept_min == p.k && r.kept_max == p.k, code::kNative, "selectBench: rows kept ",
               r.kept_min, " to ", r.kept_max, " keys, expected exactly k = ", p.k,
               " (distinct keys)");
  return r;
}

size_t cuda_memory_used() {
  if (!cuda_status().available) fail(code::kBackendUnavailable, cuda_status().reason);
  size_t free_bytes = 0, total_bytes = 0;
  check(cudaMemGetInfo(&free_bytes, &total_bytes), "deviceMemoryUsed", "cudaMemGetInfo");
  return total_bytes - free_bytes;
}

}  // namespace trimkv
