"""The int8-row policy's LayerNorm forward: today's unfused route against the fused two-pass kernel.

    PYTHONPATH=. python3 benchmarks/norm_forward_rows.py [--m 16384] [--d 4096] [--configs 32x128x4 ...]
        [--stats-configs 32x8192x0 ...] [--tiny]

On the same fp32 x (M, D), gamma, beta:
(a) "today": what jq8/jetfire_ops.layer_norm_fwd runs under granularity="row" (policy.fused is False):
    XLA LayerNorm statistics and a bf16 y, ``quantize_tiles(y, per-row, transposed_spec=per-row)`` (its
    statistics pre-pass + quantize pass), then ``quantize_tiles(x, 32x32 blocks)``: the INT8 copy of the
    LayerNorm input kept for the backward.
(b) "fused": ``layer_norm_quantize(x, gamma, beta, spec=per-row, transposed_spec=per-row,
    input_spec=32x32 blocks)``: a statistics pass and a full-grid quantize pass that also writes x's codes.
ms per call (``--reps`` calls back to back, median of ``--iters`` samples), GB/s of the bytes that must
move (read x once; write the three INT8 arrays, their scales, mean and rstd), the fused kernel's pass 1
alone, an XLA pass with the same bytes (``copy``), and the largest code difference between (a) and (b)
(y is bf16 in (a), fp32 in (b); x's codes should agree exactly). Then a config sweep of the fused call:
``--configs BMxBNxWARPS`` (the quantize pass) with the default pass 1, ``--stats-configs ROWSxELEMSxWARPS``
(pass 1, ``RowStatsConfig``; WARPS 0 = default) with the default quantize pass. Also ZeroQuant's prefill
LayerNorm (M = 8192, D = 1600 fp32, per-row codes of y only: the one-pass route, whose plan this change
keeps). Writes ``$OUT/norm_forward_rows.json`` when OUT is set. ``--tiny``: a CPU smoke run in interpret
mode at a small shape.
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.mgpu_gemm import ms_per_call
from jq8.quant import QuantSpec
from jq8.training.jetfire_ops import layer_norm_float
from pallas_kernels import norm_quantize as nq
from pallas_kernels.quantize import AXIS_STATS_CONFIG, QuantizeConfig, quantize_tiles

P, B32 = QuantSpec.per_row(), QuantSpec.blocks((32, 32))
EPS = 1e-5
CONFIGS = [(32, 128, 4), (64, 128, 4), (32, 256, 8), (64, 64, 4), (16, 256, 4), (128, 128, 8)]
STATS_CONFIGS = [(32, 8192, 0), (32, 4096, 4), (16, 8192, 8), (64, 8192, 8), (32, 16384, 8), (64, 4096, 4)]


def today(x, gamma, beta, interpret):
    """jetfire_ops.layer_norm_fwd's row-granularity route, with the kernels it calls today."""
    h, mean, rstd = layer_norm_float(x, gamma, beta, eps=EPS, rms=False)
    q, qt = quantize_tiles(h.astype(jnp.bfloat16), P, transposed_spec=P, interpret=interpret)
    xq = quantize_tiles(x, B32, interpret=interpret)
    return q, qt, xq, mean, rstd


def fused(x, gamma, beta, interpret, config=None, stats_config=None):
    return nq.layer_norm_quantize(x, gamma, beta, eps=EPS, spec=P, transposed_spec=P, input_spec=B32,
                                  config=config, stats_config=stats_config, interpret=interpret)


def stats_pass(x, gamma, beta, interpret):
    """The fused kernel's pass 1 alone (mean, rstd, y's row absmax and column partials, reduced)."""
    stats = (("y", (1, -1)), ("y", (-1, 1)))
    return nq._row_stats_pass(x, gamma, beta, stats=stats, eps=EPS, rms=False, config=AXIS_STATS_CONFIG,
                              stats_config=nq.RowStatsConfig(), interpret=interpret)


def code_diff(a, b) -> dict:
    va, vb = np.asarray(a.values, np.int32), np.asarray(b.values, np.int32)
    sa, sb = np.asarray(a.scale), np.asarray(b.scale)
    return {"max_code_diff": int(np.abs(va - vb).max()), "frac_equal": float((va == vb).mean()),
            "max_scale_rel_diff": float(np.max(np.abs(sa - sb) / np.maximum(np.abs(sb), 1e-30)))}


