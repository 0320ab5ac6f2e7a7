#!/bin/bash
# Session 13, final code: the int8-row block A/B and the 124M prefill.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 200 python3 benchmarks/block_step.py --hidden 4096 --parts block --policies bf16 int8-row --iters 10 \
  2>&1 | tee $OUT/block_step_4096_confirm.log | tail -4
timeout 200 python3 benchmarks/ptq_speed.py --presets gpt2-124m --prefill-presets gpt2-124m --kv-steps 0 \
  2>&1 | tee $OUT/ptq_speed_124m_prefill_confirm.log | grep "^row" | cut -c1-200
