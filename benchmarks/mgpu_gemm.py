"""The Mosaic GPU W8A8 GEMM against the Triton one, XLA bf16 and XLA int8, at the prefill GEMM shapes.

    PYTHONPATH=. python3 benchmarks/mgpu_gemm.py [--m 8192] [--variants] [--gemms qkv fc2]

Each GEMM runs with the fused model's epilogue (qkv: bias, q/k/v written apart; out / fc2: bias + f32
residual, f32 out; fc1: bias + GELU, bf16 out). Per shape: max |error| of both kernels against the XLA
reference (relative to the reference's max |value|), then ms per call (``--reps`` calls back to back, median
of ``--iters`` samples). ``--variants`` also times other Mosaic configs (the second waits for each K step's
wgmma and loads residual tiles in the epilogue: ``mma_in_flight=0``, no residual prefetch). ``--math precise
approx`` times GELU's two erf forms (``MosaicTileConfig.epilogue_math``), ``--gelu-bound`` the GELU GEMMs
without their activation. Writes ``$OUT/mgpu_gemm.json`` when OUT is set, or ``--json PATH``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import traceback

import jax
import jax.numpy as jnp

from pallas_kernels import autotune
from pallas_kernels import int8_matmul_mgpu as mg
from pallas_kernels.gemm import int8_matmul
from pallas_kernels.int8_matmul_triton import int8_matmul_reference

# name -> (N, K, epilogue kind), at GPT-2 124M (d 768) and 1.5B (d 1600)
GEMMS = {
    "124m_qkv": (2304, 768, "split"),
    "124m_out": (768, 768, "residual"),
    "124m_fc1": (3072, 768, "gelu"),
    "124m_fc2": (768, 3072, "residual"),
    "1p5b_qkv": (4800, 1600, "split"),
    "1p5b_out": (1600, 1600, "residual"),
    "1p5b_fc1": (6400, 1600, "gelu"),
    "1p5b_fc2": (1600, 6400, "residual"),
}
# Jetfire int8-row block at hidden 4096, 16384 tokens: name -> (N, K, output dtype, M); plain scaled output
JETFIRE_GEMMS = {
    "jf_fwd_qkv": (12288, 4096, "bf16", 16384),
    "jf_fwd_fc2": (4096, 16384, "bf16", 16384),
    "jf_dgrad_qkv": (4096, 12288, "f32", 16384),
    "jf_dgrad_fc1": (4096, 16384, "f32", 16384),
    "jf_dgrad_fc2": (16384, 4096, "bf16", 16384),
    "jf_wgrad_fc1": (16384, 16384, "f32", 4096),
    "jf_wgrad_fc2": (4096, 16384, "f32", 16384),
}


def variants(cfg: mg.MosaicTileConfig, residual: bool) -> list[mg.MosaicTileConfig]:
    out = [cfg]
    # the plain pipeline: wait for each K step's wgmma, residual tiles loaded in the epilogue
    old = dataclasses.replace(cfg, mma_in_flight=0, residual_prefetch=False)
    out.append(old)
    if cfg.stages > 1:  # the other wgmma pipeline, all else equal (3-stage rings default to waiting)
        out.append(dataclasses.replace(cfg, mma_in_flight=1 - cfg.mma_in_flight))
    if residual:
        out.append(dataclasses.replace(cfg, residual_prefetch=False))
    for stages in (3, 5):
        out.append(dataclasses.replace(cfg, stages=stages))
    for width in (4, 16):
        out.append(dataclasses.replace(cfg, grid_width=width))
    out.append(dataclasses.replace(cfg, grid_minor="m"))
    if cfg.tile_k == 128:
        out.append(dataclasses.replace(cfg, tile_k=64, stages=6))
    return out


def tile_variants(cfg: mg.MosaicTileConfig, n: int, k: int, split: int | None) -> list[mg.MosaicTileConfig]:
    """The default first, then every warpgroup tile (tile_m 64 or 128, tile_n a multiple of 16 <= 256
    dividing N and the split width) whose int32 accumulator fits in <= 160 registers a thread, both
    warpgroup layouts, each with the deepest ring that fits."""
    part = split or n
    out = [cfg]
    for wg_dim in ("n", "m"):
        for tile_m in (64, 128):
            for tile_n in range(256, 63, -16):
                if tile_m * tile_n // 128 > 160 or n % tile_n or part % tile_n:
                    continue
                c = dataclasses.replace(
                    cfg,
                    tile_m=tile_m,
                    tile_n=tile_n,
                    wg_dim=wg_dim,
                    epi_tile_m=min(64, tile_m),
                    epi_tile_n=mg._epi_tile(tile_n, 64),
                )
                if n % c.cta_n or (split and split % c.epi_tile_n) or c.epi_tile_n < 32:
                    continue
                c = dataclasses.replace(c, stages=mg.max_stages(c, out_bytes=4))
                if c != cfg and c.cta_m * c.cta_n >= 128 * 128:
                    out.append(c)
    return out


def ms_per_call(fn, *xs, reps: int, iters: int) -> float:
    """ms per call of ``fn(*xs)``: ``reps`` calls back to back, median of ``iters`` samples."""
    return autotune.time_fn(lambda: [fn(*xs) for _ in range(reps)], iters=iters) * 1e3 / reps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, default=8192)
    p.add_argument("--gemms", nargs="*", default=list(GEMMS), help=f"of {list(GEMMS) + list(JETFIRE_GEMMS)}")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--variants", action="store_true")
    p.add_argument("--tiles", action="store_true", help="time every warpgroup tile shape instead")
    p.add_argument("--math", nargs="+", choices=sorted(mg.ERF_OF_MATH), default=None,
                   help="time each config under each of these epilogue_math settings (GELU's erf)")
    p.add_argument("--gelu-bound", action="store_true",
                   help="also time the GELU GEMMs' default config without the activation (its cost's bound)")
    p.add_argument(
        "--json",
        metavar="PATH",
        help="write the results as JSON to PATH (default: $OUT/mgpu_gemm.json when OUT is set)",
    )
    args = p.parse_args()
    print(jax.devices(), jax.__version__, flush=True)

    ms = functools.partial(ms_per_call, reps=args.reps, iters=args.iters)

    results = {}
    for name in args.gemms:
        n, k, kind, m = (*GEMMS[name], args.m) if name in GEMMS else JETFIRE_GEMMS[name]
        ks = jax.random.split(jax.random.key(0), 6)
        a = jax.random.randint(ks[0], (m, k), -127, 128, jnp.int8)
        b = jax.random.randint(ks[1], (n, k), -127, 128, jnp.int8)
        a_s = jax.random.uniform(ks[2], (m,), minval=1e-3, maxval=1e-2)
        b_s = jax.random.uniform(ks[3], (n,), minval=1e-3, maxval=1e-2)
        epi = dict(bias=jax.random.normal(ks[4], (n,)))
        split = None
        if kind in ("f32", "bf16"):
            epi = dict(out_dtype=jnp.float32 if kind == "f32" else jnp.bfloat16)
        elif kind == "split":
            split = n // 3
        elif kind == "residual":
            epi.update(residual=jax.random.normal(ks[5], (m, n)), out_dtype=jnp.float32)
        else:
            epi.update(activation="gelu")
        row = {"n": n, "k": k, "kind": kind}
        ref = jnp.concatenate(jax.tree.leaves(int8_matmul_reference(a, b, a_s, b_s, **epi)), axis=1)
        scale = float(jnp.max(jnp.abs(ref.astype(jnp.float32))))

        def err(out, ref=ref, scale=scale):
            out = jnp.concatenate(jax.tree.leaves(out), axis=1).astype(jnp.float32)
            return float(jnp.max(jnp.abs(out - ref.astype(jnp.float32)))) / scale

        triton = jax.jit(lambda a, b, a_s, b_s, split=split, epi=epi: int8_matmul(
            a, b, a_s, b_s, split_cols=split, backend="triton", **epi))  # fmt: skip
        row["triton_err"] = err(triton(a, b, a_s, b_s))
        row["triton_ms"] = ms(triton, a, b, a_s, b_s)
        w = jax.random.normal(ks[1], (n, k), jnp.bfloat16)
        x = jax.random.normal(ks[0], (m, k), jnp.bfloat16)
        bias = epi.get("bias", jnp.zeros((n,)))
        bf = jax.jit(lambda x, w, bias=bias: x @ w.T + bias.astype(jnp.bfloat16))
        row["xla_bf16_ms"] = ms(bf, x, w)
        i8 = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                                                       preferred_element_type=jnp.int32))  # fmt: skip
        row["xla_int8_ms"] = ms(i8, a, b)
        try:
            base = mg.fit_config(m, n, k, split_cols=split, residual=kind == "residual")
        except ValueError as e:
            row["mosaic"] = f"unsupported: {e}"
            print(name, row, flush=True)
            results[name] = row
            continue
        tried = []
        if args.tiles:
            cfgs = tile_variants(base, n, k, split)
        else:
            cfgs = variants(base, kind == "residual") if args.variants else [base]
        if args.math:
            cfgs = [dataclasses.replace(c, epilogue_math=mth) for c in cfgs for mth in args.math]
        for cfg in cfgs:
            try:
                f = jax.jit(lambda a, b, a_s, b_s, cfg=cfg, split=split, epi=epi: mg.int8_matmul_mgpu(
                    a, b, a_s, b_s, split_cols=split, config=cfg, **epi))  # fmt: skip
                e = err(f(a, b, a_s, b_s))
                t = ms(f, a, b, a_s, b_s)
                tried.append({"config": dataclasses.asdict(cfg), "err": e, "ms": t})
                print(f"  {name} {cfg}: err {e:.2e} {t:.4f} ms", flush=True)
            except Exception as ex:  # noqa: BLE001 - report every config's failure and go on
                msg = "".join(traceback.format_exception_only(type(ex), ex))[-1500:]
                tried.append({"config": dataclasses.asdict(cfg), "error": msg})
                print(f"  {name} {cfg}: FAILED {msg}", flush=True)
                if not (args.variants or args.tiles):
                    traceback.print_exc()
        row["mosaic"] = tried
        if args.gelu_bound and kind == "gelu":
            plain = {k_: v for k_, v in epi.items() if k_ != "activation"}
            f = jax.jit(lambda a, b, a_s, b_s, plain=plain, cfg=base: mg.int8_matmul_mgpu(
                a, b, a_s, b_s, config=cfg, **plain))  # fmt: skip
            row["no_gelu_ms"] = ms(f, a, b, a_s, b_s)
        ok = [t for t in tried if "ms" in t]
        if ok:
            best = min(ok, key=lambda t: t["ms"])
            row["mosaic_best_ms"] = best["ms"]
            row["x_triton"] = row["triton_ms"] / best["ms"]
            row["x_bf16"] = row["xla_bf16_ms"] / best["ms"]
        print(name, {k_: v for k_, v in row.items() if k_ != "mosaic"}, flush=True)
        results[name] = row
    path = args.json or (os.path.join(os.environ["OUT"], "mgpu_gemm.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
