// Retention-gate kernels: see retention_gate.cuh.
//
// The hidden layer is a matrix product U = W x^T ([inter, in_dim] x [in_dim, n]); everything
// after it (bias, act, GLU product, W2, logsigmoid) is small. Three regimes:
// - decode (n <= kOnePassTokens, tensor cores; any n < kFewTokens when a plan is forced): ONE
//   kernel per call (GateTcKernel in one-pass mode). Reading W once is the floor (2.6 MB for
//   Qwen3-4B's rg, about 1 us), so in_dim (K) is split over many blocks. Each block requests
//   its whole W slice (and its rows of W2 / b1) before griddepcontrol.wait (weights are
//   immutable), so under programmatic dependent launch the weight traffic of call i+1
//   overlaps call i; x and the workspace are touched only after the wait. The raw partials go to the workspace; the last K-split block of each (row tile,
//   token tile), elected by an arrival counter, sums them, applies b1 / act / GLU product and
//   its rows of W2; the last row tile of each token tile, elected by a second counter, sums
//   those z partials, adds the bias and writes lam. The electing blocks reset their counters,
//   so every call leaves them zero (the workspace contract of retention_gate.cuh).
// - other split plans (8 < n < 256 automatically, where one pass measured slower; the FMA
//   path; big tiles; n >= kFewTokens): the raw float partials go to the workspace and a
//   finishing kernel (GateFinishFewKernel, or GateFinishManyKernel for many tokens) sums them
//   per token and applies the rest.
// - prefill (large n): arithmetic is the floor, so the product runs on tensor cores (mma.sync
//   m16n8k16, fp32 accumulation, cp.async multi-stage pipeline, ldmatrix); K is split only
//   while the tiles alone leave SMs idle. Unsplit, the block applies the activation and its
//   slice of W2 in registers, leaving only [n, kv_heads] partial sums per warp row for
//   GateFinishZKernel.
// On sm_90+ finishing kernels and the one-pass kernel are programmatic dependent launches.
// Tensor cores need sm_80 and x and the weights in the same 16-bit dtype: 16-bit products are
// exact in fp32, so the result matches the FMA path's accuracy. Every other case (fp32, mixed
// dtypes, sm_75) runs GateFmaKernel, which splits K the same way.
#include "retention_gate.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "mma.cuh"
#include "pdl.cuh"
#include "vec_dtypes.cuh"

namespace trimkv {

namespace {

// Launch-shape constants, tuned on an H100 (132 SMs; csrc/kernels/gate_harness/NOTES.md).
// They are not read off the device so that RetentionGateWorkspaceBytes needs no device.
constexpr int kTargetBlocks = 264;  // FMA path: two blocks per SM
constexpr int kSplitTarget = 192;   // tensor cores: K splits until tiles x splits reach this
constexpr int kMaxSplits = 16;      // more partials cost the finisher more than they gain
constexpr int kHugeTiles = 256;     // GLU: Big tiles at which Huge tiles pay off
constexpr int kOnePassBlocks = 96;  // one pass: K splits until tiles x splits reach this
constexpr int kOnePassTokens = 8;   // automatic plans run one pass up to this many tokens

constexpr int kFmaThreads = 256;
constexpr int kFmaRows = kFmaThreads / 32;  // one warp per intermediate row
constexpr int kTokChunk = 8;                // tokens per register pass
constexpr int kFmaMinSlice = 256;           // 32 lanes x 8 elements

// Finishing kernels (one block per token). Below kFewTokens blocks are few and latency rules:
// GateFinishFewKernel puts every row's loads in flight at once. From kFewTokens on, blocks
// are many and occupancy rules: GateFinishManyKernel is light enough for 8 blocks per SM.
constexpr int kFewTokens = 256;
constexpr int kFinishFewThreads = 512;   // one intermediate row per thread up to inter 512
constexpr int kFinishManyThreads = 256;
constexpr int kFinishChunk = 2048;       // Many: activations staged in shared memory per pass
constexpr int kHeadGroup = 8;            // Few: heads accumulated in registers per pass
constexpr int kSplitBatch = 16;  // partial loads in flight per row: all of them up to kMaxSplits
constexpr int kFinishZThreads = 256;

// One-pass decode kernel. Its arrival counters sit at the front of the workspace in a layout
// that depends on inter alone (so that calls with different n agree on it): one counter per
// (token tile, kCtrBM-row tile), then one per token tile; token tiles are >= 8 tokens wide
// and n < kFewTokens, so there are at most kMaxTokTiles.
constexpr int kCtrBM = 64;                     // rows of every one-pass tile (the skinny ones)
constexpr int kMaxTokTiles = kFewTokens / 8;
constexpr int kCtrAlign = 256;                 // the data after the counters stays aligned
constexpr int kOnePassSmem = 96 * 1024;        // stage budget: fits every sm_80+ part
constexpr int kOnePassStages = 16;             // so that a whole K slice fits before the wait
constexpr int kExtPre = 8;                     // W2 / b1 / bias loads per thread before the wait

constexpr int kBK = 32;               // K per pipeline stage
constexpr int kLds = kBK + 8;         // shared row pitch in elements: 80 B keeps ldmatrix
                                      // conflict-free (8 rows hit 8 distinct 16-byte bank groups)

/// 8 consecutive elements as float (16 bytes for 2-byte types, 32 for float).
template <typename T>
__device__ __forceinline__ void load8(const T* p, float* f) {
  load_vec_f32<T>(p, f);
}
template <>
__device__ __forceinline__ void load8<float>(const float* p, float* f) {
  load_vec_f32<float>(p, f);
  load_vec_f32<float>(p + 4, f + 4);
}

__device__ __forceinline__ float gate_act(float u, int act) {
  switch (act) {
    case kGateSilu: return u / (1.f + expf(-u));
    case kGateGelu: return 0.5f * u * (1.f + erff(u * 0.70710678118654752f));
    case kGateGeluTanh: {
      const float c = 0.7978845608028654f;  // sqrt(2/pi)
      return 0.5f * u * (1.f + tanhf(c * (u + 0.044715f * u * u * u)));
    }
    default: return fmaxf(u, 0.f);
  }
}

/// Stable logsigmoid: min(z, 0) - log1p(exp(-|z|)) never overflows.
__device__ __forceinline__ float log_sigmoid(float z) {
  return fminf(z, 0.f) - log1pf(expf(-fabsf(z)));
}

// Programmatic dependent launch (pdl.cuh): the hidden-layer kernel lets the next kernel (the
// finisher, or the next call) start at once, so its launch and weight loads overlap this one;
// x and the workspace are read only after pdl_wait().

__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}

// The tensor-core helpers exist from sm_80 on (bf16 mma); older targets compile GateTcKernel
// with an empty body and the launcher never picks it there.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
constexpr int kChunksPerRow = kBK / 8;  // 16-byte chunks per shared row

using mma::ldsm_x2;
using mma::ldsm_x4;
using mma::smem_u32;

/// d += a b for one m16n8k16 tile (b as the fragment pair of one n8 tile).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2]) {
  mma::mma_16816<T>(d, a, b[0], b[1]);
}
#endif

/// Tile shape of GateTcKernel: a block computes BM intermediate rows (of each of the GLU's two
/// matrices) x BN tokens with WM x WN warps; stages fill at most SMEM bytes of shared memory;
/// MINB blocks per SM bound the registers (__launch_bounds__).
template <bool GLU, int BM_, int BN_, int WM_, int WN_, int SMEM, int MINB = 1, int MAXST = 6>
struct tc_cfg_t {
  static constexpr int BM = BM_, BN = BN_, WM = WM_, WN = WN_, kMinBlocks = MINB;
  static constexpr int kThreads = WM * WN * 32;
  static constexpr int kMats = GLU ? 2 : 1;
  static constexpr int kRowsA = BM * kMats;  // GLU: W_gate rows, then W_up rows
  static constexpr int kWarpM = BM / WM, kWarpN = BN / WN;
  static constexpr int MT = kWarpM / 16, NT = kWarpN / 8;
  static constexpr int kStageElems = (kRowsA + BN) * kLds;
  static constexpr int kStages = std::min(MAXST, SMEM / (kStageElems * 2));
  static constexpr int kSmemBytes = kStages * kStageElems * 2;
  static_assert(MT >= 1 && kWarpM % 16 == 0 && kWarpN % 8 == 0, "warp tile");
  static_assert(NT == 1 || NT % 2 == 0, "B fragments load two n8 tiles at a time");
  static_assert(kStages >= 2, "pipeline");
};

