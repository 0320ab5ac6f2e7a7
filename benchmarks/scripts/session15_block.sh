#!/bin/bash
# Session 15: the int8-row block with dX written in the input's dtype (out projection), back to back, its
# profile, and the Jetfire op tests on the GPU.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 240 python3 benchmarks/block_step.py --hidden 4096 --parts block --policies bf16 int8-row --iters 10 \
  2>&1 | tee $OUT/block_step_4096.log | tail -4
timeout 150 python3 benchmarks/profile_step.py --hidden 4096 --part block --policies int8-row --iters 3 \
  --top 40 2>&1 | tee $OUT/profile_step_block_4096_int8row.log | head -12
timeout 150 python3 -m pytest -q -x tests/test_jetfire_ops.py 2>&1 | tee $OUT/gpu_tests_jetfire_ops.log | tail -2
