"""LKD: straight-through student, per-block distillation, input modes, capture of block calls."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_ptq import run_int8, tiny_gpt

from jq8 import lkd, ptq
from jq8.quant import QuantSpec, fake_quantize


@pytest.fixture(scope="module")
def setup():
    model, params, _ = tiny_gpt(d=32, heads=2, vocab=97, seq=16, seed=3)
    tokens = jax.random.randint(jax.random.PRNGKey(9), (8, 16), 0, 97)
    return model, params, [tokens[:4], tokens[4:]]


def test_ste_linear_forward_is_quantized_and_gradient_straight_through():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(k1, (5, 40))
    w = jax.random.normal(k2, (40, 7))
    rule = ptq.QuantRule("x", 4, 16)
    y = lkd.ste_linear(x, w, None, rule)
    xq = fake_quantize(x, QuantSpec.per_row(8))
    wq = fake_quantize(w.T, rule.weight_spec()).T
    np.testing.assert_allclose(y, xq @ wq, rtol=1e-5, atol=1e-5)
    gw = jax.grad(lambda w: jnp.sum(lkd.ste_linear(x, w, None, rule) ** 2))(w)
    np.testing.assert_allclose(gw, xq.T @ (2 * (xq @ wq)), rtol=1e-4, atol=1e-4)  # d/dW through identity


def test_capture_finds_blocks_in_order(setup):
    model, params, chunks = setup
    assert lkd.block_paths(model, params, chunks[0]) == ["h_0", "h_1"]
    with pytest.raises(ValueError, match="no block module"):
        lkd.block_paths(model, params, chunks[0], block_pattern=r"^nothing_\d+$")


@pytest.mark.parametrize("mode", ["fp", "quantized"])
def test_distill_lowers_block_mse_and_touches_only_blocks(setup, mode):
    model, params, chunks = setup
    rules = ptq.scheme("w4/8-a8", int4_group=16)
    cfg = lkd.LKDConfig(steps=25, lr=2e-3, batch_size=4, lkd_input=mode, progress=False)
    new, rep = lkd.distill(model, params, rules, chunks, cfg)
    assert [r["block"] for r in rep] == ["h_0", "h_1"]
    assert all(r["loss_after"] <= r["loss_before"] for r in rep)
    assert any(r["loss_after"] < 0.97 * r["loss_before"] for r in rep), rep
    for name in ("wte", "wpe", "ln_f"):  # outside the blocks: untouched
        for a, b in zip(jax.tree_util.tree_leaves(params[name]), jax.tree_util.tree_leaves(new[name])):
            np.testing.assert_array_equal(a, b)
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree_util.tree_leaves(params["h_0"]), jax.tree_util.tree_leaves(new["h_0"]))
    ]
    assert any(changed) or rep[0]["loss_after_raw"] > rep[0]["loss_before"]
    # The distilled model quantizes and runs on the INT8 path.
    qp = ptq.quantize_params(new, rules)
    out = run_int8(model, qp, chunks[0])
    assert out.shape == (4, 16, 97) and bool(jnp.all(jnp.isfinite(out)))


def test_distill_rejects_static_baseline_and_empty_data(setup):
    model, params, chunks = setup
    with pytest.raises(ValueError, match="static"):
        lkd.distill(model, params, ptq.scheme("static-w8a8"), chunks, lkd.LKDConfig(steps=1, progress=False))
    with pytest.raises(ValueError, match="calibration"):
        lkd.distill(model, params, ptq.scheme("w8a8"), [], lkd.LKDConfig(steps=1, progress=False))
