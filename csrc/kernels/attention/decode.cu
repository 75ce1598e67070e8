// Host side of the decode step: split choice, workspace sizing, dtype dispatch.
#include <algorithm>

#include "kernels/attention/decode.cuh"
#include "kernels/attention/decode_launch.cuh"
#include "kernels/attention/decode_traits.cuh"

namespace trimkv {

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
  // Per process; one device model per process is the norm.
  static int cached_sms = 0, cached_major = 0;
  if (cached_sms == 0) {
    int dev = 0, v = 0, major = 0;
    if (cudaGetDevice(&dev) == cudaSuccess &&
        cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess &&
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess) {
      cached_major = major;
      cached_sms = v;
    }
  }
  const int sms = p.num_sms > 0 ? p.num_sms : cached_sms > 0 ? cached_sms : 132;
  // Enough heads to fill every SM once: one pass per head, eviction fused in the same block.
  if (bh >= sms) return 1;
  // Otherwise about two blocks per SM, at least one 64-token tile per split: an SM keeps only
  // so many loads in flight (one block streams ~30 GB/s however deep its pipeline), so the
  // bytes must come through as many SMs as possible.
  const int auto_max = std::max(1, (p.cap + kAutoSplitTokens - 1) / kAutoSplitTokens);
  int s = std::min(std::min(max_splits, auto_max), std::max(1, 2 * sms / bh));
  // sm_90+: a head's splits merge through a thread-block cluster (launch_mma), far cheaper
  // than the arrival-counter merge through L2. Clusters of up to 8 always fit the GPCs; 16
  // (twice the SMs streaming) pay off once each split still holds 256 tokens or more.
  if (cached_major >= 9)
    s = std::min(s, p.cap >= kMaxClusterSplits * 256 ? kMaxClusterSplits : kAutoClusterSplits);
  return std::max(1, s);
}

size_t DecodeWorkspaceBytes(const decode_params_t& p) {
  return decode_detail::decode_ws_layout(p, DecodeNumSplits(p)).bytes;
}

size_t DecodeCounterBytes(const decode_params_t& p) {
  return decode_detail::decode_ws_layout(p, 1).list;  // the counters end where the list begins
}

bool DecodeGroupSupported(int group, int head_dim, DType dtype, bool tensor_cores) {
  if (group < 1 || head_dim < 1 || head_dim > decode_detail::kMaxHeadDim) return false;
  if (dtype != DType::kF32 && tensor_cores && group <= decode_detail::kMmaMaxGroup) return true;
  return limits::core_group_supported(group, head_dim, static_cast<int>(dtype_size(dtype)));
}

cudaError_t DecodeStep(const decode_params_t& p, DType dtype, void* workspace,
                       cudaStream_t stream) {
  if (p.batch <= 0 || p.kv_heads <= 0 || p.q_heads <= 0 || p.q_heads % p.kv_heads != 0 ||
      p.memory < 1 || p.buffer < 0 || p.window < 0 || p.cap < p.memory + p.buffer ||
      !limits::head_dim_supported(p.head_dim) || workspace == nullptr ||
      (p.knorm && p.lognorm_cache == nullptr) ||
      (p.positions == nullptr && p.batch > decode_params_t::kInlinePositions))
    return cudaErrorInvalidValue;
  const int splits = DecodeNumSplits(p);
  const decode_ws_t ws = decode_detail::carve_workspace(p, splits, workspace);
  switch (dtype) {
    case DType::kF32:
      return decode_detail::decode_step_typed<float>(p, splits, ws, stream);
    case DType::kF16:
      return decode_detail::decode_step_typed<__half>(p, splits, ws, stream);
    case DType::kBF16:
      return decode_detail::decode_step_typed<__nv_bfloat16>(p, splits, ws, stream);
  }
  return cudaErrorInvalidValue;  // Unsupported dtype
}

}  // namespace trimkv
