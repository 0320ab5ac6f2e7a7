#!/bin/bash
# Session 12: the 1.5B prefill (8 x 1024) with and without fc1's own codes.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 580 python3 benchmarks/ptq_speed.py --presets gpt2-1.5b --prefill-presets gpt2-1.5b --big-iters 10 --kv-steps 0 --compare-fc1-codes 2>&1 | tee $OUT/ptq_speed_1p5b_prefill.log | tail -9
