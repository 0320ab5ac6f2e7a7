"""The LayerNorm backward kernel (``pallas_kernels/norm_backward.py``) against XLA's jitted reference.

    PYTHONPATH=. python3 benchmarks/norm_backward.py [--m 16384] [--d 4096] [--configs 1x32x8 0x64x0x2048]
    PYTHONPATH=. python3 benchmarks/norm_backward.py --tiny  # CPU smoke test: small shapes, interpret mode

Inputs as the Jetfire block has them: x the LN input as a QArray of 32 x 32 blocks, dh f32, residual_grad
f32, dx f32 (``--rms``, ``--no-beta`` for RMSNorm / no bias). Per config: max error of dx / dgamma / dbeta
against the reference on the device (relative to the reference's max |value|), ms per call (``--reps``
calls back to back, median of ``--iters`` samples) and GB/s of the bytes that must move (dh, x codes and
scales, residual_grad read once, dx written once). ``stream`` is an XLA elementwise pass over the same
bytes (dh + codes + residual_grad -> f32): about what the memory system gives a one-pass kernel.
Configs are BLOCKROWSxROWSPERPROGRAMxWARPS[xBUDGET[xSTAGES]], 0 = the planner's choice
(``NormBackwardConfig`` None; budget and stages: its defaults). Writes ``$OUT/norm_backward.json`` when
OUT is set.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
from jax import lax

from benchmarks.mgpu_gemm import ms_per_call
from jq8.quant import QuantSpec, quantize
from pallas_kernels import norm_backward as nb

# the default first, then rows per program, warps, rows per block, and the column sweep (budget 2048)
CONFIGS = ["0x0x0", "0x16x0", "0x64x0", "0x128x0", "0x256x0", "0x0x4", "0x0x16", "2x0x0", "2x64x16",
           "4x64x16x16384", "0x0x0x0x2", "0x0x0x2048", "0x64x0x2048", "4x64x0x2048"]  # fmt: skip
TINY_CONFIGS = ["0x0x0", "2x8x4", "0x8x0x64"]


def parse_config(text: str) -> nb.NormBackwardConfig:
    """BLOCKROWSxROWSPERPROGRAMxWARPS[xBUDGET[xSTAGES]] -> the config; 0 = the default."""
    fields = [int(v) for v in text.split("x")]
    if not 3 <= len(fields) <= 5:
        raise ValueError(f"config {text!r}: expected BLOCKROWSxROWSPERPROGRAMxWARPS[xBUDGET[xSTAGES]]")
    rows, per_program, warps = (v or None for v in fields[:3])
    cfg = nb.NormBackwardConfig(block_rows=rows, rows_per_program=per_program, num_warps=warps)
    extra = dict(zip(("max_block_elems", "num_stages"), fields[3:]))
    return dataclasses.replace(cfg, **{k: v for k, v in extra.items() if v})


def make_inputs(m: int, d: int, rms: bool):
    """(dh, x QArray 32x32, mean, rstd, gamma, residual_grad): fresh random, mean / rstd from the forward."""
    ks = jax.random.split(jax.random.key(0), 5)
    x = quantize(jax.random.normal(ks[0], (m, d)) * 2.0 + 0.5, QuantSpec.blocks((32, 32)))
    xf = x.dequantize(jnp.float32)
    mean = jnp.zeros((m,)) if rms else jnp.mean(xf, axis=1)
    rstd = lax.rsqrt(jnp.mean(jnp.square(xf - mean[:, None]), axis=1) + 1e-5)
    dh = jax.random.normal(ks[1], (m, d)) * 1e-2
    gamma = 1.0 + 0.1 * jax.random.normal(ks[2], (d,))
    rg = jax.random.normal(ks[3], (m, d)) * 1e-2
    return dh, x, mean, rstd, gamma, rg


def max_errors(got, ref) -> dict:
    out = {}
    for name, g, r in zip(("dx", "dgamma", "dbeta"), got, ref):
        if r is not None:
            err = jnp.max(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32)))
            out[f"{name}_rel_err"] = float(err / jnp.max(jnp.abs(r.astype(jnp.float32))))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, default=16384)
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--rms", action="store_true", help="RMSNorm (mean zeros, no centring term)")
    p.add_argument("--no-beta", action="store_true", help="no dbeta output")
    p.add_argument("--configs", nargs="+", default=None, metavar="BRxRPPxWARPS[xBUDGET[xSTAGES]]",
                   help="configs to time (default: a sweep; 0 = the planner's choice)")
    p.add_argument("--tiny", action="store_true", help="small ragged shapes, interpret mode on CPU")
    p.add_argument(
        "--json",
        metavar="PATH",
        help="write the results as JSON to PATH (default: $OUT/norm_backward.json when OUT is set)",
    )
    args = p.parse_args()
    if args.tiny:
        args.m, args.d, args.iters, args.reps = 70, 200, 1, 1
    texts = args.configs or (TINY_CONFIGS if args.tiny else CONFIGS)
    print(jax.devices(), jax.__version__, flush=True)
    ms = functools.partial(ms_per_call, reps=args.reps, iters=args.iters)
    m, d, rms, has_beta = args.m, args.d, args.rms, not args.no_beta

    dh, x, mean, rstd, gamma, rg = make_inputs(m, d, rms)
    kw = dict(rms=rms, has_beta=has_beta, out_dtype=jnp.float32)
    moved = (dh.nbytes + x.values.nbytes + x.scale.nbytes + rg.nbytes + m * d * 4  # dx
             + mean.nbytes + rstd.nbytes + gamma.nbytes + d * 4 * (1 + has_beta))  # fmt: skip
    results = {"m": m, "d": d, "rms": rms, "has_beta": has_beta, "device": str(jax.devices()[0]),
               "jax": jax.__version__, "bytes": moved}  # fmt: skip

    def gbps(t_ms: float) -> float:
        return moved / (t_ms * 1e-3) / 1e9

    reference = jax.jit(lambda dh, x, mean, rstd, gamma, rg: nb.layer_norm_backward_reference(
        dh, x, mean, rstd, gamma, residual_grad=rg, **kw))  # fmt: skip
    stream = jax.jit(lambda dh, codes, rg: dh + codes.astype(jnp.float32) + rg)
    args_ = (dh, x, mean, rstd, gamma, rg)
    ref = reference(*args_)
    results["xla_ms"] = ms(reference, *args_)
    results["xla_gbps"] = gbps(results["xla_ms"])
    results["stream_ms"] = ms(stream, dh, x.values, rg)
    results["stream_gbps"] = gbps(results["stream_ms"])
    print({k: v for k, v in results.items()}, flush=True)

    rows = []
    for text in texts:
        cfg = parse_config(text)
        row = {"config": text}
        try:
            plan = nb.plan_norm_backward(m, d, cfg)
            row["plan"] = dict(block_rows=plan.bm, block_cols=plan.bn, rows_per_program=plan.rows_per_program,
                               sweep=plan.sweep, num_warps=plan.num_warps, num_stages=plan.num_stages,
                               programs=plan.grid)
            kernel = jax.jit(lambda dh, x, mean, rstd, gamma, rg, cfg=cfg: nb.layer_norm_backward(
                dh, x, mean, rstd, gamma, residual_grad=rg, config=cfg, **kw))  # fmt: skip
            row.update(max_errors(kernel(*args_), ref))
            row["ms"] = ms(kernel, *args_)
            row["gbps"] = gbps(row["ms"])
            row["speedup_vs_xla"] = results["xla_ms"] / row["ms"]
        except Exception as e:  # noqa: BLE001 - report and go on to the next config
            row["error"] = str(e)[-500:]
        print(row, flush=True)
        rows.append(row)
    results["configs"] = rows
    path = args.json or (os.path.join(os.environ["OUT"], "norm_backward.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
