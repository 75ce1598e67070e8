#!/bin/sh
# Builds the standalone retention-gate harness into <repo>/.gbuild/gate_harness (sm_90). The
# harness includes csrc/kernels/retention_gate.cu itself (to force launch plans), so this is
# the only compile.
set -e
cd "$(dirname "$0")/../../.."
mkdir -p .gbuild
nvcc -gencode arch=compute_90,code=sm_90 -O3 -std=c++17 -lineinfo -Icsrc/kernels \
  -Xcompiler -fopenmp csrc/kernels/gate_harness/gate_harness.cu -o .gbuild/gate_harness -lgomp
echo built .gbuild/gate_harness
