"""Decode-size (M <= 16) INT8/INT4 GEMM (interpret mode on CPU) vs the references, on fresh random data at
ragged N/K, with and without split-K, per-column and K-group weight scales, and every epilogue."""

from __future__ import annotations

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jq8.quant import QuantSpec, pack_int4, quantize
from pallas_kernels import autotune
from pallas_kernels import int8_matmul_decode as decode_module
from pallas_kernels._common import TileConfig, cdiv
from pallas_kernels.gemm import decode_weight, int8_matmul, quantize_matmul_qarray
from pallas_kernels.int8_matmul_block_scaled import int8_matmul_block_scaled_reference
from pallas_kernels.int8_matmul_decode import (
    DecodeConfig,
    SplitKSum,
    decode_candidates,
    decode_config,
    int8_matmul_decode,
    lookup_decode_config,
)
from pallas_kernels.int8_matmul_triton import int8_matmul_reference
from pallas_kernels.norm_quantize import layer_norm_quantize_reference

NT = (((1,), (1,)), ((), ()))
N, K = 70, 333  # neither a multiple of the 32-column tiles nor of the 64-column K steps
SPLIT3 = DecodeConfig(block_n=32, block_k=64, split_k=3)  # 3 K chunks of 128 (the last one ragged)
FUSED = DecodeConfig(block_n=32, block_k=64, split_k=1)
UNROLLED = DecodeConfig(block_n=32, block_k=64, split_k=1, unroll=True)  # straight-line K loop + tail
UNROLLED_SPLIT = DecodeConfig(block_n=32, block_k=64, split_k=3, unroll=True)


def _operands(seed: int, m: int, n: int = N, k: int = K, bits: int = 8):
    ks = jax.random.split(jax.random.key(seed), 6)
    a = jax.random.randint(ks[0], (m, k), -127, 128, jnp.int32).astype(jnp.int8)
    lo, hi = (-8, 8) if bits == 4 else (-127, 128)
    w = jax.random.randint(ks[1], (n, k), lo, hi, jnp.int32).astype(jnp.int8)
    sa = jax.random.uniform(ks[2], (m, 1), jnp.float32, 1e-4, 2e-3)
    sb = jax.random.uniform(ks[3], (1, n), jnp.float32, 1e-4, 2e-3)
    bias = jax.random.normal(ks[4], (n,), jnp.float32)
    res = jax.random.normal(ks[5], (m, n), jnp.float32)
    return a, w, (pack_int4(w) if bits == 4 else w), sa, sb, bias, res


def _close(out, ref, rtol):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    np.testing.assert_allclose(out, ref, rtol=rtol, atol=rtol * float(np.abs(ref).max()))


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(
    "cfg", [FUSED, SPLIT3, UNROLLED, UNROLLED_SPLIT], ids=["fused", "split3", "unrolled", "unrolled-split3"]
)
def test_raw_int32_is_exact(m, bits, cfg):
    a, w, b, *_ = _operands(m + bits, m, bits=bits)
    out = int8_matmul_decode(a, b, b_bits=bits, config=cfg)
    assert out.dtype == jnp.int32 and out.shape == (m, N)
    expect = lax.dot_general(a, w, NT, preferred_element_type=jnp.int32)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expect))


@pytest.mark.parametrize(
    "m,bits,activation,out_dtype",
    [(1, 8, "gelu", jnp.bfloat16), (3, 4, "gelu_tanh", jnp.float32), (16, 8, "relu", jnp.float32)],
)
@pytest.mark.parametrize("cfg", [FUSED, SPLIT3], ids=["fused", "split3"])
def test_epilogue_matches_reference(m, bits, activation, out_dtype, cfg):
    _, _, b, sa, sb, bias, res = _operands(10 + m, m, bits=bits)
    kw = dict(bias=bias, activation=activation, residual=res, out_dtype=out_dtype, b_bits=bits)
    a = _operands(20 + m, m)[0]
    out = int8_matmul_decode(a, b, sa, sb, config=cfg, **kw)
    ref = int8_matmul_reference(a, b, sa, sb, **kw)
    assert out.dtype == out_dtype and out.shape == (m, N)
    # split-K runs the reference epilogue on the exact int32 sum; the fused store uses the kernel's erf
    _close(out, ref, 1e-2 if out_dtype == jnp.bfloat16 else 1e-5)


