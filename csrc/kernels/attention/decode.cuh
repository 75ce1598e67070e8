// Fused TRIM-KV decode step for one layer: GQA attention over a bounded per-head cache plus
// the new token, fused with the retention-score eviction (SPEC.md sections 4-6).
//
// Work decomposition: grid (splits, kv_heads, batch); a step is a single launch. Each block
// streams the K/V tiles of its slice of the head's tokens through shared memory with cp.async
// and keeps an online-softmax state for all G query heads of its KV head, so K and V are read
// once per KV head. Two kernels share that shape:
//   DecodeMmaKernel    (fp16/bf16, G <= 8, sm_80+): tensor cores (mma.sync m16n8k16) for
//                      q.K^T and P.V; 4 warps, a 16-token slab per warp and tile. The splits
//                      cut the slots by the cache capacity, so the fixed layout issues its
//                      first tiles before lens/positions arrive; the new token is attended
//                      from k_new/v_new by the last split; the pos/lam of the B = 0 victim
//                      search travel in the same cp.async groups as the tiles.
//   DecodeAttendKernel (fp32, G > 8, GPUs before sm_80): CUDA cores, 8 warps, 16 lanes a
//                      token, the new token as logical slot len of the last split.
// With one split the same block writes the output and evicts. With several, one block merges
// the split partials (max, sum, acc, victim) and evicts: on sm_90 the blocks of a head form a
// thread-block cluster and push their partials into rank 0's shared memory (one cluster
// barrier, no global round trip); otherwise the last block to arrive merges (arrival counter
// in the workspace, partials through L2).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/dtype.h"
#include "common/score.h"
#include "kernels/cache/cache_layer.cuh"
#include "kernels/common/mma.cuh"
#include "kernels/common/pdl.cuh"
#include "kernels/common/select_topk.cuh"
#include "kernels/common/vec_dtypes.cuh"

namespace trimkv {

/// Parameters of one decode step over one layer (cache_layer.cuh: the slot arrays, layout and
/// rules). All pointers are device pointers. Pooled layout: the step only appends (every active
/// head needs a free slot, see pool.cuh) and leaves eviction to PoolEvict.
struct decode_params_t : cache_layer_t {
  const void* q = nullptr;          ///< [batch, q_heads, head_dim] dtype
  const void* k_new = nullptr;      ///< [batch, kv_heads, head_dim] dtype
  const void* v_new = nullptr;      ///< [batch, kv_heads, head_dim] dtype
  const float* lam_new = nullptr;   ///< [batch, kv_heads]
  const int32_t* positions = nullptr;  ///< [batch] position of the new token, -1 = inactive
  void* out = nullptr;              ///< [batch, q_heads, head_dim] dtype
  int num_splits = 0;               ///< 0 = auto; > 0 forces the split count (clamped)
  int num_sms = 0;                  ///< 0 = read from the current device
  /// 1: the tensor-core kernel may issue its first K/V tiles (and their pos/lam/lognorm) of a
  /// fixed-layout cache before waiting for the kernel ahead of it (a programmatic dependent
  /// launch, pdl.cuh), so they land while that kernel finishes. Set it only when the kernel
  /// ahead in the stream cannot be writing this layer's cache: see DecodeStep.
  int prefetch_before_wait = 0;
#ifdef TRIMKV_DECODE_TRACE
  unsigned long long* trace = nullptr;  ///< harness only: [blocks][8] globaltimer records
#endif
  /// Most sequences whose positions travel in the launch itself.
  static constexpr int kInlinePositions = 64;
  /// positions == nullptr (batch <= kInlinePositions): the positions themselves, passed by
  /// value with the launch, so a step needs no upload (the kernels take p as __grid_constant__,
  /// which lets them index it without a copy).
  int32_t pos_inline[kInlinePositions] = {};

  /// Position of sequence b's new token (-1: inactive).
  __host__ __device__ __forceinline__ int new_position(int b) const {
    return positions ? positions[b] : pos_inline[b];
  }
};

/// Workspace pointers carved out of the caller's workspace buffer.
struct decode_ws_t {
  float* acc = nullptr;                  ///< [batch, kv_heads, splits, G, 256]
  float* md = nullptr;                   ///< [batch, kv_heads, splits, G, 4] (max, sum, -, -)
  unsigned long long* vkey = nullptr;    ///< [batch, kv_heads, splits, 2] (min keep-key, slot)
  int* list = nullptr;                   ///< [batch, kv_heads, 2 * max(B, 1)] holes / movers
  int* counter = nullptr;                ///< [batch, kv_heads] arrival counters (split > 1)
};

/// Number of splits DecodeStep uses for these params (host only, no sync).
int DecodeNumSplits(const decode_params_t& p);

/// Bytes of workspace DecodeStep needs for these params (host only, no sync).
/// The first DecodeCounterBytes(p) bytes hold arrival counters: zero them once (cudaMemset)
/// when the workspace is allocated; every step leaves them zero. The rest needs no init.
size_t DecodeWorkspaceBytes(const decode_params_t& p);

/// Size of the counter region at the start of the workspace (see DecodeWorkspaceBytes).
size_t DecodeCounterBytes(const decode_params_t& p);

/// Whether DecodeStep can run a group of `group` query heads per KV head (host only). The
/// tensor-core kernel takes fp16/bf16 with group <= 8 on sm_80+ (tensor_cores true); the
/// CUDA-core kernel otherwise, which needs group / (its heads per lane group) to divide its
/// lane groups (e.g. fp32 at head dim 128 takes groups 1, 2, 4, 8, 16, 32).
bool DecodeGroupSupported(int group, int head_dim, DType dtype, bool tensor_cores);

/// One fused decode step (attention + append + eviction) for one layer.
/// \param p        see decode_params_t; lens/pos/lam/lognorm/k/v caches are updated in place
/// \param dtype    storage dtype of q, k_new, v_new, caches and out
/// \param workspace at least DecodeWorkspaceBytes(p) bytes of device memory, 256-byte aligned
/// \return cudaSuccess, cudaErrorInvalidValue for unsupported shapes, or the launch error
///
/// p.prefetch_before_wait is safe when the decode step enqueued last on the stream before this
/// one was for another layer's cache and nothing between them writes this layer's cache with a
/// programmatic dependent launch. Then, when this kernel starts, that step has passed its own
/// griddepcontrol.wait (the decode kernel lets its dependents start only after it), so every
/// kernel ahead of it has completed, this layer's last writer included, provided every kernel
/// of the stream waits for the one ahead before it completes (any kernel launched without the
/// programmatic attribute does).
cudaError_t DecodeStep(const decode_params_t& p, DType dtype, void* workspace,
                       cudaStream_t stream);

namespace decode_detail {

constexpr int kThreads = 256;
constexpr int kMaxHeadDim = 256;
constexpr int kMinSplitTokens = 16;  ///< a split covers at least this many tokens
constexpr int kAutoSplitTokens = 64;  ///< auto choice: at least this many tokens per split
constexpr int kMaxSplits = 64;
/// Test hook of the tensor-core launch (the kernel harness's A/B runs; 0 in the library):
/// bit 0 no thread-block clusters (the arrival-counter merge), bit 1 no programmatic
/// dependent launch, bit 2 clusters at two blocks per SM too.
inline int g_launch_diag = 0;
/// Shared memory the split merge may use (every kernel variant has at least this much).
constexpr int kMergeSmemBytes = 96 * 1024;

/// Padded head dim of the kernel variant that serves head_dim (host and device).
__host__ __device__ constexpr int padded_head_dim(int d) { return d <= 64 ? 64 : d <= 128 ? 128 : 256; }

/// Shared bytes of the single-pass split merge for S splits of G heads (see
/// merge_splits_and_finalize): (max, sum) records, victim records, weights, partial accs.
__host__ __device__ constexpr int merge_smem_bytes(int S, int G, int dpad) {
  return S * G * 16 + S * 16 + ((S * G + 3) / 4) * 16 + S * G * dpad * 4;
}

/// Compile-time shape of the attention kernel for storage type T and padded head dim DPAD.
template <typename T, int DPAD>
struct traits {
  static constexpr int VEC = vec_size<T>::value;                   // elements per 16 B
  static constexpr int NCOL = DPAD / VEC;                          // 16 B vectors per row
  static constexpr int NVEC = NCOL > 32 ? NCOL / 32 : 1;           // vectors per lane
  static constexpr int BDX = NCOL / NVEC;                          // lanes per token
  static constexpr int E = VEC * NVEC;                             // elements per lane
  static constexpr int WORKERS = kThreads / BDX;                   // lane groups per block
  static constexpr int TK = 4 * WORKERS;                           // tokens per tile
  static constexpr int STAGE_BYTES = 2 * TK * DPAD * (int)sizeof(T);  // K + V tile
  static constexpr int STAGES = 3;                                 // tiles in flight + 1
  static constexpr int PIPE_BYTES = STAGES * STAGE_BYTES;
};

template <typename T, int DPAD, int HPT>
__host__ __device__ constexpr int smem_bytes() {
  using Tr = traits<T, DPAD>;
  constexpr int merge = Tr::WORKERS * HPT * (DPAD + 2) * 4;
  return Tr::PIPE_BYTES > merge ? Tr::PIPE_BYTES : merge;
}

/// Shape of the tensor-core kernel (16-bit storage, G <= 8). 4 warps; a tile holds 64 tokens,
/// a 16-token slab per warp. K/V rows of DPAD elements sit in 16-byte chunks XOR-swizzled by
/// row (chunk c of row r at c ^ (r & 7)), so that the cp.async writes and the ldmatrix reads
/// of 8 rows hit 8 distinct bank groups. Each stage also holds the pos/lam/lognorm of its
/// tokens (B = 0 victim search), so that no load in the tile loop is synchronous.
template <int DPAD>
struct mma_traits {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int TK = 16 * kWarps;                      // tokens per tile
  static constexpr int NCH = DPAD / 8;                        // 16-byte chunks per row
  static constexpr int ROW_BYTES = DPAD * 2;
  static constexpr int KV_BYTES = TK * ROW_BYTES;             // K (or V) part of a stage
  static constexpr int META_BYTES = 3 * TK * 4;               // pos, lam, lognorm
  static constexpr int STAGE_BYTES = 2 * KV_BYTES + META_BYTES;
  static constexpr int kMaxStages = 8;                        // most stages a launch uses
  /// Stages when two blocks share an SM (the host picks up to kMaxStages for one per SM).
  static constexpr int kSharedStages = DPAD <= 128 ? 3 : 2;
  static constexpr int WSTRIDE = DPAD + 4;                    // floats a head row (no conflicts)
  /// Warp partials of the in-block merge: acc [warps][8][WSTRIDE], (max, sum) [warps][8][2].
  static constexpr int MERGE_BYTES = kWarps * 8 * WSTRIDE * 4 + kWarps * 8 * 2 * 4;
  static_assert(MERGE_BYTES <= STAGE_BYTES, "the warp merge reuses the first stage");
  /// Rank 0's receive area of a cluster merge of S splits: (max, sum) [S*G] float4, victim
  /// (key, slot) [S*warps], acc [S*G][DPAD] floats.
  static constexpr int cluster_recv_bytes(int S, int G) {
    return S * G * 16 + S * kWarps * 16 + S * G * DPAD * 4;
  }
};
constexpr int kMmaMaxGroup = 8;        ///< query heads per KV head on the tensor-core path (N)
constexpr int kMaxClusterSplits = 16;  ///< most splits merged through a cluster (> 8: non-portable)
constexpr int kAutoClusterSplits = 8;  ///< most splits the automatic choice makes on sm_90+
/// After another layer's decode step (p.prefetch_before_wait) at two blocks per SM, splits of
/// at least this many slots merge through L2 unless a cluster has at most
/// kPairedClusterSplits blocks (launch_mma).
constexpr int kCounterChunkTokens = 128;
constexpr int kPairedClusterSplits = 2;

/// Shared scratch of the eviction epilogue.
struct fin_smem_t {
  topk::select_smem_t sel;
  unsigned long long vkey_w[kThreads / 32];
  int vslot_w[kThreads / 32];
  unsigned long long vkey;
  int vslot;
  int nh, nm;
  int last;
  float lognorm;  ///< ln(max(||k_new||, 1e-12)) (knorm)
  float lam_new;  ///< lam_new of the head, loaded at the kernel start
};

}  // namespace decode_detail

// Harness-only timeline records (globaltimer at phase boundaries of each block): compiled out
// unless TRIMKV_DECODE_TRACE is defined.
#ifdef TRIMKV_DECODE_TRACE
#define TRIMKV_TRACE_AT(k)                                                                     \
  do {                                                                                         \
    if (p.trace != nullptr && threadIdx.x == 0) {                                              \
      unsigned long long t_;                                                                   \
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_));                                   \
      p.trace[((size_t)(blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x) * 8 +   \
              (k)] = t_;                                                                       \
    }                                                                                          \
  } while (0)
