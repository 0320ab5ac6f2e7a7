#!/bin/bash
# Session 16: end to end at d=4096 (configs/gpt_wide.py) after the fused LayerNorm kernels, the GELU
# backward's materialised dx and the epilogue residual adds: bf16 vs int8-row, 60 steps x 16k tokens.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 570 python3 benchmarks/loss_parity.py --config configs/gpt_wide.py --out $OUT/parity_wide --steps=60 \
  --policies bf16 jetfire-int8 --int8_granularity=row --warmup_steps=10 --eval_every=30 --eval_batches=2 \
  --log_every=5 --progress=False 2>&1 | tee $OUT/parity_wide_int8row.log | tail -8
