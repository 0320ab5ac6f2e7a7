"""Single-token (decode) attention over a KV cache: one program per (batch, head), online softmax.

    o[b, h] = softmax(q[b, h] . k[b, :n, h]^T * scale) . v[b, :n, h],    n = min(length, L)

At decode there is one query row per (batch, head), so the work is a GEMV over the cache: the time is the
K / V bytes over the bandwidth, and a tensor-core dot does not apply (Triton dots need >= 16 rows). Each
program keeps q (Dh,) in registers and sweeps its head's cache in tiles of ``block_l`` positions: scores are
an elementwise product summed over Dh, the output an elementwise product summed over the positions, with
the running max / denominator / (Dh,) accumulator of the online softmax in float32 (the flash-attention
recurrence, so the cache is read once and no (L,) score row is materialized).

The loop runs over the tiles that hold visible positions only (``cdiv(n, block_l)``, a traced trip count):
a short sequence in a long cache streams only its prefix. Loads are masked at ``n``, so positions past the
length are never read (their contents, NaN or garbage, cannot leak in) and score -inf.

q: (B, H, Dh); k_cache, v_cache: (B, L, H, Dh) (the cache layout of :mod:`jq8` decode), any float dtypes
(cast to float32 in the kernel); Dh a power of two (a Triton tensor dimension).

:func:`decode_attention_update` is the whole cached step of a decoder layer in one launch: it takes the
packed (B, 3, H, Dh) qkv row, writes the new key / value into the caches in place, attends, and returns the
advanced index. Done by XLA, the slice of q, the two cache writes and the index add are four more launches
per layer (about 5.5 us of a 1.5B token's 38 us per layer on the H100, BENCHMARKS.md session 7).
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

from pallas_kernels._common import compiler_params, is_pow2, next_pow2, resolve_interpret
from pallas_kernels.int8_matmul_decode import SplitKSum

MAX_BLOCK_L = 128  # positions per tile: 128 x Dh f32 for K and V stays in registers at 4 warps (Dh <= 128)
MIN_BLOCK_L = 16
MAX_I32_ELEMS = 2**31  # Pallas' Triton lowering computes element offsets in int32


def default_block_l(seq_len: int) -> int:
    """min(next power of two >= L, 128), at least 16."""
    return max(MIN_BLOCK_L, min(next_pow2(seq_len), MAX_BLOCK_L))


def _check_inputs(q, k_cache, v_cache, length) -> tuple[int, int, int, int]:
    """(B, H, L, Dh) after validating shapes and dtypes."""
    if q.ndim != 3:
        raise ValueError(f"q must be (B, H, Dh), got shape {q.shape}")
    if k_cache.ndim != 4 or v_cache.ndim != 4:
        raise ValueError(
            f"k_cache and v_cache must be (B, L, H, Dh), got shapes {k_cache.shape} and {v_cache.shape}"
        )
    b, h, dh = q.shape
    seq_len = k_cache.shape[1]
    expect = (b, seq_len, h, dh)
    if k_cache.shape != expect or v_cache.shape != expect:
        raise ValueError(
            f"k_cache and v_cache must be (B, L, H, Dh) = {expect} to match q (B, H, Dh) = {q.shape}, got "
            f"{k_cache.shape} and {v_cache.shape}"
        )
    if seq_len < 1:
        raise ValueError(f"the cache must hold at least one position, got L={seq_len}")
    if not is_pow2(dh):
        raise ValueError(f"head dim Dh={dh} must be a power of two (Triton tensor shapes)")
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be floating (bf16 / f16 / f32), got {x.dtype}")
    if jnp.ndim(length) != 0:
        raise ValueError(f"length must be a scalar, got shape {jnp.shape(length)}")
    return b, h, seq_len, dh


def _attend_cache(q, k_ref, v_ref, b, h, n, *, block_l: int, head_dim: int):
    """Online-softmax state (max, denominator, (Dh,) accumulator) of q over cache positions [0, n)."""
    pos = jnp.arange(block_l)

    def body(i, carry):
        m, denom, acc = carry
        l0 = i * block_l
        ok = l0 + pos < n
        tile = (b, pl.ds(l0, block_l), h, slice(None))
        # Masked at n (not L): positions past the length are never read, so NaN / garbage there is inert.
        k = plgpu.load(k_ref.at[tile], mask=ok[:, None], other=0.0).astype(jnp.float32)
        v = plgpu.load(v_ref.at[tile], mask=ok[:, None], other=0.0).astype(jnp.float32)
        s = jnp.where(ok, jnp.sum(k * q[None, :], axis=1), -jnp.inf)  # (block_l,): no 1-row dot in Triton
        m_new = jnp.maximum(m, jnp.max(s))
        # Every visited tile holds a visible position, so m_new is finite; the guard keeps a fully masked
        # tile (only possible for length <= 0) from computing -inf - -inf = NaN.
        m_ref = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp(m - m_ref)
        p = jnp.exp(s - m_ref)
        acc = acc * alpha + jnp.sum(p[:, None] * v, axis=0)
        return m_new, denom * alpha + jnp.sum(p), acc

    init = (jnp.float32(-jnp.inf), jnp.float32(0.0), jnp.zeros((head_dim,), jnp.float32))
    # Only the tiles with visible positions: a traced trip count (Pallas lowers it to an scf.for).
    num_tiles = lax.div(n + (block_l - 1), block_l)
    return lax.fori_loop(0, num_tiles, body, init)


def _finish(denom, acc):
    return acc / jnp.where(denom == 0.0, 1.0, denom)  # length <= 0: zeros rather than 0 / 0


def _kernel(len_ref, q_ref, k_ref, v_ref, o_ref, *, seq_len: int, head_dim: int, block_l: int, scale: float):
    b, h = pl.program_id(0), pl.program_id(1)
    n = jnp.clip(len_ref[0], 0, seq_len)  # visible positions; a length past the cache means all of it
    q = plgpu.load(q_ref.at[b, h, :]).astype(jnp.float32) * scale  # scale folded into q once
    _, denom, acc = _attend_cache(q, k_ref, v_ref, b, h, n, block_l=block_l, head_dim=head_dim)
    plgpu.store(o_ref.at[b, h, :], _finish(denom, acc).astype(o_ref.dtype))


@dataclasses.dataclass(frozen=True)
class _Rows:
    """How the update kernel reads the new token's (q, k, v) rows (static): packed values, or split-K
    partial sums (``SplitKSum``) finished in the prologue: sum the ``splits``, scale, add the bias, round
    to ``dtype`` (exactly the XLA epilogue the sum replaces)."""

    dtype: jnp.dtype
    splits: int = 0  # 0: the rows are values
    row_scale: bool = False
    col_scale: bool = False
    bias: bool = False


def _update_kernel(*refs, rows: _Rows, seq_len: int, head_dim: int, block_l: int, scale: float):
    """_kernel for a new token: its key / value come from the qkv rows (registers, not the cache), are
    written at position p = min(index, L - 1), and the cache before p is attended from memory.
    k_out / v_out alias k_ref / v_ref (in place); each program writes only its own (b, h) row."""
    idx_ref, qkv_ref, *rest = refs
    rs_ref = rest.pop(0) if rows.row_scale else None
    cs_ref = rest.pop(0) if rows.col_scale else None
    bias_ref = rest.pop(0) if rows.bias else None
    k_ref, v_ref, o_ref, k_out, v_out, next_ref = rest
    b, h = pl.program_id(0), pl.program_id(1)
    idx = idx_ref[0]
    p = jnp.clip(idx, 0, seq_len - 1)  # like dynamic_update_slice: an index past the end writes the last slot

    def vec(ref, *lead):  # (Dh,) f32 at ref[*lead, h, :]; pl.ds: constant integer indices fail interpret mode
        view = ref.at[tuple(pl.ds(i, 1) if isinstance(i, int) else i for i in lead) + (h, slice(None))]
        return plgpu.load(view).reshape(head_dim).astype(jnp.float32)

    def row(j: int, dtype):
        if not rows.splits:
            x = vec(qkv_ref, b, j)
        else:
            x = vec(qkv_ref, 0, b, j)
            for s in range(1, rows.splits):
                x = x + vec(qkv_ref, s, b, j)  # int32 sums are exact, as XLA's
            if rs_ref is not None:
                x = x * plgpu.load(rs_ref.at[pl.ds(b, 1)]).astype(jnp.float32)
            if cs_ref is not None:
                x = x * vec(cs_ref, j)
            if bias_ref is not None:
                x = x + vec(bias_ref, j)
        return x.astype(rows.dtype).astype(dtype).astype(jnp.float32)

    # k / v rounded to the cache dtype first: the new position reads as it will from the cache later.
    q, k_new, v_new = row(0, rows.dtype) * scale, row(1, k_out.dtype), row(2, v_out.dtype)
    m, denom, acc = _attend_cache(q, k_ref, v_ref, b, h, p, block_l=block_l, head_dim=head_dim)
    s = jnp.sum(q * k_new)  # the new position: one more step of the online softmax
    m_new = jnp.maximum(m, s)
    alpha, e = jnp.exp(m - m_new), jnp.exp(s - m_new)
    o = _finish(denom * alpha + e, acc * alpha + e * v_new)
    plgpu.store(o_ref.at[b, h, :], o.astype(o_ref.dtype))
    # Written after the loop: the reads above stop before p, so the order only matters for clarity.
    plgpu.store(k_out.at[b, pl.ds(p, 1), h, :], k_new[None, :].astype(k_out.dtype))
    plgpu.store(v_out.at[b, pl.ds(p, 1), h, :], v_new[None, :].astype(v_out.dtype))

    @pl.when((b == 0) & (h == 0))
    def _():  # the advanced index: a separate XLA add would be one more launch per layer
        next_ref[...] = jnp.broadcast_to(idx + 1, (1,))


_STATIC = ("scale", "block_l", "num_warps", "interpret")


def _plan(k_cache, dh: int, block_l, scale, interpret) -> tuple[int, float, bool]:
    """(block_l, scale, interpret) after checking them and the int32 offsets of the Triton lowering."""
    bl = default_block_l(k_cache.shape[1]) if block_l is None else block_l
    if not is_pow2(bl):
        raise ValueError(f"block_l={bl} must be a power of two (Triton tensor shapes)")
    interp = resolve_interpret(interpret)
    if not interp and k_cache.size > MAX_I32_ELEMS:
        raise ValueError(
            f"the cache has {k_cache.size} elements: the Triton lowering addresses it with int32 offsets "
            f"(at most {MAX_I32_ELEMS}); split the batch"
        )
    return bl, 1.0 / math.sqrt(dh) if scale is None else float(scale), interp


@functools.partial(jax.jit, static_argnames=_STATIC)
def decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    length: jax.Array | int,
    *,
    scale: float | None = None,
    block_l: int | None = None,
    num_warps: int = 4,
    interpret: bool | None = None,
) -> jax.Array:
    """Attention of one query token per batch row over the first ``length`` cache positions.

    q: (B, H, Dh) bf16 / f16 / f32. k_cache, v_cache: (B, L, H, Dh) floating (any float dtypes; computed
    in float32). length: int32 scalar, may be traced: positions [0, min(length, L)) are visible (callers
    guarantee length >= 1). scale: default 1 / sqrt(Dh). block_l: cache positions per tile, a power of two
    (default :func:`default_block_l`). Returns (B, H, Dh) in q.dtype. ``interpret=None``: compiled on a
    GPU, interpret mode elsewhere.
    """
    _, h, seq_len, dh = _check_inputs(q, k_cache, v_cache, length)
    bl, scale, interp = _plan(k_cache, dh, block_l, scale, interpret)
    kernel = functools.partial(_kernel, seq_len=seq_len, head_dim=dh, block_l=bl, scale=scale)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(q.shape[0], h),
        compiler_params=compiler_params(num_warps, num_stages=2),  # the loop is load-bound: double-buffer
        interpret=interp,
        name="decode_attention",
    )(jnp.asarray(length, jnp.int32).reshape(1), q, k_cache, v_cache)


def _check_packed(qkv) -> jax.ShapeDtypeStruct:
    """The query's (B, H, Dh) shape and dtype, after checking qkv is (B, 3, H, Dh) (or finishes to it)."""
    if len(qkv.shape) != 4 or qkv.shape[1] != 3:
        raise ValueError(f"qkv must be (B, 3, H, Dh) (query, new key, new value), got shape {qkv.shape}")
    b, _, h, dh = qkv.shape
    if isinstance(qkv, SplitKSum) and qkv.parts.shape[1:] != (b, 3 * h * dh):
        raise ValueError(f"SplitKSum parts {qkv.parts.shape} do not finish to qkv {qkv.shape}")
    return jax.ShapeDtypeStruct((b, h, dh), qkv.dtype)


