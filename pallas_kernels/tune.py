"""Fills the GEMM tile cache (:mod:`pallas_kernels.autotune`) for this GPU.

    python -m pallas_kernels.tune --shapes 8192x8192x8192,16384x2304x768 [--kernels int8_matmul,decode]

This module imports the kernels it times; the kernels import only :mod:`pallas_kernels.autotune`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jq8.quant import QuantSpec, pack_int4
from pallas_kernels import int8_matmul_decode as dec
from pallas_kernels.autotune import autotune, cache_path, time_in_loop
from pallas_kernels.gemm import int8_matmul
from pallas_kernels.int8_matmul_block_scaled import block_scaled_key, int8_matmul_block_scaled


def tune_int8_matmul(m: int, n: int, k: int, *, candidates=None, iters: int = 10, verbose: bool = False):
    """Tunes the W8A8 kernel (bf16 output, per-row x per-column scales) at one shape."""

    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.randint(ka, (m, k), -127, 128, jnp.int8)
    b = jax.random.randint(kb, (n, k), -127, 128, jnp.int8)
    sa = jnp.full((m, 1), 1e-3, jnp.float32)
    sb = jnp.full((1, n), 1e-3, jnp.float32)
    return autotune(
        "int8_matmul",
        m,
        n,
        k,
        "b8-bfloat16",
        lambda cfg: int8_matmul(a, b, sa, sb, config=cfg),
        candidates,
        iters=iters,
        verbose=verbose,
    )


def decode_weights(n: int, k: int, *, b_bits: int, b_group: int | None, l2_bytes: int = 64 << 20) -> list:
    """Distinct random (codes, scales) weights in the decode kernel's layout, enough (2-16) to overflow
    twice ``l2_bytes`` of L2, so a loop over them streams from HBM as a decode step does."""

    count = max(2, min(16, -(-2 * l2_bytes // (n * k * b_bits // 8))))
    out = []
    for i in range(count):
        kb, ks = jax.random.split(jax.random.key(i + 1))
        lo, hi = (-8, 8) if b_bits == 4 else (-127, 128)
        b = jax.random.randint(kb, (n, k), lo, hi, jnp.int32).astype(jnp.int8)
        shape = (n, -(-k // b_group)) if b_group else (1, n)
        sb = jax.random.uniform(ks, shape, jnp.float32, 1e-3, 2e-3)
        out.append((pack_int4(b) if b_bits == 4 else b, sb))
    return out


def tune_int8_matmul_decode(
    m: int, n: int, k: int, *, b_bits: int = 8, b_group: int | None = None, iters: int = 5, verbose=False
):
    """Tunes the decode kernel (M <= 16; bf16 output, per-row x per-column or K-group scales). A decode
    GEMV is shorter than its launch, so each candidate is timed by :func:`time_in_loop` over enough
    distinct weights to overflow L2, not one call at a time."""

    weights = decode_weights(n, k, b_bits=b_bits, b_group=b_group)
    a = jax.random.randint(jax.random.key(0), (m, k), -127, 128, jnp.int8)
    sa = jnp.full((m, 1), 1e-3, jnp.float32)

    def call(cfg):
        return lambda x, w: dec.int8_matmul_decode(
            x, w[0], sa, w[1], b_bits=b_bits, b_group=b_group, config=cfg
        )

    return autotune(
        "int8_matmul_decode",
        m,
        n,
        k,
        dec.decode_key(b_bits, b_group),
        lambda cfg: call(cfg)(a, weights[0]),
        dec.decode_candidates(m, n, k, b_bits=b_bits, b_group=b_group),
        verbose=verbose,
        timer=lambda cfg: time_in_loop(call(cfg), a, weights, iters=iters),
    )


def tune_block_scaled(
    m: int, n: int, k: int, a_tile, b_tile, *, candidates=None, iters: int = 10, verbose: bool = False
):
    """Tunes the block-scaled kernel for scale tiles ``a_tile`` (of (M, K)) and ``b_tile`` (of (N, K))."""

    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.randint(ka, (m, k), -127, 128, jnp.int8)
    b = jax.random.randint(kb, (n, k), -127, 128, jnp.int8)
    sa = jnp.full(QuantSpec(a_tile).scale_shape(m, k), 1e-3, jnp.float32)
    sb = jnp.full(QuantSpec(b_tile).scale_shape(n, k), 1e-3, jnp.float32)
    key = block_scaled_key(a_tile, b_tile, m, n, k, "bfloat16")
    return autotune(
        "int8_matmul_block_scaled",
        m,
        n,
        k,
        key,
        lambda cfg: int8_matmul_block_scaled(a, sa, b, sb, config=cfg, a_tile=a_tile, b_tile=b_tile),
        candidates,
        iters=iters,
        verbose=verbose,
    )


def _parse_shape(s: str) -> tuple[int, int, int]:
    m, n, k = (int(x) for x in s.lower().split("x"))
    return m, n, k


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fill the GEMM tile cache for this GPU.")
    parser.add_argument(
        "--shapes", required=True, help="comma-separated MxNxK, e.g. 8192x8192x8192,16384x2304x768"
    )
    parser.add_argument(
        "--kernels",
        default="int8_matmul,block_scaled",
        help="int8_matmul, block_scaled (tiles 32x32, 1x128/128x128, 128x128) and/or decode (M <= 16: "
        "INT8 per-channel and INT4 with K groups of --int4-group)",
    )
    parser.add_argument("--int4-group", type=int, default=128)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args(argv)
    kernels = args.kernels.split(",")
    for shape in args.shapes.split(","):
        m, n, k = _parse_shape(shape)
        if "int8_matmul" in kernels:
            cfg = tune_int8_matmul(m, n, k, iters=args.iters, verbose=True)
            print(f"int8_matmul {m}x{n}x{k}: {cfg}")
        if "decode" in kernels:
            for bits, group in ((8, None), (4, args.int4_group)):
                cfg = tune_int8_matmul_decode(m, n, k, b_bits=bits, b_group=group, verbose=True)
                print(f"decode b{bits} g{group} {m}x{n}x{k}: {cfg}")
        if "block_scaled" in kernels:
            for a_tile, b_tile in (((32, 32), (32, 32)), ((1, 128), (128, 128)), ((128, 128), (128, 128))):
                cfg = tune_block_scaled(m, n, k, a_tile, b_tile, iters=args.iters, verbose=True)
                print(f"block_scaled {a_tile}x{b_tile} {m}x{n}x{k}: {cfg}")
    print(f"cache: {cache_path()}")


if __name__ == "__main__":
    main()
