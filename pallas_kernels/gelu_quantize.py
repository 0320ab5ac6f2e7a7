"""GELU producers fused with INT8 quantization (Pallas GPU, Triton lowering): Jetfire's INT8 -> INT8 GELU.

``bias_gelu_quantize``: y = act(dequant(x) + bias) in fp32, quantized under ``spec`` (+ ``transposed_spec``).
``gelu_backward_quantize``: dx = g * GELU'(dequant(x) + bias), quantized (stochastic rounding by default, as
Jetfire quantizes gradients). Both reuse :func:`pallas_kernels.quantize.sweep`; inputs may be dense
float arrays or QArrays (symmetric INT8 whose non-whole tile sizes are powers of two), dequantized in
registers. Outputs that need whole rows and whole columns (per-row codes of y and of y.T: the int8-row
policy) first run a statistics pre-pass (:func:`pallas_kernels.quantize.axis_partials`) that computes y's
row and column absmax; the quantize pass then recomputes y, so no float y is ever written.

Exact GELU needs erf, and Pallas-Triton has no lowering rule for ``lax.erf_p`` (JAX 0.10.2: only
``erf_inv``), so the kernels use :func:`erf_rational` -- the rational fit Eigen and XLA use for f32 erf
(absolute error 3.3e-7, as accurate as ``lax.erf``), built from mul/add and one division. The jnp
references use ``lax.erf``; kernel and reference agree to about 1e-6 absolute (a few fp32 ulps of the
larger values; far below an INT8 code). ``activation="gelu_tanh"`` is the tanh approximation (``tanh``
lowers directly).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp

from jq8.quant import QArray, QuantSpec, Rounding, quantize
from pallas_kernels._common import resolve_interpret
from pallas_kernels.int8_matmul_triton import erf_rational
from pallas_kernels.quantize import (
    AXIS_STATS_CONFIG,
    Operand,
    OutSpec,
    QuantizeConfig,
    as_operand,
    as_seed,
    axis_partials,
    block_mask,
    launch,
    load_operand,
    load_seed,
    out_shapes,
    plan_blocks,
    plan_tile,
    producer_axis_stats,
    quantize_kernel,
    stat_tiles,
    sweep,
    x_tile,
)

Activation = Literal["gelu", "gelu_tanh"] | None
_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_C = math.sqrt(2.0 / math.pi)


# -------------------------------------------------------------------------------- GELU in fp32 (kernel-safe)


def _phi_cdf(x: jax.Array) -> jax.Array:
    """Standard normal CDF Phi(x) = (1 + erf(x / sqrt(2))) / 2."""
    return 0.5 + 0.5 * erf_rational(x * _SQRT_HALF)


def gelu_fp32(x: jax.Array, activation: Activation) -> jax.Array:
    """act(x) in fp32 with kernel-safe primitives: exact GELU x * Phi(x), its tanh form, or identity."""
    if activation is None:
        return x
    if activation == "gelu":
        return x * _phi_cdf(x)
    if activation == "gelu_tanh":
        return 0.5 * x * (1.0 + jnp.tanh(_TANH_C * (x + 0.044715 * x * x * x)))
    raise ValueError(f"activation must be 'gelu', 'gelu_tanh' or None, got {activation!r}")


def gelu_grad_fp32(x: jax.Array, activation: Activation) -> jax.Array:
    """d act / dx in fp32: Phi(x) + x * phi(x) for exact GELU, the tanh form's derivative, or 1."""
    if activation is None:
        return jnp.ones_like(x)
    if activation == "gelu":
        return _phi_cdf(x) + x * (_INV_SQRT_2PI * jnp.exp(-0.5 * x * x))
    if activation == "gelu_tanh":
        th = jnp.tanh(_TANH_C * (x + 0.044715 * x * x * x))
        return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * _TANH_C * (1.0 + 3 * 0.044715 * x * x)
    raise ValueError(f"activation must be 'gelu', 'gelu_tanh' or None, got {activation!r}")


# ------------------------------------------------------------------------------------------ operand loading


def _split_refs(ops, refs):
    out, i = [], 0
    for op in ops:
        out.append(refs[i:i + op.n_refs])
        i += op.n_refs
    return out, refs[i:]


def producer_config(tiles, m: int, n: int, config: QuantizeConfig | None):
    """(config, whole-axis tiles whose absmax the statistics pre-pass computes) for outputs of ``tiles``
    (x coordinates) on an (M, N) producer; config None picks the default for the case."""
    axis_tiles = stat_tiles(tiles, m, n, config or QuantizeConfig())
    return config or (AXIS_STATS_CONFIG if axis_tiles else QuantizeConfig()), axis_tiles