#define TRIMKV_TRACE_VAL(k, v)                                                                 \
  do {                                                                                         \
    if (p.trace != nullptr && threadIdx.x == 0)                                                \
      p.trace[((size_t)(blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x) * 8 +   \
              (k)] = (v);                                                                      \
  } while (0)
#else
#define TRIMKV_TRACE_AT(k) \
  do {                     \
  } while (0)
#define TRIMKV_TRACE_VAL(k, v) \
  do {                         \
  } while (0)
#endif

namespace {

/// ln(max(||k||_2, 1e-12)) of a key of D elements (global or shared memory), by warp 0, into
/// fin.lognorm, in the canonical order (warp_key_sumsq). Caller synchronises afterwards.
template <typename T>
__device__ __forceinline__ void key_lognorm(const T* k, int D, decode_detail::fin_smem_t& fin) {
  if (threadIdx.x >= 32) return;
  const double ss = warp_key_sumsq<T>(k, D, threadIdx.x);
  if (threadIdx.x == 0) fin.lognorm = lognorm_of_sumsq(ss);
}

/// ln(max(||k_new||_2, 1e-12)) of the new key of head bh (global k_new), into fin.lognorm.
template <typename T>
__device__ __forceinline__ void new_token_lognorm(const decode_params_t& p, int bh, int D,
                                                  decode_detail::fin_smem_t& fin) {
  key_lognorm<T>(static_cast<const T*>(p.k_new) + static_cast<size_t>(bh) * D, D, fin);
}

/// Writes the new token of head bh (k, v, pos, lam, lognorm) into slot. snew: shared copy of
/// k_new (snew[0, D)) and v_new (snew[D, 2D)) of this head, prefetched at the kernel start;
/// fin.lam_new (and fin.lognorm when p.knorm) set and synchronised before the call.
template <typename T>
__device__ __forceinline__ void write_new_token(const decode_params_t& p, int b, int bh, int D,
                                                int slot, int pos_new,
                                                const decode_detail::fin_smem_t& fin,
                                                const T* snew) {
  constexpr int VEC = vec_size<T>::value;
  const size_t m = p.head_base(bh) + slot;
  const size_t dst = m * D;
  for (int c = threadIdx.x; c < D / VEC; c += blockDim.x) {
    copy16(static_cast<T*>(p.k_cache) + dst + c * VEC, snew + c * VEC);
    copy16(static_cast<T*>(p.v_cache) + dst + c * VEC, snew + D + c * VEC);
  }
  if (threadIdx.x == 0) {
    p.pos_cache[m] = pos_new;
    p.lam_cache[m] = fin.lam_new;
    if (p.knorm) p.lognorm_cache[m] = fin.lognorm;
  }
}

/// Block-wide min of (key, slot) pairs; result in fin.vkey / fin.vslot. All threads call.
__device__ __forceinline__ void block_min_key(unsigned long long key, int slot,
                                              decode_detail::fin_smem_t& fin) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const unsigned long long k2 = __shfl_xor_sync(0xffffffffu, key, o);
    const int s2 = __shfl_xor_sync(0xffffffffu, slot, o);
    if (k2 < key) { key = k2; slot = s2; }
  }
  if (lane == 0) { fin.vkey_w[warp] = key; fin.vslot_w[warp] = slot; }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w)
      if (fin.vkey_w[w] < key) { key = fin.vkey_w[w]; slot = fin.vslot_w[w]; }
    fin.vkey = key;
    fin.vslot = slot;
  }
  __syncthreads();
}

/// Eviction epilogue for head (b, h), run by a whole block after every read of this head's
/// cache for this step is complete. The new token was already appended to slot len when the
/// step appends (B > 0, or len < M). Updates lens.
///   B == 0, len >= M: the new token replaces the victim (min keep-key over the M cached and
///                     the new token, given as vkey/vslot; vslot == len means the new token
///                     itself is the victim and is dropped).
///   B > 0, len + 1 == M + B: keep the M largest keep-keys: radix-select the M-th largest
///                     key, then move survivors from slots >= M into evicted slots < M.
template <typename T>
__device__ void finalize_head(const decode_params_t& p, int b, int h, int D, int len,
                              int pos_new, int vslot, int* list,
                              decode_detail::fin_smem_t& fin, const T* snew, void* smem,
                              int smem_cap) {
  constexpr int VEC = vec_size<T>::value;
  const int bh = b * p.kv_heads + h;
  const int tid = threadIdx.x;
  const int nthr = blockDim.x;
  const int M = p.memory;
  if (p.pooled()) {  // appended; the pool kernel evicts
    if (tid == 0) p.lens[bh] = len + 1;
    return;
  }
  if (p.buffer == 0) {
    if (len < M) {
      if (tid == 0) p.lens[bh] = len + 1;
      return;
    }
    if (vslot >= len || vslot < 0) return;  // the new token is the victim: dropped
    write_new_token<T>(p, b, bh, D, vslot, pos_new, fin, snew);
    return;
  }
  const int n = len < p.cap ? len + 1 : len;
  if (n < M + p.buffer) {
    if (tid == 0) p.lens[bh] = n;
    return;
  }
  const int tcount = pos_new + 1;
  const size_t base = p.head_base(bh);
  auto key_at = [&](int s) -> unsigned long long {
    // L2 reads (__ldcg): another block of this step may have written the slot.
    const int pos = __ldcg(p.pos_cache + base + s);
    const float ln = p.knorm ? __ldcg(p.lognorm_cache + base + s) : 0.f;
    return topk::keep_key(
        cache_score(__ldcg(p.lam_cache + base + s), pos, tcount, p.window, p.knorm, ln), pos);
  };
  // Stage the n keep-keys in shared memory when they fit: the loads go out in batches, and the
  // radix passes and the compaction below read shared memory instead of L2 / DRAM.
  unsigned long long* skeys = static_cast<unsigned long long*>(smem);
  const bool staged = static_cast<size_t>(n) * sizeof(unsigned long long) <=
                      static_cast<size_t>(smem_cap);
  if (staged) {
    constexpr int kBatch = 8;
    for (int s0 = 0; s0 < n; s0 += kBatch * nthr) {
      int pos[kBatch];
      float lam[kBatch], ln[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int s = s0 + u * nthr + tid;
        if (s < n) {
          pos[u] = __ldcg(p.pos_cache + base + s);
          lam[u] = __ldcg(p.lam_cache + base + s);
          ln[u] = p.knorm ? __ldcg(p.lognorm_cache + base + s) : 0.f;
        }
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int s = s0 + u * nthr + tid;
        if (s < n)
          skeys[s] = topk::keep_key(
              cache_score(lam[u], pos[u], tcount, p.window, p.knorm, ln[u]), pos[u]);
      }
    }
    __syncthreads();
  }
  auto key_of = [&](int s) -> unsigned long long { return staged ? skeys[s] : key_at(s); };
  // The M-th largest key among n (radix select, select_topk.cuh): exactly M keys are >= it.
  const unsigned long long thr = topk::block_select_kth_largest(key_of, n, M, fin.sel);
  // Compaction: survivors in slots >= M move into evicted slots < M.
  int* holes = list;
  int* movers = list + p.buffer;
  if (tid == 0) { fin.nh = 0; fin.nm = 0; }
  __syncthreads();
  for (int s = tid; s < M; s += nthr)
    if (key_of(s) < thr) holes[atomicAdd(&fin.nh, 1)] = s;
  for (int s = M + tid; s < n; s += nthr)
    if (key_of(s) >= thr) movers[atomicAdd(&fin.nm, 1)] = s;
  __syncthreads();
  const int npairs = min(fin.nh, fin.nm);
  for (int i = tid; i < npairs; i += nthr) {
    const size_t src = base + movers[i], dst = base + holes[i];
    p.pos_cache[dst] = __ldcg(p.pos_cache + src);
    p.lam_cache[dst] = __ldcg(p.lam_cache + src);
    if (p.knorm) p.lognorm_cache[dst] = __ldcg(p.lognorm_cache + src);
  }
  const int ncol = D / VEC;
  for (int e = tid; e < npairs * ncol; e += nthr) {
    const int i = e / ncol, c = e - i * ncol;
    const size_t src = (base + movers[i]) * D + c * VEC, dst = (base + holes[i]) * D + c * VEC;
    *reinterpret_cast<uint4*>(static_cast<T*>(p.k_cache) + dst) =
        __ldcg(reinterpret_cast<const uint4*>(static_cast<const T*>(p.k_cache) + src));
    *reinterpret_cast<uint4*>(static_cast<T*>(p.v_cache) + dst) =
        __ldcg(reinterpret_cast<const uint4*>(static_cast<const T*>(p.v_cache) + src));
  }
  if (tid == 0) p.lens[bh] = M;
}

/// Writes zeros to the G output rows of head (b, h) (inactive sequence).
template <typename T>
__device__ __forceinline__ void zero_out_rows(const decode_params_t& p, int b, int h, int D) {
  constexpr int VEC = vec_size<T>::value;
  const int G = p.q_heads / p.kv_heads;
  T* o = static_cast<T*>(p.out) + (static_cast<size_t>(b) * p.q_heads + h * G) * D;
  const float z[VEC] = {};
  for (int c = threadIdx.x; c < G * D / VEC; c += blockDim.x) store_vec_f32<T>(o + c * VEC, z);
}

}  // namespace

