// Retention-gate kernels: see retention_gate.cuh.
//
// The hidden layer is a matrix product U = W x^T ([inter, in_dim] x [in_dim, n]); everything
// after it (bias, act, GLU product, W2, logsigmoid) is small. Four regimes:
// - decode, rows kernel (automatic where rows_automatic: rg3 on tensor cores up to
//   kRowsTcTokensGlu tokens; any dtypes and device, n <= kRowsTokens, when a plan is forced):
//   ONE kernel per call, GateRowsKernel, no K
//   split. Block b owns R <= kRowsMax whole hidden rows (R = ceil(inter / kRowsBlockTarget):
//   about one block per SM; GLU: those rows of W_gate and W_up). Before griddepcontrol.wait it
//   requests its weight rows into shared memory (cp.async) and its W2 columns / b1 / bias;
//   after it, x [n, in_dim] into shared memory, the product (mma m16n8k16 with the tokens as A
//   rows and the block's rows as B columns for 16-bit pairs on sm_80+, FMA otherwise), fixed-
//   order warp / block sums, b1 / act / GLU product, and its z partial [n, kv_heads] to the
//   workspace; the last block to arrive at ONE counter sums the partials in block order, adds
//   the bias and writes lam. Its cost at decode sizes is every block reading all of x from L2
//   (NOTES.md), hence the tensor-core limit.
// - decode, one pass (n <= kOnePassTokens, tensor cores, beyond the rows kernel's limit; any
//   n < kFewTokens when a plan is forced): ONE kernel per call (GateTcKernel in one-pass
//   mode). Reading W once is the floor (2.6 MB for Qwen3-4B's rg, about 1 us), so in_dim (K)
//   is split over many blocks. Each block requests its whole W slice (and its rows of W2 / b1)
//   before griddepcontrol.wait (weights are immutable), so under programmatic dependent launch
//   the weight traffic of call i+1 overlaps call i; x and the workspace are touched only after
//   the wait. The raw partials go to the workspace; the last K-split block of each (row tile,
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
// On sm_90+ finishing kernels, the rows kernel and the one-pass kernel are programmatic
// dependent launches.
// Tensor cores need sm_80 and x and the weights in the same 16-bit dtype: 16-bit products are
// exact in fp32, so the result matches the FMA path's accuracy. Every other case (fp32, mixed
// dtypes, sm_75) beyond the rows kernel runs GateFmaKernel, which splits K the same way.
#include "kernels/gate/retention_gate.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "kernels/common/mma.cuh"
#include "kernels/common/pdl.cuh"
#include "kernels/common/vec_dtypes.cuh"

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

// Rows decode kernel (GateRowsKernel, automatic for n <= kRowsTokens): no K split. A block
// owns up to kRowsMax whole hidden rows (of each GLU matrix), so one cross-block reduction
// (z partials, one arrival counter) finishes the call.
constexpr int kRowsThreads = 256;                 // 8 warps; 2 blocks per SM (registers)
constexpr int kRowsMaxWarps = 16;                 // the largest block any variant runs
constexpr int kRowsMax = 4;          // rows per block: with GLU's two matrices, one n8 mma tile
constexpr int kRowsTokens = 8;       // tokens: the live rows of one m16 mma tile
constexpr int kRowsBlockTarget = 128;    // blocks wanted (~one per SM of an H100): R rows each
constexpr int kRowsSmem = 96 * 1024;     // dynamic shared memory budget: fits every sm_80+ part
constexpr int kRowsStaticSmem = 1024;    // margin for static shared memory under the opt-in cap
// The rows kernel is automatic only where it measured faster (H100, NOTES.md): rg3 with x and
// weights both fp16 or both bf16 on sm_80+, up to this many tokens. Each of its blocks reads
// the whole of x from L2 (all blocks at once), ~1.1 us at n 1 and ~2.6 us at n 8 for Qwen3-4B,
// so beyond it, and for rg (a tie at n 1), the one-pass kernel (x in K slices) is as fast or
// faster. Other dtypes and devices keep the FMA path and its finisher, against which the rows
// kernel was not timed; forced plans test it there.
constexpr int kRowsTcTokensGlu = 4;
constexpr int kRowsSlices = 16;          // last block: slices of the blocks summed in parallel
constexpr int kRowsLoads = 8;            // last block: partial loads in flight per thread

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
  kDiagCarveMax = 16,    ///< rows: prefer the largest shared-memory carveout (host side)
  kDiagCarveDefault = 32,  ///< rows: no carveout preference (host side)
  kDiagNoX = 64,         ///< rows: x is not loaded
  kDiagStaggerX = 128,   ///< rows: each block requests x's chunks starting at its own offset
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

