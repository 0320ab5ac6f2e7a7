#!/bin/bash
# Session 14 A/B: the GELU producers' rational erf, and quantize_tiles' statistics pre-pass (int8-row block).
# The "old" is session 13's gelu_quantize.py: git show 6831905:pallas_kernels/gelu_quantize.py > benchmarks/scripts/ab_old_gelu_quantize.py
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 120 python3 benchmarks/row_producers.py --configs 32x128x4 --iters 5 2>&1 | tee $OUT/row_producers_erf_new.log | tail -1
timeout 230 python3 benchmarks/block_step.py --hidden 4096 --parts block --policies bf16 int8-row --iters 10 \
  2>&1 | tee $OUT/block_step_4096_new.log | tail -4 | head -3
cp pallas_kernels/gelu_quantize.py /tmp/new_gelu_quantize.py
cp benchmarks/scripts/ab_old_gelu_quantize.py pallas_kernels/gelu_quantize.py
timeout 120 python3 benchmarks/row_producers.py --configs 32x128x4 --iters 5 2>&1 | tee $OUT/row_producers_erf_old.log | tail -1
timeout 120 python3 benchmarks/block_step.py --hidden 4096 --parts block --policies int8-row --iters 10 \
  2>&1 | tee $OUT/block_step_4096_olderf.log | tail -4 | head -2
cp /tmp/new_gelu_quantize.py pallas_kernels/gelu_quantize.py
