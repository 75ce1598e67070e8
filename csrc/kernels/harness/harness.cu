// Standalone test and benchmark for the TRIM-KV decode and retention-gate kernels.
//   harness test [quick]   correctness vs a float64 CPU reference (exit code 1 on failure)
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
#include <vector>

#include "../decode.cuh"
#include "../retention_gate.cuh"

using namespace trimkv;

#define CK(x)                                                                      \
  do {                                                                             \
    cudaError_t e_ = (x);                                                          \
    if (e_ != cudaSuccess) {                                                       \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x,               \
                   cudaGetErrorString(e_));                                        \
      std::exit(2);                                                                \
    }                                                                              \
  } while (0)

static std::mt19937_64 rng(12345);
static double urand() { return std::uniform_real_distribution<double>(0, 1)(rng); }
static double nrand() { return std::normal_distribution<double>(0, 1)(rng); }

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
  int splits;  // 0 auto
  int M = 0;   // 0: 100 (B=0) / 60 (B=64)
};

static int g_fail = 0, g_pass = 0;

static bool run_decode_case(const DecodeCase& c, int case_id) {
  const int D = c.D, kvh = 2, Hq = c.G * kvh, batch = c.batch;
  const int M = c.M > 0 ? c.M : c.B == 0 ? 100 : 60, B = c.B, cap = M + B;
  const int W = (case_id % 3 == 1) ? 3 : 0;
  const bool knorm = (case_id % 2) == 1;
  const int steps = B == 0 ? 40 : 110;
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
  for (int b = 0; b < batch; ++b) {
    const int len0 = static_cast<int>(urand() * (B == 0 ? M + 1 : cap));
    const int p0 = len0 + static_cast<int>(urand() * 50);
    seqpos[b] = p0;
    for (int h = 0; h < kvh; ++h) {
      const int bh = b * kvh + h;
      // distinct positions < p0
      std::vector<int> all(p0);
      std::iota(all.begin(), all.end(), 0);
      std::shuffle(all.begin(), all.end(), rng);
      hlens[bh] = len0;
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
        ref[bh].push_back(std::move(t));
      }
    }
  }
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
  p.k_cache = dk; p.v_cache = dv; p.pos_cache = dpos; p.lam_cache = dlam;
  p.lognorm_cache = knorm ? dln : nullptr; p.lens = dlens;
  p.q = dq; p.k_new = dkn; p.v_new = dvn; p.lam_new = dlamnew; p.positions = dpositions;
  p.out = dout; p.batch = batch; p.q_heads = Hq; p.kv_heads = kvh; p.head_dim = D;
  p.memory = M; p.buffer = B; p.cap = cap; p.window = W; p.knorm = knorm;
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
    if (e != cudaSuccess) { ok = false; why = std::string("launch: ") + cudaGetErrorString(e); break; }
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
          for (int j = 0; j < n; ++j) { lg[j] = std::exp(lg[j] - mx); sum += lg[j]; }
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
        if (B == 0) {
          if (static_cast<int>(L.size()) < M) {
            L.push_back(std::move(t));
          } else {
            int victim = -1;  // -1: the new token
            const RefTok* worst_t = &t;
            for (int j = 0; j < static_cast<int>(L.size()); ++j)
              if (keep_before(*worst_t, L[j], T, W, knorm)) { worst_t = &L[j]; victim = j; }
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
      for (int j = 0; j < glens[bh]; ++j) a.push_back(gpos[bh * cap + j]);
      for (auto& t : ref[bh]) r.push_back(t.pos);
      std::sort(a.begin(), a.end());
      std::sort(r.begin(), r.end());
      if (a != r) { ok = false; why = "step " + std::to_string(step) + ": retained set differs"; }
    }
  }
  std::printf("%s decode D=%3d %-4s M=%4d B=%2d G=%d batch=%2d splits=%d(%2d) W=%d knorm=%d worst=%.2e%s%s\n",
              ok ? "PASS" : "FAIL", D, dtype_name(dt), M, B, c.G, batch, c.splits, S, W, knorm,
              worst, ok ? "" : " : ", why.c_str());
  cudaFree(dk); cudaFree(dv); cudaFree(dpos); cudaFree(dlam); cudaFree(dln); cudaFree(dlens);
  cudaFree(dq); cudaFree(dkn); cudaFree(dvn); cudaFree(dout); cudaFree(dlamnew);
  cudaFree(dpositions); cudaFree(dws);
  (ok ? g_pass : g_fail)++;
  return ok;
}

