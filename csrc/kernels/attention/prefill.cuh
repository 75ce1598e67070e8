// TRIM-KV prefill of one chunk of one sequence, one layer (SPEC.md sections 4-6), or of the
// chunks of several sequences in one launch (varlen: grid.z runs over the chunks, packed one
// after the other in the inputs): causal GQA attention of the chunk's queries over the head's
// cached tokens plus the chunk's own tokens, then the retention eviction over cached + chunk
// tokens, writing only the survivors of the chunk into the cache, so that a head never needs
// more than cap slots whatever the chunk length. In the pooled layout the chunk is appended
// whole and PoolEvict (pool.cuh) evicts afterwards.
//
// Launch sequence (one stream, no host synchronisation):
//   1. PrefillLognormKernel   (knorm only) ln ||k|| of each chunk key      -> workspace
//   2. PrefillAttnMmaKernel   (fp16/bf16, sm_80+; tensor cores)  or
//      PrefillAttnSimtKernel  (fp32, and fp16/bf16 before sm_80)          -> out
//   3. PrefillSelectKernel    per KV head: top-M of cached + chunk keys, slot plan, metadata,
//                             lens
//   4. PrefillWriteKernel     copies the chunk survivors' K/V rows into their slots (and cached
//                             survivors moved down when the head shrinks, B > 0)
// Attention reads the cache before 3-4 modify it (stream order).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "common/dtype.h"
#include "common/score.h"
#include "kernels/cache/cache_layer.cuh"
#include "kernels/common/mma.cuh"
#include "kernels/common/vec_dtypes.cuh"

namespace trimkv {

/// Parameters of one prefill chunk of sequence `seq` over one layer (cache_layer.cuh: the slot
/// arrays, layout and rules). Device pointers. Pooled layout: the chunk is appended whole (its
/// heads need `chunk` free slots, see pool.cuh) and PoolEvict evicts afterwards.
/// One sequence's chunk in a varlen launch: its tokens are rows [first, first + chunk) of the
/// packed inputs.
struct prefill_seg_t {
  int seq;    ///< sequence (batch row)
  int start;  ///< position of the chunk's first token
  int chunk;  ///< tokens (>= 1)
  int first;  ///< first row in q / k / v / lam / out
};

struct prefill_params_t : cache_layer_t {
  int seq = 0;                     ///< sequence (batch row) of this chunk (segs == nullptr)
  int start = 0;                   ///< position of the chunk's first token (segs == nullptr)
  int chunk = 0;                   ///< tokens in the chunk (>= 1; 0 is a no-op) (segs == nullptr)
  const prefill_seg_t* segs = nullptr;  ///< varlen: [nseg] device array of distinct sequences
  int nseg = 1;                    ///< chunks in the launch (segs != nullptr)
  int max_chunk = 0;               ///< largest chunk of segs (segs != nullptr)
  int tokens = 0;                  ///< rows of the packed inputs, sum of chunks (segs != nullptr)
  const void* q = nullptr;         ///< [tokens, q_heads, head_dim] dtype
  const void* k = nullptr;         ///< [tokens, kv_heads, head_dim] dtype
  const void* v = nullptr;         ///< [tokens, kv_heads, head_dim] dtype
  const float* lam = nullptr;      ///< [tokens, kv_heads]
  void* out = nullptr;             ///< [tokens, q_heads, head_dim] dtype

