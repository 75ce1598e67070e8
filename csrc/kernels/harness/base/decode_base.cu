// Host side of the decode step: split choice, workspace sizing, dtype dispatch.
#include "decode_base.cuh"

#include <algorithm>

namespace trimkv_base {
using namespace ::trimkv;

int DecodeNumSplits(const decode_params_t& p) {
  using namespace decode_detail;
  const int bh = p.batch * p.kv_heads;
  if (bh <= 0) return 1;
  int max_splits =
      std::max(1, std::min(kMaxSplits, (p.cap + 1 + kMinSplitTokens - 1) / kMinSplitTokens));
  // The merge stages every partial of a head in shared memory at once: keep S within it.
  if (p.q_heads > 0 && p.kv_heads > 0 && p.q_heads % p.kv_heads == 0 && p.head_dim > 0) {
    const int G = p.q_heads / p.kv_heads, dpad = padded_head_dim(p.head_dim);
    while (max_splits > 1 && merge_smem_bytes(max_splits, G, dpad) > kMergeSmemBytes) --max_splits;
  }
  if (p.num_splits > 0) return std::min(p.num_splits, max_splits);
  int sms = p.num_sms;
  if (sms <= 0) {
    static int cached_sms = 0;  // per process; one device model per process is the norm
    if (cached_sms == 0) {
      int dev = 0, v = 0;
      if (cudaGetDevice(&dev) == cudaSuccess &&
          cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess)
        cached_sms = v;
    }
    sms = cached_sms > 0 ? cached_sms : 132;
  }
  // Enough heads to fill every SM once: one pass per head, eviction fused in the same block.
  if (bh >= sms) return 1;
  // Otherwise as many splits as keep all blocks resident in one wave (two blocks per SM).
  const int target = 2 * sms;
  const int auto_max = std::max(1, (p.cap + 1 + kAutoSplitTokens - 1) / kAutoSplitTokens);
  return std::max(1, std::min(std::min(max_splits, auto_max), target / bh));
}

size_t DecodeWorkspaceBytes(const decode_params_t& p) {
  using namespace decode_detail;
  const int splits = DecodeNumSplits(p);
  const size_t bhs = static_cast<size_t>(p.batch) * p.kv_heads;
  const size_t G = p.kv_heads > 0 ? static_cast<size_t>(p.q_heads / p.kv_heads) : 0;
  auto align = [](size_t x) { return (x + 255) & ~static_cast<size_t>(255); };
  size_t bytes = DecodeCounterBytes(p);
  bytes += align(bhs * 2 * static_cast<size_t>(p.buffer > 0 ? p.buffer : 1) * sizeof(int));
  if (splits > 1) {
    bytes += align(bhs * splits * G * kMaxHeadDim * sizeof(float));
    bytes += align(bhs * splits * G * 4 * sizeof(float));
    bytes += align(bhs * splits * 2 * sizeof(unsigned long long));
  }
  return bytes;
}

size_t DecodeCounterBytes(const decode_params_t& p) {
  const size_t bhs = static_cast<size_t>(p.batch) * p.kv_heads;
  return (bhs * sizeof(int) + 255) & ~static_cast<size_t>(255);
}

cudaError_t DecodeStep(const decode_params_t& p, DType dtype, void* workspace,
                       cudaStream_t stream) {
  if (p.batch <= 0 || p.kv_heads <= 0 || p.q_heads <= 0 || p.q_heads % p.kv_heads != 0 ||
      p.memory < 1 || p.buffer < 0 || p.window < 0 || p.cap < p.memory + p.buffer ||
      p.head_dim <= 0 || p.head_dim % 8 != 0 || p.head_dim > decode_detail::kMaxHeadDim ||
      workspace == nullptr || (p.knorm && p.lognorm_cache == nullptr))
    return cudaErrorInvalidValue;
  const int splits = DecodeNumSplits(p);
  const decode_ws_t ws = decode_detail::carve_workspace(p, splits, workspace);
  switch (dtype) {
    default: break;
    case DType::kBF16:
      return decode_detail::decode_step_typed<__nv_bfloat16>(p, splits, ws, stream);
  }
  return cudaErrorInvalidValue;  // Unsupported dtype
}

}  // namespace trimkv_base

namespace trimkv_base {
namespace decode_detail {
template cudaError_t decode_step_typed<__nv_bfloat16>(const decode_params_t&, int, const decode_ws_t&,
                                                      cudaStream_t);
}  // namespace decode_detail
}  // namespace trimkv_base
