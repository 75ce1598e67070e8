"""PyTorch baselines for `trimkv bench --torch FILE`, run on the same GPU in the same run.

Usage (on the GPU machine, where torch is installed):
    python3 bench/torch_compare.py OUT.json [--quick] [--device cuda|cpu] [--tiny]
                                   [--only sdpa,full,reference,prefill,stream]

Measures, with CUDA events, warm, as medians of many runs over inputs rotated past the L2 cache
(Qwen3-4B attention shape: 32 query heads, 8 KV heads, head dim 128, bf16):
  copyGBs       device-to-device copy bandwidth (read + write) and matmulTFLOPs, a large bf16 GEMM
  sdpa          (1) flash SDPA (enable_gqa) over the same retained tokens as a TRIM-KV decode
                    row: M + 1 tokens, no eviction
  full          (2) a full-cache decode at context T, what users do today: a preallocated cache,
                    the new token's K/V written at slot T, flash SDPA over T + 1 tokens
  reference     (3) the authors' reference pipeline re-expressed in plain PyTorch: per step
                    torch.cat of the new token into K/V/lam/pos, SDPA, and when the cache holds
                    M + B tokens: scores = lam * (T + 1 - pos), topk(M), sort, gather; the time
                    per step averaged over whole eviction cycles
  prefill       (4) causal prefill attention of a chunk of C queries over `cached` earlier tokens
                    plus the chunk: SDPA over cached + C keys with a bottom-right-aligned causal
                    mask (query i sees keys 0 .. cached + i), TFLOP/s counted as 4 Hq D (sum of
                    visible keys); the SDPA path is chosen once by checking each candidate
                    against a float32 reference (prefillPaths in the JSON), named per row
  stream        (5) a long prompt prefilled in chunks into a preallocated full cache: each
                    chunk's K/V written at its slots, attention over every token so far (the
                    prefill path above); total time and peak allocation growth
--device cpu --tiny only checks that the script runs (no timings worth reading).
"""
import functools
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

ROTATE_BYTES = 256 << 20
HQ, HKV, D = 32, 8, 128
DTYPE = torch.bfloat16
DEV = "cuda"


