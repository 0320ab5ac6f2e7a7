"""Block-scaled INT8 GEMM (NT layout): scales that vary along K (Jetfire 32x32 blocks, DeepSeek-style 1x128
activation tiles with 128x128 weight blocks, ZeroQuant group-wise weights with per-token activations).

    out = act(sum_g (a_g @ b_g.T) * sa_g * sb_g + bias) + residual

a: (M, K) int8 with a_scale (cdiv(M, ta_m), cdiv(K, ta_k)); b: (N, K) int8 (or packed INT4) with b_scale
(cdiv(N, tb_n), cdiv(K, tb_k)). Per K group of ``gk = min`` over the operands whose scale varies along K, the
int32 partial of ``gk / block_k`` tensor-core steps is converted and rescaled into an f32 accumulator once.
What makes it cheap (the rescale is CUDA-core work on every accumulator element):
  * an operand whose scale is constant along K (per-row activations, per-column weights) is applied in the
    epilogue only; the loop then does one multiply-add per element with a row or column vector;
  * a scale tile as large as the output tile (128x128 weight blocks with block_n <= 128) is one scalar per
    K group, folded into the other operand's vector before it touches the accumulator;
  * scales are read as small contiguous vectors per program (the wrapper transposes them to (K groups, rows)),
    never gathered per element;
  * the int32 -> f32 conversion uses the magic-number trick where it measured faster (see ``CONVERTS``);
  * ``unroll`` K groups per loop iteration lets one group's MMA overlap another's rescale (a tuning knob).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jq8.quant import QArray, QuantSpec, check_int32_k, expand_tiles, int4_block, int4_width, unpack_int4
from pallas_kernels._common import TileConfig, cdiv, compiler_params, resolve_interpret
from pallas_kernels.int8_matmul_triton import (
    NT_DIMS,
    Activation,
    div_pow2,
    epilogue_inputs,
    epilogue_out_shapes,
    epilogue_reference,
    grouped_program_ids,
    int4_pair_dot,
    int_dot,
    load_k_tile,
    make_epilogue,
    pad_to_int4_blocks,
    resolve_config,
    store_epilogue,
    wrap_output,
)

MIN_K_GROUP = 32  # block_k = 16 int8 dots are wrong on GPU, so a K group must allow block_k >= 32


# ------------------------------------------------------------------------------------------- tiles


def infer_tile(size: int, count: int) -> int:
    """The scale tile along an axis of ``size`` elements that has ``count`` scales.

    ``count == 1`` -> the whole axis; else the power of two p with cdiv(size, p) == count (unique when it
    exists), else size / count when exact. Pass explicit tiles (a_tile=, b_tile=) for anything else.
    """
    if count == 1:
        return size
    p = 1
    while p <= size:
        if cdiv(size, p) == count:
            return p
        p *= 2
    if size % count == 0:
        return size // count
    raise ValueError(
        f"cannot infer the scale tile of an axis of {size} elements with {count} scales; pass a_tile=/b_tile="
    )


def resolve_tiles(shape: tuple[int, int], scale_shape: tuple[int, ...], tile) -> tuple[int, int]:
    """Concrete (rows, K) tile of a scale array for an operand of ``shape``; validates ``scale_shape``."""
    rows, k = shape
    if tile is None:
        if len(scale_shape) != 2:
            raise ValueError(f"scales must be 2-D (row tiles, K tiles), got shape {scale_shape}")
        tile = (infer_tile(rows, scale_shape[0]), infer_tile(k, scale_shape[1]))
    t = QuantSpec(tuple(tile)).resolve(rows, k)
    expected = (cdiv(rows, t[0]), cdiv(k, t[1]))
    if tuple(scale_shape) != expected:
        raise ValueError(
            f"scale shape {scale_shape} does not match tile {t} of a {rows}x{k} operand ({expected})"
        )
    return t


def block_scaled_key(a_tile, b_tile, m: int, n: int, k: int, out_dtype) -> str:
    """Autotune cache key (everything but the shape)."""
    ta = QuantSpec(tuple(a_tile)).resolve(m, k)
    tb = QuantSpec(tuple(b_tile)).resolve(n, k)
    return f"a{ta[0]}x{ta[1]}-b{tb[0]}x{tb[1]}-{jnp.dtype(out_dtype).name}"


# ------------------------------------------------------------------------------------------- reference


def int8_matmul_block_scaled_reference(
    a: jax.Array,
    a_scale: jax.Array,
    b: jax.Array,
    b_scale: jax.Array,
    *,
    bias: jax.Array | None = None,
    activation: Activation = None,
    residual: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
    out_spec: QuantSpec | None = None,
    b_bits: int = 8,
    a_tile: tuple[int, int] | None = None,
    b_tile: tuple[int, int] | None = None,
    config: TileConfig | None = None,
    interpret: bool | None = None,
) -> jax.Array | QArray:
    """Plain-XLA definition: dequantize both operands in f32, f32 GEMM (HIGHEST precision), epilogue."""
    del config, interpret
    m, k = a.shape
    n = b.shape[0]
    bv = unpack_int4(b, k) if b_bits == 4 else b
    ta = resolve_tiles((m, k), a_scale.shape, a_tile)
    tb = resolve_tiles((n, k), b_scale.shape, b_tile)
    af = a.astype(jnp.float32) * expand_tiles(a_scale.astype(jnp.float32), ta, (m, k))
    bf = bv.astype(jnp.float32) * expand_tiles(b_scale.astype(jnp.float32), tb, (n, k))
    y = lax.dot_general(af, bf, NT_DIMS, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return epilogue_reference(
        y, bias=bias, activation=activation, residual=residual, out_dtype=out_dtype, out_spec=out_spec
    )


# ------------------------------------------------------------------------------------------------ kernel


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static plan. Row tiles: 0 = one scale for the whole axis, else a power of two (1 = per row)."""

    m: int
    n: int
    k: int
    b_bits: int
    a_rows: int  # row tile of a's scales
    b_rows: int
    a_k: int  # K tile of a's scales (== k when constant along K: applied in the epilogue)
    b_k: int
    gk: int  # K group of the in-loop rescale (0: no operand varies along K)
    convert: str = "cvt"  # "cvt", "magic" or "magic_folded" (see CONVERTS)
    unroll: int = 1  # K groups per loop iteration
    chunk_n: int = 0  # accumulate the tile in column chunks of this width (0: one chunk of block_n)
    block: int = 0  # INT4 b: half-split block width (jq8.quant.int4_block of the unpadded K)
    w: int = 0  # INT4 b: packed bytes per step

    @property
    def a_in_loop(self) -> bool:
        return self.gk > 0 and self.a_k < self.k

    @property
    def b_in_loop(self) -> bool:
        return self.gk > 0 and self.b_k < self.k

    def loop_scale_shape(self, bm: int, bn: int) -> tuple[int, int]:
        """Shape of the per-group scale applied in the loop: (bm, bn) outer product, vector, or scalar."""
        rows = bm if self.a_in_loop and 0 < self.a_rows < bm else 1
        cols = bn if self.b_in_loop and 0 < self.b_rows < bn else 1
        return rows, cols


