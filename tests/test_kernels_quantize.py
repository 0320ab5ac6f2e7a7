"""quantize_tiles (Pallas, interpret mode on CPU) against jq8.quant.quantize: bit-exact codes and scales."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jq8.quant import QuantSpec, noise_seed
from pallas_kernels.quantize import (
    QuantizeConfig,
    default_warps,
    plan_blocks,
    quantize_tiles,
    quantize_tiles_reference,
    stat_tiles,
    x_tile,
)

P, C, B, G = QuantSpec.per_row(), QuantSpec.per_column(), QuantSpec.blocks, QuantSpec.groups
# The reference runs eagerly on purpose: under jit, XLA may rewrite ``x / broadcast(scale)`` into a
# multiply by the reciprocal (seen on CPU for bf16 input), which moves exact ties; eager is exact division.
_reference = quantize_tiles_reference


def _data(shape, dtype, key=0):
    k1, k2 = jax.random.split(jax.random.key(key))
    # Heavy-tailed rows/columns so tiles get very different scales.
    x = jax.random.normal(k1, shape) * jnp.exp(jax.random.normal(k2, shape[:-1] + (1,)))
    return x.astype(dtype)


def _assert_bit_exact(got, ref):
    got = got if isinstance(got, tuple) else (got,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.spec == r.spec and g.shape == r.shape and g.dtype == r.dtype
        assert g.values.dtype == jnp.int8 and g.values.shape == r.values.shape
        assert g.scale.shape == r.scale.shape
        v, rv = np.asarray(g.values), np.asarray(r.values)
        assert not (v == -128).any(), "some codes were never written (poison -128 left)"
        np.testing.assert_array_equal(np.asarray(g.scale), np.asarray(r.scale))
        _assert_codes_equal(v, rv)


def _assert_codes_equal(v, rv):
    """Equal codes. The bit-exact contract is against the eager CPU reference; on the GPU, XLA's eager
    reference may contract x * (1 / scale) and the rounding differently, which moves exact ties by one code
    (measured on the H100: 6 of 14000 codes for a (70, 200) bf16 input, with equal scales)."""
    v, rv = np.asarray(v, np.int32), np.asarray(rv, np.int32)
    if jax.default_backend() != "gpu":
        np.testing.assert_array_equal(v, rv)
        return
    diff = np.abs(v - rv)
    assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3, (diff.max(), (diff > 0).mean())


CASES = [
    # (shape, dtype, spec, transposed_spec, rounding); ragged unless noted
    ((70, 200), jnp.bfloat16, P, B((32, 32)), "nearest"),
    ((64, 256), jnp.float32, P, P, "stochastic"),  # aligned; whole rows and whole columns: two launches
    ((70, 200), jnp.float32, C, None, "stochastic"),
    ((70, 200), jnp.bfloat16, G(32, 1), G(64, 0), "stochastic"),  # groups (1, 32) and (64, 1)
    ((70, 200), jnp.bfloat16, B((32, 32)), B((32, 32)), "nearest"),
    ((64, 256), jnp.float32, B((32, 32)), B((32, 32)), "stochastic"),  # aligned
    ((2, 35, 200), jnp.bfloat16, B((64, 64)), None, "stochastic"),  # rank 3: viewed as (70, 200)
    ((150, 300), jnp.float32, B((1, 128)), B((128, 128)), "nearest"),
]


@pytest.mark.parametrize("shape,dtype,spec,tspec,rounding", CASES)
def test_bit_exact_to_reference(shape, dtype, spec, tspec, rounding):
    x = _data(shape, dtype)
    seed = noise_seed(jax.random.key(7))
    kw = dict(rounding=rounding, seed=seed, transposed_spec=tspec)
    got = quantize_tiles(x, spec, poison_outputs=True, **kw)
    _assert_bit_exact(got, _reference(x, spec, **kw))


@pytest.mark.parametrize(
    "shape,spec,tspec,budget,rounding",
    [
        ((20, 300), P, G(32, 1), 256, "stochastic"),  # rows over the budget: each program sweeps columns
        ((300, 70), C, B((32, 32)), 256, "nearest"),  # columns over the budget: sweep the rows
        ((40, 90), QuantSpec.per_tensor(), None, 512, "nearest"),
    ],
)
def test_sweep_mode_bit_exact(shape, spec, tspec, budget, rounding):
    x = _data(shape, jnp.float32, key=3)
    seed = noise_seed(jax.random.key(1))
    cfg = QuantizeConfig(max_block_elems=budget)
    tiles = [x_tile(spec, *shape)] + ([x_tile(tspec, *shape, transposed=True)] if tspec else [])
    assert plan_blocks(*shape, tiles, cfg).loop_axis is not None  # the case under test
    kw = dict(rounding=rounding, seed=seed, transposed_spec=tspec)
    got = quantize_tiles(x, spec, config=cfg, poison_outputs=True, **kw)
    _assert_bit_exact(got, _reference(x, spec, **kw))


@pytest.mark.parametrize(
    "spec,tspec,rounding,row_stats",
    [
        (C, None, "nearest", False),
        (P, P, "stochastic", False),
        (QuantSpec((-1, 32)), B((32, 32)), "nearest", False),
        (P, P, "stochastic", True),
        (P, P, "nearest", True),
        (QuantSpec.row_runs(2), P, "nearest", True),
    ],
)
@pytest.mark.parametrize("prepass", [True, False])
def test_xla_axis_stats_bit_exact(spec, tspec, rounding, row_stats, prepass):
    # M over xla_column_stats_rows: tiles spanning all rows take their absmax from an XLA reduction
    # (per-row of x.T included: one launch writes both layouts); with row_stats, whole-row tiles too (the
    # int8-row backward: per-row codes + per-row codes of x.T from one full-grid pass), from the Pallas
    # pre-pass (prepass) or from two XLA reductions. A NaN must still reach its scale.
    x = _data((70, 200), jnp.bfloat16, key=5).at[5, 7].set(jnp.nan)
    seed = noise_seed(jax.random.key(2))
    kw = dict(rounding=rounding, seed=seed, transposed_spec=tspec)
    cfg = QuantizeConfig(xla_column_stats_rows=16, xla_row_stats_cols=64 if row_stats else 10**9,
                         prepass_axis_stats=prepass)
    tiles = [x_tile(spec, 70, 200)] + ([x_tile(tspec, 70, 200, transposed=True)] if tspec else [])
    stats = stat_tiles(tiles, 70, 200, cfg)
    assert any(t[1] == -1 for t in stats) == row_stats  # the case under test: row stats from XLA
    got = quantize_tiles(x, spec, config=cfg, poison_outputs=True, **kw)
    ref = _reference(x, spec, **kw)
    got, ref = (got if isinstance(got, tuple) else (got,)), (ref if isinstance(ref, tuple) else (ref,))
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(np.asarray(g.scale), np.asarray(r.scale))  # NaN == NaN here
        _assert_codes_equal(g.values, r.values)
        assert np.isnan(np.asarray(g.scale)).any()


@pytest.mark.parametrize("pre_pass", [True, False])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_column_sum_rides_the_statistics_pass(pre_pass, dtype):
    # The int8-row policy's gradient: per-row codes of g and g.T, and sum(g, axis=0) (the bias gradient) from
    # the pre-pass's read of g; without a pre-pass XLA sums.
    x = _data((70, 200), dtype, key=6)
    cfg = QuantizeConfig(xla_column_stats_rows=16 if pre_pass else 10**9, xla_row_stats_cols=64)
    kw = dict(rounding="stochastic", seed=noise_seed(jax.random.key(3)), transposed_spec=P)
    q, qt, s = quantize_tiles(x, P, config=cfg, column_sum=True, poison_outputs=True, **kw)
    rq, rqt, rs = _reference(x, P, column_sum=True, **kw)
    for g, r in ((q, rq), (qt, rqt)):
        np.testing.assert_array_equal(np.asarray(g.scale), np.asarray(r.scale))
        _assert_codes_equal(g.values, r.values)
    xf = np.asarray(x, np.float32)
    assert s.shape == (200,) and s.dtype == jnp.float32
    tol = 1e-5 * np.abs(xf).sum(axis=0).max()  # fp32 sums in another order
    np.testing.assert_allclose(np.asarray(s), xf.sum(axis=0), rtol=0, atol=tol)
    np.testing.assert_allclose(np.asarray(rs), xf.sum(axis=0), rtol=0, atol=tol)
    one = quantize_tiles(x, P, config=cfg, column_sum=True)  # without the transposed copy: (q, sums)
    assert isinstance(one, tuple) and len(one) == 2
    np.testing.assert_allclose(np.asarray(one[1]), xf.sum(axis=0), rtol=0, atol=tol)


@pytest.mark.parametrize(
    "widths,pre_pass",
    [((64, 64, 64), True), ((64, 64, 64), False), ((64, 100, 36), True), ((50, 50, 50), True)],
)
def test_column_parts_equal_the_concatenation(widths, pre_pass):
    """x given as column parts (attention's dq, dk, dv) quantizes exactly as x = concatenate(parts): read in
    place for equal widths that blocks do not straddle (64 with 64-wide blocks), concatenated otherwise."""
    parts = tuple(_data((70, w), jnp.bfloat16, key=20 + i) for i, w in enumerate(widths))
    x = jnp.concatenate(parts, axis=1)
    cfg = QuantizeConfig(block_n=64, xla_column_stats_rows=16 if pre_pass else 10**9, xla_row_stats_cols=64)
    kw = dict(rounding="stochastic", seed=noise_seed(jax.random.key(7)), transposed_spec=P, column_sum=True)
    got = quantize_tiles(parts, P, config=cfg, poison_outputs=True, **kw)
    ref = quantize_tiles(x, P, config=cfg, **kw)
    for g, r in zip(got[:2], ref[:2]):
        assert g.shape == r.shape and g.dtype == r.dtype
        np.testing.assert_array_equal(np.asarray(g.scale), np.asarray(r.scale))
        np.testing.assert_array_equal(np.asarray(g.values), np.asarray(r.values))
    np.testing.assert_allclose(np.asarray(got[2]), np.asarray(ref[2]), rtol=1e-6)
    _assert_bit_exact(got[:2], _reference(parts, P, **kw)[:2])
    jaxpr = str(jax.make_jaxpr(lambda p: quantize_tiles(p, P, config=cfg, **kw))(parts))
    # in place when no block straddles two parts; XLA's statistics (no pre-pass) reduce a concatenation
    assert ("concatenate" in jaxpr) == (widths != (64, 64, 64) or not pre_pass)
    with pytest.raises(ValueError, match="share their row count"):
        quantize_tiles((parts[0], parts[1][:60]), P)


def test_column_parts_lower_to_triton():
    parts = tuple(jax.ShapeDtypeStruct((300, 256), jnp.bfloat16) for _ in range(3))
    seed = jax.ShapeDtypeStruct((2,), jnp.uint32)
    cfg = QuantizeConfig(xla_column_stats_rows=16, xla_row_stats_cols=16)
    f = jax.jit(lambda p, s: quantize_tiles(p, P, rounding="stochastic", seed=s, transposed_spec=P,
                                            config=cfg, column_sum=True, interpret=False))
    assert "triton" in f.trace(parts, seed).lower(lowering_platforms=("cuda",)).as_text()


def test_default_config_for_the_pre_pass_route():
    from pallas_kernels.quantize import AXIS_STATS_CONFIG, default_config

    assert default_config([(1, -1), (-1, 1)], 16384, 4096) is AXIS_STATS_CONFIG  # int8-row: x and x.T per row
    assert default_config([(1, -1), (-1, 1)], 512, 4096) == QuantizeConfig()  # short columns: in the program
    assert default_config([(32, 32), (32, 32)], 16384, 4096) == QuantizeConfig()
    assert default_config([(1, -1)], 16384, 4096) == QuantizeConfig()


def test_ties_and_negatives_round_half_away():
    # scale = 127 / 127 = 1 per row: values k + 0.5 are exact ties and must round away from zero.
    row = jnp.array([127.0, -127.0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 0.25, -126.5, 0.49999997], jnp.float32)
    x = jnp.tile(row, (3, 1))
    q = quantize_tiles(x, P)
    np.testing.assert_array_equal(np.asarray(q.values[0, :10]), [127, -127, 1, -1, 2, -2, 3, -3, 0, -127])
    _assert_bit_exact(q, _reference(x, P))


def test_non_finite_tiles_stay_visible():
    x = _data((64, 96), jnp.float32)
    x = x.at[3, 5].set(jnp.nan).at[40, 70].set(jnp.inf).at[50, 10].set(-jnp.inf)
    # 32x32 blocks in one load; per-row with a tiny budget sweeps the row (NaN through the running max).
    for spec, cfg in ((B((32, 32)), None), (P, QuantizeConfig(max_block_elems=64))):
        got, ref = quantize_tiles(x, spec, config=cfg), _reference(x, spec)
        np.testing.assert_array_equal(np.asarray(got.scale), np.asarray(ref.scale))  # NaN == NaN here
        np.testing.assert_array_equal(np.asarray(got.values), np.asarray(ref.values))
        assert np.isnan(np.asarray(got.scale)).any() and np.isinf(np.asarray(got.scale)).any()


def test_stochastic_noise_differs_across_programs():
    # Identical data in every 32x32 block: with global-coordinate noise the codes still differ per block.
    x = jnp.tile(_data((32, 32), jnp.float32), (4, 4)) * 0.37
    q = quantize_tiles(x, B((32, 32)), rounding="stochastic", seed=noise_seed(jax.random.key(0)))
    v = np.asarray(q.values)
    assert (v[:32, :32] != v[32:64, 32:64]).any()
    _assert_bit_exact(
        q, _reference(x, B((32, 32)), rounding="stochastic", seed=noise_seed(jax.random.key(0)))
    )


def test_errors_are_actionable():
    x = _data((16, 64), jnp.float32)
    with pytest.raises(NotImplementedError, match="INT4"):
        quantize_tiles(x, QuantSpec.blocks((32, 32), bits=4))
    with pytest.raises(NotImplementedError, match="symmetric"):
        quantize_tiles(x, QuantSpec.per_row(symmetric=False))
    with pytest.raises(NotImplementedError, match="powers of two"):
        quantize_tiles(x, G(24, 1))
    with pytest.raises(ValueError, match="seed"):
        quantize_tiles(x, P, rounding="stochastic")
    with pytest.raises(TypeError):
        quantize_tiles(x.astype(jnp.int32), P)
    with pytest.raises(ValueError, match="own call"):
        plan_blocks(1 << 17, 1 << 17, [(-1, -1)], QuantizeConfig())


_tile_size = st.sampled_from([-1, 1, 2, 8, 32, 64, 128])


@settings(max_examples=200, deadline=None)
@given(
    m=st.integers(1, 5000),
    n=st.integers(1, 5000),
    tiles=st.lists(st.tuples(_tile_size, _tile_size), min_size=1, max_size=3),
    budget=st.sampled_from([256, 4096, 16384]),
)
def test_plan_blocks_invariants(m, n, tiles, budget):
    """Every tile lies inside one program's block (or the program sweeps its whole axis)."""
    # As x_tile resolves them: a tile at least as long as its axis is the whole axis.
    tiles = [tuple(-1 if t == -1 or t >= d else t for t, d in zip(tile, (m, n))) for tile in tiles]
    try:
        plan = plan_blocks(m, n, tiles, QuantizeConfig(max_block_elems=budget))
    except ValueError:
        # only when whole rows and whole columns are both needed and exceed the budget
        assert any(t[0] == -1 for t in tiles) and any(t[1] == -1 for t in tiles)
        return
    block, dims = (plan.bm, plan.bn), (m, n)
    req = max(budget, np.prod([max([t[a] for t in tiles if t[a] != -1] + [1]) for a in (0, 1)]))
    assert plan.bm * plan.bn <= req
    for a in (0, 1):
        assert block[a] & (block[a] - 1) == 0  # powers of two (Triton)
        assert plan.grid[a] * block[a] >= dims[a] or plan.loop_axis == a
        for t in tiles:
            if t[a] == -1:
                assert block[a] >= dims[a] or plan.loop_axis == a
                assert plan.grid[a] == 1
            else:
                assert block[a] % t[a] == 0


@pytest.mark.parametrize(
    "spec,tspec,rounding,cfg",
    [
        (B((32, 32)), B((32, 32)), "stochastic", None),
        (P, P, "nearest", QuantizeConfig(xla_column_stats_rows=16)),  # XLA column stats + kernel
        (P, P, "stochastic", QuantizeConfig(xla_column_stats_rows=16, xla_row_stats_cols=16)),  # + row stats
        (P, G(32, 1), "nearest", QuantizeConfig(max_block_elems=256)),  # rows swept in chunks
    ],
)
def test_lowers_to_triton(spec, tspec, rounding, cfg):
    """The GPU path (interpret=False) lowers to Triton IR on this CPU-only machine: catches primitives
    the Pallas-Triton lowering refuses. (Triton's own compiler still needs the GPU check script.)"""
    x = jax.ShapeDtypeStruct((300, 1000), jnp.bfloat16)
    seed = jax.ShapeDtypeStruct((2,), jnp.uint32)
    f = jax.jit(
        lambda x, s: quantize_tiles(
            x, spec, rounding=rounding, seed=s, transposed_spec=tspec, config=cfg, interpret=False
        )
    )
    text = f.trace(x, seed).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text


@pytest.mark.parametrize(
    "m,n,bm,bn,warps",
    [
        (8192, 1600, 1, 2048, 4),  # GPT-2 1.5B LayerNorm / attention output: one row per program
        (8192, 6400, 1, 8192, 2),  # fc1's output: one long row, 2 warps
        (8192, 768, 2, 1024, 4),  # 124M: two rows make the 2048-element block
        (1056, 40, 32, 64, 4),  # narrow rows: block_m (32) is the cap
    ],
)
def test_row_block_plan(m, n, bm, bn, warps):
    """Per-token tiles over many rows: few whole rows per program (QuantizeConfig.row_block_elems)."""
    plan = plan_blocks(m, n, [x_tile(P, m, n)], QuantizeConfig())
    assert (plan.bm, plan.bn, plan.loop_axis, plan.row_blocks) == (bm, bn, None, True)
    assert default_warps(plan) == warps
    # Not for decode / mid-size M, not when switched off, not for 32-row tiles, not over the block budget.
    assert not plan_blocks(1000, n, [x_tile(P, 1000, n)], QuantizeConfig()).row_blocks
    assert not plan_blocks(m, n, [x_tile(P, m, n)], QuantizeConfig(row_block_elems=None)).row_blocks
    assert not plan_blocks(m, n, [(32, 32), (1, -1)], QuantizeConfig()).row_blocks
    if bn > 256:  # rows over the block budget are swept in chunks, as without row blocks
        swept = plan_blocks(m, n, [x_tile(P, m, n)], QuantizeConfig(max_block_elems=256))
        assert not swept.row_blocks and swept.loop_axis == 1


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_row_blocks_bit_exact(dtype):
    """The row-block plan at a ragged width over >= ROW_BLOCK_MIN_ROWS rows, bit-exact to the reference."""
    x = _data((1100, 72), dtype, key=5)
    assert plan_blocks(1100, 72, [x_tile(P, 1100, 72)], QuantizeConfig()).row_blocks
    _assert_bit_exact(quantize_tiles(x, P, poison_outputs=True), _reference(x, P))
