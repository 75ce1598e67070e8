#!/bin/sh
# Builds the standalone kernel harness into <repo>/.kbuild/harness (sm_90).
set -e
cd "$(dirname "$0")/../../.."
mkdir -p .kbuild .kobj
rm -f .kbuild/harness
F="-gencode arch=compute_90,code=sm_90 -O3 -std=c++17 -Xcompiler -fopenmp -lineinfo -DTRIMKV_DECODE_TRACE"
pids=""
for s in decode decode_f32 decode_f16 decode_bf16 retention_gate; do
  nvcc $F -c csrc/kernels/$s.cu -o .kobj/$(basename $s).o &
  pids="$pids $!"
done
nvcc $F -c csrc/kernels/harness/harness.cu -o .kobj/harness.o &
pids="$pids $!"
for p in $pids; do wait $p; done  # set -e: a failed compile stops the build
nvcc $F .kobj/*.o -o .kbuild/harness -lgomp
echo built .kbuild/harness
