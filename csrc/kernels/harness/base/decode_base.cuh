// Fused TRIM-KV decode step for one layer: GQA attention over a bounded per-head cache plus
// the new token, fused with the retention-score eviction (SPEC.md sections 4-6).
//
// Work decomposition: grid (splits, kv_heads, batch). Each block streams the K/V tiles of its
// slice of the (len + 1) logical tokens (cached slots 0..len-1, then the new token read
// straight from k_new/v_new) through shared memory with cp.async (3-stage pipeline), and keeps
// an online-softmax state for all G query heads of its KV head, so K and V are read once per
// KV head. With one split the same block finishes the output and the eviction; with several
// splits the last block of each head to finish merges the partial (max, sum, acc) states and
// finishes the eviction (arrival counter in the workspace), so a step is a single launch.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "../../../common/dtype.h"
#include "../../cache_layer.cuh"
#include "../../select_topk.cuh"
#include "../../vec_dtypes.cuh"

// Harness copy of csrc/kernels/decode.cuh as of the start of the optimisation round (git HEAD),
// renamed to trimkv_base, bf16 only: the "base" column of `harness bench`. Generated, do not edit.
namespace trimkv_base {
using namespace ::trimkv;

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

/// One fused decode step (attention + append + eviction) for one layer.
/// \param p        see decode_params_t; lens/pos/lam/lognorm/k/v caches are updated in place
/// \param dtype    storage dtype of q, k_new, v_new, caches and out
/// \param workspace at least DecodeWorkspaceBytes(p) bytes of device memory, 256-byte aligned
/// \return cudaSuccess, cudaErrorInvalidValue for unsupported shapes, or the launch error
cudaError_t DecodeStep(const decode_params_t& p, DType dtype, void* workspace,
                       cudaStream_t stream);

namespace decode_detail {

constexpr int kThreads = 256;
constexpr int kMaxHeadDim = 256;
constexpr int kMinSplitTokens = 16;  ///< a split covers at least this many tokens
constexpr int kAutoSplitTokens = 64;  ///< auto choice: at least this many tokens per split
constexpr int kMaxSplits = 64;
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

/// Shared scratch of the eviction epilogue.
struct fin_smem_t {
  topk::select_smem_t sel;
  unsigned long long vkey_w[kThreads / 32];
  int vslot_w[kThreads / 32];
  unsigned long long vkey;
  int vslot;
  int nh, nm;
  int last;
  float lognorm;
};

}  // namespace decode_detail

namespace {

/// ln(max(||k_new||_2, 1e-12)) of the new key of head bh, by warp 0, into fin.lognorm.
/// Caller synchronises afterwards.
template <typename T>
__device__ __forceinline__ void new_token_lognorm(const decode_params_t& p, int bh, int D,
                                                  decode_detail::fin_smem_t& fin) {
  if (threadIdx.x >= 32) return;
  const T* k = static_cast<const T*>(p.k_new) + static_cast<size_t>(bh) * D;
  float ss = 0.f;
  for (int i = threadIdx.x; i < D; i += 32) {
    const float x = to_f32(k[i]);
    ss += x * x;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if (threadIdx.x == 0) fin.lognorm = logf(fmaxf(sqrtf(ss), 1e-12f));
}

/// Writes the new token of head bh (k, v, pos, lam, lognorm) into slot. snew: shared copy of
/// k_new (snew[0, D)) and v_new (snew[D, 2D)) of this head, prefetched at the kernel start.
/// lognorm must already be in fin.lognorm when p.knorm.
template <typename T>
__device__ __forceinline__ void write_new_token(const decode_params_t& p, int b, int bh, int D,
                                                int slot, int pos_new, float lognorm,
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
    p.lam_cache[m] = p.lam_new[bh];
    if (p.knorm) p.lognorm_cache[m] = lognorm;
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
    write_new_token<T>(p, b, bh, D, vslot, pos_new, fin.lognorm, snew);
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

/// Merges the per-split states of head (b, h) (written by the other blocks of this launch;
/// read through L2), writes out [batch, q_heads, D] and finishes the eviction. Whole block.
/// Every partial ((max, sum) records, victim records, accumulators) is copied to shared memory
/// in one batch of cp.async (one L2 round trip), then combined there. The host keeps S small
/// enough that merge_smem_bytes(S, G, DPAD) <= kMergeSmemBytes.
template <typename T, int DPAD, int DCONST>
__device__ void merge_splits_and_finalize(const decode_params_t& p, int b, int h, int len,
                                          int pos_new, int S, const decode_ws_t& ws,
                                          decode_detail::fin_smem_t& fin, void* smem,
                                          int smem_cap, const T* snew) {
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
  {
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
  (void)smem_cap;
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
                   ws.list + static_cast<size_t>(bh) * 2 * max(p.buffer, 1), fin, snew, smem,
                   smem_cap);
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
    DecodeAttendKernel(const decode_params_t p, int num_splits, decode_ws_t ws) {
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


  const int pos_new = p.positions[b];
  const int len = p.lens[bh];  // loaded with positions: one round trip, not two
  if (pos_new < 0) {  // inactive slot: cache untouched, output zeros
    if (split == 0) zero_out_rows<T>(p, b, h, D);
    return;
  }
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
  if (has_new && need_append) write_new_token<T>(p, b, bh, D, len, pos_new, fin.lognorm, snew);
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
  merge_splits_and_finalize<T, DPAD, DCONST>(p, b, h, len, pos_new, S, ws, fin, smem_raw,
                                             kSmemCap, snew);
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

template <typename T, int DPAD, int DCONST>
cudaError_t dispatch_group(const decode_params_t& p, int splits, const decode_ws_t& ws,
                           cudaStream_t stream) {
  const int G = p.q_heads / p.kv_heads;
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

extern template cudaError_t decode_step_typed<__nv_bfloat16>(const decode_params_t&, int,
                                                             const decode_ws_t&, cudaStream_t);

}  // namespace decode_detail

}  // namespace trimkv_base
