// Host side of the prefill chunk (validation, workspace, launch sequence) and the eviction
// kernels: per-head top-M selection over cached + chunk tokens and the survivors' append.
#include <algorithm>

#include "kernels/attention/prefill.cuh"
#include "kernels/attention/prefill_traits.cuh"
#include "kernels/cache/cache_layer.cuh"
#include "kernels/common/select_topk.cuh"

namespace trimkv {

namespace {

/// Rows of the per-head move lists: every survivor may move (fixed layout), or only the
/// appended chunk (pooled).
__host__ __device__ inline int move_rows(const prefill_params_t& p) {
  return p.pooled() ? p.longest() : p.cap;
}

/// Slot plan of one chunk for KV head blockIdx.x of sequence p.seq. Candidates are the len
/// cached tokens and the chunk's tokens; if len + chunk >= M + B the M with the largest
/// keep-keys stay (radix select, select_topk.cuh), else all. Chunk survivors (in chunk order)
/// take the slots of evicted cached tokens (ascending), then slots len, len + 1, ...; when
/// the head shrinks, cached survivors above the new length move down into the remaining
/// freed slots. pos / lam / lognorm are written here, K/V rows by PrefillWriteKernel.
/// Updates lens. grid (kv_heads, segments), block 1024; chunk blockIdx.y.
/// \param ws  per (chunk, KV head) z = blockIdx.y * kv_heads + h: keys [z][cap + longest],
///            holes [z][cap] (fixed layout), move_src / move_dst [z][move_rows], move_count [z];
///            lognorm of the chunk's keys (see PrefillLognormKernel)
__global__ void __launch_bounds__(prefill_detail::kSelectThreads)
    PrefillSelectKernel(const prefill_params_t p, prefill_ws_t ws) {
  __shared__ topk::select_smem_t sm;
  __shared__ int warp_sums[32];
  const int h = blockIdx.x, tid = threadIdx.x, nthr = blockDim.x;
  const prefill_seg_t sg = p.segment(blockIdx.y);
  const size_t z = static_cast<size_t>(blockIdx.y) * p.kv_heads + h;
  const int bh = sg.seq * p.kv_heads + h;
  const int len = p.lens[bh], C = sg.chunk, n = len + C;
  const int tcount = sg.start + C;  // T: tokens processed, this chunk included
  const size_t base = p.head_base(bh);
  const float* lam_in = p.lam + static_cast<size_t>(sg.first) * p.kv_heads;
  const float* lognorm_in =
      ws.lognorm + static_cast<size_t>(sg.first) * p.kv_heads + static_cast<size_t>(h) * C;
  int* src = ws.move_src + z * move_rows(p);
  int* dst = ws.move_dst + z * move_rows(p);
  auto write_meta = [&](int slot, int i) {
    p.pos_cache[base + slot] = sg.start + i;
    p.lam_cache[base + slot] = lam_in[static_cast<size_t>(i) * p.kv_heads + h];
    if (p.knorm) p.lognorm_cache[base + slot] = lognorm_in[i];
  };

  // Under budget, or pooled (PoolEvict runs next): append the whole chunk (n <= cap).
  if (p.pooled() || n < p.memory + p.buffer) {
    for (int i = tid; i < C; i += nthr) {
      src[i] = i;
      dst[i] = len + i;
      write_meta(len + i, i);
    }
    if (tid == 0) {
      ws.move_count[z] = C;
      p.lens[bh] = n;
    }
    return;
  }

  unsigned long long* keys = ws.keys + z * (p.cap + p.longest());
  for (int s = tid; s < n; s += nthr) {
    int pos;
    float lam, ln = 0.f;
    if (s < len) {
      pos = p.pos_cache[base + s];
      lam = p.lam_cache[base + s];
      if (p.knorm) ln = p.lognorm_cache[base + s];
    } else {
      const int i = s - len;
      pos = sg.start + i;
      lam = lam_in[static_cast<size_t>(i) * p.kv_heads + h];
      if (p.knorm) ln = lognorm_in[i];
    }
    keys[s] = topk::keep_key(cache_score(lam, pos, tcount, p.window, p.knorm, ln), pos);
  }
  __syncthreads();
  const unsigned long long thr =
      topk::block_select_kth_largest([keys](int s) { return keys[s]; }, n, p.memory, sm);

  // Counts first: the new length fixes which holes stay inside [0, new_len).
  __shared__ int cnt_evicted, cnt_kept_chunk;
  if (tid == 0) cnt_evicted = cnt_kept_chunk = 0;
  __syncthreads();
  {
    int ce = 0, ck = 0;
    for (int s = tid; s < len; s += nthr) ce += keys[s] < thr;
    for (int i = tid; i < C; i += nthr) ck += keys[len + i] >= thr;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      ce += __shfl_xor_sync(0xffffffffu, ce, o);
      ck += __shfl_xor_sync(0xffffffffu, ck, o);
    }
    if ((tid & 31) == 0) {
      atomicAdd(&cnt_evicted, ce);
      atomicAdd(&cnt_kept_chunk, ck);
    }
  }
  __syncthreads();
  const int nh = cnt_evicted, ns = cnt_kept_chunk;
  // With distinct positions exactly M keys are >= thr, so new_len = M <= cap.
  const int new_len = min(len - nh + ns, p.cap);
  // Free slots: evicted cached slots below new_len, ascending. Chunk survivors take the first
  // ns of them (then slots len, len + 1, ... when new_len > len); cached survivors sitting at
  // slots >= new_len (only when new_len < len) move into the rest, keeping slots dense.
  int* holes = ws.holes + z * p.cap;
  int nf = 0;
  const int lo = min(len, new_len);
  for (int s0 = 0; s0 < lo; s0 += nthr) {
    const int s = s0 + tid;
    const bool evicted = s < lo && keys[s] < thr;
    int total;
    const int off = topk::block_exclusive_count(evicted, warp_sums, &total);
    if (evicted) holes[nf + off] = s;
    nf += total;
  }
  __syncthreads();  // holes visible to the whole block
  int nmove = 0;
  for (int i0 = 0; i0 < C; i0 += nthr) {  // chunk survivors, in chunk order
    const int i = i0 + tid;
    const bool keep = i < C && keys[len + i] >= thr;
    int total;
    const int off = topk::block_exclusive_count(keep, warp_sums, &total);
    if (keep) {
      const int rank = nmove + off;
      const int slot = rank < nf ? holes[rank] : len + rank - nf;
      if (slot < new_len) {  // always, with distinct positions
        src[rank] = i;
        dst[rank] = slot;
        write_meta(slot, i);
      }
    }
    nmove += total;
  }
  nmove = min(nmove, max(nf, new_len - len + nf));
  for (int s0 = new_len; s0 < len; s0 += nthr) {  // cached survivors past new_len
    const int s = s0 + tid;
    const bool keep = s < len && keys[s] >= thr;
    int total;
    const int off = topk::block_exclusive_count(keep, warp_sums, &total);
    const int rank = nmove + off;
    if (keep && rank < nf) {  // always, with distinct positions
      const int slot = holes[rank];
      src[rank] = -1 - s;
      dst[rank] = slot;
      p.pos_cache[base + slot] = p.pos_cache[base + s];
      p.lam_cache[base + slot] = p.lam_cache[base + s];
      if (p.knorm) p.lognorm_cache[base + slot] = p.lognorm_cache[base + s];
    }
    nmove += total;
  }
  if (tid == 0) {
    ws.move_count[z] = min(nmove, nf + max(new_len - len, 0));
    p.lens[bh] = new_len;
  }
}

/// Copies the K/V rows of the planned moves of KV head blockIdx.y of chunk blockIdx.z: chunk
/// survivors (src >= 0, chunk index) and cached survivors moved down into freed slots (src < 0,
/// slot -1 - src). Sources and destinations never overlap (moved-from slots are >= the new
/// length, every destination is below it), so the copies run in parallel.
/// grid (ceil(move_rows / kWriteRows), kv_heads, segments), block 256. Rows are moved as raw
/// 16-byte vectors (row_bytes = head_dim * dtype size, a multiple of 16).
/// \param ws  move_src / move_dst [z][move_rows], move_count [z], z = blockIdx.z * kv_heads + h
__global__ void __launch_bounds__(prefill_detail::kWriteThreads)
    PrefillWriteKernel(const prefill_params_t p, prefill_ws_t ws, int row_bytes) {
  using prefill_detail::kWriteRows;
  const int h = blockIdx.y;
  const prefill_seg_t sg = p.segment(blockIdx.z);
  const size_t z = static_cast<size_t>(blockIdx.z) * p.kv_heads + h;
  const int count = ws.move_count[z];
  const int r0 = blockIdx.x * kWriteRows;
  if (r0 >= count) return;
  const int* src = ws.move_src + z * move_rows(p);
  const int* dst = ws.move_dst + z * move_rows(p);
  const size_t base = p.head_base(sg.seq * p.kv_heads + h);
  const int nv = row_bytes / 16;
  char* kc = static_cast<char*>(p.k_cache);
  char* vc = static_cast<char*>(p.v_cache);
  const size_t in0 = static_cast<size_t>(sg.first) * p.kv_heads * row_bytes;  // the chunk's rows
  const char* kin = static_cast<const char*>(p.k) + in0;
  const char* vin = static_cast<const char*>(p.v) + in0;
  for (int e = threadIdx.x; e < kWriteRows * nv; e += blockDim.x) {
    const int r = e / nv, c = e - (e / nv) * nv;
    const int rank = r0 + r;
    if (rank >= count) continue;
    const int from_idx = src[rank];
    const size_t to = (base + dst[rank]) * row_bytes + c * 16;
    if (from_idx >= 0) {
      const size_t from = (static_cast<size_t>(from_idx) * p.kv_heads + h) * row_bytes + c * 16;
      copy16(kc + to, kin + from);
      copy16(vc + to, vin + from);
    } else {
      const size_t from = (base + (-1 - from_idx)) * row_bytes + c * 16;
      copy16(kc + to, kc + from);
      copy16(vc + to, vc + from);
    }
  }
}

inline size_t align256(size_t x) { return (x + 255) & ~static_cast<size_t>(255); }

}  // namespace

