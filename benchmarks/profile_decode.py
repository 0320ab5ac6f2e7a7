"""Where a batch-1 decode token's time goes: wall time per call vs the device kernels it runs, per model.

    PYTHONPATH=. python3 benchmarks/profile_decode.py --preset gpt2-1.5b
    PYTHONPATH=. python3 benchmarks/profile_decode.py --preset gpt-tiny --iters 2    # CPU smoke test
    PYTHONPATH=. python3 benchmarks/profile_decode.py --preset gpt2-124m --tokens 8 1024  # a prefill

For the bf16 model and each ZeroQuant scheme (random-init weights, the models of benchmarks/ptq_speed.py):
one token through the whole model (ptq_speed's decode proxy), timed by wall clock (median, block_until_ready),
then ``--iters`` calls under ``jax.profiler.trace``: the device-side kernel time per token (busiest line),
kernel launches per token and the top kernels. Wall time well above device time means the token is bound by
launches / host dispatch, not by weight bandwidth. Writes ``$OUT/profile_decode_<preset>.json`` if OUT is set.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flax.linen as nn  # noqa: E402
from dispatch_probe import timings  # noqa: E402
from profile_step import call_spans, kernel_gaps, kernel_times, lead_host_events, line_events  # noqa: E402
from ptq_speed import as_bf16_checkpoint, bf16_lm_head, bind, timeit, with_bf16_head  # noqa: E402

from jq8 import ptq  # noqa: E402
from jq8.inference import decode  # noqa: E402
from jq8.ptq import infer as ptq_infer  # noqa: E402
from jq8.training.policy import Policy  # noqa: E402
from models.presets import build_model, preset  # noqa: E402


def device_profile(fn, args, iters: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(iters):
                jax.block_until_ready(fn(*args))
        times = kernel_times(d)
        lines = collections.Counter()
        counts = collections.Counter()
        for n, (t, c) in times.items():
            line = n.split("]")[0] + "]"
            lines[line] += t
            counts[line] += c
        busiest = max(lines, key=lines.get)
        evs, events = line_events(d, busiest)  # read before the trace directory goes
    gaps = kernel_gaps(evs)
    spans = call_spans(evs, events, "PjitFunction")
    lead_host = lead_host_events(evs, events, "PjitFunction")
    top = sorted(((n, t, c) for n, (t, c) in times.items() if n.startswith(busiest)), key=lambda r: -r[1])
    return dict(
        device_ms=lines[busiest] / iters / 1e3,
        launches=counts[busiest] / iters,
        lines={k: v / iters / 1e3 for k, v in lines.items()},
        kernels=[dict(name=n, us=t / iters, calls=c / iters) for n, t, c in top[:25]],
        idle_ms=sum(g for g, _ in gaps.values()) / iters / 1e3,
        span_ms=spans["span"] / 1e3,  # first kernel start to last kernel end, per call
        lead_ms=spans["lead"] / 1e3,  # host dispatch start to the first kernel, per call
        traced_calls=spans["calls"],
        lead_host=[dict(name=n, us=us) for n, us in list(lead_host.items())[:15]],
        idle_before=[
            dict(name=n, us=g / iters, count=c / iters)
            for n, (g, c) in sorted(gaps.items(), key=lambda kv: -kv[1][0])[:12]
        ],
    )


def greedy_loop(apply, steps: int):
    """``steps`` greedy one-token calls in one jitted ``lax.fori_loop`` (one dispatch for all of them): the
    per-token time without per-call host dispatch. Each step feeds its argmax back, so nothing is hoisted."""

    def run(p, tok):
        def body(_, t):
            return jnp.argmax(apply(p, t)[:, -1], axis=-1).astype(jnp.int32)[:, None]

        return jax.lax.fori_loop(0, steps, body, tok)

    return jax.jit(run)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2-1.5b")
    ap.add_argument("--schemes", nargs="+", default=["bf16", "w8a8", "w4/8-a8"])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--loop", type=int, default=0, help="also time this many greedy steps in one fori_loop")
    ap.add_argument(
        "--tokens",
        type=int,
        nargs=2,
        default=(1, 1),
        metavar=("BATCH", "SEQ"),
        help="profile one call on a (BATCH, SEQ) token batch instead of one token (a prefill: 8 1024)",
    )
    ap.add_argument(
        "--kv", type=int, default=0, help="profile a KV-cache decode of this many tokens instead (per token)"
    )
    ap.add_argument(
        "--dispatch",
        choices=["bound", "tree"],
        default="bound",
        help="parameters as a flat leaf list (jq8.inference.dispatch.jit_bound) or the pytree per call",
    )
    ap.add_argument(
        "--json",
        metavar="PATH",
        help="write the results as JSON to PATH (default: $OUT/profile_decode_<preset>[_BxT].json when OUT is set)",
    )
    args = ap.parse_args()
    if args.kv and tuple(args.tokens) != (1, 1):
        ap.error("--kv profiles a batch-1 decode from a 1-token prompt; leave --tokens at 1 1")
    cfg = preset(args.preset)
    cfg = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, args.tokens[1]))
    model = build_model(cfg, Policy.from_name("bf16"))
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    one = jax.random.randint(jax.random.PRNGKey(1), tuple(args.tokens), 0, cfg.vocab_size)
    print(f"device {jax.devices()[0].device_kind}, preset {args.preset}, jax {jax.__version__}", flush=True)
    rows = []
    for scheme in args.schemes:
        if scheme == "bf16":
            p = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)

            def apply(q, t):
                with nn.intercept_methods(bf16_lm_head):
                    return model.apply({"params": q}, t)
        else:
            qp = ptq.quantize_params(params, ptq.scheme(scheme))
            p = as_bf16_checkpoint(qp)

            def apply(q, t):
                with nn.intercept_methods(bf16_lm_head):
                    return ptq_infer.apply_quantized(model, q, t)

        if args.kv:  # one jitted generate() of --kv tokens from a 1-token prompt; every figure per token
            if scheme == "bf16":
                make = lambda w: with_bf16_head(decode.float_apply_fn(model, w))  # noqa: E731
            else:
                make = lambda w: with_bf16_head(decode.quantized_apply_fn(model, w))  # noqa: E731
            cache = decode.init_cache(model, 1, args.kv + 1)
            fn = jax.jit(lambda w, c, t, make=make: decode.generate(make(w), c, t, steps=args.kv))
            wall = timeit(fn, p, cache, one, iters=args.iters) / args.kv
            prof = device_profile(fn, (p, cache, one), args.iters)
            prof["device_ms"] /= args.kv
            prof["launches"] /= args.kv
            prof["lines"] = {k: v / args.kv for k, v in prof["lines"].items()}
            prof["kernels"] = [
                dict(k, us=k["us"] / args.kv, calls=k["calls"] / args.kv) for k in prof["kernels"]
            ]
        else:
            call = bind(apply, p, args.dispatch)
            wall = timeit(call, one, iters=args.iters)
            prof = device_profile(call, (one,), args.iters)
            prof["dispatch_ms"] = timings(call, (one,), args.iters)[1]  # until the call returns
        row = dict(scheme=scheme, wall_ms=wall, **prof)
        if args.loop:
            row["loop_ms_per_token"] = timeit(greedy_loop(apply, args.loop), p, one, iters=3) / args.loop
        rows.append(row)
        lines = {k: round(v, 3) for k, v in prof["lines"].items()}
        print(
            f"\n== {scheme}: wall {wall:.3f} ms/token, device {prof['device_ms']:.3f} ms (busiest line), "
            f"{prof['launches']:.0f} events/token; lines {lines}",
            flush=True,
        )
        if args.loop:
            print(
                f"   fori_loop of {args.loop} greedy steps: {row['loop_ms_per_token']:.3f} ms/token",
                flush=True,
            )
        for k in prof["kernels"][: args.top]:
            print(f"  {k['us']:9.1f} us x{k['calls']:<5g} {k['name'][:110]}", flush=True)
        print(
            f"  per call: {prof['traced_calls']} calls traced, first-to-last kernel {prof['span_ms']:.3f} "
            f"ms, dispatch to first kernel {prof['lead_ms']:.3f} ms"
        )
        print(f"  device idle between kernels: {prof['idle_ms']:.3f} ms; before each kernel, the most:")
        for k in prof["idle_before"][:8]:
            print(f"  {k['us']:9.1f} us x{k['count']:<5g} {k['name'][:110]}", flush=True)
        print("  host events inside the lead (nested ones overlap), us per call:")
        for k in prof["lead_host"][:10]:
            print(f"  {k['us']:9.1f} us {k['name'][:110]}", flush=True)
        if "dispatch_ms" in row:
            print(f"  the call returns to Python after {row['dispatch_ms']:.3f} ms (median)", flush=True)
    out = os.environ.get("OUT")
    b, t = args.tokens
    suffix = "" if (b, t) == (1, 1) else f"_{b}x{t}"
    path = args.json or (os.path.join(out, f"profile_decode_{args.preset}{suffix}.json") if out else None)
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
