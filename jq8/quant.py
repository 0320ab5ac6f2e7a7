"""Quantization numerics: the one definition every kernel, custom_vjp op and PTQ path shares.

Every granularity is a *tile* of the 2-D view of an array. An array of shape (..., N) is viewed as
(M, N) with M = prod(leading dims); a tile of shape (tm, tn) gets one scale (and one zero point when
asymmetric). So:

    per-tensor            tile (M, N)
    per-row (token-wise)  tile (1, N)
    per-column (channel)  tile (M, 1)
    groups along rows     tile (g, 1)   e.g. contraction-axis groups of a (K, N) weight, g = 64 / 128
    groups along columns  tile (1, g)   e.g. contraction-axis groups of an (M, K) activation
    runs of whole rows    tile (r, N)   DeepSpeed-style groups of a weight stored (out, in)
    2-D blocks            tile (bm, bn) Jetfire, 32 x 32 by default

A tile size of -1 means "the whole axis". Shapes that are not multiples of the tile are handled: the last
tile along an axis is partial (scales have shape ``(cdiv(M, tm), cdiv(N, tn))``).

Rounding: ``nearest`` rounds half away from zero (``trunc(x + copysign(0.5, x))``); the same expression
runs inside the Pallas kernels (Triton has no ``round`` primitive), so kernels match this reference
bit for bit. ``stochastic`` is ``floor(x + u)`` with ``u`` in [0, 1) drawn from a counter-based hash of
(seed, row, column): reproducible for a given key, independent across tiles and kernel programs, and
computable inside a kernel from the global element index (see :func:`uniform_noise`).

Non-finite input: a tile that holds an inf or NaN gets a non-finite scale and dequantizes to non-finite
values (NaN/inf), so the problem stays visible downstream; other tiles are unaffected. All-zero tiles get
the scale floor ``SCALE_FLOOR`` and dequantize to exact zeros (never NaN).

INT32 accumulation bound: a dot of K int8 pairs is bounded by ``127 * 127 * K`` (symmetric quantization
clamps to [-127, 127]), so K <= ``MAX_EXACT_K`` = 133_152 cannot overflow int32. :func:`check_int32_k`
raises beyond that; the GEMM kernels rescale into fp32 per K group, so only one group must respect it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Rounding = Literal["nearest", "stochastic"]

SCALE_FLOOR = float(np.finfo(np.float32).tiny)
MAX_EXACT_K = (2**31 - 1) // (127 * 127)  # 133_152


def qmax(bits: int) -> int:
    """Largest magnitude of a symmetric signed code: 127 for INT8, 7 for INT4."""
    return 2 ** (bits - 1) - 1


def check_int32_k(k: int) -> None:
    """Raises if an int8 x int8 dot over ``k`` terms could overflow its int32 accumulator."""
    if k > MAX_EXACT_K:
        raise ValueError(
            f"contraction length K={k} exceeds {MAX_EXACT_K}: 127*127*K can overflow the int32 accumulator; "
            "quantize with K groups (a tile along the contraction axis) so each group's partial is rescaled."
        )


# ----------------------------------------------------------------------------------------------- spec


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How an array is quantized (static metadata; hashable, so it can be a jit static argument).

    tile: (tm, tn) tile of the 2-D view that shares one scale; -1 means the whole axis.
    bits: 8 or 4. INT4 codes are packed two per byte along the last axis.
    symmetric: symmetric codes in [-qmax, qmax]; asymmetric uses a zero point and codes in
      [-2**(bits-1), 2**(bits-1) - 1].
    exact_zero: (asymmetric only) the tile's range is stretched to include 0 and the zero point is an
      integer, so 0 is exactly representable (PyTorch's observers; what padded activations need). False:
      the range is the tile's own min..max and the zero point is fractional ("scale + min", llama.cpp's
      Q4_1 / Q4_K): finer codes for weights, and a weight already on such a grid (a Q4_1 GGUF tensor at
      its block size) comes back exactly.
    """

    tile: tuple[int, int] = (32, 32)
    bits: int = 8
    symmetric: bool = True
    exact_zero: bool = True

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if len(self.tile) != 2 or any((t != -1 and t < 1) for t in self.tile):
            raise ValueError(f"tile must be two positive sizes (or -1 for a whole axis), got {self.tile}")
        object.__setattr__(self, "tile", tuple(int(t) for t in self.tile))

    # Named constructors for the granularities in the module docstring.
    @classmethod
    def per_tensor(cls, bits: int = 8, symmetric: bool = True) -> QuantSpec:
        return cls((-1, -1), bits, symmetric)

    @classmethod
    def per_row(cls, bits: int = 8, symmetric: bool = True) -> QuantSpec:
        return cls((1, -1), bits, symmetric)

    @classmethod
    def per_column(cls, bits: int = 8, symmetric: bool = True) -> QuantSpec:
        return cls((-1, 1), bits, symmetric)

    @classmethod
    def groups(cls, size: int, axis: int, bits: int = 8, symmetric: bool = True) -> QuantSpec:
        """Groups of ``size`` consecutive elements along ``axis`` (0: down a column, 1: along a row)."""
        if axis not in (0, 1, -1, -2):
            raise ValueError(f"group axis must be 0 or 1 of the 2-D view, got {axis}")
        return cls((size, 1) if axis in (0, -2) else (1, size), bits, symmetric)

    @classmethod
    def row_runs(cls, rows: int, bits: int = 8, symmetric: bool = True) -> QuantSpec:
        """DeepSpeed-style groups: runs of ``rows`` whole rows share a scale."""
        return cls((rows, -1), bits, symmetric)

    @classmethod
    def blocks(cls, shape: tuple[int, int] = (32, 32), bits: int = 8, symmetric: bool = True) -> QuantSpec:
        return cls(tuple(shape), bits, symmetric)

    def resolve(self, rows: int, cols: int) -> tuple[int, int]:
        """The concrete tile for a 2-D view of shape (rows, cols); -1 becomes the whole axis."""
        tm, tn = self.tile
        return (rows if tm == -1 else tm, cols if tn == -1 else tn)

    def scale_shape(self, rows: int, cols: int) -> tuple[int, int]:
        tm, tn = self.resolve(rows, cols)
        return (max(1, -(-rows // tm)), max(1, -(-cols // tn)))


def _as_2d_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 0:
        return (1, 1)
    return (math.prod(shape[:-1]) if len(shape) > 1 else 1, shape[-1])


# ---------------------------------------------------------------------------------------------- QArray


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
    """A quantized array: integer codes + per-tile scales (+ zero points), a JAX pytree.

    values: (M, N) int8, or (M, int4_width(N)) uint8 holding two INT4 codes per byte (:func:`pack_int4`).
    scale: (cdiv(M, tm), cdiv(N, tn)) float32.
    zero_point: same shape as ``scale``, float32 (asymmetric only), else None. Dequantization is
      ``(code - zero_point) * scale``.
    spec, shape, dtype: static metadata (the spec, the original shape and dtype).
    """

    values: jax.Array
    scale: jax.Array
    zero_point: jax.Array | None = None
    spec: QuantSpec = dataclasses.field(default=QuantSpec(), metadata=dict(static=True))
    shape: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))
    dtype: jnp.dtype = dataclasses.field(default=jnp.float32, metadata=dict(static=True))

    @property
    def shape_2d(self) -> tuple[int, int]:
        return _as_2d_shape(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of codes + scales (+ zero points): what the array costs in memory or on disk."""
        n = self.values.size * self.values.dtype.itemsize + self.scale.size * self.scale.dtype.itemsize
        if self.zero_point is not None:
            n += self.zero_point.size * self.zero_point.dtype.itemsize
        return int(n)

    def dequantize(self, dtype=None) -> jax.Array:
        return dequantize(self, dtype)


# ------------------------------------------------------------------------------------------- rounding


def round_half_away(x: jax.Array) -> jax.Array:
    """Round to nearest, ties away from zero; the exact expression the kernels use."""
    return jnp.trunc(x + jnp.where(x >= 0, 0.5, -0.5).astype(x.dtype))


def _fmix32(h: jax.Array) -> jax.Array:
    # MurmurHash3's 32-bit finaliser: full avalanche, only uint32 multiply/shift/xor (lowers in Triton).
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    h = h ^ (h >> 16)
    return h


def noise_seed(key: jax.Array) -> jax.Array:
    """Two uint32 words derived from a ``jax.random`` key; kernels take this (2,) uint32 array."""
    return jax.random.bits(key, (2,), jnp.uint32)


def uniform_noise(seed: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """U[0, 1) float32 noise for global element coordinates (rows, cols) (broadcastable uint32/int32).

    A counter-based hash: the value depends only on (seed, row, col), so any kernel program can draw the
    noise of its own tile without coordination, and no two tiles share noise.
    """
    r = rows.astype(jnp.uint32)
    c = cols.astype(jnp.uint32)
    h = _fmix32(r * jnp.uint32(0x9E3779B9) + seed[0])
    h = _fmix32(h ^ (c * jnp.uint32(0x85EBCA6B) + seed[1]))
    return (h >> 8).astype(jnp.float32) * jnp.float32(1.0 / (1 << 24))


def round_stochastic(x: jax.Array, u: jax.Array) -> jax.Array:
    """Unbiased stochastic rounding: floor(x + u), u ~ U[0, 1)."""
    return jnp.floor(x + u)


# ---------------------------------------------------------------------------------------- quantize


def _tiles(x2: jax.Array, tile: tuple[int, int]) -> tuple[jax.Array, tuple[int, int]]:
    """(M, N) -> (gm, tm, gn, tn), edge-padded so a partial tile's statistics ignore the padding."""
    m, n = x2.shape
    tm, tn = tile
    gm, gn = -(-m // tm), -(-n // tn)
    pm, pn = gm * tm - m, gn * tn - n
    if pm or pn:
        x2 = jnp.pad(x2, ((0, pm), (0, pn)), mode="edge")
    return x2.reshape(gm, tm, gn, tn), (gm, gn)


def tile_stats(x: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array | None]:
    """Scale (and zero point) per tile of ``x``'s 2-D view, float32, shape ``spec.scale_shape``."""
    x2 = jnp.asarray(x, jnp.float32).reshape(_as_2d_shape(x.shape))
    t, _ = _tiles(x2, spec.resolve(*x2.shape))
    if spec.symmetric:
        amax = jnp.max(jnp.abs(t), axis=(1, 3))
        # XLA's max reduction may drop NaN on some backends; keep it in the scale explicitly.
        amax = jnp.where(jnp.isnan(t).any(axis=(1, 3)), jnp.nan, amax)
        return jnp.maximum(amax * np.float32(1.0 / qmax(spec.bits)), SCALE_FLOOR), None
    lo = jnp.where(jnp.isnan(t).any(axis=(1, 3)), jnp.nan, jnp.min(t, axis=(1, 3)))
    hi = jnp.max(t, axis=(1, 3))
    if spec.exact_zero:
        # The range includes 0 (exactly representable, as in PyTorch's observers); this also keeps a
        # constant tile's zero point finite.
        lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
    levels = 2**spec.bits - 1
    scale = jnp.maximum((hi - lo) / levels, SCALE_FLOOR)
    if not spec.exact_zero:
        # A (near-)constant tile would get a zero point ~ lo / SCALE_FLOOR (inf). A step of at least
        # 2^-16 of the tile's magnitude keeps |zero_point| <= 8 + 2^16 and brings a constant tile back exactly.
        scale = jnp.maximum(scale, jnp.maximum(jnp.abs(lo), jnp.abs(hi)) * np.float32(2.0**-16))
    # Code range [-2**(b-1), 2**(b-1)-1]; zero point maps lo to the lowest code.
    zero_point = -(2 ** (spec.bits - 1)) - lo / scale
    return scale, (round_half_away(zero_point) if spec.exact_zero else zero_point)


def reciprocal(scale: jax.Array) -> jax.Array:
    """1 / scale, correctly rounded (kernels compute it with div.rn, once per tile)."""
    return jnp.float32(1.0) / scale


def expand_tiles(s: jax.Array, tile: tuple[int, int], shape2d: tuple[int, int]) -> jax.Array:
    """Broadcast per-tile values (gm, gn) to the element grid (M, N)."""
    tm, tn = tile
    m, n = shape2d
    return jnp.repeat(jnp.repeat(s, tm, axis=0), tn, axis=1)[:m, :n]


def quantize(
    x: jax.Array,
    spec: QuantSpec = QuantSpec(),
    *,
    rounding: Rounding = "nearest",
    key: jax.Array | None = None,
    seed: jax.Array | None = None,
) -> QArray:
    """Quantizes ``x`` (any shape, float) to a :class:`QArray` under ``spec``, scales from the data.

    rounding="stochastic" needs ``key`` (a jax.random key) or ``seed`` (its :func:`noise_seed`, (2,) uint32).
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"quantize expects a floating array, got {x.dtype}")
    scale, zp = tile_stats(x, spec)
    return quantize_with_scale(x, scale, spec, zero_point=zp, rounding=rounding, key=key, seed=seed)


def quantize_with_scale(
    x: jax.Array,
    scale: jax.Array,
    spec: QuantSpec = QuantSpec(),
    *,
    zero_point: jax.Array | None = None,
    rounding: Rounding = "nearest",
    key: jax.Array | None = None,
    seed: jax.Array | None = None,
) -> QArray:
    """Codes of ``x`` for *given* per-tile scales (e.g. a calibrated static range); values outside saturate.

    scale (and zero_point for asymmetric specs): float32 of shape ``spec.scale_shape`` of x's 2-D view.
    """
    x = jnp.asarray(x)
    shape2d = _as_2d_shape(x.shape)
    tile = spec.resolve(*shape2d)
    scale = jnp.asarray(scale, jnp.float32).reshape(spec.scale_shape(*shape2d))
    if (zero_point is None) != spec.symmetric:
        raise ValueError("zero_point must be given exactly when the spec is asymmetric")
    x2 = x.astype(jnp.float32).reshape(shape2d)
    # Multiply by a per-tile reciprocal, written out: XLA would otherwise rewrite x / broadcast(scale)
    # into this under jit only (jit and eager would differ), and kernels avoid a division per element.
    y = x2 * expand_tiles(reciprocal(scale), tile, shape2d)
    if zero_point is not None:
        y = y + expand_tiles(zero_point, tile, shape2d)
    if rounding == "nearest":
        y = round_half_away(y)
    elif rounding == "stochastic":
        if seed is None:
            if key is None:
                raise ValueError("rounding='stochastic' needs key= (a jax.random key) or seed=")
            seed = noise_seed(key)
        rows = jnp.arange(shape2d[0], dtype=jnp.uint32)[:, None]
        cols = jnp.arange(shape2d[1], dtype=jnp.uint32)[None, :]
        y = round_stochastic(y, uniform_noise(seed, rows, cols))
    else:
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    if spec.symmetric:
        lo, hi = -qmax(spec.bits), qmax(spec.bits)
    else:
        lo, hi = -(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1
    # NaN codes would be undefined after the cast; the tile's scale already carries the NaN.
    codes = jnp.clip(jnp.nan_to_num(y, nan=0.0), lo, hi).astype(jnp.int8)
    if spec.bits == 4:
        codes = pack_int4(codes)
    return QArray(codes, scale, zero_point, spec, tuple(x.shape), x.dtype)


def dequantize(q: QArray, dtype=None) -> jax.Array:
    """Back to floating point: ``(code - zero_point) * scale``, in ``dtype`` (default: the original)."""
    shape2d = q.shape_2d
    codes = unpack_int4(q.values, shape2d[1]) if q.spec.bits == 4 else q.values
    tile = q.spec.resolve(*shape2d)
    y = codes.astype(jnp.float32)
    if q.zero_point is not None:
        y = y - expand_tiles(q.zero_point, tile, shape2d)
    y = y * expand_tiles(q.scale, tile, shape2d)
    return y.reshape(q.shape).astype(dtype or q.dtype)


def fake_quantize(x: jax.Array, spec: QuantSpec = QuantSpec(), **kw) -> jax.Array:
    """quantize then dequantize (for error analysis and simulated baselines, never the inference path)."""
    return dequantize(quantize(x, spec, **kw), x.dtype)


# ------------------------------------------------------------------------------------------ INT4 pack


INT4_BLOCKS = (256, 128, 64)  # half-split block widths, widest first


def int4_block(n: int) -> int:
    """Columns per half-split INT4 block for a row of ``n`` codes: the widest of 256 / 128 / 64 dividing n,
    else 64 (the row is then zero-padded to a multiple of 64)."""
    return next((p for p in INT4_BLOCKS if n % p == 0), INT4_BLOCKS[-1])


def int4_width(n: int) -> int:
    """Bytes per packed INT4 row of ``n`` codes: n / 2, rounded up to whole 64-column blocks."""
    return -(-n // 64) * 32


def pack_int4(codes: jax.Array) -> jax.Array:
    """(M, N) int8 codes in [-8, 7] -> (M, int4_width(N)) uint8 in the *half-split* layout.

    The row is cut into blocks of P = :func:`int4_block` (N) columns; byte i of a block holds column i in
    its low nibble and column P/2 + i in its high nibble. A GEMM kernel then reads each nibble plane as a
    contiguous half of the block, to be multiplied by a contiguous half of the activations: no interleave
    on the GPU (4x faster decode GEMVs than adjacent pairs, BENCHMARKS.md).
    """
    m, n = codes.shape
    p, width = int4_block(n), int4_width(n)
    if 2 * width != n:
        codes = jnp.pad(codes, ((0, 0), (0, 2 * width - n)))
    u = (codes.astype(jnp.int32) & 0xF).reshape(m, -1, 2, p // 2)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).astype(jnp.uint8).reshape(m, width)


def unpack_int4(packed: jax.Array, n: int) -> jax.Array:
    """Inverse of :func:`pack_int4`: (M, int4_width(n)) uint8 -> (M, n) int8, sign-extended."""
    m, width = packed.shape
    if width != int4_width(n):
        raise ValueError(f"packed INT4 rows of {n} codes are {int4_width(n)} bytes, got {width}")
    p = int4_block(n)
    s = packed.reshape(m, -1, 1, p // 2).astype(jnp.int32)
    lo = ((s & 0xF) ^ 8) - 8  # sign-extend a nibble
    hi = ((s >> 4) ^ 8) - 8
    out = jnp.concatenate([lo, hi], axis=2).reshape(m, 2 * width)
    return out[:, :n].astype(jnp.int8)


def unpack_int4_pairs(packed: jax.Array, n: int) -> jax.Array:
    """The layout of format-2 checkpoints (column 2i in the low nibble of byte i, 2i + 1 in the high one):
    (M, ceil(n/2)) uint8 -> (M, n) int8. Only for reading old checkpoints."""
    s = packed.astype(jnp.int32)
    lo, hi = ((s & 0xF) ^ 8) - 8, ((s >> 4) ^ 8) - 8
    return jnp.stack([lo, hi], axis=-1).reshape(packed.shape[0], -1)[:, :n].astype(jnp.int8)
