"""PyTorch baselines for `trimkv bench --torch FILE`, run on the same GPU in the same run.

Usage (on the GPU machine, where torch is installed):
    python3 bench/torch_compare.py OUT.json [--quick] [--device cuda|cpu] [--tiny]

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
--device cpu --tiny only checks that the script runs (no timings worth reading).
"""
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


def timed(fn, iters=100, warmup=10):
    """Per-call ms of fn(i): CUDA events (one pair per call, queued back to back), or a clock on the CPU."""
    for i in range(warmup):
        fn(i)
    if DEV != "cuda":
        out = []
        for i in range(iters):
            t0 = time.perf_counter()
            fn(i)
            out.append((time.perf_counter() - t0) * 1e3)
        return out
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
    torch.cuda._sleep(int(20e6))  # hold the GPU back while the calls queue up (about 10-20 ms)
    ev[0].record()
    for i in range(iters):
        fn(i)
        ev[i + 1].record()
    ev[-1].synchronize()
    return [ev[i].elapsed_time(ev[i + 1]) for i in range(iters)]


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
    bytes_ = per + 2 * batch * HQ * D * 2
    return {"batch": batch, "memory": memory, **r, "bytes": bytes_, "bandwidth": bytes_ / (r["ms"] * 1e-3) / 1e9}


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
    torch.manual_seed(0)
    t0 = time.time()
    res = {"schema": "trimkv-torch/1", "gpu": torch.cuda.get_device_name() if DEV == "cuda" else "cpu",
           "torch": torch.__version__, "cuda": torch.version.cuda, "device": DEV,
           "shape": {"qHeads": HQ, "kvHeads": HKV, "headDim": D, "dtype": "bf16"},
           "copyGBs": copy_bandwidth(), "matmulTFLOPs": matmul_tflops(), "sdpa": [], "full": [], "reference": []}
    print(f"copy {res['copyGBs']:.0f} GB/s, bf16 matmul {res['matmulTFLOPs']:.0f} TFLOP/s", flush=True)
    # The same grids as `trimkv bench` (lib/bench/suite.ts defaultPlan).
    if tiny:
        batches, memories, contexts, cycles, iters = [1], [16], [64, 128], 1, 5
    elif quick:
        batches, memories, contexts, cycles, iters = [1, 32], [512, 4096], [1024, 8192, 32768, 131072], 1, 50
    else:
        batches, memories, contexts, cycles, iters = [1, 8, 32, 128], [512, 1024, 2048, 4096, 8192], \
            [1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072], 2, 100
    buffers = [0, 64] if not tiny else [0, 4]
    for b in batches:
        for m in memories:
            res["sdpa"].append(guarded(lambda: bench_sdpa(b, m, iters), {"batch": b, "memory": m}))
    full_batches = [1, 8] if not tiny else [1]
    for b in full_batches:
        for t in contexts:
            res["full"].append(guarded(lambda: bench_full(b, t, iters), {"batch": b, "context": t}))
    for b in batches:
        for m in memories:
            for buf in buffers:
                res["reference"].append(guarded(lambda: bench_reference(b, m, buf, cycles), {"batch": b, "memory": m, "buffer": buf}))
    res["seconds"] = time.time() - t0
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {out} in {res['seconds']:.0f} s")


if __name__ == "__main__":
    main()
