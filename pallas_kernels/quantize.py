"""Tiled symmetric INT8 quantization as one Pallas GPU kernel (Triton lowering), plus its building blocks.

``quantize_tiles(x, spec)`` reads each (BM, BN) block of ``x`` once, reduces the absmax of every
quantization tile inside the block in registers, and writes the INT8 codes and per-tile scales; with
``transposed_spec`` it also writes the (N, M) codes of ``x.T`` (and their scales) from the same loaded
block -- the operand layout the backward GEMMs need (see kernel_api: every GEMM is "NT").

Results are bit-exact to :func:`jq8.quant.quantize`:
- the same ``round_half_away`` / ``uniform_noise`` functions run inside the kernel, the noise indexed by
  GLOBAL (row, column), so every program draws its own noise;
- ragged edges are masked loads with 0 as the fill: 0 never raises an absmax, so a partial tile's scale
  equals the reference's edge-padded one;
- ``scale = amax * (1/127)``: XLA's algebraic simplifier turns the reference's ``amax / 127`` into this
  multiply (measured, every backend), so the kernel writes the multiply explicitly;
- ``code = x / scale`` is a correctly rounded division (``div.rn.f32`` inline PTX on the GPU: Triton's own
  fp32 ``/`` is the approximate ``div.full.f32``).

Block planning: a quantization tile (in x coordinates, -1 = a whole axis) must lie inside one program's
block. Tile sizes that are not a whole axis must be powers of two. A whole-axis tile makes the block span
that axis (``next_pow2``); when that exceeds the register budget the program instead *sweeps* the axis in
chunks: one pass for the absmax, one to quantize (x is read twice, mostly from L2).

The building blocks (:func:`plan_blocks`, :func:`tile_absmax`, :func:`emit_quantized`, :func:`sweep`)
are shared with the fused producer kernels (``norm_quantize.py``, ``gelu_quantize.py``): each provides
only a ``load(r0, c0) -> fp32 block`` function.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

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
    """

    block_m: int = 32
    block_n: int = 256
    num_warps: int = 4
    num_stages: int = 1
    max_block_elems: int = 16384


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

    def shrink(b: list[int], order: Sequence[int]) -> list[int]:
        for a in order:
            while b[0] * b[1] > budget and b[a] > req[a]:
                b[a] //= 2
        return b

    b = shrink([full[a] if whole[a] else free[a] for a in (0, 1)], [a for a in (0, 1) if not whole[a]])
    if b[0] * b[1] <= budget:
        return BlockPlan(m, n, b[0], b[1], None)
    for a in sorted((a for a in (0, 1) if whole[a]), key=lambda a: -dims[a]):
        other = 1 - a
        b = [0, 0]
        b[a] = free[a]
        b[other] = full[other] if whole[other] else free[other]
        b = shrink(b, [a] if whole[other] else [a, other])
        if b[0] * b[1] <= budget:
            return BlockPlan(m, n, b[0], b[1], a)
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

    Triton lowers max to the NaN-ignoring ``maxnumf`` (and XLA:CPU's fast min/max ignores NaN too), so a
    second reduction of a NaN flag keeps jq8.quant's contract: a tile holding NaN gets a NaN scale.
    """
    amax = _tile_max(a, rt, ct)
    has_nan = _tile_max(jnp.where(a != a, 1.0, 0.0), rt, ct)
    return jnp.where(has_nan > 0, jnp.nan, amax)


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
        constraints="=r,r,r",
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


def emit_quantized(
    x: jax.Array,
    amax: jax.Array,
    out: OutSpec,
    codes_ref,
    scale_ref,
    r0: jax.Array,
    c0: jax.Array,
    plan: BlockPlan,
    *,
    rounding: Rounding,
    seed: tuple[jax.Array, jax.Array] | None,
    interpret: bool,
    write_scale: bool = True,
) -> None:
    """Quantizes the block x (bm, bn) fp32 at global origin (r0, c0) given its tiles' absmax and stores it.

    amax: (bm / rt, bn / ct) with (rt, ct) = block_tile(out.tile) (size 1 along a whole, swept axis).
    For ``out.transposed`` the codes are written to the (N, M) array at (c0, r0) and the scales transposed;
    the stochastic noise is then indexed by x.T's coordinates, as quantize(x.T) draws it.
    """
    bm, bn = plan.bm, plan.bn
    rt, ct = block_tile(out.tile, bm, bn)
    scale = scale_from_absmax(amax)
    y = div_rn(x, expand_tile(scale, rt, ct, bm, bn), interpret)
    rows = r0 + jnp.arange(bm, dtype=jnp.int32)[:, None]
    cols = c0 + jnp.arange(bn, dtype=jnp.int32)[None, :]
    if rounding == "nearest":
        y = round_half_away(y)
    elif rounding == "stochastic":
        u = uniform_noise(seed, cols, rows) if out.transposed else uniform_noise(seed, rows, cols)
        y = round_stochastic(y, u)
    else:
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    codes = to_codes(y)
    mask = (rows < plan.m) & (cols < plan.n)
    # Scale block origin: a whole axis has one scale (index 0) even while a program sweeps it.
    sr0 = 0 if out.tile[0] == -1 else r0 // rt
    sc0 = 0 if out.tile[1] == -1 else c0 // ct
    if out.transposed:
        plgpu.store(codes_ref.at[pl.ds(c0, bn), pl.ds(r0, bm)], codes.T, mask=mask.T)
    else:
        plgpu.store(codes_ref.at[pl.ds(r0, bm), pl.ds(c0, bn)], codes, mask=mask)
    if write_scale:
        store_scale(scale_ref, scale, sr0, sc0, out.transposed)


def store_scale(scale_ref, scale: jax.Array, sr0, sc0, transposed: bool) -> None:
    """Stores a (gr, gc) block of scales (x coordinates) at scale-grid origin (sr0, sc0), masked."""
    gs = scale.shape
    srows = sr0 + jnp.arange(gs[0], dtype=jnp.int32)[:, None]
    scols = sc0 + jnp.arange(gs[1], dtype=jnp.int32)[None, :]
    if transposed:
        smask = (srows < scale_ref.shape[1]) & (scols < scale_ref.shape[0])
        plgpu.store(scale_ref.at[pl.ds(sc0, gs[1]), pl.ds(sr0, gs[0])], scale.T, mask=smask.T)
    else:
        smask = (srows < scale_ref.shape[0]) & (scols < scale_ref.shape[1])
        plgpu.store(scale_ref.at[pl.ds(sr0, gs[0]), pl.ds(sc0, gs[1])], scale, mask=smask)


LoadFn = Callable[[jax.Array, jax.Array], jax.Array]


def block_mask(r0: jax.Array, c0: jax.Array, plan: BlockPlan) -> jax.Array:
    rows = r0 + jnp.arange(plan.bm, dtype=jnp.int32)[:, None]
    cols = c0 + jnp.arange(plan.bn, dtype=jnp.int32)[None, :]
    return (rows < plan.m) & (cols < plan.n)


def sweep(
    load: LoadFn,
    outs: Sequence[OutSpec],
    out_refs: Sequence,
    plan: BlockPlan,
    *,
    rounding: Rounding,
    seed,
    interpret: bool,
) -> None:
    """The kernel body shared by every quantize kernel: quantize this program's region into ``outs``.

    load(r0, c0) -> (bm, bn) fp32 block at global origin (r0, c0), with out-of-range elements set to 0
    (0 never raises an absmax). out_refs: (codes_ref, scale_ref) per output, flattened.
    """
    pid = (pl.program_id(0), pl.program_id(1))

    def origin(k):
        r0 = (k if plan.loop_axis == 0 else pid[0]) * plan.bm
        c0 = (k if plan.loop_axis == 1 else pid[1]) * plan.bn
        return r0, c0

    def emit_all(x, r0, c0, swept_amax):
        a = jnp.abs(x)
        for i, out in enumerate(outs):
            rt, ct = block_tile(out.tile, plan.bm, plan.bn)
            swept = plan.loop_axis is not None and out.tile[plan.loop_axis] == -1
            amax = swept_amax[i] if swept else tile_absmax(a, rt, ct)
            emit_quantized(
                x, amax, out, out_refs[2 * i], out_refs[2 * i + 1], r0, c0, plan,
                rounding=rounding, seed=seed, interpret=interpret, write_scale=not swept,
            )

    if plan.loop_axis is None:
        r0, c0 = origin(0)
        emit_all(load(r0, c0), r0, c0, {})
        return

    # Sweep: pass 1 reduces the absmax of tiles that span the swept axis, pass 2 quantizes.
    swept_ids = [i for i, o in enumerate(outs) if o.tile[plan.loop_axis] == -1]

    def absmax_body(k, accs):
        r0, c0 = origin(k)
        a = jnp.abs(load(r0, c0))
        return tuple(
            nan_max(acc, tile_absmax(a, *block_tile(outs[i].tile, plan.bm, plan.bn)))
            for acc, i in zip(accs, swept_ids)
        )

    def acc_shape(i):
        rt, ct = block_tile(outs[i].tile, plan.bm, plan.bn)
        return (plan.bm // rt, plan.bn // ct)

    init = tuple(jnp.zeros(acc_shape(i), jnp.float32) for i in swept_ids)
    accs = lax.fori_loop(0, plan.num_chunks, absmax_body, init) if swept_ids else ()
    swept_amax = dict(zip(swept_ids, accs))
    for i in swept_ids:  # one scale per swept tile: written once, at the sweep's origin
        out = outs[i]
        scale = scale_from_absmax(swept_amax[i])
        r0, c0 = origin(0)
        srow0 = 0 if out.tile[0] == -1 else r0 // block_tile(out.tile, plan.bm, plan.bn)[0]
        scol0 = 0 if out.tile[1] == -1 else c0 // block_tile(out.tile, plan.bm, plan.bn)[1]
        store_scale(out_refs[2 * i + 1], scale, srow0, scol0, out.transposed)

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
    return [
        jnp.full(s.shape, -128 if s.dtype == jnp.int8 else jnp.nan, s.dtype) for s in shapes
    ]


def launch(
    kernel,
    operands: Sequence[jax.Array],
    shapes: Sequence[jax.ShapeDtypeStruct],
    grid: tuple[int, ...],
    config: QuantizeConfig,
    *,
    interpret: bool,
    poison: bool,
    name: str,
) -> list[jax.Array]:
    """pallas_call over whole-array refs; with ``poison`` the outputs start as :func:`poisoned` buffers
    (aliased inputs the kernel ignores), so any element a kernel fails to write stays visible."""
    prefill = poisoned(shapes) if poison else []
    n_in = len(operands)

    def body(*refs):
        kernel(*refs[:n_in], *refs[n_in + len(prefill):])

    return pl.pallas_call(
        body,
        grid=grid,
        out_shape=list(shapes),
        compiler_params=compiler_params(config.num_warps, config.num_stages),
        interpret=interpret,
        input_output_aliases={n_in + i: i for i in range(len(prefill))},
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


def _quantize_kernel(seed_ref, x_ref, *out_refs, plan, outs, rounding, interpret):
    def load(r0, c0):
        x = plgpu.load(
            x_ref.at[pl.ds(r0, plan.bm), pl.ds(c0, plan.bn)], mask=block_mask(r0, c0, plan), other=0.0
        )
        return x.astype(jnp.float32)

    seed = load_seed(seed_ref, rounding)
    sweep(load, outs, out_refs, plan, rounding=rounding, seed=seed, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("specs", "rounding", "config", "interpret", "poison"))
def _quantize_call(x, seed, *, specs, rounding, config, interpret, poison=False):
    m, n = x.shape
    outs = tuple(OutSpec(x_tile(s, m, n, t), t) for s, t in specs)
    plan = plan_blocks(m, n, [o.tile for o in outs], config)
    kernel = functools.partial(_quantize_kernel, plan=plan, outs=outs, rounding=rounding, interpret=interpret)
    return launch(
        kernel, [seed, x], out_shapes(m, n, specs), plan.grid, config,
        interpret=interpret, poison=poison, name="quantize_tiles",
    )


def quantize_tiles(
    x: jax.Array,
    spec: QuantSpec,
    *,
    rounding: Rounding = "nearest",
    seed: jax.Array | None = None,
    transposed_spec: QuantSpec | None = None,
    interpret: bool | None = None,
    config: QuantizeConfig | None = None,
    poison_outputs: bool = False,
) -> QArray | tuple[QArray, QArray]:
    """Symmetric INT8 quantization of x in one pass; bit-exact to ``jq8.quant.quantize``.

    x: (M, N) bf16 / f32 (any rank without ``transposed_spec``: viewed as 2-D like jq8.quant).
    spec: the tile of the codes (per-row, per-column, groups, power-of-two blocks, ...).
    rounding: "nearest" (half away from zero) or "stochastic" (needs ``seed``: noise_seed(key), (2,) uint32).
    transposed_spec: also return the codes of x.T (N, M) under this spec, written from the same loaded
      blocks; stochastic noise for it is indexed by x.T's coordinates (as quantize(x.T, seed=seed)).
    config: block / warps (default QuantizeConfig()). poison_outputs: testing aid, outputs start as
      -128 codes / NaN scales so an element the kernel never writes shows up.
    Returns QArray (values (M, N) int8, scale f32 ``spec.scale_shape``) or (q, qT).
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"quantize_tiles expects a floating array, got {x.dtype}")
    if transposed_spec is not None and x.ndim != 2:
        raise ValueError(f"transposed_spec needs a 2-D x, got shape {x.shape}")
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]) if x.ndim != 2 else x
    m, n = x2.shape
    config = config or QuantizeConfig()
    interpret = resolve_interpret(interpret)
    seed_arr = as_seed(seed, rounding)
    specs = [(spec, False)] + ([(transposed_spec, True)] if transposed_spec is not None else [])
    tiles = [x_tile(s, m, n, t) for s, t in specs]
    try:
        plan_blocks(m, n, tiles, config)
        groups = [tuple(specs)]
    except ValueError:
        if len(specs) == 1:
            raise
        groups = [(s,) for s in specs]  # e.g. per-row + per-row of x.T: a whole matrix per program
    arrays = []
    for group in groups:
        arrays += _quantize_call(
            x2, seed_arr, specs=group, rounding=rounding, config=config,
            interpret=interpret, poison=poison_outputs,
        )
    q = QArray(arrays[0], arrays[1], None, spec, tuple(shape), x.dtype)
    if transposed_spec is None:
        return q
    return q, QArray(arrays[2], arrays[3], None, transposed_spec, (n, m), x.dtype)


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
) -> QArray | tuple[QArray, QArray]:
    """Same contract as :func:`quantize_tiles`, computed by jq8.quant.quantize (the definition)."""
    del interpret, config, poison_outputs
    q = quantize(x, spec, rounding=rounding, seed=seed)
    if transposed_spec is None:
        return q
    return q, quantize(jnp.asarray(x).T, transposed_spec, rounding=rounding, seed=seed)
