"""train.py under bad input: every failure is one ``error:`` line naming the input and the fix, exit status 2,
and nothing is written (no run directory, no rewritten config.json). Plus --help and jq8.cli itself."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

import train
from configs.base import TrainConfig, field_docs, first_sentence, valid_keys
from jq8 import cli
from models.config import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--config",
    os.path.join(REPO, "configs", "tiny.py"),
    "--dataset=lee",
    "--tokenizer=bytes",
    "--model.d_model=64",
    "--model.num_heads=2",
    "--model.num_layers=1",
    "--batch_size=8",
    "--seq_len=32",
    "--steps=2",
    "--progress=false",
]


def refused(capsys, argv: list[str], *needles: str) -> str:
    """Runs train.py's command line; asserts exit status 2 and one ``error:`` line holding every needle."""
    assert train.run(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--policy=int9"], ["--policy=int9", "unknown policy name", "int8-row"]),
        (["--policy=jetfire-int8:granularity=tile"], ["--policy=jetfire-int8:granularity=tile", "granularity"]),
        (["--backend=gpu"], ["--backend='gpu'", "auto, pallas or xla"]),
        (["--policy=jetfire-int8:block=48"], ["powers of two", "--policy=jetfire-int8:block=32"]),
        # The GPU kernels refuse 16-wide K groups: the hint names a block they take, as a CLI flag.
        (["--policy=jetfire-int8:block=16", "--backend=pallas"], ["at least 32", "--policy=jetfire-int8:block=32"]),
        # d_model=48 under 32x32 blocks (jnp references on CPU): a block dividing every width works.
        (["--policy=jetfire-int8", "--model.d_model=48"], ["--model.d_model=48", "--policy=jetfire-int8:block=16"]),
        # ... and on the kernels, whose blocks are >= 32, a d_model that is a multiple of the block.
        (["--policy=jetfire-int8", "--model.d_model=48", "--backend=pallas"], ["--model.d_model=64"]),
        # Per-role tiles: the hint scales every tile, keeping per-token (1 x G) tiles per token.
        (["--policy=jetfire-int8-g128", "--model.d_model=64", "--backend=pallas"],
         ["block 128", "--policy=jetfire-int8:block=64,act_block=1x64,grad_block=1x64"]),
        (["--policy=jetfire-int8:act_block=1x16", "--backend=pallas"], ["wide along K", "act_block=1x32"]),
        (["--seq_len=2000"], ["--seq_len=2000", "--model.max_seq_len=64", "--seq_len=64"]),
        (["--num_devices=64"], ["--num_devices=64", "--num_devices=1"]),
        (["--log_every=0"], ["--log_every=0", ">= 1"]),
        (["--lr=nan"], ["--lr=nan"]),
        (["--beta2=1.5"], ["--beta2=1.5", "[0, 1)"]),
        (["--ckpt_every=-2"], ["--ckpt_every=-2"]),
        (["--sharding=zero3"], ["--sharding=zero3", "fsdp or dp"]),
        (["--data_parallel=ddp"], ["--data_parallel=ddp"]),
        (["--model.num_heads=3"], ["--model.num_heads=3", "not divisible"]),
        (["--model.family=bert"], ["--model.family=bert", "'gpt' or 'llama'"]),
        (["--model.vocab_size=100"], ["--model.vocab_size=100", "--model.vocab_size=0"]),
        (["--steps=ten"], ["--steps='ten'", "int"]),
        (["--resume=maybe"], ["--resume='maybe'", "true/false"]),
        (["--learning_rate=1"], ["unknown config key 'learning_rate'", "did you mean --lr?", "valid keys"]),
        (["steps=3"], ["--key=value"]),
        (["--dataset=/no/such/corpus.txt"], ["--dataset=/no/such/corpus.txt"]),
        (["--tokenizer=/no/such/tokenizer.json"], ["--tokenizer=/no/such/tokenizer.json"]),
        (["--seq_len=64", "--model.max_seq_len=1000000", "--dataset={tiny_text}"], ["split", "--seq_len"]),
        (["--dataset={random_bytes}"], ["--dataset=", "random.bin", "not UTF-8 text"]),
    ],
)
def test_bad_config_is_one_line_and_writes_nothing(tmp_path, capsys, args, needles):
    tiny_text = tmp_path / "tiny.txt"
    tiny_text.write_text("A few words.\n\nToo short to train on.\n")
    random_bytes = tmp_path / "random.bin"
    random_bytes.write_bytes(np.random.default_rng(0).bytes(1 << 16))
    run_dir = tmp_path / "run"
    args = [a.format(tiny_text=tiny_text, random_bytes=random_bytes) for a in args]
    refused(capsys, [*TINY, *args, f"--run_dir={run_dir}"], *needles)
    assert not run_dir.exists()


