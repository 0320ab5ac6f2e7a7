"""LayerNorm / RMSNorm fused with INT8 quantization of its output (Pallas GPU kernels, Triton lowering).

The normalized activations never reach memory in floating point. Statistics are full-row fp32 (biased
variance, epsilon inside the rsqrt -- the two defects of Jetfire's reference LayerNorm avoided); y is
normalized, gamma / beta applied, and quantized under ``spec`` (per-row for ZeroQuant, 32x32 blocks for
Jetfire) and optionally ``transposed_spec`` by the same :func:`pallas_kernels.quantize.sweep` as
``quantize_tiles``. With ``input_spec`` the pass that quantizes y also writes x itself quantized (Jetfire
keeps the LayerNorm input as INT8 blocks for the backward), so x is not read again for it.

Two routes (:func:`norm_route`):
- one pass (no output needs whole columns): each program owns ``bm`` whole rows, computes their statistics,
  normalizes and quantizes. Rows that fit the register budget are loaded once; longer rows are swept in
  column chunks (one statistics pass merging per-chunk mean / centred sum of squares, then the quantize
  pass(es)).
- two passes (an output needs whole columns: per-row codes of y.T, the int8-row policy, with per-row codes
  of y: whole rows AND whole columns): pass 1 (statistics) gives each program ``RowStatsConfig.rows``
  whole rows, looping over row groups: mean, rstd, y's per-row absmax and the program's per-column partial
  absmax of y (reduced by XLA afterwards, NaN-preserving); pass 2 (quantize) runs a full 2-D grid that
  recomputes y from x, mean, rstd, gamma, beta and takes every whole-axis absmax from pass 1. x is read
  twice in all, three times when rows are too long for one load (pass 1 needs a row's statistics before
  its y exists).
Returns ``mean`` and ``rstd`` (M,) fp32 for the backward.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jq8.quant import QArray, QuantSpec, quantize
from pallas_kernels._common import cdiv, compiler_params, next_pow2, resolve_interpret
from pallas_kernels.quantize import (
    AXIS_STATS_CONFIG,
    BlockPlan,
    OutSpec,
    QuantizeConfig,
    Tile,
    block_mask,
    finish_partials,
    launch,
    nan_max,
    out_shapes,
    plan_blocks,
    plan_tile,
    sweep,
    tile_absmax,
    x_tile,
)

Route = Literal["one_pass", "two_pass"]


@dataclasses.dataclass(frozen=True)
class RowStatsConfig:
    """Pass 1 (statistics) of the two-pass route (hashable: a static jit argument).

    rows: rows per program. Its column partials are (cdiv(M, rows), N) f32, 1 / rows of an fp32 x: many
      rows keep them small, few keep many programs (M = 16384: 512 programs at 32).
    block_elems: preferred elements of one loaded row group (rows of next_pow2(N) columns, at most ``rows``);
      rows longer than ``QuantizeConfig.max_block_elems`` are swept in column chunks of ``rows`` rows.
    num_warps: None: about 32 elements per thread, 2 to 8 warps.
    """

    rows: int = 32
    block_elems: int = 8192
    num_warps: int | None = None


# LayerNorm-quantize with whole rows per program (per-token codes at prefill sizes), rows of 513-2048
# columns: one row a program, 8 elements a thread. On the H100 at 8192 x 1600 f32: 34.9 us against 37.7-39.1
# for the quantize kernels' row blocks (1 row, 4 warps); at 768 columns 16.0 us against 16.7-18.9 (2 rows,
# 4 warps).
ROW_NORM_CONFIG = QuantizeConfig(row_block_elems=1)


def _prev_pow2(v: int) -> int:
    return 1 << (max(1, v).bit_length() - 1)


# ------------------------------------------------------------------------------------ shared kernel pieces


def _row_stats(load_x, plan: BlockPlan, r0, *, eps: float, rms: bool):
    """(mean, rstd) of this program's bm rows, each (bm, 1) fp32, from masked loads (0 outside), and the
    (bm, bn) fp32 x block when the rows were loaded whole (else None)."""
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


def _x_loader(x_ref, plan: BlockPlan):
    def load_x(r0, c0):
        mask = block_mask(r0, c0, plan)
        x = plgpu.load(x_ref.at[pl.ds(r0, plan.bm), pl.ds(c0, plan.bn)], mask=mask, other=0.0)
        return x.astype(jnp.float32), mask

    return load_x


def _affine(gamma_ref, beta_ref, c0, plan: BlockPlan):
    """(gamma, beta) of the bn columns at c0: each a thunk loading it as (1, bn) fp32, or None.

    The refs are (1, N): a (1, bn) load gets the layout of x's rows directly. A (bn,) load expanded with
    [None, :] costs a layout conversion through shared memory per vector (measured on the H100)."""
    cmask = (c0 + jnp.arange(plan.bn, dtype=jnp.int32) < plan.n)[None, :]

    def loader(ref):
        def load():
            v = plgpu.load(ref.at[pl.ds(0, 1), pl.ds(c0, plan.bn)], mask=cmask, other=0.0)
            return v.astype(jnp.float32)

        return load

    return tuple(None if ref is None else loader(ref) for ref in (gamma_ref, beta_ref))


def _preloaded(affine):
    """_affine's thunks, loaded now (once, outside a loop)."""
    return tuple(None if f is None else (lambda v: lambda: v)(f()) for f in affine)


