"""train.py end to end on a tiny model: config errors, loss goes down, metrics, plot, NaN stop, LLaMA INT8."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest

import train
from configs.base import TrainConfig, apply_overrides, from_dict, load_config, valid_keys
from jq8.training import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")

TINY = [
    "--config",
    os.path.join(CONFIGS, "tiny.py"),
    "--dataset=lee",
    "--tokenizer=bytes",
    "--model.d_model=64",
    "--model.num_heads=2",
    "--model.num_layers=1",
    "--batch_size=8",
    "--seq_len=32",
    "--eval_batches=2",
    "--log_every=1",
    "--progress=false",
]


def test_unknown_key_lists_valid_keys():
    cfg = TrainConfig()
    listing = r"unknown config key 'lerning_rate'.*valid keys:.*\blr\b.*model\.d_model"
    with pytest.raises(ValueError, match=listing):
        apply_overrides(cfg, ["--lerning_rate=1e-3"])
    with pytest.raises(ValueError, match=r"did you mean --lr\?"):
        apply_overrides(cfg, ["--learning_rate=1e-3"])
    with pytest.raises(ValueError, match=r"did you mean --model.num_layers\?"):
        apply_overrides(cfg, ["--model.num_layer=2"])
    with pytest.raises(ValueError, match="unknown config key 'model.width'"):
        apply_overrides(cfg, ["--model.width=3"])
    with pytest.raises(ValueError, match="expected a value of type int"):
        apply_overrides(cfg, ["--steps=ten"])
    with pytest.raises(ValueError, match="--key=value"):
        apply_overrides(cfg, ["steps=10"])
    with pytest.raises(ValueError, match="unknown config key"):
        train.main([*TINY, "--bogus=1"])


def test_overrides_are_typed_and_nested():
    args = [
        "--steps=12",
        "--lr=3e-4",
        "--resume=false",
        "--policy=jetfire-int8",
        "--model.num_layers=5",
        "--model.family=llama",
        "--batch-size=4",
    ]
    cfg = apply_overrides(TrainConfig(), args)
    assert (cfg.steps, cfg.lr, cfg.resume, cfg.policy, cfg.batch_size) == (12, 3e-4, False, "jetfire-int8", 4)
    assert (cfg.model.num_layers, cfg.model.family) == (5, "llama")
    assert "model.num_layers" in valid_keys() and "steps" in valid_keys()


@pytest.mark.parametrize("name", ["tiny", "llama_tiny", "gpt2_124m", "gpt2_350m", "gpt_wide"])
def test_configs_load(name):
    cfg = load_config(os.path.join(CONFIGS, f"{name}.py"))
    assert isinstance(cfg, TrainConfig) and cfg.seq_len <= cfg.model.max_seq_len
    assert cfg.batch_size > 0 and cfg.steps > cfg.warmup_steps


def test_loss_decreases_and_metrics_are_written(tmp_path):
    run = tmp_path / "bf16"
    out = train.main(
        [
            *TINY,
            "--steps=40",
            "--lr=3e-3",
            "--warmup_steps=5",
            "--eval_every=20",
            "--ckpt_every=0",
            f"--run_dir={run}",
        ]
    )
    losses = [loss for _, loss in out["history"]]
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    # Byte-level text: a uniform guess costs log(320) = 5.77 nats; 40 steps must get well below it.
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, (first, last)
    rows = metrics.read_metrics(str(run))
    steps, vals = metrics.series(rows, "val_loss")
    assert steps == [20, 40] and vals[1] < vals[0]
    assert all(r["tokens_per_s"] > 0 for r in rows if "tokens_per_s" in r)
    assert (run / "config.json").exists() and (run / "checkpoints" / "40").is_dir()  # final save


def test_plot_draws_both_runs(tmp_path):
    pytest.importorskip("matplotlib")
    for name, loss in (("a", 3.0), ("b", 3.5)):
        w = metrics.MetricsWriter(str(tmp_path / name))
        for s in range(1, 6):
            w.write(s, loss=loss / s)
        w.close()
    out = tmp_path / "loss.png"
    train.main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)])
    assert out.stat().st_size > 1000


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    with pytest.raises(ImportError, match=r'pip install "jq8\[plot\]"'):
        metrics.plot([str(tmp_path)], str(tmp_path / "x.png"))


def test_nan_loss_stops_and_names_last_good_checkpoint(tmp_path):
    # lr=1e30 blows the weights up as soon as warm-up gives it a non-zero value.
    with pytest.raises(train.TrainingDiverged, match=r"at step \d+.*Last good checkpoint: .*checkpoints/1\b"):
        train.main(
            [
                *TINY,
                "--steps=10",
                "--lr=1e30",
                "--min_lr=1e30",
                "--warmup_steps=1",
                "--ckpt_every=1",
                "--eval_every=0",
                f"--run_dir={tmp_path}",
            ]
        )


def test_llama_int8_policy_trains(tmp_path):
    out = train.main(
        [
            "--config",
            os.path.join(CONFIGS, "llama_tiny.py"),
            *TINY[2:],
            "--policy=jetfire-int8",
            "--steps=12",
            "--lr=3e-3",
            "--warmup_steps=2",
            "--eval_every=0",
            "--ckpt_every=0",
            f"--run_dir={tmp_path}",
        ]
    )
    losses = [v for _, v in out["history"]]
    # the run records the name "jetfire-int8" stands for here (the CPU: the paper's 32x32 blocks)
    assert out["config"].model.family == "llama" and out["config"].policy == "jetfire-int8-32x32"
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] - 0.5, losses
    assert dataclasses.asdict(out["config"])["model"]["vocab_size"] % 64 == 0


def test_device_default_policy_fits_its_tiles_to_the_model(tmp_path, monkeypatch, capsys):
    from jq8.training import policy as policy_lib

    monkeypatch.setattr(policy_lib, "on_hopper", lambda: True)  # the sm_90 default, run on the references
    out = train.main([*TINY, "--model.d_model=96", "--model.num_heads=3", "--policy=jetfire-int8", "--steps=2",
                      "--warmup_steps=1", "--eval_every=0", "--ckpt_every=0", f"--run_dir={tmp_path}"])
    spec = "jetfire-int8-g128:block=32,act_block=1x32,grad_block=1x32"  # 96 = 3 x 32
    assert out["config"].policy == spec and json.load(open(tmp_path / "config.json"))["policy"] == spec
    assert "--policy=jetfire-int8 is " + spec in capsys.readouterr().out


def test_tensorboard_is_optional_with_a_clear_error(tmp_path):
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r'pip install "jq8\[tensorboard\]"'):
            metrics.MetricsWriter(str(tmp_path), tensorboard=True)
    else:
        w = metrics.MetricsWriter(str(tmp_path), tensorboard=True)
        w.write(1, loss=2.0)
        w.close()
        assert (tmp_path / "tb").is_dir()


def test_policy_spec_reaches_the_policy(tmp_path):
    cfg = apply_overrides(load_config(os.path.join(CONFIGS, "tiny.py")), ["--policy=jetfire-int8:block=64"])
    pol = train.make_policy(cfg)
    assert pol.granularity == "block" and pol.block == (64, 64) and pol.int8
    row = train.make_policy(dataclasses.replace(cfg, policy="int8-row"))
    assert row.granularity == "row" and row.int8
    assert train.make_policy(dataclasses.replace(cfg, policy="bf16")).int8 is False
    with pytest.raises(ValueError, match="granularity must be 'block' or 'row'"):
        train.make_policy(dataclasses.replace(cfg, policy="jetfire-int8:granularity=tile"))
    with pytest.raises(ValueError, match="--backend='gpu'"):
        train.make_policy(dataclasses.replace(cfg, backend="gpu"))
    old = {**cfg.to_dict(), "policy": "jetfire-int8", "int8_granularity": "row", "int8_block": 32,
           "use_kernels": "false"}  # a config.json written before the policy was one spec string
    del old["backend"]
    assert (from_dict(old).policy, from_dict(old).backend) == ("int8-row", "xla")
    out = train.main(
        [
            *TINY,
            "--policy=int8-row",
            "--steps=6",
            "--lr=3e-3",
            "--warmup_steps=1",
            "--eval_every=0",
            "--ckpt_every=0",
            f"--run_dir={tmp_path}",
        ]
    )
    losses = [v for _, v in out["history"]]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses


def test_data_parallel_mode_is_checked_and_auto_picks_shard_map_for_int8_kernels():
    import jax
    import numpy as np
    from jax.sharding import Mesh

    from jq8.training.policy import Policy

    one = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    with pytest.raises(ValueError, match="data_parallel must be auto/shard_map/gspmd"):
        train.use_shard_map(TrainConfig(data_parallel="ddp"), Policy.from_name("bf16"), one)
    assert not train.use_shard_map(TrainConfig(data_parallel="shard_map"), Policy.from_name("bf16"), one)

    class TwoDevices:  # use_shard_map reads only the mesh's size
        size = 2

    int8 = Policy.from_name("jetfire-int8", backend="pallas")
    assert train.use_shard_map(TrainConfig(), int8, TwoDevices())
    refs = Policy.from_name("jetfire-int8", backend="xla")  # jnp references: XLA partitions them
    assert not train.use_shard_map(TrainConfig(), refs, TwoDevices())
    assert not train.use_shard_map(TrainConfig(), Policy.from_name("bf16"), TwoDevices())
    assert not train.use_shard_map(TrainConfig(data_parallel="gspmd"), int8, TwoDevices())
    assert train.use_shard_map(TrainConfig(data_parallel="shard_map"), Policy.from_name("bf16"), TwoDevices())