def test_batch_not_divisible_by_devices(tmp_path, capsys, monkeypatch):
    import jax

    cpu = jax.devices()[0]
    monkeypatch.setattr(train.jax, "devices", lambda: [cpu, cpu])  # check_devices reads only the count
    refused(capsys, [*TINY, "--batch_size=7", f"--run_dir={tmp_path / 'r'}"], "--batch_size=7", "--batch_size=8")
    assert not (tmp_path / "r").exists()


def test_config_file_errors(tmp_path, capsys):
    run = f"--run_dir={tmp_path / 'run'}"
    refused(capsys, [run], "no --config")
    refused(capsys, ["--config", run], "--config needs a path")
    refused(capsys, ["--config", str(tmp_path / "missing.py"), run], "missing.py", "no such file")
    refused(capsys, ["--config", str(tmp_path), run], "not a Python file")
    (tmp_path / "broken.py").write_text("def get_config(:\n")
    refused(capsys, ["--config", str(tmp_path / "broken.py"), run], "broken.py", "SyntaxError")
    (tmp_path / "none.py").write_text("x = 1\n")
    refused(capsys, ["--config", str(tmp_path / "none.py"), run], "get_config() returning a TrainConfig")
    assert not (tmp_path / "run").exists()


def test_run_dir_that_is_not_a_run_is_refused_and_left_alone(tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    refused(capsys, [*TINY, f"--run_dir={a_file}"], "is a file")
    refused(capsys, [*TINY, f"--run_dir={a_file / 'run'}"], "is a file")
    quantized = tmp_path / "q"
    quantized.mkdir()
    (quantized / "manifest.json").write_text("{}")
    refused(capsys, [*TINY, f"--run_dir={quantized}"], "quantized checkpoint")
    foreign = tmp_path / "project"
    foreign.mkdir()
    (foreign / "main.c").write_text("int main;")
    refused(capsys, [*TINY, f"--run_dir={foreign}"], "no train.py run")
    (foreign / "config.json").write_text('{"name": "not ours"}')
    refused(capsys, [*TINY, f"--run_dir={foreign}"], "config.json is not a train.py config")
    assert sorted(os.listdir(foreign)) == ["config.json", "main.c"]
    assert (foreign / "config.json").read_text() == '{"name": "not ours"}' and a_file.read_text() == "mine"
    assert sorted(os.listdir(quantized)) == ["manifest.json"]


def test_failed_start_never_rewrites_an_existing_config(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    saved = json.dumps({**TrainConfig().to_dict(), "policy": "bf16"}, indent=2)
    (run / "config.json").write_text(saved)
    for bad in ("--policy=int9", "--policy=jetfire-int8:granularity=tile", "--seq_len=4096"):
        refused(capsys, [*TINY, bad, f"--run_dir={run}"], bad.split("=")[0])
        assert (run / "config.json").read_text() == saved and os.listdir(run) == ["config.json"]


def test_resume_false_on_a_run_with_checkpoints_is_refused_at_start(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / "100").mkdir(parents=True)
    (run / "checkpoints" / "200").mkdir()
    err = refused(capsys, [*TINY, "--resume=false", f"--run_dir={run}"], "--resume=false", "steps 100, 200")
    assert "new --run_dir" in err
    assert sorted(os.listdir(run)) == ["checkpoints"]


def test_missing_tensorboard_names_the_extra(tmp_path, capsys, monkeypatch):
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda n, *a: None if n == "tensorboardX" else real(n, *a))
    refused(capsys, [*TINY, "--tensorboard=true", f"--run_dir={tmp_path / 'r'}"], 'pip install "jq8[tensorboard]"')
    assert not (tmp_path / "r").exists()


def test_plot_errors(tmp_path, capsys, monkeypatch):
    from jq8.training import metrics

    w = metrics.MetricsWriter(str(tmp_path / "a"))
    w.write(1, loss=2.0)
    w.close()
    assert train.run(["plot", str(tmp_path / "nothing")]) == cli.EXIT_USAGE
    assert "no metrics.jsonl" in capsys.readouterr().err
    assert train.run(["plot", str(tmp_path / "a"), "--metric", "val_bpb"]) == cli.EXIT_USAGE
    assert "no 'val_bpb' rows" in capsys.readouterr().err
    assert train.run(["plot", str(tmp_path / "a"), "--out", str(tmp_path / "no" / "x.png")]) == cli.EXIT_USAGE
    assert "--out" in capsys.readouterr().err
    assert train.run(["plot", str(tmp_path / "a"), "--bogus"]) == cli.EXIT_USAGE
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda n, *a: None if n == "matplotlib" else real(n, *a))
    assert train.run(["plot", str(tmp_path / "a")]) == cli.EXIT_USAGE
    assert 'pip install "jq8[plot]"' in capsys.readouterr().err


