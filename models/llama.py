"""LLaMA-style decoder: rotary positions, pre-RMSNorm blocks, SwiGLU MLP, untied (or tied) LM head.

Same policy seam as :mod:`models.gpt`: the branches are ``jq8.training.nn`` modules; embedding, final norm and LM
head run in fp32. Parameter tree::

    wte/embedding (vocab, d)   h_i/attn/...   h_i/mlp/...   ln_f/scale (d,)   lm_head/kernel (d, vocab)

(no ``lm_head`` when ``config.tied_head``: the logits are x @ wte^T). Grouped-query attention, rotary
base, norm epsilon and q/k/v biases come from the config (:class:`models.config.ModelConfig`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.config import ModelConfig
from models.gpt import EMBED_INIT, decoder_stack, final_norm_eps, lm_loss

__all__ = ["Llama", "lm_loss"]


class Llama(nn.Module):
    config: ModelConfig
    policy: Any

    @nn.compact
    def __call__(self, tokens: jax.Array, *, deterministic: bool = True, decode: bool = False) -> jax.Array:
        """tokens: (B, T) int32 with T <= max_seq_len -> logits (B, T, vocab) float32.

        decode: KV-cached call (:class:`jq8.training.nn.AttentionBlock`); the rotary positions start at each
        attention cache's ``cache_index``, so no model-level position state is needed.
        """
        c = self.config
        if tokens.shape[-1] > c.max_seq_len:
            raise ValueError(f"sequence length {tokens.shape[-1]} exceeds max_seq_len={c.max_seq_len}")
        wte = nn.Embed(c.vocab_size, c.d_model, embedding_init=EMBED_INIT, name="wte")
        x = nn.Dropout(c.dropout_rate)(wte(tokens), deterministic=deterministic)
        x = decoder_stack(c, self.policy, x, deterministic, decode)
        x = nn.RMSNorm(epsilon=final_norm_eps(c), dtype=jnp.float32, name="ln_f")(x).astype(jnp.float32)
        if c.tied_head:
            return wte.attend(x)
        head = nn.Dense(
            c.vocab_size, use_bias=False, dtype=jnp.float32, kernel_init=EMBED_INIT, name="lm_head"
        )
        return head(x)
