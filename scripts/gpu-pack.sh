#!/usr/bin/env bash
# Packs the GPU kit (../shared/gpu/pack, kept beside the repository) with the commit of this
# checkout in it: the GPU machine's copy of the tree has no .git, so this writes the commit to
# .trimkv-commit (git-ignored), packs it with the other paths, and scripts/gpu-suite.sh reads it
# there to stamp bench.json and bench/RESULTS.md.
#   bash scripts/gpu-pack.sh [paths to pack...]   (default: node_modules build dist prebuilds)
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
commit=$(git rev-parse HEAD)
[ -n "$(git status --porcelain --untracked-files=no)" ] && commit="$commit+dirty"
echo "$commit" > .trimkv-commit
paths=("$@")
if [ ${#paths[@]} -eq 0 ]; then
  for p in node_modules build dist prebuilds; do [ -e "$p" ] && paths+=("$p"); done
fi
"$root/../shared/gpu/pack" "${paths[@]}" .trimkv-commit
echo "kit commit: $commit"
