"""GPT-2 style decoder: learned positions, pre-LN blocks, GELU MLP, LM head tied to the token embedding.

The two residual branches of each block (attention, MLP) are ``jq8.training.nn`` modules that take a ``policy``
(bf16 or Jetfire INT8); everything else (embeddings, final norm, LM head, loss) runs in fp32, and the
residual stream is fp32.

Parameter tree (what checkpoints and ``quantize.py`` see)::

    wte/embedding (vocab, d)     wpe/embedding (max_seq_len, d)
    h_0 ... h_{L-1}/attn/...     h_i/mlp/...      (layout owned by jq8.training.nn.AttentionBlock / MlpBlock)
    ln_f/{scale, bias} (d,)

KV cache (``decode=True``, see :class:`jq8.training.nn.AttentionBlock` and :mod:`jq8.inference.decode`): the "cache"
collection holds each block's ``h_i/attn/{cached_key, cached_value, cache_index}`` plus GPT's own ``pos``
(int32: the position of the next token, so the learned position table is read at pos..pos+T-1).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jq8.training.nn import AttentionBlock, MlpBlock
from models.config import ModelConfig

EMBED_INIT = nn.initializers.normal(0.02)


class DecoderBlock(nn.Module):
    """x + attn(x), then + mlp(x); each branch normalizes its own input (pre-norm). x: (B, T, d) f32."""

    config: ModelConfig
    policy: Any

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True, decode: bool = False) -> jax.Array:
        c = self.config
        llama = c.family == "llama"
        norm = "rmsnorm" if llama else "layernorm"
        eps = 1e-5 if c.norm_eps is None else c.norm_eps
        attn = AttentionBlock(
            c.num_heads,
            self.policy,
            norm=norm,
            rotary=llama,
            causal=True,
            dropout_rate=c.dropout_rate,
            eps=eps,
            implementation=c.attention,
            num_kv_heads=c.kv_heads,
            qkv_bias=c.qkv_bias if llama else None,
            rope_theta=c.rope_theta,
            name="attn",
        )
        mlp = MlpBlock(
            c.hidden,
            self.policy,
            activation=c.mlp_activation,
            norm=norm,
            dropout_rate=c.dropout_rate,
            eps=eps,
            name="mlp",
        )
        # the branches add the residual themselves: the INT8 inference path folds it into a GEMM epilogue
        x = attn(x, deterministic=deterministic, decode=decode, residual=x)
        return mlp(x, deterministic=deterministic, residual=x)


def decoder_stack(
    config: ModelConfig, policy: Any, x: jax.Array, deterministic: bool, decode: bool = False
) -> jax.Array:
    """Applies the L blocks (named h_0..h_{L-1}) inside the caller's compact scope.

    Remat only pays off in a backward pass, so cached decoding (``decode``) runs the plain blocks (same
    names, same parameters) instead of lifting the mutable "cache" collection through ``nn.remat``.
    """
    remat = config.remat and not decode
    block_cls = nn.remat(DecoderBlock, static_argnums=(2, 3)) if remat else DecoderBlock
    for i in range(config.num_layers):
        x = block_cls(config, policy, name=f"h_{i}")(x, deterministic, decode)
    return x


class GPT(nn.Module):
    config: ModelConfig
    policy: Any

    @nn.compact
    def __call__(self, tokens: jax.Array, *, deterministic: bool = True, decode: bool = False) -> jax.Array:
        """tokens: (B, T) int32 with T <= max_seq_len -> logits (B, T, vocab) float32.

        decode: KV-cached call (module docstring): tokens are the next T of the sequence, at positions
        cache ``pos``..pos+T-1. Positions past max_seq_len read NaN rows (``jnp.take`` fills out of range).
        """
        c = self.config
        t = tokens.shape[-1]
        if t > c.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds max_seq_len={c.max_seq_len}")
        wte = nn.Embed(c.vocab_size, c.d_model, embedding_init=EMBED_INIT, name="wte")
        wpe = nn.Embed(c.max_seq_len, c.d_model, embedding_init=EMBED_INIT, name="wpe")
        x = wte(tokens) + wpe(self._positions(t, decode))[None]
        x = nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)
        x = decoder_stack(c, self.policy, x, deterministic, decode)
        x = nn.LayerNorm(epsilon=final_norm_eps(c), dtype=jnp.float32, name="ln_f")(x)
        return wte.attend(x.astype(jnp.float32))

    def _positions(self, t: int, decode: bool) -> jax.Array:
        """Position ids (T,) int32: 0..T-1, or with ``decode`` pos..pos+T-1 from the cache (advanced by T).

        Like the attention cache, the call that creates ``pos`` (init) starts at 0 and leaves it at 0.
        """
        if not decode:
            return jnp.arange(t, dtype=jnp.int32)
        initialized = self.has_variable("cache", "pos")
        pos = self.variable("cache", "pos", lambda: jnp.array(0, jnp.int32))
        if not initialized:
            return jnp.arange(t, dtype=jnp.int32)
        start = pos.value
        pos.value = start + t
        return start + jnp.arange(t, dtype=jnp.int32)


def final_norm_eps(config: ModelConfig) -> float:
    """The final norm's epsilon: ``norm_eps``, or Flax's default 1e-6 when the config leaves it None."""
    return 1e-6 if config.norm_eps is None else config.norm_eps


def lm_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy. logits: (B, T, V) f32, targets: (B, T) int32 -> scalar f32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()
