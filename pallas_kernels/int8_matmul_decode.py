"""Decode-size INT8 / INT4 GEMM (M <= 16): a weight-streaming kernel with split-K.

    out = act(sum_s partial_s * a_scale + bias) + residual,   partial_s = a @ b[:, K chunk s].T (* b scales)

At batch-1 decode every GEMM is a GEMV: the time is the weight bytes over the bandwidth the running programs
can pull, so what matters is how many programs stream B at once, not the tensor-core tile. The M rows are one
16-row tile (Triton's smallest dot), N is cut into narrow tiles (32-128 columns), and when that still leaves
too few programs (N = 768 gives 24 tiles of 32 for 132 SMs) K is cut into ``split_k`` chunks. With a
linear float32 epilogue (scales, bias, residual: the projections that feed the residual stream) each split
adds its scaled partial atomically into the output, which starts as the residual: one launch. Otherwise the
partial sums (S, M, N) are reduced by XLA, where the epilogue (activation, requantization) then runs as
:func:`pallas_kernels.int8_matmul_triton.epilogue_reference` (XLA fuses it with the reduction).
With ``split_k=1`` the epilogue is fused into the kernel's store (one launch, which is what small layers
want: at 124M a token is launch-bound).

:func:`quantize_matmul_decode` is the same kernel fed float rows: it computes each row's per-token INT8 scale
(after an optional LayerNorm / RMSNorm) itself and quantizes the K tiles as it streams the weights, so a
decode token needs no separate quantize launch per GEMM (:class:`ActQuant`).

b: (N, K) int8 or (N, int4_width(K)) uint8 INT4 (half-split layout, :func:`jq8.quant.pack_int4`).
b's scales: per output column ((N,) / (1, N)), or
ZeroQuant contraction groups ((N, G), a K group of ``b_group`` columns each): a group's int32 partial is
rescaled into an f32 accumulator in the loop, and split-K chunks hold whole groups.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jq8.quant import QArray, QuantSpec, check_int32_k, int4_block, int4_width, round_half_away
from pallas_kernels._common import (
    TileConfig,
    cdiv,
    compiler_params,
    is_pow2,
    next_pow2,
    on_gpu,
    resolve_interpret,
)
from pallas_kernels.int8_matmul_triton import (
    ACTIVATIONS,
    Activation,
    _and_masks,
    _check_raw_output,
    _store,
    div_pow2,
    epilogue_inputs,
    epilogue_out_shapes,
    epilogue_reference,
    int4_pair_dot,
    int_dot,
    load_k_tile,
    load_vector,
    make_epilogue,
    pad_to_int4_blocks,
    store_epilogue,
    wrap_output,
)
from pallas_kernels.norm_quantize import _row_stats
from pallas_kernels.quantize import BlockPlan, div_rn, nan_max, scale_from_absmax, tile_absmax, to_codes

DECODE_MAX_M = 16  # one 16-row tile: the smallest M of a Triton int8 dot
BLOCK_M = 16
H100_SMS = 132
TARGET_CTA_BYTES = 32 * 1024  # weight bytes one program streams; more means too few programs in flight
MIN_SPLIT_BYTES = 1024 * 1024  # below this a GEMM is launch-bound: a second (reduction) op costs more
MAX_UNROLL = 64  # K loop units beyond which ``unroll`` falls back to a loop (code size, compile time)


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Tiles of the decode kernel (hashable: a static jit argument). block_m is always 16."""

    block_n: int = 32
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4
    unroll: bool = False  # K loop as straight-line code (<= MAX_UNROLL units): every load can issue early


def num_sms() -> int:
    """Streaming multiprocessors of the GPU (the H100's 132 elsewhere, so CPU tests see H100 choices)."""
    if on_gpu():
        return int(getattr(jax.devices()[0], "core_count", H100_SMS) or H100_SMS)
    return H100_SMS


def _unit_k(k: int, b_group: int | None, block_k: int) -> tuple[int, int]:
    """(unit, bk): the loop's K step unit (a scale group, else one tile) and a tile width dividing it."""
    if b_group is None:
        return block_k, block_k
    bk = block_k
    while b_group % bk:
        bk //= 2
    return b_group, bk