namespace prefill_detail {

prefill_ws_t carve_workspace(const prefill_params_t& p, void* workspace, size_t* bytes) {
  // Per (chunk, KV head) lists, and the lognorms of every packed row.
  const size_t H = static_cast<size_t>(std::max(p.kv_heads, 0)) * std::max(p.segments(), 0);
  const size_t C = static_cast<size_t>(std::max(p.longest(), 0));
  const size_t cap = static_cast<size_t>(std::max(p.cap, 0));
  const size_t rows = static_cast<size_t>(std::max(move_rows(p), 0));
  const size_t tokens = static_cast<size_t>(std::max(p.rows(), 0));
  char* base = static_cast<char*>(workspace);
  size_t off = 0;
  prefill_ws_t ws;
  auto take = [&](size_t n) {
    char* ptr = base ? base + off : nullptr;
    off += align256(n);
    return ptr;
  };
  if (!p.pooled()) {  // the selection's keys and holes; pooled chunks only append
    ws.keys = reinterpret_cast<unsigned long long*>(take(H * (cap + C) * 8));
    ws.holes = reinterpret_cast<int*>(take(H * cap * 4));
  }
  ws.move_src = reinterpret_cast<int*>(take(H * rows * 4));
  ws.move_dst = reinterpret_cast<int*>(take(H * rows * 4));
  ws.move_count = reinterpret_cast<int*>(take(H * 4));
  if (p.knorm) ws.lognorm = reinterpret_cast<float*>(take(tokens * p.kv_heads * 4));
  if (bytes) *bytes = off;
  return ws;
}

}  // namespace prefill_detail

