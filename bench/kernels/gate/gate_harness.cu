// Standalone test and benchmark for the retention-gate kernels (SPEC.md section 3).
//   gate_harness test    correctness vs a float64 CPU reference (exit code 1 on failure)
//   gate_harness bench   rg / rg3 timing table vs device-to-device copy bandwidth (lone call,
//                        CUDA graph, burst of calls over rotating layers; the rows kernel vs
//                        the former one-pass plan), then a sweep of forced launch plans (tile
//                        configuration x K splits, rows per block); `bench decode`: decode
//                        sizes only
//   gate_harness floor   floors of any per-layer gate kernel timed back to back
// The gate plan header (kernels/gate/plan.h) lets the tests and the sweep force a plan.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "bench/kernels/common.h"
#include "kernels/gate/plan.h"

using namespace trimkv;
using namespace trimkv::gate_detail;
using namespace harness;

static const char* kCfgNames[] = {"skinny8", "skinny16", "skinny32", "skinny64", "big", "huge"};

/// rows/R<rows per block>; else cfg/S<splits>, then /1p for one pass (nothing: hidden kernel +
/// finishing kernel).
static std::string plan_name(const gate_plan_t& pl) {
  if (pl.cfg == kRowsCfg) return "rows/R" + std::to_string(pl.rows);
  return std::string(pl.cfg == kFmaCfg ? "fma" : kCfgNames[pl.cfg]) + "/S" +
         std::to_string(pl.splits) + (pl.one_pass ? "/1p" : "");
}

// ---------------------------------------------------------------------------------------------
// Test

struct Shape {
  int in, inter, heads;
  bool b1, bias;
};

/// A forced plan: cfg -2 = the public API (automatic plan), kFmaCfg = the FMA path, kRowsCfg =
/// the rows kernel (splits > 0: rows per block), kTcAuto = the automatic tensor-core plan (at
/// n <= 8 the former automatic one-pass plan), else a tensor-core configuration; splits 0 =
/// automatic; pdl false launches the finisher (or the one-pass / rows kernel) in plain stream
/// order even on sm_90; two_kernel forces the hidden kernel + finisher where the plan would be
/// one pass.
struct Force {
  int cfg = -2;
  int splits = 0;
  bool pdl = true;
  bool two_kernel = false;
};

constexpr int kTcAuto = -1;  // Force::cfg: tc_plan's automatic choice

static int g_cc_major = 0;
static int g_smem_optin = 0;

static int g_pass = 0, g_fail = 0;
static double g_worst[3] = {0, 0, 0};  // by the looser of the two dtypes

static DType looser(DType a, DType b) {
  if (a == DType::kBF16 || b == DType::kBF16) return DType::kBF16;
  if (a == DType::kF16 || b == DType::kF16) return DType::kF16;
  return DType::kF32;
}

/// Random tensor of cnt elements in dtype t (scale sc); returns the device copy and fills
/// `vals` with the stored (rounded) values as double.
static void* make_tensor(size_t cnt, DType t, double sc, std::vector<double>& vals) {
  std::normal_distribution<double> nd(0, 1);
  std::vector<uint8_t> buf(cnt * dtype_size(t));
  vals.resize(cnt);
  for (size_t i = 0; i < cnt; ++i) {
    store_from_float(buf.data(), t, i, static_cast<float>(nd(rng) * sc));
    vals[i] = load_as_float(buf.data(), t, i);
  }
  void* d;
  CK(cudaMalloc(&d, std::max<size_t>(buf.size(), 16)));
  CK(cudaMemcpy(d, buf.data(), buf.size(), cudaMemcpyHostToDevice));
  return d;
}

/// A gate under test: device weights and their stored values as double.
struct TestGate {
  int kind = kGateMlp, act = 0;
  DType xt = DType::kF32, wt = DType::kF32;
  Shape s{};
  std::vector<double> W1, Wu, B1, W2, Bias;
  void *dw1 = nullptr, *dwu = nullptr, *db1 = nullptr, *dw2 = nullptr, *dbias = nullptr;
  void* ws = nullptr;  // grown (and re-zeroed) like gate_cuda.cu's
  size_t ws_bytes = 0;
};

static TestGate make_gate(int kind, int act, DType xt, DType wt, const Shape& s) {
  TestGate g;
  g.kind = kind;
  g.act = act;
  g.xt = xt;
  g.wt = wt;
  g.s = s;
  const bool glu = kind == kGateGlu;
  const int in = s.in, I = s.inter, H = s.heads;
  g.dw1 = make_tensor(static_cast<size_t>(I) * in, wt, 1.0 / std::sqrt(in), g.W1);
  if (glu) g.dwu = make_tensor(static_cast<size_t>(I) * in, wt, 1.0 / std::sqrt(in), g.Wu);
  if (!glu && s.b1) g.db1 = make_tensor(I, wt, 0.5, g.B1);
  g.dw2 = make_tensor(static_cast<size_t>(H) * I, wt, 2.0 / std::sqrt(I), g.W2);
  if (s.bias) g.dbias = make_tensor(H, wt, 2.0, g.Bias);
  return g;
}

static void free_gate(TestGate& g) {
  for (void* p : {g.dw1, g.dwu, g.db1, g.dw2, g.dbias, g.ws}) cudaFree(p);
  g = TestGate();
}

static gate_params_t params_of(const TestGate& tg, int n, const void* dx, float* dlam) {
  gate_params_t g;
  const bool glu = tg.kind == kGateGlu;
  g.kind = tg.kind;
  g.act = tg.act;
  g.n = n;
  g.in_dim = tg.s.in;
  g.inter = tg.s.inter;
  g.kv_heads = tg.s.heads;
  g.x = dx;
  g.x_dtype = tg.xt;
  g.w_dtype = tg.wt;
  if (glu) {
    g.w_gate = tg.dw1;
    g.w_up = tg.dwu;
    g.w_down = tg.dw2;
  } else {
    g.w1 = tg.dw1;
    g.b1 = tg.db1;
    g.w2 = tg.dw2;
  }
  g.bias = tg.dbias;
  g.lam = dlam;
  return g;
}

/// NaN-poisons the workspace past its arrival counters (a partial nobody wrote poisons lam),
/// in stream order; the counters are left alone: they must be zero already.
static void poison_data(const TestGate& tg, const gate_params_t& g) {
  const size_t cb = counter_bytes(g);
  if (tg.ws_bytes > cb)
    CK(cudaMemsetAsync(static_cast<char*>(tg.ws) + cb, 0xff, tg.ws_bytes - cb, 0));
}

