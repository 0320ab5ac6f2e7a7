#!/bin/bash
# Session 16: the fused LayerNorm kernels (backward with the residual gradient; int8-row forward with x's
# storage copy) on the H100: their GPU tests, their benchmarks, then the hidden-4096 block and its profile.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 150 python3 -m pytest -q -x tests/test_norm_backward.py tests/test_kernels_fused_producers.py 2>&1 \
  | tee $OUT/gpu_tests_norm_kernels.log | tail -3
timeout 90 python3 benchmarks/norm_backward.py 2>&1 | tee $OUT/norm_backward.log | tail -22
timeout 90 python3 benchmarks/norm_forward_rows.py 2>&1 | tee $OUT/norm_forward_rows.log | tail -22
timeout 200 python3 benchmarks/block_step.py --hidden 4096 --parts block --policies bf16 int8-row --iters 10 \
  2>&1 | tee $OUT/block_step_4096_ln.log | tail -4
