// Standalone test and benchmark for the TRIM-KV decode and retention-gate kernels.
//   harness test [quick]   correctness vs a float64 CPU reference (exit code 1 on failure)
//   harness test slice K N  the decode cases with id % N == K only (no gate cases)
//   harness bench          decode bandwidth table vs device-to-device copy bandwidth
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "bench/kernels/common.h"
#include "kernels/attention/decode.cuh"
#include "kernels/attention/decode_traits.cuh"
#include "kernels/gate/retention_gate.cuh"

using namespace trimkv;
using namespace harness;

// Rounds v to dtype t and returns the stored float value; writes the bits into buf[i].
static float put(std::vector<uint8_t>& buf, DType t, size_t i, float v) {
  store_from_float(buf.data(), t, i, v);
  return load_as_float(buf.data(), t, i);
}

struct RefTok {
  int pos;
  float lam;
  double lognorm;
  std::vector<float> k, v;
};

static double ref_score(const RefTok& t, int T, int W, bool knorm) {
  if (t.pos >= T - W) return INFINITY;
  double s = static_cast<double>(t.lam) * (T + 1 - t.pos);
  if (knorm) s += t.lognorm;
  return s;
}
// true when a should be kept before b (larger score, then larger position)
static bool keep_before(const RefTok& a, const RefTok& b, int T, int W, bool knorm) {
  const double sa = ref_score(a, T, W, knorm), sb = ref_score(b, T, W, knorm);
  if (sa != sb) return sa > sb;
  return a.pos > b.pos;
}

static double lognorm_of(const std::vector<float>& k) {
  double ss = 0;
  for (float x : k) ss += static_cast<double>(x) * x;
  return std::log(std::max(std::sqrt(ss), 1e-12));
}

struct DecodeCase {
  int D;
  DType dt;
  int B;
  int G;
  int batch;
  int splits;           // 0 auto
  int M = 0;            // 0: 100 (B=0) / 60 (B=64)
  bool pooled = false;  // pooled layout (head_off): the step only appends
};

static int g_fail = 0, g_pass = 0;

