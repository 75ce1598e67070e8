#!/bin/sh
# Builds the standalone prefill harness into <repo>/.pbuild/prefill_harness (sm_90).
set -e
cd "$(dirname "$0")/../../.."
mkdir -p .pbuild
F="-gencode arch=compute_90,code=sm_90 -O3 -std=c++17 -lineinfo -Icsrc"
for s in prefill prefill_f32 prefill_f16 prefill_bf16; do
  nvcc $F -c csrc/kernels/$s.cu -o .pbuild/$s.o &
done
nvcc $F -c csrc/kernels/prefill_harness/prefill_harness.cu -o .pbuild/prefill_harness.o &
wait
nvcc $F .pbuild/prefill.o .pbuild/prefill_f32.o .pbuild/prefill_f16.o .pbuild/prefill_bf16.o \
  .pbuild/prefill_harness.o -o .pbuild/prefill_harness -lpthread
echo built .pbuild/prefill_harness