def sdpa(q, k, v):
    """Flash SDPA where available (CUDA), the math backend elsewhere."""
    if DEV == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def timed(fn, iters=100, warmup=10, group=1):
    """Per-call ms of fn(i): CUDA events (one pair per call, queued back to back), or a clock on the CPU.
    group > 1: one value per run of `group` calls with no events between them (its time / group)."""
    iters -= iters % group
    if DEV == "cuda":
        torch.cuda.synchronize()
        t0 = time.perf_counter()
    for i in range(warmup):
        fn(i)
    host_s = (time.perf_counter() - t0) / max(1, warmup) if DEV == "cuda" else 0.0
    if DEV != "cuda":
        out = []
        for i in range(iters):
            t0 = time.perf_counter()
            fn(i)
            out.append((time.perf_counter() - t0) * 1e3)
        return out
    torch.cuda.synchronize()
    runs = iters // group
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(runs + 1)]
    # Hold the GPU back while the calls queue up: at least 20M cycles (about 10 ms), and twice
    # the host time the calls take to enqueue (estimated from the warm-up, at ~2 cycles per ns).
    torch.cuda._sleep(int(min(2e9, max(20e6, 2 * iters * host_s * 2e9))))
    ev[0].record()
    for i in range(iters):
        fn(i)
        if (i + 1) % group == 0:
            ev[(i + 1) // group].record()
    ev[-1].synchronize()
    return [ev[i].elapsed_time(ev[i + 1]) / group for i in range(runs)]


def summary(ms):
    s = sorted(ms)
    at = lambda q: s[min(len(s) - 1, int(round(q * (len(s) - 1))))]
    return {"ms": at(0.5), "p10": at(0.1), "p90": at(0.9), "n": len(s)}


def copy_bandwidth():
    n = (1 << 30) if DEV == "cuda" else (1 << 24)
    x = torch.ones(n, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    ms = summary(timed(lambda i: y.copy_(x), iters=20, warmup=3))["ms"]
    return 2 * n / (ms * 1e-3) / 1e9


def matmul_tflops():
    n = 8192 if DEV == "cuda" else 256
    a = torch.randn(n, n, dtype=DTYPE, device=DEV)
    b = torch.randn(n, n, dtype=DTYPE, device=DEV)
    ms = summary(timed(lambda i: a @ b, iters=20, warmup=3))["ms"]
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def sets_for(per_set, cap=32):
    return max(1, min(cap, math.ceil(ROTATE_BYTES / per_set)))


def bench_sdpa(batch, memory, iters):
    n = memory + 1  # the retained tokens plus the new one, as the fused step attends
    per = 2 * batch * HKV * n * D * 2
    sets = sets_for(per)
    q = torch.randn(batch, HQ, 1, D, dtype=DTYPE, device=DEV)
    ks = [torch.randn(batch, HKV, n, D, dtype=DTYPE, device=DEV) for _ in range(sets)]
    vs = [torch.randn(batch, HKV, n, D, dtype=DTYPE, device=DEV) for _ in range(sets)]
    r = summary(timed(lambda i: sdpa(q, ks[i % sets], vs[i % sets]), iters))
    # Back-to-back: runs of at least 8 calls over the rotated sets, one event pair per run.
    group = sets * math.ceil(8 / sets)
    burst = summary(timed(lambda i: sdpa(q, ks[i % sets], vs[i % sets]), max(11, math.ceil(iters / group)) * group, group=group))
    bytes_ = per + 2 * batch * HQ * D * 2
    return {"batch": batch, "memory": memory, **r, "burstMs": burst["ms"], "bytes": bytes_, "bandwidth": bytes_ / (r["ms"] * 1e-3) / 1e9}


def bench_full(batch, context, iters):
    """One layer of a full-cache decode at context T: write the new K/V at slot T, attend over T + 1."""
    cap = context + 1
    per = 2 * batch * HKV * cap * D * 2
    sets = sets_for(per, cap=max(1, min(32, (8 << 30) // per)))
    q = torch.randn(batch, HQ, 1, D, dtype=DTYPE, device=DEV)
    kn = torch.randn(batch, HKV, 1, D, dtype=DTYPE, device=DEV)
    vn = torch.randn(batch, HKV, 1, D, dtype=DTYPE, device=DEV)
    ks = [torch.randn(batch, HKV, cap, D, dtype=DTYPE, device=DEV) for _ in range(sets)]
    vs = [torch.randn(batch, HKV, cap, D, dtype=DTYPE, device=DEV) for _ in range(sets)]

    def step(i):
        k, v = ks[i % sets], vs[i % sets]
        k[:, :, context:cap].copy_(kn)
        v[:, :, context:cap].copy_(vn)
        return sdpa(q, k[:, :, :cap], v[:, :, :cap])

    r = summary(timed(step, iters))
    bytes_ = per + 2 * batch * HQ * D * 2
    return {"batch": batch, "context": context, **r, "bytes": bytes_, "bandwidth": bytes_ / (r["ms"] * 1e-3) / 1e9}


def bench_reference(batch, memory, buffer, cycles):
    """The reference pipeline at steady state; ms per step averaged over whole eviction cycles."""
    per = 2 * batch * HKV * (memory + buffer) * D * 2
    layers = sets_for(per, cap=16)
    q = torch.randn(batch, HQ, 1, D, dtype=DTYPE, device=DEV)
    kn = torch.randn(batch, HKV, 1, D, dtype=DTYPE, device=DEV)
    vn = torch.randn(batch, HKV, 1, D, dtype=DTYPE, device=DEV)
    lamn = -torch.rand(batch, HKV, 1, device=DEV) * 0.05
    state = []
    for _ in range(layers):
        k = torch.randn(batch, HKV, memory, D, dtype=DTYPE, device=DEV)
        v = torch.randn(batch, HKV, memory, D, dtype=DTYPE, device=DEV)
        lam = -torch.rand(batch, HKV, memory, device=DEV) * 0.05
        pos = torch.arange(memory, device=DEV).expand(batch, HKV, memory).contiguous()
        state.append([k, v, lam, pos])
    T = [memory]

    def step(layer):
        k, v, lam, pos = state[layer]
        t = T[0]
        k = torch.cat([k, kn], dim=2)
        v = torch.cat([v, vn], dim=2)
        lam = torch.cat([lam, lamn], dim=2)
        pos = torch.cat([pos, torch.full((batch, HKV, 1), t, dtype=pos.dtype, device=DEV)], dim=2)
        sdpa(q, k, v)
        if k.shape[2] >= memory + buffer:
            scores = lam * (t + 2 - pos).to(lam.dtype)  # T counts the new token: T + 1 - p with T = t + 1
            idx = scores.topk(memory, dim=2).indices.sort(dim=2).values
            k = k.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, D))
            v = v.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, D))
            lam = lam.gather(2, idx)
            pos = pos.gather(2, idx)
        state[layer] = [k, v, lam, pos]

    steps = (buffer if buffer else 16) * cycles

    def run(_):
        for _s in range(steps):
            for layer in range(layers):
                step(layer)
            T[0] += 1

    run(0)  # warm-up: one round of cycles, so the timed rounds start right after an eviction
    r = summary(timed(run, iters=3, warmup=0))
    return {"batch": batch, "memory": memory, "buffer": buffer, "layers": layers,
            "msPerStep": r["ms"] / (steps * layers), "p10": r["p10"] / (steps * layers), "p90": r["p90"] / (steps * layers)}


def causal_flops(cached, chunk):
    """4 Hq D x (sum over the chunk's queries of the keys each sees): QK^T and PV, 2 FLOPs a multiply-add."""
    return 4 * HQ * D * (chunk * cached + chunk * (chunk + 1) / 2)


@functools.lru_cache(maxsize=4)  # made once per shape, outside the timed calls of a row
def bottom_right_mask(chunk, n):
    """[chunk, n] bool, True where query i (0-based in the chunk) may see key j: j <= n - chunk + i."""
    return torch.arange(n, device=DEV)[None, :] <= torch.arange(chunk, device=DEV)[:, None] + (n - chunk)


def reference_attention(q, k, v):
    """float32 attention with an explicit bottom-right causal mask, K/V repeated per query group."""
    g = q.shape[1] // k.shape[1]
    kf, vf = k.float().repeat_interleave(g, dim=1), v.float().repeat_interleave(g, dim=1)
    s = (q.float() @ kf.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~bottom_right_mask(q.shape[2], k.shape[2]), float("-inf"))
    return s.softmax(-1) @ vf


def _kernels(*names):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([getattr(SDPBackend, n) for n in names])


def _path_flash_causal_lower_right(q, k, v):
    from torch.nn.attention.bias import causal_lower_right
    with _kernels("FLASH_ATTENTION"):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]), enable_gqa=True)


