"""Activation-outlier migration (SmoothQuant, arXiv 2211.10438): an opt-in extension of ZeroQuant in jq8.

Token-wise INT8 activations lose precision when a few input channels are much larger than the rest (one
scale per token serves the whole row). For a Dense ``y = x @ W`` and per-input-channel factors s > 0,

    y = (x / s) @ (s[:, None] * W)

exactly in real arithmetic. With s_j = max|X_j|^alpha / max|W_j|^(1-alpha) (max|X_j| over calibration
tokens, max|W_j| over row j of every Dense reading x), the outlier channels of x shrink and the weight rows
grow to match: alpha = 0 leaves the activations alone (s = 1 / max|W_j|), alpha = 1 moves all of their
range into the weights. Division by s is folded into the op that *produces* x, so the model stays the same
Flax model with other params, and the float logits do not change (up to float rounding):

* a pre-norm branch (``norm`` -> ``qkv``, or ``norm`` -> ``fc1`` [+ ``gate``]): the norm's gamma (and beta)
  divided by s; the consumers' kernel rows multiplied by s (one s for all consumers of that norm);
* the SwiGLU down projection (``fc2`` reads ``fc1(h) * silu(gate(h))``, which is linear in ``fc1``'s
  output): ``fc1``'s output columns (and bias) divided by s, ``fc2``'s rows multiplied by s. A GELU MLP's
  ``fc2`` input is not linear in ``fc1`` and is left alone;
* the attention output projection (``out`` reads softmax(q k^T) v per head, linear in v): ``qkv``'s v
  columns divided by s, ``out``'s rows multiplied by s. With grouped-query attention the query heads of
  one group read the same KV head, so one s per (KV head, head channel) serves all of them: its activation
  and weight maxima are taken over the group's query heads. Needs ``num_heads`` (and ``num_kv_heads``).

The strength can be one alpha for every site or chosen per site (:func:`search_alphas`, ``--smooth auto``):
for each site in application order, the alpha of a grid whose smoothed consumers give the W8A8 output
(token-wise INT8 inputs, per-output-channel INT8 weights) closest to the float output on a sample of
calibration inputs. It reads only calibration data, so an evaluation set stays untouched.

The LM head's input (the final norm's output) is not smoothed: a tied head shares its table with the
embedding lookup, which a per-channel factor would change.

The migration factors live in the norms, so a smoothed model must be quantized with ``fold_norms=False``
(folding the norm affines into the next Dense would multiply s back out). Smoothing commutes with that
fold in the other order: on already-folded params (gamma = 1) it computes the same final activations.

Params are found by name, in jq8.training.nn's branch layout (as :mod:`jq8.ptq.norm_fold`): a ``norm``
beside ``qkv`` / ``out`` (attention) or ``fc1`` / ``gate`` / ``fc2`` (MLP).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jq8.quant import QuantSpec, fake_quantize
from jq8.rules import get_path, map_path, module_path

SITES = ("v->out", "fc1->fc2", "norm->qkv", "norm->fc1")
# A factor is clipped to this range: a dead channel (all-zero activations or weights) keeps s = 1.
S_MIN, S_MAX = 1e-5, 1e5


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float in [0, 1], else ValueError naming it."""
    a = float(alpha)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"smoothing alpha must be in [0, 1], got {alpha}")
    return a


def smoothing_factors(act_absmax: jax.Array, weight_absmax: jax.Array, alpha: float) -> jax.Array:
    """s (C,) f32 = act_absmax^alpha / weight_absmax^(1 - alpha), per channel.

    act_absmax: (C,) max |x_j| of the consumer's input over calibration tokens; weight_absmax: (C,) max |W_j|
    over row j of every consumer. Channels with a zero maximum keep s = 1; the rest are clipped to
    [S_MIN, S_MAX].
    """
    alpha = check_alpha(alpha)
    a = jnp.asarray(act_absmax, jnp.float32)
    w = jnp.asarray(weight_absmax, jnp.float32)
    if a.shape != w.shape or a.ndim != 1:
        raise ValueError(f"act_absmax {a.shape} and weight_absmax {w.shape} must be the same (C,) shape")
    live = (a > 0) & (w > 0)
    s = jnp.power(jnp.where(live, a, 1.0), alpha) / jnp.power(jnp.where(live, w, 1.0), 1.0 - alpha)
    return jnp.where(live, jnp.clip(s, S_MIN, S_MAX), 1.0)


