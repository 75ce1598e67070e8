// One layer of the bounded KV cache as the kernels see it: the slot arrays, where each head's
// slots start, and the cache's shape and rules. decode_params_t and prefill_params_t extend it.
//
// Two layouts share these fields:
//   fixed   (head_off == nullptr): head bh owns slots [bh * cap, bh * cap + cap); the decode
//           and prefill kernels evict in place (scope "head" without a threshold).
//   pooled  (head_off != nullptr): head bh owns a segment starting at slot head_off[bh] of a
//           pool shared with other heads (scopes "layer" and "global", or a threshold); the
//           kernels only append, and the pool kernels (pool.cuh) evict and re-lay segments.
// Either way a head's tokens sit in slots 0 .. lens[bh] - 1 of its segment, in no order.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace trimkv {

struct cache_layer_t {
  void* k_cache = nullptr;            ///< [slots, head_dim] dtype
  void* v_cache = nullptr;            ///< [slots, head_dim] dtype
  int32_t* pos_cache = nullptr;       ///< [slots] absolute positions
  float* lam_cache = nullptr;         ///< [slots] log-retention
  float* lognorm_cache = nullptr;     ///< [slots] ln(max(|k|,1e-12)); knorm only
  int32_t* lens = nullptr;            ///< [batch, kv_heads] valid slots 0..len-1 of each head
  const int32_t* head_off = nullptr;  ///< [batch, kv_heads] first slot of each head; pooled only
  int batch = 0;
  int q_heads = 0;
  int kv_heads = 0;
  int head_dim = 0;    ///< multiple of 8, <= 256 (64/128/256 fast paths)
  int memory = 0;      ///< M >= 1
  int buffer = 0;      ///< B >= 0
  int cap = 0;         ///< fixed: slots per head (>= M + B); pooled: most a head holds
  int window = 0;      ///< W >= 0: pos >= T - W is never evicted
  bool knorm = false;  ///< strategy knorm_alpha
  float scale = 0.f;   ///< softmax scale (1/sqrt(head_dim) usually)

  __host__ __device__ bool pooled() const { return head_off != nullptr; }

  /// First slot of head bh (= b * kv_heads + h).
  __device__ __forceinline__ size_t head_base(int bh) const {
    return head_off ? static_cast<size_t>(head_off[bh]) : static_cast<size_t>(bh) * cap;
  }
};

/// Decayed score of SPEC section 4 with the sliding-window rule (+inf: always kept).
/// __fmul_rn / __fadd_rn stop the compiler from contracting lam * age + lognorm into one FMA,
/// so the bits equal decayed_score() on the host: ties and the retained set depend on them.
/// Adding +0 also folds a -0 score onto +0.
__device__ __forceinline__ float cache_score(float lam, int pos, int tcount, int window, bool knorm,
                                             float lognorm) {
  if (pos >= tcount - window) return __int_as_float(0x7f800000);
  const float s = __fmul_rn(lam, static_cast<float>(tcount + 1 - pos));  // age from T + 1
  return __fadd_rn(s, knorm ? lognorm : 0.f);
}

}  // namespace trimkv
