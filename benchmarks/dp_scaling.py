"""Data-parallel scaling: the same training run on 1 and on N devices, per policy and gradient-reduction
variant, restores across device counts, and (``--profile``) where one step's time goes.

    PYTHONPATH=. python3 benchmarks/dp_scaling.py --config configs/gpt2_124m.py --out /tmp/dp \\
        --policies bf16 int8-row --devices 1 2 --steps=150                                   # 2 GPUs
    PYTHONPATH=. python3 benchmarks/dp_scaling.py --config configs/gpt2_124m.py --out /tmp/dp \\
        --variant default= --variant b14=--grad_reduce_buckets=14 \\
        --variant b14_bf16=--grad_reduce_buckets=14,--grad_reduce_dtype=bfloat16 \\
        --profile /tmp/dp/trace --steps=150                                                  # options, traces
    PYTHONPATH=. python3 benchmarks/dp_scaling.py --config configs/tiny.py --out /tmp/dp --quick   # CPU smoke

Everything after the known flags goes to every ``train.py`` run as ``--key=value`` overrides: the runs of
one policy differ only by ``--num_devices`` and the variant's keys (same global batch, seed, data order and
steps). Each run is its own process. ``--variant NAME=--key=v,--key=v`` adds train.py keys to the runs on
more than one device (a one-device run has no reduction, so it runs once per policy); without ``--variant``
there is one, ``default``, with none.

With ``--restore-step`` (default: half of ``--steps``) the widest run of the first variant and the one-device
run also checkpoint there; each checkpoint is resumed on the other device count in a fresh run directory and
trained to the end, and its losses are compared with the run that wrote it. ``--repeat-baseline`` runs the
one-device run twice: the difference between the two is the run-to-run spread the 1-vs-N differences are
judged against.

``--profile DIR``: per policy, device count and variant, a separate process builds ``train.py``'s step,
runs ``--profile-warmup`` steps, then records ``--profile-steps`` (default 1) under ``jax.profiler.trace``
into ``DIR/<policy>_<n>dev_<variant>/``. From its device events it reports, per device and per step: the
span, the busy and idle time (idle between steps: the host did not keep up), the time in collectives
(all-reduce, all-gather, reduce-scatter: NCCL kernels on GPUs), the part of it that overlaps compute kernels
and the part that does not (exposed), and the top kernels. On a CPU the events are the host's (nested), so
only the GPU numbers mean overlap.

Writes ``<out>/dp_scaling.json`` and ``<out>/loss_<policy>.png`` (copied into ``$OUT`` when set) and prints
the JSON.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import shutil
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jq8.training import metrics  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--dataset=lee", "--tokenizer=bytes", "--model.d_model=64", "--model.num_heads=2",
         "--model.num_layers=1", "--batch_size=8", "--seq_len=32", "--steps=4", "--warmup_steps=1",
         "--eval_every=2", "--eval_batches=1", "--log_every=1"]
COLLECTIVE = re.compile(r"nccl|all-?reduce|all_reduce|reduce-?scatter|reduce_scatter|all-?gather|all_gather|"
                        r"collective-permute|all-to-all", re.IGNORECASE)


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


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'NAME=--key=v,--key=v' -> (NAME, ['--key=v', '--key=v'])."""
    name, _, keys = text.partition("=")
    overrides = [k for k in keys.split(",") if k]
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not all(k.startswith("--") and "=" in k for k in overrides):
        raise SystemExit(f"--variant {text}: expected NAME=--key=value[,--key=value...], e.g. "
                         "b14=--grad_reduce_buckets=14 (NAME: letters, digits, _ . -)")
    return name, overrides


def restore_run(config: str, src_run: str, step: int, run: str, overrides: list[str]) -> None:
    """``src_run``'s checkpoint at ``step``, alone in the fresh run directory ``run``, trained to the end."""
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(os.path.join(src_run, "checkpoints", str(step)), os.path.join(run, "checkpoints", str(step)))
    train(config, run, [*overrides, "--ckpt_every=-1"])


# ------------------------------------------------------------------------------------------- profiling


def _intervals_union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def _length(spans: list[tuple[float, float]]) -> float:
    return sum(e - s for s, e in spans)


