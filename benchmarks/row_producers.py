"""The int8-row policy's GELU producers alone: forward (u -> per-row codes of a and of a.T) and backward
(da, u -> per-row codes of du and du.T, stochastic rounding), over block shapes and warps.

    PYTHONPATH=. python3 benchmarks/row_producers.py [--m 16384] [--n 16384] [--iters 10] [--configs 32x128x4]

Each kernel is timed whole (statistics pre-pass + quantize pass), the backward also with round-to-nearest,
against a plain XLA pass over the same bytes (read u [and da], write two INT8 arrays). ms per call:
``--reps`` calls back to back, median of ``--iters`` samples. Writes ``$OUT/row_producers.json``
when OUT is set.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp

from benchmarks.mgpu_gemm import ms_per_call
from jq8.quant import QuantSpec, noise_seed, quantize
from pallas_kernels import gelu_quantize as gq
from pallas_kernels.quantize import QuantizeConfig

P = QuantSpec.per_row()
CONFIGS = [(32, 256, None), (64, 128, 4), (128, 128, 8), (32, 128, 4), (64, 64, 4), (64, 128, 8),
           (128, 64, 8), (128, 128, 16), (16, 256, 4), (32, 64, 2), (64, 64, 2), (128, 32, 4)]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, default=16384)
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--configs", nargs="+", default=None, metavar="BMxBNxWARPS",
                   help="block configs to time, e.g. 32x128x4 (default: the whole sweep)")
    p.add_argument(
        "--json",
        metavar="PATH",
        help="write the results as JSON to PATH (default: $OUT/row_producers.json when OUT is set)",
    )
    args = p.parse_args()
    configs = CONFIGS if args.configs is None else [tuple(int(v) for v in c.split("x")) for c in args.configs]
    print(jax.devices(), jax.__version__, flush=True)
    ms = functools.partial(ms_per_call, reps=args.reps, iters=args.iters)
    m, n = args.m, args.n
    k1, k2 = jax.random.split(jax.random.key(0))
    u = quantize(jax.random.normal(k1, (m, n)) * 2, QuantSpec((1, 128)))
    da = (jax.random.normal(k2, (m, n)) * 1e-3).astype(jnp.bfloat16)
    seed = noise_seed(jax.random.key(1))
    results = {"m": m, "n": n}

    copy_fwd = jax.jit(lambda v: (v * 3, (v * 5).T))
    copy_bwd = jax.jit(lambda g, v: ((g * 3).astype(jnp.int8) + v, (v * 5 + g.astype(jnp.int8)).T))
    results["copy_fwd_ms"] = ms(copy_fwd, u.values)
    results["copy_bwd_ms"] = ms(copy_bwd, da, u.values)
    print("copy", results, flush=True)
    rows = []
    for bm, bn, warps in configs:
        cfg = QuantizeConfig(block_m=bm, block_n=bn, num_warps=warps, max_block_elems=max(16384, bm * bn))
        fwd = jax.jit(lambda u, cfg=cfg: gq.bias_gelu_quantize(u, spec=P, transposed_spec=P, config=cfg))
        bwd = jax.jit(lambda da, u, cfg=cfg: gq.gelu_backward_quantize(
            da, u, P, seed=seed, transposed_spec=P, config=cfg))  # fmt: skip
        row = {"block": [bm, bn], "warps": warps}
        try:
            row["fwd_ms"] = ms(fwd, u)
            row["bwd_ms"] = ms(bwd, da, u)
            row["bwd_nearest_ms"] = ms(jax.jit(lambda da, u, cfg=cfg: gq.gelu_backward_quantize(
                da, u, P, rounding="nearest", transposed_spec=P, config=cfg)), da, u)  # fmt: skip
            # the backward recomputing dx in its quantize pass instead of reading the pre-pass's bf16 dx
            recompute = dataclasses.replace(cfg, materialize_producer=False)
            row["bwd_recompute_ms"] = ms(jax.jit(lambda da, u, cfg=recompute: gq.gelu_backward_quantize(
                da, u, P, seed=seed, transposed_spec=P, config=cfg)), da, u)  # fmt: skip
            # what the GELU costs: the same kernel with no activation (dequantize + requantize only)
            row["fwd_no_gelu_ms"] = ms(jax.jit(lambda u, cfg=cfg: gq.bias_gelu_quantize(
                u, spec=P, transposed_spec=P, activation=None, config=cfg)), u)  # fmt: skip
        except Exception as e:  # noqa: BLE001 - report and go on to the next config
            row["error"] = str(e)[-500:]
        print(row, flush=True)
        rows.append(row)
    results["configs"] = rows
    path = args.json or (os.path.join(os.environ["OUT"], "row_producers.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
