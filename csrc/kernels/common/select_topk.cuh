// Block-wide top-K selection by 64-bit ordered keys, shared by the decode and prefill
// evictions: a radix select over the key bits (8 bits a pass from the top, no sort) finds the
// K-th largest key; survivors are then the keys >= that threshold, compacted in order with a
// block-wide scan.
//
// Keys: the high 32 bits are the score mapped to an order-preserving unsigned (NaN -> 0, the
// lowest), the low 32 bits the position, so that among equal scores the larger position wins
// (SPEC.md section 4, csrc/common/score.h ranks_above). Positions of one head are distinct, so
// keys are distinct and exactly K keys are >= the threshold.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace trimkv {
namespace topk {

/// Order-preserving image of a float: a > b (as floats) <=> image(a) > image(b). NaN maps to 0,
/// below -inf (0x007fffff), so NaN scores rank lowest; -0 is folded onto +0 so that the two
/// zeros compare equal, as they do in ranks_above.
__host__ __device__ __forceinline__ uint32_t ordered_float_bits(float f) {
#ifdef __CUDA_ARCH__
  uint32_t u = __float_as_uint(f);
#else
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
#endif
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0u;  // NaN: lowest
  if (u == 0x80000000u) u = 0u;                    // -0 == +0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/// Keep-key of a token with score `score` at position `pos` (>= 0): larger keeps.
__host__ __device__ __forceinline__ unsigned long long keep_key(float score, int32_t pos) {
  return (static_cast<unsigned long long>(ordered_float_bits(score)) << 32) |
         static_cast<uint32_t>(pos);
}

/// Shared scratch of block_select_kth_largest.
struct select_smem_t {
  unsigned int hist[256];
  unsigned long long thr;
  int digit, kr, cnt;
};

/// Radix-select step, run by the 32 lanes of warp 0: given a 256-bin histogram of the current
/// 8-bit digit, finds the bucket holding the kr-th largest remaining key (digits are scanned in
/// descending order; lane l owns digits 255-8l .. 255-8l-7). The lane that finds it writes the
/// digit, the rank left inside that bucket and the bucket's count.
template <typename Count>
__device__ __forceinline__ void warp_find_kth_bucket(const Count* hist, int kr, int lane,
                                                     int* digit, int* kr_in_bucket, int* count) {
  int c[8], sum = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    c[i] = static_cast<int>(hist[255 - (lane * 8 + i)]);
    sum += c[i];
  }
  int incl = sum;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int t = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += t;
  }
  int run = incl - sum;
  if (run < kr && kr <= incl) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (run + c[i] >= kr) {
        *digit = 255 - (lane * 8 + i);
        *kr_in_bucket = kr - run;
        *count = c[i];
        break;
      }
      run += c[i];
    }
  }
}

