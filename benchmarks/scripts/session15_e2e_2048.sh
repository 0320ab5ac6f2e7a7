#!/bin/bash
# Session 15: end to end at d=2048 (configs/gpt_wide.py with 16 layers of d=2048, 16 heads), bf16 vs
# int8-row, 60 steps x 16k tokens: the break-even side of the width curve.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 570 python3 benchmarks/loss_parity.py --config configs/gpt_wide.py --out /tmp/parity_2048 --steps=60 \
  --policies bf16 jetfire-int8 --int8_granularity=row --warmup_steps=10 --eval_every=30 --eval_batches=2 \
  --log_every=5 --progress=False --model.d_model=2048 --model.num_heads=16 --model.num_layers=16 2>&1 \
  | tee $OUT/parity_2048_int8row.log | tail -8
