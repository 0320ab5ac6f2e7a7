"""A wide GPT (d=4096, 32 heads, 8 layers; 1.6B parameters in its blocks): the width where INT8 training pays.

Jetfire's INT8 GEMMs save time per multiply-add while its quantize passes cost time per element, so the
INT8 block beats bf16 only from about d=2048 on the H100 (BENCHMARKS.md); GPT-2 124M runs
slower in INT8. This config measures the whole training step (embeddings, LM head, loss, AdamW included) at
the width of LLaMA-7B / GPT-3 6.7B, on one H100, with few layers so that it fits and compiles quickly.
Compare the policies with ``benchmarks/loss_parity.py --config configs/gpt_wide.py``.
"""

import dataclasses

from configs import gpt2_124m
from configs.base import TrainConfig
from models.presets import preset


def get_config() -> TrainConfig:
    return dataclasses.replace(
        gpt2_124m.get_config(),
        model=dataclasses.replace(preset("gpt2-124m"), num_layers=8, num_heads=32, d_model=4096, vocab_size=0),
        run_dir="runs/gpt_wide",
        batch_size=16,
        steps=200,
        lr=1.5e-4,
        min_lr=1.5e-5,
        warmup_steps=20,
        log_every=5,
        eval_every=100,
        eval_batches=4,
        ckpt_every=-1,
    )