@pytest.mark.parametrize("cfg", [FUSED, SPLIT3], ids=["fused", "split3"])
def test_one_sided_scales(cfg):
    a, _, b, sa, sb, *_ = _operands(30, 5)
    for a_scale, b_scale in ((sa, None), (None, sb.reshape(-1))):
        out = int8_matmul_decode(a, b, a_scale, b_scale, out_dtype=jnp.float32, config=cfg)
        _close(out, int8_matmul_reference(a, b, a_scale, b_scale, out_dtype=jnp.float32), 1e-6)


@pytest.mark.parametrize(
    "spec,cfg",
    [
        (QuantSpec.blocks((16, 32)), FUSED),  # fits the (16, 32) tile: requantized in the kernel's store
        (QuantSpec.per_row(), FUSED),  # a whole row per tile would be one program: requantized by XLA
        (QuantSpec.per_row(), SPLIT3),
    ],
)
def test_requantized_output_matches_jq8_quantize(spec, cfg):
    a, _, b, sa, sb, bias, _ = _operands(40, 3)
    out = int8_matmul_decode(
        a, b, sa, sb, bias=bias, activation="gelu", out_spec=spec, out_dtype=jnp.float32, config=cfg
    )
    y = int8_matmul_reference(a, b, sa, sb, bias=bias, activation="gelu", out_dtype=jnp.float32)
    q = quantize(y, spec)
    assert out.values.shape == q.values.shape and out.scale.shape == q.scale.shape and out.spec == spec
    diff = np.abs(np.asarray(out.values, np.int32) - np.asarray(q.values, np.int32))
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.99
    np.testing.assert_allclose(np.asarray(out.scale), np.asarray(q.scale), rtol=1e-5)


@pytest.mark.parametrize(
    "m,bits,group,cfg,k",
    [
        (1, 4, 64, FUSED, K),
        (3, 4, 64, SPLIT3, K),  # chunks of two groups, ragged last group
        (16, 8, 96, SPLIT3, K),  # a group that is not a power of two (K steps of 32)
        (1, 4, 128, DecodeConfig(32, 128, split_k=2), K),
        (1, 4, 64, UNROLLED, K),
        (3, 4, 64, UNROLLED_SPLIT, K),
        # INT4 groups smaller than the half-split block (256 at K=512 / 768): the two nibble planes of a
        # byte belong to different groups
        (1, 4, 32, SPLIT3, 512),
        (3, 4, 128, DecodeConfig(32, 128, split_k=4), 768),
        (1, 4, 64, UNROLLED, 512),
    ],
)
def test_k_group_scales_match_dequantized_product(m, bits, group, cfg, k):
    a, _, b, sa, _, bias, res = _operands(50 + group, m, k=k, bits=bits)
    sg = jax.random.uniform(jax.random.key(group), (N, cdiv(k, group)), jnp.float32, 1e-3, 3e-3)
    kw = dict(bias=bias, activation="gelu", residual=res, out_dtype=jnp.float32, b_bits=bits)
    out = int8_matmul_decode(a, b, sa, sg, b_group=group, config=cfg, **kw)
    ref = int8_matmul_block_scaled_reference(a, sa, b, sg, b_tile=(1, group), **kw)
    _close(out, ref, 1e-5)


def test_int8_matmul_dispatches_small_m_to_decode(monkeypatch):
    monkeypatch.setattr(decode_module, "MIN_SPLIT_BYTES", 0)  # split this small problem as if it were big
    a, w, b, sa, sb, bias, _ = _operands(60, 2, n=300, k=1100)
    ref = int8_matmul_reference(a, b, sa, sb, bias=bias, out_dtype=jnp.float32)
    assert decode_config(2, 300, 1100).split_k > 1  # the heuristic splits K here
    _close(int8_matmul(a, b, sa, sb, bias=bias, out_dtype=jnp.float32), ref, 1e-6)
    out = int8_matmul(
        a, b, sa, sb, bias=bias, out_dtype=jnp.float32, split_k=4, config=TileConfig(16, 64, 64)
    )
    _close(out, ref, 1e-6)
    # an explicit config without split_k keeps the tiled kernel (exact int32 either way)
    raw = int8_matmul(a, b, config=TileConfig(32, 64, 64))
    np.testing.assert_array_equal(np.asarray(raw), np.asarray(int8_matmul_reference(a, b)))


