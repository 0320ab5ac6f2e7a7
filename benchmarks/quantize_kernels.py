"""Quantize kernels vs XLA and vs a plain copy on one GPU: correctness first, then bandwidth.

    PYTHONPATH=. python3 benchmarks/quantize_kernels.py [--quick] [--no-sweep] [--iters 20]

1. Correctness at every benchmark shape (and a ragged one): ``quantize_tiles`` must be bit-exact to
   ``jq8.quant.quantize`` run eagerly (exact division; see the note in pallas_kernels/quantize.py), every
   output element written (outputs poisoned first); the fused producers (LayerNorm, GELU forward and
   backward) within one code of their references (>= 99% equal).
2. Timing at (16384, 1024), (16384, 4096), (8192, 8192) bf16: per-row, 32x32 blocks (with and without the
   transposed copy), groups 1x128, stochastic rounding, LayerNorm + quantize, bias + GELU + quantize and
   the GELU backward (stochastic, INT8 GELU input); against the jnp reference
   jitted by XLA and a device-to-device copy of the same bytes (``x * c``, c a runtime scalar). A sample is
   one jitted program running the op R and 2R times in a dependent chain (each call's input gets one
   element from the previous output, so XLA can neither CSE nor hoist it; all outputs are returned, so
   none is dead code); time per call is
   (T(2R) - T(R)) / R, which cancels dispatch and the chain's first copy. Median of ``--samples``.
   GB/s counts bytes read + written (input, codes, transposed codes, scales, LN statistics).
3. Phase ``sweep`` (default on): a tile sweep (block_m, block_n or row budget, num_warps) per shape for
   per-row, 32x32+T and LayerNorm (per-row, 32x32+T), reporting the best config.
Phases and cases can be chosen (``--phases check,time``, ``--cases per-row,blocks32+T``) to fit a run into
a time limit; the script prints progress with timestamps.
Writes ``$OUT/quantize_kernels.json`` when OUT is set; prints a table at the end.
CPU smoke test: ``INTERPRET=1 PYTHONPATH=. python3 benchmarks/quantize_kernels.py`` (tiny shapes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jq8.quant import QArray, QuantSpec, noise_seed, quantize
from pallas_kernels.gelu_quantize import (
    bias_gelu_quantize,
    bias_gelu_quantize_reference,
    gelu_backward_quantize,
    gelu_backward_quantize_reference,
)
from pallas_kernels.norm_quantize import layer_norm_quantize, layer_norm_quantize_reference
from pallas_kernels.quantize import QuantizeConfig, quantize_tiles, quantize_tiles_reference

warnings.filterwarnings("ignore", message=".*[Tt]riton.*deprecat.*")
warnings.filterwarnings("ignore", category=DeprecationWarning)

INTERPRET = os.environ.get("INTERPRET") == "1"
T0 = time.perf_counter()
P, B32, G128 = QuantSpec.per_row(), QuantSpec.blocks((32, 32)), QuantSpec.groups(128, 1)

# name -> (kind, spec, transposed_spec, rounding)
CASES = {
    "per-row": ("quant", P, None, "nearest"),
    "per-row+T per-row": ("quant", P, P, "nearest"),  # per-token training: x and x.T both per row
    "blocks32": ("quant", B32, None, "nearest"),
    "blocks32+T": ("quant", B32, B32, "nearest"),
    "groups1x128": ("quant", G128, None, "nearest"),
    "per-row stoch": ("quant", P, None, "stochastic"),
    "per-row+T per-row stoch": ("quant", P, P, "stochastic"),  # the int8-row policy's gradients
    "blocks32+T stoch": ("quant", B32, B32, "stochastic"),
    "LN per-row": ("ln", P, None, "nearest"),
    "LN blocks32+T": ("ln", B32, B32, "nearest"),
    "GELU fwd blocks32+T": ("gelu", B32, B32, "nearest"),  # bf16 + bias -> GELU -> INT8 (and x.T)
    "GELU bwd blocks32+T stoch": ("gelu_bwd", B32, B32, "stochastic"),  # g bf16, x INT8 blocks -> INT8
}
SWEEP_CASES = ("per-row", "blocks32+T", "LN per-row", "LN blocks32+T", "per-row+T per-row",
               "per-row+T per-row stoch")


def log(*a) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s]", *a, flush=True)


def interpret_flag() -> bool | None:
    return True if INTERPRET else None


# ------------------------------------------------------------------------------------------ the ops


def make_op(case: str, m: int, n: int, seed, config: QuantizeConfig | None, reference: bool) -> Callable:
    """x -> outputs of the case (kernel, or the jnp reference when ``reference``)."""
    kind, spec, tspec, rounding = CASES[case]
    gamma = 1.0 + 0.1 * jax.random.normal(jax.random.key(11), (n,))
    beta = 0.1 * jax.random.normal(jax.random.key(12), (n,))
    if kind == "quant":
        if reference:
            return lambda x: quantize_tiles_reference(
                x, spec, rounding=rounding, seed=seed, transposed_spec=tspec
            )
        return lambda x, poison=False: quantize_tiles(
            x, spec, rounding=rounding, seed=seed, transposed_spec=tspec, config=config,
            interpret=interpret_flag(), poison_outputs=poison,
        )
    if kind == "ln":
        if reference:
            return lambda x: layer_norm_quantize_reference(x, gamma, beta, spec=spec, transposed_spec=tspec)
        return lambda x, poison=False: layer_norm_quantize(
            x, gamma, beta, spec=spec, transposed_spec=tspec, config=config, interpret=interpret_flag(),
            poison_outputs=poison,
        )
    kw = dict(transposed_spec=tspec, rounding=rounding, seed=seed)
    if kind == "gelu":
        if reference:
            return lambda x: bias_gelu_quantize_reference(x, beta, spec=spec, **kw)
        return lambda x, poison=False: bias_gelu_quantize(
            x, beta, spec=spec, config=config, interpret=interpret_flag(), poison_outputs=poison, **kw
        )
    # gelu_bwd: x is the upstream gradient; the GELU input is a fixed INT8 QArray (what forward kept)
    h = quantize(jax.random.normal(jax.random.key(13), (m, n)) * 2, B32)
    if reference:
        return lambda g: gelu_backward_quantize_reference(g, h, spec, bias=beta, **kw)
    return lambda g, poison=False: gelu_backward_quantize(
        g, h, spec, bias=beta, config=config, interpret=interpret_flag(), poison_outputs=poison, **kw
    )


def bytes_moved(case: str, m: int, n: int, itemsize: int) -> int:
    kind, spec, tspec, _ = CASES[case]
    total = m * n * itemsize + m * n + 4 * int(np.prod(spec.scale_shape(m, n)))
    if tspec is not None:
        total += m * n + 4 * int(np.prod(tspec.scale_shape(n, m)))
    if kind == "ln":
        total += 8 * m + 8 * n
    if kind == "gelu_bwd":  # + the INT8 GELU input and its 32x32 scales
        total += m * n + 4 * int(np.prod(B32.scale_shape(m, n)))
    return total


# ------------------------------------------------------------------------------------------ checks


def _qarrays(out) -> list[QArray]:
    out = out if isinstance(out, tuple) else (out,)
    return [o for o in out if isinstance(o, QArray)]


def check(case: str, x: jax.Array, seed) -> dict:
    """Kernel vs reference at x's shape: quantize bit-exact, the fused producers within one code."""
    kind = CASES[case][0]
    got = make_op(case, *x.shape, seed, None, reference=False)(x, poison=True)
    ref = make_op(case, *x.shape, seed, None, reference=True)(x)  # eager: exact division
    res = {"case": case, "shape": list(x.shape), "ok": True}
    for g, r in zip(_qarrays(got), _qarrays(ref)):
        v, rv = np.asarray(g.values, np.int32), np.asarray(r.values, np.int32)
        s, rs = np.asarray(g.scale), np.asarray(r.scale)
        unwritten = int((v == -128).sum() + np.isnan(s).sum())
        code_diff = int((v != rv).sum())
        res.setdefault("unwritten", 0)
        res["unwritten"] += unwritten
        res.setdefault("code_mismatch", 0)
        res["code_mismatch"] += code_diff
        res["max_code_diff"] = max(res.get("max_code_diff", 0), int(np.abs(v - rv).max()))
        if kind == "quant":
            scale_diff = int((s != rs).sum())
            res["scale_mismatch"] = res.get("scale_mismatch", 0) + scale_diff
            res["ok"] &= unwritten == 0 and code_diff == 0 and scale_diff == 0
        else:
            res["ok"] &= bool(unwritten == 0 and np.abs(v - rv).max() <= 1 and (v == rv).mean() >= 0.99)
            res["ok"] &= bool(np.allclose(s, rs, rtol=1e-5))
    return res


