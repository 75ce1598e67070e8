"""PyTorch flash SDPA on the prefill harness's bench shapes, and the combined table.

  python3 sdpa_bench.py BENCH_LOG [--iters N]

Times causal attention of a chunk of C queries over `cached` earlier keys plus the chunk (bf16,
Hq 32, Hkv 8, batch 1, enable_gqa) the way bench/torch_compare.py does: flash with
causal_lower_right when cached > 0, flash with is_causal when cached = 0, each path checked
against a float32 reference on a probe first; inputs rotated over up to 8 sets of 256 MB in
all; calls queued behind torch.cuda._sleep; CUDA events between calls; median. Then reads the
BENCH lines the harness printed to BENCH_LOG and prints one table: TFLOP/s of each variant and
its ratio to SDPA.
"""
import math
import re
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

HQ, HKV = 32, 8
DT = torch.bfloat16


def flops(cached, chunk, d):
    return 4 * HQ * d * (chunk * cached + chunk * (chunk + 1) / 2)


def attend(q, k, v):
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        if q.shape[2] == k.shape[2]:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]), enable_gqa=True)


def reference(q, k, v):
    g = q.shape[1] // k.shape[1]
    kf, vf = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    s = (q.float() @ kf.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    c, n = q.shape[2], k.shape[2]
    mask = torch.arange(n, device="cuda")[None, :] <= torch.arange(c, device="cuda")[:, None] + (n - c)
    return s.masked_fill(~mask, float("-inf")).softmax(-1) @ vf


def probe():
    torch.manual_seed(1)
    for cached in (0, 320):
        for d in (64, 128, 256):
            q = torch.randn(1, HQ, 192, d, dtype=DT, device="cuda")
            k = torch.randn(1, HKV, cached + 192, d, dtype=DT, device="cuda")
            v = torch.randn_like(k)
            err = (attend(q, k, v).float() - reference(q, k, v)).abs().max().item()
            print(f"probe cached={cached} D={d} max err {err:.3g}", flush=True)
            assert err <= 2e-2, "SDPA path is not bottom-right causal attention"


def timed(fn, iters, warmup=5):
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
    torch.cuda._sleep(int(20e6))
    ev[0].record()
    for i in range(iters):
        fn(i)
        ev[i + 1].record()
    ev[-1].synchronize()
    ms = sorted(ev[i].elapsed_time(ev[i + 1]) for i in range(iters))
    return ms[len(ms) // 2]


def bench(cached, chunk, d, iters):
    n = cached + chunk
    per = (2 * HQ * chunk + 2 * HKV * n) * d * 2
    sets = max(1, min(8, math.ceil((256 << 20) / per)))
    qs = [torch.randn(1, HQ, chunk, d, dtype=DT, device="cuda") for _ in range(sets)]
    ks = [torch.randn(1, HKV, n, d, dtype=DT, device="cuda") for _ in range(sets)]
    vs = [torch.randn(1, HKV, n, d, dtype=DT, device="cuda") for _ in range(sets)]
    ms = timed(lambda i: attend(qs[i % sets], ks[i % sets], vs[i % sets]), iters)
    return ms, flops(cached, chunk, d) / (ms * 1e-3) / 1e12


def main():
    log = sys.argv[1]
    iters = int(sys.argv[sys.argv.index("--iters") + 1]) if "--iters" in sys.argv else 50
    rows = {}
    for line in open(log):
        m = re.match(r"BENCH D=(\d+) cached=(\d+) C=(\d+) variant=(\w+) ms=([\d.]+) tflops=([\d.]+) diff=(\S+)", line)
        if m:
            key = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
            rows.setdefault(key, {})[m.group(4)] = (float(m.group(6)), m.group(7))
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    probe()
    variants = ["base", "new", "chunk", "ng1", "ng2", "stagger", "bksmall"]
    print("| D | cached | C | SDPA TFLOP/s | " + " | ".join(f"{v} (x SDPA)" for v in variants) + " |")
    print("|---:|---:|---:|---:|" + "---:|" * len(variants))
    for key in sorted(rows, key=lambda k: (k[0] != 128, k[0], k[1], k[2])):
        d, cached, c = key
        ms, sd = bench(cached, c, d, iters)
        cells = []
        for v in variants:
            if v in rows[key]:
                t, diff = rows[key][v]
                cells.append(f"{t:.1f} ({t / sd:.2f})")
            else:
                cells.append("-")
        print(f"| {d} | {cached} | {c} | {sd:.1f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
