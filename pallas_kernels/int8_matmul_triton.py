"""W8A8 INT8 GEMM (NT layout) with a fused dequantize / bias / activation / residual / requantize epilogue.

    out = act(a @ b.T * a_scale * b_scale + bias) + residual

a: (M, K) int8 and b: (N, K) int8 are both K-contiguous ("NT": the layout the H100 INT8 tensor cores
want, see BENCHMARKS.md); b may also be INT4 packed two codes per byte in the half-split
layout of :func:`jq8.quant.pack_int4`, whose two nibble planes meet two contiguous halves of the
activation tile (:func:`int4_pair_dot`: no interleave in the kernel). The product accumulates in
int32 over a ``fori_loop`` on K; scales that are constant along K (per-row activations, per-column weights)
apply once in the epilogue. Scales that vary along K live in :mod:`pallas_kernels.int8_matmul_block_scaled`,
which reuses the loaders and the epilogue defined here.

Ragged M, N, K are handled with masked loads (K tail zero-filled) and masked stores; no padding copies.
Programs are ordered in groups of ``group_m`` rows of tiles so that neighbouring programs share B tiles in L2.
Decode sizes (M <= 16) go to :mod:`pallas_kernels.int8_matmul_decode` (narrow N tiles, split-K).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jq8.quant import (
    QArray,
    QuantSpec,
    check_int32_k,
    int4_block,
    int4_width,
    quantize,
    round_half_away,
    unpack_int4,
)
from pallas_kernels import autotune
from pallas_kernels._common import TileConfig, cdiv, compiler_params, is_pow2, next_pow2, resolve_interpret
from pallas_kernels.quantize import div_rn, expand_tile, scale_from_absmax, tile_absmax, to_codes

Activation = Literal["gelu", "gelu_tanh", "relu"] | None
NT_DIMS = (((1,), (1,)), ((), ()))  # contract the last axis of both operands
ACTIVATIONS = (None, "gelu", "gelu_tanh", "relu")
MAX_PER_ROW_BLOCK_N = 1024  # per-row requantization keeps a whole output row in one tile


# ------------------------------------------------------------------------------------------- reference


def int8_matmul_reference(
    a: jax.Array,
    b: jax.Array,
    a_scale: jax.Array | None = None,
    b_scale: jax.Array | None = None,
    *,
    bias: jax.Array | None = None,
    activation: Activation = None,
    residual: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
    out_spec: QuantSpec | None = None,
    b_bits: int = 8,
    config: TileConfig | None = None,
    interpret: bool | None = None,
) -> jax.Array | QArray:
    """Plain-XLA definition of :func:`int8_matmul` (same signature; ``config``/``interpret`` are ignored)."""
    del config, interpret
    m, k = a.shape
    bv = unpack_int4(b, k) if b_bits == 4 else b
    acc = lax.dot_general(a, bv, NT_DIMS, preferred_element_type=jnp.int32)
    if a_scale is None and b_scale is None:
        _check_raw_output(bias, activation, residual, out_spec)
        return acc
    y = acc.astype(jnp.float32)
    if a_scale is not None:
        y = y * jnp.asarray(a_scale, jnp.float32).reshape(m, 1)
    if b_scale is not None:
        y = y * jnp.asarray(b_scale, jnp.float32).reshape(1, -1)
    return epilogue_reference(
        y, bias=bias, activation=activation, residual=residual, out_dtype=out_dtype, out_spec=out_spec
    )


def epilogue_reference(
    y: jax.Array, *, bias, activation, residual, out_dtype, out_spec
) -> jax.Array | QArray:
    """y: (M, N) f32 dequantized product -> act(y + bias) + residual, cast or requantized."""
    if bias is not None:
        y = y + jnp.asarray(bias, jnp.float32)[None, :]
    y = activation_fn(y, activation, erf="exact")
    if residual is not None:
        y = y + jnp.asarray(residual, jnp.float32)
    if out_spec is None:
        return y.astype(out_dtype)
    return dataclasses.replace(quantize(y, out_spec), dtype=jnp.dtype(out_dtype))


# ------------------------------------------------------------------------------------- shared pieces


def erf_approx(x: jax.Array) -> jax.Array:
    """erf for f32 inside Triton kernels (which have no erf primitive): Abramowitz & Stegun 7.1.26.

    Max absolute error 1.5e-7 in exact arithmetic, under 1e-6 evaluated in f32 (a few ulp near 1), so GELU
    built on it matches the exact-erf GELU far below bf16 resolution.
    """
    ax = jnp.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * ax)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    r = 1.0 - poly * jnp.exp(-ax * ax)
    return jnp.where(x < 0, -r, r)


# Eigen's (and XLA's) float erf: a rational minimax fit x P(x^2) / Q(x^2) on [-4, 4] (erf(4) rounds to 1 in
# f32). No exp: the producers that use it are bound by arithmetic (BENCHMARKS.md).
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)


def erf_rational(x: jax.Array, *, rsqrt_reciprocal: bool = False) -> jax.Array:
    """erf(x) in fp32 from mul/add and one division (max absolute error 3.3e-7, as ``lax.erf``'s 3.1e-7).

    ``rsqrt_reciprocal``: 1 / Q as -rsqrt(-Q)^2 (Q < 0 on the whole range) instead of a division. Mosaic GPU
    lowers a float division to IEEE ``div.rn.f32``, a dozen instructions; under its ``approx_math`` the
    rsqrt is one ``rsqrt.approx.f32`` (relative error 2^-22.9, so erf stays within about 5e-7).
    """
    x = jnp.clip(x, -4.0, 4.0)
    x2 = x * x
    p = x2 * _ERF_P[0] + _ERF_P[1]
    for c in _ERF_P[2:]:
        p = p * x2 + c
    q = x2 * _ERF_Q[0] + _ERF_Q[1]
    for c in _ERF_Q[2:]:
        q = q * x2 + c
    if rsqrt_reciprocal:
        r = lax.rsqrt(-q)
        return -(x * p) * (r * r)
    return x * p / q


ERF_IMPLS = ("exact", "approx", "rational_rsqrt", "tanh")


def activation_fn(y: jax.Array, activation: Activation, *, erf: str = "approx") -> jax.Array:
    """The epilogue activations on f32: exact-erf GELU, tanh GELU, ReLU, or identity.

    ``erf`` (exact GELU only): "exact" is ``lax.erf`` (jnp references), "approx" :func:`erf_approx` (one exp,
    one division), "rational_rsqrt" :func:`erf_rational` with no exp and no division (Mosaic GPU's
    ``approx_math`` epilogues), "tanh" GELU's tanh form instead (within 5e-4 of exact GELU; one
    ``tanh.approx.f32`` under ``approx_math``).
    """
    if activation is None:
        return y
    if activation == "gelu":
        if erf == "exact":
            return jax.nn.gelu(y, approximate=False)
        if erf == "rational_rsqrt":
            return y * (0.5 + 0.5 * erf_rational(y * 0.7071067811865476, rsqrt_reciprocal=True))
        if erf == "tanh":
            return activation_fn(y, "gelu_tanh")
        if erf != "approx":
            raise ValueError(f"erf must be one of {ERF_IMPLS}, got {erf!r}")
        return 0.5 * y * (1.0 + erf_approx(y * 0.7071067811865476))
    if activation == "gelu_tanh":
        return 0.5 * y * (1.0 + jnp.tanh(0.7978845608028654 * (y + 0.044715 * y * y * y)))
    if activation == "relu":
        return jnp.maximum(y, 0.0)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _check_raw_output(bias, activation, residual, out_spec) -> None:
    if bias is not None or activation is not None or residual is not None or out_spec is not None:
        raise ValueError(
            "bias/activation/residual/out_spec need a dequantized output: pass a_scale and/or b_scale "
            "(with both scales None the kernel returns the raw int32 product)."
        )


def grouped_program_ids(pid: jax.Array, num_m: int, num_n: int, group_m: int) -> tuple[jax.Array, jax.Array]:
    """1-D program id -> (tile row, tile column), walking ``group_m`` tile rows per column (L2 reuse of B)."""
    width = group_m * num_n
    group = pid // width
    first_m = group * group_m
    size_m = jnp.minimum(num_m - first_m, group_m)
    local = pid % width
    return first_m + local % size_m, local // size_m


def load_k_tile(ref, start, size: int, k0, bk: int, *, row_mask, k_valid: int | None):
    """Rows [start, start + size) x columns [k0, k0 + bk) of an (R, K) int8 (or uint8) ref as (size, bk).

    ``row_mask`` (size,) bool or None; ``k_valid``: K when this tile may cross the end of K (the tail is
    zero-filled), else None.
    """
    mask = None if row_mask is None else row_mask[:, None]
    if k_valid is not None:
        kmask = (k0 + jnp.arange(bk))[None, :] < k_valid
        mask = kmask if mask is None else (mask & kmask)
    view = ref.at[pl.ds(start, size), pl.ds(k0, bk)]
    return view[...] if mask is None else plgpu.load(view, mask=mask, other=0)


def div_pow2(x, d: int):
    """x // d for a non-negative traced int and a power of two d, as a shift. (Pallas' Triton lowering
    of ``//`` / ``%`` on traced ints can build an i1 constant and fail: seen on JAX 0.10-0.11.)"""
    if d & (d - 1):
        raise ValueError(f"div_pow2 needs a power of two, got {d}")
    return x if d == 1 else lax.shift_right_logical(x, jnp.int32(d.bit_length() - 1))