# ------------------------------------------------------------------------------------------ timing


def _float_leaf(out) -> jax.Array:
    leaves = [a for a in jax.tree.leaves(out) if jnp.issubdtype(a.dtype, jnp.floating)]
    return leaves[0].reshape(-1)[0]


def chain(step: Callable, reps: int) -> Callable:
    """jit: run ``step`` reps times, each input depending on the previous output (no CSE, no hoisting)."""

    @jax.jit
    def run(x, c):
        outs = []
        for _ in range(reps):
            outs.append(step(x, c))
            x = x.at[0, 0].set(_float_leaf(outs[-1]).astype(x.dtype))
        # Every output is returned, so XLA must materialize all of them (an unused output of the jnp
        # reference would otherwise be dead code, and a sliced one computed for one element only).
        return outs

    return run


def device_time(step: Callable, x: jax.Array, samples: int, reps: int) -> float:
    """Seconds per call of step(x, c): (median T(2R) - median T(R)) / R (see module docstring); falls
    back to median T(2R) / 2R if timing noise makes the difference non-positive."""
    c = jnp.float32(1.0)
    f1, f2 = chain(step, reps), chain(step, 2 * reps)
    jax.block_until_ready(f1(x, c))
    jax.block_until_ready(f2(x, c))
    t1, t2 = [], []
    for _ in range(samples):
        t0 = time.perf_counter()
        jax.block_until_ready(f1(x, c))
        t1.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        jax.block_until_ready(f2(x, c))
        t2.append(time.perf_counter() - t0)
    m1, m2 = statistics.median(t1), statistics.median(t2)
    return (m2 - m1) / reps if m2 > m1 else m2 / (2 * reps)


