#!/bin/bash
# Session 18: ZeroQuant accuracy on our own trained GPT-2 124M (benchmarks/ptq_accuracy.sh's training run),
# with the norm affines folded (the default) and not folded (--no-fold-norms), INT4 tables (the default).
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
RUN=runs/ptq_accuracy
timeout 200 python3 train.py --config configs/gpt2_124m.py --run_dir=$RUN --steps=1000 --batch_size=16 \
  --warmup_steps=100 --eval_every=500 --eval_batches=2 --model.dropout_rate=0.1 --ckpt_every=0 --progress=False \
  --resume=False 2>&1 | tail -4 | tee $OUT/train.log
for fold in fold-norms no-fold-norms; do
  timeout 190 python3 quantize.py --ckpt $RUN --scheme w4/8-a8 --lkd --lkd-input both --out $RUN-$fold \
    --overwrite --eval-batches 2 --batch-size 16 --$fold --json $OUT/ptq_eval_$fold.json 2>&1 \
    | tee $OUT/quantize_$fold.log | tail -12
done
