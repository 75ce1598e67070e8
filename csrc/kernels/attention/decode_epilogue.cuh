// The end of a decode step, shared by both decode kernels (decode_core.cuh, decode_mma.cuh):
// the new token's append, the eviction (B = 0 victim write, B > 0 radix-select compaction) and
// the merges of the split partials (through the workspace, or a cluster's shared memory).
#pragma once

#include <cuda_runtime.h>

#include "common/score.h"
#include "kernels/attention/decode_traits.cuh"
#include "kernels/common/cp_async.cuh"
#include "kernels/common/math.cuh"
#include "kernels/common/select_topk.cuh"
#include "kernels/common/softmax_state.cuh"
#include "kernels/common/vec_dtypes.cuh"

namespace trimkv {

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
    if (k2 < key) {
      key = k2;
      slot = s2;
    }
  }
  if (lane == 0) {
    fin.vkey_w[warp] = key;
    fin.vslot_w[warp] = slot;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w)
      if (fin.vkey_w[w] < key) {
        key = fin.vkey_w[w];
        slot = fin.vslot_w[w];
      }
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
__device__ void finalize_head(const decode_params_t& p, int b, int h, int D, int len, int pos_new,
                              int vslot, int* list, decode_detail::fin_smem_t& fin, const T* snew,
                              void* smem, int smem_cap) {
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
  const bool staged =
      static_cast<size_t>(n) * sizeof(unsigned long long) <= static_cast<size_t>(smem_cap);
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
          skeys[s] =
              topk::keep_key(cache_score(lam[u], pos[u], tcount, p.window, p.knorm, ln[u]), pos[u]);
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
  if (tid == 0) {
    fin.nh = 0;
    fin.nm = 0;
  }
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
                                          bool staged, void* fin_smem, int fin_cap, const T* snew) {
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
  float4* smd = static_cast<float4*>(smem);                   // [S*G] (max, sum)
  ulonglong2* svk = reinterpret_cast<ulonglong2*>(smd + SG);  // [S] (key, slot)
  float* sw = reinterpret_cast<float*>(svk + S);              // [S*G] weights
  float* sacc = sw + ((SG + 3) / 4) * 4;                      // [S*G][DPAD]
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
      cp_async16(sacc + row * DPAD + c * 4,
                 gacc + static_cast<size_t>(row) * decode_detail::kMaxHeadDim + c * 4, true);
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
        const float f = softmax_weight(r.x, mx);
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
          o[e] += a.x * f;
          o[e + 1] += a.y * f;
          o[e + 2] += a.z * f;
          o[e + 3] += a.w * f;
        }
      }
    }
    for (int m = 1; m < R; m <<= 1)
#pragma unroll
      for (int e = 0; e < VEC; ++e) o[e] += __shfl_xor_sync(0xffffffffu, o[e], m);
    if (valid && r == 0)
      store_vec_f32<T>(
          static_cast<T*>(p.out) + (static_cast<size_t>(b) * p.q_heads + h * G + g) * D + col * VEC,
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
                   ws.list + static_cast<size_t>(bh) * 2 * max(p.buffer, 1), fin, snew, fin_smem,
                   fin_cap);
}

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
    if (k2 < key) {
      key = k2;
      slot = s2;
    }
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
      if (r.x < k) {
        k = r.x;
        sl = static_cast<int>(r.y);
      }
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
      const float f = softmax_weight(r.x, mx);
      lsum += f * r.y;
      const float* a = acc + (s * G + hh) * DPAD + c8 * 8;
      const float4 a0 = *reinterpret_cast<const float4*>(a);
      const float4 a1 = *reinterpret_cast<const float4*>(a + 4);
      ov[0] += f * a0.x;
      ov[1] += f * a0.y;
      ov[2] += f * a0.z;
      ov[3] += f * a0.w;
      ov[4] += f * a1.x;
      ov[5] += f * a1.y;
      ov[6] += f * a1.z;
      ov[7] += f * a1.w;
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

}  // namespace trimkv
