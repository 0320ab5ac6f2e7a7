#!/bin/bash
# Session 18: the W8A8 prefill (8 x 1024 tokens) with folded norm affines (the default) and without, bf16 in the
# same run: 1.5B again (20 calls per timing), then 124M.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 330 python3 benchmarks/ptq_speed.py --presets gpt2-1.5b --prefill-presets gpt2-1.5b --kv-steps 0 \
  --schemes w8a8 --no-xla-rows --big-iters 20 --compare-fold 2>&1 | tee $OUT/ptq_speed_gpt2-1.5b_prefill_fold2.log \
  | grep -A4 "^model" | cut -c1-32,117-
timeout 200 python3 benchmarks/ptq_speed.py --presets gpt2-124m --prefill-presets gpt2-124m --kv-steps 0 \
  --schemes w8a8 --no-xla-rows --compare-fold 2>&1 | tee $OUT/ptq_speed_gpt2-124m_prefill_fold.log \
  | grep -A4 "^model" | cut -c1-32,117-
