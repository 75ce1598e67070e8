#!/usr/bin/env bash
# One call on the GPU machine (see ../shared/gpu/README.md): build the addon there (16 cores),
# run the whole test suite with CUDA required, compute-sanitizer on the CUDA suites, and the
# decode benchmark with the PyTorch comparison. Logs and JSON go to $OUT.
#   source .gpu-kit/enter && bash scripts/gpu-suite.sh [build|fixtures|test|sanitize|bench]...
set -uo pipefail
OUT=${OUT:-/tmp/trimkv-out}
mkdir -p "$OUT"
steps=("$@")
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
      TRIMKV_REQUIRE_CUDA=1 npx vitest run --reporter=default > "$OUT/test.log" 2>&1 || status=1
      grep -E "Test Files|Tests |FAIL|×" "$OUT/test.log" | head -40 ;;
    sanitize)
      for tool in memcheck racecheck; do
        TRIMKV_REQUIRE_CUDA=1 TRIMKV_LONG_STEPS=${SANITIZE_STEPS:-150} compute-sanitizer --tool $tool --error-exitcode 9 \
          --target-processes all npx vitest run test/cuda_decode.test.ts -t "${SANITIZE_FILTER:-}" > "$OUT/sanitize-$tool.log" 2>&1 || status=1
        grep -E "ERROR SUMMARY|Tests " "$OUT/sanitize-$tool.log" | tail -3
      done ;;
    bench)
      PYTHONUNBUFFERED=1 python3 bench/torch_sdpa.py "$OUT/torch.json" ${BENCH_QUICK:+--quick} > "$OUT/torch.log" 2>&1 || status=1
      node bench/decode.mjs ${BENCH_QUICK:+--quick} --torch "$OUT/torch.json" --out "$OUT/bench.json" > "$OUT/bench.md" 2> "$OUT/bench.log" || status=1
      cat "$OUT/bench.md"; tail -3 "$OUT/bench.log" ;;
    *) echo "unknown step $s"; status=1 ;;
  esac
done
exit $status
