"""The GEMM kernels lower to Triton IR for a CUDA GPU (cross-lowered here, on CPU, without a GPU).

Interpret mode (the other tests) checks the numbers but not Pallas' Triton lowering, which rejects some
programs interpret mode runs (an i1 constant from a traced floor division broke the INT4 kernels on the
H100 once). Lowering needs no GPU: ``jit(...).trace(...).lower(lowering_platforms=("cuda",))`` runs the
Triton lowering of every kernel in the function and stops before compiling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from jq8.quant import QuantSpec, pack_int4, quantize
from pallas_kernels._common import TileConfig, cdiv
from pallas_kernels.gemm import int8_matmul, matmul_qarrays
from pallas_kernels.int8_matmul_decode import DecodeConfig, int8_matmul_decode, quantize_matmul_decode

CFG = TileConfig(32, 64, 64, num_warps=4, num_stages=3, group_m=2)


@pytest.fixture(autouse=True)
def _verify_every_module(verified_triton_modules):
    """Every lowering in this file runs the MLIR verifier (the fixture in conftest.py)."""


def _lowers(fn, *args):
    jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def _int8(seed, shape, lo=-127, hi=128):
    return jax.random.randint(jax.random.key(seed), shape, lo, hi, jnp.int32).astype(jnp.int8)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("k,group", [(333, None), (333, 64), (768, 128), (512, 32)])
@pytest.mark.parametrize(
    "cfg",
    [DecodeConfig(32, 128, 1), DecodeConfig(64, 256, 3), DecodeConfig(32, 64, 1, unroll=True)],
    ids=["fused", "split3", "unrolled"],
)
def test_decode_kernel_lowers(bits, k, group, cfg):
    n = 96
    a, w = _int8(0, (1, k)), _int8(1, (n, k), -8, 8)
    b = pack_int4(w) if bits == 4 else w
    sa = jnp.ones((1, 1), jnp.float32)
    sb = jnp.ones((n, cdiv(k, group)) if group else (1, n), jnp.float32)
    _lowers(
        lambda a, b, sa, sb: int8_matmul_decode(
            a, b, sa, sb, b_bits=bits, b_group=group, config=cfg, activation="gelu", interpret=False
        ),
        a,
        b,
        sa,
        sb,
    )


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(
    "m,k,group,norm", [(1, 333, None, "layernorm"), (3, 768, 128, "rmsnorm"), (1, 5000, 64, None)]
)
@pytest.mark.parametrize("cfg", [DecodeConfig(32, 128, 1), DecodeConfig(64, 256, 3)], ids=["fused", "split3"])
def test_quantize_decode_kernel_lowers(bits, m, k, group, norm, cfg):
    n = 96
    x, w = jax.random.normal(jax.random.key(6), (m, k)), _int8(1, (n, k), -8, 8)
    b = pack_int4(w) if bits == 4 else w
    sb = jnp.ones((n, cdiv(k, group)) if group else (1, n), jnp.float32)
    gamma = beta = jnp.ones((k,)) if norm else None
    _lowers(
        lambda x, b, sb, gamma, beta: quantize_matmul_decode(
            x,
            b,
            sb,
            norm=norm,
            gamma=gamma,
            beta=beta,
            b_bits=bits,
            b_group=group,
            config=cfg,
            activation="gelu",
            interpret=False,
        ),
        x,
        b,
        sb,
        gamma,
        beta,
    )


@pytest.mark.parametrize("bits,group,quantize_input", [(8, None, False), (4, 64, True), (8, 128, True)])
def test_decode_atomic_split_sum_lowers(bits, group, quantize_input):
    """Split-K summed by masked f32 atomics into the aliased residual (interpret mode: a load + store)."""
    m, k, n = 1, 768, 96
    w = _int8(1, (n, k), -8, 8)
    b = pack_int4(w) if bits == 4 else w
    sb = jnp.ones((n, cdiv(k, group)) if group else (1, n), jnp.float32)
    kw = dict(b_bits=bits, b_group=group, config=DecodeConfig(32, 128, 3), split_sum="atomic")
    kw.update(out_dtype=jnp.float32, interpret=False)
    res, bias = jnp.ones((m, n), jnp.float32), jnp.ones((n,), jnp.float32)
    if quantize_input:
        fn = lambda x, b, sb, r, c: quantize_matmul_decode(x, b, sb, bias=c, residual=r, **kw)  # noqa: E731
        x = jax.random.normal(jax.random.key(6), (m, k))
    else:
        fn = lambda x, b, sb, r, c: int8_matmul_decode(x, b, jnp.ones((m, 1)), sb, bias=c, residual=r, **kw)  # noqa: E731
        x = _int8(0, (m, k))
    _lowers(fn, x, b, sb, res, bias)


@pytest.mark.parametrize("k", [201, 512])
def test_int4_gemm_lowers(k):
    a, w = _int8(2, (70, k)), _int8(3, (96, k), -8, 8)
    _lowers(lambda a, b: int8_matmul(a, b, b_bits=4, config=CFG, interpret=False), a, pack_int4(w))


@pytest.mark.parametrize(
    "a_tile,b_tile,bits,k",
    [
        ((32, 32), (32, 32), 8, 200),
        ((64, 64), (32, 32), 4, 200),
        ((1, -1), (1, 64), 4, 512),
        ((1, -1), (1, 128), 4, 200),
        ((1, -1), (1, -1), 4, 512),
    ],
)
def test_block_scaled_lowers(a_tile, b_tile, bits, k):
    x = jax.random.normal(jax.random.key(4), (70, k))
    w = jax.random.normal(jax.random.key(5), (96, k))
    qa, qb = quantize(x, QuantSpec(a_tile)), quantize(w, QuantSpec(b_tile, bits=bits))
    _lowers(lambda qa, qb: matmul_qarrays(qa, qb, out_dtype=jnp.float32, config=CFG, interpret=False), qa, qb)


def test_split_cols_epilogue_lowers():
    """The W8A8 GEMM writing q, k, v apart (one guarded store per part) lowers, with a GELU epilogue."""
    m, n, k = 70, 96, 200
    a, b = _int8(2, (m, k)), _int8(3, (n, k))
    sa, sb = jnp.ones((m, 1), jnp.float32), jnp.ones((1, n), jnp.float32)
    cfg = TileConfig(32, 32, 64, num_warps=4, num_stages=3, group_m=2)
    _lowers(
        lambda a, b, sa, sb: int8_matmul(
            a, b, sa, sb, bias=jnp.ones((n,)), activation="gelu", split_cols=32, config=cfg, interpret=False
        ),
        a,
        b,
        sa,
        sb,
    )
