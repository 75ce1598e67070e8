// The hidden layer on tensor cores, GateTcKernel (split, fused, or the whole call in one pass),
// and its launchers; see retention_gate.cu for the regimes.
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "kernels/gate/gate_common.cuh"
#include "kernels/gate/plan.h"

namespace trimkv {

/// Hidden layer on tensor cores. Block (bx, by, bz) computes rows [bx BM, +BM) of W (both GLU
/// matrices) times tokens [by BN, +BN) over K range [bz kslice, +kslice).
/// - ONE_PASS (decode; BM == kCtrBM, launched as a programmatic dependent on sm_90+): the
///   whole call. W tiles (the first stages: the whole slice when it fits) and the block's rows
///   of W2 / b1 and the bias are requested before griddepcontrol.wait, x after it. gridDim.z >
///   1: raw partials to out [kMats, splits, n, inter]; the last of the splits of this (row
///   tile, token tile) to arrive sums them. Then b1 / act / GLU product and the W2 rows give
///   zp [bx, t, h]; the last row tile of the token tile to arrive writes
///   lam[t, h] = logsigmoid(bias[h] + sum over row tiles of zp). Dynamic shared memory:
///   p.stage_bytes, then one_pass_ext_floats floats.
/// - gridDim.z == 1 (fused): applies b1 / act / the GLU product, multiplies by the W2 columns
///   of the warp's rows and writes out[slot, t, h] with slot = bx * WM + (warp's row index):
///   z = bias + sum over slots, left to GateFinishZKernel.
/// - gridDim.z > 1 (split K): writes the raw partial products out[bz, t, r] (GLU: W_gate's
///   [splits, n, inter], then W_up's), left to GateFinishFewKernel / GateFinishManyKernel.
/// Rows >= inter, tokens >= n and k >= in_dim are zero-filled in shared memory, so any inter,
/// any n and any in_dim % 8 == 0 work. grid (ceil(inter/BM), ceil(n/BN), splits).
template <typename T, bool GLU, typename C, bool ONE_PASS>
__global__ void __launch_bounds__(C::kThreads, C::kMinBlocks) GateTcKernel(const tc_args_t<T> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  // Let the next kernel in the stream launch at once: its blocks only prefetch weights before
  // their own griddepcontrol.wait, which returns once this grid is complete.
  pdl_launch_dependents();
  extern __shared__ __align__(16) uint8_t smem_raw[];
  __shared__ int last_flag;
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp % C::WM, wn = warp / C::WM;
  const int m0 = blockIdx.x * C::BM, n0 = blockIdx.y * C::BN;
  const int k_begin = blockIdx.z * p.kslice;
  const int k_end = min(p.in_dim, k_begin + p.kslice);
  const int ktiles = (k_end - k_begin + kBK - 1) / kBK;

  constexpr int kChunksA = C::kRowsA * kChunksPerRow, kChunksB = C::BN * kChunksPerRow;
  auto load_w = [&](int stage, int kt) {
    T* s = smem + stage * C::kStageElems;
    const int k0 = k_begin + kt * kBK;
#pragma unroll
    for (int c0 = 0; c0 < kChunksA; c0 += C::kThreads) {
      const int c = c0 + tid;
      if (kChunksA % C::kThreads != 0 && c >= kChunksA) break;
      const int row = c / kChunksPerRow, col = (c % kChunksPerRow) * 8, k = k0 + col;
      const int r = m0 + row % C::BM;
      const T* w = (GLU && row >= C::BM) ? p.wb : p.wa;
      const bool ok = r < p.inter && k < k_end;
      cp_async16(s + row * kLds + col, w + (ok ? static_cast<size_t>(r) * p.in_dim + k : 0), ok);
    }
  };
  auto load_x = [&](int stage, int kt) {
    T* s = smem + stage * C::kStageElems + C::kRowsA * kLds;
    const int k0 = k_begin + kt * kBK;
#pragma unroll
    for (int c0 = 0; c0 < kChunksB; c0 += C::kThreads) {
      const int c = c0 + tid;
      if (kChunksB % C::kThreads != 0 && c >= kChunksB) break;
      const int row = c / kChunksPerRow, col = (c % kChunksPerRow) * 8, k = k0 + col;
      const int t = n0 + row;
      const bool ok = t < p.n && k < k_end;
      cp_async16(s + row * kLds + col, p.x + (ok ? static_cast<size_t>(t) * p.in_dim + k : 0), ok);
    }
  };

  float acc[C::kMats][C::MT][C::NT][4];
#pragma unroll
  for (int m = 0; m < C::kMats; ++m)
#pragma unroll
    for (int i = 0; i < C::MT; ++i)
#pragma unroll
      for (int j = 0; j < C::NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[m][i][j][e] = 0.f;

  // One pass: W2 rows [kv_heads, BM], b1 [BM], bias [kv_heads] as float, then z sums.
  float* ext = reinterpret_cast<float*>(smem_raw + (ONE_PASS ? p.stage_bytes : 0));
  const int n_ext = p.kv_heads * C::BM + C::BM + p.kv_heads;
  int pre;  // K tiles the prologue loads
  if constexpr (ONE_PASS) {
    // Weights are immutable after upload, so they may be read before the wait; x and the
    // workspace may be written by the kernels before this one and are read only after it.
    pre = ktiles <= C::kStages ? ktiles : C::kStages - 1;
    const bool early = !(p.diag & kDiagLateWeights);
    if (early)
      for (int s = 0; s < pre; ++s) load_w(s, s);
    unsigned short raw[kExtPre];
#pragma unroll
    for (int k = 0; k < kExtPre; ++k) {
      const int i = tid + k * C::kThreads;
      raw[k] = i < n_ext ? ext_raw(p, m0, C::BM, i) : 0;
    }
    pdl_wait();
    for (int s = 0; s < pre; ++s) {
      if (!early) load_w(s, s);
      load_x(s, s);
    }
    cp_async_commit();
#pragma unroll
    for (int k = 0; k < kExtPre; ++k) {
      const int i = tid + k * C::kThreads;
      if (i < n_ext) ext[i] = raw_to_f32<T>(raw[k]);
    }
    for (int i = tid + kExtPre * C::kThreads; i < n_ext; i += C::kThreads)
      ext[i] = raw_to_f32<T>(ext_raw(p, m0, C::BM, i));
    cp_async_wait<0>();  // the loop below then only waits for stages it prefetches itself
    __syncthreads();
  } else {
    pre = C::kStages - 1;
#pragma unroll
    for (int s = 0; s < C::kStages - 1; ++s) {
      if (s < ktiles) {
        load_w(s, s);
        load_x(s, s);
      }
      cp_async_commit();  // empty groups keep the wait count below uniform
    }
  }
  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<C::kStages - 2>();
    // Tile kt is visible to every thread, and every thread is done with tile kt - 1, whose
    // stage the prefetch below overwrites.
    __syncthreads();
    const int pf = kt + C::kStages - 1;
    if (pf >= pre && pf < ktiles) {
      load_w(pf % C::kStages, pf);
      load_x(pf % C::kStages, pf);
    }
    cp_async_commit();
    const uint32_t sa = smem_u32(smem + (kt % C::kStages) * C::kStageElems);
    const uint32_t sb = sa + C::kRowsA * kLds * 2;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t af[C::kMats][C::MT][4], bf[C::NT][2];
#pragma unroll
      for (int m = 0; m < C::kMats; ++m)
#pragma unroll
        for (int i = 0; i < C::MT; ++i) {
          const int row = m * C::BM + wm * C::kWarpM + i * 16 + (lane & 15);
          ldsm_x4(af[m][i], sa + (row * kLds + kk + (lane >> 4) * 8) * 2);
        }
      if constexpr (C::NT == 1) {
        const int tok = wn * C::kWarpN + (lane & 7);
        ldsm_x2(bf[0], sb + (tok * kLds + kk + ((lane >> 3) & 1) * 8) * 2);
      } else {
#pragma unroll
        for (int j = 0; j < C::NT; j += 2) {
          const int tok = wn * C::kWarpN + j * 8 + (lane >> 4) * 8 + (lane & 7);
          uint32_t r[4];
          ldsm_x4(r, sb + (tok * kLds + kk + ((lane >> 3) & 1) * 8) * 2);
          bf[j][0] = r[0];
          bf[j][1] = r[1];
          bf[j + 1][0] = r[2];
          bf[j + 1][1] = r[3];
        }
      }
#pragma unroll
      for (int m = 0; m < C::kMats; ++m)
#pragma unroll
        for (int i = 0; i < C::MT; ++i)
#pragma unroll
          for (int j = 0; j < C::NT; ++j) mma_16816<T>(acc[m][i][j], af[m][i], bf[j]);
    }
  }
  cp_async_wait<0>();