/// Kernel arguments of GateRowsKernel. Shared memory (bytes, dynamic): ext_bytes of floats
/// (per-warp sums [warps, 64], activations [8, 4], W2 columns [kv_heads, 4], b1 [4],
/// bias [kv_heads]), then the block's weight rows [kMats * rows, pitch_w], then x [n, pitch_x].
template <typename TX, typename TW>
struct rows_args_t {
  const TX* x;        ///< [n, in_dim]
  const TW* wa;       ///< [inter, in_dim]: W1 or W_gate
  const TW* wb;       ///< [inter, in_dim]: W_up (GLU) or null
  const TW* b1;       ///< [inter] or null (MLP)
  const TW* w2;       ///< [kv_heads, inter]: W2 or W_down
  const TW* bias;     ///< [kv_heads] or null
  float* lam;         ///< [n, kv_heads]
  float* zp;          ///< z partials [blocks, n, kv_heads] (workspace data)
  unsigned* counter;  ///< one arrival counter (workspace front): zero on entry and on exit
  int n, in_dim, inter, kv_heads, rows, act;
  int pitch_w, pitch_x, ext_bytes;  ///< shared memory layout (bytes), see above
  int diag;           ///< harness timing diagnostics (kDiag*), 0 in every real call
};

/// Entry i of the rows kernel's float area past the per-warp sums and activations: W2 columns
/// [kv_heads, kRowsMax], b1 [kRowsMax], bias [kv_heads]; 0 past the matrix or where null.
/// Returned unconverted, so that a load issued before griddepcontrol.wait is consumed after it.
template <typename TX, typename TW>
__device__ __forceinline__ TW rows_ext_raw(const rows_args_t<TX, TW>& p, int row0, int i) {
  const int nw2 = p.kv_heads * kRowsMax;
  if (i < nw2) {
    const int h = i / kRowsMax, r = i % kRowsMax;
    if (r < p.rows && row0 + r < p.inter) return p.w2[static_cast<size_t>(h) * p.inter + row0 + r];
  } else if (i < nw2 + kRowsMax) {
    const int r = i - nw2;
    if (p.b1 != nullptr && r < p.rows && row0 + r < p.inter) return p.b1[row0 + r];
  } else if (p.bias != nullptr) {
    return p.bias[i - nw2 - kRowsMax];
  }
  return TW(0.f);
}

/// Sums v over the 32 lanes of a warp, scattering the result: afterwards v[j] of lane l holds
/// the warp's sum of original entry l * (V / 32) + j. 31 V / 32 shuffles instead of 5 V; the
/// order of the additions is fixed (deterministic).
template <int HALF, int V>
__device__ __forceinline__ void reduce_scatter_step(float (&v)[V], int lane, int off) {
  const bool up = (lane & off) != 0;  // this lane keeps the upper half
#pragma unroll
  for (int i = 0; i < HALF; ++i) {
    const float send = up ? v[i] : v[i + HALF];
    const float keep = up ? v[i + HALF] : v[i];
    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, off);
  }
}
template <int V>
__device__ __forceinline__ void warp_reduce_scatter(float (&v)[V], int lane) {
  static_assert(V >= 32 && V % 32 == 0, "V");
  // One step per lane bit, the halves compile-time so that v stays in registers.
  reduce_scatter_step<V / 2>(v, lane, 16);
  reduce_scatter_step<V / 4>(v, lane, 8);
  reduce_scatter_step<V / 8>(v, lane, 4);
  reduce_scatter_step<V / 16>(v, lane, 2);
  reduce_scatter_step<V / 32>(v, lane, 1);
}

