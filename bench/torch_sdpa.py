"""PyTorch comparison for the decode benchmark: the same attention (same retained tokens,
no eviction) through torch's scaled_dot_product_attention, flash backend, enable_gqa=True.

Usage (on the GPU machine, where torch is installed):
    python3 bench/torch_sdpa.py OUT.json [--quick]
Times with CUDA events, warm, median of many runs, rotating several K/V sets so that the
inputs exceed the L2 cache; also measures the device-to-device copy bandwidth in the run.
"""
import json
import math
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROTATE_BYTES = 256 << 20


def median_ms(fn, iters=100, warmup=10):
    for _ in range(warmup):
        fn(0)
    torch.cuda.synchronize()
    times = []
    for i in range(iters):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn(i)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2], times[len(times) // 10], times[(9 * len(times)) // 10]


def copy_bandwidth():
    n = 1 << 30
    x = torch.empty(n, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    x.fill_(1)
    ms, _, _ = median_ms(lambda i: y.copy_(x), iters=20, warmup=3)
    return 2 * n / (ms * 1e-3) / 1e9


def sdpa_decode(batch, memory, hq=32, hkv=8, d=128, dtype=torch.bfloat16):
    n = memory + 1  # the retained tokens plus the new one, as our fused step attends
    per_set = 2 * batch * hkv * n * d * 2
    sets = max(1, min(32, math.ceil(ROTATE_BYTES / per_set)))
    q = torch.randn(batch, hq, 1, d, dtype=dtype, device="cuda")
    ks = [torch.randn(batch, hkv, n, d, dtype=dtype, device="cuda") for _ in range(sets)]
    vs = [torch.randn(batch, hkv, n, d, dtype=dtype, device="cuda") for _ in range(sets)]
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        med, p10, p90 = median_ms(lambda i: F.scaled_dot_product_attention(q, ks[i % sets], vs[i % sets], enable_gqa=True))
    bytes_ = 2 * batch * hkv * n * d * 2 + 2 * batch * hq * d * 2
    return {"batch": batch, "memory": memory, "ms": med, "p10": p10, "p90": p90, "bytes": bytes_,
            "bandwidth": bytes_ / (med * 1e-3) / 1e9}


def main():
    out = sys.argv[1]
    quick = "--quick" in sys.argv
    torch.manual_seed(0)
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "copyGBs": copy_bandwidth(), "sdpa": []}
    batches = [1, 32] if quick else [1, 8, 32, 128]
    memories = [512, 8192] if quick else [512, 2048, 8192]
    for b in batches:
        for m in memories:
            try:
                r = sdpa_decode(b, m)
            except RuntimeError as e:  # e.g. out of memory
                r = {"batch": b, "memory": m, "error": str(e).splitlines()[0]}
            res["sdpa"].append(r)
            print(json.dumps(r), flush=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"copy bandwidth {res['copyGBs']:.0f} GB/s")


if __name__ == "__main__":
    main()
