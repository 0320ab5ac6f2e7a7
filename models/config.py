"""The decoder-only model configuration shared by the GPT and LLaMA families.

One frozen dataclass describes both families, so a checkpoint stores one flat dict (``dataclasses.asdict``)
and ``quantize.py`` / ``train.py`` rebuild any model from it with :func:`models.presets.build_model`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# jq8.training.nn.ATTENTION_IMPLEMENTATIONS (not imported: presets stay importable without pulling in JAX)
ATTENTION_CHOICES = ("auto", "xla", "cudnn", "pallas")
ACTIVATIONS = {"gpt": ("gelu", "gelu_tanh"), "llama": ("swiglu",)}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer hyper-parameters.

    family: "gpt" (learned positions, LayerNorm, GELU MLP, tied LM head) or "llama" (rotary, RMSNorm,
      SwiGLU MLP, untied LM head).
    vocab_size: number of token ids; the embedding and LM head have this many rows. In a training config
      0 means "from the tokenizer, rounded up to a multiple of 64" (train.py fills it in).
    max_seq_len: longest sequence (the size of GPT's position table; LLaMA only checks it).
    num_layers: transformer blocks.
    num_heads: attention (query) heads; d_model is a multiple of it.
    d_model: width of the residual stream.
    mlp_hidden: MLP width; 0 means 4 * d_model (gpt) or the LLaMA rule 2/3 * 4 * d_model rounded up to 64.
    dropout_rate: dropout on the embeddings and on each attention / MLP branch output while training (0: none).
    remat: recompute each block in the backward pass (saves activation memory for the large presets).
    attention: attention core implementation, "auto" | "xla" | "cudnn" | "pallas" (see
      :func:`jq8.training.nn.attention_implementation`): "auto" = cuDNN flash attention on GPU for bf16/fp16
      unmasked, non-decoding calls of even length with head_dim % 8 == 0 and <= 128, the Pallas decode
      kernel for one-token cached calls on GPU, else XLA ("pallas": that kernel on any backend). Configs saved
      before this field existed load with the default (``from_dict`` fills missing fields).
    num_kv_heads: key / value heads of grouped-query attention (query head i reads KV head
      i // (num_heads / num_kv_heads)); 0 means num_heads (multi-head attention). The qkv projection is
      (d_model, (num_heads + 2 * num_kv_heads) * head_dim) and the KV cache holds num_kv_heads heads.
    rope_theta: rotary base (llama family).
    norm_eps: epsilon of every norm; None keeps the models' own defaults (1e-5 in the blocks, Flax's 1e-6
      in the final norm), which configs saved before this field existed were trained with.
    qkv_bias: llama family: biases on the q / k / v projection only (Qwen2). GPT has all biases.
    tie_embeddings: LM head = the token embedding (transposed); None means the family's default (gpt tied,
      llama untied). GPT is always tied.
    activation: MLP activation; "" means the family's default ("gelu" for gpt, "swiglu" for llama). gpt
      also takes "gelu_tanh" (GPT-2's own "gelu_new").
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
    num_kv_heads: int = 0
    rope_theta: float = 10000.0
    norm_eps: float | None = None
    qkv_bias: bool = False
    tie_embeddings: bool | None = None
    activation: str = ""

    def __post_init__(self):
        if self.family not in ("gpt", "llama"):
            raise ValueError(f"family must be 'gpt' or 'llama', got {self.family!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
        if self.family == "llama" and (self.d_model // self.num_heads) % 2:
            raise ValueError(f"rotary embeddings need an even head dim, got {self.d_model // self.num_heads}")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got {self.attention!r}")
        if self.num_kv_heads < 0 or self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.family == "gpt" and self.tie_embeddings is False:
            raise ValueError("the gpt family always ties its LM head to the token embedding (tie_embeddings)")
        if self.family == "gpt" and self.qkv_bias:
            raise ValueError("qkv_bias is a llama-family option (gpt already has biases on every projection)")
        if self.mlp_activation not in ACTIVATIONS[self.family]:
            raise ValueError(f"activation for family {self.family!r} must be one of {ACTIVATIONS[self.family]}, "
                             f"got {self.activation!r}")
        if self.norm_eps is not None and not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def kv_heads(self) -> int:
        """Key / value heads (num_kv_heads, or num_heads when that is 0)."""
        return self.num_kv_heads or self.num_heads

    @property
    def tied_head(self) -> bool:
        return self.family == "gpt" if self.tie_embeddings is None else self.tie_embeddings

    @property
    def mlp_activation(self) -> str:
        return self.activation or ("gelu" if self.family == "gpt" else "swiglu")

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
