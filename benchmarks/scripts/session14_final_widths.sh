#!/bin/bash
# Session 14, final code: the block at GPT-2 widths (124M: 768, 350M: 1024, 1.5B: 1600) and 2048.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 560 python3 benchmarks/block_step.py --hidden 768 1024 1600 2048 --parts block --policies bf16 int8-row \
  --iters 10 --check-hidden 0 2>&1 | tee $OUT/block_step_widths_final.log | tail -11 | head -9
