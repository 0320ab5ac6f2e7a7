"""Loss parity: the same training run under several policies (bf16 first, then INT8 ones), one plot + summary.

    PYTHONPATH=. python3 benchmarks/loss_parity.py --config configs/gpt2_124m.py --out runs/parity \\
        --steps=1000 --batch_size=16                                   # H100 (see BENCHMARKS.md)
    PYTHONPATH=. python3 benchmarks/loss_parity.py --config configs/tiny.py --out /tmp/parity --steps=20

Everything after the known flags is passed to every ``train.py`` run as ``--key=value`` overrides; the runs
differ only by ``--policy`` (``--policies``: the baseline first; each other run is compared with it). Each
run is its own process so that the GPU's peak-memory counter is per run. Writes ``<out>/<policy>/metrics.jsonl``
(the policy spec with ``:=,`` as ``_``), ``<out>/loss.png``, ``<out>/val_loss.png`` and ``<out>/parity.json``
(final and best validation loss per policy, relative gap, tokens/s, peak memory), and
copies those into ``$OUT`` when it is set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jq8.training import metrics  # noqa: E402


def _child(config: str, run_dir: str, overrides: list[str], stats_path: str) -> None:
    """Runs train.py in this process and writes the device's peak memory and the state size to JSON."""
    import train

    result = train.main(["--config", config, f"--run_dir={run_dir}", *overrides])
    params = result["params"]
    param_bytes = sum(int(np.prod(p.shape)) * p.dtype.itemsize for p in jax.tree.leaves(params))
    stats = jax.devices()[0].memory_stats() or {}
    with open(stats_path, "w") as f:
        json.dump({"peak_bytes_in_use": stats.get("peak_bytes_in_use"), "param_bytes": param_bytes,
                   "device": jax.devices()[0].device_kind, "jax": jax.__version__}, f)


def dir_name(policy: str) -> str:
    """A file-name-safe form of a policy spec ("jetfire-int8:block=64" -> "jetfire-int8_block_64")."""
    return "".join(c if c.isalnum() or c in "-." else "_" for c in policy)


def stale_settings(run_dir: str, config: str, overrides: list[str], policy: str) -> list[str]:
    """The training settings (``--key``s besides model, policy and run_dir) in which the finished run under
    ``run_dir`` differs from what this comparison would train: a kept run must be the run it stands for."""
    import train

    want = json.loads(json.dumps(train.parse_args(
        ["--config", config, f"--run_dir={run_dir}", *overrides, f"--policy={policy}"]).to_dict()))
    with open(os.path.join(run_dir, "config.json")) as f:
        have = json.load(f)
    return sorted(k for k in want if k not in ("model", "policy", "run_dir") and have.get(k) != want[k])