/// Tile configurations, by plan id. Skinny: 64 rows, one warp per 16 rows, every token of the
/// tile per warp: decode sizes, where shared memory stays under the 48 KB default. Big / Huge:
/// larger warp tiles (fewer shared-memory reads per mma) for prefill.
enum TcCfg : int { kSkinny8, kSkinny16, kSkinny32, kSkinny64, kBig, kHuge, kNumTcCfg };

constexpr int kSmallSmem = 46 * 1024;
// Budgets that fit every sm_80+ part (sm_86 / sm_89 / sm_120 allow 99 KB per block).
constexpr int kLargeSmem = 80 * 1024;
constexpr int kHugeSmem = 96 * 1024;

template <bool GLU, int ID>
struct tc_cfg_of;
template <bool GLU>
struct tc_cfg_of<GLU, kSkinny8> { using type = tc_cfg_t<GLU, 64, 8, 4, 1, kSmallSmem>; };
template <bool GLU>
struct tc_cfg_of<GLU, kSkinny16> { using type = tc_cfg_t<GLU, 64, 16, 4, 1, kSmallSmem>; };
template <bool GLU>
struct tc_cfg_of<GLU, kSkinny32> { using type = tc_cfg_t<GLU, 64, 32, 4, 1, kSmallSmem>; };
template <bool GLU>
struct tc_cfg_of<GLU, kSkinny64> { using type = tc_cfg_t<GLU, 64, 64, 4, 1, kSmallSmem>; };
// GLU holds two accumulators per element, so its prefill tiles take half the tokens.
template <bool GLU>
struct tc_cfg_of<GLU, kBig> {
  using type = std::conditional_t<GLU, tc_cfg_t<true, 128, 64, 4, 2, kLargeSmem, 2>,
                                  tc_cfg_t<false, 128, 128, 2, 4, kLargeSmem, 2>>;
};
// 64 x 64 warp tiles (128 accumulators per thread): the most arithmetic per byte brought from
// L2 into shared memory, which is what limits the smaller tiles at large n.
template <bool GLU>
struct tc_cfg_of<GLU, kHuge> {
  using type = std::conditional_t<GLU, tc_cfg_t<true, 128, 128, 2, 4, kHugeSmem>,
                                  tc_cfg_t<false, 128, 256, 2, 4, kHugeSmem>>;
};

/// The one-pass (decode) variant of a configuration: the same tile, more stages, so that a
/// whole K slice can be in flight before griddepcontrol.wait. Shared memory is sized per launch
/// (only the stages the slice needs).
template <typename C>
using one_pass_cfg_t = tc_cfg_t<C::kMats == 2, C::BM, C::BN, C::WM, C::WN, kOnePassSmem,
                                C::kMinBlocks, kOnePassStages>;

/// Shared memory of the one-pass kernel beyond its stages, in floats: W2 rows [kv_heads, BM],
/// b1 [BM], bias [kv_heads], per-warp z sums [WM, BN, kv_heads].
template <typename C>
__host__ __device__ constexpr int one_pass_ext_floats(int kv_heads) {
  return kv_heads * C::BM + C::BM + kv_heads + C::WM * C::BN * kv_heads;
}

/// Row pitch (floats) of the summed partials [kMats, BN, BM] the one-pass finisher stages in
/// shared memory: + 4 keeps the fragment reads (2 tokens apart per lane quad) off one bank.
template <typename C>
__host__ __device__ constexpr int one_pass_pitch() {
  return C::BM + 4;
}

/// Runs f(cfg) for the configuration with the given plan id.
template <bool GLU, typename F>
cudaError_t with_tc_cfg(int id, F&& f) {
  switch (id) {
    case kSkinny8: return f(typename tc_cfg_of<GLU, kSkinny8>::type{});
    case kSkinny16: return f(typename tc_cfg_of<GLU, kSkinny16>::type{});
    case kSkinny32: return f(typename tc_cfg_of<GLU, kSkinny32>::type{});
    case kSkinny64: return f(typename tc_cfg_of<GLU, kSkinny64>::type{});
    case kBig: return f(typename tc_cfg_of<GLU, kBig>::type{});
    case kHuge: return f(typename tc_cfg_of<GLU, kHuge>::type{});
  }
  return cudaErrorInvalidValue;
}

template <typename T>
struct tc_args_t {
  const T* x;    ///< [n, in_dim]
  const T* wa;   ///< [inter, in_dim]: W1 or W_gate
  const T* wb;   ///< [inter, in_dim]: W_up (GLU) or null
  const T* b1;   ///< [inter] or null (MLP)
  const T* w2;   ///< [kv_heads, inter]
  float* out;    ///< fused: z partials [slots, n, kv_heads]; split: u partials (see kernel)
  int n, in_dim, inter, kv_heads, kslice, act;
  // One pass only.
  const T* bias;        ///< [kv_heads] or null
  float* lam;           ///< [n, kv_heads]
  unsigned* counters;   ///< arrival counters (layout: kCtrBM); zero on entry, zero on exit
  float* zp;            ///< z partials [row tiles, n, kv_heads]
  int ctr_rows;         ///< ceil(inter / kCtrBM): row tiles of the counter layout
  int stage_bytes;      ///< dynamic shared memory before the W2 / b1 / bias / z area
  int diag;             ///< harness timing diagnostics (kDiag*), 0 in every real call
};

/// Timing diagnostics of the one-pass kernel (gate_harness bench only; results are wrong).
enum OnePassDiag : int {
  kDiagLateWeights = 1,  ///< request the W tiles after griddepcontrol.wait, with x
  kDiagHiddenOnly = 2,   ///< every block exits after its partials: no finishing
  kDiagNoLevel2 = 4,     ///< the row-tile finishers exit after writing zp
  kDiagNoPdl = 8,        ///< launch in plain stream order (host side)
};


/// Raw 16-bit weight element i of the one-pass kernel's shared W2 / b1 / bias area (0 past
/// the matrix): loaded into a register before griddepcontrol.wait, converted after it, so the
/// load's latency overlaps the wait instead of stalling before it.
template <typename T>
__device__ __forceinline__ unsigned short ext_raw(const tc_args_t<T>& p, int m0, int bm, int i) {
  const int nw2 = p.kv_heads * bm;
  const unsigned short* w;
  if (i < nw2) {
    const int h = i / bm, r = m0 + i % bm;
    if (r >= p.inter) return 0;
    w = reinterpret_cast<const unsigned short*>(p.w2) + static_cast<size_t>(h) * p.inter + r;
  } else if (i < nw2 + bm) {
    const int r = m0 + i - nw2;
    if (p.b1 == nullptr || r >= p.inter) return 0;
    w = reinterpret_cast<const unsigned short*>(p.b1) + r;
  } else {
    if (p.bias == nullptr) return 0;
    w = reinterpret_cast<const unsigned short*>(p.bias) + (i - nw2 - bm);
  }
  return *w;  // 0x0000 is +0 in fp16 and bf16
}

template <typename T>
__device__ __forceinline__ float raw_to_f32(unsigned short v) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(__ushort_as_half(v));
  else return __uint_as_float(static_cast<uint32_t>(v) << 16);
}

__device__ __forceinline__ void vzero(float& a) { a = 0.f; }
__device__ __forceinline__ void vzero(float4& a) { a = make_float4(0.f, 0.f, 0.f, 0.f); }
__device__ __forceinline__ void vadd(float& a, float b) { a += b; }
__device__ __forceinline__ void vadd(float4& a, const float4& b) {
  a.x += b.x;
  a.y += b.y;
  a.z += b.z;
  a.w += b.w;
}

