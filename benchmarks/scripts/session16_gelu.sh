#!/bin/bash
# Session 16: GELU backward with dx written by its statistics pre-pass (materialize_producer) against the
# recompute route; GPU tests of the producers; the hidden-4096 block and its profile.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 150 python3 -m pytest -q tests/test_norm_backward.py tests/test_kernels_fused_producers.py 2>&1 \
  | tee $OUT/gpu_tests_producers.log | tail -3
timeout 100 python3 benchmarks/row_producers.py --configs 32x128x4 2>&1 | tee $OUT/row_producers.log | tail -3
timeout 200 python3 benchmarks/block_step.py --hidden 4096 --parts block --policies bf16 int8-row --iters 10 \
  2>&1 | tee $OUT/block_step_4096_gelu.log | tail -4
timeout 120 python3 benchmarks/profile_step.py --hidden 4096 --part block --policies int8-row --iters 3 \
  --top 60 2>&1 | tee $OUT/profile_step_block_4096_int8row.log | head -30
