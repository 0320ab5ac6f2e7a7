"""INT8 GEMM kernels (interpret mode on CPU) vs their references and vs jq8.quant, on fresh random data at
aligned and ragged shapes. The GPU counterpart of these checks is benchmarks/kernels.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jq8.quant import QuantSpec, dequantize, pack_int4, quantize
from pallas_kernels import autotune
from pallas_kernels._common import TileConfig
from pallas_kernels.gemm import int8_matmul, matmul_qarrays, matmul_qarrays_reference
from pallas_kernels.int8_matmul_block_scaled import (
    infer_tile,
    int8_matmul_block_scaled,
    int8_matmul_block_scaled_reference,
)
from pallas_kernels.int8_matmul_triton import erf_approx, int8_matmul_reference

NT = (((1,), (1,)), ((), ()))
CFG = TileConfig(32, 64, 64, num_warps=4, num_stages=3, group_m=2)  # several programs, K loop + tail
RAGGED = (70, 96, 200)
ALIGNED = (64, 128, 256)


def _int8(key, shape, lo=-127, hi=128):
    return jax.random.randint(key, shape, lo, hi, jnp.int32).astype(jnp.int8)


def _operands(seed: int, m: int, n: int, k: int):
    ks = jax.random.split(jax.random.key(seed), 6)
    a, b = _int8(ks[0], (m, k)), _int8(ks[1], (n, k))
    sa = jax.random.uniform(ks[2], (m, 1), jnp.float32, 1e-4, 2e-3)
    sb = jax.random.uniform(ks[3], (1, n), jnp.float32, 1e-4, 2e-3)
    bias = jax.random.normal(ks[4], (n,), jnp.float32)
    res = jax.random.normal(ks[5], (m, n), jnp.float32).astype(jnp.bfloat16)
    return a, b, sa, sb, bias, res


def _int_ref(a, b):
    return np.asarray(lax.dot_general(a, b, NT, preferred_element_type=jnp.int32))


@pytest.mark.parametrize("shape,config", [(RAGGED, CFG), (ALIGNED, None)])
def test_raw_int32_is_exact(shape, config):
    a, b, *_ = _operands(1, *shape)
    out = int8_matmul(a, b, config=config)
    assert out.dtype == jnp.int32 and out.shape == shape[:2]
    np.testing.assert_array_equal(np.asarray(out), _int_ref(a, b))


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_w8a8_epilogue_matches_reference(activation):
    a, b, sa, sb, bias, res = _operands(2, *RAGGED)
    kw = dict(bias=bias, activation=activation, residual=res)
    out = int8_matmul(a, b, sa, sb, config=CFG, **kw)
    ref = int8_matmul_reference(a, b, sa, sb, **kw)
    assert out.dtype == jnp.bfloat16 and out.shape == RAGGED[:2]
    # Independent f32 computation from the int32 product (not through the reference's epilogue helper).
    y = _int_ref(a, b) * np.asarray(sa) * np.asarray(sb) + np.asarray(bias)[None]
    if activation is not None:
        y = np.asarray(jax.nn.gelu(jnp.asarray(y), approximate=activation == "gelu_tanh"))
    y = y + np.asarray(res, np.float32)
    scale = np.abs(y).max()
    np.testing.assert_allclose(np.asarray(out, np.float32), y, rtol=1e-2, atol=1e-2 * scale)
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=1e-2, atol=1e-2 * scale
    )


def test_w8a8_f32_output_one_sided_scale_gelu_tanh():
    a, b, sa, _, _, _ = _operands(3, *RAGGED)
    out = int8_matmul(a, b, sa, None, activation="gelu_tanh", out_dtype=jnp.float32, config=CFG)
    expect = jax.nn.gelu(jnp.asarray(_int_ref(a, b) * np.asarray(sa)), approximate=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expect), rtol=1e-5, atol=1e-5)


def test_erf_approx_accuracy():
    x = jnp.linspace(-6, 6, 10001, dtype=jnp.float32)
    assert float(jnp.max(jnp.abs(erf_approx(x) - jax.scipy.special.erf(x)))) < 1e-6


@pytest.mark.parametrize(
    "spec,config",
    [(QuantSpec.blocks((32, 32)), CFG), (QuantSpec.per_row(), None)],
)
def test_requantized_output_matches_jq8_quantize(spec, config):
    a, b, sa, sb, bias, _ = _operands(4, *RAGGED)
    out = int8_matmul(
        a, b, sa, sb, bias=bias, activation="gelu", out_spec=spec, out_dtype=jnp.float32, config=config
    )
    y = int8_matmul_reference(a, b, sa, sb, bias=bias, activation="gelu", out_dtype=jnp.float32)
    q = quantize(y, spec)
    assert out.values.shape == q.values.shape and out.scale.shape == q.scale.shape and out.spec == spec
    diff = np.abs(np.asarray(out.values, np.int32) - np.asarray(q.values, np.int32))
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.99
    np.testing.assert_allclose(np.asarray(out.scale), np.asarray(q.scale), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(out.dequantize()), np.asarray(y), atol=float(np.asarray(q.scale).max())
    )


@pytest.mark.parametrize("k", [201, 384, 512])  # padded to 64-column blocks; blocks of 128; of 256
def test_int4_weights_exact(k):
    a, *_ = _operands(5, RAGGED[0], RAGGED[1], k)
    w4 = _int8(jax.random.key(6), (RAGGED[1], k), -8, 8)
    out = int8_matmul(a, pack_int4(w4), b_bits=4, config=CFG)
    np.testing.assert_array_equal(np.asarray(out), _int_ref(a, w4))


def _float_operands(seed: int, m: int, n: int, k: int):
    ka, kb, ko = jax.random.split(jax.random.key(seed), 3)
    outliers = 1.0 + 30.0 * (jax.random.uniform(ko, (1, k)) > 0.95)  # a few hot channels
    return jax.random.normal(ka, (m, k)) * outliers, jax.random.normal(kb, (n, k)) * 0.1


@pytest.mark.parametrize(
    "a_tile,b_tile,bits,k",
    [
        ((32, 32), (32, 32), 8, 200),  # Jetfire
        ((1, 128), (128, 128), 8, 200),  # DeepSeek-V3 style
        ((1, -1), (1, 64), 8, 200),  # ZeroQuant: per-token activations, group-wise weights
        ((64, 64), (32, 32), 4, 200),  # INT4 weights; a's scale uniform over the 32-row tile
        ((1, -1), (1, 64), 4, 512),  # INT4 groups smaller than the half-split block (256)
        ((1, -1), (1, 128), 4, 200),  # INT4 groups larger than the block (64), a partial last group
    ],
)
def test_block_scaled_matches_dequantized_product(a_tile, b_tile, bits, k):
    m, n = RAGGED[:2]
    x, w = _float_operands(7, m, n, k)
    qa, qb = quantize(x, QuantSpec(a_tile)), quantize(w, QuantSpec(b_tile, bits=bits))
    out = matmul_qarrays(qa, qb, out_dtype=jnp.float32, config=CFG)
    expect = lax.dot_general(dequantize(qa), dequantize(qb), NT, precision=lax.Precision.HIGHEST)
    assert out.shape == (m, n)
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(expect), rtol=1e-5, atol=1e-5 * float(jnp.abs(expect).max())
    )
    ref = int8_matmul_block_scaled_reference(
        qa.values, qa.scale, qb.values, qb.scale, b_bits=bits, out_dtype=jnp.float32
    )
    np.testing.assert_allclose(
        np.asarray(ref), np.asarray(expect), rtol=1e-5, atol=1e-5 * float(jnp.abs(expect).max())
    )


def test_int_to_float_conversions():
    m, n, k = RAGGED
    x, w = _float_operands(8, m, n, k)
    qa, qb = quantize(x, QuantSpec((1, 32))), quantize(w, QuantSpec((32, 32)))
    args = (qa.values, qa.scale, qb.values, qb.scale)
    base = int8_matmul_block_scaled(*args, out_dtype=jnp.float32, config=CFG, convert="cvt")
    top = float(jnp.abs(base).max())
    # magic is exact and unroll keeps the summation order; only the compiler's FMA contraction may differ.
    tight = dict(rtol=1e-6, atol=1e-6 * top)
    exact = int8_matmul_block_scaled(*args, out_dtype=jnp.float32, config=CFG, convert="magic")
    np.testing.assert_allclose(np.asarray(exact), np.asarray(base), **tight)
    unrolled = int8_matmul_block_scaled(*args, out_dtype=jnp.float32, config=CFG, convert="cvt", unroll=4)
    np.testing.assert_allclose(np.asarray(unrolled), np.asarray(base), **tight)  # 6 groups: 1 step + 2 left
    split = int8_matmul_block_scaled(*args, out_dtype=jnp.float32, config=CFG, split_n=True)  # 2 chunks of 32
    np.testing.assert_allclose(np.asarray(split), np.asarray(base), **tight)
    folded = int8_matmul_block_scaled(*args, out_dtype=jnp.float32, config=CFG, convert="magic_folded")
    np.testing.assert_allclose(np.asarray(folded), np.asarray(base), rtol=1e-3, atol=1e-3 * top)


def test_block_scaled_epilogue_and_requant():
    m, n, k = RAGGED
    x, w = _float_operands(9, m, n, k)
    qa, qb = quantize(x, QuantSpec((1, 128))), quantize(w, QuantSpec((128, 128)))
    bias = jax.random.normal(jax.random.key(10), (n,))
    spec = QuantSpec.groups(32, axis=1)
    kw = dict(bias=bias, activation="gelu", out_spec=spec, out_dtype=jnp.float32)
    out = int8_matmul_block_scaled(qa.values, qa.scale, qb.values, qb.scale, config=CFG, **kw)
    y = int8_matmul_block_scaled_reference(
        qa.values, qa.scale, qb.values, qb.scale, **{**kw, "out_spec": None}
    )
    q = quantize(y, spec)
    diff = np.abs(np.asarray(out.values, np.int32) - np.asarray(q.values, np.int32))
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.99
    np.testing.assert_allclose(np.asarray(out.scale), np.asarray(q.scale), rtol=1e-5)


def test_split_n_epilogue_and_requant():
    m, n, k = RAGGED
    x, w = _float_operands(13, m, n, k)
    qa, qb = quantize(x, QuantSpec((32, 32))), quantize(w, QuantSpec((32, 32)))
    args = (qa.values, qa.scale, qb.values, qb.scale)
    bias = jax.random.normal(jax.random.key(14), (n,))
    kw = dict(bias=bias, activation="gelu_tanh", out_spec=QuantSpec.blocks((32, 32)), config=CFG)
    out = int8_matmul_block_scaled(*args, split_n=True, **kw)
    y = int8_matmul_block_scaled_reference(*args, **{**kw, "out_spec": None, "out_dtype": jnp.float32})
    q = quantize(y, QuantSpec.blocks((32, 32)))
    diff = np.abs(np.asarray(out.values, np.int32) - np.asarray(q.values, np.int32))
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.99
    np.testing.assert_allclose(np.asarray(out.scale), np.asarray(q.scale), rtol=1e-5)
    with pytest.raises(ValueError, match="split_n"):
        int8_matmul_block_scaled(*args[:3], jnp.ones((n, 7)), b_tile=(1, 32), split_n=True, config=CFG)


def test_matmul_qarrays_per_channel_uses_epilogue_scales():
    m, n, k = RAGGED
    x, w = _float_operands(11, m, n, k)
    qa, qb = quantize(x, QuantSpec.per_row()), quantize(w, QuantSpec.row_runs(48))  # 48: not a power of two
    out = matmul_qarrays(qa, qb, out_dtype=jnp.float32, config=CFG)
    expect = lax.dot_general(dequantize(qa), dequantize(qb), NT, precision=lax.Precision.HIGHEST)
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(expect), rtol=1e-5, atol=1e-5 * float(jnp.abs(expect).max())
    )


@pytest.mark.parametrize("m", [70, 5])  # the block-scaled kernel; the decode kernel
@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec((1, 32), bits=4, symmetric=False, exact_zero=False),  # scale + min in K groups (Q4_1's)
        QuantSpec.per_row(8, symmetric=False),  # one integer zero point per output channel
    ],
)
@pytest.mark.parametrize("epilogue", ["residual", "gelu_requant"])
def test_asymmetric_weights_match_dequantized_product(m, spec, epilogue):
    n, k = RAGGED[1:]
    x, w = _float_operands(15, m, n, k)
    w = w + 0.3  # weights off-centre, so the zero points are far from the symmetric ones
    qa, qb = quantize(x, QuantSpec.per_row()), quantize(w, spec)
    assert qb.zero_point is not None
    ks = jax.random.split(jax.random.key(16), 2)
    bias = jax.random.normal(ks[0], (n,))
    expect = lax.dot_general(dequantize(qa), dequantize(qb), NT, precision=lax.Precision.HIGHEST) + bias
    top = float(jnp.abs(expect).max())
    if epilogue == "residual":
        res = jax.random.normal(ks[1], (m, n))
        out = matmul_qarrays(qa, qb, bias=bias, residual=res, out_dtype=jnp.float32)
        np.testing.assert_allclose(np.asarray(out), np.asarray(expect + res), rtol=1e-5, atol=1e-5 * top)
    else:
        spec_out = QuantSpec.groups(32, axis=1)
        out = matmul_qarrays(qa, qb, bias=bias, activation="gelu", out_spec=spec_out, out_dtype=jnp.float32)
        q = quantize(jax.nn.gelu(expect, approximate=False), spec_out)
        diff = np.abs(np.asarray(out.values, np.int32) - np.asarray(q.values, np.int32))
        assert diff.max() <= 1 and (diff == 0).mean() >= 0.99
        # GELU leaves some groups ~1e-30: their scales agree relative to the largest one
        top_s = float(jnp.abs(q.scale).max())
        np.testing.assert_allclose(np.asarray(out.scale), np.asarray(q.scale), rtol=1e-5, atol=1e-6 * top_s)
    ref = matmul_qarrays_reference(qa, qb, bias=bias, out_dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(ref), np.asarray(expect), rtol=1e-5, atol=1e-5 * top)


def test_asymmetric_weights_need_per_token_activations():
    x, w = _float_operands(17, *RAGGED)
    qb = quantize(w, QuantSpec((1, 32), bits=4, symmetric=False, exact_zero=False))
    with pytest.raises(NotImplementedError, match="one scale per row or tensor"):
        matmul_qarrays(quantize(x, QuantSpec((1, 32))), qb)


def test_infer_tile():
    assert infer_tile(200, 7) == 32 and infer_tile(200, 2) == 128 and infer_tile(200, 1) == 200
    assert infer_tile(70, 70) == 1 and infer_tile(96, 2) == 64
    with pytest.raises(ValueError):
        infer_tile(100, 3)


def test_errors_are_actionable():
    a, b, sa, sb, bias, _ = _operands(12, *RAGGED)
    with pytest.raises(ValueError, match="block_n"):
        int8_matmul(a, b, sa, sb, out_spec=QuantSpec.per_row(), config=CFG)
    with pytest.raises(ValueError, match="block_k"):
        int8_matmul(a, b, config=TileConfig(32, 32, 16))
    with pytest.raises(ValueError, match="scale"):
        int8_matmul(a, b, bias=bias)
    with pytest.raises(NotImplementedError, match="powers of two"):
        int8_matmul_block_scaled(a, jnp.ones((70, 13)), b, jnp.ones((96, 13)), a_tile=(1, 16), b_tile=(1, 16))


def test_autotune_cache_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setattr(autotune, "TUNING_DIR", tmp_path)
    monkeypatch.setattr(autotune, "_CACHE", {})
    assert autotune.lookup_config("int8_matmul", 8192, 8192, 8192, "k") == autotune.heuristic_config(
        "int8_matmul", 8192, 8192, 8192
    )
    cfg = TileConfig(64, 128, 128, 4, 4, 8)
    autotune.store_config("int8_matmul", 8192, 8192, 8192, "k", cfg)
    monkeypatch.setattr(autotune, "_CACHE", {})  # force a re-read from the JSON file
    assert autotune.lookup_config("int8_matmul", 8192, 8192, 8192, "k") == cfg
    assert autotune.cache_path().exists()
    if jax.default_backend() != "gpu":
        with pytest.raises(RuntimeError):
            autotune.autotune("int8_matmul", 64, 64, 64, "k", lambda c: None, [cfg])


@pytest.mark.parametrize("m,n,k", [(32, 32, 32), (40, 64, 16), (33, 20, 7)])
def test_contraction_shorter_than_one_k_tile(m, n, k):
    # Regression: K < block_k used to read a tile past the end of K (an error in interpret mode).
    ka, kb = jax.random.split(jax.random.key(m * n + k))
    a = jax.random.randint(ka, (m, k), -127, 128).astype(jnp.int8)
    b = jax.random.randint(kb, (n, k), -127, 128).astype(jnp.int8)
    sa = jax.random.uniform(ka, (m, 1), minval=0.5, maxval=1.5)
    sb = jax.random.uniform(kb, (1, n), minval=0.5, maxval=1.5)
    np.testing.assert_array_equal(int8_matmul(a, b), int8_matmul_reference(a, b))
    out = int8_matmul(a, b, sa, sb, out_dtype=jnp.float32)
    ref = int8_matmul_reference(a, b, sa, sb, out_dtype=jnp.float32)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("config", [None, TileConfig(32, 32, 64, 4, 3, 2)], ids=["auto-block-n", "cfg"])
def test_split_cols_writes_column_blocks_apart(config):
    """split_cols: q, k, v of a qkv GEMM as three arrays, bit-identical to the columns of the packed output
    (ragged M; block_n narrowed to divide 96 when the config is picked)."""
    m, n, k = RAGGED  # N = 96 = 3 x 32
    a, b, sa, sb, bias, _ = _operands(15, m, n, k)
    kw = dict(bias=bias, activation="gelu", out_dtype=jnp.float32, config=config)
    packed = np.asarray(int8_matmul(a, b, sa, sb, **kw))
    parts = int8_matmul(a, b, sa, sb, split_cols=32, **kw)
    assert len(parts) == 3 and all(p.shape == (m, 32) for p in parts)
    for j, p in enumerate(parts):
        np.testing.assert_array_equal(np.asarray(p), packed[:, 32 * j : 32 * (j + 1)])
    # decode sizes (M <= 16) split the decode kernel's output
    small = int8_matmul(a[:5], b, sa[:5], sb, split_cols=48, bias=bias)
    np.testing.assert_array_equal(
        np.concatenate(small, axis=1), np.asarray(int8_matmul(a[:5], b, sa[:5], sb, bias=bias))
    )


def test_split_cols_errors_are_actionable():
    a, b, sa, sb, *_ = _operands(16, *RAGGED)
    with pytest.raises(ValueError, match="must divide N"):
        int8_matmul(a, b, sa, sb, split_cols=40)
    with pytest.raises(ValueError, match="multiple of block_n"):
        int8_matmul(a, b, sa, sb, split_cols=32, config=TileConfig(32, 64, 64))
    with pytest.raises(ValueError, match="float output"):
        int8_matmul(a, b, split_cols=32)
    with pytest.raises(ValueError, match="power-of-two factor"):
        int8_matmul(a, b[:72], sa, sb[:, :72], split_cols=24)  # 24 = 8 x 3: block_n would be 8
