"""benchmarks/loss_parity.py: runs every policy, compares with the first, and with --keep-finished reuses
only finished runs of the same settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "loss_parity.py")
TINY = ["--dataset=lee", "--tokenizer=bytes", "--model.d_model=32", "--model.num_heads=2", "--model.num_layers=1",
        "--batch_size=4", "--seq_len=16", "--steps=4", "--log_every=1", "--eval_every=2", "--eval_batches=1",
        "--ckpt_every=0", "--warmup_steps=1", "--progress=false"]


def run(out, *extra, check=True):
    cmd = [sys.executable, SCRIPT, "--config", os.path.join(ROOT, "configs", "tiny.py"), "--out", str(out),
           "--policies", "bf16", "int8-row", *extra, *TINY]
    # tiny programs: compile time dominates, as for the suite itself (conftest.py)
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    env.pop("OUT", None)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=check)


def test_parity_runs_then_keeps_only_matching_finished_runs(tmp_path):
    run(tmp_path)
    summary = json.loads((tmp_path / "parity.json").read_text())
    row = summary["runs"]["int8-row"]
    assert summary["baseline"] == "bf16" and row["final_val_loss"] > 0 and "final_val_loss_rel_gap" in row
    assert (tmp_path / "loss.png").stat().st_size > 0
    mtime = (tmp_path / "int8-row" / "metrics.jsonl").stat().st_mtime_ns

    kept = run(tmp_path, "--keep-finished")
    assert kept.stdout.count("finished run kept") == 2
    assert (tmp_path / "int8-row" / "metrics.jsonl").stat().st_mtime_ns == mtime  # not trained again
    assert json.loads((tmp_path / "parity.json").read_text())["runs"]["int8-row"] == row

    stale = run(tmp_path, "--keep-finished", "--lr=0.01", check=False)
    assert stale.returncode == 2 and "differs in lr" in stale.stderr