  // Accumulator element e of tile (i, j) sits at row g (+8 for e >= 2) and token 2q + (e & 1).
  const int g = lane >> 2, q = lane & 3;
  const int row0 = m0 + wm * C::kWarpM + g;
  const int tok0 = n0 + wn * C::kWarpN + 2 * q;
  constexpr int kPitch = one_pass_pitch<C>();
  if (ONE_PASS && (p.diag & kDiagHiddenOnly)) return;
  if (gridDim.z > 1) {
    const size_t mat_stride = static_cast<size_t>(gridDim.z) * p.n * p.inter;
    float* out = p.out + static_cast<size_t>(blockIdx.z) * p.n * p.inter;
#pragma unroll
    for (int m = 0; m < C::kMats; ++m)
#pragma unroll
      for (int i = 0; i < C::MT; ++i)
#pragma unroll
        for (int j = 0; j < C::NT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = row0 + i * 16 + (e >> 1) * 8, t = tok0 + j * 8 + (e & 1);
            if (r < p.inter && t < p.n)
              out[m * mat_stride + static_cast<size_t>(t) * p.inter + r] = acc[m][i][j][e];
          }
    if constexpr (!ONE_PASS) {
      return;
    } else {
      // arrive_last's barrier also ends every warp's reads of the stages, which the sum reuses.
      unsigned* c = p.counters + blockIdx.y * p.ctr_rows + blockIdx.x;
      if (!arrive_last(c, gridDim.z, &last_flag)) return;
      float* u_s = reinterpret_cast<float*>(smem_raw);
      if ((p.inter & 3) == 0)
        sum_split_partials<C, float4>(p.out, u_s, gridDim.z, p.n, p.inter, m0, n0);
      else
        sum_split_partials<C, float>(p.out, u_s, gridDim.z, p.n, p.inter, m0, n0);
      __syncthreads();
#pragma unroll
      for (int m = 0; m < C::kMats; ++m)
#pragma unroll
        for (int i = 0; i < C::MT; ++i)
#pragma unroll
          for (int j = 0; j < C::NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int rl = wm * C::kWarpM + i * 16 + g + (e >> 1) * 8;
              const int tl = wn * C::kWarpN + j * 8 + 2 * q + (e & 1);
              acc[m][i][j][e] = u_s[(m * C::BN + tl) * kPitch + rl];
            }
    }
  }

