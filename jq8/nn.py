"""Flax linen modules whose numerics follow a :class:`jq8.policy.Policy` (bf16 or Jetfire INT8).

Why linen (not NNX): the repository's training loop, checkpointing (orbax) and PTQ walk linen parameter
dicts with optax; linen modules are pure functions of those dicts, which is also what a ``jax.custom_vjp``
op over whole parameter sub-trees needs.

One parameter tree for every policy (fp32 parameters), so a checkpoint trains under bf16 and INT8 alike and
PTQ finds weights by path:

    Dense           kernel (in, out), bias (out,)
    LayerNorm       scale (D,), bias (D,) (no bias when rms=True)
    MlpBlock        norm, fc1, [gate (swiglu)], fc2
    AttentionBlock  norm, qkv (D, 3D), out (D, D)

``MlpBlock`` and ``AttentionBlock`` are pre-norm residual *branches*: they return branch(norm(x)) in fp32;
a GPT block is ``x = x + AttentionBlock(...)(x); x = x + MlpBlock(...)(x)``. Under the bf16 policy they are
plain bf16-compute layers (fp32 statistics and accumulation); under "jetfire-int8" the whole MLP branch is
one custom_vjp op (:func:`jq8.jetfire.jetfire_mlp`) and the attention projections are INT8 around a bf16
attention core (:func:`jax.nn.dot_product_attention`).

Dimensions: under an INT8 policy, feature dimensions (model width, hidden width, head_dim * heads) must be
multiples of the block size; a clear ValueError is raised otherwise (no padding). Token counts may be
ragged.

Randomness: stochastic rounding of gradients draws from the ``"quant"`` rng stream if given, else from
``"dropout"``; dropout uses ``"dropout"``.
"""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from jq8.jetfire import (
    ACTIVATIONS,
    activation_reference,
    jetfire_linear,
    jetfire_mlp,
    jetfire_norm_linear,
    linear_reference,
    norm_reference,
)
from jq8.policy import Policy, quant_key

F32 = jnp.float32
NORMS = ("layernorm", "rmsnorm")


class Dense(nn.Module):
    """y = x @ kernel + bias. x: (..., in) float -> (..., features) in ``policy.compute_dtype``.

    Params: kernel (in, features) fp32 (lecun-normal init), bias (features,) fp32 zeros.
    """

    features: int
    use_bias: bool = True
    policy: Policy = Policy()
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def weights(self, in_features: int) -> tuple[jax.Array, jax.Array | None]:
        """Creates (at init) and returns (kernel (in, features) fp32, bias (features,) fp32 or None)."""
        kernel = self.param("kernel", self.kernel_init, (in_features, self.features), F32)
        if not self.use_bias:
            return kernel, None
        return kernel, self.param("bias", nn.initializers.zeros_init(), (self.features,), F32)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, bias = self.weights(x.shape[-1])
        if self.policy.int8:
            key = quant_key(self) if not self.is_initializing() else None
            return jetfire_linear(x, kernel, bias, key, self.policy)
        return linear_reference(x, kernel, bias, self.policy.compute_dtype)


class LayerNorm(nn.Module):
    """LayerNorm (or RMSNorm with ``rms=True``) over the last axis: fp32 statistics, fp32 output.

    A standalone LayerNorm (e.g. the final norm) is a high-precision island; inside MlpBlock/AttentionBlock
    under an INT8 policy its output is quantized by the fused kernel instead.
    """

    policy: Policy = Policy()
    rms: bool = False
    eps: float = 1e-5

    @nn.compact
    def weights(self, features: int) -> dict[str, jax.Array]:
        """Creates and returns {"scale": (D,) ones, "bias": (D,) zeros (LayerNorm only)}, fp32."""
        out = {"scale": self.param("scale", nn.initializers.ones_init(), (features,), F32)}
        if not self.rms:
            out["bias"] = self.param("bias", nn.initializers.zeros_init(), (features,), F32)
        return out

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.weights(x.shape[-1])
        return norm_reference(x, w["scale"], w.get("bias"), eps=self.eps, rms=self.rms)


