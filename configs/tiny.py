"""Tiny GPT on the bundled Wikipedia sample: trains on a laptop CPU in about a minute.

    python train.py --config configs/tiny.py                         # bf16
    python train.py --config configs/tiny.py --policy=jetfire-int8 --run_dir=runs/tiny_int8
    python train.py --config configs/tiny.py --policy=int8-row --run_dir=runs/tiny_row
"""

import dataclasses

from configs.base import TrainConfig
from models.presets import preset


def get_config() -> TrainConfig:
    return dataclasses.replace(
        TrainConfig(),
        model=dataclasses.replace(preset("gpt-tiny"), vocab_size=0),  # vocab from the 8k tokenizer
        run_dir="runs/tiny",
        lr=2e-3,
        min_lr=2e-4,
    )
