"""The W8A8 MLP's INT8 chain fc1 -> fc2 at prefill sizes: separate quantize pass vs requantizing fc1.

    PYTHONPATH=. python3 benchmarks/fused_mlp.py [--m 8192] [--models 124m 1p5b] [--group 128 256]

Two ways to feed fc2 INT8 activations (both GEMMs on the Mosaic GPU kernel, the model's epilogues:
fc1 bias + GELU, fc2 bias + f32 residual):
- ``separate``: fc1 writes bf16, ``quantize_tiles`` makes per-token INT8 codes + (M, 1) scales for fc2;
- ``fused``: fc1's epilogue writes INT8 codes + one scale per row and per ``--group`` columns, and fc2 folds
  those (M, F / group) scales in per K step.
Per model: ms per chain and per kernel (``--reps`` calls back to back, median of ``--iters`` samples), and the
relative RMS error of fc2's output against the float chain (the same codes' float product, GELU exact, no
activation quantization). Writes ``$OUT/fused_mlp.json`` when OUT is set.
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
from jq8.quant import QuantSpec
from pallas_kernels import int8_matmul_mgpu as mg
from pallas_kernels.gemm import int8_matmul
from pallas_kernels.quantize import quantize_tiles

MODELS = {"124m": (768, 3072), "1p5b": (1600, 6400)}  # (d_model, d_ff)
TOKEN_SPEC = QuantSpec(tile=(1, -1))


def measure(m: int, d: int, f: int, group: int, ms, fc1_tile_m: int | None = None, sweep=False) -> dict:
    """One model's chain at M tokens: errors and timings (see the module docstring)."""
    ks = jax.random.split(jax.random.key(0), 8)
    x = jax.random.randint(ks[0], (m, d), -127, 128, jnp.int8)
    sx = jax.random.uniform(ks[1], (m, 1), minval=1e-3, maxval=1e-2)
    w1 = jax.random.randint(ks[2], (f, d), -127, 128, jnp.int8)
    s1 = jax.random.uniform(ks[3], (1, f), minval=1e-4, maxval=1e-3)  # fc1 pre-activations ~ N(0, 1)
    b1 = jax.random.normal(ks[4], (f,)) * 0.1
    w2 = jax.random.randint(ks[5], (d, f), -127, 128, jnp.int8)
    s2 = jax.random.uniform(ks[6], (1, d), minval=1e-4, maxval=1e-3)
    b2 = jax.random.normal(ks[7], (d,)) * 0.1
    res = jax.random.normal(ks[7], (m, d))
    fc2_epi = dict(bias=b2, residual=res, out_dtype=jnp.float32)
    spec = QuantSpec(tile=(1, group))

    def fc1_bf16(x, sx):
        return int8_matmul(x, w1, sx, s1, bias=b1, activation="gelu")

    cfg1 = mg.fit_config(m, f, d, out_group=group)
    if fc1_tile_m:
        cfg1 = dataclasses.replace(cfg1, tile_m=fc1_tile_m, epi_tile_m=min(64, fc1_tile_m))

    def fc1_requant(x, sx):
        return mg.int8_matmul_mgpu(x, w1, sx, s1, bias=b1, activation="gelu", out_spec=spec, config=cfg1)

    def fc2_per_row(q, s):
        return int8_matmul(q, w2, s, s2, **fc2_epi)

    def fc2_grouped(q, s):
        return mg.int8_matmul_mgpu(q, w2, s, s2, **fc2_epi)

    def separate(x, sx):
        uq = quantize_tiles(fc1_bf16(x, sx), TOKEN_SPEC)
        return fc2_per_row(uq.values, uq.scale)

    def fused(x, sx):
        u = fc1_requant(x, sx)
        return fc2_grouped(u.values, u.scale)

    def exact(x, sx):  # the float chain both approximate
        h = jnp.dot(x.astype(jnp.float32), w1.T.astype(jnp.float32)) * sx * s1 + b1
        u = jax.nn.gelu(h, approximate=False)
        return jnp.dot(u, w2.T.astype(jnp.float32) * s2) + b2 + res

    ref = jax.jit(exact)(x, sx)

    def rel_rms(y):
        return float(jnp.sqrt(jnp.mean((y - ref) ** 2) / jnp.mean((ref - res) ** 2)))

    fns = {name: jax.jit(fn) for name, fn in [
        ("separate", separate), ("fused", fused), ("fc1_bf16", fc1_bf16), ("fc1_requant", fc1_requant),
        ("fc2_per_row", fc2_per_row), ("fc2_grouped", fc2_grouped),
    ]}  # fmt: skip
    quant = jax.jit(lambda u: quantize_tiles(u, TOKEN_SPEC))
    u = fns["fc1_bf16"](x, sx)
    uq = quant(u)
    u8 = fns["fc1_requant"](x, sx)
    row = {
        "d": d,
        "f": f,
        "group": group,
        "fc1_config": dataclasses.asdict(cfg1),
        "separate_rel_rms": rel_rms(fns["separate"](x, sx)),
        "fused_rel_rms": rel_rms(fns["fused"](x, sx)),
        "separate_ms": ms(fns["separate"], x, sx),
        "fused_ms": ms(fns["fused"], x, sx),
        "fc1_bf16_ms": ms(fns["fc1_bf16"], x, sx),
        "quantize_ms": ms(quant, u),
        "fc2_per_row_ms": ms(fns["fc2_per_row"], uq.values, uq.scale),
        "fc1_requant_ms": ms(fns["fc1_requant"], x, sx),
        "fc2_grouped_ms": ms(fns["fc2_grouped"], u8.values, u8.scale),
    }
    row["x_separate"] = row["separate_ms"] / row["fused_ms"]
    if sweep:
        row["sweep"] = sweep_configs(m, d, f, group, ms, (x, sx, w1, s1, b1, w2, s2, fc2_epi), u8)
    return row


