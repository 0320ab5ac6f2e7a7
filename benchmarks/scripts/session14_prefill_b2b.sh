#!/bin/bash
# Session 14: ZeroQuant prefill (8 x 1024 tokens), one synchronised call and back to back. PRESET=gpt2-124m
# (default) or gpt2-1.5b.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
P=${PRESET:-gpt2-124m}
timeout 560 python3 benchmarks/ptq_speed.py --presets $P --prefill-presets $P --kv-steps 0 \
  2>&1 | tee $OUT/ptq_speed_${P}_prefill_b2b.log | grep -A7 "^model"
