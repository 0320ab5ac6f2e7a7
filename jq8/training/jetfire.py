"""Jetfire INT8 training ops: ``jax.custom_vjp`` compositions that keep INT8 inside one differentiated op.

    jetfire_linear       float (..., K) -> float (..., N)        drop-in Dense
    jetfire_norm_linear  LN -> linear, INT8 in between            attention's qkv projection
    jetfire_mlp          LN -> fc1 -> GELU|SwiGLU -> fc2, INT8 between all of them; the residual-stream
                         input is saved for the backward as INT8 blocks + mean/rstd (the activation-memory
                         saving of Jetfire), fc1's output as INT8 from the GEMM epilogue

Outputs are in ``policy.compute_dtype`` (the residual stream around them stays fp32). Under a policy whose
GEMMs are all high precision (``policy.int8`` False) each op is the plain jnp reference below, which is
also what :mod:`jq8.training.nn` runs for the bf16 policy, so both policies share one definition of the math.

``key``: a ``jax.random`` key for the stochastic rounding of gradients (one per op and step; ``None`` gives
a fixed seed). Differences from Jetfire's reference code (Jetfire, arXiv 2403.12422): LayerNorm
uses the biased variance with eps and exact full-row backward; fc2's grad-input (``compute_dtype``) and the
LayerNorm backward input (fp32) are not re-quantized (they are consumed at once by the fused GELU backward
/ the LN backward, so re-quantizing them would add error without saving a GEMM); stochastic-rounding noise
is a hash of (seed, row, col), distinct for every tile. ``policy.granularity="row"`` swaps the 32 x 32
blocks of the GEMM operands for per-row scales along K (see :class:`jq8.training.policy.Policy`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jq8.training import jetfire_ops as ops
from jq8.training.policy import Policy

F32 = jnp.float32
Params = Mapping[str, Mapping[str, jax.Array]]


def seeds_from_key(key: jax.Array | None, n: int) -> jax.Array:
    """(n, 2) uint32 noise seeds, one per backward quantization; zeros when ``key`` is None."""
    if key is None:
        return jnp.zeros((n, 2), jnp.uint32)
    return jax.random.bits(key, (n, 2), jnp.uint32)


def _dtype_tag(x: jax.Array | None) -> jax.Array | None:
    # custom_vjp residuals must be arrays: a size-0 array carries a dtype (and None an absent bias).
    return None if x is None else jnp.zeros((0,), x.dtype)


def _structure(params: Params) -> dict:
    # The parameter tree's keys with no leaves: a residual that tells the backward which biases exist.
    return {k: {n: () for n in p} for k, p in params.items()}


def _flat(x: jax.Array) -> jax.Array:
    return x.reshape(-1, x.shape[-1])


# -------------------------------------------------------------------------------------- references


def linear_reference(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, compute_dtype=F32) -> jax.Array:
    """x: (..., K) @ kernel (K, N) + bias in ``compute_dtype`` -> (..., N) ``compute_dtype``.

    As ``flax.linen.Dense(dtype=compute_dtype)`` does it (the GEMM accumulates in fp32 internally and
    writes ``compute_dtype``): the bf16 baseline the INT8 path is measured against.
    """
    y = jnp.dot(x.astype(compute_dtype), kernel.astype(compute_dtype))
    if bias is not None:
        y = y + bias.astype(compute_dtype)
    return y


def norm_reference(x: jax.Array, gamma: jax.Array, beta: jax.Array | None, *, eps=1e-5,
                   rms=False) -> jax.Array:
    """LayerNorm (or RMSNorm) over the last axis with fp32 statistics -> fp32."""
    return ops.layer_norm_float(x, gamma, beta, eps=eps, rms=rms)[0]


def activation_reference(u: jax.Array, v: jax.Array | None, activation: str) -> jax.Array:
    """gelu(u) (exact erf), its tanh form ("gelu_tanh", GPT-2's) or u * silu(v), in the inputs' dtype (bf16
    under the bf16 policy, so autodiff keeps bf16 residuals, as a plain bf16 Flax MLP does)."""
    if activation in ("gelu", "gelu_tanh"):
        return jax.nn.gelu(u, approximate=activation == "gelu_tanh")
    return u * jax.nn.silu(v)


def _act_reference(params: Params, h: jax.Array, activation: str, cd) -> jax.Array:
    u = linear_reference(h, params["fc1"]["kernel"], params["fc1"].get("bias"), cd)
    v = None if activation != "swiglu" else linear_reference(h, params["gate"]["kernel"],
                                                           params["gate"].get("bias"), cd)
    return activation_reference(u, v, activation)


def mlp_reference(x: jax.Array, params: Params, *, compute_dtype=F32, activation="gelu", eps=1e-5,
                  rms=False) -> jax.Array:
    """Float MLP branch fc2(act(fc1(norm(x)))): x (..., D) -> (..., D) in ``compute_dtype``."""
    h = norm_reference(x, params["norm"]["scale"], params["norm"].get("bias"), eps=eps, rms=rms)
    a = _act_reference(params, h, activation, compute_dtype)
    return linear_reference(a, params["fc2"]["kernel"], params["fc2"].get("bias"), compute_dtype)


def norm_linear_reference(x, norm: Mapping[str, jax.Array], kernel, bias, *, compute_dtype=F32, eps=1e-5,
                          rms=False) -> jax.Array:
    """linear(norm(x)) in float: x (..., D) -> (..., N) ``compute_dtype``."""
    h = norm_reference(x, norm["scale"], norm.get("bias"), eps=eps, rms=rms)
    return linear_reference(h, kernel, bias, compute_dtype)


# ------------------------------------------------------------------------------------------ linear


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _linear(x, w, b, residual, seeds, policy):
    return _linear_fwd(x, w, b, residual, seeds, policy)[0]


def _linear_fwd(x, w, b, residual, seeds, policy):
    x_fwd, x_dw = ops.activation_operands(x, policy)
    w_fwd, w_dx = ops.weight_operands(w, policy)
    out_dtype = policy.compute_dtype if residual is None else residual.dtype
    y = ops.linear_fwd(x_fwd, w_fwd, b, policy, out_dtype=out_dtype, residual=residual)
    return y, (x_dw, w_dx, seeds, _dtype_tag(b), _dtype_tag(x), _dtype_tag(residual))


def _linear_bwd(policy, res, g):
    x_dw, w_dx, seeds, b_tag, x_tag, r_tag = res
    dx, dw, db = ops.linear_bwd(g, x_dw, w_dx, policy, seeds[0], has_bias=b_tag is not None,
                                dx_dtype=x_tag.dtype)
    return dx, dw, db, (None if r_tag is None else g.astype(r_tag.dtype)), None


_linear.defvjp(_linear_fwd, _linear_bwd)


def jetfire_linear(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, key: jax.Array | None,
                   policy: Policy, *, residual: jax.Array | None = None) -> jax.Array:
    """y = x @ kernel + bias with Jetfire INT8 GEMMs (forward, grad-input, grad-weight per the policy).

    x: (..., K) float; kernel: (K, N) fp32 master (re-quantized each call); bias: (N,) or None.
    Returns (..., N) in ``policy.compute_dtype``; with ``residual`` ((..., N), the fp32 residual stream)
    residual + y in the residual's dtype, added in the GEMM's epilogue (no separate pass over the stream).
    """
    if residual is not None and residual.shape != (*x.shape[:-1], kernel.shape[1]):
        raise ValueError(f"residual must have shape {(*x.shape[:-1], kernel.shape[1])}, got {residual.shape}")
    if not policy.int8:
        y = linear_reference(x, kernel, bias, policy.compute_dtype)
        return y if residual is None else residual + y.astype(residual.dtype)
    policy.check_dims(in_features=kernel.shape[0], out_features=kernel.shape[1])
    r = None if residual is None else _flat(residual)
    y = _linear(_flat(x), kernel, bias, r, seeds_from_key(key, 1), policy)
    return y.reshape(*x.shape[:-1], kernel.shape[1])


# ------------------------------------------------------------------------------------- norm + linear


def _with_input(y, x, return_input: bool):
    """The op's output, and with ``return_input`` also x itself: the caller's residual stream then passes
    through the op, so its gradient arrives in the op's backward (added to dx in the LayerNorm pass)."""
    return (y, x) if return_input else y


def _split_input_grad(g, return_input: bool):
    return g if return_input else (g, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _norm_linear(x, norm, w, b, seeds, policy, eps, rms, split, return_input):
    return _norm_linear_fwd(x, norm, w, b, seeds, policy, eps, rms, split, return_input)[0]


def _norm_linear_fwd(x, norm, w, b, seeds, policy, eps, rms, split, return_input):
    h_fwd, h_dw, ln_res = ops.layer_norm_fwd(x, norm["scale"], norm.get("bias"), policy, eps=eps, rms=rms)
    w_fwd, w_dx = ops.weight_operands(w, policy)
    y = ops.linear_fwd(h_fwd, w_fwd, b, policy, out_dtype=policy.compute_dtype, split_cols=split)
    return _with_input(y, x, return_input), (ln_res, h_dw, w_dx, norm, seeds, _dtype_tag(b), _dtype_tag(x))


def _norm_linear_bwd(policy, eps, rms, split, return_input, res, g):
    ln_res, h_dw, w_dx, norm, seeds, b_tag, x_tag = res
    g, g_residual = _split_input_grad(g, return_input)
    if split is not None:  # the parts' cotangents: quantized as one (M, N) gradient, read where they lie
        g = tuple(g)
    has_bias, x_dtype = b_tag is not None, x_tag.dtype
    g_dx, g_dw, *db = ops.grad_operands(g, policy, seeds[0], column_sum=has_bias)
    # dL/dLN(x) in compute dtype: its GEMM operands already carry errors up to one INT8 code (1/127 of a
    # row's absmax); bf16 adds at most 2^-9 relative and halves the bytes the LayerNorm backward reads.
    dh = ops.grad_input(g_dx, w_dx, policy, out_dtype=policy.compute_dtype)
    dw = ops.grad_weight(h_dw, g_dw, policy)
    db = db[0] if has_bias else None
    dx, dgamma, dbeta = ops.layer_norm_bwd(dh, ln_res, norm["scale"], rms=rms, has_beta="bias" in norm,
                                           residual_grad=g_residual, out_dtype=x_dtype,
                                           backend=policy.backend)
    dnorm = {"scale": dgamma, **({"bias": dbeta} if "bias" in norm else {})}
    return dx, dnorm, dw, db, None


_norm_linear.defvjp(_norm_linear_fwd, _norm_linear_bwd)


def jetfire_norm_linear(x: jax.Array, norm: Mapping[str, jax.Array], kernel: jax.Array,
                        bias: jax.Array | None, key: jax.Array | None, policy: Policy, *, eps: float = 1e-5,
                        rms: bool = False, split_cols: int | None = None,
                        return_input: bool = False):
    """linear(LayerNorm(x)) with the normalised activation INT8 between them.

    x: (..., D) fp32 residual stream; norm: {"scale": (D,), "bias": (D,) unless rms}; kernel (D, N) fp32.
    Returns (..., N) in ``policy.compute_dtype``, or with ``split_cols`` (dividing N) a tuple of N /
    split_cols (..., split_cols) column blocks in order: attention's q, k, v, which the INT8 GEMM's epilogue
    writes apart (slicing a packed output costs a copy of it, 0.26 ms per step at d=4096).
    return_input: return (that, x), x unchanged; use this x as the residual stream (x + branch). Its gradient
    then joins dx inside the op's fused LayerNorm backward instead of in a separate XLA pass over the
    fp32 stream.
    """
    n = kernel.shape[1]
    if split_cols is not None and (split_cols <= 0 or n % split_cols):
        raise ValueError(f"split_cols={split_cols} must be a positive divisor of the {n} output features")
    if not policy.int8:
        cd = policy.compute_dtype
        y = norm_linear_reference(x, norm, kernel, bias, compute_dtype=cd, eps=eps, rms=rms)
        y = y if split_cols is None else tuple(jnp.split(y, n // split_cols, axis=-1))
        return _with_input(y, x, return_input)
    policy.check_dims(in_features=kernel.shape[0], out_features=n)
    seeds = seeds_from_key(key, 1)
    out = _norm_linear(_flat(x), dict(norm), kernel, bias, seeds, policy, float(eps), bool(rms), split_cols,
                       bool(return_input))
    y, x_out = out if return_input else (out, None)
    if split_cols is None:
        y = y.reshape(*x.shape[:-1], n)
    else:
        y = tuple(part.reshape(*x.shape[:-1], split_cols) for part in y)
    return _with_input(y, None if x_out is None else x_out.reshape(x.shape), return_input)


# ---------------------------------------------------------------------------------------------- MLP


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _mlp(x, params, seeds, policy, activation, eps, rms, residual):
    return _mlp_fwd(x, params, seeds, policy, activation, eps, rms, residual)[0]


def _mlp_fwd(x, params, seeds, policy, activation, eps, rms, residual):
    """residual: "none" (the branch), "return" ((branch, x)) or "add" (x + branch from fc2's epilogue)."""
    cd = policy.compute_dtype
    norm, fc1, fc2 = params["norm"], params["fc1"], params["fc2"]
    h_fwd, h_dw, ln_res = ops.layer_norm_fwd(x, norm["scale"], norm.get("bias"), policy, eps=eps, rms=rms)
    # fc1's output goes INT8 straight from the GEMM epilogue (round-to-nearest) into the activation.
    u_spec = policy.epilogue_spec if policy.int8_forward else None
    w1_fwd, w1_dx = ops.weight_operands(fc1["kernel"], policy)
    u = ops.linear_fwd(h_fwd, w1_fwd, fc1.get("bias"), policy, out_dtype=cd, out_spec=u_spec)
    if activation == "gelu":
        v, wg_dx = None, None
        a_fwd, a_dw = ops.gelu_fwd(u, policy)
    else:
        gate = params["gate"]
        wg_fwd, wg_dx = ops.weight_operands(gate["kernel"], policy)
        v = ops.linear_fwd(h_fwd, wg_fwd, gate.get("bias"), policy, out_dtype=cd, out_spec=u_spec)
        a_fwd, a_dw = ops.swiglu_fwd(u, v, policy)
    w2_fwd, w2_dx = ops.weight_operands(fc2["kernel"], policy)
    if residual == "add":
        y = ops.linear_fwd(a_fwd, w2_fwd, fc2.get("bias"), policy, out_dtype=x.dtype, residual=x)
    else:
        y = ops.linear_fwd(a_fwd, w2_fwd, fc2.get("bias"), policy, out_dtype=cd)
    res = (ln_res, h_dw, u, v, a_dw, w1_dx, wg_dx, w2_dx, norm["scale"], seeds, _dtype_tag(x),
           _structure(params))
    return _with_input(y, x, residual == "return"), res


def _mlp_bwd(policy, activation, eps, rms, residual, res, g):
    ln_res, h_dw, u, v, a_dw, w1_dx, wg_dx, w2_dx, gamma, seeds, x_tag, names = res
    # x + branch: the residual's gradient is the output's
    g, g_residual = (g, g) if residual == "add" else _split_input_grad(g, residual == "return")
    grads = {}

    def pack(name, dw, db):
        grads[name] = {"kernel": dw, **({"bias": db} if "bias" in names[name] else {})}

    g_dx, g_dw, db2 = ops.grad_operands(g, policy, seeds[0], column_sum=True)
    # dL/da (M, F), the largest float tensor of the backward: compute dtype, consumed at once by GELU'.
    da = ops.grad_input(g_dx, w2_dx, policy, out_dtype=policy.compute_dtype)
    pack("fc2", ops.grad_weight(a_dw, g_dw, policy), db2)
    if activation == "gelu":
        du_dx, du_dw, db1 = ops.gelu_bwd(da, u, policy, seeds[1])
        dh = ops.grad_input(du_dx, w1_dx, policy, out_dtype=policy.compute_dtype)  # as in _norm_linear_bwd
    else:
        (du_dx, du_dw, db1), (dv_dx, dv_dw, dbg) = ops.swiglu_bwd(da, u, v, policy, seeds[1:3])
        dh = ops.grad_input(du_dx, w1_dx, policy) + ops.grad_input(dv_dx, wg_dx, policy)
        pack("gate", ops.grad_weight(h_dw, dv_dw, policy), dbg)
    pack("fc1", ops.grad_weight(h_dw, du_dw, policy), db1)
    dx, dgamma, dbeta = ops.layer_norm_bwd(dh, ln_res, gamma, rms=rms, has_beta="bias" in names["norm"],
                                           residual_grad=g_residual, out_dtype=x_tag.dtype,
                                           backend=policy.backend)
    grads["norm"] = {"scale": dgamma, **({"bias": dbeta} if "bias" in names["norm"] else {})}
    return dx, grads, None


_mlp.defvjp(_mlp_fwd, _mlp_bwd)

ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu")


def jetfire_mlp(x: jax.Array, params: Params, key: jax.Array | None, policy: Policy, *,
                activation: str = "gelu", eps: float = 1e-5, rms: bool = False, return_input: bool = False,
                add_input: bool = False):
    """The pre-norm MLP branch fc2(act(fc1(norm(x)))) with Jetfire INT8 data flow.

    x: (..., D) fp32 residual stream. params: {"norm": {"scale", "bias"?}, "fc1": {"kernel" (D, F),
    "bias"?}, "fc2": {"kernel" (F, D), "bias"?}, and "gate" like fc1 for swiglu}: the parameter tree of
    :class:`jq8.training.nn.MlpBlock`. Returns (..., D) in ``policy.compute_dtype``; the residual add is the caller's.
    return_input: return (y, x), x unchanged, as in :func:`jetfire_norm_linear`: adding this x as the
    residual lets the fused LayerNorm backward add the residual's gradient to dx in the same pass.
    add_input: return x + branch in x's dtype, the add done in fc2's GEMM epilogue (the pre-norm block's
    residual connection with no dropout between): no separate pass over the fp32 stream.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if activation == "gelu_tanh" and policy.int8:
        raise ValueError("the Jetfire INT8 MLP runs exact GELU or SwiGLU; a gelu_tanh MLP (GPT-2 checkpoints) "
                         "trains under the bf16 policy")
    if return_input and add_input:
        raise ValueError("return_input and add_input exclude each other: the first returns (branch, x), the "
                         "second x + branch")
    if not policy.int8:
        y = mlp_reference(x, params, compute_dtype=policy.compute_dtype, activation=activation, eps=eps,
                          rms=rms)
        return x + y.astype(x.dtype) if add_input else _with_input(y, x, return_input)
    d, f = params["fc1"]["kernel"].shape
    policy.check_dims(model_dim=d, hidden=f)
    p = {k: dict(v) for k, v in params.items()}
    mode = "add" if add_input else "return" if return_input else "none"
    out = _mlp(_flat(x), p, seeds_from_key(key, 3), policy, activation, float(eps), bool(rms), mode)
    if return_input:
        return out[0].reshape(x.shape), out[1].reshape(x.shape)
    return out.reshape(x.shape)
