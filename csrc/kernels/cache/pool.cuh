// Eviction over pools of heads (SPEC.md section 7: scopes "layer" and "global", floor ratio,
// threshold; scope "head" with a threshold uses pools of one head), for the pooled layout of
// cache_layer.cuh.
//
// Layout. Every pool owns a region of `region` consecutive slots of the slot arrays (one set
// of arrays for all layers). Each of its heads owns a segment [head_off, head_off + head_cap)
// of that region and keeps its tokens in the segment's first lens slots. The decode and
// prefill kernels append into the free tail of a segment; PoolEvict then, per pool:
//   1. scores every token of the pool (decayed score, window, threshold drop);
//   2. keeps the best nh * M when the pool holds >= nh * (M + B) tokens (floor ratio: the
//      pool's best floor(nh * M * (1 - f)) are counted per head, plus floor(M * f), and each
//      head keeps its own best that many), ties by (score, position), then by head order;
//   3. compacts each head: survivors above the new length move into the freed slots below it
//      (only evicted slots are refilled; no survivor moves otherwise);
//   4. re-lays the segments when a head lacks `room` free slots for the appends to come,
//      giving every head its need plus an even share of the spare slots (rare: the region
//      holds a slack of spare slots per head).
// One block per pool does all of it, in order, so no step needs a host round trip.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common/limits.h"

namespace trimkv {

/// Most heads one pool may hold (the block keeps their segment table in shared memory).
constexpr int kPoolMaxHeads = limits::kPoolMaxHeads;

/// One PoolEvict launch: the pools of sequences [seq0, seq0 + nseq) that cover layers
/// [layer0, layer0 + nlayers) and heads_per_pool KV heads each. Device pointers.
struct pool_params_t {
  void* k_cache = nullptr;             ///< [slots, head_dim] dtype, every layer
  void* v_cache = nullptr;             ///< [slots, head_dim] dtype
  int32_t* pos_cache = nullptr;        ///< [slots]
  float* lam_cache = nullptr;          ///< [slots]
  float* lognorm_cache = nullptr;      ///< [slots]; knorm only
  int32_t* lens = nullptr;             ///< [layers, batch, kv_heads]
  int32_t* head_off = nullptr;         ///< [layers, batch, kv_heads] first slot of each segment
  int32_t* head_cap = nullptr;         ///< [layers, batch, kv_heads] slots of each segment
  int* overflow = nullptr;             ///< set to 1 if a pool cannot give its heads their room
  const int32_t* positions = nullptr;  ///< decode: [batch], T = pos + 1, -1 skips the sequence
  int tcount = 0;                      ///< prefill (positions == nullptr): T of the sequence
  int layers = 0, batch = 0, kv_heads = 0;
  int row_bytes = 0;            ///< head_dim * dtype size (a multiple of 16)
  int layer0 = 0, nlayers = 1;  ///< layers of each pool
  int heads_per_pool = 1;       ///< KV heads of one layer in a pool (kv_heads or 1)
  int seq0 = 0, nseq = 0;       ///< sequences of this launch
  int region = 0;               ///< slots per pool
  bool evict = true;            ///< false: only make room
  int memory = 0, buffer = 0, window = 0;
  bool knorm = false;
  bool use_floor = false;    ///< floor ratio (layer / global scopes)
  int64_t floor_pooled = 0;  ///< floor(nh * M * (1 - f))
  int floor_extra = 0;       ///< floor(M * f)
  bool thresholded = false;
  float log_tau = 0.f;  ///< ln(threshold)
  int room = 0;         ///< free slots every head of the pool needs afterwards
  int room_layer = -1;  ///< heads of this layer need room_extra instead (prefill)
  int room_extra = 0;
  int smem_keys = 0;  ///< set by PoolEvict: keys of a pool that fit in shared memory
};

/// Workspace bytes for the largest launch (pools_per_launch pools of `region` slots).
size_t PoolWorkspaceBytes(int pools_per_launch, int region);

/// Evicts (when p.evict) and makes room in every pool of the launch. Stream-ordered, no sync.
cudaError_t PoolEvict(const pool_params_t& p, void* workspace, cudaStream_t stream);

/// After the region grew from old_region to new_region slots (each pool's slots copied to the
/// start of its new region): moves every head's offset by its pool's shift.
/// region_of: pool index of head (l, b, h) = ((l / nlayers) * batch + b) * (kv_heads / hpp) + h /
/// hpp.
cudaError_t PoolRebase(int32_t* head_off, int layers, int batch, int kv_heads, int nlayers,
                       int heads_per_pool, int old_region, int new_region, cudaStream_t stream);

}  // namespace trimkv
