#!/usr/bin/env bash
# Before/after benchmark of two trees in one GPU call: this checkout (already built, e.g. by
# `scripts/gpu-suite.sh build`) against BEFORE_DIR, another copy of the tree (e.g. `git archive`
# of the base commit, carried along), which this builds with this checkout's node_modules. Runs
# `trimkv bench --backend cuda --only $AB_ONLY` alternately in the two trees, ROUNDS times each,
# then bench/ab.mjs sets the rows side by side with the noise between runs of one tree.
#   bash scripts/gpu-ab.sh BEFORE_DIR [ROUNDS]      (AB_ONLY default decode,prefill,gate; AB_QUICK=1: --quick)
# Writes $OUT/ab.md and $OUT/ab/{before,after}-N/bench.json.
set -uo pipefail
OUT=${OUT:-/tmp/trimkv-out}
before=$(cd "$1" && pwd)
rounds=${2:-2}
only=${AB_ONLY:-decode,prefill,gate}
mkdir -p "$OUT/ab"
[ -e "$before/node_modules" ] || ln -s "$PWD/node_modules" "$before/node_modules"
if [ ! -f "$before/build/Release/trimkv.node" ]; then
  (cd "$before" && TRIMKV_FORCE_BUILD=1 node scripts/install.mjs > "$OUT/ab/before-build.log" 2>&1 \
    && { [ -d dist ] || npx tsc -p tsconfig.build.json; }) || { echo "gpu-ab: building $before failed"; tail -20 "$OUT/ab/before-build.log"; exit 1; }
fi
a=() b=()
for i in $(seq 1 "$rounds"); do
  for side in before after; do
    dir=$PWD; [ $side = before ] && dir=$before
    echo "gpu-ab: $side round $i ($(date +%T))"
    (cd "$dir" && node bin/trimkv.js bench --backend cuda --only "$only" ${AB_QUICK:+--quick} --out "$OUT/ab/$side-$i" \
      > "$OUT/ab/$side-$i.md" 2> "$OUT/ab/$side-$i.log") || { echo "gpu-ab: bench failed in $dir"; tail -5 "$OUT/ab/$side-$i.log"; }
    [ $side = before ] && a+=("$OUT/ab/$side-$i/bench.json") || b+=("$OUT/ab/$side-$i/bench.json")
  done
done
join() { local IFS=,; echo "$*"; }
node bench/ab.mjs --a "$(join "${a[@]}")" --b "$(join "${b[@]}")" --label-a before --label-b after | tee "$OUT/ab.md"
