#include "ops/support.h"

#include <cmath>
#include <sstream>

#include "common/limits.h"

namespace trimkv {

namespace {

template <typename... Parts>
support_t unsupported(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return {false, os.str()};
}

}  // namespace

support_t cache_support(Backend backend, const cache_config_t& c) {
  if (backend == Backend::kCpu) return {};
  const long long pool_heads = static_cast<long long>(c.layers) * c.kv_heads;
  if (c.scope == Scope::kGlobal && pool_heads > limits::kPoolMaxHeads)
    return unsupported("scope 'global' on the CUDA backend pools at most ", limits::kPoolMaxHeads,
                       " heads per sequence (layers x kvHeads), got ", pool_heads,
                       "; use scope 'layer' or the CPU backend");
  if (c.head_dim % limits::kHeadDimMultiple != 0 || c.head_dim > limits::kMaxHeadDim)
    return unsupported("headDim ", c.head_dim,
                       " is not supported by the CUDA backend (multiples of ",
                       limits::kHeadDimMultiple, " up to ", limits::kMaxHeadDim, ")");
  const int group = c.group();
  const bool tensor_cores = c.dtype != DType::kF32 && group <= limits::kMmaMaxGroup;
  if (!tensor_cores &&
      !limits::core_group_supported(group, c.head_dim, static_cast<int>(dtype_size(c.dtype))))
    return unsupported("qHeads / kvHeads = ", group,
                       " is not supported by the CUDA decode kernel for ", dtype_name(c.dtype),
                       " at headDim ", c.head_dim, " (fp16/bf16 take groups up to ",
                       limits::kMmaMaxGroup,
                       " on sm_80+; otherwise groups of 1, 2, 4, 8 and some larger powers of two)");
  return {};
}

support_t gate_support(Backend backend, double input_size) {
  if (backend == Backend::kCuda && std::fmod(input_size, limits::kGateInputMultiple) != 0) {
    std::ostringstream size;
    if (std::floor(input_size) == input_size && std::fabs(input_size) < 9007199254740992.0)
      size << static_cast<long long>(input_size);
    else
      size << input_size;
    return unsupported("inputSize ", size.str(),
                       " is not supported by the CUDA gate (a multiple of ",
                       limits::kGateInputMultiple, " is needed)");
  }
  return {};
}

}  // namespace trimkv
