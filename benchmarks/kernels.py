"""INT8 GEMM kernels vs XLA on one GPU: correctness first, then throughput. One command on the H100:

    PYTHONPATH=. python3 benchmarks/kernels.py [--quick] [--tune]

1. Correctness of every kernel variant against its reference at 1024^3 and a ragged shape (1030x770x1000):
   raw int32 (exact), W8A8 epilogues, requantized output, INT4 weights, block-scaled 32x32 / 1x128+128x128 /
   128x128 / group-wise g128.
2. Timing (median of >= 20 samples after warm-up; each sample runs a few calls back to back over >= 2
   rotated input sets, then ``block_until_ready``) at 8192^3 and the forward NT GEMMs of GPT-2 training
   (16384 tokens; hidden 768/1024/1600/4096: qkv d->3d, out d->d, fc1 d->4d, fc2 4d->d): XLA bf16 ``x @ w``;
   XLA int8 ``dot_general`` s8 x s8 -> s32 with rhs (N, K); XLA int8 + scale multiply (what AQT / Qwix run);
   our W8A8 (fused dequant epilogue, bf16 out); our block-scaled GEMM (32x32, 1x128 act with 128x128
   weight, 128x128), bf16 out. Prints TOP/s and ratios vs XLA measured in the same run.
3. At 8192^3 only: block-scaled int->float conversion variants (convert instruction vs the magic-number
   trick, exact or folded), tiles that make one side's scale a scalar, W8A8 epilogues and W4A8.
``--tune`` autotunes our kernels first (short candidate list), ``--quick`` times fewer shapes.
Results (and the tuning cache) are written under ``$OUT`` when it is set.
CPU smoke test: ``INTERPRET=1 PYTHONPATH=. python3 benchmarks/kernels.py --quick`` (tiny shapes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

from jq8.quant import QuantSpec, pack_int4, quantize
from pallas_kernels import autotune, tune
from pallas_kernels._common import TileConfig
from pallas_kernels.gemm import int8_matmul
from pallas_kernels.int8_matmul_block_scaled import (
    int8_matmul_block_scaled,
    int8_matmul_block_scaled_reference,
)
from pallas_kernels.int8_matmul_triton import int8_matmul_reference

warnings.filterwarnings("ignore", message=".*[Tt]riton.*deprecat.*")
warnings.filterwarnings("ignore", category=DeprecationWarning)

INTERPRET = os.environ.get("INTERPRET") == "1"
NT = (((1,), (1,)), ((), ()))
BLOCK_SCALED = {  # name -> (activation scale tile of (M, K), weight scale tile of (N, K))
    "bs 32x32": ((32, 32), (32, 32)),
    "bs 1x128+128x128": ((1, 128), (128, 128)),
    "bs 128x128": ((128, 128), (128, 128)),
}
T0 = time.perf_counter()


def log(*a) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s]", *a, flush=True)


# ------------------------------------------------------------------------------------------------ data


def rand_int8(key, shape, lo=-127, hi=128):
    return jax.random.randint(key, shape, lo, hi, jnp.int32).astype(jnp.int8)


def rand_scale(key, shape):
    return jax.random.uniform(key, shape, jnp.float32, 0.5e-3, 1.5e-3)


def gpt2_shapes(tokens: int, hiddens) -> list[tuple[str, int, int, int]]:
    """Forward NT GEMMs (name, M, N, K) of a GPT-2 block: qkv d->3d, out d->d, fc1 d->4d, fc2 4d->d."""
    out = []
    for d in hiddens:
        out += [
            (f"d{d} qkv", tokens, 3 * d, d),
            (f"d{d} out", tokens, d, d),
            (f"d{d} fc1", tokens, 4 * d, d),
            (f"d{d} fc2", tokens, d, 4 * d),
        ]
    return out


# --------------------------------------------------------------------------------------------- correctness


def rel_err(x, ref) -> float:
    x = jnp.asarray(x, jnp.float32)
    ref = jnp.asarray(ref, jnp.float32)
    return float(jnp.linalg.norm(x - ref) / jnp.maximum(jnp.linalg.norm(ref), 1e-30))


def check_correctness(m: int, n: int, k: int, interpret: bool | None) -> list[dict]:
    """Each kernel variant vs its reference on fresh random data; returns one record per check."""
    ks = jax.random.split(jax.random.key(m * 7 + n * 3 + k), 8)
    a, b = rand_int8(ks[0], (m, k)), rand_int8(ks[1], (n, k))
    sa, sb = rand_scale(ks[2], (m, 1)), rand_scale(ks[3], (1, n))
    bias = jax.random.normal(ks[4], (n,), jnp.float32)
    res = jax.random.normal(ks[5], (m, n), jnp.bfloat16)
    x = jax.random.normal(ks[6], (m, k), jnp.float32) * (1 + 20 * (jax.random.uniform(ks[7], (1, k)) > 0.98))
    w = jax.random.normal(ks[7], (n, k), jnp.float32) * 0.05
    kw = dict(interpret=interpret)
    records = []

    def run(name: str, fn: Callable[[], tuple[bool, str]]) -> None:
        try:
            ok, detail = fn()
        except Exception as e:  # noqa: BLE001 - report and continue with the other kernels
            ok, detail = False, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            traceback.print_exc(limit=2)
        records.append(dict(shape=[m, n, k], check=name, ok=bool(ok), detail=detail))
        log(f"{'PASS' if ok else 'FAIL'} {m}x{n}x{k} {name}: {detail}")

    def raw():
        o = int8_matmul(a, b, **kw)
        exact = bool(jnp.array_equal(o, lax.dot_general(a, b, NT, preferred_element_type=jnp.int32)))
        return exact, f"int32 exact={exact}"

    def close(o, r, tol=1e-2):
        e = rel_err(o, r)
        return e < tol, f"rel_err={e:.2e}"

    def requant(spec):
        o = int8_matmul(a, b, sa, sb, bias=bias, activation="gelu", out_spec=spec, **kw)
        r = int8_matmul_reference(a, b, sa, sb, bias=bias, activation="gelu", out_spec=spec)
        d = jnp.abs(o.values.astype(jnp.int32) - r.values.astype(jnp.int32))
        eq, mx = float(jnp.mean(d == 0)), int(jnp.max(d))
        se = float(jnp.max(jnp.abs(o.scale / r.scale - 1)))
        return (
            eq >= 0.99 and mx <= 1 and se < 1e-3,
            f"codes equal={eq:.4f} max|diff|={mx} scale relerr={se:.1e}",
        )

    def int4():
        w4 = rand_int8(ks[4], (n, k), -7, 8)
        o = int8_matmul(a, pack_int4(w4), b_bits=4, **kw)
        exact = bool(jnp.array_equal(o, lax.dot_general(a, w4, NT, preferred_element_type=jnp.int32)))
        return exact, f"int32 exact={exact}"

    def block(ta, tb, bits=8, tol=1e-4, **opts):
        qa, qb = quantize(x, QuantSpec(ta)), quantize(w, QuantSpec(tb, bits=bits))
        args = (qa.values, qa.scale, qb.values, qb.scale)
        tiles = dict(a_tile=qa.spec.resolve(m, k), b_tile=qb.spec.resolve(n, k), b_bits=bits)
        o = int8_matmul_block_scaled(*args, out_dtype=jnp.float32, **tiles, **opts, **kw)
        r = int8_matmul_block_scaled_reference(*args, out_dtype=jnp.float32, **tiles)
        e = rel_err(o, r)
        return (
            e < tol,
            f"rel_err vs f32 reference={e:.2e}, quantization err vs x@w.T={rel_err(r, x @ w.T):.2e}",
        )

    run("int8_matmul raw int32", raw)
    run(
        "int8_matmul W8A8 bf16",
        lambda: close(int8_matmul(a, b, sa, sb, **kw), int8_matmul_reference(a, b, sa, sb)),
    )
    run(
        "int8_matmul W8A8 bias+gelu+residual",
        lambda: close(
            int8_matmul(a, b, sa, sb, bias=bias, activation="gelu", residual=res, **kw),
            int8_matmul_reference(a, b, sa, sb, bias=bias, activation="gelu", residual=res),
        ),
    )
    run(
        "int8_matmul W8A8 gelu_tanh f32",
        lambda: close(
            int8_matmul(a, b, sa, sb, activation="gelu_tanh", out_dtype=jnp.float32, **kw),
            int8_matmul_reference(a, b, sa, sb, activation="gelu_tanh", out_dtype=jnp.float32),
            1e-5,
        ),
    )
    run("int8_matmul requant 32x32", lambda: requant(QuantSpec.blocks((32, 32))))
    run("int8_matmul requant 1x128", lambda: requant(QuantSpec.groups(128, axis=1)))
    if n <= 1024:
        run("int8_matmul requant per-row", lambda: requant(QuantSpec.per_row()))
    run("int8_matmul INT4 weights", int4)
    for name, (ta, tb) in BLOCK_SCALED.items():
        run(f"block_scaled {name}", lambda ta=ta, tb=tb: block(ta, tb))
    run("block_scaled per-row act x g128 weight", lambda: block((1, -1), (1, 128)))
    run("block_scaled per-row act x g64 INT4 weight", lambda: block((1, -1), (1, 64), bits=4))
    run("block_scaled 32x32 split_n unroll2", lambda: block((32, 32), (32, 32), split_n=True, unroll=2))
    run(
        "block_scaled 32x32 magic_folded", lambda: block((32, 32), (32, 32), tol=1e-2, convert="magic_folded")
    )
    return records


# --------------------------------------------------------------------------------------------------- timing


def time_call(fn: Callable, arg_sets: list[tuple], *, iters: int) -> float:
    """Median seconds per call. A sample runs ``reps`` calls back to back (rotating input sets) and then
    blocks, so launch overhead is hidden as it is in a training step; reps is sized to ~2 ms per sample."""
    for args in arg_sets:
        jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*arg_sets[0]))
    est = time.perf_counter() - t0
    reps = max(len(arg_sets), min(64, int(2e-3 / max(est, 1e-6))))
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = None
        for r in range(reps):
            out = fn(*arg_sets[r % len(arg_sets)])
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / reps)
    return statistics.median(samples)


def make_variants(m: int, n: int, k: int, interpret: bool | None, n_sets: int):
    """name -> (jitted fn, list of argument tuples)."""
    variants = {}
    keys = jax.random.split(jax.random.key(m + n + k), 4 * n_sets)
    bf, i8, bs = [], [], {name: [] for name in BLOCK_SCALED}
    for s in range(n_sets):
        k0, k1, k2, k3 = keys[4 * s : 4 * s + 4]
        bf.append((jax.random.normal(k0, (m, k), jnp.bfloat16), jax.random.normal(k1, (k, n), jnp.bfloat16)))
        a, b = rand_int8(k0, (m, k)), rand_int8(k1, (n, k))
        i8.append((a, b, rand_scale(k2, (m, 1)), rand_scale(k3, (1, n))))
        for name, (ta, tb) in BLOCK_SCALED.items():
            sa = rand_scale(k2, QuantSpec(ta).scale_shape(m, k))
            sb = rand_scale(k3, QuantSpec(tb).scale_shape(n, k))
            bs[name].append((a, sa, b, sb))
    variants["xla bf16"] = (jax.jit(lambda x, w: x @ w), bf)
    variants["xla int8"] = (
        jax.jit(lambda a, b, sa, sb: lax.dot_general(a, b, NT, preferred_element_type=jnp.int32)),
        i8,
    )
    variants["xla int8+scale"] = (
        jax.jit(
            lambda a, b, sa, sb: (
                lax.dot_general(a, b, NT, preferred_element_type=jnp.int32).astype(jnp.float32) * sa * sb
            ).astype(jnp.bfloat16)
        ),
        i8,
    )
    variants["ours W8A8"] = (jax.jit(lambda a, b, sa, sb: int8_matmul(a, b, sa, sb, interpret=interpret)), i8)
    for name, (ta, tb) in BLOCK_SCALED.items():
        variants[f"ours {name}"] = (
            jax.jit(
                lambda a, sa, b, sb, ta=ta, tb=tb: int8_matmul_block_scaled(
                    a, sa, b, sb, a_tile=ta, b_tile=tb, interpret=interpret
                )
            ),
            bs[name],
        )
    return variants


def make_extra_variants(m: int, n: int, k: int, interpret: bool | None, n_sets: int):
    """Variants timed at one shape only: rescale strategies, ZeroQuant groups, W4A8, fused epilogues."""
    keys = jax.random.split(jax.random.key(m + n + k + 1), 4 * n_sets)
    sets = {"32": [], "64": [], "128": [], "sq128": [], "g128": [], "w8a8": [], "w4a8": []}
    for s in range(n_sets):
        k0, k1, k2, k3 = keys[4 * s : 4 * s + 4]
        a, b = rand_int8(k0, (m, k)), rand_int8(k1, (n, k))
        sets["32"].append((a, rand_scale(k2, (m // 32, k // 32)), b, rand_scale(k3, (n // 32, k // 32))))
        sets["64"].append((a, rand_scale(k2, (m // 64, k // 64)), b, rand_scale(k3, (n // 64, k // 64))))
        sets["128"].append((a, rand_scale(k2, (m, k // 128)), b, rand_scale(k3, (n // 128, k // 128))))
        sets["sq128"].append(
            (a, rand_scale(k2, (m // 128, k // 128)), b, rand_scale(k3, (n // 128, k // 128)))
        )
        sets["g128"].append((a, rand_scale(k2, (m, 1)), b, rand_scale(k3, (n, k // 128))))
        bias = jax.random.normal(k2, (n,), jnp.float32)
        sets["w8a8"].append((a, b, rand_scale(k2, (m, 1)), rand_scale(k3, (1, n)), bias))
        b4 = pack_int4(rand_int8(k1, (n, k), -7, 8))
        sets["w4a8"].append((a, b4, rand_scale(k2, (m, 1)), rand_scale(k3, (1, n)), bias))

    def bs(ta, tb, convert, config=None, unroll=1, split_n=False):
        return jax.jit(
            lambda a, sa, b, sb: int8_matmul_block_scaled(
                a,
                sa,
                b,
                sb,
                a_tile=ta,
                b_tile=tb,
                convert=convert,
                unroll=unroll,
                split_n=split_n,
                config=config,
                interpret=interpret,
            )
        )

    t128 = TileConfig(128, 128, 128, 8, 3, 8)
    t128x32 = TileConfig(128, 32, 32, 4, 4, 8)  # Jetfire blocks with block_n = 32: b's scale is a scalar
    t128w4 = TileConfig(128, 128, 32, 4, 4, 8)
    t256x128x32 = TileConfig(256, 128, 32, 8, 3, 8)
    t128x256x32 = TileConfig(128, 256, 32, 8, 3, 8)
    # "<convert> [split_n] [unrollN] <tile>"; explicit tiles so that a tuning cache does not change them.
    studies = (
        (
            "bs 32x32",
            (32, 32),
            (32, 32),
            "32",
            [
                ("cvt 128x128", t128),
                ("auto 128x32x32", t128x32),
                ("auto split_n 128x128", t128),
                ("cvt split_n 128x128", t128),
                ("auto split_n unroll2 128x128", t128),
                ("auto split_n 128x128x32 w4 s4", t128w4),
                ("auto split_n 256x128x32", t256x128x32),
                ("auto split_n 128x256x32", t128x256x32),
            ],
        ),
        ("bs 64x64", (64, 64), (64, 64), "64", [("cvt 128x128", t128), ("auto split_n 128x128", t128)]),
        (
            "bs 1x128+128x128",
            (1, 128),
            (128, 128),
            "128",
            [("magic 128x128", t128), ("magic_folded 128x128", t128)],
        ),
        ("bs 128x128", (128, 128), (128, 128), "sq128", [("magic 128x128", t128)]),
        (
            "bs row x g128",
            (1, -1),
            (1, 128),
            "g128",
            [("magic 128x128", t128), ("magic_folded 128x128", t128)],
        ),
    )
    v = {}
    for label, ta, tb, key, variants in studies:
        for vname, cfg in variants:
            words = vname.split()
            unroll = next((int(w[6:]) for w in words if w.startswith("unroll")), 1)
            fn = bs(ta, tb, words[0], cfg, unroll, "split_n" in words)
            v[f"ours {label} {vname}"] = (fn, sets[key])

    def tile_name(c: TileConfig) -> str:
        return f"{c.block_m}x{c.block_n}x{c.block_k} w{c.num_warps} s{c.num_stages}"

    for cfg in (t128, TileConfig(256, 128, 128, 8, 3, 8), TileConfig(256, 128, 128, 8, 4, 8), t128x256x32):
        cfg = dataclasses.replace(cfg, block_k=128)
        v[f"ours W8A8 {tile_name(cfg)}"] = (
            jax.jit(
                lambda a, b, sa, sb, bias, c=cfg: int8_matmul(a, b, sa, sb, config=c, interpret=interpret)
            ),
            sets["w8a8"],
        )
    for cfg in (t128, TileConfig(256, 128, 128, 8, 3, 8), TileConfig(256, 128, 64, 8, 4, 8)):
        v[f"ours W4A8 {tile_name(cfg)}"] = (
            jax.jit(
                lambda a, b, sa, sb, bias, c=cfg: int8_matmul(
                    a, b, sa, sb, b_bits=4, config=c, interpret=interpret
                )
            ),
            sets["w4a8"],
        )
    v["ours W8A8 bias+gelu"] = (
        jax.jit(
            lambda a, b, sa, sb, bias: int8_matmul(
                a, b, sa, sb, bias=bias, activation="gelu", interpret=interpret
            )
        ),
        sets["w8a8"],
    )
    v["ours W8A8 bias+gelu -> int8 32x32"] = (
        jax.jit(
            lambda a, b, sa, sb, bias: int8_matmul(
                a,
                b,
                sa,
                sb,
                bias=bias,
                activation="gelu",
                out_spec=QuantSpec.blocks((32, 32)),
                interpret=interpret,
            )
        ),
        sets["w8a8"],
    )
    return v


TUNE_W8A8 = [
    TileConfig(256, 128, 128, 8, 3, 8),
    TileConfig(256, 128, 128, 8, 4, 8),
    TileConfig(128, 256, 128, 8, 3, 8),
    TileConfig(128, 128, 128, 8, 3, 8),
    TileConfig(128, 128, 64, 4, 4, 8),
]
TUNE_BS = [
    TileConfig(128, 128, 128, 8, 3, 8),
    TileConfig(256, 128, 128, 8, 3, 8),
    TileConfig(128, 128, 64, 4, 4, 8),
    TileConfig(128, 32, 32, 4, 4, 8),
]


def tune_shape(m: int, n: int, k: int, iters: int) -> None:
    cands = TUNE_W8A8 if min(m, n) >= 1024 else TUNE_W8A8 + [TileConfig(64, 128, 128, 4, 3, 8)]
    cfg = tune.tune_int8_matmul(m, n, k, candidates=cands, iters=iters)
    log(f"tuned int8_matmul {m}x{n}x{k}: {cfg}")
    for name, (ta, tb) in BLOCK_SCALED.items():
        cfg = tune.tune_block_scaled(m, n, k, ta, tb, candidates=TUNE_BS, iters=iters)
        log(f"tuned {name} {m}x{n}x{k}: {cfg}")


# ----------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="8192^3 and the d=1024 / d=4096 GEMMs only")
    p.add_argument("--tune", action="store_true", help="autotune our kernels at each timed shape first")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--budget", type=float, default=420.0, help="seconds; stop timing new shapes after this")
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--no-extra", action="store_true", help="skip the per-variant study at the first shape")
    p.add_argument("--extra-only", action="store_true", help="only the per-variant study at the first shape")
    p.add_argument(
        "--json",
        metavar="PATH",
        help="write the results as JSON to PATH (default: $OUT/kernels.json when OUT is set)",
    )
    args = p.parse_args(argv)
    interpret = True if INTERPRET else None
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    log(f"jax {jax.__version__}, devices {jax.devices()}, interpret={INTERPRET}, gpu={autotune.gpu_name()}")

    if INTERPRET:  # CPU smoke test: tiny shapes, few iterations
        check_shapes = [(128, 128, 128), (70, 96, 200)]
        shapes = [("tiny", 256, 256, 256), ("tiny ragged", 192, 160, 320)]
        args.iters = min(args.iters, 3)
    else:
        check_shapes = [(1024, 1024, 1024), (1030, 770, 1000)]
        shapes = [("8192^3", 8192, 8192, 8192)]
        # Most informative first: the --budget guard drops the shapes at the end of the list.
        shapes += gpt2_shapes(16384, (4096, 1024) if args.quick else (4096, 1024, 1600, 768))
        if args.quick:
            shapes = [s for s in shapes if not s[0].endswith(("qkv", "out"))] + [
                s for s in shapes if s[0] == "d1024 qkv"
            ]
    if args.extra_only:
        shapes = shapes[:1]

    result = dict(
        jax=jax.__version__,
        device=str(jax.devices()[0]),
        gpu=autotune.gpu_name(),
        argv=sys.argv[1:],
        correctness=[],
        timings=[],
        configs={},
    )
    if not args.skip_check:
        for m, n, k in check_shapes:
            result["correctness"] += check_correctness(m, n, k, interpret)
    n_fail = sum(not r["ok"] for r in result["correctness"])
    log(f"correctness: {len(result['correctness']) - n_fail} passed, {n_fail} failed")

    for label, m, n, k in shapes:
        if time.perf_counter() - T0 > args.budget:
            log(f"time budget {args.budget:.0f}s reached: skipping {label} and later shapes")
            continue
        if args.tune and not INTERPRET:
            try:
                tune_shape(m, n, k, iters=max(5, args.iters // 2))
            except Exception as e:  # noqa: BLE001
                log(f"tuning failed at {m}x{n}x{k}: {type(e).__name__}: {str(e)[:200]}")
        row = dict(label=label, m=m, n=n, k=k, ms={}, tops={})
        variants = {} if args.extra_only else make_variants(m, n, k, interpret, n_sets=2)
        for name, (fn, arg_sets) in variants.items():
            try:
                t = time_call(fn, arg_sets, iters=args.iters)
                row["ms"][name] = t * 1e3
                row["tops"][name] = 2 * m * n * k / t / 1e12
            except Exception as e:  # noqa: BLE001
                log(f"FAIL timing {label} {name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        row["configs"] = {
            "int8_matmul": str(autotune.lookup_config("int8_matmul", m, n, k, "b8-bfloat16")),
        }
        if variants:
            result["timings"].append(row)
        log(f"{label} {m}x{n}x{k}: " + ", ".join(f"{kk} {v:.4g}" for kk, v in row["tops"].items()) + " TOP/s")
        if label == shapes[0][0] and not args.no_extra:
            extra = dict(label=label, m=m, n=n, k=k, ms={}, tops={})
            for name, (fn, arg_sets) in make_extra_variants(m, n, k, interpret, n_sets=2).items():
                try:
                    t = time_call(fn, arg_sets, iters=args.iters)
                    extra["ms"][name] = t * 1e3
                    extra["tops"][name] = 2 * m * n * k / t / 1e12
                    log(f"extra {label} {name}: {extra['tops'][name]:.4g} TOP/s")
                except Exception as e:  # noqa: BLE001
                    log(f"FAIL timing {label} {name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            result["extra"] = extra

    print_table(result["timings"])
    if "extra" in result:
        e = result["extra"]
        print(f"\n### variants at {e['label']} ({e['m']}x{e['n']}x{e['k']}), TOP/s\n")
        print("| variant | TOP/s | ms |\n| --- | --- | --- |")
        for name in e["tops"]:
            print(f"| {name} | {e['tops'][name]:.4g} | {e['ms'][name]:.3f} |")
    path = Path(args.json) if args.json else (out_dir / "kernels.json" if out_dir is not None else None)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        log(f"wrote {path}")
    if out_dir is not None:
        cache = autotune.cache_path()
        if cache.exists():
            out_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(cache, out_dir / cache.name)
    log(f"done; correctness failures: {n_fail}")
    return 1 if n_fail else 0


def print_table(rows: list[dict]) -> None:
    names = ["xla bf16", "xla int8", "xla int8+scale", "ours W8A8"] + [f"ours {n}" for n in BLOCK_SCALED]
    print("\n### TOP/s (median; M x N x K, NT int8 operands, bf16 outputs except xla int8 -> int32)\n")
    print("| shape | M x N x K | " + " | ".join(names) + " |")
    print("|" + " --- |" * (len(names) + 2))
    for r in rows:
        cells = [f"{r['tops'][n]:.4g}" if n in r["tops"] else "fail" for n in names]
        print(f"| {r['label']} | {r['m']}x{r['n']}x{r['k']} | " + " | ".join(cells) + " |")
    ours = ["ours W8A8"] + [f"ours {n}" for n in BLOCK_SCALED]
    for base in ("xla bf16", "xla int8", "xla int8+scale"):
        print(f"\n### speed ratio vs {base} (>1 = ours faster)\n")
        print("| shape | " + " | ".join(ours) + " |")
        print("|" + " --- |" * (len(ours) + 1))
        for r in rows:
            t = r["ms"]
            cells = [f"{t[base] / t[o]:.2f}" if base in t and o in t else "-" for o in ours]
            print(f"| {r['label']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