  __host__ __device__ int segments() const { return segs ? nseg : 1; }
  __host__ __device__ int longest() const { return segs ? max_chunk : chunk; }
  __host__ __device__ int rows() const { return segs ? tokens : chunk; }
  /// Chunk z of the launch (blockIdx.z of every prefill kernel).
  __device__ __forceinline__ prefill_seg_t segment(int z) const {
    return segs ? segs[z] : prefill_seg_t{seq, start, chunk, 0};
  }
};

/// Workspace pointers carved out of the caller's workspace buffer.
struct prefill_ws_t {
  unsigned long long* keys = nullptr;  ///< [kv_heads, cap + chunk] keep-keys, cached then chunk
  int* holes = nullptr;                ///< [kv_heads, cap] evicted cached slots, ascending
  int* move_src = nullptr;             ///< [kv_heads, cap] chunk index (>= 0) or -1 - slot
  int* move_dst = nullptr;             ///< [kv_heads, cap] destination slot
  int* move_count = nullptr;           ///< [kv_heads]
  float* lognorm = nullptr;            ///< [kv_heads, chunk] (knorm only)
};

/// Bytes of workspace PrefillChunk needs for these params (host only, no sync).
size_t PrefillWorkspaceBytes(const prefill_params_t& p);

/// One prefill chunk, or one per sequence of p.segs (attention, then eviction and the
/// survivors' append) for one layer.
/// \param p          see prefill_params_t; caches and lens of the chunks' sequences are updated
/// \param dtype      storage dtype of q, k, v, the K/V caches and out
/// \param workspace  at least PrefillWorkspaceBytes(p) bytes of device memory, 256-byte aligned
/// \return cudaSuccess, cudaErrorInvalidValue for unsupported shapes, or the launch error
cudaError_t PrefillChunk(const prefill_params_t& p, DType dtype, void* workspace,
                         cudaStream_t stream);

namespace prefill_detail {

constexpr int kMaxHeadDim = 256;
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

/// Picks the padded tile width for a head dim: 64, 128 or 256 (zero-padded columns).
#define TRIMKV_PREFILL_DISPATCH_HEAD_DIM(head_dim, DPAD, ...)       \
  [&]() -> cudaError_t {                                            \
    if ((head_dim) <= 0 || (head_dim) % 8 != 0 || (head_dim) > 256) \
      return cudaErrorInvalidValue; /* Unsupported head_dim */      \
    if ((head_dim) <= 64) {                                         \
      constexpr int DPAD = 64;                                      \
      return __VA_ARGS__();                                         \
    }                                                               \
    if ((head_dim) <= 128) {                                        \
      constexpr int DPAD = 128;                                     \
      return __VA_ARGS__();                                         \
    }                                                               \
    constexpr int DPAD = 256;                                       \
    return __VA_ARGS__();                                           \
  }()

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

/// Carves the workspace (layout of prefill_ws_t; sizes as PrefillWorkspaceBytes).
prefill_ws_t carve_workspace(const prefill_params_t& p, void* workspace, size_t* bytes);

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

/// Causal GQA attention of one chunk on tensor cores (FlashAttention-2 style: each warp owns
/// MT blocks of 16 packed query rows, online softmax in registers, P reused from the S
/// accumulators as the A operand of P V; each K/V fragment read from shared memory feeds MT
/// MMAs). K and V tiles are double-buffered: tile j + NG streams in (cp.async) during all of
/// tile j's work, one barrier per tile.
/// NG key groups of 4 warps share the query tile: group g takes key tiles g, g + NG, ...; at
/// the end group 0 merges the others' softmax states through shared memory and writes out.
/// More groups give small grids more warps per SM without a workspace.
/// grid (ceil(longest chunk * G / (64 MT)), kv_heads, segments), block 128 NG, dynamic smem
/// mma_smem_bytes<DPAD, MT, BK, NG>().
/// \param p  q [tokens, q_heads, D], k/v [tokens, kv_heads, D], caches [slots, D] (head
///           segments at p.head_base), lens [batch, kv_heads]; writes out [tokens, q_heads, D],
///           every row of every chunk once. D <= DPAD, zero-padded.
template <typename T, int DPAD, int MT, int BK, int NG, bool PP, bool QREG>
__global__ void __launch_bounds__(prefill_detail::kMmaGroupThreads * NG,
                                  prefill_detail::mma_min_blocks<NG>())
    PrefillAttnMmaKernel(const prefill_params_t p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace prefill_detail;
  constexpr int GT = kMmaGroupThreads, NTHR = GT * NG;
  constexpr int WR = 16 * MT;  // packed rows per warp
  constexpr int BQ = 4 * WR, LD = DPAD + 8, NCOL = DPAD / 8;
  constexpr int NT = BK / 8;                     // n8 tiles of S per key tile
  constexpr int ND = DPAD / 8;                   // n8 tiles of O
  constexpr int KD = DPAD / 16;                  // k16 steps over the head dim
  constexpr int STAGE = 2 * BK * LD;             // elements of one K + V stage
  static_assert(BK % 16 == 0 && (BK * NCOL) % GT == 0, "key tile shape");
  static_assert(!QREG || MT == 1, "Q fragments in registers: one row block a warp");
  static_assert(!PP || NG == 2, "staggered start: two key groups");
  // The merge parks a group's O, m and l (MT * LD / 2 floats a thread) in its own K/V stages.
  static_assert(NG == 1 || 64 * (MT * LD / 2) <= 2 * STAGE, "merge buffer");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);