/// Makes the gate's workspace at least `bytes`, as gate_cuda.cu does (free, allocate, zero),
/// then poisons everything past the counters.
static void ensure_ws(TestGate& tg, const gate_params_t& g, size_t bytes) {
  if (tg.ws != nullptr && tg.ws_bytes >= bytes) return;
  cudaFree(tg.ws);
  CK(cudaMalloc(&tg.ws, bytes));
  tg.ws_bytes = bytes;
  CK(cudaMemsetAsync(tg.ws, 0, bytes, 0));
  poison_data(tg, g);
}

/// FAILs unless the gate's arrival counters are all zero (every call must leave them so).
static bool counters_zero(const TestGate& tg, const gate_params_t& g, const char* what) {
  if (tg.ws == nullptr) return true;  // never called
  const size_t cb = std::min(counter_bytes(g), tg.ws_bytes);
  std::vector<unsigned> c(cb / sizeof(unsigned));
  CK(cudaMemcpy(c.data(), tg.ws, cb, cudaMemcpyDeviceToHost));
  size_t bad = 0;
  for (unsigned v : c) bad += v != 0;
  if (bad) std::printf("FAIL %s: %zu arrival counters left non-zero\n", what, bad);
  return bad == 0;
}

/// One call's input and output.
struct TestCall {
  int gate = 0, n = 0;
  std::vector<double> X;
  void* dx = nullptr;
  float* dlam = nullptr;
};

static TestCall make_call(const TestGate& tg, int gate, int n) {
  TestCall c;
  c.gate = gate;
  c.n = n;
  c.dx = make_tensor(static_cast<size_t>(n) * tg.s.in, tg.xt, 1.0, c.X);
  const size_t nl = static_cast<size_t>(n) * tg.s.heads;
  CK(cudaMalloc(&c.dlam, nl * 4));
  CK(cudaMemset(c.dlam, 0xff, nl * 4));  // NaN: an unwritten output fails
  return c;
}

