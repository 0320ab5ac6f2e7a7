"""LayerNorm / RMSNorm fused with INT8 quantization of its output (one Pallas GPU kernel, Triton lowering).

The normalized activations never reach memory in floating point: each program owns ``bm`` whole rows,
computes full-row statistics in fp32 (biased variance, epsilon inside the rsqrt -- the two defects of
Jetfire's reference LayerNorm avoided), normalizes, applies gamma / beta, and quantizes under ``spec``
(per-row for ZeroQuant, 32x32 blocks for Jetfire) and optionally ``transposed_spec`` -- the same
:func:`pallas_kernels.quantize.sweep` as ``quantize_tiles``. Rows that fit the register budget are loaded
once; longer rows are swept in column chunks (one statistics pass merging per-chunk mean / centred sum of
squares, then the quantize pass(es)).
Returns ``mean`` and ``rstd`` (M,) fp32 for the backward.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jq8.quant import QArray, QuantSpec, quantize
from pallas_kernels._common import resolve_interpret
from pallas_kernels.quantize import (
    BlockPlan,
    OutSpec,
    QuantizeConfig,
    block_mask,
    launch,
    out_shapes,
    plan_blocks,
    sweep,
    x_tile,
)


def _row_stats(load_x, plan: BlockPlan, r0, *, eps: float, rms: bool):
    """(mean, rstd) of this program's bm rows, each (bm, 1) fp32, from masked loads (0 outside)."""
    n = plan.n
    if plan.loop_axis is None:
        x, mask = load_x(r0, 0)
        mean = jnp.zeros((plan.bm, 1), jnp.float32) if rms else jnp.sum(x, axis=1, keepdims=True) / n
        xc = jnp.where(mask, x - mean, 0.0)
        var = jnp.sum(xc * xc, axis=1, keepdims=True) / n
        return mean, lax.rsqrt(var + eps), x

    # One pass over the column chunks: per-chunk mean and centred sum of squares, merged with Chan et al.'s
    # parallel update (as stable as two passes, and x is read once less).
    def body(k, carry):
        count, mean, m2 = carry
        x, mask = load_x(r0, k * plan.bn)
        cnt = jnp.minimum(plan.bn, n - k * plan.bn).astype(jnp.float32)
        if rms:
            return count + cnt, mean, m2 + jnp.sum(x * x, axis=1, keepdims=True)
        cmean = jnp.sum(x, axis=1, keepdims=True) / cnt
        cm2 = jnp.sum(jnp.square(jnp.where(mask, x - cmean, 0.0)), axis=1, keepdims=True)
        total = count + cnt
        delta = cmean - mean
        return total, mean + delta * (cnt / total), m2 + cm2 + delta * delta * (count * cnt / total)

    zeros = jnp.zeros((plan.bm, 1), jnp.float32)
    _, mean, m2 = lax.fori_loop(0, plan.num_chunks, body, (jnp.float32(0.0), zeros, zeros))
    return mean, lax.rsqrt(m2 / n + eps), None


def _norm_kernel(x_ref, gamma_ref, beta_ref, *refs, plan, outs, eps, rms, interpret):
    *out_refs, mean_ref, rstd_ref = refs
    r0 = pl.program_id(0) * plan.bm

    def load_x(r0, c0):
        mask = block_mask(r0, c0, plan)
        x = plgpu.load(x_ref.at[pl.ds(r0, plan.bm), pl.ds(c0, plan.bn)], mask=mask, other=0.0)
        return x.astype(jnp.float32), mask

    mean, rstd, x_once = _row_stats(load_x, plan, r0, eps=eps, rms=rms)

    def load(r0, c0):
        mask = block_mask(r0, c0, plan)
        x = x_once if x_once is not None else load_x(r0, c0)[0]
        cmask = c0 + jnp.arange(plan.bn, dtype=jnp.int32) < plan.n
        y = (x - mean) * rstd
        if gamma_ref is not None:
            y = y * plgpu.load(gamma_ref.at[pl.ds(c0, plan.bn)], mask=cmask, other=0.0).astype(jnp.float32)
        if beta_ref is not None:
            y = y + plgpu.load(beta_ref.at[pl.ds(c0, plan.bn)], mask=cmask, other=0.0).astype(jnp.float32)
        return jnp.where(mask, y, 0.0)  # padding must be 0: it enters the tiles' absmax

    sweep(load, outs, out_refs, plan, rounding="nearest", seed=None, interpret=interpret)
    rows = r0 + jnp.arange(plan.bm, dtype=jnp.int32)
    plgpu.store(mean_ref.at[pl.ds(r0, plan.bm)], mean[:, 0], mask=rows < plan.m)
    plgpu.store(rstd_ref.at[pl.ds(r0, plan.bm)], rstd[:, 0], mask=rows < plan.m)