static double act_ref(double u, int act) {
  switch (act) {
    case 0: return u / (1 + std::exp(-u));
    case 1: return 0.5 * u * (1 + std::erf(u / std::sqrt(2.0)));
    case 2: return 0.5 * u * (1 + std::tanh(std::sqrt(2 / M_PI) * (u + 0.044715 * u * u * u)));
    default: return std::max(u, 0.0);
  }
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
  g.kind = kind; g.act = act; g.n = n; g.in_dim = in; g.inter = I; g.kv_heads = H;
  g.x = dx; g.x_dtype = xt; g.w_dtype = wt;
  if (kind == kGateMlp) { g.w1 = dw1; g.b1 = db1; g.w2 = dw2; }
  else { g.w_gate = dw1; g.w_up = dwu; g.w_down = dw2; }
  g.bias = dbias; g.lam = dlam;
  void* ws;
  CK(cudaMalloc(&ws, RetentionGateWorkspaceBytes(g)));
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
  std::printf("%s gate kind=%d act=%d x=%s w=%s n=%3d rel=%.2e\n", ok ? "PASS" : "FAIL", kind,
              act, dtype_name(xt), dtype_name(wt), n, rel);
  (ok ? g_pass : g_fail)++;
  cudaFree(dx); cudaFree(dw1); cudaFree(dwu); cudaFree(db1); cudaFree(dw2); cudaFree(dbias);
  cudaFree(dlam); cudaFree(ws);
}

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
              if (quick && (id % 48) != 1 && (id % 48) != 30) continue;
              run_decode_case({D, dt, B, G, batch, splits}, id);
            }
  // Longer caches: many splits, so the split merge (partials staged in shared memory, S
  // clamped to fit) and the staged-key eviction run with realistic split counts.
  struct DT { int D; DType dt; };
  const DT longs[] = {{128, DType::kBF16}, {256, DType::kF32}, {72, DType::kF16}};
  for (const DT& l : longs)
    for (int B : {0, 64})
      for (int G : {4, 8})
        for (int v = 0; v < 2; ++v) {
          ++id;
          if (quick && (id % 12) != 1 && (id % 12) != 6) continue;
          const int batch = v == 0 ? 1 : 3, splits = v == 0 ? 64 : 0;
          run_decode_case({l.D, l.dt, B, G, batch, splits, B == 0 ? 700 : 600}, id);
        }
  for (int kind : {0, 1})
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
/// Fills p [n] with pseudo-random bf16 values in about [-2, 2] (hash of index and seed).
__global__ void FillRandomBf16Kernel(uint16_t* p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;
    x ^= x >> 31; x *= 0xBF58476D1CE4E5B9ull; x ^= x >> 27;
    const float f = (static_cast<float>(x >> 40) / 16777216.f) * 4.f - 2.f;
    p[i] = static_cast<uint16_t>(__float_as_uint(f) >> 16);
  }
}

