// Standalone test and benchmark for the retention-gate kernels (SPEC.md section 3).
//   gate_harness test    correctness vs a float64 CPU reference (exit code 1 on failure)
//   gate_harness bench   rg / rg3 timing table vs device-to-device copy bandwidth, then a sweep
//                        of forced launch plans (tile configuration x K splits)
// The kernel source is included (not linked) so that tests and the sweep can force a plan.
#include "../retention_gate.cu"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

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

static std::mt19937_64 rng(20261125);

static const char* kCfgNames[] = {"skinny8", "skinny16", "skinny32", "skinny64", "big", "huge"};

static std::string plan_name(const gate_plan_t& pl) {
  return std::string(pl.cfg == kFmaCfg ? "fma" : kCfgNames[pl.cfg]) + "/S" +
         std::to_string(pl.splits);
}

// ---------------------------------------------------------------------------------------------
// Test

struct Shape {
  int in, inter, heads;
  bool b1, bias;
};

/// A forced plan: cfg -2 = the public API (automatic plan), kFmaCfg = the FMA path, else a
/// tensor-core configuration; splits 0 = automatic; pdl false launches the finisher in plain
/// stream order even on sm_90.
struct Force {
  int cfg = -2;
  int splits = 0;
  bool pdl = true;
};

static int g_cc_major = 0;

static int g_pass = 0, g_fail = 0;
static double g_worst[3] = {0, 0, 0};  // by the looser of the two dtypes

static double act_ref(double u, int act) {
  switch (act) {
    case 0: return u / (1 + std::exp(-u));
    case 1: return 0.5 * u * (1 + std::erf(u / std::sqrt(2.0)));
    case 2: return 0.5 * u * (1 + std::tanh(std::sqrt(2 / M_PI) * (u + 0.044715 * u * u * u)));
    default: return std::max(u, 0.0);
  }
}

static DType looser(DType a, DType b) {
  if (a == DType::kBF16 || b == DType::kBF16) return DType::kBF16;
  if (a == DType::kF16 || b == DType::kF16) return DType::kF16;
  return DType::kF32;
}

