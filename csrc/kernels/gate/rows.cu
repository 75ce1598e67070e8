// The whole gate for few tokens in one kernel, GateRowsKernel (each block owns whole hidden
// rows, one cross-block reduction), and its launcher.
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "kernels/gate/gate_common.cuh"
#include "kernels/gate/plan.h"

namespace trimkv {

/// Kernel arguments of GateRowsKernel. Shared memory (bytes, dynamic): ext_bytes of floats
/// (per-warp sums [warps, 64], activations [8, 4], W2 columns [kv_heads, 4], b1 [4],
/// bias [kv_heads]), then the block's weight rows [kMats * rows, pitch_w], then x [n, pitch_x].
template <typename TX, typename TW>
struct rows_args_t {
  const TX* x;        ///< [n, in_dim]
  const TW* wa;       ///< [inter, in_dim]: W1 or W_gate
  const TW* wb;       ///< [inter, in_dim]: W_up (GLU) or null
  const TW* b1;       ///< [inter] or null (MLP)
  const TW* w2;       ///< [kv_heads, inter]: W2 or W_down
  const TW* bias;     ///< [kv_heads] or null
  float* lam;         ///< [n, kv_heads]
  float* zp;          ///< z partials [blocks, n, kv_heads] (workspace data)
  unsigned* counter;  ///< one arrival counter (workspace front): zero on entry and on exit
  int n, in_dim, inter, kv_heads, rows, act;
  int pitch_w, pitch_x, ext_bytes;  ///< shared memory layout (bytes), see above
  int diag;                         ///< harness timing diagnostics (kDiag*), 0 in every real call
};

/// Entry i of the rows kernel's float area past the per-warp sums and activations: W2 columns
/// [kv_heads, kRowsMax], b1 [kRowsMax], bias [kv_heads]; 0 past the matrix or where null.
/// Returned unconverted, so that a load issued before griddepcontrol.wait is consumed after it.
template <typename TX, typename TW>
__device__ __forceinline__ TW rows_ext_raw(const rows_args_t<TX, TW>& p, int row0, int i) {
  const int nw2 = p.kv_heads * kRowsMax;
  if (i < nw2) {
    const int h = i / kRowsMax, r = i % kRowsMax;
    if (r < p.rows && row0 + r < p.inter) return p.w2[static_cast<size_t>(h) * p.inter + row0 + r];
  } else if (i < nw2 + kRowsMax) {
    const int r = i - nw2;
    if (p.b1 != nullptr && r < p.rows && row0 + r < p.inter) return p.b1[row0 + r];
  } else if (p.bias != nullptr) {
    return p.bias[i - nw2 - kRowsMax];
  }
  return TW(0.f);
}

/// Sums v over the 32 lanes of a warp, scattering the result: afterwards v[j] of lane l holds
/// the warp's sum of original entry l * (V / 32) + j. 31 V / 32 shuffles instead of 5 V; the
/// order of the additions is fixed (deterministic).
template <int HALF, int V>
__device__ __forceinline__ void reduce_scatter_step(float (&v)[V], int lane, int off) {
  const bool up = (lane & off) != 0;  // this lane keeps the upper half
#pragma unroll
  for (int i = 0; i < HALF; ++i) {
    const float send = up ? v[i] : v[i + HALF];
    const float keep = up ? v[i + HALF] : v[i];
    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, off);
  }
}
template <int V>
__device__ __forceinline__ void warp_reduce_scatter(float (&v)[V], int lane) {
  static_assert(V >= 32 && V % 32 == 0, "V");
  // One step per lane bit, the halves compile-time so that v stays in registers.
  reduce_scatter_step<V / 2>(v, lane, 16);
  reduce_scatter_step<V / 4>(v, lane, 8);
  reduce_scatter_step<V / 8>(v, lane, 4);
  reduce_scatter_step<V / 16>(v, lane, 2);
  reduce_scatter_step<V / 32>(v, lane, 1);
}

