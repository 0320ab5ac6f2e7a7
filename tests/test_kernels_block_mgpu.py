"""The Mosaic GPU block-scaled INT8 GEMM (pallas_kernels/int8_matmul_block_mgpu.py).

Tile selection, the errors and the scale layout run everywhere. The compiled kernel needs an sm_90 GPU: its
comparisons against the one reference, ``int8_matmul_block_scaled_reference``, run on the H100 and skip
elsewhere with that reason. On a CPU, ``interpret=True`` runs the same pipeline, scale indexing, promotion
and epilogue in Mosaic GPU's interpreter (with a dot of the loaded tiles in place of wgmma, which the
interpreter cannot take transposed). The interpreter runs each warpgroup as a host thread that blocks inside
XLA's CPU runtime at every barrier, so XLA's CPU client needs >= 4 threads (``tests/conftest.py`` sets
NPROC=4 on smaller hosts). Every output element is compared, on fresh random
activation-like data with outlier channels, quantized as training does.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kernels_mgpu import close_codes

from jq8.quant import QArray, QuantSpec, expand_tiles, quantize
from pallas_kernels import int8_matmul_block_mgpu as bm
from pallas_kernels.int8_matmul_block_scaled import int8_matmul_block_scaled_reference

on_hopper = pytest.mark.skipif(
    not bm.available(), reason="needs an sm_90 GPU: Mosaic GPU has no interpreter with int8 wgmma"
)


def _operands(seed: int, m: int, n: int, k: int, a_tile, b_tile, outliers: int = 4):
    """Activations with a few outlier channels (x30) and normal weights, quantized to (codes, scales)."""
    ks = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(ks[0], (m, k))
    cols = jax.random.choice(ks[1], k, (outliers,), replace=False)
    x = x.at[:, cols].multiply(30.0)
    w = jax.random.normal(ks[2], (n, k)) * 0.02
    qa, qb = quantize(x, QuantSpec(a_tile)), quantize(w, QuantSpec(b_tile))
    return qa.values, qa.scale, qb.values, qb.scale, ks[3]


# ------------------------------------------------------------------------------------------ everywhere


def test_fit_config_defaults_and_errors():
    cfg = bm.fit_config(8192, 8192, 8192, 128)
    assert (cfg.tile_m, cfg.tile_n, cfg.cta_m, cfg.cta_n) == (64, 128, 128, 128)
    assert bm.smem_bytes(cfg, out_bytes=2) <= bm.SMEM_BYTES  # the deepest ring that fits
    assert bm.smem_bytes(dataclasses.replace(cfg, stages=cfg.stages + 1), out_bytes=2) > bm.SMEM_BYTES
    assert bm.fit_config(256, 192, 256, 64).tile_n == 64  # N not a multiple of 128: 64-wide warpgroups
    assert bm.fit_config(200, 256, 256, 128).cta_m == 128  # ragged M: the last row tile overlaps
    with pytest.raises(ValueError, match="M=100 must be at least the 128 rows of a CTA tile"):
        bm.fit_config(100, 256, 256, 128)
    with pytest.raises(ValueError, match="M=128 must be at least the 192 rows"):
        bm.fit_config(128, 256, 256, 128, consumers=3)
    for over in (dict(pingpong=True), dict(schedule="running", groups_per_step=2), dict(tile_n=192)):
        with pytest.raises(ValueError, match="consumers must be 2, or 3 with"):
            bm.fit_config(384, 384, 256, 128, consumers=3, **over)
    with pytest.raises(ValueError, match="N=100 must be a multiple"):
        bm.fit_config(256, 100, 256, 128)
    with pytest.raises(ValueError, match="K=192 must be a multiple of the K step 128"):
        bm.fit_config(256, 256, 192, 128)
    with pytest.raises(ValueError, match="schedule='pair' needs groups_per_step=2"):
        bm.fit_config(256, 256, 256, 128, schedule="pair")
    with pytest.raises(ValueError, match="schedule='running' needs convert='cvt'"):
        bm.fit_config(256, 256, 256, 128, schedule="running", convert="magic")
    with pytest.raises(ValueError, match="keeps two accumulators live: tile_n <= 128"):
        bm.check_config(256, 192, 256, bm.BlockTileConfig(schedule="running", groups_per_step=2, tile_n=192))
    with pytest.raises(ValueError, match="group must be one of"):
        bm.check_config(256, 256, 256, bm.BlockTileConfig(group=48))
    # requantizing per q columns: the warpgroup tile holds whole groups, the staging tile at most one
    cfg = bm.fit_config(8192, 4096, 4096, 64, out_group=64)
    assert (cfg.tile_n, cfg.epi_tile_n) == (128, 64)
    assert bm.fit_config(256, 192, 256, 64, out_group=32).epi_tile_n == 32
    assert bm.smem_bytes(cfg, out_bytes=1, out_group=64) <= bm.SMEM_BYTES
    with pytest.raises(ValueError, match="must divide the warpgroup's tile_n"):
        bm.fit_config(256, 256, 256, 64, out_group=128, tile_n=64)


def test_k_group_of():
    assert bm.k_group_of((1, 128), (128, 128), 4096) == 128
    assert bm.k_group_of((32, 32), (32, 32), 4096) == 32
    assert bm.k_group_of((1, 4096), (64, 64), 4096) == 64  # A constant along K, B in 64-wide groups
    assert bm.k_group_of((1, 256), (128, 128), 4096) == 128
    with pytest.raises(ValueError, match="neither operand"):
        bm.k_group_of((1, 4096), (1, 4096), 4096)
    with pytest.raises(ValueError, match="multiples of one group"):
        bm.k_group_of((1, 96), (96, 96), 4096)
    with pytest.raises(ValueError, match="multiples of one group"):
        bm.k_group_of((1, 128), (1, 192), 4096 * 3)


def test_group_scales_matches_expand_tiles():
    ks = jax.random.split(jax.random.key(3), 2)
    rows, k, g = 96, 512, 64
    for tile in [(1, 128), (32, 64), (96, 512), (64, 256)]:
        s = jax.random.uniform(ks[0], QuantSpec(tile).scale_shape(rows, k))
        full = expand_tiles(s, tile, (rows, k))  # (rows, K): the scale of each element
        got = bm.group_scales(s, tile, rows, k, g)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(full[:, ::g].T))


def test_unsupported_reason_names_the_rule():
    kw = dict(a_tile=(1, 128), b_tile=(128, 128), check_device=False)
    assert bm.unsupported_reason(8192, 4096, 4096, **kw) is None
    assert "M=100" in bm.unsupported_reason(100, 4096, 4096, **kw)
    assert "M=200 is not a multiple of the CTA's 128 rows" in bm.unsupported_reason(200, 4096, 4096, **kw)
    assert "int8 b" in bm.unsupported_reason(8192, 4096, 4096, b_bits=4, **kw)
    assert bm.unsupported_reason(8192, 4096, 4096, out_spec=QuantSpec((1, 64)), **kw) is None
    assert "tiles (1, g)" in bm.unsupported_reason(8192, 4096, 4096, out_spec=QuantSpec((32, 32)), **kw)
    assert "32, 64 or 128" in bm.unsupported_reason(8192, 4096, 4096, out_spec=QuantSpec((1, 256)), **kw)
    res = jnp.zeros((8192, 4096), jnp.bfloat16)
    assert "no residual" in bm.unsupported_reason(8192, 4096, 4096, out_spec=QuantSpec((1, 64)), residual=res, **kw)
    assert "neither operand" in bm.unsupported_reason(8192, 4096, 4096, a_tile=(1, 4096), b_tile=(1, 4096),
                                                     check_device=False)  # fmt: skip


@pytest.mark.skipif(bm.available(), reason="checks the behaviour without an sm_90 GPU")
def test_off_hopper_is_a_clear_error():
    a, sa, b, sb, _ = _operands(0, 128, 128, 256, (1, 128), (128, 128))
    with pytest.raises(ValueError, match="sm_90"):
        bm.int8_matmul_block_mgpu(a, sa, b, sb)
    assert "sm_90" in bm.unsupported_reason(128, 128, 256, a_tile=(1, 128), b_tile=(128, 128))


interpret_host = pytest.mark.skipif(  # conftest sets NPROC=4 on smaller hosts
    int(os.environ.get("NPROC") or len(os.sched_getaffinity(0))) < 4,
    reason="Mosaic GPU's interpreter blocks an XLA CPU thread per warpgroup: NPROC (or CPUs) >= 4",
)


@interpret_host
@pytest.mark.parametrize(
    "m, n, k, g, a_tile, b_tile, over, epi",
    [
        (256, 256, 512, 128, (1, 128), (128, 128), {}, {}),  # 4 tiles on one persistent CTA
        (128, 128, 512, 32, (32, 32), (32, 32), {}, {}),
        (128, 256, 512, 64, (1, 64), (32, 64), {}, {}),  # weight scales vary inside a warpgroup tile
        (128, 128, 512, 128, (1, 128), (128, 128), dict(groups_per_step=2, schedule="carry"), {}),
        (128, 128, 256, 64, (1, 64), (64, 64), dict(groups_per_step=2, schedule="pair", pingpong=True), {}),
        (128, 256, 256, 128, (1, 128), (128, 128), dict(convert="magic"), {}),
        (128, 256, 256, 128, (1, 128), (128, 128), dict(convert="magic_add"), {}),
        (128, 128, 512, 128, (1, 128), (128, 128), dict(schedule="running"), {}),  # summation by parts
        (128, 128, 512, 128, (1, 128), (128, 128), dict(schedule="wait"), {}),
        (128, 128, 512, 128, (1, 128), (128, 128), dict(schedule="running", groups_per_step=2), {}),  # E and O
        (200, 128, 256, 128, (1, 128), (128, 128), dict(schedule="running"), {}),  # ragged M: overlapping tile
        (320, 128, 256, 128, (1, 128), (128, 128), dict(consumers=3),
         dict(bias=True, activation="gelu", residual=True)),  # fmt: skip
        (448, 128, 256, 64, (1, 64), (64, 64), dict(consumers=3, schedule="running", tile_n=64, epi_tile_n=64),
         dict(bias=True, out_group=64)),  # fmt: skip
        (256, 128, 512, 64, (1, 64), (64, 64), dict(schedule="running", groups_per_step=2, pingpong=True, tile_n=64,
         epi_tile_n=64), dict(bias=True, activation="gelu", residual=True)),  # fmt: skip
        (256, 256, 256, 64, (1, 64), (64, 64), dict(schedule="running", pingpong=True, tile_n=64, epi_tile_n=64),
         dict(bias=True, activation="gelu", residual=True)),  # fmt: skip
        (128, 256, 512, 128, (1, 128), (128, 128), dict(schedule="running"), dict(bias=True, out_group=128)),
        (128, 384, 256, 128, (1, 128), (128, 128), {}, dict(bias=True, activation="gelu", residual=True)),
        (128, 256, 256, 64, (1, 64), (64, 64), {}, dict(bias=True, out_group=64)),  # two groups a tile
        (128, 192, 256, 32, (1, 32), (32, 32), {}, dict(bias=True, out_group=32)),  # 64-wide warpgroups
        (128, 256, 512, 128, (1, 128), (128, 128), dict(groups_per_step=2, schedule="carry"),
         dict(bias=True, out_group=128)),  # fmt: skip
    ],
)
def test_interpret_matches_reference(monkeypatch, m, n, k, g, a_tile, b_tile, over, epi):
    monkeypatch.setattr(bm, "_num_sms", lambda: 1)
    a, sa, b, sb, key = _operands(m + n + g, m, n, k, a_tile, b_tile)
    k1, k2 = jax.random.split(key)
    kw = dict(out_dtype=jnp.float32)
    q = epi.get("out_group")
    if q:
        kw.update(bias=jax.random.normal(k1, (n,)), out_spec=QuantSpec((1, q)))
    elif epi:
        kw.update(bias=jax.random.normal(k1, (n,)), activation=epi["activation"],
                  residual=jax.random.normal(k2, (m, n)))  # fmt: skip
    cfg = bm.fit_config(m, n, k, g, out_dtype=jnp.float32, out_group=q, **over)
    out = bm.int8_matmul_block_mgpu(a, sa, b, sb, config=cfg, interpret=True, **kw)
    ref = int8_matmul_block_scaled_reference(a, sa, b, sb, **kw)
    if q:
        close_codes(out, ref)
    elif epi:  # erf_approx: within 1e-6 of erf
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-4, atol=1e-4)
    else:
        _compare(out, ref, jnp.float32)


@interpret_host
def test_default_schedule_is_running_where_one_weight_scale_covers_a_warpgroup_tile(monkeypatch):
    monkeypatch.setattr(bm, "_num_sms", lambda: 1)
    seen = []
    run = bm._block_mgpu
    monkeypatch.setattr(bm, "_block_mgpu", lambda *a, **kw: seen.append(kw["cfg"].schedule) or run(*a, **kw))
    for b_tile, schedule in [((128, 128), "running"), ((32, 64), "wait")]:
        a, sa, b, sb, _ = _operands(11, 128, 256, 256, (1, 64 if b_tile[0] == 32 else 128), b_tile)
        out = bm.int8_matmul_block_mgpu(a, sa, b, sb, out_dtype=jnp.float32, interpret=True)
        _compare(out, int8_matmul_block_scaled_reference(a, sa, b, sb, out_dtype=jnp.float32), jnp.float32)
        assert seen[-1] == schedule


def test_running_schedule_needs_one_weight_scale_per_warpgroup_tile():
    a, sa, b, sb, _ = _operands(3, 128, 256, 256, (1, 64), (32, 64))
    cfg = bm.fit_config(128, 256, 256, 64, schedule="running")
    with pytest.raises(ValueError, match="schedule='running' needs one weight scale per warpgroup tile"):
        bm.int8_matmul_block_mgpu(a, sa, b, sb, config=cfg, interpret=True)


# ---------------------------------------------------------------------------------------------- Hopper


def _compare(out, ref, out_dtype):
    out32, ref32 = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert out32.shape == ref32.shape and np.isfinite(out32).all()
    scale = float(np.abs(ref32).max())
    if jnp.dtype(out_dtype) == jnp.float32:  # exact int32 group sums vs the f32 reference GEMM's rounding
        np.testing.assert_allclose(out32, ref32, rtol=3e-5, atol=3e-6 * scale)
    else:  # bf16: one rounding of nearly the same f32 value
        np.testing.assert_allclose(out32, ref32, rtol=8e-3, atol=1e-3 * scale)


@on_hopper
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("a_rows", [1, "g"])  # A scales per (1 x G) row tile or per (G x G) block
@pytest.mark.parametrize("m, n, k", [(256, 256, 1024), (384, 640, 1536)])
def test_matches_reference(g, a_rows, m, n, k):
    a_tile = (1 if a_rows == 1 else g, g)
    a, sa, b, sb, _ = _operands(hash((g, a_rows, m)) % 1000, m, n, k, a_tile, (g, g))
    for out_dtype in (jnp.float32, jnp.bfloat16):
        out = bm.int8_matmul_block_mgpu(a, sa, b, sb, out_dtype=out_dtype)
        ref = int8_matmul_block_scaled_reference(a, sa, b, sb, out_dtype=jnp.float32)
        _compare(out, ref, out_dtype)


@on_hopper
@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_epilogue_bias_activation_residual(out_dtype, activation):
    m, n, k, g = 256, 384, 1024, 128
    a, sa, b, sb, key = _operands(11, m, n, k, (1, g), (g, g))
    k1, k2 = jax.random.split(key)
    bias = jax.random.normal(k1, (n,))
    residual = jax.random.normal(k2, (m, n)).astype(out_dtype)
    epi = dict(bias=bias, activation=activation, residual=residual, out_dtype=out_dtype)
    out = bm.int8_matmul_block_mgpu(a, sa, b, sb, **epi)
    ref = int8_matmul_block_scaled_reference(a, sa, b, sb, **{**epi, "out_dtype": jnp.float32})
    if activation == "gelu" and jnp.dtype(out_dtype) == jnp.float32:  # erf_approx: within 1e-6 of erf
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-4, atol=1e-4)
    else:
        _compare(out, ref, out_dtype)


@on_hopper
@pytest.mark.parametrize(
    "g, q, activation, m, n, k",
    [
        (64, 64, None, 256, 384, 1024),  # two requantization groups per 128-column warpgroup tile
        (128, 128, "gelu", 384, 640, 1536),  # 640 = 5 x 128: several tiles per CTA
        (64, 64, None, 512, 1536, 576),  # SmolLM2's fc1 / gate (d=576, 1536 wide)
        (32, 32, None, 256, 192, 512),  # N = 192: 64-wide warpgroups, two groups each
    ],
)
def test_requantized_output_matches_reference(g, q, activation, m, n, k):
    a, sa, b, sb, key = _operands(m + q, m, n, k, (1, g), (g, g))
    spec = QuantSpec((1, q))
    kw = dict(bias=jax.random.normal(key, (n,)), activation=activation, out_spec=spec, out_dtype=jnp.bfloat16)
    out = bm.int8_matmul_block_mgpu(a, sa, b, sb, **kw)
    assert isinstance(out, QArray) and out.spec == spec and out.dtype == jnp.bfloat16
    close_codes(out, int8_matmul_block_scaled_reference(a, sa, b, sb, **kw))


@on_hopper
def test_weights_in_narrow_blocks_and_per_tensor_rows():
    # B blocks narrower than the warpgroup tile (a scale vector per group), A per-tensor rows in K groups
    m, n, k = 256, 256, 1024
    a, sa, b, sb, _ = _operands(5, m, n, k, (-1, 64), (32, 64))
    out = bm.int8_matmul_block_mgpu(a, sa, b, sb, out_dtype=jnp.float32)
    ref = int8_matmul_block_scaled_reference(a, sa, b, sb, out_dtype=jnp.float32)
    _compare(out, ref, jnp.float32)


@on_hopper
def test_ragged_m_matches_reference_and_too_few_rows_is_a_clear_error():
    a, sa, b, sb, _ = _operands(2, 200, 256, 512, (1, 128), (128, 128))
    out = bm.int8_matmul_block_mgpu(a, sa, b, sb, out_dtype=jnp.float32)  # the last row tile overlaps
    _compare(out, int8_matmul_block_scaled_reference(a, sa, b, sb, out_dtype=jnp.float32), jnp.float32)
    with pytest.raises(ValueError, match="M=100 must be at least the 128 rows"):
        bm.int8_matmul_block_mgpu(a[:100], sa[:100], b, sb)


@pytest.mark.parametrize("m", [256, 200])  # 200 rows do not tile: the Triton kernel takes them on Hopper
def test_gemm_router_block_route_matches_reference(m):
    from pallas_kernels import gemm

    n, k, g = 128, 256, 128
    if not bm.available():  # the CPU path: Triton in interpret mode, small enough to run here
        n, k = 64, 256
    ks = jax.random.split(jax.random.key(m), 2)
    qa = quantize(jax.random.normal(ks[0], (m, k)), QuantSpec((1, g)))
    qb = quantize(jax.random.normal(ks[1], (n, k)), QuantSpec((g, g)))
    ref = gemm.matmul_qarrays_reference(qa, qb, out_dtype=jnp.float32)
    spec = QuantSpec((1, 64))  # fc1's output under the block policy: requantized in the epilogue
    ref_q = gemm.matmul_qarrays_reference(qa, qb, out_spec=spec)
    for block_backend in ("triton", "auto"):  # "auto": Mosaic on Hopper where the shapes tile
        _compare(gemm.matmul_qarrays(qa, qb, out_dtype=jnp.float32, block_backend=block_backend), ref, jnp.float32)
        close_codes(gemm.matmul_qarrays(qa, qb, out_spec=spec, block_backend=block_backend), ref_q)
    with pytest.raises(ValueError, match="block_backend must be one of"):
        gemm.matmul_qarrays(qa, qb, block_backend="cuda")


# Last: 34 compiled variants; the behaviour tests above run first where a GPU session is time-limited.
@on_hopper
@pytest.mark.parametrize(
    "over",
    [
        dict(convert="magic"),
        dict(convert="magic_add"),
        dict(pingpong=True),
        dict(groups_per_step=2),
        dict(groups_per_step=2, schedule="pair"),
        dict(groups_per_step=2, schedule="pair", pingpong=True),
        dict(groups_per_step=2, schedule="carry"),
        dict(groups_per_step=2, schedule="carry", pingpong=True),
        dict(groups_per_step=2, schedule="carry", convert="magic_add"),
        dict(schedule="running"),
        dict(schedule="running", pingpong=True),
        dict(groups_per_step=2, schedule="running"),
        dict(groups_per_step=2, schedule="running", pingpong=True),
        dict(cluster_m=True),
        dict(tile_n=64, epi_tile_n=64),
        dict(consumers=3),  # M = 512: the third row tile overlaps the second
        dict(consumers=3, schedule="running"),
    ],
)
@pytest.mark.parametrize("g", [32, 128])
def test_schedules_match_reference(over, g):
    m, n, k = 512, 512, 2048
    b_tile = (128, g) if over.get("schedule") == "running" else (g, g)  # one weight scale a warpgroup tile
    a, sa, b, sb, _ = _operands(7 + g, m, n, k, (1, g), b_tile)
    cfg = bm.fit_config(m, n, k, g, out_dtype=jnp.float32, **over)
    out = bm.int8_matmul_block_mgpu(a, sa, b, sb, out_dtype=jnp.float32, config=cfg)
    ref = int8_matmul_block_scaled_reference(a, sa, b, sb, out_dtype=jnp.float32)
    _compare(out, ref, jnp.float32)
