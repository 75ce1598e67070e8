// The CUDA-core decode kernel (fp32, G > 8, GPUs before sm_80) and its launcher: see
// decode.cuh for the work decomposition.
#pragma once

#include <cuda_runtime.h>

#include "common/score.h"
#include "kernels/attention/decode_epilogue.cuh"
#include "kernels/attention/decode_traits.cuh"
#include "kernels/common/cp_async.cuh"
#include "kernels/common/select_topk.cuh"
#include "kernels/common/softmax_state.cuh"
#include "kernels/common/vec_dtypes.cuh"

namespace trimkv {

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
        if (k < vkey) {
          vkey = k;
          vslot = j;
        }
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
        const float ref = softmax_ref(mx);
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
  float* smd = reinterpret_cast<float*>(smem_raw);  // [WORKERS][HPT][2]
  float* sacc = smd + Tr::WORKERS * HPT * 2;        // [WORKERS][HPT][DPAD]
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
    const float ref = softmax_ref(mx);
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
      store_vec_f32<T>(
          static_cast<T*>(p.out) + (static_cast<size_t>(b) * p.q_heads + h * G + g) * D + col * VEC,
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
                     ws.list + static_cast<size_t>(bh) * 2 * max(p.buffer, 1), fin, snew, smem_raw,
                     kSmemCap);
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

namespace decode_detail {

template <typename T, int DPAD, int DCONST, int HPT>
cudaError_t launch_decode(const decode_params_t& p, int splits, const decode_ws_t& ws,
                          cudaStream_t stream) {
  constexpr int smem = smem_bytes<T, DPAD, HPT>();
  auto kern = DecodeAttendKernel<T, DPAD, DCONST, HPT>;
  static bool attr_set = false;  // idempotent: a racing second set is harmless
  if (!attr_set) {
    cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
    attr_set = true;
  }
  const int G = p.q_heads / p.kv_heads;
  if ((G % HPT) != 0 || traits<T, DPAD>::WORKERS % (G / HPT) != 0) return cudaErrorInvalidValue;
  dim3 grid(splits, p.kv_heads, p.batch);
  kern<<<grid, kThreads, smem, stream>>>(p, splits, ws);
  return cudaGetLastError();
}
}  // namespace decode_detail

}  // namespace trimkv
