// Pool eviction and segment re-layout: see pool.cuh.
#include <algorithm>
#include <climits>

#include "kernels/cache/pool.cuh"
#include "kernels/common/select_topk.cuh"
#include "kernels/common/vec_dtypes.cuh"

namespace trimkv {

namespace {

constexpr int kPoolThreads = 1024;  // one thread per head of the segment table

__host__ __device__ inline size_t align256(size_t x) {
  return (x + 255) & ~static_cast<size_t>(255);
}

/// Per-pool scratch in global memory: keep-keys of the pool's tokens (0 = evicted or dropped),
/// then the compaction's freed slots and the survivors that move into them.
struct pool_ws_t {
  unsigned long long* keys;
  int* holes;
  int* movers;
};

__device__ pool_ws_t pool_ws(void* workspace, int pools, int region) {
  char* base = static_cast<char*>(workspace);
  const size_t n = static_cast<size_t>(pools) * region;
  const size_t keys_bytes = align256(n * sizeof(unsigned long long));
  const size_t list_bytes = align256(n * sizeof(int));
  const size_t at = static_cast<size_t>(blockIdx.x) * region;
  pool_ws_t ws;
  ws.keys = reinterpret_cast<unsigned long long*>(base) + at;
  ws.holes = reinterpret_cast<int*>(base + keys_bytes) + at;
  ws.movers = reinterpret_cast<int*>(base + keys_bytes + list_bytes) + at;
  return ws;
}

/// The pool's segment table (head j of the pool = layer layer0 + j / hpp, KV head
/// hp * hpp + j % hpp) and the block's scratch.
struct pool_smem_t {
  int len[kPoolMaxHeads];    ///< tokens of each head
  int off[kPoolMaxHeads];    ///< first slot of each segment
  int cap[kPoolMaxHeads];    ///< slots of each segment
  int start[kPoolMaxHeads];  ///< first candidate index of each head (exclusive sum of len)
  int count[kPoolMaxHeads];  ///< survivors per head (scratch)
  topk::select_smem_t sel;
  int warp_sums[32];
};

/// Head of candidate i: the last head whose first candidate index is <= i (empty heads share
/// their successor's start, so the last one is the non-empty head that holds i).
__device__ __forceinline__ int head_of(const pool_smem_t& s, int nh, int i) {
  int lo = 0, hi = nh - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (s.start[mid] <= i)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

/// Adds 1 to s.count[head of candidate i] for every thread whose flag is set: one shared atomic
/// per head per warp (a warp's candidates mostly share a head). Every lane must call it.
__device__ __forceinline__ void count_by_head(pool_smem_t& s, int nh, int i, bool flag) {
  const int j = flag ? head_of(s, nh, i) : -1;
  const unsigned peers = __match_any_sync(0xffffffffu, j);
  if (flag && (threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&s.count[j], __popc(peers));
}

/// Calls on_keep(i, valid, keep) from every thread of the block for i in lo + [0, a multiple of
/// the block size), valid for i < lo + n, with keep true for the k best live keys (key != 0): keys
/// above the k-th largest, then keys equal to it in index order (head order breaks full ties, as on
/// the CPU). Every live key is kept when there are at most k. Every thread calls it with the same
/// arguments.
template <typename F>
__device__ void for_top(const unsigned long long* keys, int lo, int n, int64_t k, F on_keep,
                        pool_smem_t& s) {
  if (n <= 0) return;
  const int tid = threadIdx.x, nthr = blockDim.x;
  unsigned long long thr = 1;  // keep every live key (live keys are far above 1)
  int need = INT_MAX;
  if (k <= 0) {
    thr = ~0ull;
    need = 0;
  } else if (k < n) {
    thr = topk::block_select_kth_largest([&](int i) { return keys[lo + i]; }, n,
                                         static_cast<int>(k), s.sel);
    if (thr == 0) {
      thr = 1;  // fewer than k live keys: all stay
    } else {
      int gt = 0;
      for (int i = tid; i < n; i += nthr) gt += keys[lo + i] > thr;
      int total;
      topk::block_exclusive_sum(gt, s.warp_sums, &total);
      need = static_cast<int>(k) - total;
    }
  }
  int eq_seen = 0;
  for (int i0 = 0; i0 < n; i0 += nthr) {
    const int i = i0 + tid;
    const unsigned long long key = i < n ? keys[lo + i] : 0ull;
    const bool eq = i < n && key == thr;
    int eq_total;
    const int r = topk::block_exclusive_count(eq, s.warp_sums, &eq_total);
    on_keep(lo + i, i < n, i < n && (key > thr || (eq && eq_seen + r < need)));  // every lane
    eq_seen += eq_total;
  }
  __syncthreads();
}

/// Moves n rows (K, V and metadata) from slot src to slot dst of the same arrays, overlapping
/// or not (memmove): tiles are read whole into registers before any is written, in the order
/// that never overwrites an unread row. Whole block.
__device__ void move_rows(const pool_params_t& p, size_t src, size_t dst, int n) {
  if (n <= 0 || src == dst) return;
  const int tid = threadIdx.x;
  const int nv = p.row_bytes / 16;
  const int rows_per_tile = max(1, static_cast<int>(blockDim.x) / nv);
  const int ntiles = (n + rows_per_tile - 1) / rows_per_tile;
  char* kc = static_cast<char*>(p.k_cache);
  char* vc = static_cast<char*>(p.v_cache);
  for (int t = 0; t < ntiles; ++t) {
    const int tile = dst < src ? t : ntiles - 1 - t;
    const int r0 = tile * rows_per_tile;
    const int rows = min(rows_per_tile, n - r0);
    const int row = tid / nv, c = tid - (tid / nv) * nv;
    const bool vec = row < rows;
    const bool meta = tid < rows;
    uint4 kx = {}, vx = {};
    int pos = 0;
    float lam = 0.f, ln = 0.f;
    if (vec) {
      const size_t from = (src + r0 + row) * p.row_bytes + c * 16;
      kx = *reinterpret_cast<const uint4*>(kc + from);
      vx = *reinterpret_cast<const uint4*>(vc + from);
    }
    if (meta) {
      pos = p.pos_cache[src + r0 + tid];
      lam = p.lam_cache[src + r0 + tid];
      if (p.knorm) ln = p.lognorm_cache[src + r0 + tid];
    }
    __syncthreads();
    if (vec) {
      const size_t to = (dst + r0 + row) * p.row_bytes + c * 16;
      *reinterpret_cast<uint4*>(kc + to) = kx;
      *reinterpret_cast<uint4*>(vc + to) = vx;
    }
    if (meta) {
      p.pos_cache[dst + r0 + tid] = pos;
      p.lam_cache[dst + r0 + tid] = lam;
      if (p.knorm) p.lognorm_cache[dst + r0 + tid] = ln;
    }
    __syncthreads();
  }
}

/// Scores, selects and compacts one pool (steps 1-3 of pool.cuh). Updates s.len and lens.
__device__ void evict_pool(const pool_params_t& p, int nh, int total, int tcount,
                           const int* head_idx, pool_smem_t& s, const pool_ws_t& ws) {
  const int tid = threadIdx.x, nthr = blockDim.x;
  unsigned long long* keys = ws.keys;
  // 1. Keep-keys; 0 marks a token dropped by the threshold. The loads of kBatch candidates per
  // thread go out together: one memory round trip per batch, not per token.
  constexpr int kBatch = 8;
  int live = 0;
  for (int i0 = 0; i0 < total; i0 += kBatch * nthr) {
    int pos[kBatch];
    float lam[kBatch], ln[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int i = i0 + u * nthr + tid;
      if (i < total) {
        const int j = head_of(s, nh, i);
        const size_t slot = static_cast<size_t>(s.off[j]) + (i - s.start[j]);
        pos[u] = p.pos_cache[slot];
        lam[u] = p.lam_cache[slot];
        ln[u] = p.knorm ? p.lognorm_cache[slot] : 0.f;
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int i = i0 + u * nthr + tid;
      if (i >= total) continue;
      const bool in_window = pos[u] >= tcount - p.window;
      // The bits of decayed_score() on the host: no contraction into an FMA.
      float sc = __fadd_rn(__fmul_rn(lam[u], static_cast<float>(tcount + 1 - pos[u])), ln[u]);
      const bool drop = !in_window && p.thresholded && !(sc >= p.log_tau);
      if (in_window) sc = __int_as_float(0x7f800000);
      if (sc != sc) sc = __int_as_float(0xff800000);  // NaN ranks as -inf, as on the CPU
      keys[i] = drop ? 0ull : topk::keep_key(sc, pos[u]);
      live += !drop;
    }
  }
  int nlive;
  topk::block_exclusive_sum(live, s.warp_sums, &nlive);  // also publishes keys to the block
  // 2. The budget.
  if (nlive >= static_cast<int64_t>(nh) * (p.memory + p.buffer)) {
    const int64_t budget = static_cast<int64_t>(nh) * p.memory;
    auto zero_evicted = [&](int i, bool valid, bool keep) {
      if (valid && !keep) keys[i] = 0ull;
    };
    if (!p.use_floor) {
      for_top(keys, 0, total, budget, zero_evicted, s);
    } else {
      if (tid < nh) s.count[tid] = p.floor_extra;
      __syncthreads();
      for_top(
          keys, 0, total, p.floor_pooled,
          [&](int i, bool, bool keep) { count_by_head(s, nh, i, keep); }, s);
      for (int j = 0; j < nh; ++j) for_top(keys, s.start[j], s.len[j], s.count[j], zero_evicted, s);
    }
  }
  // 3. Compaction: new length = survivors; survivors at or above it fill the freed slots
  // below it, pairing the k-th freed slot with the k-th such survivor (both in (head, slot)
  // order, and each head has as many of one as of the other).
  if (tid < nh) s.count[tid] = 0;
  __syncthreads();
  for (int i0 = 0; i0 < total; i0 += nthr) {
    const int i = i0 + tid;
    count_by_head(s, nh, i, i < total && keys[i] != 0ull);
  }
  __syncthreads();
  int nholes = 0, nmovers = 0;
  for (int i0 = 0; i0 < total; i0 += nthr) {
    const int i = i0 + tid;
    bool hole = false, mover = false;
    int slot = 0;
    if (i < total) {
      const int j = head_of(s, nh, i);
      const int local = i - s.start[j];
      const bool keep = keys[i] != 0ull;
      hole = !keep && local < s.count[j];
      mover = keep && local >= s.count[j];
      slot = s.off[j] + local;
    }
    int t1, t2;
    const int r1 = topk::block_exclusive_count(hole, s.warp_sums, &t1);
    if (hole) ws.holes[nholes + r1] = slot;
    const int r2 = topk::block_exclusive_count(mover, s.warp_sums, &t2);
    if (mover) ws.movers[nmovers + r2] = slot;
    nholes += t1;
    nmovers += t2;
  }
  __syncthreads();
  const int npairs = min(nholes, nmovers);  // equal
  for (int k = tid; k < npairs; k += nthr) {
    const int from = ws.movers[k], to = ws.holes[k];
    p.pos_cache[to] = p.pos_cache[from];
    p.lam_cache[to] = p.lam_cache[from];
    if (p.knorm) p.lognorm_cache[to] = p.lognorm_cache[from];
  }
  const int nv = p.row_bytes / 16;
  char* kc = static_cast<char*>(p.k_cache);
  char* vc = static_cast<char*>(p.v_cache);
  for (int e = tid; e < npairs * nv; e += nthr) {
    const int k = e / nv, c = e - (e / nv) * nv;
    const size_t from = static_cast<size_t>(ws.movers[k]) * p.row_bytes + c * 16;
    const size_t to = static_cast<size_t>(ws.holes[k]) * p.row_bytes + c * 16;
    copy16(kc + to, kc + from);
    copy16(vc + to, vc + from);
  }
  if (tid < nh) {
    s.len[tid] = s.count[tid];
    p.lens[head_idx[tid]] = s.count[tid];
  }
  __syncthreads();
}

/// Step 4 of pool.cuh: re-lays the segments when a head lacks its room.
__device__ void make_room(const pool_params_t& p, int nh, size_t region_base, const int* head_idx,
                          pool_smem_t& s) {
  const int tid = threadIdx.x;
  int need = 0;
  bool lacking = false;
  if (tid < nh) {
    const int l = p.layer0 + tid / p.heads_per_pool;
    const int room = l == p.room_layer ? p.room_extra : p.room;
    need = s.len[tid] + room;
    lacking = s.cap[tid] - s.len[tid] < room;
  }
  if (!__syncthreads_or(lacking)) return;
  int total_need;
  topk::block_exclusive_sum(need, s.warp_sums, &total_need);
  if (total_need > p.region) {  // the host sizes regions so that this cannot happen
    if (tid == 0) *p.overflow = 1;
    return;
  }
  const int spare = p.region - total_need;
  int cap = 0;
  if (tid < nh) cap = need + spare / nh + (tid < spare % nh ? 1 : 0);
  int unused;
  const int off =
      static_cast<int>(region_base) + topk::block_exclusive_sum(cap, s.warp_sums, &unused);
  // New offsets in s.start, new caps in s.count (both free now).
  if (tid < nh) {
    s.start[tid] = off;
    s.count[tid] = cap;
  }
  __syncthreads();
  // Segments keep their order. Moving the left-bound ones first, lowest first, then the
  // right-bound ones, highest first, never overwrites rows that have not moved yet.
  for (int j = 0; j < nh; ++j)
    if (s.start[j] < s.off[j]) move_rows(p, s.off[j], s.start[j], s.len[j]);
  for (int j = nh - 1; j >= 0; --j)
    if (s.start[j] > s.off[j]) move_rows(p, s.off[j], s.start[j], s.len[j]);
  if (tid < nh) {
    p.head_off[head_idx[tid]] = s.start[tid];
    p.head_cap[head_idx[tid]] = s.count[tid];
  }
}

/// grid (nseq * kv_heads / heads_per_pool), block kPoolThreads. See pool.cuh.
__global__ void __launch_bounds__(kPoolThreads)
    PoolEvictKernel(const pool_params_t p, void* workspace) {
  __shared__ pool_smem_t s;
  __shared__ int head_idx[kPoolMaxHeads];
  const int tid = threadIdx.x;
  const int pools_per_seq = p.kv_heads / p.heads_per_pool;
  const int b = p.seq0 + blockIdx.x / pools_per_seq;
  const int hp = blockIdx.x % pools_per_seq;
  int tcount = p.tcount;
  if (p.positions != nullptr) {
    const int pos = p.positions[b];
    if (pos < 0) return;  // inactive: nothing appended, nothing to evict
    tcount = pos + 1;
  }
  const int nh = p.nlayers * p.heads_per_pool;
  const size_t region_base =
      (static_cast<size_t>((p.layer0 / p.nlayers) * p.batch + b) * pools_per_seq + hp) * p.region;
  int len = 0;
  if (tid < nh) {
    const int l = p.layer0 + tid / p.heads_per_pool;
    const int h = hp * p.heads_per_pool + tid % p.heads_per_pool;
    const int idx = (l * p.batch + b) * p.kv_heads + h;
    head_idx[tid] = idx;
    len = p.lens[idx];
    s.len[tid] = len;
    s.off[tid] = p.head_off[idx];
    s.cap[tid] = p.head_cap[idx];
  }
  int total;
  const int first = topk::block_exclusive_sum(len, s.warp_sums, &total);
  if (tid < nh) s.start[tid] = first;
  __syncthreads();
  // Under budget and no threshold: nothing can go (the usual B > 0 step), so the tokens are
  // not even scored.
  const bool may_evict = p.thresholded || total >= static_cast<int64_t>(nh) * (p.memory + p.buffer);
  if (p.evict && total > 0 && may_evict) {
    pool_ws_t ws = pool_ws(workspace, gridDim.x, p.region);
    extern __shared__ unsigned long long smem_keys[];
    if (total <= p.smem_keys) ws.keys = smem_keys;  // the selection's passes read shared memory
    evict_pool(p, nh, total, tcount, head_idx, s, ws);
  }
  make_room(p, nh, region_base, head_idx, s);
}

__global__ void PoolRebaseKernel(int32_t* head_off, int n, int batch, int kv_heads, int nlayers,
                                 int heads_per_pool, int old_region, int new_region) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int h = i % kv_heads, b = (i / kv_heads) % batch, l = i / (kv_heads * batch);
  const int64_t pool =
      (static_cast<int64_t>(l / nlayers) * batch + b) * (kv_heads / heads_per_pool) +
      h / heads_per_pool;
  head_off[i] = static_cast<int32_t>(head_off[i] + pool * (new_region - old_region));
}

}  // namespace

size_t PoolWorkspaceBytes(int pools_per_launch, int region) {
  const size_t n = static_cast<size_t>(pools_per_launch) * region;
  return align256(n * sizeof(unsigned long long)) + 2 * align256(n * sizeof(int));
}

cudaError_t PoolEvict(const pool_params_t& p, void* workspace, cudaStream_t stream) {
  if (p.kv_heads <= 0 || p.heads_per_pool <= 0 || p.kv_heads % p.heads_per_pool != 0 ||
      p.nlayers <= 0 || p.nlayers * p.heads_per_pool > kPoolMaxHeads || p.nseq <= 0 ||
      p.region <= 0 || p.row_bytes % 16 != 0 || workspace == nullptr ||
      (p.knorm && p.lognorm_cache == nullptr))
    return cudaErrorInvalidValue;
  // Keys in shared memory when a whole region's fit (a layer pool of 8 heads up to M + B of
  // about 3,000); otherwise they stay in the workspace.
  static int smem_cap = -1;  // bytes of dynamic shared memory the kernel may use, per process
  if (smem_cap < 0) {
    int dev = 0, optin = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e == cudaSuccess)
      e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (e != cudaSuccess) return e;
    const int cap = optin - static_cast<int>(sizeof(pool_smem_t)) - kPoolMaxHeads * 4 - 1024;
    e = cap > 0 ? cudaFuncSetAttribute(PoolEvictKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       cap)
                : cudaSuccess;
    if (e != cudaSuccess) return e;
    smem_cap = cap > 0 ? cap : 0;
  }
  pool_params_t q = p;
  q.smem_keys = static_cast<int>(std::min<size_t>(static_cast<size_t>(p.region), smem_cap / 8));
  const int pools = p.nseq * (p.kv_heads / p.heads_per_pool);
  PoolEvictKernel<<<pools, kPoolThreads, static_cast<size_t>(q.smem_keys) * 8, stream>>>(q,
                                                                                         workspace);
  return cudaGetLastError();
}

cudaError_t PoolRebase(int32_t* head_off, int layers, int batch, int kv_heads, int nlayers,
                       int heads_per_pool, int old_region, int new_region, cudaStream_t stream) {
  const int n = layers * batch * kv_heads;
  PoolRebaseKernel<<<(n + 255) / 256, 256, 0, stream>>>(head_off, n, batch, kv_heads, nlayers,
                                                        heads_per_pool, old_region, new_region);
  return cudaGetLastError();
}

}  // namespace trimkv