def _rows_absmax(*kernels: jax.Array) -> jax.Array:
    """(K,) max |W| over row k of each Flax kernel (K, N), and over the kernels."""
    return jnp.max(jnp.stack([jnp.max(jnp.abs(jnp.asarray(k, jnp.float32)), axis=1) for k in kernels]), axis=0)


def _scaled(x: jax.Array, factor: jax.Array, axis: int) -> jax.Array:
    """x * factor broadcast along ``axis`` (f32 arithmetic, x's dtype kept)."""
    shape = [1] * x.ndim
    shape[axis] = -1
    return (jnp.asarray(x, jnp.float32) * factor.reshape(shape)).astype(x.dtype)


def _dense(node: Mapping[str, Any], name: str) -> bool:
    return isinstance(node.get(name), Mapping) and "kernel" in node[name]


def smoothing_sites(params: Mapping[str, Any], num_heads: int | None = None) -> list[tuple[str, str]]:
    """(branch path, site) of every place :func:`smooth_params` migrates, in the order it applies them:
    "v->out" (needs ``num_heads``) and "fc1->fc2" (SwiGLU MLPs) first, then "norm->qkv" / "norm->fc1"."""
    inner, norms = [], []

    def walk(node: Mapping[str, Any], prefix: tuple[str, ...]) -> None:
        path = "/".join(prefix)
        if num_heads is not None and _dense(node, "qkv") and _dense(node, "out"):
            inner.append((path, "v->out"))
        if _dense(node, "fc1") and _dense(node, "gate") and _dense(node, "fc2"):
            inner.append((path, "fc1->fc2"))
        norm = node.get("norm")
        if isinstance(norm, Mapping) and "scale" in norm:
            if _dense(node, "qkv"):
                norms.append((path, "norm->qkv"))
            elif _dense(node, "fc1"):
                norms.append((path, "norm->fc1"))
        for k, v in node.items():
            if isinstance(v, Mapping):
                walk(v, prefix + (str(k),))

    walk(params, ())
    return inner + norms


def _join(path: str, name: str) -> str:
    return f"{path}/{name}" if path else name


def site_key(path: str, site: str) -> str:
    """The key of one migration site in a per-site alpha mapping: ``"blocks_3/mlp:fc1->fc2"``."""
    return f"{path}:{site}"


def smooth_params(
    params: Mapping[str, Any],
    act_absmax: Mapping[str, jax.Array],
    alpha: float | Mapping[str, float],
    *,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    sites: tuple[str, ...] = SITES,
) -> tuple[dict, list[dict]]:
    """(smoothed params, report): every migration site of the module docstring, with s from
    :func:`smoothing_factors`. Pure: same params and maxima, same result; the float model computes the
    same function with the returned params (quantize them with ``fold_norms=False``).

    params: a Flax params tree (jq8.training.nn branches). act_absmax: Dense module path -> (K,) max |x| per
      input channel over calibration tokens (:func:`activation_absmax`); a site whose consumer has no entry
      is skipped. alpha: migration strength in [0, 1], one for every site or a mapping :func:`site_key` ->
      strength (:func:`search_alphas`; a site it lacks is skipped). num_heads / num_kv_heads: the attention heads
      (num_kv_heads None = num_heads); None skips the v -> out sites. sites: the kinds of site to migrate
      (a subset of :data:`SITES`).
    Weight maxima are read from the params as each site finds them: the v -> out and fc1 -> fc2 sites go
    first, so the norm sites see qkv / fc1 kernels with their output columns already rescaled.
    Report rows: {path, site, alpha, act_max_ratio_before, act_max_ratio_after, s_min, s_max}; the ratios are
    max / median of the per-channel activation maxima (1 = no outlier channel).
    """
    per_site = isinstance(alpha, Mapping)
    alphas = {k: check_alpha(v) for k, v in alpha.items()} if per_site else {}
    uniform = None if per_site else check_alpha(alpha)
    if num_kv_heads is not None and num_heads is None:
        raise ValueError("num_kv_heads needs num_heads")
    unknown = set(sites) - set(SITES)
    if unknown:
        raise ValueError(f"unknown smoothing site(s) {sorted(unknown)}; known: {', '.join(SITES)}")
    out = dict(params)
    report: list[dict] = []
    for path, site in smoothing_sites(params, num_heads):
        if site not in sites:
            continue
        node = get_path(out, path) if path else out
        if site == "v->out":
            consumer = _join(path, "out")
        elif site == "fc1->fc2":
            consumer = _join(path, "fc2")
        else:
            consumer = _join(path, site.split("->")[1])
        a = alphas.get(site_key(path, site)) if per_site else uniform
        if consumer not in act_absmax or a is None:
            continue
        amax = jnp.asarray(act_absmax[consumer], jnp.float32)
        new, s_in = _smooth_site(node, site, amax, a, num_heads, num_kv_heads, path)
        out = dict(map_path(out, path, lambda _, new=new: new)) if path else new
        ratio = lambda m: float(jnp.max(m) / jnp.maximum(jnp.median(m), jnp.finfo(jnp.float32).tiny))  # noqa: E731
        report.append(dict(path=path, site=site, alpha=a, act_max_ratio_before=ratio(amax),
                           act_max_ratio_after=ratio(amax / s_in), s_min=float(jnp.min(s_in)),
                           s_max=float(jnp.max(s_in))))
    return out, report


