#!/bin/bash
# Session 16: GPT-2 124M loss parity after this session's numerics changes (bf16 dL/dLN, GELU backward's dx
# rounded to bf16, fused LayerNorm kernels), both INT8 granularities, 300 steps x 16k tokens, dropout 0.1.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
for g in row block; do
  timeout 280 python3 benchmarks/loss_parity.py --config configs/gpt2_124m.py --out $OUT/parity_124m_$g \
    --steps=300 --policies bf16 jetfire-int8 --int8_granularity=$g --batch_size=16 --warmup_steps=30 \
    --eval_every=100 --eval_batches=2 --ckpt_every=-1 --model.dropout_rate=0.1 --progress=False 2>&1 \
    | tee $OUT/parity_124m_$g.log | tail -4
  rm -rf $OUT/parity_124m_$g/*/checkpoints
done
