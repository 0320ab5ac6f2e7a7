"""TEMPORARY bf16-only stand-ins for ``jq8.policy`` / ``jq8.nn`` while those modules are being written.

Same constructor and call signatures as the expected real modules; removed once they land.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Policy:
    name: str = "bf16"
    compute_dtype: jnp.dtype = jnp.bfloat16

    @classmethod
    def from_name(cls, name: str, **overrides) -> Policy:
        if name != "bf16":
            raise NotImplementedError(f"policy {name!r} needs jq8.policy (not available yet)")
        return cls(name, **overrides)


def _norm(kind: str, dtype) -> nn.Module:
    if kind == "rmsnorm":
        return nn.RMSNorm(dtype=jnp.float32, name="norm")
    return nn.LayerNorm(dtype=jnp.float32, name="norm")


def rotary(x: jax.Array) -> jax.Array:
    """x: (B, T, H, D) -> rotated (same shape/dtype)."""
    t, d = x.shape[1], x.shape[-1]
    inv = 1.0 / (10000 ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    ang = jnp.arange(t, dtype=jnp.float32)[:, None] * inv[None, :]
    cos, sin = jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).astype(x.dtype)


class MlpBlock(nn.Module):
    hidden: int
    policy: Policy
    activation: str = "gelu"
    norm: str = "layernorm"
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        dt = self.policy.compute_dtype
        h = _norm(self.norm, dt)(x).astype(dt)
        if self.activation == "swiglu":
            g = nn.Dense(self.hidden, use_bias=False, dtype=dt, name="gate")(h)
            u = nn.Dense(self.hidden, use_bias=False, dtype=dt, name="up")(h)
            h = nn.silu(g) * u
        else:
            h = nn.gelu(nn.Dense(self.hidden, dtype=dt, name="fc1")(h), approximate=False)
        y = nn.Dense(x.shape[-1], dtype=dt, use_bias=self.activation != "swiglu", name="fc2")(h)
        return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic).astype(jnp.float32)


class AttentionBlock(nn.Module):
    num_heads: int
    policy: Policy
    norm: str = "layernorm"
    rotary: bool = False
    causal: bool = True
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        dt = self.policy.compute_dtype
        b, t, d = x.shape
        hd = d // self.num_heads
        bias = not self.rotary
        h = _norm(self.norm, dt)(x).astype(dt)
        qkv = nn.Dense(3 * d, dtype=dt, use_bias=bias, name="qkv")(h).reshape(b, t, 3, self.num_heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.rotary:
            q, k = rotary(q), rotary(k)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(hd)
        if self.causal:
            s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e30)
        p = jax.nn.softmax(s, axis=-1).astype(dt)
        o = jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, t, d)
        y = nn.Dense(d, dtype=dt, use_bias=bias, name="out")(o)
        return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic).astype(jnp.float32)
