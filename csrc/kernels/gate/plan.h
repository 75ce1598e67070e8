// The launch plan of a retention-gate call (how RetentionGate runs it: tile configuration, K
// splits, one pass or hidden layer + finisher, the rows kernel; retention_gate.cu), the shape
// facts behind the workspace size, and the launchers of the kernel files. Internal to the gate
// kernels: tests and the gate harness (bench/kernels/gate) include it to force plans.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "kernels/gate/gate_common.cuh"
#include "kernels/gate/retention_gate.cuh"

namespace trimkv {
namespace gate_detail {

constexpr int kFmaCfg = -1;   ///< gate_plan_t::cfg of the CUDA-core path
constexpr int kRowsCfg = -3;  ///< gate_plan_t::cfg of the rows decode kernel

/// How one call runs: a tile configuration (or the FMA path), the number of K slices and
/// their length, whether the tensor-core kernel finishes the call itself (one pass), and the
/// workspace that needs (arrival counters included). Shape-only, so that the workspace size is
/// known without a device.
struct gate_plan_t {
  int cfg = kFmaCfg;  ///< kFmaCfg, kRowsCfg or a TcCfg
  int splits = 1;
  int kslice = 0;
  bool one_pass = false;
  int rows = 0;     ///< kRowsCfg: hidden rows per block (0: the rows kernel does not apply)
  int threads = 0;  ///< kRowsCfg: block size (harness timing only; 0: kRowsThreads)
  size_t ws_bytes = 0;
  int diag = 0;  ///< OnePassDiag bits (harness timing only)
};

/// Tile shape (rows BM, tokens BN, warp rows WM) of tensor-core configuration cfg.
struct tc_shape_t {
  int bm, bn, wm;
};
tc_shape_t tc_shape(int cfg, bool glu);

/// Bytes of arrival counters at the front of every workspace (every plan keeps its data past
/// them, so that they stay zero whatever plan ran before): one per (token tile, kCtrBM-row
/// tile) and one per token tile, for up to kMaxTokTiles token tiles.
size_t counter_bytes(const gate_params_t& p);

/// Tensor-core plan; cfg < 0 and splits <= 0 pick automatically (the choices the H100 sweep
/// of NOTES.md found fastest for Qwen3-4B's gates, expressed in tiles so other shapes follow).
/// The automatic plan runs one pass up to kOnePassTokens tokens, where it beat the hidden
/// kernel + finisher; a forced 64-row tile runs one pass below kFewTokens tokens (the harness
/// may turn that off).
gate_plan_t tc_plan(const gate_params_t& p, int cfg, int splits);

/// FMA plan: enough blocks to fill the GPU, slices of at least kFmaMinSlice, and partial sums
/// (splits x n floats per row) no larger than the weight row they come from (the FMA kernel
/// is compute bound at large n, where splitting only adds traffic).
gate_plan_t fma_plan(const gate_params_t& p, int splits);

/// Shared-memory row pitch (bytes) of the rows kernel: 64 bytes past a 128-byte boundary, so
/// the 2 rows x 4 16-byte chunks a quarter warp's mma operand loads touch hit distinct banks.
int rows_pitch(size_t bytes);

/// Bytes of the rows kernel's float area (see rows_args_t), a multiple of 128.
int rows_ext_bytes(int kv_heads);

/// Dynamic shared memory of the rows kernel with `rows` rows per block.
size_t rows_smem_bytes(const gate_params_t& p, int rows);

/// Workspace of the rows kernel: the counters, then z partials [blocks, n, kv_heads].
size_t rows_ws_bytes(const gate_params_t& p, int rows);

/// Rows plan (GateRowsKernel), for n <= kRowsTokens on any device and dtypes: R =
/// ceil(inter / kRowsBlockTarget) rows per block (about one block per SM at inter 512), at most
/// kRowsMax, fewer while the block's shared memory (its weight rows and x) exceeds
/// smem_budget; rows > 0 forces R (harness). plan.rows == 0: the plan does not apply.
gate_plan_t rows_plan(const gate_params_t& p, size_t smem_budget, int rows = 0);

bool shapes_valid(const gate_params_t& p);

bool tc_dtypes(const gate_params_t& p);

/// Compute capability major of the current device: picks the tensor-core path (8+) and
/// programmatic dependent launch (9+).
cudaError_t device_cc_major(int& major);

/// Largest dynamic shared memory a block of the current device may opt in to.
cudaError_t device_smem_optin(int& bytes);

/// Whether RetentionGate picks the rows kernel (where its shared memory fits): rg3 on tensor
/// cores up to kRowsTcTokensGlu tokens (see there).
bool rows_automatic(const gate_params_t& p, int cc_major);

/// The plan RetentionGate runs: the rows kernel where rows_automatic and its shared memory
/// fits the device, else tensor cores (sm_80+, both 16-bit of one dtype; one pass for n <= 8)
/// or the FMA path.
gate_plan_t auto_plan(const gate_params_t& p, int cc_major, int smem_optin);

// ---- Launchers, one per kernel file; each returns the launch error (cudaErrorInvalidValue for
// a plan its kernel cannot run). pdl: a programmatic dependent launch (sm_90+).

/// Hidden layer of a tensor-core plan (tc.cu); slots: the z-partial slots it writes when fused
/// (0 when split), for launch_finish.
cudaError_t launch_tc(const gate_params_t& p, const gate_plan_t& plan, float* ws, int& slots,
                      cudaStream_t stream);
/// The whole call by the one-pass tensor-core kernel (tc.cu). counters: the front of the
/// workspace (zero), data: past counter_bytes(p).
cudaError_t launch_one_pass(const gate_params_t& p, const gate_plan_t& plan, unsigned* counters,
                            float* data, bool pdl, cudaStream_t stream);
/// Hidden layer on CUDA cores (fma.cu): the raw partials of every K slice.
cudaError_t launch_fma(const gate_params_t& p, const gate_plan_t& plan, float* ws,
                       cudaStream_t stream);
/// The finishing kernel of a two-kernel plan (finish.cu).
cudaError_t launch_finish(const gate_params_t& p, const gate_plan_t& plan, int slots,
                          const float* ws, bool pdl, cudaStream_t stream);
/// The whole call by the rows kernel (rows.cu). counter: the front of the workspace (zero),
/// zp: past counter_bytes(p).
cudaError_t launch_rows(const gate_params_t& p, const gate_plan_t& plan, unsigned* counter,
                        float* zp, bool pdl, cudaStream_t stream);
/// Runs a plan (retention_gate.cu): the rows kernel, the one-pass kernel, or the hidden layer
/// then its finishing kernel. cc_major as device_cc_major.
cudaError_t run_plan(const gate_params_t& p, const gate_plan_t& plan, int cc_major, void* workspace,
                     cudaStream_t stream);

}  // namespace gate_detail
}  // namespace trimkv
