// Fused TRIM-KV decode step for one layer: GQA attention over a bounded per-head cache plus
// the new token, fused with the retention-score eviction (SPEC.md sections 4-6).
//
// Work decomposition: grid (splits, kv_heads, batch); a step is a single launch. Each block
// streams the K/V tiles of its slice of the head's tokens through shared memory with cp.async
// and keeps an online-softmax state for all G query heads of its KV head, so K and V are read
// once per KV head. Two kernels share that shape:
//   DecodeMmaKernel    (fp16/bf16, G <= 8, sm_80+): tensor cores (mma.sync m16n8k16) for
//                      q.K^T and P.V; 4 warps, a 16-token slab per warp and tile. The splits
//                      cut the slots by the cache capacity, so the fixed layout issues its
//                      first tiles before lens/positions arrive; the new token is attended
//                      from k_new/v_new by the last split; the pos/lam of the B = 0 victim
//                      search travel in the same cp.async groups as the tiles.
//   DecodeAttendKernel (fp32, G > 8, GPUs before sm_80): CUDA cores, 8 warps, 16 lanes a
//                      token, the new token as logical slot len of the last split.
// With one split the same block writes the output and evicts. With several, one block merges
// the split partials (max, sum, acc, victim) and evicts: on sm_90 the blocks of a head form a
// thread-block cluster and push their partials into rank 0's shared memory (one cluster
// barrier, no global round trip); otherwise the last block to arrive merges (arrival counter
// in the workspace, partials through L2).
#pragma once
//
// Files: decode.cuh (this contract), decode_traits.cuh (shapes, limits, the workspace layout),
// decode_epilogue.cuh (append, eviction, split merges), decode_core.cuh (CUDA-core kernel),
// decode_mma.cuh (tensor-core kernel), decode_launch.cuh (launch policy and dispatch),
// decode.cu (host entry points), instances/decode_*.cu (one dtype each, generated).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common/dtype.h"
#include "kernels/cache/cache_layer.cuh"

namespace trimkv {

/// Parameters of one decode step over one layer (cache_layer.cuh: the slot arrays, layout and
/// rules). All pointers are device pointers. Pooled layout: the step only appends (every active
/// head needs a free slot, see pool.cuh) and leaves eviction to PoolEvict.
struct decode_params_t : cache_layer_t {
  const void* q = nullptr;             ///< [batch, q_heads, head_dim] dtype
  const void* k_new = nullptr;         ///< [batch, kv_heads, head_dim] dtype
  const void* v_new = nullptr;         ///< [batch, kv_heads, head_dim] dtype
  const float* lam_new = nullptr;      ///< [batch, kv_heads]
  const int32_t* positions = nullptr;  ///< [batch] position of the new token, -1 = inactive
  void* out = nullptr;                 ///< [batch, q_heads, head_dim] dtype
  int num_splits = 0;                  ///< 0 = auto; > 0 forces the split count (clamped)
  int num_sms = 0;                     ///< 0 = read from the current device
  /// 1: the tensor-core kernel may issue its first K/V tiles (and their pos/lam/lognorm) of a
  /// fixed-layout cache before waiting for the kernel ahead of it (a programmatic dependent
  /// launch, pdl.cuh), so they land while that kernel finishes. Set it only when the kernel
  /// ahead in the stream cannot be writing this layer's cache: see DecodeStep.
  int prefetch_before_wait = 0;
#ifdef TRIMKV_DECODE_TRACE
  unsigned long long* trace = nullptr;  ///< harness only: [blocks][8] globaltimer records
#endif
  /// Most sequences whose positions travel in the launch itself.
  static constexpr int kInlinePositions = 64;
  /// positions == nullptr (batch <= kInlinePositions): the positions themselves, passed by
  /// value with the launch, so a step needs no upload (the kernels take p as __grid_constant__,
  /// which lets them index it without a copy).
  int32_t pos_inline[kInlinePositions] = {};

  /// Position of sequence b's new token (-1: inactive).
  __host__ __device__ __forceinline__ int new_position(int b) const {
    return positions ? positions[b] : pos_inline[b];
  }
};

/// Workspace pointers carved out of the caller's workspace buffer.
struct decode_ws_t {
  float* acc = nullptr;                ///< [batch, kv_heads, splits, G, 256]
  float* md = nullptr;                 ///< [batch, kv_heads, splits, G, 4] (max, sum, -, -)
  unsigned long long* vkey = nullptr;  ///< [batch, kv_heads, splits, 2] (min keep-key, slot)
  int* list = nullptr;                 ///< [batch, kv_heads, 2 * max(B, 1)] holes / movers
  int* counter = nullptr;              ///< [batch, kv_heads] arrival counters (split > 1)
};

/// Number of splits DecodeStep uses for these params (host only, no sync).
int DecodeNumSplits(const decode_params_t& p);

/// Bytes of workspace DecodeStep needs for these params (host only, no sync).
/// The first DecodeCounterBytes(p) bytes hold arrival counters: zero them once (cudaMemset)
/// when the workspace is allocated; every step leaves them zero. The rest needs no init.
size_t DecodeWorkspaceBytes(const decode_params_t& p);

/// Size of the counter region at the start of the workspace (see DecodeWorkspaceBytes).
size_t DecodeCounterBytes(const decode_params_t& p);

/// Whether DecodeStep can run a group of `group` query heads per KV head (host only). The
/// tensor-core kernel takes fp16/bf16 with group <= 8 on sm_80+ (tensor_cores true); the
/// CUDA-core kernel otherwise, which needs group / (its heads per lane group) to divide its
/// lane groups (e.g. fp32 at head dim 128 takes groups 1, 2, 4, 8, 16, 32).
bool DecodeGroupSupported(int group, int head_dim, DType dtype, bool tensor_cores);

/// One fused decode step (attention + append + eviction) for one layer.
/// \param p        see decode_params_t; lens/pos/lam/lognorm/k/v caches are updated in place
/// \param dtype    storage dtype of q, k_new, v_new, caches and out
/// \param workspace at least DecodeWorkspaceBytes(p) bytes of device memory, 256-byte aligned
/// \return cudaSuccess, cudaErrorInvalidValue for unsupported shapes, or the launch error
///
/// p.prefetch_before_wait is safe when the decode step enqueued last on the stream before this
/// one was for another layer's cache and nothing between them writes this layer's cache with a
/// programmatic dependent launch. Then, when this kernel starts, that step has passed its own
/// griddepcontrol.wait (the decode kernel lets its dependents start only after it), so every
/// kernel ahead of it has completed, this layer's last writer included, provided every kernel
/// of the stream waits for the one ahead before it completes (any kernel launched without the
/// programmatic attribute does).
cudaError_t DecodeStep(const decode_params_t& p, DType dtype, void* workspace, cudaStream_t stream);

}  // namespace trimkv
