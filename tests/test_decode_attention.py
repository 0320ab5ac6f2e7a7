"""Decode attention kernel (pallas_kernels/decode_attention.py): interpret mode vs the jnp reference, and
the Triton lowering (cross-lowered for CUDA on CPU, MLIR-verified)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import (
    decode_attention,
    decode_attention_reference,
    decode_attention_update,
    decode_attention_update_reference,
    default_block_l,
)
from pallas_kernels.int8_matmul_decode import SplitKSum

SHAPES = [(1, 3, 40, 64), (2, 2, 96, 32), (1, 1, 130, 16)]  # (B, H, L, Dh)


def _inputs(seed, b, h, seq_len, dh, dtype=jnp.float32, cache_dtype=None):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    cache_dtype = cache_dtype or dtype
    q = jax.random.normal(kq, (b, h, dh), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (b, seq_len, h, dh), jnp.float32).astype(cache_dtype)
    v = jax.random.normal(kv, (b, seq_len, h, dh), jnp.float32).astype(cache_dtype)
    return q, k, v


def _lengths(seq_len, block_l):
    """1, inside a block, exactly a block boundary (where L reaches one), L, and past L (clamped)."""
    out = {1, min(seq_len, block_l // 2 + 1), min(seq_len, block_l + 3), seq_len, seq_len + 7}
    if block_l <= seq_len:
        out.add(block_l)
    return sorted(out)


def _ref_f32(q, k, v, n):
    return decode_attention_reference(q.astype(jnp.float32), k, v, n)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("block_l", [None, 16])
def test_matches_reference(shape, dtype, block_l):
    b, h, seq_len, dh = shape
    q, k, v = _inputs(sum(shape), b, h, seq_len, dh, dtype)
    bl = block_l or default_block_l(seq_len)
    for n in _lengths(seq_len, bl):
        n = jnp.int32(n)  # an array: one trace for all lengths
        out = decode_attention(q, k, v, n, block_l=block_l)
        assert out.shape == q.shape and out.dtype == q.dtype
        ref = _ref_f32(q, k, v, n)
        if dtype == jnp.float32:
            np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5, err_msg=f"length={n}")
        else:  # f32 math on bf16 inputs, rounded once to bf16 at the store
            np.testing.assert_allclose(out.astype(jnp.float32), ref, rtol=1e-2, atol=1e-2)
            np.testing.assert_allclose(
                out, ref.astype(jnp.bfloat16).astype(jnp.float32), rtol=1e-2, atol=1e-2
            )


@pytest.mark.parametrize("cache_dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_cache_computed_in_f32(cache_dtype):
    """An f32 query over a bf16 / f16 cache: the output is f32 and matches the f32 math on the same inputs."""
    b, h, seq_len, dh = 2, 2, 96, 32
    q, k, v = _inputs(7, b, h, seq_len, dh, jnp.float32, cache_dtype)
    for n in (1, 33, 64, 96):
        out = decode_attention(q, k, v, jnp.int32(n), block_l=32)
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(out, decode_attention_reference(q, k, v, n), rtol=1e-5, atol=1e-5)


def test_default_block_l():
    assert [default_block_l(n) for n in (1, 16, 17, 40, 128, 130, 4096)] == [16, 16, 32, 64, 128, 128, 128]


@pytest.mark.parametrize("fill", [1e4, float("nan")], ids=["huge", "nan"])
def test_positions_past_length_are_ignored(fill):
    b, h, seq_len, dh = 2, 2, 96, 32
    q, k, v = _inputs(3, b, h, seq_len, dh)
    for n in (1, 20, 32, 50):
        hidden = (jnp.arange(seq_len) >= n)[None, :, None, None]
        k2, v2 = jnp.where(hidden, fill, k), jnp.where(hidden, -fill, v)
        clean = decode_attention(q, k, v, jnp.int32(n), block_l=32)
        dirty = decode_attention(q, k2, v2, jnp.int32(n), block_l=32)
        np.testing.assert_array_equal(dirty, clean)  # never read: bit-identical
        np.testing.assert_allclose(dirty, _ref_f32(q, k, v, n), rtol=1e-5, atol=1e-5)
    # and the prefix does matter: changing a visible position changes the output
    n = 20
    k3 = k.at[:, n - 1].add(1.0)
    assert not np.allclose(decode_attention(q, k3, v, jnp.int32(n)), decode_attention(q, k, v, jnp.int32(n)))


def test_jit_with_traced_length():
    b, h, seq_len, dh = 1, 3, 40, 64
    q, k, v = _inputs(11, b, h, seq_len, dh, jnp.bfloat16)
    traces = []

    @jax.jit
    def step(q, k, v, n):
        traces.append(n)
        return decode_attention(q, k, v, n, block_l=16)

    for n in (1, 16, 23, 40):
        out = step(q, k, v, jnp.int32(n))
        np.testing.assert_allclose(out.astype(jnp.float32), _ref_f32(q, k, v, n), rtol=1e-2, atol=1e-2)
    assert len(traces) == 1 and isinstance(traces[0], jax.core.Tracer)

    # length as a loop carry (a decode loop): every step attends over one more position
    def body(n, acc):
        return acc + decode_attention(q, k, v, n, block_l=16).astype(jnp.float32)

    total = jax.lax.fori_loop(1, seq_len + 1, body, jnp.zeros(q.shape, jnp.float32))
    expect = sum(_ref_f32(q, k, v, n) for n in range(1, seq_len + 1))
    np.testing.assert_allclose(total, expect, rtol=1e-2, atol=5e-2)


def test_scale():
    q, k, v = _inputs(5, 1, 2, 40, 16)
    for scale in (0.05, 1.0):
        out = decode_attention(q, k, v, 30, scale=scale)
        ref = decode_attention_reference(q, k, v, 30, scale=scale)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "q_shape,k_shape,v_shape,match",
    [
        ((2, 32), (1, 8, 2, 32), (1, 8, 2, 32), r"q must be \(B, H, Dh\)"),
        ((1, 2, 32), (8, 2, 32), (8, 2, 32), r"must be \(B, L, Hkv, Dh\)"),
        ((1, 2, 32), (1, 8, 2, 32), (1, 8, 2, 32, 1), r"must be \(B, L, Hkv, Dh\)"),
        ((1, 2, 32), (1, 8, 3, 32), (1, 8, 3, 32), r"= \(1, 8, 2, 32\) to match q"),
        ((2, 2, 32), (1, 8, 2, 32), (1, 8, 2, 32), r"= \(2, 8, 2, 32\) to match q"),
        ((1, 2, 32), (1, 8, 2, 32), (1, 9, 2, 32), r"= \(1, 8, 2, 32\) to match q"),
        ((1, 2, 32), (1, 8, 2, 16), (1, 8, 2, 16), r"to match q"),
        ((1, 2, 48), (1, 8, 2, 48), (1, 8, 2, 48), r"Dh=48 must be a power of two"),
    ],
)
def test_shape_errors(q_shape, k_shape, v_shape, match):
    q, k, v = jnp.ones(q_shape), jnp.ones(k_shape), jnp.ones(v_shape)
    with pytest.raises(ValueError, match=match):
        decode_attention(q, k, v, 1)


def test_argument_errors():
    q, k, v = _inputs(0, 1, 2, 8, 32)
    with pytest.raises(ValueError, match="block_l=24 must be a power of two"):
        decode_attention(q, k, v, 1, block_l=24)
    with pytest.raises(ValueError, match="length must be a scalar"):
        decode_attention(q, k, v, jnp.ones((2,), jnp.int32))
    with pytest.raises(TypeError, match="k_cache must be floating"):
        decode_attention(q, k.astype(jnp.int8), v, 1)


# ------------------------------------------------------------------------------- the one-launch cache step


def _packed(seed, b, h, seq_len, dh, dtype=jnp.float32, cache_dtype=None):
    """Random (B, 3, H, Dh) qkv and a random (not zero) cache: stale values must be overwritten / unseen."""
    q, k, v = _inputs(seed, b, h, seq_len, dh, dtype, cache_dtype)
    kn, vn = (jax.random.normal(jax.random.key(seed + i), (b, h, dh)).astype(dtype) for i in (100, 200))
    return jnp.stack([q, kn, vn], axis=1), k, v


def _assert_step(out, ref, tol):
    o, k, v, nxt = out
    ro, rk, rv, rnxt = ref
    np.testing.assert_array_equal(k, rk)  # the written caches are exact (one cast, no math)
    np.testing.assert_array_equal(v, rv)
    assert int(nxt) == int(rnxt) and nxt.dtype == jnp.int32 and nxt.shape == ()
    np.testing.assert_allclose(o.astype(jnp.float32), ro.astype(jnp.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(
    "dtype,cache_dtype",
    [(jnp.float32, None), (jnp.bfloat16, None), (jnp.float32, jnp.bfloat16)],
    ids=["f32", "bf16", "f32-bf16cache"],
)
def test_update_matches_reference(shape, dtype, cache_dtype):
    b, h, seq_len, dh = shape
    qkv, k, v = _packed(sum(shape), b, h, seq_len, dh, dtype, cache_dtype)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    # index 0 (empty cache), inside / at a tile boundary, the last slot, and past the end (clamped there)
    for index in sorted({0, 1, 15, 16, 17, seq_len - 1, seq_len, seq_len + 3}):
        out = decode_attention_update(qkv, k, v, jnp.int32(index), block_l=16)
        assert out[0].shape == (b, h, dh) and out[0].dtype == dtype
        assert out[1].dtype == k.dtype and out[2].dtype == v.dtype
        _assert_step(out, decode_attention_update_reference(qkv, k, v, index), tol)


def test_update_writes_only_its_slot_and_attends_to_it():
    b, h, seq_len, dh = 2, 2, 40, 32
    qkv, k, v = _packed(4, b, h, seq_len, dh)
    o, k2, v2, _ = decode_attention_update(qkv, k, v, 9)
    untouched = jnp.arange(seq_len) != 9
    np.testing.assert_array_equal(k2[:, untouched], k[:, untouched])
    np.testing.assert_array_equal(v2[:, 9], qkv[:, 2])
    # the new key / value take part: the same step with a different new value gives another output
    o3 = decode_attention_update(qkv.at[:, 2].add(1.0), k, v, 9)[0]
    assert not np.allclose(o3, o)
    # and positions past the new one are never read (NaN there is inert)
    k_nan = k.at[:, 10:].set(jnp.nan)
    np.testing.assert_array_equal(decode_attention_update(qkv, k_nan, v, 9)[0], o)


def test_update_as_a_decode_loop():
    """A fori_loop carrying the caches and the index (the in-place aliasing of a real decode loop) equals
    writing each token with dynamic_update_slice and attending with decode_attention_reference."""
    b, h, seq_len, dh, steps = 1, 2, 24, 16, 20
    _, k0, v0 = _packed(6, b, h, seq_len, dh)
    rows = jax.random.normal(jax.random.key(9), (steps, b, 3, h, dh))

    def body(i, carry):
        k, v, idx, outs = carry
        o, k, v, idx = decode_attention_update(rows[i], k, v, idx, block_l=16)
        return k, v, idx, outs.at[i].set(o)

    init = (k0, v0, jnp.int32(2), jnp.zeros((steps, b, h, dh)))
    k, v, idx, outs = jax.jit(lambda c: jax.lax.fori_loop(0, steps, body, c))(init)
    rk, rv, ridx = k0, v0, 2
    for i in range(steps):
        ro, rk, rv, ridx = decode_attention_update_reference(rows[i], rk, rv, ridx)
        np.testing.assert_allclose(outs[i], ro, rtol=1e-5, atol=1e-5, err_msg=f"step {i}")
    np.testing.assert_array_equal(k, rk)
    np.testing.assert_array_equal(v, rv)
    assert int(idx) == 2 + steps


@pytest.mark.parametrize(
    "scales", [(True, True, True), (True, False, False), (False, True, True)], ids=["all", "row", "col-bias"]
)
def test_update_finishes_split_k_sums(scales):
    """qkv as a SplitKSum (a split-K qkv GEMV's int32 partials): the kernel sums, scales, adds the bias and
    rounds in its prologue exactly as SplitKSum.finish (the XLA epilogue), so the caches match bit for bit."""
    b, h, seq_len, dh, splits = 2, 3, 40, 32, 3
    n = 3 * h * dh
    ks = jax.random.split(jax.random.key(sum(scales)), 5)
    parts = jax.random.randint(ks[0], (splits, b, n), -4000, 4000, jnp.int32)
    row = jax.random.uniform(ks[1], (b,), minval=1e-3, maxval=2e-3) if scales[0] else None
    col = jax.random.uniform(ks[2], (n,), minval=1e-3, maxval=2e-2) if scales[1] else None
    bias = jax.random.normal(ks[3], (n,)) if scales[2] else None
    qkv = SplitKSum(parts, row, col, bias, jnp.dtype(jnp.bfloat16), (b, n)).reshape(b, 3, h, dh)
    _, k, v = _packed(8, b, h, seq_len, dh, jnp.bfloat16)
    step = jax.jit(lambda qkv, k, v, i: decode_attention_update(qkv, k, v, i, block_l=16))
    for index in (0, 7, seq_len - 1, seq_len + 2):
        out = step(qkv, k, v, jnp.int32(index))
        assert out[0].dtype == jnp.bfloat16
        _assert_step(out, decode_attention_update_reference(qkv, k, v, index), 1e-2)
        _assert_step(out, decode_attention_update_reference(qkv.finish(), k, v, index), 1e-2)


def test_update_errors():
    _, k, v = _packed(0, 1, 2, 8, 32)
    with pytest.raises(ValueError, match=r"qkv must be \(B, H \+ 2 Hkv, Dh\)"):
        decode_attention_update(jnp.ones((1, 2, 2, 32)), k, v, 1)
    with pytest.raises(ValueError, match=r"qkv must be \(B, H \+ 2 Hkv, Dh\) .* the caches' 2 heads"):
        decode_attention_update(jnp.ones((1, 3, 4, 32)), k, v, 1)  # (B, 3, H, Dh) is multi-head only
    with pytest.raises(ValueError, match=r"Hkv dividing H"):
        decode_attention_update(jnp.ones((1, 7, 32)), k, v, 1)  # H = 3 query heads over 2 KV heads
    with pytest.raises(ValueError, match="length must be a scalar"):
        decode_attention_update(jnp.ones((1, 3, 2, 32)), k, v, jnp.ones((2,), jnp.int32))
    parts = jnp.ones((2, 1, 3 * 2 * 32), jnp.int32)
    wrong = SplitKSum(parts, None, None, None, jnp.dtype(jnp.float32), (2, 3 * 32))  # B = 2 vs parts' 1
    _, k2, v2 = _packed(1, 2, 1, 8, 32)  # caches for the B = 2, H = 1 that `wrong` claims
    with pytest.raises(ValueError, match="do not finish to qkv"):
        decode_attention_update(wrong.reshape(2, 3, 1, 32), k2, v2, 1)


# ------------------------------------------------------------------------------------------------ lowering


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32, jnp.float16], ids=["bf16", "f32", "f16"])
@pytest.mark.parametrize("shape,block_l", [((2, 4, 1000, 128), None), ((1, 3, 40, 64), 16)])
def test_triton_lowering(verified_triton_modules, dtype, shape, block_l):
    b, h, seq_len, dh = shape
    q = jax.ShapeDtypeStruct((b, h, dh), dtype)
    cache = jax.ShapeDtypeStruct((b, seq_len, h, dh), dtype)
    n = jax.ShapeDtypeStruct((), jnp.int32)  # traced length
    fn = lambda q, k, v, n: decode_attention(q, k, v, n, block_l=block_l, interpret=False)
    jax.jit(fn).trace(q, cache, cache, n).lower(lowering_platforms=("cuda",))
    (module,) = verified_triton_modules
    # The loop runs cdiv(length, block_l) times: a for loop with a runtime bound, not unrolled.
    assert "scf.for" in module and "scf.while" not in module


def test_triton_lowering_mixed_dtypes(verified_triton_modules):
    q = jax.ShapeDtypeStruct((2, 4, 64), jnp.float32)
    cache = jax.ShapeDtypeStruct((2, 256, 4, 64), jnp.bfloat16)
    fn = lambda q, k, v, n: decode_attention(q, k, v, n, interpret=False)
    jax.jit(fn).trace(q, cache, cache, jax.ShapeDtypeStruct((), jnp.int32)).lower(
        lowering_platforms=("cuda",)
    )
    assert len(verified_triton_modules) == 1


def test_int32_offset_guard():
    q = jax.ShapeDtypeStruct((64, 32, 128), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((64, 8200, 32, 128), jnp.bfloat16)  # > 2**31 elements
    fn = lambda q, k, v: decode_attention(q, k, v, 1, interpret=False)
    with pytest.raises(ValueError, match="int32 offsets"):
        jax.jit(fn).trace(q, cache, cache)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_update_triton_lowering(verified_triton_modules, dtype):
    qkv = jax.ShapeDtypeStruct((2, 3, 4, 64), dtype)
    cache = jax.ShapeDtypeStruct((2, 100, 4, 64), jnp.bfloat16)
    fn = lambda qkv, k, v, n: decode_attention_update(qkv, k, v, n, interpret=False)
    jax.jit(fn).trace(qkv, cache, cache, jax.ShapeDtypeStruct((), jnp.int32)).lower(
        lowering_platforms=("cuda",)
    )
    (module,) = verified_triton_modules
    assert "scf.for" in module


# ------------------------------------------------------------------------------------ grouped-query attention
# The references here repeat each KV head for its query heads (the plain multi-head computation), so the
# kernels' grouping (query head h -> KV head h // g) is checked against an independent formulation.

GQA_SHAPES = [(1, 6, 2, 40, 32), (2, 4, 1, 24, 16), (1, 9, 3, 33, 64)]  # (B, H, Hkv, L, Dh)


def _repeat_kv(x, group):
    return jnp.repeat(x, group, axis=2)


@pytest.mark.parametrize("shape", GQA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gqa_matches_repeated_kv_reference(shape):
    b, h, hk, seq_len, dh = shape
    q, _, _ = _inputs(sum(shape), b, h, seq_len, dh)
    _, k, v = _inputs(sum(shape) + 1, b, hk, seq_len, dh)
    for n in (1, 17, seq_len):
        out = decode_attention(q, k, v, jnp.int32(n), block_l=16)
        want = decode_attention_reference(q, _repeat_kv(k, h // hk), _repeat_kv(v, h // hk), n)
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5, err_msg=f"length={n}")
        np.testing.assert_allclose(decode_attention_reference(q, k, v, n), want, rtol=1e-6, atol=1e-6)


def _gqa_step_reference(qkv, k, v, index, h, hk):
    """The cache step with the KV heads repeated: write the new Hkv heads, attend over repeated heads."""
    q, kn, vn = qkv[:, :h], qkv[:, h : h + hk], qkv[:, h + hk :]
    p = min(index, k.shape[1] - 1)
    k = k.at[:, p].set(kn.astype(k.dtype))
    v = v.at[:, p].set(vn.astype(v.dtype))
    o = decode_attention_reference(q, _repeat_kv(k, h // hk), _repeat_kv(v, h // hk), p + 1)
    return o, k, v, index + 1


@pytest.mark.parametrize("shape", GQA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gqa_update_matches_repeated_kv_reference(shape):
    b, h, hk, seq_len, dh = shape
    ks = jax.random.split(jax.random.key(sum(shape)), 3)
    qkv = jax.random.normal(ks[0], (b, h + 2 * hk, dh))
    k, v = (jax.random.normal(kk, (b, seq_len, hk, dh)) for kk in ks[1:])
    for index in (0, 16, seq_len - 1, seq_len + 2):
        out = decode_attention_update(qkv, k, v, jnp.int32(index), block_l=16)
        assert out[0].shape == (b, h, dh)
        want = _gqa_step_reference(qkv, k, v, index, h, hk)
        _assert_step(out, want, 1e-5)
        _assert_step(decode_attention_update_reference(qkv, k, v, index), want, 1e-5)


def test_gqa_update_finishes_split_k_sums():
    b, h, hk, seq_len, dh, splits = 2, 4, 2, 24, 16, 2
    n = (h + 2 * hk) * dh
    ks = jax.random.split(jax.random.key(3), 6)
    parts = jax.random.randint(ks[0], (splits, b, n), -4000, 4000, jnp.int32)
    row = jax.random.uniform(ks[1], (b,), minval=1e-3, maxval=2e-3)
    col = jax.random.uniform(ks[2], (n,), minval=1e-3, maxval=2e-2)
    bias = jax.random.normal(ks[3], (n,))
    # bf16 rows, as in test_update_finishes_split_k_sums: the cache writes compare bit for bit
    qkv = SplitKSum(parts, row, col, bias, jnp.dtype(jnp.bfloat16), (b, n)).reshape(b, h + 2 * hk, dh)
    k, v = (jax.random.normal(kk, (b, seq_len, hk, dh)).astype(jnp.bfloat16) for kk in ks[4:])
    for index in (0, 9, seq_len + 1):
        out = decode_attention_update(qkv, k, v, jnp.int32(index), block_l=16)
        _assert_step(out, _gqa_step_reference(qkv.finish(), k, v, index, h, hk), 1e-2)


def test_gqa_update_triton_lowering(verified_triton_modules):
    """SmolLM2's attention: 9 query heads over 3 KV heads, Dh 64, bf16 cache."""
    qkv = jax.ShapeDtypeStruct((1, 9 + 2 * 3, 64), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((1, 100, 3, 64), jnp.bfloat16)
    fn = lambda qkv, k, v, n: decode_attention_update(qkv, k, v, n, interpret=False)
    jax.jit(fn).trace(qkv, cache, cache, jax.ShapeDtypeStruct((), jnp.int32)).lower(
        lowering_platforms=("cuda",)
    )
    (module,) = verified_triton_modules
    assert "scf.for" in module