def _path_efficient_causal_lower_right(q, k, v):
    from torch.nn.attention.bias import causal_lower_right
    with _kernels("EFFICIENT_ATTENTION"):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]), enable_gqa=True)


def _path_efficient_bool_mask(q, k, v):
    with _kernels("EFFICIENT_ATTENTION"):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bottom_right_mask(q.shape[2], k.shape[2]), enable_gqa=True)


def _path_efficient_bool_mask_repeat(q, k, v):
    g = q.shape[1] // k.shape[1]
    with _kernels("EFFICIENT_ATTENTION"):
        return F.scaled_dot_product_attention(q, k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1),
                                              attn_mask=bottom_right_mask(q.shape[2], k.shape[2]))


def _path_math_bool_mask(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bottom_right_mask(q.shape[2], k.shape[2]), enable_gqa=True)


# Candidates for cached > 0, best first. PyTorch's is_causal is top-left aligned, which is only
# right when the chunk is all the keys (cached = 0): then flash with is_causal is used.
PREFILL_PATHS = [
    ("flash, causal_lower_right bias, enable_gqa", _path_flash_causal_lower_right),
    ("efficient, causal_lower_right bias, enable_gqa", _path_efficient_causal_lower_right),
    ("efficient, boolean mask, enable_gqa", _path_efficient_bool_mask),
    ("efficient, boolean mask, K/V repeated to the query heads", _path_efficient_bool_mask_repeat),
    ("math, boolean mask", _path_math_bool_mask),
]
PREFILL = {}  # chosen once: {"cached": (name, fn), "fresh": (name, fn), "checks": [...]}