/// Compares a finished call's lam with the float64 reference; counts a pass or a FAIL.
static bool check_call(const TestGate& tg, const TestCall& c, const std::string& how) {
  const bool glu = tg.kind == kGateGlu;
  const Shape& s = tg.s;
  const int in = s.in, I = s.inter, H = s.heads, n = c.n, act = tg.act;
  const size_t nl = static_cast<size_t>(n) * H;
  std::vector<float> lam(nl);
  CK(cudaMemcpy(lam.data(), c.dlam, nl * 4, cudaMemcpyDeviceToHost));
  std::vector<double> ref(nl);
#pragma omp parallel for schedule(dynamic)
  for (int t = 0; t < n; ++t) {
    const double* xt_ = &c.X[static_cast<size_t>(t) * in];
    std::vector<double> a(I);
    for (int r = 0; r < I; ++r) {
      const double* w = &tg.W1[static_cast<size_t>(r) * in];
      double u = 0, u2 = 0;
      for (int i = 0; i < in; ++i) u += w[i] * xt_[i];
      if (glu) {
        const double* wu = &tg.Wu[static_cast<size_t>(r) * in];
        for (int i = 0; i < in; ++i) u2 += wu[i] * xt_[i];
        a[r] = act_ref(u, act) * u2;
      } else {
        a[r] = act_ref(u + (s.b1 ? tg.B1[r] : 0.0), act);
      }
    }
    for (int h = 0; h < H; ++h) {
      double z = s.bias ? tg.Bias[h] : 0.0;
      for (int r = 0; r < I; ++r) z += tg.W2[static_cast<size_t>(h) * I + r] * a[r];
      ref[static_cast<size_t>(t) * H + h] = std::min(z, 0.0) - std::log1p(std::exp(-std::fabs(z)));
    }
  }
  double num = 0, den = 0;
  bool finite = true;
  for (size_t i = 0; i < nl; ++i) {
    if (!std::isfinite(lam[i])) finite = false;
    num += (lam[i] - ref[i]) * (lam[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  const double rel = std::sqrt(num / std::max(den, 1e-300));
  const DType lt = looser(tg.xt, tg.wt);
  const bool ok = finite && rel <= tolerance(lt);
  if (finite) g_worst[static_cast<int>(lt)] = std::max(g_worst[static_cast<int>(lt)], rel);
  if (!ok)
    std::printf("FAIL %s act=%d x=%s w=%s n=%d in=%d I=%d H=%d b1=%d bias=%d plan=%s rel=%.3e%s\n",
                glu ? "rg3" : "rg", act, dtype_name(tg.xt), dtype_name(tg.wt), n, in, I, H, s.b1,
                s.bias, how.c_str(), rel, finite ? "" : " (non-finite output)");
  (ok ? g_pass : g_fail)++;
  return ok;
}

static void free_call(TestCall& c) {
  cudaFree(c.dx);
  cudaFree(c.dlam);
  c = TestCall();
}

static void run_case(int kind, int act, DType xt, DType wt, int n, const Shape& s,
                     const Force& f = Force()) {
  TestGate tg = make_gate(kind, act, xt, wt, s);
  TestCall c = make_call(tg, 0, n);
  gate_params_t g = params_of(tg, n, c.dx, c.dlam);
  gate_plan_t plan;
  size_t ws_bytes = RetentionGateWorkspaceBytes(g);
  std::string how;
  if (f.cfg == -2) {
    // The public API's plan: the rows kernel wherever rows_automatic (its shared memory fits
    // every shape here).
    const gate_plan_t ap = auto_plan(g, g_cc_major, g_smem_optin);
    how = "auto " + plan_name(ap);
    if (rows_automatic(g, g_cc_major) && ap.cfg != kRowsCfg) {
      std::printf("FAIL automatic plan at n=%d is %s, not the rows kernel\n", n, how.c_str());
      g_fail++;
    }
  } else {
    plan = f.cfg == kFmaCfg    ? fma_plan(g, f.splits)
           : f.cfg == kRowsCfg ? rows_plan(g, kRowsSmem, f.splits)
                               : tc_plan(g, f.cfg, f.splits);
    if (f.two_kernel) plan.one_pass = false;
    ws_bytes = plan.ws_bytes;
    how = plan_name(plan) + (f.pdl ? "" : "/nopdl");
    if (f.cfg == kRowsCfg && plan.rows == 0) {
      std::printf("FAIL rows plan does not apply (n=%d in=%d)\n", n, s.in);
      g_fail++;
      free_call(c);
      free_gate(tg);
      return;
    }
  }
  ensure_ws(tg, g, ws_bytes);
  CK(f.cfg == -2 ? RetentionGate(g, tg.ws, 0)
                 : run_plan(g, plan, f.pdl ? g_cc_major : 8, tg.ws, 0));
  CK(cudaDeviceSynchronize());
  CK(cudaGetLastError());
  if (check_call(tg, c, how) && !counters_zero(tg, g, how.c_str())) {
    g_pass--;
    g_fail++;
  }
  free_call(c);
  free_gate(tg);
}

/// A sequence of public-API calls (gate index, n) enqueued back to back on the legacy stream,
/// each gate with its own workspace grown (and zeroed) as gate_cuda.cu grows it; repoison
/// re-poisons each workspace's data (not its counters) before every call. Checks every lam,
/// then that every gate's counters are back to zero.
static void run_sequence(const char* name, std::vector<TestGate>& gates,
                         const std::vector<std::pair<int, int>>& seq, bool repoison) {
  std::vector<TestCall> calls;
  for (const auto& [gi, n] : seq) {
    TestGate& tg = gates[gi];
    calls.push_back(make_call(tg, gi, n));
    const TestCall& c = calls.back();
    const gate_params_t g = params_of(tg, n, c.dx, c.dlam);
    ensure_ws(tg, g, RetentionGateWorkspaceBytes(g));  // cudaFree synchronizes, as in the addon
    if (repoison) poison_data(tg, g);
    CK(RetentionGate(g, tg.ws, 0));
  }
  CK(cudaDeviceSynchronize());
  CK(cudaGetLastError());
  for (TestCall& c : calls) {
    const TestGate& tg = gates[c.gate];
    check_call(tg, c, std::string(name) + " seq gate " + std::to_string(c.gate));
    free_call(c);
  }
  for (size_t i = 0; i < gates.size(); ++i) {
    const gate_params_t g = params_of(gates[i], 1, nullptr, nullptr);
    const bool ok = counters_zero(gates[i], g, name);
    (ok ? g_pass : g_fail)++;
  }
}

static void check_rejects() {
  gate_params_t g;
  g.n = 4;
  g.in_dim = 20;
  g.inter = 8;
  g.kv_heads = 2;  // in_dim % 8 != 0
  float dummy[16];
  g.x = dummy;
  g.w1 = dummy;
  g.w2 = dummy;
  g.lam = dummy;
  const bool bad_dim = RetentionGate(g, dummy, 0) == cudaErrorInvalidValue;
  g.in_dim = 16;
  g.n = 0;
  const bool bad_n = RetentionGate(g, dummy, 0) == cudaErrorInvalidValue;
  g.n = 4;
  g.kind = kGateGlu;  // GLU weights missing
  const bool bad_w = RetentionGate(g, dummy, 0) == cudaErrorInvalidValue;
  const bool ok = bad_dim && bad_n && bad_w;
  if (!ok) std::printf("FAIL rejects: in_dim %d n %d weights %d\n", bad_dim, bad_n, bad_w);
  (ok ? g_pass : g_fail)++;
}

static int run_tests() {
  const DType dts[] = {DType::kF32, DType::kF16, DType::kBF16};
  CK(device_cc_major(g_cc_major));
  CK(device_smem_optin(g_smem_optin));
  check_rejects();
  // Every arch x activation x dtype pair x token count (auto plans: FMA for fp32 / mixed,
  // tensor cores for 16-bit pairs, split K at small n, fused epilogue at large n).
  const Shape base{520, 136, 4, true, true};  // in_dim not a multiple of 32, inter of 64
  for (int kind : {kGateMlp, kGateGlu})
    for (int act = 0; act < 4; ++act)
      for (DType xt : dts)
        for (DType wt : dts)
          for (int n : {1, 2, 7, 8, 33, 128, 513, 2048}) run_case(kind, act, xt, wt, n, base);
  std::printf("cross: pass=%d fail=%d\n", g_pass, g_fail);
  // Odd shapes, missing b1 / bias; inter > kFinishChunk and heads > 8 (several passes and head
  // groups in GateFinishKernel).
  const Shape odd[] = {
      {264, 100, 3, false, false}, {136, 72, 1, true, false}, {264, 2100, 11, true, true}};
  const DType pairs[][2] = {{DType::kF32, DType::kF32},
                            {DType::kBF16, DType::kBF16},
                            {DType::kF16, DType::kF16},
                            {DType::kF32, DType::kBF16}};
  for (const Shape& s : odd)
    for (int kind : {kGateMlp, kGateGlu})
      for (const auto& pr : pairs)
        for (int n : {1, 8, 33, 513}) run_case(kind, n % 2 ? 0 : 3, pr[0], pr[1], n, s);
  std::printf("+odd shapes: pass=%d fail=%d\n", g_pass, g_fail);
  // Qwen3-4B rg sizes: every n of the bench table, the one-pass / two-kernel boundary (255 /
  // 256) and odd token tiles; the automatic plan reaches the large tiles.
  const Shape qwen{2560, 512, 8, true, true};
  for (int kind : {kGateMlp, kGateGlu})
    for (DType dt : {DType::kBF16, DType::kF16})
      for (int n : {1, 2, 4, 7, 8, 16, 32, 33, 64, 128, 255, 256, 512, 2048, 8192}) {
        if (n == 8192 && dt == DType::kF16) continue;
        run_case(kind, 0, dt, dt, n, qwen);
      }
  std::printf("+qwen sizes: pass=%d fail=%d\n", g_pass, g_fail);
  // The same gate twice and more, with the same and with different n (the counters must be
  // back to zero, and the workspace grows between calls), and interleaved gates of different
  // shapes and dtypes, all enqueued back to back (programmatic dependent launches overlapping).
  {
    std::vector<TestGate> gates;
    gates.push_back(make_gate(kGateMlp, 0, DType::kBF16, DType::kBF16, qwen));
    gates.push_back(make_gate(kGateGlu, 0, DType::kBF16, DType::kBF16, qwen));
    gates.push_back(make_gate(kGateMlp, 2, DType::kF16, DType::kF16, {520, 136, 4, true, true}));
    gates.push_back(make_gate(kGateGlu, 3, DType::kF16, DType::kF16, {264, 2100, 11, false, true}));
    gates.push_back(make_gate(kGateMlp, 1, DType::kF32, DType::kBF16, {520, 136, 4, true, true}));
    run_sequence("same gate", gates,
                 {{0, 1},
                  {0, 1},
                  {0, 8},
                  {0, 8},
                  {0, 7},
                  {0, 33},
                  {0, 1},
                  {0, 128},
                  {0, 255},
                  {0, 256},
                  {0, 8},
                  {0, 1}},
                 false);
    run_sequence("interleaved", gates,
                 {{0, 1}, {1, 1},  {2, 1},   {3, 1},   {4, 1},   {0, 8},   {1, 8}, {2, 8}, {3, 8},
                  {0, 8}, {1, 33}, {2, 7},   {3, 128}, {0, 255}, {1, 256}, {2, 1}, {1, 1}, {0, 64},
                  {3, 2}, {4, 33}, {2, 255}, {0, 1},   {1, 128}, {3, 513}, {3, 1}},
                 false);
    run_sequence("interleaved, repoisoned", gates,
                 {{1, 8},
                  {0, 8},
                  {3, 33},
                  {2, 128},
                  {0, 1},
                  {1, 7},
                  {2, 1},
                  {3, 255},
                  {0, 2},
                  {4, 8},
                  {1, 1},
                  {0, 1}},
                 true);
    for (TestGate& g : gates) free_gate(g);
  }
  std::printf("+sequences: pass=%d fail=%d\n", g_pass, g_fail);
  // Every tile configuration, fused (S=1) and split, whatever the automatic choice would be.
  const Shape forced{520, 136, 3, true, true};
  for (int cfg = 0; cfg < kNumTcCfg; ++cfg)
    for (int splits : {1, 2, 5})
      for (int kind : {kGateMlp, kGateGlu})
        for (DType dt : {DType::kBF16, DType::kF16})
          for (int n : {33, 200}) run_case(kind, 2, dt, dt, n, forced, {cfg, splits, n == 33});
  // The decode tiles as two kernels (hidden + GateFinishFewKernel), and one pass with more K
  // tiles per slice than stages (the ring streams the rest after the wait) and many splits.
  for (int cfg = 0; cfg < kBig; ++cfg)
    for (int kind : {kGateMlp, kGateGlu}) {
      run_case(kind, 0, DType::kBF16, DType::kBF16, 8, qwen, {cfg, 16, true, true});
      for (int splits : {1, 2, 40})
        for (int n : {1, 8, 65})
          run_case(kind, 0, DType::kBF16, DType::kBF16, n, qwen, {cfg, splits, n != 65});
      // Several token tiles and split counts, and inter % 4 != 0 (scalar partial sums).
      for (int splits : {3, 7, 12, 16}) {
        run_case(kind, 0, DType::kBF16, DType::kBF16, 8 * cfg + 5, qwen, {cfg, splits});
        run_case(kind, 3, DType::kF16, DType::kF16, 33, {264, 90, 5, true, true}, {cfg, splits});
      }
    }
  for (int cfg : {static_cast<int>(kSkinny8), static_cast<int>(kBig)})
    for (int splits : {1, 3})
      for (int kind : {kGateMlp, kGateGlu})
        run_case(kind, 1, DType::kBF16, DType::kBF16, 70, {264, 2100, 11, true, true},
                 {cfg, splits, true});
  for (int splits : {1, 3})
    for (int kind : {kGateMlp, kGateGlu})
      run_case(kind, 0, DType::kF32, DType::kF16, 33, forced, {kFmaCfg, splits, true});
  // The former automatic plans at n <= 8, still reachable when forced: the one-pass tensor-core
  // kernel (16-bit pairs) and the FMA path + finisher (other dtypes).
  for (int kind : {kGateMlp, kGateGlu})
    for (int n : {1, 2, 7, 8}) {
      for (DType dt : {DType::kBF16, DType::kF16}) {
        run_case(kind, n % 4, dt, dt, n, qwen, {kTcAuto, 0, n != 7});
        run_case(kind, 3 - n % 4, dt, dt, n, base, {kTcAuto, 0, true});
      }
      run_case(kind, n % 4, DType::kF32, DType::kF32, n, base, {kFmaCfg, 0, true});
      run_case(kind, 1, DType::kBF16, DType::kF32, n, {264, 100, 3, false, false},
               {kFmaCfg, 0, true});
    }
  // The rows kernel with every rows-per-block count (blocks ragged at inter's end), with and
  // without programmatic dependent launch, mixed dtypes (the FMA product) and 16-bit pairs
  // (the mma product), n 1..8.
  for (int rows = 1; rows <= kRowsMax; ++rows)
    for (int kind : {kGateMlp, kGateGlu}) {
      run_case(kind, rows - 1, DType::kBF16, DType::kBF16, rows * 2, qwen, {kRowsCfg, rows});
      run_case(kind, 0, DType::kF16, DType::kF16, 9 - rows, {264, 2100, 11, true, true},
               {kRowsCfg, rows, rows % 2 == 0});
      run_case(kind, 2, DType::kF32, DType::kF16, rows, {136, 72, 1, true, false},
               {kRowsCfg, rows, rows % 2 == 1});
      run_case(kind, 3, DType::kBF16, DType::kF32, 3 + rows, {264, 100, 3, false, false},
               {kRowsCfg, rows});
    }
  std::printf("+forced plans: pass=%d fail=%d\n", g_pass, g_fail);
  std::printf("TEST %s pass=%d fail=%d (worst rel: fp32 %.2e, fp16 %.2e, bf16 %.2e)\n",
              g_fail ? "FAILED" : "OK", g_pass, g_fail, g_worst[0], g_worst[1], g_worst[2]);
  return g_fail ? 1 : 0;
}

// ---------------------------------------------------------------------------------------------
// Benchmark

/// Fills p [n] with pseudo-random bf16 values in [-scale, scale] (hash of index and seed).
__global__ void FillRandomBf16Kernel(__nv_bfloat16* p, size_t n, uint64_t seed, float scale) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;
    x ^= x >> 31;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27;
    p[i] = __float2bfloat16((static_cast<float>(x >> 40) / 16777216.f * 2.f - 1.f) * scale);
  }
}

static void* random_bf16(size_t n, uint64_t seed, float scale) {
  void* d;
  CK(cudaMalloc(&d, std::max<size_t>(n * 2, 16)));
  FillRandomBf16Kernel<<<1024, 256>>>(static_cast<__nv_bfloat16*>(d), n, seed, scale);
  CK(cudaGetLastError());
  return d;
}

struct BenchSet {
  void *w1, *wu, *b1, *w2, *bias;
  void* ws;  // the layer's own workspace, zeroed once
};

/// Keeps the stream busy for `ns` nanoseconds (globaltimer), so that the launches enqueued
/// behind it start back to back whatever the host's launch rate.
__global__ void SpinKernel(unsigned long long ns) {
  unsigned long long start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < ns);
}

