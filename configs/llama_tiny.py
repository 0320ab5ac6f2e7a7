"""Tiny LLaMA-style model (RMSNorm, SwiGLU, rotary) on the bundled Wikipedia sample; CPU, about a minute."""

import dataclasses

from configs.base import TrainConfig
from models.presets import preset


def get_config() -> TrainConfig:
    return TrainConfig(
        model=dataclasses.replace(preset("llama-tiny"), vocab_size=0),
        run_dir="runs/llama_tiny",
        batch_size=16,
        seq_len=64,
        steps=300,
        lr=2e-3,
        min_lr=2e-4,
        warmup_steps=30,
        log_every=10,
        eval_every=100,
        ckpt_every=100,
    )
