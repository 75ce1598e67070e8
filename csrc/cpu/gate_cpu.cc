// CPU retention gate: float32 weights (exact upcast of the stored dtype), float32 math.
#include <algorithm>
#include <cmath>

#include "common/errors.h"
#include "cpu/dot.h"
#include "cpu/parallel.h"
#include "ops/gate.h"

namespace trimkv {
namespace {

float activate(Activation act, float u) {
  switch (act) {
    case Activation::kSilu:
      return u / (1.f + std::exp(-u));
    case Activation::kGelu:
      return 0.5f * u * (1.f + std::erf(u * 0.70710678118654752f));
    case Activation::kGeluTanh: {
      const float c = 0.79788456080286536f;  // sqrt(2 / pi)
      return 0.5f * u * (1.f + std::tanh(c * (u + 0.044715f * u * u * u)));
    }
    case Activation::kRelu:
      return u > 0.f ? u : 0.f;
  }
  return u;
}

// log(sigmoid(z)) without overflow for large |z|: min(z, 0) - log1p(exp(-|z|)).
float log_sigmoid(float z) { return std::fmin(z, 0.f) - std::log1p(std::exp(-std::fabs(z))); }

std::vector<float> to_float(const std::vector<uint8_t>& raw, DType t) {
  std::vector<float> out(raw.size() / dtype_size(t));
  for (size_t i = 0; i < out.size(); ++i) out[i] = load_as_float(raw.data(), t, i);
  return out;
}

class CpuGate final : public Gate {
 public:
  CpuGate(const gate_spec_t& spec, const gate_weights_t& w)
      : Gate(Backend::kCpu, spec),
        a_(to_float(w.a, w.dtype)),
        b_(to_float(w.b, w.dtype)),
        out_(to_float(w.out, w.dtype)),
        bias_(to_float(w.bias, w.dtype)) {}

 protected:
  void do_run(const Tensor& x, Tensor& lam) override {
    const int n = static_cast<int>(x.shape()[0]);
    const int In = spec_.input_size, I = spec_.intermediate_size, H = spec_.kv_heads;
    std::vector<float> xs(static_cast<size_t>(n) * In), hidden(static_cast<size_t>(n) * I);
    to_float_n(x.data(), x.dtype(), 0, xs.size(), xs.data());
    // The first layer dominates (I x In weights): blocks of its rows run in parallel, each
    // reading its rows once for every token.
    constexpr int kRowsPerTask = 32;
    cpu::parallel_for((I + kRowsPerTask - 1) / kRowsPerTask, [&](int task) {
      const int r1 = std::min(I, (task + 1) * kRowsPerTask);
      for (int i = task * kRowsPerTask; i < r1; ++i) {
        const float* row = a_.data() + static_cast<size_t>(i) * In;
        const float* up_row =
            spec_.kind == GateKind::kRg3 ? b_.data() + static_cast<size_t>(i) * In : nullptr;
        for (int t = 0; t < n; ++t) {
          const float* xrow = xs.data() + static_cast<size_t>(t) * In;
          const float u = dot(row, xrow, In);
          hidden[static_cast<size_t>(t) * I + i] =
              up_row ? activate(spec_.activation, u) * dot(up_row, xrow, In)
                     : activate(spec_.activation, u + b_[i]);
        }
      }
    });
    float* lam_out = static_cast<float*>(lam.data());
    for (int t = 0; t < n; ++t) {
      for (int h = 0; h < H; ++h) {
        const float z = dot(out_.data() + static_cast<size_t>(h) * I,
                            hidden.data() + static_cast<size_t>(t) * I, I) +
                        bias_[h];
        lam_out[static_cast<size_t>(t) * H + h] = log_sigmoid(z);
      }
    }
  }

 private:
  std::vector<float> a_, b_, out_, bias_;
};

}  // namespace

std::unique_ptr<Gate> create_cpu_gate(const gate_spec_t& spec, const gate_weights_t& w) {
  return std::make_unique<CpuGate>(spec, w);
}

}  // namespace trimkv
