"""PyTorch flash SDPA over the same M + 1 tokens as each harness bench row (bf16, Hq 32, Hkv 8,
D 128), timed like bench/torch_compare.py (CUDA events, back-to-back calls, rotated inputs)."""
import sys

sys.path.insert(0, "bench")
import torch_compare as tc  # noqa: E402

print("sdpa (flash, enable_gqa): batch M us GB/s")
for m in (512, 2048, 8192):
    for b in (1, 8, 32, 128):
        r = tc.bench_sdpa(b, m, 200)
        print(f"sdpa {b:4d} {m:5d} {r['ms'] * 1e3:9.2f} {r['bandwidth']:8.0f}", flush=True)
