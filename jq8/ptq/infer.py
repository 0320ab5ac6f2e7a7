"""INT8 inference of a ZeroQuant-quantized Flax model: real integer GEMMs, no fake quantization.

How the quantized model enters a Flax model: ``flax.linen.intercept_methods`` (chosen over a functional
forward that mirrors the model). Two levels, one interceptor (:func:`fused_interceptor`):

* jq8.training.nn's ``MlpBlock`` / ``AttentionBlock`` (the GPT/LLaMA branches) whose Dense layers are all INT8
  token-wise are replaced whole by the fused ZeroQuant data flow: LayerNorm + per-token quantization in
  one kernel (``norm_quantize``) -> INT8 GEMM with dequant + bias + GELU in the epilogue -> per-token
  quantization (``quantize_tiles``) -> INT8/INT4 GEMM (dequant + bias + residual in the epilogue); on
  Hopper at prefill sizes fc1's epilogue quantizes its own output instead (:func:`fc1_codes_group`);
  attention itself stays a float island. This mirrors the two branch bodies (small, tested against the
  per-Dense path to 1e-5). At decode sizes (M <= 16) on Pallas the GEMVs quantize their float input
  themselves (:func:`tokens_matmul`), and fc1's epilogue applies bias + GELU: fewer launches per token.
* Any other Dense-like module whose path has a quantized weight (BERT, weight-only schemes, other
  models) has its ``__call__`` replaced by :func:`quantized_linear`: a one-pass per-token quantize kernel
  on its input, then the INT8 GEMM with the fused epilogue. A per-Dense hook cannot see the op that
  produced its input, so this level cannot fuse the quantization into LayerNorm / GELU.
* ``nn.Embed`` modules whose table is quantized (``qp.embeddings``): the lookup gathers the INT8 rows and
  their scales and dequantizes only those (:func:`embedding_lookup`); ``attend`` (GPT's tied LM head) is
  :func:`quantized_linear` with the (V, D) table as the (N, K) weight: per-token INT8 activations x INT8
  table, the per-row table scales as per-output-channel scales in the GEMM epilogue, fp32 logits. Their
  ``setup`` is skipped (it would ask for the float table, which the compact params no longer hold).

Why interception: the user's model (GPT, LLaMA, MiniLM BERT...) runs unchanged from its own code, rules
find layers by module path, LKD (jq8.ptq.lkd) uses the same hook for its straight-through student, and only
the two jq8.training.nn branches (which this repo owns) are mirrored, not whole models.

Backends (``backend=``): ``"pallas"`` runs the Pallas kernels of ``pallas_kernels`` (compiled on GPU,
interpret mode on CPU); ``"xla"`` runs the same integer math with XLA ops (``lax.dot_general`` int8 x int8
-> int32, then the fp32 epilogue), which is what CPU uses by default and what the kernels are checked
against. ``None`` = pallas on GPU, xla elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jq8.ptq.schemes import QuantizedParams, QuantRule
from jq8.quant import QArray, QuantSpec, check_int32_k, qmax, quantize, quantize_with_scale, unpack_int4
from jq8.rules import module_path

TOKEN_SPEC = QuantSpec.per_row(8)
STATIC_SPEC = QuantSpec.per_tensor(8)


def resolve_backend(backend: str | None) -> str:
    if backend is None:
        return "pallas" if jax.default_backend() == "gpu" else "xla"
    if backend not in ("pallas", "xla"):
        raise ValueError(f"backend must be 'pallas', 'xla' or None, got {backend!r}")
    return backend


# ------------------------------------------------------------------------------------ activation quant


def quantize_static(x: jax.Array, scale: jax.Array) -> QArray:
    """(M, K) float -> QArray with one *given* per-tensor scale (calibrated; static W8A8 baseline).

    Same rounding and clamp as jq8.quant.quantize; values beyond the calibrated range saturate.
    """
    return quantize_with_scale(x, scale, STATIC_SPEC)


def quantize_tokens(x: jax.Array, backend: str) -> QArray:
    """(M, K) float -> per-token (per-row) INT8 QArray, scale (M, 1) f32."""
    if backend == "pallas":
        from pallas_kernels.quantize import quantize_tiles

        return quantize_tiles(x, TOKEN_SPEC)
    return quantize(x, TOKEN_SPEC)


def norm_quantize_tokens(x: jax.Array, gamma, beta, *, eps: float, rms: bool, backend: str) -> QArray:
    """LayerNorm/RMSNorm of x (M, D) fused with its per-token INT8 quantization (one pass over x)."""
    if backend == "pallas":
        from pallas_kernels.norm_quantize import layer_norm_quantize as fn
    else:
        from pallas_kernels.norm_quantize import layer_norm_quantize_reference as fn
    return fn(x, gamma, beta, eps=eps, rms=rms, spec=TOKEN_SPEC)[0]


def _in_kernel_quantize(x2: jax.Array, w: QArray, backend: str, norm: bool = False) -> bool:
    """Whether the GEMM of x2 with w quantizes x2 itself: Pallas at decode sizes (M <= 16) with a weight
    the decode kernel takes. There a separate quantize / LayerNorm-quantize launch costs about as much as
    the GEMV (a batch-1 token is a chain of small launches), so the kernel reads the float rows instead.
    Except LayerNorm into an INT4 GEMV: measured on the H100 (GPT-2 1.5B fc1, BENCHMARKS.md),
    the in-kernel LayerNorm costs the INT4 loop more (11-12 us) than a LayerNorm-quantize launch does
    (5.6 + 3.6 us)."""
    if backend != "pallas" or x2.shape[0] > 16 or (norm and w.spec.bits == 4):
        return False
    from pallas_kernels.gemm import decode_weight

    return decode_weight(w) is not None


def tokens_matmul(
    x2: jax.Array, w: QArray, *, backend: str, norm: Mapping[str, Any] | None = None, **epilogue
) -> jax.Array:
    """act(Q(norm(x2)) @ W + bias) + residual: per-token INT8 activations x a quantized weight w (N, K).

    x2: (M, K) float. norm: None, or {"gamma", "beta", "eps", "rms"} of a LayerNorm / RMSNorm applied
    first. The quantization is fused into the producer (LayerNorm) or, at decode sizes on Pallas, into the
    GEMM itself (see :func:`_in_kernel_quantize`). ``epilogue``: bias, activation, residual, out_dtype.
    """
    if _in_kernel_quantize(x2, w, backend, norm=norm is not None):
        from pallas_kernels.gemm import quantize_matmul_qarray

        kw = {}
        if norm is not None:
            kw = dict(
                norm="rmsnorm" if norm["rms"] else "layernorm",
                gamma=norm["gamma"],
                beta=norm["beta"],
                eps=norm["eps"],
            )
        return quantize_matmul_qarray(x2, w, **kw, **epilogue)
    if norm is None:
        xq = quantize_tokens(x2, backend)
    else:
        xq = norm_quantize_tokens(
            x2, norm["gamma"], norm["beta"], eps=norm["eps"], rms=norm["rms"], backend=backend
        )
    return matmul_qarrays(xq, w, backend=backend, **epilogue)


# ------------------------------------------------------------------------------------------- GEMMs


def _apply_activation(y: jax.Array, activation: str | None) -> jax.Array:
    if activation is None:
        return y
    if activation == "gelu":
        return jax.nn.gelu(y, approximate=False)
    if activation == "gelu_tanh":
        return jax.nn.gelu(y, approximate=True)
    raise ValueError(f"activation must be None, 'gelu' or 'gelu_tanh', got {activation!r}")


def _weight_codes(w: QArray) -> jax.Array:
    n, k = w.shape_2d
    return unpack_int4(w.values, k) if w.spec.bits == 4 else w.values


def matmul_qarrays_xla(
    a: QArray,
    b: QArray,
    *,
    bias: jax.Array | None = None,
    activation: str | None = None,
    residual: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
    out_spec: QuantSpec | None = None,
    split_cols: int | None = None,
) -> jax.Array | QArray | tuple[jax.Array, ...]:
    """XLA twin of ``pallas_kernels.int8_matmul_block_scaled.matmul_qarrays`` for the PTQ layouts.

    a: (M, K) int8 QArray with a scale constant along K (per-token (M, 1) or per-tensor (1, 1)), or per
      row in K groups (tiles (1, g), scales (M, cdiv(K, g))) against a weight with per-channel scales.
    b: (N, K) int8 / packed-INT4 QArray, scales (gn, 1) (per channel / row runs / tensor) or
      (N, cdiv(K, g)) (contraction groups); zero points too when asymmetric (``a`` then has one scale per
      row or tensor). Returns act(a @ b.T * scales + bias) + residual, (M, N).
    The product is int8 x int8 -> int32 (exact); contraction groups get one int32 partial per group,
    rescaled into an fp32 sum, as the block-scaled kernel does. split_cols: the output as N / split_cols
    arrays.
    """
    m, k = a.shape_2d
    n, kb = b.shape_2d
    if k != kb:
        raise ValueError(f"contraction mismatch: activations (M={m}, K={k}) vs weight (N={n}, K={kb})")
    if b.zero_point is not None:  # asymmetric weight: the symmetric product minus the zero points' term
        from pallas_kernels.gemm import matmul_asymmetric

        epilogue = dict(bias=bias, activation=activation, residual=residual, out_dtype=out_dtype, out_spec=out_spec)
        return matmul_asymmetric(a, b, matmul_qarrays_xla, split_cols=split_cols, **epilogue)
    a_groups = a.scale.shape[1] != 1
    if a.zero_point is not None:
        raise ValueError("matmul_qarrays_xla: activation codes must be symmetric")
    if a_groups and (a.spec.resolve(m, k)[0] != 1 or b.scale.shape[1] != 1):
        raise ValueError("matmul_qarrays_xla: activation scales in K groups need per-row tiles and a weight "
                         "with per-channel scales")  # fmt: skip
    bc = _weight_codes(b)
    a_scale = jnp.broadcast_to(a.scale, (m, 1)) if a.scale.shape[0] == 1 else a.scale
    tn, tk = b.spec.resolve(n, k)
    if not a_groups and b.scale.shape[1] == 1:  # scales constant along K: one int32 GEMM, scales after
        check_int32_k(k)
        acc = jax.lax.dot_general(a.values, bc, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
        y = acc.astype(jnp.float32) * a_scale * jnp.repeat(b.scale[:, 0], tn)[:n][None, :]
    else:  # groups along K (of a's or of b's scales): an int32 partial per group, rescaled into fp32
        gk = a.spec.resolve(m, k)[1] if a_groups else tk
        g = -(-k // gk)
        pad = g * gk - k
        av = jnp.pad(a.values, ((0, 0), (0, pad))).reshape(m, g, gk)
        bv = jnp.pad(bc, ((0, 0), (0, pad))).reshape(n, g, gk)
        # per-group scales (M or N, g) and the other operand's (1, N) / (M, 1) scale
        gs = a_scale if a_groups else jnp.repeat(b.scale, tn, axis=0)[:n]
        other = jnp.repeat(b.scale[:, 0], tn)[:n][None, :] if a_groups else a_scale

        def group(i, y):  # one (M, N) int32 partial at a time: a (g, M, N) stack is GBs at a vocabulary head
            ai = jax.lax.dynamic_index_in_dim(av, i, 1, keepdims=False)
            bi = jax.lax.dynamic_index_in_dim(bv, i, 1, keepdims=False)
            part = jax.lax.dot_general(ai, bi, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
            si = jax.lax.dynamic_index_in_dim(gs, i, 1, keepdims=True)
            return y + part.astype(jnp.float32) * (si if a_groups else si.T)

        y = jax.lax.fori_loop(0, g, group, jnp.zeros((m, n), jnp.float32)) * other
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    y = _apply_activation(y, activation)
    if residual is not None:
        y = y + residual.astype(jnp.float32)
    if out_spec is not None:
        return dataclasses.replace(quantize(y, out_spec), dtype=jnp.dtype(out_dtype))
    y = y.astype(out_dtype)
    return y if split_cols is None else tuple(jnp.split(y, n // split_cols, axis=1))


def matmul_qarrays(a: QArray, b: QArray, *, backend: str, **epilogue) -> jax.Array:
    """(M, K) x (N, K) quantized GEMM with the fused epilogue, on the chosen backend."""
    if backend == "pallas":
        from pallas_kernels.gemm import matmul_qarrays as kernel

        return kernel(a, b, **epilogue)
    return matmul_qarrays_xla(a, b, **epilogue)


def quantized_linear(
    x: jax.Array,
    w: QArray,
    rule: QuantRule,
    *,
    bias: jax.Array | None = None,
    activation: str | None = None,
    residual: jax.Array | None = None,
    static_scale: jax.Array | None = None,
    backend: str | None = None,
) -> jax.Array:
    """y = act(x @ W + bias) + residual with W stored quantized as w = Q(W.T) of shape (N, K).

    x: (..., K) float; returns (..., N) in x's dtype (f32 accumulation inside).
    act_mode "token": per-token INT8 activations; "static": INT8 with the calibrated ``static_scale``;
    "none": weight-only (W dequantized, float GEMM in x's dtype).
    """
    backend = resolve_backend(backend)
    lead, k = x.shape[:-1], x.shape[-1]
    n = w.shape_2d[0]
    x2 = x.reshape(-1, k)
    res2 = None if residual is None else residual.reshape(-1, n)
    out_dtype = x.dtype
    if rule.act_mode == "none":
        wd = w.dequantize(x.dtype)  # (N, K); XLA fuses the dequantize into the dot's operand
        y = jax.lax.dot_general(x2, wd, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        if bias is not None:
            y = y + bias.astype(jnp.float32)
        y = _apply_activation(y, activation)
        if res2 is not None:
            y = y + res2.astype(jnp.float32)
        return y.astype(out_dtype).reshape(*lead, n)
    epilogue = dict(bias=bias, activation=activation, residual=res2, out_dtype=out_dtype)
    if rule.act_mode == "static":
        if static_scale is None:
            raise ValueError(
                "act_mode 'static' needs calibrated activation scales: run ptq_infer.calibrate_static"
            )
        y = matmul_qarrays(quantize_static(x2, static_scale), w, backend=backend, **epilogue)
    else:
        y = tokens_matmul(x2, w, backend=backend, **epilogue)
    return y.reshape(*lead, n)


# --------------------------------------------------------------------------- embedding tables, tied head


def embedding_lookup(table: QArray, ids: jax.Array, dtype=None) -> jax.Array:
    """Rows ``ids`` of a quantized table: table (V, D) int8 (or packed INT4) with scale (V, G) f32 (G = 1:
    per row; else K-groups), ids (...) int -> (..., D) ``dtype`` (default: the table's original dtype).

    Only the looked-up rows are dequantized (codes x scale, the product ``QArray.dequantize`` computes, so
    the rows are bit-identical to the dequantized table's). Out-of-range ids give NaN rows, like
    ``nn.Embed`` (``jnp.take`` fills the scale with NaN).
    """
    v, d = table.shape_2d
    if table.zero_point is not None or table.spec.tile[0] != 1:
        raise ValueError("embedding_lookup needs a symmetric table with scales per row or per row group")
    codes = jnp.take(table.values, ids.reshape(-1), axis=0)  # (M, D) int8: 1/4 of the float gather's bytes
    codes = unpack_int4(codes, d) if table.spec.bits == 4 else codes
    scale = jnp.take(table.scale, ids.reshape(-1), axis=0)  # (M, G) f32
    if scale.shape[1] > 1:  # K-groups: each scale covers ``g`` consecutive columns of its row
        g = table.spec.resolve(v, d)[1]
        scale = jnp.repeat(scale, g, axis=1)[:, :d]
    rows = codes.astype(jnp.float32) * scale
    return rows.reshape(*ids.shape, d).astype(dtype or table.dtype)


def _embed_method(module: nn.Embed, method: str, args: tuple, kwargs: dict, table: QArray, rule, backend):
    """One intercepted method of a quantized nn.Embed: setup (skipped), __call__ (lookup), attend (head)."""
    if method == "setup":
        return None  # the float ``embedding`` param is not in the compact params: never create it
    if len(args) != 1 or kwargs:
        raise TypeError(f"quantized nn.Embed.{method} expects one positional input, got {args}, {kwargs}")
    (x,) = args
    if method == "__call__":
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError("Input type must be an integer or unsigned integer.")
        if table.shape[0] == 1:  # nn.Embed broadcasts a single-row table whatever the ids
            x = jnp.zeros_like(x)
        return embedding_lookup(table, x, module.dtype)
    if method == "attend":
        # Tied LM head x @ table.T: the (V, D) table is an (N, K) weight with per-output-channel scales.
        out_dtype = module.dtype or jnp.result_type(x.dtype, table.dtype)
        return quantized_linear(x, table, rule, backend=backend).astype(out_dtype)
    raise NotImplementedError(f"nn.Embed.{method} of a quantized table is not supported")


# -------------------------------------------------------------------------------- Flax interception


def _module_path(module: nn.Module) -> str:
    return module_path(module.path)


def _dense_rules(qp: QuantizedParams) -> dict[str, QuantRule]:
    return {p: qp.rules[i] for p, i in qp.assignment if qp.rules[i].kind == "dense"}


def dense_interceptor(qp: QuantizedParams, backend: str | None = None) -> Callable:
    """A ``nn.intercept_methods`` interceptor running every quantized Dense of ``qp`` as INT8, and every
    quantized nn.Embed from its INT8 table (lookup and tied head)."""
    backend = resolve_backend(backend)
    rules = _dense_rules(qp)
    table_rules = {p: qp.rules[i] for p, i in qp.assignment if p in qp.embeddings}

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if isinstance(mod, nn.Embed) and (path := _module_path(mod)) in qp.embeddings:
            table, rule = qp.embeddings[path], table_rules[path]
            return _embed_method(mod, context.method_name, args, kwargs, table, rule, backend)
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = _module_path(context.module)
        rule = rules.get(path)
        if rule is None:
            return next_fun(*args, **kwargs)
        if len(args) != 1 or kwargs:
            raise TypeError(
                f"quantized Dense {path!r} expects one positional input, got {len(args)} args, {kwargs}"
            )
        bias = context.module.variables.get("params", {}).get("bias")
        return quantized_linear(
            args[0], qp.weights[path], rule, bias=bias, static_scale=qp.act_scales.get(path), backend=backend
        )

    return interceptor


def _token_rules(rules: Mapping[str, QuantRule], path: str, names: tuple[str, ...]) -> bool:
    return all((r := rules.get(f"{path}/{n}")) is not None and r.act_mode == "token" for n in names)


def _bias(p: Mapping[str, Any], name: str) -> jax.Array | None:
    """A layer's bias or None (bias-less LLaMA layers keep no float entry once their kernel is quantized)."""
    return p.get(name, {}).get("bias")


def _block_norm(module, p: Mapping[str, Any], folded: bool) -> dict[str, Any]:
    """The block's pre-norm (LayerNorm or RMSNorm, per ``module.norm``) as :func:`tokens_matmul` takes it;
    without gamma / beta when ``folded`` (the params hold them folded into the next Dense layers)."""
    norm = p["norm"]
    gamma, beta = (None, None) if folded else (norm["scale"], norm.get("bias"))
    return dict(gamma=gamma, beta=beta, eps=module.eps, rms=module.norm == "rmsnorm")


def _fused_mlp(
    module, qp: QuantizedParams, path: str, x: jax.Array, backend: str, residual: jax.Array | None = None
) -> jax.Array:
    """jq8.training.nn.MlpBlock (GELU) all INT8: LN+quantize -> fc1 (dequant+bias+GELU epilogue) -> quantize -> fc2.

    At decode sizes on Pallas the quantizations run inside the GEMMs instead, and fc1's epilogue adds the
    bias and applies GELU (see :func:`tokens_matmul`). ``residual`` is added in fc2's epilogue (at decode
    sizes the split-K GEMV sums into it in place: one launch for GEMV, bias and residual add)."""
    p = module.variables["params"]
    lead, d = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, d)
    w1, w2 = qp.weights[f"{path}/fc1"], qp.weights[f"{path}/fc2"]
    res = dict(bias=_bias(p, "fc2"), residual=_rows(residual, d), out_dtype=jnp.float32)
    # fc1's epilogue adds the bias and applies GELU. At decode sizes fc2 quantizes that f32 output itself;
    # otherwise it leaves fc1 in the block's compute dtype, as the float model's Dense does, and one
    # per-token quantize pass follows (a bf16 read is half an f32 one; measured in BENCHMARKS.md,
    # GELU in the GEMM epilogue + quantize beats a separate bias-GELU-quantize kernel at M = 8192).
    fc2_quantizes = _in_kernel_quantize(x2, w2, backend)
    u_dtype = jnp.float32 if fc2_quantizes else module.policy.compute_dtype
    norm = _block_norm(module, p, path in qp.folded_norms)
    fc1 = dict(norm=norm, bias=_bias(p, "fc1"), activation="gelu", out_dtype=u_dtype)
    group = fc1_codes_group(x2.shape[0], w1, w2, backend)
    if group is not None:  # fc1 writes INT8 codes itself, fc2 reads them: no float u, no quantize pass
        u = tokens_matmul(x2, w1, backend=backend, out_spec=QuantSpec(tile=(1, group)), **fc1)
        y = matmul_qarrays(u, w2, backend=backend, **res)
    elif fc2_quantizes:
        y = tokens_matmul(tokens_matmul(x2, w1, backend=backend, **fc1), w2, backend=backend, **res)
    else:
        u = tokens_matmul(x2, w1, backend=backend, **fc1)
        y = matmul_qarrays(quantize_tokens(u, backend), w2, backend=backend, **res)
    return y.reshape(*lead, d)


FC1_CODES_GROUPS = (128,)  # columns of fc1's output per INT8 scale when fc1 writes codes, best first


def fc1_codes_group(m: int, w1: QArray, w2: QArray, backend: str) -> int | None:
    """The column group of fc1's requantized output when the MLP runs fc1 -> fc2 without a quantize pass
    between them, else None.

    On Hopper at prefill sizes, fc1's epilogue (bias, GELU) quantizes its own output to INT8 with one scale
    per token and per g columns (its warpgroup tile: a whole row's maximum is not known there), and fc2
    applies those scales per K group in its main loop, one g-wide K step a group
    (``pallas_kernels.int8_matmul_mgpu``). That is finer than one scale per token, so no less accurate, and
    saves writing u in bf16 and the pass that reads it back. fc2 pays for that with a drain of its
    accumulator every K step. With g = 128 that cost more than the pass at 160-wide fc2 tiles (GPT-2 1.5B
    prefill 2% slower, BENCHMARKS.md), so 128-wide groups need fc2 tiles <= 128 columns. 256-wide
    groups halve fc2's drains (0.217 -> 0.197-0.204 ms at 1.5B), but fc1's 64 x 256 requantizing tiles cost
    more than that (0.254 -> 0.290-0.296 ms; BENCHMARKS.md), so they are not among the defaults.
    Elsewhere (CPU, other GPUs, decode sizes, INT4 or K-grouped weights) the per-token path runs.
    """
    from pallas_kernels import int8_matmul_mgpu as mgpu
    from pallas_kernels.gemm import DECODE_MAX_M

    if backend != "pallas" or m <= DECODE_MAX_M or not mgpu.available():
        return None
    (n1, k1), (n2, k2) = w1.shape_2d, w2.shape_2d
    for w in (w1, w2):
        if w.spec.bits != 8 or w.scale.shape[1] != 1 or w.zero_point is not None:
            return None
    common = dict(b_bits=8, scales=True, residual=None, out_dtype=jnp.float32, split_cols=None)
    for g in FC1_CODES_GROUPS:
        if mgpu.unsupported_reason(m, n1, k1, out_spec=QuantSpec(tile=(1, g)), **common) is not None:
            continue
        if mgpu.unsupported_reason(m, n2, k2, out_spec=None, a_group=g, **common) is not None:
            continue
        if g > 128 or mgpu.fit_config(m, n2, k2, residual=True, a_group=g).tile_n <= 128:
            return g
    return None


def _rows(residual: jax.Array | None, d: int) -> jax.Array | None:
    """The residual stream as the (tokens, d) fp32 rows a GEMM epilogue adds (None stays None)."""
    return None if residual is None else residual.reshape(-1, d).astype(jnp.float32)


def _fused_attention(
    module,
    qp: QuantizedParams,
    path: str,
    x: jax.Array,
    mask,
    backend: str,
    decode: bool = False,
    residual: jax.Array | None = None,
) -> jax.Array:
    """jq8.training.nn.AttentionBlock, INT8 projections: LN+quantize -> qkv GEMM -> attention (float) -> quantize
    -> out GEMM. Mirrors AttentionBlock.__call__ (layout [q | k | v], heads contiguous, grouped KV heads
    kept grouped); the float core
    (rotary, KV cache when ``decode``, softmax attention) is the block's own ``attend`` on the bound module,
    so the cached INT8 model reads and advances the same "cache" variables as the float one."""
    from jq8.training.nn import split_qkv_columns

    p = module.variables["params"]
    b, t, d = x.shape
    h, hk = module.num_heads, module.kv_heads
    hd = d // h
    cd = module.policy.compute_dtype
    x2, w = x.reshape(-1, d), qp.weights[f"{path}/qkv"]
    # At decode sizes a split-K qkv GEMV leaves its partial sums to the attention kernel (module.attend
    # finishes them with XLA on any other path): one launch fewer per layer. Otherwise the GEMM writes its
    # output as KV-head-wide column blocks (q, k, v; with grouped KV heads q is the first h / hk blocks), so
    # attention needs no slicing copies of a packed qkv.
    if _in_kernel_quantize(x2, w, backend, norm=True):
        layout = dict(split_sum="defer")
    else:
        layout = dict(split_cols=hk * hd)
    norm = _block_norm(module, p, path in qp.folded_norms)
    qkv = tokens_matmul(x2, w, backend=backend, norm=norm, bias=_bias(p, "qkv"), out_dtype=cd, **layout)
    if isinstance(qkv, tuple):
        qkv = tuple(a.reshape(b, t, -1, hd) for a in split_qkv_columns(qkv, h, hk))
    else:
        qkv = qkv.reshape(b, t, h + 2 * hk, hd)
    o = module.attend(qkv, mask, decode).reshape(b * t, d)
    out = qp.weights[f"{path}/out"]
    res = _rows(residual, d)
    y = tokens_matmul(o, out, backend=backend, bias=_bias(p, "out"), residual=res, out_dtype=jnp.float32)
    return y.reshape(b, t, d)


def fused_interceptor(qp: QuantizedParams, backend: str | None = None) -> Callable:
    """Like :func:`dense_interceptor`, plus whole-branch fusion for jq8.training.nn's MlpBlock / AttentionBlock.

    A branch whose Dense layers are all token-mode INT8 runs with the activation quantization fused into
    its producer (LayerNorm, bias+GELU) and the dequantization in the GEMM epilogues; other branches (and
    any other model) fall back to per-Dense interception. Only inference (deterministic) calls are fused.
    """
    from jq8.training.nn import AttentionBlock, MlpBlock

    backend = resolve_backend(backend)
    rules = _dense_rules(qp)
    per_dense = dense_interceptor(qp, backend)

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, MlpBlock | AttentionBlock):
            path = _module_path(mod)
            deterministic = kwargs.get("deterministic", args[1] if len(args) > 1 else True)
            inference = deterministic is True or mod.dropout_rate == 0.0
            if isinstance(mod, MlpBlock) and mod.activation == "gelu" and inference:
                if _token_rules(rules, path, ("fc1", "fc2")):
                    residual = kwargs.get("residual", args[2] if len(args) > 2 else None)
                    return _fused_mlp(mod, qp, path, args[0], backend, residual)
            if isinstance(mod, AttentionBlock) and inference and args[0].ndim == 3:
                if _token_rules(rules, path, ("qkv", "out")):
                    mask = kwargs.get("mask", args[2] if len(args) > 2 else None)
                    decode = kwargs.get("decode", args[3] if len(args) > 3 else False)
                    residual = kwargs.get("residual", args[4] if len(args) > 4 else None)
                    return _fused_attention(
                        mod, qp, path, args[0], mask, backend, decode=decode, residual=residual
                    )
        return per_dense(next_fun, args, kwargs, context)

    return interceptor


def apply_quantized(
    model: nn.Module,
    qp: QuantizedParams,
    *args,
    backend: str | None = None,
    fused: bool = True,
    method=None,
    variables: Mapping[str, Any] | None = None,
    **kwargs,
) -> Any:
    """``model.apply`` with the quantized params: same arguments and outputs as the float model.

    fused: fuse activation quantization into LayerNorm / GELU for jq8.training.nn blocks (:func:`fused_interceptor`);
    False intercepts each Dense separately (works for any Flax model). Quantized embedding tables (and a
    tied head ``attend``) run from their INT8 codes either way.
    variables: other variable collections to apply with, e.g. ``{"cache": cache}`` for KV-cached decoding
    (with ``decode=True, mutable=["cache"]`` in kwargs, which go to ``model.apply``; see jq8.inference.decode).
    """
    policy = getattr(model, "policy", None)
    if getattr(policy, "int8", False):
        raise ValueError(
            "apply_quantized needs the model built with a float policy (Policy.from_name('bf16')): under "
            "'jetfire-int8' the blocks run fused training ops that bypass the quantized Dense layers"
        )
    icpt = fused_interceptor(qp, backend) if fused else dense_interceptor(qp, backend)
    if variables and "params" in variables:
        raise ValueError("apply_quantized takes the parameters from qp; 'variables' must not hold 'params'")
    with nn.intercept_methods(icpt):
        return model.apply({**(variables or {}), "params": qp.params}, *args, method=method, **kwargs)


# -------------------------------------------------------------------------- static-range calibration


@contextlib.contextmanager
def record_dense_inputs(paths: Iterable[str], sink: Callable[[str, jax.Array], None]) -> Iterator[None]:
    """Within the context, calls ``sink(path, x)`` with the input of each Dense whose path is in ``paths``."""
    wanted = set(paths)

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            path = _module_path(context.module)
            if path in wanted:
                sink(path, args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield


def calibrate_static(
    model: nn.Module,
    params: Mapping[str, Any],
    batches: Iterable[Any],
    qp: QuantizedParams,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> QuantizedParams:
    """Per-tensor activation scales (absmax / 127 over the calibration batches) for every static-mode layer.

    Runs the *float* model on each batch (``model.apply({'params': params}, batch, **apply_kwargs)``; a
    tuple batch is unpacked into positional inputs) and returns ``qp`` with ``act_scales`` filled.
    """
    paths = [p for p, i in qp.assignment if qp.rules[i].act_mode == "static"]
    if not paths:
        return qp
    kw = dict(apply_kwargs or {})

    @jax.jit
    def amax_of(batch):
        found: dict[str, jax.Array] = {}

        def sink(path, x):
            found[path] = jnp.max(jnp.abs(x.astype(jnp.float32)))

        with record_dense_inputs(paths, sink):
            model.apply({"params": params}, *(batch if isinstance(batch, tuple) else (batch,)), **kw)
        return found

    amax = {p: jnp.float32(0) for p in paths}
    n = 0
    for batch in batches:
        cur = amax_of(batch)
        amax = {p: jnp.maximum(amax[p], cur[p]) for p in paths}
        n += 1
    if n == 0:
        raise ValueError("calibrate_static got no calibration batches")
    scales = {p: jnp.maximum(amax[p] / qmax(8), jnp.finfo(jnp.float32).tiny) for p in paths}
    return dataclasses.replace(qp, act_scales=scales)
