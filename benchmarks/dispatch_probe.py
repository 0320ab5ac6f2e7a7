"""Host cost per kernel call: a jitted chain of n small INT8 GEMMs, per GEMM implementation.

    PYTHONPATH=. python3 benchmarks/dispatch_probe.py                  # H100: mosaic, triton, xla
    PYTHONPATH=. python3 benchmarks/dispatch_probe.py --quick          # CPU smoke (xla only)

Each call of the jitted function runs ``n`` independent (M, K) x (K, N) INT8 GEMMs with per-row and
per-column scales (bf16 out), each on its own weight so XLA cannot merge them. The GEMMs are small
(default 256^3: a few microseconds on the device), so the time per call grows with ``n`` at the rate the
host can set up and launch one call, not at the device's rate. Reported per implementation and XLA
command-buffer setting (compiled with ``compiler_options``):
  * ``wall``: median ms of call + block_until_ready;
  * ``dispatch``: median ms until the call returns (the host's enqueue), then blocked outside the timing;
  * the slope of both over ``n`` (us per GEMM call), from the smallest and largest ``n``.
With ``--trees PRESET``, instead: the host cost of a jitted call's arguments alone. A trivial jitted
function (one scalar add) takes the parameter tree of PRESET's layer count at a tiny width: the bf16
tree, each ZeroQuant scheme's tree, and the same leaves passed as a flat list; median us per call.
Writes $OUT/dispatch_probe.json when $OUT is set, or ``--json PATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

from pallas_kernels.gemm import int8_matmul

# XLA's command buffers (CUDA graphs): its default set, none, and the default minus custom calls.
CMDBUF = {
    "default": None,
    "off": "",
    "no-custom-call": "FUSION,CUBLAS,CUBLASLT,CUDNN",
}


def xla_int8(a, b, sa, sb):
    acc = jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
    return (acc.astype(jnp.float32) * sa[:, None] * sb[None, :]).astype(jnp.bfloat16)


def chain(impl: str):
    def run(a, sa, ws, sbs):
        if impl == "xla":
            return [xla_int8(a, w, sa, sb) for w, sb in zip(ws, sbs)]
        return [int8_matmul(a, w, sa, sb, backend=impl) for w, sb in zip(ws, sbs)]

    return run


def timings(fn, args, iters: int) -> tuple[float, float]:
    """(median wall ms, median dispatch ms)."""
    for _ in range(3):
        jax.block_until_ready(fn(*args))
    wall, disp = [], []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = fn(*args)
        t1 = time.perf_counter()
        jax.block_until_ready(out)
        t2 = time.perf_counter()
        disp.append((t1 - t0) * 1e3)
        wall.append((t2 - t0) * 1e3)
    return statistics.median(wall), statistics.median(disp)


def tree_costs(preset_name: str, schemes: list[str], iters: int) -> list[dict]:
    """us per call of a trivial jitted function over PRESET-shaped parameter trees (tiny width)."""
    import dataclasses
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from ptq_speed import as_bf16_checkpoint

    from jq8 import ptq
    from jq8.training.policy import Policy
    from models.presets import build_model, preset

    cfg = dataclasses.replace(preset(preset_name), d_model=64, num_heads=2, vocab_size=256, max_seq_len=64)
    model = build_model(cfg, Policy.from_name("bf16"))
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    trees = {"bf16": jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)}
    for s in schemes:
        trees[s] = as_bf16_checkpoint(ptq.quantize_params(params, ptq.scheme(s)))
    t = jnp.zeros((4,), jnp.int32)
    fn = jax.jit(lambda p, t: t + 1)
    rows = []
    for name, tree in trees.items():
        leaves = jax.tree_util.tree_leaves(tree)
        for form, arg in (("tree", tree), ("flat list", leaves)):
            wall, disp = timings(fn, (arg, t), iters)
            rows.append(
                dict(tree=name, form=form, leaves=len(leaves), wall_us=wall * 1e3, dispatch_us=disp * 1e3)
            )
            print(
                f"{name:8s} {form:9s} {len(leaves):5d} leaves: wall {wall * 1e3:8.1f} us, dispatch "
                f"{disp * 1e3:8.1f} us ({disp * 1e3 / len(leaves):5.2f} us per leaf)",
                flush=True,
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impls", nargs="+", default=["mosaic", "triton", "xla"])
    ap.add_argument("--counts", nargs="+", type=int, default=[1, 64, 192])
    ap.add_argument("--cmdbuf", nargs="+", default=list(CMDBUF), choices=list(CMDBUF))
    ap.add_argument("--size", type=int, default=256, help="M = N = K of every GEMM")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="CPU smoke: xla only, small counts")
    ap.add_argument("--trees", metavar="PRESET", help="time a trivial call's arguments instead (see above)")
    ap.add_argument("--schemes", nargs="+", default=["w8a8"], help="with --trees: the quantized trees")
    ap.add_argument(
        "--json",
        metavar="PATH",
        help="write the results as JSON to PATH (default: $OUT/dispatch_probe.json, with --trees "
        "$OUT/dispatch_probe_trees.json, when OUT is set)",
    )
    args = ap.parse_args()
    out = os.environ.get("OUT")
    if args.trees:
        rows = tree_costs(args.trees, args.schemes, args.iters)
        path = args.json or (os.path.join(out, "dispatch_probe_trees.json") if out else None)
        if path:
            with open(path, "w") as f:
                json.dump(
                    dict(device=jax.devices()[0].device_kind, preset=args.trees, rows=rows), f, indent=1
                )
        return
    if args.quick:
        args.impls, args.counts, args.cmdbuf, args.iters, args.size = ["xla"], [1, 4], ["default"], 3, 64
    gpu = jax.devices()[0].platform == "gpu"
    s = args.size
    key = jax.random.PRNGKey(0)
    ka, ks, kw = jax.random.split(key, 3)
    a = jax.random.randint(ka, (s, s), -127, 128, jnp.int32).astype(jnp.int8)
    sa = jax.random.uniform(ks, (s,), jnp.float32, 1e-3, 2e-3)
    print(f"device: {jax.devices()[0].device_kind}; GEMM {s}^3; iters {args.iters}")
    rows = []
    for impl in args.impls:
        for cb in args.cmdbuf:
            opts = {} if CMDBUF[cb] is None or not gpu else {"xla_gpu_enable_command_buffer": CMDBUF[cb]}
            per_n = {}
            for n in args.counts:
                keys = jax.random.split(jax.random.fold_in(kw, n), n)
                ws = [jax.random.randint(k, (s, s), -127, 128, jnp.int32).astype(jnp.int8) for k in keys]
                sbs = [jnp.full((s,), 1e-3 * (i + 1), jnp.float32) for i in range(n)]
                fn = jax.jit(chain(impl)).lower(a, sa, ws, sbs).compile(compiler_options=opts)
                wall, disp = timings(fn, (a, sa, ws, sbs), args.iters)
                per_n[n] = (wall, disp)
                rows.append(dict(backend=impl, cmdbuf=cb, n=n, wall_ms=wall, dispatch_ms=disp))
                print(f"{impl:7s} cmdbuf={cb:15s} n={n:4d}: wall {wall:8.3f} ms, dispatch {disp:8.3f} ms",
                      flush=True)  # fmt: skip
            lo, hi = min(per_n), max(per_n)
            if hi > lo:
                slope = [(per_n[hi][i] - per_n[lo][i]) / (hi - lo) * 1e3 for i in range(2)]
                print(f"{impl:7s} cmdbuf={cb:15s} per GEMM call: wall {slope[0]:6.1f} us, "
                      f"dispatch {slope[1]:6.1f} us", flush=True)  # fmt: skip
                rows.append(dict(backend=impl, cmdbuf=cb, slope_wall_us=slope[0], slope_dispatch_us=slope[1]))
    path = args.json or (os.path.join(out, "dispatch_probe.json") if out else None)
    if path:
        with open(path, "w") as f:
            json.dump(dict(device=jax.devices()[0].device_kind, size=s, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
