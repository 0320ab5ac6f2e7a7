#!/bin/bash
# Session 14: the block at GPT-2 widths (350M: 1024, 1.5B: 1600) and 2048, bf16 vs int8-row, 16k tokens.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 400 python3 benchmarks/block_step.py --hidden 1024 1600 2048 --parts block --policies bf16 int8-row \
  --iters 10 --check-hidden 0 2>&1 | tee $OUT/block_step_widths.log | tail -9 | head -7
