#!/usr/bin/env bash
# ZeroQuant accuracy on our own trained GPT-2 124M (the bf16 model of the loss-parity config): W4/8-A8 + LKD
# with the default settings (norm affines folded, INT4 embedding tables), then with --no-fold-norms, then with
# INT8 tables, and a reload of the compact default checkpoint through the INT8 path. Each quantize.py call
# prints its evaluation table and writes it as JSON. GPU: about 10 minutes on one H100.
#
#   PYTHONPATH=. bash benchmarks/ptq_accuracy.sh      # JSON tables in $OUT (or the run directory)
#   CONFIG=configs/tiny.py TRAIN_ARGS="--steps=30" PTQ_ARGS="--lkd-steps 5 --eval-batches 2" \
#     bash benchmarks/ptq_accuracy.sh                 # CPU smoke
set -euo pipefail
CONFIG=${CONFIG:-configs/gpt2_124m.py}
RUN=${RUN:-runs/ptq_accuracy}
DEST=${OUT:-$RUN}
TRAIN_ARGS=${TRAIN_ARGS:---steps=1000 --batch_size=16 --warmup_steps=100 --eval_every=500 --eval_batches=2 --model.dropout_rate=0.1}
PTQ_ARGS=${PTQ_ARGS:---eval-batches 2 --batch-size 16}
mkdir -p "$DEST"
# shellcheck disable=SC2086
python3 train.py --config "$CONFIG" --run_dir="$RUN" $TRAIN_ARGS --ckpt_every=0 --progress=False --resume=False
# shellcheck disable=SC2086
python3 quantize.py --ckpt "$RUN" --scheme w4/8-a8 --lkd --lkd-input both --out "$RUN-w48a8" --overwrite \
  $PTQ_ARGS --json "$DEST/ptq_eval.json"
# shellcheck disable=SC2086
python3 quantize.py --ckpt "$RUN" --scheme w4/8-a8 --lkd --lkd-input both --no-fold-norms \
  --out "$RUN-w48a8-no-fold" --overwrite $PTQ_ARGS --json "$DEST/ptq_eval_no_fold_norms.json"
# shellcheck disable=SC2086
python3 quantize.py --ckpt "$RUN" --scheme w4/8-a8 --lkd --lkd-input both --embedding-bits 8 \
  --out "$RUN-w48a8-emb8" --overwrite $PTQ_ARGS --json "$DEST/ptq_eval_emb8.json"
# shellcheck disable=SC2086
python3 quantize.py --eval "$RUN-w48a8" $PTQ_ARGS --json "$DEST/ptq_eval_reload.json"
