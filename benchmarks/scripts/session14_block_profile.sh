#!/bin/bash
# Session 14: the int8-row block synchronised and back to back, and its profile with the HLO that names it.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 240 python3 benchmarks/block_step.py --hidden 4096 --parts block --policies bf16 int8-row --iters 10 \
  2>&1 | tee $OUT/block_step_4096_b2b.log | tail -4
timeout 200 python3 benchmarks/profile_step.py --hidden 4096 --part block --policies int8-row --iters 3 \
  --top 60 --dump-hlo 2>&1 | tee $OUT/profile_step_block_4096_int8row.log | head -50
gzip -f $OUT/*.hlo.txt