def sweep_configs(m, d, f, group, ms, operands, u8) -> list[dict]:
    """ms of fc1 (requantizing) and fc2 (grouped A) under other warpgroup tiles than the defaults."""
    x, sx, w1, s1, b1, w2, s2, fc2_epi = operands
    spec = QuantSpec(tile=(1, group))
    base1 = mg.fit_config(m, f, d, out_group=group)
    base2 = mg.fit_config(m, d, f, residual=True, a_group=group)
    # a warpgroup holds tile_m x group int32 accumulators: <= 128 a thread
    fc1 = [dict(tile_m=tm, wg_dim=wg) for tm in (128, 64) for wg in ("m", "n") if tm * group <= 128 * 128]
    fc2 = [dict(tile_m=64, tile_n=tn, wg_dim=wg) for tn in (160, 128, 96, 80, 64) for wg in ("m", "n")] + [
        dict(tile_m=128, tile_n=tn, wg_dim=wg) for tn in (80, 64) for wg in ("m", "n")
    ]
    out = []
    for which, base, changes in (("fc1", base1, fc1), ("fc2", base2, fc2)):
        for change in changes:
            cfg = dataclasses.replace(base, **change)
            cfg = dataclasses.replace(
                cfg, epi_tile_m=min(64, cfg.tile_m), epi_tile_n=mg._epi_tile(cfg.tile_n, 64)
            )
            cfg = dataclasses.replace(
                cfg,
                stages=mg.max_stages(
                    cfg,
                    out_bytes=1 if which == "fc1" else 4,
                    a_groups=1 if which == "fc1" else f // group,
                    requantize=which == "fc1",
                ),
            )
            entry = {"gemm": which, "config": dataclasses.asdict(cfg)}
            try:
                if which == "fc1":
                    fn = jax.jit(lambda x, sx, cfg=cfg: mg.int8_matmul_mgpu(
                        x, w1, sx, s1, bias=b1, activation="gelu", out_spec=spec, config=cfg))  # fmt: skip
                    entry["ms"] = ms(fn, x, sx)
                else:
                    fn = jax.jit(
                        lambda q, s, cfg=cfg: mg.int8_matmul_mgpu(q, w2, s, s2, config=cfg, **fc2_epi)
                    )
                    entry["ms"] = ms(fn, u8.values, u8.scale)
            except Exception as ex:  # noqa: BLE001 - report each config's failure and go on
                entry["error"] = str(ex)[-300:]
            print("   ", json.dumps(entry), flush=True)
            out.append(entry)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, default=8192)
    p.add_argument("--models", nargs="*", default=list(MODELS))
    p.add_argument("--group", type=int, nargs="*", default=[128], help="fc1's requantization groups")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--fc1-tile-m", type=int, nargs="*", default=[0], help="0: the default fc1 tiles")
    p.add_argument("--sweep", action="store_true", help="also time other tiles of both GEMMs")
    p.add_argument(
        "--json",
        metavar="PATH",
        help="write the results as JSON to PATH (default: $OUT/fused_mlp.json when OUT is set)",
    )
    args = p.parse_args()
    print(jax.devices(), jax.__version__, flush=True)

    ms = functools.partial(ms_per_call, reps=args.reps, iters=args.iters)

    results = {}
    for name in args.models:
        d, f = MODELS[name]
        for group in args.group:
            for tile_m in args.fc1_tile_m:
                key = f"{name}_g{group}" + (f"_fc1_tile_m{tile_m}" if tile_m else "")
                results[key] = measure(args.m, d, f, group, ms, fc1_tile_m=tile_m, sweep=args.sweep)
                print(key, json.dumps(results[key]), flush=True)
    path = args.json or (os.path.join(os.environ["OUT"], "fused_mlp.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
