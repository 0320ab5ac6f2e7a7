"""Activation-outlier migration (jq8.ptq.smooth, quantize.py --smooth): exact in float on a GQA LLaMA and a GPT,
smaller W8A8 error where a channel is an outlier, the factor formula, and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import quantize
from jq8 import ptq
from jq8.ptq import infer as ptq_infer
from jq8.ptq import smooth
from jq8.rules import get_path
from tests.test_norm_fold import tiny_llama
from tests.test_ptq import tiny_gpt
from tests.test_quantize_cli import SMALL, ckpt  # noqa: F401  (the tiny GPT run fixture)


def tiny_gqa_llama(seed: int = 3, layers: int = 2):
    """(model, params, tokens, config): a LLaMA with 4 query heads on 2 KV heads and random gammas."""
    return tiny_llama(seed, layers=layers, heads=4, kv_heads=2, vocab=89, batch=3, with_config=True)


def logits(model, params, tokens):
    with jax.default_matmul_precision("highest"):
        return jax.jit(model.apply)({"params": params}, tokens)


@pytest.mark.parametrize("which", ["llama-gqa", "gpt"])
@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_smoothing_is_exact_in_float(which, alpha):
    """Same logits after smoothing every site; the weights did change (the factors are not all 1)."""
    if which == "gpt":
        model, params, tokens = tiny_gpt(layers=2, d=32, heads=2, vocab=101, seq=16)
        heads, kv = 2, None
    else:
        model, params, tokens, cfg = tiny_gqa_llama()
        heads, kv = cfg.num_heads, cfg.num_kv_heads
    new, rep = smooth.smooth(model, params, [tokens[:2], tokens[1:]], alpha, num_heads=heads, num_kv_heads=kv)
    sites = sorted((r["path"], r["site"]) for r in rep)
    per_layer = ("norm->fc1", "norm->qkv", "v->out") + (("fc1->fc2",) if which != "gpt" else ())
    want = sorted((f"h_{i}/{'mlp' if 'fc' in s else 'attn'}", s) for i in range(2) for s in per_layer)
    assert sites == want  # GELU's fc2 input is not linear in fc1: no fc1->fc2 site on the GPT
    assert all(r["s_max"] / r["s_min"] > 1.3 for r in rep)  # per-channel factors, not one constant
    ref, got = logits(model, params, tokens), logits(model, new, tokens)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref))))
    for path in ("h_0/attn/qkv", "h_0/attn/out", "h_1/mlp/fc1", "h_1/mlp/fc2" if which != "gpt" else "h_1/mlp/fc1"):
        assert not np.allclose(get_path(new, path)["kernel"], get_path(params, path)["kernel"])


def test_gqa_factors_are_shared_by_a_group():
    """v -> out on 4 query heads / 2 KV heads: out's rows of the two query heads reading one KV head get one
    factor per channel, and q, k columns are untouched."""
    model, params, tokens, cfg = tiny_gqa_llama(layers=1)
    amax = smooth.activation_absmax(model, params, [tokens])
    new, _ = smooth.smooth_params(params, amax, 0.5, num_heads=4, num_kv_heads=2)
    hd = 32 // 4
    ratio = np.asarray(new["h_0"]["attn"]["out"]["kernel"][:, 0] / params["h_0"]["attn"]["out"]["kernel"][:, 0])
    ratio = ratio.reshape(2, 2, hd)  # (KV head, query head in group, channel)
    np.testing.assert_allclose(ratio[:, 0], ratio[:, 1], rtol=1e-5)
    assert not np.allclose(ratio[0, 0], ratio[1, 0])
    qkv0, qkv1 = params["h_0"]["attn"]["qkv"]["kernel"], new["h_0"]["attn"]["qkv"]["kernel"]
    qk = (4 + 2) * hd
    # the norm site rescales qkv's rows, v -> out its v columns: q, k columns only by the row factors
    row = np.asarray(qkv1[:, 0] / qkv0[:, 0])
    np.testing.assert_allclose(np.asarray(qkv1[:, :qk]), np.asarray(qkv0[:, :qk]) * row[:, None], rtol=1e-5)
    with pytest.raises(ValueError, match="num_heads"):
        smooth.smooth_params(params, amax, 0.5, num_heads=3, num_kv_heads=1)
    only, rep = smooth.smooth_params(params, amax, 0.5, num_heads=4, num_kv_heads=2, sites=("v->out",))
    assert [r["site"] for r in rep] == ["v->out"]
    np.testing.assert_array_equal(only["h_0"]["mlp"]["fc2"]["kernel"], params["h_0"]["mlp"]["fc2"]["kernel"])
    with pytest.raises(ValueError, match="site"):
        smooth.smooth_params(params, amax, 0.5, sites=("norm->gate",))


def test_smoothing_lowers_w8a8_error_on_outlier_channels():
    """A few 40x channels in the norms' output (as real LMs have): token-wise W8A8 loses them to the row
    scale; smoothed (alpha 0.5), the same W8A8 rules land closer to the float logits."""
    model, params, tokens = _outlier_llama()
    rules = ptq.scheme("w8a8", embeddings=False)
    ref = logits(model, params, tokens)

    def err(p):
        qp = ptq.quantize_params(p, rules, fold_norms=False)
        out = ptq_infer.apply_quantized(model, qp, tokens, backend="xla")
        return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))

    new, rep = smooth.smooth(model, params, [tokens], 0.5, num_heads=4, num_kv_heads=2)
    norm_sites = [r for r in rep if r["site"].startswith("norm")]
    assert all(r["act_max_ratio_after"] < r["act_max_ratio_before"] / 3 for r in norm_sites)
    before, after = err(params), err(new)
    assert after < 0.5 * before, (before, after)


def _outlier_llama():
    """tiny_gqa_llama with two 40x channels in every norm's output."""
    model, params, tokens, cfg = tiny_gqa_llama()
    for i in range(2):
        for b in ("attn", "mlp"):
            g = params[f"h_{i}"][b]["norm"]["scale"]
            params[f"h_{i}"][b]["norm"]["scale"] = g.at[jnp.array([3, 17])].multiply(40.0)
    return model, params, tokens


