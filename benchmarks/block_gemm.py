"""Block-scaled INT8 GEMM: the Mosaic GPU kernel against the Triton kernel and XLA bf16, in one run.

    PYTHONPATH=. python3 benchmarks/block_gemm.py                      # small default: 2048^3, G=128
    PYTHONPATH=. python3 benchmarks/block_gemm.py --preset full --json $OUT/block_gemm.json

Shapes (M x N x K, both operands K-contiguous as int8 wgmma takes them): ``sq<d>`` is d^3; ``h<d>_fwd``,
``_dgrad``, ``_wgrad`` are the three training GEMMs of a d -> 4d linear layer over 16384 tokens:
forward Y = X W (16384 x 4d x d), grad-input dX = dY W^T (16384 x d x 4d), grad-weight dW = dY^T X
(4d x d x 16384). A's scales are per (1 x G) row tile, B's per (G x G) block (DeepSeek-style at G = 128;
``--a-square`` takes (G x G) for A too). Every kernel's output is first checked against
``int8_matmul_block_scaled_reference`` (max |error| over max |reference|), then timed: ``--reps`` calls back
to back per sample, median of ``--iters`` samples after ``--warmup`` samples. TOP/s count 2 M N K.
``--variants`` times extra Mosaic configs (a JSON list of ``BlockTileConfig`` field overrides) at every G.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp

from jq8.quant import QuantSpec, quantize
from pallas_kernels import int8_matmul_block_mgpu as bm
from pallas_kernels.int8_matmul_block_scaled import int8_matmul_block_scaled, int8_matmul_block_scaled_reference

TOKENS = 16384
NT = (((1,), (1,)), ((), ()))  # contract both operands' last (K) axis


def shapes_of(name: str) -> tuple[int, int, int]:
    """(M, N, K) of a shape name (see the module docstring)."""
    if name.startswith("sq"):
        d = int(name[2:])
        return d, d, d
    d, layout = name[1:].split("_")
    d = int(d)
    return {"fwd": (TOKENS, 4 * d, d), "dgrad": (TOKENS, d, 4 * d), "wgrad": (4 * d, d, TOKENS)}[layout]


PRESETS = {
    "small": ["sq2048"],
    "full": ["sq8192"] + [f"h{d}_{lay}" for d in (4096, 2048, 1024) for lay in ("fwd", "dgrad", "wgrad")],
}


def ms_per_call(fn, *xs, reps: int, iters: int, warmup: int) -> float:
    """ms per call: ``reps`` calls back to back per sample, median of ``iters`` samples."""
    for _ in range(warmup):
        jax.block_until_ready([fn(*xs) for _ in range(reps)])
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready([fn(*xs) for _ in range(reps)])
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3 / reps


def operands(m: int, n: int, k: int, g: int, a_square: bool, seed: int = 0):
    """Activation-like A (a few outlier channels) and weight-like B, quantized with K groups of g."""
    ks = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(ks[0], (m, k), jnp.float32)
    x = x.at[:, :: max(1, k // 8)].multiply(30.0)
    w = jax.random.normal(ks[1], (n, k), jnp.float32) * 0.02
    qa = quantize(x, QuantSpec((g if a_square else 1, g)))
    qb = quantize(w, QuantSpec((g, g)))
    return qa.values, qa.scale, qb.values, qb.scale


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--shapes", nargs="*", help="shape names instead of the preset (sq<d>, h<d>_fwd|dgrad|wgrad)")
    p.add_argument("--groups", nargs="*", type=int, default=[128], help="K groups G of the Mosaic kernel")
    p.add_argument("--triton-groups", nargs="*", type=int, default=None,
                   help="K groups of the Triton kernel (default: the same as --groups)")  # fmt: skip
    p.add_argument("--out-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--a-square", action="store_true", help="A's scales per (G x G) block, not (1 x G)")
    p.add_argument("--variants", default="[]", help="JSON list of BlockTileConfig overrides to time too")
    p.add_argument("--variant-groups", nargs="*", type=int, default=None,
                   help="time --variants only at these K groups (default: every group)")  # fmt: skip
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-check", action="store_true", help="skip the comparison with the reference")
    p.add_argument("--json", help="write the results here (atomically)")
    args = p.parse_args(argv)
    try:
        variants = json.loads(args.variants)
        assert isinstance(variants, list) and all(isinstance(v, dict) for v in variants)
    except (ValueError, AssertionError):
        print(f"error: --variants must be a JSON list of objects, got {args.variants!r}", file=sys.stderr)
        return 2
    names = args.shapes or PRESETS[args.preset]
    try:
        shapes = {name: shapes_of(name) for name in names}
    except (ValueError, KeyError):
        print(f"error: shape names are sq<d> or h<d>_fwd|dgrad|wgrad, got {names}", file=sys.stderr)
        return 2
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        print(f"error: --json's folder does not exist: {args.json}", file=sys.stderr)
        return 2
    out_dtype = jnp.dtype(args.out_dtype)
    triton_groups = args.groups if args.triton_groups is None else args.triton_groups
    timing = dict(reps=args.reps, iters=args.iters, warmup=args.warmup)
    print(jax.devices()[0].device_kind, "jax", jax.__version__, flush=True)

    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "argv": sys.argv[1:], "shapes": {}}
    for name, (m, n, k) in shapes.items():
        tops = 2 * m * n * k / 1e12
        row = {"m": m, "n": n, "k": k, "runs": []}
        x = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16)
        w = jax.random.normal(jax.random.key(2), (n, k), jnp.bfloat16)
        bf16 = jax.jit(lambda x, w: jax.lax.dot_general(x, w, NT, preferred_element_type=jnp.bfloat16))
        row["bf16_ms"] = ms_per_call(bf16, x, w, **timing)
        del x, w
        print(f"{name} {m}x{n}x{k}: XLA bf16 {row['bf16_ms']:.4f} ms {tops / row['bf16_ms'] * 1e3:.0f} TOP/s",
              flush=True)  # fmt: skip

        def run(label, g, fn, ops, cfg=None, row=row, tops=tops):
            entry = {"kernel": label, "group": g, "config": dataclasses.asdict(cfg) if cfg else None}
            try:
                if not args.no_check:
                    out = fn(*ops).astype(jnp.float32)
                    ref = int8_matmul_block_scaled_reference(*ops, out_dtype=jnp.float32)
                    scale = float(jnp.max(jnp.abs(ref)))
                    entry["err"] = float(jnp.max(jnp.abs(out - ref))) / scale
                    del out, ref
                t = ms_per_call(fn, *ops, **timing)
                entry.update(ms=t, tops=tops / t * 1e3, x_bf16=row["bf16_ms"] / t)
                err = entry.get("err", float("nan"))
                print(f"  {label:8s} G={g:3d} {t:.4f} ms {entry['tops']:6.0f} TOP/s {entry['x_bf16']:.2f}x bf16"
                      f" err {err:.1e}" + (f" {cfg}" if cfg else ""), flush=True)  # fmt: skip
            except Exception as e:  # noqa: BLE001 - report each failure and go on with the next kernel
                entry["error"] = "".join(traceback.format_exception_only(type(e), e))[-2000:]
                print(f"  {label:8s} G={g:3d} FAILED {entry['error']}" + (f" {cfg}" if cfg else ""), flush=True)
            row["runs"].append(entry)

        for g in sorted(set(args.groups) | set(triton_groups)):
            ops = operands(m, n, k, g, args.a_square)
            if g in triton_groups:
                tri = jax.jit(lambda a, sa, b, sb: int8_matmul_block_scaled(a, sa, b, sb, out_dtype=out_dtype))
                run("triton", g, tri, ops)
            if g not in args.groups:
                continue
            try:
                base = bm.fit_config(m, n, k, g, out_dtype=out_dtype)
            except ValueError as e:
                row["runs"].append({"kernel": "mosaic", "group": g, "error": str(e)})
                print(f"  mosaic   G={g:3d} unsupported: {e}", flush=True)
                continue
            cfgs = [base]
            for over in variants if args.variant_groups is None or g in args.variant_groups else []:
                try:
                    cfgs.append(bm.fit_config(m, n, k, g, out_dtype=out_dtype, **over))
                except (ValueError, TypeError) as e:
                    print(f"  mosaic   G={g:3d} variant {over} skipped: {e}", flush=True)
            for cfg in dict.fromkeys(cfgs):
                f = jax.jit(lambda a, sa, b, sb, cfg=cfg: bm.int8_matmul_block_mgpu(
                    a, sa, b, sb, out_dtype=out_dtype, config=cfg))  # fmt: skip
                run("mosaic", g, f, ops, cfg if cfg != base else None)
            del ops
        results["shapes"][name] = row
        if args.json:  # after every shape: a run cut short keeps what it measured
            write_json(args.json, results)

    print("\nshape           M x N x K              bf16 TOP/s | best Mosaic per G: TOP/s (x bf16) | Triton")
    for name, row in results["shapes"].items():
        tops = 2 * row["m"] * row["n"] * row["k"] / 1e12
        cells = []
        for kind in ("mosaic", "triton"):
            for g in sorted({r["group"] for r in row["runs"] if r["kernel"] == kind}):
                ok = [r for r in row["runs"] if r["kernel"] == kind and r["group"] == g and "ms" in r]
                if ok:
                    best = min(ok, key=lambda r: r["ms"])
                    cells.append(f"{kind[0]}G{g} {best['tops']:.0f} ({best['x_bf16']:.2f}x)")
                else:
                    cells.append(f"{kind[0]}G{g} -")
        shape = f"{row['m']}x{row['n']}x{row['k']}"
        print(f"{name:15s} {shape:22s} {tops / row['bf16_ms'] * 1e3:6.0f} | " + "  ".join(cells))
    return 0


def write_json(path: str, results: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
