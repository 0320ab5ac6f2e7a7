"""Tiny GPT on the bundled Wikipedia sample: trains on a laptop CPU in about a minute.

    python train.py --config configs/tiny.py                         # bf16
    python train.py --config configs/tiny.py --policy=jetfire-int8 --run_dir=runs/tiny_int8
"""

import dataclasses

from configs.base import TrainConfig
from models.presets import preset


def get_config() -> TrainConfig:
    return TrainConfig(
        model=dataclasses.replace(preset("gpt-tiny"), vocab_size=0),  # vocab from the 8k tokenizer
        run_dir="runs/tiny",
        batch_size=16,
        seq_len=64,
        steps=300,
        lr=2e-3,
        min_lr=2e-4,
        warmup_steps=30,
        weight_decay=0.1,
        log_every=10,
        eval_every=100,
        eval_batches=8,
        ckpt_every=100,
    )
