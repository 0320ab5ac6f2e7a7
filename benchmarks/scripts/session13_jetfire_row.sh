#!/bin/bash
# Session 13: int8-row GELU kernels (statistics pre-pass) and fc1 on the Mosaic requantizing epilogue:
# GPU tests of the producers, the block A/B against bf16, then the block's profile.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 240 python3 -m pytest -q -x -p no:warnings tests/test_kernels_fused_producers.py \
  tests/test_jetfire_ops.py -k "gelu or row or kernel_path" 2>&1 | tail -30 > $OUT/gpu_tests_producers.log
cat $OUT/gpu_tests_producers.log
timeout 200 python3 benchmarks/block_step.py --hidden 4096 --parts block --policies bf16 int8-row --iters 10 \
  2>&1 | tee $OUT/block_step_4096.log | tail -15
timeout 150 python3 benchmarks/profile_step.py --hidden 4096 --part block --policies int8-row --iters 3 --top 40 \
  > $OUT/profile_step_block_4096_int8row.log 2>&1
head -50 $OUT/profile_step_block_4096_int8row.log
