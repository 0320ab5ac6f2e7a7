"""Cached autoregressive decoding: one prefill call on the prompt, then one token per step from a KV cache.

The same loop runs the float model and the ZeroQuant INT8 model: both are an
``apply_fn(tokens (B, T) int32, cache) -> (logits (B, T, V), new cache)`` over the models' Flax "cache"
collection (:class:`jq8.training.nn.AttentionBlock` with ``decode=True``; GPT adds its position counter ``pos``)::

    cache = init_cache(model, batch=1, max_len=prompt_len + steps - 1)
    gen = jax.jit(lambda p, c, t: generate(float_apply_fn(model, p), c, t, steps=32))
    tokens = gen(params, cache, prompt)            # (1, 32) int32, one dispatch for all 32 tokens

(pass the parameters through ``jit`` as arguments, as above, rather than closing over them: a closure
would bake them into the program as constants). For the INT8 model use ``quantized_apply_fn(model, qp)``
with ``qp`` as the jitted argument.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Cache = Mapping[str, Any]
ApplyFn = Callable[[jax.Array, Cache], tuple[jax.Array, Cache]]


def init_cache(model: nn.Module, batch: int, max_len: int) -> dict[str, Any]:
    """The empty "cache" collection of ``model`` for ``batch`` sequences of up to ``max_len`` tokens.

    Shapes come from ``jax.eval_shape`` of ``model.init`` with decode=True on a (batch, max_len) input
    (no parameters are initialized); every leaf is zeros (keys/values in the compute dtype, int32 indices).
    For GPT, ``max_len`` <= max_seq_len (its position table).
    """
    if batch < 1 or max_len < 1:
        raise ValueError(f"init_cache needs batch >= 1 and max_len >= 1, got {batch}, {max_len}")
    tokens = jax.ShapeDtypeStruct((batch, max_len), jnp.int32)
    shapes = jax.eval_shape(lambda t: model.init(jax.random.PRNGKey(0), t, decode=True), tokens)
    if "cache" not in shapes:
        raise ValueError(f"{type(model).__name__} created no 'cache' collection with decode=True")
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), dict(shapes["cache"]))


def cache_length(cache: Cache) -> int:
    """The number of positions the cache holds (its ``cached_key`` axis 1; all layers share it)."""
    lengths = {
        leaf.shape[1]
        for path, leaf in jax.tree_util.tree_flatten_with_path(cache)[0]
        if getattr(path[-1], "key", None) == "cached_key"
    }
    if len(lengths) != 1:
        raise ValueError(f"expected a KV cache with one length (cached_key leaves), found lengths {lengths}")
    return lengths.pop()


def _filled(cache: Cache) -> int:
    """The cache's fill (max ``cache_index``) when known outside a trace; 0 for traced (caller-bounded)."""
    idx = [
        leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(cache)[0]
        if getattr(path[-1], "key", None) == "cache_index"
    ]
    try:
        return max((int(i) for i in idx), default=0)
    except jax.errors.ConcretizationTypeError:  # traced (e.g. the cache is a jit argument)
        return 0


def float_apply_fn(model: nn.Module, params: Mapping[str, Any]) -> ApplyFn:
    """apply_fn of the float model: ``model.apply`` with decode=True, returning the updated cache."""

    def apply_fn(tokens: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        logits, mutated = model.apply(
            {"params": params, "cache": cache}, tokens, decode=True, mutable=["cache"]
        )
        return logits, mutated["cache"]

    return apply_fn


def quantized_apply_fn(model: nn.Module, qp, backend: str | None = None, fused: bool = True) -> ApplyFn:
    """apply_fn of the INT8 model (``jq8.ptq.infer.apply_quantized``, qp a ``QuantizedParams``)."""
    from jq8.ptq import infer as ptq_infer

    def apply_fn(tokens: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        logits, mutated = ptq_infer.apply_quantized(
            model,
            qp,
            tokens,
            backend=backend,
            fused=fused,
            variables={"cache": cache},
            decode=True,
            mutable=["cache"],
        )
        return logits, mutated["cache"]

    return apply_fn


def _sample(logits: jax.Array, key: jax.Array, top_k: int | None, temperature: float) -> jax.Array:
    """Next token per row of logits (B, V): argmax (top_k None or 1), else top-k sampling. -> (B,) int32."""
    logits = logits.astype(jnp.float32)
    if top_k is None or top_k == 1:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    vals, idx = jax.lax.top_k(logits / temperature, top_k)
    choice = jax.random.categorical(key, vals, axis=-1)
    return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _check_args(cache: Cache, prompt_len: int, steps: int, top_k: int | None, temperature: float) -> None:
    if steps < 1:
        raise ValueError(f"generate needs steps >= 1, got {steps}")
    if prompt_len < 1:
        raise ValueError("generate needs a non-empty prompt")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be None or >= 1, got {top_k}")
    if top_k is not None and top_k > 1 and not temperature > 0:
        raise ValueError(f"top-k sampling needs temperature > 0, got {temperature}")
    # The prompt and every generated token but the last are written to the cache.
    need, length, filled = prompt_len + steps - 1, cache_length(cache), _filled(cache)
    if filled + need > length:
        raise ValueError(
            f"prompt of {prompt_len} tokens + {steps} steps needs {need} cache positions"
            f"{f' after the {filled} filled' if filled else ''}, but the KV cache holds {length}: build it "
            "with init_cache(model, batch, max_len >= prompt length + steps - 1)"
        )


def generate(
    apply_fn: ApplyFn,
    cache: Cache,
    prompt: jax.Array,
    *,
    steps: int,
    top_k: int | None = None,
    temperature: float = 1.0,
    key: jax.Array | None = None,
) -> jax.Array:
    """``steps`` new tokens after ``prompt``: (B, P) int32 -> (B, steps) int32. Jittable (wrap it in jit).

    One prefill call writes the prompt to the cache and gives the first token; a ``lax.fori_loop`` then
    feeds each new token back one at a time. Greedy when ``top_k`` is None or 1, else top-k sampling of
    softmax(logits / temperature) with ``key`` (default PRNGKey(0); step i uses fold_in(key, i)).
    ``cache`` is normally fresh (:func:`init_cache`); prompt + steps - 1 positions must fit after its fill.
    That is checked statically from the cache length (and from ``cache_index`` when it is concrete); a
    traced fill cannot be checked inside jit, so then the caller bounds it.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2:
        raise ValueError(f"prompt must be (batch, tokens) int32, got shape {prompt.shape}")
    b, p = prompt.shape
    _check_args(cache, p, steps, top_k, temperature)
    key = jax.random.PRNGKey(0) if key is None else key

    logits, cache = apply_fn(prompt, cache)
    first = _sample(logits[:, -1], jax.random.fold_in(key, 0), top_k, temperature)
    out = jnp.zeros((b, steps), jnp.int32).at[:, 0].set(first)

    def step(i, carry):
        cache, token, out = carry
        logits, cache = apply_fn(token[:, None], cache)
        token = _sample(logits[:, -1], jax.random.fold_in(key, i), top_k, temperature)
        return cache, token, out.at[:, i].set(token)

    return jax.lax.fori_loop(1, steps, step, (cache, first, out))[2]