def _check_choice(label: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{label} must be one of {choices}, got {value!r}")


class MlpBlock(nn.Module):
    """Pre-norm MLP residual branch: fc2(act(fc1(norm(x)))), dropout on the output.

    x: (..., D) fp32 residual stream -> (..., D) fp32 branch output (the caller adds it to x).
    activation "gelu" (exact erf) or "swiglu" (u * silu(gate), u = fc1); norm "layernorm" or "rmsnorm".
    use_bias: None means True for gelu and False for swiglu (LLaMA style).
    """

    hidden: int
    policy: Policy = Policy()
    activation: Literal["gelu", "swiglu"] = "gelu"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    dropout_rate: float = 0.0
    use_bias: bool | None = None
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("norm", self.norm, NORMS)
        d, rms = x.shape[-1], self.norm == "rmsnorm"
        self.policy.check_dims(model_dim=d, hidden=self.hidden)
        bias = (self.activation == "gelu") if self.use_bias is None else self.use_bias
        norm = LayerNorm(self.policy, rms=rms, eps=self.eps, name="norm")
        fc1 = Dense(self.hidden, bias, self.policy, name="fc1")
        gate = Dense(self.hidden, bias, self.policy, name="gate") if self.activation == "swiglu" else None
        fc2 = Dense(d, bias, self.policy, name="fc2")
        if self.policy.int8 and not self.is_initializing():
            params = {"norm": norm.weights(d), "fc1": _as_dict(fc1.weights(d)),
                      "fc2": _as_dict(fc2.weights(self.hidden))}
            if gate is not None:
                params["gate"] = _as_dict(gate.weights(d))
            y = jetfire_mlp(x, params, quant_key(self), self.policy, activation=self.activation, eps=self.eps,
                            rms=rms)
        else:
            h = norm(x)
            y = fc2(activation_reference(fc1(h), None if gate is None else gate(h), self.activation))
        y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
        return y.astype(F32)


def _as_dict(kb: tuple[jax.Array, jax.Array | None]) -> dict[str, jax.Array]:
    kernel, bias = kb
    return {"kernel": kernel} if bias is None else {"kernel": kernel, "bias": bias}


def rotary(x: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotary position embedding (half-split, GPT-NeoX style). x: (B, T, H, Dh) -> same shape and dtype."""
    t, d = x.shape[1], x.shape[-1]
    if d % 2:
        raise ValueError(f"rotary needs an even head dimension, got {d}")
    inv = 1.0 / (base ** (jnp.arange(0, d, 2, dtype=F32) / d))
    ang = jnp.arange(t, dtype=F32)[:, None] * inv[None, :]
    cos, sin = jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]
    x1, x2 = jnp.split(x.astype(F32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).astype(x.dtype)


class AttentionBlock(nn.Module):
    """Pre-norm self-attention residual branch: out(attn(qkv(norm(x)))), dropout on the output.

    x: (B, T, D) fp32 -> (B, T, D) fp32. qkv is one Dense (D, 3D) laid out [q | k | v], heads contiguous.
    The attention core (softmax(QK^T / sqrt(Dh)) V, causal if ``causal``) is a bf16 high-precision island
    (``jax.nn.dot_product_attention``). mask: optional (B, 1 or H, T, T) bool, True = attend.
    use_bias: None means ``not rotary`` (GPT-2 with biases, LLaMA style without).
    """

    num_heads: int
    policy: Policy = Policy()
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    rotary: bool = False
    causal: bool = True
    dropout_rate: float = 0.0
    use_bias: bool | None = None
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True, mask: jax.Array | None = None) -> jax.Array:
        _check_choice("norm", self.norm, NORMS)
        if x.ndim != 3:
            raise ValueError(f"AttentionBlock expects x of shape (batch, tokens, features), got {x.shape}")
        b, t, d = x.shape
        if d % self.num_heads:
            raise ValueError(f"model width {d} is not divisible by num_heads={self.num_heads}")
        self.policy.check_dims(model_dim=d)
        rms, hd, cd = self.norm == "rmsnorm", d // self.num_heads, self.policy.compute_dtype
        bias = (not self.rotary) if self.use_bias is None else self.use_bias
        norm = LayerNorm(self.policy, rms=rms, eps=self.eps, name="norm")
        qkv_proj = Dense(3 * d, bias, self.policy, name="qkv")
        out_proj = Dense(d, bias, self.policy, name="out")
        if self.policy.int8 and not self.is_initializing():
            kernel, qkv_bias = qkv_proj.weights(d)
            qkv = jetfire_norm_linear(x, norm.weights(d), kernel, qkv_bias, quant_key(self), self.policy,
                                      eps=self.eps, rms=rms)
        else:
            qkv = qkv_proj(norm(x))
        qkv = qkv.astype(cd).reshape(b, t, 3, self.num_heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.rotary:
            q, k = rotary(q), rotary(k)
        o = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=self.causal)
        y = out_proj(o.reshape(b, t, d))
        y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
        return y.astype(F32)


class Int8DotGeneral(nn.Module):
    """A ``dot_general`` for ``flax.linen.Dense(dot_general_cls=...)`` (the Flax fp8 pattern): Jetfire INT8.

    Usage: ``nn.Dense(256, dot_general_cls=functools.partial(Int8DotGeneral, policy=policy))``. Only the
    Dense contraction (last axis of x with axis 0 of a 2-D kernel, no batch axes) is supported; Dense adds
    its bias afterwards in its own dtype. Stochastic-rounding keys come from the "quant"/"dropout" rngs.
    """

    policy: Policy = Policy(name="jetfire-int8")

    @nn.compact
    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        (lc, rc), (lb, rb) = dimension_numbers
        if lb or rb or rhs.ndim != 2 or tuple(rc) != (0,) or tuple(lc) != (lhs.ndim - 1,):
            raise NotImplementedError(
                f"Int8DotGeneral supports x (..., K) @ kernel (K, N) only, got dimension_numbers "
                f"{dimension_numbers} for shapes {lhs.shape} x {rhs.shape}"
            )
        key = None if self.is_initializing() else quant_key(self)
        y = jetfire_linear(lhs, rhs, None, key, self.policy)
        return y.astype(preferred_element_type) if preferred_element_type is not None else y