def test_contraction_shorter_than_one_k_tile():
    a, w, b, sa, sb, *_ = _operands(70, 1, n=40, k=20)
    np.testing.assert_array_equal(
        np.asarray(int8_matmul_decode(a, b)), np.asarray(int8_matmul_reference(a, b))
    )
    out = int8_matmul_decode(a, b, sa, sb, out_dtype=jnp.float32)
    _close(out, int8_matmul_reference(a, b, sa, sb, out_dtype=jnp.float32), 1e-6)


def test_heuristic_fills_the_gpu_and_bounds_partials():
    # GPT-2 124M fc2 at M=1: 24 tiles of 32 columns alone would leave most of 132 SMs idle
    c = decode_config(1, 768, 3072)
    assert c.split_k > 1 and cdiv(768, c.block_n) * c.split_k >= 132
    assert decode_config(1, 768, 768).split_k == 1  # 0.6 MB: launch-bound, no second op
    assert decode_config(1, 2304, 768).split_k == 1  # 24 KiB per program: one launch
    assert decode_config(1, 50304, 1600).split_k == 1  # LM head: N alone gives many programs
    c4 = decode_config(16, 1600, 6400, b_bits=4, b_group=128)
    assert c4.split_k * 16 * 1600 * 4 <= 1600 * 6400 // 2 // 2  # partials <= half the INT4 weight bytes
    assert all(cfg.block_k >= 32 for cfg in decode_candidates(1, 1600, 6400, b_bits=4, b_group=128))


def test_decode_cache_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setattr(autotune, "TUNING_DIR", tmp_path)
    monkeypatch.setattr(autotune, "_CACHE", {})
    assert lookup_decode_config(1, 4800, 1600) == decode_config(1, 4800, 1600)
    cfg = DecodeConfig(64, 256, 3, num_warps=2, num_stages=5)
    autotune.store_config("int8_matmul_decode", 1, 4800, 1600, "b8-g0", cfg)
    monkeypatch.setattr(autotune, "_CACHE", {})
    assert lookup_decode_config(1, 4800, 1600) == cfg
    assert lookup_decode_config(1, 4800, 1600, b_bits=4, b_group=128) != cfg


def test_errors_are_actionable():
    a, _, b, sa, sb, *_ = _operands(80, 3)
    big = jnp.zeros((17, K), jnp.int8)
    with pytest.raises(ValueError, match="M <= 16"):
        int8_matmul_decode(big, b)
    with pytest.raises(ValueError, match="M <= 16"):
        int8_matmul(big, b, split_k=2)
    with pytest.raises(ValueError, match="b_group"):
        int8_matmul_decode(a, b, sa, jnp.ones((N, 5)), b_group=64)
    with pytest.raises(ValueError, match="scale"):
        int8_matmul_decode(a, b, bias=jnp.ones((N,)))
    with pytest.raises(ValueError, match="split_k"):
        int8_matmul_decode(a, b, config=DecodeConfig(split_k=0))