def _producer_load(ops, op_refs, *, mode, activation, plan, round_to=None):
    """load(r0, c0) -> the (bm, bn) fp32 block of the producer: act(x + bias) or g * act'(x + bias), rounded
    to ``round_to`` (a 16-bit float dtype, or None) and back."""

    def load(r0, c0):
        vals = [load_operand(op, r, r0, c0, plan) for op, r in zip(ops, op_refs)]
        x = vals[0]
        has_bias = len(ops) > 1 and ops[1].kind == "bias"
        if has_bias:
            x = x + vals[1]
        if mode == "forward":
            y = gelu_fp32(x, activation)
        else:
            y = vals[-1] * gelu_grad_fp32(x, activation)
        if round_to is not None:
            y = y.astype(round_to).astype(jnp.float32)
        return jnp.where(block_mask(r0, c0, plan), y, 0.0)

    return load


def _producer_kernel(seed_ref, *refs, ops, mode, activation, plan, outs, axis_tiles, rounding, interpret,
                     round_to):
    """mode "forward": act(x + bias); "backward": g * act'(x + bias). ops = (x, bias?, g?); then one absmax
    ref per ``axis_tiles`` entry (from the statistics pre-pass), then the outputs."""
    op_refs, rest = _split_refs(ops, refs)
    axis_amax = dict(zip(axis_tiles, rest[: len(axis_tiles)]))
    load = _producer_load(ops, op_refs, mode=mode, activation=activation, plan=plan, round_to=round_to)
    seed = load_seed(seed_ref, rounding)
    sweep(load, outs, rest[len(axis_tiles) :], plan, rounding=rounding, seed=seed, interpret=interpret,
          axis_amax=axis_amax)


def _producer_stats_kernel(*refs, ops, mode, activation, plan, axis_tiles, column_sum, round_to, materialize):
    """Partial absmax of y rounded to ``round_to`` (column sums of the fp32 y); with ``materialize`` the
    rounded y is written too (the last output)."""
    op_refs, outs = _split_refs(ops, refs)
    value_ref = outs[-1] if materialize else None
    partial_refs = outs[:-1] if materialize else outs
    load = _producer_load(ops, op_refs, mode=mode, activation=activation, plan=plan)
    sum_ref = partial_refs[-1] if column_sum else None
    axis_partials(load, axis_tiles, partial_refs[: len(axis_tiles)], plan, sum_ref, round_to=round_to,
                  value_ref=value_ref)


@functools.partial(
    jax.jit,
    static_argnames=("ops", "mode", "activation", "specs", "rounding", "config", "interpret", "poison",
                     "column_sum", "round_to"),
)
def _producer_call(seed, arrays, *, ops, mode, activation, specs, rounding, config, interpret, poison,
                   column_sum=False, round_to=None):
    """-> (output arrays, y's (N,) f32 column sums from the pre-pass, or None when no pre-pass ran).
    round_to: None, or the 16-bit float dtype y is rounded to before it is quantized."""
    m, n = arrays[0].shape  # ops[0] is x: dense (M, N) or QArray codes (M, N)
    outs = tuple(OutSpec(x_tile(s, m, n, t), t) for s, t in specs)
    # Whole long axes (per-row codes of y and of y.T: the int8-row policy) take their absmax from a
    # statistics pre-pass that recomputes y (cheap: elementwise) instead of few programs sweeping an axis.
    config, axis_tiles = producer_config([o.tile for o in outs], m, n, config)
    tiles = [plan_tile(o.tile, axis_tiles) for o in outs]
    plan = plan_blocks(m, n, tiles + [op.requirement for op in ops], config)
    common = dict(ops=ops, mode=mode, activation=activation, plan=plan, axis_tiles=axis_tiles)
    stats, sums = [], None
    materialize = bool(axis_tiles) and round_to is not None and config.materialize_producer
    if axis_tiles:
        stats_kernel = functools.partial(_producer_stats_kernel, column_sum=column_sum, round_to=round_to,
                                         materialize=materialize, **common)
        value = [jax.ShapeDtypeStruct((m, n), round_to)] if materialize else []
        # dx is written over a dense g of its dtype (each program reads its block before writing it): the
        # backward then holds no third (M, N) 16-bit array at its peak.
        g_dense = ops[-1].kind == "dense" and arrays[-1].dtype == round_to
        stats, sums, *value = producer_axis_stats(
            stats_kernel, arrays, axis_tiles, plan, config, interpret=interpret, name=f"gelu_absmax_{mode}",
            column_sum=column_sum, extra_outputs=value,
            extra_aliases={len(arrays) - 1: 0} if materialize and g_dense else None)
    if materialize:  # y itself came from the pre-pass: a plain quantize of it (the same codes, fewer bytes)
        kernel = functools.partial(quantize_kernel, plan=plan, outs=outs, axis_tiles=axis_tiles,
                                   rounding=rounding, interpret=interpret)
        operands = [seed, value[0], *stats]
    else:
        kernel = functools.partial(_producer_kernel, outs=outs, rounding=rounding, interpret=interpret,
                                   round_to=round_to, **common)
        operands = [seed, *arrays, *stats]
    outs = launch(kernel, operands, out_shapes(m, n, specs), plan, config, interpret=interpret, poison=poison,
                  name=f"gelu_quantize_{mode}")
    return outs, sums


