"""The seam between the Jetfire ops and the Pallas kernels: one place picks kernel or reference.

Each function has the signature of the kernel of the same name in ``pallas_kernels/``.
``backend="pallas"`` calls the Pallas kernel (interpret mode on CPU); ``"xla"`` calls the kernel file's
``*_reference`` (plain jnp run by XLA: the definition the kernels are tested against).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jq8.quant import QArray
from pallas_kernels import gelu_quantize, gemm, norm_backward, norm_quantize, quantize

_OPS = {
    "quantize_tiles": (quantize.quantize_tiles, quantize.quantize_tiles_reference),
    "layer_norm_quantize": (norm_quantize.layer_norm_quantize, norm_quantize.layer_norm_quantize_reference),
    "layer_norm_backward": (norm_backward.layer_norm_backward, norm_backward.layer_norm_backward_reference),
    "bias_gelu_quantize": (gelu_quantize.bias_gelu_quantize, gelu_quantize.bias_gelu_quantize_reference),
    "gelu_backward_quantize": (
        gelu_quantize.gelu_backward_quantize,
        gelu_quantize.gelu_backward_quantize_reference,
    ),
    "matmul_qarrays": (gemm.matmul_qarrays, gemm.matmul_qarrays_reference),
}


def _call(name: str, backend: str, *args, **kwargs):
    kernel, reference = _OPS[name]
    if backend not in ("pallas", "xla"):
        raise ValueError(f"backend must be 'pallas' or 'xla', got {backend!r}")
    return (kernel if backend == "pallas" else reference)(*args, **kwargs)


# ------------------------------------------------------------------------------------------ gelu


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, fp32: Jetfire's choice, and the one the bf16 modules use too."""
    return jax.nn.gelu(x, approximate=False)


def gelu_grad(x: jax.Array) -> jax.Array:
    """d GELU / dx = Phi(x) + x phi(x), fp32."""
    cdf = 0.5 * (1.0 + jax.lax.erf(x * (2.0**-0.5)))
    pdf = jnp.exp(-0.5 * x * x) * (2.0 * jnp.pi) ** -0.5
    return cdf + x * pdf


# ------------------------------------------------------------------------------------ public seam


def quantize_tiles(x, spec, *, rounding="nearest", seed=None, transposed_spec=None, column_sum=False,
                   backend: str = "pallas"):
    """x: (M, N) float, or a tuple of its column parts (read in place: no concatenated copy)
    -> QArray (M, N) [, QArray (N, M) of x.T] int8, bit-exact to jq8.quant.quantize
    [, x.sum(axis=0) (N,) f32 with column_sum: a bias gradient, from the kernels' statistics pass]."""
    return _call("quantize_tiles", backend, x, spec, rounding=rounding, seed=seed,
                 transposed_spec=transposed_spec, column_sum=column_sum)


def layer_norm_quantize(x, gamma, beta, *, eps=1e-5, rms=False, spec, transposed_spec=None, input_spec=None,
                        backend: str = "pallas"):
    """x: (M, N) float -> (q[, qT][, xq], mean (M,) f32, rstd (M,) f32); q quantizes LN(x) (full-row
    stats), qT LN(x).T, xq x itself under ``input_spec`` (round to nearest), from the same reads of x."""
    return _call("layer_norm_quantize", backend, x, gamma, beta, eps=eps, rms=rms, spec=spec,
                 transposed_spec=transposed_spec, input_spec=input_spec)


def layer_norm_backward(dh, x, mean, rstd, gamma, *, rms=False, has_beta=True, residual_grad=None,
                        out_dtype=None, backend: str = "pallas"):
    """Exact LayerNorm/RMSNorm backward. dh: (M, D) dL/dLN(x); x: (M, D) float or QArray (the saved input);
    mean, rstd: (M,) f32; gamma: (D,). -> (dx (M, D) ``out_dtype`` [+ residual_grad], dgamma (D,) f32,
    dbeta (D,) f32 or None)."""
    return _call("layer_norm_backward", backend, dh, x, mean, rstd, gamma, rms=rms, has_beta=has_beta,
                 residual_grad=residual_grad, out_dtype=out_dtype)


def bias_gelu_quantize(x, bias=None, *, spec, activation="gelu", transposed_spec=None, backend: str = "pallas"):
    """x: (M, N) float or QArray -> quantized act(x + bias) [, its transposed copy]."""
    return _call("bias_gelu_quantize", backend, x, bias, spec=spec, activation=activation,
                 transposed_spec=transposed_spec)


def gelu_backward_quantize(grad, x, bias=None, *, spec, rounding="stochastic", seed=None,
                           transposed_spec=None, column_sum=False, backend: str = "pallas"):
    """grad, x: (M, N) (x: the GELU input, float or QArray) -> quantized grad * GELU'(x + bias) [, T]
    [, its unquantized column sums (N,) f32 with column_sum: the bias gradient]."""
    return _call("gelu_backward_quantize", backend, grad, x, spec=spec, bias=bias, rounding=rounding,
                 seed=seed, transposed_spec=transposed_spec, column_sum=column_sum)


def matmul_qarrays(a: QArray, b: QArray, *, backend: str = "pallas", block_gemm: str = "auto", **epilogue):
    """a: QArray (M, K), b: QArray (N, K) -> epilogue(a @ b.T): (M, N) out_dtype, or QArray with out_spec.
    block_gemm: the kernel of the block-scaled route under "pallas" (``gemm.matmul_qarrays``' block_backend)."""
    if backend == "pallas":
        epilogue["block_backend"] = block_gemm
    return _call("matmul_qarrays", backend, a, b, **epilogue)