def parse(configs: list[str]) -> list[tuple[int, ...]]:
    return [tuple(int(v) for v in c.split("x")) for c in configs]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, default=16384)
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--configs", nargs="*", default=None, metavar="BMxBNxWARPS",
                   help="quantize-pass configs to sweep (default: a small sweep; none: skip)")
    p.add_argument("--stats-configs", nargs="*", default=None, metavar="ROWSxELEMSxWARPS",
                   help="pass-1 RowStatsConfigs to sweep, WARPS 0 = default (default: a small sweep)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: interpret mode, small shapes")
    p.add_argument(
        "--json",
        metavar="PATH",
        help="write the results as JSON to PATH (default: $OUT/norm_forward_rows.json when OUT is set)",
    )
    args = p.parse_args()
    interpret = True if args.tiny else None
    if args.tiny:
        args.m, args.d, args.iters, args.reps = 70, 200, 1, 1
    configs = parse(args.configs) if args.configs is not None else CONFIGS
    stats_configs = parse(args.stats_configs) if args.stats_configs is not None else STATS_CONFIGS
    if args.tiny:
        configs, stats_configs = configs[:1], stats_configs[:1]
    print(jax.devices(), jax.__version__, flush=True)
    ms = functools.partial(ms_per_call, reps=args.reps, iters=args.iters)
    m, d = args.m, args.d
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (m, d)) * jnp.exp(0.5 * jax.random.normal(k[1], (m, 1))) + 0.5
    gamma = 1.0 + 0.2 * jax.random.normal(k[2], (d,))
    beta = 0.1 * jax.random.normal(k[3], (d,))
    # Bytes that must move: x read once; q, qT, xq written, with their scales, mean and rstd.
    must_move = m * d * 4 + 3 * m * d + 4 * (m + d + m * d // 1024 + 2 * m)
    results = {"m": m, "d": d, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
               "bytes_must_move": must_move}

    def timed(name, fn, *xs):
        t = ms(fn, *xs)
        results[name] = {"ms": t, "GB/s": must_move / t / 1e6}
        print(name, results[name], flush=True)

    today_fn = jax.jit(functools.partial(today, interpret=interpret))
    fused_fn = jax.jit(functools.partial(fused, interpret=interpret))
    timed("today", today_fn, x, gamma, beta)
    timed("fused", fused_fn, x, gamma, beta)
    results["fused_stats_pass_ms"] = ms(jax.jit(functools.partial(stats_pass, interpret=interpret)), x, gamma,
                                        beta)
    i8 = jnp.int8
    copy = jax.jit(lambda x: ((x * 3).astype(i8), (x * 5).astype(i8).T, (x * 7).astype(i8)))
    results["copy_ms"] = ms(copy, x)
    a, b = today_fn(x, gamma, beta), fused_fn(x, gamma, beta)
    results["today_vs_fused"] = {name: code_diff(qa, qb) for name, qa, qb in zip(("q", "qT", "xq"), a, b)}
    results["today_vs_fused"]["max_rstd_rel_diff"] = float(jnp.max(jnp.abs(a[4] - b[4]) / a[4]))
    print({k: results[k] for k in ("fused_stats_pass_ms", "copy_ms", "today_vs_fused")}, flush=True)

    rows = []
    for bm, bn, warps in configs:
        cfg = QuantizeConfig(block_m=bm, block_n=bn, num_warps=warps, max_block_elems=max(16384, bm * bn))
        rows.append({"quantize_pass": [bm, bn, warps], "fn": functools.partial(fused, config=cfg)})
    for r, elems, warps in stats_configs:
        sc = nq.RowStatsConfig(rows=r, block_elems=elems, num_warps=warps or None)
        rows.append({"stats_pass": [r, elems, warps], "fn": functools.partial(fused, stats_config=sc)})
    for row in rows:
        fn = row.pop("fn")
        try:
            row["ms"] = ms(jax.jit(functools.partial(fn, interpret=interpret)), x, gamma, beta)
            row["GB/s"] = must_move / row["ms"] / 1e6
        except Exception as e:  # noqa: BLE001 - report and go on to the next config
            row["error"] = str(e)[-500:]
        print(row, flush=True)
    results["sweep"] = rows

    # ZeroQuant's prefill LayerNorm: per-row codes of y only, the one-pass route (plan unchanged).
    pm, pd = (16, 200) if args.tiny else (8192, 1600)
    xp = jax.random.normal(k[0], (pm, pd))
    gp, bp = gamma[:1] * jnp.ones((pd,)), beta[:1] * jnp.ones((pd,))
    route, plan, _ = nq.norm_plan(pm, pd, ((P, False),))
    prefill = jax.jit(lambda x, g, b: nq.layer_norm_quantize(x, g, b, eps=EPS, spec=P, interpret=interpret))
    t = ms(prefill, xp, gp, bp)
    moved = pm * pd * 4 + pm * pd + 4 * 3 * pm
    results["prefill"] = {"m": pm, "d": pd, "route": route, "plan": [plan.bm, plan.bn, plan.row_blocks],
                          "ms": t, "GB/s": moved / t / 1e6}
    print("prefill", results["prefill"], flush=True)
    path = args.json or (os.path.join(os.environ["OUT"], "norm_forward_rows.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