def _consumers(site: str) -> tuple[str, ...]:
    """The Dense layers of a branch that read a site's smoothed input."""
    return {"v->out": ("out",), "fc1->fc2": ("fc2",), "norm->qkv": ("qkv",), "norm->fc1": ("fc1", "gate")}[site]


def _smooth_site(node, site, amax, alpha, num_heads, num_kv_heads, path) -> tuple[dict, jax.Array]:
    """One site of one branch ``node`` migrated at ``alpha``: (new node, s per consumer input channel)."""
    if site == "v->out":
        return _smooth_v_out(node, amax, alpha, num_heads, num_kv_heads or num_heads, path)
    if site == "fc1->fc2":
        return _smooth_fc1_fc2(node, amax, alpha)
    return _smooth_norm(node, amax, alpha, _consumers(site))


def _smooth_norm(node, amax, alpha, names) -> tuple[dict, jax.Array]:
    """norm -> names: gamma, beta / s; the consumers' kernel rows * s."""
    present = tuple(n for n in names if _dense(node, n))
    s = smoothing_factors(amax, _rows_absmax(*(node[n]["kernel"] for n in present)), alpha)
    new = dict(node)
    norm = dict(node["norm"])
    for k in ("scale", "bias"):
        if k in norm:
            norm[k] = _scaled(norm[k], 1.0 / s, 0)
    new["norm"] = norm
    for n in present:
        new[n] = {**node[n], "kernel": _scaled(node[n]["kernel"], s, 0)}
    return new, s


def _smooth_fc1_fc2(node, amax, alpha) -> tuple[dict, jax.Array]:
    """SwiGLU u = fc1(h) * silu(gate(h)) -> fc2: fc1's output columns (and bias) / s, fc2's rows * s."""
    s = smoothing_factors(amax, _rows_absmax(node["fc2"]["kernel"]), alpha)
    fc1 = {**node["fc1"], "kernel": _scaled(node["fc1"]["kernel"], 1.0 / s, 1)}
    if "bias" in fc1:
        fc1["bias"] = _scaled(fc1["bias"], 1.0 / s, 0)
    return {**node, "fc1": fc1, "fc2": {**node["fc2"], "kernel": _scaled(node["fc2"]["kernel"], s, 0)}}, s


def _smooth_v_out(node, amax, alpha, h: int, hk: int, path: str) -> tuple[dict, jax.Array]:
    """o = attention(q, k, v) -> out: qkv's v columns (and bias) / s, out's rows * s, one s per (KV head,
    channel) shared by the query heads reading that KV head."""
    wqkv, wout = node["qkv"]["kernel"], node["out"]["kernel"]
    d_in = wout.shape[0]
    if h < 1 or hk < 1 or h % hk or d_in % h:
        raise ValueError(f"{path}: num_heads={h}, num_kv_heads={hk} do not fit out's input width {d_in}")
    hd = d_in // h
    if wqkv.shape[1] != (h + 2 * hk) * hd:
        raise ValueError(
            f"{path}: qkv has {wqkv.shape[1]} columns, expected (num_heads + 2 num_kv_heads) x head_dim = "
            f"({h} + 2 x {hk}) x {hd}; pass the model's num_heads / num_kv_heads"
        )
    group = h // hk
    # (H, hd) -> (Hkv, group, hd) -> max over the group's query heads: (Hkv, hd)
    a = jnp.max(amax.reshape(hk, group, hd), axis=1)
    w = jnp.max(_rows_absmax(wout).reshape(hk, group, hd), axis=1)
    s_kv = smoothing_factors(a.reshape(-1), w.reshape(-1), alpha)  # (Hkv * hd,)
    s_in = jnp.repeat(s_kv.reshape(hk, 1, hd), group, axis=1).reshape(-1)  # (H * hd,) per out input channel
    col = jnp.concatenate([jnp.ones(((h + hk) * hd,), jnp.float32), 1.0 / s_kv])  # q, k untouched
    qkv = {**node["qkv"], "kernel": _scaled(wqkv, col, 1)}
    if "bias" in qkv:
        qkv["bias"] = _scaled(qkv["bias"], col, 0)
    return {**node, "qkv": qkv, "out": {**node["out"], "kernel": _scaled(wout, s_in, 0)}}, s_in


