#!/usr/bin/env bash
# One call on the GPU machine (see ../shared/gpu/README.md; pack the kit with scripts/gpu-pack.sh): build the addon there (16 cores),
# run the whole test suite with CUDA required, compute-sanitizer on the CUDA suites, and the
# benchmark suite with the PyTorch comparison. Logs and JSON go to $OUT.
#   (after entering the GPU kit, ../shared/gpu/README.md) bash scripts/gpu-suite.sh [build|fixtures|test|sanitize|bench]... [--quick] [--results bench/RESULTS.md]
# bench: bench/torch_compare.py, then `trimkv bench --backend cuda,cpu --torch ...`, writing
# $OUT/bench.json, bench.md and the SVGs; --results FILE also writes FILE (plots in plots/ beside
# it) and copies both to $OUT/results/ so they come back from the GPU machine.
# Environment: TEST_TIMEOUT, SANITIZE_TIMEOUT, SANITIZE_STEPS, SANITIZE_FILTER, COMPUTE_SANITIZER,
# TORCH_TIMEOUT, TORCH_ONLY (torch_compare.py --only), BENCH_TIMEOUT, BENCH_BACKENDS (default
# cuda,cpu), BENCH_ONLY (trimkv bench --only): shorter runs that fit one call.
set -uo pipefail
OUT=${OUT:-/tmp/trimkv-out}
mkdir -p "$OUT"
# The GPU copy of the tree has no .git: scripts/gpu-pack.sh packs the commit in .trimkv-commit.
if [ -z "${TRIMKV_COMMIT:-}" ] && [ -s .trimkv-commit ]; then export TRIMKV_COMMIT=$(cat .trimkv-commit); fi
echo "commit: ${TRIMKV_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
steps=()
RESULTS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) BENCH_QUICK=1 ;;
    --results) RESULTS="$2"; shift ;;
    --results=*) RESULTS="${1#--results=}" ;;
    *) steps+=("$1") ;;
  esac
  shift
done
[ ${#steps[@]} -eq 0 ] && steps=(build test sanitize bench)
status=0
for s in "${steps[@]}"; do
  echo "=== $s ($(date +%T))"
  case "$s" in
    build)
      TRIMKV_FORCE_BUILD=1 node scripts/install.mjs > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
      npm run build:ts > /dev/null && node bin/trimkv.js info | tee "$OUT/info.txt" ;;
    fixtures)
      python3 scripts/make_checkpoint_fixtures.py test/fixtures/checkpoints > "$OUT/fixtures.log" 2>&1 || status=1
      tail -5 "$OUT/fixtures.log"
      tar -czf "$OUT/fixtures.tgz" test/fixtures/checkpoints ;;
    test)
      # test/pack.test.ts fills its npm cache from the registry, which the GPU machine cannot
      # reach; CI (no GPU, registry reachable) runs it. Everything else runs unchanged.
      echo "test/pack.test.ts: not run here (it needs the npm registry; CI runs it)"
      TRIMKV_REQUIRE_CUDA=1 timeout ${TEST_TIMEOUT:-360} npx vitest run --reporter=default --exclude test/pack.test.ts > "$OUT/test.log" 2>&1 || status=1
      grep -E "Test Files|Tests |FAIL|×" "$OUT/test.log" | head -40 ;;
    sanitize)
      # Every CUDA kernel under memcheck and racecheck through the same vitest files, at sizes
      # that keep the sanitizers' slowdown within the call: short long-runs, the smaller chunks.
      for tool in memcheck racecheck; do
        TRIMKV_REQUIRE_CUDA=1 TRIMKV_LONG_STEPS=${SANITIZE_STEPS:-60} timeout ${SANITIZE_TIMEOUT:-100} "${COMPUTE_SANITIZER:-compute-sanitizer}" --tool $tool --error-exitcode 9 \
          --target-processes all npx vitest run test/cuda_decode.test.ts test/cuda_prefill.test.ts test/gate.test.ts \
          -t "${SANITIZE_FILTER:-long runs|chunks of (1|7|64),|varlen|cuda}" > "$OUT/sanitize-$tool.log" 2>&1 || status=1
        echo "$tool: $(grep -E "(ERROR|RACECHECK) SUMMARY" "$OUT/sanitize-$tool.log" | sort | uniq -c | tr '\n' ' ')"
        grep -E "Tests " "$OUT/sanitize-$tool.log" | tail -1
      done ;;
    bench)
      PYTHONUNBUFFERED=1 timeout ${TORCH_TIMEOUT:-200} python3 bench/torch_compare.py "$OUT/torch.json" ${BENCH_QUICK:+--quick} \
        ${TORCH_ONLY:+--only "$TORCH_ONLY"} > "$OUT/torch.log" 2>&1 || { status=1; tail -5 "$OUT/torch.log"; }
      torch_arg=(); [ -s "$OUT/torch.json" ] && torch_arg=(--torch "$OUT/torch.json")
      results_arg=(); [ -n "$RESULTS" ] && results_arg=(--results "$RESULTS")
      timeout ${BENCH_TIMEOUT:-330} node bin/trimkv.js bench --backend "${BENCH_BACKENDS:-cuda,cpu}" ${BENCH_QUICK:+--quick} \
        ${BENCH_ONLY:+--only "$BENCH_ONLY"} "${torch_arg[@]}" "${results_arg[@]}" --out "$OUT" \
        > "$OUT/bench-stdout.md" 2> "$OUT/bench.log" || status=1
      if [ -n "$RESULTS" ] && [ -f "$RESULTS" ]; then
        mkdir -p "$OUT/results" && cp "$RESULTS" "$OUT/results/" && cp -r "$(dirname "$RESULTS")/plots" "$OUT/results/"
      fi
      cat "$OUT/bench.md"; tail -4 "$OUT/bench.log" ;;
    *) echo "unknown step $s"; status=1 ;;
  esac
done
# Only a few files come back from the GPU machine: keep everything in one archive.
tar -czf /tmp/trimkv-out.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/trimkv-out.tgz "$OUT/out.tgz"
exit $status