@pytest.mark.parametrize("bits", [8, 4])
def test_matmul_qarrays_routes_grouped_decode(monkeypatch, bits):
    """Per-token activations x K-group weights at M <= 16 take the decode kernel and match the dequantized
    product (the ZeroQuant W4/8 decode path)."""
    from pallas_kernels import gemm as bs

    calls = []
    real = bs.int8_matmul_decode
    monkeypatch.setattr(bs, "int8_matmul_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    ks = jax.random.split(jax.random.key(11), 2)
    x = jax.random.normal(ks[0], (3, 256), jnp.float32)
    w = jax.random.normal(ks[1], (70, 256), jnp.float32)
    qa = quantize(x, QuantSpec.per_row())
    qb = quantize(w, QuantSpec.groups(64, axis=1, bits=bits))
    got = bs.matmul_qarrays(qa, qb, out_dtype=jnp.float32)
    want = lax.dot_general(qa.dequantize(), qb.dequantize(), NT, precision=lax.Precision.HIGHEST)
    assert calls, "M <= 16 with K-group weight scales should use the decode kernel"
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


# ------------------------------------------------------- split-K summed atomically into the residual


def _outer_primitives(fn, *args) -> list[str]:
    """Primitive names of fn's program outside the kernels (jit bodies expanded, pallas_call bodies not)."""

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            yield eqn.primitive.name
            if eqn.primitive.name != "pallas_call":
                for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                    yield from walk(sub)

    return list(walk(jax.make_jaxpr(fn)(*args).jaxpr))


@pytest.mark.parametrize(
    "m,bits,group,cfg",
    [
        (1, 8, None, SPLIT3),
        (3, 4, None, SPLIT3),
        (16, 8, 64, SPLIT3),
        (1, 4, 64, DecodeConfig(32, 128, split_k=2)),
        (3, 4, 64, UNROLLED_SPLIT),
    ],
)
def test_atomic_split_sum_matches_xla_reduction(m, bits, group, cfg):
    """A linear f32 epilogue sums split-K in the kernel (one launch, the output aliasing the residual) and
    equals the XLA-reduced partials, bias and residual included, codes and float inputs alike."""
    a, _, b, sa, sb, bias, res = _operands(90 + m + bits, m, bits=bits)
    scale = sb if group is None else jax.random.uniform(jax.random.key(m), (N, cdiv(K, group)), minval=1e-3)
    kw = dict(bias=bias, residual=res, out_dtype=jnp.float32, b_bits=bits, b_group=group, config=cfg)
    for x, fn, extra in (
        (a, decode_module.int8_matmul_decode, (sa,)),
        (_float_operands(m, m, N, K, bits, group)[0], decode_module.quantize_matmul_decode, ()),
    ):
        atomic = jax.jit(lambda x, r, fn=fn, extra=extra: fn(x, b, *extra, scale, **{**kw, "residual": r}))
        xla = jax.jit(lambda x, r, fn=fn, extra=extra: fn(x, b, *extra, scale, **kw, split_sum="xla"))
        got, want = atomic(x, res), xla(x, res)
        _close(got, want, 1e-6)
        assert not np.allclose(np.asarray(got), np.asarray(res))  # the product was added, not just copied
        prims = _outer_primitives(atomic, x, res)
        assert prims.count("pallas_call") == 1 and "reduce_sum" not in prims


def test_atomic_split_sum_without_residual_or_bias():
    a, _, b, sa, sb, *_ = _operands(95, 2)
    got = int8_matmul_decode(a, b, sa, sb, out_dtype=jnp.float32, config=SPLIT3, split_sum="atomic")
    _close(got, int8_matmul_reference(a, b, sa, sb, out_dtype=jnp.float32), 1e-6)


def test_split_sum_errors_and_auto_choice():
    a, _, b, sa, sb, bias, res = _operands(96, 2)
    with pytest.raises(ValueError, match="split_sum must be"):
        int8_matmul_decode(a, b, sa, sb, out_dtype=jnp.float32, config=SPLIT3, split_sum="tree")
    with pytest.raises(ValueError, match="split_sum='atomic'"):
        int8_matmul_decode(
            a, b, sa, sb, activation="gelu", out_dtype=jnp.float32, config=SPLIT3, split_sum="atomic"
        )
    with pytest.raises(ValueError, match="split_sum='atomic'"):
        int8_matmul_decode(a, b, sa, sb, out_dtype=jnp.bfloat16, config=SPLIT3, split_sum="atomic")
    # auto: atomic for a linear f32 epilogue, the XLA reduction for a nonlinear or bf16 one
    linear = lambda a: int8_matmul_decode(
        a, b, sa, sb, bias=bias, residual=res, out_dtype=jnp.float32, config=SPLIT3
    )  # noqa: E731
    gelu = lambda a: int8_matmul_decode(a, b, sa, sb, activation="gelu", out_dtype=jnp.float32, config=SPLIT3)  # noqa: E731
    assert "reduce_sum" not in _outer_primitives(linear, a) and "reduce_sum" in _outer_primitives(gelu, a)


@pytest.mark.parametrize("bits,group", [(8, None), (4, 64)], ids=["int8-per-column", "int4-groups"])
def test_deferred_split_sum_finishes_to_the_xla_epilogue(bits, group):
    """split_sum="defer" hands back the partials (a pytree through jit); finish() is the "xla" result."""
    m = 3
    a, _, b, sa, sb, bias, _ = _operands(97 + bits, m, bits=bits)
    scale = sb if group is None else jax.random.uniform(jax.random.key(5), (N, cdiv(K, group)), minval=1e-3)
    kw = dict(bias=bias, out_dtype=jnp.bfloat16, b_bits=bits, b_group=group, config=SPLIT3)
    deferred = jax.jit(lambda a: int8_matmul_decode(a, b, sa, scale, **kw, split_sum="defer"))(a)
    assert isinstance(deferred, SplitKSum) and deferred.parts.shape == (3, m, N)
    assert (deferred.col_scale is None) == (group is not None)  # K-group scales are applied in the loop
    want = int8_matmul_decode(a, b, sa, scale, **kw, split_sum="xla")
    np.testing.assert_array_equal(deferred.finish(), want)
    np.testing.assert_array_equal(deferred.reshape(m, 2, N // 2).finish(), want.reshape(m, 2, N // 2))
    with pytest.raises(ValueError, match="cannot reshape"):
        deferred.reshape(m, N + 1)
    # the float-input kernel defers too, its per-token scales as the row scales
    x = _float_operands(7, m, N, K, bits, group)[0]
    fn = lambda split_sum: decode_module.quantize_matmul_decode(x, b, scale, **kw, split_sum=split_sum)  # noqa: E731
    got = fn("defer")
    assert isinstance(got, SplitKSum) and got.row_scale.shape == (m,)
    np.testing.assert_array_equal(got.finish(), fn("xla"))


def test_deferred_split_sum_only_where_it_applies():
    """One split, an activation, a residual or requantization: "defer" returns the finished array."""
    a, _, b, sa, sb, bias, res = _operands(98, 2)
    kw = dict(bias=bias, split_sum="defer")
    for extra in (
        dict(config=FUSED),
        dict(config=SPLIT3, activation="gelu"),
        dict(config=SPLIT3, residual=res, out_dtype=jnp.float32),
        dict(config=SPLIT3, out_spec=QuantSpec.per_row(8)),
    ):
        out = int8_matmul_decode(a, b, sa, sb, **kw, **extra)
        assert not isinstance(out, SplitKSum), extra
        ref = dict(extra, split_sum="xla") if extra.get("config") is SPLIT3 else extra
        want = int8_matmul_decode(a, b, sa, sb, bias=bias, **ref)
        if isinstance(out, jax.Array):
            _close(out, want, 1e-6)


# ------------------------------------------------------- per-token quantization inside the kernel


def _float_operands(seed: int, m: int, n: int, k: int, bits: int, group: int | None):
    ks = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(ks[0], (m, k), jnp.float32) * 3.0 + 0.5  # off-centre: LayerNorm has work to do
    gamma = 1.0 + 0.3 * jax.random.normal(ks[1], (k,), jnp.float32)
    beta = 0.2 * jax.random.normal(ks[2], (k,), jnp.float32)
    w = jax.random.normal(ks[3], (n, k), jnp.float32)
    spec = QuantSpec.groups(group, axis=1, bits=bits) if group else QuantSpec.per_row(bits)
    qb = quantize(w, spec)
    bias = jax.random.normal(ks[4], (n,), jnp.float32)
    res = jax.random.normal(ks[5], (m, n), jnp.float32)
    return x, gamma, beta, qb, bias, res


@pytest.mark.parametrize(
    "m,bits,group,norm,cfg",
    [  # every axis covered twice, not the whole cross product (interpret mode is slow)
        (1, 8, None, "layernorm", FUSED),
        (1, 8, None, None, SPLIT3),
        (1, 8, 64, "layernorm", FUSED),
        (3, 8, 64, "rmsnorm", SPLIT3),
        (16, 8, None, "layernorm", FUSED),
        (1, 4, 64, "layernorm", SPLIT3),
        (1, 4, 64, None, FUSED),
        (2, 4, None, "layernorm", SPLIT3),
        (3, 4, None, "rmsnorm", FUSED),
        (16, 4, 64, "layernorm", SPLIT3),
    ],
)
def test_quantize_matmul_decode_matches_quantize_then_gemm(m, bits, group, norm, cfg):
    """The in-kernel per-token quantization of norm(x) gives the product of the reference codes (jq8.quant
    via the LayerNorm-quantize reference) with the dequantized weight, bias, GELU and residual included."""
    x, gamma, beta, qb, bias, res = _float_operands(m * 7 + bits, m, N, K, bits, group)
    dw = decode_weight(qb)
    kw = dict(gamma=gamma, beta=beta, rms=norm == "rmsnorm") if norm else dict(gamma=None, beta=None)
    qa = (
        layer_norm_quantize_reference(x, **kw, spec=QuantSpec.per_row())[0]
        if norm
        else quantize(x, QuantSpec.per_row())
    )
    norm_kw = dict(norm=norm, gamma=gamma, beta=beta) if norm else {}
    got = decode_module.quantize_matmul_decode(
        x,
        dw.values,
        dw.scale,
        **norm_kw,
        bias=bias,
        activation="gelu",
        residual=res,
        out_dtype=jnp.float32,
        b_bits=bits,
        b_group=dw.group,
        config=cfg,
    )
    prod = lax.dot_general(qa.dequantize(), qb.dequantize(), NT, precision=lax.Precision.HIGHEST)
    want = jax.nn.gelu(prod + bias, approximate=False) + res
    assert got.shape == (m, N) and got.dtype == jnp.float32
    # A statistic summed in another order may move a rare code by one: allow two such codes per output.
    flip = 2 * float(jnp.max(qa.scale)) * float(jnp.max(jnp.abs(qb.dequantize())))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=flip)
    assert float(jnp.mean(jnp.abs(got - want))) < 1e-4 * float(jnp.mean(jnp.abs(want)))  # nearly all exact


def test_quantize_matmul_decode_long_rows_chunked_stats():
    """Rows longer than one statistics tile (M > 1 sweeps K in chunks) and K < one K tile both work."""
    for m, k in ((4, 1100), (1, 40)):
        x, gamma, beta, qb, bias, _ = _float_operands(k, m, 48, k, 8, None)
        dw = decode_weight(qb)
        got = decode_module.quantize_matmul_decode(
            x,
            dw.values,
            dw.scale,
            norm="layernorm",
            gamma=gamma,
            beta=beta,
            out_dtype=jnp.float32,
            config=SPLIT3,
        )
        qa = layer_norm_quantize_reference(x, gamma, beta, spec=QuantSpec.per_row())[0]
        want = lax.dot_general(qa.dequantize(), qb.dequantize(), NT, precision=lax.Precision.HIGHEST)
        flip = 2 * float(jnp.max(qa.scale)) * float(jnp.max(jnp.abs(qb.dequantize())))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=flip)


def test_quantize_matmul_decode_errors():
    x, gamma, beta, qb, *_ = _float_operands(0, 2, N, K, 8, None)
    dw = decode_weight(qb)
    with pytest.raises(ValueError, match="norm must be"):
        decode_module.quantize_matmul_decode(x, dw.values, dw.scale, norm="batchnorm")
    with pytest.raises(ValueError, match="without norm"):
        decode_module.quantize_matmul_decode(x, dw.values, dw.scale, gamma=gamma)
    with pytest.raises(ValueError, match="gamma must have shape"):
        decode_module.quantize_matmul_decode(x, dw.values, dw.scale, norm="layernorm", gamma=gamma[:-1])
    with pytest.raises(TypeError, match="floating"):
        decode_module.quantize_matmul_decode(x.astype(jnp.int8), dw.values, dw.scale)
    with pytest.raises(ValueError, match="M <= 16"):
        decode_module.quantize_matmul_decode(jnp.ones((17, K)), dw.values, dw.scale)
    blocks = quantize(jnp.ones((N, K)), QuantSpec((32, 32)))
    assert decode_weight(blocks) is None  # 2-D blocks: not a decode-kernel layout
    with pytest.raises(ValueError, match="decode kernel"):
        quantize_matmul_qarray(x, blocks)