def _path_flash_is_causal(q, k, v):
    with _kernels("FLASH_ATTENTION"):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def choose_prefill_paths():
    """Runs every candidate on a small probe against reference_attention; keeps the first that matches."""
    torch.manual_seed(1)
    checks = []

    def probe(name, fn, chunk, cached):
        q = torch.randn(1, HQ, chunk, D, dtype=DTYPE, device=DEV)
        k = torch.randn(1, HKV, cached + chunk, D, dtype=DTYPE, device=DEV)
        v = torch.randn(1, HKV, cached + chunk, D, dtype=DTYPE, device=DEV)
        try:
            err = (fn(q, k, v).float() - reference_attention(q, k, v)).abs().max().item()
            ok = math.isfinite(err) and err <= 2e-2
            checks.append({"path": name, "cached": cached, "chunk": chunk, "maxErr": err if math.isfinite(err) else None, "ok": ok})
        except Exception as e:  # noqa: BLE001 - a backend that refuses the inputs is just not chosen
            checks.append({"path": name, "cached": cached, "chunk": chunk, "ok": False, "error": str(e).splitlines()[0][:300]})
        return checks[-1]["ok"]

    fresh = [("flash, is_causal, enable_gqa", _path_flash_is_causal)] if DEV == "cuda" else []
    fresh.append(("math, boolean mask", _path_math_bool_mask))
    PREFILL["fresh"] = next(((n, f) for n, f in fresh if probe(n, f, 192, 0)), None)
    cands = PREFILL_PATHS if DEV == "cuda" else PREFILL_PATHS[-1:]
    PREFILL["cached"] = next(((n, f) for n, f in cands if probe(n, f, 192, 320)), None)
    PREFILL["checks"] = checks
    for c in checks:
        print(json.dumps(c), flush=True)


def prefill_attention(q, k, v):
    """Causal attention of q's chunk over k/v's keys, the chunk's queries at the end (bottom-right)."""
    name, fn = PREFILL["fresh" if q.shape[2] == k.shape[2] else "cached"]
    return fn(q, k, v)


def prefill_path_name(cached):
    p = PREFILL["fresh" if cached == 0 else "cached"]
    return p[0] if p else None


def bench_prefill(cached, chunk, iters):
    if not PREFILL.get("fresh" if cached == 0 else "cached"):
        raise RuntimeError("no SDPA path passed the bottom-right causal check (see prefillPaths)")
    n = cached + chunk
    per = (HQ * chunk + 2 * HKV * n) * D * 2
    sets = sets_for(per, cap=8)
    qs = [torch.randn(1, HQ, chunk, D, dtype=DTYPE, device=DEV) for _ in range(sets)]
    ks = [torch.randn(1, HKV, n, D, dtype=DTYPE, device=DEV) for _ in range(sets)]
    vs = [torch.randn(1, HKV, n, D, dtype=DTYPE, device=DEV) for _ in range(sets)]
    r = summary(timed(lambda i: prefill_attention(qs[i % sets], ks[i % sets], vs[i % sets]), iters))
    flops = causal_flops(cached, chunk)
    return {"cached": cached, "chunk": chunk, **r, "flops": flops, "tflops": flops / (r["ms"] * 1e-3) / 1e12,
            "backend": prefill_path_name(cached)}


def bench_stream(prompt, chunk):
    """A prompt prefilled in chunks into a preallocated full cache: write the chunk's K/V, attend over all so far."""
    if not (PREFILL.get("fresh") and PREFILL.get("cached")):
        raise RuntimeError("no SDPA path passed the bottom-right causal check (see prefillPaths)")
    q = torch.randn(1, HQ, chunk, D, dtype=DTYPE, device=DEV)
    kn = torch.randn(1, HKV, chunk, D, dtype=DTYPE, device=DEV)
    vn = torch.randn(1, HKV, chunk, D, dtype=DTYPE, device=DEV)
    if DEV == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    kc = torch.empty(1, HKV, prompt, D, dtype=DTYPE, device=DEV)
    vc = torch.empty(1, HKV, prompt, D, dtype=DTYPE, device=DEV)
    chunks = (prompt + chunk - 1) // chunk

    def run(_):
        for i in range(chunks):
            s, e = i * chunk, min(prompt, (i + 1) * chunk)
            kc[:, :, s:e].copy_(kn[:, :, :e - s])
            vc[:, :, s:e].copy_(vn[:, :, :e - s])
            prefill_attention(q[:, :, :e - s], kc[:, :, :e], vc[:, :, :e])

    ms = summary(timed(run, iters=1, warmup=1))["ms"]
    peak = torch.cuda.max_memory_allocated() - base if DEV == "cuda" else None
    return {"prompt": prompt, "chunk": chunk, "chunks": chunks, "ms": ms, "peakBytes": peak, "kvBytes": 2 * prompt * HKV * D * 2,
            "backend": f"{prefill_path_name(0)} (first chunk), {prefill_path_name(1)} (the others)"}