namespace {

/// Block-wide K-th largest of the n keys key_at(0 .. n-1), 1 <= k <= n. Every thread of the
/// block must call it with the same arguments; every thread gets the result. With distinct
/// keys exactly k keys are >= the result; with duplicates, at least k.
/// Cost: at most 8 passes over the keys, usually 3-5 (a pass ends the search early once the
/// remaining prefix bucket is exactly the rest of the K). key_at is called once per key per
/// pass, so pass a functor that reads a precomputed array when keys are expensive.
template <typename KeyFn>
__device__ unsigned long long block_select_kth_largest(KeyFn key_at, int n, int k,
                                                       select_smem_t& sm) {
  const int tid = threadIdx.x, nthr = blockDim.x, lane = tid & 31;
  unsigned long long prefix = 0, mask = 0;
  int kr = k;
  for (int shift = 56; shift >= 0; shift -= 8) {
    __syncthreads();  // sm may still be read from the previous pass or by the caller
    for (int i = tid; i < 256; i += nthr) sm.hist[i] = 0;
    __syncthreads();
    // Uniform trip count so that every lane is present for the warp-aggregated atomics: keys
    // of one pass share few digits (scores of similar size), and per-lane atomics on one bin
    // would serialise.
    for (int s0 = 0; s0 < n; s0 += nthr) {
      const int s = s0 + tid;
      unsigned long long key = 0;
      bool in = false;
      if (s < n) {
        key = key_at(s);
        in = (key & mask) == prefix;
      }
      const int digit = in ? static_cast<int>((key >> shift) & 255) : -1;
      const unsigned peers = __match_any_sync(0xffffffffu, digit);
      if (in && lane == __ffs(peers) - 1) atomicAdd(&sm.hist[digit], __popc(peers));
    }
    __syncthreads();
    if (tid < 32) warp_find_kth_bucket(sm.hist, kr, tid, &sm.digit, &sm.kr, &sm.cnt);
    __syncthreads();
    const int digit = sm.digit, cnt = sm.cnt;
    kr = sm.kr;
    prefix |= static_cast<unsigned long long>(digit) << shift;
    mask |= 0xffull << shift;
    if (cnt == kr || shift == 0) {
      if (shift == 0) return prefix;  // the exact key (only reached with duplicates or k = n)
      // Every key of this bucket is kept: the threshold is the smallest of them.
      __syncthreads();
      if (tid == 0) sm.thr = ~0ull;
      __syncthreads();
      unsigned long long mn = ~0ull;
      for (int s = tid; s < n; s += nthr) {
        const unsigned long long key = key_at(s);
        if ((key & mask) == prefix && key < mn) mn = key;
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const unsigned long long t = __shfl_xor_sync(0xffffffffu, mn, o);
        mn = t < mn ? t : mn;
      }
      if (lane == 0) atomicMin(&sm.thr, mn);
      __syncthreads();
      return sm.thr;
    }
  }
  return prefix;  // not reached
}

/// The block-wide half of the exclusive scans below, once each warp has scanned its own
/// values: the lane with `publish` set (one per warp) stores its warp's total in warp_sums;
/// returns the sum of the totals of the warps before this thread's, *total the block's.
__device__ __forceinline__ int block_warp_offset(int warp_total, bool publish, int* warp_sums,
                                                 int* total) {
  const int tid = threadIdx.x, warp = tid >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  __syncthreads();  // warp_sums may still be read from the previous call
  if (publish) warp_sums[warp] = warp_total;
  __syncthreads();
  int before = 0, all = 0;
  for (int w = 0; w < nwarps; ++w) {
    const int c = warp_sums[w];
    before += w < warp ? c : 0;
    all += c;
  }
  *total = all;
  return before;
}

/// Block-wide exclusive prefix sum of one int per thread, in thread order. Returns this
/// thread's offset; *total receives the block's sum. warp_sums: 32 ints of shared memory.
/// Every thread of the block must call it; it synchronises the block. Block size a multiple of 32.
__device__ __forceinline__ int block_exclusive_sum(int v, int* warp_sums, int* total) {
  const int lane = threadIdx.x & 31;
  int x = v;  // inclusive sum within the warp: lane 31 holds the warp's total
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int t = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += t;
  }
  return block_warp_offset(x, lane == 31, warp_sums, total) + x - v;
}

/// block_exclusive_sum of one flag per thread (1 if set), with the warp's scan done by a single
/// ballot instead of five shuffles: the compactions call it once per block-wide pass.
__device__ __forceinline__ int block_exclusive_count(bool flag, int* warp_sums, int* total) {
  const int tid = threadIdx.x, lane = tid & 31;
  const unsigned b = __ballot_sync(0xffffffffu, flag);
  const int in_warp = __popc(b & ((1u << lane) - 1u));
  return block_warp_offset(__popc(b), lane == 0, warp_sums, total) + in_warp;
}

/// Keep flags of the top k of n keys, compacted in index order: writes the indices i with
/// key_at(i) >= the k-th largest key to kept[0 ..) and returns their count (k with distinct
/// keys; all n when k >= n). smem: select_smem_t and 32 ints. Block size a multiple of 32.
template <typename KeyFn>
__device__ int block_topk_compact(KeyFn key_at, int n, int k, int* kept, select_smem_t& sm,
                                  int* warp_sums) {
  const unsigned long long thr = k >= n ? 0ull : block_select_kth_largest(key_at, n, k, sm);
  int count = 0;
  for (int s0 = 0; s0 < n; s0 += blockDim.x) {
    const int s = s0 + threadIdx.x;
    const bool keep = s < n && key_at(s) >= thr;
    int total;
    const int off = block_exclusive_count(keep, warp_sums, &total);
    if (keep) kept[count + off] = s;
    count += total;
  }
  return count;
}

}  // namespace
}  // namespace topk
}  // namespace trimkv
