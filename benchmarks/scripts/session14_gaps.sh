#!/bin/bash
# Session 14: device idle time between kernels, block at hidden 768 (GPT-2 124M) and 4096, bf16 vs int8-row.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
for h in 768 4096; do
  timeout 250 python3 benchmarks/profile_step.py --hidden $h --part block --policies bf16 int8-row --iters 5 \
    --top 30 2>&1 | tee $OUT/profile_step_block_${h}_gaps.log | grep -A12 "first kernel to last"
  mv $OUT/profile_step.json $OUT/profile_step_block_${h}_gaps.json
done
