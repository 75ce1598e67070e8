// The retention-gate op (SPEC section 3): lam = logsigmoid(gate(x)) for a batch of tokens.
// One contract, two implementations: cpu/gate_cpu.cc and cuda/gate_cuda.cu.
#pragma once

#include <memory>
#include <vector>

#include "common/config.h"
#include "runtime/tensor.h"

namespace trimkv {

struct gate_spec_t {
  GateKind kind = GateKind::kRg;
  Activation activation = Activation::kSilu;
  int input_size = 0, intermediate_size = 0, kv_heads = 0;
};

/// Host copies of the weights in their stored dtype (all of one gate share it).
/// rg / rg2: a = linear1.weight [I, In], b = linear1.bias [I], out = linear2.weight [Hkv, I].
/// rg3:      a = gate_proj [I, In], b = up_proj [I, In], out = down_proj [Hkv, I].
struct gate_weights_t {
  DType dtype = DType::kF32;
  std::vector<uint8_t> a, b, out, bias;  // bias [Hkv]
};

class Gate {
 public:
  static std::unique_ptr<Gate> create(Backend backend, const gate_spec_t& spec,
                                      const gate_weights_t& w);
  virtual ~Gate() = default;
  const gate_spec_t& spec() const { return spec_; }
  Backend backend() const { return backend_; }

  /// \param x [n, input_size] any float dtype  \param lam [n, kv_heads] fp32 (written)
  void run(const Tensor& x, Tensor& lam);

 protected:
  Gate(Backend backend, const gate_spec_t& spec) : backend_(backend), spec_(spec) {}
  virtual void do_run(const Tensor& x, Tensor& lam) = 0;
  Backend backend_;
  gate_spec_t spec_;
};

/// Checks sizes of the spec and of every weight; throws ERR_RANGE / ERR_SHAPE.
void validate_gate(const gate_spec_t& spec, const gate_weights_t& w);

std::unique_ptr<Gate> create_cpu_gate(const gate_spec_t& spec, const gate_weights_t& w);
std::unique_ptr<Gate> create_cuda_gate(const gate_spec_t& spec, const gate_weights_t& w);

}  // namespace trimkv
