// The one set of enums that the host code (ops/, cpu/, cuda/, napi/) and the kernels share;
// their integer values are also the indices lib/ passes (lib/native.ts BACKEND_INDEX, the dtype
// and option lists of lib/constants.ts). Header-only, no CUDA.
#pragma once

namespace trimkv {

enum class Backend : int { kCpu = 0, kCuda = 1 };
enum class Strategy : int { kAlpha = 0, kKnormAlpha = 1 };
enum class Scope : int { kHead = 0, kLayer = 1, kGlobal = 2 };
/// Gate variants of the checkpoints (SPEC.md section 3).
enum class GateKind : int { kRg = 0, kRg2 = 1, kRg3 = 2 };
/// The gate kernels' two architectures: rg and rg2 are an MLP, rg3 a GLU.
enum class GateArch : int { kMlp = 0, kGlu = 1 };
/// Gate activations (the model's hidden_act).
enum class Activation : int { kSilu = 0, kGelu = 1, kGeluTanh = 2, kRelu = 3 };

inline const char* backend_name(Backend b) { return b == Backend::kCuda ? "cuda" : "cpu"; }

}  // namespace trimkv
