// Baseline for the benchmark: the tensor-core prefill attention kernel as it was before the
// double-buffered / split-key version (csrc/kernels/prefill.cuh at commit d219a20), renamed into
// namespace trimkv_base. Harness only; not built into the package.
#pragma once
#include "kernels/prefill.cuh"

namespace trimkv_base {
using namespace ::trimkv;
namespace base_detail {
constexpr int kMmaThreads = 128;
template <int DPAD, int MT, int BK>
constexpr int mma_smem_bytes() { return (64 * MT + 2 * BK) * (DPAD + 8) * 2; }
template <int DPAD, int MT>
constexpr int mma_min_blocks() { return DPAD > 128 ? 1 : (MT == 1 ? 3 : 2); }
}  // namespace base_detail
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

__device__ __forceinline__ void ldsm_x4(uint32_t* r, const void* smem) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t* r, const void* smem) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

/// c += a * b, m16n8k16, fp32 accumulators (fragment layouts of the PTX ISA).
template <typename T>
__device__ __forceinline__ void mma_16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float* c, const uint32_t* a, uint32_t b0,
                                                  uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float* c, const uint32_t* a, uint32_t b0,
                                                         uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

/// Packs two floats into one register of two T (round to nearest even), x in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float x, float y);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float x, float y) {
  const __half2 h = __floats2half2_rn(x, y);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float x, float y) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
  return *reinterpret_cast<const uint32_t*>(&h);
}

constexpr float kLog2e = 1.4426950408889634f;

}  // namespace