  const int h = blockIdx.y;
  const int G = p.q_heads / p.kv_heads;
  const int D = p.head_dim;
  const prefill_seg_t sg = p.segment(blockIdx.z);
  const int bh = sg.seq * p.kv_heads + h;
  const size_t base = p.head_base(bh);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int grp = NG == 1 ? 0 : warp >> 2;  // key group (warp-uniform)
  const int wq = warp & 3;                  // rows wq * WR .. of the tile
  const int gtid = tid & (GT - 1);
  T* sKV = sQ + BQ * LD + grp * 2 * STAGE;  // this group's stages: K at 0, V at BK * LD
  const prefill_tile_t tile = prefill_tile(sg.chunk, G, BQ, p.lens[bh]);
  if (tile.rows <= 0) return;
  const int len = tile.len;
  const size_t qrow0 = static_cast<size_t>(sg.first) * p.q_heads * D;   // this chunk in q / out
  const size_t krow0 = static_cast<size_t>(sg.first) * p.kv_heads * D;  // and in k / v
  const T* qg = static_cast<const T*>(p.q) + qrow0;
  const T* kc = static_cast<const T*>(p.k_cache) + base * D;
  const T* vc = static_cast<const T*>(p.v_cache) + base * D;
  const T* kin = static_cast<const T*>(p.k) + krow0 + static_cast<size_t>(h) * D;
  const T* vin = static_cast<const T*>(p.v) + krow0 + static_cast<size_t>(h) * D;
  const size_t in_stride = static_cast<size_t>(p.kv_heads) * D;

  // Q tile; rows past the chunk and columns past D are zero-filled.
  for (int e = tid; e < BQ * NCOL; e += NTHR) {
    const int r = e / NCOL, c = e - (e / NCOL) * NCOL;
    const bool ok = r < tile.rows && c * 8 < D;
    const T* src = ok ? qg + prefill_row_offset(tile.row0 + r, G, p.kv_heads, h, D) + c * 8 : qg;
    cp_async16(sQ + r * LD + c * 8, src, ok);
  }
  // K and V rows of key tile n0 into a stage, by this group's threads. Keys past n_end are
  // zero-filled (and masked): P = 0 never meets garbage V. Logical key n < len is cache slot n,
  // else chunk token n - len.
  auto load_kv = [&](T* dst, int n0) {
    const int c = gtid % NCOL;
    // Partly unrolled: a full unroll keeps every row's addresses live through the tile's
    // work and spills at BK 64.
#pragma unroll 4
    for (int i = 0; i < BK * NCOL / GT; ++i) {
      const int r = gtid / NCOL + i * (GT / NCOL);
      const int n = n0 + r;
      const bool ok = n < tile.n_end && c * 8 < D;
      const bool cached = n < len;
      const size_t off = (cached ? static_cast<size_t>(n) * D
                                 : static_cast<size_t>(n - len) * in_stride) + c * 8;
      cp_async16(dst + r * LD + c * 8, ok ? (cached ? kc : kin) + off : kin, ok);
      cp_async16(dst + BK * LD + r * LD + c * 8, ok ? (cached ? vc : vin) + off : vin, ok);
    }
  };
  const int ntiles = (tile.n_end + BK - 1) / BK;
  if (grp < ntiles) load_kv(sKV, grp * BK);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();  // Q and every group's first tile landed

  // Fragment coordinates: in row block mt this thread holds tile rows
  // wq * WR + mt * 16 + lane / 4 (index 0) and that + 8 (index 1).
  const int tq = lane & 3;
  const float sl2 = p.scale * kLog2e;
  uint32_t qf[QREG ? KD : 1][4];
  if (QREG) {
#pragma unroll
    for (int kk = 0; kk < (QREG ? KD : 0); ++kk)
      mma::ldsm_x4(qf[kk], mma::smem_u32(sQ + (wq * WR + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8));
  }
  float o[MT][ND][4];
  float m[MT][2], l[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int d = 0; d < ND; ++d) o[mt][d][0] = o[mt][d][1] = o[mt][d][2] = o[mt][d][3] = 0.f;
    m[mt][0] = m[mt][1] = -INFINITY;
    l[mt][0] = l[mt][1] = 0.f;
  }