def _round_to(g):
    """The backward's dx is rounded to the gradient's dtype when that is a 16-bit float (what an unfused
    GELU backward in that dtype would hold) before it is quantized; None for fp32."""
    dtype = jnp.dtype(g.dtype)
    return dtype if dtype.itemsize < 4 else None


def _run(x, bias, g, *, mode, activation, spec, transposed_spec, rounding, seed, interpret, config, poison,
         column_sum=False):
    if activation not in ("gelu", "gelu_tanh", None):
        raise ValueError(f"activation must be 'gelu', 'gelu_tanh' or None, got {activation!r}")
    if len(jnp.shape(x) if not isinstance(x, QArray) else x.shape) != 2:
        raise ValueError(f"x must be (M, N), got shape {x.shape}")
    m, n = x.shape if isinstance(x, QArray) else jnp.shape(x)
    op, arrays = as_operand(x, m, n)
    ops = [op]
    if bias is not None:
        bias = jnp.asarray(bias)
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape ({n},), got {bias.shape}")
        ops.append(Operand("bias"))
        arrays.append(bias)
    if g is not None:
        gop, garrs = as_operand(g, m, n)
        ops.append(gop)
        arrays += garrs
    specs = ((spec, False),) + (((transposed_spec, True),) if transposed_spec is not None else ())
    res, sums = _producer_call(
        as_seed(seed, rounding), arrays, ops=tuple(ops), mode=mode, activation=activation, specs=specs,
        rounding=rounding, config=config, interpret=resolve_interpret(interpret),
        poison=poison, column_sum=column_sum, round_to=_round_to(g) if mode == "backward" else None,
    )
    if column_sum and sums is None:  # no pre-pass read y: XLA computes it (exact fp32, as the references)
        sums = jnp.sum(_backward_value(g, x, bias, activation), axis=0)
    dtype = (g if g is not None else x).dtype
    out = (QArray(res[0], res[1], None, spec, (m, n), dtype),)
    if transposed_spec is not None:
        out += (QArray(res[2], res[3], None, transposed_spec, (n, m), dtype),)
    out += (sums,) if column_sum else ()
    return out[0] if len(out) == 1 else out


# ------------------------------------------------------------------------------------------------ public API


def bias_gelu_quantize(
    x: jax.Array | QArray,
    bias: jax.Array | None = None,
    *,
    spec: QuantSpec,
    activation: Activation = "gelu",
    transposed_spec: QuantSpec | None = None,
    rounding: Rounding = "nearest",
    seed: jax.Array | None = None,
    interpret: bool | None = None,
    config: QuantizeConfig | None = None,
    poison_outputs: bool = False,
) -> QArray | tuple[QArray, QArray]:
    """Quantized act(dequant(x) + bias), fp32 math.

    x: (M, N) float, or a QArray (M, N) symmetric INT8. bias: (N,) or None.
    activation: "gelu" (exact, erf), "gelu_tanh", or None (bias add + requantize only).
    config: blocks / warps; None: ``QuantizeConfig()``, or ``AXIS_STATS_CONFIG`` when the outputs need
    whole rows and whole columns (per-row codes of y and y.T), whose absmax a statistics pre-pass computes.
    Returns QArray (M, N) under spec, or (q, qT) with qT (N, M) under transposed_spec.
    """
    return _run(x, bias, None, mode="forward", activation=activation, spec=spec,
                transposed_spec=transposed_spec, rounding=rounding, seed=seed, interpret=interpret,
                config=config, poison=poison_outputs)


