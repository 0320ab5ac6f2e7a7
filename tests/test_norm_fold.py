"""Folding pre-norm affines into the next Dense layers (jq8.ptq.norm_fold, ptq.quantize_params(fold_norms=))."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jq8 import ptq
from jq8.ptq import checkpoint as qcheckpoint
from jq8.ptq import infer as ptq_infer
from jq8.ptq import norm_fold
from jq8.rules import get_path
from tests.test_ptq import run_int8, tiny_gpt


def tiny_llama(seed: int = 4, *, layers: int = 1, heads: int = 2, kv_heads: int | None = None, vocab: int = 97,
               batch: int = 2, with_config: bool = False):
    """(model, params, tokens[, config]) of a small LLaMA (RMSNorm, SwiGLU, no biases, d = 32) with random norm
    gammas; ``kv_heads`` < ``heads`` gives grouped-query attention."""
    from jq8.training.policy import Policy
    from models.presets import build_model, preset

    gqa = {} if kv_heads is None else {"num_kv_heads": kv_heads}
    cfg = dataclasses.replace(
        preset("llama-tiny"), num_layers=layers, d_model=32, num_heads=heads, vocab_size=vocab, max_seq_len=16,
        **gqa,
    )
    model = build_model(cfg, Policy.from_name("bf16", compute_dtype=jnp.float32, backend="xla"))
    tokens = jax.random.randint(jax.random.PRNGKey(seed + 1), (batch, 16), 0, vocab)
    params = jax.jit(model.init)(jax.random.PRNGKey(seed), tokens)["params"]
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 2), len(leaves))
    leaves = [x + 0.3 * jax.random.normal(k, x.shape) if x.ndim == 1 else x for x, k in zip(leaves, keys)]
    params = jax.tree_util.tree_unflatten(tree, leaves)
    return (model, params, tokens, cfg) if with_config else (model, params, tokens)


@pytest.mark.parametrize("which", ["gpt", "llama"])
def test_fold_is_exact_in_float(which):
    """The float model computes the same logits with the folded params; gammas are ones, betas zeros."""
    model, params, tokens = (
        tiny_gpt(layers=2, d=32, heads=2, vocab=101, seq=16) if which == "gpt" else tiny_llama()
    )
    branches = norm_fold.foldable_branches(params)
    if which == "gpt":
        assert branches == {
            f"h_{i}/{b}": c for i in range(2) for b, c in (("attn", ("qkv",)), ("mlp", ("fc1",)))
        }
    else:
        assert branches == {"h_0/attn": ("qkv",), "h_0/mlp": ("fc1", "gate")}  # SwiGLU: both read the norm
    folded, paths = ptq.fold_norm_affines(params, ptq.scheme("w8a8"))
    assert sorted(paths) == sorted(branches)
    for path in paths:
        norm = get_path(folded, path)["norm"]
        assert bool(jnp.all(norm["scale"] == 1)) and bool(jnp.all(norm.get("bias", jnp.zeros(1)) == 0))
        assert not bool(jnp.all(get_path(params, path)["norm"]["scale"] == 1))  # the input is untouched
    with jax.default_matmul_precision("highest"):
        ref = jax.jit(model.apply)({"params": params}, tokens)
        got = jax.jit(model.apply)({"params": folded}, tokens)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref))))


def test_fold_only_where_every_reader_takes_token_activations():
    _, params, _ = tiny_gpt(layers=1, d=32, heads=2, vocab=101, seq=16)
    for name in ("static-w8a8", "w8a16", "w4a16"):  # calibrated per-tensor scales / float activations
        assert ptq.quantize_params(params, ptq.scheme(name)).folded_norms == ()
    assert ptq.quantize_params(params, ptq.scheme("w8a8"), fold_norms=False).folded_norms == ()
    assert set(ptq.quantize_params(params, ptq.scheme("w4/8-a8")).folded_norms) == {"h_0/attn", "h_0/mlp"}
    # Only the attention rule token-wise: only the attention branch folds.
    rules = [ptq.QuantRule(r"attn/(qkv|out)$", 8), ptq.QuantRule(r"mlp/fc\d$", 8, act_mode="none")]
    assert ptq.quantize_params(params, rules).folded_norms == ("h_0/attn",)


def test_norm_bias_needs_a_bias_on_every_reader():
    gamma, beta = jnp.full((4,), 2.0), jnp.full((4,), 0.5)
    node = {"norm": {"scale": gamma, "bias": beta}, "fc1": {"kernel": jnp.ones((4, 3))}}
    assert norm_fold.foldable_branches({"mlp": node}) == {}  # no slot for beta @ W
    node["fc1"]["bias"] = jnp.arange(3.0)
    assert norm_fold.foldable_branches({"mlp": node}) == {"mlp": ("fc1",)}
    new = norm_fold.fold_branch(node, ("fc1",))
    np.testing.assert_allclose(new["fc1"]["kernel"], 2.0 * np.ones((4, 3)))
    np.testing.assert_allclose(new["fc1"]["bias"], np.arange(3.0) + 2.0)  # b + beta @ W = b + 4 * 0.5
    # RMSNorm-style (gamma only) into a bias-less reader: folds, and adds no bias.
    rms = {"norm": {"scale": gamma}, "qkv": {"kernel": jnp.ones((4, 6), jnp.bfloat16)}}
    new = norm_fold.fold_branch(rms, norm_fold.foldable_branches({"a": rms})["a"])
    assert "bias" not in new["qkv"] and new["qkv"]["kernel"].dtype == jnp.bfloat16


def test_folded_prefill_skips_the_affine_and_matches_xla(monkeypatch):
    """The fused W8A8 path calls LayerNorm-quantize without gamma / beta for folded branches; the Pallas
    kernels (interpret mode) give the XLA path's numbers; the model stays within quantization error of the
    unfolded one."""
    model, params, tokens = tiny_gpt(layers=1, d=48, heads=2, vocab=101, seq=8, seed=5)
    qp = ptq.quantize_params(params, ptq.scheme("w8a8"))
    assert set(qp.folded_norms) == {"h_0/attn", "h_0/mlp"}
    affines, real = [], ptq_infer.norm_quantize_tokens

    def spy(x, gamma, beta, **k):
        affines.append((gamma is None, beta is None))
        return real(x, gamma, beta, **k)

    monkeypatch.setattr(ptq_infer, "norm_quantize_tokens", spy)
    jax.clear_caches()
    try:
        ref = run_int8(model, qp, tokens, backend="xla")
        got = jax.jit(lambda q, t: ptq_infer.apply_quantized(model, q, t, backend="pallas"))(qp, tokens)
    finally:
        jax.clear_caches()
    assert affines and all(a == (True, True) for a in affines)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(ref))))
    unfolded = run_int8(
        model, ptq.quantize_params(params, ptq.scheme("w8a8"), fold_norms=False), tokens, "xla"
    )
    fp = jax.jit(model.apply)({"params": params}, tokens)
    rel = lambda y: float(jnp.sqrt(jnp.mean((y - fp) ** 2) / jnp.mean(fp**2)))  # noqa: E731
    assert rel(ref) < 0.05 and rel(unfolded) < 0.05, (rel(ref), rel(unfolded))


def test_checkpoint_keeps_folded_norms(tmp_path):
    model, params, tokens = tiny_gpt(layers=1, d=32, heads=2, vocab=101, seq=16)
    qp = ptq.quantize_params(params, ptq.scheme("w8a8"))
    qcheckpoint.save_quantized(tmp_path / "q", qp, float_dtype="float32")
    back, manifest = qcheckpoint.load_quantized(tmp_path / "q")
    assert back.folded_norms == qp.folded_norms and manifest["folded_norms"] == list(qp.folded_norms)
    np.testing.assert_allclose(
        run_int8(model, back, tokens, "xla"), run_int8(model, qp, tokens, "xla"), rtol=1e-6
    )
    # A manifest without the key (written before folding existed) loads, its norms running as stored.
    path = tmp_path / "q" / qcheckpoint.MANIFEST
    text = path.read_text().replace('"folded_norms"', '"unused_key"')
    path.write_text(text)
    old, _ = qcheckpoint.load_quantized(tmp_path / "q")
    assert old.folded_norms == ()
    np.testing.assert_allclose(
        run_int8(model, old, tokens, "xla"), run_int8(model, qp, tokens, "xla"), rtol=1e-5
    )
