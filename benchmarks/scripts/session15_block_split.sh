#!/bin/bash
# Session 15: the int8-row block with q, k, v written apart by the qkv GEMM; profile; GPU tests of the
# Jetfire ops and models; the d=4096 model end to end again (int8-row only, 30 steps).
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 240 python3 benchmarks/block_step.py --hidden 4096 --parts block --policies bf16 int8-row --iters 10 \
  2>&1 | tee $OUT/block_step_4096_split.log | tail -4
timeout 150 python3 benchmarks/profile_step.py --hidden 4096 --part block --policies int8-row --iters 3 \
  --top 40 2>&1 | tee $OUT/profile_step_block_4096_int8row_split.log | head -24
timeout 180 python3 -m pytest -q -x tests/test_jetfire_ops.py tests/test_nn.py 2>&1 \
  | tee $OUT/gpu_tests_jetfire_nn.log | tail -2