  // Staggered start (PP): group 1 waits until group 0 is through Q K^T of its first tile.
  // Started together, the two groups of a block run in step (same code, same latencies): their
  // softmax phases coincide and leave the tensor cores idle. Offset by part of a tile, one
  // group's softmax overlaps the other's MMAs, as between two blocks of one group. Group 0
  // always has tile 0, so its half of named barrier 3 (both groups) always comes.
  if (PP && grp == 1) prefill_bar_sync<3, 2 * kMmaGroupThreads>();
  int stage = 0;
  for (int j = grp; j < ntiles; j += NG) {
    const int n0 = j * BK;
    const T* sK = sKV + stage * STAGE;
    const T* sV = sK + BK * LD;
    // Tile j + NG into the other stage: every warp of the group finished reading it (the
    // barrier closing the previous iteration).
    if (j + NG < ntiles) load_kv(sKV + (stage ^ 1) * STAGE, n0 + NG * BK);
    cp_async_commit();

    float s[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int t = 0; t < NT; ++t) s[mt][t][0] = s[mt][t][1] = s[mt][t][2] = s[mt][t][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        if (QREG) {
          a[mt][0] = qf[QREG ? kk : 0][0];
          a[mt][1] = qf[QREG ? kk : 0][1];
          a[mt][2] = qf[QREG ? kk : 0][2];
          a[mt][3] = qf[QREG ? kk : 0][3];
        } else {
          mma::ldsm_x4(a[mt], mma::smem_u32(sQ + (wq * WR + mt * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8));
        }
      }
#pragma unroll
      for (int nn = 0; nn < NT / 2; ++nn) {
        uint32_t b[4];
        mma::ldsm_x4(b, mma::smem_u32(sK + (nn * 16 + (lane & 7) + (lane >> 4) * 8) * LD + kk * 16 +
                       ((lane >> 3) & 1) * 8));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16816<T>(s[mt][2 * nn], a[mt], b[0], b[1]);
          mma_16816<T>(s[mt][2 * nn + 1], a[mt], b[2], b[3]);
        }
      }
    }

    // bar.sync rather than bar.arrive: group 1 already waits there, so group 0 passes at once,
    // and compute-sanitizer's racecheck models the ordering of a full barrier.
    if (PP && j == 0) prefill_bar_sync<3, 2 * kMmaGroupThreads>();
    // Causal mask (and keys past n_end), only on tiles that reach past n_full: row r (token
    // i) sees keys < len + i + 1.
    if (n0 + BK > tile.n_full) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int r = wq * WR + mt * 16 + (lane >> 2) + hf * 8;
          const int lim = len + (tile.row0 + min(r, tile.rows - 1)) / G + 1 - n0 - 2 * tq;
#pragma unroll
          for (int t = 0; t < NT; ++t) {
            if (t * 8 >= lim) s[mt][t][2 * hf] = -INFINITY;
            if (t * 8 + 1 >= lim) s[mt][t][2 * hf + 1] = -INFINITY;
          }
        }
    }
    // Online softmax in the exp2 domain (scale folded into one FMA). Key 0 is visible to
    // every row, so group 0's state is non-empty after its first tile; another group's may
    // stay empty (every key of its tiles masked): the guard keeps exp2(-inf - -inf) = NaN out.
    bool rescale = false;
    float alpha[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float mx = -INFINITY;
#pragma unroll
        for (int t = 0; t < NT; ++t) mx = fmaxf(mx, fmaxf(s[mt][t][2 * hf], s[mt][t][2 * hf + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float mnew = fmaxf(m[mt][hf], mx * sl2);
        const float ref = mnew == -INFINITY ? 0.f : mnew;
        alpha[mt][hf] = prefill_exp2(m[mt][hf] - ref);
        rescale |= alpha[mt][hf] != 1.f;
        m[mt][hf] = mnew;
        float sum = 0.f;
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          s[mt][t][2 * hf] = prefill_exp2(fmaf(s[mt][t][2 * hf], sl2, -ref));
          s[mt][t][2 * hf + 1] = prefill_exp2(fmaf(s[mt][t][2 * hf + 1], sl2, -ref));
          sum += s[mt][t][2 * hf] + s[mt][t][2 * hf + 1];
        }
        l[mt][hf] = l[mt][hf] * alpha[mt][hf] + sum;  // per-thread partial; quads reduce at the end
      }
    // Once the row maxima settle (most tiles) alpha is 1 everywhere: skip the O rescale.
    if (__any_sync(0xffffffffu, rescale)) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int d = 0; d < ND; ++d) {
          o[mt][d][0] *= alpha[mt][0];
          o[mt][d][1] *= alpha[mt][0];
          o[mt][d][2] *= alpha[mt][1];
          o[mt][d][3] *= alpha[mt][1];
        }
    }
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        a[mt][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        a[mt][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        a[mt][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        a[mt][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dd = 0; dd < ND / 2; ++dd) {
        uint32_t b[4];
        mma::ldsm_x4_trans(b, mma::smem_u32(sV + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + dd * 16 +
                             (lane >> 4) * 8));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16816<T>(o[mt][2 * dd], a[mt], b[0], b[1]);
          mma_16816<T>(o[mt][2 * dd + 1], a[mt], b[2], b[3]);
        }
      }
    }
    cp_async_wait<0>();
    prefill_group_sync<NG>(grp);  // tile j + NG landed; every warp of the group is done with tile j
    stage ^= 1;
  }

  if constexpr (NG > 1) {
    // Groups 1.. park (O, m, l) in their own stages, laid out [warp][value][lane] so that the
    // thread of group 0 with the same rows reads them back conflict-free; group 0 merges:
    // m = max(m_a, m_b), l = l_a 2^(m_a - m) + l_b 2^(m_b - m), likewise O. An empty group state
    // (m = -inf, l = 0, O = 0) gets weight 2^-inf = 0; group 0's m is finite (key 0).
    constexpr int KX = MT * ND * 4 + 4 * MT;
    if (grp > 0) {
      float* x = reinterpret_cast<float*>(sKV) + wq * KX * 32 + lane;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int d = 0; d < ND; ++d)
#pragma unroll
          for (int e = 0; e < 4; ++e) x[((mt * ND + d) * 4 + e) * 32] = o[mt][d][e];
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          x[(MT * ND * 4 + mt * 4 + hf) * 32] = m[mt][hf];
          x[(MT * ND * 4 + mt * 4 + 2 + hf) * 32] = l[mt][hf];
        }
      }
    }
    __syncthreads();
    if (grp > 0) return;
