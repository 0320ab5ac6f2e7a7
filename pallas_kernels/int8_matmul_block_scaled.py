"""Block-scaled INT8 GEMM (NT layout): scales that vary along K (Jetfire 32x32 blocks, DeepSeek-style 1x128
activation tiles with 128x128 weight blocks, ZeroQuant group-wise weights with per-token activations).

    out = act(sum_g (a_g @ b_g.T) * sa_g * sb_g + bias) + residual

a: (M, K) int8 with a_scale (cdiv(M, ta_m), cdiv(K, ta_k)); b: (N, K) int8 (or packed INT4) with b_scale
(cdiv(N, tb_n), cdiv(K, tb_k)). Per K group of ``gk = min`` over the operands whose scale varies along K, the
int32 partial of ``gk / block_k`` tensor-core steps is converted and rescaled into an f32 accumulator once.
What makes it cheap (h100.md: the rescale is CUDA-core work on every accumulator element):
  * an operand whose scale is constant along K (per-row activations, per-column weights) is applied in the
    epilogue only; the loop then does one multiply-add per element with a row or column vector;
  * a scale tile as large as the output tile (128x128 weight blocks with block_n <= 128) is one scalar per
    K group, folded into the other operand's vector before it touches the accumulator;
  * scales are read as small contiguous vectors per program (the wrapper transposes them to (K groups, rows)),
    never gathered per element.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jq8.quant import QArray, QuantSpec, check_int32_k, expand_tiles, unpack_int4
from pallas_kernels._common import TileConfig, cdiv, compiler_params, resolve_interpret
from pallas_kernels.int8_matmul import (
    NT_DIMS,
    Activation,
    epilogue_inputs,
    epilogue_out_shapes,
    epilogue_reference,
    grouped_program_ids,
    int8_matmul,
    int_dot,
    load_k_tile,
    make_epilogue,
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
    magic_convert: bool = True
    overlap: bool = False

    @property
    def a_in_loop(self) -> bool:
        return self.gk > 0 and self.a_k < self.k

    @property
    def b_in_loop(self) -> bool:
        return self.gk > 0 and self.b_k < self.k


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


MAGIC_BITS = 0x4B400000  # bit pattern of 1.5 * 2**23
MAGIC_FLOAT = 12582912.0  # 1.5 * 2**23


def to_f32(x: jax.Array, magic: bool) -> jax.Array:
    """int32 -> f32. ``magic``: exact for |x| < 2**22 with an integer add and a float subtract instead of the
    int->float convert instruction, which runs at a fraction of FMA throughput on the CUDA cores (the rescale
    of the per-group partial is the bottleneck of block-scaled GEMMs, h100.md)."""
    if not magic:
        return x.astype(jnp.float32)
    return lax.bitcast_convert_type(x + jnp.int32(MAGIC_BITS), jnp.float32) - MAGIC_FLOAT


@dataclasses.dataclass(frozen=True)
class Rescale:
    """How the per-K-group int32 partial becomes f32 (static; benchmarked variants, all exact).

    magic_convert: int->float by the 1.5 * 2**23 trick (used when the group's partial provably fits 2**22).
    overlap: software-pipeline the rescale of group g-1 behind the product of group g (more registers).
    """

    magic_convert: bool = True
    overlap: bool = False


def _block_scaled_kernel(a_ref, sa_ref, b_ref, sb_ref, *rest, p: _Plan, cfg: TileConfig, bk: int, epi):
    bm, bn = cfg.block_m, cfg.block_n
    num_m, num_n = cdiv(p.m, bm), cdiv(p.n, bn)
    epi_refs, out_refs = rest[: epi.num_inputs], rest[epi.num_inputs :]
    pid_m, pid_n = grouped_program_ids(pl.program_id(0), num_m, num_n, cfg.group_m)
    row0 = pl.multiple_of(pid_m * bm, bm)
    col0 = pl.multiple_of(pid_n * bn, bn)
    a_mask = (row0 + jnp.arange(bm)) < p.m if p.m % bm else None
    b_mask = (col0 + jnp.arange(bn)) < p.n if p.n % bn else None
    a_count = cdiv(p.m, p.a_rows) if p.a_rows else 1
    b_count = cdiv(p.n, p.b_rows) if p.b_rows else 1

    def sa(col):
        return _scale_vector(sa_ref, col, row0, bm, p.a_rows, a_count)[:, None]  # (bm | 1, 1)

    def sb(col):
        return _scale_vector(sb_ref, col, col0, bn, p.b_rows, b_count)[None, :]  # (1, bn | 1)

    def partial(k0, nsteps: int, k_valid):
        """int32 product over K columns [k0, k0 + nsteps * bk)."""

        def one(kk, acc):
            a = load_k_tile(a_ref, row0, bm, kk, bk, row_mask=a_mask, k_valid=k_valid)
            b = load_k_tile(b_ref, col0, bn, kk, bk, row_mask=b_mask, k_valid=k_valid, bits=p.b_bits)
            return acc + int_dot(a, b)

        acc = jnp.zeros((bm, bn), jnp.int32)
        if nsteps <= 4:  # unrolled: the group loop stays the one Triton pipelines
            for s in range(nsteps):
                acc = one(k0 + s * bk, acc)
            return acc
        return lax.fori_loop(0, nsteps, lambda s, c: one(pl.multiple_of(k0 + s * bk, bk), c), acc)

    if p.gk == 0:  # no scale varies along K: plain int32 loop, all scaling in the epilogue
        acc = lax.fori_loop(
            0,
            p.k // bk,
            lambda i, c: c + partial(pl.multiple_of(i * bk, bk), 1, None),
            jnp.zeros((bm, bn), jnp.int32),
        )
        if p.k % bk:
            acc = acc + partial(jnp.int32((p.k // bk) * bk), 1, p.k)
        y = acc.astype(jnp.float32)
    else:
        steps = p.gk // bk

        def scale_of(g):
            if p.a_in_loop and p.b_in_loop:
                return sa(g // (p.a_k // p.gk)) * sb(g // (p.b_k // p.gk))  # (bm|1, bn|1)
            if p.a_in_loop:
                return sa(g // (p.a_k // p.gk))
            return sb(g // (p.b_k // p.gk))

        def part_of(g, nsteps=steps, k_valid=None):
            return partial(pl.multiple_of(g * p.gk, p.gk), nsteps, k_valid)

        def rescale(acc, part, g):
            return acc + to_f32(part, p.magic_convert) * scale_of(g)

        num_g = p.k // p.gk
        zeros = jnp.zeros((bm, bn), jnp.float32)
        if p.overlap and num_g >= 2:
            # Software pipeline: group g's tensor-core product is issued before group g-1's partial is
            # converted and rescaled on the CUDA cores, so the two can overlap.
            def body(g, carry):
                acc, prev = carry
                cur = part_of(g)
                return rescale(acc, prev, g - 1), cur

            y, last = lax.fori_loop(1, num_g, body, (zeros, part_of(jnp.int32(0))))
            y = rescale(y, last, num_g - 1)
        else:
            y = lax.fori_loop(0, num_g, lambda g, acc: rescale(acc, part_of(g), g), zeros)
        tail = p.k % p.gk
        if tail:
            g = jnp.int32(num_g)
            y = rescale(y, part_of(g, cdiv(tail, bk), p.k), g)
    if not p.a_in_loop:
        y = y * sa(0)
    if not p.b_in_loop:
        y = y * sb(0)
    store_epilogue(y, epi_refs, out_refs, epi=epi, row0=row0, col0=col0, bm=bm, bn=bn, m=p.m, n=p.n)


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
        "rescale",
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
    rescale: Rescale = Rescale(),
    config: TileConfig | None = None,
    interpret: bool | None = None,
) -> jax.Array | QArray:
    """INT8 GEMM with per-tile scales along K: ``act(dequant(a) @ dequant(b).T + bias) + residual``.

    a: (M, K) int8, a_scale (cdiv(M, ta_m), cdiv(K, ta_k)) f32; b: (N, K) int8 (or (N, ceil(K/2)) uint8
    INT4 with ``b_bits=4``), b_scale (cdiv(N, tb_n), cdiv(K, tb_k)) f32. Tiles are inferred from the shapes
    (see :func:`infer_tile`) unless ``a_tile``/``b_tile`` are given. K tiles that vary must be powers of two
    >= 32. ``rescale`` picks how per-group partials are converted (:class:`Rescale`; results are identical).
    Epilogue arguments and the return value as in :func:`pallas_kernels.int8_matmul.int8_matmul`.
    """
    m, k = a.shape
    n = b.shape[0]
    if a.dtype != jnp.int8:
        raise TypeError(f"a must be int8, got {a.dtype}")
    expect_b = (n, cdiv(k, 2) if b_bits == 4 else k)
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
    epi = make_epilogue(
        m, n, cfg, bias=bias, activation=activation, residual=residual, out_dtype=out_dtype, out_spec=out_spec
    )
    sa_t, a_rows = _row_tile(jnp.asarray(a_scale, jnp.float32), ta[0], m)
    sb_t, b_rows = _row_tile(jnp.asarray(b_scale, jnp.float32), tb[0], n)
    magic = rescale.magic_convert and gk * 127 * 127 < 2**22  # the trick is exact below 2**22
    plan = _Plan(
        m,
        n,
        k,
        b_bits,
        a_rows,
        b_rows,
        ta[1] if a_scale.shape[1] > 1 else k,
        tb[1] if b_scale.shape[1] > 1 else k,
        gk,
        magic,
        rescale.overlap,
    )
    out = pl.pallas_call(
        functools.partial(_block_scaled_kernel, p=plan, cfg=cfg, bk=bk, epi=epi),
        out_shape=epilogue_out_shapes(m, n, epi),
        grid=(cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n),),
        compiler_params=compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=resolve_interpret(interpret),
        name="int8_matmul_block_scaled",
    )(a, sa_t, b, sb_t, *epilogue_inputs(bias, residual))
    return wrap_output(out, m, n, epi, out_spec)


# --------------------------------------------------------------------------------------------- dispatch


def matmul_qarrays(a: QArray, b: QArray, **epilogue) -> jax.Array | QArray:
    """GEMM of two quantized operands in NT layout: a (M, K), b (N, K) (INT8, or INT4 for b).

    Scales constant along K on both sides -> :func:`int8_matmul` (scales expanded to per-row/per-column
    vectors, applied in the epilogue); otherwise :func:`int8_matmul_block_scaled`. ``epilogue``: bias,
    activation, residual, out_dtype, out_spec, config, interpret.
    """
    (m, k), (n, kb) = a.shape_2d, b.shape_2d
    if k != kb:
        raise ValueError(
            f"contraction mismatch: a is {a.shape_2d}, b is {b.shape_2d} (both operands are (., K))"
        )
    if a.zero_point is not None or b.zero_point is not None:
        raise NotImplementedError("matmul_qarrays needs symmetric quantization (no zero points)")
    if a.spec.bits != 8:
        raise NotImplementedError(f"the activation operand must be INT8, got {a.spec.bits} bits")
    ta, tb = a.spec.resolve(m, k), b.spec.resolve(n, k)
    if a.scale.shape[1] == 1 and b.scale.shape[1] == 1:
        sa = jnp.repeat(a.scale[:, 0], ta[0])[:m].reshape(m, 1)
        sb = jnp.repeat(b.scale[:, 0], tb[0])[:n].reshape(1, n)
        return int8_matmul(a.values, b.values, sa, sb, b_bits=b.spec.bits, **epilogue)
    return int8_matmul_block_scaled(
        a.values, a.scale, b.values, b.scale, b_bits=b.spec.bits, a_tile=ta, b_tile=tb, **epilogue
    )
