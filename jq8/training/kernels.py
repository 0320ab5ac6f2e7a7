"""The seam between the Jetfire ops and the Pallas kernels: one place picks kernel or reference.

Each function has the signature of the kernel of the same name in ``pallas_kernels/`` (see the kernel API
contract). ``use_kernels=True`` calls the Pallas kernel (interpret mode on CPU); ``False`` calls the
kernel file's ``*_reference``. While a kernel file does not exist yet, both fall back to the small jnp
definitions below, built on :mod:`jq8.quant` (no second quantizer).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jq8.quant import QArray, QuantSpec, dequantize, quantize

_MODULES = {
    "quantize_tiles": "pallas_kernels.quantize",
    "layer_norm_quantize": "pallas_kernels.norm_quantize",
    "layer_norm_backward": "pallas_kernels.norm_backward",
    "bias_gelu_quantize": "pallas_kernels.gelu_quantize",
    "gelu_backward_quantize": "pallas_kernels.gelu_quantize",
    "matmul_qarrays": "pallas_kernels.int8_matmul_block_scaled",
}


def _lookup(name: str, use_kernels: bool) -> Callable | None:
    try:
        mod = importlib.import_module(_MODULES[name])
    except ImportError:
        return None
    # No reference in the kernel file (e.g. a dispatcher): use_kernels=False then takes the fallback below.
    return getattr(mod, name if use_kernels else f"{name}_reference", None)


def implementation(name: str, use_kernels: bool) -> str:
    """Which implementation runs for ``name``: "kernel", "reference" or "fallback" (for tests/reports)."""
    fn = _lookup(name, use_kernels)
    if fn is None:
        return "fallback"
    return "reference" if fn.__name__.endswith("_reference") else "kernel"


# ------------------------------------------------------------------------------------------ gelu


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, fp32: Jetfire's choice, and the one the bf16 modules use too."""
    return jax.nn.gelu(x, approximate=False)


def gelu_grad(x: jax.Array) -> jax.Array:
    """d GELU / dx = Phi(x) + x phi(x), fp32."""
    cdf = 0.5 * (1.0 + jax.lax.erf(x * (2.0**-0.5)))
    pdf = jnp.exp(-0.5 * x * x) * (2.0 * jnp.pi) ** -0.5
    return cdf + x * pdf


def _both(x: jax.Array, spec: QuantSpec, transposed_spec: QuantSpec | None, **kw):
    q = quantize(x, spec, **kw)
    if transposed_spec is None:
        return q
    return q, quantize(x.T, transposed_spec, **kw)


# ------------------------------------------------------------------------------ fallbacks (jnp)


def _with_sum(q, y: jax.Array, column_sum: bool):
    if not column_sum:
        return q
    return (*(q if isinstance(q, tuple) else (q,)), jnp.sum(y.astype(jnp.float32), axis=0))


def _quantize_tiles_fallback(x, spec, *, rounding="nearest", seed=None, transposed_spec=None, interpret=None,
                             column_sum=False):
    x = jnp.concatenate(x, axis=1) if isinstance(x, (tuple, list)) else x
    return _with_sum(_both(x, spec, transposed_spec, rounding=rounding, seed=seed), x, column_sum)


def _layer_norm_quantize_fallback(
    x, gamma, beta, *, eps=1e-5, rms=False, spec, transposed_spec=None, input_spec=None, interpret=None
):
    xf = x.astype(jnp.float32)
    mean = jnp.zeros(x.shape[0], jnp.float32) if rms else jnp.mean(xf, axis=1)
    xc = xf - mean[:, None]
    rstd = jax.lax.rsqrt(jnp.mean(xc * xc, axis=1) + eps)
    y = xc * rstd[:, None] * gamma.astype(jnp.float32)
    if beta is not None:
        y = y + beta.astype(jnp.float32)
    q = _both(y, spec, transposed_spec)
    q = q if transposed_spec is not None else (q,)
    xq = (quantize(x, input_spec),) if input_spec is not None else ()
    return (*q, *xq, mean, rstd)


def _layer_norm_backward_fallback(dh, x, mean, rstd, gamma, *, rms=False, has_beta=True, residual_grad=None,
                                  out_dtype=None, interpret=None, config=None):
    out_dtype = x.dtype if out_dtype is None else out_dtype
    xhat = ((dequantize(x, jnp.float32) if isinstance(x, QArray) else x.astype(jnp.float32))
            - mean[:, None]) * rstd[:, None]
    dh = dh.astype(jnp.float32)
    dxhat = dh * gamma.astype(jnp.float32)
    proj = jnp.mean(dxhat * xhat, axis=1, keepdims=True)
    centred = dxhat if rms else dxhat - jnp.mean(dxhat, axis=1, keepdims=True)
    dx = rstd[:, None] * (centred - xhat * proj)
    if residual_grad is not None:
        dx = dx + residual_grad.astype(jnp.float32)
    return dx.astype(out_dtype), jnp.sum(dh * xhat, axis=0), (jnp.sum(dh, axis=0) if has_beta else None)


def _bias_gelu_quantize_fallback(x, bias=None, *, spec, activation="gelu", transposed_spec=None,
                                 interpret=None):
    y = dequantize(x, jnp.float32) if isinstance(x, QArray) else x.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    if activation == "gelu":
        y = gelu(y)
    elif activation is not None:
        raise ValueError(f"activation must be 'gelu' or None, got {activation!r}")
    return _both(y, spec, transposed_spec)


