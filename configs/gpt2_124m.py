"""GPT-2 124M (12 layers, d=768) at nanoGPT's settings, sized for one H100 (bf16 vs --policy=jetfire-int8).

The bundled corpus is small (about 1.5 M tokens with the 8k tokenizer): this config is for step-time and
loss-parity comparisons between policies, not for a converged GPT-2. Multi-GPU: runs data parallel + FSDP
over every visible device; multi-host: add --distributed=True (see jq8/training/sharding.py).
"""

import dataclasses

from configs.base import TrainConfig
from models.presets import preset


def get_config() -> TrainConfig:
    return dataclasses.replace(
        TrainConfig(),
        model=dataclasses.replace(preset("gpt2-124m"), vocab_size=0),
        run_dir="runs/gpt2_124m",
        batch_size=32,
        seq_len=1024,
        steps=2000,
        lr=6e-4,
        min_lr=6e-5,
        warmup_steps=200,
        eval_every=250,
        eval_batches=20,
        ckpt_every=500,
    )