/// The whole gate for few tokens (n <= kRowsTokens), one kernel, one cross-block reduction.
/// Block b owns hidden rows [b R, b R + R) (R = p.rows <= kRowsMax; GLU: those rows of W_gate
/// and of W_up) over the whole of in_dim, so it computes its activations h [n, R] completely
/// and writes its z partial zp[b, t, h] = W2[h, rows] . h[t, rows]; the last block to arrive at
/// the counter sums the partials in block order, adds the bias and writes
/// lam [n, kv_heads] = logsigmoid(z).
/// A programmatic dependent launch on sm_90+: it lets the next kernel launch first thing, then
/// requests its weight rows (cp.async into shared memory) and its W2 columns / b1 / bias before
/// griddepcontrol.wait (weights are immutable after upload); x and the workspace only after.
/// The product: x and the weights both fp16 or both bf16 on sm_80+: m16n8k16 mma with the
/// tokens as the rows of A (8 of 16 live) and the block's rows as the 8 columns of B (MLP: 4
/// live), each lane's k slots mapped to 8 consecutive elements of x and of W (the same
/// permutation of k on both sides, so the products are unchanged); warps split in_dim in
/// 32-element steps. Else FMA: each thread takes 8-element chunks of in_dim for every row and
/// token. Either way fp32 accumulation, the per-warp and per-block sums in a fixed order.
/// grid ceil(inter / R), block THREADS; rows >= inter and tokens >= n contribute zero.
template <typename TX, typename TW, bool GLU, int THREADS = kRowsThreads>
__global__ void __launch_bounds__(THREADS, 2) GateRowsKernel(const rows_args_t<TX, TW> p) {
  constexpr int kMats = GLU ? 2 : 1;
  constexpr int kWarps = THREADS / 32;
  static_assert(kWarps <= kRowsMaxWarps, "threads");
  pdl_launch_dependents();
  extern __shared__ __align__(16) uint8_t smem_raw[];
  __shared__ int last_flag;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int R = p.rows, row0 = blockIdx.x * R, H = p.kv_heads;
  float* red = reinterpret_cast<float*>(smem_raw);  // [kWarps, 8 tokens x 8 columns]
  float* hs = red + kWarps * 64;                    // [8 tokens, kRowsMax]
  float* ext = hs + kRowsTokens * kRowsMax;         // rows_ext_raw's entries, as float
  const float* w2s = ext;
  const float* b1s = ext + H * kRowsMax;
  const float* bias_s = b1s + kRowsMax;
  uint8_t* w_s = smem_raw + p.ext_bytes;
  uint8_t* x_s = w_s + kMats * R * p.pitch_w;

  // Weights only before the wait: rows >= inter are zero-filled.
  const int wchunks = p.in_dim * static_cast<int>(sizeof(TW)) / 16;
  const bool early = !(p.diag & kDiagLateWeights);
  for (int i = tid; early && i < kMats * R * wchunks; i += THREADS) {
    const int rr = i / wchunks, c = i % wchunks, r = row0 + rr % R;
    const bool ok = r < p.inter;
    const TW* w = (GLU && rr >= R) ? p.wb : p.wa;
    const uint8_t* src = reinterpret_cast<const uint8_t*>(w) +
                         (ok ? (static_cast<size_t>(r) * p.in_dim * sizeof(TW) + c * 16) : 0);
    cp_async16(w_s + rr * p.pitch_w + c * 16, src, ok);
  }
  cp_async_commit();
  const int n_ext = H * kRowsMax + kRowsMax + H;
  const TW raw = tid < n_ext ? rows_ext_raw(p, row0, tid) : TW(0.f);
  pdl_wait();
  for (int i = tid; !early && i < kMats * R * wchunks; i += THREADS) {
    const int rr = i / wchunks, c = i % wchunks, r = row0 + rr % R;
    const bool ok = r < p.inter;
    const TW* w = (GLU && rr >= R) ? p.wb : p.wa;
    const uint8_t* src = reinterpret_cast<const uint8_t*>(w) +
                         (ok ? (static_cast<size_t>(r) * p.in_dim * sizeof(TW) + c * 16) : 0);
    cp_async16(w_s + rr * p.pitch_w + c * 16, src, ok);
  }
  const int xchunks = p.in_dim * static_cast<int>(sizeof(TX)) / 16;
  const int xoff = (p.diag & kDiagStaggerX) ? blockIdx.x * 8 : 0;
  for (int i = tid; !(p.diag & kDiagNoX) && i < p.n * xchunks; i += THREADS) {
    const int t = i / xchunks, c = (i % xchunks + xoff) % xchunks;
    cp_async16(x_s + t * p.pitch_x + c * 16,
               reinterpret_cast<const uint8_t*>(p.x + static_cast<size_t>(t) * p.in_dim) + c * 16,
               true);
  }
  cp_async_commit();
  if (tid < n_ext) ext[tid] = to_f32(raw);
  for (int i = tid + THREADS; i < n_ext; i += THREADS) ext[i] = to_f32(rows_ext_raw(p, row0, i));
  cp_async_wait<0>();
  __syncthreads();

  // red[warp, t * 8 + m * 4 + r]: the warp's share of u for token t, row r of matrix m.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<TX, TW> && !std::is_same_v<TW, float>) {
    const int g = lane >> 2, q = lane & 3;
    const int cm = g / kRowsMax, cr = g % kRowsMax;  // lane's column of B: row cr of matrix cm
    const bool xok = g < p.n, wok = cm < kMats && cr < R;
    const uint8_t* xrow = x_s + g * p.pitch_x;
    const uint8_t* wrow = w_s + (cm * R + cr) * p.pitch_w;
    float acc[4][4];
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[a][e] = 0.f;
    const int steps = (p.in_dim + 31) / 32;
    auto step = [&](int s, float(&d0)[4], float(&d1)[4]) {
      const int k = s * 32 + q * 8;
      const bool kok = k < p.in_dim;
      const uint4 xa =
          (xok && kok) ? *reinterpret_cast<const uint4*>(xrow + k * 2) : make_uint4(0, 0, 0, 0);
      const uint4 wa =
          (wok && kok) ? *reinterpret_cast<const uint4*>(wrow + k * 2) : make_uint4(0, 0, 0, 0);
      const uint32_t a0[4] = {xa.x, 0u, xa.y, 0u};
      const uint32_t a1[4] = {xa.z, 0u, xa.w, 0u};
      mma::mma_16816<TW>(d0, a0, wa.x, wa.y);
      mma::mma_16816<TW>(d1, a1, wa.z, wa.w);
    };
    // Two accumulator pairs, alternating by step: shorter dependent mma chains.
    for (int s = warp; s < steps; s += 2 * kWarps) {
      step(s, acc[0], acc[1]);
      if (s + kWarps < steps) step(s + kWarps, acc[2], acc[3]);
    }
    // d0 / d1: token g, columns 2q and 2q + 1 (rows g + 8 of A are zero).
#pragma unroll
    for (int e = 0; e < 2; ++e)
      red[warp * 64 + g * 8 + 2 * q + e] = ((acc[0][e] + acc[1][e]) + acc[2][e]) + acc[3][e];
  } else