def decode_config(m: int, n: int, k: int, *, b_bits: int = 8, b_group: int | None = None) -> DecodeConfig:
    """Heuristic tiles for an (M <= 16) x N x K decode GEMM (untimed guesses; the tuning cache overrides).

    block_n: the widest of 128/64/32 that still gives >= 4 programs per SM along N. split_k stays 1 (one
    launch, epilogue fused) when N alone gives >= 2 programs per SM, when each program streams <= 32 KiB
    of weights anyway, or when the weights are under 1 MiB (launch-bound). Otherwise: enough K chunks that
    each program streams about 32 KiB and every SM gets a program, capped at chunks of >= 256 columns (or
    one K group) and at (S, M, N) partials of at most half the weight bytes.
    """
    sms = num_sms()
    block_n = 32
    for bn in (128, 64):
        if cdiv(n, bn) >= 4 * sms:
            block_n = bn
            break
    if b_bits == 4:  # K per step = a whole half-split block (up to 256): the widest contiguous loads
        block_k = int4_block(k)
    else:
        block_k = 256 if b_group is None and k >= 4096 else 128
    unit, _ = _unit_k(k, b_group, block_k)
    num_n = cdiv(n, block_n)
    weight_bytes = n * k * b_bits // 8
    cta_bytes = block_n * k * b_bits // 8
    split = 1
    if num_n < 2 * sms and weight_bytes >= MIN_SPLIT_BYTES and cta_bytes > TARGET_CTA_BYTES:
        split = max(cdiv(cta_bytes, TARGET_CTA_BYTES), cdiv(sms, num_n))
        split = min(split, cdiv(k, max(unit, 256)), max(1, weight_bytes // (8 * m * n * 4)))
    return DecodeConfig(block_n, block_k, split_k=max(1, split))


ACT_KINDS = (None, "q", "ln")  # INT8 codes in; float rows quantized in the kernel; normalized, then quantized


def decode_key(b_bits: int, b_group: int | None, act: str | None = None) -> str:
    """Autotune cache key (everything but the shape). ``act``: one of ACT_KINDS (the kernel's input)."""
    if act not in ACT_KINDS:
        raise ValueError(f"act must be one of {ACT_KINDS}, got {act!r}")
    return f"b{b_bits}-g{b_group or 0}" + (f"-{act}" if act else "")


def lookup_decode_config(
    m: int, n: int, k: int, *, b_bits: int = 8, b_group: int | None = None, act: str | None = None
) -> DecodeConfig:
    """The tuned config for this shape on this GPU (``autotune`` cache: for this ``act`` input, else for
    INT8 codes), else :func:`decode_config`."""
    from pallas_kernels import autotune  # local import: autotune imports the kernels for its CLI

    for kind in dict.fromkeys((act, None)):
        entry = autotune.lookup_entry("int8_matmul_decode", m, n, k, decode_key(b_bits, b_group, kind))
        if entry is not None:
            return DecodeConfig(**entry)
    return decode_config(m, n, k, b_bits=b_bits, b_group=b_group)


def decode_candidates(m: int, n: int, k: int, *, b_bits: int = 8, b_group: int | None = None):
    """A short list for autotuning: the heuristic, then N tiles x split-K around it."""
    base = decode_config(m, n, k, b_bits=b_bits, b_group=b_group)
    out = [base]
    if b_bits == 4:  # measured on the H100: 32/64-column tiles, odd split counts, whole-block steps
        for bn in (32, 64):
            for split in (1, 2, 3, 4, 5, 6, 8):
                for bk in sorted({128, int4_block(k)}):
                    cfg = DecodeConfig(bn, bk, split)
                    if cfg not in out:
                        out.append(cfg)
                # Straight-line K loop: the activation loads of a float input (quantized in the kernel)
                # can all issue up front instead of one unit at a time.
                cfg = DecodeConfig(bn, int4_block(k), split, unroll=True)
                if split > 1 and cfg not in out:
                    out.append(cfg)
        return out
    for bn in (32, 64, 128):
        for split in sorted({1, 2, 4, 8, base.split_k}):
            for bk in (128, 256) if b_group is None else (128,):
                for unroll in (False, True):
                    cfg = DecodeConfig(bn, bk, split, unroll=unroll)
                    if cfg not in out and cdiv(n, bn) * split <= 64 * num_sms():
                        out.append(cfg)
    return out


def _check_config(cfg: DecodeConfig) -> None:
    for name in ("block_n", "block_k"):
        v = getattr(cfg, name)
        if not is_pow2(v) or v < 16:
            raise ValueError(f"{name}={v} must be a power of two >= 16 (Triton tensor shapes)")
    if cfg.block_k < 32:
        raise ValueError(f"block_k={cfg.block_k} < 32: int8 dots with block_k=16 are wrong on GPU")
    if cfg.split_k < 1:
        raise ValueError(f"split_k must be >= 1, got {cfg.split_k}")


def infer_group(k: int, groups: int) -> int:
    """The K group of (N, ``groups``) scales: the power of two >= 32 with cdiv(K, group) == groups."""
    p = 32
    while p < 2 * k:
        if cdiv(k, p) == groups:
            return p
        p *= 2
    raise ValueError(
        f"cannot infer a power-of-two K group (>= 32) for K={k} with {groups} groups; pass b_group="
    )


# ------------------------------------------------------------------------------------------------ kernel


@dataclasses.dataclass(frozen=True)
class ActQuant:
    """Per-token INT8 quantization of float activations inside the decode kernel (static description).

    Each program reads whole activation rows (L2-resident at decode sizes) for their statistics: with
    ``norm`` the LayerNorm / RMSNorm mean and rstd (fp32, biased variance, eps inside the rsqrt), then the
    absmax of the (normalized) row; the K tiles are then quantized as the weight loop meets them. Codes
    and scales follow jq8.quant (scale = absmax * (1/127), correctly rounded reciprocal, round half away
    from zero), so the product equals that of ``layer_norm_quantize`` / ``quantize_tiles`` codes up to
    the fp32 summation order of the statistics.
    """

    k: int  # true K: statistics and masks (x may be zero-padded past it)
    norm: str | None = None  # None, "layernorm" or "rmsnorm"
    eps: float = 1e-5
    has_gamma: bool = False
    has_beta: bool = False
    rows: int = 1  # rows of the statistics tiles: 1 for M = 1, else BLOCK_M
    chunk: int = 1024  # columns per statistics tile (a power of two)


STATS_ELEMS = 8192  # fp32 elements per statistics tile (64 registers per thread at 4 warps)


def act_quant(m: int, k: int, *, norm: str | None, eps: float, has_gamma: bool, has_beta: bool) -> ActQuant:
    if norm not in (None, "layernorm", "rmsnorm"):
        raise ValueError(f"norm must be None, 'layernorm' or 'rmsnorm', got {norm!r}")
    rows = 1 if m == 1 else BLOCK_M
    chunk = min(next_pow2(k), max(32, STATS_ELEMS // rows))
    return ActQuant(k, norm, float(eps), has_gamma, has_beta, rows, chunk)


def _token_scales(x_ref, g_ref, be_ref, q: ActQuant, m: int, interpret: bool):
    """(mean, rstd, scale, inv) of the activation rows, each (q.rows, 1) fp32 (mean / rstd None without a
    norm); scale / inv: the per-token quantization scale of the (normalized) row and its reciprocal.

    Whole rows in one tile (decode): gamma and beta are loaded together with x, so the program waits for
    one memory round trip, then reduces in registers (``norm_quantize._row_stats``: mean, centred variance;
    then the absmax). Longer rows sweep K in chunks (Chan-merged statistics, then an absmax pass).
    """
    r = q.rows
    row_ok = (jnp.arange(r) < m)[:, None]
    whole = q.chunk >= q.k

    def mask_at(c0):
        return row_ok & ((c0 + jnp.arange(q.chunk))[None, :] < q.k)

    def load_x(r0, c0):
        del r0
        x = plgpu.load(x_ref.at[pl.ds(0, r), pl.ds(c0, q.chunk)], mask=mask_at(c0), other=0.0)
        return x.astype(jnp.float32), mask_at(c0)

    params = _norm_params(g_ref, be_ref, 0, q.chunk, q) if whole else None  # issued before the reductions
    mean = rstd = x_once = None
    if q.norm is not None:
        plan = BlockPlan(m, q.k, r, q.chunk, None if whole else 1)
        mean, rstd, x_once = _row_stats(load_x, plan, 0, eps=q.eps, rms=q.norm == "rmsnorm")

    def absmax(x, mask, params):
        y = _normalize(x, mean, rstd, params)
        return tile_absmax(jnp.abs(jnp.where(mask, y, 0.0)), 1, q.chunk)  # padding must not raise it

    if whole:
        x = load_x(0, 0)[0] if x_once is None else x_once  # the statistics already loaded the row
        amax = absmax(x, mask_at(0), params)
    else:

        def body(i, amax):
            c0 = i * q.chunk
            x, mask = load_x(0, c0)
            return nan_max(amax, absmax(x, mask, _norm_params(g_ref, be_ref, c0, q.chunk, q)))

        amax = lax.fori_loop(0, cdiv(q.k, q.chunk), body, jnp.zeros((r, 1), jnp.float32))
    scale = scale_from_absmax(amax)
    return mean, rstd, scale, div_rn(jnp.ones_like(scale), scale, interpret)


def _norm_params(g_ref, be_ref, c0, width: int, q: ActQuant):
    """(gamma, beta) of columns [c0, c0 + width) as (1, width) fp32 (None where absent or without a norm)."""
    if q.norm is None:
        return None, None
    ok = (c0 + jnp.arange(width)) < q.k

    def load(ref):
        if ref is None:
            return None
        return plgpu.load(ref.at[pl.ds(c0, width)], mask=ok, other=0.0).astype(jnp.float32)[None, :]

    return load(g_ref if q.has_gamma else None), load(be_ref if q.has_beta else None)


def _normalize(x, mean, rstd, params):
    """(x - mean) * rstd * gamma + beta of a (rows, width) tile (x unchanged without a norm: mean None)."""
    if mean is None:
        return x
    gamma, beta = params
    y = (x - mean) * rstd
    if gamma is not None:
        y = y * gamma
    if beta is not None:
        y = y + beta
    return y


def _code_loader(x_ref, g_ref, be_ref, q: ActQuant, stats, a_rows, k_padded: bool):
    """load(k0, width, k_hi=None) -> (BLOCK_M, width) int8 codes of the activation tile at column k0.

    One activation row (M = 1): the row's codes are computed once on a (1, width) tile and broadcast to
    the 16 rows of the dot (its other rows are never stored), not computed 16 times over masked rows.
    """
    mean, rstd, _, inv = stats
    r = q.rows

    def load(k0, width, k_hi=None):
        cols = k0 + jnp.arange(width)
        limit = q.k if k_padded else k_hi  # past the true K: zero codes (the weights there are zero too)
        rows_ok = None if (a_rows is None or r == 1) else a_rows[:, None]
        mask = _and_masks(rows_ok, None if limit is None else (cols < limit)[None, :])
        view = x_ref.at[pl.ds(0, r), pl.ds(k0, width)]
        x = (view[...] if mask is None else plgpu.load(view, mask=mask, other=0.0)).astype(jnp.float32)
        y = _normalize(x, mean, rstd, _norm_params(g_ref, be_ref, k0, width, q))
        codes = to_codes(round_half_away(y * inv))
        if mask is not None:
            codes = jnp.where(mask, codes, jnp.int8(0))
        return jnp.broadcast_to(codes, (BLOCK_M, width)) if r == 1 else codes

    return load


@dataclasses.dataclass(frozen=True)
class _Plan:
    m: int
    n: int
    k: int
    b_bits: int
    bn: int
    bk: int
    unit: int  # K columns per loop iteration: a scale group (grouped) or one tile
    chunk: int  # K columns per split (a multiple of unit)
    split: int
    grouped: bool  # b's scales vary along K (rescaled per unit in the loop)
    scaled_a: bool
    scaled_b: bool  # per-column b scales (epilogue)
    fused: bool  # split == 1: the epilogue runs in the kernel
    unroll: bool = False
    # INT4 (half-split packing): the loop runs over packed bytes, w per step, in units of unit_bytes that
    # share one scale column per nibble plane; units_per_split units per split, units in all.
    block: int = 0
    w: int = 0
    group: int = 0
    unit_bytes: int = 0
    units: int = 0
    units_per_split: int = 0
    act: ActQuant | None = None  # float activations quantized in the kernel (a_ref holds x)
    atomic: bool = False  # split-K partials scaled and added atomically into the f32 output (see _atomic_add)
    has_bias: bool = False  # atomic: split 0 adds the bias


def _int4_loop(acc, a_ref, b_ref, sg_ref, p: _Plan, *, s, col0, a_rows, col_ok, load_a=None):
    """The INT4 product of split ``s``: ``p.units_per_split`` units of packed bytes from unit s * that.

    Per unit, the int32 products of the low and high nibble planes (16x, see ``int4_pair_dot``) are summed
    separately, then rescaled: with K groups >= the half-split block both planes sit in one group; with
    smaller groups (unit = one group of bytes) the high plane's group is block / (2 * group) further on.
    Steps past the end (a ragged last split, a partial last group) read clamped, in-bounds bytes and
    add nothing.
    """
    width = p.k // 2
    steps = p.unit_bytes // p.w
    exact = p.units * p.unit_bytes == width and p.units_per_split * p.split == p.units
    n_groups = sg_ref.shape[1] if p.grouped else 0  # K padded to whole blocks may pass the last group

    def unit(u, acc):
        c_u = (s * p.units_per_split + u) * p.unit_bytes
        lo_acc = hi_acc = jnp.zeros((BLOCK_M, p.bn), jnp.int32)
        for i in range(steps):
            c0 = c_u + i * p.w
            if not exact:
                valid = c0 < width
                c0 = jnp.minimum(c0, width - p.w)
            lo, hi = int4_pair_dot(
                a_ref,
                b_ref,
                0,
                BLOCK_M,
                col0,
                p.bn,
                c0,
                p.w,
                p.block,
                a_rows=a_rows,
                b_rows=col_ok,
                load_a=load_a,
            )
            if not exact:
                lo, hi = jnp.where(valid, lo, 0), jnp.where(valid, hi, 0)
            lo_acc, hi_acc = lo_acc + lo, hi_acc + hi
        if not p.grouped:
            return acc + lax.shift_right_arithmetic(lo_acc + hi_acc, jnp.int32(4))  # exact: 16x products

        def scale(g):
            view = sg_ref.at[pl.ds(col0, p.bn), jnp.minimum(g, n_groups - 1)]
            return (view[...] if col_ok is None else plgpu.load(view, mask=col_ok, other=0.0))[None, :]

        if p.group >= p.block:  # the unit is one K group: both planes share its scale
            g = div_pow2(2 * c_u, p.group)
            return acc + (lo_acc + hi_acc).astype(jnp.float32) * (scale(g) * 0.0625)
        half = p.block // 2
        g_lo = div_pow2(div_pow2(c_u, half) * p.block + lax.bitwise_and(c_u, half - 1), p.group)
        g_hi = g_lo + half // p.group
        return (
            acc
            + (lo_acc.astype(jnp.float32) * scale(g_lo) + hi_acc.astype(jnp.float32) * scale(g_hi)) * 0.0625
        )

    if p.unroll and p.units_per_split * steps <= MAX_UNROLL:
        for u in range(p.units_per_split):
            acc = unit(u, acc)
        return acc
    return lax.fori_loop(0, p.units_per_split, unit, acc)


def _decode_kernel(*refs, p: _Plan, epi, interpret: bool = False):
    a_ref, b_ref, *rest = refs
    sg_ref = rest.pop(0) if p.grouped else None
    q = p.act
    g_ref = rest.pop(0) if q is not None and q.has_gamma else None
    be_ref = rest.pop(0) if q is not None and q.has_beta else None
    if p.fused or p.atomic:
        sa_ref = rest.pop(0) if p.scaled_a and q is None else None
        sb_ref = rest.pop(0) if p.scaled_b else None
    if p.fused:
        epi_refs, out_refs = rest[: epi.num_inputs], rest[epi.num_inputs :]
    elif p.atomic:
        bias_ref = rest.pop(0) if p.has_bias else None
        out_refs = rest[1:]  # rest[0]: the initial output (residual or zeros), aliased to out_refs[0]
    else:
        out_refs = rest
    bm, bn, bk = BLOCK_M, p.bn, p.bk
    pid_n, s = pl.program_id(0), pl.program_id(1)
    col0 = pl.multiple_of(pid_n * bn, bn)
    a_rows = jnp.arange(bm) < p.m if p.m % bm else None
    col_ok = (col0 + jnp.arange(bn)) < p.n if p.n % bn else None
    load_a = stats = None
    if q is not None:
        stats = _token_scales(a_ref, g_ref, be_ref, q, p.m, interpret)
        load_a = _code_loader(a_ref, g_ref, be_ref, q, stats, a_rows, k_padded=p.k != q.k)
    k_lo = s * p.chunk
    # Static trip counts (Triton's scf.for rejected the traced one a shorter last split needed): with
    # split-K every split runs chunk / unit units and the last one masks K past the end (those loads are
    # zeros, their group scale index is clamped); a single split runs the whole units, then the K tail.
    ragged = p.split > 1 and p.split * p.chunk > p.k
    n_units = p.k // p.unit if p.split == 1 else p.chunk // p.unit
    k_mask = p.k if ragged else None
    n_groups = cdiv(p.k, p.unit)

    def dot_unit(k0, nsteps: int, k_hi):
        """int32 product over K columns [k0, k0 + nsteps * bk); ``k_hi`` masks K (None: all in bounds)."""

        def one(kk, acc):
            if load_a is None:
                a = load_k_tile(a_ref, 0, bm, kk, bk, row_mask=a_rows, k_valid=k_hi)
            else:
                a = load_a(kk, bk, k_hi)
            b = load_k_tile(b_ref, col0, bn, kk, bk, row_mask=col_ok, k_valid=k_hi)
            return acc + int_dot(a, b)

        acc = jnp.zeros((bm, bn), jnp.int32)
        if nsteps <= 4:
            for i in range(nsteps):
                acc = one(k0 + i * bk, acc)
            return acc
        return lax.fori_loop(0, nsteps, lambda i, c: one(pl.multiple_of(k0 + i * bk, bk), c), acc)

    def accumulate(acc, k0, nsteps: int, k_hi):
        part = dot_unit(k0, nsteps, k_hi)
        if not p.grouped:
            return acc + part
        g = jnp.minimum(jnp.asarray(k0 // p.unit, jnp.int32), n_groups - 1)  # past K: masked zeros
        view = sg_ref.at[pl.ds(col0, bn), g]  # column g of the (N, G) scales: a strided (bn,) read
        sg = view[...] if col_ok is None else plgpu.load(view, mask=col_ok, other=0.0)
        return acc + part.astype(jnp.float32) * sg[None, :]

    acc = jnp.zeros((bm, bn), jnp.float32 if p.grouped else jnp.int32)
    if p.b_bits == 4:
        acc = _int4_loop(
            acc, a_ref, b_ref, sg_ref, p, s=s, col0=col0, a_rows=a_rows, col_ok=col_ok, load_a=load_a
        )
    elif p.unroll and n_units <= MAX_UNROLL:
        for u in range(n_units):
            acc = accumulate(acc, k_lo + u * p.unit, p.unit // bk, k_mask)
    else:
        acc = lax.fori_loop(
            0,
            n_units,
            lambda u, c: accumulate(c, pl.multiple_of(k_lo + u * p.unit, p.unit), p.unit // bk, k_mask),
            acc,
        )
    if p.b_bits == 8 and p.split == 1 and p.k % p.unit:  # K tail of a single split (split-K masks it)
        acc = accumulate(acc, k_lo + n_units * p.unit, cdiv(p.k % p.unit, bk), p.k)  # k_lo = 0 here

    mask = _and_masks(
        None if a_rows is None else a_rows[:, None], None if col_ok is None else col_ok[None, :]
    )
    if p.atomic:  # this split's scaled partial (split 0: + bias) added into the output in place
        y = _scale_rows_cols(acc, stats, sa_ref, sb_ref, p, col0)
        if bias_ref is not None:
            bias = load_vector(bias_ref, col0, bn, p.n if p.n % bn else None)
            y = y + jnp.where(s == 0, bias, 0.0)[None, :]
        if p.m == 1:  # one row: bn atomics, not 16 x bn mostly masked ones
            y = jnp.sum(jnp.where((jnp.arange(bm) == 0)[:, None], y, 0.0), axis=0, keepdims=True)
            ok = None if col_ok is None else col_ok[None, :]
            _atomic_add(out_refs[0].at[pl.ds(0, 1), pl.ds(col0, bn)], y, ok, interpret)
        else:
            _atomic_add(out_refs[0].at[pl.ds(0, bm), pl.ds(col0, bn)], y, mask, interpret)
        return
    if not p.fused:  # (S, M, N) partial sums, reduced (and the epilogue applied) by XLA
        _store(out_refs[0].at[s, pl.ds(0, bm), pl.ds(col0, bn)], acc, mask)
        if q is not None:  # the token scales, for that epilogue: every program has them, the first writes

            @pl.when((pid_n == 0) & (s == 0))
            def _():
                _store(out_refs[1].at[pl.ds(0, bm)], jnp.broadcast_to(stats[2], (bm, 1))[:, 0], a_rows)

        return
    if not (p.grouped or p.scaled_a or p.scaled_b):  # raw int32 product
        _store(out_refs[0].at[pl.ds(0, bm), pl.ds(col0, bn)], acc, mask)
        return
    y = _scale_rows_cols(acc, stats, sa_ref, sb_ref, p, col0)
    store_epilogue(y, epi_refs, out_refs, epi=epi, row0=0, col0=col0, bm=bm, bn=bn, m=p.m, n=p.n)


def _scale_rows_cols(acc, stats, sa_ref, sb_ref, p: _Plan, col0):
    """The (BLOCK_M, bn) product in f32 times the token scales (in-kernel or given) and per-column scales."""
    y = acc.astype(jnp.float32)
    if stats is not None:
        y = y * jnp.broadcast_to(stats[2], (BLOCK_M, 1))
    elif p.scaled_a:
        y = y * load_vector(sa_ref, 0, BLOCK_M, p.m if p.m % BLOCK_M else None)[:, None]
    if p.scaled_b:
        y = y * load_vector(sb_ref, col0, p.bn, p.n if p.n % p.bn else None)[None, :]
    return y


def _atomic_add(view, value, mask, interpret: bool) -> None:
    """view += value where mask: an f32 atomic add on the GPU (split-K programs of one tile race). Interpret
    mode runs the programs one at a time, and its atomic rule takes no mask: a masked load + store."""
    if interpret:
        old = view[...] if mask is None else plgpu.load(view, mask=mask, other=0.0)
        _store(view, old + value, mask)
    else:  # Triton's atomic_rmw wants the mask in the value's shape (a store broadcasts it)
        plgpu.atomic_add(view, (), value, mask=None if mask is None else jnp.broadcast_to(mask, value.shape))


# ----------------------------------------------------------------------------------------------- wrapper


def _tile(cfg: DecodeConfig) -> TileConfig:
    return TileConfig(BLOCK_M, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages, group_m=1)


def _fusable(out_spec: QuantSpec | None, m: int, n: int, bn: int) -> bool:
    """Whether the kernel's store can requantize: power-of-two blocks inside one (16, bn) tile. Per-row
    requantization would need a whole row per program (one program for N <= 1024), so it goes to XLA."""
    if out_spec is None:
        return True
    tm, tn = out_spec.resolve(m, n)
    return out_spec.tile[1] != -1 and is_pow2(tm) and is_pow2(tn) and BLOCK_M % tm == 0 and bn % tn == 0


_STATIC = ("activation", "out_dtype", "out_spec", "b_bits", "b_group", "config", "split_sum", "interpret")
SPLIT_SUMS = ("auto", "atomic", "xla", "defer")


@dataclasses.dataclass(frozen=True)
class SplitKSum:
    """A decode GEMM's result left as its split-K partial sums, for the consuming kernel to finish.

        value = ((sum_s parts[s]) * row_scale[:, None] * col_scale[None, :] + bias).astype(dtype)

    parts: (S, M, N) int32 (float32 with K-group weight scales, applied in the loop). row_scale: (M,) f32
    per-token scales; col_scale: (N,) f32 per-column weight scales; bias: (N,) f32; each may be None.
    ``shape``: the shape :meth:`finish` gives the (M, N) value (a reshape). A pytree (the arrays are its
    leaves), returned by ``split_sum="defer"``: a consumer that reads it in its prologue
    (:func:`pallas_kernels.decode_attention.decode_attention_update`) saves the reduction's launch, and
    :meth:`finish` is the same XLA epilogue the other paths run.
    """

    parts: jax.Array
    row_scale: jax.Array | None
    col_scale: jax.Array | None
    bias: jax.Array | None
    dtype: jnp.dtype
    shape: tuple[int, ...]

    def finish(self) -> jax.Array:
        """The value as XLA computes it in the "xla" split_sum path, reshaped to ``shape``."""
        y = scaled_sum(self.parts, self.row_scale, self.col_scale)
        out = epilogue_reference(
            y, bias=self.bias, activation=None, residual=None, out_dtype=self.dtype, out_spec=None
        )
        return out.reshape(self.shape)

    def reshape(self, *shape: int) -> SplitKSum:
        """The same sum, finishing to ``shape`` (same size as (M, N))."""
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        if math.prod(shape) != math.prod(self.shape):
            raise ValueError(f"cannot reshape a SplitKSum of shape {self.shape} to {shape}")
        return dataclasses.replace(self, shape=shape)


def scaled_sum(parts: jax.Array, row_scale: jax.Array | None, col_scale: jax.Array | None) -> jax.Array:
    """(S, M, N) split-K partials -> (M, N) f32 sum x (M,) row scales x (N,) column scales (None: skipped),
    the first half of the XLA epilogue (:func:`epilogue_reference` is the second)."""
    y = jnp.sum(parts, axis=0).astype(jnp.float32)  # int32 partials: an exact sum
    if row_scale is not None:
        y = y * jnp.asarray(row_scale, jnp.float32).reshape(-1, 1)
    if col_scale is not None:
        y = y * jnp.asarray(col_scale, jnp.float32).reshape(1, -1)
    return y


jax.tree_util.register_dataclass(
    SplitKSum, data_fields=["parts", "row_scale", "col_scale", "bias"], meta_fields=["dtype", "shape"]
)


@functools.partial(jax.jit, static_argnames=_STATIC)
def int8_matmul_decode(
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
    b_group: int | None = None,
    config: DecodeConfig | None = None,
    split_sum: str = "auto",
    interpret: bool | None = None,
) -> jax.Array | QArray:
    """Decode GEMM ``act(a @ b.T * a_scale * b_scale + bias) + residual`` for M <= 16.

    a: (M, K) int8, M <= 16. b: (N, K) int8, or (N, int4_width(K)) uint8 INT4 (:func:`jq8.quant.pack_int4`)
    with ``b_bits=4``.
    a_scale: (M, 1) or (M,) f32 per-row (or None). b_scale: (1, N) / (N,) per-column, or (N, G) with G > 1
    contraction groups of ``b_group`` K columns (inferred as a power of two when None; a multiple of 32).
    Epilogue arguments and the return value as in :func:`pallas_kernels.gemm.int8_matmul` (raw int32
    when both scales are None). ``config=None`` picks :func:`decode_config`.
    split_sum: how split-K partials are summed. "atomic": each program adds its scaled partial into the
    f32 output, which starts as ``residual`` (or zeros), so the GEMV, bias and residual add are one launch
    (float32 output, no activation / out_spec; the summation order varies between runs, at float32
    rounding). "xla": partials (S, M, N), then an XLA reduction + epilogue (deterministic). "auto": atomic
    where it applies. "defer": when K is split and the epilogue is scales + bias only (no activation,
    residual or out_spec), a :class:`SplitKSum` for a consumer kernel to finish; otherwise as "auto".
    """
    if a.dtype != jnp.int8:
        raise TypeError(f"a must be int8, got {a.dtype}")
    if a_scale is not None and a_scale.size != a.shape[0]:
        raise ValueError(f"a_scale must be (M, 1) = ({a.shape[0]}, 1) per-row, got {a_scale.shape}")
    return _decode_matmul(
        a,
        b,
        a_scale,
        b_scale,
        None,
        None,
        act=None,
        bias=bias,
        activation=activation,
        residual=residual,
        out_dtype=out_dtype,
        out_spec=out_spec,
        b_bits=b_bits,
        b_group=b_group,
        config=config,
        split_sum=split_sum,
        interpret=interpret,
    )


@functools.partial(jax.jit, static_argnames=_STATIC + ("norm", "eps"))
def quantize_matmul_decode(
    x: jax.Array,
    b: jax.Array,
    b_scale: jax.Array,
    *,
    norm: str | None = None,
    gamma: jax.Array | None = None,
    beta: jax.Array | None = None,
    eps: float = 1e-5,
    bias: jax.Array | None = None,
    activation: Activation = None,
    residual: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
    out_spec: QuantSpec | None = None,
    b_bits: int = 8,
    b_group: int | None = None,
    config: DecodeConfig | None = None,
    split_sum: str = "auto",
    interpret: bool | None = None,
) -> jax.Array | QArray:
    """``act(Q(norm(x)) @ b.T * scales + bias) + residual`` for M <= 16, Q = per-token INT8 quantization
    done inside the GEMM kernel (no separate quantize / LayerNorm-quantize launch: see :class:`ActQuant`).

    x: (M, K) f32 / bf16, M <= 16. norm: None, "layernorm" or "rmsnorm" over K with ``gamma`` / ``beta``
    (K,) (either may be None) and ``eps``. b, b_scale (required), b_bits, b_group and the epilogue as in
    :func:`int8_matmul_decode`. Equals ``int8_matmul_decode(codes, b, scale, b_scale, ...)`` with
    ``codes, scale`` from ``layer_norm_quantize`` (or ``quantize_tiles`` without a norm) per row, up to the
    fp32 summation order of the row statistics. split_sum as in :func:`int8_matmul_decode`.
    """
    if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be (M, K) floating, got {x.shape} {x.dtype}")
    m, k = x.shape
    for name, v in (("gamma", gamma), ("beta", beta)):
        if v is not None and v.shape != (k,):
            raise ValueError(f"{name} must have shape (K,) = ({k},), got {v.shape}")
    if norm is None and (gamma is not None or beta is not None):
        raise ValueError("gamma / beta given without norm= ('layernorm' or 'rmsnorm')")
    if b_scale is None:
        raise ValueError("quantize_matmul_decode needs b_scale (the activation scale is per token)")
    act = act_quant(m, k, norm=norm, eps=eps, has_gamma=gamma is not None, has_beta=beta is not None)
    return _decode_matmul(
        x,
        b,
        None,
        b_scale,
        gamma,
        beta,
        act=act,
        bias=bias,
        activation=activation,
        residual=residual,
        out_dtype=out_dtype,
        out_spec=out_spec,
        b_bits=b_bits,
        b_group=b_group,
        config=config,
        split_sum=split_sum,
        interpret=interpret,
    )


def _pad_cols(x: jax.Array | None, kp: int) -> jax.Array | None:
    if x is None or x.shape[-1] == kp:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, kp - x.shape[-1])])


def _decode_matmul(
    a,
    b,
    a_scale,
    b_scale,
    gamma,
    beta,
    *,
    act: ActQuant | None,
    bias,
    activation,
    residual,
    out_dtype,
    out_spec,
    b_bits,
    b_group,
    config,
    split_sum,
    interpret,
):
    """Shared body of the two wrappers: a is int8 codes (act None) or float rows quantized in the kernel."""
    m, k = a.shape
    n = b.shape[0]
    if m > DECODE_MAX_M:
        raise ValueError(f"the decode kernel is for M <= {DECODE_MAX_M}, got M={m}; use int8_matmul")
    expect_b = (n, int4_width(k) if b_bits == 4 else k)
    if b_bits not in (4, 8) or b.shape != expect_b or b.dtype != (jnp.uint8 if b_bits == 4 else jnp.int8):
        raise ValueError(
            f"b must be {expect_b} {'uint8 packed INT4' if b_bits == 4 else 'int8'}, got {b.shape} {b.dtype}"
        )
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    grouped = b_scale is not None and b_scale.ndim == 2 and b_scale.shape[0] == n and b_scale.shape[1] > 1
    if grouped:
        b_group = b_group or infer_group(k, b_scale.shape[1])
        if b_group % 32 or b_scale.shape != (n, cdiv(k, b_group)):
            raise ValueError(
                f"grouped b_scale must be (N, cdiv(K, b_group)) = ({n}, {cdiv(k, b_group)}) with b_group a "
                f"multiple of 32; got {b_scale.shape}, b_group={b_group}"
            )
        check_int32_k(b_group)
    else:
        if b_scale is not None and b_scale.size != n:
            raise ValueError(
                f"b_scale must be (1, N) = (1, {n}) per-column or (N, G) groups, got {b_scale.shape}"
            )
        check_int32_k(k)
        b_group = None
    raw = a_scale is None and b_scale is None
    if raw:
        _check_raw_output(bias, activation, residual, out_spec)

    act_kind = None if act is None else ("q" if act.norm is None else "ln")
    cfg = config or lookup_decode_config(m, n, k, b_bits=b_bits, b_group=b_group, act=act_kind)
    _check_config(cfg)
    unit, bk = _unit_k(k, b_group, cfg.block_k)
    if bk < 32:
        raise ValueError(f"b_group={b_group} needs a K tile >= 32 dividing it")
    int4 = {}
    if b_bits == 4 and grouped and not is_pow2(b_group):
        raise NotImplementedError(f"INT4 K groups must be powers of two (>= 32), got b_group={b_group}")
    if b_bits == 4:  # units of packed bytes (see _int4_loop); a padded to the whole blocks b is packed in
        block = int4_block(k)
        a = pad_to_int4_blocks(a, k)
        kp = a.shape[1]
        group = b_group or 0
        unit_bytes = group // 2 if group >= block else group  # one scale column per nibble plane
        w = max(32, min(cfg.block_k, block) // 2)
        unit_bytes = unit_bytes or w
        w = min(w, unit_bytes)
        units = cdiv(kp // 2, unit_bytes)
        split = max(1, min(cfg.split_k, units))
        per_split = cdiv(units, split)
        split = cdiv(units, per_split)
        int4 = dict(
            block=block, w=w, group=group, unit_bytes=unit_bytes, units=units, units_per_split=per_split
        )
        chunk = per_split * unit_bytes * 2
    else:
        if k < bk:  # shorter than one K tile: zero-pad (zero codes add nothing; interpret rejects the slice)
            a, b, kp = _pad_cols(a, bk), _pad_cols(b, bk), bk
        else:
            kp = k
        split = max(1, min(cfg.split_k, cdiv(kp, unit)))
        chunk = cdiv(cdiv(kp, split), unit) * unit
        split = cdiv(kp, chunk)  # every split non-empty
    fused = split == 1 and _fusable(out_spec, m, n, cfg.block_n)
    if split_sum not in SPLIT_SUMS:
        raise ValueError(f"split_sum must be one of {SPLIT_SUMS}, got {split_sum!r}")
    linear = not raw and activation is None and out_spec is None and jnp.dtype(out_dtype) == jnp.float32
    if split_sum == "atomic" and not linear:
        raise ValueError(
            "split_sum='atomic' adds the split-K partials into a float32 output in any order: it needs "
            f"out_dtype=float32, no activation and no out_spec (got {jnp.dtype(out_dtype)}, {activation!r}, "
            f"{out_spec}); use split_sum='xla'"
        )
    defer = split_sum == "defer" and split > 1 and not raw
    defer = defer and activation is None and residual is None and out_spec is None
    atomic = split > 1 and linear and split_sum not in ("xla", "defer")
    interp = resolve_interpret(interpret)
    scaled_a = a_scale is not None or act is not None
    plan = _Plan(
        m,
        n,
        kp,
        b_bits,
        cfg.block_n,
        bk,
        unit,
        chunk,
        split,
        grouped,
        scaled_a,
        b_scale is not None and not grouped,
        fused,
        cfg.unroll,
        **int4,
        act=act,
        atomic=atomic,
        has_bias=atomic and bias is not None,
    )
    inputs = [a, b]
    if grouped:
        inputs.append(jnp.asarray(b_scale, jnp.float32))
    if act is not None:  # the statistics mask K past the true width; the padded columns quantize to 0
        inputs += [_pad_cols(v, kp) for v in (gamma, beta) if v is not None]
    call = functools.partial(
        pl.pallas_call,
        grid=(cdiv(n, cfg.block_n), split),
        compiler_params=compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=interp,
        name="int8_matmul_decode" if act is None else "quantize_matmul_decode",
    )
    if fused:
        epi = make_epilogue(
            m,
            n,
            _tile(cfg),
            bias=bias,
            activation=activation,
            residual=residual,
            out_dtype=out_dtype,
            out_spec=out_spec,
            interpret=interp,
        )
        if a_scale is not None:
            inputs.append(jnp.asarray(a_scale, jnp.float32).reshape(m))
        if plan.scaled_b:
            inputs.append(jnp.asarray(b_scale, jnp.float32).reshape(n))
        inputs += epilogue_inputs(bias, residual)
        out_shape = jax.ShapeDtypeStruct((m, n), jnp.int32) if raw else epilogue_out_shapes(m, n, epi)
        kernel = functools.partial(_decode_kernel, p=plan, epi=epi, interpret=interp)
        out = call(kernel, out_shape=out_shape)(*inputs)
        return out if raw else wrap_output(out, m, n, epi, out_spec)

    make_epilogue(  # validates bias / residual shapes
        m,
        n,
        _tile(cfg),
        bias=bias,
        activation=activation,
        residual=residual,
        out_dtype=out_dtype,
        out_spec=None,
        interpret=interp,
    )
    kernel = functools.partial(_decode_kernel, p=plan, epi=None, interpret=interp)
    if atomic:  # split-K summed in place: the output starts as the residual (or zeros), one launch in all
        if a_scale is not None:
            inputs.append(jnp.asarray(a_scale, jnp.float32).reshape(m))
        if plan.scaled_b:
            inputs.append(jnp.asarray(b_scale, jnp.float32).reshape(n))
        if bias is not None:
            inputs.append(jnp.asarray(bias, jnp.float32).reshape(n))
        init = jnp.zeros((m, n), jnp.float32) if residual is None else residual.astype(jnp.float32)
        inputs.append(init.reshape(m, n))
        out = jax.ShapeDtypeStruct((m, n), jnp.float32)
        return call(kernel, out_shape=out, input_output_aliases={len(inputs) - 1: 0})(*inputs)

    # Split-K: partial sums, then one XLA reduction + epilogue (exact int32 sums when b is per-column).
    if out_spec is not None and (out_spec.bits != 8 or not out_spec.symmetric):
        raise NotImplementedError(f"requantization supports symmetric INT8 only, got {out_spec}")
    part_dtype = jnp.float32 if grouped else jnp.int32
    out_shape = [jax.ShapeDtypeStruct((split, m, n), part_dtype)]
    if act is not None:
        out_shape.append(jax.ShapeDtypeStruct((m,), jnp.float32))
    outs = call(kernel, out_shape=out_shape)(*inputs)
    if act is not None:
        a_scale = outs[1]
    if defer:
        f32 = lambda v, size: None if v is None else jnp.asarray(v, jnp.float32).reshape(size)
        col_scale = f32(b_scale, n) if plan.scaled_b else None
        row_scale, bias = f32(a_scale, m), f32(bias, n)
        return SplitKSum(outs[0], row_scale, col_scale, bias, jnp.dtype(out_dtype), (m, n))
    if raw:
        return jnp.sum(outs[0], axis=0)
    y = scaled_sum(outs[0], a_scale, b_scale if plan.scaled_b else None)
    return epilogue_reference(
        y, bias=bias, activation=activation, residual=residual, out_dtype=out_dtype, out_spec=out_spec
    )