size_t PrefillWorkspaceBytes(const prefill_params_t& p) {
  size_t bytes = 0;
  prefill_detail::carve_workspace(p, nullptr, &bytes);
  return bytes;
}

cudaError_t PrefillChunk(const prefill_params_t& p, DType dtype, void* workspace,
                         cudaStream_t stream) {
  using namespace prefill_detail;
  if (p.batch <= 0 || p.kv_heads <= 0 || p.q_heads <= 0 || p.q_heads % p.kv_heads != 0 ||
      (p.segs == nullptr && (p.seq < 0 || p.seq >= p.batch || p.start < 0 || p.chunk < 0)) ||
      (p.segs != nullptr &&
       (p.nseg < 1 || p.nseg > p.batch || p.max_chunk < 1 || p.tokens < p.max_chunk)) ||
      p.memory < 1 || p.buffer < 0 || p.window < 0 || p.cap < p.memory + p.buffer ||
      !limits::head_dim_supported(p.head_dim) || (p.knorm && p.lognorm_cache == nullptr))
    return cudaErrorInvalidValue;
  if (p.longest() == 0) return cudaSuccess;
  if (workspace == nullptr) return cudaErrorInvalidValue;
  const prefill_ws_t ws = carve_workspace(p, workspace, nullptr);
  cudaError_t e = cudaErrorInvalidValue;  // Unsupported dtype
  switch (dtype) {
    case DType::kF32:
      e = prefill_attention_typed<float>(p, ws.lognorm, stream);
      break;
    case DType::kF16:
      e = prefill_attention_typed<__half>(p, ws.lognorm, stream);
      break;
    case DType::kBF16:
      e = prefill_attention_typed<__nv_bfloat16>(p, ws.lognorm, stream);
      break;
  }
  if (e != cudaSuccess) return e;
  PrefillSelectKernel<<<dim3(p.kv_heads, p.segments()), kSelectThreads, 0, stream>>>(p, ws);
  e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  const dim3 grid((move_rows(p) + kWriteRows - 1) / kWriteRows, p.kv_heads, p.segments());
  PrefillWriteKernel<<<grid, kWriteThreads, 0, stream>>>(
      p, ws, p.head_dim * static_cast<int>(dtype_size(dtype)));
  return cudaGetLastError();
}

}  // namespace trimkv