def _dense_inputs(
    model: nn.Module,
    params: Mapping[str, Any],
    batches: Iterable[Any],
    reduce,
    paths: Iterable[str] | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
):
    """Yields, per batch, {Dense path: reduce(x)} with x the (tokens, K) f32 input of each recorded Dense of
    the float model (``model.apply({'params': params}, batch, **apply_kwargs)``; a tuple batch is unpacked
    into positional inputs). reduce runs inside the jitted call, so only what it keeps leaves the device."""
    from jq8.ptq.schemes import dense_paths

    wanted = set(dense_paths(params) if paths is None else paths)
    kw = dict(apply_kwargs or {})

    @jax.jit
    def inputs_of(p, batch):
        found: dict[str, jax.Array] = {}

        def interceptor(next_fun, args, kwargs, context):
            if context.method_name == "__call__":
                path = module_path(context.module.path)
                if path in wanted:
                    found[path] = reduce(args[0].astype(jnp.float32).reshape(-1, args[0].shape[-1]))
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            model.apply({"params": p}, *(batch if isinstance(batch, tuple) else (batch,)), **kw)
        return found

    for batch in batches:
        yield inputs_of(params, batch)


def activation_absmax(
    model: nn.Module,
    params: Mapping[str, Any],
    batches: Iterable[Any],
    paths: Iterable[str] | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, jax.Array]:
    """Dense module path -> (K,) f32 max |x| per input channel over every token of ``batches``.

    Runs the float model (``model.apply({'params': params}, batch, **apply_kwargs)``; a tuple batch is
    unpacked into positional inputs). paths: the Dense layers to record (default: every module holding a
    2-D ``kernel``).
    """
    amax: dict[str, jax.Array] = {}
    per_channel_max = lambda x: jnp.max(jnp.abs(x), axis=0)  # noqa: E731
    for found in _dense_inputs(model, params, batches, per_channel_max, paths, apply_kwargs):
        for path, m in found.items():
            amax[path] = m if path not in amax else jnp.maximum(amax[path], m)
    if not amax:
        raise ValueError("activation_absmax recorded nothing: no batches, or no Dense layer at the given paths")
    return amax