/// Merges the per-split states of head (b, h), writes out [batch, q_heads, D] and finishes the
/// eviction. Whole block. The partials ((max, sum) records [S*G] float4, victim records [S]
/// (key, slot), then the weights [S*G] and the accumulators [S*G][DPAD]; merge_smem_bytes)
/// sit in part_smem: either already (staged: pushed there by the blocks of a cluster), or
/// they are copied from the workspace (written by the other blocks of this launch, read
/// through L2) in one batch of cp.async, one round trip. The host keeps S small enough that
/// merge_smem_bytes(S, G, DPAD) fits. fin_smem / fin_cap: scratch of finalize_head (may be
/// part_smem itself: it is only reused after the merge).
template <typename T, int DPAD, int DCONST>
__device__ void merge_splits_and_finalize(const decode_params_t& p, int b, int h, int len,
                                          int pos_new, int S, const decode_ws_t& ws,
                                          decode_detail::fin_smem_t& fin, void* part_smem,
                                          bool staged, void* fin_smem, int fin_cap,
                                          const T* snew) {
  void* smem = part_smem;
  constexpr int VEC = vec_size<T>::value;
  constexpr int NCOL = DPAD / VEC;
  const int bh = b * p.kv_heads + h;
  const int D = DCONST ? DCONST : p.head_dim;
  const int G = p.q_heads / p.kv_heads;
  const int tid = threadIdx.x;
  const int nthr = blockDim.x;
  const int SG = S * G;
  const bool need_victim = !p.pooled() && p.buffer == 0 && len >= p.memory;
  float4* smd = static_cast<float4*>(smem);                            // [S*G] (max, sum)
  ulonglong2* svk = reinterpret_cast<ulonglong2*>(smd + SG);            // [S] (key, slot)
  float* sw = reinterpret_cast<float*>(svk + S);                        // [S*G] weights
  float* sacc = sw + ((SG + 3) / 4) * 4;                                // [S*G][DPAD]
  if (!staged) {
    const float* gmd = ws.md + static_cast<size_t>(bh) * SG * 4;
    for (int i = tid; i < SG; i += nthr) cp_async16(smd + i, gmd + i * 4, true);
    if (need_victim) {
      const unsigned long long* gvk = ws.vkey + static_cast<size_t>(bh) * S * 2;
      for (int i = tid; i < S; i += nthr) cp_async16(svk + i, gvk + i * 2, true);
    }
    const int nc4 = D / 4;  // float4 columns written by the splits
    const float* gacc = ws.acc + static_cast<size_t>(bh) * SG * decode_detail::kMaxHeadDim;
    for (int i = tid; i < SG * nc4; i += nthr) {
      const int row = i / nc4, c = i - row * nc4;
      cp_async16(sacc + row * DPAD + c * 4, gacc + static_cast<size_t>(row) *
                                                       decode_detail::kMaxHeadDim + c * 4, true);
    }
    cp_async_commit();
    cp_async_wait<0>();
  }
  __syncthreads();
  // Split weights exp2(m_s - max) / sum: one warp per head, lanes over the splits.
  {
    const int lane = tid & 31, warp = tid >> 5, nwarps = nthr >> 5;
    for (int g = warp; g < G; g += nwarps) {
      float mx = -INFINITY;
      for (int s = lane; s < S; s += 32) mx = fmaxf(mx, smd[s * G + g].x);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      float dsum = 0.f;
      for (int s = lane; s < S; s += 32) {
        const float4 r = smd[s * G + g];
        // An empty split (m = -inf, sum 0) gets weight 0, not exp2(-inf + inf) = NaN.
        const float f = r.x == -INFINITY ? 0.f : exp2f(r.x - mx);
        sw[s * G + g] = f;
        dsum += f * r.y;
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) dsum += __shfl_xor_sync(0xffffffffu, dsum, o);
      const float inv = 1.f / dsum;  // >= 1 term: the split holding the new token
      __syncwarp();
      for (int s = lane; s < S; s += 32) sw[s * G + g] *= inv;
    }
  }
  __syncthreads();
  // Weighted sum over the splits: R lanes (adjacent, a power of two) share one (head, column
  // vector) item, each summing every R-th split, then combine by shuffles.
  const int nitems = G * NCOL;
  int R = 1;
  while (R < 32 && nitems * R * 2 <= nthr) R *= 2;
  for (int t0 = 0; t0 < nitems * R; t0 += nthr) {  // uniform trip count: shuffles below
    const int t = t0 + tid;
    const int item = t / R, r = t % R;
    const int g = item / NCOL, col = item % NCOL;
    const bool valid = item < nitems && (DCONST != 0 || col * VEC < D);
    float o[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) o[e] = 0.f;
    if (valid) {
      for (int s = r; s < S; s += R) {
        const float f = sw[s * G + g];
        const float* wa = sacc + (s * G + g) * DPAD + col * VEC;
#pragma unroll
        for (int e = 0; e < VEC; e += 4) {
          // Empty splits stored zeros, so f = 0 adds nothing.
          const float4 a = *reinterpret_cast<const float4*>(wa + e);
          o[e] += a.x * f; o[e + 1] += a.y * f; o[e + 2] += a.z * f; o[e + 3] += a.w * f;
        }
      }
    }
    for (int m = 1; m < R; m <<= 1)
#pragma unroll
      for (int e = 0; e < VEC; ++e) o[e] += __shfl_xor_sync(0xffffffffu, o[e], m);
    if (valid && r == 0)
      store_vec_f32<T>(static_cast<T*>(p.out) +
                           (static_cast<size_t>(b) * p.q_heads + h * G + g) * D + col * VEC,
                       o);
  }
  int vslot = -1;
  if (need_victim) {
    unsigned long long k = ~0ull;
    int sl = -1;
    if (tid < S) {
      k = svk[tid].x;
      sl = static_cast<int>(svk[tid].y);
    }
    if (p.knorm) new_token_lognorm<T>(p, bh, D, fin);
    block_min_key(k, sl, fin);  // synchronises
    vslot = fin.vslot;
  } else {
    __syncthreads();  // finalize_head may reuse the shared memory read above
  }
  finalize_head<T>(p, b, h, D, len, pos_new, vslot,
                   ws.list + static_cast<size_t>(bh) * 2 * max(p.buffer, 1), fin, snew,
                   fin_smem, fin_cap);
}

/// Attention over one split of the (len + 1) logical tokens of head (b, h), for all G query
/// heads of the GQA group (HPT heads per lane group, G / HPT lane-group sets). With one split
/// the block also writes out and evicts; with several, the last block of the head to finish
/// merges the partial states and evicts (merge_splits_and_finalize).
/// grid (num_splits, kv_heads, batch), block 256, dynamic smem smem_bytes<T, DPAD, HPT>().
/// \param p  decode params (q [batch, q_heads, D], caches [batch, kv_heads, cap, D], ...)
/// \param num_splits  splits per head; 1: also writes out [batch, q_heads, D] and evicts
/// \param ws  partial states [batch, kv_heads, splits, G, ...] when num_splits > 1
template <typename T, int DPAD, int DCONST, int HPT>
__global__ void __launch_bounds__(decode_detail::kThreads, 2)
    DecodeAttendKernel(const __grid_constant__ decode_params_t p, int num_splits, decode_ws_t ws) {
  using Tr = decode_detail::traits<T, DPAD>;
  constexpr int VEC = Tr::VEC, NVEC = Tr::NVEC, BDX = Tr::BDX, E = Tr::E, TK = Tr::TK;
  constexpr int NCOL = Tr::NCOL;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ decode_detail::fin_smem_t fin;

  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int S = num_splits;
  const int bh = b * p.kv_heads + h;
  const int D = DCONST ? DCONST : p.head_dim;
  const int G = p.q_heads / p.kv_heads;
  const int HG = G / HPT;
  const int TW = Tr::WORKERS / HG;
  const int tid = threadIdx.x;
  constexpr int kSmemCap = decode_detail::smem_bytes<T, DPAD, HPT>();
  __shared__ __align__(16) T snew[2 * decode_detail::kMaxHeadDim];  // k_new, v_new of bh

  // Lane-group (worker) layout. q is loaded first, in the same round trip as positions and
  // lens (its address depends on neither).
  const int worker = tid / BDX, lane = tid % BDX;
  const int hg = worker % HG, tw = worker / HG;
  float q[HPT][E];
  float acc[HPT][E];
  float m[HPT], d[HPT];
  constexpr float kLog2e = 1.4426950408889634f;
#pragma unroll
  for (int hh = 0; hh < HPT; ++hh) {
    const T* qr = static_cast<const T*>(p.q) +
                  (static_cast<size_t>(b) * p.q_heads + h * G + hg * HPT + hh) * D;
#pragma unroll
    for (int v = 0; v < NVEC; ++v) {
      const int col = v * BDX + lane;
      if (DCONST != 0 || col * VEC < D) {
        load_vec_f32<T>(qr + col * VEC, &q[hh][v * VEC]);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) q[hh][v * VEC + e] = 0.f;
      }
    }
#pragma unroll
    for (int e = 0; e < E; ++e) {
      q[hh][e] *= p.scale * kLog2e;  // exp2 domain
      acc[hh][e] = 0.f;
    }
    m[hh] = -INFINITY;
    d[hh] = 0.f;
  }


  const int pos_new = p.new_position(b);
  const int len = p.lens[bh];  // loaded with positions: one round trip, not two
  const float lam_in = p.lam_new[bh];
  if (pos_new < 0) {  // inactive slot: cache untouched, output zeros
    if (split == 0) zero_out_rows<T>(p, b, h, D);
    return;
  }
  if (tid == 0) fin.lam_new = lam_in;  // read after the barriers below
  const int tcount = pos_new + 1;
  const int n_total = len + 1;
  const int chunk = (n_total + S - 1) / S;
  const int start = min(n_total, split * chunk);
  const int end = min(n_total, start + chunk);
  const bool has_new = start <= len && len < end;
  const bool need_victim = !p.pooled() && p.buffer == 0 && len >= p.memory;
  const bool need_append = p.pooled() || ((p.buffer > 0 || len < p.memory) && len < p.cap);

  if (has_new && p.knorm) {
    new_token_lognorm<T>(p, bh, D, fin);
    __syncthreads();
  }

  const size_t mbase = p.head_base(bh);
  const T* kc = static_cast<const T*>(p.k_cache) + mbase * D;
  const T* vc = static_cast<const T*>(p.v_cache) + mbase * D;
  const T* kn = static_cast<const T*>(p.k_new) + static_cast<size_t>(bh) * D;
  const T* vn = static_cast<const T*>(p.v_new) + static_cast<size_t>(bh) * D;
  T* sk = reinterpret_cast<T*>(smem_raw);
  T* sv = sk + TK * DPAD;
  constexpr int STAGE_ELEMS = 2 * TK * DPAD;

  auto load_tile = [&](int t0, int stage) {
    T* dk = sk + stage * STAGE_ELEMS;
    T* dv = sv + stage * STAGE_ELEMS;
#pragma unroll
    for (int i = 0; i < TK * NCOL / decode_detail::kThreads; ++i) {
      const int idx = tid + i * decode_detail::kThreads;
      const int row = idx / NCOL, col = idx % NCOL;
      const int j = t0 + row;
      const bool ok = j < end && (DCONST != 0 || col * VEC < D);
      const T* gk = kc;
      const T* gv = vc;
      if (ok) {
        if (j < len) {
          gk = kc + static_cast<size_t>(j) * D + col * VEC;
          gv = vc + static_cast<size_t>(j) * D + col * VEC;
        } else {
          gk = kn + col * VEC;
          gv = vn + col * VEC;
        }
      }
      cp_async16(dk + row * DPAD + col * VEC, gk, ok);
      cp_async16(dv + row * DPAD + col * VEC, gv, ok);
    }
  };

  unsigned long long vkey = ~0ull;
  int vslot = -1;

  // Prefetch k_new / v_new of this head into shared memory (first cp.async group): the append
  // or victim write at the end then needs no global round trip.
  for (int c = tid; c < 2 * (D / VEC); c += decode_detail::kThreads) {
    const int kv = c >= D / VEC ? 1 : 0;
    const int cc = c - kv * (D / VEC);
    cp_async16(snew + kv * D + cc * VEC, (kv ? vn : kn) + cc * VEC, true);
  }
  constexpr int STAGES = Tr::STAGES;
  const int ntiles = (end - start + TK - 1) / TK;
