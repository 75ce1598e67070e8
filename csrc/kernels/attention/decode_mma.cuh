// The tensor-core decode kernel (fp16/bf16, G <= 8, sm_80+; clusters and programmatic
// dependent launch on sm_90+): see decode.cuh for the work decomposition. Its launcher, which
// picks stages and clusters per device, is in decode_launch.cuh.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/score.h"
#include "kernels/attention/decode_epilogue.cuh"
#include "kernels/attention/decode_traits.cuh"
#include "kernels/common/cluster.cuh"
#include "kernels/common/cp_async.cuh"
#include "kernels/common/mma.cuh"
#include "kernels/common/pdl.cuh"
#include "kernels/common/select_topk.cuh"
#include "kernels/common/softmax_state.cuh"
#include "kernels/common/trace.cuh"
#include "kernels/common/vec_dtypes.cuh"

namespace trimkv {

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
    DecodeMmaKernel(const __grid_constant__ decode_params_t p, int num_splits, decode_ws_t ws,
                    int nst, int cluster, int dyn_smem) {
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
  if (use_cluster) cluster::arrive_relaxed();
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
        cp_async4(sm + r, p.pos_cache + m, ok);
        cp_async4(sm + TK + r, p.lam_cache + m, ok);
        if (p.knorm) cp_async4(sm + 2 * TK + r, p.lognorm_cache + m, ok);
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
    const uint32_t pb0 = mma::movmatrix_trans(mma::pack2<T>(p0, p1));
    const uint32_t pb1 = mma::movmatrix_trans(mma::pack2<T>(p2, p3));
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
      attend_slab(mma::smem_u32(snew), 0, rv == 0 ? mma::smem_u32(snew + D) : zero_row, 0, 1);
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
      cp_async_wait_dyn(it < pro_groups ? nst - 1 : nst - 2);
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
        if (k < vkey) {
          vkey = k;
          vslot = s0 + lane;
        }
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
  float* wml = wo + NW * 8 * Tr::WSTRIDE;          // [NW][8] (max, sum)
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
      if (k < vkey) {
        vkey = k;
        vslot = len;
      }
    }
    // Warp minimum; every lane holds it after the butterfly.
#pragma unroll
    for (int x = 16; x > 0; x >>= 1) {
      const unsigned long long k2 = __shfl_xor_sync(0xffffffffu, vkey, x);
      const int s2 = __shfl_xor_sync(0xffffffffu, vslot, x);
      if (k2 < vkey) {
        vkey = k2;
        vslot = s2;
      }
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
    cluster::wait_acquire();  // phase 0: every block of the cluster has started
    recv = cluster::map_shared(mma::smem_u32(smem_raw + nst * Tr::STAGE_BYTES), 0);
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
      const float f = softmax_weight(mw[w], mx);
      lsum += f * wml[(w * 8 + hh) * 2 + 1];
      const float* wr = wo + (w * 8 + hh) * Tr::WSTRIDE + c8 * 8;
      const float4 a = *reinterpret_cast<const float4*>(wr);
      const float4 c = *reinterpret_cast<const float4*>(wr + 4);
      ov[0] += f * a.x;
      ov[1] += f * a.y;
      ov[2] += f * a.z;
      ov[3] += f * a.w;
      ov[4] += f * c.x;
      ov[5] += f * c.y;
      ov[6] += f * c.z;
      ov[7] += f * c.w;
    }
    if (S == 1) {
      const float inv = 1.f / lsum;  // >= 1 term: the new token is in the only split
#pragma unroll
      for (int e = 0; e < 8; ++e) ov[e] *= inv;
      store_vec_f32<T>(
          static_cast<T*>(p.out) + (static_cast<size_t>(b) * p.q_heads + h * G + hh) * D + c8 * 8,
          ov);
    } else if (use_cluster) {
#if __CUDA_ARCH__ >= 900
      const int row = split * G + hh;
      const uint32_t a = r_acc + (row * DPAD + c8 * 8) * 4;
      cluster::st_f4(a, ov[0], ov[1], ov[2], ov[3]);
      cluster::st_f4(a + 16, ov[4], ov[5], ov[6], ov[7]);
      if (c8 == 0) cluster::st_f4(r_md + row * 16, mx, lsum, 0.f, 0.f);
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
      cluster::st_u64x2(r_vk + (split * NW + warp) * 16, vkey,
                        static_cast<unsigned long long>(vslot));
    // Phase 1: every partial (and the append / global writes before it) is visible to rank 0.
    cluster::arrive_release();
    cluster::wait_acquire();
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
                 : "=r"(prev)
                 : "l"(ws.counter + bh)
                 : "memory");
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

}  // namespace trimkv
