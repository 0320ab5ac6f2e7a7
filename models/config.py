"""The decoder-only model configuration shared by the GPT and LLaMA families.

One frozen dataclass describes both families, so a checkpoint stores one flat dict (``dataclasses.asdict``)
and ``quantize.py`` / ``train.py`` rebuild any model from it with :func:`models.presets.build_model`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# jq8.training.nn.ATTENTION_IMPLEMENTATIONS (not imported: presets stay importable without pulling in JAX)
ATTENTION_CHOICES = ("auto", "xla", "cudnn", "pallas")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer hyper-parameters.

    family: "gpt" (learned positions, LayerNorm, GELU MLP, tied LM head) or "llama" (rotary, RMSNorm,
      SwiGLU MLP, untied LM head).
    vocab_size: number of token ids; the embedding and LM head have this many rows. In a training config
      0 means "from the tokenizer, rounded up to a multiple of 64" (train.py fills it in).
    max_seq_len: longest sequence (the size of GPT's position table; LLaMA only checks it).
    mlp_hidden: MLP width; 0 means 4 * d_model (gpt) or the LLaMA rule 2/3 * 4 * d_model rounded up to 64.
    remat: recompute each block in the backward pass (saves activation memory for the large presets).
    attention: attention core implementation, "auto" | "xla" | "cudnn" | "pallas" (see
      :func:`jq8.training.nn.attention_implementation`): "auto" = cuDNN flash attention on GPU for bf16/fp16
      unmasked, non-decoding calls of even length with head_dim % 8 == 0 and <= 128, the Pallas decode
      kernel for one-token cached calls on GPU, else XLA ("pallas": that kernel on any backend). Configs saved
      before this field existed load with the default (``from_dict`` fills missing fields).
    """

    family: str = "gpt"
    vocab_size: int = 50304
    max_seq_len: int = 1024
    num_layers: int = 12
    num_heads: int = 12
    d_model: int = 768
    mlp_hidden: int = 0
    dropout_rate: float = 0.0
    remat: bool = False
    attention: str = "auto"

    def __post_init__(self):
        if self.family not in ("gpt", "llama"):
            raise ValueError(f"family must be 'gpt' or 'llama', got {self.family!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
        if self.family == "llama" and (self.d_model // self.num_heads) % 2:
            raise ValueError(f"rotary embeddings need an even head dim, got {self.d_model // self.num_heads}")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got {self.attention!r}")

    @property
    def hidden(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.family == "gpt":
            return 4 * self.d_model
        return -(-(8 * self.d_model // 3) // 64) * 64

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; valid keys: {sorted(names)}")
        return cls(**d)
