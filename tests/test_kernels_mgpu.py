"""The Mosaic GPU W8A8 GEMM (pallas_kernels/int8_matmul_mgpu.py).

Tile selection, the errors and the dispatch rules run everywhere. The kernel itself compiles only on an sm_90
GPU (Mosaic GPU's CPU interpreter has no transposed int8 wgmma), so the comparisons against the XLA reference
run on the H100 and skip elsewhere.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jq8.quant import QuantSpec
from pallas_kernels import int8_matmul_mgpu as mg
from pallas_kernels.gemm import int8_matmul
from pallas_kernels.int8_matmul_triton import int8_matmul_reference

on_hopper = pytest.mark.skipif(not mg.available(), reason="needs an sm_90 GPU with Mosaic GPU")


def _operands(seed: int, m: int, n: int, k: int):
    ks = jax.random.split(jax.random.key(seed), 6)
    a = jax.random.randint(ks[0], (m, k), -127, 128, jnp.int8)
    b = jax.random.randint(ks[1], (n, k), -127, 128, jnp.int8)
    sa = jax.random.uniform(ks[2], (m, 1), minval=1e-3, maxval=1e-2)
    sb = jax.random.uniform(ks[3], (1, n), minval=1e-3, maxval=1e-2)
    bias = jax.random.normal(ks[4], (n,))
    res = jax.random.normal(ks[5], (m, n))
    return a, b, sa, sb, bias, res


# ------------------------------------------------------------------------------------- everywhere


@pytest.mark.parametrize(
    "m, n, k, want",
    [
        (8192, 2304, 768, dict(wg_dim="n", tile_n=128, tile_k=128)),  # 124M qkv: warpgroups split N
        # 1.5B qkv, K % 128 != 0; 240 divides N but its epilogue tile would be 16 columns wide
        (8192, 4800, 1600, dict(wg_dim="m", tile_n=192, tile_m=64, tile_k=64)),
        (8192, 1600, 6400, dict(wg_dim="m", tile_n=160, tile_k=128)),  # 1.5B fc2
        (8192, 50304, 768, dict(wg_dim="m", tile_n=192, tile_m=64)),  # GPT-2 LM head: 50304 = 262 x 192
    ],
)
def test_fit_config_tiles_prefill_shapes(m, n, k, want):
    cfg = mg.fit_config(m, n, k)
    for key, value in want.items():
        assert getattr(cfg, key) == value, (key, cfg)
    assert m % cfg.cta_m == 0 and n % cfg.cta_n == 0 and k % cfg.tile_k == 0
    per_stage = (cfg.cta_m + cfg.cta_n) * cfg.tile_k
    staging = 4 * cfg.epi_tile_m * cfg.epi_tile_n * 4
    assert cfg.stages * per_stage + staging <= mg.SMEM_BYTES  # what the H100 compile rejected at 4 stages


def test_fit_config_split_cols_keeps_tiles_inside_one_part():
    cfg = mg.fit_config(8192, 2304, 768, split_cols=768)
    assert 768 % cfg.epi_tile_n == 0
    cfg = mg.fit_config(4096, 4800, 1600, split_cols=1600)
    assert cfg.tile_n == 160 and 1600 % cfg.epi_tile_n == 0 and 4800 % cfg.cta_n == 0


def test_fit_config_tall_tiles_only_without_residual():
    # 1.5B qkv (no residual): 128-row warpgroups, a 256-row CTA; out (residual) and M % 256 != 0 keep 64
    tall = mg.fit_config(8192, 4800, 1600, split_cols=1600)
    assert (tall.tile_m, tall.cta_m, tall.tile_n, tall.stages) == (128, 256, 160, 6)
    assert mg.fit_config(8192, 1600, 1600, residual=True).tile_m == 64
    assert mg.fit_config(8320, 4800, 1600, split_cols=1600).tile_m == 64  # 8320 = 65 x 128
    assert mg.fit_config(8192, 1600, 6400).tile_m == 64  # tile_k 128: the 256-row ring has only 3 stages


def test_fit_config_three_stage_rings_wait_on_long_k_loops():
    # Jetfire block GEMMs (K >= 4096, 3 stages): each K step waits for its wgmma; the 124M prefill's short
    # K loops (6-24 steps) and the deeper rings keep one in flight (BENCHMARKS.md).
    for m, n, k in [(16384, 12288, 4096), (4096, 16384, 16384), (16384, 4096, 16384)]:
        cfg = mg.fit_config(m, n, k)
        assert (cfg.stages, cfg.mma_in_flight) == (3, 0)
    for m, n, k in [(8192, 2304, 768), (8192, 768, 3072)]:
        cfg = mg.fit_config(m, n, k)
        assert (cfg.stages, cfg.mma_in_flight) == (3, 1)
    assert mg.fit_config(8192, 6400, 1600).mma_in_flight == 1  # 6 stages


@pytest.mark.parametrize(
    "m, n, k, match",
    [
        (8192, 768, 100, "K=100 must be a multiple of 64"),
        (8192, 776, 768, "N=776 has no tile width"),
        (100, 768, 768, "M=100 must be a multiple"),
    ],
)
def test_fit_config_errors_name_the_dimension(m, n, k, match):
    with pytest.raises(ValueError, match=match):
        mg.fit_config(m, n, k)


def test_check_config_rejects_bad_tiles():
    with pytest.raises(ValueError, match="wgmma needs"):
        mg.check_config(256, 256, 256, mg.MosaicTileConfig(tile_m=32, tile_n=128))
    with pytest.raises(ValueError, match="epilogue tiles"):
        mg.check_config(256, 256, 256, mg.MosaicTileConfig(epi_tile_n=48))
    with pytest.raises(ValueError, match="epi_tile_n must be >= 32"):
        mg.check_config(256, 160, 256, mg.MosaicTileConfig(tile_n=80, epi_tile_n=16))
    with pytest.raises(ValueError, match="split_cols=96"):
        mg.check_config(256, 768, 256, mg.MosaicTileConfig(), split_cols=96)
    with pytest.raises(ValueError, match="mma_in_flight"):
        mg.check_config(256, 256, 256, mg.MosaicTileConfig(stages=1, mma_in_flight=1))
    with pytest.raises(ValueError, match="epilogue_math must be one of"):
        mg.check_config(256, 256, 256, mg.MosaicTileConfig(epilogue_math="fast"))


def test_reference_is_int8_matmul_reference_split():
    a, b, sa, sb, bias, _ = _operands(0, 32, 96, 64)
    parts = mg.int8_matmul_mgpu_reference(a, b, sa, sb, bias=bias, activation="gelu", split_cols=32)
    whole = int8_matmul_reference(a, b, sa, sb, bias=bias, activation="gelu")
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), np.asarray(whole))


@pytest.mark.skipif(mg.available(), reason="checks the CPU behaviour")
def test_mosaic_off_hopper_is_a_clear_error_and_auto_falls_back():
    a, b, sa, sb, bias, _ = _operands(1, 256, 256, 128)
    with pytest.raises(ValueError, match="sm_90"):
        int8_matmul(a, b, sa, sb, backend="mosaic")
    assert "sm_90" in mg.unsupported_reason(
        256, 256, 128, b_bits=8, scales=True, out_spec=None, residual=None, out_dtype=jnp.bfloat16,
        split_cols=None,
    )  # fmt: skip
    out = int8_matmul(a, b, sa, sb, bias=bias)  # auto: the Triton kernel (interpret mode here)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(int8_matmul_reference(a, b, sa, sb, bias=bias)))
    with pytest.raises(ValueError, match="backend must be"):
        int8_matmul(a, b, sa, sb, backend="cuda")


def test_unsupported_reason_names_what_rules_the_kernel_out(monkeypatch):
    monkeypatch.setattr(mg, "available", lambda: True)  # the rules after "is this a Hopper GPU"
    kw = dict(b_bits=8, scales=True, out_spec=None, residual=None, out_dtype=jnp.bfloat16, split_cols=None)
    assert mg.unsupported_reason(8192, 768, 768, **kw) is None
    assert "both scales" in mg.unsupported_reason(8192, 768, 768, **{**kw, "scales": False})
    assert "int8 b" in mg.unsupported_reason(8192, 768, 768, **{**kw, "b_bits": 4})
    residual = jnp.zeros((8192, 768), jnp.float32)
    assert "output dtype" in mg.unsupported_reason(8192, 768, 768, **{**kw, "residual": residual})
    assert "M=100" in mg.unsupported_reason(100, 768, 768, **kw)


def test_fit_config_for_requantized_output_and_grouped_a():
    # fc1 of the 1.5B MLP writing INT8 in groups of 128 columns: the warpgroup tile is the group
    cfg = mg.fit_config(8192, 6400, 1600, out_group=128)
    assert (cfg.tile_n, cfg.wg_dim, cfg.tile_m, cfg.tile_k, cfg.epi_tile_n) == (128, "m", 128, 64, 64)
    cfg = mg.fit_config(128, 6400, 1600, out_group=128)  # too few rows to stack: side by side along N
    assert (cfg.tile_n, cfg.wg_dim, cfg.tile_m) == (128, "n", 128)
    cfg = mg.fit_config(8192, 2400, 1600, out_group=160)
    assert (cfg.tile_n, cfg.wg_dim, cfg.tile_m) == (160, "m", 64)
    # fc2 reading those codes: one K step per group, each step waits for its wgmma
    cfg = mg.fit_config(8192, 1600, 6400, residual=True, a_group=128)
    assert (cfg.tile_k, cfg.mma_in_flight) == (128, 0)
    staging = 4 * cfg.epi_tile_m * cfg.epi_tile_n * 4 + 2 * 50 * cfg.tile_m * 4
    assert cfg.stages * (cfg.cta_m + cfg.cta_n) * cfg.tile_k + staging <= mg.SMEM_BYTES
    # 256-wide groups: 256-wide K steps
    cfg = mg.fit_config(8192, 1600, 6400, residual=True, a_group=256)
    assert (cfg.tile_k, cfg.mma_in_flight, cfg.tile_m) == (256, 0, 64)
    with pytest.raises(ValueError, match="64, 128 or 256"):
        mg.fit_config(8192, 1600, 6400, a_group=512)
    # 64 x 256 CTAs of 256-wide K steps: even 2 stages overflow
    with pytest.raises(ValueError, match="shared memory"):
        mg.fit_config(8192, 768, 3072, residual=True, a_group=256)
    with pytest.raises(ValueError, match="requantization group"):
        mg.fit_config(8192, 1600, 1600, out_group=96)  # 96 does not divide 1600
    with pytest.raises(ValueError, match="K groups"):
        mg.check_config(8192, 1600, 6400, mg.fit_config(8192, 1600, 6400), a_groups=50)  # in flight


@pytest.mark.parametrize(
    "m, n, k, kw",
    [
        (512, 1600, 768, dict(out_group=160)),  # 6 stages overflowed by 512 B on the H100 before
        (8192, 6400, 1600, dict(out_group=128)),
        (8192, 3072, 768, dict(out_group=128)),
        (8192, 1600, 6400, dict(residual=True, a_group=128)),
        (8192, 768, 3072, dict(residual=True, a_group=128)),
        (8192, 1600, 6400, dict(residual=True, a_group=256)),
        (8192, 6400, 1600, dict(out_group=256)),
        (8192, 50304, 768, dict()),  # GPT-2 LM head: 4 stages plus its vectors did not fit
    ],
)
def test_fit_config_counts_every_shared_memory_buffer(m, n, k, kw):
    """The ring, the staging tiles and every scale / bias vector fit in the H100's 227 KiB with 1 KiB left
    for barriers."""
    cfg = mg.fit_config(m, n, k, **kw)
    requant = kw.get("out_group") is not None
    groups = k // kw["a_group"] if kw.get("a_group") else 1
    ring = cfg.stages * (cfg.cta_m + cfg.cta_n) * cfg.tile_k
    staging = 4 * cfg.epi_tile_m * cfg.epi_tile_n * (1 if requant else 4)
    vectors = 8 * (groups * cfg.tile_m + 2 * cfg.tile_n + (cfg.tile_m if requant else 0))
    assert ring + staging + vectors <= 232448 - 1024, cfg


def test_unsupported_reason_for_requantized_output(monkeypatch):
    monkeypatch.setattr(mg, "available", lambda: True)
    kw = dict(b_bits=8, scales=True, residual=None, out_dtype=jnp.bfloat16, split_cols=None)
    assert mg.unsupported_reason(8192, 6400, 1600, out_spec=QuantSpec(tile=(1, 128)), **kw) is None
    assert "tiles (1, g)" in mg.unsupported_reason(8192, 6400, 1600, out_spec=QuantSpec(tile=(1, -1)), **kw)
    assert "tiles (1, g)" in mg.unsupported_reason(8192, 6400, 1600, out_spec=QuantSpec(tile=(32, 32)), **kw)
    res = jnp.zeros((8192, 6400), jnp.bfloat16)
    assert "no residual" in mg.unsupported_reason(
        8192, 6400, 1600, out_spec=QuantSpec(tile=(1, 128)), **{**kw, "residual": res}
    )
    assert mg.unsupported_reason(8192, 1600, 6400, out_spec=None, a_group=128, **kw) is None
    assert "64, 128 or 256" in mg.unsupported_reason(8192, 1600, 6400, out_spec=None, a_group=32, **kw)
    monkeypatch.setattr(mg, "available", lambda: False)
    assert (
        mg.unsupported_reason(8192, 1600, 6400, out_spec=None, a_group=128, check_device=False, **kw) is None
    )


def test_grouped_reference_equals_per_row_reference_for_equal_groups():
    a, b, sa, sb, bias, _ = _operands(5, 64, 96, 256)
    grouped = mg.int8_matmul_mgpu_reference(a, b, jnp.tile(sa, (1, 4)), sb, bias=bias, out_dtype=jnp.float32)
    per_row = int8_matmul_reference(a, b, sa, sb, bias=bias, out_dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(grouped), np.asarray(per_row), rtol=1e-6, atol=1e-6)


# -------------------------------------------------------------------------------------- on the H100


def _close(out, ref):
    """Equal up to one rounding of the output dtype (the kernel's f32 epilogue may contract a multiply-add
    into an FMA where XLA rounds twice)."""
    out = np.asarray(jnp.asarray(out, jnp.float32))
    ref = np.asarray(jnp.asarray(ref, jnp.float32))
    eps = float(jnp.finfo(jnp.asarray(out).dtype if out.dtype != np.float32 else jnp.float32).eps)
    np.testing.assert_allclose(out, ref, rtol=max(eps, 2.0**-7), atol=1e-5)


@on_hopper
@pytest.mark.parametrize(
    "m, n, k, epi",
    [
        (256, 256, 256, dict()),  # one K step pair, plain dequantize, bf16
        (2048, 2304, 768, dict(bias=True, activation="gelu")),  # > 132 tiles: the persistent loop wraps
        (1024, 1600, 1600, dict(bias=True, residual=True, out_dtype=jnp.float32)),  # warpgroups split M
        (4096, 1600, 1600, dict(bias=True)),  # 256-row CTAs (no residual), 160 tiles: the loop wraps
        (512, 1024, 6400, dict(bias=True, activation="gelu_tanh", out_dtype=jnp.float32)),
        (512, 768, 3072, dict(activation="relu")),
    ],
)
def test_mosaic_matches_reference(m, n, k, epi):
    a, b, sa, sb, bias, res = _operands(m + n + k, m, n, k)
    out_dtype = epi.get("out_dtype", jnp.bfloat16)
    kw = dict(
        bias=bias if epi.get("bias") else None,
        activation=epi.get("activation"),
        residual=res.astype(out_dtype) if epi.get("residual") else None,
        out_dtype=out_dtype,
    )
    out = int8_matmul(a, b, sa, sb, backend="mosaic", **kw)
    assert out.dtype == out_dtype and out.shape == (m, n)
    _close(out, int8_matmul_reference(a, b, sa, sb, **kw))


@on_hopper
@pytest.mark.parametrize("in_flight", [0, 1])
@pytest.mark.parametrize("prefetch", [False, True])
def test_mosaic_pipeline_variants_match_reference(in_flight, prefetch):
    """Each wgmma wait depth and residual load schedule, on a residual GEMM whose CTAs take several tiles."""
    m, n, k = 2048, 1600, 1600
    a, b, sa, sb, bias, res = _operands(11, m, n, k)
    cfg = dataclasses.replace(mg.fit_config(m, n, k), mma_in_flight=in_flight, residual_prefetch=prefetch)
    kw = dict(bias=bias, residual=res.astype(jnp.float32), out_dtype=jnp.float32)
    out = mg.int8_matmul_mgpu(a, b, sa, sb, config=cfg, **kw)
    _close(out, int8_matmul_reference(a, b, sa, sb, **kw))


@on_hopper
@pytest.mark.parametrize("math_", sorted(mg.ERF_OF_MATH))
@pytest.mark.parametrize("requantize", [False, True])
def test_mosaic_gelu_epilogue_math_matches_exact_gelu(math_, requantize):
    """Each GELU form of the epilogue against its reference (exact erf; the tanh form for "tanh"), bf16 out
    and INT8 codes out."""
    m, n, k = 1024, 2560, 1280
    a, b, sa, sb, bias, _ = _operands(5 + requantize, m, n, k)
    kw = dict(bias=bias, activation="gelu")
    if requantize:
        kw["out_spec"] = QuantSpec(tile=(1, 128))
    cfg = mg.fit_config(m, n, k, out_group=128 if requantize else None)
    cfg = dataclasses.replace(cfg, epilogue_math=math_)
    out = mg.int8_matmul_mgpu(a, b, sa, sb, config=cfg, **kw)
    want = "gelu_tanh" if math_ == "tanh" else "gelu"
    ref = int8_matmul_reference(a, b, sa, sb, **{**kw, "activation": want})
    if requantize:
        close_codes(out, ref)
    elif math_ == "tanh":  # tanh.approx.f32: relative error 2^-11 in tanh, so up to 2.4e-4 |y| in GELU
        out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
        np.testing.assert_allclose(out, ref, rtol=2.0**-7, atol=1e-3 * float(np.max(np.abs(ref))))
    else:
        _close(out, ref)


@on_hopper
@pytest.mark.parametrize("n, d", [(2304, 768), (4800, 1600)])
def test_mosaic_split_cols_matches_packed_columns(n, d):
    a, b, sa, sb, bias, _ = _operands(7, 512, n, d)
    parts = int8_matmul(a, b, sa, sb, bias=bias, split_cols=d, backend="mosaic")
    ref = int8_matmul_reference(a, b, sa, sb, bias=bias)
    assert len(parts) == n // d
    _close(np.concatenate([np.asarray(p, np.float32) for p in parts], axis=1), ref)


@on_hopper
def test_auto_dispatch_picks_mosaic_where_it_tiles(monkeypatch):
    calls = []
    real = mg.int8_matmul_mgpu
    monkeypatch.setattr(mg, "int8_matmul_mgpu", lambda *a, **k: calls.append(1) or real(*a, **k))
    jax.clear_caches()
    try:
        a, b, sa, sb, bias, _ = _operands(3, 512, 768, 768)
        out = int8_matmul(a, b, sa, sb, bias=bias)
        assert calls == [1]
        _close(out, int8_matmul_reference(a, b, sa, sb, bias=bias))
        int8_matmul(a[:500], b, sa[:500], sb, bias=bias)  # ragged M: the Triton kernel
        out = int8_matmul(a, b, sa, None, bias=bias)  # one scale only: the Triton kernel
        assert calls == [1]
        _close(out, int8_matmul_reference(a, b, sa, None, bias=bias))
    finally:
        jax.clear_caches()


def close_codes(q, ref):
    """Requantized outputs: the layout, scales to f32 rounding, codes within one step (an erf approximation
    in GELU, or 1 / scale against a division, can round a value next to a boundary the other way), and few
    of those."""
    assert q.values.dtype == jnp.int8 and q.values.shape == ref.values.shape and q.scale.shape == ref.scale.shape
    np.testing.assert_allclose(np.asarray(q.scale), np.asarray(ref.scale), rtol=1e-4)
    diff = np.abs(np.asarray(q.values, np.int32) - np.asarray(ref.values, np.int32))
    assert diff.max() <= 1 and diff.mean() < 1e-2, (diff.max(), diff.mean())


@on_hopper
@pytest.mark.parametrize(
    "m, n, k, group",
    [(1024, 6400, 1600, 128), (1024, 6400, 1600, 256), (512, 1600, 768, 160), (256, 512, 256, 64)],
)
def test_mosaic_requantized_output_matches_reference(m, n, k, group):
    a, b, sa, sb, bias, _ = _operands(m + n + group, m, n, k)
    spec = QuantSpec(tile=(1, group))
    q = int8_matmul(a, b, sa, sb, bias=bias, activation="gelu", out_spec=spec, backend="mosaic")
    ref = int8_matmul_reference(a, b, sa, sb, bias=bias, activation="gelu", out_spec=spec)
    assert q.values.dtype == jnp.int8 and q.values.shape == (m, n) and q.scale.shape == (m, n // group)
    close_codes(q, ref)


@on_hopper
@pytest.mark.parametrize(
    "m, n, k, group, epi",
    [
        (1024, 1600, 6400, 128, dict(bias=True, residual=True, out_dtype=jnp.float32)),  # 1.5B fc2 shape
        (1024, 1600, 6400, 256, dict(bias=True, residual=True, out_dtype=jnp.float32)),  # 256-wide K steps
        (512, 768, 3072, 128, dict(bias=True, residual=True, out_dtype=jnp.float32)),  # 124M fc2 shape
        (2048, 1024, 1600, 64, dict()),  # 64-wide groups, several tiles per CTA
    ],
)
def test_mosaic_grouped_a_scales_match_reference(m, n, k, group, epi):
    a, b, _, sb, bias, res = _operands(m + k + group, m, n, k)
    sa = jax.random.uniform(jax.random.key(group), (m, k // group), minval=1e-3, maxval=1e-2)
    out_dtype = epi.get("out_dtype", jnp.bfloat16)
    kw = dict(
        bias=bias if epi.get("bias") else None,
        residual=res.astype(out_dtype) if epi.get("residual") else None,
        out_dtype=out_dtype,
    )
    out = mg.int8_matmul_mgpu(a, b, sa, sb, **kw)
    _close(out, mg.int8_matmul_mgpu_reference(a, b, sa, sb, **kw))


@on_hopper
def test_mosaic_fc1_codes_feed_fc2_groups():
    """The fused MLP's chain: fc1 requantizes GELU's output in 128-column groups, fc2 reads those codes
    with their (M, K / 128) scales; equal to the same chain in XLA."""
    m, d, f = 512, 768, 3072
    a, w1, sa, s1, b1, _ = _operands(21, m, f, d)
    _, w2, _, s2, b2, res = _operands(22, m, d, f)
    spec = QuantSpec(tile=(1, 128))
    u = jax.jit(lambda *x: int8_matmul(*x, bias=b1, activation="gelu", out_spec=spec, backend="mosaic"))(
        a, w1, sa, s1
    )
    y = mg.int8_matmul_mgpu(u.values, w2, u.scale, s2, bias=b2, residual=res, out_dtype=jnp.float32)
    y_ref = mg.int8_matmul_mgpu_reference(
        u.values, w2, u.scale, s2, bias=b2, residual=res, out_dtype=jnp.float32
    )
    _close(y, y_ref)
