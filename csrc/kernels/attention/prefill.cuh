// TRIM-KV prefill of one chunk of one sequence, one layer (SPEC.md sections 4-6), or of the
// chunks of several sequences in one launch (varlen: grid.z runs over the chunks, packed one
// after the other in the inputs): causal GQA attention of the chunk's queries over the head's
// cached tokens plus the chunk's own tokens, then the retention eviction over cached + chunk
// tokens, writing only the survivors of the chunk into the cache, so that a head never needs
// more than cap slots whatever the chunk length. In the pooled layout the chunk is appended
// whole and PoolEvict (pool.cuh) evicts afterwards.
//
// Launch sequence (one stream, no host synchronisation):
//   1. PrefillLognormKernel   (knorm only) ln ||k|| of each chunk key      -> workspace
//   2. PrefillAttnMmaKernel   (fp16/bf16, sm_80+; tensor cores)  or
//      PrefillAttnSimtKernel  (fp32, and fp16/bf16 before sm_80)          -> out
//   3. PrefillSelectKernel    per KV head: top-M of cached + chunk keys, slot plan, metadata,
//                             lens
//   4. PrefillWriteKernel     copies the chunk survivors' K/V rows into their slots (and cached
//                             survivors moved down when the head shrinks, B > 0)
// Attention reads the cache before 3-4 modify it (stream order).
//
// Files: prefill.cuh (this contract), prefill_traits.cuh (shapes and shared device helpers),
// prefill_mma.cuh (tensor-core attention), prefill_simt.cuh (CUDA-core attention, key norms),
// prefill_launch.cuh (tile choice and dispatch), prefill.cu (selection, write, entry points),
// instances/prefill_*.cu (one dtype each, generated).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common/dtype.h"
#include "kernels/cache/cache_layer.cuh"

namespace trimkv {

/// Parameters of one prefill chunk of sequence `seq` over one layer (cache_layer.cuh: the slot
/// arrays, layout and rules). Device pointers. Pooled layout: the chunk is appended whole (its
/// heads need `chunk` free slots, see pool.cuh) and PoolEvict evicts afterwards.
/// One sequence's chunk in a varlen launch: its tokens are rows [first, first + chunk) of the
/// packed inputs.
struct prefill_seg_t {
  int seq;    ///< sequence (batch row)
  int start;  ///< position of the chunk's first token
  int chunk;  ///< tokens (>= 1)
  int first;  ///< first row in q / k / v / lam / out
};

struct prefill_params_t : cache_layer_t {
  int seq = 0;    ///< sequence (batch row) of this chunk (segs == nullptr)
  int start = 0;  ///< position of the chunk's first token (segs == nullptr)
  int chunk = 0;  ///< tokens in the chunk (>= 1; 0 is a no-op) (segs == nullptr)
  const prefill_seg_t* segs = nullptr;  ///< varlen: [nseg] device array of distinct sequences
  int nseg = 1;                         ///< chunks in the launch (segs != nullptr)
  int max_chunk = 0;                    ///< largest chunk of segs (segs != nullptr)
  int tokens = 0;              ///< rows of the packed inputs, sum of chunks (segs != nullptr)
  const void* q = nullptr;     ///< [tokens, q_heads, head_dim] dtype
  const void* k = nullptr;     ///< [tokens, kv_heads, head_dim] dtype
  const void* v = nullptr;     ///< [tokens, kv_heads, head_dim] dtype
  const float* lam = nullptr;  ///< [tokens, kv_heads]
  void* out = nullptr;         ///< [tokens, q_heads, head_dim] dtype

  __host__ __device__ int segments() const { return segs ? nseg : 1; }
  __host__ __device__ int longest() const { return segs ? max_chunk : chunk; }
  __host__ __device__ int rows() const { return segs ? tokens : chunk; }
  /// Chunk z of the launch (blockIdx.z of every prefill kernel).
  __device__ __forceinline__ prefill_seg_t segment(int z) const {
    return segs ? segs[z] : prefill_seg_t{seq, start, chunk, 0};
  }
};

/// Workspace pointers carved out of the caller's workspace buffer.
struct prefill_ws_t {
  unsigned long long* keys = nullptr;  ///< [kv_heads, cap + chunk] keep-keys, cached then chunk
  int* holes = nullptr;                ///< [kv_heads, cap] evicted cached slots, ascending
  int* move_src = nullptr;             ///< [kv_heads, cap] chunk index (>= 0) or -1 - slot
  int* move_dst = nullptr;             ///< [kv_heads, cap] destination slot
  int* move_count = nullptr;           ///< [kv_heads]
  float* lognorm = nullptr;            ///< [kv_heads, chunk] (knorm only)
};

/// Bytes of workspace PrefillChunk needs for these params (host only, no sync).
size_t PrefillWorkspaceBytes(const prefill_params_t& p);

/// One prefill chunk, or one per sequence of p.segs (attention, then eviction and the
/// survivors' append) for one layer.
/// \param p          see prefill_params_t; caches and lens of the chunks' sequences are updated
/// \param dtype      storage dtype of q, k, v, the K/V caches and out
/// \param workspace  at least PrefillWorkspaceBytes(p) bytes of device memory, 256-byte aligned
/// \return cudaSuccess, cudaErrorInvalidValue for unsupported shapes, or the launch error
cudaError_t PrefillChunk(const prefill_params_t& p, DType dtype, void* workspace,
                         cudaStream_t stream);

}  // namespace trimkv