/// Causal GQA attention of one chunk on tensor cores (FlashAttention-2 style: each warp owns
/// MT blocks of 16 packed query rows, online softmax in registers, P reused from the S
/// accumulators as the A operand of P V; each K/V fragment read from shared memory feeds MT
/// MMAs). K tile j+1 streams in (cp.async) during P V of tile j, V tile j during Q K^T of
/// tile j.
/// grid (ceil(chunk * G / (64 MT)), kv_heads), block 128, dynamic smem
/// mma_smem_bytes<DPAD, MT, BK>().
/// \param p  q [chunk, q_heads, D], k/v [chunk, kv_heads, D], caches [batch, kv_heads, cap, D],
///           lens [batch, kv_heads]; writes out [chunk, q_heads, D]. D <= DPAD, zero-padded.
template <typename T, int DPAD, int MT, int BK>
__global__ void __launch_bounds__(base_detail::kMmaThreads,
                                  base_detail::mma_min_blocks<DPAD, MT>())
    BaseAttnMmaKernel(const prefill_params_t p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace base_detail;
  constexpr int WR = 16 * MT;  // packed rows per warp
  constexpr int BQ = 4 * WR, LD = DPAD + 8, NCOL = DPAD / 8;
  constexpr int NT = BK / 8;                     // n8 tiles of S per key tile
  constexpr int ND = DPAD / 8;                   // n8 tiles of O
  constexpr int KD = DPAD / 16;                  // k16 steps over the head dim
  constexpr bool QREG = MT == 1 && DPAD <= 128;  // Q fragments in registers, else from smem
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BQ * LD;
  T* sV = sK + BK * LD;

  const int h = blockIdx.y;
  const int G = p.q_heads / p.kv_heads;
  const int D = p.head_dim;
  const prefill_seg_t sg = p.segment(blockIdx.z);
  const int bh = sg.seq * p.kv_heads + h;
  const size_t base = p.head_base(bh);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const prefill_tile_t tile = prefill_tile(sg.chunk, G, BQ, p.lens[bh]);
  if (tile.rows <= 0) return;
  const int len = tile.len;
  const size_t qrow0 = static_cast<size_t>(sg.first) * p.q_heads * D;   // this chunk in q / out
  const size_t krow0 = static_cast<size_t>(sg.first) * p.kv_heads * D;  // and in k / v
  const T* qg = static_cast<const T*>(p.q) + qrow0;
  const T* kc = static_cast<const T*>(p.k_cache);
  const T* vc = static_cast<const T*>(p.v_cache);
  const T* kin = static_cast<const T*>(p.k) + krow0;
  const T* vin = static_cast<const T*>(p.v) + krow0;

  // Q tile; rows past the chunk and columns past D are zero-filled.
  for (int e = tid; e < BQ * NCOL; e += kMmaThreads) {
    const int r = e / NCOL, c = e - (e / NCOL) * NCOL;
    const bool ok = r < tile.rows && c * 8 < D;
    const T* src = ok ? qg + prefill_row_offset(tile.row0 + r, G, p.kv_heads, h, D) + c * 8 : qg;
    cp_async16(sQ + r * LD + c * 8, src, ok);
  }
  // Keys/values past n_end are zero-filled (and masked): P = 0 never meets garbage V.
  auto load_kv = [&](T* dst, const T* cache, const T* in, int n0) {
    for (int e = tid; e < BK * NCOL; e += kMmaThreads) {
      const int r = e / NCOL, c = e - (e / NCOL) * NCOL;
      const int n = n0 + r;
      const bool ok = n < tile.n_end && c * 8 < D;
      const T* src = ok ? prefill_key_row(cache, in, p, base, h, len, n, c * 8) : in;
      cp_async16(dst + r * LD + c * 8, src, ok);
    }
  };
  load_kv(sK, kc, kin, 0);
  cp_async_commit();

  // Fragment coordinates: in row block mt this thread holds rows
  // warp * WR + mt * 16 + lane / 4 (index 0) and that + 8 (index 1).
  const int tq = lane & 3;
  int lim[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int r = warp * WR + mt * 16 + (lane >> 2) + hf * 8;
      lim[mt][hf] = len + (tile.row0 + min(r, tile.rows - 1)) / G + 1;
    }
  const float sl2 = p.scale * kLog2e;

  uint32_t qf[QREG ? KD : 1][4];
  float o[MT][ND][4];
  float m[MT][2], l[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int d = 0; d < ND; ++d) o[mt][d][0] = o[mt][d][1] = o[mt][d][2] = o[mt][d][3] = 0.f;
    m[mt][0] = m[mt][1] = -INFINITY;
    l[mt][0] = l[mt][1] = 0.f;
  }

  const int ntiles = (tile.n_end + BK - 1) / BK;
  for (int j = 0; j < ntiles; ++j) {
    const int n0 = j * BK;
    cp_async_wait<0>();
    __syncthreads();  // K tile j (and Q) landed; every warp is done with V tile j - 1
    load_kv(sV, vc, vin, n0);
    cp_async_commit();
    if (QREG && j == 0) {
#pragma unroll
      for (int kk = 0; kk < (QREG ? KD : 0); ++kk)
        ldsm_x4(qf[kk], sQ + (warp * WR + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
    }
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
          ldsm_x4(a[mt], sQ + (warp * WR + mt * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
        }
      }
#pragma unroll
      for (int nn = 0; nn < NT / 2; ++nn) {
        uint32_t b[4];
        ldsm_x4(b, sK + (nn * 16 + (lane & 7) + (lane >> 4) * 8) * LD + kk * 16 +
                       ((lane >> 3) & 1) * 8);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16816<T>(s[mt][2 * nn], a[mt], b[0], b[1]);
          mma_16816<T>(s[mt][2 * nn + 1], a[mt], b[2], b[3]);
        }
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // V tile j landed; every warp is done with K tile j
    if (j + 1 < ntiles) load_kv(sK, kc, kin, n0 + BK);
    cp_async_commit();

#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      // Causal mask (and keys past n_end), only on tiles that reach past n_full.
      if (n0 + BK > tile.n_full) {
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          const int n = n0 + t * 8 + 2 * tq;
          if (n >= lim[mt][0]) s[mt][t][0] = -INFINITY;
          if (n + 1 >= lim[mt][0]) s[mt][t][1] = -INFINITY;
          if (n >= lim[mt][1]) s[mt][t][2] = -INFINITY;
          if (n + 1 >= lim[mt][1]) s[mt][t][3] = -INFINITY;
        }
      }
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float mx = -INFINITY;
#pragma unroll
        for (int t = 0; t < NT; ++t) mx = fmaxf(mx, fmaxf(s[mt][t][2 * hf], s[mt][t][2 * hf + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // Logits in the exp2 domain. Key 0 is visible to every row, so the state is
        // non-empty after tile 0; the guard only keeps exp2(-inf - -inf) = NaN out of a fully
        // masked row.
        const float mnew = fmaxf(m[mt][hf], mx * sl2);
        const float ref = mnew == -INFINITY ? 0.f : mnew;
        const float alpha = exp2f(m[mt][hf] - ref);
        m[mt][hf] = mnew;
        float sum = 0.f;
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          s[mt][t][2 * hf] = exp2f(fmaf(s[mt][t][2 * hf], sl2, -ref));
          s[mt][t][2 * hf + 1] = exp2f(fmaf(s[mt][t][2 * hf + 1], sl2, -ref));
          sum += s[mt][t][2 * hf] + s[mt][t][2 * hf + 1];
        }
        l[mt][hf] = l[mt][hf] * alpha + sum;  // per-thread partial; the quad reduces at the end
#pragma unroll
        for (int d = 0; d < ND; ++d) {
          o[mt][d][2 * hf] *= alpha;
          o[mt][d][2 * hf + 1] *= alpha;
        }
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
        ldsm_x4_trans(b, sV + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + dd * 16 +
                             (lane >> 4) * 8);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16816<T>(o[mt][2 * dd], a[mt], b[0], b[1]);
          mma_16816<T>(o[mt][2 * dd + 1], a[mt], b[2], b[3]);
        }
      }
    }
  }
  cp_async_wait<0>();

  // Stage this warp's rows in its own rows of sQ, then store 16-byte vectors.
  __syncwarp();
  T* so = sQ + warp * WR * LD;
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
    const int row = warp * WR + r;
    if (row < tile.rows && c * 8 < D)
      copy16(og + prefill_row_offset(tile.row0 + row, G, p.kv_heads, h, D) + c * 8,
             so + r * LD + c * 8);
  }
#endif
}

template <typename T, int DPAD, int MT, int BK>
cudaError_t launch_base_mma(const prefill_params_t& p, cudaStream_t stream) {
  using namespace base_detail;
  const long long rows = static_cast<long long>(p.longest()) * (p.q_heads / p.kv_heads);
  constexpr int smem = mma_smem_bytes<DPAD, MT, BK>();
  constexpr int BQ = 64 * MT;
  auto kern = BaseAttnMmaKernel<T, DPAD, MT, BK>;
  const cudaError_t e =
      cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>((rows + BQ - 1) / BQ), p.kv_heads, p.segments());
  kern<<<grid, kMmaThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace trimkv_base