#pragma unroll 1
    for (int g = 1; g < NG; ++g) {
      const float* x =
          reinterpret_cast<const float*>(sQ + BQ * LD + g * 2 * STAGE) + wq * KX * 32 + lane;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        float wa[2], wb[2];
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const float mb = x[(MT * ND * 4 + mt * 4 + hf) * 32];
          const float lb = x[(MT * ND * 4 + mt * 4 + 2 + hf) * 32];
          const float mn = fmaxf(m[mt][hf], mb);
          wa[hf] = prefill_exp2(m[mt][hf] - mn);
          wb[hf] = prefill_exp2(mb - mn);
          m[mt][hf] = mn;
          l[mt][hf] = l[mt][hf] * wa[hf] + lb * wb[hf];
        }
#pragma unroll
        for (int d = 0; d < ND; ++d)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            o[mt][d][e] = o[mt][d][e] * wa[e >> 1] + x[((mt * ND + d) * 4 + e) * 32] * wb[e >> 1];
      }
    }
  }

  // Stage this warp's rows in its own rows of sQ (no other warp reads them any more), then
  // store 16-byte vectors.
  __syncwarp();
  T* so = sQ + wq * WR * LD;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float lt = l[mt][hf];
      lt += __shfl_xor_sync(0xffffffffu, lt, 1);
      lt += __shfl_xor_sync(0xffffffffu, lt, 2);
      const float inv = 1.f / lt;  // lt >= 1: the row max contributes exp2(0)
      const int r = mt * 16 + (lane >> 2) + hf * 8;
#pragma unroll
      for (int d = 0; d < ND; ++d)
        *reinterpret_cast<uint32_t*>(so + r * LD + d * 8 + 2 * tq) =
            pack2<T>(o[mt][d][2 * hf] * inv, o[mt][d][2 * hf + 1] * inv);
    }
  }
  __syncwarp();
  T* og = static_cast<T*>(p.out) + qrow0;
  for (int e = lane; e < WR * NCOL; e += 32) {
    const int r = e / NCOL, c = e - (e / NCOL) * NCOL;
    const int row = wq * WR + r;
    if (row < tile.rows && c * 8 < D)
      copy16(og + prefill_row_offset(tile.row0 + row, G, p.kv_heads, h, D) + c * 8,
             so + r * LD + c * 8);
  }
