"""Flax linen modules whose numerics follow a :class:`jq8.training.policy.Policy` (bf16 or Jetfire INT8).

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
one custom_vjp op (:func:`jq8.training.jetfire.jetfire_mlp`) and the attention projections are INT8 around a bf16
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

from jq8.training.jetfire import (
    ACTIVATIONS,
    activation_reference,
    jetfire_linear,
    jetfire_mlp,
    jetfire_norm_linear,
    linear_reference,
    norm_reference,
)
from jq8.training.policy import Policy, quant_key

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

    def __call__(self, x: jax.Array, residual: jax.Array | None = None) -> jax.Array:
        """x: (..., in) -> (..., features) compute dtype; with ``residual`` ((..., features)) residual + that,
        in the residual's dtype (added in the INT8 GEMM's epilogue)."""
        kernel, bias = self.weights(x.shape[-1])
        if self.policy.int8:
            key = quant_key(self) if not self.is_initializing() else None
            return jetfire_linear(x, kernel, bias, key, self.policy, residual=residual)
        y = linear_reference(x, kernel, bias, self.policy.compute_dtype)
        return y if residual is None else residual + y.astype(residual.dtype)


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

    x: (..., D) fp32 residual stream -> (..., D) fp32 branch output. ``residual`` (same shape, optional):
    returned as residual + branch instead, so an INT8 inference path can add it in its last GEMM's epilogue
    (``jq8.ptq.infer``); the float and training paths add it after the dropout, as the caller would.
    activation "gelu" (exact erf), "gelu_tanh" (its tanh form, GPT-2's; float policies only) or "swiglu"
    (u * silu(gate), u = fc1); norm "layernorm" or "rmsnorm".
    use_bias: None means True for gelu and False for swiglu (LLaMA style).
    """

    hidden: int
    policy: Policy = Policy()
    activation: Literal["gelu", "gelu_tanh", "swiglu"] = "gelu"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    dropout_rate: float = 0.0
    use_bias: bool | None = None
    eps: float = 1e-5

    @nn.compact
    def __call__(
        self, x: jax.Array, deterministic: bool = True, residual: jax.Array | None = None
    ) -> jax.Array:
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("norm", self.norm, NORMS)
        d, rms = x.shape[-1], self.norm == "rmsnorm"
        self.policy.check_dims(model_dim=d, hidden=self.hidden)
        bias = (self.activation != "swiglu") if self.use_bias is None else self.use_bias
        norm = LayerNorm(self.policy, rms=rms, eps=self.eps, name="norm")
        fc1 = Dense(self.hidden, bias, self.policy, name="fc1")
        gate = Dense(self.hidden, bias, self.policy, name="gate") if self.activation == "swiglu" else None
        fc2 = Dense(d, bias, self.policy, name="fc2")
        if self.policy.int8 and not self.is_initializing():
            params = {
                "norm": norm.weights(d),
                "fc1": _as_dict(fc1.weights(d)),
                "fc2": _as_dict(fc2.weights(self.hidden)),
            }
            if gate is not None:
                params["gate"] = _as_dict(gate.weights(d))
            # The residual stream passes through the op when it is this branch's own input (the pre-norm
            # block), so its gradient joins the fused LayerNorm backward's dx; with no dropout between, fc2's
            # epilogue adds it too.
            through = residual is x
            fused_add = through and (deterministic or self.dropout_rate == 0.0)
            y = jetfire_mlp(
                x, params, quant_key(self), self.policy, activation=self.activation, eps=self.eps, rms=rms,
                return_input=through and not fused_add, add_input=fused_add,
            )
            if fused_add:
                return y
            y, residual = y if through else (y, residual)
        else:
            h = norm(x)
            y = fc2(activation_reference(fc1(h), None if gate is None else gate(h), self.activation))
        y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
        return _add_residual(y, residual)


def _add_residual(y: jax.Array, residual: jax.Array | None) -> jax.Array:
    """The branch output in fp32, plus the residual stream when the caller passed it."""
    return y.astype(F32) if residual is None else residual.astype(F32) + y.astype(F32)


