#!/bin/bash
# Builds the standalone prefill harness into <repo>/.pbuild/prefill_harness (sm_90).
# PREFILL_CUH=<path>: build against that copy of csrc/kernels/prefill.cuh (a variant under
# development) in a mirror of csrc under .pbuild/src, leaving the tree alone.
set -e
cd "$(dirname "$0")/../../.."
mkdir -p .pbuild
SRC=csrc
if [ -n "$PREFILL_CUH" ]; then
  rm -rf .pbuild/src && cp -r csrc .pbuild/src && cp "$PREFILL_CUH" .pbuild/src/kernels/prefill.cuh
  SRC=.pbuild/src
fi
F="-gencode arch=compute_90,code=sm_90 -O3 -std=c++17 -lineinfo -I$SRC"
pids=""
for s in prefill prefill_f32 prefill_f16 prefill_bf16; do
  nvcc $F -c $SRC/kernels/$s.cu -o .pbuild/$s.o &
  pids="$pids $!"
done
nvcc $F -Xptxas -v -c $SRC/kernels/prefill_harness/prefill_harness.cu -o .pbuild/prefill_harness.o \
  2> .pbuild/prefill_harness.ptxas &
pids="$pids $!"
for p in $pids; do wait $p; done
nvcc $F .pbuild/prefill.o .pbuild/prefill_f32.o .pbuild/prefill_f16.o .pbuild/prefill_bf16.o \
  .pbuild/prefill_harness.o -o .pbuild/prefill_harness -lpthread
echo built .pbuild/prefill_harness
