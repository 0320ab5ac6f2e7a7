"""Decode GEMV kernels (M = 1) vs XLA bf16, timed on the device inside one loop; tunes their tiles.

    PYTHONPATH=. python3 benchmarks/decode_kernels.py                     # GPT-2 1.5B shapes, H100
    PYTHONPATH=. python3 benchmarks/decode_kernels.py --quick             # CPU smoke (interpret mode)

A decode GEMV takes a few microseconds, less than the host needs to launch it, so timing one call per
dispatch measures the launch. Here every candidate runs inside one jitted ``fori_loop`` over enough
distinct weight matrices to overflow L2 (:func:`pallas_kernels.autotune.time_in_loop`). Per case (bits,
N x K): XLA bf16 ``x @ w``, then each tile candidate of ``int8_matmul_decode`` (INT8 per-channel scales,
or INT4 with K groups of ``--int4-group``); the fastest goes into the tuning cache (``--save``), which
``lookup_decode_config`` reads. Writes ``$OUT/decode_kernels.json`` (and the cache file) when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp

from pallas_kernels import autotune, tune
from pallas_kernels import int8_matmul_decode as dec

# GPT-2 1.5B: qkv, out, fc1, fc2, LM head (INT4 where the w4/8-a8 scheme puts INT4: MLP and tables)
CASES_1P5B = (
    "8:4800x1600,8:1600x1600,8:6400x1600,8:1600x6400,8:50304x1600,4:6400x1600,4:1600x6400,4:50304x1600"
)


def candidates(n: int, k: int, bits: int, group: int | None) -> list[dec.DecodeConfig]:
    if bits == 4:
        return dec.decode_candidates(1, n, k, b_bits=bits, b_group=group)
    base = dec.decode_config(1, n, k, b_bits=bits, b_group=group)
    out = [base]
    for bn in (32, 64, 128):
        for split in (1, 2, 4):
            for unroll in (False, True):
                cfg = dec.DecodeConfig(bn, 128, split, unroll=unroll)
                if cfg not in out and dec.cdiv(n, bn) * split <= 16 * dec.num_sms():
                    out.append(cfg)
    return out


def bench_case(
    bits: int, n: int, k: int, args, per_channel: bool = False, act: str | None = None, residual: bool = False
) -> dict:
    """act None: INT8 codes in (``int8_matmul_decode``); "q" / "ln": float rows quantized (after a
    LayerNorm) inside the kernel (``quantize_matmul_decode``). residual: the out-proj / fc2 epilogue of the
    PTQ model (f32 out, + bias, + the residual stream threaded through the loop; split-K sums into it)."""
    group = args.int4_group if bits == 4 and not per_channel else None
    nbytes = n * k * bits // 8
    ws = tune.decode_weights(n, k, b_bits=bits, b_group=group)
    if act is None:
        a = jax.random.randint(jax.random.key(99), (1, k), -127, 128, jnp.int32).astype(jnp.int8)
    else:
        a = jax.random.normal(jax.random.key(99), (1, k), jnp.float32)
    sa = jnp.full((1, 1), 1e-2, jnp.float32)
    gamma, beta = jnp.ones((k,), jnp.float32), jnp.zeros((k,), jnp.float32)
    norm = dict(norm="layernorm", gamma=gamma, beta=beta) if act == "ln" else {}
    ws_bf16 = [
        jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16)
        for i in range(max(2, min(16, -(-(128 << 20) // (2 * n * k)))))
    ]
    loop = dict(reps=args.reps, iters=args.iters)
    t_bf16 = autotune.time_in_loop(lambda x, w: x.astype(jnp.bfloat16) @ w, a, ws_bf16, **loop)
    epi = {}
    if residual:
        loop["residual"] = jax.random.normal(jax.random.key(98), (1, n), jnp.float32)
        epi = dict(bias=jnp.ones((n,), jnp.float32), out_dtype=jnp.float32)
    row = dict(
        bits=bits,
        n=n,
        k=k,
        group=group,
        act=act,
        residual=residual,
        weight_mb=nbytes / 1e6,
        xla_bf16_us=t_bf16 * 1e6,
        bf16_gb_s=2 * n * k / t_bf16 / 1e9,
        configs=[],
    )
    print(
        f"\n== int{bits}{act or ''}{'r' if residual else ''} {n}x{k} (group {group}): {nbytes / 1e6:.2f} MB; "
        f"XLA bf16 {t_bf16 * 1e6:.2f} us "
        f"({row['bf16_gb_s']:.0f} GB/s)",
        flush=True,
    )
    best = None
    for cfg in candidates(n, k, bits, group):

        def call(x, w, r=None, cfg=cfg):
            kw = dict(b_bits=bits, b_group=group, config=cfg, **epi)
            if residual:
                kw["residual"] = r
            if act is None:
                return dec.int8_matmul_decode(x, w[0], sa, w[1], **kw)
            return dec.quantize_matmul_decode(x, w[0], w[1], **norm, **kw)

        try:
            t = autotune.time_in_loop(call, a, ws, **loop)
        except Exception as e:  # noqa: BLE001 - a candidate that does not compile is not chosen
            print(f"  {cfg}: failed ({type(e).__name__}: {str(e)[:100]})", flush=True)
            continue
        if t <= 0:  # within the noise of the loop's own cost: no usable reading
            print(f"  {cfg}: below the loop's timing noise", flush=True)
            continue
        row["configs"].append(dict(config=cfg.__dict__, us=t * 1e6, gb_s=nbytes / t / 1e9))
        print(f"  {t * 1e6:8.2f} us {nbytes / t / 1e9:7.0f} GB/s  x{t_bf16 / t:5.2f} bf16  {cfg}", flush=True)
        if best is None or t < best[1]:
            best = (cfg, t)
        if time.time() > args.deadline:
            print("  (time budget reached: stopping this case)", flush=True)
            break
    if best is not None:
        row.update(best=best[0].__dict__, best_us=best[1] * 1e6, x_bf16=t_bf16 / best[1])
        if args.save:
            autotune.store_config("int8_matmul_decode", 1, n, k, dec.decode_key(bits, group, act), best[0])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--cases",
        default=CASES_1P5B,
        help="comma-separated bits:NxK: bits 8 or 4, then c (INT4 per-channel) and/or q / ln (float input "
        "quantized, after a LayerNorm for ln, inside the kernel), then r (f32 out + bias + a residual "
        "stream: the out-proj / fc2 epilogue), e.g. 4ln:6400x1600,4qr:1600x6400",
    )
    ap.add_argument("--int4-group", type=int, default=128)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--budget", type=float, default=420.0, help="seconds before remaining cases are skipped")
    ap.add_argument("--save", action="store_true", help="store each case's fastest config in the cache")
    ap.add_argument("--quick", action="store_true", help="CPU smoke: one small INT4 case, 1 rep")
    ap.add_argument(
        "--json",
        metavar="PATH",
        help="write the results as JSON to PATH (default: $OUT/decode_kernels.json when OUT is set)",
    )
    args = ap.parse_args()
    if args.quick:
        args.cases, args.reps, args.iters, args.int4_group = "4:64x256", 1, 1, 128
    args.deadline = time.time() + args.budget
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    rows = []
    for case in args.cases.split(","):
        if time.time() > args.deadline:
            print(f"skipped {case}: time budget", flush=True)
            continue
        kind, shape = case.split(":")
        n, k = (int(v) for v in shape.lower().split("x"))
        residual, kind = kind.endswith("r"), kind.removesuffix("r")
        act = "ln" if kind.endswith("ln") else ("q" if kind.endswith("q") else None)
        kind = kind.removesuffix("ln").removesuffix("q")
        bits = int(kind.rstrip("c"))
        rows.append(bench_case(bits, n, k, args, per_channel=kind.endswith("c"), act=act, residual=residual))
    path = args.json or (os.path.join(os.environ["OUT"], "decode_kernels.json") if os.environ.get("OUT") else None)
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
    out = os.environ.get("OUT")
    if out:
        if args.save and autotune.cache_path().exists():
            shutil.copy(autotune.cache_path(), os.path.join(out, autotune.cache_path().name))


if __name__ == "__main__":
    main()
