#!/bin/bash
# One device-machine call: attention variants check, benchmark + SDPA table, full grid.
#   bash bench/kernels/prefill/run_gpu.sh  (from the repo root; writes under $OUT)
# Expects the harness built (bench/kernels/README.md) and carried along. Time limits per step: T_ATTN,
# T_BENCH, T_SDPA, T_GRID (seconds); GRID_ARGS are passed to the grid step.
cd "$(dirname "$0")/../../.."
OUT=${OUT:-/tmp/out}
mkdir -p $OUT
H=${H:-build-harness/harnesses/prefill_harness}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
SEED=${SEED:-12345}
t0=$(date +%s)
echo "== attention variants"; timeout ${T_ATTN:-60} $H --attn-only --seed $SEED > $OUT/attn.txt 2>&1
echo "rc $? ($(( $(date +%s) - t0 )) s)"; grep -E "FAIL|attention:" $OUT/attn.txt | tail -20
echo "== bench"; timeout ${T_BENCH:-60} $H --bench-only --iters ${ITERS:-50} > $OUT/bench.txt 2>&1
echo "rc $? ($(( $(date +%s) - t0 )) s)"; grep -v "^BENCH" $OUT/bench.txt | tail -5
echo "== sdpa"; PYTHONUNBUFFERED=1 timeout ${T_SDPA:-60} python3 bench/kernels/prefill/sdpa_bench.py $OUT/bench.txt > $OUT/table.txt 2>&1
echo "rc $? ($(( $(date +%s) - t0 )) s)"
echo "== grid"; timeout ${T_GRID:-90} $H --no-bench --seed $SEED $GRID_ARGS > $OUT/grid.txt 2>&1
echo "rc $? ($(( $(date +%s) - t0 )) s)"; grep -E "FAIL|grid:|64K|TOTAL|C=.*pass" $OUT/grid.txt | tail -30
tail -3 $OUT/grid.txt
cat $OUT/table.txt