def _normalize(x, mask, mean, rstd, gamma, beta):
    """y = (x - mean) * rstd * gamma() + beta(), 0 outside the array. Every route and pass computes y by this
    one expression, so pass 2 recomputes pass 1's y bit for bit."""
    y = (x - mean) * rstd
    if gamma is not None:
        y = y * gamma()
    if beta is not None:
        y = y + beta()
    return jnp.where(mask, y, 0.0)  # padding must be 0: it enters the tiles' absmax


def _store_rows(ref, v, r0, m: int) -> None:
    """Masked store of a (g, 1) column of per-row values at row r0 of an (m,) or (m, 1) ref."""
    rows = r0 + jnp.arange(v.shape[0], dtype=jnp.int32)
    if len(ref.shape) == 1:
        plgpu.store(ref.at[pl.ds(r0, v.shape[0])], v[:, 0], mask=rows < m)
    else:
        plgpu.store(ref.at[pl.ds(r0, v.shape[0]), pl.ds(0, 1)], v, mask=(rows < m)[:, None])


# ------------------------------------------------------------------------------------- one-pass route


def _norm_kernel(x_ref, gamma_ref, beta_ref, *refs, plan, outs, x_outs, eps, rms, interpret):
    *out_refs, mean_ref, rstd_ref = refs
    r0 = pl.program_id(0) * plan.bm
    load_x = _x_loader(x_ref, plan)
    mean, rstd, x_once = _row_stats(load_x, plan, r0, eps=eps, rms=rms)

    def load(r0, c0):
        mask = block_mask(r0, c0, plan)
        x = x_once if x_once is not None else load_x(r0, c0)[0]
        return _normalize(x, mask, mean, rstd, *_affine(gamma_ref, beta_ref, c0, plan))

    sweep(load, outs, out_refs[: 2 * len(outs)], plan, rounding="nearest", seed=None, interpret=interpret)
    if x_outs:  # x itself: the block already loaded, or (rows swept in chunks) the chunks read once more
        load_in = (lambda r0, c0: x_once) if x_once is not None else (lambda r0, c0: load_x(r0, c0)[0])
        sweep(load_in, x_outs, out_refs[2 * len(outs) :], plan, rounding="nearest", seed=None,
              interpret=interpret)
    rows = r0 + jnp.arange(plan.bm, dtype=jnp.int32)
    plgpu.store(mean_ref.at[pl.ds(r0, plan.bm)], mean[:, 0], mask=rows < plan.m)
    plgpu.store(rstd_ref.at[pl.ds(r0, plan.bm)], rstd[:, 0], mask=rows < plan.m)


def _one_pass_plan(m: int, n: int, tiles, config: QuantizeConfig) -> BlockPlan:
    # (1, -1): the row statistics need whole rows in one program, like a per-row tile.
    plan = plan_blocks(m, n, list(tiles) + [(1, -1)], config)
    if plan.loop_axis == 0:
        raise ValueError(f"tiles {list(tiles)} need whole columns of a ({m}, {n}) LayerNorm output in one "
                         "program")
    return plan


