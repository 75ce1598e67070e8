// The retention gate's launch plans (plan.h): shape-only, so that the workspace size is known
// without a device; the device facts (compute capability, shared memory) enter auto_plan only.
#include <algorithm>

#include "kernels/gate/plan.h"

namespace trimkv {
namespace gate_detail {

namespace {

/// Sets the plan's K slices from a wanted count s: kslice a multiple of align.
void set_splits(const gate_params_t& p, int s, int align, gate_plan_t& plan) {
  s = std::max(1, std::min(s, ceil_div(p.in_dim, align)));
  plan.kslice = ceil_div(ceil_div(p.in_dim, s), align) * align;
  plan.splits = ceil_div(p.in_dim, plan.kslice);
}

}  // namespace

tc_shape_t tc_shape(int cfg, bool glu) {
  tc_shape_t s{0, 0, 0};
  auto get = [&](auto c) {
    using C = decltype(c);
    s = {C::BM, C::BN, C::WM};
    return cudaSuccess;
  };
  if (glu)
    with_tc_cfg<true>(cfg, get);
  else
    with_tc_cfg<false>(cfg, get);
  return s;
}

/// Bytes of arrival counters at the front of every workspace (every plan keeps its data past
/// them, so that they stay zero whatever plan ran before): one per (token tile, kCtrBM-row
/// tile) and one per token tile, for up to kMaxTokTiles token tiles.
size_t counter_bytes(const gate_params_t& p) {
  const size_t count = static_cast<size_t>(ceil_div(p.inter, kCtrBM) + 1) * kMaxTokTiles;
  return (count * sizeof(unsigned) + kCtrAlign - 1) / kCtrAlign * kCtrAlign;
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
    if (p.n <= 8)
      cfg = kSkinny8;
    else if (p.n <= 16)
      cfg = kSkinny16;
    else if (p.n <= 32)
      cfg = kSkinny32;
    else if (p.n <= 256)
      cfg = kSkinny64;
    else if (glu && tiles_of(kBig) >= kHugeTiles)
      cfg = kHuge;
    else
      cfg = kBig;
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
  const int s =
      splits > 0
          ? splits
          : std::max(1, std::min({target / tiles_of(cfg), kMaxSplits, p.in_dim / (2 * kBK)}));
  set_splits(p, s, kBK, plan);
  if (plan.one_pass) {
    const size_t parts =
        plan.splits > 1 ? static_cast<size_t>(plan.splits) * p.n * p.inter * (glu ? 2 : 1) : 0;
    const size_t zp = static_cast<size_t>(ceil_div(p.inter, sh.bm)) * p.n * p.kv_heads;
    plan.ws_bytes = (parts + zp) * sizeof(float);
  } else if (plan.splits == 1) {
    const size_t slots = static_cast<size_t>(ceil_div(p.inter, sh.bm)) * sh.wm;
    plan.ws_bytes = slots * p.n * p.kv_heads * sizeof(float);
  } else {
    plan.ws_bytes =
        static_cast<size_t>(plan.splits) * p.n * p.inter * (glu ? 2 : 1) * sizeof(float);
  }
  plan.ws_bytes += counter_bytes(p);
  return plan;
}

/// FMA plan: enough blocks to fill the GPU, slices of at least kFmaMinSlice, and partial sums
/// (splits x n floats per row) no larger than the weight row they come from (the FMA kernel
/// is compute bound at large n, where splitting only adds traffic).
gate_plan_t fma_plan(const gate_params_t& p, int splits) {
  gate_plan_t plan;
  const int s =
      splits > 0
          ? splits
          : std::min({ceil_div(kTargetBlocks, ceil_div(p.inter, kFmaRows)),
                      std::max(1, p.in_dim / kFmaMinSlice), std::max(1, p.in_dim / (2 * p.n))});
  set_splits(p, s, 8, plan);
  plan.ws_bytes = static_cast<size_t>(plan.splits) * p.n * p.inter * (p.kind == kGateGlu ? 2 : 1) *
                      sizeof(float) +
                  counter_bytes(p);
  return plan;
}

/// Shared-memory row pitch (bytes) of the rows kernel: 64 bytes past a 128-byte boundary, so
/// the 2 rows x 4 16-byte chunks a quarter warp's mma operand loads touch hit distinct banks.
int rows_pitch(size_t bytes) { return static_cast<int>((bytes + 127) / 128 * 128 + 64); }

/// Bytes of the rows kernel's float area (see rows_args_t), a multiple of 128.
int rows_ext_bytes(int kv_heads) {
  const int floats =
      kRowsMaxWarps * 64 + kRowsTokens * kRowsMax + kv_heads * kRowsMax + kRowsMax + kv_heads;
  return (floats * 4 + 127) / 128 * 128;
}

/// Dynamic shared memory of the rows kernel with `rows` rows per block.
size_t rows_smem_bytes(const gate_params_t& p, int rows) {
  const size_t mats = p.kind == kGateGlu ? 2 : 1;
  return rows_ext_bytes(p.kv_heads) +
         mats * rows * rows_pitch(static_cast<size_t>(p.in_dim) * dtype_size(p.w_dtype)) +
         static_cast<size_t>(p.n) *
             rows_pitch(static_cast<size_t>(p.in_dim) * dtype_size(p.x_dtype));
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
gate_plan_t rows_plan(const gate_params_t& p, size_t smem_budget, int rows) {
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
  return p.n > 0 && p.in_dim > 0 && p.in_dim % limits::kGateInputMultiple == 0 && p.inter > 0 &&
         p.kv_heads > 0 && p.act >= 0 && p.act <= 3 && (p.kind == kGateMlp || p.kind == kGateGlu);
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
    const size_t budget =
        static_cast<size_t>(std::max(0, std::min(kRowsSmem, smem_optin - kRowsStaticSmem)));
    const gate_plan_t rows = rows_plan(p, budget);
    if (rows.rows > 0) return rows;
  }
  return tc_dtypes(p) && cc_major >= 8 ? tc_plan(p, -1, 0) : fma_plan(p, 0);
}

}  // namespace gate_detail
}  // namespace trimkv
