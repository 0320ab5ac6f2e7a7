#!/bin/bash
# Session 16: the hidden-4096 block with each branch adding its own residual (as DecoderBlock does), its
# profile, and the GPU tests of the Jetfire ops and modules.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 200 python3 benchmarks/block_step.py --hidden 4096 --parts block --policies bf16 int8-row --iters 10 \
  2>&1 | tee $OUT/block_step_4096_block_residual.log | tail -4
timeout 120 python3 benchmarks/profile_step.py --hidden 4096 --part block --policies int8-row --iters 3 \
  --top 60 2>&1 | tee $OUT/profile_step_block_4096_int8row_block_residual.log | head -24
timeout 260 python3 -m pytest -q -x tests/test_jetfire_ops.py tests/test_nn.py 2>&1 \
  | tee $OUT/gpu_tests_jetfire_nn.log | tail -3
