#!/bin/bash
# Session 13: more block shapes for the int8-row GELU producers (and their cost without GELU); the block
# A/B after the 3-stage rings stopped keeping a wgmma in flight.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 280 python3 benchmarks/row_producers.py --iters 5 2>&1 | tee $OUT/row_producers_sweep2.log | tail -14
timeout 200 python3 benchmarks/block_step.py --hidden 4096 --parts block --policies bf16 int8-row --iters 10 \
  2>&1 | tee $OUT/block_step_4096_mma0.log | tail -4
