#!/bin/bash
# Session 14, final code (quantize_tiles on 32 x 128 blocks / 4 warps on the pre-pass route): GPU kernel
# tests, the int8-row block at hidden 4096, 768 and 1024.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 170 python3 -m pytest -q -p no:warnings tests/test_kernels_quantize.py tests/test_kernels_fused_producers.py \
  2>&1 | tee $OUT/gpu_tests_quantize_producers_confirm.log | tail -2
timeout 200 python3 benchmarks/block_step.py --hidden 4096 --parts block --policies bf16 int8-row --iters 10 \
  2>&1 | tee $OUT/block_step_4096_confirm.log | tail -4 | head -3
timeout 200 python3 benchmarks/block_step.py --hidden 768 1024 --parts block --policies bf16 int8-row --iters 10 \
  --check-hidden 0 2>&1 | tee $OUT/block_step_768_1024_confirm.log | tail -6 | head -5
