#!/bin/bash
# Session 15: end to end at a width where INT8 pays: configs/gpt_wide.py (d=4096, 8 layers), bf16 vs
# int8-row, 60 steps x 16k tokens, same seed and data.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 570 python3 benchmarks/loss_parity.py --config configs/gpt_wide.py --out /tmp/parity_wide --steps=60 \
  --policies bf16 jetfire-int8 --int8_granularity=row --warmup_steps=10 --eval_every=30 --eval_batches=2 \
  --log_every=5 --progress=False 2>&1 | tee $OUT/parity_wide_int8row.log | tail -8