/// One-pass finisher, first level: u_s[m, t - n0, r - m0] = sum over splits s (in split order,
/// so the result does not depend on which block arrives last) of part[m, s, t, r] for the
/// block's BM rows and BN tokens; zero outside [0, inter) x [0, n). V = float4 needs
/// inter % 4 == 0 (16-byte aligned rows). Loads go through L2 (ld.global.cg): the partials were
/// written by other SMs, whose L1s this SM cannot see. Every thread keeps 16 loads in flight
/// (kG items x kSB splits): one L2 round trip per 16 / kG splits.
template <typename C, typename V>
__device__ __forceinline__ void sum_split_partials(const float* __restrict__ part, float* u_s,
                                                   int splits, int n, int inter, int m0,
                                                   int n0) {
  constexpr int kVec = sizeof(V) / sizeof(float);
  constexpr int kRowVecs = C::BM / kVec;
  constexpr int kItems = C::kMats * C::BN * kRowVecs;
  constexpr int kPer = (kItems + C::kThreads - 1) / C::kThreads;
  constexpr int kG = kPer < 4 ? kPer : 4;  // items per pass
  constexpr int kSB = 16 / kG;             // splits per batch: kG x kSB loads in flight
  constexpr int kPitch = one_pass_pitch<C>();
  const size_t split_stride = static_cast<size_t>(n) * inter;
  const size_t mat_stride = split_stride * splits;
  for (int k0 = 0; k0 < kPer; k0 += kG) {
    const float* src[kG];
    bool ok[kG];
    int dst[kG];
    V sum[kG];
#pragma unroll
    for (int g = 0; g < kG; ++g) {
      const int it = threadIdx.x + (k0 + g) * C::kThreads;
      const int m = it / (C::BN * kRowVecs), rem = it % (C::BN * kRowVecs);
      const int tl = rem / kRowVecs, rl = (rem % kRowVecs) * kVec;
      const int t = n0 + tl, r = m0 + rl;
      ok[g] = k0 + g < kPer && it < kItems && t < n && r < inter;
      dst[g] = (k0 + g < kPer && it < kItems) ? (m * C::BN + tl) * kPitch + rl : -1;
      src[g] = ok[g] ? part + m * mat_stride + static_cast<size_t>(t) * inter + r : part;
      vzero(sum[g]);
    }
    for (int s0 = 0; s0 < splits; s0 += kSB) {
      V v[kG][kSB];
#pragma unroll
      for (int g = 0; g < kG; ++g)
#pragma unroll
        for (int b = 0; b < kSB; ++b) {
          if (ok[g] && s0 + b < splits)
            v[g][b] = __ldcg(reinterpret_cast<const V*>(src[g] + (s0 + b) * split_stride));
          else
            vzero(v[g][b]);
        }
#pragma unroll
      for (int g = 0; g < kG; ++g)
#pragma unroll
        for (int b = 0; b < kSB; ++b) vadd(sum[g], v[g][b]);
    }
#pragma unroll
    for (int g = 0; g < kG; ++g)
      if (dst[g] >= 0) *reinterpret_cast<V*>(u_s + dst[g]) = sum[g];
  }
}

/// Elects the last block to arrive at counter c, out of `arrivals`. The barrier orders every
/// thread's global writes before thread 0's arrival, an acq_rel atomic: its release half makes
/// them visible device-wide first (cumulatively, as in cooperative groups' grid sync), its
/// acquire half lets the last block's reads after the second barrier (through L2) see every
/// other arriving block's writes. The last block resets the counter for the next call with a
/// plain store, off the critical path: nobody else arrives at c in this call, and the next
/// call reads it only after this grid completes. Returns the same answer to every thread.
__device__ __forceinline__ bool arrive_last(unsigned* c, unsigned arrivals, int* flag) {
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned prev;
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;\n"
                 : "=r"(prev)
                 : "l"(c)
                 : "memory");
    const bool last = prev == arrivals - 1;
    if (last) *reinterpret_cast<volatile unsigned*>(c) = 0u;
    *flag = last;
  }
  __syncthreads();
  return *flag != 0;
}

}  // namespace