  // Fused: activations in place (rows past inter contribute nothing).
  const float* s_w2 = ext;
  const float* s_b1 = ext + p.kv_heads * C::BM;
#pragma unroll
  for (int i = 0; i < C::MT; ++i)
#pragma unroll
    for (int hi = 0; hi < 2; ++hi) {
      const int r = row0 + i * 16 + hi * 8;
      const bool valid = r < p.inter;
      float bias = 0.f;
      if constexpr (ONE_PASS)
        bias = s_b1[r - m0];
      else
        bias = (!GLU && valid && p.b1 != nullptr) ? to_f32(p.b1[r]) : 0.f;
#pragma unroll
      for (int j = 0; j < C::NT; ++j)
#pragma unroll
        for (int e = hi * 2; e < hi * 2 + 2; ++e) {
          float v;
          if constexpr (GLU) {
            v = gate_act(acc[0][i][j][e], p.act) * acc[C::kMats - 1][i][j][e];
          } else {
            v = gate_act(acc[0][i][j][e] + bias, p.act);
          }
          acc[0][i][j][e] = valid ? v : 0.f;
        }
    }
  // z partial over the warp's rows: per thread over its rows, then over the 8 row groups g
  // (lane bits 2..4). Lanes with g == 0 hold the sums for tokens tok0 + 8j + {0, 1}.
  // One pass: staged per warp in shared memory, then summed over the block's warps.
  float* zs = ext + n_ext;  // [WM, BN, kv_heads], one pass only
  float* zp = p.out + static_cast<size_t>(blockIdx.x * C::WM + wm) * p.n * p.kv_heads;
  for (int h = 0; h < p.kv_heads; ++h) {
    const T* w2 = p.w2 + static_cast<size_t>(h) * p.inter;
    float w[C::MT][2];
#pragma unroll
    for (int i = 0; i < C::MT; ++i)
#pragma unroll
      for (int hi = 0; hi < 2; ++hi) {
        const int r = row0 + i * 16 + hi * 8;
        if constexpr (ONE_PASS)
          w[i][hi] = s_w2[h * C::BM + r - m0];
        else
          w[i][hi] = r < p.inter ? to_f32(w2[r]) : 0.f;
      }
    float s[C::NT][2];
#pragma unroll
    for (int j = 0; j < C::NT; ++j)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        float v = 0.f;
#pragma unroll
        for (int i = 0; i < C::MT; ++i) {
          v = fmaf(w[i][0], acc[0][i][j][c], v);
          v = fmaf(w[i][1], acc[0][i][j][c + 2], v);
        }
#pragma unroll
        for (int o = 4; o < 32; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        s[j][c] = v;
      }
    if (g == 0) {
#pragma unroll
      for (int j = 0; j < C::NT; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int t = tok0 + j * 8 + c;
          if constexpr (ONE_PASS) {
            zs[(wm * C::BN + t - n0) * p.kv_heads + h] = s[j][c];
          } else {
            if (t < p.n) zp[static_cast<size_t>(t) * p.kv_heads + h] = s[j][c];
          }
        }
    }
  }
  if constexpr (ONE_PASS) {
    static_assert(C::WN == 1, "one pass: every warp holds all BN tokens of its rows");
    __syncthreads();
    // The block's z partial [n, kv_heads] over its BM rows (warps summed in order).
    const int outs = C::BN * p.kv_heads;
    float* zrow = p.zp + static_cast<size_t>(blockIdx.x) * p.n * p.kv_heads;
    for (int i = tid; i < outs; i += C::kThreads) {
      const int t = n0 + i / p.kv_heads;
      if (t >= p.n) break;
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < C::WM; ++w) v += zs[w * outs + i];
      zrow[static_cast<size_t>(t) * p.kv_heads + i % p.kv_heads] = v;
    }
    if (p.diag & kDiagNoLevel2) return;
    unsigned* c = p.counters + kMaxTokTiles * p.ctr_rows + blockIdx.y;
    if (!arrive_last(c, gridDim.x, &last_flag)) return;
    // lam for the token tile: bias + the row tiles' z partials in row-tile order.
    const float* s_bias = ext + p.kv_heads * C::BM + C::BM;
    const size_t count = static_cast<size_t>(p.n) * p.kv_heads;
    const int tiles = gridDim.x;
    for (int i = tid; i < outs; i += C::kThreads) {
      const int t = n0 + i / p.kv_heads, h = i % p.kv_heads;
      if (t >= p.n) break;
      const size_t o = static_cast<size_t>(t) * p.kv_heads + h;
      float z = s_bias[h];
      for (int s0 = 0; s0 < tiles; s0 += kSplitBatch) {
        float v[kSplitBatch];
#pragma unroll
        for (int k = 0; k < kSplitBatch; ++k)
          v[k] = s0 + k < tiles ? __ldcg(p.zp + static_cast<size_t>(s0 + k) * count + o) : 0.f;
#pragma unroll
        for (int k = 0; k < kSplitBatch; ++k) z += v[k];
      }
      p.lam[o] = log_sigmoid(z);
    }
  }