/// The whole gate for few tokens (n <= kRowsTokens), one kernel, one cross-block reduction.
/// Block b owns hidden rows [b R, b R + R) (R = p.rows <= kRowsMax; GLU: those rows of W_gate
/// and of W_up) over the whole of in_dim, so it computes its activations h [n, R] completely
/// and writes its z partial zp[b, t, h] = W2[h, rows] . h[t, rows]; the last block to arrive at
/// the counter sums the partials in block order, adds the bias and writes
/// lam [n, kv_heads] = logsigmoid(z).
/// A programmatic dependent launch on sm_90+: it lets the next kernel launch first thing, then
/// requests its weight rows (cp.async into shared memory) and its W2 columns / b1 / bias before
/// griddepcontrol.wait (weights are immutable after upload); x and the workspace only after.
/// The product: x and the weights both fp16 or both bf16 on sm_80+: m16n8k16 mma with the
/// tokens as the rows of A (8 of 16 live) and the block's rows as the 8 columns of B (MLP: 4
/// live), each lane's k slots mapped to 8 consecutive elements of x and of W (the same
/// permutation of k on both sides, so the products are unchanged); warps split in_dim in
/// 32-element steps. Else FMA: each thread takes 8-element chunks of in_dim for every row and
/// token. Either way fp32 accumulation, the per-warp and per-block sums in a fixed order.
/// grid ceil(inter / R), block THREADS; rows >= inter and tokens >= n contribute zero.
template <typename TX, typename TW, bool GLU, int THREADS = kRowsThreads>
__global__ void __launch_bounds__(THREADS, 2) GateRowsKernel(const rows_args_t<TX, TW> p) {
  constexpr int kMats = GLU ? 2 : 1;
  constexpr int kWarps = THREADS / 32;
  static_assert(kWarps <= kRowsMaxWarps, "threads");
  pdl_launch_dependents();
  extern __shared__ __align__(16) uint8_t smem_raw[];
  __shared__ int last_flag;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int R = p.rows, row0 = blockIdx.x * R, H = p.kv_heads;
  float* red = reinterpret_cast<float*>(smem_raw);  // [kWarps, 8 tokens x 8 columns]
  float* hs = red + kWarps * 64;                // [8 tokens, kRowsMax]
  float* ext = hs + kRowsTokens * kRowsMax;         // rows_ext_raw's entries, as float
  const float* w2s = ext;
  const float* b1s = ext + H * kRowsMax;
  const float* bias_s = b1s + kRowsMax;
  uint8_t* w_s = smem_raw + p.ext_bytes;
  uint8_t* x_s = w_s + kMats * R * p.pitch_w;

  // Weights only before the wait: rows >= inter are zero-filled.
  const int wchunks = p.in_dim * static_cast<int>(sizeof(TW)) / 16;
  const bool early = !(p.diag & kDiagLateWeights);
  for (int i = tid; early && i < kMats * R * wchunks; i += THREADS) {
    const int rr = i / wchunks, c = i % wchunks, r = row0 + rr % R;
    const bool ok = r < p.inter;
    const TW* w = (GLU && rr >= R) ? p.wb : p.wa;
    const uint8_t* src = reinterpret_cast<const uint8_t*>(w) +
                         (ok ? (static_cast<size_t>(r) * p.in_dim * sizeof(TW) + c * 16) : 0);
    cp_async16(w_s + rr * p.pitch_w + c * 16, src, ok);
  }
  cp_async_commit();
  const int n_ext = H * kRowsMax + kRowsMax + H;
  const TW raw = tid < n_ext ? rows_ext_raw(p, row0, tid) : TW(0.f);
  pdl_wait();
  for (int i = tid; !early && i < kMats * R * wchunks; i += THREADS) {
    const int rr = i / wchunks, c = i % wchunks, r = row0 + rr % R;
    const bool ok = r < p.inter;
    const TW* w = (GLU && rr >= R) ? p.wb : p.wa;
    const uint8_t* src = reinterpret_cast<const uint8_t*>(w) +
                         (ok ? (static_cast<size_t>(r) * p.in_dim * sizeof(TW) + c * 16) : 0);
    cp_async16(w_s + rr * p.pitch_w + c * 16, src, ok);
  }
  const int xchunks = p.in_dim * static_cast<int>(sizeof(TX)) / 16;
  const int xoff = (p.diag & kDiagStaggerX) ? blockIdx.x * 8 : 0;
  for (int i = tid; !(p.diag & kDiagNoX) && i < p.n * xchunks; i += THREADS) {
    const int t = i / xchunks, c = (i % xchunks + xoff) % xchunks;
    cp_async16(x_s + t * p.pitch_x + c * 16,
               reinterpret_cast<const uint8_t*>(p.x + static_cast<size_t>(t) * p.in_dim) + c * 16,
               true);
  }
  cp_async_commit();
  if (tid < n_ext) ext[tid] = to_f32(raw);
  for (int i = tid + THREADS; i < n_ext; i += THREADS)
    ext[i] = to_f32(rows_ext_raw(p, row0, i));
  cp_async_wait<0>();
  __syncthreads();

  // red[warp, t * 8 + m * 4 + r]: the warp's share of u for token t, row r of matrix m.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<TX, TW> && !std::is_same_v<TW, float>) {
    const int g = lane >> 2, q = lane & 3;
    const int cm = g / kRowsMax, cr = g % kRowsMax;  // lane's column of B: row cr of matrix cm
    const bool xok = g < p.n, wok = cm < kMats && cr < R;
    const uint8_t* xrow = x_s + g * p.pitch_x;
    const uint8_t* wrow = w_s + (cm * R + cr) * p.pitch_w;
    float acc[4][4];
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[a][e] = 0.f;
    const int steps = (p.in_dim + 31) / 32;
    auto step = [&](int s, float (&d0)[4], float (&d1)[4]) {
      const int k = s * 32 + q * 8;
      const bool kok = k < p.in_dim;
      const uint4 xa = (xok && kok) ? *reinterpret_cast<const uint4*>(xrow + k * 2)
                                    : make_uint4(0, 0, 0, 0);
      const uint4 wa = (wok && kok) ? *reinterpret_cast<const uint4*>(wrow + k * 2)
                                    : make_uint4(0, 0, 0, 0);
      const uint32_t a0[4] = {xa.x, 0u, xa.y, 0u};
      const uint32_t a1[4] = {xa.z, 0u, xa.w, 0u};
      mma::mma_16816<TW>(d0, a0, wa.x, wa.y);
      mma::mma_16816<TW>(d1, a1, wa.z, wa.w);
    };
    // Two accumulator pairs, alternating by step: shorter dependent mma chains.
    for (int s = warp; s < steps; s += 2 * kWarps) {
      step(s, acc[0], acc[1]);
      if (s + kWarps < steps) step(s + kWarps, acc[2], acc[3]);
    }
    // d0 / d1: token g, columns 2q and 2q + 1 (rows g + 8 of A are zero).
#pragma unroll
    for (int e = 0; e < 2; ++e)
      red[warp * 64 + g * 8 + 2 * q + e] = ((acc[0][e] + acc[1][e]) + acc[2][e]) + acc[3][e];
  } else