/// Hidden layer on tensor cores. Block (bx, by, bz) computes rows [bx BM, +BM) of W (both GLU
/// matrices) times tokens [by BN, +BN) over K range [bz kslice, +kslice).
/// - ONE_PASS (decode; BM == kCtrBM, launched as a programmatic dependent on sm_90+): the
///   whole call. W tiles (the first stages: the whole slice when it fits) and the block's rows
///   of W2 / b1 and the bias are requested before griddepcontrol.wait, x after it. gridDim.z >
///   1: raw partials to out [kMats, splits, n, inter]; the last of the splits of this (row
///   tile, token tile) to arrive sums them. Then b1 / act / GLU product and the W2 rows give
///   zp [bx, t, h]; the last row tile of the token tile to arrive writes
///   lam[t, h] = logsigmoid(bias[h] + sum over row tiles of zp). Dynamic shared memory:
///   p.stage_bytes, then one_pass_ext_floats floats.
/// - gridDim.z == 1 (fused): applies b1 / act / the GLU product, multiplies by the W2 columns
///   of the warp's rows and writes out[slot, t, h] with slot = bx * WM + (warp's row index):
///   z = bias + sum over slots, left to GateFinishZKernel.
/// - gridDim.z > 1 (split K): writes the raw partial products out[bz, t, r] (GLU: W_gate's
///   [splits, n, inter], then W_up's), left to GateFinishFewKernel / GateFinishManyKernel.
/// Rows >= inter, tokens >= n and k >= in_dim are zero-filled in shared memory, so any inter,
/// any n and any in_dim % 8 == 0 work. grid (ceil(inter/BM), ceil(n/BN), splits).
template <typename T, bool GLU, typename C, bool ONE_PASS>
__global__ void __launch_bounds__(C::kThreads, C::kMinBlocks) GateTcKernel(const tc_args_t<T> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  // Let the next kernel in the stream launch at once: its blocks only prefetch weights before
  // their own griddepcontrol.wait, which returns once this grid is complete.
  pdl_launch_dependents();
  extern __shared__ __align__(16) uint8_t smem_raw[];
  __shared__ int last_flag;
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp % C::WM, wn = warp / C::WM;
  const int m0 = blockIdx.x * C::BM, n0 = blockIdx.y * C::BN;
  const int k_begin = blockIdx.z * p.kslice;
  const int k_end = min(p.in_dim, k_begin + p.kslice);
  const int ktiles = (k_end - k_begin + kBK - 1) / kBK;

  constexpr int kChunksA = C::kRowsA * kChunksPerRow, kChunksB = C::BN * kChunksPerRow;
  auto load_w = [&](int stage, int kt) {
    T* s = smem + stage * C::kStageElems;
    const int k0 = k_begin + kt * kBK;
#pragma unroll
    for (int c0 = 0; c0 < kChunksA; c0 += C::kThreads) {
      const int c = c0 + tid;
      if (kChunksA % C::kThreads != 0 && c >= kChunksA) break;
      const int row = c / kChunksPerRow, col = (c % kChunksPerRow) * 8, k = k0 + col;
      const int r = m0 + row % C::BM;
      const T* w = (GLU && row >= C::BM) ? p.wb : p.wa;
      const bool ok = r < p.inter && k < k_end;
      cp_async16(s + row * kLds + col, w + (ok ? static_cast<size_t>(r) * p.in_dim + k : 0), ok);
    }
  };
  auto load_x = [&](int stage, int kt) {
    T* s = smem + stage * C::kStageElems + C::kRowsA * kLds;
    const int k0 = k_begin + kt * kBK;
#pragma unroll
    for (int c0 = 0; c0 < kChunksB; c0 += C::kThreads) {
      const int c = c0 + tid;
      if (kChunksB % C::kThreads != 0 && c >= kChunksB) break;
      const int row = c / kChunksPerRow, col = (c % kChunksPerRow) * 8, k = k0 + col;
      const int t = n0 + row;
      const bool ok = t < p.n && k < k_end;
      cp_async16(s + row * kLds + col, p.x + (ok ? static_cast<size_t>(t) * p.in_dim + k : 0), ok);
    }
  };

  float acc[C::kMats][C::MT][C::NT][4];
#pragma unroll
  for (int m = 0; m < C::kMats; ++m)
#pragma unroll
    for (int i = 0; i < C::MT; ++i)
#pragma unroll
      for (int j = 0; j < C::NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[m][i][j][e] = 0.f;

  // One pass: W2 rows [kv_heads, BM], b1 [BM], bias [kv_heads] as float, then z sums.
  float* ext = reinterpret_cast<float*>(smem_raw + (ONE_PASS ? p.stage_bytes : 0));
  const int n_ext = p.kv_heads * C::BM + C::BM + p.kv_heads;
  int pre;  // K tiles the prologue loads
  if constexpr (ONE_PASS) {
    // Weights are immutable after upload, so they may be read before the wait; x and the
    // workspace may be written by the kernels before this one and are read only after it.
    pre = ktiles <= C::kStages ? ktiles : C::kStages - 1;
    const bool early = !(p.diag & kDiagLateWeights);
    if (early)
      for (int s = 0; s < pre; ++s) load_w(s, s);
    unsigned short raw[kExtPre];
#pragma unroll
    for (int k = 0; k < kExtPre; ++k) {
      const int i = tid + k * C::kThreads;
      raw[k] = i < n_ext ? ext_raw(p, m0, C::BM, i) : 0;
    }
    pdl_wait();
    for (int s = 0; s < pre; ++s) {
      if (!early) load_w(s, s);
      load_x(s, s);
    }
    cp_async_commit();
#pragma unroll
    for (int k = 0; k < kExtPre; ++k) {
      const int i = tid + k * C::kThreads;
      if (i < n_ext) ext[i] = raw_to_f32<T>(raw[k]);
    }
    for (int i = tid + kExtPre * C::kThreads; i < n_ext; i += C::kThreads)
      ext[i] = raw_to_f32<T>(ext_raw(p, m0, C::BM, i));
    cp_async_wait<0>();  // the loop below then only waits for stages it prefetches itself
    __syncthreads();
  } else {
    pre = C::kStages - 1;
#pragma unroll
    for (int s = 0; s < C::kStages - 1; ++s) {
      if (s < ktiles) {
        load_w(s, s);
        load_x(s, s);
      }
      cp_async_commit();  // empty groups keep the wait count below uniform
    }
  }
  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<C::kStages - 2>();
    // Tile kt is visible to every thread, and every thread is done with tile kt - 1, whose
    // stage the prefetch below overwrites.
    __syncthreads();
    const int pf = kt + C::kStages - 1;
    if (pf >= pre && pf < ktiles) {
      load_w(pf % C::kStages, pf);
      load_x(pf % C::kStages, pf);
    }
    cp_async_commit();
    const uint32_t sa = smem_u32(smem + (kt % C::kStages) * C::kStageElems);
    const uint32_t sb = sa + C::kRowsA * kLds * 2;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t af[C::kMats][C::MT][4], bf[C::NT][2];
#pragma unroll
      for (int m = 0; m < C::kMats; ++m)
#pragma unroll
        for (int i = 0; i < C::MT; ++i) {
          const int row = m * C::BM + wm * C::kWarpM + i * 16 + (lane & 15);
          ldsm_x4(af[m][i], sa + (row * kLds + kk + (lane >> 4) * 8) * 2);
        }
      if constexpr (C::NT == 1) {
        const int tok = wn * C::kWarpN + (lane & 7);
        ldsm_x2(bf[0], sb + (tok * kLds + kk + ((lane >> 3) & 1) * 8) * 2);
      } else {
#pragma unroll
        for (int j = 0; j < C::NT; j += 2) {
          const int tok = wn * C::kWarpN + j * 8 + (lane >> 4) * 8 + (lane & 7);
          uint32_t r[4];
          ldsm_x4(r, sb + (tok * kLds + kk + ((lane >> 3) & 1) * 8) * 2);
          bf[j][0] = r[0];
          bf[j][1] = r[1];
          bf[j + 1][0] = r[2];
          bf[j + 1][1] = r[3];
        }
      }
#pragma unroll
      for (int m = 0; m < C::kMats; ++m)
#pragma unroll
        for (int i = 0; i < C::MT; ++i)
#pragma unroll
          for (int j = 0; j < C::NT; ++j) mma_16816<T>(acc[m][i][j], af[m][i], bf[j]);
    }
  }
  cp_async_wait<0>();

  // Accumulator element e of tile (i, j) sits at row g (+8 for e >= 2) and token 2q + (e & 1).
  const int g = lane >> 2, q = lane & 3;
  const int row0 = m0 + wm * C::kWarpM + g;
  const int tok0 = n0 + wn * C::kWarpN + 2 * q;
  constexpr int kPitch = one_pass_pitch<C>();
  if (ONE_PASS && (p.diag & kDiagHiddenOnly)) return;
  if (gridDim.z > 1) {
    const size_t mat_stride = static_cast<size_t>(gridDim.z) * p.n * p.inter;
    float* out = p.out + static_cast<size_t>(blockIdx.z) * p.n * p.inter;
#pragma unroll
    for (int m = 0; m < C::kMats; ++m)
#pragma unroll
      for (int i = 0; i < C::MT; ++i)
#pragma unroll
        for (int j = 0; j < C::NT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = row0 + i * 16 + (e >> 1) * 8, t = tok0 + j * 8 + (e & 1);
            if (r < p.inter && t < p.n)
              out[m * mat_stride + static_cast<size_t>(t) * p.inter + r] = acc[m][i][j][e];
          }
    if constexpr (!ONE_PASS) {
      return;
    } else {
      // arrive_last's barrier also ends every warp's reads of the stages, which the sum reuses.
      unsigned* c = p.counters + blockIdx.y * p.ctr_rows + blockIdx.x;
      if (!arrive_last(c, gridDim.z, &last_flag)) return;
      float* u_s = reinterpret_cast<float*>(smem_raw);
      if ((p.inter & 3) == 0)
        sum_split_partials<C, float4>(p.out, u_s, gridDim.z, p.n, p.inter, m0, n0);
      else
        sum_split_partials<C, float>(p.out, u_s, gridDim.z, p.n, p.inter, m0, n0);
      __syncthreads();
#pragma unroll
      for (int m = 0; m < C::kMats; ++m)
#pragma unroll
        for (int i = 0; i < C::MT; ++i)
#pragma unroll
          for (int j = 0; j < C::NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int rl = wm * C::kWarpM + i * 16 + g + (e >> 1) * 8;
              const int tl = wn * C::kWarpN + j * 8 + 2 * q + (e & 1);
              acc[m][i][j][e] = u_s[(m * C::BN + tl) * kPitch + rl];
            }
    }
  }

  // Fused: activations in place (rows past inter contribute nothing).
  const float* s_w2 = ext;
  const float* s_b1 = ext + p.kv_heads * C::BM;
#pragma unroll
  for (int i = 0; i < C::MT; ++i)
