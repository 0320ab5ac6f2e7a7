"""GEMM error of INT8 scale granularities vs fp32, on activation-like data with outlier channels.

    PYTHONPATH=. python3 benchmarks/blockscale_accuracy.py [--tokens 2048 --hidden 1024 --out-features 1024]

Y = X @ W with X (tokens, hidden) Gaussian activations in which a few hidden channels are scaled x10 / x100
(the outlier channels LLM activations show), W (hidden, out) Gaussian weights. Each row of the table
quantizes X as (M, K) and W^T as (N, K) (the NT operands of the kernels) with one granularity, computes
dequant(X) @ dequant(W^T).T in fp32 (what the kernels compute: exact int32 partials rescaled in fp32) and
reports the relative Frobenius error and the max absolute error relative to max |Y|. Runs on CPU (jnp only).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

from jq8.quant import QuantSpec, fake_quantize

NT = (((1,), (1,)), ((), ()))
SCHEMES = {  # name -> (activation tile of (M, K), weight tile of (N, K))
    "per-tensor x per-tensor": ((-1, -1), (-1, -1)),
    "per-row x per-col (W8A8 epilogue)": ((1, -1), (1, -1)),
    "per-row x g128 (ZeroQuant)": ((1, -1), (1, 128)),
    "blocks 32x32 (Jetfire)": ((32, 32), (32, 32)),
    "blocks 64x64": ((64, 64), (64, 64)),
    "blocks 128x128": ((128, 128), (128, 128)),
    "1x128 act, 128x128 weight (DeepSeek-V3)": ((1, 128), (128, 128)),
    "1x64 act, 64x64 weight": ((1, 64), (64, 64)),
    "1x32 act, 32x32 weight": ((1, 32), (32, 32)),
}


def activations(key, tokens: int, hidden: int, outlier_scale: float, n_outliers: int) -> jax.Array:
    kx, kc = jax.random.split(key)
    x = jax.random.normal(kx, (tokens, hidden), jnp.float32)
    if n_outliers and outlier_scale != 1:
        cols = jax.random.choice(kc, hidden, (n_outliers,), replace=False)
        x = x.at[:, cols].multiply(outlier_scale)
    return x


def gemm_errors(x: jax.Array, wt: jax.Array, a_tile, b_tile) -> tuple[float, float]:
    """(relative Frobenius error, max abs error / max |Y|) of the quantized GEMM vs fp32."""
    y = lax.dot_general(x, wt, NT, precision=lax.Precision.HIGHEST)
    yq = lax.dot_general(
        fake_quantize(x, QuantSpec(a_tile)),
        fake_quantize(wt, QuantSpec(b_tile)),
        NT,
        precision=lax.Precision.HIGHEST,
    )
    rel = float(jnp.linalg.norm(yq - y) / jnp.linalg.norm(y))
    mx = float(jnp.max(jnp.abs(yq - y)) / jnp.max(jnp.abs(y)))
    return rel, mx


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--out-features", type=int, default=1024)
    p.add_argument("--n-outliers", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--json",
        metavar="PATH",
        help="write the results as JSON to PATH (default: $OUT/blockscale_accuracy.json when OUT is set)",
    )
    args = p.parse_args(argv)
    kx, kw = jax.random.split(jax.random.key(args.seed))
    wt = jax.random.normal(kw, (args.out_features, args.hidden), jnp.float32) / args.hidden**0.5
    regimes = [("no outliers", 1.0), ("outliers x10", 10.0), ("outliers x100", 100.0)]
    results = {}
    for regime, scale in regimes:
        x = activations(kx, args.tokens, args.hidden, scale, args.n_outliers)
        results[regime] = {name: gemm_errors(x, wt, ta, tb) for name, (ta, tb) in SCHEMES.items()}

    print(
        f"\nINT8 GEMM error vs fp32: X ({args.tokens}, {args.hidden}) with {args.n_outliers} outlier "
        f"channels, W ({args.hidden}, {args.out_features}); cells: relative Frobenius error / max error "
        "(relative to max |Y|)\n"
    )
    print("| scales (activation x weight) | " + " | ".join(r for r, _ in regimes) + " |")
    print("|" + " --- |" * (len(regimes) + 1))
    for name in SCHEMES:
        cells = [f"{results[r][name][0]:.2e} / {results[r][name][1]:.2e}" for r, _ in regimes]
        print(f"| {name} | " + " | ".join(cells) + " |")
    path = args.json or (os.path.join(os.environ["OUT"], "blockscale_accuracy.json") if os.environ.get("OUT") else None)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(dict(args=vars(args), results=results), indent=1))


if __name__ == "__main__":
    main()