#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (st < ntiles) load_tile(start + st * TK, st);
    cp_async_commit();  // empty groups keep the group count uniform
  }
  for (int it = 0; it < ntiles; ++it) {
    const int t0 = start + it * TK;
    // Victim candidate keys of this tile (B == 0 with a full cache only).
    if (need_victim && tid < TK) {
      const int j = t0 + tid;
      if (j < end) {
        int pos;
        float lam, ln = 0.f;
        if (j < len) {
          pos = p.pos_cache[mbase + j];
          lam = p.lam_cache[mbase + j];
          if (p.knorm) ln = p.lognorm_cache[mbase + j];
        } else {
          pos = pos_new;
          lam = p.lam_new[bh];
          if (p.knorm) ln = fin.lognorm;
        }
        const unsigned long long k =
            topk::keep_key(cache_score(lam, pos, tcount, p.window, p.knorm, ln), pos);
        if (k < vkey) { vkey = k; vslot = j; }
      }
    }
    // Tile it is the oldest of STAGES - 1 outstanding groups.
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    // Refill the stage freed by tile it - 1 (every thread passed the barrier above).
    if (it + STAGES - 1 < ntiles) load_tile(t0 + (STAGES - 1) * TK, (it + STAGES - 1) % STAGES);
    cp_async_commit();
    const T* tk = sk + (it % STAGES) * STAGE_ELEMS;
    const T* tv = sv + (it % STAGES) * STAGE_ELEMS;
    for (int grp = tw; grp < TK / 4; grp += TW) {
      float s[4][HPT];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int t = grp * 4 + i;
        float kf[E];
#pragma unroll
        for (int v = 0; v < NVEC; ++v)
          load_vec_f32<T>(tk + t * DPAD + (v * BDX + lane) * VEC, &kf[v * VEC]);
#pragma unroll
        for (int hh = 0; hh < HPT; ++hh) {
          float a = 0.f;
#pragma unroll
          for (int e = 0; e < E; ++e) a = fmaf(q[hh][e], kf[e], a);
          s[i][hh] = a;
        }
      }
#pragma unroll
      for (int o = BDX / 2; o > 0; o >>= 1) {
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int hh = 0; hh < HPT; ++hh) s[i][hh] += __shfl_xor_sync(0xffffffffu, s[i][hh], o);
      }
      float pr[4][HPT];
#pragma unroll
      for (int hh = 0; hh < HPT; ++hh) {
        float mx = m[hh];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          if (t0 + grp * 4 + i >= end) s[i][hh] = -INFINITY;
          mx = fmaxf(mx, s[i][hh]);
        }
        // An all-masked group with an empty state keeps mx = -inf; use 0 as the reference so
        // that exp2(-inf - ref) = 0 instead of NaN.
        const float ref = mx == -INFINITY ? 0.f : mx;
        const float alpha = exp2f(m[hh] - ref);
        float sum = 0.f;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          pr[i][hh] = exp2f(s[i][hh] - ref);
          sum += pr[i][hh];
        }
        d[hh] = d[hh] * alpha + sum;
        m[hh] = mx;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[hh][e] *= alpha;
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int t = grp * 4 + i;
        float vf[E];
#pragma unroll
        for (int v = 0; v < NVEC; ++v)
          load_vec_f32<T>(tv + t * DPAD + (v * BDX + lane) * VEC, &vf[v * VEC]);
#pragma unroll
        for (int hh = 0; hh < HPT; ++hh)
#pragma unroll
          for (int e = 0; e < E; ++e) acc[hh][e] = fmaf(pr[i][hh], vf[e], acc[hh][e]);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the merge below reuses the pipeline buffers

  if (need_victim) block_min_key(vkey, vslot, fin);

  // Merge the lane-group states of each head through shared memory.
  float* smd = reinterpret_cast<float*>(smem_raw);                 // [WORKERS][HPT][2]
  float* sacc = smd + Tr::WORKERS * HPT * 2;                       // [WORKERS][HPT][DPAD]
#pragma unroll
  for (int hh = 0; hh < HPT; ++hh) {
    if (lane == 0) {
      smd[(worker * HPT + hh) * 2] = m[hh];
      smd[(worker * HPT + hh) * 2 + 1] = d[hh];
    }
#pragma unroll
    for (int v = 0; v < NVEC; ++v)
#pragma unroll
      for (int e = 0; e < VEC; ++e)
        sacc[(worker * HPT + hh) * DPAD + (v * BDX + lane) * VEC + e] = acc[hh][v * VEC + e];
  }
  __syncthreads();
  for (int item = tid; item < G * NCOL; item += decode_detail::kThreads) {
    const int g = item / NCOL, col = item % NCOL;
    if (DCONST == 0 && col * VEC >= D) continue;
    const int ghg = g / HPT, hh = g % HPT;
    float mx = -INFINITY;
    for (int t = 0; t < TW; ++t) mx = fmaxf(mx, smd[((t * HG + ghg) * HPT + hh) * 2]);
    const float ref = mx == -INFINITY ? 0.f : mx;
    float dsum = 0.f, o[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) o[e] = 0.f;
    for (int t = 0; t < TW; ++t) {
      const int w = t * HG + ghg;
      const float f = exp2f(smd[(w * HPT + hh) * 2] - ref);
      dsum += smd[(w * HPT + hh) * 2 + 1] * f;
#pragma unroll
      for (int e = 0; e < VEC; ++e) o[e] += sacc[(w * HPT + hh) * DPAD + col * VEC + e] * f;
    }
    if (S == 1) {
      const float inv = 1.f / dsum;  // dsum >= 1: the new token is always in the only split
#pragma unroll
      for (int e = 0; e < VEC; ++e) o[e] *= inv;
      store_vec_f32<T>(static_cast<T*>(p.out) +
                           (static_cast<size_t>(b) * p.q_heads + h * G + g) * D + col * VEC,
                       o);
    } else {
      const size_t row = (static_cast<size_t>(bh) * S + split) * G + g;
      float* wa = ws.acc + row * decode_detail::kMaxHeadDim + col * VEC;
#pragma unroll
      for (int e = 0; e < VEC; e += 4)
        *reinterpret_cast<float4*>(wa + e) = make_float4(o[e], o[e + 1], o[e + 2], o[e + 3]);
      if (col == 0) *reinterpret_cast<float4*>(ws.md + row * 4) = make_float4(mx, dsum, 0.f, 0.f);
    }
  }
  if (S > 1 && need_victim && tid == 0) {
    *reinterpret_cast<ulonglong2*>(ws.vkey + (static_cast<size_t>(bh) * S + split) * 2) =
        make_ulonglong2(fin.vkey, static_cast<unsigned long long>(fin.vslot));
  }
  // Append: slot len is read by no block this step (the new token is read from k_new).
  if (has_new && need_append) write_new_token<T>(p, b, bh, D, len, pos_new, fin, snew);
  if (S == 1) {
    __syncthreads();
    finalize_head<T>(p, b, h, D, len, pos_new, need_victim ? fin.vslot : -1,
                     ws.list + static_cast<size_t>(bh) * 2 * max(p.buffer, 1), fin, snew,
                     smem_raw, kSmemCap);
    return;
  }
  // Split-K: the last block of this head to arrive merges the states and evicts, so that the
  // step is one launch. Release: every thread fences its writes before the arrival count.
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    const int prev = atomicAdd(ws.counter + bh, 1);
    fin.last = prev == S - 1;
    if (fin.last) ws.counter[bh] = 0;  // leave the counter zeroed for the next step
  }
  __syncthreads();
  if (!fin.last) return;
  __threadfence();  // acquire side: order the reads below after the count
  merge_splits_and_finalize<T, DPAD, DCONST>(p, b, h, len, pos_new, S, ws, fin, smem_raw, false,
                                             smem_raw, kSmemCap, snew);
}

// ---- PTX helpers of the tensor-core kernel (sm_80+; clusters sm_90+) beyond mma.cuh's ------
namespace decode_ptx {
namespace {

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
    case 0: cp_async_wait<0>(); break;
    case 1: cp_async_wait<1>(); break;
    case 2: cp_async_wait<2>(); break;
    case 3: cp_async_wait<3>(); break;
    case 4: cp_async_wait<4>(); break;
    case 5: cp_async_wait<5>(); break;
    case 6: cp_async_wait<6>(); break;
    default: cp_async_wait<7>(); break;
  }
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
/// Transposes the 8x8 b16 matrix held as one fragment register per lane.
__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

#endif  // __CUDA_ARCH__ >= 800

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void cluster_arrive_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_arrive_release() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_wait_acquire() {
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
/// Address of the same shared-memory offset in the block of cluster rank `rank`.
__device__ __forceinline__ uint32_t cluster_map(uint32_t addr, uint32_t rank) {
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(addr), "r"(rank));
  return r;
}
__device__ __forceinline__ void st_cluster_f4(uint32_t addr, float a, float b, float c, float d) {
  asm volatile("st.shared::cluster.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "f"(a), "f"(b),
               "f"(c), "f"(d)
               : "memory");
}
__device__ __forceinline__ void st_cluster_u64x2(uint32_t addr, unsigned long long a,
                                                 unsigned long long b) {
  asm volatile("st.shared::cluster.v2.u64 [%0], {%1, %2};\n" ::"r"(addr), "l"(a), "l"(b)
               : "memory");
}
#endif  // __CUDA_ARCH__ >= 900

}  // namespace
}  // namespace decode_ptx