#pragma unroll
    for (int hi = 0; hi < 2; ++hi) {
      const int r = row0 + i * 16 + hi * 8;
      const bool valid = r < p.inter;
      float bias = 0.f;
      if constexpr (ONE_PASS) bias = s_b1[r - m0];
      else bias = (!GLU && valid && p.b1 != nullptr) ? to_f32(p.b1[r]) : 0.f;
#pragma unroll
      for (int j = 0; j < C::NT; ++j)
#pragma unroll
        for (int e = hi * 2; e < hi * 2 + 2; ++e) {
          float v;
          if constexpr (GLU) {
            v = gate_act(acc[0][i][j][e], p.act) * acc[C::kMats - 1][i][j][e];
          } else {
            v = gate_act(acc[0][i][j][e] + bias, p.act);
          }
          acc[0][i][j][e] = valid ? v : 0.f;
        }
    }
  // z partial over the warp's rows: per thread over its rows, then over the 8 row groups g
  // (lane bits 2..4). Lanes with g == 0 hold the sums for tokens tok0 + 8j + {0, 1}.
  // One pass: staged per warp in shared memory, then summed over the block's warps.
  float* zs = ext + n_ext;  // [WM, BN, kv_heads], one pass only
  float* zp = p.out + static_cast<size_t>(blockIdx.x * C::WM + wm) * p.n * p.kv_heads;
  for (int h = 0; h < p.kv_heads; ++h) {
    const T* w2 = p.w2 + static_cast<size_t>(h) * p.inter;
    float w[C::MT][2];
#pragma unroll
    for (int i = 0; i < C::MT; ++i)
#pragma unroll
      for (int hi = 0; hi < 2; ++hi) {
        const int r = row0 + i * 16 + hi * 8;
        if constexpr (ONE_PASS) w[i][hi] = s_w2[h * C::BM + r - m0];
        else w[i][hi] = r < p.inter ? to_f32(w2[r]) : 0.f;
      }
    float s[C::NT][2];
#pragma unroll
    for (int j = 0; j < C::NT; ++j)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        float v = 0.f;
#pragma unroll
        for (int i = 0; i < C::MT; ++i) {
          v = fmaf(w[i][0], acc[0][i][j][c], v);
          v = fmaf(w[i][1], acc[0][i][j][c + 2], v);
        }
#pragma unroll
        for (int o = 4; o < 32; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        s[j][c] = v;
      }
    if (g == 0) {
#pragma unroll
      for (int j = 0; j < C::NT; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int t = tok0 + j * 8 + c;
          if constexpr (ONE_PASS) {
            zs[(wm * C::BN + t - n0) * p.kv_heads + h] = s[j][c];
          } else {
            if (t < p.n) zp[static_cast<size_t>(t) * p.kv_heads + h] = s[j][c];
          }
        }
    }
  }
  if constexpr (ONE_PASS) {
    static_assert(C::WN == 1, "one pass: every warp holds all BN tokens of its rows");
    __syncthreads();
    // The block's z partial [n, kv_heads] over its BM rows (warps summed in order).
    const int outs = C::BN * p.kv_heads;
    float* zrow = p.zp + static_cast<size_t>(blockIdx.x) * p.n * p.kv_heads;
    for (int i = tid; i < outs; i += C::kThreads) {
      const int t = n0 + i / p.kv_heads;
      if (t >= p.n) break;
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < C::WM; ++w) v += zs[w * outs + i];
      zrow[static_cast<size_t>(t) * p.kv_heads + i % p.kv_heads] = v;
    }
    if (p.diag & kDiagNoLevel2) return;
    unsigned* c = p.counters + kMaxTokTiles * p.ctr_rows + blockIdx.y;
    if (!arrive_last(c, gridDim.x, &last_flag)) return;
    // lam for the token tile: bias + the row tiles' z partials in row-tile order.
    const float* s_bias = ext + p.kv_heads * C::BM + C::BM;
    const size_t count = static_cast<size_t>(p.n) * p.kv_heads;
    const int tiles = gridDim.x;
    for (int i = tid; i < outs; i += C::kThreads) {
      const int t = n0 + i / p.kv_heads, h = i % p.kv_heads;
      if (t >= p.n) break;
      const size_t o = static_cast<size_t>(t) * p.kv_heads + h;
      float z = s_bias[h];
      for (int s0 = 0; s0 < tiles; s0 += kSplitBatch) {
        float v[kSplitBatch];
#pragma unroll
        for (int k = 0; k < kSplitBatch; ++k)
          v[k] = s0 + k < tiles ? __ldcg(p.zp + static_cast<size_t>(s0 + k) * count + o) : 0.f;
#pragma unroll
        for (int k = 0; k < kSplitBatch; ++k) z += v[k];
      }
      p.lam[o] = log_sigmoid(z);
    }
  }
#endif
}

/// Hidden layer on CUDA cores (any dtypes, any arch): raw partial products
/// u[s, t, r] = W[r, K_s] . x[t, K_s] over K slice s = blockIdx.y. One warp per row r, every
/// token, so each weight row slice is read from memory once per call.
/// grid (ceil(inter / 8), splits), block 256.
/// \param x  [n, in_dim] TX
/// \param wa [inter, in_dim] TW (W1 or W_gate), wb [inter, in_dim] TW (W_up; GLU only)
/// \param u  [splits, n, inter] float (GLU: W_gate's, then W_up's)
template <typename TX, typename TW, bool GLU>
__global__ void __launch_bounds__(kFmaThreads)
    GateFmaKernel(const TX* __restrict__ x, const TW* __restrict__ wa, const TW* __restrict__ wb,
                  float* __restrict__ u, int n, int in_dim, int inter, int kslice) {
  pdl_launch_dependents();
  const int lane = threadIdx.x & 31;
  const int r = blockIdx.x * kFmaRows + (threadIdx.x >> 5);
  if (r >= inter) return;
  const TW* ra = wa + static_cast<size_t>(r) * in_dim;
  const TW* rb = GLU ? wb + static_cast<size_t>(r) * in_dim : nullptr;
  const int c_begin = blockIdx.y * kslice / 8;
  const int c_end = min(in_dim, (blockIdx.y + 1) * kslice) / 8;
  float* ua = u + static_cast<size_t>(blockIdx.y) * n * inter + r;
  float* ub = ua + static_cast<size_t>(gridDim.y) * n * inter;
  for (int t0 = 0; t0 < n; t0 += kTokChunk) {
    float sa[kTokChunk], sb[kTokChunk];
#pragma unroll
    for (int j = 0; j < kTokChunk; ++j) { sa[j] = 0.f; sb[j] = 0.f; }
    for (int c = c_begin + lane; c < c_end; c += 32) {
      float w[8], w2[8];
      load8<TW>(ra + c * 8, w);
      if (GLU) load8<TW>(rb + c * 8, w2);
#pragma unroll
      for (int j = 0; j < kTokChunk; ++j) {
        if (t0 + j < n) {
          float xv[8];
          load8<TX>(x + static_cast<size_t>(t0 + j) * in_dim + c * 8, xv);
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            sa[j] = fmaf(w[e], xv[e], sa[j]);
            if (GLU) sb[j] = fmaf(w2[e], xv[e], sb[j]);
          }
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kTokChunk; ++j) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        sa[j] += __shfl_xor_sync(0xffffffffu, sa[j], o);
        if (GLU) sb[j] += __shfl_xor_sync(0xffffffffu, sb[j], o);
      }
    }
    if (lane < kTokChunk && t0 + lane < n) {
      float va = 0.f, vb = 0.f;
#pragma unroll
      for (int j = 0; j < kTokChunk; ++j)
        if (j == lane) { va = sa[j]; vb = sb[j]; }
      ua[static_cast<size_t>(t0 + lane) * inter] = va;
      if (GLU) ub[static_cast<size_t>(t0 + lane) * inter] = vb;
    }
  }
}

