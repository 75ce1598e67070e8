// The tensor-core prefill attention kernel (fp16/bf16, sm_80+) and its launcher.
#pragma once

#include <cuda_runtime.h>

#include "common/score.h"
#include "kernels/attention/prefill_traits.cuh"
#include "kernels/common/cp_async.cuh"
#include "kernels/common/mma.cuh"
#include "kernels/common/softmax_state.cuh"
#include "kernels/common/vec_dtypes.cuh"

namespace trimkv {

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
__global__ void __launch_bounds__(prefill_detail::kMmaGroupThreads* NG,
                                  prefill_detail::mma_min_blocks<NG>())
    PrefillAttnMmaKernel(const prefill_params_t p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace prefill_detail;
  constexpr int GT = kMmaGroupThreads, NTHR = GT * NG;
  constexpr int WR = 16 * MT;  // packed rows per warp
  constexpr int BQ = 4 * WR, LD = DPAD + 8, NCOL = DPAD / 8;
  constexpr int NT = BK / 8;          // n8 tiles of S per key tile
  constexpr int ND = DPAD / 8;        // n8 tiles of O
  constexpr int KD = DPAD / 16;       // k16 steps over the head dim
  constexpr int STAGE = 2 * BK * LD;  // elements of one K + V stage
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
      const size_t off =
          (cached ? static_cast<size_t>(n) * D : static_cast<size_t>(n - len) * in_stride) + c * 8;
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
      mma::ldsm_x4(qf[kk],
                   mma::smem_u32(sQ + (wq * WR + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8));
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
          mma::ldsm_x4(a[mt], mma::smem_u32(sQ + (wq * WR + mt * 16 + (lane & 15)) * LD + kk * 16 +
                                            (lane >> 4) * 8));
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
        const float ref = softmax_ref(mnew);
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
        mma::ldsm_x4_trans(
            b, mma::smem_u32(sV + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + dd * 16 +
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

namespace prefill_detail {

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

}  // namespace prefill_detail

}  // namespace trimkv
