"""Tiled symmetric INT8 quantization as one Pallas GPU kernel (Triton lowering), plus its building blocks.

``quantize_tiles(x, spec)`` reads each (BM, BN) block of ``x`` once, reduces the absmax of every
quantization tile inside the block in registers, and writes the INT8 codes and per-tile scales; with
``transposed_spec`` it also writes the (N, M) codes of ``x.T`` (and their scales) from the same loaded
block -- the operand layout the backward GEMMs need (see kernel_api: every GEMM is "NT").

Results are bit-exact to :func:`jq8.quant.quantize` (run eagerly; see the last point):
- the same ``round_half_away`` / ``uniform_noise`` functions run inside the kernel, the noise indexed by
  GLOBAL (row, column), so every program draws its own noise;
- ragged edges are masked loads with 0 as the fill: 0 never raises an absmax, so a partial tile's scale
  equals the reference's edge-padded one;
- the absmax is reduced on int32 bit patterns so a NaN reaches the scale (Triton's float max drops NaN);
- ``scale = amax * (1/127)``: XLA's algebraic simplifier turns the reference's ``amax / 127`` into this
  multiply (measured on CPU, and the pass is backend-independent), so the kernel writes the multiply;
- ``code = x / scale`` is a correctly rounded division (``div.rn.f32`` inline PTX on the GPU: Triton's own
  fp32 ``/`` is the approximate ``div.full.f32``). Under ``jax.jit`` XLA may rewrite the reference's
  ``x / broadcast(scale)`` into a multiply by the reciprocal (seen on CPU for bf16 input), which moves
  rare exact ties by one code; the eager reference divides exactly, as the kernel does.

Block planning (:func:`plan_blocks`): a quantization tile (in x coordinates, -1 = a whole axis) must lie
inside one program's block. Tile sizes that are not a whole axis must be powers of two. A whole-axis tile
makes the block span that axis (``next_pow2``); when that exceeds the register budget the program instead
*sweeps* the axis in chunks: one pass for the absmax, one to quantize (x is read twice, mostly from L2).
Whole-column statistics over a long M would therefore run on few programs, so long whole axes take their
absmax first (:func:`stat_tiles`): from an XLA reduction (``quantize_tiles``) or from a statistics pre-pass
over the same blocks (:func:`axis_partials`, the fused producers, which would otherwise materialise y).

The building blocks (:func:`plan_blocks`, :func:`tile_absmax`, :func:`scaled_block`, :func:`round_codes`,
:func:`store_codes`, :func:`store_scale`, :func:`sweep`, :func:`launch`) are shared with the fused producer
kernels (``norm_quantize.py``, ``gelu_quantize.py``): each provides only a ``load(r0, c0) -> fp32 block``.
Kernel inputs that may be dense or a QArray (dequantized in registers) are read through :class:`Operand`,
:func:`as_operand` and :func:`load_operand` (the GELU producers, the LayerNorm backward).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jq8.quant import (
    SCALE_FLOOR,
    QArray,
    QuantSpec,
    Rounding,
    quantize,
    round_half_away,
    round_stochastic,
    uniform_noise,
)
from pallas_kernels._common import cdiv, compiler_params, next_pow2, resolve_interpret

# XLA rewrites the reference's ``amax / 127`` as ``amax * (1 / 127)``; the kernel mirrors it bit for bit.
INV_QMAX8 = np.float32(1.0) / np.float32(127.0)
QMAX8 = 127.0

Tile = tuple[int, int]  # (rows, cols) of x covered by one scale; -1 = the whole axis


# ------------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    """Launch configuration of the elementwise-quantize kernels (hashable: a static jit argument).

    block_m, block_n: preferred block of x per program (powers of two; grown to fit a quantization tile,
      shrunk to the register budget). max_block_elems: register budget of one loaded block, in elements.
    num_warps: None picks :func:`default_warps` for the planned block.
    xla_column_stats_rows: tiles spanning all M rows (per-column, or per-row of x.T) over more rows than
      this get their absmax first (``quantize_tiles``: an XLA column reduction; the fused GELU producers:
      the :func:`axis_partials` pre-pass), so the kernel keeps a full grid instead of a few programs
      sweeping whole columns.
    xla_row_stats_cols: when the outputs need whole rows AND whole columns (per-row codes with a per-row
      copy of x.T: the int8-row policy) and the columns take their absmax first, row tiles over more
      columns than this do too, so one full-grid pass writes both layouts. Whole rows in every program
      instead ran at 290-410 GB/s at 16384 x 768 on the H100, the pre-pass route at 430-1015 GB/s
      (``benchmarks/quantize_kernels.py``, BENCHMARKS.md).
    prepass_axis_stats: when both whole rows and whole columns take their absmax first, ``quantize_tiles``
      computes both in one Pallas pre-pass over x (:func:`axis_partials`) instead of two XLA reductions
      (each its own read of x).
    materialize_producer: a fused producer whose statistics pre-pass runs and whose value is rounded to a
      16-bit dtype (the GELU backward's dx in the gradient's dtype) writes that value from the pre-pass;
      the quantize pass is then a plain quantize of it, instead of reading the inputs again and
      recomputing (GELU' is an erf and an exp per element, and the inputs are more bytes). The codes are
      the same either way.
    row_block_elems: when every tile is a whole row (per-token codes, LayerNorm statistics) and there are
      at least ``ROW_BLOCK_MIN_ROWS`` rows, each program takes max(1, row_block_elems // next_pow2(N))
      rows (capped by max_block_elems) and :func:`default_warps` gives it 4 warps (2 above 2048 elements).
      Measured on the H100 at M = 8192 (BENCHMARKS.md, ``benchmarks/prefill_producers.py``):
      LayerNorm-quantize of 1600 fp32 columns 42.3 -> 39.1 us, per-token quantize of 6400 bf16 columns
      81.9 -> 69.1 us, at or near a plain copy of the same input. None: the block_m / budget planning.
    """

    block_m: int = 32
    block_n: int = 256
    num_warps: int | None = None  # None: about 32 elements per thread (see default_warps)
    num_stages: int = 1
    max_block_elems: int = 16384
    xla_column_stats_rows: int = 1024
    xla_row_stats_cols: int = 128
    row_block_elems: int | None = 2048
    prepass_axis_stats: bool = True
    materialize_producer: bool = True


# Blocks of both passes when a statistics pre-pass runs (whole rows and whole columns: the int8-row policy),
# measured on the H100 against the default 32 x 256 on 8 warps. GELU producers at 16384 x 16384
# (``benchmarks/row_producers.py``, BENCHMARKS.md): forward 2.09 -> 1.61 ms, backward 3.12 ->
# 2.22 ms. quantize_tiles at 16384 x 4096 / 12288 bf16 (``benchmarks/quantize_kernels.py``):
# 1205-1306 -> 1300-1418 GB/s round-to-nearest, 1030-1101 -> 1080-1156 GB/s stochastic.
AXIS_STATS_CONFIG = QuantizeConfig(block_m=32, block_n=128, num_warps=4)


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """How (M, N) is cut into program blocks (static).

    bm, bn: the loaded block. loop_axis: None when each program loads one block; 0 / 1 when each program
    sweeps that whole axis in chunks of bm / bn (the grid then has one program along it).
    """

    m: int
    n: int
    bm: int
    bn: int
    loop_axis: int | None = None
    row_blocks: bool = False  # planned by QuantizeConfig.row_block_elems (few rows, many programs)

    @property
    def grid(self) -> tuple[int, int]:
        return (
            1 if self.loop_axis == 0 else cdiv(self.m, self.bm),
            1 if self.loop_axis == 1 else cdiv(self.n, self.bn),
        )

    @property
    def num_chunks(self) -> int:
        if self.loop_axis is None:
            return 1
        return cdiv(self.m, self.bm) if self.loop_axis == 0 else cdiv(self.n, self.bn)


FEW_PROGRAMS = 132  # fewer programs than the H100's SMs: each one's latency is the kernel's time
ROW_BLOCK_MIN_ROWS = 8 * FEW_PROGRAMS  # QuantizeConfig.row_block_elems applies from this many rows


def default_warps(plan: BlockPlan) -> int:
    """About 32 elements per thread (four 16-byte bf16 vectors), between 2 and 8 warps; with fewer programs
    than SMs (a decode token's one-row producers) about 4 elements per thread, 4 to 16 warps: measured at
    M = 1 on H100, 16 warps take LayerNorm-quantize of 1600 columns from 2.8 to 2.1 us and GELU-quantize of
    6400 from 6.0 to 5.2 us (benchmarks/decode_producers.py, BENCHMARKS.md)."""
    elems = plan.bm * plan.bn
    if plan.row_blocks:
        return 4 if elems <= 2048 else 2
    if cdiv(plan.m, plan.bm) * cdiv(plan.n, plan.bn) < FEW_PROGRAMS:
        return min(16, max(4, next_pow2(elems // 128)))
    warps = 2
    while warps < 8 and elems > 32 * 32 * warps:
        warps *= 2
    return warps


def x_tile(spec: QuantSpec, m: int, n: int, transposed: bool = False) -> Tile:
    """``spec``'s tile in the coordinates of x (M, N), -1 for a whole axis.

    With ``transposed`` the spec applies to x.T (N, M), so its (rows, cols) tile covers (cols, rows) of x.
    Tiles that are not a whole axis must be powers of two (they become register sub-blocks).
    """
    if spec.bits != 8 or not spec.symmetric:
        raise NotImplementedError(
            f"the Pallas quantize kernels write symmetric INT8 only, got {spec}; use jq8.quant.quantize "
            "(the jnp path) for INT4 / asymmetric offline weight quantization."
        )
    rows, cols = (n, m) if transposed else (m, n)
    tm, tn = spec.resolve(rows, cols)
    tile = (-1 if tm >= rows else tm, -1 if tn >= cols else tn)
    for t in tile:
        if t != -1 and t & (t - 1):
            raise NotImplementedError(
                f"tile {spec.tile} of {spec}: in-kernel tile sizes must be powers of two (or a whole axis); "
                "use jq8.quant.quantize for other sizes."
            )
    return (tile[1], tile[0]) if transposed else tile


def plan_blocks(m: int, n: int, tiles: Sequence[Tile], config: QuantizeConfig) -> BlockPlan:
    """Chooses the block so that every tile in ``tiles`` (x coordinates) lies inside one program.

    Raises ValueError when two whole-axis tiles (one per axis) need more than the register budget.
    """
    dims = (m, n)
    req = [1, 1]
    whole = [False, False]
    for tile in tiles:
        for axis, t in enumerate(tile):
            if t == -1:
                whole[axis] = True
            else:
                req[axis] = max(req[axis], t)
    budget = max(config.max_block_elems, req[0] * req[1])
    pref = (config.block_m, config.block_n)
    free = [max(req[a], min(pref[a], next_pow2(dims[a]))) for a in (0, 1)]
    full = [max(req[a], next_pow2(dims[a])) for a in (0, 1)]
    row_blocks = config.row_block_elems is not None and whole == [False, True] and req[0] == 1
    row_blocks = row_blocks and m >= ROW_BLOCK_MIN_ROWS
    if row_blocks:  # few whole rows per program, many programs (see QuantizeConfig.row_block_elems)
        budget = min(budget, max(config.row_block_elems, full[1]))
        row_blocks = full[1] <= budget  # else the rows are swept in chunks as before

    def shrink(b: list[int], order: Sequence[int]) -> list[int]:
        for a in order:
            while b[0] * b[1] > budget and b[a] > req[a]:
                b[a] //= 2
        return b

    b = shrink([full[a] if whole[a] else free[a] for a in (0, 1)], [a for a in (0, 1) if not whole[a]])
    # Whole columns with only a few of them per program would load strided, uncoalesced columns: sweeping
    # the rows in (bm, >= 64)-wide chunks is faster (x is read twice, but coalesced).
    narrow = whole[0] and not whole[1] and b[1] < min(free[1], 64)
    if b[0] * b[1] <= budget and not narrow:
        return BlockPlan(m, n, b[0], b[1], None, row_blocks)
    for a in sorted((a for a in (0, 1) if whole[a]), key=lambda a: -dims[a]):
        other = 1 - a
        b = [0, 0]
        b[a] = free[a]
        b[other] = full[other] if whole[other] else free[other]
        b = shrink(b, [a] if whole[other] else [a, other])
        if b[0] * b[1] <= budget:
            return BlockPlan(m, n, b[0], b[1], a)
    if narrow:
        return BlockPlan(m, n, *shrink([full[0], free[1]], [1]), None)
    raise ValueError(
        f"tiles {list(tiles)} on a ({m}, {n}) array need whole rows and whole columns in one program "
        f"(over the {budget}-element block budget); quantize each layout in its own call."
    )


# ---------------------------------------------------------------------------- in-kernel building blocks


def block_tile(tile: Tile, bm: int, bn: int) -> Tile:
    """The tile inside a (bm, bn) block: a whole-axis tile spans the block."""
    return (bm if tile[0] == -1 else tile[0], bn if tile[1] == -1 else tile[1])


def _tile_max(a: jax.Array, rt: int, ct: int) -> jax.Array:
    bm, bn = a.shape
    if ct == bn:
        a = jnp.max(a, axis=1, keepdims=True)
    elif ct > 1:
        a = jnp.max(a.reshape(bm, bn // ct, ct), axis=2)
    if rt == bm:
        a = jnp.max(a, axis=0, keepdims=True)
    elif rt > 1:
        a = jnp.max(a.reshape(bm // rt, rt, a.shape[1]), axis=1)
    return a


def tile_absmax(a: jax.Array, rt: int, ct: int) -> jax.Array:
    """a: (bm, bn) fp32 |x| -> (bm / rt, bn / ct) max over each (rt, ct) sub-block, NaN if any is NaN.

    Reduced as int32 bit patterns: for non-negative floats the integer order is the float order, and a
    (sign-cleared) NaN sorts above inf. So one integer max keeps jq8.quant's contract (a tile holding NaN
    gets a NaN scale), which a float max would not: Triton lowers it to the NaN-ignoring ``maxnumf``, and
    XLA:CPU's fast min/max ignores NaN too.
    """
    bits = _tile_max(lax.bitcast_convert_type(a, jnp.int32), rt, ct)
    return lax.bitcast_convert_type(bits, jnp.float32)


def nan_max(a: jax.Array, b: jax.Array) -> jax.Array:
    """Elementwise max that propagates NaN (Triton's max does not)."""
    return jnp.where((a != a) | (b != b), jnp.nan, jnp.maximum(a, b))


def expand_tile(s: jax.Array, rt: int, ct: int, bm: int, bn: int) -> jax.Array:
    """Inverse of :func:`tile_absmax`'s grid: (bm / rt, bn / ct) -> (bm, bn), each value over its tile."""
    if 1 < ct < bn:
        g = s.shape[0]
        s = jnp.broadcast_to(s[:, :, None], (g, bn // ct, ct)).reshape(g, bn)
    if 1 < rt < bm:
        k = s.shape[1]
        s = jnp.broadcast_to(s[:, None, :], (bm // rt, rt, k)).reshape(bm, k)
    return jnp.broadcast_to(s, (bm, bn))


def div_rn(a: jax.Array, b: jax.Array, interpret: bool) -> jax.Array:
    """Correctly rounded fp32 a / b (what XLA computes); Triton's ``/`` is approximate on the GPU."""
    b = jnp.broadcast_to(b, a.shape)
    if interpret:
        # The barrier stops XLA rewriting ``a / broadcast(b)`` as ``a * broadcast(1 / b)`` (not exact).
        return a / lax.optimization_barrier(b)
    return plgpu.elementwise_inline_asm(
        "div.rn.f32 $0, $1, $2;",
        args=[a, b],
        constraints="=f,f,f",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)],
    )[0]


def scale_from_absmax(amax: jax.Array) -> jax.Array:
    """Per-tile scale, exactly as jq8.quant.tile_stats computes it for symmetric INT8 (NaN stays NaN)."""
    return jnp.where(amax != amax, amax, jnp.maximum(amax * INV_QMAX8, SCALE_FLOOR))


def to_codes(y: jax.Array) -> jax.Array:
    """fp32 rounded values -> int8 codes in [-127, 127]; NaN -> 0 (the tile's scale carries the NaN)."""
    y = jnp.where(y != y, 0.0, y)
    return jnp.clip(y, -QMAX8, QMAX8).astype(jnp.int8)


@dataclasses.dataclass(frozen=True)
class OutSpec:
    """One quantized output of a kernel: its tile in x coordinates, and whether it is the (N, M) copy."""

    tile: Tile
    transposed: bool = False


def scaled_block(
    x: jax.Array, amax: jax.Array, tile: Tile, plan: BlockPlan, interpret: bool
) -> tuple[jax.Array, jax.Array]:
    """(scale (bm/rt, bn/ct), x / scale (bm, bn)) for the block x given its tiles' absmax."""
    rt, ct = block_tile(tile, plan.bm, plan.bn)
    scale = scale_from_absmax(amax)
    # jq8.quant multiplies by the correctly rounded per-tile reciprocal: one division per tile, not element.
    inv = div_rn(jnp.ones_like(scale), scale, interpret)
    return scale, x * expand_tile(inv, rt, ct, plan.bm, plan.bn)


def round_codes(y: jax.Array, r0, c0, plan: BlockPlan, *, rounding: Rounding, seed, transposed: bool):
    """x / scale (bm, bn) -> int8 codes, rounded as jq8.quant rounds them.

    Stochastic noise is indexed by GLOBAL coordinates -- of x.T for the transposed copy, as quantize(x.T)
    draws it -- so every program (and each layout) gets its own noise.
    """
    if rounding == "nearest":
        return to_codes(round_half_away(y))
    if rounding != "stochastic":
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    rows = r0 + jnp.arange(plan.bm, dtype=jnp.int32)[:, None]
    cols = c0 + jnp.arange(plan.bn, dtype=jnp.int32)[None, :]
    u = uniform_noise(seed, cols, rows) if transposed else uniform_noise(seed, rows, cols)
    return to_codes(round_stochastic(y, u))


def store_codes(codes_ref, codes: jax.Array, r0, c0, plan: BlockPlan, transposed: bool) -> None:
    """Masked store of the (bm, bn) codes at (r0, c0) of x, or transposed at (c0, r0) of the (N, M) copy."""
    bm, bn = plan.bm, plan.bn
    if transposed:  # mask built in the (bn, bm) layout: no transposes of boolean tensors
        tmask = (c0 + jnp.arange(bn, dtype=jnp.int32)[:, None] < plan.n) & (
            r0 + jnp.arange(bm, dtype=jnp.int32)[None, :] < plan.m
        )
        plgpu.store(codes_ref.at[pl.ds(c0, bn), pl.ds(r0, bm)], codes.T, mask=tmask)
    else:
        plgpu.store(codes_ref.at[pl.ds(r0, bm), pl.ds(c0, bn)], codes, mask=block_mask(r0, c0, plan))


def store_scale(scale_ref, scale: jax.Array, sr0, sc0, transposed: bool, enabled=None) -> None:
    """Stores a (gr, gc) block of scales (x coordinates) at scale-grid origin (sr0, sc0), masked
    (and only where the scalar ``enabled`` holds, when given)."""
    gs = scale.shape
    if transposed:
        mask = (sc0 + jnp.arange(gs[1], dtype=jnp.int32)[:, None] < scale_ref.shape[0]) & (
            sr0 + jnp.arange(gs[0], dtype=jnp.int32)[None, :] < scale_ref.shape[1]
        )
        ref, val = scale_ref.at[pl.ds(sc0, gs[1]), pl.ds(sr0, gs[0])], scale.T
    else:
        mask = (sr0 + jnp.arange(gs[0], dtype=jnp.int32)[:, None] < scale_ref.shape[0]) & (
            sc0 + jnp.arange(gs[1], dtype=jnp.int32)[None, :] < scale_ref.shape[1]
        )
        ref, val = scale_ref.at[pl.ds(sr0, gs[0]), pl.ds(sc0, gs[1])], scale
    plgpu.store(ref, val, mask=mask if enabled is None else mask & enabled)


def axis_absmax(x: jax.Array, tile: Tile) -> jax.Array:
    """Absmax of tiles spanning a whole axis, by XLA outside the kernels: (M, N) float ->
    (1, cdiv(N, ct)) f32 for tile (-1, ct), or (cdiv(M, rt), 1) for tile (rt, -1).

    Reduced on int32 bit patterns like :func:`tile_absmax`: exact, NaN-preserving on every backend.
    """
    whole = 0 if tile[0] == -1 else 1
    bits = lax.bitcast_convert_type(jnp.abs(x.astype(jnp.float32)), jnp.int32).max(axis=whole)
    t = tile[1 - whole]
    g = cdiv(bits.shape[0], t)
    bits = jnp.pad(bits, (0, g * t - bits.shape[0])).reshape(g, t).max(axis=1)
    amax = lax.bitcast_convert_type(bits, jnp.float32)
    return amax[None, :] if whole == 0 else amax[:, None]


def _load_axis_amax(ref, r0, c0, tile: Tile, plan: BlockPlan) -> jax.Array:
    """The block's slice of an :func:`axis_absmax` array: (1, bn / ct) at column c0 for a column tile,
    (bm / rt, 1) at row r0 for a row tile."""
    if tile[0] == -1:
        g = plan.bn // tile[1]
        idx = c0 // tile[1] + jnp.arange(g, dtype=jnp.int32)
        return plgpu.load(
            ref.at[pl.ds(0, 1), pl.ds(c0 // tile[1], g)], mask=(idx < ref.shape[1])[None, :], other=0.0
        )
    g = plan.bm // tile[0]
    idx = r0 // tile[0] + jnp.arange(g, dtype=jnp.int32)
    return plgpu.load(
        ref.at[pl.ds(r0 // tile[0], g), pl.ds(0, 1)], mask=(idx < ref.shape[0])[:, None], other=0.0
    )


LoadFn = Callable[[jax.Array, jax.Array], jax.Array]


def partial_shapes(tiles: Sequence[Tile], plan: BlockPlan) -> list[jax.ShapeDtypeStruct]:
    """Shapes of :func:`axis_partials`' outputs: per program block, one absmax per tile row (a whole-row
    tile (rt, -1): (grid_m * bm / rt, grid_n)) or per tile column ((-1, ct): (grid_m, grid_n * bn / ct))."""
    gm, gn = plan.grid
    shapes = [(gm * plan.bm // t[0], gn) if t[1] == -1 else (gm, gn * plan.bn // t[1]) for t in tiles]
    return [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]


def axis_partials(load: LoadFn, tiles: Sequence[Tile], refs, plan: BlockPlan, sum_ref=None, *,
                  round_to=None, value_ref=None) -> None:
    """Kernel body of the statistics pre-pass: this program's absmax of each whole-axis tile, over its block.

    A producer that needs whole rows AND whole columns (per-row codes of y and of y.T) would otherwise
    sweep one axis with few programs, or have XLA reduce a materialised y. Here every program loads its
    block once and writes one partial absmax per tile row / column; :func:`finish_partials` reduces them.
    sum_ref: optional (grid_m, grid_n * bn) f32, this block's column sums of y (a bias gradient rides along
    the same read; :func:`finish_column_sum` adds them up).
    round_to: a float dtype: the absmax is of y rounded to it (the sums stay of the fp32 y). value_ref:
    optional (M, N) output in that dtype, where y rounded is written, for a plain quantize pass to read.
    """
    pid = (pl.program_id(0), pl.program_id(1))
    r0, c0 = pid[0] * plan.bm, pid[1] * plan.bn
    y = load(r0, c0)
    if sum_ref is not None:
        plgpu.store(sum_ref.at[pl.ds(pid[0], 1), pl.ds(c0, plan.bn)], jnp.sum(y, axis=0, keepdims=True))
    if round_to is not None:
        y = y.astype(round_to)
        if value_ref is not None:
            mask = block_mask(r0, c0, plan)
            plgpu.store(value_ref.at[pl.ds(r0, plan.bm), pl.ds(c0, plan.bn)], y, mask=mask)
        y = y.astype(jnp.float32)
    a = jnp.abs(y)
    for t, ref in zip(tiles, refs):
        if t[1] == -1:
            rt = t[0]
            plgpu.store(ref.at[pl.ds(r0 // rt, plan.bm // rt), pl.ds(pid[1], 1)], tile_absmax(a, rt, plan.bn))
        else:
            ct = t[1]
            plgpu.store(ref.at[pl.ds(pid[0], 1), pl.ds(c0 // ct, plan.bn // ct)], tile_absmax(a, plan.bm, ct))


def finish_partials(partial: jax.Array, tile: Tile, m: int, n: int) -> jax.Array:
    """:func:`axis_partials`' output -> the :func:`axis_absmax` array of ``tile``: (cdiv(M, rt), 1) for
    (rt, -1), (1, cdiv(N, ct)) for (-1, ct). Reduced on int32 bit patterns (NaN-preserving)."""
    bits = lax.bitcast_convert_type(partial, jnp.int32)
    if tile[1] == -1:
        bits = bits.max(axis=1, keepdims=True)[: cdiv(m, tile[0])]
    else:
        bits = bits.max(axis=0, keepdims=True)[:, : cdiv(n, tile[1])]
    return lax.bitcast_convert_type(bits, jnp.float32)


def finish_column_sum(partial: jax.Array, n: int) -> jax.Array:
    """:func:`axis_partials`' column-sum output (grid_m, >= N) -> the (N,) f32 column sums."""
    return jnp.sum(partial, axis=0)[:n]


def producer_axis_stats(
    kernel, operands: Sequence[jax.Array], tiles: Sequence[Tile], plan: BlockPlan, config: QuantizeConfig,
    *, interpret: bool, name: str, column_sum: bool = False, extra_outputs: Sequence = (),
    extra_aliases: dict[int, int] | None = None,
) -> tuple:  # fmt: skip
    """Runs the statistics pre-pass ``kernel(*operand_refs, *partial_refs[, sum_ref], *extra_refs)`` (a body
    calling :func:`axis_partials`) over ``plan``'s grid. Returns (one :func:`axis_absmax`-shaped array per
    tile, the (N,) f32 column sums with ``column_sum`` else None, *the ``extra_outputs`` arrays).
    extra_aliases: {operand index: index into extra_outputs} written over that operand's buffer."""
    shapes = partial_shapes(tiles, plan)
    if column_sum:
        shapes.append(jax.ShapeDtypeStruct((plan.grid[0], plan.grid[1] * plan.bn), jnp.float32))
    aliases = {i: len(shapes) + j for i, j in (extra_aliases or {}).items()}
    outs = launch(kernel, operands, [*shapes, *extra_outputs], plan, config, interpret=interpret,
                  poison=False, name=name, aliases=aliases)
    partials, extras = outs[: len(shapes)], outs[len(shapes) :]
    stats = [finish_partials(p, t, plan.m, plan.n) for p, t in zip(partials, tiles)]
    return (stats, (finish_column_sum(partials[-1], plan.n) if column_sum else None), *extras)


def stat_tiles(tiles: Sequence[Tile], m: int, n: int, config: QuantizeConfig) -> tuple[Tile, ...]:
    """The whole-axis tiles whose absmax is computed before the kernel (see QuantizeConfig): for
    ``quantize_tiles`` by XLA, or by the :func:`axis_partials` pre-pass when whole rows and whole columns
    both are (``QuantizeConfig.prepass_axis_stats``); always by the pre-pass for the fused producers."""
    cols = [t for t in tiles if t[0] == -1 and t[1] != -1]
    rows = [t for t in tiles if t[1] == -1 and t[0] != -1]
    out = cols if m > config.xla_column_stats_rows else []
    if out and rows and n > config.xla_row_stats_cols:
        out = out + rows
    return tuple(dict.fromkeys(out))


def plan_tile(tile: Tile, stats: Sequence[Tile]) -> Tile:
    """The tile the block plan must hold: a tile with XLA statistics needs no whole axis in a program."""
    if tile not in stats:
        return tile
    return (1, tile[1]) if tile[0] == -1 else (tile[0], 1)


def scale_origin(tile: Tile, r0, c0, plan: BlockPlan):
    """Scale-grid origin of the block at (r0, c0): a whole axis has one scale (index 0)."""
    rt, ct = block_tile(tile, plan.bm, plan.bn)
    return (0 if tile[0] == -1 else r0 // rt, 0 if tile[1] == -1 else c0 // ct)


def block_mask(r0: jax.Array, c0: jax.Array, plan: BlockPlan) -> jax.Array:
    rows = r0 + jnp.arange(plan.bm, dtype=jnp.int32)[:, None]
    cols = c0 + jnp.arange(plan.bn, dtype=jnp.int32)[None, :]
    return (rows < plan.m) & (cols < plan.n)


@dataclasses.dataclass(frozen=True)
class Operand:
    """How a kernel input is read: a dense float (M, N) array, a QArray of tile (x coordinates), or a bias."""

    kind: Literal["dense", "qarray", "bias"]
    tile: tuple[int, int] = (1, 1)

    @property
    def n_refs(self) -> int:
        return 2 if self.kind == "qarray" else 1

    @property
    def requirement(self) -> tuple[int, int]:
        """Block divisibility it imposes: its tile, with a whole axis imposing nothing (one scale)."""
        return tuple(1 if t == -1 else t for t in self.tile) if self.kind == "qarray" else (1, 1)


def as_operand(a, m: int, n: int) -> tuple[Operand, list[jax.Array]]:
    """(how to read ``a``, the arrays the kernel takes for it): a QArray of (M, N) symmetric INT8 codes
    (codes and scales), or a dense float (M, N) array. Raises ValueError on another shape or dtype."""
    if isinstance(a, QArray):
        if a.shape_2d != (m, n) or a.values.dtype != jnp.int8:
            raise ValueError(
                f"QArray operand must hold ({m}, {n}) int8 codes, got {a.shape} {a.values.dtype}"
            )
        return Operand("qarray", x_tile(a.spec, m, n)), [a.values.reshape(m, n), a.scale]
    a = jnp.asarray(a)
    if a.shape != (m, n) or not jnp.issubdtype(a.dtype, jnp.floating):
        raise ValueError(f"dense operand must be a float ({m}, {n}) array, got {a.shape} {a.dtype}")
    return Operand("dense"), [a]


def load_operand(op: Operand, refs, r0, c0, plan: BlockPlan) -> jax.Array:
    """The (bm, bn) fp32 block of an operand at (r0, c0); 0 outside the array.

    A QArray's tile may be larger than the block (a few rows of 32 x 32 blocks, a column chunk of a wide
    group): tile and block sizes are powers of two and the origin a multiple of the block, so the block then
    lies inside one tile row / column and needs one scale along that axis.
    """
    mask = block_mask(r0, c0, plan)
    if op.kind == "bias":
        cmask = c0 + jnp.arange(plan.bn, dtype=jnp.int32) < plan.n
        return plgpu.load(refs[0].at[pl.ds(c0, plan.bn)], mask=cmask, other=0.0).astype(jnp.float32)[None, :]
    v = plgpu.load(refs[0].at[pl.ds(r0, plan.bm), pl.ds(c0, plan.bn)], mask=mask, other=0)
    v = v.astype(jnp.float32)
    if op.kind == "dense":
        return v
    rt, ct = block_tile(op.tile, plan.bm, plan.bn)
    rb, cb = min(rt, plan.bm), min(ct, plan.bn)  # the tile's extent inside this block
    gr, gc = plan.bm // rb, plan.bn // cb
    sr0 = 0 if op.tile[0] == -1 else r0 // rt
    sc0 = 0 if op.tile[1] == -1 else c0 // ct
    srows = sr0 + jnp.arange(gr, dtype=jnp.int32)[:, None]
    scols = sc0 + jnp.arange(gc, dtype=jnp.int32)[None, :]
    smask = (srows < refs[1].shape[0]) & (scols < refs[1].shape[1])
    s = plgpu.load(refs[1].at[pl.ds(sr0, gr), pl.ds(sc0, gc)], mask=smask, other=0.0)
    return jnp.where(mask, v * expand_tile(s, rb, cb, plan.bm, plan.bn), 0.0)


def sweep(
    load: LoadFn,
    outs: Sequence[OutSpec],
    out_refs: Sequence,
    plan: BlockPlan,
    *,
    rounding: Rounding,
    seed,
    interpret: bool,
    axis_amax: dict | None = None,
) -> None:
    """The kernel body shared by every quantize kernel: quantize this program's region into ``outs``.

    load(r0, c0) -> (bm, bn) fp32 block at global origin (r0, c0), with out-of-range elements set to 0
    (0 never raises an absmax). out_refs: (codes_ref, scale_ref) per output, flattened.
    axis_amax: {tile (-1, ct) or (rt, -1): ref} absmax of tiles spanning a whole axis, computed beforehand
    (see :func:`axis_absmax`); the program's block then needs no whole columns / rows.
    Outputs with the same tile in x coordinates (e.g. 32x32 blocks and their transposed copy) share the
    absmax, the division and, for round-to-nearest, the codes.
    """
    axis_amax = axis_amax or {}
    pid = (pl.program_id(0), pl.program_id(1))
    tiles = list(dict.fromkeys(o.tile for o in outs))  # distinct tiles, in order

    def origin(k):
        r0 = (k if plan.loop_axis == 0 else pid[0]) * plan.bm
        c0 = (k if plan.loop_axis == 1 else pid[1]) * plan.bn
        return r0, c0

    def is_swept(tile: Tile) -> bool:
        return plan.loop_axis is not None and tile[plan.loop_axis] == -1

    def emit_all(x, r0, c0, swept_amax):
        a = jnp.abs(x)
        per_tile = {}
        for t in tiles:
            if t in axis_amax:
                amax = _load_axis_amax(axis_amax[t], r0, c0, t, plan)
            elif is_swept(t):
                amax = swept_amax[t]
            else:
                amax = tile_absmax(a, *block_tile(t, plan.bm, plan.bn))
            scale, y = scaled_block(x, amax, t, plan, interpret)
            nearest = None
            if rounding == "nearest":  # deterministic: the transposed copy reuses these codes
                nearest = round_codes(y, r0, c0, plan, rounding=rounding, seed=seed, transposed=False)
            per_tile[t] = (scale, y, nearest)
        for i, out in enumerate(outs):
            scale, y, codes = per_tile[out.tile]
            if codes is None:
                codes = round_codes(y, r0, c0, plan, rounding=rounding, seed=seed, transposed=out.transposed)
            store_codes(out_refs[2 * i], codes, r0, c0, plan, out.transposed)
            if not is_swept(out.tile):
                # axis-stat scales are the same in every program along that axis: the first block writes them
                first = None
                if out.tile in axis_amax:
                    first = (r0 == 0) if out.tile[0] == -1 else (c0 == 0)
                store_scale(
                    out_refs[2 * i + 1],
                    scale,
                    *scale_origin(out.tile, r0, c0, plan),
                    out.transposed,
                    enabled=first,
                )

    if plan.loop_axis is None:
        r0, c0 = origin(0)
        emit_all(load(r0, c0), r0, c0, {})
        return

    # Sweep: pass 1 reduces the absmax of tiles that span the swept axis, pass 2 quantizes.
    swept = [t for t in tiles if is_swept(t)]

    def absmax_body(k, accs):
        r0, c0 = origin(k)
        a = jnp.abs(load(r0, c0))
        return tuple(
            nan_max(acc, tile_absmax(a, *block_tile(t, plan.bm, plan.bn))) for acc, t in zip(accs, swept)
        )

    def acc_shape(t):
        rt, ct = block_tile(t, plan.bm, plan.bn)
        return (plan.bm // rt, plan.bn // ct)

    init = tuple(jnp.zeros(acc_shape(t), jnp.float32) for t in swept)
    swept_amax = dict(zip(swept, lax.fori_loop(0, plan.num_chunks, absmax_body, init) if swept else ()))
    r0, c0 = origin(0)
    for i, out in enumerate(outs):  # one scale per swept tile: written once, at the sweep's origin
        if is_swept(out.tile):
            scale = scale_from_absmax(swept_amax[out.tile])
            store_scale(out_refs[2 * i + 1], scale, *scale_origin(out.tile, r0, c0, plan), out.transposed)

    @pl.loop(0, plan.num_chunks)
    def _(k):
        r0, c0 = origin(k)
        emit_all(load(r0, c0), r0, c0, swept_amax)


def out_shapes(m: int, n: int, specs: Sequence[tuple[QuantSpec, bool]]) -> list[jax.ShapeDtypeStruct]:
    """(codes, scale) ShapeDtypeStructs per (spec, transposed) output."""
    shapes = []
    for spec, transposed in specs:
        rows, cols = (n, m) if transposed else (m, n)
        shapes.append(jax.ShapeDtypeStruct((rows, cols), jnp.int8))
        shapes.append(jax.ShapeDtypeStruct(spec.scale_shape(rows, cols), jnp.float32))
    return shapes


def poisoned(shapes: Sequence[jax.ShapeDtypeStruct]) -> list[jax.Array]:
    """Output buffers prefilled with values no kernel writes (-128 codes, NaN scales), for write checks."""
    return [jnp.full(s.shape, -128 if s.dtype == jnp.int8 else jnp.nan, s.dtype) for s in shapes]


def launch(
    kernel,
    operands: Sequence[jax.Array],
    shapes: Sequence[jax.ShapeDtypeStruct],
    plan: BlockPlan,
    config: QuantizeConfig,
    *,
    interpret: bool,
    poison: bool,
    name: str,
    aliases: dict[int, int] | None = None,
) -> list[jax.Array]:
    """pallas_call over whole-array refs; with ``poison`` the outputs start as :func:`poisoned` buffers
    (aliased inputs the kernel ignores), so any element a kernel fails to write stays visible.
    aliases: {operand index: output index} whose buffer the output reuses (no poison for those)."""
    aliases = aliases or {}
    prefill = poisoned(shapes) if poison and not aliases else []
    n_in = len(operands)

    def body(*refs):
        kernel(*refs[:n_in], *refs[n_in + len(prefill) :])

    return pl.pallas_call(
        body,
        grid=plan.grid,
        out_shape=list(shapes),
        compiler_params=compiler_params(config.num_warps or default_warps(plan), config.num_stages),
        interpret=interpret,
        input_output_aliases={n_in + i: i for i in range(len(prefill))} | aliases,
        name=name,
    )(*operands, *prefill)


def as_seed(seed: jax.Array | None, rounding: Rounding) -> jax.Array:
    """The (2,) uint32 seed operand every kernel takes (zeros, unused, for nearest rounding)."""
    if rounding == "stochastic":
        if seed is None:
            raise ValueError("rounding='stochastic' needs seed= (jq8.quant.noise_seed(key), (2,) uint32)")
        return jnp.asarray(seed, jnp.uint32).reshape(2)
    if rounding != "nearest":
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    return jnp.zeros((2,), jnp.uint32)


def load_seed(seed_ref, rounding: Rounding):
    return (seed_ref[0], seed_ref[1]) if rounding == "stochastic" else None


# ------------------------------------------------------------------------------------------- the kernel


def _block_loader(x_refs, plan: BlockPlan) -> LoadFn:
    """load(r0, c0) of x, given as one ref or as equal-width column parts side by side (x = concatenate(
    parts, axis=1), each part's width a multiple of bn: a block lies in one part)."""
    if len(x_refs) == 1:
        def load(r0, c0):
            x = plgpu.load(
                x_refs[0].at[pl.ds(r0, plan.bm), pl.ds(c0, plan.bn)], mask=block_mask(r0, c0, plan), other=0.0
            )
            return x.astype(jnp.float32)

        return load
    width = plan.n // len(x_refs)

    def load_parts(r0, c0):
        # Every part is loaded under a mask that is false outside the block's own part: no memory traffic
        # for the others, and no branch.
        part, mask = c0 // width, block_mask(r0, c0, plan)
        x = None
        for i, ref in enumerate(x_refs):
            block = ref.at[pl.ds(r0, plan.bm), pl.ds(c0 - i * width, plan.bn)]
            v = plgpu.load(block, mask=mask & (part == i), other=0.0).astype(jnp.float32)
            x = v if x is None else jnp.where(part == i, v, x)
        return x

    return load_parts


def quantize_kernel(seed_ref, *refs, plan, outs, axis_tiles, rounding, interpret, n_parts: int = 1):
    """Kernel body of ``quantize_tiles``' quantize pass: x's block from the first ``n_parts`` refs (x, or its
    column parts), whole-axis absmax from the refs after them (one per ``axis_tiles`` entry), then the
    outputs."""
    x_refs, refs = refs[:n_parts], refs[n_parts:]
    axis_amax = dict(zip(axis_tiles, refs[: len(axis_tiles)]))
    out_refs = refs[len(axis_tiles) :]
    seed = load_seed(seed_ref, rounding)
    sweep(_block_loader(x_refs, plan), outs, out_refs, plan, rounding=rounding, seed=seed,
          interpret=interpret, axis_amax=axis_amax)


def _absmax_kernel(*refs, plan, axis_tiles, column_sum, n_parts):
    x_refs, partial_refs = refs[:n_parts], refs[n_parts:]
    sum_ref = partial_refs[-1] if column_sum else None
    axis_partials(_block_loader(x_refs, plan), axis_tiles, partial_refs[: len(axis_tiles)], plan, sum_ref)


def _axis_stats(parts: Sequence[jax.Array], axis_tiles: tuple[Tile, ...], plan: BlockPlan,
                config: QuantizeConfig, interpret: bool, column_sum: bool) -> tuple:
    """(the :func:`axis_absmax` array of every tile in ``axis_tiles``, x's (N,) f32 column sums or None), x
    given as its column parts. Whole rows and whole columns together (the int8-row policy's x and x.T
    codes): one Pallas pre-pass reads x once for both, and for the sums; else XLA."""
    rows = any(t[1] == -1 for t in axis_tiles)
    cols = any(t[0] == -1 for t in axis_tiles)
    if rows and cols and config.prepass_axis_stats:
        kernel = functools.partial(_absmax_kernel, plan=plan, axis_tiles=axis_tiles, column_sum=column_sum,
                                   n_parts=len(parts))
        return producer_axis_stats(kernel, list(parts), axis_tiles, plan, config, interpret=interpret,
                                   name="quantize_absmax", column_sum=column_sum)
    x = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
    sums = jnp.sum(x.astype(jnp.float32), axis=0) if column_sum else None
    return [axis_absmax(x, t) for t in axis_tiles], sums


@functools.partial(
    jax.jit, static_argnames=("specs", "rounding", "config", "interpret", "poison", "column_sum")
)
def _quantize_call(parts, seed, *, specs, rounding, config, interpret, poison=False, column_sum=False):
    """parts: x (M, N), or a tuple of equal-width column parts of it (x = concatenate(parts, axis=1))."""
    parts = tuple(parts) if isinstance(parts, (tuple, list)) else (parts,)
    m, n = parts[0].shape[0], sum(p.shape[1] for p in parts)
    outs = tuple(OutSpec(x_tile(s, m, n, t), t) for s, t in specs)
    # Tiles spanning a whole long axis: absmax computed first (_axis_stats), so blocks need no whole axis.
    axis_tiles = stat_tiles([o.tile for o in outs], m, n, config)
    plan = plan_blocks(m, n, [plan_tile(o.tile, axis_tiles) for o in outs], config)
    if len(parts) > 1 and (len({p.shape for p in parts}) > 1 or parts[0].shape[1] % plan.bn):
        parts = (jnp.concatenate(parts, axis=1),)  # blocks would straddle two parts
    kernel = functools.partial(
        quantize_kernel,
        plan=plan,
        outs=outs,
        axis_tiles=axis_tiles,
        rounding=rounding,
        interpret=interpret,
        n_parts=len(parts),
    )
    stats, sums = _axis_stats(parts, axis_tiles, plan, config, interpret, column_sum)
    outs = launch(
        kernel,
        [seed, *parts, *stats],
        out_shapes(m, n, specs),
        plan,
        config,
        interpret=interpret,
        poison=poison,
        name="quantize_tiles",
    )
    return [*outs, *([sums] if column_sum else [])]


def default_config(tiles: Sequence[Tile], m: int, n: int) -> QuantizeConfig:
    """quantize_tiles' config for outputs of ``tiles`` (x coordinates) on (M, N): AXIS_STATS_CONFIG when
    whole rows and whole columns take their absmax from the pre-pass, else QuantizeConfig()."""
    stats = stat_tiles(tiles, m, n, QuantizeConfig())
    both = any(t[0] == -1 for t in stats) and any(t[1] == -1 for t in stats)
    return AXIS_STATS_CONFIG if both else QuantizeConfig()


def quantize_tiles(
    x: jax.Array | Sequence[jax.Array],
    spec: QuantSpec,
    *,
    rounding: Rounding = "nearest",
    seed: jax.Array | None = None,
    transposed_spec: QuantSpec | None = None,
    interpret: bool | None = None,
    config: QuantizeConfig | None = None,
    poison_outputs: bool = False,
    column_sum: bool = False,
) -> QArray | tuple:
    """Symmetric INT8 quantization of x in one pass; bit-exact to ``jq8.quant.quantize``.

    x: (M, N) bf16 / f32 (any rank without ``transposed_spec``: viewed as 2-D like jq8.quant), or a tuple
      of 2-D column parts of it, x = concatenate(parts, axis=1) (attention's dq, dk, dv): equal-width parts
      are read in place, no concatenated copy is written.
    spec: the tile of the codes (per-row, per-column, groups, power-of-two blocks, ...).
    rounding: "nearest" (half away from zero) or "stochastic" (needs ``seed``: noise_seed(key), (2,) uint32).
    transposed_spec: also return the codes of x.T (N, M) under this spec, written from the same loaded
      blocks; stochastic noise for it is indexed by x.T's coordinates (as quantize(x.T, seed=seed)).
    config: block / warps (default QuantizeConfig(), or AXIS_STATS_CONFIG when whole rows and whole columns
      take their absmax from the pre-pass). poison_outputs: testing aid, outputs start as
      -128 codes / NaN scales so an element the kernel never writes shows up.
    column_sum: also return x.sum(axis=0) as (N,) f32 (a bias gradient), from the statistics pre-pass's
      read of x when it runs (f32 partial sums per block, then over blocks), else from XLA.
    Returns QArray (values (M, N) int8, scale f32 ``spec.scale_shape``) or (q, qT), plus the sums last
    with ``column_sum``.
    """
    parts = _column_parts(x)
    x = parts[0]
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.ndim == 0:
        raise TypeError(f"quantize_tiles expects a floating array of rank >= 1, got {x.dtype}{x.shape}")
    if transposed_spec is not None and x.ndim != 2:
        raise ValueError(f"transposed_spec needs a 2-D x, got shape {x.shape}")
    if len(parts) > 1:
        x2 = parts
        shape = (x.shape[0], sum(p.shape[1] for p in parts))
    else:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]) if x.ndim != 2 else x
    m, n = (shape[0], shape[1]) if len(parts) > 1 else x2.shape
    interpret = resolve_interpret(interpret)
    seed_arr = as_seed(seed, rounding)
    specs = [(spec, False)] + ([(transposed_spec, True)] if transposed_spec is not None else [])
    tiles = [x_tile(s, m, n, t) for s, t in specs]
    config = config or default_config(tiles, m, n)
    stats = stat_tiles(tiles, m, n, config)  # as _quantize_call plans them
    tiles = [plan_tile(t, stats) for t in tiles]
    groups = [tuple(specs)]
    if len(specs) > 1:
        try:
            joint = plan_blocks(m, n, tiles, config)
        except ValueError:
            joint = None
        if joint is None or (joint.grid == (1, 1) and m * n > joint.bm * joint.bn):
            # e.g. per-row + per-row of x.T: one program would sweep the whole matrix; two launches
            # (each reading x once) keep the GPU busy.
            groups = [(s,) for s in specs]
    arrays = []
    for i, group in enumerate(groups):
        arrays += _quantize_call(
            x2,
            seed_arr,
            specs=group,
            rounding=rounding,
            config=config,
            interpret=interpret,
            poison=poison_outputs,
            column_sum=column_sum and i == 0,
        )
    sums = [arrays.pop(2 * len(groups[0]))] if column_sum else []  # the first call's last output
    q = QArray(arrays[0], arrays[1], None, spec, tuple(shape), x.dtype)
    if transposed_spec is None:
        return (q, *sums) if sums else q
    return (q, QArray(arrays[2], arrays[3], None, transposed_spec, (n, m), x.dtype), *sums)


def _column_parts(x) -> tuple[jax.Array, ...]:
    """x as a tuple of arrays: (x,), or its 2-D column parts (same rows and dtype), checked."""
    if not isinstance(x, (tuple, list)):
        return (jnp.asarray(x),)
    parts = tuple(jnp.asarray(p) for p in x)
    if not parts or any(p.ndim != 2 for p in parts):
        raise ValueError(f"column parts of x must be 2-D arrays, got shapes {[p.shape for p in parts]}")
    if len({p.shape[0] for p in parts}) > 1 or len({p.dtype for p in parts}) > 1:
        raise ValueError("column parts of x must share their row count and dtype, got "
                         f"{[f'{p.dtype}{p.shape}' for p in parts]}")
    return parts


def quantize_tiles_reference(
    x: jax.Array,
    spec: QuantSpec,
    *,
    rounding: Rounding = "nearest",
    seed: jax.Array | None = None,
    transposed_spec: QuantSpec | None = None,
    interpret: bool | None = None,
    config: QuantizeConfig | None = None,
    poison_outputs: bool = False,
    column_sum: bool = False,
) -> QArray | tuple:
    """Same contract as :func:`quantize_tiles`, computed by jq8.quant.quantize (the definition)."""
    del interpret, config, poison_outputs
    parts = _column_parts(x)
    x = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
    out = (quantize(x, spec, rounding=rounding, seed=seed),)
    if transposed_spec is not None:
        out += (quantize(x.T, transposed_spec, rounding=rounding, seed=seed),)
    if column_sum:
        out += (jnp.sum(x.reshape(-1, x.shape[-1]).astype(jnp.float32), axis=0),)
    return out[0] if len(out) == 1 else out
