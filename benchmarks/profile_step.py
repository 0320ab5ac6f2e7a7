"""Where a block step's time goes: device kernels of one fwd+bwd (benchmarks/block_step.py's step), by name.

    PYTHONPATH=. python3 benchmarks/profile_step.py --hidden 4096 --policies bf16 int8-row jetfire-int8
    PYTHONPATH=. python3 benchmarks/profile_step.py --hidden 576 --family llama --part block --tokens 8192 \
        --seq 512 --policies bf16 int8-row 'jetfire-int8:block=64,act_block=1x64,grad_block=1x64'   # SmolLM2
    PYTHONPATH=. python3 benchmarks/profile_step.py --tiny            # CPU smoke test

Records ``--iters`` steps under ``jax.profiler.trace`` (Perfetto trace), sums the device-side events per
kernel name and prints the top ones per policy (ms per step, share of the step, calls per step). Writes
``$OUT/profile_step.json`` when ``OUT`` is set.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from block_step import Block  # noqa: E402

from jq8.training.policy import Policy, parse_policy  # noqa: E402


def _trace_events(trace_dir: str) -> tuple[list[dict], dict, set]:
    """(events, {(pid, tid): thread name}, GPU pids) of the Perfetto trace under trace_dir."""
    paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(paths[0], "rt") as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    return events, threads, {pid for pid, n in names.items() if "GPU" in n or "gpu" in n}


Events = list[tuple[float, float, str]]  # (start, end, name) in microseconds


def line_events(trace_dir: str, line: str) -> tuple[Events, list[dict]]:
    """((start, end, name) of the device events on one line (as named by kernel_times), sorted by start;
    all events of the trace)."""
    events, threads, gpu = _trace_events(trace_dir)
    evs = sorted(
        (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)), e["name"]) for e in events
        if e.get("ph") == "X" and (not gpu or e.get("pid") in gpu)
        and f"[{threads.get((e['pid'], e.get('tid')), '?')[:24]}]" == line
    )
    return evs, events


def kernel_gaps(evs: Events, max_gap_us: float = 1000.0) -> dict[str, tuple[float, int]]:
    """{kernel name: (idle microseconds before it, count)} over one line's events (:func:`line_events`):
    the time the device sat idle between the end of the previous event and this kernel's start -- launch
    latency, host-side work before a launch. Gaps over max_gap_us (between timed calls) are left out."""
    out: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    end = None
    for ts, stop, name in evs:
        if end is not None and 0.0 < ts - end <= max_gap_us:
            out[name][0] += ts - end
            out[name][1] += 1
        end = stop if end is None else max(end, stop)
    return {k: (v[0], v[1]) for k, v in out.items()}


def _calls(evs: Events, max_gap_us: float) -> list[list[float]]:
    """[first kernel start, last kernel end] per call: a run of kernels with no idle gap over max_gap_us."""
    calls: list[list[float]] = []
    for ts, end, _ in evs:
        if calls and ts - calls[-1][1] <= max_gap_us:
            calls[-1][1] = max(calls[-1][1], end)
        else:
            calls.append([ts, end])
    return calls


def _lead_windows(calls: list[list[float]], events: list[dict], host_event: str) -> list[tuple[float, float]]:
    """(start of the last ``host_event`` before the call's first kernel, that kernel's start) per call."""
    hosts = sorted(float(e["ts"]) for e in events if e.get("ph") == "X" and host_event in e.get("name", ""))
    return [(max((h for h in hosts if h <= c[0]), default=c[0]), c[0]) for c in calls]


def call_spans(
    evs: Events, events: list[dict], host_event: str, max_gap_us: float = 1000.0
) -> dict[str, float]:
    """Mean per-call microseconds over one line's events (:func:`line_events`): ``span`` from the first
    kernel's start to the last one's end (a call = a run of kernels with no idle gap over max_gap_us), and
    ``lead`` from the start of the host event named ``host_event`` (e.g. the jitted function's dispatch) to
    that call's first kernel."""
    calls = _calls(evs, max_gap_us)
    leads = [w1 - w0 for w0, w1 in _lead_windows(calls, events, host_event)]
    n = max(len(calls), 1)
    return dict(calls=len(calls), span=sum(c[1] - c[0] for c in calls) / n, lead=sum(leads) / n)


def lead_host_events(
    evs: Events, events: list[dict], host_event: str, max_gap_us: float = 1000.0
) -> dict[str, float]:
    """{host event name: mean microseconds per call} of the host-side (non-GPU) events inside each call's
    lead (:func:`call_spans`), clipped to it. Nested events each count, so the figures overlap: they say
    what the host was inside, not a sum."""
    gpu = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
           and "gpu" in e.get("args", {}).get("name", "").lower()}  # fmt: skip
    windows = _lead_windows(_calls(evs, max_gap_us), events, host_event)
    out: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("ph") != "X" or e.get("pid") in gpu:
            continue
        t0, t1 = float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))
        for w0, w1 in windows:
            if t1 > w0 and t0 < w1:
                out[e["name"]] += min(t1, w1) - max(t0, w0)
    n = max(len(windows), 1)
    return {k: v / n for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def kernel_times(trace_dir: str) -> dict[str, tuple[float, int]]:
    """{event name: (total microseconds, count)} over the device (GPU) events of a Perfetto trace; on a
    machine without a GPU, over every complete event (so the CPU smoke test sees something)."""
    events, threads, gpu = _trace_events(trace_dir)
    out: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("ph") == "X" and (not gpu or e.get("pid") in gpu):
            # A device can show the same work on several lines (streams, XLA ops): keep the line's name so
            # that nested views are not mistaken for separate kernels.
            key = f"[{threads.get((e['pid'], e.get('tid')), '?')[:24]}] {e['name']}"
            out[key][0] += float(e.get("dur", 0.0))
            out[key][1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def profile(
    hidden: int, tokens: int, seq: int, part: str, policy_name: str, iters: int, block: int | None, hlo_dir: str = "",
    family: str = "gpt",
) -> dict:
    policy = parse_policy(policy_name, backend="pallas" if jax.default_backend() == "gpu" else "xla")
    if block and policy.granularity == "block" and "block=" not in policy_name:
        policy = dataclasses.replace(policy, block=(block, block))
    heads = max(1, hidden // 64)
    x = jax.random.normal(jax.random.PRNGKey(0), (tokens // seq, seq, hidden), jnp.float32)
    params = jax.jit(Block(Policy(), heads, part, family=family).init)(jax.random.PRNGKey(2), x)["params"]

    def loss(params, x, key):
        return jnp.sum(Block(policy, heads, part, family=family).apply({"params": params}, x, rngs={"quant": key}))

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    key = jax.random.PRNGKey(3)
    if hlo_dir:  # the optimised HLO names the fusions the profile lists
        with open(os.path.join(hlo_dir, f"profile_step_{policy_name}.hlo.txt"), "w") as f:
            f.write(step.lower(params, x, key).compile().as_text())
    for _ in range(3):
        jax.block_until_ready(step(params, x, key))
    with tempfile.TemporaryDirectory() as d:
        # Back to back (as train.py runs steps), so idle time between kernels is the device's, not the wait
        # for the host to dispatch a synchronised step.
        with jax.profiler.trace(d, create_perfetto_trace=True):
            jax.block_until_ready([step(params, x, key) for _ in range(iters)])
        times = kernel_times(d)
        # Per-line totals: the busiest line is the one to read (others may nest the same time).
        lines = collections.Counter()
        for n, (t, _) in times.items():
            lines[n.split("]")[0] + "]"] += t
        busiest = max(lines, key=lines.get)
        evs, _ = line_events(d, busiest)
    total = lines[busiest]
    gaps = kernel_gaps(evs)
    top = sorted(times.items(), key=lambda kv: -kv[1][0])
    return dict(hidden=hidden, tokens=tokens, part=part, family=family, policy=policy_name, iters=iters,
                device_ms_per_step=total / iters / 1e3,
                span_ms_per_step=(evs[-1][1] - evs[0][0]) / iters / 1e3 if evs else 0.0,
                idle_ms_per_step=sum(g for g, _ in gaps.values()) / iters / 1e3,
                idle_before=[dict(name=n, ms_per_step=g / iters / 1e3, count_per_step=c / iters)
                             for n, (g, c) in sorted(gaps.items(), key=lambda kv: -kv[1][0])],
                lines_ms_per_step={k: v / iters / 1e3 for k, v in lines.items()},
                kernels=[dict(name=n, ms_per_step=t / iters / 1e3, share=t / total, calls_per_step=c / iters)
                         for n, (t, c) in top])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--part", default="mlp", choices=["mlp", "block"])
    ap.add_argument("--family", default="gpt", choices=["gpt", "llama"],
                    help="gpt: LayerNorm + GELU; llama: RMSNorm + SwiGLU + rotary (block_step.py's Block)")
    ap.add_argument("--policies", nargs="+", default=["bf16", "int8-row", "jetfire-int8"],
                    help="policy spec strings (jq8.training.policy.parse_policy)")
    ap.add_argument("--block", type=int, default=None, help="square block of block policies naming none")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: hidden 64, 64 tokens")
    ap.add_argument("--dump-hlo", action="store_true", help="write each policy's optimised HLO under $OUT")
    ap.add_argument(
        "--json",
        metavar="PATH",
        help="write the results as JSON to PATH (default: $OUT/profile_step.json when OUT is set)",
    )
    args = ap.parse_args()
    out = os.environ.get("OUT")
    if args.dump_hlo and not out:
        ap.error("--dump-hlo writes under $OUT: set OUT")
    if out:
        os.makedirs(out, exist_ok=True)
    if args.tiny:
        args.hidden, args.tokens, args.seq, args.iters = 64, 64, 32, 1
    print(f"device {jax.devices()[0].device_kind}, {args.family} hidden {args.hidden}, {args.tokens} tokens, "
          f"{args.part}")
    rows = []
    for name in args.policies:
        r = profile(args.hidden, args.tokens, args.seq, args.part, name, args.iters, args.block,
                    out if args.dump_hlo else "", args.family)
        rows.append(r)
        print(f"\n== {name}: {r['device_ms_per_step']:.2f} ms of device events per step on the busiest line; "
              f"lines: { {k: round(v, 2) for k, v in r['lines_ms_per_step'].items()} }")
        for k in r["kernels"][: args.top]:
            print(f"  {k['ms_per_step']:8.3f} ms {k['share']:6.1%} x{k['calls_per_step']:<5g} "
                  f"{k['name'][:110]}")
        print(f"  first kernel to last, per step: {r['span_ms_per_step']:.2f} ms; the device sat idle "
              f"{r['idle_ms_per_step']:.2f} ms between kernels, most before:")
        for k in r["idle_before"][:10]:
            print(f"  {k['ms_per_step']:8.3f} ms x{k['count_per_step']:<5g} {k['name'][:110]}")
    path = args.json or (os.path.join(out, "profile_step.json") if out else None)
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
