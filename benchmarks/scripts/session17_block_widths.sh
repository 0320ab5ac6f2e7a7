#!/bin/bash
# Session 17: the Jetfire block (16384 tokens, forward + backward) at hidden 1024, 2048 and 4096 on the final
# code, bf16 vs int8-row in the same run.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 560 python3 benchmarks/block_step.py --hidden 1024 2048 4096 --parts block --policies bf16 int8-row \
  --iters 10 --check-hidden 0 2>&1 | tee $OUT/block_step_widths.log | tail -8