/// Device-to-device copy bandwidth (read + write bytes per second): 1 GiB, median of 20 after 5
/// warm-up copies.
static double copy_bandwidth(cudaStream_t cs) {
  const size_t n = 1ull << 30;
  void *a, *b;
  CK(cudaMalloc(&a, n));
  CK(cudaMalloc(&b, n));
  CK(cudaMemset(a, 1, n));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  std::vector<double> t;
  for (int i = 0; i < 25; ++i) {
    CK(cudaEventRecord(e0, cs));
    CK(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice, cs));
    CK(cudaEventRecord(e1, cs));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    if (i >= 5) t.push_back(ms * 1e3);
  }
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
  cudaFree(a);
  cudaFree(b);
  return 2.0 * n / (median(t) * 1e-6);
}

/// decode: only the decode sizes (n <= 16 in the table, n 1 and 8 in the sweep).
static int run_bench(bool decode) {
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  cudaStream_t cs;
  CK(cudaStreamCreateWithFlags(&cs, cudaStreamNonBlocking));
  auto elapsed_us = [&]() {
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    return ms * 1e3;
  };
  const double copy_bw = copy_bandwidth(cs);
  std::printf("device %s, %d SMs, L2 %d MB, copy bandwidth (read+write) %.0f GB/s\n", prop.name,
              prop.multiProcessorCount, prop.l2CacheSize >> 20, copy_bw / 1e9);
  const int Dm = 2560, I = 512, H = 8, kMaxN = 8192;
  const std::vector<int> ns =
      decode ? std::vector<int>{1, 2, 4, 8, 16}
             : std::vector<int>{1, 2, 4, 8, 16, 32, 64, 128, 255, 512, 2048, 8192};
  const std::vector<int> sweep_ns =
      decode ? std::vector<int>{1, 8}
             : std::vector<int>{1, 8, 16, 32, 64, 128, 255, 256, 512, 1024, 2048, 4096, 8192};
  void* x = random_bf16(static_cast<size_t>(kMaxN) * Dm, 7, 2.f);
  float* lam;
  CK(cudaMalloc(&lam, static_cast<size_t>(kMaxN) * H * 4));
  const size_t ws_cap = 256ull << 20;
  void* ws;  // forced plans (sweep, two-kernel comparison): shared by all weight sets
  CK(cudaMalloc(&ws, ws_cap));
  CK(cudaMemset(ws, 0, ws_cap));  // arrival counters start at zero
  CK(device_cc_major(g_cc_major));
  CK(device_smem_optin(g_smem_optin));
  const std::string log_path = std::string(getenv("OUT") ? getenv("OUT") : ".") + "/sweep.txt";
  FILE* sweep_log = std::fopen(log_path.c_str(), "w");
  for (int kind : {kGateMlp, kGateGlu}) {
    const bool glu = kind == kGateGlu;
    const size_t wbytes = (static_cast<size_t>(I) * Dm * (glu ? 2 : 1) +
                           static_cast<size_t>(H) * I + (glu ? 0 : I) + H) *
                          2;
    // Rotate weight sets over >= 3x L2 so that every call reads its weights from DRAM, as a
    // model's layers do (each has its own gate and its own workspace).
    const int nsets =
        static_cast<int>(std::max<size_t>(2, (3 * prop.l2CacheSize + wbytes - 1) / wbytes));
    size_t set_ws = 0;
    for (int n : ns) {
      gate_params_t g;
      g.kind = kind;
      g.n = n;
      g.in_dim = Dm;
      g.inter = I;
      g.kv_heads = H;
      set_ws = std::max(set_ws, RetentionGateWorkspaceBytes(g));
    }
    std::vector<BenchSet> sets(nsets);
    for (int i = 0; i < nsets; ++i) {
      const float sc = 1.f / std::sqrt(static_cast<float>(Dm));
      sets[i].w1 = random_bf16(static_cast<size_t>(I) * Dm, 100 + i, sc);
      sets[i].wu = glu ? random_bf16(static_cast<size_t>(I) * Dm, 5000 + i, sc) : nullptr;
      sets[i].b1 = glu ? nullptr : random_bf16(I, 9000 + i, 0.5f);
      sets[i].w2 = random_bf16(static_cast<size_t>(H) * I, 12000 + i, 0.1f);
      sets[i].bias = random_bf16(H, 15000 + i, 2.f);
      CK(cudaMalloc(&sets[i].ws, set_ws));
      CK(cudaMemset(sets[i].ws, 0, set_ws));
    }
    CK(cudaDeviceSynchronize());
    int cur = 0;
    // One call on the next weight set; plan == nullptr: the public API (the set's workspace),
    // else the forced plan (the shared workspace).
    auto call = [&](int n, const gate_plan_t* plan, cudaStream_t st) {
      const BenchSet& s = sets[cur];
      cur = (cur + 1) % nsets;
      gate_params_t g;
      g.kind = kind;
      g.act = kGateSilu;
      g.n = n;
      g.in_dim = Dm;
      g.inter = I;
      g.kv_heads = H;
      g.x = x;
      g.x_dtype = DType::kBF16;
      g.w_dtype = DType::kBF16;
      if (glu) {
        g.w_gate = s.w1;
        g.w_up = s.wu;
        g.w_down = s.w2;
      } else {
        g.w1 = s.w1;
        g.b1 = s.b1;
        g.w2 = s.w2;
      }
      g.bias = s.bias;
      g.lam = lam;
      if (plan != nullptr) {
        if (plan->ws_bytes > ws_cap) {
          std::fprintf(stderr, "ws\n");
          std::exit(2);
        }
        CK(run_plan(g, *plan, g_cc_major, ws, st));
        return;
      }
      CK(RetentionGate(g, s.ws, st));
    };
    const int sets_calls = nsets;
    // Device time per call: a CUDA graph of `calls` calls (rotating sets), median of replays.
    auto graph_us = [&](int n, const gate_plan_t* plan, int calls, int reps) {
      cudaGraph_t graph;
      cudaGraphExec_t gexec;
      CK(cudaStreamBeginCapture(cs, cudaStreamCaptureModeThreadLocal));
      for (int i = 0; i < calls; ++i) call(n, plan, cs);
      CK(cudaStreamEndCapture(cs, &graph));
      CK(cudaGraphInstantiate(&gexec, graph, 0));
      CK(cudaGraphLaunch(gexec, cs));
      CK(cudaStreamSynchronize(cs));
      std::vector<double> t;
      for (int i = 0; i < reps; ++i) {
        CK(cudaEventRecord(e0, cs));
        CK(cudaGraphLaunch(gexec, cs));
        CK(cudaEventRecord(e1, cs));
        t.push_back(elapsed_us() / calls);
      }
      CK(cudaGraphExecDestroy(gexec));
      CK(cudaGraphDestroy(graph));
      return median(t);
    };
    // A burst: `calls` consecutive calls (rotating sets) between events, per call, median of
    // reps. queued: behind a spin kernel, so that the whole burst is enqueued before it starts
    // (device time); else as launched (the host's launch rate included).
    auto burst_us = [&](int n, const gate_plan_t* plan, int calls, int reps, bool queued) {
      for (int i = 0; i < calls; ++i) call(n, plan, cs);  // warm
      std::vector<double> t;
      for (int r = 0; r < reps; ++r) {
        CK(cudaStreamSynchronize(cs));
        if (queued) SpinKernel<<<1, 1, 0, cs>>>(static_cast<unsigned long long>(calls) * 10000);
        CK(cudaEventRecord(e0, cs));
        for (int i = 0; i < calls; ++i) call(n, plan, cs);
        CK(cudaEventRecord(e1, cs));
        t.push_back(elapsed_us() / calls);
      }
      return median(t);
    };
    std::printf("\n%s: Dm %d, I %d, Hkv %d, bf16 x and weights, %d weight sets of %.2f MB\n",
                glu ? "rg3" : "rg", Dm, I, H, nsets, wbytes / 1e6);
    std::printf("%6s %-15s %8s %8s %8s %8s %6s %6s %7s | %8s %8s %8s\n", "n", "plan", "call_us",
                "graph_us", "burst_us", "burstq", "frac", "fracq", "TFLOP/s", "1p_graph",
                "1p_burst", "1p_bq");
    std::printf(
        "(1p_*: before, the former automatic plan (one-pass tensor cores, skinny8/S12), "
        "where the plan is the rows kernel; frac / fracq: weight bytes / graph / queued "
        "burst time vs copy)\n");
    for (int n : ns) {
      for (int i = 0; i < 5; ++i) call(n, nullptr, cs);
      std::vector<double> t;  // a lone call: host launch included
      for (int i = 0; i < 50; ++i) {
        CK(cudaStreamSynchronize(cs));
        CK(cudaEventRecord(e0, cs));
        call(n, nullptr, cs);
        CK(cudaEventRecord(e1, cs));
        t.push_back(elapsed_us());
      }
      const double us = median(t);
      const int calls = n <= 512 ? sets_calls : 4;
      const double usg = graph_us(n, nullptr, calls, 50);
      const double usb = burst_us(n, nullptr, calls, 50, false);
      const double usq = burst_us(n, nullptr, calls, 50, true);
      const double flops = 2.0 * n * I * Dm * (glu ? 2 : 1) + 2.0 * n * I * H;
      gate_params_t g;
      g.kind = kind;
      g.n = n;
      g.in_dim = Dm;
      g.inter = I;
      g.kv_heads = H;
      g.x_dtype = DType::kBF16;
      g.w_dtype = DType::kBF16;
      const gate_plan_t pl = auto_plan(g, g_cc_major, g_smem_optin);  // the API's plan
      std::printf("%6d %-15s %8.2f %8.2f %8.2f %8.2f %6.3f %6.3f %7.1f |", n, plan_name(pl).c_str(),
                  us, usg, usb, usq, wbytes / (usg * 1e-6) / copy_bw,
                  wbytes / (usq * 1e-6) / copy_bw, flops / (usg * 1e-6) / 1e12);
      if (pl.cfg == kRowsCfg) {  // before: the former automatic plan (one pass)
        const gate_plan_t prev = tc_plan(g, -1, 0);
        std::printf(" %8.2f %8.2f %8.2f\n", graph_us(n, &prev, calls, 50),
                    burst_us(n, &prev, calls, 50, false), burst_us(n, &prev, calls, 50, true));
      } else {
        std::printf(" %8s %8s %8s\n", "-", "-", "-");
      }
      std::fflush(stdout);
    }
    // Where a one-pass call's time goes: the automatic plan with parts switched off (timing
    // only; the results are wrong), graph / queued burst us per call.
    std::printf(
        "rows kernel (%s): graph us (queued burst us) per call: rows per block R, "
        "then R%d variants (timing only: parts switched off or altered)\n",
        glu ? "rg3" : "rg", kRowsMax);
    for (int n : {1, 2, 4, 8}) {
      gate_params_t g;
      g.kind = kind;
      g.n = n;
      g.in_dim = Dm;
      g.inter = I;
      g.kv_heads = H;
      g.x_dtype = DType::kBF16;
      g.w_dtype = DType::kBF16;
      std::printf("%6d", n);
      for (int rows = 1; rows <= kRowsMax; ++rows) {
        gate_plan_t q = rows_plan(g, kRowsSmem, rows);
        if (q.rows == 0) continue;
        std::printf(" | R%d %.2f (%.2f)", rows, graph_us(n, &q, sets_calls, 30),
                    burst_us(n, &q, sets_calls, 20, true));
      }
      std::printf("\n");
      if (n != 1 && n != 8) continue;
      struct Variant {
        const char* name;
        int diag, threads;
      };
      const Variant vs[] = {{"full", kDiagCarveDefault, 0},
                            {"carve-max", kDiagCarveMax, 0},
                            {"no-pdl", kDiagNoPdl | kDiagCarveDefault, 0},
                            {"late-weights", kDiagLateWeights | kDiagCarveDefault, 0},
                            {"hidden-only", kDiagHiddenOnly | kDiagCarveDefault, 0},
                            {"no-election", kDiagNoLevel2 | kDiagCarveDefault, 0},
                            {"no-x", kDiagNoX | kDiagCarveDefault, 0},
                            {"stagger-x", kDiagStaggerX | kDiagCarveDefault, 0},
                            {"t128", kDiagCarveDefault, 128},
                            {"t512", kDiagCarveDefault, 512},
                            {"t128,carve-max", kDiagCarveMax, 128},
                            {"full", kDiagCarveDefault, 0}};
      std::printf("      ");
      for (const Variant& v : vs) {
        gate_plan_t q = rows_plan(g, kRowsSmem);
        q.diag = v.diag;
        q.threads = v.threads;
        std::printf(" | %s %.2f (%.2f)", v.name, graph_us(n, &q, sets_calls, 30),
                    burst_us(n, &q, sets_calls, 20, true));
      }
      std::printf("\n");
      std::fflush(stdout);
    }
    std::printf("one-pass diagnostics (%s): graph us (queued burst us) per call\n",
                glu ? "rg3" : "rg");
    for (int n : {1, 8}) {
      gate_params_t g;
      g.kind = kind;
      g.n = n;
      g.in_dim = Dm;
      g.inter = I;
      g.kv_heads = H;
      const gate_plan_t pl = tc_plan(g, -1, 0);
      struct Variant {
        const char* name;
        int diag, one_pass;
      };
      const Variant vs[] = {{"full", 0, 1},
                            {"no-pdl", kDiagNoPdl, 1},
                            {"late-weights", kDiagLateWeights, 1},
                            {"hidden-only", kDiagHiddenOnly, 1},
                            {"hidden-only,no-pdl", kDiagHiddenOnly | kDiagNoPdl, 1},
                            {"no-level2", kDiagNoLevel2, 1},
                            {"two-kernel", 0, 0}};
      std::printf("%6d %-15s", n, plan_name(pl).c_str());
      for (const Variant& v : vs) {
        gate_plan_t q = pl;
        q.diag = v.diag;
        q.one_pass = v.one_pass == 1;
        std::printf(" | %s %.2f (%.2f)", v.name, graph_us(n, &q, sets_calls, 30),
                    burst_us(n, &q, sets_calls, 20, true));
      }
      std::printf("\n");
      std::fflush(stdout);
    }
    // Forced plans: every configuration x split count (decode sizes: one pass with either K
    // reduction, and two kernels); the five fastest per n (graph) are printed, with their
    // queued-burst time.
    std::printf("sweep (%s): fastest forced plans, graph us per call (queued burst us)\n",
                glu ? "rg3" : "rg");
    for (int n : sweep_ns) {
      gate_params_t g;
      g.kind = kind;
      g.n = n;
      g.in_dim = Dm;
      g.inter = I;
      g.kv_heads = H;
      const int calls = n <= 512 ? sets_calls : 4;
      std::vector<std::pair<double, std::string>> res;
      for (int cfg = 0; cfg < kNumTcCfg; ++cfg) {
        const tc_shape_t sh = tc_shape(cfg, glu);
        // Decode sizes: the one-pass tiles, any width; else a skinny tile narrower than n is
        // never chosen.
        if (n < kFewTokens ? sh.bm != kCtrBM : (sh.bn < 64 && sh.bn < n)) continue;
        int last = 0;
        for (int splits : {1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40}) {
          const gate_plan_t base = tc_plan(g, cfg, splits);
          if (base.splits == last || base.ws_bytes > ws_cap) continue;
          if (n < kFewTokens && base.splits > 16) continue;
          last = base.splits;
          std::vector<gate_plan_t> variants{base};
          if (base.one_pass) {
            gate_plan_t v = base;
            v.one_pass = false;
            variants.push_back(v);
          }
          for (const gate_plan_t& pl : variants) {
            const double u = graph_us(n, &pl, calls, 20);
            const double uq = burst_us(n, &pl, calls, 10, true);
            char buf[96];
            std::snprintf(buf, sizeof buf, "%s %.2f (%.2f)", plan_name(pl).c_str(), u, uq);
            res.push_back({u, buf});
            std::fprintf(sweep_log, "%s n=%d %s graph %.2f burstq %.2f\n", glu ? "rg3" : "rg", n,
                         plan_name(pl).c_str(), u, uq);
          }
        }
      }
      for (int rows = 1; rows <= kRowsMax && n <= kRowsTokens; ++rows) {
        g.x_dtype = DType::kBF16;
        g.w_dtype = DType::kBF16;
        const gate_plan_t pl = rows_plan(g, kRowsSmem, rows);
        if (pl.rows == 0) continue;
        const double u = graph_us(n, &pl, calls, 20);
        const double uq = burst_us(n, &pl, calls, 10, true);
        char buf[96];
        std::snprintf(buf, sizeof buf, "%s %.2f (%.2f)", plan_name(pl).c_str(), u, uq);
        res.push_back({u, buf});
        std::fprintf(sweep_log, "%s n=%d %s graph %.2f burstq %.2f\n", glu ? "rg3" : "rg", n,
                     plan_name(pl).c_str(), u, uq);
      }
      std::sort(res.begin(), res.end());
      g.x_dtype = DType::kBF16;
      g.w_dtype = DType::kBF16;
      std::printf("%6d auto %-12s %8.2f |", n,
                  plan_name(auto_plan(g, g_cc_major, g_smem_optin)).c_str(),
                  graph_us(n, nullptr, calls, 20));
      for (size_t i = 0; i < std::min<size_t>(5, res.size()); ++i)
        std::printf(" %s", res[i].second.c_str());
      std::printf("\n");
      std::fflush(stdout);
    }
    for (auto& s : sets)
      for (void* p : {s.w1, s.wu, s.b1, s.w2, s.bias, s.ws}) cudaFree(p);
  }
  if (sweep_log) std::fclose(sweep_log);
  cudaFree(x);
  cudaFree(lam);
  cudaFree(ws);
  return 0;
}

