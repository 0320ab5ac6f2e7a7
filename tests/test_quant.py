"""The quantization core (jq8.quant): granularities, rounding, INT4 packing, edge cases, pytree behaviour."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jq8 import quant as Q

SPECS = {
    "tensor": Q.QuantSpec.per_tensor(),
    "row": Q.QuantSpec.per_row(),
    "column": Q.QuantSpec.per_column(),
    "groups_k64": Q.QuantSpec.groups(64, axis=0),
    "groups_row16": Q.QuantSpec.groups(16, axis=1),
    "row_runs": Q.QuantSpec.row_runs(8),
    "block32": Q.QuantSpec.blocks((32, 32)),
    "block_1x128": Q.QuantSpec.blocks((1, 128)),
    "int4_g32": Q.QuantSpec.groups(32, axis=0, bits=4),
    "asym_row": Q.QuantSpec.per_row(symmetric=False),
    "asym_int4": Q.QuantSpec.groups(16, axis=1, bits=4, symmetric=False),
    "scale_min_int4": Q.QuantSpec((1, 32), bits=4, symmetric=False, exact_zero=False),
}


def _rand(shape, seed=0, dtype=jnp.float32):
    return (jax.random.normal(jax.random.key(seed), shape) * 2.0).astype(dtype)


def _bound(x, q):
    """Per-element round-trip bound: half a step (nearest), one step (stochastic), per tile."""
    tile = q.spec.resolve(*q.shape_2d)
    return Q.expand_tiles(q.scale, tile, q.shape_2d).reshape(x.shape)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("shape", [(64, 128), (70, 45), (3, 5, 33)])
def test_round_trip_error_bound(name, shape):
    spec = SPECS[name]
    x = _rand(shape, seed=hash((name, shape)) % 1000)
    q = Q.quantize(x, spec)
    assert q.scale.shape == spec.scale_shape(*q.shape_2d)
    err = jnp.abs(q.dequantize() - x)
    assert bool(jnp.all(err <= 0.5 * _bound(x, q) * (1 + 1e-5) + 1e-7)), float(err.max())
    qs = Q.quantize(x, spec, rounding="stochastic", key=jax.random.key(7))
    err_s = jnp.abs(qs.dequantize() - x)
    assert bool(jnp.all(err_s <= _bound(x, qs) * (1 + 1e-5) + 1e-7))


@settings(max_examples=12, deadline=None)
@given(
    m=st.integers(1, 80),
    n=st.integers(1, 80),
    tm=st.sampled_from([1, 4, 32, -1]),
    tn=st.sampled_from([1, 8, 32, -1]),
    bits=st.sampled_from([4, 8]),
    symmetric=st.booleans(),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_round_trip_property(m, n, tm, tn, bits, symmetric, scale, seed):
    x = _rand((m, n), seed) * scale
    spec = Q.QuantSpec((tm, tn), bits, symmetric)
    q = Q.quantize(x, spec)
    bound = 0.5 * _bound(x, q) * (1 + 1e-4) + 1e-6 * scale
    assert bool(jnp.all(jnp.abs(q.dequantize() - x) <= bound))


def test_ties_and_negatives_round_half_away():
    x = jnp.array([-2.5, -1.5, -0.5, -0.49, 0.0, 0.49, 0.5, 1.5, 2.5], jnp.float32)
    np.testing.assert_array_equal(Q.round_half_away(x), [-3, -2, -1, -0, 0, 0, 1, 2, 3])


def test_stochastic_rounding_unbiased_and_reproducible():
    x = jnp.full((256, 256), 0.3, jnp.float32).at[0, 0].set(127.0)  # per-tensor scale 1.0
    spec = Q.QuantSpec.per_tensor()
    a = Q.quantize(x, spec, rounding="stochastic", key=jax.random.key(1))
    b = Q.quantize(x, spec, rounding="stochastic", key=jax.random.key(1))
    c = Q.quantize(x, spec, rounding="stochastic", key=jax.random.key(2))
    np.testing.assert_array_equal(a.values, b.values)
    assert not np.array_equal(a.values, c.values)
    mean = float(a.dequantize()[1:].mean())
    assert abs(mean - 0.3) < 0.01


def test_stochastic_noise_uncorrelated_across_blocks():
    # Jetfire's reference reuses one noise pattern in every thread block; ours must not.
    seed = Q.noise_seed(jax.random.key(0))
    rows = jnp.arange(64, dtype=jnp.uint32)[:, None]
    cols = jnp.arange(64, dtype=jnp.uint32)[None, :]
    u = Q.uniform_noise(seed, rows, cols)
    blocks = u.reshape(2, 32, 2, 32).transpose(0, 2, 1, 3).reshape(4, -1)
    corr = np.corrcoef(np.asarray(blocks))
    assert np.max(np.abs(corr - np.eye(4))) < 0.1
    assert 0.45 < float(u.mean()) < 0.55 and float(u.min()) >= 0.0 and float(u.max()) < 1.0


def test_all_zero_tiles_give_zeros_not_nan():
    x = _rand((64, 64)).at[:32, :32].set(0.0)
    q = Q.quantize(x, Q.QuantSpec.blocks())
    y = q.dequantize()
    assert bool(jnp.all(jnp.isfinite(y)))
    assert bool(jnp.all(y[:32, :32] == 0))
    assert float(q.scale[0, 0]) == Q.SCALE_FLOOR


@pytest.mark.parametrize("bad", [jnp.inf, jnp.nan])
def test_non_finite_input_stays_visible_and_local(bad):
    x = _rand((64, 64)).at[3, 4].set(bad)
    q = Q.quantize(x, Q.QuantSpec.blocks())
    y = q.dequantize()
    assert not bool(jnp.isfinite(q.scale[0, 0]))
    assert not bool(jnp.all(jnp.isfinite(y[:32, :32])))
    np.testing.assert_allclose(y[32:, 32:], x[32:, 32:], atol=float(q.scale[1, 1]))


def test_ragged_shapes_partial_tiles():
    x = _rand((45, 70))
    q = Q.quantize(x, Q.QuantSpec.blocks((32, 32)))
    assert q.values.shape == (45, 70) and q.scale.shape == (2, 3)
    # The partial tile's scale is set by its own elements only.
    np.testing.assert_allclose(q.scale[1, 2], jnp.abs(x[32:, 64:]).max() / 127, rtol=1e-6)


@pytest.mark.parametrize("n", [13, 64, 96, 192, 256, 1600])
def test_int4_pack_round_trip_and_size(n):
    codes = jax.random.randint(jax.random.key(n), (7, n), -8, 8).astype(jnp.int8)
    packed = Q.pack_int4(codes)
    assert packed.shape == (7, -(-n // 64) * 32) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(Q.unpack_int4(packed, n), codes)
    with pytest.raises(ValueError, match="bytes"):
        Q.unpack_int4(packed[:, :-1], n)


def test_int4_half_split_layout():
    """Byte i of each P-column block holds column i (low nibble) and P/2 + i (high nibble)."""
    assert [Q.int4_block(n) for n in (768, 1600, 384, 100)] == [256, 64, 128, 64]
    codes = np.asarray(jax.random.randint(jax.random.key(1), (3, 384), -8, 8), np.int8)
    packed = np.asarray(Q.pack_int4(jnp.asarray(codes)))
    p = 128
    for blk in range(3):
        for i in (0, 5, 63):
            byte = int(packed[1, blk * p // 2 + i])
            lo, hi = (byte & 0xF) - 16 * ((byte & 0xF) >= 8), (byte >> 4) - 16 * ((byte >> 4) >= 8)
            assert (lo, hi) == (codes[1, blk * p + i], codes[1, blk * p + p // 2 + i])


def test_int4_pairs_reader_for_old_checkpoints():
    codes = jax.random.randint(jax.random.key(2), (4, 13), -8, 8).astype(jnp.int8)
    u = (np.asarray(jnp.pad(codes, ((0, 0), (0, 1)))).astype(np.int32) & 0xF).astype(np.uint8)
    pairs = u[:, 0::2] | (u[:, 1::2] << 4)  # the format-2 packing
    np.testing.assert_array_equal(Q.unpack_int4_pairs(jnp.asarray(pairs), 13), codes)


def test_int4_quantized_size():
    q = Q.quantize(_rand((128, 256)), Q.QuantSpec.groups(128, axis=0, bits=4))
    assert q.values.nbytes == 128 * 256 // 2


def test_int32_accumulation_bound():
    Q.check_int32_k(Q.MAX_EXACT_K)
    assert 127 * 127 * Q.MAX_EXACT_K <= 2**31 - 1
    with pytest.raises(ValueError, match="int32"):
        Q.check_int32_k(Q.MAX_EXACT_K + 1)


def test_qarray_is_a_pytree_through_jit():
    x = _rand((40, 64))
    f = jax.jit(lambda x: Q.quantize(x, Q.QuantSpec.blocks((32, 32))))
    q = f(x)
    leaves, tree = jax.tree_util.tree_flatten(q)
    assert len(leaves) == 2
    q2 = jax.tree_util.tree_unflatten(tree, leaves)
    np.testing.assert_array_equal(jax.jit(Q.dequantize)(q2), Q.dequantize(q))
    assert q.nbytes == 40 * 64 + math.prod(q.scale.shape) * 4


def test_qarray_orbax_round_trip(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    q = Q.quantize(_rand((40, 64)), Q.QuantSpec.groups(16, axis=0, bits=4, symmetric=False))
    tree = {"w": q}
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "c", tree)
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(tmp_path / "c", jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree))
    r = restored["w"]
    assert isinstance(r, Q.QArray) and r.spec == q.spec
    np.testing.assert_array_equal(r.values, q.values)
    np.testing.assert_array_equal(r.dequantize(), q.dequantize())


def test_scale_min_codes_take_a_q4_1_grid_back_exactly():
    # A Q4_1-style tensor: per block of 32, w = d * q + m with q in 0..15 spanning the block (llama.cpp
    # picks d, m from the block's min and max), d and m stored in f16.
    ks = jax.random.split(jax.random.key(5), 3)
    d = jax.random.uniform(ks[0], (24, 4, 1), minval=1e-3, maxval=2e-2).astype(jnp.float16).astype(jnp.float32)
    m = (-8.0 * d + jax.random.normal(ks[1], (24, 4, 1)) * 0.01).astype(jnp.float16).astype(jnp.float32)
    q = jax.random.randint(ks[2], (24, 4, 32), 0, 16).at[:, :, 0].set(0).at[:, :, 1].set(15)
    w = (d * q + m).reshape(24, 128)
    exact = Q.quantize(w, Q.QuantSpec((1, 32), bits=4, symmetric=False, exact_zero=False))
    np.testing.assert_allclose(exact.dequantize(), w, rtol=0, atol=1e-6 * float(jnp.abs(w).max()))
    assert exact.scale.shape == exact.zero_point.shape == (24, 4)
    assert not np.all(np.asarray(exact.zero_point) == np.round(np.asarray(exact.zero_point)))  # fractional
    # The range stretched to 0 with an integer zero point re-rounds the same grid.
    zero = Q.quantize(w, Q.QuantSpec((1, 32), bits=4, symmetric=False))
    assert float(jnp.abs(zero.dequantize() - w).max()) > 1e-3 * float(jnp.abs(w).max())


def test_bad_input_errors():
    with pytest.raises(ValueError, match="bits"):
        Q.QuantSpec(bits=3)
    with pytest.raises(ValueError, match="tile"):
        Q.QuantSpec((0, 32))
    with pytest.raises(TypeError, match="floating"):
        Q.quantize(jnp.ones((4, 4), jnp.int32))
    with pytest.raises(ValueError, match="key"):
        Q.quantize(_rand((4, 4)), rounding="stochastic")
    with pytest.raises(ValueError, match="rounding"):
        Q.quantize(_rand((4, 4)), rounding="up")


def test_quantize_with_given_scale_saturates_and_matches_quantize():
    x = _rand((16, 40))
    spec = Q.QuantSpec.per_row()
    q = Q.quantize(x, spec)
    q2 = Q.quantize_with_scale(x, q.scale, spec)
    np.testing.assert_array_equal(q2.values, q.values)
    half = Q.quantize_with_scale(x, q.scale / 2, spec)  # a range too small: codes saturate at +-127
    assert int(jnp.abs(half.values.astype(jnp.int32)).max()) == 127
    with pytest.raises(ValueError, match="zero_point"):
        Q.quantize_with_scale(x, q.scale, Q.QuantSpec.per_row(symmetric=False))
