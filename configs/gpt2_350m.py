"""GPT-2 medium (350M: 24 layers, d=1024); FSDP-sharded over all devices, blocks rematerialized."""

import dataclasses

from configs.base import TrainConfig
from models.presets import preset


def get_config() -> TrainConfig:
    return TrainConfig(
        model=dataclasses.replace(preset("gpt2-350m"), vocab_size=0, remat=True),
        run_dir="runs/gpt2_350m",
        batch_size=32,
        seq_len=1024,
        steps=2000,
        lr=3e-4,
        min_lr=3e-5,
        warmup_steps=200,
        weight_decay=0.1,
        grad_clip=1.0,
        log_every=10,
        eval_every=250,
        eval_batches=20,
        ckpt_every=500,
    )
