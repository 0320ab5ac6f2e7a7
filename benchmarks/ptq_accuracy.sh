#!/usr/bin/env bash
# ZeroQuant accuracy on our own trained GPT-2 124M (the bf16 run of the loss-parity config), then a reload of
# the compact W4/8-A8 checkpoint through the INT8 path. GPU: ~5 minutes on one H100.
#
#   PYTHONPATH=. bash benchmarks/ptq_accuracy.sh            # writes $OUT/ptq_124m.json (or runs/.../eval.json)
set -euo pipefail
RUN=${RUN:-runs/gpt2_124m_bf16}
DEST=${OUT:-$RUN}
mkdir -p "$DEST"
python3 train.py --config configs/gpt2_124m.py --run_dir="$RUN" --steps=1000 --batch_size=16 \
  --warmup_steps=100 --eval_every=500 --eval_batches=2 --ckpt_every=0 --model.dropout_rate=0.1 \
  --progress=False --resume=False
python3 quantize.py --ckpt "$RUN" --scheme w4/8-a8 --lkd --lkd-input both --out "$RUN-w48a8" --overwrite \
  --eval-batches 2 --batch-size 16 --generate "The history of the" --json "$DEST/ptq_124m.json"
python3 quantize.py --eval "$RUN-w48a8" --eval-batches 2 --batch-size 16 --json "$DEST/ptq_124m_reload.json"
