#!/bin/bash
# Session 17: the W8A8 prefill (8 x 1024 tokens) after the layer_norm_quantize changes, bf16 and W8A8 in the
# same run: 1.5B with 20 calls per timing (--big-iters 20), then 124M.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 380 python3 benchmarks/ptq_speed.py --presets gpt2-1.5b --prefill-presets gpt2-1.5b --kv-steps 0 \
  --schemes w8a8 --no-xla-rows --big-iters 20 2>&1 | tee $OUT/ptq_speed_gpt2-1.5b_prefill_final.log \
  | grep -A3 "^model" | cut -c1-25,110-
timeout 200 python3 benchmarks/ptq_speed.py --presets gpt2-124m --prefill-presets gpt2-124m --kv-steps 0 \
  --schemes w8a8 --no-xla-rows 2>&1 | tee $OUT/ptq_speed_gpt2-124m_prefill_final.log \
  | grep -A3 "^model" | cut -c1-25,110-
