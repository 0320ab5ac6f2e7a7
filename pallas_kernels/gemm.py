"""The INT8 GEMM entry point: one router over the Triton, Mosaic GPU and decode kernels.

:func:`int8_matmul` takes raw int8 operands with per-row / per-column scales (scales constant along K)
and picks the kernel: the warp-specialised Mosaic GPU kernel on Hopper where its tiles fit
(:mod:`pallas_kernels.int8_matmul_mgpu`), the weight-streaming split-K kernel at decode sizes
(M <= :data:`DECODE_MAX_M`, :mod:`pallas_kernels.int8_matmul_decode`), and the Triton kernel otherwise
(:mod:`pallas_kernels.int8_matmul_triton`; also the CPU path, in interpret mode). :func:`matmul_qarrays`
takes two :class:`jq8.quant.QArray` operands of any scale granularity and adds the block-scaled route
(scales that vary along K: :mod:`pallas_kernels.int8_matmul_block_mgpu` on Hopper where its tiles fit,
:mod:`pallas_kernels.int8_matmul_block_scaled` otherwise). Kernel files never import this module.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp

from jq8.quant import QArray, QuantSpec, dequantize
from pallas_kernels import int8_matmul_block_mgpu as block_mgpu
from pallas_kernels import int8_matmul_decode as dec
from pallas_kernels import int8_matmul_mgpu as mgpu
from pallas_kernels._common import TileConfig, is_pow2, resolve_interpret
from pallas_kernels.int8_matmul_block_scaled import int8_matmul_block_scaled, int8_matmul_block_scaled_reference
from pallas_kernels.int8_matmul_decode import DECODE_MAX_M, int8_matmul_decode, quantize_matmul_decode
from pallas_kernels.int8_matmul_triton import (
    NT_DIMS,
    Activation,
    check_operands,
    epilogue_reference,
    int8_matmul_triton,
)

__all__ = [
    "DECODE_MAX_M",
    "DecodeWeight",
    "decode_weight",
    "int8_matmul",
    "matmul_asymmetric",
    "matmul_qarrays",
    "matmul_qarrays_reference",
    "quantize_matmul_qarray",
]


@functools.partial(
    jax.jit,
    static_argnames=(
        "activation",
        "out_dtype",
        "out_spec",
        "b_bits",
        "config",
        "split_k",
        "split_cols",
        "backend",
        "interpret",
    ),
)
def int8_matmul(
    a: jax.Array,
    b: jax.Array,
    a_scale: jax.Array | None = None,
    b_scale: jax.Array | None = None,
    *,
    bias: jax.Array | None = None,
    activation: Activation = None,
    residual: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
    out_spec: QuantSpec | None = None,
    b_bits: int = 8,
    config: TileConfig | None = None,
    split_k: int | None = None,
    split_cols: int | None = None,
    backend: Literal["triton", "mosaic"] | None = None,
    interpret: bool | None = None,
) -> jax.Array | QArray | tuple[jax.Array, ...]:
    """W8A8 GEMM ``act(a @ b.T * a_scale * b_scale + bias) + residual``.

    a: (M, K) int8. b: (N, K) int8, or with ``b_bits=4`` (N, int4_width(K)) uint8 INT4 (``pack_int4``).
    a_scale: (M, 1) or (M,) f32 per-row; b_scale: (1, N) or (N,) f32 per-column (either may be None = 1).
    bias: (N,) float; residual: (M, N) float; activation: None, "gelu" (erf), "gelu_tanh", "relu".
    Returns (M, N) ``out_dtype``; with ``out_spec`` (per-row (1, -1) or power-of-two blocks dividing the tile)
    a :class:`QArray` requantized in the epilogue; with both scales None the raw (M, N) int32 product.
    ``config=None`` uses the autotune cache or a heuristic (never autotunes implicitly).
    split_cols: return the output as N / split_cols arrays (M, split_cols), column blocks in order: q, k, v
    of a fused qkv projection, written by the epilogue where attention reads them (no slicing copies). It
    needs split_cols | N and block_n | split_cols (``config=None`` narrows block_n to a power of two
    dividing split_cols).

    backend: "mosaic" runs :mod:`pallas_kernels.int8_matmul_mgpu` (warp-specialised wgmma + TMA, Hopper only:
    8-bit b, per-row/per-column scales, a float output or an ``out_spec`` of (1, g) tiles, shapes its tiles
    divide; else a ValueError), "triton" the Triton kernel; None picks Mosaic GPU where it can run
    (compiled on an sm_90 GPU, ``config`` None, M > 16) and Triton otherwise.

    Decode sizes (M <= 16) run :mod:`pallas_kernels.int8_matmul_decode` (narrow N tiles, split-K) when
    ``config`` is None or ``split_k`` is given (``split_k``: K chunks; the tiles of ``config`` when given);
    an explicit ``config`` without ``split_k`` keeps the Triton kernel at any M.
    """
    m, k = a.shape
    n = b.shape[0]
    check_operands(a, b, a_scale, b_scale, b_bits=b_bits, out_spec=out_spec, split_cols=split_cols)
    if backend not in (None, "triton", "mosaic"):
        raise ValueError(f"backend must be None, 'triton' or 'mosaic', got {backend!r}")
    if backend == "mosaic" or (
        backend is None and config is None and split_k is None and m > DECODE_MAX_M
        and not resolve_interpret(interpret)
    ):  # fmt: skip
        reason = mgpu.unsupported_reason(
            m, n, k, b_bits=b_bits, scales=a_scale is not None and b_scale is not None, out_spec=out_spec,
            residual=residual, out_dtype=out_dtype, split_cols=split_cols,
        )  # fmt: skip
        if reason is not None and backend == "mosaic":
            raise ValueError(f"backend='mosaic' cannot run this call: {reason}")
        use_mosaic = reason is None
    else:
        use_mosaic = False
    if use_mosaic:
        return mgpu.int8_matmul_mgpu(
            a, b, a_scale, b_scale, bias=bias, activation=activation, residual=residual, out_dtype=out_dtype,
            out_spec=out_spec, split_cols=split_cols, interpret=interpret,
        )  # fmt: skip
    if split_k is not None or (config is None and m <= DECODE_MAX_M):
        out = _decode(
            a, b, a_scale, b_scale, bias=bias, activation=activation, residual=residual, out_dtype=out_dtype,
            out_spec=out_spec, b_bits=b_bits, config=config, split_k=split_k, interpret=interpret,
        )  # fmt: skip
        if split_cols is None:
            return out
        return tuple(jnp.split(out, n // split_cols, axis=1))  # a few rows: a cheap copy
    return int8_matmul_triton(
        a, b, a_scale, b_scale, bias=bias, activation=activation, residual=residual, out_dtype=out_dtype,
        out_spec=out_spec, b_bits=b_bits, config=config, split_cols=split_cols, interpret=interpret,
    )  # fmt: skip


def _decode(a, b, a_scale, b_scale, *, config: TileConfig | None, split_k: int | None, **kw):
    """int8_matmul at M <= 16 through the decode kernel (tiles from ``config``/``split_k`` when given)."""
    m, k = a.shape
    if m > DECODE_MAX_M:
        raise ValueError(f"split_k is for decode sizes M <= {DECODE_MAX_M}, got M={m}")
    if a_scale is not None and math.prod(a_scale.shape) != m:
        raise ValueError(f"a_scale must be (M, 1) = ({m}, 1) per-row, got {a_scale.shape}")
    n = b.shape[0]
    if b_scale is not None and math.prod(b_scale.shape) != n:
        raise ValueError(f"b_scale must be (1, N) = (1, {n}) per-column, got {b_scale.shape}")
    b_scale = None if b_scale is None else jnp.reshape(b_scale, (n,))
    cfg = None
    if config is not None or split_k is not None:
        base = dec.lookup_decode_config(m, n, k, b_bits=kw["b_bits"])
        if config is not None:
            base = dataclasses.replace(
                base,
                block_n=config.block_n,
                block_k=config.block_k,
                num_warps=config.num_warps,
                num_stages=config.num_stages,
            )
        cfg = base if split_k is None else dataclasses.replace(base, split_k=split_k)
    return dec.int8_matmul_decode(a, b, a_scale, b_scale, config=cfg, **kw)



BLOCK_BACKENDS = ("auto", "triton")  # matmul_qarrays' kernels of the block-scaled route


def matmul_qarrays(
    a: QArray, b: QArray, *, split_cols: int | None = None,
    block_backend: Literal["auto", "triton"] = "auto", **epilogue,
) -> jax.Array | QArray | tuple[jax.Array, ...]:
    """GEMM of two quantized operands in NT layout: a (M, K), b (N, K) (INT8, or INT4 for b).

    Scales constant along K on both sides -> :func:`int8_matmul` (scales expanded to per-row/per-column
    vectors, applied in the epilogue); otherwise the block-scaled route: :func:`int8_matmul_block_scaled`
    (Triton; interpret mode on CPU), or under ``block_backend="auto"`` on Hopper the warp-specialised Mosaic GPU
    kernel (:mod:`pallas_kernels.int8_matmul_block_mgpu`) where it fits: shapes that tile, a float output or
    one requantized in (1, q) tiles (13-25% faster than Triton at the training shapes, BENCHMARKS.md);
    ``"triton"`` keeps Triton everywhere. ``epilogue``: bias, activation, residual, out_dtype, out_spec,
    config, interpret. split_cols: the output as N / split_cols
    (M, split_cols) arrays; :func:`int8_matmul` writes them from its epilogue, other kernels' outputs are
    split after.
    """
    if split_cols is not None and (a.scale.shape[1] != 1 or b.scale.shape[1] != 1):
        y = matmul_qarrays(a, b, block_backend=block_backend, **epilogue)
        return tuple(jnp.split(y, y.shape[1] // split_cols, axis=1))
    if split_cols is not None:
        epilogue["split_cols"] = split_cols
    (m, k), (n, kb) = a.shape_2d, b.shape_2d
    if k != kb:
        raise ValueError(
            f"contraction mismatch: a is {a.shape_2d}, b is {b.shape_2d} (both operands are (., K))"
        )
    if b.zero_point is not None:
        kernel = functools.partial(matmul_qarrays, block_backend=block_backend)
        return matmul_asymmetric(a, b, kernel, split_cols=split_cols, **epilogue)
    if a.zero_point is not None:
        raise NotImplementedError("matmul_qarrays needs symmetric activations (no zero points)")
    if a.spec.bits != 8:
        raise NotImplementedError(f"the activation operand must be INT8, got {a.spec.bits} bits")
    ta, tb = a.spec.resolve(m, k), b.spec.resolve(n, k)
    if a.scale.shape[1] == 1 and b.scale.shape[1] == 1:
        sa = jnp.repeat(a.scale[:, 0], ta[0])[:m].reshape(m, 1)
        sb = jnp.repeat(b.scale[:, 0], tb[0])[:n].reshape(1, n)
        return int8_matmul(a.values, b.values, sa, sb, b_bits=b.spec.bits, **epilogue)
    if _mosaic_groups(a, b, ta, epilogue):
        # Per-row A scales in K groups x per-channel weight scales: the Hopper kernel folds the groups in.
        sb = jnp.repeat(b.scale[:, 0], tb[0])[:n].reshape(1, n)
        return mgpu.int8_matmul_mgpu(a.values, b.values, a.scale, sb, **epilogue)
    dw = decode_weight(b) if m <= DECODE_MAX_M and a.scale.shape[1] == 1 else None
    if dw is not None and epilogue.get("config") is None:
        # Decode: per-token activations with ZeroQuant K-groups of the weight -> the weight-streaming kernel.
        sa = jnp.repeat(a.scale[:, 0], ta[0])[:m].reshape(m, 1)
        return int8_matmul_decode(
            a.values, dw.values, sa, dw.scale, b_bits=dw.bits, b_group=dw.group, **epilogue
        )
    if block_backend not in BLOCK_BACKENDS:
        raise ValueError(f"block_backend must be one of {BLOCK_BACKENDS}, got {block_backend!r}")
    if _mosaic_blocks(a, b, ta, tb, epilogue, block_backend):
        # Scales varying along K on both operands, on Hopper: the warp-specialised wgmma kernel.
        epi = {key: v for key, v in epilogue.items() if key not in ("config", "interpret")}
        return block_mgpu.int8_matmul_block_mgpu(
            a.values, a.scale, b.values, b.scale, a_tile=ta, b_tile=tb, **epi
        )
    return int8_matmul_block_scaled(
        a.values, a.scale, b.values, b.scale, b_bits=b.spec.bits, a_tile=ta, b_tile=tb, **epilogue
    )


def _mosaic_blocks(
    a: QArray, b: QArray, ta: tuple[int, int], tb: tuple[int, int], epilogue: dict, block_backend: str
) -> bool:
    """Whether ``matmul_qarrays``' block-scaled route runs on :mod:`pallas_kernels.int8_matmul_block_mgpu`:
    ``block_backend`` "auto", compiled on Hopper, no explicit Triton config, shapes that tile, an epilogue it
    has; else Triton."""
    (m, k), (n, _) = a.shape_2d, b.shape_2d
    if block_backend == "triton":
        return False
    if m <= DECODE_MAX_M or epilogue.get("config") is not None or resolve_interpret(epilogue.get("interpret")):
        return False
    reason = block_mgpu.unsupported_reason(
        m, n, k, a_tile=ta, b_tile=tb, b_bits=b.spec.bits, out_spec=epilogue.get("out_spec"),
        residual=epilogue.get("residual"), out_dtype=epilogue.get("out_dtype", jnp.bfloat16),
    )  # fmt: skip
    return reason is None


def matmul_qarrays_reference(
    a: QArray, b: QArray, *, split_cols: int | None = None, config=None, interpret=None, **epilogue
) -> jax.Array | QArray | tuple[jax.Array, ...]:
    """Plain-XLA definition of :func:`matmul_qarrays`: :func:`int8_matmul_block_scaled_reference` (both
    operands dequantized in fp32, one HIGHEST-precision GEMM, the epilogue) at the operands' own tiles;
    with zero points, both operands dequantized by :func:`jq8.quant.dequantize`, then the same."""
    del config, interpret
    (m, k), (n, _) = a.shape_2d, b.shape_2d
    if a.zero_point is not None or b.zero_point is not None:
        af, bf = (dequantize(q, jnp.float32).reshape(q.shape_2d) for q in (a, b))
        y = jax.lax.dot_general(af, bf, NT_DIMS, precision=jax.lax.Precision.HIGHEST)
        out = epilogue_reference(y, **_epilogue_args(epilogue))
    else:
        out = int8_matmul_block_scaled_reference(
            a.values, a.scale, b.values, b.scale, b_bits=b.spec.bits, a_tile=a.spec.resolve(m, k),
            b_tile=b.spec.resolve(n, k), **epilogue,
        )  # fmt: skip
    return out if split_cols is None else tuple(jnp.split(out, out.shape[1] // split_cols, axis=1))


def _epilogue_args(epilogue: dict) -> dict:
    """bias, activation, residual, out_dtype, out_spec of an epilogue dict, defaults filled in."""
    extra = set(epilogue) - {"bias", "activation", "residual", "out_dtype", "out_spec", "config", "interpret"}
    if extra:
        raise TypeError(f"unexpected epilogue arguments {sorted(extra)}")
    return dict(
        bias=epilogue.get("bias"), activation=epilogue.get("activation"), residual=epilogue.get("residual"),
        out_dtype=epilogue.get("out_dtype", jnp.bfloat16), out_spec=epilogue.get("out_spec"),
    )  # fmt: skip


def zero_point_term(a: QArray, b: QArray) -> jax.Array:
    """(M, N) f32: sum_k a[m, k] * zero_point[n, k] * scale[n, k], what b's zero points take from a @ b.T.

    a: (M, K) INT8 QArray, symmetric, scales constant along K (per token or per tensor). b: (N, K)
    asymmetric QArray whose tiles are (tn, tk) with tk dividing K or equal to it (per channel, K-groups,
    row runs). a's codes are summed per K group of b exactly in int32; the (M, G) x (G, N) product that
    follows is G = K / tk long (1/32 of the main GEMM at groups of 32), in f32 at HIGHEST precision.
    """
    (m, k), (n, _) = a.shape_2d, b.shape_2d
    if a.zero_point is not None or a.scale.shape[1] != 1:
        raise NotImplementedError(
            f"an asymmetric weight needs symmetric activations with one scale per row or tensor, got "
            f"activation spec {a.spec}"
        )
    tn, tk = b.spec.resolve(n, k)
    g = b.scale.shape[1]
    pad = g * tk - k
    sums = jnp.pad(a.values, ((0, 0), (0, pad))).reshape(m, g, tk).sum(axis=2, dtype=jnp.int32)
    zs = jnp.repeat(b.zero_point * b.scale, tn, axis=0)[:n]  # (N, G)
    a_scale = jnp.broadcast_to(a.scale, (m, 1)) if a.scale.shape[0] == 1 else jnp.repeat(
        a.scale, a.spec.resolve(m, k)[0], axis=0)[:m]  # fmt: skip
    t = jax.lax.dot_general(
        sums.astype(jnp.float32), zs, NT_DIMS, precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )  # fmt: skip
    return t * a_scale


def matmul_asymmetric(a: QArray, b: QArray, symmetric_matmul, *, split_cols: int | None = None, **epilogue):
    """``symmetric_matmul``'s GEMM for a weight b with zero points: dequantized b is (codes - z) * s, so
    a @ b.T = (a @ (codes * s).T) - :func:`zero_point_term`. The first product is ``symmetric_matmul`` on b's
    codes and scales as they are; the term is taken off before the epilogue's activation: as part of the
    residual the kernel adds when there is no activation or requantized output (one fused epilogue), else
    after an f32 GEMM, with the epilogue in XLA. Returns what ``symmetric_matmul`` returns."""
    b_sym = dataclasses.replace(b, zero_point=None, spec=dataclasses.replace(b.spec, symmetric=True))
    term = zero_point_term(a, b)
    epi = _epilogue_args(epilogue)
    tuning = {key: v for key, v in epilogue.items() if key in ("config", "interpret")}
    if epi["activation"] is None and epi["out_spec"] is None:
        # Bias then residual is all the epilogue does: the term rides in the residual (f32).
        res = -term if epi["residual"] is None else jnp.asarray(epi["residual"], jnp.float32) - term
        return symmetric_matmul(
            a, b_sym, bias=epi["bias"], residual=res, out_dtype=epi["out_dtype"], split_cols=split_cols,
            **tuning,
        )  # fmt: skip
    y = symmetric_matmul(a, b_sym, out_dtype=jnp.float32, **tuning) - term
    out = epilogue_reference(y, **epi)
    return out if split_cols is None else tuple(jnp.split(out, out.shape[1] // split_cols, axis=1))


def _mosaic_groups(a: QArray, b: QArray, ta: tuple[int, int], epilogue: dict) -> bool:
    """Whether ``matmul_qarrays`` runs on the Mosaic GPU kernel with A's scales in K groups: per-row tiles
    (1, g) of A, per-channel 8-bit weight scales, no explicit Triton config, compiled on Hopper at M > 16,
    shapes that tile."""
    (m, k), (n, _) = a.shape_2d, b.shape_2d
    if a.scale.shape[1] == 1 or ta[0] != 1 or b.scale.shape[1] != 1 or b.spec.bits != 8 or m <= DECODE_MAX_M:
        return False
    if epilogue.get("config") is not None or resolve_interpret(epilogue.get("interpret")):
        return False
    residual = epilogue.get("residual")
    reason = mgpu.unsupported_reason(
        m, n, k, b_bits=8, scales=True, out_spec=epilogue.get("out_spec"), residual=residual,
        out_dtype=epilogue.get("out_dtype", jnp.bfloat16), split_cols=None, a_group=ta[1],
    )  # fmt: skip
    return reason is None


@dataclasses.dataclass(frozen=True)
class DecodeWeight:
    """An (N, K) weight QArray as the decode kernels take it (``b``, ``b_scale``, ``b_bits``, ``b_group``)."""

    values: jax.Array
    scale: jax.Array  # (1, N) per output channel, or (N, G) K groups
    bits: int
    group: int | None


def decode_weight(b: QArray) -> DecodeWeight | None:
    """``b`` as the decode kernels take it, or None when they cannot: asymmetric codes, scales that vary
    along both N and K in blocks (not per channel / row runs / K groups), INT4 groups not a power of two."""
    n, k = b.shape_2d
    if b.zero_point is not None:
        return None
    tn, tk = b.spec.resolve(n, k)
    if b.scale.shape[1] == 1:  # per channel, row runs or per tensor: one scale per output column
        return DecodeWeight(b.values, jnp.repeat(b.scale[:, 0], tn)[:n].reshape(1, n), b.spec.bits, None)
    if tn == 1 and tk % 32 == 0 and (b.spec.bits == 8 or is_pow2(tk)):
        return DecodeWeight(b.values, b.scale, b.spec.bits, tk)
    return None


def quantize_matmul_qarray(
    x: jax.Array,
    b: QArray,
    *,
    norm: str | None = None,
    gamma: jax.Array | None = None,
    beta: jax.Array | None = None,
    eps: float = 1e-5,
    **epilogue,
) -> jax.Array | QArray:
    """Decode-size (M <= 16) GEMM of float rows x (M, K) with a weight QArray b (N, K), the per-token INT8
    quantization of ``norm(x)`` done inside the kernel (:func:`int8_matmul_decode.quantize_matmul_decode`).
    Raises ValueError when M > 16 or the decode kernels cannot take ``b`` (see :func:`decode_weight`)."""
    dw = decode_weight(b)
    if x.shape[0] > DECODE_MAX_M or dw is None:
        raise ValueError(
            f"quantize_matmul_qarray needs M <= {DECODE_MAX_M} and a weight the decode kernel takes; got "
            f"M={x.shape[0]}, weight spec {b.spec} (check with decode_weight, else quantize x first)"
        )
    return quantize_matmul_decode(
        x,
        dw.values,
        dw.scale,
        norm=norm,
        gamma=gamma,
        beta=beta,
        eps=eps,
        b_bits=dw.bits,
        b_group=dw.group,
        **epilogue,
    )