#endif
  {
    constexpr int V = kMats * 32;  // v[m * 32 + t * 4 + r]
    float v[V];
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] = 0.f;
    const int chunks = p.in_dim / 8;
    for (int c = tid; c < chunks; c += THREADS) {
#pragma unroll
      for (int m = 0; m < kMats; ++m) {
        float w[kRowsMax][8];
#pragma unroll
        for (int r = 0; r < kRowsMax; ++r) {
          if (r < R) {
            load8<TW>(reinterpret_cast<const TW*>(w_s + (m * R + r) * p.pitch_w) + c * 8, w[r]);
          } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) w[r][e] = 0.f;
          }
        }
#pragma unroll
        for (int t = 0; t < kRowsTokens; ++t) {
          if (t < p.n) {
            float xv[8];
            load8<TX>(reinterpret_cast<const TX*>(x_s + t * p.pitch_x) + c * 8, xv);
#pragma unroll
            for (int r = 0; r < kRowsMax; ++r)
#pragma unroll
              for (int e = 0; e < 8; ++e)
                v[m * 32 + t * 4 + r] = fmaf(w[r][e], xv[e], v[m * 32 + t * 4 + r]);
          }
        }
      }
    }
    warp_reduce_scatter<V>(v, lane);
#pragma unroll
    for (int j = 0; j < V / 32; ++j) {
      const int i = lane * (V / 32) + j, m = i / 32, t = (i % 32) / 4, r = i % 4;
      red[warp * 64 + t * 8 + m * 4 + r] = v[j];
    }
  }
  __syncthreads();
  if (p.diag & kDiagHiddenOnly) return;

  // Activations h[t, r] (warps summed in order), zero for tokens >= n and rows >= inter.
  if (tid < kRowsTokens * kRowsMax) {
    const int t = tid / kRowsMax, r = tid % kRowsMax;
    float ug = 0.f, uu = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      ug += red[w * 64 + t * 8 + r];
      if (GLU) uu += red[w * 64 + t * 8 + kRowsMax + r];
    }
    float h = 0.f;
    if (t < p.n && r < R && row0 + r < p.inter)
      h = GLU ? gate_act(ug, p.act) * uu : gate_act(ug + b1s[r], p.act);
    hs[tid] = h;
  }
  __syncthreads();
  const int outs = p.n * H;
  float* zrow = p.zp + static_cast<size_t>(blockIdx.x) * outs;
  for (int i = tid; i < outs; i += THREADS) {
    const int t = i / H, h = i % H;
    float z = 0.f;
#pragma unroll
    for (int r = 0; r < kRowsMax; ++r) z = fmaf(w2s[h * kRowsMax + r], hs[t * kRowsMax + r], z);
    zrow[i] = z;
  }
  if (p.diag & kDiagNoLevel2) return;
  // arrive_last's barrier also ends every read of red, which the last block reuses.
  if (!arrive_last(p.counter, gridDim.x, &last_flag)) return;

  // lam = logsigmoid(bias + the blocks' partials in block order): `slices` threads per output
  // each sum a contiguous range of blocks (kRowsLoads loads in flight, through L2: the
  // partials come from other SMs), then one thread per output sums the slices in order.
  const int blocks = gridDim.x;
  const int slices = min(kRowsSlices, max(1, THREADS / outs));
  float* part = red;  // [slices, outs]: slices * outs <= THREADS when slices > 1
  for (int i = tid; i < slices * outs; i += THREADS) {
    const int s = i / outs, o = i % outs;
    const int b_end = static_cast<int>(static_cast<long long>(s + 1) * blocks / slices);
    float z = 0.f;
    for (int b0 = static_cast<int>(static_cast<long long>(s) * blocks / slices); b0 < b_end;
         b0 += kRowsLoads) {
      float v[kRowsLoads];
#pragma unroll
      for (int k = 0; k < kRowsLoads; ++k)
        v[k] = b0 + k < b_end ? __ldcg(p.zp + static_cast<size_t>(b0 + k) * outs + o) : 0.f;
#pragma unroll
      for (int k = 0; k < kRowsLoads; ++k) z += v[k];
    }
    if (slices == 1) p.lam[o] = log_sigmoid(bias_s[o % H] + z);
    else part[i] = z;
  }
  if (slices == 1) return;
  __syncthreads();
  if (tid < outs) {
    float z = bias_s[tid % H];
    for (int s = 0; s < slices; ++s) z += part[s * outs + tid];
    p.lam[tid] = log_sigmoid(z);
  }
}