def test_help_lists_every_key_with_type_default_and_meaning(capsys):
    assert train.run(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python train.py --config")
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  --")}
    assert sorted(lines) == sorted(f"--{k}={_type(k)}" for k in valid_keys())
    docs = field_docs(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name != "model":
            line = lines[f"--{f.name}={f.type}"]
            assert docs[f.name] and repr(getattr(TrainConfig(), f.name)).strip("'").lower() in line.lower()
            assert first_sentence(docs[f.name])[:20] in line, (f.name, line)
    assert "ModelConfig" in docs["model"] and "--model.d_model=int" in lines
    model_docs = field_docs(ModelConfig)
    for f in dataclasses.fields(ModelConfig):  # every model key has its docstring line too
        key = f"model.{f.name}"
        assert model_docs.get(f.name) and first_sentence(model_docs[f.name]) in lines[f"--{key}={_type(key)}"], key
    # With a config file, its values are shown.
    assert train.run(["--config", os.path.join(REPO, "configs", "tiny.py"), "-h"]) == 0
    assert "runs/tiny" in capsys.readouterr().out


def _type(key: str) -> str:
    cls, name = (ModelConfig, key[6:]) if key.startswith("model.") else (TrainConfig, key)
    return next(f.type for f in dataclasses.fields(cls) if f.name == name).replace(" ", "")


def test_cli_run_maps_exceptions_to_exit_statuses(capsys):
    def boom(exc):
        def main(argv):
            raise exc

        return main

    assert cli.run(boom(cli.UsageError("bad\n  input"))) == 2 and capsys.readouterr().err == "error: bad input\n"
    assert cli.run(boom(KeyboardInterrupt())) == 130 and "interrupted" in capsys.readouterr().err
    assert cli.run(boom(cli.Interrupted("kept step 3"))) == 130 and capsys.readouterr().err == "kept step 3\n"
    assert cli.run(boom(RuntimeError("x")), failures=(RuntimeError,)) == 1
    with pytest.raises(ZeroDivisionError):  # anything unexpected keeps its traceback
        cli.run(boom(ZeroDivisionError()))
    assert cli.run(lambda argv: None) == 0
