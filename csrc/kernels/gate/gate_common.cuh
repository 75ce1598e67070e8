// What the retention-gate kernels share (retention_gate.cuh is the contract): the tuned launch
// shapes, the tile configurations of the tensor-core kernel, kernel argument structs, device
// helpers (activations, logsigmoid, split sums, arrival elections) and the launch helpers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "kernels/common/cp_async.cuh"
#include "kernels/common/dispatch.cuh"
#include "kernels/common/mma.cuh"
#include "kernels/common/pdl.cuh"
#include "kernels/common/vec_dtypes.cuh"
#include "kernels/gate/retention_gate.cuh"

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
constexpr int kFinishFewThreads = 512;  // one intermediate row per thread up to inter 512
constexpr int kFinishManyThreads = 256;
constexpr int kFinishChunk = 2048;  // Many: activations staged in shared memory per pass
constexpr int kHeadGroup = 8;       // Few: heads accumulated in registers per pass
constexpr int kSplitBatch = 16;     // partial loads in flight per row: all of them up to kMaxSplits
constexpr int kFinishZThreads = 256;

// One-pass decode kernel. Its arrival counters sit at the front of the workspace in a layout
// that depends on inter alone (so that calls with different n agree on it): one counter per
// (token tile, kCtrBM-row tile), then one per token tile; token tiles are >= 8 tokens wide
// and n < kFewTokens, so there are at most kMaxTokTiles.
constexpr int kCtrBM = 64;  // rows of every one-pass tile (the skinny ones)
constexpr int kMaxTokTiles = kFewTokens / 8;
constexpr int kCtrAlign = 256;           // the data after the counters stays aligned
constexpr int kOnePassSmem = 96 * 1024;  // stage budget: fits every sm_80+ part
constexpr int kOnePassStages = 16;       // so that a whole K slice fits before the wait
constexpr int kExtPre = 8;               // W2 / b1 / bias loads per thread before the wait

// Rows decode kernel (GateRowsKernel, automatic for n <= kRowsTokens): no K split. A block
// owns up to kRowsMax whole hidden rows (of each GLU matrix), so one cross-block reduction
// (z partials, one arrival counter) finishes the call.
constexpr int kRowsThreads = 256;      // 8 warps; 2 blocks per SM (registers)
constexpr int kRowsMaxWarps = 16;      // the largest block any variant runs
constexpr int kRowsMax = 4;            // rows per block: with GLU's two matrices, one n8 mma tile
constexpr int kRowsTokens = 8;         // tokens: the live rows of one m16 mma tile
constexpr int kRowsBlockTarget = 128;  // blocks wanted (~one per SM of an H100): R rows each
constexpr int kRowsSmem = 96 * 1024;   // dynamic shared memory budget: fits every sm_80+ part
constexpr int kRowsStaticSmem = 1024;  // margin for static shared memory under the opt-in cap
// The rows kernel is automatic only where it measured faster (H100, NOTES.md): rg3 with x and
// weights both fp16 or both bf16 on sm_80+, up to this many tokens. Each of its blocks reads
// the whole of x from L2 (all blocks at once), ~1.1 us at n 1 and ~2.6 us at n 8 for Qwen3-4B,
// so beyond it, and for rg (a tie at n 1), the one-pass kernel (x in K slices) is as fast or
// faster. Other dtypes and devices keep the FMA path and its finisher, against which the rows
// kernel was not timed; forced plans test it there.
constexpr int kRowsTcTokensGlu = 4;
constexpr int kRowsSlices = 16;  // last block: slices of the blocks summed in parallel
constexpr int kRowsLoads = 8;    // last block: partial loads in flight per thread

