"""INT8 embedding tables and LM heads in ZeroQuant PTQ: lookup, tied head GEMM, schemes, checkpoints."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_lkd import tiny_llama
from test_ptq import run_int8, tiny_gpt

from jq8 import ptq
from jq8.ptq import checkpoint as qcheckpoint
from jq8.ptq import infer as ptq_infer
from jq8.quant import QuantSpec, fake_quantize

EMBED_RULE = ptq.QuantRule(".*", 8, kind="embedding")


class TiedLM(nn.Module):
    """ids (B, T) -> embedding rows, and x (B, T, D) -> tied head logits: both nn.Embed methods."""

    vocab: int
    d: int

    @nn.compact
    def __call__(self, ids: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        emb = nn.Embed(self.vocab, self.d, name="emb")
        return emb(ids), emb.attend(x)


def tied_lm(vocab: int, d: int, seed: int = 0):
    """(model, params) with a random table whose rows have very different ranges (per-row scales matter)."""
    model = TiedLM(vocab, d)
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    table = jax.random.normal(k1, (vocab, d)) * jnp.exp(jax.random.normal(k2, (vocab, 1)))
    return model, {"emb": {"embedding": table}}


def rel_rms(a, b) -> float:
    return float(jnp.sqrt(jnp.mean((a - b) ** 2)) / jnp.sqrt(jnp.mean(b**2)))


def fp_logits(model, params, tokens):
    return jax.jit(model.apply)({"params": params}, tokens)


# ----------------------------------------------------------------------------------- lookup, head


def test_table_is_int8_per_row_and_lookup_equals_dequantized_rows():
    model, params = tied_lm(vocab=37, d=24, seed=1)
    qp = ptq.quantize_params(params, [EMBED_RULE])
    q = qp.embeddings["emb"]
    assert q.values.dtype == jnp.int8 and q.values.shape == (37, 24) and q.scale.shape == (37, 1)
    np.testing.assert_array_equal(jnp.max(jnp.abs(q.values), axis=1), 127)  # each row uses its full range
    assert qp.params == {"emb": {}}  # the float table is gone
    ids = jax.random.randint(jax.random.PRNGKey(2), (3, 11), 0, 37)
    rows, _ = jax.jit(lambda p, i: ptq_infer.apply_quantized(model, p, i, jnp.ones((1, 24))))(qp, ids)
    table = q.dequantize()
    np.testing.assert_array_equal(rows, table[ids])  # exact: the same codes x scale products
    np.testing.assert_array_equal(ptq_infer.embedding_lookup(q, ids), table[ids])
    step = q.scale[ids]  # and within half a quantization step of the float rows
    assert bool(jnp.all(jnp.abs(rows - params["emb"]["embedding"][ids]) <= 0.5 * step + 1e-7))


@pytest.mark.parametrize("m", [1, 7])  # decode (one token) and a ragged prefill
def test_tied_head_is_w8a8_gemm_close_to_float(m):
    model, params = tied_lm(vocab=53, d=40, seed=3)  # ragged against every kernel tile
    qp = ptq.quantize_params(params, [EMBED_RULE])
    x = jax.random.normal(jax.random.PRNGKey(4), (1, m, 40))
    ids = jnp.zeros((1, 1), jnp.int32)
    fp = model.apply({"params": params}, ids, x)[1]
    outs = {
        b: jax.jit(lambda p, i, x, b=b: ptq_infer.apply_quantized(model, p, i, x, backend=b))(qp, ids, x)[1]
        for b in ("xla", "pallas")
    }
    # The same integer products as fake-quant: per-token INT8 x @ dequantized per-row table.T.
    sim = fake_quantize(x.reshape(m, 40), QuantSpec.per_row(8)) @ qp.embeddings["emb"].dequantize().T
    for b, got in outs.items():
        assert got.shape == (1, m, 53) and got.dtype == jnp.float32, b
        np.testing.assert_allclose(got[0], sim, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(sim))))
        assert 0 < rel_rms(got, fp) < 0.02, (b, rel_rms(got, fp))  # INT8 x INT8: ~1% relative error
    np.testing.assert_allclose(outs["pallas"], outs["xla"], rtol=1e-5, atol=1e-5)


def test_int4_grouped_table_lookup_exact_and_head_matches_simulation():
    model, params = tied_lm(vocab=31, d=72, seed=17)  # D=72: the last 32-column group is partial
    rule = ptq.QuantRule(".*", 4, 32, "contraction", kind="embedding")
    qp = ptq.quantize_params(params, [rule])
    q = qp.embeddings["emb"]
    # 72 codes per row: two whole 64-code INT4 blocks (jq8.quant.int4_width)
    assert q.values.dtype == jnp.uint8 and q.values.shape == (31, 64) and q.scale.shape == (31, 3)
    ids = jax.random.randint(jax.random.PRNGKey(18), (2, 9), 0, 31)
    x = jax.random.normal(jax.random.PRNGKey(19), (2, 5, 72))
    sim = fake_quantize(x.reshape(10, 72), QuantSpec.per_row(8)) @ q.dequantize().T
    outs = {}
    for b in ("xla", "pallas"):
        rows, outs[b] = jax.jit(lambda p, i, x, b=b: ptq_infer.apply_quantized(model, p, i, x, backend=b))(
            qp, ids, x
        )
        np.testing.assert_array_equal(rows, q.dequantize()[ids])
        np.testing.assert_allclose(outs[b].reshape(10, 31), sim, rtol=1e-5, atol=1e-5 * float(jnp.max(sim)))
    np.testing.assert_allclose(outs["pallas"], outs["xla"], rtol=1e-5, atol=1e-5)
    # A scheme option: INT4 tables in int4_group K-groups (half the code bytes of INT8, more scales).
    _, gparams, _ = tiny_gpt(layers=1, d=64, heads=2, vocab=101, seq=16, seed=20)
    q4 = ptq.quantize_params(gparams, ptq.scheme("w4/8-a8", int4_group=16, embedding_bits=4))
    q8 = ptq.quantize_params(gparams, ptq.scheme("w4/8-a8", int4_group=16, embedding_bits=8))
    assert q4.embeddings["wte"].spec.bits == 4 and q4.embeddings["wte"].scale.shape == (101, 4)
    assert q4.embeddings["wte"].nbytes == 101 * 64 // 2 + 4 * 101 * 4
    assert q8.embeddings["wte"].nbytes == 101 * 64 + 4 * 101


def test_weight_only_head_dequantizes_the_table():
    model, params = tied_lm(vocab=29, d=16, seed=5)
    rule = dataclasses.replace(EMBED_RULE, act_mode="none")
    qp = ptq.quantize_params(params, [rule])
    x = jax.random.normal(jax.random.PRNGKey(6), (2, 3, 16))
    got = ptq_infer.apply_quantized(model, qp, jnp.zeros((2, 3), jnp.int32), x)[1]
    np.testing.assert_allclose(got, x @ qp.embeddings["emb"].dequantize().T, rtol=1e-5, atol=1e-5)


def test_gpt_head_runs_an_int8_dot_over_the_vocabulary():
    model, params, tokens = tiny_gpt(layers=1, d=32, heads=2, vocab=101, seq=16, seed=7)
    qp = ptq.quantize_params(params, ptq.scheme("w8a8"))
    text = (
        jax.jit(lambda q, t: ptq_infer.apply_quantized(model, q, t, backend="xla"))
        .lower(qp, tokens)
        .as_text()
    )
    head_dots = [ln for ln in text.splitlines() if "dot_general" in ln and "xi8" in ln and "x101xi32" in ln]
    assert head_dots, "the tied head is not an int8 x int8 -> int32 dot"


# ------------------------------------------------------------------------------ schemes, models


@pytest.mark.parametrize("name", ["w8a8", "w4/8-a8", "w8a16"])
def test_gpt_schemes_quantize_tables_by_default(name):
    model, params, tokens = tiny_gpt(layers=1, d=32, heads=2, vocab=101, seq=16, seed=8)
    fp = fp_logits(model, params, tokens)
    qp = ptq.quantize_params(params, ptq.scheme(name, int4_group=32, embedding_bits=8))
    assert sorted(qp.embeddings) == ["wpe", "wte"] and "lm_head" not in qp.weights
    assert qp.rule_for("wte").act_mode == ("none" if name == "w8a16" else "token")
    qf = ptq.quantize_params(params, ptq.scheme(name, int4_group=32, embeddings=False))
    assert qf.embeddings == {} and qf.params["wte"]["embedding"].shape == (101, 32)
    e_q, e_f = rel_rms(run_int8(model, qp, tokens), fp), rel_rms(run_int8(model, qf, tokens), fp)
    assert 0 < e_q < (0.2 if "4" in name else 0.03) and e_q < 2 * e_f + 0.01, (e_q, e_f)
    rq, rf = ptq.bits_report(qp, "float16"), ptq.bits_report(qf, "float16")
    assert rq["fp16_total_bytes"] == rf["fp16_total_bytes"]  # the same model counted
    n_table = (101 + 16) * 32
    # fp16 -> int8 codes + one f32 scale per row
    assert rf["total_bytes"] - rq["total_bytes"] == 2 * n_table - n_table - 4 * (101 + 16)
    wte = next(lay for lay in rq["layers"] if lay["path"] == "wte")
    assert wte["shape"] == (101, 32) and wte["bits_per_weight"] == pytest.approx(8 + 32 / 32)


@pytest.mark.parametrize("name,bits", [("w8a8", 8), ("w8a16", 8), ("w4/8-a8", 4), ("w4a16", 4)])
def test_default_table_bits_follow_the_scheme(name, bits):
    # The INT4 schemes are the compact ones: their tables default to INT4 K-groups.
    rules = [r for r in ptq.scheme(name, int4_group=32) if r.kind == "embedding"]
    assert rules and all(r.weight_bits == bits for r in rules)
    assert all(r.weight_bits == 8 for r in ptq.scheme(name, embedding_bits=8) if r.kind == "embedding")


def test_static_baseline_keeps_tables_float():
    _, params, _ = tiny_gpt(layers=1, d=32, heads=2, vocab=61, seq=8, seed=9)
    assert ptq.quantize_params(params, ptq.scheme("static-w8a8")).embeddings == {}


def test_llama_untied_head_is_an_int8_dense_and_table_int8():
    model, params = tiny_llama(d=32, heads=2, vocab=89, seq=16, seed=10)
    tokens = jax.random.randint(jax.random.PRNGKey(11), (2, 13), 0, 89)
    qp = ptq.quantize_params(params, ptq.scheme("w4/8-a8", int4_group=16, embedding_bits=8))
    assert list(qp.embeddings) == ["wte"] and qp.rule_for("lm_head").weight_bits == 8
    assert qp.weights["lm_head"].shape == (89, 32) and qp.weights["lm_head"].scale.shape == (89, 1)
    fp = fp_logits(model, params, tokens)
    got = run_int8(model, qp, tokens)
    assert 0 < rel_rms(got, fp) < 0.2
    qf = ptq.quantize_params(params, ptq.scheme("w4/8-a8", int4_group=16, embeddings=False))
    assert qf.embeddings == {} and "lm_head" not in qf.weights
    assert ptq.bits_report(qp)["total_bytes"] < ptq.bits_report(qf)["total_bytes"]


def test_bert_tables_quantize_and_run():
    from test_bert import TINY, _random_hf_state

    from models import bert

    params = bert.convert_hf_bert(_random_hf_state(TINY, np.random.default_rng(12)), TINY)
    model = bert.BertModel(TINY)
    ids = jax.random.randint(jax.random.PRNGKey(13), (2, 9), 0, TINY.vocab_size)
    mask = jnp.ones((2, 9), jnp.int32).at[1, 6:].set(0)
    qp = ptq.quantize_params(params, ptq.scheme("w8a8"))
    assert sorted(qp.embeddings) == ["embeddings/position", "embeddings/token_type", "embeddings/word"]
    fp = jax.jit(model.apply)({"params": params}, ids, mask)
    got = jax.jit(lambda q, i, m: ptq_infer.apply_quantized(model, q, i, m))(qp, ids, mask)
    assert 0 < rel_rms(got, fp) < 0.05


# ------------------------------------------------------------------------------------------- rules


def test_embedding_rule_validation_and_optional_rules():
    with pytest.raises(ValueError, match="one scale per row"):
        ptq.QuantRule(".*", 8, 4, "rows", kind="embedding")
    with pytest.raises(ValueError, match="one scale per row"):
        ptq.QuantRule(".*", 8, act_mode="static", kind="embedding")
    with pytest.raises(ValueError, match="embedding_bits"):
        ptq.scheme("w8a8", embedding_bits=2)
    with pytest.raises(ValueError, match="kind"):
        ptq.QuantRule(".*", kind="table")
    _, params = tied_lm(vocab=11, d=8)
    with pytest.raises(ValueError, match="no embedding table"):
        ptq.quantize_params(params, [ptq.QuantRule("^nothing$", kind="embedding")])
    with pytest.raises(ValueError, match="no Dense layer"):
        ptq.quantize_params(params, [EMBED_RULE, ptq.QuantRule("lm_head")])
    qp = ptq.quantize_params(params, [EMBED_RULE, ptq.QuantRule("lm_head", optional=True)])
    assert list(qp.embeddings) == ["emb"] and qp.weights == {} and qp.paths == ()
    assert ptq.embedding_paths(params) == ["emb"] and ptq.dense_paths(params) == []
    restored = ptq.restore_kernels(qp)["emb"]["embedding"]
    np.testing.assert_array_equal(restored, qp.embeddings["emb"].dequantize())


# ------------------------------------------------------------------------------------- checkpoint


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_checkpoint_round_trip_and_smaller_on_disk(tmp_path, family):
    if family == "gpt":
        model, params, tokens = tiny_gpt(layers=1, d=64, heads=2, vocab=499, seq=16, seed=14)
    else:  # a vocabulary large enough that the tables, not the npz entry headers, dominate the size
        model, params = tiny_llama(d=64, heads=2, vocab=499, seq=16, seed=14)
        tokens = jax.random.randint(jax.random.PRNGKey(15), (2, 16), 0, 499)
    qp = ptq.quantize_params(params, ptq.scheme("w4/8-a8", int4_group=16))
    qf = ptq.quantize_params(params, ptq.scheme("w4/8-a8", int4_group=16, embeddings=False))
    dq = qcheckpoint.save_quantized(tmp_path / "q", qp, float_dtype="float16")
    df = qcheckpoint.save_quantized(tmp_path / "f", qf, float_dtype="float16")
    qp2, manifest = qcheckpoint.load_quantized(dq)
    assert manifest["format_version"] == qcheckpoint.FORMAT_VERSION and qp2.rules == qp.rules
    assert sorted(qp2.embeddings) == sorted(qp.embeddings) and qp2.embeddings
    for path, q in qp.embeddings.items():
        q2 = qp2.embeddings[path]
        assert q2.spec == q.spec and q2.shape == q.shape and q2.dtype == q.dtype
        np.testing.assert_array_equal(q2.values, q.values)
        np.testing.assert_array_equal(q2.scale, q.scale)
    stored = qcheckpoint.as_stored(qp, "float16")
    np.testing.assert_array_equal(run_int8(model, qp2, tokens), run_int8(model, stored, tokens))
    disk_q, disk_f = qcheckpoint.disk_bytes(dq), qcheckpoint.disk_bytes(df)
    rep = ptq.bits_report(qp, "float16")
    n_entries = 2 * (len(qp.weights) + len(qp.embeddings)) + len(jax.tree_util.tree_leaves(qp.params))
    assert rep["total_bytes"] <= disk_q <= rep["total_bytes"] + 1000 * n_entries + 24_000  # Orbax metadata
    # fp16 tables -> INT8 codes + per-row f32 scales: about half their bytes saved
    tables = sum(q.values.size for q in qp.embeddings.values())
    assert disk_f - disk_q > 0.8 * (2 * tables - tables), (disk_f, disk_q)