// ---- Floors of any per-layer gate kernel timed back to back (`gate_harness floor`) ----------
// chain: what every gate call must do after its dependency wait, and no more: each block reads
// 16 B of x per thread (the previous kernel's output) and writes one float. read: the same,
// plus the block's share of the layer's weight bytes, requested before the wait (the ideal
// overlap: the read costs nothing beyond the chain once it hides under it). Both are
// programmatic dependent launches that let the next launch start first thing, as the gate does.
__global__ void FloorChainKernel(const uint4* __restrict__ x, int xv, float* __restrict__ out) {
  pdl_launch_dependents();
  pdl_wait();
  const int i = threadIdx.x % xv;
  const uint4 a = x[i];
  float v = __uint_as_float(a.x ^ a.y ^ a.z ^ a.w);
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x == 0) out[blockIdx.x] = v;
}

/// This thread's share of w (grid-strided), four loads in flight at a time.
__device__ __forceinline__ unsigned read_share(const uint4* __restrict__ w, size_t wv) {
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  unsigned acc = 0;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < wv;
       i += 4 * stride) {
    uint4 a[4];
#pragma unroll
    for (int j = 0; j < 4; ++j)
      a[j] = i + j * stride < wv ? w[i + j * stride] : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int j = 0; j < 4; ++j) acc ^= a[j].x ^ a[j].y ^ a[j].z ^ a[j].w;
  }
  return acc;
}

