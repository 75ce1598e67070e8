// Retention-gate kernels (SPEC.md section 3): lam = logsigmoid(z) per token and KV head.
//   rg / rg2: z = W2 act(W1 x + b1) + bias
//   rg3:      z = W_down(act(W_gate y) * (W_up y)) + bias
// Float32 accumulation. Decode with tensor cores (x and weights both fp16 or both bf16, sm_80+,
// n <= 8): one kernel per call, the rows kernel (each block owns a few whole hidden rows, one
// cross-block reduction) for rg3 up to 4 tokens, else the one-pass kernel (in_dim split over
// blocks, two levels of last-block elections). Other small n: the weights are read once per
// call by many blocks that split in_dim and a finishing kernel sums the partials. Large n: tensor
// cores, the activation and W2 fused into the product's epilogue where in_dim is not split.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "common/dtype.h"
#include "common/enums.h"
#include "common/limits.h"

namespace trimkv {

/// gate_params_t::act and ::kind as the kernels switch on them (common/enums.h Activation and
/// GateArch).
constexpr int kGateSilu = static_cast<int>(Activation::kSilu);
constexpr int kGateGelu = static_cast<int>(Activation::kGelu);
constexpr int kGateGeluTanh = static_cast<int>(Activation::kGeluTanh);
constexpr int kGateRelu = static_cast<int>(Activation::kRelu);
constexpr int kGateMlp = static_cast<int>(GateArch::kMlp);  // rg, rg2
constexpr int kGateGlu = static_cast<int>(GateArch::kGlu);  // rg3

/// Parameters of one gate evaluation over n tokens. All pointers are device pointers.
struct gate_params_t {
  int kind = kGateMlp;      ///< GateArch
  int act = kGateSilu;      ///< Activation
  int n = 0;                ///< tokens
  int in_dim = 0;           ///< input width (Dm, or kv_heads * 2 * head_dim for rg2/rg3); % 8 == 0
  int inter = 0;            ///< intermediate size I
  int kv_heads = 0;         ///< outputs per token
  const void* x = nullptr;  ///< [n, in_dim] in x_dtype
  DType x_dtype = DType::kF32;
  DType w_dtype = DType::kF32;   ///< dtype of every weight and bias below
  const void* w1 = nullptr;      ///< kMlp: [inter, in_dim]
  const void* b1 = nullptr;      ///< kMlp: [inter] or null
  const void* w2 = nullptr;      ///< kMlp: [kv_heads, inter]
  const void* w_gate = nullptr;  ///< kGlu: [inter, in_dim]
  const void* w_up = nullptr;    ///< kGlu: [inter, in_dim]
  const void* w_down = nullptr;  ///< kGlu: [kv_heads, inter]
  const void* bias = nullptr;    ///< [kv_heads] or null
  float* lam = nullptr;          ///< [n, kv_heads] output, float32
};

/// Bytes of device workspace RetentionGate needs: arrival counters at the front, then float
/// partial sums of the hidden layer or of z. Depends on the shapes and kind only, not on the
/// dtypes or the device.
size_t RetentionGateWorkspaceBytes(const gate_params_t& p);

/// Computes lam [n, kv_heads] = logsigmoid(z).
///
/// Workspace contract. The workspace starts with arrival counters (their layout depends on
/// inter alone, so one workspace serves every n of a gate): they must be zero before the
/// first call (zero the whole workspace once after allocating it, and again after
/// reallocating it larger), and every call leaves them zero again (the blocks that win an
/// arrival reset it). So a workspace keeps its zeros across calls with any n, but a call that
/// fails or is aborted part way may leave them non-zero: zero it again then. Calls that share
/// a workspace must be ordered on one stream (they are on the legacy default stream the
/// package uses); the rest of the workspace is scratch.
///
/// On sm_90+ the one-kernel (decode) calls are programmatic dependent launches: they request
/// their weights (W1 / W_gate / W_up, W2 / W_down, b1, bias) before waiting for the previous
/// kernel in the stream, so the weights must not be written by work still in flight
/// in the stream (they are uploaded once, synchronously, at gate creation); x and the
/// workspace are read only after that wait.
/// \param workspace at least RetentionGateWorkspaceBytes(p) bytes, 16-byte aligned, counters
///   zero (see above)
/// \return cudaSuccess, cudaErrorInvalidValue for unsupported shapes, or the launch error
cudaError_t RetentionGate(const gate_params_t& p, void* workspace, cudaStream_t stream);

}  // namespace trimkv
