"""Checkpoints: round trip, shape-mismatch errors, partial saves, damaged steps set aside, resume ==
uninterrupted training (metrics included), and Ctrl-C."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train
from jq8 import cli
from jq8.training import checkpoint, metrics
from jq8.training.policy import Policy
from models.presets import build_model, preset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A very small model on the bundled news text with byte tokens: seconds per run on a CPU.
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
    "--eval_every=0",
    "--eval_batches=0",
    "--log_every=1",
    "--progress=false",
    "--warmup_steps=2",
]


def _random_tree(key, d=(24, 40)):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "dense": {"kernel": jax.random.normal(k1, d), "bias": jax.random.normal(k2, (d[1],))},
        "emb": {"embedding": jax.random.normal(k3, (37, d[0]))},
    }


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def test_round_trip_restores_every_leaf_and_meta(tmp_path):
    params = _random_tree(jax.random.key(1))
    opt = {"mu": _random_tree(jax.random.key(2)), "count": jnp.int32(7)}
    key = jax.random.key(5)
    with checkpoint.Checkpointer(tmp_path / "ck", keep=2) as ck:
        ck.save(3, params, opt, {"data_position": {"step": 3}, "rng": checkpoint.rng_to_json(key)})
        ck.wait()
        p2, o2, meta = ck.restore(_abstract(params), _abstract(opt))
    for a, b in zip(jax.tree.leaves((params, opt)), jax.tree.leaves((p2, o2))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert meta["step"] == 3 and meta["data_position"] == {"step": 3}
    k2 = checkpoint.rng_from_json(meta["rng"])
    np.testing.assert_array_equal(jax.random.normal(key, (4,)), jax.random.normal(k2, (4,)))
    # load_params reads params only, from the run folder or a step folder.
    p3, meta3 = checkpoint.load_params(tmp_path / "ck")
    p4, _ = checkpoint.load_params(tmp_path / "ck" / "3")
    os.symlink(tmp_path / "ck", tmp_path / "checkpoints")  # a run folder holding checkpoints/
    p5, _ = checkpoint.load_params(tmp_path)
    assert jax.tree.structure(p5) == jax.tree.structure(params)
    for a, b, c in zip(jax.tree.leaves(params), jax.tree.leaves(p3), jax.tree.leaves(p4)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    assert meta3["step"] == 3


def test_keep_last_n(tmp_path):
    params = _random_tree(jax.random.key(0))
    with checkpoint.Checkpointer(tmp_path, keep=2) as ck:
        for step in (1, 2, 3, 4):
            ck.save(step, params, {}, {})
        ck.wait()
        assert ck.all_steps() == [3, 4]
        assert ck.latest_step() == 4


def test_mismatched_shape_names_the_parameter(tmp_path):
    params = _random_tree(jax.random.key(0))
    with checkpoint.Checkpointer(tmp_path) as ck:
        ck.save(1, params, {}, {})
        ck.wait()
        other = _random_tree(jax.random.key(0), d=(24, 48))
        both = r"'dense/bias' has shape \(40,\).*expects \(48,\).*'dense/kernel' has shape \(24, 40\)"
        with pytest.raises(checkpoint.CheckpointMismatchError, match=both):
            ck.restore(_abstract(other), {})
        missing = {**params, "extra": {"kernel": jnp.ones((3, 3))}}
        with pytest.raises(checkpoint.CheckpointMismatchError, match="extra/kernel"):
            ck.restore(_abstract(missing), {})


def test_partial_save_is_ignored_and_cleaned(tmp_path):
    params = _random_tree(jax.random.key(0))
    with checkpoint.Checkpointer(tmp_path) as ck:
        ck.save(2, params, {}, {"data_position": {"step": 2}})
    # What a run killed mid-save leaves behind: a tmp folder with some of the files.
    partial = tmp_path / "4.orbax-checkpoint-tmp"  # the name Orbax 0.12 uses
    (partial / "params").mkdir(parents=True)
    (partial / "params" / "manifest.ocdbt").write_bytes(os.urandom(64))
    ck = checkpoint.Checkpointer(tmp_path)
    assert ck.latest_step() == 2 and ck.all_steps() == [2]
    assert ck.removed_partial == [partial.name] and not partial.exists()
    ck.close()


def _history_from_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_resume_after_kill_mid_save_reproduces_uninterrupted_losses(tmp_path):
    # A subprocess trains and dies (os._exit, no clean-up) right after starting the async save of step 6.
    # Up to that point it is an uninterrupted run: its logged losses are the reference.
    args = [*TINY, "--steps=8", "--ckpt_every=3", f"--run_dir={tmp_path}"]
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {REPO!r})
        import train
        from jq8.training import checkpoint
        orig = checkpoint.Checkpointer.save
        def save(self, step, *a, **k):
            orig(self, step, *a, **k)
            if step == 6:
                os._exit(17)
        checkpoint.Checkpointer.save = save
        train.main({args!r})
    """)
    # The same XLA settings as this process (tests/conftest.py): the losses are compared bit for bit.
    env = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": str(int(jax.config.read("jax_disable_most_optimizations")))}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 17, proc.stderr[-2000:]
    ck_dir = tmp_path / "checkpoints"
    complete = sorted(int(p.name) for p in ck_dir.iterdir() if p.name.isdigit())
    assert complete == [3], os.listdir(ck_dir)
    reference = _history_from_metrics(tmp_path)
    assert sorted(reference) == list(range(1, 7))

    resumed = train.main(args)
    assert resumed["start_step"] == 3
    got = dict(resumed["history"])
    assert sorted(got) == [4, 5, 6, 7, 8]
    for step in (4, 5, 6):
        assert got[step] == reference[step], (step, got[step], reference[step])
    assert sorted(int(p.name) for p in ck_dir.iterdir()) == [3, 6, 8]  # partial 6 replaced, no tmp left
    # metrics.jsonl reads as one run: the rows of steps 4-6 logged before the kill were dropped on resume.
    rows = [r for r in metrics.read_metrics(str(tmp_path)) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(r["loss"] == (reference[r["step"]] if r["step"] <= 3 else got[r["step"]]) for r in rows)


def test_resume_with_other_model_shape_is_a_clear_error(tmp_path):
    # A checkpoint of the d_model=64 model (zeros are enough: the shapes are checked before any value).
    run = tmp_path / "run"
    cfg = preset("gpt-tiny", num_layers=1, d_model=64, num_heads=2, vocab_size=320)
    model = build_model(cfg, Policy.from_name("bf16"))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    with checkpoint.Checkpointer(run / "checkpoints") as ck:
        ck.save(2, params, {"count": jnp.int32(2)}, {"data_position": {"step": 2}})
    mismatch = r"--run_dir=.*'h_0/.*/kernel' has shape \(64, .*expects \(96, "
    with pytest.raises(cli.UsageError, match=mismatch):
        train.main([*TINY, "--steps=4", "--model.d_model=96", "--model.num_heads=2", f"--run_dir={run}"])
    assert sorted(os.listdir(run)) == ["checkpoints"]  # no config.json or metrics written over it
    assert checkpoint.existing_steps(run / "checkpoints") == [2]  # and nothing set aside: it is not damaged
    shutil.rmtree(run)


def _damage(step_dir, how: str) -> None:
    """What a crash, a full disk or a careless copy leaves of a checkpoint step."""
    arrays = [os.path.join(d, f) for d, _, fs in os.walk(step_dir / "params" / "ocdbt.process_0") for f in fs]
    biggest = max(arrays, key=os.path.getsize)
    if how == "truncated array file":
        os.truncate(biggest, 50)
    elif how == "missing array file":
        os.remove(biggest)
    elif how == "missing metadata":
        shutil.rmtree(step_dir / "meta")
    elif how == "corrupt metadata":
        (step_dir / "meta" / "metadata").write_text("{not json")


@pytest.mark.parametrize("how", ["truncated array file", "missing array file", "missing metadata", "corrupt metadata"])
def test_damaged_steps_are_set_aside_and_the_newest_intact_one_restores(tmp_path, how):
    params = _random_tree(jax.random.key(0))
    with checkpoint.Checkpointer(tmp_path, async_save=False) as ck:
        for step in (1, 2, 3):
            ck.save(step, jax.tree.map(lambda x, s=step: x * s, params), {}, {"data_position": {"step": step}})
    _damage(tmp_path / "3", how)
    _damage(tmp_path / "2", "truncated array file")
    with checkpoint.Checkpointer(tmp_path) as ck:
        (p, _, meta), aside = ck.restore_newest(_abstract(params), {})
        assert meta["step"] == 1 and ck.all_steps() == [1]
    np.testing.assert_array_equal(np.asarray(p["dense"]["kernel"]), np.asarray(params["dense"]["kernel"]))
    assert [(s, os.path.basename(to)) for s, to, _ in aside] == [(3, "3.damaged-1"), (2, "2.damaged-1")]
    assert all(why and "\n" not in why and len(why) < 260 for _, _, why in aside), aside
    assert sorted(os.listdir(tmp_path)) == ["1", "2.damaged-1", "3.damaged-1"]  # set aside, not deleted
    # When no step restores, nothing is renamed: the error names the newest.
    _damage(tmp_path / "1", how)
    with checkpoint.Checkpointer(tmp_path) as ck:
        with pytest.raises(checkpoint.CheckpointDamagedError, match=r"no checkpoint in .* restores \(steps 1\)"):
            ck.restore_newest(_abstract(params), {})
    assert sorted(os.listdir(tmp_path)) == ["1", "2.damaged-1", "3.damaged-1"]


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """A tiny run of 8 steps stopped by Ctrl-C while reading step 6's batch: checkpoints 2 and 4 were saved
    on schedule, 5 by the interrupt. Returns (run dir, exit status, stderr)."""
    from jq8 import data

    run = tmp_path_factory.mktemp("interrupted") / "run"
    real_batch = data.TokenDataset.batch

    def batch(self, split, step, *a, **k):
        if step == 5:
            raise KeyboardInterrupt
        return real_batch(self, split, step, *a, **k)

    err = io.StringIO()
    data.TokenDataset.batch = batch
    try:
        with contextlib.redirect_stderr(err):
            status = train.run([*TINY, "--steps=8", "--ckpt_every=2", f"--run_dir={run}"])
    finally:
        data.TokenDataset.batch = real_batch
    return run, status, err.getvalue()


def test_ctrl_c_saves_the_step_and_names_the_checkpoint(interrupted_run):
    run, status, err = interrupted_run
    assert status == cli.EXIT_INTERRUPTED
    last = f"last checkpoint: {run}/checkpoints/5"
    assert err.strip() == f"interrupted after step 5 of 8; {last}. Run the same command to resume."
    assert checkpoint.existing_steps(run / "checkpoints") == [2, 4, 5]
    with checkpoint.Checkpointer(run / "checkpoints") as ck:  # a checkpoint like any other: resumable
        assert ck.read_meta(5)["data_position"]["step"] == 5
    assert [r["step"] for r in metrics.read_metrics(str(run))] == [1, 2, 3, 4, 5]


def test_resume_sets_a_damaged_latest_checkpoint_aside(interrupted_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(interrupted_run[0], run)
    _damage(run / "checkpoints" / "5", "truncated array file")
    out = train.main([*TINY, "--steps=6", "--ckpt_every=2", f"--run_dir={run}"])
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("resumed")]
    assert len(said) == 1 and "checkpoints/4 (step 4): checkpoint step 5 is damaged" in said[0], said
    assert "OUT_OF_RANGE" in said[0] and "5.damaged-1" in said[0]
    assert out["start_step"] == 4 and [s for s, _ in out["history"]] == [5, 6]
    assert sorted(os.listdir(run / "checkpoints")) == ["2", "4", "5.damaged-1", "6"]
    assert [r["step"] for r in metrics.read_metrics(str(run))] == [1, 2, 3, 4, 5, 6]  # one run: 5 redone
    # A run already past --steps trains nothing, says so, and keeps its config.json.
    config = (run / "config.json").read_text()
    assert train.main([*TINY, "--steps=3", f"--run_dir={run}"])["history"] == []
    assert "nothing to train: the run is at step 6 and --steps=3" in capsys.readouterr().out
    assert (run / "config.json").read_text() == config
    # quantize.py names the damaged step and an intact one to use instead.
    import quantize

    _damage(run / "checkpoints" / "6", "missing metadata")
    assert quantize.run(["--ckpt", str(run), "--out", str(tmp_path / "q")]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "checkpoints/6 cannot be read" in err and f"--ckpt {run}/checkpoints/4" in err, err
    assert not (tmp_path / "q").exists()