/// Sums the K-split partials and finishes the gate for token t = blockIdx.x, for few tokens:
/// a = act(u + b1) (MLP) or act(u_gate) * u_up (GLU), lam[t, h] = logsigmoid(W2[h] . a + bias).
/// One thread per row (strided), heads kHeadGroup at a time in registers, then a block
/// reduction; any inter and kv_heads work (a is recomputed per group beyond the first).
/// The loads of a row (partials, b1, W2) are independent, so a row costs one memory round
/// trip, and W2 / b1 are prefetched into L2 before the wait for the hidden layer.
/// grid n, block 512; launched as a programmatic dependent of the hidden layer.
/// \param u [splits, n, inter] float (GLU: W_gate's, then W_up's)
/// \param b1 [inter] TW or null, w2 [kv_heads, inter] TW, bias [kv_heads] TW or null
/// \param lam [n, kv_heads] float
template <typename TW, bool GLU>
__global__ void __launch_bounds__(kFinishFewThreads)
    GateFinishFewKernel(const float* __restrict__ u, const TW* __restrict__ b1,
                        const TW* __restrict__ w2, const TW* __restrict__ bias,
                        float* __restrict__ lam, int n, int inter, int kv_heads, int splits,
                        int act) {
  constexpr int kWarps = kFinishFewThreads / 32;
  __shared__ float red[kWarps][kHeadGroup];
  const int t = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int r = threadIdx.x; r < inter; r += kFinishFewThreads) {
    for (int h = 0; h < min(kv_heads, kHeadGroup); ++h)
      prefetch_l2(w2 + static_cast<size_t>(h) * inter + r);
    if (b1 != nullptr) prefetch_l2(b1 + r);
  }
  pdl_wait();
  const size_t split_stride = static_cast<size_t>(n) * inter;
  const size_t mat_stride = split_stride * splits;
  const float* ut = u + static_cast<size_t>(t) * inter;
  for (int h0 = 0; h0 < kv_heads; h0 += kHeadGroup) {
    float z[kHeadGroup];
#pragma unroll
    for (int k = 0; k < kHeadGroup; ++k) z[k] = 0.f;
    for (int r = threadIdx.x; r < inter; r += kFinishFewThreads) {
      float sa = 0.f, sb = 0.f;  // summed in split order: deterministic
      for (int s0 = 0; s0 < splits; s0 += kSplitBatch) {
        float va[kSplitBatch], vb[kSplitBatch];
#pragma unroll
        for (int k = 0; k < kSplitBatch; ++k) {
          const bool ok = s0 + k < splits;
          const size_t off = static_cast<size_t>(s0 + k) * split_stride + r;
          va[k] = ok ? ut[off] : 0.f;
          vb[k] = (GLU && ok) ? ut[mat_stride + off] : 0.f;
        }
#pragma unroll
        for (int k = 0; k < kSplitBatch; ++k) {
          sa += va[k];
          sb += vb[k];
        }
      }
      const float a = GLU ? gate_act(sa, act) * sb
                          : gate_act(sa + (b1 != nullptr ? to_f32(b1[r]) : 0.f), act);
#pragma unroll
      for (int k = 0; k < kHeadGroup; ++k)
        if (h0 + k < kv_heads)
          z[k] = fmaf(to_f32(w2[static_cast<size_t>(h0 + k) * inter + r]), a, z[k]);
    }
#pragma unroll
    for (int k = 0; k < kHeadGroup; ++k) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) z[k] += __shfl_xor_sync(0xffffffffu, z[k], o);
    }
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < kHeadGroup; ++k) red[warp][k] = z[k];
    }
    __syncthreads();
    const int h = h0 + threadIdx.x;
    if (threadIdx.x < kHeadGroup && h < kv_heads) {
      float v = bias != nullptr ? to_f32(bias[h]) : 0.f;
      for (int w = 0; w < kWarps; ++w) v += red[w][threadIdx.x];
      lam[static_cast<size_t>(t) * kv_heads + h] = log_sigmoid(v);
    }
    __syncthreads();  // red is reused by the next head group
  }
}

/// The same as GateFinishFewKernel for many tokens: activations are staged kFinishChunk rows
/// at a time in shared memory and one warp computes one head (a recomputed per group of 8
/// heads beyond the first). grid n, block 256; launched as a programmatic dependent of the
/// hidden layer.
template <typename TW, bool GLU>
__global__ void __launch_bounds__(kFinishManyThreads)
    GateFinishManyKernel(const float* __restrict__ u, const TW* __restrict__ b1,
                         const TW* __restrict__ w2, const TW* __restrict__ bias,
                         float* __restrict__ lam, int n, int inter, int kv_heads, int splits,
                         int act) {
  constexpr int kWarps = kFinishManyThreads / 32;
  __shared__ float a_s[kFinishChunk];
  pdl_wait();
  const int t = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const size_t split_stride = static_cast<size_t>(n) * inter;
  const size_t mat_stride = split_stride * splits;
  const float* ut = u + static_cast<size_t>(t) * inter;
  for (int h0 = 0; h0 < kv_heads; h0 += kWarps) {
    const int h = h0 + warp;
    float z = 0.f;
    for (int r0 = 0; r0 < inter; r0 += kFinishChunk) {
      const int len = min(kFinishChunk, inter - r0);
      __syncthreads();  // the previous pass's readers are done with a_s
      for (int i = threadIdx.x; i < len; i += kFinishManyThreads) {
        const int r = r0 + i;
        float sa = 0.f, sb = 0.f;
#pragma unroll 4
        for (int s = 0; s < splits; ++s) {
          sa += ut[s * split_stride + r];
          if (GLU) sb += ut[mat_stride + s * split_stride + r];
        }
        a_s[i] = GLU ? gate_act(sa, act) * sb
                     : gate_act(sa + (b1 != nullptr ? to_f32(b1[r]) : 0.f), act);
      }
      __syncthreads();
      if (h < kv_heads) {
        const TW* w = w2 + static_cast<size_t>(h) * inter + r0;
        for (int i = lane; i < len; i += 32) z = fmaf(to_f32(w[i]), a_s[i], z);
      }
    }
    if (h < kv_heads) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) z += __shfl_xor_sync(0xffffffffu, z, o);
      if (lane == 0) {
        if (bias != nullptr) z += to_f32(bias[h]);
        lam[static_cast<size_t>(t) * kv_heads + h] = log_sigmoid(z);
      }
    }
  }
}

/// lam[i] = logsigmoid(bias[i % kv_heads] + sum over slots of zp[slot, i]) for the flat index
/// i = t * kv_heads + h, summed in slot order (deterministic). grid ceil(n kv_heads / 256);
/// launched as a programmatic dependent of GateTcKernel.
/// \param zp [slots, n, kv_heads] float, bias [kv_heads] TW or null, lam [n, kv_heads] float
template <typename TW>
__global__ void __launch_bounds__(kFinishZThreads)
    GateFinishZKernel(const float* __restrict__ zp, const TW* __restrict__ bias,
                      float* __restrict__ lam, size_t count, int kv_heads, int slots) {
  const size_t i = blockIdx.x * static_cast<size_t>(kFinishZThreads) + threadIdx.x;
  const float b = (i < count && bias != nullptr) ? to_f32(bias[i % kv_heads]) : 0.f;
  pdl_wait();
  if (i >= count) return;
  float z = b;
  for (int s0 = 0; s0 < slots; s0 += kSplitBatch) {
    float v[kSplitBatch];
#pragma unroll
    for (int k = 0; k < kSplitBatch; ++k)
      v[k] = s0 + k < slots ? zp[static_cast<size_t>(s0 + k) * count + i] : 0.f;
#pragma unroll
    for (int k = 0; k < kSplitBatch; ++k) z += v[k];
  }
  lam[i] = log_sigmoid(z);
}

