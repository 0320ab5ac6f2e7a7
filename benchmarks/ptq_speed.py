"""ZeroQuant inference speed on GPU: INT8/INT4 (Pallas kernels, fused path) vs the bf16 model.

    PYTHONPATH=. python3 benchmarks/ptq_speed.py                        # GPT-2 124M, H100
    PYTHONPATH=. python3 benchmarks/ptq_speed.py --preset gpt-tiny --batch 2 --seq 32 --iters 2   # CPU smoke

Measures (median of --iters after warm-up, one process, same device):
  * prefill: batch x seq tokens through the whole model, W8A8 (token-wise INT8 acts, per-channel INT8
    weights) vs bf16; also W4/8-A8;
  * decode proxy: batch 1, one token, W4/8-A8 (INT4 MLP) and W8A8 vs bf16, as tokens/s. The models have no
    KV cache, so this times the per-token weight traffic (every GEMM at M = 1; attention over a cache is
    not included);
  * compact checkpoint size vs the fp16 size of the same params.
Correctness before timing: the INT8 logits vs the bf16 model's (relative RMS error) and the Pallas path vs
the XLA integer path on the same quantized params. Writes JSON to $OUT/ptq_speed.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jq8 import ptq, ptq_infer, qcheckpoint
from jq8.policy import Policy
from models.presets import build_model, preset


def timeit(fn, *args, iters: int) -> float:
    """Median wall time (ms) of fn(*args) after two warm-up calls."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def rel_rms(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.sqrt(np.mean((a - b) ** 2)) / (np.sqrt(np.mean(b**2)) + 1e-12))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="gpt2-124m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--int4-group", type=int, default=128)
    args = ap.parse_args()

    cfg = dataclasses.replace(preset(args.preset), max_seq_len=max(args.seq, preset(args.preset).max_seq_len))
    bf16 = build_model(cfg, Policy.from_name("bf16"))  # bf16 compute, fp32 params (the baseline)
    params = jax.jit(bf16.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    params_bf16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (args.batch, args.seq), 0, cfg.vocab_size)
    one = tokens[:1, :1]
    print(f"device {jax.devices()[0].device_kind}, preset {args.preset}, prefill {args.batch}x{args.seq}")

    fp_fn = jax.jit(lambda p, t: bf16.apply({"params": p}, t))
    results: dict = {
        "device": jax.devices()[0].device_kind,
        "preset": args.preset,
        "batch": args.batch,
        "seq": args.seq,
        "jax": jax.__version__,
    }
    ref = fp_fn(params_bf16, tokens)

    rows = []
    t_fp = timeit(fp_fn, params_bf16, tokens, iters=args.iters)
    t_fp1 = timeit(fp_fn, params_bf16, one, iters=args.iters)
    rows.append(("bf16", t_fp, 1e3 / t_fp1, None, None))
    sizes = {}
    for scheme in ("w8a8", "w4/8-a8"):
        qp = ptq.quantize_params(params, ptq.scheme(scheme, int4_group=args.int4_group))
        q_fn = jax.jit(lambda q, t: ptq_infer.apply_quantized(bf16, q, t, backend="pallas"))
        x_fn = jax.jit(lambda q, t: ptq_infer.apply_quantized(bf16, q, t, backend="xla"))
        out = q_fn(qp, tokens)
        err_fp = rel_rms(out, ref)
        err_xla = rel_rms(out, x_fn(qp, tokens))
        t_q = timeit(q_fn, qp, tokens, iters=args.iters)
        t_q1 = timeit(q_fn, qp, one, iters=args.iters)
        t_x = timeit(x_fn, qp, tokens, iters=args.iters)
        rows.append((scheme, t_q, 1e3 / t_q1, err_fp, err_xla))
        rows.append((f"{scheme} (xla int8 dots)", t_x, None, None, None))
        with tempfile.TemporaryDirectory() as d:
            qcheckpoint.save_quantized(os.path.join(d, "q"), qp, float_dtype="float16")
            sizes[scheme] = qcheckpoint.disk_bytes(os.path.join(d, "q"))
    fp16_bytes = sum(int(np.prod(x.shape)) * 2 for x in jax.tree_util.tree_leaves(params))
    block_fp16 = sum(
        int(np.prod(x.shape)) * 2
        for k, v in params.items()
        if k.startswith("h_")
        for x in jax.tree_util.tree_leaves(v)
    )

    print(
        f"\n{'model':26s} {'prefill ms':>11s} {'x bf16':>7s} {'decode tok/s':>13s} {'x bf16':>7s} "
        f"{'relRMS vs bf16':>15s} {'pallas vs xla':>14s}"
    )
    for name, t, tps, e1, e2 in rows:
        sp = rows[0][1] / t
        dec = f"{tps:13.1f} {tps / rows[0][2]:7.2f}" if tps else f"{'-':>13s} {'-':>7s}"
        e1s = "-" if e1 is None else f"{e1:.3g}"
        e2s = "-" if e2 is None else f"{e2:.3g}"
        print(f"{name:26s} {t:11.2f} {sp:7.2f} {dec} {e1s:>15s} {e2s:>14s}")
    for scheme, b in sizes.items():
        print(
            f"checkpoint {scheme}: {b / 1e6:.2f} MB on disk vs fp16 {fp16_bytes / 1e6:.2f} MB "
            f"({fp16_bytes / b:.2f}x; embeddings stay fp16; blocks alone {block_fp16 / 1e6:.2f} MB fp16)"
        )
    results["rows"] = [
        dict(model=n, prefill_ms=t, decode_tok_s=tps, rel_rms_vs_bf16=e1, pallas_vs_xla=e2)
        for n, t, tps, e1, e2 in rows
    ]
    results["checkpoint_bytes"] = sizes
    results["fp16_bytes"] = fp16_bytes
    results["size_ratio_vs_fp16"] = {k: fp16_bytes / v for k, v in sizes.items()}
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "ptq_speed.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