#endif
}

namespace gate_detail {

namespace {

/// The kernel arguments every tensor-core launch shares (out: partials or data).
template <typename T, bool GLU>
tc_args_t<T> tc_args(const gate_params_t& p, const gate_plan_t& plan, float* out) {
  tc_args_t<T> a{};
  a.x = static_cast<const T*>(p.x);
  a.wa = static_cast<const T*>(GLU ? p.w_gate : p.w1);
  a.wb = static_cast<const T*>(GLU ? p.w_up : nullptr);
  a.b1 = static_cast<const T*>(GLU ? nullptr : p.b1);
  a.w2 = static_cast<const T*>(GLU ? p.w_down : p.w2);
  a.out = out;
  a.n = p.n;
  a.in_dim = p.in_dim;
  a.inter = p.inter;
  a.kv_heads = p.kv_heads;
  a.kslice = plan.kslice;
  a.act = p.act;
  return a;
}

/// Launches the hidden-layer kernel of a tensor-core plan; returns the number of z-partial
/// slots it writes when fused (0 when split) through `slots`.
template <typename T, bool GLU>
cudaError_t launch_tc_typed(const gate_params_t& p, const gate_plan_t& plan, float* ws, int& slots,
                            cudaStream_t stream) {
  return with_tc_cfg<GLU>(plan.cfg, [&](auto c) -> cudaError_t {
    using C = decltype(c);
    const dim3 grid(ceil_div(p.inter, C::BM), ceil_div(p.n, C::BN), plan.splits);
    if (grid.y > 65535u || grid.z > 65535u) return cudaErrorInvalidValue;
    auto kernel = GateTcKernel<T, GLU, C, false>;
    if (C::kSmemBytes > 48 * 1024) {
      const cudaError_t e =
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes);
      if (e != cudaSuccess) return e;
    }
    const tc_args_t<T> a = tc_args<T, GLU>(p, plan, ws);
    kernel<<<grid, C::kThreads, C::kSmemBytes, stream>>>(a);
    slots = plan.splits == 1 ? static_cast<int>(grid.x) * C::WM : 0;
    return cudaGetLastError();
  });
}

/// Launches the one-pass kernel of a plan (plan.one_pass): the whole call, as a programmatic
/// dependent of the previous kernel in the stream when pdl is set. counters: the front of the
/// workspace (zero), data: past counter_bytes(p).
template <typename T, bool GLU>
cudaError_t launch_one_pass_typed(const gate_params_t& p, const gate_plan_t& plan,
                                  unsigned* counters, float* data, bool pdl, cudaStream_t stream) {
  return with_tc_cfg<GLU>(plan.cfg, [&](auto c) -> cudaError_t {
    using C0 = decltype(c);
    if constexpr (C0::BM != kCtrBM || C0::WN != 1) {
      return cudaErrorInvalidValue;  // tc_plan only picks the 64-row, one-warp-column tiles
    } else {
      using C = one_pass_cfg_t<C0>;
      static_assert(C::kSmemBytes <= kOnePassSmem, "one-pass stages");
      const dim3 grid(ceil_div(p.inter, C::BM), ceil_div(p.n, C::BN), plan.splits);
      if (grid.y > static_cast<unsigned>(kMaxTokTiles) || grid.z > 65535u)
        return cudaErrorInvalidValue;
      // Only the stages a K slice needs (all of it in flight before the wait when it fits),
      // and at least room for the summed partials [kMats, BN, pitch] that reuse them.
      const int stages = std::min(C::kStages, ceil_div(plan.kslice, kBK));
      size_t stage_bytes = std::max<size_t>(
          static_cast<size_t>(stages) * C::kStageElems * 2,
          static_cast<size_t>(C::kMats) * C::BN * one_pass_pitch<C>() * sizeof(float));
      stage_bytes = (stage_bytes + 15) / 16 * 16;
      const size_t smem = stage_bytes + one_pass_ext_floats<C>(p.kv_heads) * sizeof(float);
      auto kernel = GateTcKernel<T, GLU, C, true>;
      if (smem > 48 * 1024) {
        const cudaError_t e = cudaFuncSetAttribute(
            kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
        if (e != cudaSuccess) return e;
      }
      tc_args_t<T> a = tc_args<T, GLU>(p, plan, data);
      a.bias = static_cast<const T*>(p.bias);
      a.lam = p.lam;
      a.counters = counters;
      a.zp = plan.splits > 1 ? data + static_cast<size_t>(plan.splits) * p.n * p.inter * C::kMats
                             : data;
      a.ctr_rows = ceil_div(p.inter, kCtrBM);
      a.stage_bytes = static_cast<int>(stage_bytes);
      a.diag = plan.diag;
      return launch_dependent(pdl, kernel, grid, C::kThreads, smem, stream, a);
    }
  });
}

}  // namespace

cudaError_t launch_tc(const gate_params_t& p, const gate_plan_t& plan, float* ws, int& slots,
                      cudaStream_t stream) {
  const bool glu = p.kind == kGateGlu;
  if (p.w_dtype == DType::kF16)
    return glu ? launch_tc_typed<__half, true>(p, plan, ws, slots, stream)
               : launch_tc_typed<__half, false>(p, plan, ws, slots, stream);
  return glu ? launch_tc_typed<__nv_bfloat16, true>(p, plan, ws, slots, stream)
             : launch_tc_typed<__nv_bfloat16, false>(p, plan, ws, slots, stream);
}

cudaError_t launch_one_pass(const gate_params_t& p, const gate_plan_t& plan, unsigned* counters,
                            float* data, bool pdl, cudaStream_t stream) {
  const bool glu = p.kind == kGateGlu;
  if (p.w_dtype == DType::kF16)
    return glu ? launch_one_pass_typed<__half, true>(p, plan, counters, data, pdl, stream)
               : launch_one_pass_typed<__half, false>(p, plan, counters, data, pdl, stream);
  return glu ? launch_one_pass_typed<__nv_bfloat16, true>(p, plan, counters, data, pdl, stream)
             : launch_one_pass_typed<__nv_bfloat16, false>(p, plan, counters, data, pdl, stream);
}

}  // namespace gate_detail

}  // namespace trimkv