def _scale_vector(ref, col, start, block: int, tile: int, rows: int):
    """Scales of rows [start, start + block) for K-tile column ``col`` of a transposed (K tiles, row tiles)
    scale ref: (block,) when the row tile is smaller than the block, else (1,) (uniform over the block)."""
    col = jnp.asarray(col, jnp.int32)  # a traced index (interpret mode's masked load rejects Python ints)
    if tile == 0:
        return ref[col, pl.ds(0, 1)]
    if tile >= block:
        return ref[col, pl.ds(start // tile, 1)]
    count = block // tile
    first = start // tile
    view = ref.at[col, pl.ds(first, count)]
    if rows % count == 0:  # every program's slice is in bounds
        v = view[...]
    else:
        v = plgpu.load(view, mask=(first + jnp.arange(count)) < rows, other=0.0)
    if tile == 1:
        return v
    return jnp.broadcast_to(v[:, None], (count, tile)).reshape(block)


# For |p| < 2**22: bitcast_f32(p + MAGIC_BITS) == MAGIC_FLOAT + p exactly (one ulp is 1 in [2**23, 2**24)).
MAGIC_BITS = 0x4B400000  # the bit pattern of MAGIC_FLOAT
MAGIC_FLOAT = 12582912.0  # 1.5 * 2**23
CONVERTS = ("auto", "cvt", "magic", "magic_folded")
"""How each K group's int32 partial becomes f32 before its rescale (all but magic_folded are exact):
cvt: the int->float convert instruction, which runs at a fraction of the FMA rate on Hopper's CUDA cores;
magic: integer add + bitcast + float subtract (exact for |p| < 2**22);
magic_folded: integer add + bitcast, the 1.5 * 2**23 offset times the summed scales subtracted once at the
  end (one FMA per element per group). Lossy: the cancellation error grows with K / group (about 1e-3
  relative at K = 16 groups), so it is a measured variant, never a default;
auto: magic when the in-loop scale is a vector or a scalar per tile, cvt for a full per-row x per-column
  outer product (measured on H100: magic makes that case slower, BENCHMARKS.md)."""


def _to_f32(x: jax.Array, convert: str) -> jax.Array:
    if convert == "cvt":
        return x.astype(jnp.float32)
    y = lax.bitcast_convert_type(x + jnp.int32(MAGIC_BITS), jnp.float32)
    return y if convert == "magic_folded" else y - MAGIC_FLOAT


def _block_scaled_kernel(a_ref, sa_ref, b_ref, sb_ref, *rest, p: _Plan, cfg: TileConfig, bk: int, epi):
    bm, bn = cfg.block_m, cfg.block_n
    cn = p.chunk_n or bn  # the output tile's columns are accumulated in bn // cn independent chunks
    num_m, num_n = cdiv(p.m, bm), cdiv(p.n, bn)
    epi_refs, out_refs = rest[: epi.num_inputs], rest[epi.num_inputs :]
    pid_m, pid_n = grouped_program_ids(pl.program_id(0), num_m, num_n, cfg.group_m)
    row0 = pl.multiple_of(pid_m * bm, bm)
    col0s = [pl.multiple_of(pid_n * bn + j * cn, cn) for j in range(bn // cn)]
    ragged_n = p.n % bn != 0
    a_mask = (row0 + jnp.arange(bm)) < p.m if p.m % bm else None
    b_masks = [(c + jnp.arange(cn)) < p.n if ragged_n else None for c in col0s]
    a_count = cdiv(p.m, p.a_rows) if p.a_rows else 1
    b_count = cdiv(p.n, p.b_rows) if p.b_rows else 1

    def sa(col):
        return _scale_vector(sa_ref, col, row0, bm, p.a_rows, a_count)[:, None]  # (bm | 1, 1)

    def sb(col, j):
        return _scale_vector(sb_ref, col, col0s[j], cn, p.b_rows, b_count)[None, :]  # (1, cn | 1)

    def partial(k0, nsteps: int, k_valid):
        """int32 products over K columns [k0, k0 + nsteps * bk), one (bm, cn) array per column chunk."""

        def one(kk, accs):
            a = load_k_tile(a_ref, row0, bm, kk, bk, row_mask=a_mask, k_valid=k_valid)
            return [
                acc + int_dot(a, load_k_tile(b_ref, c, cn, kk, bk, row_mask=bmask, k_valid=k_valid))
                for acc, c, bmask in zip(accs, col0s, b_masks)
            ]

        accs = [jnp.zeros((bm, cn), jnp.int32) for _ in col0s]
        if nsteps <= 4:  # unrolled: the group loop stays the one Triton pipelines
            for s in range(nsteps):
                accs = one(k0 + s * bk, accs)
            return accs
        return lax.fori_loop(0, nsteps, lambda s, c: one(pl.multiple_of(k0 + s * bk, bk), c), accs)

    def scale_of(g, j):
        # Clamped: INT4's padding to whole blocks can reach one K tile past the last real one (zeros).
        ga = jnp.minimum(div_pow2(g, p.a_k // p.gk), sa_ref.shape[0] - 1) if p.a_in_loop else None
        gb = jnp.minimum(div_pow2(g, p.b_k // p.gk), sb_ref.shape[0] - 1) if p.b_in_loop else None
        if p.a_in_loop and p.b_in_loop:
            return sa(ga) * sb(gb, j)  # (bm|1, cn|1)
        if p.a_in_loop:
            return sa(ga)
        return sb(gb, j)

    def rescale(carry, parts, g):
        out = []
        for j, ((acc, ssum), part) in enumerate(zip(carry, parts)):
            s = scale_of(g, j)
            acc = acc + _to_f32(part, p.convert) * s
            out.append((acc, ssum + s) if p.convert == "magic_folded" else (acc, ssum))
        return out

    zero_ssum = jnp.zeros(p.loop_scale_shape(bm, cn), jnp.float32)
    zero_carry = [(jnp.zeros((bm, cn), jnp.float32), zero_ssum) for _ in col0s]

    def planes(c0, nsteps: int):
        """INT4: nsteps steps of p.w packed bytes from byte c0 -> (lo, hi) int32 lists (one per chunk),
        the true products of the two nibble planes (int4_pair_dot's 16x shifted back, exactly)."""
        los = [jnp.zeros((bm, cn), jnp.int32) for _ in col0s]
        his = list(los)
        for i in range(nsteps):
            for j, (c, bmask) in enumerate(zip(col0s, b_masks)):
                lo, hi = int4_pair_dot(
                    a_ref, b_ref, row0, bm, c, cn, c0 + i * p.w, p.w, p.block, a_rows=a_mask, b_rows=bmask
                )
                los[j], his[j] = los[j] + lo, his[j] + hi
        shift = functools.partial(lax.shift_right_arithmetic, y=jnp.int32(4))
        return [shift(x) for x in los], [shift(x) for x in his]

    if p.b_bits == 4 and p.gk == 0:
        accs = lax.fori_loop(
            0,
            p.k // (2 * p.w),
            lambda i, c: [x + lo + hi for x, lo, hi in zip(c, *planes(i * p.w, 1))],
            [jnp.zeros((bm, cn), jnp.int32) for _ in col0s],
        )
        ys = [acc.astype(jnp.float32) for acc in accs]
    elif p.b_bits == 4:
        # Units of packed bytes whose two nibble planes each sit in one K group: with groups >= the
        # half-split block one group holds both planes; smaller groups put the high plane's group
        # block / (2 * gk) further on.
        half = p.block // 2
        unit = p.gk // 2 if p.gk >= p.block else p.gk
        width = p.k // 2

        def unit_step(c_u, carry, nsteps):
            los, his = planes(c_u, nsteps)
            if p.gk >= p.block:
                return rescale(carry, [lo + hi for lo, hi in zip(los, his)], div_pow2(2 * c_u, p.gk))
            g_lo = div_pow2(div_pow2(c_u, half) * p.block + lax.bitwise_and(c_u, half - 1), p.gk)
            return rescale(rescale(carry, los, g_lo), his, g_lo + half // p.gk)

        carry = lax.fori_loop(0, width // unit, lambda u, c: unit_step(u * unit, c, unit // p.w), zero_carry)
        if width % unit:  # a partial last group
            carry = unit_step(jnp.int32(width - width % unit), carry, (width % unit) // p.w)
        ys = [y - MAGIC_FLOAT * ssum if p.convert == "magic_folded" else y for y, ssum in carry]
    elif p.gk == 0:  # no scale varies along K: plain int32 loop, all scaling in the epilogue
        accs = lax.fori_loop(
            0,
            p.k // bk,
            lambda i, c: [x + y for x, y in zip(c, partial(pl.multiple_of(i * bk, bk), 1, None))],
            [jnp.zeros((bm, cn), jnp.int32) for _ in col0s],
        )
        if p.k % bk:
            accs = [x + y for x, y in zip(accs, partial(jnp.int32((p.k // bk) * bk), 1, p.k))]
        ys = [acc.astype(jnp.float32) for acc in accs]
    else:
        steps = p.gk // bk

        def part_of(g, nsteps=steps, k_valid=None):
            return partial(pl.multiple_of(g * p.gk, p.gk), nsteps, k_valid)

        num_g = p.k // p.gk

        def groups(i, carry):
            # All products of the iteration's groups are issued before any rescale, so the tensor-core work
            # of one group can overlap the CUDA-core rescale of another (unroll > 1 costs registers).
            gs = [i * p.unroll + u for u in range(p.unroll)]
            parts = [part_of(g) for g in gs]
            for g, part in zip(gs, parts):
                carry = rescale(carry, part, g)
            return carry

        carry = lax.fori_loop(0, num_g // p.unroll, groups, zero_carry)
        for g in range(num_g - num_g % p.unroll, num_g):  # groups left over by the unrolled loop
            carry = rescale(carry, part_of(jnp.int32(g)), g)
        if p.k % p.gk:
            g = jnp.int32(num_g)
            carry = rescale(carry, part_of(g, cdiv(p.k % p.gk, bk), p.k), g)
        ys = [y - MAGIC_FLOAT * ssum if p.convert == "magic_folded" else y for y, ssum in carry]
    for j, y in enumerate(ys):
        if not p.a_in_loop:
            y = y * sa(0)
        if not p.b_in_loop:
            y = y * sb(0, j)
        store_epilogue(
            y,
            epi_refs,
            out_refs,
            epi=epi,
            row0=row0,
            col0=col0s[j],
            bm=bm,
            bn=cn,
            m=p.m,
            n=p.n,
            ragged_n=ragged_n,
        )


def _resolve_convert(convert: str, plan: _Plan, cfg: TileConfig) -> str:
    if convert not in CONVERTS:
        raise ValueError(f"convert must be one of {CONVERTS}, got {convert!r}")
    if plan.gk * 127 * 127 >= 2**22:  # a group's partial may not fit the magic-number range
        return "cvt"
    if convert != "auto":
        return convert
    cn = plan.chunk_n or cfg.block_n
    outer = plan.loop_scale_shape(cfg.block_m, cn) == (cfg.block_m, cn)
    return "cvt" if outer else "magic"


def _row_tile(scale: jax.Array, tile: int, rows: int) -> tuple[jax.Array, int]:
    """(row tiles, K tiles) scales -> transposed (K tiles, row tiles) and the kernel's row-tile code."""
    if scale.shape[0] == 1:
        return scale.T, 0
    if tile & (tile - 1):  # not a power of two: expand to one scale per row
        scale = jnp.repeat(scale, tile, axis=0)[:rows]
        tile = 1
    return scale.T, tile


@functools.partial(
    jax.jit,
    static_argnames=(
        "activation",
        "out_dtype",
        "out_spec",
        "b_bits",
        "a_tile",
        "b_tile",
        "convert",
        "unroll",
        "split_n",
        "config",
        "interpret",
    ),
)
def int8_matmul_block_scaled(
    a: jax.Array,
    a_scale: jax.Array,
    b: jax.Array,
    b_scale: jax.Array,
    *,
    bias: jax.Array | None = None,
    activation: Activation = None,
    residual: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
    out_spec: QuantSpec | None = None,
    b_bits: int = 8,
    a_tile: tuple[int, int] | None = None,
    b_tile: tuple[int, int] | None = None,
    convert: str = "auto",
    unroll: int = 1,
    split_n: bool = False,
    config: TileConfig | None = None,
    interpret: bool | None = None,
) -> jax.Array | QArray:
    """INT8 GEMM with per-tile scales along K: ``act(dequant(a) @ dequant(b).T + bias) + residual``.

    a: (M, K) int8, a_scale (cdiv(M, ta_m), cdiv(K, ta_k)) f32; b: (N, K) int8 (or (N, int4_width(K)) uint8
    INT4 with ``b_bits=4``), b_scale (cdiv(N, tb_n), cdiv(K, tb_k)) f32. Tiles are inferred from the shapes
    (see :func:`infer_tile`) unless ``a_tile``/``b_tile`` are given. K tiles that vary must be powers of two
    >= 32. ``convert`` picks how per-group int32 partials become f32 (see :data:`CONVERTS`); ``unroll`` K
    groups are issued per loop iteration (a tuning knob: more overlap, more registers). ``split_n``
    accumulates the output tile in column chunks as wide as b's scale tile, so each chunk's per-group scale
    is a row vector times a scalar (one multiply-add per element) instead of a full outer product.
    Epilogue arguments and the return value as in :func:`pallas_kernels.gemm.int8_matmul`.
    """
    m, k = a.shape
    n = b.shape[0]
    if a.dtype != jnp.int8:
        raise TypeError(f"a must be int8, got {a.dtype}")
    expect_b = (n, int4_width(k) if b_bits == 4 else k)
    if b_bits not in (4, 8) or b.shape != expect_b or b.dtype != (jnp.uint8 if b_bits == 4 else jnp.int8):
        raise ValueError(
            f"b must be {expect_b} {'uint8 packed INT4' if b_bits == 4 else 'int8'}, got {b.shape} {b.dtype}"
        )
    ta = resolve_tiles((m, k), a_scale.shape, a_tile)
    tb = resolve_tiles((n, k), b_scale.shape, b_tile)
    varying = [t[1] for t, s in ((ta, a_scale), (tb, b_scale)) if s.shape[1] > 1]
    for t in varying:
        if t & (t - 1) or t < MIN_K_GROUP:
            raise NotImplementedError(
                f"K tiles that vary along K must be powers of two >= {MIN_K_GROUP}, got {t}"
            )
    gk = min(varying) if varying else 0
    check_int32_k(gk or k)
    key = block_scaled_key(ta, tb, m, n, k, out_dtype)
    cfg = resolve_config("int8_matmul_block_scaled", m, n, k, key, config, out_spec)
    bk = min(cfg.block_k, gk) if gk else cfg.block_k
    sa_t, a_rows = _row_tile(jnp.asarray(a_scale, jnp.float32), ta[0], m)
    sb_t, b_rows = _row_tile(jnp.asarray(b_scale, jnp.float32), tb[0], n)
    if unroll < 1:
        raise ValueError(f"unroll must be >= 1, got {unroll}")
    chunk_n = 0
    if split_n:
        if not (gk and b_scale.shape[1] > 1 and b_rows >= 16):
            raise ValueError(
                f"split_n needs b's scale to vary along K with a power-of-two row tile >= 16; got b tile {tb}"
            )
        if b_rows < cfg.block_n:  # else b's scale is already one value per tile and K group
            chunk_n = b_rows
    int4 = {}
    if b_bits == 4:  # steps of w packed bytes inside one half-split block; a padded to whole blocks
        block = int4_block(k)
        w = max(32, min(bk, block) // 2)
        if gk:
            w = min(w, gk // 2 if gk >= block else gk)
        int4 = dict(block=block, w=w)
        a = pad_to_int4_blocks(a, k)
        k = a.shape[1]
    # After INT4's padding: a scale constant along K covers the padded K too (not in the loop).
    a_k = ta[1] if a_scale.shape[1] > 1 else k
    b_k = tb[1] if b_scale.shape[1] > 1 else k
    plan = _Plan(m, n, k, b_bits, a_rows, b_rows, a_k, b_k, gk, unroll=unroll, chunk_n=chunk_n, **int4)
    epi = make_epilogue(  # the epilogue runs per column chunk (requantization tiles must fit in one)
        m,
        n,
        dataclasses.replace(cfg, block_n=chunk_n or cfg.block_n),
        bias=bias,
        activation=activation,
        residual=residual,
        out_dtype=out_dtype,
        out_spec=out_spec,
        interpret=resolve_interpret(interpret),
    )
    plan = dataclasses.replace(plan, convert=_resolve_convert(convert, plan, cfg))
    out = pl.pallas_call(
        functools.partial(_block_scaled_kernel, p=plan, cfg=cfg, bk=bk, epi=epi),
        out_shape=epilogue_out_shapes(m, n, epi),
        grid=(cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n),),
        compiler_params=compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=resolve_interpret(interpret),
        name="int8_matmul_block_scaled",
    )(a, sa_t, b, sb_t, *epilogue_inputs(bias, residual))
    return wrap_output(out, m, n, epi, out_spec)