def gelu_backward_quantize(
    g: jax.Array | QArray,
    x: QArray | jax.Array,
    spec: QuantSpec,
    *,
    rounding: Rounding = "stochastic",
    seed: jax.Array | None = None,
    bias: jax.Array | None = None,
    activation: Activation = "gelu",
    transposed_spec: QuantSpec | None = None,
    interpret: bool | None = None,
    config: QuantizeConfig | None = None,
    poison_outputs: bool = False,
    column_sum: bool = False,
) -> QArray | tuple:
    """Quantized GELU backward: dx = g * act'(dequant(x) + bias), fp32 math (Jetfire's GELU backward),
    rounded to g's dtype when that is 16-bit (bf16 / f16) before it is quantized.

    g: (M, N) upstream gradient, float or QArray. x: (M, N) the GELU's (pre-bias) input, usually the QArray
    the forward kept. bias: (N,) or None. rounding: "stochastic" (needs seed = noise_seed(key)) or
    "nearest". config: as for :func:`bias_gelu_quantize`. column_sum: also return dx.sum(axis=0) (N,) f32
    (the fc1 bias gradient) of the unquantized fp32 dx, from the statistics pre-pass when it runs, else by
    XLA. When the pre-pass runs for a 16-bit g, it also writes the rounded dx, and the quantize pass reads
    that (``QuantizeConfig.materialize_producer``).
    Returns QArray (M, N) under spec, or (q, qT) with qT (N, M) under transposed_spec; the sums last.
    """
    return _run(x, bias, g, mode="backward", activation=activation, spec=spec,
                transposed_spec=transposed_spec, rounding=rounding, seed=seed, interpret=interpret,
                config=config, poison=poison_outputs, column_sum=column_sum)


# ------------------------------------------------------------------------------------------------ references


def _dense(a) -> jax.Array:
    return a.dequantize(jnp.float32) if isinstance(a, QArray) else jnp.asarray(a, jnp.float32)


def _act_reference(x: jax.Array, activation: Activation) -> jax.Array:
    if activation is None:
        return x
    return jax.nn.gelu(x, approximate=activation == "gelu_tanh")


def _quantize_reference(y, spec, transposed_spec, rounding, seed, dtype):
    q = dataclasses.replace(quantize(y, spec, rounding=rounding, seed=seed), dtype=dtype)
    if transposed_spec is None:
        return q
    return q, dataclasses.replace(quantize(y.T, transposed_spec, rounding=rounding, seed=seed), dtype=dtype)


def bias_gelu_quantize_reference(
    x, bias=None, *, spec, activation="gelu", transposed_spec=None, rounding="nearest", seed=None,
    interpret=None, config=None, poison_outputs=False,
):
    """Same contract as :func:`bias_gelu_quantize`: jnp fp32 (``lax.erf``) + jq8.quant.quantize."""
    del interpret, config, poison_outputs
    h = _dense(x) + (0.0 if bias is None else jnp.asarray(bias, jnp.float32))
    return _quantize_reference(_act_reference(h, activation), spec, transposed_spec, rounding, seed, x.dtype)


def _backward_value(g, x, bias, activation) -> jax.Array:
    """g * act'(x + bias) in fp32, the derivative by jax.jvp of jax.nn.gelu."""
    h = _dense(x) + (0.0 if bias is None else jnp.asarray(bias, jnp.float32))
    _, d = jax.jvp(lambda v: _act_reference(v, activation), (h,), (jnp.ones_like(h),))
    return _dense(g) * d


def gelu_backward_quantize_reference(
    g, x, spec, *, rounding="stochastic", seed=None, bias=None, activation="gelu", transposed_spec=None,
    interpret=None, config=None, poison_outputs=False, column_sum=False,
):
    """Same contract as :func:`gelu_backward_quantize`: the derivative by jax.jvp of jax.nn.gelu, rounded to
    g's dtype when that is 16-bit before it is quantized (the column sums stay of the fp32 value)."""
    del interpret, config, poison_outputs
    y = _backward_value(g, x, bias, activation)
    round_to = _round_to(g)
    yq = y if round_to is None else y.astype(round_to).astype(jnp.float32)
    q = _quantize_reference(yq, spec, transposed_spec, rounding, seed, g.dtype)
    if not column_sum:
        return q
    return (*(q if isinstance(q, tuple) else (q,)), jnp.sum(y, axis=0))
