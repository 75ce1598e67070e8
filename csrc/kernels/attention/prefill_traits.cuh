// Compile-time shapes of the prefill kernels (prefill.cuh) and the device helpers the attention
// kernels share: the packed query-row layout, the tile of a block, named barriers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>

#include "common/limits.h"
#include "kernels/attention/prefill.cuh"
#include "kernels/common/cp_async.cuh"
#include "kernels/common/dispatch.cuh"
#include "kernels/common/mma.cuh"
#include "kernels/common/vec_dtypes.cuh"

namespace trimkv {

namespace prefill_detail {

constexpr int kMaxHeadDim = limits::kMaxHeadDim;
// Tensor-core kernel: NG key groups of 4 warps (kMmaGroupThreads); each warp owns 16 MT query
// rows, each group walks every NG-th key tile of BK keys (mma_config).
constexpr int kMmaGroupThreads = 128;
// SIMT kernel: 32 query rows x 4 lanes each, key tiles of 32.
constexpr int kSimtThreads = 128;
constexpr int kSimtBQ = 32;
constexpr int kSimtBK = 32;
// Eviction kernels.
constexpr int kSelectThreads = 1024;
constexpr int kWriteThreads = 256;
constexpr int kWriteRows = 16;  ///< survivors per write block

template <int DPAD, int MT, int BK, int NG>
constexpr int mma_smem_bytes() {
  // Q tile (64 MT rows), shared by the key groups; per group two stages of one K and one V
  // tile. Rows padded by 16 B: no ldmatrix conflicts.
  return (64 * MT + NG * 2 * 2 * BK) * (DPAD + 8) * 2;
}

/// Blocks per SM the tensor-core kernel is register-budgeted for: two blocks of one key group
/// (8 warps, up to 255 registers each), one block of two.
template <int NG>
constexpr int mma_min_blocks() {
  return NG == 1 ? 2 : 1;
}

/// Tensor-core tile shape per head dim: MT 16-row blocks per warp (64 MT query rows per
/// block), BK keys per tile where two blocks of one key group fit an SM (Hopper: 227 KB), and
/// BK_SMALL where they don't (Ampere, Ada: 100-164 KB).
template <int DPAD>
struct mma_config {
  static constexpr int MT = DPAD <= 128 ? 2 : 1;
  static constexpr int BK = DPAD <= 64 ? 128 : (DPAD <= 128 ? 64 : 32);
  static constexpr int BK_SMALL = DPAD <= 64 ? 64 : 32;
};

/// Launches of at most this many packed query rows per SM get two key groups per block (1
/// block and 8 warps per SM, each group half the key tiles) instead of two blocks of one:
/// with few query tiles the longest block, not the sum of the work, sets the time (causal
/// tiles differ by up to chunk / BK key tiles), and two groups halve it. H100, bf16 D 128,
/// Hkv 8, G 4, two (staggered) groups over one: 1.10-1.29x at 128 tiles of 128 rows, 1.03-1.15x
/// at 512 (4 per SM), 0.95-0.97x at 2048.
constexpr long long kMmaSplitRowsPerSm = 512;

template <int DPAD>
constexpr int simt_smem_bytes() {
  return 2 * kSimtBK * DPAD * 4;
}

/// Carves the workspace (layout of prefill_ws_t; sizes as PrefillWorkspaceBytes).
prefill_ws_t carve_workspace(const prefill_params_t& p, void* workspace, size_t* bytes);

/// Chunk-key lognorms (knorm) and attention of one chunk for storage type T (defined below,
/// instantiated once per dtype in prefill_{f32,f16,bf16}.cu so that the three build in
/// parallel).
/// \param lognorm per chunk [kv_heads, chunk] at row first * kv_heads of the workspace (knorm).
template <typename T>
cudaError_t prefill_attention_typed(const prefill_params_t& p, float* lognorm, cudaStream_t stream);

extern template cudaError_t prefill_attention_typed<float>(const prefill_params_t&, float*,
                                                           cudaStream_t);
extern template cudaError_t prefill_attention_typed<__half>(const prefill_params_t&, float*,
                                                            cudaStream_t);
extern template cudaError_t prefill_attention_typed<__nv_bfloat16>(const prefill_params_t&, float*,
                                                                   cudaStream_t);

}  // namespace prefill_detail

namespace {

/// Row r of the packed query space of KV head h: rows are (token i, group member g) pairs,
/// r = i * G + g, so one tile carries all G query heads of its tokens and K/V tiles are read
/// once per group. Returns the element offset of that row in q / out [chunk, q_heads, D].
__device__ __forceinline__ size_t prefill_row_offset(int r, int G, int kv_heads, int h, int D) {
  const int i = r / G, g = r - (r / G) * G;
  return (static_cast<size_t>(i) * kv_heads + h) * G * D + static_cast<size_t>(g) * D;
}

/// Shape of one query tile: rows [row0, row0 + rows) of chunk * G packed rows, which see the
/// logical keys [0, n_end): keys 0..len-1 are the cached slots, key len + j is chunk token j.
/// Row r (token i) sees keys < len + i + 1; every row sees keys < n_full (no mask needed).
struct prefill_tile_t {
  int len, row0, rows, n_end, n_full;
};

/// Tile blockIdx.x of a chunk of `chunk` tokens; rows <= 0 when the chunk has fewer tiles than
/// the grid (varlen launches size the grid for the longest chunk): the block has no work.
__device__ __forceinline__ prefill_tile_t prefill_tile(int chunk, int G, int bq, int len) {
  prefill_tile_t t;
  t.len = len;
  const int nrows = chunk * G;
  const int ntiles = (nrows + bq - 1) / bq;
  // Causal tiles differ in work: the last rows see the most keys. Start those first so that
  // the short tiles fill the tail of the grid.
  if (static_cast<int>(blockIdx.x) >= ntiles) {
    t.row0 = t.rows = t.n_end = t.n_full = 0;
    return t;
  }
  t.row0 = (ntiles - 1 - static_cast<int>(blockIdx.x)) * bq;
  t.rows = min(bq, nrows - t.row0);
  t.n_end = len + (t.row0 + t.rows - 1) / G + 1;
  t.n_full = len + t.row0 / G + 1;
  return t;
}

/// Global address of 16-byte column c of logical key n of head h, whose cache segment starts at
/// slot base (a cache slot, or a chunk token when n >= len).
template <typename T>
__device__ __forceinline__ const T* prefill_key_row(const T* cache, const T* in,
                                                    const prefill_params_t& p, size_t base, int h,
                                                    int len, int n, int col) {
  return n < len ? cache + (base + n) * p.head_dim + col
                 : in + (static_cast<size_t>(n - len) * p.kv_heads + h) * p.head_dim + col;
}

using mma::mma_16816;
using mma::pack2;

constexpr float kLog2e = 1.4426950408889634f;

/// 2^x on the special-function unit with denormal results flushed to zero; exp2(-inf) = +0,
/// which masked logits and an empty softmax state rely on.
__device__ __forceinline__ float prefill_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

/// Named barrier ID over THREADS threads (immediate ids: a register id makes the compiler
/// reserve all 16 barriers).
template <int ID, int THREADS>
__device__ __forceinline__ void prefill_bar_sync() {
  asm volatile("bar.sync %0, %1;\n" ::"n"(ID), "n"(THREADS) : "memory");
}

/// Barrier of the 4 warps of key group `group` alone, so that the groups of one block never
/// wait for each other inside the loop: __syncthreads with one group, else named barrier
/// 1 + group.
template <int NG>
__device__ __forceinline__ void prefill_group_sync(int group) {
  static_assert(NG == 1 || NG == 2, "key groups");
  if (NG == 1) {
    __syncthreads();
  } else if (group == 0) {
    prefill_bar_sync<1, prefill_detail::kMmaGroupThreads>();
  } else {
    prefill_bar_sync<2, prefill_detail::kMmaGroupThreads>();
  }
}

}  // namespace

}  // namespace trimkv