def activation_samples(
    model: nn.Module,
    params: Mapping[str, Any],
    batches: Iterable[Any],
    tokens: int = 1024,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, jax.Array]:
    """Dense module path -> (T, K) f32 inputs of that Dense on T <= ``tokens`` calibration tokens, taken
    evenly from each batch in turn until ``tokens`` are held (the search's sample; memory ~ tokens x K)."""
    batches = list(batches)
    if not batches:
        raise ValueError("activation_samples: no calibration batches")
    per_batch = -(-tokens // len(batches))

    def evenly(x):  # static shapes: the stride is fixed per batch shape
        return x[:: max(1, x.shape[0] // per_batch)][:per_batch]

    parts: dict[str, list] = {}
    for found in _dense_inputs(model, params, batches, evenly, apply_kwargs=apply_kwargs):
        for path, x in found.items():
            parts.setdefault(path, []).append(np.asarray(x))
    return {path: jnp.asarray(np.concatenate(xs)[:tokens]) for path, xs in parts.items()}


ALPHA_GRID: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def w8a8_output_error(x: jax.Array, kernel: jax.Array) -> float:
    """Sum of squared differences between ``x @ kernel`` in f32 and the same product with ``x`` quantized
    per token (INT8) and ``kernel`` per output channel (INT8): W8A8's numerics, fake-quantized.
    x: (T, K) f32; kernel: (K, N) Flax layout."""
    spec = QuantSpec.per_row(8)  # tokens are rows of x; output channels are rows of kernel.T
    x = jnp.asarray(x, jnp.float32)
    w = jnp.asarray(kernel, jnp.float32)
    y = fake_quantize(x, spec) @ fake_quantize(w.T, spec).T
    return float(jnp.sum(jnp.square(y - x @ w)))


def _site_error(node, site, amax, alpha, x, names, num_heads, num_kv_heads, path) -> float:
    """W8A8 output error of one site's consumers after migrating at ``alpha``: (x / s) @ (s W) is x @ W in
    float, so only the quantization error is measured."""
    new, s_in = _smooth_site(node, site, amax, alpha, num_heads, num_kv_heads, path)
    return sum(w8a8_output_error(x / s_in, new[n]["kernel"]) for n in names)


def search_alphas(
    params: Mapping[str, Any],
    act_absmax: Mapping[str, jax.Array],
    samples: Mapping[str, jax.Array],
    grid: Iterable[float] = ALPHA_GRID,
    *,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    sites: tuple[str, ...] = SITES,
) -> dict[str, float]:
    """A strength per site (:func:`site_key` -> alpha in ``grid``): the one whose smoothed consumers' W8A8
    output error (:func:`w8a8_output_error`) on the calibration ``samples`` is least, sites taken in
    :func:`smooth_params`'s order with the earlier choices applied. act_absmax: as for
    :func:`smooth_params`; samples: :func:`activation_samples` of the same float model. Feed the result to
    :func:`smooth_params`. A site whose consumers have no samples is left out (not smoothed)."""
    grid = tuple(check_alpha(a) for a in grid)
    if not grid:
        raise ValueError("search_alphas: an empty alpha grid")
    out = dict(params)
    chosen: dict[str, float] = {}
    for path, site in smoothing_sites(params, num_heads):
        if site not in sites:
            continue
        node = get_path(out, path) if path else out
        names = tuple(n for n in _consumers(site) if _dense(node, n))
        keys = [_join(path, n) for n in names]
        if not names or keys[0] not in samples or keys[0] not in act_absmax:
            continue
        x = jnp.asarray(samples[keys[0]], jnp.float32)  # the consumers of one site read the same input
        amax = jnp.asarray(act_absmax[keys[0]], jnp.float32)
        errors = [(_site_error(node, site, amax, a, x, names, num_heads, num_kv_heads, path), a) for a in grid]
        best = min(errors)[1]  # ties: the smaller alpha
        chosen[site_key(path, site)] = best
        new, _ = _smooth_site(node, site, amax, best, num_heads, num_kv_heads, path)
        out = dict(map_path(out, path, lambda _, new=new: new)) if path else new
    return chosen


def smooth(
    model: nn.Module,
    params: Mapping[str, Any],
    batches: Iterable[Any],
    alpha: float | str,
    *,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    sites: tuple[str, ...] = SITES,
    apply_kwargs: Mapping[str, Any] | None = None,
    sample_tokens: int = 1024,
    grid: Iterable[float] = ALPHA_GRID,
) -> tuple[dict, list[dict]]:
    """:func:`activation_absmax` over the calibration ``batches``, then :func:`smooth_params`. alpha: one
    strength in [0, 1], or "auto": a strength per site of ``grid`` from :func:`search_alphas` on
    ``sample_tokens`` calibration tokens."""
    batches = list(batches)
    if isinstance(alpha, str) and alpha != "auto":
        raise ValueError(f"smoothing alpha must be in [0, 1] or 'auto', got {alpha!r}")
    amax = activation_absmax(model, params, batches, apply_kwargs=apply_kwargs)
    kw = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, sites=sites)
    if alpha == "auto":
        samples = activation_samples(model, params, batches, sample_tokens, apply_kwargs=apply_kwargs)
        alpha = search_alphas(params, amax, samples, grid, **kw)
    return smooth_params(params, amax, alpha if isinstance(alpha, Mapping) else check_alpha(alpha), **kw)


def describe(report: list[dict]) -> str:
    """One line: the sites smoothed, their strengths and the median outlier ratio (max / median channel)
    before -> after."""
    if not report:
        return "smoothing: no site"
    before = np.median([r["act_max_ratio_before"] for r in report])
    after = np.median([r["act_max_ratio_after"] for r in report])
    alphas = sorted({r["alpha"] for r in report})
    strength = f"alpha {alphas[0]:g}" if len(alphas) == 1 else "alpha per site " + ", ".join(
        f"{a:g} x{sum(r['alpha'] == a for r in report)}" for a in alphas)
    return (f"smoothing: {len(report)} sites ({strength}), median activation max/median channel {before:.1f} -> "
            f"{after:.1f}")