#endif
  {
    constexpr int V = kMats * 32;  // v[m * 32 + t * 4 + r]
    float v[V];
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] = 0.f;
    const int chunks = p.in_dim / 8;
    for (int c = tid; c < chunks; c += THREADS) {
#pragma unroll
      for (int m = 0; m < kMats; ++m) {
        float w[kRowsMax][8];
#pragma unroll
        for (int r = 0; r < kRowsMax; ++r) {
          if (r < R) {
            load8<TW>(reinterpret_cast<const TW*>(w_s + (m * R + r) * p.pitch_w) + c * 8, w[r]);
          } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) w[r][e] = 0.f;
          }
        }
#pragma unroll
        for (int t = 0; t < kRowsTokens; ++t) {
          if (t < p.n) {
            float xv[8];
            load8<TX>(reinterpret_cast<const TX*>(x_s + t * p.pitch_x) + c * 8, xv);
#pragma unroll
            for (int r = 0; r < kRowsMax; ++r)
#pragma unroll
              for (int e = 0; e < 8; ++e)
                v[m * 32 + t * 4 + r] = fmaf(w[r][e], xv[e], v[m * 32 + t * 4 + r]);
          }
        }
      }
    }
    warp_reduce_scatter<V>(v, lane);
#pragma unroll
    for (int j = 0; j < V / 32; ++j) {
      const int i = lane * (V / 32) + j, m = i / 32, t = (i % 32) / 4, r = i % 4;
      red[warp * 64 + t * 8 + m * 4 + r] = v[j];
    }
  }
  __syncthreads();
  if (p.diag & kDiagHiddenOnly) return;

  // Activations h[t, r] (warps summed in order), zero for tokens >= n and rows >= inter.
  if (tid < kRowsTokens * kRowsMax) {
    const int t = tid / kRowsMax, r = tid % kRowsMax;
    float ug = 0.f, uu = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      ug += red[w * 64 + t * 8 + r];
      if (GLU) uu += red[w * 64 + t * 8 + kRowsMax + r];
    }
    float h = 0.f;
    if (t < p.n && r < R && row0 + r < p.inter)
      h = GLU ? gate_act(ug, p.act) * uu : gate_act(ug + b1s[r], p.act);
    hs[tid] = h;
  }
  __syncthreads();
  const int outs = p.n * H;
  float* zrow = p.zp + static_cast<size_t>(blockIdx.x) * outs;
  for (int i = tid; i < outs; i += THREADS) {
    const int t = i / H, h = i % H;
    float z = 0.f;
#pragma unroll
    for (int r = 0; r < kRowsMax; ++r) z = fmaf(w2s[h * kRowsMax + r], hs[t * kRowsMax + r], z);
    zrow[i] = z;
  }
  if (p.diag & kDiagNoLevel2) return;
  // arrive_last's barrier also ends every read of red, which the last block reuses.
  if (!arrive_last(p.counter, gridDim.x, &last_flag)) return;

  // lam = logsigmoid(bias + the blocks' partials in block order): `slices` threads per output
  // each sum a contiguous range of blocks (kRowsLoads loads in flight, through L2: the
  // partials come from other SMs), then one thread per output sums the slices in order.
  const int blocks = gridDim.x;
  const int slices = min(kRowsSlices, max(1, THREADS / outs));
  float* part = red;  // [slices, outs]: slices * outs <= THREADS when slices > 1
  for (int i = tid; i < slices * outs; i += THREADS) {
    const int s = i / outs, o = i % outs;
    const int b_end = static_cast<int>(static_cast<long long>(s + 1) * blocks / slices);
    float z = 0.f;
    for (int b0 = static_cast<int>(static_cast<long long>(s) * blocks / slices); b0 < b_end;
         b0 += kRowsLoads) {
      float v[kRowsLoads];
#pragma unroll
      for (int k = 0; k < kRowsLoads; ++k)
        v[k] = b0 + k < b_end ? __ldcg(p.zp + static_cast<size_t>(b0 + k) * outs + o) : 0.f;
#pragma unroll
      for (int k = 0; k < kRowsLoads; ++k) z += v[k];
    }
    if (slices == 1)
      p.lam[o] = log_sigmoid(bias_s[o % H] + z);
    else
      part[i] = z;
  }
  if (slices == 1) return;
  __syncthreads();
  if (tid < outs) {
    float z = bias_s[tid % H];
    for (int s = 0; s < slices; ++s) z += part[s * outs + tid];
    p.lam[tid] = log_sigmoid(z);
  }
}