def _gelu_backward_quantize_fallback(
    grad, x, spec, *, rounding="stochastic", seed=None, bias=None, transposed_spec=None, interpret=None,
    column_sum=False,
):
    u = dequantize(x, jnp.float32) if isinstance(x, QArray) else x.astype(jnp.float32)
    if bias is not None:
        u = u + bias.astype(jnp.float32)
    g = dequantize(grad, jnp.float32) if isinstance(grad, QArray) else grad.astype(jnp.float32)
    du = g * gelu_grad(u)
    # rounded to the gradient's dtype when 16-bit before quantizing, as the kernel does; the sum stays fp32
    dq = du.astype(grad.dtype).astype(jnp.float32) if jnp.dtype(grad.dtype).itemsize < 4 else du
    return _with_sum(_both(dq, spec, transposed_spec, rounding=rounding, seed=seed), du, column_sum)


def _matmul_qarrays_fallback(
    a, b, *, bias=None, activation=None, residual=None, out_dtype=jnp.bfloat16, out_spec=None, config=None,
    interpret=None, split_cols=None,
):
    out = jnp.dot(
        dequantize(a, jnp.float32), dequantize(b, jnp.float32).T, precision=jax.lax.Precision.HIGHEST
    )
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    if activation == "gelu":
        out = gelu(out)
    elif activation is not None:
        raise ValueError(f"activation must be 'gelu' or None, got {activation!r}")
    if residual is not None:
        out = out + residual.astype(jnp.float32)
    if out_spec is not None:  # requantized from the fp32 epilogue value, as the kernels do
        return dataclasses.replace(quantize(out, out_spec), dtype=jnp.dtype(out_dtype))
    out = out.astype(out_dtype)
    return out if split_cols is None else tuple(jnp.split(out, out.shape[1] // split_cols, axis=1))


_FALLBACKS = {
    "quantize_tiles": _quantize_tiles_fallback,
    "layer_norm_quantize": _layer_norm_quantize_fallback,
    "layer_norm_backward": _layer_norm_backward_fallback,
    "bias_gelu_quantize": _bias_gelu_quantize_fallback,
    "gelu_backward_quantize": _gelu_backward_quantize_fallback,
    "matmul_qarrays": _matmul_qarrays_fallback,
}


def _call(name: str, use_kernels: bool, *args, **kwargs):
    return (_lookup(name, use_kernels) or _FALLBACKS[name])(*args, **kwargs)


# ------------------------------------------------------------------------------------ public seam


def quantize_tiles(x, spec, *, rounding="nearest", seed=None, transposed_spec=None, column_sum=False,
                   use_kernels=True):
    """x: (M, N) float, or a tuple of its column parts (read in place: no concatenated copy)
    -> QArray (M, N) [, QArray (N, M) of x.T] int8, bit-exact to jq8.quant.quantize
    [, x.sum(axis=0) (N,) f32 with column_sum: a bias gradient, from the kernels' statistics pass]."""
    return _call("quantize_tiles", use_kernels, x, spec, rounding=rounding, seed=seed,
                 transposed_spec=transposed_spec, column_sum=column_sum)


def layer_norm_quantize(x, gamma, beta, *, eps=1e-5, rms=False, spec, transposed_spec=None, input_spec=None,
                        use_kernels=True):
    """x: (M, N) float -> (q[, qT][, xq], mean (M,) f32, rstd (M,) f32); q quantizes LN(x) (full-row
    stats), qT LN(x).T, xq x itself under ``input_spec`` (round to nearest), from the same reads of x."""
    return _call("layer_norm_quantize", use_kernels, x, gamma, beta, eps=eps, rms=rms, spec=spec,
                 transposed_spec=transposed_spec, input_spec=input_spec)


def layer_norm_backward(dh, x, mean, rstd, gamma, *, rms=False, has_beta=True, residual_grad=None,
                        out_dtype=None, use_kernels=True):
    """Exact LayerNorm/RMSNorm backward. dh: (M, D) dL/dLN(x); x: (M, D) float or QArray (the saved input);
    mean, rstd: (M,) f32; gamma: (D,). -> (dx (M, D) ``out_dtype`` [+ residual_grad], dgamma (D,) f32,
    dbeta (D,) f32 or None)."""
    return _call("layer_norm_backward", use_kernels, dh, x, mean, rstd, gamma, rms=rms, has_beta=has_beta,
                 residual_grad=residual_grad, out_dtype=out_dtype)


def bias_gelu_quantize(x, bias=None, *, spec, activation="gelu", transposed_spec=None, use_kernels=True):
    """x: (M, N) float or QArray -> quantized act(x + bias) [, its transposed copy]."""
    return _call("bias_gelu_quantize", use_kernels, x, bias, spec=spec, activation=activation,
                 transposed_spec=transposed_spec)


def gelu_backward_quantize(grad, x, bias=None, *, spec, rounding="stochastic", seed=None,
                           transposed_spec=None, column_sum=False, use_kernels=True):
    """grad, x: (M, N) (x: the GELU input, float or QArray) -> quantized grad * GELU'(x + bias) [, T]
    [, its unquantized column sums (N,) f32 with column_sum: the bias gradient]."""
    return _call("gelu_backward_quantize", use_kernels, grad, x, spec=spec, bias=bias, rounding=rounding,
                 seed=seed, transposed_spec=transposed_spec, column_sum=column_sum)


def matmul_qarrays(a: QArray, b: QArray, *, use_kernels=True, **epilogue):
    """a: QArray (M, K), b: QArray (N, K) -> epilogue(a @ b.T): (M, N) out_dtype, or QArray with out_spec."""
    return _call("matmul_qarrays", use_kernels, a, b, **epilogue)
