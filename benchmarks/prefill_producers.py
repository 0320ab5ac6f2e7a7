"""Prefill-size quantizing producers by tile: LayerNorm + quantize and per-token quantize at M = 8192.

    PYTHONPATH=. python3 benchmarks/prefill_producers.py              # H100
    PYTHONPATH=. python3 benchmarks/prefill_producers.py --quick      # CPU smoke (interpret mode)

The W8A8 prefill's producers are memory-bound passes over (tokens, width) activations: LayerNorm + per-token
quantize of the float32 residual stream (GPT-2 1.5B: width 1600; 124M: 768), and the per-token quantize of
fc1's bf16 output (6400 / 3072) and of the attention output (1600 / 768). Per op and width this times
each (block budget, num_warps) of ``QuantizeConfig`` (``row_block_elems=None``: the budget alone sets the
rows per program) by the device time of its kernels in a profiler trace (the sum over ``--calls`` calls,
divided), next to the default config (``row_block_elems`` planning), a float copy of the same
input (``x * c``) and the jnp reference under XLA, and reports GB/s (bytes read + written). Writes
``$OUT/prefill_producers.json`` when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from decode_producers import SPEC, device_us  # noqa: E402

from pallas_kernels.norm_quantize import layer_norm_quantize, layer_norm_quantize_reference  # noqa: E402
from pallas_kernels.quantize import QuantizeConfig, quantize_tiles, quantize_tiles_reference  # noqa: E402


def make_ops(name: str, n: int):
    """(kernel(x, config), jnp reference(x)) of one producer at width n."""
    gamma = jax.random.normal(jax.random.key(10), (n,)) * 0.1 + 1
    beta = jax.random.normal(jax.random.key(11), (n,)) * 0.1
    if name == "layer_norm_quantize":
        return (
            lambda x, c=None: layer_norm_quantize(x, gamma, beta, spec=SPEC, config=c)[0],
            lambda x: layer_norm_quantize_reference(x, gamma, beta, spec=SPEC)[0],
        )
    return lambda x, c=None: quantize_tiles(x, SPEC, config=c), lambda x: quantize_tiles_reference(x, SPEC)


def variant_ops(n: int):
    """{name: (fn(x), bytes moved)} of LayerNorm-quantize variants at width n on an f32 (M, n) x: which part
    of the kernel costs (the affine loads, the mean reduction, the f32 input, the quantize itself)."""
    gamma = jax.random.normal(jax.random.key(10), (n,)) * 0.1 + 1
    beta = jax.random.normal(jax.random.key(11), (n,)) * 0.1

    def ln(g, b, **kw):
        return lambda x: layer_norm_quantize(x, g, b, spec=SPEC, **kw)[0]

    return {
        "ln default": (ln(gamma, beta), 5),
        "ln no affine": (ln(None, None), 5),
        "ln rms, gamma": (ln(gamma, None, rms=True), 5),
        "ln bf16 input": (lambda x: ln(gamma, beta)(x.astype(jnp.bfloat16)), 3),
        "quantize f32": (lambda x: quantize_tiles(x, SPEC), 5),
        "quantize bf16": (lambda x: quantize_tiles(x.astype(jnp.bfloat16), SPEC), 3),
        "bf16 cast (XLA)": (lambda x: x.astype(jnp.bfloat16), 6),
        "sum rows (XLA)": (lambda x: jnp.sum(x, axis=1), 4),
    }


def run_variants(m: int, widths: list[int], calls: int) -> list[dict]:
    """Times :func:`variant_ops` (device time; casts to bf16 inside a variant are XLA kernels of their own,
    so "ln bf16 input" / "quantize bf16" report the kernel alone from a pre-cast input)."""
    rows = []
    for n in widths:
        x = jax.random.normal(jax.random.key(0), (m, n)) * 2
        xb = x.astype(jnp.bfloat16)
        print(f"\n== variants ({m}, {n}) float32", flush=True)
        for name, (fn, bpe) in variant_ops(n).items():
            if name in ("ln bf16 input", "quantize bf16"):
                t = device_us(jax.jit(lambda v, f=fn: f(v)), xb, calls)
            else:
                t = device_us(jax.jit(fn), x, calls)
            gbs = bpe * m * n / t / 1e3
            print(f"  {name:18s} {t:7.1f} us  {gbs:5.0f} GB/s ({bpe} bytes/element)", flush=True)
            rows.append(dict(variant=name, m=m, n=n, us=t, bytes_per_element=bpe))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=8192)
    ap.add_argument("--ln-widths", default="1600,768")
    ap.add_argument("--quant-widths", default="6400,1600,3072,768")
    ap.add_argument("--budgets", default="2048,4096,8192,16384,32768")
    ap.add_argument("--warps", default="2,4,8,16")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--variants", default="", help="widths of LayerNorm-quantize variants to time, then exit")
    ap.add_argument(
        "--json",
        metavar="PATH",
        help="write the results as JSON to PATH (default: $OUT/prefill_producers.json when OUT is set)",
    )
    args = ap.parse_args()
    if args.variants:
        m = 16 if args.quick else args.m
        run_variants(m, [int(v) for v in args.variants.split(",")], 2 if args.quick else args.calls)
        return
    if args.quick:
        args.m, args.ln_widths, args.quant_widths = 16, "200", "200"
        args.budgets, args.warps, args.calls = "16384", "4", 2
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, M = {args.m}", flush=True)
    cases = [("layer_norm_quantize", int(n), jnp.float32) for n in args.ln_widths.split(",") if n]
    cases += [("quantize_tiles", int(n), jnp.bfloat16) for n in args.quant_widths.split(",") if n]
    rows = []
    for name, n, dtype in cases:
        x = (jax.random.normal(jax.random.key(0), (args.m, n)) * 2).astype(dtype)
        kernel, reference = make_ops(name, n)
        nbytes = x.size * x.dtype.itemsize + x.size + 4 * args.m
        gbs = lambda us, b=nbytes: b / us / 1e3  # noqa: E731
        t_copy = device_us(jax.jit(lambda x: x * jnp.asarray(1.5, x.dtype)), x, args.calls)
        t_xla = device_us(jax.jit(reference), x, args.calls)
        t_default = device_us(jax.jit(kernel), x, args.calls)
        print(
            f"\n== {name} ({args.m}, {n}) {jnp.dtype(dtype).name}: copy {t_copy:.1f} us "
            f"({2 * x.size * x.dtype.itemsize / t_copy / 1e3:.0f} GB/s), XLA {t_xla:.1f} us, "
            f"default config {t_default:.1f} us ({gbs(t_default):.0f} GB/s)",
            flush=True,
        )
        row = dict(
            op=name,
            m=args.m,
            n=n,
            dtype=jnp.dtype(dtype).name,
            bytes=nbytes,
            copy_us=t_copy,
            xla_us=t_xla,
            default_us=t_default,
            configs=[],
        )
        for budget in (int(b) for b in args.budgets.split(",")):
            for warps in (int(w) for w in args.warps.split(",")):
                cfg = QuantizeConfig(
                    block_m=64, num_warps=warps, max_block_elems=budget, row_block_elems=None
                )
                try:
                    t = device_us(jax.jit(lambda x, c=cfg, f=kernel: f(x, c)), x, args.calls)
                except Exception as e:  # a config the compiler rejects: report it and go on
                    print(f"  budget {budget:6d} warps {warps:2d}: failed {type(e).__name__}: {e}"[:200])
                    continue
                row["configs"].append(dict(budget=budget, warps=warps, us=t))
                print(
                    f"  budget {budget:6d} warps {warps:2d}: {t:7.1f} us  {gbs(t):5.0f} GB/s  "
                    f"(x{t_default / t:4.2f} default)",
                    flush=True,
                )
        best = min(row["configs"], key=lambda r: r["us"])
        print(f"  best: budget {best['budget']} warps {best['warps']} {best['us']:.1f} us", flush=True)
        rows.append(row)
    path = args.json or (os.path.join(os.environ["OUT"], "prefill_producers.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