# ------------------------------------------------------------------------------------- two-pass route


def _stats_plan(m: int, n: int, tiles, config: QuantizeConfig, stats: RowStatsConfig
                ) -> tuple[BlockPlan, int]:  # fmt: skip
    """(the loaded block of pass 1, rows per program). Whole rows (loop_axis None): bm rows of next_pow2(N),
    the program loops over rows / bm row groups; else one group of ``rows`` rows swept in column chunks."""
    rt = max([t[0] for t in tiles if t[1] == -1] + [1])
    ct = max([t[1] for t in tiles if t[0] == -1] + [1])
    rows = max(_prev_pow2(stats.rows), rt)
    width = next_pow2(n)
    if width * rt <= config.max_block_elems:
        bm = max(rt, min(rows, _prev_pow2(min(stats.block_elems, config.max_block_elems) // width)))
        return BlockPlan(m, n, bm, width), cdiv(rows, bm) * bm
    bn = min(width, max(ct, _prev_pow2(config.max_block_elems // rows)))
    return BlockPlan(m, n, rows, bn, loop_axis=1), rows


def _stats_kernel(x_ref, gamma_ref, beta_ref, mean_ref, rstd_ref, *stat_refs, plan, rows, stats, eps, rms):
    """Pass 1: mean, rstd, then per ``stats`` entry (source "y" / "x", tile): a whole-row tile's absmax
    (cdiv(M, rt), 1), or this program's partial absmax of a whole-column tile (1 row of the partials)."""
    pid = pl.program_id(0)
    load_x = _x_loader(x_ref, plan)
    row_ids = [i for i, (_, t) in enumerate(stats) if t[1] == -1]
    col_ids = [i for i, (_, t) in enumerate(stats) if t[0] == -1]

    def absolute(x, mask, mean, rstd, affine):
        return {"x": jnp.abs(x), "y": jnp.abs(_normalize(x, mask, mean, rstd, *affine))}

    def row_amax(vals, i):
        src, (rt, _) = stats[i]
        return tile_absmax(vals[src], rt, plan.bn)

    def col_amax(vals, i):
        src, (_, ct) = stats[i]
        return tile_absmax(vals[src], plan.bm, ct)

    if plan.loop_axis is None:  # whole rows: groups of bm rows, column partials accumulated in registers
        affine = _preloaded(_affine(gamma_ref, beta_ref, 0, plan))  # the same for every group

        def group(g, accs):
            r0 = pid * rows + g * plan.bm
            mean, rstd, x = _row_stats(load_x, plan, r0, eps=eps, rms=rms)
            _store_rows(mean_ref, mean, r0, plan.m)
            _store_rows(rstd_ref, rstd, r0, plan.m)
            vals = absolute(x, block_mask(r0, 0, plan), mean, rstd, affine)
            for i in row_ids:
                _store_rows(stat_refs[i], row_amax(vals, i), r0 // stats[i][1][0], stat_refs[i].shape[0])
            return tuple(nan_max(acc, col_amax(vals, i)) for acc, i in zip(accs, col_ids))

        init = tuple(jnp.zeros((1, plan.bn // stats[i][1][1]), jnp.float32) for i in col_ids)
        groups = rows // plan.bm
        accs = group(0, init) if groups == 1 else lax.fori_loop(0, groups, group, init)
        for acc, i in zip(accs, col_ids):
            plgpu.store(stat_refs[i].at[pl.ds(pid, 1), pl.ds(0, acc.shape[1])], acc)
        return

    # Rows too long for one load: statistics over the chunks first, then y chunk by chunk (x read twice).
    r0 = pid * rows
    mean, rstd, _ = _row_stats(load_x, plan, r0, eps=eps, rms=rms)
    _store_rows(mean_ref, mean, r0, plan.m)
    _store_rows(rstd_ref, rstd, r0, plan.m)

    def chunk(k, accs):
        c0 = k * plan.bn
        x, mask = load_x(r0, c0)
        vals = absolute(x, mask, mean, rstd, _affine(gamma_ref, beta_ref, c0, plan))
        for i in col_ids:
            ct = stats[i][1][1]
            plgpu.store(stat_refs[i].at[pl.ds(pid, 1), pl.ds(c0 // ct, plan.bn // ct)], col_amax(vals, i))
        return tuple(nan_max(acc, row_amax(vals, i)) for acc, i in zip(accs, row_ids))

    init = tuple(jnp.zeros((plan.bm // stats[i][1][0], 1), jnp.float32) for i in row_ids)
    accs = lax.fori_loop(0, plan.num_chunks, chunk, init)
    for acc, i in zip(accs, row_ids):
        _store_rows(stat_refs[i], acc, r0 // stats[i][1][0], stat_refs[i].shape[0])


def _quantize_kernel(x_ref, gamma_ref, beta_ref, mean_ref, rstd_ref, *refs, plan, outs, x_outs, y_tiles,
                     x_tiles, interpret):
    """Pass 2: one (bm, bn) block of x -> y recomputed -> codes of y (and of x); whole-axis absmax from
    pass 1."""
    ny, nx = len(y_tiles), len(x_tiles)
    y_amax, x_amax = dict(zip(y_tiles, refs[:ny])), dict(zip(x_tiles, refs[ny : ny + nx]))
    out_refs = refs[ny + nx :]
    r0, c0 = pl.program_id(0) * plan.bm, pl.program_id(1) * plan.bn
    x, mask = _x_loader(x_ref, plan)(r0, c0)
    rmask = r0 + jnp.arange(plan.bm, dtype=jnp.int32) < plan.m
    mean = plgpu.load(mean_ref.at[pl.ds(r0, plan.bm)], mask=rmask, other=0.0)[:, None]
    rstd = plgpu.load(rstd_ref.at[pl.ds(r0, plan.bm)], mask=rmask, other=0.0)[:, None]
    y = _normalize(x, mask, mean, rstd, *_affine(gamma_ref, beta_ref, c0, plan))
    # Without a loop axis sweep loads exactly this block, once: both layouts come from the registers here.
    sweep(lambda r0, c0: y, outs, out_refs[: 2 * len(outs)], plan, rounding="nearest", seed=None,
          interpret=interpret, axis_amax=y_amax)
    if x_outs:
        sweep(lambda r0, c0: x, x_outs, out_refs[2 * len(outs) :], plan, rounding="nearest", seed=None,
              interpret=interpret, axis_amax=x_amax)


def _row_stats_pass(x, gamma, beta, *, stats, eps, rms, config, stats_config, interpret):
    """Pass 1 -> (mean (M,), rstd (M,), per ``stats`` entry its :func:`axis_absmax`-shaped array)."""
    m, n = x.shape
    plan, rows = _stats_plan(m, n, [t for _, t in stats], config, stats_config)
    grid = cdiv(m, rows)
    width = plan.num_chunks * plan.bn
    shapes = [(m,), (m,)] + [(cdiv(m, t[0]), 1) if t[1] == -1 else (grid, width // t[1]) for _, t in stats]
    warps = stats_config.num_warps or min(8, max(2, next_pow2(plan.bm * plan.bn // 1024)))
    kernel = functools.partial(_stats_kernel, plan=plan, rows=rows, stats=stats, eps=eps, rms=rms)
    mean, rstd, *partials = pl.pallas_call(
        _with_affine(kernel, gamma is not None, beta is not None),
        grid=(grid,),
        out_shape=[jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes],
        compiler_params=compiler_params(warps, 1),
        interpret=interpret,
        name="layer_norm_row_stats",
    )(*[a for a in (x, gamma, beta) if a is not None])
    amax = [p if t[1] == -1 else finish_partials(p, t, m, n) for p, (_, t) in zip(partials, stats)]
    return mean, rstd, amax


def _with_affine(kernel, has_gamma: bool, has_beta: bool):
    """kernel(x_ref, gamma_ref | None, beta_ref | None, *rest) over the refs of the operands present."""

    def body(x_ref, *refs):
        g_ref = refs[0] if has_gamma else None
        b_ref = refs[int(has_gamma)] if has_beta else None
        kernel(x_ref, g_ref, b_ref, *refs[int(has_gamma) + int(has_beta) :])

    return body


# ------------------------------------------------------------------------------------------- the call


def _whole_axis_tiles(outs) -> tuple[Tile, ...]:
    return tuple(dict.fromkeys(o.tile for o in outs if -1 in o.tile))


def norm_route(tiles) -> Route:
    """"two_pass" when an output tile (x coordinates) spans whole columns but not the whole array (per-row
    codes of y.T, per-column codes of y), else "one_pass" (every program owns whole rows)."""
    cols = any(t[0] == -1 and t[1] != -1 for t in tiles)
    return "two_pass" if cols and (-1, -1) not in tiles else "one_pass"


def norm_plan(m: int, n: int, specs, input_spec: QuantSpec | None = None,
              config: QuantizeConfig | None = None) -> tuple[Route, BlockPlan, QuantizeConfig]:
    """(route, block plan of the quantizing pass, its config) that :func:`layer_norm_quantize` runs for
    ``specs`` = ((spec, transposed), ...) on an (M, N) x; for tests and benchmarks."""
    tiles = [x_tile(s, m, n, t) for s, t in specs]
    tiles += [x_tile(input_spec, m, n)] if input_spec is not None else []
    route = norm_route(tiles)
    if route == "one_pass":
        if config is not None:
            return route, _one_pass_plan(m, n, tiles, config), config
        plan = _one_pass_plan(m, n, tiles, ROW_NORM_CONFIG)
        if not (plan.row_blocks and 1024 <= plan.bn <= 2048):  # outside the measured widths: as before
            return route, _one_pass_plan(m, n, tiles, QuantizeConfig()), QuantizeConfig()
        return route, plan, dataclasses.replace(ROW_NORM_CONFIG, num_warps=plan.bn // 256)
    config = config or AXIS_STATS_CONFIG
    whole = tuple(dict.fromkeys(t for t in tiles if -1 in t))
    return route, plan_blocks(m, n, [plan_tile(t, whole) for t in tiles], config), config


@functools.partial(jax.jit, static_argnames=("eps", "rms", "specs", "input_spec", "config", "stats_config",
                                             "interpret", "poison"))
def _norm_call(x, gamma, beta, *, eps, rms, specs, input_spec, config, stats_config, interpret, poison=False):
    m, n = x.shape
    gamma, beta = (None if v is None else v.reshape(1, n) for v in (gamma, beta))  # see _affine
    outs = tuple(OutSpec(x_tile(s, m, n, t), t) for s, t in specs)
    x_outs = (OutSpec(x_tile(input_spec, m, n)),) if input_spec is not None else ()
    route, plan, config = norm_plan(m, n, specs, input_spec, config)
    shapes = out_shapes(m, n, list(specs) + ([(input_spec, False)] if input_spec is not None else []))
    operands = [a for a in (x, gamma, beta) if a is not None]
    if route == "one_pass":
        kernel = functools.partial(_norm_kernel, plan=plan, outs=outs, x_outs=x_outs, eps=eps, rms=rms,
                                   interpret=interpret)
        shapes += [jax.ShapeDtypeStruct((m,), jnp.float32)] * 2
        return launch(_with_affine(kernel, gamma is not None, beta is not None), operands, shapes, plan,
                      config, interpret=interpret, poison=poison, name="layer_norm_quantize")

    y_tiles, x_tiles = _whole_axis_tiles(outs), _whole_axis_tiles(x_outs)
    stats = tuple(("y", t) for t in y_tiles) + tuple(("x", t) for t in x_tiles)
    mean, rstd, amax = _row_stats_pass(x, gamma, beta, stats=stats, eps=eps, rms=rms, config=config,
                                       stats_config=stats_config or RowStatsConfig(), interpret=interpret)
    assert plan.loop_axis is None, plan  # no whole axis left in a block: a full 2-D grid
    kernel = functools.partial(_quantize_kernel, plan=plan, outs=outs, x_outs=x_outs, y_tiles=y_tiles,
                               x_tiles=x_tiles, interpret=interpret)
    arrays = launch(_with_affine(kernel, gamma is not None, beta is not None), [*operands, mean, rstd, *amax],
                    shapes, plan, config, interpret=interpret, poison=poison, name="layer_norm_quantize_rows")
    return [*arrays, mean, rstd]


# ------------------------------------------------------------------------------------------ public API


def layer_norm_quantize(
    x: jax.Array,
    gamma: jax.Array | None,
    beta: jax.Array | None,
    *,
    eps: float = 1e-5,
    rms: bool = False,
    spec: QuantSpec,
    transposed_spec: QuantSpec | None = None,
    input_spec: QuantSpec | None = None,
    interpret: bool | None = None,
    config: QuantizeConfig | None = None,
    stats_config: RowStatsConfig | None = None,
    poison_outputs: bool = False,
):
    """Quantized LayerNorm (or RMSNorm) of x, round-to-nearest.

    x: (M, N) f32 / bf16. gamma, beta: (N,) or None. rms: RMSNorm (no centering; mean returned as 0).
    y = (x - mean) * rstd * gamma + beta in fp32, rstd = rsqrt(var + eps), var biased (over N).
    input_spec: also quantize x itself under this spec (round to nearest, as jq8.quant.quantize), written by
      the pass that quantizes y from the x it loaded (typically 32x32 blocks: the INT8 copy of the input
      Jetfire keeps for the backward).
    config: blocks / warps of the quantizing pass; None: ``QuantizeConfig()``, or ``AXIS_STATS_CONFIG`` on
      the two-pass route (an output needs whole columns, see :func:`norm_route`). Its ``max_block_elems``
      also bounds pass 1's loads. stats_config: pass 1 of the two-pass route (None: ``RowStatsConfig()``).
    Returns (q, [qT,] [xq,] mean, rstd): q quantizes y (M, N) under spec; qT, with transposed_spec,
    quantizes y.T (N, M); xq, with input_spec, quantizes x (M, N); mean, rstd: (M,) f32.
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
        x, gamma, beta, eps=float(eps), rms=bool(rms), specs=specs, input_spec=input_spec, config=config,
        stats_config=stats_config, interpret=resolve_interpret(interpret), poison=poison_outputs,
    )
    out = [QArray(arrays[0], arrays[1], None, spec, (m, n), x.dtype)]
    if transposed_spec is not None:
        out.append(QArray(arrays[2], arrays[3], None, transposed_spec, (n, m), x.dtype))
    if input_spec is not None:
        i = 2 * len(specs)
        out.append(QArray(arrays[i], arrays[i + 1], None, input_spec, (m, n), x.dtype))
    return (*out, arrays[-2], arrays[-1])


def layer_norm_quantize_reference(
    x: jax.Array,
    gamma: jax.Array | None,
    beta: jax.Array | None,
    *,
    eps: float = 1e-5,
    rms: bool = False,
    spec: QuantSpec,
    transposed_spec: QuantSpec | None = None,
    input_spec: QuantSpec | None = None,
    interpret: bool | None = None,
    config: QuantizeConfig | None = None,
    stats_config: RowStatsConfig | None = None,
    poison_outputs: bool = False,
):
    """Same contract as :func:`layer_norm_quantize`, in jnp fp32 + jq8.quant.quantize."""
    del interpret, config, stats_config, poison_outputs
    xf = jnp.asarray(x, jnp.float32)
    mean = jnp.zeros(xf.shape[:1], jnp.float32) if rms else jnp.mean(xf, axis=1)
    var = jnp.mean(jnp.square(xf - mean[:, None]), axis=1)
    rstd = lax.rsqrt(var + eps)
    y = (xf - mean[:, None]) * rstd[:, None]
    if gamma is not None:
        y = y * jnp.asarray(gamma, jnp.float32)
    if beta is not None:
        y = y + jnp.asarray(beta, jnp.float32)
    out = [dataclasses.replace(quantize(y, spec), dtype=x.dtype)]
    if transposed_spec is not None:
        out.append(dataclasses.replace(quantize(y.T, transposed_spec), dtype=x.dtype))
    if input_spec is not None:
        out.append(quantize(jnp.asarray(x), input_spec))
    return (*out, mean, rstd)