namespace {

constexpr int kFmaCfg = -1;  ///< gate_plan_t::cfg of the CUDA-core path

/// How one call runs: a tile configuration (or the FMA path), the number of K slices and
/// their length, whether the tensor-core kernel finishes the call itself (one pass), and the
/// workspace that needs (arrival counters included). Shape-only, so that the workspace size is
/// known without a device.
struct gate_plan_t {
  int cfg = kFmaCfg;
  int splits = 1;
  int kslice = 0;
  bool one_pass = false;
  size_t ws_bytes = 0;
  int diag = 0;          ///< OnePassDiag bits (harness timing only)
};

int ceil_div(long long a, long long b) { return static_cast<int>((a + b - 1) / b); }

/// Bytes of arrival counters at the front of every workspace (every plan keeps its data past
/// them, so that they stay zero whatever plan ran before): one per (token tile, kCtrBM-row
/// tile) and one per token tile, for up to kMaxTokTiles token tiles.
size_t counter_bytes(const gate_params_t& p) {
  const size_t count = static_cast<size_t>(ceil_div(p.inter, kCtrBM) + 1) * kMaxTokTiles;
  return (count * sizeof(unsigned) + kCtrAlign - 1) / kCtrAlign * kCtrAlign;
}

struct tc_shape_t {
  int bm, bn, wm;
};

tc_shape_t tc_shape(int cfg, bool glu) {
  tc_shape_t s{0, 0, 0};
  auto get = [&](auto c) {
    using C = decltype(c);
    s = {C::BM, C::BN, C::WM};
    return cudaSuccess;
  };
  if (glu) with_tc_cfg<true>(cfg, get);
  else with_tc_cfg<false>(cfg, get);
  return s;
}

/// Sets the plan's K slices from a wanted count s: kslice a multiple of align.
void set_splits(const gate_params_t& p, int s, int align, gate_plan_t& plan) {
  s = std::max(1, std::min(s, ceil_div(p.in_dim, align)));
  plan.kslice = ceil_div(ceil_div(p.in_dim, s), align) * align;
  plan.splits = ceil_div(p.in_dim, plan.kslice);
}

/// Tensor-core plan; cfg < 0 and splits <= 0 pick automatically (the choices the H100 sweep
/// of NOTES.md found fastest for Qwen3-4B's gates, expressed in tiles so other shapes follow).
/// The automatic plan runs one pass up to kOnePassTokens tokens, where it beat the hidden
/// kernel + finisher; a forced 64-row tile runs one pass below kFewTokens tokens (the harness
/// may turn that off).
gate_plan_t tc_plan(const gate_params_t& p, int cfg, int splits) {
  const bool glu = p.kind == kGateGlu;
  auto tiles_of = [&](int c) {
    const tc_shape_t s = tc_shape(c, glu);
    return ceil_div(p.inter, s.bm) * ceil_div(p.n, s.bn);
  };
  const bool automatic = cfg < 0;
  if (automatic) {
    if (p.n <= 8) cfg = kSkinny8;
    else if (p.n <= 16) cfg = kSkinny16;
    else if (p.n <= 32) cfg = kSkinny32;
    else if (p.n <= 256) cfg = kSkinny64;
    else if (glu && tiles_of(kBig) >= kHugeTiles) cfg = kHuge;
    else cfg = kBig;
  }
  gate_plan_t plan;
  plan.cfg = cfg;
  const tc_shape_t sh = tc_shape(cfg, glu);
  plan.one_pass = p.n < kFewTokens && sh.bm == kCtrBM && (!automatic || p.n <= kOnePassTokens);
  // Split K while the tiles alone leave SMs idle: the partial sums (splits x n x inter floats)
  // cost less than idle SMs up to a point; slices stay >= 2 pipeline stages long. One pass:
  // fewer, longer slices (its finishing blocks sum the splits, and the weight loads of the
  // next call overlap this one's finishing anyway).
  const int target = plan.one_pass ? kOnePassBlocks : kSplitTarget;
  const int s = splits > 0 ? splits
                           : std::max(1, std::min({target / tiles_of(cfg), kMaxSplits,
                                                   p.in_dim / (2 * kBK)}));
  set_splits(p, s, kBK, plan);
  if (plan.one_pass) {
    const size_t parts = plan.splits > 1 ? static_cast<size_t>(plan.splits) * p.n * p.inter *
                                               (glu ? 2 : 1)
                                         : 0;
    const size_t zp = static_cast<size_t>(ceil_div(p.inter, sh.bm)) * p.n * p.kv_heads;
    plan.ws_bytes = (parts + zp) * sizeof(float);
  } else if (plan.splits == 1) {
    const size_t slots = static_cast<size_t>(ceil_div(p.inter, sh.bm)) * sh.wm;
    plan.ws_bytes = slots * p.n * p.kv_heads * sizeof(float);
  } else {
    plan.ws_bytes = static_cast<size_t>(plan.splits) * p.n * p.inter * (glu ? 2 : 1) *
                    sizeof(float);
  }
  plan.ws_bytes += counter_bytes(p);
  return plan;
}

/// FMA plan: enough blocks to fill the GPU, slices of at least kFmaMinSlice, and partial sums
/// (splits x n floats per row) no larger than the weight row they come from (the FMA kernel
/// is compute bound at large n, where splitting only adds traffic).
gate_plan_t fma_plan(const gate_params_t& p, int splits) {
  gate_plan_t plan;
  const int s = splits > 0 ? splits
                           : std::min({ceil_div(kTargetBlocks, ceil_div(p.inter, kFmaRows)),
                                       std::max(1, p.in_dim / kFmaMinSlice),
                                       std::max(1, p.in_dim / (2 * p.n))});
  set_splits(p, s, 8, plan);
  plan.ws_bytes = static_cast<size_t>(plan.splits) * p.n * p.inter *
                  (p.kind == kGateGlu ? 2 : 1) * sizeof(float) + counter_bytes(p);
  return plan;
}

bool shapes_valid(const gate_params_t& p) {
  return p.n > 0 && p.in_dim > 0 && p.in_dim % 8 == 0 && p.inter > 0 && p.kv_heads > 0 &&
         p.act >= 0 && p.act <= 3 && (p.kind == kGateMlp || p.kind == kGateGlu);
}

bool tc_dtypes(const gate_params_t& p) {
  return p.x_dtype == p.w_dtype && (p.w_dtype == DType::kF16 || p.w_dtype == DType::kBF16);
}

/// Compute capability major of the current device: picks the tensor-core path (8+) and
/// programmatic dependent launch (9+).
cudaError_t device_cc_major(int& major) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  return e;
}

/// Launches kernel<<<grid, block, smem, stream>>>(args...) as a programmatic dependent of the
/// previous kernel in the stream when pdl is set (sm_90+).
template <typename... Params, typename... Args>
cudaError_t launch_dependent(bool pdl, void (*kernel)(Params...), dim3 grid, dim3 block,
                             size_t smem, cudaStream_t stream, Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<Params>(args)...);
}

/// The finishing kernel of a plan: GateFinishZKernel after a fused GateTcKernel (slots > 0:
/// its number of z partials), else GateFinishFewKernel / GateFinishManyKernel over the K-split
/// partials.
template <typename TW>
cudaError_t launch_finish(const gate_params_t& p, const gate_plan_t& plan, int slots,
                          const float* ws, bool pdl, cudaStream_t stream) {
  const TW* bias = static_cast<const TW*>(p.bias);
  if (slots > 0) {
    const size_t count = static_cast<size_t>(p.n) * p.kv_heads;
    const unsigned blocks = static_cast<unsigned>((count + kFinishZThreads - 1) / kFinishZThreads);
    return launch_dependent(pdl, GateFinishZKernel<TW>, blocks, kFinishZThreads, 0, stream, ws,
                            bias, p.lam, count, p.kv_heads, slots);
  }
  const TW* w2 = static_cast<const TW*>(p.kind == kGateGlu ? p.w_down : p.w2);
  const TW* b1 = static_cast<const TW*>(p.kind == kGateGlu ? nullptr : p.b1);
  const bool glu = p.kind == kGateGlu;
  if (p.n < kFewTokens) {
    auto kernel = glu ? GateFinishFewKernel<TW, true> : GateFinishFewKernel<TW, false>;
    return launch_dependent(pdl, kernel, p.n, kFinishFewThreads, 0, stream, ws, b1, w2, bias,
                            p.lam, p.n, p.inter, p.kv_heads, plan.splits, p.act);
  }
  auto kernel = glu ? GateFinishManyKernel<TW, true> : GateFinishManyKernel<TW, false>;
  return launch_dependent(pdl, kernel, p.n, kFinishManyThreads, 0, stream, ws, b1, w2, bias, p.lam,
                          p.n, p.inter, p.kv_heads, plan.splits, p.act);
}

/// The kernel arguments every tensor-core launch shares (out: partials or data).
template <typename T, bool GLU>
tc_args_t<T> tc_args(const gate_params_t& p, const gate_plan_t& plan, float* out) {
  tc_args_t<T> a{};
  a.x = static_cast<const T*>(p.x);
  a.wa = static_cast<const T*>(GLU ? p.w_gate : p.w1);
  a.wb = static_cast<const T*>(GLU ? p.w_up : nullptr);
  a.b1 = static_cast<const T*>(GLU ? nullptr : p.b1);
  a.w2 = static_cast<const T*>(GLU ? p.w_down : p.w2);
  a.out = out;
  a.n = p.n;
  a.in_dim = p.in_dim;
  a.inter = p.inter;
  a.kv_heads = p.kv_heads;
  a.kslice = plan.kslice;
  a.act = p.act;
  return a;
}

/// Launches the hidden-layer kernel of a tensor-core plan; returns the number of z-partial
/// slots it writes when fused (0 when split) through `slots`.
template <typename T, bool GLU>
cudaError_t launch_tc(const gate_params_t& p, const gate_plan_t& plan, float* ws, int& slots,
                      cudaStream_t stream) {
  return with_tc_cfg<GLU>(plan.cfg, [&](auto c) -> cudaError_t {
    using C = decltype(c);
    const dim3 grid(ceil_div(p.inter, C::BM), ceil_div(p.n, C::BN), plan.splits);
    if (grid.y > 65535u || grid.z > 65535u) return cudaErrorInvalidValue;
    auto kernel = GateTcKernel<T, GLU, C, false>;
    if (C::kSmemBytes > 48 * 1024) {
      const cudaError_t e = cudaFuncSetAttribute(
          kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes);
      if (e != cudaSuccess) return e;
    }
    const tc_args_t<T> a = tc_args<T, GLU>(p, plan, ws);
    kernel<<<grid, C::kThreads, C::kSmemBytes, stream>>>(a);
    slots = plan.splits == 1 ? static_cast<int>(grid.x) * C::WM : 0;
    return cudaGetLastError();
  });
}