static int run_bench(const int* only) {
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  // Copy bandwidth: 1 GiB device-to-device, read + write bytes.
  double copy_bw;
  {
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
    copy_bw = 2.0 * n / (t[t.size() / 2] * 1e-3);
    cudaFree(a);
    cudaFree(b);
  }
  std::printf("device %s, %d SMs, L2 %d MB, copy bandwidth (read+write) %.0f GB/s\n", prop.name,
              prop.multiProcessorCount, prop.l2CacheSize >> 20, copy_bw / 1e9);
  std::printf("%6s %6s %4s %7s %10s %10s %8s %10s %10s %8s\n", "batch", "M", "B", "splits",
              "us/step", "GB/s", "frac", "graph_us", "graph_GB/s", "frac");
  const int Hq = 32, Hkv = 8, D = 128;
  const DType dt = DType::kBF16;
  // One table row; fs > 0 forces the split count (extra rows after the table).
  auto row = [&](int batch, int M, int B, int fs) {
        const int cap = M + B, bh = batch * Hkv;
        const size_t kv_bytes = static_cast<size_t>(bh) * cap * D * 2;
        const size_t set_bytes = 2 * kv_bytes + static_cast<size_t>(bh) * cap * 8;
        const int nsets =
            static_cast<int>(std::max<size_t>(2, (3 * prop.l2CacheSize + set_bytes - 1) / set_bytes));
        const int K = B == 0 ? 8 : 64;  // steps per timed group (B=64: one eviction per group)
        struct Set { void *k, *v; int32_t *pos, *lens; float* lam; };
        std::vector<Set> sets(nsets);
        std::vector<int32_t> hpos(static_cast<size_t>(bh) * cap);
        for (int b = 0; b < batch; ++b)
          for (int hh = 0; hh < Hkv; ++hh)
            for (int j = 0; j < cap; ++j) hpos[(static_cast<size_t>(b) * Hkv + hh) * cap + j] = j;
        std::vector<float> hlam(hpos.size());
        for (auto& x : hlam) x = static_cast<float>(std::log(0.9 + 0.1 * urand()));
        for (auto& s : sets) {
          CK(cudaMalloc(&s.k, kv_bytes));
          CK(cudaMalloc(&s.v, kv_bytes));
          CK(cudaMalloc(&s.pos, hpos.size() * 4));
          CK(cudaMalloc(&s.lam, hpos.size() * 4));
          CK(cudaMalloc(&s.lens, bh * 4));
          FillRandomBf16Kernel<<<1024, 256>>>(static_cast<uint16_t*>(s.k), kv_bytes / 2, 17);
          FillRandomBf16Kernel<<<1024, 256>>>(static_cast<uint16_t*>(s.v), kv_bytes / 2, 29);
          CK(cudaGetLastError());
          CK(cudaMemcpy(s.pos, hpos.data(), hpos.size() * 4, cudaMemcpyHostToDevice));
          CK(cudaMemcpy(s.lam, hlam.data(), hpos.size() * 4, cudaMemcpyHostToDevice));
          // B=0: full; B=64: M tokens, so every K=64 steps of one set contain one eviction.
          std::vector<int32_t> l(bh, M);
          CK(cudaMemcpy(s.lens, l.data(), bh * 4, cudaMemcpyHostToDevice));
        }
        void *q, *kn, *vn, *out, *ws;
        float* lamn;
        int32_t* positions;
        CK(cudaMalloc(&q, static_cast<size_t>(batch) * Hq * D * 2));
        CK(cudaMalloc(&out, static_cast<size_t>(batch) * Hq * D * 2));
        CK(cudaMalloc(&kn, static_cast<size_t>(bh) * D * 2));
        CK(cudaMalloc(&vn, static_cast<size_t>(bh) * D * 2));
        CK(cudaMalloc(&lamn, bh * 4));
        CK(cudaMalloc(&positions, batch * 4));
        std::vector<uint16_t> hq(static_cast<size_t>(batch) * Hq * D);
        for (auto& x : hq) x = float_to_bf16(static_cast<float>(nrand()));
        CK(cudaMemcpy(q, hq.data(), hq.size() * 2, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(kn, hq.data(), static_cast<size_t>(bh) * D * 2, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(vn, hq.data(), static_cast<size_t>(bh) * D * 2, cudaMemcpyHostToDevice));
        std::vector<float> hl(bh, -0.01f);
        CK(cudaMemcpy(lamn, hl.data(), bh * 4, cudaMemcpyHostToDevice));
        std::vector<int32_t> hp(batch, cap + 10);
        CK(cudaMemcpy(positions, hp.data(), batch * 4, cudaMemcpyHostToDevice));
        decode_params_t p;
        p.q = q; p.k_new = kn; p.v_new = vn; p.lam_new = lamn; p.positions = positions;
        p.out = out; p.batch = batch; p.q_heads = Hq; p.kv_heads = Hkv; p.head_dim = D;
        p.memory = M; p.buffer = B; p.cap = cap; p.window = 0; p.knorm = false;
        p.scale = 1.f / std::sqrt(128.f);
        p.num_splits = fs;
        CK(cudaMalloc(&ws, DecodeWorkspaceBytes(p)));
        CK(cudaMemset(ws, 0, DecodeWorkspaceBytes(p)));
        int cur = 0;
        auto step = [&]() {
          Set& s = sets[cur];
          cur = (cur + 1) % nsets;
          p.k_cache = s.k; p.v_cache = s.v; p.pos_cache = s.pos; p.lam_cache = s.lam;
          p.lens = s.lens;
          CK(DecodeStep(p, dt, ws, 0));
        };
        // Warm-up, then groups of K * nsets steps so that every set passes K steps.
        for (int i = 0; i < nsets * 2; ++i) step();
        CK(cudaDeviceSynchronize());
        std::vector<float> t;
        const int groups = 50;
        const int per = std::max(K, nsets);
        for (int gi = 0; gi < groups; ++gi) {
          CK(cudaEventRecord(e0));
          for (int i = 0; i < per; ++i) step();
          CK(cudaEventRecord(e1));
          CK(cudaEventSynchronize(e1));
          float ms;
          CK(cudaEventElapsedTime(&ms, e0, e1));
          t.push_back(ms * 1e3f / per);
        }
        std::sort(t.begin(), t.end());
        const double us = t[t.size() / 2];
        // The same steps replayed from a CUDA graph: device time without host launch cost.
        cudaStream_t cs;
        CK(cudaStreamCreateWithFlags(&cs, cudaStreamNonBlocking));
        cudaGraph_t graph;
        cudaGraphExec_t gexec;
        CK(cudaStreamBeginCapture(cs, cudaStreamCaptureModeThreadLocal));
        for (int i = 0; i < per; ++i) {
          Set& s = sets[cur];
          cur = (cur + 1) % nsets;
          p.k_cache = s.k; p.v_cache = s.v; p.pos_cache = s.pos; p.lam_cache = s.lam;
          p.lens = s.lens;
          CK(DecodeStep(p, dt, ws, cs));
        }
        CK(cudaStreamEndCapture(cs, &graph));
        CK(cudaGraphInstantiate(&gexec, graph, 0));
        CK(cudaGraphLaunch(gexec, cs));
        CK(cudaStreamSynchronize(cs));
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
        const double usg = tg[tg.size() / 2];
        CK(cudaGraphExecDestroy(gexec));
        CK(cudaGraphDestroy(graph));
        CK(cudaStreamDestroy(cs));
        const double avg_len = B == 0 ? M : M + B / 2.0;
        const double bytes = static_cast<double>(bh) * avg_len * (2.0 * D * 2 + 8.0);
        const double bw = bytes / (us * 1e-6);
        const double bwg = bytes / (usg * 1e-6);
        std::printf("%6d %6d %4d %7d %10.2f %10.0f %8.3f %10.2f %10.0f %8.3f\n", batch, M, B,
                    DecodeNumSplits(p), us, bw / 1e9, bw / copy_bw, usg, bwg / 1e9,
                    bwg / copy_bw);
        for (auto& s : sets) {
          cudaFree(s.k); cudaFree(s.v); cudaFree(s.pos); cudaFree(s.lam); cudaFree(s.lens);
        }
        cudaFree(q); cudaFree(out); cudaFree(kn); cudaFree(vn); cudaFree(lamn);
        cudaFree(positions); cudaFree(ws);
  };
  if (only != nullptr) {  // bench only batch M B splits: one row (for ncu)
    row(only[0], only[1], only[2], only[3]);
    return 0;
  }
  for (int B : {0, 64})
    for (int M : {512, 2048, 8192})
      for (int batch : {1, 8, 32, 128}) row(batch, M, B, 0);
  std::printf("forced split counts:\n");
  for (int fs : {5, 17}) row(1, 512, 0, fs);
  for (int fs : {17}) row(1, 2048, 0, fs);
  for (int fs : {16}) row(1, 8192, 0, fs);
  return 0;
}

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "test";
  if (mode == "bench") {
    int only[4];
    if (argc > 5) {
      for (int i = 0; i < 4; ++i) only[i] = std::atoi(argv[2 + i]);
      return run_bench(only);
    }
    return run_bench(nullptr);
  }
  const bool quick = argc > 2 && std::string(argv[2]) == "quick";
  return run_tests(quick);
}