def _row_inputs(qkv) -> tuple[_Rows, list[jax.Array]]:
    """The kernel's view of qkv: values (B, 3, H, Dh), or a SplitKSum's parts (S, B, 3, H, Dh) + scales."""
    if not isinstance(qkv, SplitKSum):
        return _Rows(jnp.dtype(qkv.dtype)), [qkv]
    b, _, h, dh = qkv.shape
    present = [v is not None for v in (qkv.row_scale, qkv.col_scale, qkv.bias)]
    rows = _Rows(jnp.dtype(qkv.dtype), qkv.parts.shape[0], *present)
    cols = [v.reshape(3, h, dh) for v in (qkv.col_scale, qkv.bias) if v is not None]
    scales = [qkv.row_scale] if qkv.row_scale is not None else []
    return rows, [qkv.parts.reshape(-1, b, 3, h, dh), *scales, *cols]


@functools.partial(jax.jit, static_argnames=_STATIC)
def decode_attention_update(
    qkv: jax.Array | SplitKSum,
    k_cache: jax.Array,
    v_cache: jax.Array,
    index: jax.Array | int,
    *,
    scale: float | None = None,
    block_l: int | None = None,
    num_warps: int = 4,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One decode step of a KV cache in one launch: write the new key / value, attend, advance the index.

    qkv: (B, 3, H, Dh) float, the new token's query, key and value (the packed output of a qkv projection:
    no slice is materialized), or a :class:`~pallas_kernels.int8_matmul_decode.SplitKSum` that finishes to
    it (a split-K decode GEMM's partial sums: the kernel sums, scales, adds the bias and rounds them in its
    prologue, which saves the reduction's launch). k_cache, v_cache: (B, L, H, Dh) floating, ``index``
    filled positions (int32 scalar, may be traced). The new key / value go to position
    p = min(index, L - 1) (where ``dynamic_update_slice`` would put them) and the query attends to
    positions [0, p].
    Returns (o (B, H, Dh) in qkv's dtype, k_cache, v_cache, index + 1 (int32 scalar)). The caches are
    updated in place (input_output_aliases: inside a jitted loop, or with donated arguments, no copy);
    the index is advanced by the kernel, so a decode step needs no separate launch for it.
    Equals :func:`decode_attention_update_reference` (float32 math).
    """
    _, h, seq_len, dh = _check_inputs(_check_packed(qkv), k_cache, v_cache, index)
    bl, scale, interp = _plan(k_cache, dh, block_l, scale, interpret)
    rows, row_inputs = _row_inputs(qkv)
    kernel = functools.partial(
        _update_kernel, rows=rows, seq_len=seq_len, head_dim=dh, block_l=bl, scale=scale
    )
    b, n_in = qkv.shape[0], 1 + len(row_inputs)  # index, the row inputs, then the caches
    o, k_cache, v_cache, nxt = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((b, h, dh), qkv.dtype),
            jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
            jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype),
            jax.ShapeDtypeStruct((1,), jnp.int32),
        ),
        grid=(b, h),
        input_output_aliases={n_in: 1, n_in + 1: 2},
        compiler_params=compiler_params(num_warps, num_stages=2),
        interpret=interp,
        name="decode_attention_update",
    )(jnp.asarray(index, jnp.int32).reshape(1), *row_inputs, k_cache, v_cache)
    return o, k_cache, v_cache, nxt[0]


def decode_attention_reference(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    length: jax.Array | int,
    *,
    scale: float | None = None,
) -> jax.Array:
    """Pure-jnp :func:`decode_attention` (float32 math, same masking), for tests."""
    dh = q.shape[-1]
    scale = 1.0 / math.sqrt(dh) if scale is None else scale
    qf, kf, vf = (x.astype(jnp.float32) for x in (q, k_cache, v_cache))
    s = jnp.einsum("bhd,blhd->bhl", qf * scale, kf, precision=lax.Precision.HIGHEST)
    visible = jnp.arange(k_cache.shape[1]) < jnp.minimum(length, k_cache.shape[1])
    s = jnp.where(visible, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    # Masked probabilities are exactly 0, but 0 * NaN = NaN: zero the hidden values too.
    vf = jnp.where(visible[None, :, None, None], vf, 0.0)
    return jnp.einsum("bhl,blhd->bhd", p, vf, precision=lax.Precision.HIGHEST).astype(q.dtype)


def decode_attention_update_reference(
    qkv: jax.Array | SplitKSum,
    k_cache: jax.Array,
    v_cache: jax.Array,
    index: jax.Array | int,
    *,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Pure-jnp :func:`decode_attention_update`: ``dynamic_update_slice`` the new key / value, then
    :func:`decode_attention_reference` over the written positions."""
    _check_inputs(_check_packed(qkv), k_cache, v_cache, index)
    if isinstance(qkv, SplitKSum):
        qkv = qkv.finish()
    index = jnp.asarray(index, jnp.int32)
    p = jnp.clip(index, 0, k_cache.shape[1] - 1)
    k_cache = lax.dynamic_update_slice(k_cache, qkv[:, 1:2].astype(k_cache.dtype), (0, p, 0, 0))
    v_cache = lax.dynamic_update_slice(v_cache, qkv[:, 2:3].astype(v_cache.dtype), (0, p, 0, 0))
    o = decode_attention_reference(qkv[:, 0], k_cache, v_cache, p + 1, scale=scale)
    return o, k_cache, v_cache, index + 1
