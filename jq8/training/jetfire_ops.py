"""Jetfire per-op forward/backward functions over QArray (plain functions, never autodiffed).

JAX gives int8 primals float0 cotangents, so INT8 cannot flow between separately differentiated ops. These
functions are therefore written by hand in pairs (``*_fwd`` returns what its ``*_bwd`` needs) and composed
inside the ``jax.custom_vjp`` ops of :mod:`jq8.training.jetfire`, so INT8 tensors stay inside one op.

Operands. Every GEMM is "NT" (both operands contiguous along K) when it runs in INT8:
    forward      Y  = X W      a = X (M, K),    b = W^T (N, K)
    grad-input   dX = dY W^T   a = dY (M, N),   b = W (K, N)
    grad-weight  dW = X^T dY   a = X^T (K, M),  b = dY^T (N, M)
The transposed copies come from the quantize kernels' ``transposed_spec`` output (written in the same pass).
A GEMM switched to high precision by the policy takes float operands in their natural layout instead, so an
"operand" below is a QArray in the NT layout when its GEMM is INT8, else a float array (or a QArray of the
forward values, dequantized there: the backward then differentiates exactly what the forward computed).

Rounding: forward quantization rounds to nearest; gradients use ``policy.rounding_bwd`` (stochastic by
default) with a (2,) uint32 ``seed`` per quantization (:func:`jq8.quant.noise_seed`).
Shapes: activations (M tokens, features), weights (in, out) fp32 masters, all 2-D here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jq8.quant import QArray, dequantize
from jq8.training import kernels as kb
from jq8.training.policy import Policy

Operand = QArray | jax.Array
F32 = jnp.float32


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int], dtype) -> jax.Array:
    """High-precision GEMM: operands in ``dtype`` (the policy's compute dtype), fp32 accumulation."""
    a = dequantize(a, dtype) if isinstance(a, QArray) else a.astype(dtype)
    b = dequantize(b, dtype) if isinstance(b, QArray) else b.astype(dtype)
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=F32)


def _float(x: Operand) -> jax.Array:
    return dequantize(x, F32) if isinstance(x, QArray) else x.astype(F32)


# ------------------------------------------------------------------------------------ operand prep


def activation_operands(y: jax.Array, policy: Policy) -> tuple[Operand, Operand]:
    """y: (M, N) float activation -> (operand of its forward GEMM, operand of its grad-weight GEMM).

    INT8 forward: QArray (M, N) round-to-nearest; INT8 grad-weight: QArray (N, M) of y^T (same pass).
    When only the forward is INT8, the backward reuses the forward QArray (dequantized there).
    """
    cd, k = policy.compute_dtype, policy.backend
    if policy.int8_forward and policy.int8_grad_weight:
        return kb.quantize_tiles(y, policy.act_spec, transposed_spec=policy.act_spec_t, backend=k)
    if policy.int8_forward:
        q = kb.quantize_tiles(y, policy.act_spec, backend=k)
        return q, q
    if policy.int8_grad_weight:
        return y.astype(cd), kb.quantize_tiles(y.T, policy.act_spec_t, backend=k)
    return y.astype(cd), y.astype(cd)


def grad_operands(g: jax.Array, policy: Policy, seed: jax.Array, *, column_sum: bool = False) -> tuple:
    """g: (M, N) float gradient, or a tuple of its column parts -> (operand of the grad-input GEMM,
    operand of the grad-weight GEMM [, sum(g, axis=0) (N,) f32 with ``column_sum``: the bias gradient, from
    the quantizer's statistics pass when both GEMMs are INT8]).

    INT8 grad-input: QArray (M, N); INT8 grad-weight: QArray (N, M) of g^T; rounding ``policy.rounding_bwd``.
    """
    cd, k, r = policy.compute_dtype, policy.backend, policy.rounding_bwd
    seed = seed if r == "stochastic" else None
    if policy.int8_grad_input and policy.int8_grad_weight:  # g may be column parts: quantized in place
        return kb.quantize_tiles(g, policy.grad_spec, rounding=r, seed=seed, transposed_spec=policy.grad_spec_t,
                                 column_sum=column_sum, backend=k)
    g = jnp.concatenate(g, axis=1) if isinstance(g, tuple) else g
    g_dx = kb.quantize_tiles(g, policy.grad_spec, rounding=r, seed=seed, backend=k) if policy.int8_grad_input \
        else g.astype(cd)
    g_dw = kb.quantize_tiles(g.T, policy.grad_spec_t, rounding=r, seed=seed, backend=k) \
        if policy.int8_grad_weight else g.astype(cd)
    return (g_dx, g_dw, jnp.sum(g.astype(F32), axis=0)) if column_sum else (g_dx, g_dw)