namespace gate_detail {

namespace {

/// Launches the rows kernel of a plan (plan.rows > 0): the whole call, as a programmatic
/// dependent of the previous kernel in the stream when pdl is set. counter: the front of the
/// workspace (zero), zp: past counter_bytes(p).
template <typename TX, typename TW>
cudaError_t launch_rows_typed(const gate_params_t& p, const gate_plan_t& plan, unsigned* counter,
                              float* zp, bool pdl, cudaStream_t stream) {
  if (plan.rows < 1 || plan.rows > kRowsMax || p.n > kRowsTokens) return cudaErrorInvalidValue;
  const bool glu = p.kind == kGateGlu;
  rows_args_t<TX, TW> a{};
  a.x = static_cast<const TX*>(p.x);
  a.wa = static_cast<const TW*>(glu ? p.w_gate : p.w1);
  a.wb = static_cast<const TW*>(glu ? p.w_up : nullptr);
  a.b1 = static_cast<const TW*>(glu ? nullptr : p.b1);
  a.w2 = static_cast<const TW*>(glu ? p.w_down : p.w2);
  a.bias = static_cast<const TW*>(p.bias);
  a.lam = p.lam;
  a.zp = zp;
  a.counter = counter;
  a.n = p.n;
  a.in_dim = p.in_dim;
  a.inter = p.inter;
  a.kv_heads = p.kv_heads;
  a.rows = plan.rows;
  a.act = p.act;
  a.pitch_w = rows_pitch(static_cast<size_t>(p.in_dim) * sizeof(TW));
  a.pitch_x = rows_pitch(static_cast<size_t>(p.in_dim) * sizeof(TX));
  a.ext_bytes = rows_ext_bytes(p.kv_heads);
  a.diag = plan.diag;
  const size_t smem = rows_smem_bytes(p, plan.rows);
  auto go = [&](auto kernel, int threads) -> cudaError_t {
    cudaError_t e = cudaSuccess;
    if (smem > 48 * 1024)
      e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem));
    if (e == cudaSuccess && (plan.diag & (kDiagCarveMax | kDiagCarveDefault)))
      e = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                               (plan.diag & kDiagCarveMax) ? 100 : -1);
    if (e != cudaSuccess) return e;
    return launch_dependent(pdl, kernel, dim3(ceil_div(p.inter, plan.rows)), dim3(threads), smem,
                            stream, a);
  };
  // Other block sizes: harness timing of bf16 only.
  if constexpr (std::is_same_v<TX, __nv_bfloat16> && std::is_same_v<TW, __nv_bfloat16>) {
    if (plan.threads == 128)
      return glu ? go(GateRowsKernel<TX, TW, true, 128>, 128)
                 : go(GateRowsKernel<TX, TW, false, 128>, 128);
    if (plan.threads == 512)
      return glu ? go(GateRowsKernel<TX, TW, true, 512>, 512)
                 : go(GateRowsKernel<TX, TW, false, 512>, 512);
  }
  return glu ? go(GateRowsKernel<TX, TW, true>, kRowsThreads)
             : go(GateRowsKernel<TX, TW, false>, kRowsThreads);
}

}  // namespace

cudaError_t launch_rows(const gate_params_t& p, const gate_plan_t& plan, unsigned* counter,
                        float* zp, bool pdl, cudaStream_t stream) {
  return with_dtypes(p, [&](auto tx, auto tw) {
    return launch_rows_typed<decltype(tx), decltype(tw)>(p, plan, counter, zp, pdl, stream);
  });
}

}  // namespace gate_detail

}  // namespace trimkv