/// B = 0 eviction by one warp: the minimum of the (key, slot) candidates the lanes hold, then
/// the new token written over that victim (k, v from snew, pos, lam, lognorm). A victim slot
/// of len (or none) means the new token itself is the victim: it is dropped. lognorm: with
/// knorm, compute ln ||k_new|| first (this block has not yet).
template <typename T>
__device__ __forceinline__ void mma_victim_write(const decode_params_t& p, int bh, int D, int len,
                                                 int pos_new, unsigned long long key, int slot,
                                                 decode_detail::fin_smem_t& fin, const T* snew,
                                                 bool lognorm) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int x = 16; x > 0; x >>= 1) {
    const unsigned long long k2 = __shfl_xor_sync(0xffffffffu, key, x);
    const int s2 = __shfl_xor_sync(0xffffffffu, slot, x);
    if (k2 < key) { key = k2; slot = s2; }
  }
  if (lognorm && p.knorm) key_lognorm<T>(snew, D, fin);  // lane 0 writes, lane 0 reads
  if (slot < 0 || slot >= len) return;
  const size_t m = p.head_base(bh) + slot;
  for (int c = lane; c < 2 * (D / 8); c += 32) {
    const int kv = c >= D / 8 ? 1 : 0;
    const int cc = c - kv * (D / 8);
    copy16(static_cast<T*>(kv ? p.v_cache : p.k_cache) + m * D + cc * 8, snew + kv * D + cc * 8);
  }
  if (lane == 0) {
    p.pos_cache[m] = pos_new;
    p.lam_cache[m] = fin.lam_new;
    if (p.knorm) p.lognorm_cache[m] = fin.lognorm;
  }
}

/// Cluster rank 0 of head (b, h): merges the S split partials the cluster pushed into its
/// shared memory (part: (max, sum) [S*G] float4, victim (key, slot) [S*warps], acc
/// [S*G][DPAD]), writes out [batch, q_heads, D] and finishes the eviction. Whole block, in one
/// pass: warp 0 takes the victim first, so its writes overlap the output merge.
template <typename T, int DPAD, int DCONST>
__device__ void mma_cluster_merge_and_finalize(const decode_params_t& p, int b, int h, int len,
                                               int pos_new, int S, const decode_ws_t& ws,
                                               decode_detail::fin_smem_t& fin,
                                               const unsigned char* part, const T* snew,
                                               void* fin_smem, int fin_cap) {
  constexpr int NW = decode_detail::mma_traits<DPAD>::kWarps;
  const int D = DCONST ? DCONST : p.head_dim;
  const int G = p.q_heads / p.kv_heads;
  const int bh = b * p.kv_heads + h;
  const int tid = threadIdx.x, nthr = blockDim.x;
  const float4* md = reinterpret_cast<const float4*>(part);
  const ulonglong2* vk = reinterpret_cast<const ulonglong2*>(part + S * G * 16);
  const float* acc = reinterpret_cast<const float*>(part + S * G * 16 + S * NW * 16);
  const bool need_victim = !p.pooled() && p.buffer == 0 && len >= p.memory;
  if (need_victim && tid < 32) {
    unsigned long long k = ~0ull;
    int sl = -1;
    for (int i = tid; i < S * NW; i += 32) {
      const ulonglong2 r = vk[i];
      if (r.x < k) { k = r.x; sl = static_cast<int>(r.y); }
    }
    mma_victim_write<T>(p, bh, D, len, pos_new, k, sl, fin, snew, true);
  }
  // Items from warp 1 on first: warp 0 is busy with the victim.
  for (int item = (tid + nthr - 32) % nthr; item < G * (D / 8); item += nthr) {
    const int hh = item / (D / 8), c8 = item % (D / 8);
    float mx = -INFINITY;
    for (int s = 0; s < S; ++s) mx = fmaxf(mx, md[s * G + hh].x);
    float lsum = 0.f, ov[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int s = 0; s < S; ++s) {
      const float4 r = md[s * G + hh];
      // An empty split (max -inf, sum 0) weighs 0, not exp2(-inf + inf) = NaN.
      const float f = r.x == -INFINITY ? 0.f : exp2f(r.x - mx);
      lsum += f * r.y;
      const float* a = acc + (s * G + hh) * DPAD + c8 * 8;
      const float4 a0 = *reinterpret_cast<const float4*>(a);
      const float4 a1 = *reinterpret_cast<const float4*>(a + 4);
      ov[0] += f * a0.x; ov[1] += f * a0.y; ov[2] += f * a0.z; ov[3] += f * a0.w;
      ov[4] += f * a1.x; ov[5] += f * a1.y; ov[6] += f * a1.z; ov[7] += f * a1.w;
    }
    const float inv = 1.f / lsum;  // >= 1 term: the split holding the new token
#pragma unroll
    for (int e = 0; e < 8; ++e) ov[e] *= inv;
    store_vec_f32<T>(
        static_cast<T*>(p.out) + (static_cast<size_t>(b) * p.q_heads + h * G + hh) * D + c8 * 8,
        ov);
  }
  if (!need_victim) {  // append already done by split S - 1: lens, B > 0 compaction
    __syncthreads();
    finalize_head<T>(p, b, h, D, len, pos_new, -1,
                     ws.list + static_cast<size_t>(bh) * 2 * max(p.buffer, 1), fin, snew, fin_smem,
                     fin_cap);
  }
}

/// Tensor-core attention over one split of head (b, h) for fp16/bf16 storage and G <= 8 query
/// heads per KV head, fused with the append and eviction (see the file comment).
///
/// Per warp and 16-token slab: S^T [16 tokens x 8 heads] = K [16 x DPAD] . Q^T (A = K from
/// shared memory by ldmatrix, B = q in registers for the whole step, heads >= G zero); online
/// softmax per head in fp32 (each lane holds 2 tokens x 2 heads; the max is reduced over the 8
/// lanes of a head, the sum stays per lane until the end); P^T moves to the B layout by
/// movmatrix; O^T [DPAD x 8 heads] += V^T . P^T (A = V by transposing ldmatrix). Warps merge
/// through shared memory at the end; splits merge as described in the file comment.
///
/// Split s owns the slots [s * chunk, (s + 1) * chunk) of the head, chunk = ceil(L / S) with L
/// = cap (fixed layout: known at launch, so the first tiles are issued before lens/positions
/// arrive; slots >= len are masked) or L = len (pooled). The new token is attended from
/// k_new/v_new by split S - 1.
/// grid (num_splits, kv_heads, batch), block 128, dynamic smem dyn_smem:
///   [stages x mma_traits::STAGE_BYTES][cluster: merge_smem_bytes(S, G, DPAD) partials of rank 0].
/// \param p       decode params (q [batch, q_heads, D], caches [slots, D], ...)
/// \param num_splits  splits per head (S)
/// \param ws      workspace: list; S > 1 without cluster: partials [batch, kv_heads, S, G, ...]
/// \param nst     pipeline stages allocated (1 .. mma_traits::kMaxStages)
/// \param cluster 1: the S blocks of a head form a cluster (sm_90, S <= kMaxClusterSplits)
/// \param dyn_smem bytes of dynamic shared memory of this launch
template <typename T, int DPAD, int DCONST>
__global__ void __launch_bounds__(decode_detail::mma_traits<DPAD>::kThreads, 2)
    DecodeMmaKernel(const __grid_constant__ decode_params_t p, int num_splits, decode_ws_t ws, int nst, int cluster,
                    int dyn_smem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Tr = decode_detail::mma_traits<DPAD>;
  constexpr int TK = Tr::TK, NCH = Tr::NCH, NW = Tr::kWarps, NT = Tr::kThreads;
  constexpr int ROWB = Tr::ROW_BYTES;
  constexpr int KS = DPAD / 16;  // k-steps of q.K^T, 16-dim steps of P.V
  constexpr float kLog2e = 1.4426950408889634f;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ decode_detail::fin_smem_t fin;
  // k_new [0, D), v_new [D, 2D), zeros [2D, 2D + DPAD): the zero row stands in for the V rows
  // of masked tokens (stale slots may hold NaN, and 0 * NaN would leak into the sums) and
  // pads the k_new / v_new rows up to DPAD.
  __shared__ __align__(16) T snew[3 * decode_detail::kMaxHeadDim];

  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int S = num_splits;
  const int bh = b * p.kv_heads + h;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g8 = lane >> 2, q4 = lane & 3;  // fragment row / column pair of this lane
  const int D = DCONST ? DCONST : p.head_dim;
  const int G = p.q_heads / p.kv_heads;
  const bool pooled = p.pooled();
  const bool use_cluster = cluster != 0;
#if __CUDA_ARCH__ >= 900
  // Phase 0 of the cluster barrier: "this block has started". Waited on before the first
  // write into another block's shared memory, long after every block arrived.
  if (use_cluster) decode_ptx::cluster_arrive_relaxed();
#endif
  const bool meta = !pooled && p.buffer == 0;  // B = 0: the victim search needs pos/lam
  size_t mbase = 0;
  int lo = 0, hi_spec = 0;
  const T* kc = nullptr;
  const T* vc = nullptr;
  // Loads the tile of slots [j0, j0 + TK) into stage st: rows >= hi_load are zero-filled.
  auto load_tile = [&](int j0, int hi_load, int st) {
    unsigned char* base = smem_raw + st * Tr::STAGE_BYTES;
    T* sk = reinterpret_cast<T*>(base);
    T* sv = reinterpret_cast<T*>(base + Tr::KV_BYTES);
#pragma unroll 4
    for (int i = tid; i < TK * NCH; i += NT) {
      const int r = i / NCH, c = i % NCH;
      const bool ok = j0 + r < hi_load && (DCONST != 0 || c * 8 < D);
      const size_t off = ok ? static_cast<size_t>(j0 + r) * D + c * 8 : 0;  // from kc / vc
      const int e = (r * NCH + (c ^ (r & 7))) * 8;
      cp_async16(sk + e, kc + off, ok);
      cp_async16(sv + e, vc + off, ok);
    }
    if (meta) {
      int* sm = reinterpret_cast<int*>(base + 2 * Tr::KV_BYTES);
      for (int r = tid; r < TK; r += NT) {
        const bool ok = j0 + r < hi_load;
        const size_t m = ok ? mbase + j0 + r : 0;
        decode_ptx::cp_async4(sm + r, p.pos_cache + m, ok);
        decode_ptx::cp_async4(sm + TK + r, p.lam_cache + m, ok);
        if (p.knorm) decode_ptx::cp_async4(sm + 2 * TK + r, p.lognorm_cache + m, ok);
      }
    }
  };
  int ntiles_spec = 0, pro_groups = 0;
  bool at_once = false;
  // Prologue, part 1: as many tiles of the split as the pipeline holds (groups of their own).
  auto issue_tiles = [&]() {
    kc = static_cast<const T*>(p.k_cache) + mbase * D;
    vc = static_cast<const T*>(p.v_cache) + mbase * D;
    ntiles_spec = hi_spec > lo ? (hi_spec - lo + TK - 1) / TK : 0;
    at_once = ntiles_spec <= nst;
    if (at_once) {  // the whole split in one group: one round trip
      for (int t = 0; t < ntiles_spec; ++t) load_tile(lo + t * TK, hi_spec, t);
      cp_async_commit();
      pro_groups = 1;
    } else {
      for (int st = 0; st < nst - 1; ++st) {
        load_tile(lo + st * TK, hi_spec, st);  // st < nst - 1 < ntiles_spec
        cp_async_commit();
      }
      pro_groups = nst - 1;
    }
  };
  // Part 2, after the wait: k_new / v_new, one group behind the tiles (a kernel ahead may have
  // written them). The tile loop attends the new token once this group has landed.
  auto issue_new = [&]() {
    const T* kn = static_cast<const T*>(p.k_new) + static_cast<size_t>(bh) * D;
    const T* vn = static_cast<const T*>(p.v_new) + static_cast<size_t>(bh) * D;
    for (int c = tid; c < 2 * (D / 8); c += NT) {
      const int kv = c >= D / 8 ? 1 : 0;
      const int cc = c - kv * (D / 8);
      cp_async16(snew + kv * D + cc * 8, (kv ? vn : kn) + cc * 8, true);
    }
    cp_async_commit();
  };
  // Fixed layout: the slots of this split are known without any load. Slots past len hold
  // stale data; they are read (one tile at most per stage) and masked.
  auto fixed_tiles = [&]() {
    mbase = static_cast<size_t>(bh) * p.cap;
    const int chunk = (p.cap + S - 1) / S;
    lo = min(p.cap, split * chunk);
    hi_spec = min(p.cap, lo + chunk);
    issue_tiles();
  };
  // Launched as a programmatic dependent on sm_90 (pdl.cuh). Before the wait nothing reads
  // global memory but, where the host allows it (p.prefetch_before_wait, see DecodeStep), the
  // tiles of this layer's fixed-layout cache: no kernel that can still be running writes them.
  // Then wait for the kernels before this one (q, k_new / v_new, lens, lam_new may be theirs)
  // and let the next kernel of the stream get resident while this one runs.
  const bool early = !pooled && p.prefetch_before_wait != 0;
  if (early) fixed_tiles();
  pdl_wait();
  pdl_launch_dependents();
  TRIMKV_TRACE_AT(0);

  // The step's inputs, all in one round trip (no address depends on another load).
  const int pos_new = p.new_position(b);
  const int len_in = p.lens[bh];
  const int off_in = pooled ? p.head_off[bh] : 0;
  const float lam_in = p.lam_new[bh];
  uint32_t qf[KS][2];  // B fragments of q^T: head g8, dims 16 ks + 2 q4 (+1) and + 8 (+1)
  {
    const int hq = g8 < G ? g8 : 0;
    const uint32_t* qr = reinterpret_cast<const uint32_t*>(
        static_cast<const T*>(p.q) + (static_cast<size_t>(b) * p.q_heads + h * G + hq) * D);
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      const int d0 = 16 * ks + 2 * q4;
      qf[ks][0] = (g8 < G && (DCONST != 0 || d0 < D)) ? qr[d0 / 2] : 0u;
      qf[ks][1] = (g8 < G && (DCONST != 0 || d0 + 8 < D)) ? qr[(d0 + 8) / 2] : 0u;
    }
  }
  for (int i = tid; i < DPAD / 8; i += NT)
    *reinterpret_cast<uint4*>(snew + 2 * D + i * 8) = make_uint4(0, 0, 0, 0);

  if (!pooled) {
    if (!early) fixed_tiles();
    issue_new();
  }
  if (pos_new < 0) {  // inactive slot: cache untouched, output zeros
    cp_async_wait<0>();
    if (split == 0) zero_out_rows<T>(p, b, h, D);
    return;
  }
  const int len = len_in;
  if (tid == 0) fin.lam_new = lam_in;
  if (pooled) {
    mbase = static_cast<size_t>(off_in);
    const int chunk = (len + S - 1) / S;
    lo = min(len, split * chunk);
    hi_spec = min(len, lo + chunk);
    issue_tiles();
    issue_new();
  }
  TRIMKV_TRACE_AT(1);
  const int hi = min(hi_spec, len);  // cached tokens of this split: [lo, hi)
  const int ntiles = hi > lo ? (hi - lo + TK - 1) / TK : 0;
  const int tcount = pos_new + 1;
  const bool need_victim = !pooled && p.buffer == 0 && len >= p.memory;
  const bool need_append = pooled || ((p.buffer > 0 || len < p.memory) && len < p.cap);
  const bool new_block = split == S - 1;  // attends (and appends) the new token
  const float sl = p.scale * kLog2e;      // logits in the exp2 domain

  float m_run[2] = {-INFINITY, -INFINITY};  // heads 2 q4, 2 q4 + 1 (uniform over g8)
  float l_run[2] = {0.f, 0.f};              // this lane's part of the sums
  float o[KS][4];                           // O^T: dims 16 ds + g8 (+8) x heads 2 q4 (+1)