def guarded(fn, keys):
    try:
        r = fn()
    except (RuntimeError, torch.cuda.OutOfMemoryError) as e:  # e.g. out of memory
        if DEV == "cuda":
            torch.cuda.empty_cache()
        r = {**keys, "error": str(e).splitlines()[0]}
    print(json.dumps(r), flush=True)
    return r


def main():
    global DEV
    args = sys.argv[1:]
    out = args[0]
    quick, tiny = "--quick" in args, "--tiny" in args
    if "--device" in args:
        DEV = args[args.index("--device") + 1]
    parts = {"sdpa", "full", "reference", "prefill", "stream"}
    if "--only" in args:
        only = set(args[args.index("--only") + 1].split(","))
        if not only <= parts:
            sys.exit(f"Expected some of {','.join(sorted(parts))} for --only but received {','.join(sorted(only - parts))}")
        parts = only
    torch.manual_seed(0)
    t0 = time.time()
    res = {"schema": "trimkv-torch/1", "gpu": torch.cuda.get_device_name() if DEV == "cuda" else "cpu",
           "torch": torch.__version__, "cuda": torch.version.cuda, "device": DEV,
           "shape": {"qHeads": HQ, "kvHeads": HKV, "headDim": D, "dtype": "bf16"},
           "copyGBs": copy_bandwidth(), "matmulTFLOPs": matmul_tflops(), "sdpa": [], "full": [], "reference": [],
           "prefill": [], "stream": [], "prefillPaths": []}
    print(f"copy {res['copyGBs']:.0f} GB/s, bf16 matmul {res['matmulTFLOPs']:.0f} TFLOP/s", flush=True)
    # The same grids as `trimkv bench` (bench/plan.ts defaultPlan).
    if tiny:
        batches, memories, contexts, cycles, iters = [1], [16], [64, 128], 1, 5
    elif quick:
        batches, memories, contexts, cycles, iters = [1, 32], [512, 4096], [1024, 8192, 32768, 131072], 1, 50
    else:
        batches, memories, contexts, cycles, iters = [1, 8, 32, 128], [512, 1024, 2048, 4096, 8192], \
            [1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072], 2, 100
    buffers = [0, 64] if not tiny else [0, 4]
    # prefill: cached x chunk; stream: prompts in chunks (bench/plan.ts prefill.attend, stream)
    if tiny:
        cached_list, chunks, prefill_iters, prompts, stream_chunk = [0, 16], [16], 3, [64], 16
    elif quick:
        cached_list, chunks, prefill_iters, prompts, stream_chunk = [0, 1024], [512, 2048], 20, [32768], 2048
    else:
        cached_list, chunks, prefill_iters, prompts, stream_chunk = [0, 1024, 4096], [512, 2048, 8192], 30, [131072], 2048
    if "sdpa" in parts:
        for b in batches:
            for m in memories:
                res["sdpa"].append(guarded(lambda: bench_sdpa(b, m, iters), {"batch": b, "memory": m}))
    full_batches = [1, 8] if not tiny else [1]
    if "full" in parts:
        for b in full_batches:
            for t in contexts:
                res["full"].append(guarded(lambda: bench_full(b, t, iters), {"batch": b, "context": t}))
    if "reference" in parts:
        for b in batches:
            for m in memories:
                for buf in buffers:
                    res["reference"].append(guarded(lambda: bench_reference(b, m, buf, cycles), {"batch": b, "memory": m, "buffer": buf}))
    if parts & {"prefill", "stream"}:
        choose_prefill_paths()
        res["prefillPaths"] = PREFILL["checks"]
    if "prefill" in parts:
        for c in cached_list:
            for ch in chunks:
                res["prefill"].append(guarded(lambda: bench_prefill(c, ch, prefill_iters), {"cached": c, "chunk": ch}))
    if "stream" in parts:
        for p in prompts:
            res["stream"].append(guarded(lambda: bench_stream(p, stream_chunk), {"prompt": p, "chunk": stream_chunk}))
    res["seconds"] = time.time() - t0
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {out} in {res['seconds']:.0f} s")


if __name__ == "__main__":
    main()