def summarize(run_dir: str) -> dict:
    rows = metrics.read_metrics(run_dir)
    val = list(zip(*metrics.series(rows, "val_loss")))
    train_loss = metrics.series(rows, "loss")[1]
    speeds = metrics.series(rows, "tokens_per_s")[1]
    out = {
        "final_val_loss": val[-1][1] if val else None,
        "best_val_loss": min(v for _, v in val) if val else None,
        "best_val_step": min(val, key=lambda sv: sv[1])[0] if val else None,
        "final_train_loss": statistics.fmean(train_loss[-5:]) if train_loss else None,  # last 5 log points
        "tokens_per_s": statistics.median(speeds[len(speeds) // 4:]) if speeds else None,
    }
    stats_path = os.path.join(run_dir, "memory.json")
    if os.path.exists(stats_path):
        with open(stats_path) as f:
            out.update(json.load(f))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True, help="parent directory of the run directories")
    ap.add_argument("--policies", nargs="+", default=["bf16", "jetfire-int8"],
                    help="policy specs, the baseline first (at least two)")
    ap.add_argument("--keep-finished", action="store_true",
                    help="keep a policy's run that finished earlier under --out (it has memory.json) with the same "
                         "settings instead of training it again, so one comparison can span several sessions of a "
                         "time-limited machine (a finished run with other settings is an error)")
    ap.add_argument("--child", nargs=2, metavar=("RUN_DIR", "STATS"), help=argparse.SUPPRESS)
    args, overrides = ap.parse_known_args()
    if args.child:
        _child(args.config, args.child[0], overrides, args.child[1])
        return

    if len(args.policies) < 2 or len(set(args.policies)) != len(args.policies):
        ap.error(f"--policies needs at least two distinct policies (the baseline first), got {args.policies}")
    summary: dict = {"config": args.config, "overrides": overrides, "baseline": args.policies[0], "runs": {}}
    dirs = []
    for policy in args.policies:
        run_dir = os.path.join(args.out, dir_name(policy))
        dirs.append(run_dir)
        if args.keep_finished and os.path.exists(os.path.join(run_dir, "memory.json")):
            stale = stale_settings(run_dir, args.config, overrides, policy)
            if stale:
                ap.error(f"--keep-finished: the finished run {run_dir} differs in {', '.join(stale)}; remove it "
                         "or run without --keep-finished")
            print(f"= {policy}: finished run kept ({run_dir})", flush=True)
            summary["runs"][policy] = summarize(run_dir)
            continue
        if os.path.exists(run_dir):  # a parity run starts from step 0: never resume a stale run
            shutil.rmtree(run_dir)
        cmd = [sys.executable, os.path.abspath(__file__), "--config", args.config, "--out", args.out,
               "--child", run_dir, os.path.join(run_dir, "memory.json"), *overrides, f"--policy={policy}"]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        summary["runs"][policy] = summarize(run_dir)

    a = summary["runs"][args.policies[0]]
    for p in args.policies[1:]:
        b = summary["runs"][p]
        for key in ("final_val_loss", "best_val_loss", "final_train_loss"):
            if a[key] is not None and b[key] is not None:
                b[f"{key}_rel_gap"] = (b[key] - a[key]) / a[key]
        if a["tokens_per_s"] and b["tokens_per_s"]:
            b["speedup"] = b["tokens_per_s"] / a["tokens_per_s"]
        if a.get("peak_bytes_in_use") and b.get("peak_bytes_in_use"):
            b["peak_memory_ratio"] = a["peak_bytes_in_use"] / b["peak_bytes_in_use"]
    metrics.plot(dirs, os.path.join(args.out, "loss.png"), metric="loss", labels=args.policies)
    metrics.plot(dirs, os.path.join(args.out, "val_loss.png"), metric="val_loss", labels=args.policies)
    with open(os.path.join(args.out, "parity.json"), "w") as f:
        json.dump(summary, f, indent=1)

    width = max(14, *(len(p) for p in args.policies))
    print(f"\n{'policy':{width}s} {'final val':>10s} {'best val':>10s} {'@step':>6s} {'train':>8s} {'tok/s':>10s} "
          f"{'peak GiB':>9s} {'val gap':>8s} {'speed':>6s} {'mem x':>6s}")

    def fmt(v, spec):  # "-" right-aligned to the spec's width where there is no value
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-".rjust(int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 1))
        return format(v, spec)

    for p in args.policies:
        r = summary["runs"][p]
        peak = r.get("peak_bytes_in_use")
        print(f"{p:{width}s} {fmt(r['final_val_loss'], '10.4f')} {fmt(r['best_val_loss'], '10.4f')} "
              f"{fmt(r['best_val_step'], '6d')} {fmt(r['final_train_loss'], '8.4f')} "
              f"{fmt(r['tokens_per_s'], '10,.0f')} {fmt(peak and peak / 2**30, '9.2f')} "
              f"{fmt(r.get('final_val_loss_rel_gap'), '+8.2%')} {fmt(r.get('speedup'), '6.2f')} "
              f"{fmt(r.get('peak_memory_ratio'), '6.2f')}")
    print(f"val gap, speed, mem x: against {args.policies[0]} (final validation loss, tokens/s, peak memory)")

    dest = os.environ.get("OUT")
    if dest:
        os.makedirs(dest, exist_ok=True)
        for name in ("loss.png", "val_loss.png", "parity.json"):
            shutil.copy(os.path.join(args.out, name), os.path.join(dest, name))
        for p, d in zip(args.policies, dirs):
            shutil.copy(os.path.join(d, metrics.METRICS_FILE), os.path.join(dest, f"metrics_{dir_name(p)}.jsonl"))


if __name__ == "__main__":
    main()