#pragma unroll
  for (int ds = 0; ds < KS; ++ds) o[ds][0] = o[ds][1] = o[ds][2] = o[ds][3] = 0.f;
  unsigned long long vkey = ~0ull;
  int vslot = -1;
  const uint32_t zero_row = mma::smem_u32(snew + 2 * D);

  // One 16-token slab: ka/kx = this lane's K row for ldmatrix (address, swizzle), va/vx its V
  // row (the zero row for masked tokens); valid = tokens of the slab that count (>= 1).
  auto attend_slab = [&](uint32_t ka, int kx, uint32_t va, int vx, int valid) {
    const int kc_off = lane >> 4, vc_off = (lane >> 3) & 1;
    // Two accumulator chains over the k-steps: half the dependent mma latency.
    float sc[4] = {0.f, 0.f, 0.f, 0.f}, sd[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      if (DCONST == 0 && 16 * ks >= D) break;
      uint32_t a[4];
      mma::ldsm_x4(a, ka + (((2 * ks + kc_off) ^ kx) << 4));
      mma::mma_16816<T>((ks & 1) ? sd : sc, a, qf[ks][0], qf[ks][1]);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) sc[i] += sd[i];
    // sc: tokens g8 (0, 1) and g8 + 8 (2, 3) x heads 2 q4, 2 q4 + 1. Masked tokens -> -inf by
    // select, so stale NaN/Inf never reaches the arithmetic.
    const bool t0ok = g8 < valid, t1ok = g8 + 8 < valid;
    const float s0 = t0ok ? sc[0] * sl : -INFINITY, s1 = t0ok ? sc[1] * sl : -INFINITY;
    const float s2 = t1ok ? sc[2] * sl : -INFINITY, s3 = t1ok ? sc[3] * sl : -INFINITY;
    float mx0 = fmaxf(s0, s2), mx1 = fmaxf(s1, s3);
#pragma unroll
    for (int x = 4; x < 32; x <<= 1) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, x));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, x));
    }
    // valid >= 1: mx is finite, so the references below are finite; exp2(-inf - ref) = 0.
    const float mn0 = fmaxf(m_run[0], mx0), mn1 = fmaxf(m_run[1], mx1);
    const float al0 = exp2f(m_run[0] - mn0), al1 = exp2f(m_run[1] - mn1);
    const float p0 = exp2f(s0 - mn0), p1 = exp2f(s1 - mn1);
    const float p2 = exp2f(s2 - mn0), p3 = exp2f(s3 - mn1);
    l_run[0] = l_run[0] * al0 + (p0 + p2);
    l_run[1] = l_run[1] * al1 + (p1 + p3);
    m_run[0] = mn0;
    m_run[1] = mn1;
    // P^T rows (tokens) x cols (heads) -> B fragments (k = tokens, n = heads).
    const uint32_t pb0 = decode_ptx::movmatrix_trans(mma::pack2<T>(p0, p1));
    const uint32_t pb1 = decode_ptx::movmatrix_trans(mma::pack2<T>(p2, p3));
#pragma unroll
    for (int ds = 0; ds < KS; ++ds) {
      if (DCONST == 0 && 16 * ds >= D) break;
      o[ds][0] *= al0;
      o[ds][1] *= al1;
      o[ds][2] *= al0;
      o[ds][3] *= al1;
      uint32_t a[4];
      mma::ldsm_x4_trans(a, va + (((2 * ds + vc_off) ^ vx) << 4));
      mma::mma_16816<T>(o[ds], a, pb0, pb1);
    }
  };

  // The new token as a slab of one (every K row is k_new, V row 0 is v_new), by the last warp
  // of the last split, once its group has landed and a barrier made it visible.
  auto attend_new = [&]() {
    if (p.knorm) key_lognorm<T>(snew, D, fin);
    if (warp == NW - 1) {
      const int rv = (lane & 7) + (lane >> 4) * 8;
      attend_slab(mma::smem_u32(snew), 0,
                  rv == 0 ? mma::smem_u32(snew + D) : zero_row, 0, 1);
    }
  };
  // Groups in flight: the prologue's tiles (pro_groups), then k_new / v_new, then one per
  // pipelined iteration. The k_new / v_new group has landed after the wait of iteration
  // new_it (one stage: the first wait takes every group). At once, the tiles are attended
  // while it may still be in flight, the new token after the loop.
  const int new_it = at_once ? ntiles : nst == 1 ? 0 : pro_groups;

  // Tile loop. at_once: every tile of the split is in flight already (one group). Otherwise a
  // nst-stage pipeline: wait for tile it, refill the stage freed by tile it - 1.
  for (int it = 0; it < ntiles; ++it) {
    int st;
    if (at_once) {
      st = it;
      if (it == 0) {
        cp_async_wait<1>();  // the tiles' group; k_new / v_new's may still be in flight
        __syncthreads();
      }
    } else if (nst == 1) {
      st = 0;
      if (it > 0) __syncthreads();  // every warp is done with the previous tile
      load_tile(lo + it * TK, hi, 0);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
    } else {
      st = it % nst;
      // Tile it is group it of the prologue (it < pro_groups) or comes after k_new / v_new;
      // nst - 1 + 1 + it groups are committed so far.
      decode_ptx::cp_async_wait_dyn(it < pro_groups ? nst - 1 : nst - 2);
      __syncthreads();
      const int nx = it + nst - 1;
      if (nx < ntiles) load_tile(lo + nx * TK, hi, nx % nst);
      cp_async_commit();
    }
    if (it == 0) TRIMKV_TRACE_AT(2);
    if (new_block && it == new_it) attend_new();
    const int s0 = lo + it * TK + warp * 16;  // first token of this warp's slab
    if (s0 < hi) {
      const unsigned char* base = smem_raw + st * Tr::STAGE_BYTES;
      if (need_victim && lane < 16 && s0 + lane < hi) {
        const int* sm = reinterpret_cast<const int*>(base + 2 * Tr::KV_BYTES);
        const int r = warp * 16 + lane;
        const int pos = sm[r];
        const float lam = __int_as_float(sm[TK + r]);
        const float ln = p.knorm ? __int_as_float(sm[2 * TK + r]) : 0.f;
        const unsigned long long k =
            topk::keep_key(cache_score(lam, pos, tcount, p.window, p.knorm, ln), pos);
        if (k < vkey) { vkey = k; vslot = s0 + lane; }
      }
      const int valid = hi - s0;
      const uint32_t kb = mma::smem_u32(base), vb = kb + Tr::KV_BYTES;
      const int rk = warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
      const int rv = warp * 16 + (lane & 7) + (lane >> 4) * 8;
      const bool vok = rv - warp * 16 < valid;
      attend_slab(kb + rk * ROWB, rk & 7, vok ? vb + rv * ROWB : zero_row, vok ? (rv & 7) : 0,
                  valid);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // k_new / v_new landed; the pipeline buffers are free
  if (new_block && ntiles <= new_it) attend_new();
  TRIMKV_TRACE_AT(3);
  // Per-warp sums, then the warp partials into the first stage.
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int x = 4; x < 32; x <<= 1) l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], x);
  float* wo = reinterpret_cast<float*>(smem_raw);  // [NW][8][WSTRIDE]
  float* wml = wo + NW * 8 * Tr::WSTRIDE;            // [NW][8] (max, sum)