namespace {

constexpr int kFmaCfg = -1;   ///< gate_plan_t::cfg of the CUDA-core path
constexpr int kRowsCfg = -3;  ///< gate_plan_t::cfg of the rows decode kernel

/// How one call runs: a tile configuration (or the FMA path), the number of K slices and
/// their length, whether the tensor-core kernel finishes the call itself (one pass), and the
/// workspace that needs (arrival counters included). Shape-only, so that the workspace size is
/// known without a device.
struct gate_plan_t {
  int cfg = kFmaCfg;     ///< kFmaCfg, kRowsCfg or a TcCfg
  int splits = 1;
  int kslice = 0;
  bool one_pass = false;
  int rows = 0;          ///< kRowsCfg: hidden rows per block (0: the rows kernel does not apply)
  int threads = 0;       ///< kRowsCfg: block size (harness timing only; 0: kRowsThreads)
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

/// Shared-memory row pitch (bytes) of the rows kernel: 64 bytes past a 128-byte boundary, so
/// the 2 rows x 4 16-byte chunks a quarter warp's mma operand loads touch hit distinct banks.
int rows_pitch(size_t bytes) { return static_cast<int>((bytes + 127) / 128 * 128 + 64); }

/// Bytes of the rows kernel's float area (see rows_args_t), a multiple of 128.
int rows_ext_bytes(int kv_heads) {
  const int floats = kRowsMaxWarps * 64 + kRowsTokens * kRowsMax + kv_heads * kRowsMax + kRowsMax +
                     kv_heads;
  return (floats * 4 + 127) / 128 * 128;
}

/// Dynamic shared memory of the rows kernel with `rows` rows per block.
size_t rows_smem_bytes(const gate_params_t& p, int rows) {
  const size_t mats = p.kind == kGateGlu ? 2 : 1;
  return rows_ext_bytes(p.kv_heads) +
         mats * rows * rows_pitch(static_cast<size_t>(p.in_dim) * dtype_size(p.w_dtype)) +
         static_cast<size_t>(p.n) * rows_pitch(static_cast<size_t>(p.in_dim) * dtype_size(p.x_dtype));
}

/// Workspace of the rows kernel: the counters, then z partials [blocks, n, kv_heads].
size_t rows_ws_bytes(const gate_params_t& p, int rows) {
  return counter_bytes(p) +
         static_cast<size_t>(ceil_div(p.inter, rows)) * p.n * p.kv_heads * sizeof(float);
}

/// Rows plan (GateRowsKernel), for n <= kRowsTokens on any device and dtypes: R =
/// ceil(inter / kRowsBlockTarget) rows per block (about one block per SM at inter 512), at most
/// kRowsMax, fewer while the block's shared memory (its weight rows and x) exceeds
/// smem_budget; rows > 0 forces R (harness). plan.rows == 0: the plan does not apply.
gate_plan_t rows_plan(const gate_params_t& p, size_t smem_budget, int rows = 0) {
  gate_plan_t plan;
  plan.cfg = kRowsCfg;
  if (p.n > kRowsTokens) return plan;
  int r = rows > 0 ? std::min(rows, kRowsMax)
                   : std::min(kRowsMax, std::max(1, ceil_div(p.inter, kRowsBlockTarget)));
  while (r > 0 && rows_smem_bytes(p, r) > smem_budget) r = rows > 0 ? 0 : r - 1;
  if (r == 0) return plan;
  plan.rows = r;
  plan.kslice = p.in_dim;
  plan.ws_bytes = rows_ws_bytes(p, r);
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

/// Largest dynamic shared memory a block of the current device may opt in to.
cudaError_t device_smem_optin(int& bytes) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess)
    e = cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  return e;
}

/// Whether RetentionGate picks the rows kernel (where its shared memory fits): rg3 on tensor
/// cores up to kRowsTcTokensGlu tokens (see there).
bool rows_automatic(const gate_params_t& p, int cc_major) {
  return tc_dtypes(p) && cc_major >= 8 && p.kind == kGateGlu && p.n <= kRowsTcTokensGlu;
}

/// The plan RetentionGate runs: the rows kernel where rows_automatic and its shared memory
/// fits the device, else tensor cores (sm_80+, both 16-bit of one dtype; one pass for n <= 8)
/// or the FMA path.
gate_plan_t auto_plan(const gate_params_t& p, int cc_major, int smem_optin) {
  if (rows_automatic(p, cc_major)) {
    const size_t budget = static_cast<size_t>(
        std::max(0, std::min(kRowsSmem, smem_optin - kRowsStaticSmem)));
    const gate_plan_t rows = rows_plan(p, budget);
    if (rows.rows > 0) return rows;
  }
  return tc_dtypes(p) && cc_major >= 8 ? tc_plan(p, -1, 0) : fma_plan(p, 0);
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

/// Launches the rows kernel of a plan (plan.rows > 0): the whole call, as a programmatic
/// dependent of the previous kernel in the stream when pdl is set. counter: the front of the
/// workspace (zero), zp: past counter_bytes(p).
template <typename TX, typename TW>
cudaError_t launch_rows(const gate_params_t& p, const gate_plan_t& plan, unsigned* counter,
                        float* zp, bool pdl, cudaStream_t stream) {
  if (plan.rows < 1 || plan.rows > kRowsMax || p.n > kRowsTokens) return cudaErrorInvalidValue;
  const bool glu = p.kind == kGateGlu;
  rows_args_t<TX, TW> a{};
  a.x = static_cast<const TX*>(p.x);
  a.wa = static_cast<const TW*>(glu ? p.w_gate : p.w1);
  a.wb = static_cast<const TW*>(glu ? p.w_up : nullptr);
  a.b1 = static_cast<const TW*>(glu ? nullptr : p.b1);
  a.w2 = static_cast<const TW*>(glu ? p.w_down : p.w2);
  a.bias = static_cast<const TW*>(p.bias);
  a.lam = p.lam;
  a.zp = zp;
  a.counter = counter;
  a.n = p.n;
  a.in_dim = p.in_dim;
  a.inter = p.inter;
  a.kv_heads = p.kv_heads;
  a.rows = plan.rows;
  a.act = p.act;
  a.pitch_w = rows_pitch(static_cast<size_t>(p.in_dim) * sizeof(TW));
  a.pitch_x = rows_pitch(static_cast<size_t>(p.in_dim) * sizeof(TX));
  a.ext_bytes = rows_ext_bytes(p.kv_heads);
  a.diag = plan.diag;
  const size_t smem = rows_smem_bytes(p, plan.rows);
  auto go = [&](auto kernel, int threads) -> cudaError_t {
    cudaError_t e = cudaSuccess;
    if (smem > 48 * 1024)
      e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem));
    if (e == cudaSuccess && (plan.diag & (kDiagCarveMax | kDiagCarveDefault)))
      e = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                               (plan.diag & kDiagCarveMax) ? 100 : -1);
    if (e != cudaSuccess) return e;
    return launch_dependent(pdl, kernel, dim3(ceil_div(p.inter, plan.rows)), dim3(threads), smem,
                            stream, a);
  };
  // Other block sizes: harness timing of bf16 only.
  if constexpr (std::is_same_v<TX, __nv_bfloat16> && std::is_same_v<TW, __nv_bfloat16>) {
    if (plan.threads == 128)
      return glu ? go(GateRowsKernel<TX, TW, true, 128>, 128)
                 : go(GateRowsKernel<TX, TW, false, 128>, 128);
    if (plan.threads == 512)
      return glu ? go(GateRowsKernel<TX, TW, true, 512>, 512)
                 : go(GateRowsKernel<TX, TW, false, 512>, 512);
  }
  return glu ? go(GateRowsKernel<TX, TW, true>, kRowsThreads)
             : go(GateRowsKernel<TX, TW, false>, kRowsThreads);
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