constexpr int kBK = 32;        // K per pipeline stage
constexpr int kLds = kBK + 8;  // shared row pitch in elements: 80 B keeps ldmatrix
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
    case kGateSilu:
      return u / (1.f + expf(-u));
    case kGateGelu:
      return 0.5f * u * (1.f + erff(u * 0.70710678118654752f));
    case kGateGeluTanh: {
      const float c = 0.7978845608028654f;  // sqrt(2/pi)
      return 0.5f * u * (1.f + tanhf(c * (u + 0.044715f * u * u * u)));
    }
    default:
      return fmaxf(u, 0.f);
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
struct tc_cfg_of<GLU, kSkinny8> {
  using type = tc_cfg_t<GLU, 64, 8, 4, 1, kSmallSmem>;
};
template <bool GLU>
struct tc_cfg_of<GLU, kSkinny16> {
  using type = tc_cfg_t<GLU, 64, 16, 4, 1, kSmallSmem>;
};
template <bool GLU>
struct tc_cfg_of<GLU, kSkinny32> {
  using type = tc_cfg_t<GLU, 64, 32, 4, 1, kSmallSmem>;
};
template <bool GLU>
struct tc_cfg_of<GLU, kSkinny64> {
  using type = tc_cfg_t<GLU, 64, 64, 4, 1, kSmallSmem>;
};
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
    case kSkinny8:
      return f(typename tc_cfg_of<GLU, kSkinny8>::type{});
    case kSkinny16:
      return f(typename tc_cfg_of<GLU, kSkinny16>::type{});
    case kSkinny32:
      return f(typename tc_cfg_of<GLU, kSkinny32>::type{});
    case kSkinny64:
      return f(typename tc_cfg_of<GLU, kSkinny64>::type{});
    case kBig:
      return f(typename tc_cfg_of<GLU, kBig>::type{});
    case kHuge:
      return f(typename tc_cfg_of<GLU, kHuge>::type{});
  }
  return cudaErrorInvalidValue;
}

template <typename T>
struct tc_args_t {
  const T* x;   ///< [n, in_dim]
  const T* wa;  ///< [inter, in_dim]: W1 or W_gate
  const T* wb;  ///< [inter, in_dim]: W_up (GLU) or null
  const T* b1;  ///< [inter] or null (MLP)
  const T* w2;  ///< [kv_heads, inter]
  float* out;   ///< fused: z partials [slots, n, kv_heads]; split: u partials (see kernel)
  int n, in_dim, inter, kv_heads, kslice, act;
  // One pass only.
  const T* bias;       ///< [kv_heads] or null
  float* lam;          ///< [n, kv_heads]
  unsigned* counters;  ///< arrival counters (layout: kCtrBM); zero on entry, zero on exit
  float* zp;           ///< z partials [row tiles, n, kv_heads]
  int ctr_rows;        ///< ceil(inter / kCtrBM): row tiles of the counter layout
  int stage_bytes;     ///< dynamic shared memory before the W2 / b1 / bias / z area
  int diag;            ///< harness timing diagnostics (kDiag*), 0 in every real call
};

/// Timing diagnostics of the one-pass kernel (gate_harness bench only; results are wrong).
enum OnePassDiag : int {
  kDiagLateWeights = 1,    ///< request the W tiles after griddepcontrol.wait, with x
  kDiagHiddenOnly = 2,     ///< every block exits after its partials: no finishing
  kDiagNoLevel2 = 4,       ///< the row-tile finishers exit after writing zp
  kDiagNoPdl = 8,          ///< launch in plain stream order (host side)
  kDiagCarveMax = 16,      ///< rows: prefer the largest shared-memory carveout (host side)
  kDiagCarveDefault = 32,  ///< rows: no carveout preference (host side)
  kDiagNoX = 64,           ///< rows: x is not loaded
  kDiagStaggerX = 128,     ///< rows: each block requests x's chunks starting at its own offset
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
  if constexpr (std::is_same_v<T, __half>)
    return __half2float(__ushort_as_half(v));
  else
    return __uint_as_float(static_cast<uint32_t>(v) << 16);
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
                                                   int splits, int n, int inter, int m0, int n0) {
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
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;\n" : "=r"(prev) : "l"(c) : "memory");
    const bool last = prev == arrivals - 1;
    if (last) *reinterpret_cast<volatile unsigned*>(c) = 0u;
    *flag = last;
  }
  __syncthreads();
  return *flag != 0;
}

/// ceil(a / b) for positive b, as an int (grid sizes, slice counts).
inline int ceil_div(long long a, long long b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace

namespace gate_detail {

/// Launches kernel<<<grid, block, smem, stream>>>(args...) as a programmatic dependent of the
/// previous kernel in the stream when pdl is set (sm_90+).
template <typename... Params, typename... Args>
inline cudaError_t launch_dependent(bool pdl, void (*kernel)(Params...), dim3 grid, dim3 block,
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

/// Runs f(TX{}, TW{}) for the x and weight dtypes of p.
template <typename F>
cudaError_t with_dtypes(const gate_params_t& p, F&& f) {
  return TRIMKV_DISPATCH_DTYPE(p.x_dtype, TX, [&] {
    return TRIMKV_DISPATCH_DTYPE(p.w_dtype, TW, [&] { return f(TX{}, TW{}); });
  });
}

}  // namespace gate_detail

}  // namespace trimkv