#pragma unroll
  for (int ds = 0; ds < KS; ++ds) {
    const int d = 16 * ds + g8;
    float* r0 = wo + (warp * 8 + 2 * q4) * Tr::WSTRIDE;
    r0[d] = o[ds][0];
    r0[Tr::WSTRIDE + d] = o[ds][1];
    r0[d + 8] = o[ds][2];
    r0[Tr::WSTRIDE + d + 8] = o[ds][3];
  }
  if (g8 == 0) {
    wml[(warp * 8 + 2 * q4) * 2] = m_run[0];
    wml[(warp * 8 + 2 * q4) * 2 + 1] = l_run[0];
    wml[(warp * 8 + 2 * q4 + 1) * 2] = m_run[1];
    wml[(warp * 8 + 2 * q4 + 1) * 2 + 1] = l_run[1];
  }
  if (need_victim) {
    // The new token is a victim candidate too (slot len: "dropped"). fin.lam_new and
    // fin.lognorm were written by this very thread (tid 0 = warp 0, lane 0).
    if (new_block && tid == 0) {
      const unsigned long long k = topk::keep_key(
          cache_score(fin.lam_new, pos_new, tcount, p.window, p.knorm, fin.lognorm), pos_new);
      if (k < vkey) { vkey = k; vslot = len; }
    }
    // Warp minimum; every lane holds it after the butterfly.
#pragma unroll
    for (int x = 16; x > 0; x >>= 1) {
      const unsigned long long k2 = __shfl_xor_sync(0xffffffffu, vkey, x);
      const int s2 = __shfl_xor_sync(0xffffffffu, vslot, x);
      if (k2 < vkey) { vkey = k2; vslot = s2; }
    }
  }
  __syncthreads();  // warp partials (and fin.lognorm) are visible
  // Append: slot len is read by no block this step (masked where a stale tile covers it).
  if (new_block && need_append) write_new_token<T>(p, b, bh, D, len, pos_new, fin, snew);

  // Combine the warps: 8 consecutive dims of one head per item.
  const size_t prow = (static_cast<size_t>(bh) * S + split) * G;  // workspace partial row
  uint32_t recv = 0;  // rank 0's partials (cluster): md [S*G] float4, vk [S*NW], acc [S*G][DPAD]
#if __CUDA_ARCH__ >= 900
  if (use_cluster) {
    decode_ptx::cluster_wait_acquire();  // phase 0: every block of the cluster has started
    recv = decode_ptx::cluster_map(mma::smem_u32(smem_raw + nst * Tr::STAGE_BYTES), 0);
  }
#endif
  const uint32_t r_md = recv;
  const uint32_t r_vk = r_md + S * G * 16;
  const uint32_t r_acc = r_vk + S * NW * 16;
  for (int item = tid; item < G * (D / 8); item += NT) {
    const int hh = item / (D / 8), c8 = item % (D / 8);
    float mw[NW], mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < NW; ++w) {
      mw[w] = wml[(w * 8 + hh) * 2];
      mx = fmaxf(mx, mw[w]);
    }
    float lsum = 0.f, ov[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int w = 0; w < NW; ++w) {
      // A warp without tokens (max -inf) weighs 0; so does a whole empty split (mx -inf).
      const float f = mw[w] == -INFINITY ? 0.f : exp2f(mw[w] - mx);
      lsum += f * wml[(w * 8 + hh) * 2 + 1];
      const float* wr = wo + (w * 8 + hh) * Tr::WSTRIDE + c8 * 8;
      const float4 a = *reinterpret_cast<const float4*>(wr);
      const float4 c = *reinterpret_cast<const float4*>(wr + 4);
      ov[0] += f * a.x; ov[1] += f * a.y; ov[2] += f * a.z; ov[3] += f * a.w;
      ov[4] += f * c.x; ov[5] += f * c.y; ov[6] += f * c.z; ov[7] += f * c.w;
    }
    if (S == 1) {
      const float inv = 1.f / lsum;  // >= 1 term: the new token is in the only split
#pragma unroll
      for (int e = 0; e < 8; ++e) ov[e] *= inv;
      store_vec_f32<T>(static_cast<T*>(p.out) +
                           (static_cast<size_t>(b) * p.q_heads + h * G + hh) * D + c8 * 8,
                       ov);
    } else if (use_cluster) {
#if __CUDA_ARCH__ >= 900
      const int row = split * G + hh;
      const uint32_t a = r_acc + (row * DPAD + c8 * 8) * 4;
      decode_ptx::st_cluster_f4(a, ov[0], ov[1], ov[2], ov[3]);
      decode_ptx::st_cluster_f4(a + 16, ov[4], ov[5], ov[6], ov[7]);
      if (c8 == 0) decode_ptx::st_cluster_f4(r_md + row * 16, mx, lsum, 0.f, 0.f);
#endif
    } else {
      float* wa = ws.acc + (prow + hh) * decode_detail::kMaxHeadDim + c8 * 8;
      *reinterpret_cast<float4*>(wa) = make_float4(ov[0], ov[1], ov[2], ov[3]);
      *reinterpret_cast<float4*>(wa + 4) = make_float4(ov[4], ov[5], ov[6], ov[7]);
      if (c8 == 0)
        *reinterpret_cast<float4*>(ws.md + (prow + hh) * 4) = make_float4(mx, lsum, 0.f, 0.f);
    }
  }
  TRIMKV_TRACE_AT(4);
  if (S == 1) {
    if (need_victim) {
      // The minimum of the warp minima, by warp 0, which then writes the new token over the
      // victim (nothing to do when the victim is the new token itself).
      if (lane == 0) {
        fin.vkey_w[warp] = vkey;
        fin.vslot_w[warp] = vslot;
      }
      __syncthreads();
      if (warp == 0) {
        unsigned long long k = lane < NW ? fin.vkey_w[lane] : ~0ull;
        int sl = lane < NW ? fin.vslot_w[lane] : -1;
        mma_victim_write<T>(p, bh, D, len, pos_new, k, sl, fin, snew, false);
      }
    } else {
      __syncthreads();  // finalize_head may reuse the merge area
      finalize_head<T>(p, b, h, D, len, pos_new, -1,
                       ws.list + static_cast<size_t>(bh) * 2 * max(p.buffer, 1), fin, snew,
                       smem_raw, dyn_smem);
    }
    TRIMKV_TRACE_AT(5);
    return;
  }
  if (use_cluster) {
#if __CUDA_ARCH__ >= 900
    if (need_victim && lane == 0)
      decode_ptx::st_cluster_u64x2(r_vk + (split * NW + warp) * 16, vkey,
                                   static_cast<unsigned long long>(vslot));
    // Phase 1: every partial (and the append / global writes before it) is visible to rank 0.
    decode_ptx::cluster_arrive_release();
    decode_ptx::cluster_wait_acquire();
    if (split != 0) {
      TRIMKV_TRACE_AT(5);
      return;
    }
    mma_cluster_merge_and_finalize<T, DPAD, DCONST>(p, b, h, len, pos_new, S, ws, fin,
                                                    smem_raw + nst * Tr::STAGE_BYTES, snew,
                                                    smem_raw, nst * Tr::STAGE_BYTES);
    TRIMKV_TRACE_AT(5);
    TRIMKV_TRACE_VAL(7, 1ull << 32);
#endif
    return;
  }
  // No cluster: the last block of this head to arrive merges (partials through L2).
  if (need_victim) {
    block_min_key(vkey, vslot, fin);  // synchronises
    if (tid == 0)
      *reinterpret_cast<ulonglong2*>(ws.vkey + (static_cast<size_t>(bh) * S + split) * 2) =
          make_ulonglong2(fin.vkey, static_cast<unsigned long long>(fin.vslot));
  }
  // The arrival: after the barrier, thread 0's acq_rel add releases the block's writes
  // (cumulatively through the barrier, as a cooperative-groups grid sync does) and, in the
  // last block, acquires the others' before the next barrier: no fence in every thread (H100,
  // batch 8: 0.4-0.8 us a step). That block resets the counter for the next step (no other
  // block of this step touches it again).
  __syncthreads();
  if (tid == 0) {
    int prev;
    asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;\n"
                 : "=r"(prev) : "l"(ws.counter + bh) : "memory");
    fin.last = prev == S - 1;
    if (fin.last) ws.counter[bh] = 0;
  }
  __syncthreads();
  if (!fin.last) {
    TRIMKV_TRACE_AT(5);
    return;
  }
  merge_splits_and_finalize<T, DPAD, DCONST>(p, b, h, len, pos_new, S, ws, fin, smem_raw, false,
                                             smem_raw, dyn_smem, snew);
  TRIMKV_TRACE_AT(5);
  TRIMKV_TRACE_VAL(7, 1ull << 32);
#endif  // __CUDA_ARCH__ >= 800
}