/// Launches the one-pass kernel of a plan (plan.one_pass): the whole call, as a programmatic
/// dependent of the previous kernel in the stream when pdl is set. counters: the front of the
/// workspace (zero), data: past counter_bytes(p).
template <typename T, bool GLU>
cudaError_t launch_one_pass(const gate_params_t& p, const gate_plan_t& plan, unsigned* counters,
                            float* data, bool pdl, cudaStream_t stream) {
  return with_tc_cfg<GLU>(plan.cfg, [&](auto c) -> cudaError_t {
    using C0 = decltype(c);
    if constexpr (C0::BM != kCtrBM || C0::WN != 1) {
      return cudaErrorInvalidValue;  // tc_plan only picks the 64-row, one-warp-column tiles
    } else {
      using C = one_pass_cfg_t<C0>;
      static_assert(C::kSmemBytes <= kOnePassSmem, "one-pass stages");
      const dim3 grid(ceil_div(p.inter, C::BM), ceil_div(p.n, C::BN), plan.splits);
      if (grid.y > static_cast<unsigned>(kMaxTokTiles) || grid.z > 65535u)
        return cudaErrorInvalidValue;
      // Only the stages a K slice needs (all of it in flight before the wait when it fits),
      // and at least room for the summed partials [kMats, BN, pitch] that reuse them.
      const int stages = std::min(C::kStages, ceil_div(plan.kslice, kBK));
      size_t stage_bytes = std::max<size_t>(
          static_cast<size_t>(stages) * C::kStageElems * 2,
          static_cast<size_t>(C::kMats) * C::BN * one_pass_pitch<C>() * sizeof(float));
      stage_bytes = (stage_bytes + 15) / 16 * 16;
      const size_t smem = stage_bytes + one_pass_ext_floats<C>(p.kv_heads) * sizeof(float);
      auto kernel = GateTcKernel<T, GLU, C, true>;
      if (smem > 48 * 1024) {
        const cudaError_t e = cudaFuncSetAttribute(
            kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
        if (e != cudaSuccess) return e;
      }
      tc_args_t<T> a = tc_args<T, GLU>(p, plan, data);
      a.bias = static_cast<const T*>(p.bias);
      a.lam = p.lam;
      a.counters = counters;
      a.zp = plan.splits > 1 ? data + static_cast<size_t>(plan.splits) * p.n * p.inter * C::kMats
                             : data;
      a.ctr_rows = ceil_div(p.inter, kCtrBM);
      a.stage_bytes = static_cast<int>(stage_bytes);
      a.diag = plan.diag;
      return launch_dependent(pdl, kernel, grid, C::kThreads, smem, stream, a);
    }
  });
}

template <typename TX, typename TW>
cudaError_t launch_fma(const gate_params_t& p, const gate_plan_t& plan, float* ws,
                       cudaStream_t stream) {
  const dim3 grid(ceil_div(p.inter, kFmaRows), plan.splits);
  if (grid.y > 65535u) return cudaErrorInvalidValue;
  const TX* x = static_cast<const TX*>(p.x);
  if (p.kind == kGateGlu) {
    GateFmaKernel<TX, TW, true><<<grid, kFmaThreads, 0, stream>>>(
        x, static_cast<const TW*>(p.w_gate), static_cast<const TW*>(p.w_up), ws, p.n,
        p.in_dim, p.inter, plan.kslice);
  } else {
    GateFmaKernel<TX, TW, false><<<grid, kFmaThreads, 0, stream>>>(
        x, static_cast<const TW*>(p.w1), nullptr, ws, p.n, p.in_dim, p.inter, plan.kslice);
  }
  return cudaGetLastError();
}

/// Runs f(TX{}, TW{}) for the x and weight dtypes of p.
template <typename F>
cudaError_t with_dtypes(const gate_params_t& p, F&& f) {
  return TRIMKV_DISPATCH_DTYPE(p.x_dtype, TX, [&] {
    return TRIMKV_DISPATCH_DTYPE(p.w_dtype, TW, [&] { return f(TX{}, TW{}); });
  });
}

/// Launches the hidden-layer kernel of a plan (made by tc_plan, where tc_dtypes(p) holds, or by
/// fma_plan); `slots` as in launch_tc.
cudaError_t launch_hidden(const gate_params_t& p, const gate_plan_t& plan, void* workspace,
                          int& slots, cudaStream_t stream) {
  float* ws = reinterpret_cast<float*>(static_cast<char*>(workspace) + counter_bytes(p));
  slots = 0;
  if (plan.cfg != kFmaCfg) {
    const bool glu = p.kind == kGateGlu;
    if (p.w_dtype == DType::kF16)
      return glu ? launch_tc<__half, true>(p, plan, ws, slots, stream)
                 : launch_tc<__half, false>(p, plan, ws, slots, stream);
    return glu ? launch_tc<__nv_bfloat16, true>(p, plan, ws, slots, stream)
               : launch_tc<__nv_bfloat16, false>(p, plan, ws, slots, stream);
  }
  return with_dtypes(p, [&](auto tx, auto tw) {
    return launch_fma<decltype(tx), decltype(tw)>(p, plan, ws, stream);
  });
}

/// Runs a plan: the one-pass kernel, or the hidden layer then its finishing kernel. cc_major
/// as device_cc_major.
cudaError_t run_plan(const gate_params_t& p, const gate_plan_t& plan, int cc_major,
                     void* workspace, cudaStream_t stream) {
  const bool pdl = cc_major >= 9 && !(plan.diag & kDiagNoPdl);
  if (plan.one_pass) {
    unsigned* counters = static_cast<unsigned*>(workspace);
    float* data = reinterpret_cast<float*>(static_cast<char*>(workspace) + counter_bytes(p));
    const bool glu = p.kind == kGateGlu;
    if (p.w_dtype == DType::kF16)
      return glu ? launch_one_pass<__half, true>(p, plan, counters, data, pdl, stream)
                 : launch_one_pass<__half, false>(p, plan, counters, data, pdl, stream);
    return glu ? launch_one_pass<__nv_bfloat16, true>(p, plan, counters, data, pdl, stream)
               : launch_one_pass<__nv_bfloat16, false>(p, plan, counters, data, pdl, stream);
  }
  int slots = 0;
  cudaError_t e = launch_hidden(p, plan, workspace, slots, stream);
  if (e != cudaSuccess) return e;
  const float* ws =
      reinterpret_cast<const float*>(static_cast<const char*>(workspace) + counter_bytes(p));
  return TRIMKV_DISPATCH_DTYPE(p.w_dtype, TW, [&] {
    return launch_finish<TW>(p, plan, slots, ws, pdl, stream);
  });
}

}  // namespace

size_t RetentionGateWorkspaceBytes(const gate_params_t& p) {
  if (!shapes_valid(p)) return 0;
  // The device decides between the two paths at run time; either must fit.
  return std::max(tc_plan(p, -1, 0).ws_bytes, fma_plan(p, 0).ws_bytes);
}

cudaError_t RetentionGate(const gate_params_t& p, void* workspace, cudaStream_t stream) {
  if (!shapes_valid(p) || workspace == nullptr || p.x == nullptr || p.lam == nullptr)
    return cudaErrorInvalidValue;
  if (p.kind == kGateMlp && (p.w1 == nullptr || p.w2 == nullptr)) return cudaErrorInvalidValue;
  if (p.kind == kGateGlu && (p.w_gate == nullptr || p.w_up == nullptr || p.w_down == nullptr))
    return cudaErrorInvalidValue;
  int major = 0;
  const cudaError_t e = device_cc_major(major);
  if (e != cudaSuccess) return e;
  const bool tc = tc_dtypes(p) && major >= 8;
  return run_plan(p, tc ? tc_plan(p, -1, 0) : fma_plan(p, 0), major, workspace, stream);
}

}  // namespace trimkv