def int4_pair_dot(
    a_ref, b_ref, a_start, bm: int, b_start, bn: int, c0, w: int, block: int, *, a_rows, b_rows, load_a=None
):
    """Products of the packed INT4 byte columns [c0, c0 + w) of b with the activations they multiply.

    b_ref: (N, K/2) uint8 in the half-split layout of :func:`jq8.quant.pack_int4` with ``block``-column
    blocks; w divides block / 2, so the bytes lie in one block and hold K columns [k_lo, k_lo + w) (low
    nibbles) and [k_lo + block/2, ... + w) (high nibbles): two contiguous activation tiles, no interleave.
    a_ref: (M, K) int8 with K padded to whole blocks (or ``load_a(k0, w) -> (bm, w) int8``, which then
    produces the activation codes, e.g. quantizing float rows on the fly). Returns (lo, hi), (bm, bn) int32
    each: the products
    of the two nibble planes, *16 times* the true values, because the nibbles are used in place
    (``b << 4`` and ``b & 0xF0`` read as int8 are exactly 16 x the signed codes; no shift back per element).
    """
    half = block // 2
    k_lo = pl.multiple_of(div_pow2(c0, half) * block + lax.bitwise_and(c0, half - 1), w)
    packed = load_k_tile(b_ref, b_start, bn, pl.multiple_of(c0, w), w, row_mask=b_rows, k_valid=None)
    s = lax.bitcast_convert_type(packed, jnp.int8)
    lo16 = lax.shift_left(s, jnp.int8(4))
    hi16 = lax.bitwise_and(s, jnp.int8(-16))
    if load_a is None:
        load_a = lambda k0, width: load_k_tile(a_ref, a_start, bm, k0, width, row_mask=a_rows, k_valid=None)  # noqa: E731
    a_lo, a_hi = load_a(k_lo, w), load_a(k_lo + half, w)
    return int_dot(a_lo, lo16), int_dot(a_hi, hi16)


