"""Tiny LLaMA-style model (RMSNorm, SwiGLU, rotary) on the bundled Wikipedia sample; CPU, about a minute."""

import dataclasses

from configs import tiny
from configs.base import TrainConfig
from models.presets import preset


def get_config() -> TrainConfig:
    return dataclasses.replace(
        tiny.get_config(), model=dataclasses.replace(preset("llama-tiny"), vocab_size=0), run_dir="runs/llama_tiny"
    )
