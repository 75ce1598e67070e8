// CUDA retention gate: weights uploaded once in their stored dtype (synchronously: the decode
// kernel reads them before waiting for the previous kernel), one launch per call up to 8
// tokens, and a workspace whose arrival counters start zeroed.
#include <cuda_runtime.h>

#include <memory>

#include "common/cuda_check.h"
#include "common/errors.h"
#include "cuda/stream_context.h"
#include "kernels/gate/retention_gate.cuh"
#include "ops/gate.h"

namespace trimkv {
namespace {

class CudaGate final : public Gate {
 public:
  CudaGate(const gate_spec_t& spec, const gate_weights_t& w)
      : Gate(Backend::kCuda, spec), wdtype_(w.dtype) {
    TRIMKV_CHECK(spec.input_size % limits::kGateInputMultiple == 0, code::kUnsupported,
                 "inputSize ", spec.input_size,
                 " is not supported by the CUDA gate (a multiple of 8 is needed)");
    cuda_check(cudaGetDevice(&dev_), "cudaGetDevice");
    a_ = upload(w.a);
    b_ = upload(w.b);
    out_ = upload(w.out);
    bias_ = upload(w.bias);
  }

 protected:
  void do_run(const Tensor& x, Tensor& lam) override {
    gate_params_t p;
    const bool glu = spec_.kind == GateKind::kRg3;
    p.kind = glu ? kGateGlu : kGateMlp;
    p.act = static_cast<int>(spec_.activation);  // same integer values (config.h)
    p.n = static_cast<int>(x.shape()[0]);
    p.in_dim = spec_.input_size;
    p.inter = spec_.intermediate_size;
    p.kv_heads = spec_.kv_heads;
    p.x = x.data();
    p.x_dtype = x.dtype();
    p.w_dtype = wdtype_;
    if (glu) {
      p.w_gate = a_->data();
      p.w_up = b_->data();
      p.w_down = out_->data();
    } else {
      p.w1 = a_->data();
      p.b1 = b_->data();
      p.w2 = out_->data();
    }
    p.bias = bias_->data();
    p.lam = static_cast<float*>(lam.data());
    const size_t ws = RetentionGateWorkspaceBytes(p);
    if (!workspace_ || workspace_->bytes() < ws) {
      workspace_.reset();
      workspace_ = std::make_unique<Buffer>(Backend::kCuda, ws);
      // The arrival counters at the workspace's front must start at zero; each call leaves
      // them zero (retention_gate.cuh). Stream order puts this before the first call.
      const cudaError_t z = cudaMemsetAsync(workspace_->data(), 0, ws, nullptr);
      if (z != cudaSuccess) {
        cudaGetLastError();
        workspace_.reset();
        fail(code::kNative, "zeroing the retention gate workspace failed: ", cuda_error_text(z));
      }
    }
    // Recorded for the decode steps that follow (cuda/stream_context.h).
    const cudaError_t e = StreamContext::of(dev_).gate_call(
        [&] { return RetentionGate(p, workspace_->data(), nullptr); });
    if (e != cudaSuccess) {
      cudaGetLastError();
      workspace_.reset();  // a failed call may leave counters set: the next call starts afresh
      fail(code::kNative, "retention gate kernel failed: ", cuda_error_text(e));
    }
  }

 private:
  std::unique_ptr<Buffer> upload(const std::vector<uint8_t>& host) {
    auto b = std::make_unique<Buffer>(Backend::kCuda, host.size());
    copy_to_device(b->data(), host.data(), host.size());
    return b;
  }

  DType wdtype_;
  int dev_ = 0;  // the device the gate lives on
  std::unique_ptr<Buffer> a_, b_, out_, bias_, workspace_;
};

}  // namespace

std::unique_ptr<Gate> create_cuda_gate(const gate_spec_t& spec, const gate_weights_t& w) {
  if (!cuda_status().available) fail(code::kBackendUnavailable, cuda_status().reason);
  return std::make_unique<CudaGate>(spec, w);
}

}  // namespace trimkv