def pad_to_int4_blocks(a: jax.Array, k: int) -> jax.Array:
    """a (M, K) padded with zero columns to the whole 64-column blocks an INT4 b is packed in."""
    kp = 2 * int4_width(k)
    return a if kp == a.shape[1] else jnp.pad(a, ((0, 0), (0, kp - a.shape[1])))


def int_dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """(bm, bk) int8 x (bn, bk) int8 -> (bm, bn) int32 on the INT8 tensor cores."""
    return lax.dot_general(a, b, NT_DIMS, preferred_element_type=jnp.int32)


@dataclasses.dataclass(frozen=True)
class Epilogue:
    """Static description of the epilogue (hashable; part of the kernel's static arguments)."""

    has_bias: bool = False
    activation: Activation = None
    has_residual: bool = False
    out_dtype: str = "bfloat16"
    requant: str | None = None  # None, "row" (whole row per tile) or "blocks"
    q_tile: tuple[int, int] = (1, 1)
    interpret: bool = False  # picks the exact division of the requantization (inline PTX on the GPU)
    parts: int = 1  # the (M, N) output as this many (M, N / parts) arrays (int8_matmul's split_cols)

    @property
    def num_inputs(self) -> int:
        return int(self.has_bias) + int(self.has_residual)


def make_epilogue(
    m: int,
    n: int,
    cfg: TileConfig,
    *,
    bias,
    activation,
    residual,
    out_dtype,
    out_spec: QuantSpec | None,
    interpret: bool,
    split_cols: int | None = None,
) -> Epilogue:
    """Validates the epilogue arguments against the problem and the tile configuration."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape (N,) = ({n},), got {bias.shape}")
    if residual is not None and residual.shape != (m, n):
        raise ValueError(f"residual must have shape (M, N) = ({m}, {n}), got {residual.shape}")
    requant, q_tile = None, (1, 1)
    if out_spec is not None:
        if out_spec.bits != 8 or not out_spec.symmetric:
            raise NotImplementedError(f"fused requantization supports symmetric INT8 only, got {out_spec}")
        tm, tn = out_spec.resolve(m, n)
        if tm == 1 and tn == n and out_spec.tile[1] == -1:
            if cfg.block_n < n:
                raise ValueError(
                    f"per-row requantization needs a whole output row in one tile: block_n={cfg.block_n} < "
                    f"N={n}; use block_n >= {next_pow2(n)} (config=None picks it), or quantize the output "
                    "separately."
                )
            requant, q_tile = "row", (1, n)
        elif is_pow2(tm) and is_pow2(tn) and cfg.block_m % tm == 0 and cfg.block_n % tn == 0:
            requant, q_tile = "blocks", (tm, tn)
        else:
            raise NotImplementedError(
                f"fused requantization supports per-row (1, -1) or power-of-two blocks dividing the tile "
                f"({cfg.block_m}x{cfg.block_n}); got tile {out_spec.tile} for a {m}x{n} output."
            )
    parts = 1
    if split_cols is not None:  # int8_matmul checked the rest (float output, split_cols divides N)
        if split_cols % cfg.block_n:
            raise ValueError(
                f"split_cols={split_cols} must be a multiple of block_n={cfg.block_n} (config=None picks a "
                "block_n that divides it)"
            )
        parts = n // split_cols
    return Epilogue(
        bias is not None,
        activation,
        residual is not None,
        jnp.dtype(out_dtype).name,
        requant,
        q_tile,
        interpret,
        parts,
    )


def epilogue_inputs(bias, residual) -> list[jax.Array]:
    out = []
    if bias is not None:
        out.append(jnp.asarray(bias, jnp.float32))
    if residual is not None:
        out.append(residual)
    return out


def epilogue_out_shapes(m: int, n: int, epi: Epilogue):
    if epi.parts > 1:
        return tuple(
            jax.ShapeDtypeStruct((m, n // epi.parts), jnp.dtype(epi.out_dtype)) for _ in range(epi.parts)
        )
    if epi.requant is None:
        return jax.ShapeDtypeStruct((m, n), jnp.dtype(epi.out_dtype))
    tm, tn = epi.q_tile
    scale_shape = (m,) if epi.requant == "row" else (cdiv(m, tm), cdiv(n, tn))
    return (jax.ShapeDtypeStruct((m, n), jnp.int8), jax.ShapeDtypeStruct(scale_shape, jnp.float32))


def wrap_output(out, m: int, n: int, epi: Epilogue, out_spec: QuantSpec | None):
    if epi.requant is None:
        return out
    codes, scale = out
    if epi.requant == "row":
        scale = scale.reshape(m, 1)
    return QArray(codes, scale, None, out_spec, (m, n), jnp.dtype(epi.out_dtype))


def store_epilogue(
    y,
    epi_refs,
    out_refs,
    *,
    epi: Epilogue,
    row0,
    col0,
    bm: int,
    bn: int,
    m: int,
    n: int,
    ragged_n: bool | None = None,
):
    """y: (bm, bn) f32 dequantized tile at (row0, col0) -> bias, activation, residual, cast or requantize,
    masked store. ``ragged_n``: whether columns may lie past N (default: N % bn != 0)."""
    rows = row0 + jnp.arange(bm)
    cols = col0 + jnp.arange(bn)
    row_ok = rows < m if m % bm else None
    col_ok = cols < n if (n % bn if ragged_n is None else ragged_n) else None
    mask = _and_masks(
        None if row_ok is None else row_ok[:, None], None if col_ok is None else col_ok[None, :]
    )
    it = iter(epi_refs)
    if epi.has_bias:
        bias_view = next(it).at[pl.ds(col0, bn)]
        bias = bias_view[...] if col_ok is None else plgpu.load(bias_view, mask=col_ok, other=0.0)
        y = y + bias[None, :]
    y = activation_fn(y, epi.activation)
    if epi.has_residual:
        res_view = next(it).at[pl.ds(row0, bm), pl.ds(col0, bn)]
        res = res_view[...] if mask is None else plgpu.load(res_view, mask=mask, other=0)
        y = y + res.astype(jnp.float32)
    if epi.parts > 1:  # the tile lies inside one part (block_n divides its width): store it there
        width = n // epi.parts
        for j, ref in enumerate(out_refs):

            @pl.when(col0 // width == j)
            def _(ref=ref, j=j):
                view = ref.at[pl.ds(row0, bm), pl.ds(col0 - j * width, bn)]
                _store(view, y.astype(jnp.dtype(epi.out_dtype)), mask)

        return
    if epi.requant is None:
        _store(out_refs[0].at[pl.ds(row0, bm), pl.ds(col0, bn)], y.astype(jnp.dtype(epi.out_dtype)), mask)
        return
    q_ref, s_ref = out_refs
    if mask is not None:  # padding must not raise a tile's absmax
        y = jnp.where(mask, y, 0.0)
    # The quantize kernels' building blocks: jq8.quant's numerics (NaN-propagating absmax, scale =
    # absmax * (1/127), correctly rounded per-tile reciprocal, round half away from zero).
    rt, ct = (1, bn) if epi.requant == "row" else epi.q_tile
    scale = scale_from_absmax(tile_absmax(jnp.abs(y), rt, ct))  # (bm / rt, bn / ct)
    inv = div_rn(jnp.ones_like(scale), scale, epi.interpret)
    codes = to_codes(round_half_away(y * expand_tile(inv, rt, ct, bm, bn)))
    if epi.requant == "row":
        _store(s_ref.at[pl.ds(row0, bm)], scale.reshape(bm), row_ok)
    else:
        gm, gn = bm // rt, bn // ct
        s_rows, s_cols = row0 // rt + jnp.arange(gm), col0 // ct + jnp.arange(gn)
        s_mask = _and_masks(
            (s_rows < cdiv(m, rt))[:, None] if m % bm else None,
            (s_cols < cdiv(n, ct))[None, :] if col_ok is not None else None,
        )
        _store(s_ref.at[pl.ds(row0 // rt, gm), pl.ds(col0 // ct, gn)], scale, s_mask)
    _store(q_ref.at[pl.ds(row0, bm), pl.ds(col0, bn)], codes, mask)


def _and_masks(a, b):
    if a is None:
        return b
    return a if b is None else (a & b)


def _store(view, value, mask) -> None:
    if mask is None:
        view[...] = value
    else:
        plgpu.store(view, value, mask=mask)


def load_vector(ref, start, size: int, limit: int | None):
    """(size,) f32 slice of a 1-D ref; ``limit`` masks entries >= limit (ragged edge), None = in bounds."""
    view = ref.at[pl.ds(start, size)]
    if limit is None:
        return view[...]
    return plgpu.load(view, mask=(start + jnp.arange(size)) < limit, other=0.0)


# ------------------------------------------------------------------------------------------------ kernel


@dataclasses.dataclass(frozen=True)
class _Problem:
    m: int
    n: int
    k: int
    b_bits: int
    scaled_a: bool
    scaled_b: bool
    block: int = 0  # INT4: half-split block width (jq8.quant.int4_block of the unpadded K)
    w: int = 0  # INT4: packed bytes per step


def _w8a8_kernel(*refs, p: _Problem, cfg: TileConfig, epi: Epilogue):
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    num_m, num_n = cdiv(p.m, bm), cdiv(p.n, bn)
    a_ref, b_ref, *rest = refs
    sa_ref = rest.pop(0) if p.scaled_a else None
    sb_ref = rest.pop(0) if p.scaled_b else None
    epi_refs, out_refs = rest[: epi.num_inputs], rest[epi.num_inputs :]

    pid_m, pid_n = grouped_program_ids(pl.program_id(0), num_m, num_n, cfg.group_m)
    row0 = pl.multiple_of(pid_m * bm, bm)
    col0 = pl.multiple_of(pid_n * bn, bn)
    a_rows = (row0 + jnp.arange(bm)) < p.m if p.m % bm else None
    b_rows = (col0 + jnp.arange(bn)) < p.n if p.n % bn else None

    def step(k0, acc, k_valid):
        a = load_k_tile(a_ref, row0, bm, k0, bk, row_mask=a_rows, k_valid=k_valid)
        b = load_k_tile(b_ref, col0, bn, k0, bk, row_mask=b_rows, k_valid=k_valid)
        return acc + int_dot(a, b)

    def step4(c0, acc):  # INT4: w packed bytes = 2w K columns (a is padded to whole blocks)
        lo, hi = int4_pair_dot(
            a_ref, b_ref, row0, bm, col0, bn, c0, p.w, p.block, a_rows=a_rows, b_rows=b_rows
        )
        return acc + lax.shift_right_arithmetic(lo + hi, jnp.int32(4))  # exact: both are 16x

    acc = jnp.zeros((bm, bn), jnp.int32)
    if p.b_bits == 4:
        acc = lax.fori_loop(0, p.k // (2 * p.w), lambda i, c: step4(i * p.w, c), acc)
    else:
        acc = lax.fori_loop(0, p.k // bk, lambda i, c: step(pl.multiple_of(i * bk, bk), c, None), acc)
        if p.k % bk:  # K tail: one masked step, zero-filled past K
            acc = step(jnp.int32((p.k // bk) * bk), acc, p.k)  # traced start: the slice crosses the end of K

    if not (p.scaled_a or p.scaled_b):  # raw int32 product
        mask = _and_masks(
            None if a_rows is None else a_rows[:, None], None if b_rows is None else b_rows[None, :]
        )
        _store(out_refs[0].at[pl.ds(row0, bm), pl.ds(col0, bn)], acc, mask)
        return
    y = acc.astype(jnp.float32)
    if p.scaled_a:
        y = y * load_vector(sa_ref, row0, bm, p.m if p.m % bm else None)[:, None]
    if p.scaled_b:
        y = y * load_vector(sb_ref, col0, bn, p.n if p.n % bn else None)[None, :]
    store_epilogue(y, epi_refs, out_refs, epi=epi, row0=row0, col0=col0, bm=bm, bn=bn, m=p.m, n=p.n)


def check_operands(a, b, a_scale, b_scale, *, b_bits: int, out_spec, split_cols) -> bool:
    """Validates a W8A8 GEMM's operands (every backend's contract); returns whether the output is the raw
    int32 product (both scales None)."""
    m, k = a.shape
    n = b.shape[0]
    if a.dtype != jnp.int8:
        raise TypeError(f"a must be int8, got {a.dtype}")
    if b_bits == 8:
        if b.dtype != jnp.int8 or b.shape[1] != k:
            raise ValueError(f"b must be (N, K={k}) int8, got {b.shape} {b.dtype}")
    elif b_bits == 4:
        if b.dtype != jnp.uint8 or b.shape[1] != int4_width(k):
            raise ValueError(
                f"b_bits=4 needs b packed by jq8.quant.pack_int4 as (N, {int4_width(k)}) uint8, got "
                f"{b.shape} {b.dtype}"
            )
    else:
        raise ValueError(f"b_bits must be 8 or 4, got {b_bits}")
    check_int32_k(k)
    raw = a_scale is None and b_scale is None
    if split_cols is not None and (raw or out_spec is not None or split_cols <= 0 or n % split_cols):
        raise ValueError(
            f"split_cols={split_cols} needs a float output (scales given, no out_spec) and must divide N={n}"
        )
    return raw


def resolve_config(
    kernel: str, m: int, n: int, k: int, key: str, config: TileConfig | None, out_spec: QuantSpec | None
) -> TileConfig:
    """The explicit config, else the autotuned/heuristic one (made wide enough for per-row requantization)."""
    if config is not None:
        cfg = config
    else:
        cfg = autotune.lookup_config(kernel, m, n, k, key)
        if out_spec is not None and out_spec.tile[0] == 1 and out_spec.tile[1] == -1:
            bn = next_pow2(n)
            if bn > MAX_PER_ROW_BLOCK_N:
                raise ValueError(
                    f"per-row requantization in the GEMM epilogue supports N <= {MAX_PER_ROW_BLOCK_N} "
                    f"(got N={n}); quantize the output with pallas_kernels.quantize instead."
                )
            bm = max(16, min(64, 16384 // bn))
            cfg = dataclasses.replace(cfg, block_m=bm, block_n=bn, block_k=min(cfg.block_k, 64), num_warps=8)
        elif out_spec is not None:  # requantization blocks must fit in the output tile
            tm, tn = out_spec.resolve(m, n)
            if is_pow2(tm) and is_pow2(tn):
                cfg = dataclasses.replace(cfg, block_m=max(cfg.block_m, tm), block_n=max(cfg.block_n, tn))
    for name in ("block_m", "block_n", "block_k"):
        v = getattr(cfg, name)
        if not is_pow2(v) or v < 16:
            raise ValueError(f"{name}={v} must be a power of two >= 16 (Triton tensor shapes)")
    if cfg.block_k < 32:
        raise ValueError(f"block_k={cfg.block_k} < 32: int8 dots with block_k=16 are wrong on GPU")
    return cfg


@functools.partial(
    jax.jit,
    static_argnames=("activation", "out_dtype", "out_spec", "b_bits", "config", "split_cols", "interpret"),
)
def int8_matmul_triton(
    a: jax.Array,
    b: jax.Array,
    a_scale: jax.Array | None = None,
    b_scale: jax.Array | None = None,
    *,
    bias: jax.Array | None = None,
    activation: Activation = None,
    residual: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
    out_spec: QuantSpec | None = None,
    b_bits: int = 8,
    config: TileConfig | None = None,
    split_cols: int | None = None,
    interpret: bool | None = None,
) -> jax.Array | QArray | tuple[jax.Array, ...]:
    """The Triton W8A8 GEMM at any M; arguments and result as :func:`pallas_kernels.gemm.int8_matmul`
    (which routes between this kernel, the Mosaic GPU kernel and the decode kernel)."""
    m, k = a.shape
    n = b.shape[0]
    raw = check_operands(a, b, a_scale, b_scale, b_bits=b_bits, out_spec=out_spec, split_cols=split_cols)
    if raw:
        _check_raw_output(bias, activation, residual, out_spec)
    key = f"b{b_bits}-{'raw' if raw else jnp.dtype(out_dtype).name}" + (
        "" if split_cols is None else "-split"
    )
    cfg0 = resolve_config("int8_matmul", m, n, k, key, config, out_spec)
    if split_cols is not None and config is None:
        cfg0 = dataclasses.replace(cfg0, block_n=min(cfg0.block_n, split_cols & -split_cols))
        if cfg0.block_n < 16:
            raise ValueError(f"split_cols={split_cols} has no power-of-two factor >= 16 to use as block_n")
    epi = make_epilogue(
        m,
        n,
        cfg0,
        bias=bias,
        activation=activation,
        residual=residual,
        out_dtype=out_dtype,
        out_spec=out_spec,
        interpret=resolve_interpret(interpret),
        split_cols=split_cols,
    )
    block = w = 0
    if b_bits == 4:  # steps of w packed bytes inside one half-split block; a padded to whole blocks
        block = int4_block(k)
        w = max(32, min(cfg0.block_k, block) // 2)
        a = pad_to_int4_blocks(a, k)
        k = a.shape[1]
    elif k < cfg0.block_k:
        # A contraction shorter than one K tile: zero-pad it (zero codes add nothing) so the tile never
        # reads past the array; interpret mode rejects such slices even under a mask.
        pad = cfg0.block_k - k
        a = jnp.pad(a, ((0, 0), (0, pad)))
        b = jnp.pad(b, ((0, 0), (0, pad)))
        k = cfg0.block_k
    inputs = [a, b]
    if a_scale is not None:
        if math.prod(a_scale.shape) != m:
            raise ValueError(f"a_scale must be (M, 1) = ({m}, 1) per-row, got {a_scale.shape}")
        inputs.append(jnp.asarray(a_scale, jnp.float32).reshape(m))
    if b_scale is not None:
        if math.prod(b_scale.shape) != n:
            raise ValueError(f"b_scale must be (1, N) = (1, {n}) per-column, got {b_scale.shape}")
        inputs.append(jnp.asarray(b_scale, jnp.float32).reshape(n))
    inputs += epilogue_inputs(bias, residual)
    prob = _Problem(m, n, k, b_bits, a_scale is not None, b_scale is not None, block, w)
    out_shape = jax.ShapeDtypeStruct((m, n), jnp.int32) if raw else epilogue_out_shapes(m, n, epi)
    out = pl.pallas_call(
        functools.partial(_w8a8_kernel, p=prob, cfg=cfg0, epi=epi),
        out_shape=out_shape,
        grid=(cdiv(m, cfg0.block_m) * cdiv(n, cfg0.block_n),),
        compiler_params=compiler_params(cfg0.num_warps, cfg0.num_stages),
        interpret=resolve_interpret(interpret),
        name="int8_matmul",
    )(*inputs)
    if epi.parts > 1:
        return tuple(out)
    return out if raw else wrap_output(out, m, n, epi, out_spec)
