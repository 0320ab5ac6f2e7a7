#!/bin/bash
# Session 14, final code: end to end, GPT-2 124M (8k vocabulary), bf16 vs int8-row, 300 steps x 16k tokens.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 560 python3 benchmarks/loss_parity.py --config configs/gpt2_124m.py --out /tmp/parity --steps=300 \
  --policies bf16 jetfire-int8 --int8_granularity=row --batch_size=16 --warmup_steps=30 --eval_every=100 \
  --eval_batches=2 --ckpt_every=-1 --model.dropout_rate=0.1 --progress=False 2>&1 \
  | tee $OUT/parity_124m_int8row_final.log | tail -6