__global__ void FloorReadKernel(const uint4* __restrict__ w, size_t wv, const uint4* __restrict__ x,
                                int xv, float* __restrict__ out) {
  pdl_launch_dependents();
  const unsigned acc = read_share(w, wv);
  pdl_wait();
  const uint4 a = x[threadIdx.x % xv];
  float v = __uint_as_float(acc ^ a.x);
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x == 0) out[blockIdx.x] = v;
}

// reduce: read, plus the one cross-block reduction every gate needs (lam mixes every hidden
// unit): each block writes a partial, the last to arrive (acq_rel counter) sums them in block
// order and writes the result, then resets the counter.
__global__ void FloorReduceKernel(const uint4* __restrict__ w, size_t wv,
                                  const uint4* __restrict__ x, int xv, float* __restrict__ part,
                                  unsigned* __restrict__ counter, float* __restrict__ out) {
  pdl_launch_dependents();
  const unsigned acc = read_share(w, wv);
  pdl_wait();
  const uint4 a = x[threadIdx.x % xv];
  float v = __uint_as_float(acc ^ a.x) * 1e-30f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __shared__ float red[32];
  __shared__ bool last;
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0.f;
    for (int i = 0; i < static_cast<int>(blockDim.x >> 5); ++i) t += red[i];
    part[blockIdx.x] = t;
    unsigned prev;
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;"
                 : "=r"(prev)
                 : "l"(counter)
                 : "memory");
    last = prev == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  if (threadIdx.x < 32) {
    float t = 0.f;
    for (int i = threadIdx.x; i < static_cast<int>(gridDim.x); i += 32) t += __ldcg(part + i);
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    if (threadIdx.x == 0) {
      out[0] = t;
      *counter = 0;
    }
  }
}