@functools.partial(jax.jit, static_argnames=("eps", "rms", "specs", "config", "interpret", "poison"))
def _norm_call(x, gamma, beta, *, eps, rms, specs, config, interpret, poison=False):
    m, n = x.shape
    outs = tuple(OutSpec(x_tile(s, m, n, t), t) for s, t in specs)
    # (1, -1): the row statistics need whole rows in one program, like a per-row tile.
    plan = plan_blocks(m, n, [o.tile for o in outs] + [(1, -1)], config)
    if plan.loop_axis == 0:
        raise ValueError(f"specs {specs} need whole columns of a ({m}, {n}) LayerNorm output in one program")
    shapes = out_shapes(m, n, specs) + [jax.ShapeDtypeStruct((m,), jnp.float32)] * 2
    operands = [x] + [a for a in (gamma, beta) if a is not None]

    def kernel(x_ref, *refs):
        g_ref = refs[0] if gamma is not None else None
        b_ref = refs[int(gamma is not None)] if beta is not None else None
        rest = refs[int(gamma is not None) + int(beta is not None):]
        _norm_kernel(x_ref, g_ref, b_ref, *rest, plan=plan, outs=outs, eps=eps, rms=rms, interpret=interpret)

    return launch(kernel, operands, shapes, plan, config, interpret=interpret, poison=poison,
                  name="layer_norm_quantize")


def layer_norm_quantize(
    x: jax.Array,
    gamma: jax.Array | None,
    beta: jax.Array | None,
    *,
    eps: float = 1e-5,
    rms: bool = False,
    spec: QuantSpec,
    transposed_spec: QuantSpec | None = None,
    interpret: bool | None = None,
    config: QuantizeConfig | None = None,
    poison_outputs: bool = False,
):
    """Quantized LayerNorm (or RMSNorm) of x, round-to-nearest.

    x: (M, N) f32 / bf16. gamma, beta: (N,) or None. rms: RMSNorm (no centering; mean returned as 0).
    y = (x - mean) * rstd * gamma + beta in fp32, rstd = rsqrt(var + eps), var biased (over N).
    Returns (q, mean, rstd) or, with transposed_spec, (q, qT, mean, rstd): q quantizes y (M, N) under
    spec, qT quantizes y.T (N, M) under transposed_spec; mean, rstd: (M,) f32.
    """
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"layer_norm_quantize expects x of shape (M, N), got {x.shape}")
    m, n = x.shape
    for name, p in (("gamma", gamma), ("beta", beta)):
        if p is not None and jnp.shape(p) != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {jnp.shape(p)}")
    specs = ((spec, False),) + (((transposed_spec, True),) if transposed_spec is not None else ())
    arrays = _norm_call(
        x, gamma, beta, eps=float(eps), rms=bool(rms), specs=specs, config=config or QuantizeConfig(),
        interpret=resolve_interpret(interpret), poison=poison_outputs,
    )
    q = QArray(arrays[0], arrays[1], None, spec, (m, n), x.dtype)
    mean, rstd = arrays[-2], arrays[-1]
    if transposed_spec is None:
        return q, mean, rstd
    return q, QArray(arrays[2], arrays[3], None, transposed_spec, (n, m), x.dtype), mean, rstd


def layer_norm_quantize_reference(
    x: jax.Array,
    gamma: jax.Array | None,
    beta: jax.Array | None,
    *,
    eps: float = 1e-5,
    rms: bool = False,
    spec: QuantSpec,
    transposed_spec: QuantSpec | None = None,
    interpret: bool | None = None,
    config: QuantizeConfig | None = None,
    poison_outputs: bool = False,
):
    """Same contract as :func:`layer_norm_quantize`, in jnp fp32 + jq8.quant.quantize."""
    del interpret, config, poison_outputs
    xf = jnp.asarray(x, jnp.float32)
    mean = jnp.zeros(xf.shape[:1], jnp.float32) if rms else jnp.mean(xf, axis=1)
    var = jnp.mean(jnp.square(xf - mean[:, None]), axis=1)
    rstd = lax.rsqrt(var + eps)
    y = (xf - mean[:, None]) * rstd[:, None]
    if gamma is not None:
        y = y * jnp.asarray(gamma, jnp.float32)
    if beta is not None:
        y = y + jnp.asarray(beta, jnp.float32)
    q = dataclasses.replace(quantize(y, spec), dtype=x.dtype)
    if transposed_spec is None:
        return q, mean, rstd
    qt = dataclasses.replace(quantize(y.T, transposed_spec), dtype=x.dtype)
    return q, qt, mean, rstd