def _as_dict(kb: tuple[jax.Array, jax.Array | None]) -> dict[str, jax.Array]:
    kernel, bias = kb
    return {"kernel": kernel} if bias is None else {"kernel": kernel, "bias": bias}


def rotary(x: jax.Array, base: float = 10000.0, offset: jax.Array | int = 0) -> jax.Array:
    """Rotary position embedding (half-split, GPT-NeoX style). x: (B, T, H, Dh) -> same shape and dtype.

    offset: position of x's first token (int or traced int32 scalar, e.g. a KV cache's fill index), so
    token i is rotated by angle (offset + i) * freq. Positions are integers cast to f32 exactly as the
    offset-0 path does, so a cached decode step rotates bit-identically to the full-sequence pass.
    """
    t, d = x.shape[1], x.shape[-1]
    if d % 2:
        raise ValueError(f"rotary needs an even head dimension, got {d}")
    inv = 1.0 / (base ** (jnp.arange(0, d, 2, dtype=F32) / d))
    pos = (offset + jnp.arange(t, dtype=jnp.int32)).astype(F32)
    ang = pos[:, None] * inv[None, :]
    cos, sin = jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]
    x1, x2 = jnp.split(x.astype(F32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).astype(x.dtype)


ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas")
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def attention_implementation(
    choice: str, dtype, head_dim: int, *, masked: bool, decode: bool, one_token: bool = False,
    seq_len: int | None = None,
) -> str:
    """The attention implementation ("xla", "cudnn" or "pallas") for a requested ``choice``.

    choice: "auto" | "xla" | "cudnn" | "pallas" (``ModelConfig.attention`` / the block's ``implementation``).
    "auto" picks cuDNN flash attention (no T x T probabilities saved for the backward pass) when the
    default backend is a GPU, q/k/v are bf16 or fp16, head_dim % 8 == 0 and head_dim <= 128, the sequence
    length ``seq_len`` is even (cuDNN's causal training kernels refuse odd lengths), there is no explicit
    mask and the call does not decode; otherwise XLA. "cudnn" needs a GPU (ValueError here,
    instead of JAX's "cuDNN is not detected"). Cached decoding runs XLA (its (T, cache length) mask over a
    partly filled cache is not a flash-attention case), except a one-token cached call without an explicit
    mask and with a power-of-two head_dim: "auto" on a GPU and "pallas" anywhere take
    :func:`pallas_kernels.decode_attention.decode_attention`, one launch where XLA's softmax takes four.
    """
    _check_choice("attention implementation", choice, ATTENTION_IMPLEMENTATIONS)
    gpu = jax.default_backend() == "gpu"
    if choice == "cudnn" and not gpu:
        raise ValueError(
            f"attention implementation 'cudnn' (ModelConfig.attention / AttentionBlock.implementation) needs "
            f"a GPU with cuDNN, but the default backend is {jax.default_backend()!r}; use 'auto' or 'xla'"
        )
    kernel_fits = decode and one_token and not masked and head_dim & (head_dim - 1) == 0
    if kernel_fits and (choice == "pallas" or (choice == "auto" and gpu)):
        return "pallas"
    if decode or choice in ("xla", "pallas"):
        return "xla"
    if choice == "cudnn":
        return "cudnn"
    fits = jnp.dtype(dtype) in _CUDNN_DTYPES and head_dim % 8 == 0 and head_dim <= 128
    fits = fits and (seq_len is None or seq_len % 2 == 0)
    return "cudnn" if gpu and fits and not masked else "xla"


class AttentionBlock(nn.Module):
    """Pre-norm self-attention residual branch: out(attn(qkv(norm(x)))), dropout on the output.

    x: (B, T, D) fp32 -> (B, T, D) fp32 (plus ``residual`` when given, as in :class:`MlpBlock`). qkv is
    one Dense (D, (H + 2 Hkv) Dh) laid out [q | k | v], heads contiguous: H = ``num_heads`` query heads of
    Dh = D / H, and Hkv = ``num_kv_heads`` key / value heads (grouped-query attention: query head i reads
    KV head i // (H / Hkv); None means H, multi-head attention, a (D, 3D) projection). ``qkv_bias``
    overrides ``use_bias`` for the qkv projection alone (Qwen2: q/k/v biases, no out bias);
    ``rope_theta`` is the rotary base.
    The attention core (:meth:`attend`: rotary, KV cache, softmax(QK^T / sqrt(Dh)) V, causal if ``causal``)
    is a high-precision island in the compute dtype (``jax.nn.dot_product_attention``; ``implementation``
    picks XLA or cuDNN flash attention, see :func:`attention_implementation`). mask: optional
    (B, 1 or H, T, T) bool, True = attend (with ``decode``: (B, 1 or H, T, cache length)).
    use_bias: None means ``not rotary`` (GPT-2 with biases, LLaMA style without).

    KV cache (``decode=True``, the ``nn.MultiHeadDotProductAttention`` pattern): the "cache" collection
    holds ``cached_key`` / ``cached_value`` (B, max_len, Hkv, Dh) in the compute dtype and ``cache_index``
    (int32 scalar, the number of filled positions). Initialising with decode=True (``model.init`` on a
    (B, max_len) input, or :func:`jq8.inference.decode.init_cache`) creates the empty cache sized by the input and
    attends normally. Later calls (cache passed in, ``mutable=["cache"]``) with T >= 1 new tokens rotate
    them from position ``cache_index``, write them there, advance the index by T and attend each query to
    the cached keys at positions <= its own (causal inside the chunk too): one call can prefill a prompt,
    later calls decode a token at a time. T > max_len raises; the index is traced, so the caller bounds
    the number of steps (``dynamic_update_slice`` would clamp, not wrap, an overflowing write:
    :func:`jq8.inference.decode.generate` checks prompt + steps against the cache length).
    """

    num_heads: int
    policy: Policy = Policy()
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    rotary: bool = False
    causal: bool = True
    dropout_rate: float = 0.0
    use_bias: bool | None = None
    eps: float = 1e-5
    implementation: str = "auto"
    num_kv_heads: int | None = None
    qkv_bias: bool | None = None
    rope_theta: float = 10000.0

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        deterministic: bool = True,
        mask: jax.Array | None = None,
        decode: bool = False,
        residual: jax.Array | None = None,
    ) -> jax.Array:
        _check_choice("norm", self.norm, NORMS)
        if x.ndim != 3:
            raise ValueError(f"AttentionBlock expects x of shape (batch, tokens, features), got {x.shape}")
        b, t, d = x.shape
        h, hk = self.num_heads, self.kv_heads
        if d % h:
            raise ValueError(f"model width {d} is not divisible by num_heads={h}")
        if h % hk:
            raise ValueError(f"num_heads={h} is not a multiple of num_kv_heads={hk}")
        self.policy.check_dims(model_dim=d)
        rms, hd, cd = self.norm == "rmsnorm", d // h, self.policy.compute_dtype
        bias = (not self.rotary) if self.use_bias is None else self.use_bias
        norm = LayerNorm(self.policy, rms=rms, eps=self.eps, name="norm")
        qkv_bias = bias if self.qkv_bias is None else self.qkv_bias
        qkv_proj = Dense((h + 2 * hk) * hd, qkv_bias, self.policy, name="qkv")
        out_proj = Dense(d, bias, self.policy, name="out")
        if self.policy.int8 and not self.is_initializing():
            kernel, qkv_b = qkv_proj.weights(d)
            # q, k and v come from the GEMM's epilogue as separate arrays (KV-head-wide column blocks, the
            # first h / hk of them q's): no slicing copies for attention
            parts = jetfire_norm_linear(
                x, norm.weights(d), kernel, qkv_b, quant_key(self), self.policy, eps=self.eps, rms=rms,
                split_cols=hk * hd, return_input=residual is x,  # residual stream through the op, as MlpBlock
            )
            parts, residual = parts if residual is x else (parts, residual)
            qkv = split_qkv_columns(parts, h, hk)
            qkv = tuple(a.astype(cd).reshape(b, t, -1, hd) for a in qkv)
        else:
            qkv = qkv_proj(norm(x)).astype(cd).reshape(b, t, h + 2 * hk, hd)
        o = self.attend(qkv, mask, decode)
        if self.policy.int8 and residual is not None and (deterministic or self.dropout_rate == 0.0):
            return out_proj(o.reshape(b, t, d), residual=residual.astype(F32))  # added in the GEMM epilogue
        y = out_proj(o.reshape(b, t, d))
        y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
        return _add_residual(y, residual)

    def attend(self, qkv, mask: jax.Array | None = None, decode: bool = False) -> jax.Array:
        """The attention core after the qkv projection: rotary, KV cache, softmax attention.

        qkv: (B, T, H + 2 Hkv, Dh) in the compute dtype, the heads of [q | k | v] *before* rotary (with
        multi-head attention also (B, T, 3, H, Dh), the same memory) -> o (B, T, H, Dh), same dtype; or a
        ``pallas_kernels.int8_matmul_decode.SplitKSum`` finishing to it (the INT8 path's split-K qkv GEMV,
        whose reduction the one-token decode kernel then does in its prologue); or a tuple (q, k, v) of
        (B, T, H, Dh), (B, T, Hkv, Dh), (B, T, Hkv, Dh) arrays (the INT8 path's prefill GEMM writes them
        apart). Grouped KV heads stay grouped: the cache, XLA's attention and the decode kernel read each KV
        head for its H / Hkv query heads.
        Shared by :meth:`__call__` and the INT8 path (``jq8.ptq.infer``'s fused attention calls it on the
        bound module from inside the intercepted ``__call__``, so the cache variables can be created and
        mutated there too). mask / decode: as in the class docstring. A one-token cached call on the
        "pallas" implementation is one kernel that also writes the cache and advances its index
        (:func:`pallas_kernels.decode_attention.decode_attention_update`).
        """
        from pallas_kernels.int8_matmul_decode import SplitKSum

        packed = None if isinstance(qkv, tuple) else qkv
        # Unfinished split-K sums: finished by XLA here, an op XLA drops where the kernel finishes them.
        if isinstance(qkv, SplitKSum):
            qkv = qkv.finish()
        q, k, v = qkv if isinstance(qkv, tuple) else self._split_heads(qkv)
        cache = self._cache_variables(k, v) if decode else None
        offset = cache[2].value if cache is not None else 0
        if self.rotary:
            q, k = rotary(q, self.rope_theta, offset), rotary(k, self.rope_theta, offset)
        causal = self.causal
        impl = attention_implementation(
            self.implementation,
            q.dtype,
            q.shape[-1],
            masked=mask is not None,
            decode=cache is not None,
            one_token=q.shape[1] == 1,
            seq_len=q.shape[1],
        )
        if impl == "pallas":  # one cached query token (attention_implementation): one launch for the step
            from pallas_kernels.decode_attention import decode_attention_update

            ck, cv, ci = cache
            _check_cache(ck.value, k)
            # (B, H + 2 Hkv, Dh): with rotary (or q, k, v given apart) re-packed in one fusion, else a free
            # reshape
            if self.rotary or packed is None:
                row = jnp.concatenate([q[:, 0], k[:, 0], v[:, 0]], axis=1)
            else:
                row = packed.reshape(packed.shape[0], *packed.shape[2:])
            o, ck.value, cv.value, ci.value = decode_attention_update(row, ck.value, cv.value, ci.value)
            return o[:, None]
        if cache is not None:
            k, v, mask = _write_cache(cache, k, v, mask, causal=self.causal)
            causal = False  # the cache mask already holds the causal structure
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation=impl)

    def _split_heads(self, qkv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(B, T, H + 2 Hkv, Dh) or (B, T, 3, H, Dh) packed heads -> q (B, T, H, Dh), k, v (B, T, Hkv, Dh)."""
        h, hk = self.num_heads, self.kv_heads
        b, t = qkv.shape[:2]
        qkv = qkv.reshape(b, t, -1, qkv.shape[-1])
        if qkv.shape[2] != h + 2 * hk:
            raise ValueError(f"packed qkv has {qkv.shape[2]} heads, expected {h} + 2 x {hk} (num_heads, num_kv_heads)")
        return qkv[:, :, :h], qkv[:, :, h : h + hk], qkv[:, :, h + hk :]

    def _cache_variables(self, k: jax.Array, v: jax.Array) -> tuple | None:
        """(cached_key, cached_value, cache_index) variables, or None when this call creates them (init)."""
        initialized = self.has_variable("cache", "cached_key")
        ck = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cv = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        ci = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        return (ck, cv, ci) if initialized else None


def split_qkv_columns(parts, num_heads: int, num_kv_heads: int) -> tuple:
    """A qkv GEMM's output written as (H + 2 Hkv) / Hkv column blocks of Hkv heads each -> (q, k, v).

    With multi-head attention those are the three blocks; with grouped KV heads q is the first H / Hkv
    blocks, joined along the columns (the GEMM epilogue writes equal-width blocks only).
    """
    g = num_heads // num_kv_heads
    parts = tuple(parts)
    if len(parts) != g + 2:
        raise ValueError(f"expected {g + 2} qkv column blocks for {num_heads} / {num_kv_heads} heads, got {len(parts)}")
    q = parts[0] if g == 1 else jnp.concatenate(parts[:g], axis=-1)
    return q, parts[g], parts[g + 1]


def _check_cache(cached_key: jax.Array, k: jax.Array) -> None:
    """Raises unless the new keys k (B, T, Hkv, Dh) fit the cache (B, max_len, Hkv, Dh)."""
    t, s = k.shape[1], cached_key.shape[1]
    if t > s:
        raise ValueError(f"decoding {t} tokens in one call exceeds the KV cache length {s}")
    if cached_key.shape[0] != k.shape[0] or cached_key.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"KV cache of shape {cached_key.shape} (batch, max_len, heads, head_dim) does not fit new keys "
            f"{k.shape}: build the cache for this batch size (jq8.inference.decode.init_cache)"
        )


def _write_cache(cache: tuple, k: jax.Array, v: jax.Array, mask: jax.Array | None, *, causal: bool):
    """Writes k, v (B, T, H, Dh) at the cache index, advances it by T; returns (keys, values, mask).

    keys / values: the whole cache (B, S, H, Dh); mask (1 or B, 1 or H, T, S) bool: key j is visible to
    query i when j is filled (j < index + T) and, if ``causal``, j <= index + i; ANDed with ``mask``.
    """
    ck, cv, ci = cache
    _check_cache(ck.value, k)
    t, s = k.shape[1], ck.value.shape[1]
    idx = ci.value
    start = (0, idx, 0, 0)
    ck.value = jax.lax.dynamic_update_slice(ck.value, k.astype(ck.value.dtype), start)
    cv.value = jax.lax.dynamic_update_slice(cv.value, v.astype(cv.value.dtype), start)
    ci.value = idx + t
    k_pos = jnp.arange(s, dtype=jnp.int32)[None, :]
    q_pos = idx + jnp.arange(t, dtype=jnp.int32)[:, None]
    visible = k_pos <= q_pos if causal else jnp.broadcast_to(k_pos < idx + t, (t, s))
    visible = visible[None, None]
    if mask is not None:
        if mask.ndim != 4 or mask.shape[-2:] != (t, s):
            raise ValueError(
                f"with decode=True the mask must be (B, 1 or H, T={t}, cache length={s}), got {mask.shape}"
            )
        visible = jnp.logical_and(visible, mask)
    return ck.value, cv.value, visible


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