def test_w8a8_output_error_is_per_token_times_per_channel_int8():
    x = np.asarray(jax.random.normal(jax.random.key(0), (24, 40)), np.float32) * np.linspace(0.5, 9, 40)
    w = np.asarray(jax.random.normal(jax.random.key(1), (40, 12)), np.float32)

    def q(m):  # symmetric INT8, one scale per row, rounding half away from zero
        scale = np.abs(m).max(axis=1, keepdims=True) / 127.0
        return np.trunc(m / scale + np.copysign(0.5, m)) * scale

    want = float(np.sum(np.square(q(x) @ q(w.T).T - x.astype(np.float64) @ w)))
    np.testing.assert_allclose(smooth.w8a8_output_error(x, w), want, rtol=2e-3)


def test_search_alphas_takes_each_sites_least_error_strength():
    """The first site's pick is the grid strength whose smoothed model, run in float, feeds its consumer the
    inputs with the least W8A8 error; the picks smooth exactly in float and beat no smoothing under W8A8."""
    model, params, tokens = _outlier_llama()
    heads = dict(num_heads=4, num_kv_heads=2)
    amax = smooth.activation_absmax(model, params, [tokens])
    samples = smooth.activation_samples(model, params, [tokens])
    grid = (0.0, 0.5, 0.9)
    chosen = smooth.search_alphas(params, amax, samples, grid, **heads)
    sites = smooth.smoothing_sites(params, 4)
    assert set(chosen) == {smooth.site_key(p, s) for p, s in sites} and set(chosen.values()) <= set(grid)
    path, site = sites[0]
    key, consumer = smooth.site_key(path, site), f"{path}/out"
    assert site == "v->out"
    errors = []
    for a in grid:
        sp, rep = smooth.smooth_params(params, amax, {key: a}, **heads)
        assert [(r["path"], r["site"], r["alpha"]) for r in rep] == [(path, site, a)]  # other sites skipped
        xs = smooth.activation_samples(model, sp, [tokens])[consumer]
        errors.append(smooth.w8a8_output_error(xs, get_path(sp, consumer)["kernel"]))
    assert chosen[key] == grid[int(np.argmin(errors))], (chosen[key], errors)

    new, rep = smooth.smooth(model, params, [tokens], "auto", grid=grid, **heads)
    assert {smooth.site_key(r["path"], r["site"]): r["alpha"] for r in rep} == chosen
    np.testing.assert_allclose(logits(model, new, tokens), logits(model, params, tokens), rtol=2e-4, atol=2e-4)
    rules = ptq.scheme("w8a8", embeddings=False)
    ref = logits(model, params, tokens)

    def err(p):
        out = ptq_infer.apply_quantized(model, ptq.quantize_params(p, rules, fold_norms=False), tokens, backend="xla")
        return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))

    assert err(new) < 0.5 * err(params)
    assert "alpha" in smooth.describe(rep)
    with pytest.raises(ValueError, match="'auto'"):
        smooth.smooth(model, params, [tokens], "strong", **heads)
    with pytest.raises(ValueError, match="empty"):
        smooth.search_alphas(params, amax, samples, (), **heads)


