"""layer_norm_backward (Pallas; interpret mode on CPU) vs its jnp reference, the reference vs jax.vjp of a
plain fp32 LayerNorm / RMSNorm, input validation, and the Triton lowering of both routes (no GPU needed).

Kernel and reference compute the same fp32 formulas; only the summation order differs, so they agree to
fp32 rounding (tolerances relative to each output's magnitude).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jq8.quant import QuantSpec, quantize
from pallas_kernels.norm_backward import (
    NormBackwardConfig,
    layer_norm_backward,
    layer_norm_backward_reference,
    plan_norm_backward,
)

B = QuantSpec.blocks
EPS = 1e-5


def _inputs(m, d, *, x_spec=None, rms=False, x_dtype=jnp.float32, dh_dtype=jnp.float32, rg_dtype=None, key=0):
    """Fresh random (dh, x, mean, rstd, gamma, residual_grad): rows of different offset and scale, mean and
    rstd computed from the (dequantized) x as the forward would."""
    ks = jax.random.split(jax.random.key(key), 6)
    x = jax.random.normal(ks[0], (m, d)) * jnp.exp(0.5 * jax.random.normal(ks[1], (m, 1))) + 0.7
    x = x.astype(x_dtype)
    if x_spec is not None:
        x = quantize(x, x_spec)
    xf = x.dequantize(jnp.float32) if x_spec is not None else x.astype(jnp.float32)
    mean = jnp.zeros((m,)) if rms else jnp.mean(xf, axis=1)
    rstd = lax.rsqrt(jnp.mean(jnp.square(xf - mean[:, None]), axis=1) + EPS)
    dh = (jax.random.normal(ks[2], (m, d)) * 0.3 + 0.1).astype(dh_dtype)
    gamma = 1.0 + 0.3 * jax.random.normal(ks[3], (d,))
    rg = None if rg_dtype is None else jax.random.normal(ks[4], (m, d)).astype(rg_dtype)
    return dh, x, mean, rstd, gamma, rg


def _close(got, ref, rtol=1e-5, atol_rel=1e-5, what=""):
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    assert got.shape == ref.shape, what
    assert np.isfinite(got).all(), what
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol_rel * np.abs(ref).max(), err_msg=what)


F32, BF16 = jnp.float32, jnp.bfloat16
CASES = [
    # (m, d), x: dtype or its quantization, rms, has_beta, dh dtype, residual_grad dtype, out dtype, config
    ((70, 200), F32, False, True, F32, None, None, None),  # whole rows, 8 per block
    ((70, 200), B((32, 32)), False, True, BF16, F32, F32, None),  # ragged M
    ((130, 96), B((32, 32)), True, True, F32, F32, BF16,
     NormBackwardConfig(block_rows=2, rows_per_program=8)),  # 4 row groups a program; the last one ragged
    ((130, 96), BF16, False, False, BF16, BF16, None,
     NormBackwardConfig(block_rows=1, rows_per_program=48)),  # bf16 x: dx bf16 by default
    ((33, 100), F32, True, False, F32, F32, None,
     NormBackwardConfig(max_block_elems=64)),  # column sweep, one row group a program
    ((33, 100), B((32, 32)), False, True, BF16, BF16, BF16,
     NormBackwardConfig(max_block_elems=64, rows_per_program=8)),  # sweep; partials summed over 4 groups
    ((40, 300), B((8, 128)), False, True, F32, F32, None,
     NormBackwardConfig(max_block_elems=128, rows_per_program=4)),  # scale tiles wider than a chunk
    ((40, 300), QuantSpec.per_row(), True, True, F32, None, None,
     NormBackwardConfig(max_block_elems=128)),  # one scale per row, swept
]  # fmt: skip


@pytest.mark.parametrize("shape,x_kind,rms,has_beta,dh_dtype,rg_dtype,out_dtype,config", CASES)
def test_kernel_matches_reference(shape, x_kind, rms, has_beta, dh_dtype, rg_dtype, out_dtype, config):
    x_spec = x_kind if isinstance(x_kind, QuantSpec) else None
    x_dtype = F32 if x_spec is not None else x_kind
    dh, x, mean, rstd, gamma, rg = _inputs(*shape, x_spec=x_spec, rms=rms, x_dtype=x_dtype, dh_dtype=dh_dtype,
                                           rg_dtype=rg_dtype)  # fmt: skip
    kw = dict(rms=rms, has_beta=has_beta, residual_grad=rg)
    # interpret=None: interpret mode on CPU, the compiled Triton kernel on a GPU
    dx, dgamma, dbeta = layer_norm_backward(dh, x, mean, rstd, gamma, out_dtype=out_dtype, config=config,
                                            **kw)  # fmt: skip
    rdx, rdgamma, rdbeta = layer_norm_backward_reference(dh, x, mean, rstd, gamma, out_dtype=F32, **kw)
    want_dtype = jnp.dtype(out_dtype or x.dtype)
    assert dx.dtype == want_dtype and dx.shape == shape
    assert dgamma.dtype == F32 and dgamma.shape == (shape[1],)
    if want_dtype == BF16:  # the kernel's fp32 dx, rounded once: within half a bf16 ulp (2^-8)
        _close(dx, rdx, rtol=2.0**-8, atol_rel=1e-5, what="dx")
    else:
        _close(dx, rdx, what="dx")
    _close(dgamma, rdgamma, what="dgamma")
    if has_beta:
        assert dbeta.dtype == F32
        _close(dbeta, rdbeta, what="dbeta")
    else:
        assert dbeta is None and rdbeta is None


def _norm(x, gamma, beta, rms):
    mean = 0.0 if rms else jnp.mean(x, axis=1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=1, keepdims=True)
    return (x - mean) * lax.rsqrt(var + EPS) * gamma + beta


@pytest.mark.parametrize("rms", [False, True])
def test_reference_matches_vjp(rms):
    """The reference's closed form equals autodiff of the forward (plus the residual stream's gradient)."""
    m, d = 37, 50
    dh, x, mean, rstd, gamma, rg = _inputs(m, d, rms=rms, rg_dtype=jnp.float32, key=3)
    beta = 0.1 * jax.random.normal(jax.random.key(9), (d,))
    _, vjp = jax.vjp(lambda x, g, b: _norm(x, g, b, rms), x, gamma, beta)
    vdx, vdgamma, vdbeta = vjp(dh)
    dx, dgamma, dbeta = layer_norm_backward_reference(dh, x, mean, rstd, gamma, rms=rms, residual_grad=rg)
    _close(dx, vdx + rg, rtol=1e-4, atol_rel=1e-5)
    _close(dgamma, vdgamma, rtol=1e-4, atol_rel=1e-5)
    _close(dbeta, vdbeta, rtol=1e-4, atol_rel=1e-5)


@pytest.mark.parametrize("fn", [layer_norm_backward, layer_norm_backward_reference])
def test_bad_inputs_raise(fn):
    m, d = 8, 16
    dh, x, mean, rstd, gamma, rg = _inputs(m, d, rg_dtype=jnp.float32)
    good = dict(dh=dh, x=x, mean=mean, rstd=rstd, gamma=gamma)
    bad = [
        (dict(dh=dh[None]), "dh"),
        (dict(dh=dh.astype(jnp.int32)), "dh"),
        (dict(x=x[:, :-1]), "x"),
        (dict(mean=mean[:-1]), "mean"),
        (dict(rstd=rstd[:, None]), "rstd"),
        (dict(gamma=jnp.ones((d + 1,))), "gamma"),
    ]
    for change, name in bad:
        args = {**good, **change}
        with pytest.raises(ValueError, match=name):
            fn(args["dh"], args["x"], args["mean"], args["rstd"], args["gamma"])
    with pytest.raises(ValueError, match="residual_grad"):
        fn(dh, x, mean, rstd, gamma, residual_grad=rg[:, :-1])


def test_bad_config_raises():
    with pytest.raises(ValueError, match="block_rows"):
        plan_norm_backward(64, 128, NormBackwardConfig(block_rows=3))
    with pytest.raises(ValueError, match="rows_per_program"):
        plan_norm_backward(64, 128, NormBackwardConfig(block_rows=4, rows_per_program=6))


@pytest.mark.parametrize(
    "m,d,bm,rows,sweep,warps",
    [
        (16384, 4096, 1, 32, False, 4),  # the target: whole rows, 512 programs of 32 rows
        (16384, 2048, 1, 32, False, 4),
        (16384, 1024, 2, 32, False, 4),
        (16384, 768, 2, 32, False, 4),
        (16384, 12288, 2, 32, True, 8),  # over the budget: swept in (2, 4096) chunks
    ],
)
def test_default_plans(m, d, bm, rows, sweep, warps):
    plan = plan_norm_backward(m, d, NormBackwardConfig())
    assert (plan.bm, plan.rows_per_program, plan.sweep, plan.num_warps) == (bm, rows, sweep, warps)
    assert plan.bm * plan.bn <= NormBackwardConfig().max_block_elems


@pytest.mark.parametrize(
    "x_spec,config,barrier",
    [
        (None, None, False),  # whole rows
        (B((32, 32)), NormBackwardConfig(block_rows=2, rows_per_program=8), False),  # QArray, whole rows
        (None, NormBackwardConfig(max_block_elems=64, rows_per_program=8), True),  # column sweep
        (B((32, 32)), NormBackwardConfig(max_block_elems=64, rows_per_program=8), True),  # QArray, sweep
    ],
)
def test_lowers_to_triton(verified_triton_modules, x_spec, config, barrier):
    """The GPU path (interpret=False) lowers to verified Triton IR on this CPU-only machine."""
    dh, x, mean, rstd, gamma, rg = _inputs(70, 200, x_spec=x_spec, dh_dtype=BF16, rg_dtype=F32)

    def fn(dh, x, mean, rstd, gamma, rg):
        return layer_norm_backward(dh, x, mean, rstd, gamma, residual_grad=rg, out_dtype=BF16,
                                   config=config, interpret=False)  # fmt: skip

    jax.jit(fn).trace(dh, x, mean, rstd, gamma, rg).lower(lowering_platforms=("cuda",))
    (module,) = verified_triton_modules
    assert ("gpu.barrier" in module) == barrier
