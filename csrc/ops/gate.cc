#include "ops/gate.h"

#include "common/errors.h"

namespace trimkv {

void validate_gate(const gate_spec_t& s, const gate_weights_t& w) {
  TRIMKV_CHECK(s.input_size >= 1 && s.input_size <= (1 << 20), code::kRange,
               "inputSize must be in [1, 2^20], got ", s.input_size);
  TRIMKV_CHECK(s.intermediate_size >= 1 && s.intermediate_size <= (1 << 20), code::kRange,
               "intermediateSize must be in [1, 2^20], got ", s.intermediate_size);
  TRIMKV_CHECK(s.kv_heads >= 1 && s.kv_heads <= 1024, code::kRange,
               "kvHeads must be in [1, 1024], got ", s.kv_heads);
  const size_t es = dtype_size(w.dtype);
  const size_t I = s.intermediate_size, In = s.input_size, H = s.kv_heads;
  const bool glu = s.kind == GateKind::kRg3;
  auto expect = [&](const std::vector<uint8_t>& v, size_t n, const char* name) {
    TRIMKV_CHECK(v.size() == n * es, code::kShape, "Expected ", n, " ", dtype_name(w.dtype),
                 " values for ", name, " but received ", v.size() / es);
  };
  expect(w.a, I * In, glu ? "gateProj" : "linear1Weight");
  expect(w.b, glu ? I * In : I, glu ? "upProj" : "linear1Bias");
  expect(w.out, H * I, glu ? "downProj" : "linear2Weight");
  expect(w.bias, H, "bias");
}

std::unique_ptr<Gate> Gate::create(Backend backend, const gate_spec_t& spec,
                                   const gate_weights_t& w) {
  validate_gate(spec, w);
  return backend == Backend::kCuda ? create_cuda_gate(spec, w) : create_cpu_gate(spec, w);
}

void Gate::run(const Tensor& x, Tensor& lam) {
  TRIMKV_CHECK(x.backend() == backend_ && lam.backend() == backend_, code::kInvalidArgument,
               "tensors must live on the gate's backend (", backend_name(backend_), ")");
  TRIMKV_CHECK(x.shape().size() == 2 && x.shape()[1] == spec_.input_size, code::kShape,
               "Expected x of shape [n, ", spec_.input_size, "] but received ", x.describe());
  TRIMKV_CHECK(lam.dtype() == DType::kF32, code::kDType,
               "Expected dtype fp32 for lam but received ", lam.describe());
  TRIMKV_CHECK(
      lam.shape().size() == 2 && lam.shape()[0] == x.shape()[0] && lam.shape()[1] == spec_.kv_heads,
      code::kShape, "Expected lam of shape [", x.shape()[0], ", ", spec_.kv_heads,
      "] but received ", lam.describe());
  if (x.shape()[0] == 0) return;
  do_run(x, lam);
}

}  // namespace trimkv