def test_smoothing_factors_formula_and_bad_input():
    a = jnp.array([8.0, 1.0, 0.0, 2.0])
    w = jnp.array([0.5, 2.0, 1.0, 0.0])
    s = smooth.smoothing_factors(a, w, 0.75)
    np.testing.assert_allclose(s[:2], [8.0**0.75 / 0.5**0.25, 1.0 / 2.0**0.25], rtol=1e-6)
    np.testing.assert_array_equal(s[2:], [1.0, 1.0])  # a dead channel keeps s = 1
    np.testing.assert_allclose(smooth.smoothing_factors(a[:2], w[:2], 1.0), a[:2])
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            smooth.smoothing_factors(a, w, bad)
    with pytest.raises(ValueError, match="shape"):
        smooth.smoothing_factors(a, w[:3], 0.5)


@pytest.mark.parametrize("alpha", ["1.5", "-0.2", "nan", "strong"])
def test_cli_rejects_alpha_outside_unit_interval(ckpt, tmp_path, capsys, alpha):  # noqa: F811
    out = tmp_path / "q"
    assert quantize.run(["--ckpt", str(ckpt), "--out", str(out), "--smooth", alpha, *SMALL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --smooth") and "[0, 1]" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("alpha", ["0.5", "auto"])
def test_cli_smooth_quantizes_the_smoothed_model(ckpt, tmp_path, capsys, alpha):  # noqa: F811
    """--smooth 0.5 / auto: the table is produced, the checkpoint holds unfolded (smoothed) norms, and the
    reloaded model is the evaluated one."""
    out = tmp_path / "q"
    rep = quantize.main(["--ckpt", str(ckpt), "--scheme", "w8a8", "--smooth", alpha, "--out", str(out), *SMALL])
    printed = capsys.readouterr().out
    assert "smoothing: 6 sites (alpha" in printed  # 2 layers x (norm->qkv, norm->fc1, v->out)
    if alpha == "0.5":
        assert "smoothing: 6 sites (alpha 0.5)" in printed
    assert rep["rows"][-1]["ppl"] == rep["rows"][2]["ppl"] and all(r["ppl"] > 1 for r in rep["rows"])
    from jq8.ptq import checkpoint as qcheckpoint

    qp, _ = qcheckpoint.load_quantized(out)
    assert qp.folded_norms == ()
    assert not np.allclose(np.asarray(qp.params["h_0"]["attn"]["norm"]["scale"], np.float32), 1.0)
