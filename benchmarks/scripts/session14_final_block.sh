#!/bin/bash
# Session 14, final code: kernel tests on the GPU, the int8-row block at hidden 4096 and its profile.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 150 python3 -m pytest -q -p no:warnings tests/test_kernels_quantize.py tests/test_kernels_fused_producers.py \
  2>&1 | tee $OUT/gpu_tests_quantize_producers.log | tail -2
timeout 230 python3 benchmarks/block_step.py --hidden 4096 --parts block --policies bf16 int8-row --iters 10 \
  2>&1 | tee $OUT/block_step_4096_final.log | tail -4 | head -3
timeout 150 python3 benchmarks/profile_step.py --hidden 4096 --part block --policies int8-row --iters 5 \
  --top 40 2>&1 | tee $OUT/profile_step_block_4096_int8row_final.log | grep -A3 "first kernel to last"
