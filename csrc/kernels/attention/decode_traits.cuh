// Compile-time shapes of the decode kernels (decode.cuh), the constants of their launch policy
// and the one layout of the decode workspace, which sizing (DecodeWorkspaceBytes) and carving
// (carve_workspace) both read.
#pragma once

#include <cstddef>

#include "common/limits.h"
#include "kernels/attention/decode.cuh"
#include "kernels/common/select_topk.cuh"
#include "kernels/common/vec_dtypes.cuh"

namespace trimkv {

namespace decode_detail {

constexpr int kThreads = limits::kDecodeCoreThreads;
constexpr int kMaxHeadDim = limits::kMaxHeadDim;
constexpr int kMinSplitTokens = 16;   ///< a split covers at least this many tokens
constexpr int kAutoSplitTokens = 64;  ///< auto choice: at least this many tokens per split
constexpr int kMaxSplits = 64;
/// Test hook of the tensor-core launch (the kernel harness's A/B runs; 0 in the library):
/// bit 0 no thread-block clusters (the arrival-counter merge), bit 1 no programmatic
/// dependent launch, bit 2 clusters at two blocks per SM too.
inline int g_launch_diag = 0;
/// Shared memory the split merge may use (every kernel variant has at least this much).
constexpr int kMergeSmemBytes = 96 * 1024;

/// Padded head dim of the kernel variant that serves head_dim (host and device).
__host__ __device__ constexpr int padded_head_dim(int d) { return limits::padded_head_dim(d); }

/// Shared bytes of the single-pass split merge for S splits of G heads (see
/// merge_splits_and_finalize): (max, sum) records, victim records, weights, partial accs.
__host__ __device__ constexpr int merge_smem_bytes(int S, int G, int dpad) {
  return S * G * 16 + S * 16 + ((S * G + 3) / 4) * 16 + S * G * dpad * 4;
}

/// Compile-time shape of the attention kernel for storage type T and padded head dim DPAD.
template <typename T, int DPAD>
struct traits {
  static constexpr int VEC = vec_size<T>::value;          // elements per 16 B
  static constexpr int NCOL = DPAD / VEC;                 // 16 B vectors per row
  static constexpr int NVEC = NCOL > 32 ? NCOL / 32 : 1;  // vectors per lane
  static constexpr int BDX = NCOL / NVEC;                 // lanes per token
  static constexpr int E = VEC * NVEC;                    // elements per lane
  static constexpr int WORKERS = kThreads / BDX;          // lane groups per block
  static_assert(WORKERS == limits::core_lane_groups(DPAD, sizeof(T)),
                "limits.h states the lane layout the support query answers from");
  static constexpr int TK = 4 * WORKERS;                              // tokens per tile
  static constexpr int STAGE_BYTES = 2 * TK * DPAD * (int)sizeof(T);  // K + V tile
  static constexpr int STAGES = 3;                                    // tiles in flight + 1
  static constexpr int PIPE_BYTES = STAGES * STAGE_BYTES;
};

template <typename T, int DPAD, int HPT>
__host__ __device__ constexpr int smem_bytes() {
  using Tr = traits<T, DPAD>;
  constexpr int merge = Tr::WORKERS * HPT * (DPAD + 2) * 4;
  return Tr::PIPE_BYTES > merge ? Tr::PIPE_BYTES : merge;
}

/// Shape of the tensor-core kernel (16-bit storage, G <= 8). 4 warps; a tile holds 64 tokens,
/// a 16-token slab per warp. K/V rows of DPAD elements sit in 16-byte chunks XOR-swizzled by
/// row (chunk c of row r at c ^ (r & 7)), so that the cp.async writes and the ldmatrix reads
/// of 8 rows hit 8 distinct bank groups. Each stage also holds the pos/lam/lognorm of its
/// tokens (B = 0 victim search), so that no load in the tile loop is synchronous.
template <int DPAD>
struct mma_traits {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int TK = 16 * kWarps;  // tokens per tile
  static constexpr int NCH = DPAD / 8;    // 16-byte chunks per row
  static constexpr int ROW_BYTES = DPAD * 2;
  static constexpr int KV_BYTES = TK * ROW_BYTES;  // K (or V) part of a stage
  static constexpr int META_BYTES = 3 * TK * 4;    // pos, lam, lognorm
  static constexpr int STAGE_BYTES = 2 * KV_BYTES + META_BYTES;
  static constexpr int kMaxStages = 8;  // most stages a launch uses
  /// Stages when two blocks share an SM (the host picks up to kMaxStages for one per SM).
  static constexpr int kSharedStages = DPAD <= 128 ? 3 : 2;
  static constexpr int WSTRIDE = DPAD + 4;  // floats a head row (no conflicts)
  /// Warp partials of the in-block merge: acc [warps][8][WSTRIDE], (max, sum) [warps][8][2].
  static constexpr int MERGE_BYTES = kWarps * 8 * WSTRIDE * 4 + kWarps * 8 * 2 * 4;
  static_assert(MERGE_BYTES <= STAGE_BYTES, "the warp merge reuses the first stage");
  /// Rank 0's receive area of a cluster merge of S splits: (max, sum) [S*G] float4, victim
  /// (key, slot) [S*warps], acc [S*G][DPAD] floats.
  static constexpr int cluster_recv_bytes(int S, int G) {
    return S * G * 16 + S * kWarps * 16 + S * G * DPAD * 4;
  }
};
constexpr int kMmaMaxGroup =
    limits::kMmaMaxGroup;              ///< query heads per KV head on the tensor-core path (N)
constexpr int kMaxClusterSplits = 16;  ///< most splits merged through a cluster (> 8: non-portable)
constexpr int kAutoClusterSplits = 8;  ///< most splits the automatic choice makes on sm_90+
/// After another layer's decode step (p.prefetch_before_wait) at two blocks per SM, splits of
/// at least this many slots merge through L2 unless a cluster has at most
/// kPairedClusterSplits blocks (launch_mma).
constexpr int kCounterChunkTokens = 128;
constexpr int kPairedClusterSplits = 2;

/// Shared scratch of the eviction epilogue.
struct fin_smem_t {
  topk::select_smem_t sel;
  unsigned long long vkey_w[kThreads / 32];
  int vslot_w[kThreads / 32];
  unsigned long long vkey;
  int vslot;
  int nh, nm;
  int last;
  float lognorm;  ///< ln(max(||k_new||, 1e-12)) (knorm)
  float lam_new;  ///< lam_new of the head, loaded at the kernel start
};

}  // namespace decode_detail

namespace decode_detail {

/// The decode workspace for `splits` splits: byte offsets of its regions, all 256-byte aligned,
/// in order (counters first, see DecodeCounterBytes), and the total. The one statement of the
/// layout: DecodeWorkspaceBytes sizes with it and carve_workspace carves with it.
struct decode_ws_layout_t {
  size_t counter = 0;  ///< int [batch, kv_heads] arrival counters
  size_t list = 0;     ///< int [batch, kv_heads, 2 * max(B, 1)] holes / movers
  size_t acc = 0;      ///< splits > 1: float [batch, kv_heads, splits, G, kMaxHeadDim]
  size_t md = 0;       ///< splits > 1: float [batch, kv_heads, splits, G, 4]
  size_t vkey = 0;     ///< splits > 1: u64 [batch, kv_heads, splits, 2]
  size_t bytes = 0;    ///< total
};

inline decode_ws_layout_t decode_ws_layout(const decode_params_t& p, int splits) {
  const size_t bhs = static_cast<size_t>(p.batch) * p.kv_heads;
  const size_t G = p.kv_heads > 0 ? static_cast<size_t>(p.q_heads / p.kv_heads) : 0;
  auto align = [](size_t x) { return (x + 255) & ~static_cast<size_t>(255); };
  decode_ws_layout_t l;
  size_t off = 0;
  l.counter = off;
  off += align(bhs * sizeof(int));
  l.list = off;
  off += align(bhs * 2 * static_cast<size_t>(p.buffer > 0 ? p.buffer : 1) * sizeof(int));
  if (splits > 1) {
    l.acc = off;
    off += align(bhs * splits * G * kMaxHeadDim * sizeof(float));
    l.md = off;
    off += align(bhs * splits * G * 4 * sizeof(float));
    l.vkey = off;
    off += align(bhs * splits * 2 * sizeof(unsigned long long));
  }
  l.bytes = off;
  return l;
}

/// Carves the workspace for `splits` splits (decode_ws_layout); all null without a workspace.
inline decode_ws_t carve_workspace(const decode_params_t& p, int splits, void* workspace) {
  decode_ws_t ws;
  if (workspace == nullptr) return ws;
  const decode_ws_layout_t l = decode_ws_layout(p, splits);
  char* base = static_cast<char*>(workspace);
  ws.counter = reinterpret_cast<int*>(base + l.counter);
  ws.list = reinterpret_cast<int*>(base + l.list);
  if (splits > 1) {
    ws.acc = reinterpret_cast<float*>(base + l.acc);
    ws.md = reinterpret_cast<float*>(base + l.md);
    ws.vkey = reinterpret_cast<unsigned long long*>(base + l.vkey);
  }
  return ws;
}

}  // namespace decode_detail

}  // namespace trimkv