def weight_operands(w: jax.Array, policy: Policy) -> tuple[Operand, Operand]:
    """w: (K, N) fp32 master -> (forward operand: QArray (N, K) or float (K, N),
    grad-input operand: QArray (K, N) or the fp32 master). Re-quantized every step, round-to-nearest."""
    if not (policy.int8_forward or policy.int8_grad_input):
        return w.astype(policy.compute_dtype), w
    qw, qwt = kb.quantize_tiles(w, policy.weight_spec, transposed_spec=policy.weight_spec_t,
                                backend=policy.backend)
    w_fwd = qwt if policy.int8_forward else w.astype(policy.compute_dtype)
    return w_fwd, (qw if policy.int8_grad_input else w)


# ------------------------------------------------------------------------------------------ linear


def linear_fwd(
    x_fwd: Operand, w_fwd: Operand, bias: jax.Array | None, policy: Policy, *, out_dtype=F32, out_spec=None,
    split_cols: int | None = None, residual: jax.Array | None = None,
) -> Operand | tuple[jax.Array, ...]:
    """Y = X W + b [+ residual]. x_fwd: QArray (M, K) or float (M, K); w_fwd: QArray (N, K) or float (K, N).

    Returns (M, N) ``out_dtype``, or with ``out_spec`` (INT8 forward only) a QArray requantized in the GEMM
    epilogue (round-to-nearest), or with ``split_cols`` a tuple of N / split_cols (M, split_cols) arrays
    (the GEMM epilogue writes them apart where the kernel can: no slicing copies of a packed output).
    residual: (M, N) ``out_dtype``, added in the GEMM epilogue.
    """
    if isinstance(x_fwd, QArray):
        extra = {} if residual is None else {"residual": residual}
        return kb.matmul_qarrays(x_fwd, w_fwd, bias=bias, out_dtype=out_dtype, out_spec=out_spec,
                                 split_cols=split_cols, backend=policy.backend, block_gemm=policy.block_gemm,
                                 **extra)
    y = _dot(x_fwd, w_fwd, (1, 0), policy.compute_dtype)
    if bias is not None:
        y = y + bias.astype(F32)
    if residual is not None:
        y = y + residual.astype(F32)
    y = y.astype(out_dtype)
    return y if split_cols is None else tuple(jnp.split(y, y.shape[1] // split_cols, axis=1))


def linear_bwd(
    g: jax.Array, x_dw: Operand, w_dx: Operand, policy: Policy, seed: jax.Array, *, has_bias: bool,
    dx_dtype=F32,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """g: (M, N) float dL/dY -> (dX (M, K) ``dx_dtype``, dW (K, N) f32, db (N,) f32 or None).

    ``dx_dtype``: the input's dtype, so the grad-input GEMM writes it directly (fp32 accumulation, one
    rounding) instead of an fp32 dX plus a convert pass (0.13 ms per step at hidden 4096).
    """
    g_dx, g_dw, *db = grad_operands(g, policy, seed, column_sum=has_bias)
    dx = grad_input(g_dx, w_dx, policy, out_dtype=dx_dtype)
    return dx, grad_weight(x_dw, g_dw, policy), (db[0] if has_bias else None)


def grad_input(g_dx: Operand, w_dx: Operand, policy: Policy, out_dtype=F32) -> jax.Array:
    """dX = dY W^T: (M, N) x (K, N) -> (M, K) ``out_dtype`` (fp32 accumulation)."""
    if policy.int8_grad_input:
        return kb.matmul_qarrays(g_dx, w_dx, out_dtype=out_dtype, backend=policy.backend,
                                 block_gemm=policy.block_gemm)
    return _dot(g_dx, w_dx, (1, 1), policy.compute_dtype).astype(out_dtype)


def grad_weight(x_dw: Operand, g_dw: Operand, policy: Policy) -> jax.Array:
    """dW = X^T dY -> (K, N) f32. INT8: X^T (K, M) x dY^T (N, M); else X (M, K), dY (M, N)."""
    if policy.int8_grad_weight:
        return kb.matmul_qarrays(x_dw, g_dw, out_dtype=F32, backend=policy.backend, block_gemm=policy.block_gemm)
    return _dot(x_dw, g_dw, (0, 0), policy.compute_dtype)


# -------------------------------------------------------------------------------------- layer norm


def layer_norm_float(x: jax.Array, gamma, beta, *, eps: float, rms: bool):
    """Reference LayerNorm/RMSNorm over the last axis, fp32: (y, mean (M,), rstd (M,))."""
    xf = x.astype(F32)
    mean = jnp.zeros(xf.shape[:-1], F32) if rms else jnp.mean(xf, axis=-1)
    xc = xf - mean[..., None]
    rstd = jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1) + eps)
    y = xc * rstd[..., None] * gamma.astype(F32)
    if beta is not None:
        y = y + beta.astype(F32)
    return y, mean, rstd


def layer_norm_fwd(x: jax.Array, gamma, beta, policy: Policy, *, eps: float, rms: bool):
    """x: (M, D) float residual stream -> (h_fwd, h_dw, residuals) with full-row fp32 statistics.

    With INT8 forward one fused LayerNorm kernel quantizes the normalised output (and its transposed copy
    for an INT8 grad-weight GEMM; under "row" after a statistics pass) and, from the same reads, x itself
    as INT8 blocks for the backward (Jetfire's activation-memory saving); mean/rstd come from the exact x.
    residuals = (x_saved: QArray (M, D) or float (M, D), mean (M,), rstd (M,)).
    """
    if policy.int8_forward:
        t_spec = policy.act_spec_t if policy.int8_grad_weight else None
        h_fwd, *outs = kb.layer_norm_quantize(x, gamma, beta, eps=eps, rms=rms, spec=policy.act_spec,
                                              transposed_spec=t_spec, input_spec=policy.storage_spec,
                                              backend=policy.backend)
        h_dw = outs.pop(0) if t_spec is not None else h_fwd
        x_saved, mean, rstd = outs
        return h_fwd, h_dw, (x_saved, mean, rstd)
    h, mean, rstd = layer_norm_float(x, gamma, beta, eps=eps, rms=rms)
    # The jnp producer writes compute dtype (half the bytes the quantize kernels then read).
    h_fwd, h_dw = activation_operands(h.astype(policy.compute_dtype), policy)
    return h_fwd, h_dw, (x, mean, rstd)


def layer_norm_bwd(dh: jax.Array, residuals, gamma, *, rms: bool, has_beta: bool, residual_grad=None,
                   out_dtype=F32, backend: str = "pallas"):
    """Exact LayerNorm/RMSNorm backward with full-row reductions (one fused kernel pass under kernels).

    dh: (M, D) float dL/dLN(x); residual_grad: None or (M, D), the residual stream's gradient, added to dx
    in the same pass -> (dx (M, D) ``out_dtype``, dgamma (D,) f32, dbeta (D,) f32 or None).
    """
    x_saved, mean, rstd = residuals
    return kb.layer_norm_backward(dh, x_saved, mean, rstd, gamma, rms=rms, has_beta=has_beta,
                                  residual_grad=residual_grad, out_dtype=out_dtype, backend=backend)


# -------------------------------------------------------------------------------------- activations


def gelu_fwd(u: Operand, policy: Policy) -> tuple[Operand, Operand]:
    """GELU (exact erf) of u: (M, F), the fc1 output incl. bias (QArray from the fc1 epilogue, or float)
    -> (a_fwd, a_dw) operands for fc2's forward and grad-weight GEMMs."""
    if isinstance(u, QArray):
        t_spec = policy.act_spec_t if policy.int8_grad_weight else None
        out = kb.bias_gelu_quantize(u, None, spec=policy.act_spec, activation="gelu", transposed_spec=t_spec,
                                    backend=policy.backend)
        return out if t_spec is not None else (out, out)
    return activation_operands(kb.gelu(_float(u)).astype(policy.compute_dtype), policy)


def gelu_bwd(da: jax.Array, u: Operand, policy: Policy, seed: jax.Array):
    """da: (M, F) f32 dL/dGELU(u); u: the saved GELU input -> (du_dx, du_dw, db1 (F,) f32).

    Both backward GEMMs INT8: one fused kernel computes da * GELU'(u) and writes du and du^T quantized, and
    db1 = sum(du, axis=0) of the unquantized du.
    """
    if policy.int8_grad_input and policy.int8_grad_weight and isinstance(u, QArray):
        r = policy.rounding_bwd
        return kb.gelu_backward_quantize(da, u, None, spec=policy.grad_spec, rounding=r,
                                         seed=seed if r == "stochastic" else None,
                                         transposed_spec=policy.grad_spec_t, column_sum=True,
                                         backend=policy.backend)
    du = da.astype(F32) * kb.gelu_grad(_float(u))
    g_dx, g_dw = grad_operands(du.astype(policy.compute_dtype), policy, seed)
    return g_dx, g_dw, jnp.sum(du, axis=0)


def swiglu_fwd(u: Operand, v: Operand, policy: Policy) -> tuple[Operand, Operand]:
    """a = u * silu(v) for u = fc1 (up) and v = gate outputs (M, F) -> (a_fwd, a_dw); fp32 math."""
    a = _float(u) * jax.nn.silu(_float(v))
    return activation_operands(a.astype(policy.compute_dtype), policy)


def swiglu_bwd(da: jax.Array, u: Operand, v: Operand, policy: Policy, seeds: jax.Array):
    """da: (M, F) -> ((du_dx, du_dw, du_sum), (dv_dx, dv_dw, dv_sum)); seeds: (2, 2) uint32."""
    uf, vf, da = _float(u), _float(v), da.astype(F32)
    sig = jax.nn.sigmoid(vf)
    du = da * vf * sig
    dv = da * uf * sig * (1.0 + vf * (1.0 - sig))
    cd = policy.compute_dtype
    return ((*grad_operands(du.astype(cd), policy, seeds[0]), jnp.sum(du, axis=0)),
            (*grad_operands(dv.astype(cd), policy, seeds[1]), jnp.sum(dv, axis=0)))
