"""The ops of a ZeroQuant W8A8 prefill, one at a time, at a preset's prefill shapes (M = batch x seq tokens).

    PYTHONPATH=. python3 benchmarks/prefill_ops.py --presets gpt2-124m gpt2-1.5b [--tune]
    INTERPRET=1 PYTHONPATH=. python3 benchmarks/prefill_ops.py --presets gpt-tiny --tokens 64 --iters 2  # CPU

Per preset, each GEMM of a block with the epilogue the fused model gives it (qkv: bias, bf16 out; out-proj
and fc2: bias + f32 residual, f32 out; fc1: f32 out, or bias + GELU; qkv_split: q, k, v written apart;
lm_head: the tied head, bf16 logits), timed as:
  * XLA bf16 ``x @ w.T + b`` (what the bf16 model runs: cuBLAS with its bias epilogue), GELU fused for fc1;
  * XLA int8 ``dot_general`` s8 x s8 -> s32 (no epilogue: the integer GEMM's ceiling through cuBLAS);
  * our W8A8 kernel at its current config (tuning cache or heuristic) and, with ``--tune``, at each of a
    candidate list; the fastest is written to the tuning cache under the kernel's own key.
Then the producers between the GEMMs: LayerNorm-quantize of the f32 residual rows, bias-GELU-quantize of
fc1's output (f32 and bf16), per-token quantize of a bf16 (M, 4D) array, against XLA bf16 LayerNorm / GELU.
Timing: ``--reps`` calls dispatched back to back then ``block_until_ready``, per-call mean; median of
``--iters`` samples after warm-up. Writes ``$OUT/prefill_ops.json`` (and the tuning cache) when OUT is set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp

from jq8.quant import QuantSpec
from models.presets import preset
from pallas_kernels import autotune
from pallas_kernels._common import TileConfig
from pallas_kernels.gelu_quantize import bias_gelu_quantize
from pallas_kernels.int8_matmul import int8_matmul
from pallas_kernels.norm_quantize import layer_norm_quantize
from pallas_kernels.quantize import QuantizeConfig, quantize_tiles

TOKEN = QuantSpec.per_row(8)


def time_ms(fn, *args, iters: int, reps: int) -> float:
    """Per-call ms: ``reps`` calls back to back (async dispatch overlaps the host), median of ``iters``
    samples after warm-up (:func:`pallas_kernels.autotune.time_fn`)."""
    return autotune.time_fn(lambda: [fn(*args) for _ in range(reps)], iters=iters) * 1e3 / reps


def candidates() -> list[TileConfig]:
    c = autotune.default_candidates(8192, 8192, 8192)
    c += [
        TileConfig(128, 256, 128, 8, 4, 8),
        TileConfig(128, 128, 128, 8, 4, 8),
        TileConfig(128, 256, 64, 8, 4, 8),
        TileConfig(128, 128, 64, 8, 5, 8),
        TileConfig(256, 128, 64, 8, 5, 8),
        TileConfig(64, 256, 128, 4, 4, 8),
        TileConfig(128, 64, 128, 4, 4, 8),
        TileConfig(256, 128, 128, 8, 3, 16),
        TileConfig(128, 256, 128, 8, 3, 4),
    ]
    return list(dict.fromkeys(c))


def gemms(d: int, f: int, vocab: int) -> dict[str, tuple[int, int, dict]]:
    """name -> (N, K, epilogue kind) of a GPT block with hidden d and MLP width f, and the tied LM head."""
    return {
        "qkv": (3 * d, d, dict(bias=True, out="bfloat16")),
        "qkv_split": (3 * d, d, dict(bias=True, out="bfloat16", split=d)),
        "out": (d, d, dict(bias=True, residual=True, out="float32")),
        "fc1": (f, d, dict(out="float32")),
        "fc1_gelu_bf16": (f, d, dict(bias=True, gelu=True, out="bfloat16")),
        "fc2": (d, f, dict(bias=True, residual=True, out="float32")),
        "lm_head": (vocab, d, dict(out="bfloat16")),
    }


def bench_gemm(name, m, n, k, epi, args, key) -> dict:
    ks = jax.random.split(key, 6)
    x = jax.random.normal(ks[0], (m, k), jnp.bfloat16)
    w = (jax.random.normal(ks[1], (n, k), jnp.float32) * 0.02).astype(jnp.bfloat16)
    a = jax.random.randint(ks[2], (m, k), -127, 128, jnp.int8)
    b = jax.random.randint(ks[3], (n, k), -127, 128, jnp.int8)
    sa = jax.random.uniform(ks[4], (m, 1), jnp.float32, 1e-3, 2e-3)
    sb = jax.random.uniform(ks[5], (1, n), jnp.float32, 1e-3, 2e-3)
    bias = jnp.linspace(-1, 1, n, dtype=jnp.float32)
    res = jnp.ones((m, n), jnp.float32) if epi.get("residual") else None
    out_dtype = jnp.dtype(epi["out"])
    act = "gelu" if epi.get("gelu") else None
    kw = dict(bias=bias if epi.get("bias") else None, residual=res, activation=act, out_dtype=out_dtype)
    split = epi.get("split")
    if split:
        kw["split_cols"] = split

    def xla_bf16(x, w):
        y = jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        if kw["bias"] is not None:
            y = y + bias
        if act:
            y = jax.nn.gelu(y, approximate=False)
        y = y.astype(jnp.bfloat16)
        return y if res is None else y.astype(jnp.float32) + res

    def xla_int8(a, b):
        return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)

    t = lambda fn, *xs: time_ms(jax.jit(fn), *xs, iters=args.iters, reps=args.reps)  # noqa: E731
    row = dict(gemm=name, m=m, n=n, k=k, epilogue=epi)
    row["xla_bf16_ms"] = t(xla_bf16, x, w)
    row["xla_int8_ms"] = t(xla_int8, a, b)
    ours = lambda cfg: lambda a, b: int8_matmul(a, b, sa, sb, config=cfg, **kw)  # noqa: E731
    row["ours_ms"] = t(ours(None), a, b)
    if args.tune:
        timed = []
        for cfg in candidates():
            if split and split % cfg.block_n:
                continue
            try:
                timed.append((t(ours(cfg), a, b), cfg))
            except Exception as e:  # noqa: BLE001 - a tile that does not compile is not a candidate
                print(f"    {cfg}: failed {type(e).__name__}", flush=True)
        timed.sort(key=lambda r: r[0])
        row["tuned_ms"], best = timed[0]
        row["tuned_config"] = dataclasses.asdict(best)
        row["candidates"] = [dict(ms=ms, **dataclasses.asdict(c)) for ms, c in timed]
        key = f"b8-{out_dtype.name}" + ("-split" if split else "")
        autotune.store_config("int8_matmul", m, n, k, key, best)
    best_ms = row.get("tuned_ms", row["ours_ms"])
    tops = 2 * m * n * k / best_ms / 1e9
    print(
        f"  {name:14s} {m}x{n}x{k}: xla bf16 {row['xla_bf16_ms']:.3f}  xla int8 {row['xla_int8_ms']:.3f}  "
        f"ours {row['ours_ms']:.3f}"
        + (f"  tuned {row['tuned_ms']:.3f} {best}" if args.tune else "")
        + f"  ({tops:.0f} TOP/s, x bf16 {row['xla_bf16_ms'] / best_ms:.2f})",
        flush=True,
    )
    return row


def bench_producers(m, d, f, args, key) -> list[dict]:
    ks = jax.random.split(key, 4)
    r = jax.random.normal(ks[0], (m, d), jnp.float32)
    g, beta = 1 + 0.1 * jax.random.normal(ks[1], (d,)), 0.1 * jax.random.normal(ks[2], (d,))
    u32 = jax.random.normal(ks[3], (m, f), jnp.float32)
    u16 = u32.astype(jnp.bfloat16)
    b1 = jnp.linspace(-1, 1, f, dtype=jnp.float32)
    t = lambda fn, *xs: time_ms(jax.jit(fn), *xs, iters=args.iters, reps=args.reps)  # noqa: E731

    def ln_xla(r):
        mu = r.mean(-1, keepdims=True)
        var = jnp.square(r - mu).mean(-1, keepdims=True)
        return ((r - mu) * jax.lax.rsqrt(var + 1e-5) * g + beta).astype(jnp.bfloat16)

    rows = [dict(op="xla_bf16_layernorm(f32 rows)", ms=t(ln_xla, r))]
    rows.append(
        dict(
            op="xla_bf16_bias_gelu(bf16)",
            ms=t(lambda u: jax.nn.gelu(u + b1, approximate=False).astype(jnp.bfloat16), u16),
        )
    )
    configs = [
        None,
        QuantizeConfig(block_m=8),
        QuantizeConfig(block_m=16, max_block_elems=32768),
        QuantizeConfig(num_warps=4),
        QuantizeConfig(num_warps=16),
    ]
    for cfg in configs:
        default = dataclasses.asdict(QuantizeConfig())
        name = (
            "default"
            if cfg is None
            else str({k: v for k, v in dataclasses.asdict(cfg).items() if v != default[k]})
        )
        rows.append(
            dict(
                op=f"layer_norm_quantize(f32) {name}",
                ms=t(lambda r, cfg=cfg: layer_norm_quantize(r, g, beta, spec=TOKEN, config=cfg)[0], r),
            )
        )
        rows.append(
            dict(
                op=f"bias_gelu_quantize(f32) {name}",
                ms=t(lambda u, cfg=cfg: bias_gelu_quantize(u, b1, spec=TOKEN, config=cfg), u32),
            )
        )
        rows.append(
            dict(
                op=f"bias_gelu_quantize(bf16) {name}",
                ms=t(lambda u, cfg=cfg: bias_gelu_quantize(u, b1, spec=TOKEN, config=cfg), u16),
            )
        )
        rows.append(
            dict(
                op=f"quantize_tiles(bf16) {name}",
                ms=t(lambda u, cfg=cfg: quantize_tiles(u, TOKEN, config=cfg), u16),
            )
        )
    for row in rows:
        print(f"  {row['ms']:8.3f} ms  {row['op']}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["gpt2-124m", "gpt2-1.5b"])
    ap.add_argument("--tokens", type=int, default=8192, help="M: batch x sequence length of the prefill")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tune", action="store_true", help="time the candidate tiles, cache the fastest")
    ap.add_argument("--skip-producers", action="store_true")
    ap.add_argument("--gemms", nargs="*", help="only these GEMMs (names as printed), e.g. qkv_split lm_head")
    args = ap.parse_args()
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    out = dict(gemms=[], producers={})
    for name in args.presets:
        cfg = preset(name)
        d, f = cfg.d_model, cfg.hidden
        print(f"\n== {name}: M={args.tokens}, d={d}, mlp={f}", flush=True)
        for i, (g, (n, k, epi)) in enumerate(gemms(d, f, cfg.vocab_size).items()):
            if args.gemms and g not in args.gemms:
                continue
            out["gemms"].append(
                dict(preset=name, **bench_gemm(g, args.tokens, n, k, epi, args, jax.random.key(i)))
            )
        if not args.skip_producers:
            out["producers"][name] = bench_producers(args.tokens, d, f, args, jax.random.key(99))
        dest = os.environ.get("OUT")
        if dest:  # after each preset: a run cut short by a time limit keeps what it measured
            os.makedirs(dest, exist_ok=True)
            with open(os.path.join(dest, "prefill_ops.json"), "w") as fh:
                json.dump(out, fh, indent=1)
            if args.tune and autotune.cache_path().exists():
                shutil.copy(autotune.cache_path(), dest)


if __name__ == "__main__":
    main()
