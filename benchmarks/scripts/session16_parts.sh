#!/bin/bash
# Session 16: q/k/v cotangents quantized in place (no concatenation): GPU tests of the quantize kernels, the
# hidden-4096 block and its profile.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 150 python3 -m pytest -q -x tests/test_kernels_quantize.py 2>&1 | tee $OUT/gpu_tests_quantize.log | tail -3
timeout 200 python3 benchmarks/block_step.py --hidden 4096 --parts block --policies bf16 int8-row --iters 10 \
  2>&1 | tee $OUT/block_step_4096_parts.log | tail -4
timeout 120 python3 benchmarks/profile_step.py --hidden 4096 --part block --policies int8-row --iters 3 \
  --top 60 2>&1 | tee $OUT/profile_step_block_4096_int8row_parts.log | head -24
