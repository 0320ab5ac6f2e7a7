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

q: (B, H, Dh); k_cache, v_cache: (B, L, Hkv, Dh) (the cache layout of :mod:`jq8` decode), any float
dtypes (cast to float32 in the kernel); Dh a power of two (a Triton tensor dimension). Grouped-query
attention: H = g * Hkv, query head h reads KV head h // g (program (b, h) streams that head's cache; the g
programs of a group read the same rows, mostly from L2). Hkv = H is multi-head attention.

:func:`decode_attention_update` is the whole cached step of a decoder layer in one launch: it takes the
packed (B, H + 2 Hkv, Dh) qkv row, writes the new key / value into the caches in place, attends, and returns the
advanced index. Done by XLA, the slice of q, the two cache writes and the index add are four more launches
per layer (about 5.5 us of a 1.5B token's 38 us per layer on the H100, BENCHMARKS.md).
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
    """(B, H, L, Dh) after validating shapes and dtypes (the caches hold Hkv heads, H % Hkv == 0)."""
    if q.ndim != 3:
        raise ValueError(f"q must be (B, H, Dh), got shape {q.shape}")
    if k_cache.ndim != 4 or v_cache.ndim != 4:
        raise ValueError(
            f"k_cache and v_cache must be (B, L, Hkv, Dh), got shapes {k_cache.shape} and {v_cache.shape}"
        )
    b, h, dh = q.shape
    seq_len, hk = k_cache.shape[1], k_cache.shape[2]
    expect = (b, seq_len, hk if hk and h % hk == 0 else h, dh)
    if k_cache.shape != expect or v_cache.shape != expect:
        raise ValueError(
            f"k_cache and v_cache must be (B, L, Hkv, Dh) = {expect} to match q (B, H, Dh) = {q.shape} (Hkv "
            f"dividing H), got {k_cache.shape} and {v_cache.shape}"
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


def _kernel(len_ref, q_ref, k_ref, v_ref, o_ref, *, seq_len: int, head_dim: int, block_l: int, scale: float,
            group: int):
    b, h = pl.program_id(0), pl.program_id(1)
    n = jnp.clip(len_ref[0], 0, seq_len)  # visible positions; a length past the cache means all of it
    q = plgpu.load(q_ref.at[b, h, :]).astype(jnp.float32) * scale  # scale folded into q once
    _, denom, acc = _attend_cache(q, k_ref, v_ref, b, h // group, n, block_l=block_l, head_dim=head_dim)
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


def _update_kernel(*refs, rows: _Rows, seq_len: int, head_dim: int, block_l: int, scale: float, group: int):
    """_kernel for a new token: its key / value come from the qkv rows (registers, not the cache), are
    written at position p = min(index, L - 1), and the cache before p is attended from memory.
    qkv rows: (B, H + 2 Hkv, Dh) heads, query head h, its key H + h // group, its value H + Hkv + h // group.
    k_out / v_out alias k_ref / v_ref (in place); the first program of each KV group writes its (b, kv) row."""
    idx_ref, qkv_ref, *rest = refs
    rs_ref = rest.pop(0) if rows.row_scale else None
    cs_ref = rest.pop(0) if rows.col_scale else None
    bias_ref = rest.pop(0) if rows.bias else None
    k_ref, v_ref, o_ref, k_out, v_out, next_ref = rest
    b, h = pl.program_id(0), pl.program_id(1)
    num_q, num_kv = group * k_ref.shape[2], k_ref.shape[2]
    kv = h // group
    idx = idx_ref[0]
    p = jnp.clip(idx, 0, seq_len - 1)  # like dynamic_update_slice: an index past the end writes the last slot

    def vec(ref, *lead):  # (Dh,) f32 at ref[*lead, :]; pl.ds: constant integer indices fail interpret mode
        view = ref.at[tuple(pl.ds(i, 1) if isinstance(i, int) else i for i in lead) + (slice(None),)]
        return plgpu.load(view).reshape(head_dim).astype(jnp.float32)

    def row(head, dtype):  # head: index into the H + 2 Hkv packed heads
        if not rows.splits:
            x = vec(qkv_ref, b, head)
        else:
            x = vec(qkv_ref, 0, b, head)
            for s in range(1, rows.splits):
                x = x + vec(qkv_ref, s, b, head)  # int32 sums are exact, as XLA's
            if rs_ref is not None:
                x = x * plgpu.load(rs_ref.at[pl.ds(b, 1)]).astype(jnp.float32)
            if cs_ref is not None:
                x = x * vec(cs_ref, head)
            if bias_ref is not None:
                x = x + vec(bias_ref, head)
        return x.astype(rows.dtype).astype(dtype).astype(jnp.float32)

    # k / v rounded to the cache dtype first: the new position reads as it will from the cache later.
    q = row(h, rows.dtype) * scale
    k_new, v_new = row(num_q + kv, k_out.dtype), row(num_q + num_kv + kv, v_out.dtype)
    m, denom, acc = _attend_cache(q, k_ref, v_ref, b, kv, p, block_l=block_l, head_dim=head_dim)
    s = jnp.sum(q * k_new)  # the new position: one more step of the online softmax
    m_new = jnp.maximum(m, s)
    alpha, e = jnp.exp(m - m_new), jnp.exp(s - m_new)
    o = _finish(denom * alpha + e, acc * alpha + e * v_new)
    plgpu.store(o_ref.at[b, h, :], o.astype(o_ref.dtype))
    # Written after the loop: the reads above stop before p, so the order only matters for clarity. One
    # program per KV group writes (its group's others computed the same values).
    @pl.when(h % group == 0)
    def _():
        plgpu.store(k_out.at[b, pl.ds(p, 1), kv, :], k_new[None, :].astype(k_out.dtype))
        plgpu.store(v_out.at[b, pl.ds(p, 1), kv, :], v_new[None, :].astype(v_out.dtype))

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

    q: (B, H, Dh) bf16 / f16 / f32. k_cache, v_cache: (B, L, Hkv, Dh) floating (any float dtypes;
    computed in float32), H a multiple of Hkv: query head h attends with KV head h // (H / Hkv).
    length: int32 scalar, may be traced: positions [0, min(length, L)) are visible (callers guarantee
    length >= 1). scale: default 1 / sqrt(Dh). block_l: cache positions per tile, a power of two
    (default :func:`default_block_l`). Returns (B, H, Dh) in q.dtype. ``interpret=None``: compiled on a
    GPU, interpret mode elsewhere.
    """
    _, h, seq_len, dh = _check_inputs(q, k_cache, v_cache, length)
    bl, scale, interp = _plan(k_cache, dh, block_l, scale, interpret)
    group = h // k_cache.shape[2]
    kernel = functools.partial(_kernel, seq_len=seq_len, head_dim=dh, block_l=bl, scale=scale, group=group)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(q.shape[0], h),
        compiler_params=compiler_params(num_warps, num_stages=2),  # the loop is load-bound: double-buffer
        interpret=interp,
        name="decode_attention",
    )(jnp.asarray(length, jnp.int32).reshape(1), q, k_cache, v_cache)


def _packed_heads(qkv, k_cache) -> tuple[int, int, int, int]:
    """(B, H, Hkv, Dh) of a packed qkv row: (B, H + 2 Hkv, Dh) with Hkv the caches' heads, or the
    multi-head (B, 3, H, Dh) (the same memory as (B, 3H, Dh)); a SplitKSum finishing to either."""
    shape = tuple(qkv.shape)
    hk = k_cache.shape[2] if k_cache.ndim == 4 else 0
    if len(shape) == 4 and shape[1] == 3 and hk in (0, shape[2]):
        b, _, h, dh = shape
    elif len(shape) == 3 and hk and shape[1] > 2 * hk:
        b, n, dh = shape
        h = n - 2 * hk
    else:
        raise ValueError(
            f"qkv must be (B, H + 2 Hkv, Dh) (query heads, new key heads, new value heads; Hkv = the caches' "
            f"{hk} heads) or (B, 3, H, Dh), got shape {shape}"
        )
    if isinstance(qkv, SplitKSum) and qkv.parts.shape[1:] != (b, (h + 2 * (hk or h)) * dh):
        raise ValueError(f"SplitKSum parts {qkv.parts.shape} do not finish to qkv {shape}")
    return b, h, hk or h, dh


def _check_packed(qkv, k_cache) -> jax.ShapeDtypeStruct:
    """The query's (B, H, Dh) shape and dtype, after checking qkv's packed layout (:func:`_packed_heads`)."""
    b, h, _, dh = _packed_heads(qkv, k_cache)
    return jax.ShapeDtypeStruct((b, h, dh), qkv.dtype)


def _row_inputs(qkv, k_cache) -> tuple[_Rows, list[jax.Array]]:
    """The kernel's view of qkv: values (B, N, Dh), or a SplitKSum's parts (S, B, N, Dh) + scales (N, Dh),
    N = H + 2 Hkv packed heads."""
    b, h, hk, dh = _packed_heads(qkv, k_cache)
    n = h + 2 * hk
    if not isinstance(qkv, SplitKSum):
        return _Rows(jnp.dtype(qkv.dtype)), [qkv.reshape(b, n, dh)]
    present = [v is not None for v in (qkv.row_scale, qkv.col_scale, qkv.bias)]
    rows = _Rows(jnp.dtype(qkv.dtype), qkv.parts.shape[0], *present)
    cols = [v.reshape(n, dh) for v in (qkv.col_scale, qkv.bias) if v is not None]
    scales = [qkv.row_scale] if qkv.row_scale is not None else []
    return rows, [qkv.parts.reshape(-1, b, n, dh), *scales, *cols]


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

    qkv: (B, H + 2 Hkv, Dh) float, the new token's H query heads, then its Hkv key and Hkv value heads (the
    packed output of a qkv projection: no slice is materialized; multi-head attention may also pass it as
    (B, 3, H, Dh)), or a :class:`~pallas_kernels.int8_matmul_decode.SplitKSum` that finishes to it (a
    split-K decode GEMM's partial sums: the kernel sums, scales, adds the bias and rounds them in its
    prologue, which saves the reduction's launch). k_cache, v_cache: (B, L, Hkv, Dh) floating (query head h
    attends with KV head h // (H / Hkv)), ``index``
    filled positions (int32 scalar, may be traced). The new key / value go to position
    p = min(index, L - 1) (where ``dynamic_update_slice`` would put them) and the query attends to
    positions [0, p].
    Returns (o (B, H, Dh) in qkv's dtype, k_cache, v_cache, index + 1 (int32 scalar)). The caches are
    updated in place (input_output_aliases: inside a jitted loop, or with donated arguments, no copy);
    the index is advanced by the kernel, so a decode step needs no separate launch for it.
    Equals :func:`decode_attention_update_reference` (float32 math).
    """
    _, h, seq_len, dh = _check_inputs(_check_packed(qkv, k_cache), k_cache, v_cache, index)
    bl, scale, interp = _plan(k_cache, dh, block_l, scale, interpret)
    rows, row_inputs = _row_inputs(qkv, k_cache)
    kernel = functools.partial(
        _update_kernel, rows=rows, seq_len=seq_len, head_dim=dh, block_l=bl, scale=scale,
        group=h // k_cache.shape[2],
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
    """Pure-jnp :func:`decode_attention` (float32 math, same masking), for tests. Grouped KV heads: the
    query heads are viewed as (Hkv, H / Hkv) groups, each group against its KV head."""
    b, h, dh = q.shape
    hk = k_cache.shape[2]
    scale = 1.0 / math.sqrt(dh) if scale is None else scale
    qf, kf, vf = (x.astype(jnp.float32) for x in (q, k_cache, v_cache))
    qf = qf.reshape(b, hk, h // hk, dh)
    s = jnp.einsum("bkgd,blkd->bkgl", qf * scale, kf, precision=lax.Precision.HIGHEST)
    visible = jnp.arange(k_cache.shape[1]) < jnp.minimum(length, k_cache.shape[1])
    s = jnp.where(visible, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    # Masked probabilities are exactly 0, but 0 * NaN = NaN: zero the hidden values too.
    vf = jnp.where(visible[None, :, None, None], vf, 0.0)
    o = jnp.einsum("bkgl,blkd->bkgd", p, vf, precision=lax.Precision.HIGHEST)
    return o.reshape(b, h, dh).astype(q.dtype)


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
    _check_inputs(_check_packed(qkv, k_cache), k_cache, v_cache, index)
    b, h, hk, dh = _packed_heads(qkv, k_cache)
    if isinstance(qkv, SplitKSum):
        qkv = qkv.finish()
    qkv = qkv.reshape(b, h + 2 * hk, dh)
    index = jnp.asarray(index, jnp.int32)
    p = jnp.clip(index, 0, k_cache.shape[1] - 1)
    k_new, v_new = qkv[:, None, h : h + hk], qkv[:, None, h + hk :]
    k_cache = lax.dynamic_update_slice(k_cache, k_new.astype(k_cache.dtype), (0, p, 0, 0))
    v_cache = lax.dynamic_update_slice(v_cache, v_new.astype(v_cache.dtype), (0, p, 0, 0))
    o = decode_attention_reference(qkv[:, :h], k_cache, v_cache, p + 1, scale=scale)
    return o, k_cache, v_cache, index + 1