#endif
}

/// Causal GQA attention of one chunk with fp32 FMA (fp32 storage; fp16/bf16 before sm_80).
/// Each packed query row is owned by 4 lanes (a quarter of the head dim each); K and V tiles
/// are widened to fp32 in shared memory.
/// grid (ceil(chunk * G / 32), kv_heads), block 128, dynamic smem simt_smem_bytes<DPAD>().
/// \param p  as PrefillAttnMmaKernel
template <typename T, int DPAD>
__global__ void __launch_bounds__(prefill_detail::kSimtThreads)
    PrefillAttnSimtKernel(const prefill_params_t p) {
  using namespace prefill_detail;
  constexpr int BQ = kSimtBQ, BK = kSimtBK, VEC = vec_size<T>::value;
  constexpr int NC = DPAD / 16;  // float4 column groups per lane
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* sK = reinterpret_cast<float*>(smem_raw);
  float* sV = sK + BK * DPAD;

  const int h = blockIdx.y;
  const int G = p.q_heads / p.kv_heads;
  const int D = p.head_dim;
  const prefill_seg_t sg = p.segment(blockIdx.z);
  const int bh = sg.seq * p.kv_heads + h;
  const size_t base = p.head_base(bh);
  const int tid = threadIdx.x;
  const int r = tid >> 2, quarter = tid & 3;
  const prefill_tile_t tile = prefill_tile(sg.chunk, G, BQ, p.lens[bh]);
  if (tile.rows <= 0) return;
  const int len = tile.len;
  const size_t qrow0 = static_cast<size_t>(sg.first) * p.q_heads * D;   // this chunk in q / out
  const size_t krow0 = static_cast<size_t>(sg.first) * p.kv_heads * D;  // and in k / v
  const int lim = len + (tile.row0 + min(r, tile.rows - 1)) / G + 1;
  const T* kc = static_cast<const T*>(p.k_cache);
  const T* vc = static_cast<const T*>(p.v_cache);
  const T* kin = static_cast<const T*>(p.k) + krow0;
  const T* vin = static_cast<const T*>(p.v) + krow0;
  const float sl2 = p.scale * kLog2e;

  // This lane's columns: 16 c + 4 quarter + 0..3, c < NC.
  float q[NC][4], acc[NC][4];
  {
    const T* qrow = static_cast<const T*>(p.q) + qrow0 +
                    prefill_row_offset(tile.row0 + min(r, tile.rows - 1), G, p.kv_heads, h, D);
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      const int col = c * 16 + quarter * 4;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        q[c][e] = col + e < D ? to_f32(qrow[col + e]) * sl2 : 0.f;
        acc[c][e] = 0.f;
      }
    }
  }
  float m = -INFINITY, l = 0.f;

  const int ntiles = (tile.n_end + BK - 1) / BK;
  for (int j = 0; j < ntiles; ++j) {
    const int n0 = j * BK;
    __syncthreads();  // previous tile fully consumed
    for (int e = tid; e < BK * (DPAD / VEC); e += kSimtThreads) {
      const int rr = e / (DPAD / VEC), c = e - rr * (DPAD / VEC);
      const int n = n0 + rr;
      float kf[VEC], vf[VEC];
      if (n < tile.n_end && c * VEC < D) {
        load_vec_f32<T>(prefill_key_row(kc, kin, p, base, h, len, n, c * VEC), kf);
        load_vec_f32<T>(prefill_key_row(vc, vin, p, base, h, len, n, c * VEC), vf);
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) kf[i] = vf[i] = 0.f;
      }
#pragma unroll
      for (int i = 0; i < VEC; i += 4) {
        *reinterpret_cast<float4*>(sK + rr * DPAD + c * VEC + i) =
            make_float4(kf[i], kf[i + 1], kf[i + 2], kf[i + 3]);
        *reinterpret_cast<float4*>(sV + rr * DPAD + c * VEC + i) =
            make_float4(vf[i], vf[i + 1], vf[i + 2], vf[i + 3]);
      }
    }
    __syncthreads();
    float s[BK];
    float mx = -INFINITY;
