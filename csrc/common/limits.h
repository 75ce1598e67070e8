// Every limit of the CUDA backend, stated once: the kernels compile against these constants,
// the CUDA ops check them, and the native support query (ops/support.h) answers lib/ from them,
// so that no other place (TypeScript included) restates a kernel's internals. Header-only, no
// CUDA: the CPU-only build answers the support query too.
#pragma once

namespace trimkv {
namespace limits {

/// Head dims: multiples of kHeadDimMultiple (whole 16-byte vectors of 16-bit elements) up to
/// kMaxHeadDim. The tuned sizes 64, 128 and 256 have exact kernels; any other runs the padded
/// kernel of the next tuned size (padded_head_dim).
constexpr int kHeadDimMultiple = 8;
constexpr int kMaxHeadDim = 256;
constexpr int kTunedHeadDims[] = {64, 128, 256};

/// The tuned head dim whose kernel serves head dim d (d <= kMaxHeadDim).
constexpr int padded_head_dim(int d) { return d <= 64 ? 64 : d <= 128 ? 128 : 256; }

constexpr bool head_dim_supported(int d) {
  return d > 0 && d % kHeadDimMultiple == 0 && d <= kMaxHeadDim;
}

/// Tensor-core decode (fp16/bf16, sm_80+): query heads per KV head (the mma N dimension).
constexpr int kMmaMaxGroup = 8;

/// CUDA-core decode: threads per block. A token's row is spread over lanes of one 16-byte vector
/// each, at most 32 (a lane group); the block's lane groups are shared out among the group's
/// query heads, core_heads_per_lane_group of them per lane group.
constexpr int kDecodeCoreThreads = 256;
constexpr int core_heads_per_lane_group(int group) {
  return group % 4 == 0 ? 4 : group % 2 == 0 ? 2 : 1;
}
/// Lane groups of a CUDA-core decode block for head dim d and elements of elem_bytes bytes.
constexpr int core_lane_groups(int d, int elem_bytes) {
  const int vectors = padded_head_dim(d) / (16 / elem_bytes);
  return kDecodeCoreThreads / (vectors < 32 ? vectors : 32);
}
/// Whether the CUDA-core decode kernel runs a group of `group` query heads per KV head.
constexpr bool core_group_supported(int group, int d, int elem_bytes) {
  return group >= 1 &&
         core_lane_groups(d, elem_bytes) % (group / core_heads_per_lane_group(group)) == 0;
}

/// Pooled scope 'global': the heads of one sequence's pool (layers x kvHeads), one thread of
/// the pool kernel's segment table each.
constexpr int kPoolMaxHeads = 1024;

/// Retention gate: the input width (in_dim) is whole 16-byte vectors of 16-bit elements.
constexpr int kGateInputMultiple = 8;

}  // namespace limits
}  // namespace trimkv