/// Runs a plan: the rows kernel, the one-pass kernel, or the hidden layer then its finishing
/// kernel. cc_major
/// as device_cc_major.
cudaError_t run_plan(const gate_params_t& p, const gate_plan_t& plan, int cc_major,
                     void* workspace, cudaStream_t stream) {
  const bool pdl = cc_major >= 9 && !(plan.diag & kDiagNoPdl);
  if (plan.cfg == kRowsCfg) {
    unsigned* counter = static_cast<unsigned*>(workspace);
    float* zp = reinterpret_cast<float*>(static_cast<char*>(workspace) + counter_bytes(p));
    return with_dtypes(p, [&](auto tx, auto tw) {
      return launch_rows<decltype(tx), decltype(tw)>(p, plan, counter, zp, pdl, stream);
    });
  }
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
  // The device decides between the paths at run time (and the rows kernel's rows per block
  // by its shared memory: at most ceil(inter / 1) blocks); any must fit.
  size_t bytes = std::max(tc_plan(p, -1, 0).ws_bytes, fma_plan(p, 0).ws_bytes);
  if (p.n <= kRowsTokens) bytes = std::max(bytes, rows_ws_bytes(p, 1));
  return bytes;
}

cudaError_t RetentionGate(const gate_params_t& p, void* workspace, cudaStream_t stream) {
  if (!shapes_valid(p) || workspace == nullptr || p.x == nullptr || p.lam == nullptr)
    return cudaErrorInvalidValue;
  if (p.kind == kGateMlp && (p.w1 == nullptr || p.w2 == nullptr)) return cudaErrorInvalidValue;
  if (p.kind == kGateGlu && (p.w_gate == nullptr || p.w_up == nullptr || p.w_down == nullptr))
    return cudaErrorInvalidValue;
  int major = 0, optin = 0;
  cudaError_t e = device_cc_major(major);
  if (e == cudaSuccess) e = device_smem_optin(optin);
  if (e != cudaSuccess) return e;
  return run_plan(p, auto_plan(p, major, optin), major, workspace, stream);
}

}  // namespace trimkv