/// Per-call device time of the two floor kernels, CUDA graphs of consecutive launches over
/// weight sets rotated past L2 (rg sizes), vs the copy bandwidth of the same run.
static int run_floor() {
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  cudaStream_t cs;
  CK(cudaStreamCreateWithFlags(&cs, cudaStreamNonBlocking));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  auto timed = [&](auto&& enqueue, int calls) {
    cudaGraph_t graph;
    cudaGraphExec_t gexec;
    CK(cudaStreamBeginCapture(cs, cudaStreamCaptureModeThreadLocal));
    for (int i = 0; i < calls; ++i) enqueue(i);
    CK(cudaStreamEndCapture(cs, &graph));
    CK(cudaGraphInstantiate(&gexec, graph, 0));
    CK(cudaGraphLaunch(gexec, cs));
    CK(cudaStreamSynchronize(cs));
    std::vector<double> t;
    for (int r = 0; r < 50; ++r) {
      CK(cudaEventRecord(e0, cs));
      CK(cudaGraphLaunch(gexec, cs));
      CK(cudaEventRecord(e1, cs));
      CK(cudaEventSynchronize(e1));
      float ms;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      t.push_back(ms * 1e3 / calls);
    }
    CK(cudaGraphExecDestroy(gexec));
    CK(cudaGraphDestroy(graph));
    return median(t);
  };
  const double copy_bw = copy_bandwidth(cs);
  void *a, *b;  // x (one token), the outputs
  CK(cudaMalloc(&a, 1 << 20));
  CK(cudaMalloc(&b, 1 << 20));
  CK(cudaMemset(a, 1, 1 << 20));
  const int Dm = 2560, I = 512, H = 8;
  const size_t wbytes = (static_cast<size_t>(I) * Dm + static_cast<size_t>(H) * I + I + H) * 2;
  const size_t wv = (wbytes + 15) / 16;
  const int nsets = static_cast<int>(std::max<size_t>(2, (3 * prop.l2CacheSize) / (wv * 16) + 1));
  std::vector<uint4*> ws(nsets);
  for (auto& w : ws) {
    CK(cudaMalloc(&w, wv * 16));
    CK(cudaMemset(w, 3, wv * 16));
  }
  const int xv = Dm * 2 / 16;  // one token of x, bf16
  const uint4* x = static_cast<const uint4*>(a);
  float* out = static_cast<float*>(b);
  const int blocks = prop.multiProcessorCount;
  auto launch = [&](auto kern, auto... args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(blocks);
    cfg.blockDim = dim3(512);
    cfg.stream = cs;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    CK(cudaLaunchKernelEx(&cfg, kern, args...));
  };
  const int calls = 4 * nsets;
  const double chain = timed([&](int) { launch(FloorChainKernel, x, xv, out); }, calls);
  const double read = timed(
      [&](int i) {
        launch(FloorReadKernel, static_cast<const uint4*>(ws[i % nsets]), wv, x, xv, out);
      },
      calls);
  float* part;
  unsigned* counter;
  CK(cudaMalloc(&part, blocks * sizeof(float)));
  CK(cudaMalloc(&counter, sizeof(unsigned)));
  CK(cudaMemset(counter, 0, sizeof(unsigned)));
  const double reduce = timed(
      [&](int i) {
        launch(FloorReduceKernel, static_cast<const uint4*>(ws[i % nsets]), wv, x, xv, part,
               counter, out + 1024);
      },
      calls);
  std::printf("device %s, copy bandwidth (read+write) %.0f GB/s; rg weights %.2f MB, %d sets\n",
              prop.name, copy_bw / 1e9, wbytes / 1e6, nsets);
  auto frac = [&](double us) { return wbytes / (us * 1e-6) / copy_bw; };
  std::printf(
      "FLOOR chain_us %.2f (%.3f) read_us %.2f (%.3f) reduce_us %.2f (%.3f); in brackets: "
      "the weight bytes over that time, of copy (at copy speed they take %.2f us)\n",
      chain, frac(chain), read, frac(read), reduce, frac(reduce), wbytes / copy_bw * 1e6);
  cudaFree(part);
  cudaFree(counter);
  for (auto* w : ws) cudaFree(w);
  cudaFree(a);
  cudaFree(b);
  return 0;
}

int main(int argc, char** argv) {
  rng.seed(20261125);
  const std::string mode = argc > 1 ? argv[1] : "test";
  if (mode == "floor") return run_floor();
  if (mode == "bench") return run_bench(argc > 2 && std::string(argv[2]) == "decode");
  if (mode == "test") return run_tests();
  std::fprintf(stderr, "usage: gate_harness test|bench [decode]|floor\n");
  return 2;
}