static bool run_decode_case(const DecodeCase& c, int case_id) {
  const int D = c.D, kvh = 2, Hq = c.G * kvh, batch = c.batch;
  const int M = c.M > 0 ? c.M : c.B == 0 ? 100 : 60, B = c.B;
  const int W = (case_id % 3 == 1) ? 3 : 0;
  const bool knorm = (case_id % 2) == 1;
  const int steps = c.pooled ? 30 : B == 0 ? 40 : 110;
  // Pooled: every head owns a segment of seg slots at a shuffled offset of one pool; heads hold
  // different lengths (up to ~2.5x the split-sizing cap M + B + 1) and only append.
  const int seg = c.pooled ? (M + B) * 5 / 2 + steps + 1 : M + B;
  const int cap = seg;
  const DType dt = c.dt;
  const size_t es = dtype_size(dt);
  const double tol = dt == DType::kF32 ? 1e-5 : dt == DType::kF16 ? 2e-3 : 1e-2;
  const int bh_n = batch * kvh;

  std::vector<std::vector<RefTok>> ref(bh_n);
  std::vector<int> seqpos(batch);
  // Host images of the device cache.
  std::vector<uint8_t> hk(static_cast<size_t>(bh_n) * cap * D * es),
      hv(static_cast<size_t>(bh_n) * cap * D * es);
  std::vector<int32_t> hpos(static_cast<size_t>(bh_n) * cap, -7);
  std::vector<float> hlam(static_cast<size_t>(bh_n) * cap, 0.f), hln(hlam.size(), 0.f);
  std::vector<int32_t> hlens(bh_n);
  for (size_t i = 0; i < hk.size() / es; ++i) {
    put(hk, dt, i, static_cast<float>(nrand()));
    put(hv, dt, i, static_cast<float>(nrand()));
  }
  std::vector<int32_t> hoff(bh_n);
  {
    std::vector<int> perm(bh_n);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int i = 0; i < bh_n; ++i) hoff[i] = perm[i] * seg;
  }
  for (int b = 0; b < batch; ++b) {
    const int len_b = static_cast<int>(urand() * (B == 0 ? M + 1 : cap));
    const int p0 = (c.pooled ? seg : len_b) + static_cast<int>(urand() * 50);
    seqpos[b] = p0;
    for (int h = 0; h < kvh; ++h) {
      const int bh0 = b * kvh + h;
      const int bh = c.pooled ? hoff[bh0] / seg : bh0;  // slot segment of head bh0
      const int len0 = c.pooled ? static_cast<int>(urand() * (seg - steps)) : len_b;
      // distinct positions < p0
      std::vector<int> all(p0);
      std::iota(all.begin(), all.end(), 0);
      std::shuffle(all.begin(), all.end(), rng);
      hlens[bh0] = len0;
      for (int j = 0; j < len0; ++j) {
        RefTok t;
        t.pos = all[j];
        t.lam = static_cast<float>(std::log(0.75 + 0.25 * urand()));
        t.k.resize(D);
        t.v.resize(D);
        const size_t row = (static_cast<size_t>(bh) * cap + j) * D;
        for (int e = 0; e < D; ++e) {
          t.k[e] = load_as_float(hk.data(), dt, row + e);
          t.v[e] = load_as_float(hv.data(), dt, row + e);
        }
        t.lognorm = lognorm_of(t.k);
        hpos[bh * cap + j] = t.pos;
        hlam[bh * cap + j] = t.lam;
        hln[bh * cap + j] = static_cast<float>(t.lognorm);
        ref[bh0].push_back(std::move(t));
      }
    }
  }
  int32_t* dhoff = nullptr;
  CK(cudaMalloc(&dhoff, bh_n * 4));
  CK(cudaMemcpy(dhoff, hoff.data(), bh_n * 4, cudaMemcpyHostToDevice));
  void *dk, *dv, *dq, *dkn, *dvn, *dout, *dws;
  int32_t *dpos, *dlens, *dpositions;
  float *dlam, *dln, *dlamnew;
  CK(cudaMalloc(&dk, hk.size()));
  CK(cudaMalloc(&dv, hv.size()));
  CK(cudaMalloc(&dpos, hpos.size() * 4));
  CK(cudaMalloc(&dlam, hlam.size() * 4));
  CK(cudaMalloc(&dln, hln.size() * 4));
  CK(cudaMalloc(&dlens, bh_n * 4));
  CK(cudaMalloc(&dq, static_cast<size_t>(batch) * Hq * D * es));
  CK(cudaMalloc(&dkn, static_cast<size_t>(bh_n) * D * es));
  CK(cudaMalloc(&dvn, static_cast<size_t>(bh_n) * D * es));
  CK(cudaMalloc(&dout, static_cast<size_t>(batch) * Hq * D * es));
  CK(cudaMalloc(&dlamnew, bh_n * 4));
  CK(cudaMalloc(&dpositions, batch * 4));
  CK(cudaMemcpy(dk, hk.data(), hk.size(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dv, hv.data(), hv.size(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dpos, hpos.data(), hpos.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dlam, hlam.data(), hlam.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dln, hln.data(), hln.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dlens, hlens.data(), bh_n * 4, cudaMemcpyHostToDevice));

  decode_params_t p;
  p.k_cache = dk;
  p.v_cache = dv;
  p.pos_cache = dpos;
  p.lam_cache = dlam;
  p.lognorm_cache = knorm ? dln : nullptr;
  p.lens = dlens;
  p.q = dq;
  p.k_new = dkn;
  p.v_new = dvn;
  p.lam_new = dlamnew;
  p.positions = dpositions;
  p.out = dout;
  p.batch = batch;
  p.q_heads = Hq;
  p.kv_heads = kvh;
  p.head_dim = D;
  p.memory = M;
  p.buffer = B;
  p.cap = cap;
  p.window = W;
  p.knorm = knorm;
  if (c.pooled) {
    p.head_off = dhoff;
    p.cap = M + B + 1;  // sizes the splits only, as the addon does; heads hold more
  }
  p.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  p.num_splits = c.splits;
  const size_t wsb = DecodeWorkspaceBytes(p);
  CK(cudaMalloc(&dws, wsb));
  const size_t cntb = DecodeCounterBytes(p);
  CK(cudaMemset(dws, 0, cntb));
  const int S = DecodeNumSplits(p);

  double worst = 0;
  bool ok = true;
  std::string why;
  std::vector<uint8_t> hq(static_cast<size_t>(batch) * Hq * D * es), hkn(bh_n * D * es),
      hvn(bh_n * D * es), hout(hq.size());
  std::vector<float> hlamnew(bh_n);
  std::vector<int32_t> hpositions(batch), glens(bh_n), gpos(hpos.size());
  for (int step = 0; step < steps && ok; ++step) {
    for (int b = 0; b < batch; ++b) hpositions[b] = (urand() < 0.1) ? -1 : seqpos[b];
    for (size_t i = 0; i < hq.size() / es; ++i) put(hq, dt, i, static_cast<float>(nrand()));
    for (size_t i = 0; i < hkn.size() / es; ++i) {
      put(hkn, dt, i, static_cast<float>(nrand()));
      put(hvn, dt, i, static_cast<float>(nrand()));
    }
    for (int i = 0; i < bh_n; ++i) hlamnew[i] = static_cast<float>(std::log(0.75 + 0.25 * urand()));
    CK(cudaMemcpy(dq, hq.data(), hq.size(), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dkn, hkn.data(), hkn.size(), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dvn, hvn.data(), hvn.size(), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dlamnew, hlamnew.data(), bh_n * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dpositions, hpositions.data(), batch * 4, cudaMemcpyHostToDevice));
    CK(cudaMemset(dout, 0xff, hout.size()));  // NaN in every dtype
    CK(cudaMemset(static_cast<char*>(dws) + cntb, 0xff, wsb - cntb));
    cudaError_t e = DecodeStep(p, dt, dws, 0);
    if (e != cudaSuccess) {
      ok = false;
      why = std::string("launch: ") + cudaGetErrorString(e);
      break;
    }
    CK(cudaDeviceSynchronize());
    CK(cudaMemcpy(hout.data(), dout, hout.size(), cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(glens.data(), dlens, bh_n * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(gpos.data(), dpos, gpos.size() * 4, cudaMemcpyDeviceToHost));
    // Reference: attention, then eviction.
    double num = 0, den = 0;
    bool nan_or_nonzero = false;
#pragma omp parallel for reduction(+ : num, den) reduction(|| : nan_or_nonzero)
    for (int b = 0; b < batch; ++b) {
      const int pnew = hpositions[b];
      for (int h = 0; h < kvh; ++h) {
        const int bh = b * kvh + h;
        for (int g = 0; g < c.G; ++g) {
          const size_t qrow = (static_cast<size_t>(b) * Hq + h * c.G + g) * D;
          if (pnew < 0) {
            for (int e = 0; e < D; ++e)
              if (load_as_float(hout.data(), dt, qrow + e) != 0.f) nan_or_nonzero = true;
            continue;
          }
          std::vector<double> qd(D);
          for (int e = 0; e < D; ++e) qd[e] = load_as_float(hq.data(), dt, qrow + e);
          const int n = static_cast<int>(ref[bh].size()) + 1;
          std::vector<double> lg(n);
          auto kat = [&](int j, int e) -> double {
            return j < n - 1 ? ref[bh][j].k[e] : load_as_float(hkn.data(), dt, bh * D + e);
          };
          auto vat = [&](int j, int e) -> double {
            return j < n - 1 ? ref[bh][j].v[e] : load_as_float(hvn.data(), dt, bh * D + e);
          };
          double mx = -INFINITY;
          for (int j = 0; j < n; ++j) {
            double s = 0;
            for (int e = 0; e < D; ++e) s += qd[e] * kat(j, e);
            lg[j] = s * p.scale;
            mx = std::max(mx, lg[j]);
          }
          double sum = 0;
          for (int j = 0; j < n; ++j) {
            lg[j] = std::exp(lg[j] - mx);
            sum += lg[j];
          }
          for (int e = 0; e < D; ++e) {
            double o = 0;
            for (int j = 0; j < n; ++j) o += lg[j] * vat(j, e);
            o /= sum;
            const float got = load_as_float(hout.data(), dt, qrow + e);
            if (!std::isfinite(got)) nan_or_nonzero = true;
            num += (got - o) * (got - o);
            den += o * o;
          }
        }
      }
    }
    const double rel = den > 0 ? std::sqrt(num / den) : 0;
    worst = std::max(worst, rel);
    if (nan_or_nonzero || !(rel <= tol)) {
      ok = false;
      char buf[128];
      std::snprintf(buf, sizeof buf, "step %d: rel err %.3g nan/unwritten %d", step, rel,
                    (int)nan_or_nonzero);
      why = buf;
      break;
    }
    for (int b = 0; b < batch; ++b) {
      const int pnew = hpositions[b];
      if (pnew < 0) continue;
      const int T = pnew + 1;
      for (int h = 0; h < kvh; ++h) {
        const int bh = b * kvh + h;
        RefTok t;
        t.pos = pnew;
        t.lam = hlamnew[bh];
        t.k.resize(D);
        t.v.resize(D);
        for (int e = 0; e < D; ++e) {
          t.k[e] = load_as_float(hkn.data(), dt, bh * D + e);
          t.v[e] = load_as_float(hvn.data(), dt, bh * D + e);
        }
        t.lognorm = lognorm_of(t.k);
        auto& L = ref[bh];
        if (c.pooled) {
          L.push_back(std::move(t));
        } else if (B == 0) {
          if (static_cast<int>(L.size()) < M) {
            L.push_back(std::move(t));
          } else {
            int victim = -1;  // -1: the new token
            const RefTok* worst_t = &t;
            for (int j = 0; j < static_cast<int>(L.size()); ++j)
              if (keep_before(*worst_t, L[j], T, W, knorm)) {
                worst_t = &L[j];
                victim = j;
              }
            if (victim >= 0) L[victim] = std::move(t);
          }
        } else {
          L.push_back(std::move(t));
          if (static_cast<int>(L.size()) >= M + B) {
            std::stable_sort(L.begin(), L.end(), [&](const RefTok& a, const RefTok& bb) {
              return keep_before(a, bb, T, W, knorm);
            });
            L.resize(M);
          }
        }
      }
      seqpos[b] += 1;
    }
    for (int bh = 0; bh < bh_n && ok; ++bh) {
      std::vector<int> a, r;
      if (glens[bh] != static_cast<int>(ref[bh].size())) {
        ok = false;
        why = "step " + std::to_string(step) + ": len " + std::to_string(glens[bh]) + " vs " +
              std::to_string(ref[bh].size());
        break;
      }
      const size_t hb = c.pooled ? static_cast<size_t>(hoff[bh]) : static_cast<size_t>(bh) * cap;
      for (int j = 0; j < glens[bh]; ++j) a.push_back(gpos[hb + j]);
      for (auto& t : ref[bh]) r.push_back(t.pos);
      std::sort(a.begin(), a.end());
      std::sort(r.begin(), r.end());
      if (a != r) {
        ok = false;
        why = "step " + std::to_string(step) + ": retained set differs";
      }
    }
  }
  std::printf(
      "%s decode%s D=%3d %-4s M=%4d B=%2d G=%d batch=%2d splits=%d(%2d) W=%d knorm=%d "
      "worst=%.2e%s%s\n",
      ok ? "PASS" : "FAIL", c.pooled ? "(pooled)" : "", D, dtype_name(dt), M, B, c.G, batch,
      c.splits, S, W, knorm, worst, ok ? "" : " : ", why.c_str());
  cudaFree(dk);
  cudaFree(dv);
  cudaFree(dpos);
  cudaFree(dlam);
  cudaFree(dln);
  cudaFree(dlens);
  cudaFree(dq);
  cudaFree(dkn);
  cudaFree(dvn);
  cudaFree(dout);
  cudaFree(dlamnew);
  cudaFree(dpositions);
  cudaFree(dws);
  cudaFree(dhoff);
  (ok ? g_pass : g_fail)++;
  return ok;
}

static void run_gate_case(int kind, int act, DType xt, DType wt, int n) {
  const int in = 520, I = 136, H = 4;
  auto mk = [&](size_t cnt, DType t, double sc) {
    std::vector<uint8_t> v(cnt * dtype_size(t));
    for (size_t i = 0; i < cnt; ++i) put(v, t, i, static_cast<float>(nrand() * sc));
    return v;
  };
  auto hx = mk(static_cast<size_t>(n) * in, xt, 1.0);
  auto hw1 = mk(static_cast<size_t>(I) * in, wt, 1.0 / std::sqrt(in));
  auto hwu = mk(static_cast<size_t>(I) * in, wt, 1.0 / std::sqrt(in));
  auto hb1 = mk(I, wt, 0.5);
  auto hw2 = mk(static_cast<size_t>(H) * I, wt, 2.0 / std::sqrt(I));
  auto hbias = mk(H, wt, 2.0);
  auto up = [](const std::vector<uint8_t>& h) {
    void* d;
    CK(cudaMalloc(&d, h.size()));
    CK(cudaMemcpy(d, h.data(), h.size(), cudaMemcpyHostToDevice));
    return d;
  };
  void *dx = up(hx), *dw1 = up(hw1), *dwu = up(hwu), *db1 = up(hb1), *dw2 = up(hw2),
       *dbias = up(hbias);
  float* dlam;
  CK(cudaMalloc(&dlam, n * H * 4));
  CK(cudaMemset(dlam, 0xff, n * H * 4));
  gate_params_t g;
  g.kind = kind;
  g.act = act;
  g.n = n;
  g.in_dim = in;
  g.inter = I;
  g.kv_heads = H;
  g.x = dx;
  g.x_dtype = xt;
  g.w_dtype = wt;
  if (kind == kGateMlp) {
    g.w1 = dw1;
    g.b1 = db1;
    g.w2 = dw2;
  } else {
    g.w_gate = dw1;
    g.w_up = dwu;
    g.w_down = dw2;
  }
  g.bias = dbias;
  g.lam = dlam;
  void* ws;
  CK(cudaMalloc(&ws, RetentionGateWorkspaceBytes(g)));
  CK(cudaMemset(ws, 0, RetentionGateWorkspaceBytes(g)));  // the arrival counters start at zero
  cudaError_t e = RetentionGate(g, ws, 0);
  CK(e);
  CK(cudaDeviceSynchronize());
  std::vector<float> lam(n * H);
  CK(cudaMemcpy(lam.data(), dlam, lam.size() * 4, cudaMemcpyDeviceToHost));
  double num = 0, den = 0;
  bool bad = false;
  auto L = [&](const std::vector<uint8_t>& v, DType t, size_t i) -> double {
    return load_as_float(v.data(), t, i);
  };
  for (int t = 0; t < n; ++t) {
    std::vector<double> a(I);
    for (int r = 0; r < I; ++r) {
      double u = 0, u2 = 0;
      for (int i = 0; i < in; ++i) {
        const double xv = L(hx, xt, static_cast<size_t>(t) * in + i);
        u += L(hw1, wt, static_cast<size_t>(r) * in + i) * xv;
        u2 += L(hwu, wt, static_cast<size_t>(r) * in + i) * xv;
      }
      a[r] = kind == kGateMlp ? act_ref(u + L(hb1, wt, r), act) : act_ref(u, act) * u2;
    }
    for (int h = 0; h < H; ++h) {
      double z = L(hbias, wt, h);
      for (int r = 0; r < I; ++r) z += L(hw2, wt, static_cast<size_t>(h) * I + r) * a[r];
      const double ref = std::min(z, 0.0) - std::log1p(std::exp(-std::fabs(z)));
      const double got = lam[t * H + h];
      if (!std::isfinite(got)) bad = true;
      num += (got - ref) * (got - ref);
      den += ref * ref;
    }
  }
  const double rel = std::sqrt(num / std::max(den, 1e-300));
  const bool ok = !bad && rel <= 1e-5;
  std::printf("%s gate kind=%d act=%d x=%s w=%s n=%3d rel=%.2e\n", ok ? "PASS" : "FAIL", kind, act,
              dtype_name(xt), dtype_name(wt), n, rel);
  (ok ? g_pass : g_fail)++;
  cudaFree(dx);
  cudaFree(dw1);
  cudaFree(dwu);
  cudaFree(db1);
  cudaFree(dw2);
  cudaFree(dbias);
  cudaFree(dlam);
  cudaFree(ws);
}

static int g_slice_k = 0, g_slice_n = 0;  // test slice K N: decode cases with id % N == K
static bool skip_case(int id) { return g_slice_n > 0 && id % g_slice_n != g_slice_k; }

static int run_tests(bool quick) {
  const int Ds[] = {64, 128, 256, 72};
  const DType dts[] = {DType::kF32, DType::kF16, DType::kBF16};
  int id = 0;
  for (int D : Ds)
    for (DType dt : dts)
      for (int B : {0, 64})
        for (int G : {1, 4, 8})
          for (int batch : {1, 16})
            for (int splits : {0, 1}) {
              ++id;
              if ((quick && (id % 48) != 1 && (id % 48) != 30) || skip_case(id)) continue;
              run_decode_case({D, dt, B, G, batch, splits}, id);
            }
  // Longer caches: many splits, so the split merge (partials staged in shared memory, S
  // clamped to fit) and the staged-key eviction run with realistic split counts.
  struct DT {
    int D;
    DType dt;
  };
  const DT longs[] = {{128, DType::kBF16}, {256, DType::kF32}, {72, DType::kF16}};
  for (const DT& l : longs)
    for (int B : {0, 64})
      for (int G : {4, 8})
        for (int v = 0; v < 2; ++v) {
          ++id;
          if ((quick && (id % 12) != 1 && (id % 12) != 6) || skip_case(id)) continue;
          const int batch = v == 0 ? 1 : 3, splits = v == 0 ? 64 : 0;
          run_decode_case({l.D, l.dt, B, G, batch, splits, B == 0 ? 700 : 600}, id);
        }
  // Other group sizes on the 16-bit paths: 3 and 6 (tensor cores, padded heads), 16 (CUDA cores).
  for (int G : {3, 6, 16})
    for (int D : {128, 72})
      for (DType dt : {DType::kF16, DType::kBF16})
        for (int B : {0, 64}) {
          ++id;
          if ((quick && (id % 12) != 5) || skip_case(id)) continue;
          run_decode_case({D, dt, B, G, 3, 0}, id);
        }
  // Pooled layout (head_off): append only, heads longer than the split-sizing cap.
  for (int D : Ds)
    for (DType dt : dts)
      for (int G : {1, 8})
        for (int splits : {0, 3}) {
          ++id;
          if ((quick && (id % 12) != 1) || skip_case(id)) continue;
          DecodeCase c{D, dt, splits ? 64 : 0, G, 3, splits};
          c.pooled = true;
          run_decode_case(c, id);
        }
  for (int kind = 0; kind < (g_slice_n > 0 ? 0 : 2); ++kind)
    for (int act = 0; act < 4; ++act)
      for (DType xt : dts)
        for (DType wt : dts)
          for (int n : {1, 37, 128}) {
            if (quick && (n != 37 || act != (kind ? 2 : 0))) continue;
            run_gate_case(kind, act, xt, wt, n);
          }
  std::printf("SUMMARY pass=%d fail=%d\n", g_pass, g_fail);
  return g_fail ? 1 : 0;
}

// ----------------------------------------------------------------------------------------------
// Benchmark of csrc/kernels/attention/decode.cuh (the Impl indirection lets a before/after run
// build an older kernel, renamed into another namespace, beside it: see NOTES.md).
struct ImplNew {
  using P = trimkv::decode_params_t;
  static const char* name() { return "new"; }
  static cudaError_t step(const P& p, DType dt, void* ws, cudaStream_t s) {
    return trimkv::DecodeStep(p, dt, ws, s);
  }
  static size_t ws_bytes(const P& p) { return trimkv::DecodeWorkspaceBytes(p); }
  static int splits(const P& p) { return trimkv::DecodeNumSplits(p); }
};
template <class P, class = void>
struct has_trace : std::false_type {};
template <class P>
struct has_trace<P, std::void_t<decltype(std::declval<P&>().trace)>> : std::true_type {};

/// Fills p [n] with pseudo-random bf16 values in about [-2, 2] (hash of index and seed).
__global__ void FillRandomBf16Kernel(uint16_t* p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;
    x ^= x >> 31;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27;
    const float f = (static_cast<float>(x >> 40) / 16777216.f) * 4.f - 2.f;
    p[i] = static_cast<uint16_t>(__float_as_uint(f) >> 16);
  }
}

/// Read floor: streams the same bytes as a decode step (K, V, pos, lam of one set) with 16-byte
/// loads, 4 in flight per thread, grid-stride; one word out per block so nothing is elided.
__global__ void __launch_bounds__(512)
    StreamReadKernel(const uint4* a, const uint4* b, size_t n16, const uint4* c, const uint4* d,
                     size_t m16, unsigned* out) {
  unsigned x = 0;
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x;
  for (; i + 3 * stride < n16; i += 4 * stride) {
    uint4 v[8];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      v[u] = __ldcs(a + i + u * stride);
      v[4 + u] = __ldcs(b + i + u * stride);
    }
#pragma unroll
    for (int u = 0; u < 8; ++u) x ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < n16; i += stride) {
    const uint4 v = a[i], w = b[i];
    x ^= v.x ^ w.w;
  }
  for (size_t j = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; j < m16;
       j += stride) {
    const uint4 v = c[j], w = d[j];
    x ^= v.x ^ w.y;
  }
  if (x == 0x12345678u) out[blockIdx.x] = x;
}

__global__ void EmptyKernel(unsigned* out) {
  if (out != nullptr && threadIdx.x == 1023) out[0] = 1;
}

struct RowResult {
  double us = 0, usg = 0;
  int splits = 0;
  double us1 = 0;  // an event pair around a lone call (us: back-to-back events, usg: graph)
};

static cudaDeviceProp g_prop;
static int g_clock_khz = 1755000;
static double g_copy_bw = 0;
static bool g_prof_only = false;  // prof mode: warm-up steps only (for ncu)
static int g_early = 1;  // p.prefetch_before_wait of bench steps (consecutive steps use other sets)

/// Times batch-step graphs of `fn(i)` (i = step index): median us per step over `groups`.
template <class Fn>
static double graph_time(int per, int groups, Fn fn) {
  cudaStream_t cs;
  CK(cudaStreamCreateWithFlags(&cs, cudaStreamNonBlocking));
  cudaGraph_t graph;
  cudaGraphExec_t gexec;
  CK(cudaStreamBeginCapture(cs, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < per; ++i) fn(i, cs);
  CK(cudaStreamEndCapture(cs, &graph));
  CK(cudaGraphInstantiate(&gexec, graph, 0));
  CK(cudaGraphLaunch(gexec, cs));
  CK(cudaStreamSynchronize(cs));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  std::vector<float> tg;
  for (int gi = 0; gi < groups; ++gi) {
    CK(cudaEventRecord(e0, cs));
    CK(cudaGraphLaunch(gexec, cs));
    CK(cudaEventRecord(e1, cs));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    tg.push_back(ms * 1e3f / per);
  }
  std::sort(tg.begin(), tg.end());
  CK(cudaGraphExecDestroy(gexec));
  CK(cudaGraphDestroy(graph));
  CK(cudaStreamDestroy(cs));
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
  return tg[tg.size() / 2];
}

struct BenchSets {
  struct Set {
    void *k, *v;
    int32_t *pos, *lens;
    float* lam;
  };
  std::vector<Set> sets;
  std::vector<int32_t> hlens0;
  size_t kv_bytes = 0, meta_bytes = 0;
  int cap = 0, bh = 0;
  void reset_lens() {
    for (auto& s : sets) CK(cudaMemcpy(s.lens, hlens0.data(), bh * 4, cudaMemcpyHostToDevice));
  }
  ~BenchSets() {
    for (auto& s : sets) {
      cudaFree(s.k);
      cudaFree(s.v);
      cudaFree(s.pos);
      cudaFree(s.lam);
      cudaFree(s.lens);
    }
  }
};

static const int kHq = 32, kHkv = 8, kD = 128;

/// Rotating cache sets (>= 3x L2 together) for one bench shape.
static void make_sets(BenchSets& S, int batch, int M, int B) {
  const int cap = M + B, bh = batch * kHkv;
  S.cap = cap;
  S.bh = bh;
  S.kv_bytes = static_cast<size_t>(bh) * cap * kD * 2;
  S.meta_bytes = static_cast<size_t>(bh) * cap * 4;
  const size_t set_bytes = 2 * S.kv_bytes + 2 * S.meta_bytes;
  const int nsets =
      static_cast<int>(std::max<size_t>(2, (3 * g_prop.l2CacheSize + set_bytes - 1) / set_bytes));
  std::vector<int32_t> hpos(static_cast<size_t>(bh) * cap);
  for (int b = 0; b < bh; ++b)
    for (int j = 0; j < cap; ++j) hpos[static_cast<size_t>(b) * cap + j] = j;
  std::vector<float> hlam(hpos.size());
  for (auto& x : hlam) x = static_cast<float>(std::log(0.9 + 0.1 * urand()));
  S.hlens0.assign(bh, M);  // B=0: full; B=64: M tokens, one eviction per 64 steps of a set
  S.sets.resize(nsets);
  for (auto& s : S.sets) {
    CK(cudaMalloc(&s.k, S.kv_bytes));
    CK(cudaMalloc(&s.v, S.kv_bytes));
    CK(cudaMalloc(&s.pos, S.meta_bytes));
    CK(cudaMalloc(&s.lam, S.meta_bytes));
    CK(cudaMalloc(&s.lens, bh * 4));
    FillRandomBf16Kernel<<<1024, 256>>>(static_cast<uint16_t*>(s.k), S.kv_bytes / 2, 17);
    FillRandomBf16Kernel<<<1024, 256>>>(static_cast<uint16_t*>(s.v), S.kv_bytes / 2, 29);
    CK(cudaGetLastError());
    CK(cudaMemcpy(s.pos, hpos.data(), S.meta_bytes, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(s.lam, hlam.data(), S.meta_bytes, cudaMemcpyHostToDevice));
  }
  S.reset_lens();
}

static double pct(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(q * (v.size() - 1) + 0.5))];
}

/// One decode bench row of implementation I; trace: also print one step's block timeline.
template <class I>
static RowResult bench_row(BenchSets& S, int batch, int M, int B, int fs, bool trace) {
  using P = typename I::P;
  const int bh = S.bh, cap = S.cap, nsets = static_cast<int>(S.sets.size());
  const int K = B == 0 ? 8 : 64;  // steps per timed group (B=64: one eviction per group)
  S.reset_lens();
  void *q, *kn, *vn, *out, *ws;
  float* lamn;
  int32_t* positions;
  CK(cudaMalloc(&q, static_cast<size_t>(batch) * kHq * kD * 2));
  CK(cudaMalloc(&out, static_cast<size_t>(batch) * kHq * kD * 2));
  CK(cudaMalloc(&kn, static_cast<size_t>(bh) * kD * 2));
  CK(cudaMalloc(&vn, static_cast<size_t>(bh) * kD * 2));
  CK(cudaMalloc(&lamn, bh * 4));
  CK(cudaMalloc(&positions, batch * 4));
  std::vector<uint16_t> hq(static_cast<size_t>(batch) * kHq * kD);
  for (auto& x : hq) x = float_to_bf16(static_cast<float>(nrand()));
  CK(cudaMemcpy(q, hq.data(), hq.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(kn, hq.data(), static_cast<size_t>(bh) * kD * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(vn, hq.data(), static_cast<size_t>(bh) * kD * 2, cudaMemcpyHostToDevice));
  std::vector<float> hl(bh, -0.01f);
  CK(cudaMemcpy(lamn, hl.data(), bh * 4, cudaMemcpyHostToDevice));
  std::vector<int32_t> hp(batch, cap + 10);
  CK(cudaMemcpy(positions, hp.data(), batch * 4, cudaMemcpyHostToDevice));
  P p;
  p.q = q;
  p.k_new = kn;
  p.v_new = vn;
  p.lam_new = lamn;
  p.positions = positions;
  p.out = out;
  p.batch = batch;
  p.q_heads = kHq;
  p.kv_heads = kHkv;
  p.head_dim = kD;
  p.memory = M;
  p.buffer = B;
  p.cap = cap;
  p.window = 0;
  p.knorm = false;
  p.scale = 1.f / std::sqrt(128.f);
  p.num_splits = fs;
  p.prefetch_before_wait = g_early;
  const size_t wsb = I::ws_bytes(p);
  CK(cudaMalloc(&ws, wsb));
  CK(cudaMemset(ws, 0, wsb));
  int cur = 0;
  auto set_p = [&]() {
    auto& s = S.sets[cur];
    cur = (cur + 1) % nsets;
    p.k_cache = s.k;
    p.v_cache = s.v;
    p.pos_cache = s.pos;
    p.lam_cache = s.lam;
    p.lens = s.lens;
  };
  auto step = [&](cudaStream_t st) {
    set_p();
    CK(I::step(p, DType::kBF16, ws, st));
  };
  for (int i = 0; i < nsets * 2; ++i) step(0);
  CK(cudaDeviceSynchronize());
  if (g_prof_only) {
    cudaFree(q);
    cudaFree(out);
    cudaFree(kn);
    cudaFree(vn);
    cudaFree(lamn);
    cudaFree(positions);
    cudaFree(ws);
    return RowResult{1, 1, I::splits(p)};
  }
  const int groups = 25;
  const int per = std::max(K, nsets);
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  std::vector<float> t;
  for (int gi = 0; gi < groups; ++gi) {
    CK(cudaEventRecord(e0));
    for (int i = 0; i < per; ++i) step(0);
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    t.push_back(ms * 1e3f / per);
  }
  std::sort(t.begin(), t.end());
  RowResult r;
  r.us = t[t.size() / 2];
  {  // lone calls: an event pair around each, the GPU idle in between
    std::vector<float> t1;
    for (int i = 0; i < 50; ++i) {
      CK(cudaDeviceSynchronize());
      CK(cudaEventRecord(e0));
      step(0);
      CK(cudaEventRecord(e1));
      CK(cudaEventSynchronize(e1));
      float ms;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      t1.push_back(ms * 1e3f);
    }
    std::sort(t1.begin(), t1.end());
    r.us1 = t1[t1.size() / 2];
  }
  r.usg = graph_time(per, groups, [&](int, cudaStream_t st) { step(st); });
  r.splits = I::splits(p);
  if constexpr (has_trace<P>::value) {
    if (trace) {
      const int nblk = r.splits * bh;
      unsigned long long* dtr;
      CK(cudaMalloc(&dtr, static_cast<size_t>(nblk) * 8 * 8));
      // A few traced steps on rotating sets; print the last (warm instruction cache).
      for (int rep = 0; rep < 3; ++rep) {
        CK(cudaMemset(dtr, 0, static_cast<size_t>(nblk) * 64));
        p.trace = dtr;
        step(0);
        p.trace = nullptr;
        CK(cudaDeviceSynchronize());
      }
      std::vector<unsigned long long> h(static_cast<size_t>(nblk) * 8);
      CK(cudaMemcpy(h.data(), dtr, h.size() * 8, cudaMemcpyDeviceToHost));
      unsigned long long t0 = ~0ull;
      for (int i = 0; i < nblk; ++i) t0 = std::min(t0, h[i * 8]);
      std::vector<double> ev[6], wait;
      double last_exit = 0, merger_exit = 0;
      for (int i = 0; i < nblk; ++i) {
        for (int k = 0; k < 6; ++k)
          if (h[i * 8 + k]) ev[k].push_back((h[i * 8 + k] - t0) * 1e-3);
        if (h[i * 8 + 5]) last_exit = std::max(last_exit, (h[i * 8 + 5] - t0) * 1e-3);
        if ((h[i * 8 + 7] >> 32) & 1)
          merger_exit = std::max(merger_exit, (h[i * 8 + 5] - t0) * 1e-3);
        wait.push_back(h[i * 8 + 6] / (g_clock_khz * 1e-3));
      }
      const char* names[6] = {"entry", "lenknown", "tile0", "loopend", "prefin", "exit"};
      std::printf("  trace %s b%d M%d B%d S%d (%d blocks, us from first entry, min/med/max):",
                  I::name(), batch, M, B, r.splits, nblk);
      for (int k = 0; k < 6; ++k)
        std::printf(" %s %.2f/%.2f/%.2f", names[k], pct(ev[k], 0), pct(ev[k], 0.5), pct(ev[k], 1));
      std::printf(" | wait(us@base clk) med %.2f max %.2f | last exit %.2f merger exit %.2f\n",
                  pct(wait, 0.5), pct(wait, 1), last_exit, merger_exit);
      cudaFree(dtr);
    }
  }
  cudaFree(q);
  cudaFree(out);
  cudaFree(kn);
  cudaFree(vn);
  cudaFree(lamn);
  cudaFree(positions);
  cudaFree(ws);
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
  return r;
}

/// Floors for one shape: a read kernel over the same bytes, and an empty launch, per graph step.
static void floors(BenchSets& S, int splits, double* read_us, double* empty_us) {
  const int nsets = static_cast<int>(S.sets.size());
  const int per = std::max(8, nsets);
  unsigned* dout;
  CK(cudaMalloc(&dout, 65536 * 4));
  int cur = 0;
  *read_us = graph_time(per, 25, [&](int, cudaStream_t st) {
    auto& s = S.sets[cur];
    cur = (cur + 1) % nsets;
    StreamReadKernel<<<g_prop.multiProcessorCount * 4, 512, 0, st>>>(
        static_cast<const uint4*>(s.k), static_cast<const uint4*>(s.v), S.kv_bytes / 16,
        reinterpret_cast<const uint4*>(s.pos), reinterpret_cast<const uint4*>(s.lam),
        S.meta_bytes / 16, dout);
    CK(cudaGetLastError());
  });
  *empty_us = graph_time(per, 25, [&](int, cudaStream_t st) {
    EmptyKernel<<<dim3(splits, kHkv, S.bh / kHkv), 256, 0, st>>>(nullptr);
    CK(cudaGetLastError());
  });
  cudaFree(dout);
}

static int run_bench(const int* only, bool trace_all) {
  CK(cudaGetDeviceProperties(&g_prop, 0));
  CK(cudaDeviceGetAttribute(&g_clock_khz, cudaDevAttrClockRate, 0));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  // Copy bandwidth: 1 GiB device-to-device, read + write bytes.
  if (!g_prof_only) {
    const size_t n = 1ull << 30;
    void *a, *b;
    CK(cudaMalloc(&a, n));
    CK(cudaMalloc(&b, n));
    CK(cudaMemset(a, 1, n));
    std::vector<float> t;
    for (int i = 0; i < 25; ++i) {
      CK(cudaEventRecord(e0));
      CK(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice));
      CK(cudaEventRecord(e1));
      CK(cudaEventSynchronize(e1));
      float ms;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      if (i >= 5) t.push_back(ms);
    }
    std::sort(t.begin(), t.end());
    g_copy_bw = 2.0 * n / (t[t.size() / 2] * 1e-3);
    cudaFree(a);
    cudaFree(b);
  }
  std::printf("device %s, %d SMs, L2 %d MB, clock %d MHz, copy bandwidth (read+write) %.0f GB/s\n",
              g_prop.name, g_prop.multiProcessorCount, g_prop.l2CacheSize >> 20, g_clock_khz / 1000,
              g_copy_bw / 1e9);
  std::printf(
      "bytes = batch*Hkv*avg_len*(2*D*2 + 8); frac = of copy bandwidth; us = events around "
      "back-to-back launches, g_us = CUDA graph replay (device time per step)\n");
  std::printf("%5s %5s %3s | %3s %8s %8s %6s | %8s %6s %7s\n", "batch", "M", "B", "S", "new_us",
              "new_g_us", "frac", "read_gus", "frac", "empty_g");
  auto row = [&](int batch, int M, int B, int fs, bool trace) {
    BenchSets S;
    make_sets(S, batch, M, B);
    const RowResult rn = bench_row<ImplNew>(S, batch, M, B, fs, trace);
    double read_us = 1, empty_us = 1;
    if (!g_prof_only) floors(S, rn.splits, &read_us, &empty_us);
    const double avg_len = B == 0 ? M : M + B / 2.0;
    const double bytes = static_cast<double>(S.bh) * avg_len * (2.0 * kD * 2 + 8.0);
    auto frac = [&](double us) { return bytes / (us * 1e-6) / g_copy_bw; };
    const double read_bytes = static_cast<double>(S.bh) * (M + B) * (2.0 * kD * 2 + 8.0);
    std::printf("%5d %5d %3d | %3d %8.2f %8.2f %6.3f | %8.2f %6.3f %7.2f\n", batch, M, B, rn.splits,
                rn.us, rn.usg, frac(rn.usg), read_us, read_bytes / (read_us * 1e-6) / g_copy_bw,
                empty_us);
    std::fflush(stdout);
  };
  if (only != nullptr) {  // bench batch M B splits: one row (for ncu)
    row(only[0], only[1], only[2], only[3], trace_all);
    return 0;
  }
  for (int B : {0, 64})
    for (int M : {512, 2048, 8192})
      for (int batch : {1, 8, 32, 128}) row(batch, M, B, 0, trace_all);
  std::printf("forced split counts (> 16: arrival-counter merge instead of a cluster):\n");
  for (int fs : {4, 16}) row(1, 512, 0, fs, trace_all);
  for (int fs : {16, 32}) row(1, 2048, 0, fs, trace_all);
  for (int fs : {16, 32}) row(1, 8192, 0, fs, trace_all);
  for (int fs : {2}) row(8, 2048, 0, fs, trace_all);
  for (int fs : {2}) row(8, 8192, 64, fs, trace_all);
  for (int fs : {2}) row(16, 2048, 0, fs, trace_all);
  return 0;
}

/// A/B of the launch options on a few rows, variants interleaved twice (drift shows as a
/// difference between the two rounds): base = tiles before the wait + clusters + PDL.
static int run_ab() {
  CK(cudaGetDeviceProperties(&g_prop, 0));
  struct V {
    const char* name;
    int early, diag;
  };
  const V vs[] = {{"base", 1, 0},   {"no-early", 0, 0}, {"no-cluster", 1, 1},
                  {"no-pdl", 1, 2}, {"cl-all", 1, 4},   {"cl-all-no-pdl", 1, 6}};
  const int rows[][3] = {{1, 512, 0},  {8, 512, 0},   {8, 2048, 0}, {8, 4096, 0},
                         {8, 8192, 0}, {8, 8192, 64}, {4, 8192, 0}, {32, 2048, 0}};
  std::printf("ab: lone call (event pair) / back-to-back events / graph replay, us per step\n");
  for (const auto& r : rows) {
    BenchSets S;
    make_sets(S, r[0], r[1], r[2]);
    std::printf("b%d M%d B%d:", r[0], r[1], r[2]);
    for (int round = 0; round < 2; ++round)
      for (const V& v : vs) {
        g_early = v.early;
        trimkv::decode_detail::g_launch_diag = v.diag;
        const RowResult x = bench_row<ImplNew>(S, r[0], r[1], r[2], 0, false);
        std::printf(" %s %.2f/%.2f/%.2f", v.name, x.us1, x.us, x.usg);
      }
    std::printf("\n");
    std::fflush(stdout);
  }
  g_early = 1;
  trimkv::decode_detail::g_launch_diag = 0;
  return 0;
}

/// Split counts x cluster on / off for the small batches (the split policy's data), B = 0.
static int run_sweep() {
  CK(cudaGetDeviceProperties(&g_prop, 0));
  struct R {
    int batch;
    std::vector<int> splits;
  };
  const R rows[] = {
      {1, {4, 8, 16}}, {2, {4, 8, 16}}, {4, {2, 4, 8}}, {8, {2, 3, 4, 8}}, {16, {1, 2}}};
  std::printf(
      "sweep: us = events around back-to-back launches / g_us = graph replay, per step;"
      " cl = thread-block cluster merge, ctr = arrival-counter merge\n");
  for (const R& r : rows)
    for (int M : {512, 2048, 8192}) {
      BenchSets S;
      make_sets(S, r.batch, M, 0);
      std::printf("b%d M%d (auto S %d):", r.batch, M, [&] {
        trimkv::decode_params_t p;
        p.batch = r.batch;
        p.q_heads = kHq;
        p.kv_heads = kHkv;
        p.head_dim = kD;
        p.memory = M;
        p.buffer = 0;
        p.cap = M;
        return trimkv::DecodeNumSplits(p);
      }());
      for (int fs : r.splits)
        for (int diag : {4, 1}) {  // clusters wherever they fit / never
          trimkv::decode_detail::g_launch_diag = diag;
          const RowResult x = bench_row<ImplNew>(S, r.batch, M, 0, fs, false);
          std::printf(" S%d%s %.2f/%.2f", fs, diag == 1 ? "ctr" : "cl", x.us, x.usg);
        }
      std::printf("\n");
      std::fflush(stdout);
    }
  trimkv::decode_detail::g_launch_diag = 0;
  return 0;
}

int main(int argc, char** argv) {
  rng.seed(12345);
  const std::string mode = argc > 1 ? argv[1] : "test";
  if (mode == "ab") return run_ab();
  if (mode == "sweep") return run_sweep();
  if (mode == "prof") g_prof_only = true;
  if (mode == "bench" || mode == "trace" || mode == "prof") {
    int only[4];
    if (argc > 5) {
      for (int i = 0; i < 4; ++i) only[i] = std::atoi(argv[2 + i]);
      return run_bench(only, mode == "trace");
    }
    return run_bench(nullptr, mode == "trace");
  }
  const bool quick = argc > 2 && std::string(argv[2]) == "quick";
  if (argc > 4 && std::string(argv[2]) == "slice") {
    g_slice_k = std::atoi(argv[3]);
    g_slice_n = std::atoi(argv[4]);
  }
  return run_tests(quick);
}
