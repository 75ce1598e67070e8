// Retention-gate kernels: see retention_gate.cuh. This file runs a plan (plan.h, plan.cu) with
// the kernel files tc.cu, fma.cu, finish.cu and rows.cu; gate_common.cuh is what they share.
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
// dtypes, sm_75) beyond the rows kernel runs GateFmaKernel, which splits K the same way.#include
// "kernels/gate/retention_gate.cuh"

#include <algorithm>

#include "kernels/gate/plan.h"

namespace trimkv {

namespace gate_detail {

namespace {

/// Launches the hidden-layer kernel of a plan (made by tc_plan, where tc_dtypes(p) holds, or by
/// fma_plan); `slots` as in launch_tc.
cudaError_t launch_hidden(const gate_params_t& p, const gate_plan_t& plan, void* workspace,
                          int& slots, cudaStream_t stream) {
  float* ws = reinterpret_cast<float*>(static_cast<char*>(workspace) + counter_bytes(p));
  slots = 0;
  if (plan.cfg != kFmaCfg) return launch_tc(p, plan, ws, slots, stream);
  return launch_fma(p, plan, ws, stream);
}

}  // namespace

cudaError_t run_plan(const gate_params_t& p, const gate_plan_t& plan, int cc_major, void* workspace,
                     cudaStream_t stream) {
  const bool pdl = cc_major >= 9 && !(plan.diag & kDiagNoPdl);
  if (plan.cfg == kRowsCfg) {
    unsigned* counter = static_cast<unsigned*>(workspace);
    float* zp = reinterpret_cast<float*>(static_cast<char*>(workspace) + counter_bytes(p));
    return launch_rows(p, plan, counter, zp, pdl, stream);
  }
  if (plan.one_pass) {
    unsigned* counters = static_cast<unsigned*>(workspace);
    float* data = reinterpret_cast<float*>(static_cast<char*>(workspace) + counter_bytes(p));
    return launch_one_pass(p, plan, counters, data, pdl, stream);
  }
  int slots = 0;
  cudaError_t e = launch_hidden(p, plan, workspace, slots, stream);
  if (e != cudaSuccess) return e;
  const float* ws =
      reinterpret_cast<const float*>(static_cast<const char*>(workspace) + counter_bytes(p));
  return launch_finish(p, plan, slots, ws, pdl, stream);
}

}  // namespace gate_detail

using namespace gate_detail;

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