#pragma unroll
    for (int n = 0; n < BK; ++n) {
      float a = 0.f;
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        const float4 kv = *reinterpret_cast<const float4*>(sK + n * DPAD + c * 16 + quarter * 4);
        a = fmaf(q[c][0], kv.x, a);
        a = fmaf(q[c][1], kv.y, a);
        a = fmaf(q[c][2], kv.z, a);
        a = fmaf(q[c][3], kv.w, a);
      }
      a += __shfl_xor_sync(0xffffffffu, a, 1);
      a += __shfl_xor_sync(0xffffffffu, a, 2);
      s[n] = n0 + n < lim ? a : -INFINITY;
      mx = fmaxf(mx, s[n]);
    }
    const float mnew = fmaxf(m, mx);
    const float ref = mnew == -INFINITY ? 0.f : mnew;  // see PrefillAttnMmaKernel
    const float alpha = exp2f(m - ref);
    m = mnew;
    float sum = 0.f;
#pragma unroll
    for (int c = 0; c < NC; ++c)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[c][e] *= alpha;
#pragma unroll
    for (int n = 0; n < BK; ++n) {
      const float pr = exp2f(s[n] - ref);
      sum += pr;
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        const float4 vv = *reinterpret_cast<const float4*>(sV + n * DPAD + c * 16 + quarter * 4);
        acc[c][0] = fmaf(pr, vv.x, acc[c][0]);
        acc[c][1] = fmaf(pr, vv.y, acc[c][1]);
        acc[c][2] = fmaf(pr, vv.z, acc[c][2]);
        acc[c][3] = fmaf(pr, vv.w, acc[c][3]);
      }
    }
    l = l * alpha + sum;
  }
  if (r >= tile.rows) return;
  const float inv = 1.f / l;
  T* orow = static_cast<T*>(p.out) + qrow0 + prefill_row_offset(tile.row0 + r, G, p.kv_heads, h, D);
  // 4 consecutive columns per store (16 bytes for fp32); D % 8 == 0 keeps a group whole.
#pragma unroll
  for (int c = 0; c < NC; ++c) {
    const int col = c * 16 + quarter * 4;
    if (col < D) {
      if constexpr (std::is_same<T, float>::value) {
        *reinterpret_cast<float4*>(orow + col) =
            make_float4(acc[c][0] * inv, acc[c][1] * inv, acc[c][2] * inv, acc[c][3] * inv);
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) orow[col + e] = static_cast<T>(acc[c][e] * inv);
      }
    }
  }
}

/// ln(max(||k||_2, 1e-12)) of every chunk key, in fp32 from the stored-dtype key (knorm).
/// grid (ceil(longest chunk * kv_heads / 8), 1, segments), block 256: one warp per (token, kv
/// head) of chunk blockIdx.z.
/// \param p        k [tokens, kv_heads, D] dtype
/// \param lognorm  per chunk, [kv_heads, chunk] at row offset first * kv_heads
template <typename T>
__global__ void PrefillLognormKernel(const prefill_params_t p, float* __restrict__ lognorm) {
  const prefill_seg_t sg = p.segment(blockIdx.z);
  const int row = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (row >= sg.chunk * p.kv_heads) return;
  const int D = p.head_dim;
  const T* kr = static_cast<const T*>(p.k) + (static_cast<size_t>(sg.first) * p.kv_heads + row) * D;
  // The canonical order: the bits equal the CPU backend's and decode's.
  const double ss = warp_key_sumsq<T>(kr, D, lane);
  if (lane == 0) {
    const int i = row / p.kv_heads, h = row - i * p.kv_heads;
    lognorm[static_cast<size_t>(sg.first) * p.kv_heads + static_cast<size_t>(h) * sg.chunk + i] =
        lognorm_of_sumsq(ss);
  }
}