def _intersection(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total length of (union a) & (union b); both sorted, disjoint."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def summarize_trace(trace_dir: str, steps: int = 1, top: int = 12) -> dict:
    """Per device of the Perfetto trace of ``steps`` steps under ``trace_dir``, per step: span, busy and idle
    time, collective time, its overlap with compute kernels, exposed collective time, and the ``top``
    kernels by time (all in ms)."""
    paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        return {"error": f"no perfetto_trace.json.gz under {trace_dir}"}
    with gzip.open(sorted(paths)[-1], "rt") as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpus = {pid for pid, n in names.items() if re.search(r"gpu|/device:", n, re.IGNORECASE)
            and not re.search(r"host|cpu", n, re.IGNORECASE)}
    threads = {(e["pid"], e.get("tid")): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    per_device = {}
    for pid in sorted(gpus) or sorted(names):
        evs = [e for e in events if e.get("ph") == "X" and e.get("pid") == pid and float(e.get("dur", 0)) > 0]
        # A GPU shows its kernels on its stream lines and again on derived lines (XLA Ops, XLA Modules, ...)
        # that span them: only the streams are kernels.
        streams = [e for e in evs if threads.get((pid, e.get("tid")), "").startswith("Stream")]
        evs = streams or evs
        if not evs:
            continue
        spans = [(float(e["ts"]), float(e["ts"]) + float(e["dur"]), e["name"]) for e in evs]
        comm = _intervals_union([(s, t) for s, t, n in spans if COLLECTIVE.search(n)])
        compute = _intervals_union([(s, t) for s, t, n in spans if not COLLECTIVE.search(n)])
        overlap = _intersection(comm, compute)
        by_name: dict[str, float] = collections.defaultdict(float)
        for s, t, n in spans:
            by_name[n] += t - s
        ms = 1e-3 / steps
        span = max(t for _, t, _ in spans) - min(s for s, _, _ in spans)
        busy = _length(_intervals_union([(s, t) for s, t, _ in spans]))
        per_device[names.get(pid, str(pid))] = {
            "span_ms": span * ms,
            "busy_ms": busy * ms,
            "idle_ms": (span - busy) * ms,
            "compute_ms": _length(compute) * ms,
            "collective_ms": _length(comm) * ms,
            # kernels per step (NCCL kernel names carry the dtype: did XLA keep bf16, merge the buckets?)
            "collective_calls": sum(1 for _, _, n in spans if COLLECTIVE.search(n)) / steps,
            "collective_overlapped_ms": overlap * ms,
            "collective_exposed_ms": (_length(comm) - overlap) * ms,
            "top_kernels_ms": {n: v * ms for n, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]},
        }
    return {"device_events": bool(gpus), "steps": steps, "per_step": True, "devices": per_device}


def profile_one(config: str, overrides: list[str], trace_dir: str, warmup: int, steps: int) -> dict:
    """In this process: train.py's step for ``overrides``, ``warmup`` steps, then ``steps`` traced."""
    import jax
    import jax.numpy as jnp

    import train
    from jq8.training import sharding
    from models.presets import build_model

    cfg = train.parse_args(["--config", config, *overrides])
    train.check_ranges(cfg)
    devices = train.check_devices(cfg)
    policy = train.make_policy(cfg)
    ds = train.load_data(cfg)
    model_cfg = cfg.model
    if model_cfg.vocab_size == 0:  # as train.py: the tokenizer's ids rounded up to 64
        model_cfg = dataclasses.replace(model_cfg, vocab_size=-(-ds.vocab_size // 64) * 64)
    cfg = dataclasses.replace(cfg, model=model_cfg)
    model, tx = build_model(model_cfg, policy), train.make_optimizer(cfg)
    mesh = sharding.make_mesh(devices)
    key = jax.random.key(cfg.seed)

    def init(k):
        params = model.init({"params": k}, jnp.zeros((1, cfg.seq_len), jnp.int32))["params"]
        return params, tx.init(params)

    abstract = jax.eval_shape(init, key)
    psh, osh = (sharding.tree_shardings(t, mesh, cfg.sharding, cfg.fsdp_min_size) for t in abstract)
    params, opt_state = jax.jit(init, out_shardings=(psh, osh))(key)
    step = train.make_train_step(cfg, model, tx, policy, mesh, psh, osh, key)
    batch_sh = sharding.batch_sharding(mesh)

    def run(it):
        b = ds.batch("train", it, cfg.batch_size, cfg.seq_len, cfg.seed)
        inputs, targets = sharding.shard_batch(b.inputs, batch_sh), sharding.shard_batch(b.targets, batch_sh)
        return step(params, opt_state, inputs, targets, jnp.int32(it))

    for it in range(warmup):
        params, opt_state, m = run(it)
    jax.block_until_ready((params, opt_state))
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for it in range(warmup, warmup + steps):
            params, opt_state, m = run(it)
        jax.block_until_ready((params, opt_state, m))
    return {"devices": mesh.size, "data_parallel": "shard_map" if train.use_shard_map(cfg, policy, mesh) else
            "gspmd", "loss": float(m["loss"]), **summarize_trace(trace_dir, steps)}


def profile(config: str, trace_dir: str, overrides: list[str], warmup: int, steps: int) -> dict:
    """:func:`profile_one` in its own process (a fresh JAX that owns the devices)."""
    shutil.rmtree(trace_dir, ignore_errors=True)
    os.makedirs(trace_dir)
    summary = os.path.join(trace_dir, "summary.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--config", config, "--out", trace_dir,
           "--profile-one", summary, f"--profile-warmup={warmup}", f"--profile-steps={steps}", *overrides]
    print("$", " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode or not os.path.exists(summary):
        return {"error": f"profiling process exited with status {proc.returncode}"}
    with open(summary) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)  # train.py keys pass through untouched
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--policies", nargs="+", default=["bf16", "jetfire-int8"])
    ap.add_argument("--devices", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=--key=v,...",
                    help="train.py keys for the multi-device runs, e.g. b14=--grad_reduce_buckets=14 "
                    "(repeatable; default: one variant 'default' with none)")
    ap.add_argument("--restore-step", type=int, default=0, help="checkpoint step of the widest and the "
                    "one-device run, each resumed on the other (0: half of --steps; -1: no restore)")
    ap.add_argument("--repeat-baseline", action="store_true",
                    help="run the one-device run twice: the run-to-run spread of the loss")
    ap.add_argument("--profile", metavar="DIR", help="trace one step per policy, device count and variant "
                    "into DIR/<policy>_<n>dev_<variant>/ and summarise it")
    ap.add_argument("--profile-warmup", type=int, default=3, help="steps before the traced ones")
    ap.add_argument("--profile-steps", type=int, default=1, help="steps traced (more than 1 shows the "
                    "device idle between steps)")
    ap.add_argument("--no-train", action="store_true", help="only --profile: skip the training runs")
    ap.add_argument("--json", metavar="PATH", help="also write the summary here")
    ap.add_argument("--quick", action="store_true", help="CPU smoke: a tiny model, 4 steps")
    ap.add_argument("--profile-one", help=argparse.SUPPRESS)
    args, overrides = ap.parse_known_args()
    if args.quick:
        overrides = [*QUICK, *overrides]
    if args.profile_one:  # the child of profile(): one step traced into --out
        result = profile_one(args.config, overrides, args.out, args.profile_warmup, args.profile_steps)
        with open(args.profile_one, "w") as f:
            json.dump(result, f, indent=1)
        return
    if args.profile_warmup < 1 or args.profile_steps < 1:
        raise SystemExit(f"--profile-warmup {args.profile_warmup} --profile-steps {args.profile_steps}: both "
                         "must be >= 1 (the warm-up keeps compilation out of the trace)")
    bad = [o for o in overrides if not (o.startswith("--") and "=" in o)]
    if bad:
        raise SystemExit(f"{bad[0]}: unknown argument; train.py keys go as --key=value (see --help)")
    if min(args.devices) != 1:
        raise SystemExit(f"--devices {' '.join(map(str, args.devices))}: include 1 (the baseline)")
    steps = next((int(o.split("=", 1)[1]) for o in reversed(overrides) if o.startswith("--steps=")), None)
    if steps is None:
        raise SystemExit("pass --steps=N: the restore step and the comparison need it")
    variants = dict(parse_variant(v) for v in args.variant) or {"default": []}
    restore = steps // 2 if args.restore_step == 0 else args.restore_step
    if restore >= steps:
        raise SystemExit(f"--restore-step {restore}: must be below --steps={steps}")
    wide, first = max(args.devices), next(iter(variants))
    os.makedirs(args.out, exist_ok=True)
    summary: dict = {"steps": steps, "overrides": overrides, "variants": variants, "policies": {}}

    def runs_of(policy):
        """(label, devices, variant name, train.py keys) of every run of ``policy``."""
        yield "1dev", 1, None, []
        for n in sorted(set(args.devices) - {1}):
            for name, keys in variants.items():
                yield f"{n}dev_{name}", n, name, keys

    for policy in args.policies:
        row: dict = {}
        if not args.no_train:
            runs = {}
            for label, n, name, keys in runs_of(policy):
                run = os.path.join(args.out, f"{policy}_{label}")
                shutil.rmtree(run, ignore_errors=True)
                ckpt = [f"--ckpt_every={restore}", "--keep_checkpoints=10"] if restore > 0 and (
                    n == 1 or (n == wide and name == first)) else ["--ckpt_every=-1"]
                train(args.config, run, [f"--policy={policy}", f"--num_devices={n}", *overrides, *keys, *ckpt])
                runs[label] = run
            base = runs["1dev"]
            if args.repeat_baseline:
                run = os.path.join(args.out, f"{policy}_1dev_repeat")
                shutil.rmtree(run, ignore_errors=True)
                train(args.config, run, [f"--policy={policy}", "--num_devices=1", *overrides, "--ckpt_every=-1"])
                row["spread_1dev_repeat"] = max_diff(losses(run), losses(base))
                runs["1dev_repeat"] = run
            row["tokens_per_s"] = {label: tokens_per_s(r) for label, r in runs.items()}
            t1 = row["tokens_per_s"]["1dev"]
            for label, r in runs.items():
                if label.startswith("1dev"):
                    continue
                tn = row["tokens_per_s"][label]
                row.setdefault("scaling", {})[label] = tn / t1 if t1 and tn else None
                row.setdefault("loss_diff_vs_1dev", {})[label] = max_diff(losses(r), losses(base))
                row.setdefault("val_diff_vs_1dev", {})[label] = max_diff(losses(r, "val_loss"),
                                                                         losses(base, "val_loss"))
            row["final_val_loss"] = {label: (list(losses(r, "val_loss").values()) or [None])[-1]
                                     for label, r in runs.items()}
            if restore > 0 and wide > 1:
                wide_label = f"{wide}dev_{first}"
                down = os.path.join(args.out, f"{policy}_restored_{wide}to1dev")
                restore_run(args.config, runs[wide_label], restore, down,
                            [f"--policy={policy}", "--num_devices=1", *overrides])
                up = os.path.join(args.out, f"{policy}_restored_1to{wide}dev")
                restore_run(args.config, runs["1dev"], restore, up,
                            [f"--policy={policy}", f"--num_devices={wide}", *overrides, *variants[first]])
                row["restored_from_step"] = restore
                row["restored"] = {
                    f"{wide}to1_vs_writer": max_diff(losses(down), losses(runs[wide_label]), after=restore),
                    f"1to{wide}_vs_writer": max_diff(losses(up), losses(base), after=restore),
                }
                runs[f"restored_{wide}to1"], runs[f"restored_1to{wide}"] = down, up
            try:
                row["plot"] = metrics.plot(list(runs.values()), os.path.join(args.out, f"loss_{policy}.png"),
                                           labels=[f"{policy}, {label}" for label in runs])
            except Exception as e:  # matplotlib missing: the numbers still stand
                print(f"no plot: {e}")
        if args.profile:
            for label, n, _, keys in runs_of(policy):
                d = os.path.join(args.profile, f"{policy}_{label}")
                row.setdefault("profile", {})[label] = profile(
                    args.config, d, [f"--policy={policy}", f"--num_devices={n}", *overrides, *keys,
                                     "--eval_batches=0"], args.profile_warmup, args.profile_steps)
        summary["policies"][policy] = row
    if len(args.policies) > 1 and not args.no_train:
        a, b = args.policies[:2]
        ta, tb = summary["policies"][a]["tokens_per_s"], summary["policies"][b]["tokens_per_s"]
        summary["speedup_vs_" + a] = {label: tb[label] / ta[label] if ta.get(label) and tb.get(label) else None
                                      for label in ta}
    paths = [os.path.join(args.out, "dp_scaling.json")] + ([args.json] if args.json else [])
    for path in paths:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=1)
        os.replace(tmp, path)
    print(json.dumps(summary, indent=1))
    out = os.environ.get("OUT")
    if out and os.path.abspath(out) != os.path.abspath(args.out):
        for name in os.listdir(args.out):
            if name.endswith((".json", ".png")):
                shutil.copy(os.path.join(args.out, name), out)
        for run in (d for d in os.listdir(args.out) if os.path.isdir(os.path.join(args.out, d))):
            src = os.path.join(args.out, run, "metrics.jsonl")
            if os.path.exists(src):
                shutil.copy(os.path.join(args.out, run, "metrics.jsonl"), os.path.join(out, f"metrics_{run}.jsonl"))


if __name__ == "__main__":
    main()
