"""LKD: straight-through student, per-block distillation, input modes, capture of block calls."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_ptq import run_int8, tiny_gpt

from jq8 import ptq
from jq8.ptq import lkd
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


# ------------------------------------------------------------------------- last block: KL of the logits


def tiny_llama(d: int = 32, heads: int = 2, vocab: int = 89, seq: int = 16, seed: int = 5):
    """(model, params) for a small models.llama Llama in fp32 (untied ``lm_head``), random RMSNorm scales."""
    import dataclasses

    from jq8.training.policy import Policy
    from models.presets import build_model, preset

    cfg = dataclasses.replace(
        preset("llama-tiny"), num_layers=2, d_model=d, num_heads=heads, vocab_size=vocab, max_seq_len=seq
    )
    model = build_model(cfg, Policy.from_name("bf16", compute_dtype=jnp.float32, backend="xla"))
    params = jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, seq), jnp.int32))["params"]
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape) if x.ndim == 1 else x for x, k in zip(leaves, keys)]
    return model, jax.tree_util.tree_unflatten(tree, leaves)


@pytest.fixture(scope="module")
def llama_setup():
    model, params = tiny_llama()
    tokens = jax.random.randint(jax.random.PRNGKey(11), (8, 13), 0, 89)  # T=13: ragged vs the int4 groups
    return model, params, [tokens[:4], tokens[4:]]


def _reference_kl(model, params, rules, chunks, block: str, student_params=None) -> float:
    """KL(FP model || model (``student_params``, default ``params``) with only ``block``'s Dense layers
    fake-quantized), from whole-model logits averaged over the chunks."""
    student_params = params if student_params is None else student_params
    assignment = ptq.assign_rules(ptq.dense_paths(params), rules)
    by_path = {p: rules[i] for p, i in assignment.items() if p.startswith(block + "/")}
    assert by_path

    @jax.jit
    def quantized(p, t):
        with nn.intercept_methods(lkd.ste_interceptor(by_path)):
            return model.apply({"params": p}, t)

    fp_fn = jax.jit(lambda p, t: model.apply({"params": p}, t))
    kls = []
    for t in chunks:
        fp, q = fp_fn(params, t), quantized(student_params, t)
        lt, lq = (np.asarray(jax.nn.log_softmax(np.asarray(z, np.float64), axis=-1)) for z in (fp, q))
        kls.append(np.mean(np.sum(np.exp(lt) * (lt - lq), axis=-1)))
    return float(np.mean(kls))


def test_kl_divergence_matches_formula_and_is_zero_for_identical_logits():
    k1, k2 = jax.random.split(jax.random.PRNGKey(4))
    t = 3 * jax.random.normal(k1, (3, 5, 11))
    s = t + jax.random.normal(k2, (3, 5, 11))
    assert float(lkd.kl_divergence(t, t)) == 0.0
    pt = np.exp(np.asarray(t, np.float64)) / np.exp(np.asarray(t, np.float64)).sum(-1, keepdims=True)
    ps = np.exp(np.asarray(s, np.float64)) / np.exp(np.asarray(s, np.float64)).sum(-1, keepdims=True)
    ref = np.mean(np.sum(pt * np.log(pt / ps), axis=-1))
    assert ref > 0.05
    np.testing.assert_allclose(float(lkd.kl_divergence(t, s)), ref, rtol=1e-4)


def test_kl_loss_is_zero_when_the_last_block_is_not_quantized(setup):
    model, params, chunks = setup
    rules = [ptq.QuantRule(r"^h_0/", 4, 16)]  # the student of h_1 is the float block itself
    cfg = lkd.LKDConfig(steps=0, progress=False, last_block_loss="kl")
    _, rep = lkd.distill(model, params, rules, chunks, cfg)
    assert [r["objective"] for r in rep] == ["mse", "kl"]
    assert rep[0]["loss_before"] > 1e-5  # h_0 is quantized: its MSE is not zero
    assert abs(rep[1]["loss_before"]) < 1e-9, rep


@pytest.mark.parametrize("family, objective", [("gpt", "kl"), ("llama", "mse+kl")])
def test_kl_distillation_lowers_logit_kl_and_trains_only_the_last_block(
    setup, llama_setup, family, objective
):
    model, params, chunks = setup if family == "gpt" else llama_setup
    rules = ptq.scheme("w4/8-a8", int4_group=16)
    only_last = r"^h_1$"  # distill the last block alone: nothing else may change

    def run(loss, steps):
        cfg = lkd.LKDConfig(
            steps=steps, lr=5e-4, batch_size=4, block_pattern=only_last, progress=False, last_block_loss=loss
        )
        return lkd.distill(model, params, rules, chunks, cfg)

    new, rep = run(objective, 20)
    assert len(rep) == 1 and rep[0]["block"] == "h_1" and rep[0]["objective"] == objective
    # The reported loss is the KL of the whole model's logits (FP head), plus the MSE for "mse+kl".
    expected = _reference_kl(model, params, rules, chunks, "h_1")
    if objective == "mse+kl":
        expected += run("mse", 0)[1][0]["loss_before"]
    np.testing.assert_allclose(rep[0]["loss_before"], expected, rtol=2e-3)
    assert rep[0]["loss_after"] < 0.9 * rep[0]["loss_before"], rep
    if objective == "kl":  # the distilled block really lowers the whole model's KL
        new_kl = _reference_kl(model, params, rules, chunks, "h_1", student_params=new)
        np.testing.assert_allclose(new_kl, rep[0]["loss_after"], rtol=2e-3)
    for name in params:
        pairs = zip(jax.tree.leaves(params[name]), jax.tree.leaves(new[name]))
        same = [np.array_equal(a, b) for a, b in pairs]
        assert (not all(same)) if name == "h_1" else all(same), name


def test_kl_rejects_a_model_without_lm_head_and_unknown_losses(setup):
    from models.bert import BertConfig, BertModel

    cfg = BertConfig(vocab_size=61, hidden=16, layers=2, heads=2, intermediate=24, max_positions=16)
    bert = BertModel(cfg)
    ids = jax.random.randint(jax.random.PRNGKey(2), (4, 11), 0, 61)
    mask = jnp.ones((4, 11), jnp.int32).at[:, 9:].set(0)
    chunk = (ids, mask, jnp.zeros_like(ids))
    params = jax.jit(bert.init)(jax.random.PRNGKey(0), *chunk)["params"]
    assert lkd.capture_head(bert, params, chunk, "encoder/layer_1") == ()
    for loss in ("kl", "mse+kl"):
        with pytest.raises(ValueError, match="LM head"):
            cfg = lkd.LKDConfig(steps=1, progress=False, last_block_loss=loss)
            lkd.distill(bert, params, ptq.scheme("w8a8"), [chunk], cfg)
    model, gparams, chunks = setup
    with pytest.raises(ValueError, match="last_block_loss"):
        cfg = lkd.LKDConfig(progress=False, last_block_loss="ce")
        lkd.distill(model, gparams, ptq.scheme("w8a8"), chunks, cfg)


def test_cli_refuses_kl_for_minilm(capsys):
    import quantize

    assert quantize.run(["--model", "minilm", "--lkd", "--lkd-last-loss", "kl"]) == 2  # bad input, one line
    assert "LM head" in capsys.readouterr().err
