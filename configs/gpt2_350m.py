"""GPT-2 medium (350M: 24 layers, d=1024); FSDP-sharded over all devices, blocks rematerialized."""

import dataclasses

from configs import gpt2_124m
from configs.base import TrainConfig
from models.presets import preset


def get_config() -> TrainConfig:
    return dataclasses.replace(
        gpt2_124m.get_config(),
        model=dataclasses.replace(preset("gpt2-350m"), vocab_size=0, remat=True),
        run_dir="runs/gpt2_350m",
        lr=3e-4,
        min_lr=3e-5,
    )