def copy_step(x, c):
    return x * c.astype(x.dtype)


def sweep_configs(case: str, m: int, n: int) -> list[QuantizeConfig]:
    if INTERPRET:
        return [QuantizeConfig(16, 64, 4, 1, 1024), QuantizeConfig(32, 128, 4, 1, 4096)]
    out = []
    for warps in (4, 8):
        if case in ("per-row", "LN per-row"):
            # whole rows: block_m is cut down to budget / next_pow2(N) rows per program
            out += [QuantizeConfig(64, 1024, warps, 1, budget) for budget in (4096, 8192, 16384, 32768)]
            if warps == 8:  # small blocks with few warps, and wide ones with many
                out += [QuantizeConfig(64, 1024, 2, 1, b) for b in (2048, 4096, 8192)]
                out += [QuantizeConfig(64, 1024, 16, 1, b) for b in (16384, 32768)]
        elif case.startswith("per-row+T"):
            # whole rows in each program (N <= xla_row_stats_cols) vs row statistics from the pre-pass
            for rows in (1024, 128):
                for bm, bn in ((32, 128), (32, 256), (64, 256), (64, 128)):
                    out.append(QuantizeConfig(bm, bn, warps, 1, max(bm * bn, 16384), xla_row_stats_cols=rows))
        elif case.startswith("LN"):
            # 32 whole rows per program: one load if within the budget, else column chunks of block_n
            for budget in (16384, 32768):
                out += [QuantizeConfig(32, bn, warps, 1, budget) for bn in (128, 256, 512)]
        else:
            for bm, bn in ((32, 128), (32, 256), (64, 256), (32, 512), (64, 128), (128, 128)):
                out.append(QuantizeConfig(bm, bn, warps, 1, max(bm * bn, 16384)))
    return out


