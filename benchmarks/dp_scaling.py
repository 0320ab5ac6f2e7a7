"""Data-parallel scaling: the same training run on 1 and on N devices, per policy, then a restore on 1 device.

    PYTHONPATH=. python3 benchmarks/dp_scaling.py --config configs/gpt2_124m.py --out /tmp/dp \\
        --policies bf16 int8-row --devices 1 2 --steps=150   # 2 GPUs
    XLA_FLAGS=--xla_force_host_platform_device_count=2 PYTHONPATH=. python3 benchmarks/dp_scaling.py \\
        --config configs/tiny.py --out /tmp/dp --quick   # CPU smoke on two host devices

Everything after the known flags goes to every ``train.py`` run as ``--key=value`` overrides: the runs of
one policy differ only by ``--num_devices`` (same global batch, seed, data order and steps). Each run is its
own process. The widest run also checkpoints at ``--restore-step``; that checkpoint is then resumed on one
device in a fresh run directory and trained to the end, so its losses can be compared with the run that
wrote it. Reports, per policy: the largest difference of the logged training loss (and of the validation
loss) between device counts, tokens/s and its scaling, INT8 vs bf16 at each device count, and the
restored run's largest loss difference. Writes ``<out>/dp_scaling.json`` and ``<out>/loss_<policy>.png``
(copied into ``$OUT`` when set).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jq8.training import metrics  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(config: str, run_dir: str, overrides: list[str]) -> None:
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config", config, f"--run_dir={run_dir}",
           "--progress=false", *overrides]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def losses(run_dir: str, metric: str = "loss") -> dict[int, float]:
    steps, values = metrics.series(metrics.read_metrics(run_dir), metric)
    return dict(zip(steps, values))


def max_diff(a: dict[int, float], b: dict[int, float], after: int = 0) -> dict:
    """Largest |a - b| (and relative to b) over the steps both logged after ``after``."""
    common = sorted(s for s in a.keys() & b.keys() if s > after)
    if not common:
        return {"steps": 0, "max_abs": None, "max_rel": None}
    return {"steps": len(common), "max_abs": max(abs(a[s] - b[s]) for s in common),
            "max_rel": max(abs(a[s] - b[s]) / abs(b[s]) for s in common)}


def tokens_per_s(run_dir: str) -> float | None:
    """Median tokens/s over the last three quarters of the logged intervals (as loss_parity.py)."""
    speeds = metrics.series(metrics.read_metrics(run_dir), "tokens_per_s")[1]
    return statistics.median(speeds[len(speeds) // 4:]) if speeds else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--policies", nargs="+", default=["bf16", "jetfire-int8"])
    ap.add_argument("--devices", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--restore-step", type=int, default=0, help="checkpoint step of the widest run to resume "
                    "on 1 device (0: half of --steps; -1: no restore)")
    ap.add_argument("--quick", action="store_true", help="CPU smoke: a tiny model, 4 steps")
    args, overrides = ap.parse_known_args()
    if args.quick:
        overrides = ["--dataset=lee", "--tokenizer=bytes", "--model.d_model=64", "--model.num_heads=2",
                     "--model.num_layers=1", "--batch_size=8", "--seq_len=32", "--steps=4",
                     "--warmup_steps=1", "--eval_every=2", "--eval_batches=1", "--log_every=1", *overrides]
    steps = next((int(o.split("=", 1)[1]) for o in reversed(overrides) if o.startswith("--steps=")), None)
    if steps is None:
        raise SystemExit("pass --steps=N: the restore step and the comparison need it")
    restore = steps // 2 if args.restore_step == 0 else args.restore_step
    wide = max(args.devices)
    os.makedirs(args.out, exist_ok=True)
    summary: dict = {"steps": steps, "overrides": overrides, "policies": {}}
    for policy in args.policies:
        runs = {}
        for n in args.devices:
            run = os.path.join(args.out, f"{policy}_{n}dev")
            shutil.rmtree(run, ignore_errors=True)
            ckpt = [f"--ckpt_every={restore}", "--keep_checkpoints=10"] if n == wide and restore > 0 else \
                ["--ckpt_every=-1"]
            train(args.config, run, [f"--policy={policy}", f"--num_devices={n}", *overrides, *ckpt])
            runs[n] = run
        row: dict = {"tokens_per_s": {n: tokens_per_s(r) for n, r in runs.items()}}
        base = runs[min(args.devices)]
        for n, r in runs.items():
            if r != base:
                row[f"loss_diff_{n}_vs_{min(args.devices)}"] = max_diff(losses(r), losses(base))
                row[f"val_diff_{n}_vs_{min(args.devices)}"] = max_diff(losses(r, "val_loss"),
                                                                       losses(base, "val_loss"))
                t1, tn = row["tokens_per_s"][min(args.devices)], row["tokens_per_s"][n]
                row[f"scaling_{n}"] = tn / t1 if t1 and tn else None
        row["final_val_loss"] = {n: (list(losses(r, "val_loss").values()) or [None])[-1]
                                 for n, r in runs.items()}
        if restore > 0:
            # The widest run's checkpoint at `restore`, alone in a fresh run directory, resumed on 1 device.
            src = os.path.join(runs[wide], "checkpoints", str(restore))
            run = os.path.join(args.out, f"{policy}_restored_{wide}to1dev")
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(src, os.path.join(run, "checkpoints", str(restore)))
            train(args.config, run, [f"--policy={policy}", "--num_devices=1", *overrides, "--ckpt_every=-1"])
            row["restored_from_step"] = restore
            row[f"restored_loss_diff_vs_{wide}dev"] = max_diff(losses(run), losses(runs[wide]), after=restore)
            row[f"restored_loss_diff_vs_{min(args.devices)}dev"] = max_diff(losses(run), losses(base),
                                                                            after=restore)
            runs["restored"] = run
        labels = [f"{policy}, {n} device(s)" if n != "restored" else f"{policy}, {wide} -> 1 device at step "
                  f"{restore}" for n in runs]
        try:
            row["plot"] = metrics.plot(list(runs.values()), os.path.join(args.out, f"loss_{policy}.png"),
                                       labels=labels)
        except Exception as e:  # matplotlib missing: the numbers still stand
            print(f"no plot: {e}")
        summary["policies"][policy] = row
    if len(args.policies) > 1:
        a, b = args.policies[:2]
        summary["speedup_vs_" + a] = {
            n: (summary["policies"][b]["tokens_per_s"][n] / summary["policies"][a]["tokens_per_s"][n]
                if summary["policies"][a]["tokens_per_s"][n] else None) for n in args.devices}
    path = os.path.join(args.out, "dp_scaling.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))
    out = os.environ.get("OUT")
    if out and os.path.abspath(out) != os.path.abspath(args.out):
        for name in os.listdir(args.out):
            if name.endswith((".json", ".png")):
                shutil.copy(os.path.join(args.out, name), out)
        for run in (d for d in os.listdir(args.out) if os.path.isdir(os.path.join(args.out, d))):
            src = os.path.join(args.out, run, "metrics.jsonl")
            if os.path.exists(src):
                shutil.copy(src, os.path.join(out, f"metrics_{run}.jsonl"))


if __name__ == "__main__":
    main()