namespace prefill_detail {

template <typename T, int DPAD>
cudaError_t launch_attention_simt(const prefill_params_t& p, cudaStream_t stream) {
  const long long rows = static_cast<long long>(p.longest()) * (p.q_heads / p.kv_heads);
  constexpr int smem = simt_smem_bytes<DPAD>();
  auto kern = PrefillAttnSimtKernel<T, DPAD>;
  const cudaError_t e =
      cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>((rows + kSimtBQ - 1) / kSimtBQ), p.kv_heads, p.segments());
  kern<<<grid, kSimtThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

/// Query tiles of 64 MT packed rows in the launch grid (x: tiles of the longest chunk).
inline long long mma_grid_blocks(const prefill_params_t& p, int MT) {
  const long long rows = static_cast<long long>(p.longest()) * (p.q_heads / p.kv_heads);
  return (rows + 64 * MT - 1) / (64 * MT) * p.kv_heads * p.segments();
}

/// \tparam PP    staggered start of the two key groups (NG 2)
/// \tparam QREG  Q fragments held in registers (MT 1), else re-read from shared memory
template <typename T, int DPAD, int MT, int BK, int NG, bool PP = false, bool QREG = (MT == 1)>
cudaError_t launch_attention_mma(const prefill_params_t& p, cudaStream_t stream) {
  constexpr int smem = mma_smem_bytes<DPAD, MT, BK, NG>();
  auto kern = PrefillAttnMmaKernel<T, DPAD, MT, BK, NG, PP, QREG>;
  const cudaError_t e =
      cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>(mma_grid_blocks(p, MT) / (p.kv_heads * p.segments())),
                  p.kv_heads, p.segments());
  kern<<<grid, kMmaGroupThreads * NG, smem, stream>>>(p);
  return cudaGetLastError();
}

/// Shared memory and SMs of the current device, for the tile choice.
struct mma_device_t {
  int major = 0, sms = 0, smem_block = 0, smem_sm = 0;
};

inline cudaError_t mma_device(mma_device_t* d) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess)
    e = cudaDeviceGetAttribute(&d->major, cudaDevAttrComputeCapabilityMajor, dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&d->sms, cudaDevAttrMultiProcessorCount, dev);
  if (e == cudaSuccess)
    e = cudaDeviceGetAttribute(&d->smem_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (e == cudaSuccess)
    e = cudaDeviceGetAttribute(&d->smem_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev);
  return e;
}

/// Whether `blocks` blocks of `bytes` dynamic shared memory fit one SM (1 KB reserved each).
inline bool mma_fits(const mma_device_t& d, int bytes, int blocks) {
  return bytes <= d.smem_block && blocks * (bytes + 1024) <= d.smem_sm;
}

template <typename T, int DPAD>
cudaError_t launch_attention(const prefill_params_t& p, cudaStream_t stream) {
  if constexpr (std::is_same<T, float>::value) {
    return launch_attention_simt<T, DPAD>(p, stream);
  } else {
    mma_device_t d;
    const cudaError_t e = mma_device(&d);
    if (e != cudaSuccess) return e;
    if (d.major < 8) return launch_attention_simt<T, DPAD>(p, stream);  // no bf16/f16 m16n8k16
    using C = mma_config<DPAD>;
    constexpr int MT = C::MT, BK = C::BK, BKS = C::BK_SMALL;
    if (mma_grid_blocks(p, MT) * 64 * MT <= kMmaSplitRowsPerSm * d.sms &&
        mma_fits(d, mma_smem_bytes<DPAD, MT, BK, 2>(), 1))
      return launch_attention_mma<T, DPAD, MT, BK, 2, true>(p, stream);
    if (mma_fits(d, mma_smem_bytes<DPAD, MT, BK, 1>(), 2))
      return launch_attention_mma<T, DPAD, MT, BK, 1>(p, stream);
    if constexpr (BKS != BK) {
      if (mma_fits(d, mma_smem_bytes<DPAD, MT, BKS, 1>(), 1))
        return launch_attention_mma<T, DPAD, MT, BKS, 1>(p, stream);
    } else {
      if (mma_fits(d, mma_smem_bytes<DPAD, MT, BK, 1>(), 1))
        return launch_attention_mma<T, DPAD, MT, BK, 1>(p, stream);
    }
    return launch_attention_simt<T, DPAD>(p, stream);  // too little shared memory for tiles
  }
}


template <typename T>
cudaError_t prefill_attention_typed(const prefill_params_t& p, float* lognorm,
                                    cudaStream_t stream) {
  if (p.knorm) {
    const int nrow = p.longest() * p.kv_heads;
    const dim3 grid((nrow + 7) / 8, 1, p.segments());
    PrefillLognormKernel<T><<<grid, 256, 0, stream>>>(p, lognorm);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return TRIMKV_PREFILL_DISPATCH_HEAD_DIM(p.head_dim, DPAD,
                                          [&] { return launch_attention<T, DPAD>(p, stream); });
}

}  // namespace prefill_detail

}  // namespace trimkv