# ------------------------------------------------------------------------------------------ main


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="first shape only")
    ap.add_argument("--phases", default="check,time,sweep", help="subset of check,time,sweep")
    ap.add_argument("--no-sweep", action="store_true", help="same as --phases check,time")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated case names (see CASES)")
    ap.add_argument("--shapes", default=None, help="e.g. 16384x1024,8192x8192")
    ap.add_argument("--samples", type=int, default=3 if INTERPRET else 11)
    ap.add_argument("--reps", type=int, default=2 if INTERPRET else 8)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="input dtype (the PTQ prefill's LayerNorm reads the float32 residual stream)")
    ap.add_argument(
        "--json",
        metavar="PATH",
        help="write the results as JSON to PATH (default: $OUT/quantize_kernels.json when OUT is set)",
    )
    return ap.parse_args()


def run_checks(shapes, cases, seed, results, dtype) -> bool:
    all_ok = True
    for m, n in shapes + ([] if INTERPRET else [(1000, 1030)]):  # + one ragged shape
        x = (jax.random.normal(jax.random.key(m + n), (m, n)) * 2).astype(dtype)
        for case in cases:
            try:
                r = check(case, x, seed)
            except Exception as e:  # keep going: report every case
                traceback.print_exc()
                r = {"case": case, "shape": [m, n], "ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
            all_ok &= bool(r["ok"])
            results["checks"].append(r)
            log("check", case, (m, n), "OK" if r["ok"] else f"FAIL {r}")
    log("correctness:", "ALL OK" if all_ok else "FAILURES (see above)")
    return all_ok


def run_timings(shapes, cases, seed, args, results) -> None:
    for m, n in shapes:
        x = (jax.random.normal(jax.random.key(1), (m, n)) * 2).astype(args.dtype)
        t_copy = device_time(copy_step, x, args.samples, args.reps)
        copy_gbs = 2 * x.size * x.dtype.itemsize / t_copy / 1e9
        results["timings"].append({"case": "copy", "shape": [m, n], "ms": t_copy * 1e3, "GB/s": copy_gbs})
        log(f"copy {m}x{n}: {t_copy * 1e3:.4f} ms, {copy_gbs:.0f} GB/s")
        for case in cases:
            nbytes = bytes_moved(case, m, n, x.dtype.itemsize)
            row = {"case": case, "shape": [m, n], "bytes": nbytes}
            for impl in ("pallas", "xla"):
                try:
                    op = make_op(case, m, n, seed, None, reference=impl == "xla")
                    t = device_time(lambda x, c, op=op: op(x), x, args.samples, args.reps)
                    gbs = nbytes / t / 1e9
                    row[impl] = {"ms": t * 1e3, "GB/s": gbs, "frac_copy": gbs / copy_gbs}
                except Exception as e:
                    traceback.print_exc()
                    row[impl] = {"error": f"{type(e).__name__}: {e}"[:300]}
            results["timings"].append(row)
            log("time", case, (m, n), json.dumps({k: row[k] for k in ("pallas", "xla")}))


def run_sweep(shapes, cases, seed, args, results) -> None:
    for m, n in shapes:
        x = (jax.random.normal(jax.random.key(1), (m, n)) * 2).astype(args.dtype)
        for case in [c for c in SWEEP_CASES if c in cases]:
            nbytes = bytes_moved(case, m, n, x.dtype.itemsize)
            best = None
            for cfg in sweep_configs(case, m, n):
                try:
                    op = make_op(case, m, n, seed, cfg, reference=False)
                    t = device_time(lambda x, c, op=op: op(x), x, max(3, args.samples // 2), args.reps)
                except Exception as e:
                    log("sweep", case, (m, n), cfg, "failed:", f"{type(e).__name__}: {e}"[:200])
                    continue
                gbs = nbytes / t / 1e9
                results["sweep"].append({"case": case, "shape": [m, n], "config": cfg.__dict__, "GB/s": gbs})
                if best is None or gbs > best[1]:
                    best = (cfg, gbs)
            if best:
                log(f"sweep best {case} {m}x{n}: {best[0]} {best[1]:.0f} GB/s")


def print_table(results) -> None:
    print("\n| case | shape | pallas ms | pallas GB/s | frac of copy | xla ms | xla GB/s | xla/pallas time |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results["timings"]:
        if r["case"] == "copy":
            print(f"| copy | {r['shape']} | {r['ms']:.4f} | {r['GB/s']:.0f} | 1.00 | | | |")
            continue
        p, xl = r.get("pallas", {}), r.get("xla", {})
        if "ms" in p and "ms" in xl:
            print(f"| {r['case']} | {r['shape']} | {p['ms']:.4f} | {p['GB/s']:.0f} | {p['frac_copy']:.2f} | "
                  f"{xl['ms']:.4f} | {xl['GB/s']:.0f} | {xl['ms'] / p['ms']:.2f}x |")
        else:
            print(f"| {r['case']} | {r['shape']} | error | | | | | |")
    best = {}
    for s in results["sweep"]:
        k = (s["case"], tuple(s["shape"]))
        if k not in best or s["GB/s"] > best[k]["GB/s"]:
            best[k] = s
    if best:
        print("\n| sweep case | shape | best config | GB/s |\n| --- | --- | --- | --- |")
        for (case, shape), s in best.items():
            c = s["config"]
            print(f"| {case} | {list(shape)} | bm={c['block_m']} bn={c['block_n']} warps={c['num_warps']} "
                  f"budget={c['max_block_elems']} row_stats_cols={c['xla_row_stats_cols']} | "
                  f"{s['GB/s']:.0f} |")


def main() -> None:
    args = parse_args()
    log("devices:", jax.devices(), "jax", jax.__version__, "interpret" if INTERPRET else "compiled")
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    else:
        shapes = [(64, 256), (40, 200)] if INTERPRET else [(16384, 1024), (16384, 4096), (8192, 8192)]
    shapes = shapes[:1] if args.quick else shapes
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; choose from {list(CASES)}")
    phases = set(args.phases.split(",")) - ({"sweep"} if args.no_sweep else set())
    seed = noise_seed(jax.random.key(0))
    results = {"device": str(jax.devices()[0]), "jax": jax.__version__, "dtype": args.dtype}
    results.update(checks=[], timings=[], sweep=[])
    path = args.json or (os.path.join(os.environ["OUT"], "quantize_kernels.json") if os.environ.get("OUT") else None)

    def save() -> None:  # after every phase, so a run cut short still leaves its results
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps(results, indent=1, default=str))

    all_ok = True
    if "check" in phases:
        all_ok = run_checks(shapes, cases, seed, results, args.dtype)
        save()
    if "time" in phases:
        run_timings(shapes, cases, seed, args, results)
        save()
    if "sweep" in phases:
        run_sweep(shapes, cases, seed, args, results)
        save()
    print_table(results)
    if "check" in phases:
        print("\ncorrectness:", "ALL OK" if all_ok else "FAILURES")


if __name__ == "__main__":
    main()