static double tolerance(DType t) {  // SPEC.md section 8
  return t == DType::kF32 ? 1e-5 : t == DType::kF16 ? 2e-3 : 1e-2;
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

static void run_case(int kind, int act, DType xt, DType wt, int n, const Shape& s,
                     const Force& f = Force()) {
  const bool glu = kind == kGateGlu;
  const int in = s.in, I = s.inter, H = s.heads;
  std::vector<double> X, W1, Wu, B1, W2, Bias;
  void* dx = make_tensor(static_cast<size_t>(n) * in, xt, 1.0, X);
  void* dw1 = make_tensor(static_cast<size_t>(I) * in, wt, 1.0 / std::sqrt(in), W1);
  void* dwu = glu ? make_tensor(static_cast<size_t>(I) * in, wt, 1.0 / std::sqrt(in), Wu) : nullptr;
  void* db1 = (!glu && s.b1) ? make_tensor(I, wt, 0.5, B1) : nullptr;
  void* dw2 = make_tensor(static_cast<size_t>(H) * I, wt, 2.0 / std::sqrt(I), W2);
  void* dbias = s.bias ? make_tensor(H, wt, 2.0, Bias) : nullptr;
  float* dlam;
  const size_t nl = static_cast<size_t>(n) * H;
  CK(cudaMalloc(&dlam, nl * 4));
  CK(cudaMemset(dlam, 0xff, nl * 4));  // NaN: an unwritten output fails
  gate_params_t g;
  g.kind = kind; g.act = act; g.n = n; g.in_dim = in; g.inter = I; g.kv_heads = H;
  g.x = dx; g.x_dtype = xt; g.w_dtype = wt;
  if (glu) { g.w_gate = dw1; g.w_up = dwu; g.w_down = dw2; }
  else { g.w1 = dw1; g.b1 = db1; g.w2 = dw2; }
  g.bias = dbias; g.lam = dlam;
  gate_plan_t plan;
  size_t ws_bytes = RetentionGateWorkspaceBytes(g);
  std::string how = "auto";
  if (f.cfg != -2) {
    plan = f.cfg == kFmaCfg ? fma_plan(g, f.splits) : tc_plan(g, f.cfg, f.splits);
    ws_bytes = plan.ws_bytes;
    how = plan_name(plan);
  }
  void* ws;
  CK(cudaMalloc(&ws, ws_bytes));
  CK(cudaMemset(ws, 0xff, ws_bytes));  // NaN: a partial nobody wrote poisons lam
  CK(f.cfg == -2 ? RetentionGate(g, ws, 0) : run_plan(g, plan, f.pdl ? g_cc_major : 8, ws, 0));
  CK(cudaDeviceSynchronize());
  CK(cudaGetLastError());
  std::vector<float> lam(nl);
  CK(cudaMemcpy(lam.data(), dlam, nl * 4, cudaMemcpyDeviceToHost));

  std::vector<double> ref(nl);
#pragma omp parallel for schedule(dynamic)
  for (int t = 0; t < n; ++t) {
    const double* xt_ = &X[static_cast<size_t>(t) * in];
    std::vector<double> a(I);
    for (int r = 0; r < I; ++r) {
      const double* w = &W1[static_cast<size_t>(r) * in];
      double u = 0, u2 = 0;
      for (int i = 0; i < in; ++i) u += w[i] * xt_[i];
      if (glu) {
        const double* wu = &Wu[static_cast<size_t>(r) * in];
        for (int i = 0; i < in; ++i) u2 += wu[i] * xt_[i];
        a[r] = act_ref(u, act) * u2;
      } else {
        a[r] = act_ref(u + (s.b1 ? B1[r] : 0.0), act);
      }
    }
    for (int h = 0; h < H; ++h) {
      double z = s.bias ? Bias[h] : 0.0;
      for (int r = 0; r < I; ++r) z += W2[static_cast<size_t>(h) * I + r] * a[r];
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
  const DType lt = looser(xt, wt);
  const bool ok = finite && rel <= tolerance(lt);
  if (finite) g_worst[static_cast<int>(lt)] = std::max(g_worst[static_cast<int>(lt)], rel);
  if (!ok)
    std::printf("FAIL %s act=%d x=%s w=%s n=%d in=%d I=%d H=%d b1=%d bias=%d plan=%s rel=%.3e%s\n",
                glu ? "rg3" : "rg", act, dtype_name(xt), dtype_name(wt), n, in, I, H, s.b1,
                s.bias, how.c_str(), rel, finite ? "" : " (non-finite output)");
  (ok ? g_pass : g_fail)++;
  for (void* p : {dx, dw1, dwu, db1, dw2, dbias, ws}) cudaFree(p);
  cudaFree(dlam);
}

static void check_rejects() {
  gate_params_t g;
  g.n = 4; g.in_dim = 20; g.inter = 8; g.kv_heads = 2;  // in_dim % 8 != 0
  float dummy[16];
  g.x = dummy; g.w1 = dummy; g.w2 = dummy; g.lam = dummy;
  const bool bad_dim = RetentionGate(g, dummy, 0) == cudaErrorInvalidValue;
  g.in_dim = 16; g.n = 0;
  const bool bad_n = RetentionGate(g, dummy, 0) == cudaErrorInvalidValue;
  g.n = 4; g.kind = kGateGlu;  // GLU weights missing
  const bool bad_w = RetentionGate(g, dummy, 0) == cudaErrorInvalidValue;
  const bool ok = bad_dim && bad_n && bad_w;
  if (!ok) std::printf("FAIL rejects: in_dim %d n %d weights %d\n", bad_dim, bad_n, bad_w);
  (ok ? g_pass : g_fail)++;
}

static int run_tests() {
  const DType dts[] = {DType::kF32, DType::kF16, DType::kBF16};
  CK(device_cc_major(g_cc_major));
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
  const Shape odd[] = {{264, 100, 3, false, false}, {136, 72, 1, true, false},
                       {264, 2100, 11, true, true}};
  const DType pairs[][2] = {{DType::kF32, DType::kF32}, {DType::kBF16, DType::kBF16},
                            {DType::kF16, DType::kF16}, {DType::kF32, DType::kBF16}};
  for (const Shape& s : odd)
    for (int kind : {kGateMlp, kGateGlu})
      for (const auto& pr : pairs)
        for (int n : {1, 8, 33, 513}) run_case(kind, n % 2 ? 0 : 3, pr[0], pr[1], n, s);
  std::printf("+odd shapes: pass=%d fail=%d\n", g_pass, g_fail);
  // Qwen3-4B rg sizes, where the automatic plan reaches the large tiles.
  const Shape qwen{2560, 512, 8, true, true};
  for (int kind : {kGateMlp, kGateGlu})
    for (DType dt : {DType::kBF16, DType::kF16})
      for (int n : {1, 8, 128, 2048, 8192}) {
        if (n == 8192 && dt == DType::kF16) continue;
        run_case(kind, 0, dt, dt, n, qwen);
      }
  std::printf("+qwen sizes: pass=%d fail=%d\n", g_pass, g_fail);
  // Every tile configuration, fused (S=1) and split, whatever the automatic choice would be.
  const Shape forced{520, 136, 3, true, true};
  for (int cfg = 0; cfg < kNumTcCfg; ++cfg)
    for (int splits : {1, 2, 5})
      for (int kind : {kGateMlp, kGateGlu})
        for (DType dt : {DType::kBF16, DType::kF16})
          for (int n : {33, 200}) run_case(kind, 2, dt, dt, n, forced, {cfg, splits, n == 33});
  for (int cfg : {static_cast<int>(kSkinny8), static_cast<int>(kBig)})
    for (int splits : {1, 3})
      for (int kind : {kGateMlp, kGateGlu})
        run_case(kind, 1, DType::kBF16, DType::kBF16, 70, {264, 2100, 11, true, true},
                 {cfg, splits, true});
  for (int splits : {1, 3})
    for (int kind : {kGateMlp, kGateGlu})
      run_case(kind, 0, DType::kF32, DType::kF16, 33, forced, {kFmaCfg, splits, true});
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
    x ^= x >> 31; x *= 0xBF58476D1CE4E5B9ull; x ^= x >> 27;
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

static double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct BenchSet {
  void *w1, *wu, *b1, *w2, *bias;
};

static int run_bench() {
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
  double copy_bw;  // 1 GiB device-to-device, read + write bytes
  {
    const size_t n = 1ull << 30;
    void *a, *b;
    CK(cudaMalloc(&a, n));
    CK(cudaMalloc(&b, n));
    CK(cudaMemset(a, 1, n));
    std::vector<double> t;
    for (int i = 0; i < 25; ++i) {
      CK(cudaEventRecord(e0, cs));
      CK(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice, cs));
      CK(cudaEventRecord(e1, cs));
      if (i >= 5) t.push_back(elapsed_us());
    }
    copy_bw = 2.0 * n / (median(t) * 1e-6);
    cudaFree(a);
    cudaFree(b);
  }
  std::printf("device %s, %d SMs, L2 %d MB, copy bandwidth (read+write) %.0f GB/s\n", prop.name,
              prop.multiProcessorCount, prop.l2CacheSize >> 20, copy_bw / 1e9);
  const int Dm = 2560, I = 512, H = 8, kMaxN = 8192;
  const int ns[] = {1, 2, 4, 8, 16, 32, 64, 128, 512, 2048, 8192};
  void* x = random_bf16(static_cast<size_t>(kMaxN) * Dm, 7, 2.f);
  float* lam;
  CK(cudaMalloc(&lam, static_cast<size_t>(kMaxN) * H * 4));
  const size_t ws_cap = 256ull << 20;
  void* ws;
  CK(cudaMalloc(&ws, ws_cap));
  CK(device_cc_major(g_cc_major));
  const std::string log_path = std::string(getenv("OUT") ? getenv("OUT") : ".") + "/sweep.txt";
  FILE* sweep_log = std::fopen(log_path.c_str(), "w");
  for (int kind : {kGateMlp, kGateGlu}) {
    const bool glu = kind == kGateGlu;
    const size_t wbytes = (static_cast<size_t>(I) * Dm * (glu ? 2 : 1) +
                           static_cast<size_t>(H) * I + (glu ? 0 : I) + H) * 2;
    // Rotate weight sets over >= 3x L2 so that every call reads its weights from DRAM, as a
    // model's layers do (each has its own gate).
    const int nsets =
        static_cast<int>(std::max<size_t>(2, (3 * prop.l2CacheSize + wbytes - 1) / wbytes));
    std::vector<BenchSet> sets(nsets);
    for (int i = 0; i < nsets; ++i) {
      const float sc = 1.f / std::sqrt(static_cast<float>(Dm));
      sets[i].w1 = random_bf16(static_cast<size_t>(I) * Dm, 100 + i, sc);
      sets[i].wu = glu ? random_bf16(static_cast<size_t>(I) * Dm, 5000 + i, sc) : nullptr;
      sets[i].b1 = glu ? nullptr : random_bf16(I, 9000 + i, 0.5f);
      sets[i].w2 = random_bf16(static_cast<size_t>(H) * I, 12000 + i, 0.1f);
      sets[i].bias = random_bf16(H, 15000 + i, 2.f);
    }
    CK(cudaDeviceSynchronize());
    int cur = 0;
    // One call on the next weight set; plan == nullptr: the public API; hidden_only: only the
    // plan's hidden-layer kernel (where the time goes).
    auto call = [&](int n, const gate_plan_t* plan, cudaStream_t st, bool hidden_only = false) {
      const BenchSet& s = sets[cur];
      cur = (cur + 1) % nsets;
      gate_params_t g;
      g.kind = kind; g.act = kGateSilu; g.n = n; g.in_dim = Dm; g.inter = I; g.kv_heads = H;
      g.x = x; g.x_dtype = DType::kBF16; g.w_dtype = DType::kBF16;
      if (glu) { g.w_gate = s.w1; g.w_up = s.wu; g.w_down = s.w2; }
      else { g.w1 = s.w1; g.b1 = s.b1; g.w2 = s.w2; }
      g.bias = s.bias; g.lam = lam;
      if (plan != nullptr) {
        int slots;
        CK(hidden_only ? launch_hidden(g, *plan, ws, slots, st)
                       : run_plan(g, *plan, g_cc_major, ws, st));
        return;
      }
      if (RetentionGateWorkspaceBytes(g) > ws_cap) { std::fprintf(stderr, "ws\n"); std::exit(2); }
      CK(RetentionGate(g, ws, st));
    };
    // Device time per call: a CUDA graph of `calls` calls (rotating sets), median of replays.
    auto graph_us = [&](int n, const gate_plan_t* plan, int calls, int reps,
                        bool hidden_only = false) {
      cudaGraph_t graph;
      cudaGraphExec_t gexec;
      CK(cudaStreamBeginCapture(cs, cudaStreamCaptureModeThreadLocal));
      for (int i = 0; i < calls; ++i) call(n, plan, cs, hidden_only);
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
    std::printf("\n%s: Dm %d, I %d, Hkv %d, bf16 x and weights, %d weight sets of %.2f MB\n",
                glu ? "rg3" : "rg", Dm, I, H, nsets, wbytes / 1e6);
    std::printf("%6s %-12s %9s %9s %9s %7s %8s %9s\n", "n", "plan", "call_us", "graph_us",
                "wGB/s", "frac", "TFLOP/s", "hidden_us");
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
      const double usg = graph_us(n, nullptr, n <= 512 ? nsets : 4, 50);
      const double flops = 2.0 * n * I * Dm * (glu ? 2 : 1) + 2.0 * n * I * H;
      gate_params_t g;
      g.kind = kind; g.n = n; g.in_dim = Dm; g.inter = I; g.kv_heads = H;
      const gate_plan_t pl = tc_plan(g, -1, 0);  // the API's plan (bf16 on sm_80+)
      const double hid = graph_us(n, &pl, n <= 512 ? nsets : 4, 50, true);
      std::printf("%6d %-12s %9.2f %9.2f %9.0f %7.3f %8.1f %9.2f\n", n, plan_name(pl).c_str(),
                  us, usg, wbytes / (usg * 1e-6) / 1e9, wbytes / (usg * 1e-6) / copy_bw,
                  flops / (usg * 1e-6) / 1e12, hid);
    }
    // Forced plans: every configuration x split count; the five fastest per n are printed.
    std::printf("sweep (%s): fastest forced plans, graph us per call\n", glu ? "rg3" : "rg");
    for (int n : {1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192}) {
      gate_params_t g;
      g.kind = kind; g.n = n; g.in_dim = Dm; g.inter = I; g.kv_heads = H;
      std::vector<std::pair<double, std::string>> res;
      for (int cfg = 0; cfg < kNumTcCfg; ++cfg) {
        const tc_shape_t sh = tc_shape(cfg, glu);
        if (sh.bn < 64 && sh.bn < n) continue;  // a skinny tile narrower than n: never chosen
        int last = 0;
        for (int splits : {1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40}) {
          const gate_plan_t pl = tc_plan(g, cfg, splits);
          if (pl.splits == last || pl.ws_bytes > ws_cap) continue;
          last = pl.splits;
          const double u = graph_us(n, &pl, n <= 512 ? nsets : 4, 20);
          res.push_back({u, plan_name(pl)});
          std::fprintf(sweep_log, "%s n=%d %s %.2f\n", glu ? "rg3" : "rg", n,
                       plan_name(pl).c_str(), u);
        }
      }
      std::sort(res.begin(), res.end());
      std::printf("%6d auto %-12s %8.2f |", n, plan_name(tc_plan(g, -1, 0)).c_str(),
                  graph_us(n, nullptr, n <= 512 ? nsets : 4, 20));
      for (size_t i = 0; i < std::min<size_t>(5, res.size()); ++i)
        std::printf(" %s %.2f", res[i].second.c_str(), res[i].first);
      std::printf("\n");
    }
    for (auto& s : sets)
      for (void* p : {s.w1, s.wu, s.b1, s.w2, s.bias}) cudaFree(p);
  }
  if (sweep_log) std::fclose(sweep_log);
  cudaFree(x);
  cudaFree(lam);
  cudaFree(ws);
  return 0;
}

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "test";
  if (mode == "bench") return run_bench();
  if (mode == "test") return run_tests();
  std::fprintf(stderr, "usage: gate_harness test|bench\n");
  return 2;
}