namespace decode_detail {

/// Carves the workspace for `splits` splits.
inline decode_ws_t carve_workspace(const decode_params_t& p, int splits, void* workspace) {
  decode_ws_t ws;
  const size_t bhs = static_cast<size_t>(p.batch) * p.kv_heads;
  const size_t G = p.kv_heads > 0 ? static_cast<size_t>(p.q_heads / p.kv_heads) : 0;
  auto align = [](size_t x) { return (x + 255) & ~static_cast<size_t>(255); };
  char* base = static_cast<char*>(workspace);
  size_t off = 0;
  ws.counter = reinterpret_cast<int*>(base + off);
  off += align(bhs * sizeof(int));
  ws.list = reinterpret_cast<int*>(base + off);
  off += align(bhs * 2 * static_cast<size_t>(p.buffer > 0 ? p.buffer : 1) * sizeof(int));
  if (splits > 1) {
    ws.acc = reinterpret_cast<float*>(base + off);
    off += align(bhs * splits * G * kMaxHeadDim * sizeof(float));
    ws.md = reinterpret_cast<float*>(base + off);
    off += align(bhs * splits * G * 4 * sizeof(float));
    ws.vkey = reinterpret_cast<unsigned long long*>(base + off);
    off += align(bhs * splits * 2 * sizeof(unsigned long long));
  }
  if (workspace == nullptr) ws = decode_ws_t{};
  (void)off;
  return ws;
}

template <typename T, int DPAD, int DCONST, int HPT>
cudaError_t launch_decode(const decode_params_t& p, int splits, const decode_ws_t& ws,
                          cudaStream_t stream) {
  constexpr int smem = smem_bytes<T, DPAD, HPT>();
  auto kern = DecodeAttendKernel<T, DPAD, DCONST, HPT>;
  static bool attr_set = false;  // idempotent: a racing second set is harmless
  if (!attr_set) {
    cudaError_t e =
        cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
    attr_set = true;
  }
  const int G = p.q_heads / p.kv_heads;
  if ((G % HPT) != 0 || traits<T, DPAD>::WORKERS % (G / HPT) != 0) return cudaErrorInvalidValue;
  dim3 grid(splits, p.kv_heads, p.batch);
  kern<<<grid, kThreads, smem, stream>>>(p, splits, ws);
  return cudaGetLastError();
}

/// What the current device can do with DecodeMmaKernel<T, DPAD, DCONST>, read once.
struct mma_info_t {
  bool usable = false;   ///< the loaded image was built for sm_80+ (not JIT from older PTX)
  bool cluster = false;  ///< ... for sm_90+ on an sm_90+ device: cluster launches
  bool pdl = false;      ///< ... the same: programmatic dependent launches (pdl.cuh)
  int max_dyn = 0;       ///< most dynamic shared memory a block may take
  int sm_smem = 0;       ///< shared memory of an SM
  int block_fixed = 0;   ///< static + reserved shared memory of a block
  int sms = 0;           ///< multiprocessors
};

template <typename T, int DPAD, int DCONST>
const mma_info_t& mma_info() {
  static const mma_info_t info = [] {
    mma_info_t m;
    auto kern = DecodeMmaKernel<T, DPAD, DCONST>;
    cudaFuncAttributes fa;
    int dev = 0, optin = 0, major = 0, reserved = 0;
    if (cudaFuncGetAttributes(&fa, kern) != cudaSuccess || cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) !=
            cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&m.sm_smem, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev) !=
            cudaSuccess ||
        cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, dev) !=
            cudaSuccess ||
        cudaDeviceGetAttribute(&m.sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
      (void)cudaGetLastError();
      return m;
    }
    // The kernel body exists only when compiled for sm_80+; an image JIT-compiled from older
    // PTX has none, so the PTX version decides, not the device.
    if (fa.ptxVersion < 80) return m;
    m.max_dyn = optin - static_cast<int>(fa.sharedSizeBytes);
    m.block_fixed = static_cast<int>(fa.sharedSizeBytes) + reserved;
    if (m.max_dyn < mma_traits<DPAD>::STAGE_BYTES ||
        cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, m.max_dyn) !=
            cudaSuccess) {
      (void)cudaGetLastError();
      return m;
    }
    m.usable = true;
    m.pdl = fa.ptxVersion >= 90 && major >= 9;  // the image has the griddepcontrol.wait
    m.cluster = fa.ptxVersion >= 90 && major >= 9 &&
                cudaFuncSetAttribute(kern, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) ==
                    cudaSuccess;
    if (!m.cluster) (void)cudaGetLastError();
    return m;
  }();
  return info;
}

/// How many clusters of S blocks with dyn bytes of dynamic shared memory can be resident at
/// once (cached per (S, dyn); 0: none).
template <typename T, int DPAD, int DCONST>
int mma_max_clusters(const decode_params_t& p, int S, int dyn) {
  static std::mutex mu;
  static std::vector<std::pair<long long, int>> cache;
  const long long key = (static_cast<long long>(S) << 32) | static_cast<unsigned>(dyn);
  std::lock_guard<std::mutex> lock(mu);
  for (const auto& e : cache)
    if (e.first == key) return e.second;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(S, p.kv_heads, p.batch);
  cfg.blockDim = dim3(mma_traits<DPAD>::kThreads);
  cfg.dynamicSmemBytes = dyn;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = S;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, DecodeMmaKernel<T, DPAD, DCONST>, &cfg) != cudaSuccess) {
    (void)cudaGetLastError();
    n = 0;
  }
  cache.emplace_back(key, n);
  return n;
}

/// Launches DecodeMmaKernel. Pipeline depth: every tile of a split in flight when it fits,
/// else as many stages as the SM holds with the blocks of one wave (one block per SM when the
/// grid fits the SMs once, two otherwise). Splits of a head form a cluster when S <= 16 (but
/// see below for the steps that follow another layer's) and every cluster of the grid can be
/// resident at once (fewer stages first, then no cluster: the arrival-counter merge).
template <typename T, int DPAD, int DCONST>
cudaError_t launch_mma(const decode_params_t& p, int S, const decode_ws_t& ws,
                       cudaStream_t stream, const mma_info_t& mi) {
  using Tr = mma_traits<DPAD>;
  const int G = p.q_heads / p.kv_heads;
  const int bh = p.batch * p.kv_heads;
  int want = Tr::kMaxStages;
  if (!p.pooled()) {  // pooled heads may be longer than cap: keep the deepest pipeline
    const int chunk = (p.cap + S - 1) / S;
    want = std::min(Tr::kMaxStages, std::max(1, (chunk + Tr::TK - 1) / Tr::TK));
  }
  const long long blocks = static_cast<long long>(S) * bh;
  const int per_sm = blocks <= mi.sms ? 1 : 2;
  const int budget = std::min(mi.max_dyn, mi.sm_smem / per_sm - mi.block_fixed);
  // Clusters merge the splits wherever they fit, except right after another layer's decode
  // step at two blocks per SM: with the tiles requested before the wait, the counter merge
  // was faster there for splits of kCounterChunkTokens or more, clusters of more than two
  // blocks slower (H100 back to back, batch 8, M 8192: 99.4 against 102.3 us a step; batch
  // 4, M 512, 72-slot splits: clusters 7.8 against 9.7 us). Elsewhere (a lone step, or after
  // a gate) clusters are 1.5-2.5 us a step faster at batch 8.
  bool cl = mi.cluster && (g_launch_diag & 1) == 0 && S > 1 && S <= kMaxClusterSplits;
  if (cl && per_sm == 2 && S > kPairedClusterSplits && p.prefetch_before_wait != 0 &&
      !p.pooled() && (p.cap + S - 1) / S >= kCounterChunkTokens && (g_launch_diag & 4) == 0)
    cl = false;
  const int recv = Tr::cluster_recv_bytes(S, G);
  const int merge = S > 1 ? merge_smem_bytes(S, G, DPAD) : 0;
  auto dyn_of = [&](int n) {
    return cl ? n * Tr::STAGE_BYTES + recv : std::max(n * Tr::STAGE_BYTES, merge);
  };
  auto stages_for = [&]() {
    int n = want;
    while (n > 1 && dyn_of(n) > budget) --n;
    if (per_sm == 2) n = std::min(n, Tr::kSharedStages);
    return n;
  };
  int nst = stages_for();
  if (cl) {
    while (nst > 1 && mma_max_clusters<T, DPAD, DCONST>(p, S, dyn_of(nst)) < bh) --nst;
    if (dyn_of(nst) > mi.max_dyn || mma_max_clusters<T, DPAD, DCONST>(p, S, dyn_of(nst)) < bh) {
      cl = false;
      nst = stages_for();
    }
  }
  const int dyn = dyn_of(nst);
  if (dyn > mi.max_dyn) return cudaErrorInvalidValue;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(S, p.kv_heads, p.batch);
  cfg.blockDim = dim3(Tr::kThreads);
  cfg.dynamicSmemBytes = dyn;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  unsigned na = 0;
  if (cl) {
    attr[na].id = cudaLaunchAttributeClusterDimension;
    attr[na].val.clusterDim.x = S;
    attr[na].val.clusterDim.y = 1;
    attr[na].val.clusterDim.z = 1;
    ++na;
  }
  if (mi.pdl && (g_launch_diag & 2) == 0) {
    // Start while the previous kernel finishes: the kernel waits before it reads anything but
    // the tiles p.prefetch_before_wait allows.
    attr[na].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[na].val.programmaticStreamSerializationAllowed = 1;
    ++na;
  }
  cfg.attrs = attr;
  cfg.numAttrs = na;
  return cudaLaunchKernelEx(&cfg, DecodeMmaKernel<T, DPAD, DCONST>, p, S, ws, nst, cl ? 1 : 0,
                            dyn);
}

/// Group-size switch: fp16/bf16 with G <= 8 run the tensor-core kernel where the device and
/// the loaded image allow; everything else the CUDA-core kernel, HPT heads per lane group.
template <typename T, int DPAD, int DCONST>
cudaError_t dispatch_group(const decode_params_t& p, int splits, const decode_ws_t& ws,
                           cudaStream_t stream) {
  const int G = p.q_heads / p.kv_heads;
  if constexpr (!std::is_same<T, float>::value) {
    if (G <= kMmaMaxGroup) {
      const mma_info_t& mi = mma_info<T, DPAD, DCONST>();
      if (mi.usable) return launch_mma<T, DPAD, DCONST>(p, splits, ws, stream, mi);
    }
  }
  if (G % 4 == 0) return launch_decode<T, DPAD, DCONST, 4>(p, splits, ws, stream);
  if (G % 2 == 0) return launch_decode<T, DPAD, DCONST, 2>(p, splits, ws, stream);
  return launch_decode<T, DPAD, DCONST, 1>(p, splits, ws, stream);
}

/// Head-dim switch: 64/128/256 are exact fast paths; any other multiple of 8 up to 256 runs
/// the padded generic path of the next larger size.
template <typename T>
cudaError_t decode_step_typed(const decode_params_t& p, int splits, const decode_ws_t& ws,
                              cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return dispatch_group<T, 64, 64>(p, splits, ws, stream);
    case 128: return dispatch_group<T, 128, 128>(p, splits, ws, stream);
    case 256: return dispatch_group<T, 256, 256>(p, splits, ws, stream);
    default:
      if (p.head_dim % 8 != 0 || p.head_dim <= 0 || p.head_dim > 256)
        return cudaErrorInvalidValue;  // Unsupported head_dim
      if (p.head_dim < 64) return dispatch_group<T, 64, 0>(p, splits, ws, stream);
      if (p.head_dim < 128) return dispatch_group<T, 128, 0>(p, splits, ws, stream);
      return dispatch_group<T, 256, 0>(p, splits, ws, stream);
  }
}

extern template cudaError_t decode_step_typed<float>(const decode_params_t&, int,
                                                     const decode_ws_t&, cudaStream_t);
extern template cudaError_t decode_step_typed<__half>(const decode_params_t&, int,
                                                      const decode_ws_t&, cudaStream_t);
extern template cudaError_t decode_step_typed<__nv_bfloat16>(const decode_params_t&, int,
                                                             const decode_ws_t&, cudaStream_t);

}  // namespace decode_detail

}  // namespace trimkv
