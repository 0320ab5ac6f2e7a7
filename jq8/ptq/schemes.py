"""ZeroQuant post-training quantization: rules, schemes, and weight quantization of a Flax params tree.

A :class:`QuantRule` says how the Dense layers whose *module path* (``"blocks_0/mlp/fc1"``, the keys of the
params tree joined by ``/``) matches a regex are quantized: weight bits, weight granularity and the
activation mode. Rules are tried in order; the first match wins; a Dense matched by no rule stays in full
precision (final norm, biases...). A rule that matches nothing is an error unless it is ``optional``.

Embedding tables (``nn.Embed``: a module holding a 2-D ``embedding``) are matched by rules of
``kind="embedding"``: INT8 codes with one scale per table row (per token, which for a tied LM head
``wte.attend`` is also one scale per output channel). The lookup dequantizes only the gathered rows; the
tied head runs as a W8A8 GEMM (``act_mode="token"``) or weight-only (``"none"``), see
:mod:`jq8.ptq.infer`. The named schemes quantize the embeddings and an untied ``lm_head`` Dense (LLaMA)
by default (INT8; optional rules, since not every model has them); ``scheme(..., embeddings=False)`` keeps
them float.

Weights are stored for the inference GEMM's "NT" layout: a Flax kernel ``W`` (K=in, N=out) becomes a
:class:`~jq8.quant.QArray` of ``W.T`` with shape (N, K), so both GEMM operands are K-contiguous (see
BENCHMARKS.md). Weight granularities, as tiles of that (N, K) view:

* ``group_size=None``                          one scale per output channel, tile (1, K)
* ``group_axis="contraction"``, ``group_size=g``  GPTQ/AWQ groups of g along K, tile (1, g): scales vary
  along K, so the GEMM is the block-scaled kernel
* ``group_axis="rows"``, ``group_size=r``          DeepSpeed/ZeroQuant groups: runs of r whole output rows
  share a scale, tile (r, K) (``r=-1`` is per-tensor); scales are constant along K (epilogue only)

Activation modes: ``"token"`` (ZeroQuant: one dynamic scale per token, no calibration), ``"static"`` (the
baseline: one calibrated per-tensor scale, see :func:`jq8.ptq.infer.calibrate_static`), ``"none"``
(weight-only: activations stay bf16/f32).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jq8.ptq.norm_fold import fold_branch, foldable_branches
from jq8.quant import QArray, QuantSpec, quantize
from jq8.rules import assign, compile_pattern, get_path, map_path, matches, paths_holding

GroupAxis = Literal["contraction", "rows"]
ActMode = Literal["token", "static", "none"]
RuleKind = Literal["dense", "embedding"]

# Default Dense names of the attention and MLP sublayers (GPT: attn/{qkv,out}, mlp/{fc1,fc2[,gate]};
# BERT: attention/{query,key,value,out}, mlp/{fc1,fc2}).
ATTN_PATTERN = r"(^|/)(qkv|query|key|value|out)$"
MLP_PATTERN = r"(^|/)(fc1|fc2|gate)$"
# An untied LM head Dense (models.llama); GPT's head is the tied ``wte`` table.
HEAD_PATTERN = r"(^|/)lm_head$"
# Embedding rules match embedding tables only, so "every table" is the default.
EMBED_PATTERN = r".*"


@dataclasses.dataclass(frozen=True)
class QuantRule:
    """How the Dense layers whose module path matches ``pattern`` (:mod:`jq8.rules`) are quantized.

    weight_bits: 8 or 4 (INT4 codes are packed two per byte).
    group_size: None = one scale per output channel; else the group length along ``group_axis``
      (-1 with ``group_axis="rows"`` = one scale for the whole tensor).
    group_axis: "contraction" (groups along K) or "rows" (runs of whole output rows, DeepSpeed style).
    symmetric: symmetric weight codes; False: asymmetric "scale + min" codes (the tile's own min..max, a
      fractional zero point per tile; ``QuantSpec.exact_zero=False``). With INT8 activations the GEMM
      subtracts the zero points' term, sum_k a[m, k] * zero_point[n, k] * scale[n, k], from one small GEMM
      of the activations' K-group sums (``pallas_kernels.gemm.matmul_asymmetric``). A Q4_1 GGUF weight
      quantized asymmetric in K-groups of 32 (its block) keeps its 4-bit grid exactly. Embedding tables are
      symmetric.
    act_mode: "token" (dynamic per-token INT8), "static" (calibrated per-tensor INT8), "none" (float).
    kind: "dense" (matches Dense kernels) or "embedding" (matches ``nn.Embed`` tables (V, D), which are
      already in the (N, K) layout of a tied head: one scale per row, or per ``group_size`` columns of a
      row; act_mode is that of the tied head ``attend``: "token" or "none").
    optional: the rule may match nothing (the schemes' embedding / LM-head rules: not every model has
      them); a non-optional rule that matches nothing is an error (it catches typos in patterns).
    """

    pattern: str
    weight_bits: int = 8
    group_size: int | None = None
    group_axis: GroupAxis = "contraction"
    symmetric: bool = True
    act_mode: ActMode = "token"
    kind: RuleKind = "dense"
    optional: bool = False

    def __post_init__(self):
        compile_pattern(self.pattern, "QuantRule")
        if self.weight_bits not in (4, 8):
            raise ValueError(
                f"QuantRule {self.pattern!r}: weight_bits must be 8 or 4, got {self.weight_bits}"
            )
        if self.group_axis not in ("contraction", "rows"):
            raise ValueError(
                f"QuantRule {self.pattern!r}: group_axis must be 'contraction' or 'rows', "
                f"got {self.group_axis!r}"
            )
        if self.act_mode not in ("token", "static", "none"):
            raise ValueError(
                f"QuantRule {self.pattern!r}: act_mode must be 'token', 'static' or 'none', "
                f"got {self.act_mode!r}"
            )
        if self.group_size is not None and self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"QuantRule {self.pattern!r}: group_size must be positive, -1 or None")
        if self.group_size == -1 and self.group_axis != "rows":
            raise ValueError(
                f"QuantRule {self.pattern!r}: group_size=-1 (per-tensor) needs group_axis='rows'"
            )
        if not self.symmetric and self.kind == "embedding":
            raise ValueError(
                f"QuantRule {self.pattern!r}: embedding tables are quantized symmetric (the lookup and the "
                "tied head read them without zero points); drop symmetric=False"
            )
        if self.kind not in ("dense", "embedding"):
            raise ValueError(
                f"QuantRule {self.pattern!r}: kind must be 'dense' or 'embedding', got {self.kind!r}"
            )
        if self.kind == "embedding" and (
            (self.group_size is not None and self.group_axis != "contraction") or self.act_mode == "static"
        ):
            raise ValueError(
                f"QuantRule {self.pattern!r}: embedding tables take one scale per row (group_size=None) "
                "or per group of a row (group_axis='contraction'), and their tied head runs act_mode "
                "'token' or 'none'"
            )

    def matches(self, path: str) -> bool:
        return matches(self.pattern, path)

    def weight_spec(self) -> QuantSpec:
        """The QuantSpec of the transposed (N, K) weight."""
        b, s = self.weight_bits, self.symmetric
        if self.group_size is None:
            spec = QuantSpec.per_row(b, s)
        elif self.group_axis == "contraction":
            spec = QuantSpec.groups(self.group_size, axis=1, bits=b, symmetric=s)
        else:
            spec = QuantSpec.row_runs(self.group_size, b, s)
        # Weights need no exact zero (nothing pads them): asymmetric codes span the tile's own range.
        return spec if s else dataclasses.replace(spec, exact_zero=False)

    def describe(self) -> str:
        if self.kind == "embedding":
            g = "per-row" if self.group_size is None else f"row groups of {self.group_size}"
            return f"W{self.weight_bits} embedding ({g}), tied head acts {self.act_mode}"
        if self.group_size is None:
            g = "per-channel"
        elif self.group_size == -1:
            g = "per-tensor"
        else:
            g = f"{self.group_axis} groups of {self.group_size}"
        return f"W{self.weight_bits} ({g}{'' if self.symmetric else ', asym'}), acts {self.act_mode}"


def _embedding_rules(act_mode: ActMode, bits: int, int4_group: int) -> list[QuantRule]:
    """Embedding tables and an untied LM head: INT8 per row / output channel, or INT4 in K-groups.
    Optional: GPT has no ``lm_head`` Dense, an encoder no head at all, a Dense-only model no table."""
    group = None if bits == 8 else int4_group
    return [
        QuantRule(EMBED_PATTERN, bits, group, act_mode=act_mode, kind="embedding", optional=True),
        QuantRule(HEAD_PATTERN, bits, group, act_mode=act_mode, optional=True),
    ]


def _scheme_table(int4_group: int, int4_symmetric: bool = True) -> dict[str, list[QuantRule]]:
    sym4 = int4_symmetric
    return {
        # ZeroQuant W8A8: fine-grained weights (per output channel: a row run of 1, free in the epilogue)
        # and dynamic token-wise INT8 activations.
        "w8a8": [QuantRule(f"{ATTN_PATTERN}|{MLP_PATTERN}", 8)],
        # ZeroQuant mixed precision: INT4 MLP (contraction groups), INT8 attention, INT8 token-wise acts.
        "w4/8-a8": [
            QuantRule(MLP_PATTERN, 4, int4_group, "contraction", symmetric=sym4),
            QuantRule(ATTN_PATTERN, 8),
        ],
        "w8a16": [QuantRule(f"{ATTN_PATTERN}|{MLP_PATTERN}", 8, act_mode="none")],
        "w4a16": [
            QuantRule(f"{ATTN_PATTERN}|{MLP_PATTERN}", 4, int4_group, "contraction", symmetric=sym4, act_mode="none")
        ],
        # The classic baseline ZeroQuant beats: per-tensor weights, calibrated per-tensor activations.
        "static-w8a8": [QuantRule(f"{ATTN_PATTERN}|{MLP_PATTERN}", 8, -1, "rows", act_mode="static")],
    }


SCHEMES: tuple[str, ...] = tuple(_scheme_table(128))


def scheme(
    name: str,
    *,
    int4_group: int = 128,
    int4_symmetric: bool = True,
    embeddings: bool = True,
    embedding_bits: int | None = None,
) -> list[QuantRule]:
    """The rules of a named scheme (see :data:`SCHEMES`); ``int4_group`` is the INT4 K-group size.

    int4_symmetric: False quantizes the INT4 Dense weights asymmetric, "scale + min" per group (see
      :class:`QuantRule`): a finer grid for the same bits, and at ``int4_group=32`` a Q4_1 GGUF's weights
      come back exactly (when no norm is folded into them). Tables stay symmetric.

    embeddings: also quantize the vocabulary-sized tables: embedding tables (the tied LM head then runs on
      them) and an untied ``lm_head`` Dense, with the scheme's activation mode (token-wise INT8, or float
      for the weight-only schemes). False keeps them float. The ``static-w8a8`` baseline always keeps
      them float (the per-tensor baseline of the paper).
    embedding_bits: 8 (one scale per row / output channel) or 4 (INT4 in ``int4_group`` K-groups; half the
      bytes of the largest tensors, at a larger head error). None (default): 4 for the schemes with INT4
      weights (w4/8-a8, w4a16: the compact ones; on our 124M GPT +0.6% perplexity vs INT8 tables and
      0.34x instead of 0.36x the fp16 size, see BENCHMARKS.md), 8 otherwise.
    """
    table = _scheme_table(int4_group, int4_symmetric)
    if name not in table:
        raise ValueError(f"unknown quantization scheme {name!r}; known schemes: {', '.join(table)}")
    rules = table[name]
    if embedding_bits is None:
        embedding_bits = 4 if any(r.weight_bits == 4 for r in rules) else 8
    if embedding_bits not in (4, 8):
        raise ValueError(f"embedding_bits must be 8 or 4, got {embedding_bits}")
    if embeddings and name != "static-w8a8":
        act = "none" if rules[0].act_mode == "none" else "token"
        rules = rules + _embedding_rules(act, embedding_bits, int4_group)
    return rules


scheme_rules = scheme


def head_weight_only(rules: list[QuantRule]) -> list[QuantRule]:
    """``rules`` with the embedding tables' tied head (and an untied ``lm_head``) weight-only: the tables as
    quantized before, the head's input left float (act_mode "none"). The head is the one GEMM that
    smoothing cannot reach (a tied table is also the embedding lookup)."""
    return [dataclasses.replace(r, act_mode="none") if r.kind == "embedding" or r.pattern == HEAD_PATTERN
            else r for r in rules]


# ------------------------------------------------------------------------------------------ params tree


def dense_paths(params: Mapping[str, Any]) -> list[str]:
    """Module paths of every Dense-like layer (a dict holding a 2-D ``kernel``), in tree order."""
    return paths_holding(params, "kernel")


def embedding_paths(params: Mapping[str, Any]) -> list[str]:
    """Module paths of every embedding table (a dict holding a 2-D ``embedding``, as nn.Embed), in tree
    order."""
    return paths_holding(params, "embedding")


def assign_rules(
    paths: list[str], rules: list[QuantRule] | tuple[QuantRule, ...], kind: RuleKind = "dense"
) -> dict[str, int]:
    """path -> index (into ``rules``) of the first rule of ``kind`` matching it.

    Rules of the other kind are skipped; raises if a non-optional rule of ``kind`` matches nothing.
    """
    if not rules:
        raise ValueError("no quantization rules given")
    own = [i for i, r in enumerate(rules) if r.kind == kind]
    assignment, unmatched = assign(paths, [rules[i].pattern for i in own])
    unused = [rules[own[j]].pattern for j in unmatched if not rules[own[j]].optional]
    if unused:
        what = "Dense layer" if kind == "dense" else "embedding table"
        raise ValueError(
            f"quantization rule(s) {unused} match no {what}; the model's {what} paths are: {list(paths)}"
        )
    return {path: own[j] for path, j in assignment.items()}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedParams:
    """A quantized model's parameters (a pytree).

    params: the float params tree with the quantized Dense ``kernel``s and embedding tables removed
      (biases, norms, unquantized layers stay as they were).
    weights: Dense module path -> QArray of the transposed kernel, shape (N=out, K=in).
    act_scales: module path -> () float32 calibrated per-tensor activation scale (static mode only).
    rules / assignment: static; ``assignment`` pairs each quantized path (Dense or table) with its rule index.
    embeddings: nn.Embed module path -> QArray of the table, shape (V, D) int8, scale (V, 1) f32 (per row).
      Last, so that positional construction without it (older code) still works.
    folded_norms: static; branch paths whose norm affine ``params`` holds folded into the following Dense
      layers (gamma ones, beta zeros; :mod:`jq8.ptq.norm_fold`), so the fused path may skip it.
    """

    params: dict
    weights: dict
    act_scales: dict
    rules: tuple[QuantRule, ...] = dataclasses.field(default=(), metadata=dict(static=True))
    assignment: tuple[tuple[str, int], ...] = dataclasses.field(default=(), metadata=dict(static=True))
    embeddings: dict = dataclasses.field(default_factory=dict)
    folded_norms: tuple[str, ...] = dataclasses.field(default=(), metadata=dict(static=True))

    def rule_for(self, path: str) -> QuantRule | None:
        for p, i in self.assignment:
            if p == path:
                return self.rules[i]
        return None

    @property
    def paths(self) -> tuple[str, ...]:
        """Paths of the quantized Dense layers (the GEMMs; see ``embeddings`` for the tables)."""
        return tuple(p for p, i in self.assignment if self.rules[i].kind == "dense")


def quantize_weight(kernel: jax.Array, rule: QuantRule) -> QArray:
    """Flax kernel (K, N) float -> QArray of its transpose (N, K) under ``rule.weight_spec()``."""
    return _quantize_weight_t(jnp.asarray(kernel, jnp.float32), rule.weight_spec())


@functools.partial(jax.jit, static_argnums=1)
def _quantize_weight_t(w: jax.Array, spec: QuantSpec) -> QArray:
    # One compiled program per (shape, spec) instead of dozens of eagerly dispatched ops.
    return quantize(w.T, spec)


EMBED_SPEC = QuantSpec.per_row(8)


def quantize_embedding(table: jax.Array, spec: QuantSpec = EMBED_SPEC) -> QArray:
    """nn.Embed table (V, D) float -> QArray (V, D), not transposed: it already is the tied head's (N, K).

    Default INT8, one symmetric scale per row, scale (V, 1) f32: per token for the lookup, and per output
    channel for the tied head ``x @ table.T``. A rule's ``weight_spec()`` may ask for INT4 / K-groups.
    """
    return _quantize_embedding(jnp.asarray(table), spec)


@functools.partial(jax.jit, static_argnums=1)
def _quantize_embedding(table: jax.Array, spec: QuantSpec) -> QArray:
    return quantize(table, spec)


def quantize_params(
    params: Mapping[str, Any], rules: list[QuantRule] | tuple[QuantRule, ...], *, fold_norms: bool = True
) -> QuantizedParams:
    """Quantizes every Dense kernel matched by ``rules`` (first match wins) to a QArray (INT4 packed).

    params: a Flax params tree (the ``"params"`` collection, not the variables dict).
    fold_norms: first fold each pre-norm branch's LayerNorm / RMSNorm affine into the Dense layers reading
      it (:mod:`jq8.ptq.norm_fold`; exact in float) where all of them take token-wise INT8 activations, so the
      fused W8A8 path's LayerNorm-quantize runs without gamma / beta. False quantizes the params as given
      (needed for a model whose ``norm`` / ``fc1`` / ``qkv`` modules are not jq8.training.nn's pre-norm branches).
    """
    if "params" in params and isinstance(params["params"], Mapping) and len(params) == 1:
        raise ValueError("pass the 'params' collection (variables['params']), not the whole variables dict")
    rules = tuple(rules)
    assignment = assign_rules(dense_paths(params), rules)
    folded: tuple[str, ...] = ()
    if fold_norms:
        params, folded = fold_norm_affines(params, rules, assignment)
    tables = assign_rules(embedding_paths(params), rules, kind="embedding")
    weights: dict[str, QArray] = {}
    embeddings: dict[str, QArray] = {}
    rest: dict = dict(params)
    for path, i in assignment.items():
        weights[path] = quantize_weight(get_path(params, path)["kernel"], rules[i])
        rest = map_path(rest, path, lambda node: {k: v for k, v in node.items() if k != "kernel"})
    for path, i in tables.items():
        embeddings[path] = quantize_embedding(get_path(params, path)["embedding"], rules[i].weight_spec())
        rest = map_path(rest, path, lambda node: {k: v for k, v in node.items() if k != "embedding"})
    return QuantizedParams(
        rest, weights, {}, rules, tuple({**assignment, **tables}.items()), embeddings, folded
    )


def fold_norm_affines(
    params: Mapping[str, Any],
    rules: list[QuantRule] | tuple[QuantRule, ...],
    assignment: Mapping[str, int] | None = None,
) -> tuple[dict, tuple[str, ...]]:
    """(params with norm affines folded, the folded branch paths): every pre-norm branch
    (:func:`jq8.ptq.norm_fold.foldable_branches`) whose norm-reading Dense layers all take token-wise INT8
    activations under ``rules``. The float model computes the same function with the returned params.
    assignment: ``assign_rules(dense_paths(params), rules)`` when the caller has it already."""
    if assignment is None:
        assignment = assign_rules(dense_paths(params), tuple(rules))
    folded = []
    for path, names in foldable_branches(params).items():
        idx = [assignment.get(f"{path}/{n}") for n in names]
        if all(i is not None and rules[i].act_mode == "token" for i in idx):
            params = map_path(params, path, lambda node, names=names: fold_branch(node, names))
            folded.append(path)
    return dict(params), tuple(folded)


def restore_kernels(qp: QuantizedParams, dtype=jnp.float32) -> dict:
    """The float params tree with each quantized kernel (K, N) and embedding table (V, D) replaced by its
    dequantized value."""
    tree = qp.params
    for path, q in qp.weights.items():
        kern = q.dequantize(jnp.float32).T.astype(dtype)
        tree = map_path(tree, path, lambda node, kern=kern: {**node, "kernel": kern})
    for path, q in qp.embeddings.items():
        table = q.dequantize(jnp.float32).astype(dtype)
        tree = map_path(tree, path, lambda node, table=table: {**node, "embedding": table})
    return tree


def _nbytes(x: Any) -> int:
    return int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize


def bits_report(qp: QuantizedParams, float_dtype: str | None = None) -> dict[str, Any]:
    """Per quantized layer and in total: bytes of codes + scales vs the fp32 / fp16 model.

    float_dtype: count the unquantized params (norms, biases, float embeddings) at this dtype (how they
    are stored, e.g. "float16"); None = their dtype in ``qp``.
    Returns {"layers": [{path, shape, rule, bytes, fp16_bytes, bits_per_weight}], "quantized_bytes",
    "float_bytes", "total_bytes", "fp32_total_bytes", "fp16_total_bytes", "compression_vs_fp16",
    "compression_vs_fp32"}.
    """
    layers = []
    qbytes = 0
    n_qweights = 0
    # Dense shapes are reported as the Flax kernel's (K, N); embedding tables as (V, D).
    tables = {path: (q, q.shape) for path, q in qp.embeddings.items()}
    for path, (q, shape) in {**{p: (q, q.shape[::-1]) for p, q in qp.weights.items()}, **tables}.items():
        n, k = q.shape
        rule = qp.rule_for(path)
        b = q.nbytes
        qbytes += b
        n_qweights += n * k
        layers.append(
            dict(
                path=path,
                shape=tuple(shape),
                rule=rule.describe() if rule else "?",
                bytes=b,
                fp16_bytes=2 * n * k,
                bits_per_weight=round(8 * b / (n * k), 3),
            )
        )
    leaves = jax.tree_util.tree_leaves(qp.params) + jax.tree_util.tree_leaves(qp.act_scales)
    if float_dtype is None:
        float_bytes = sum(_nbytes(x) for x in leaves)
    else:
        size = np.dtype(jnp.dtype(float_dtype)).itemsize
        float_bytes = sum(
            int(np.prod(np.shape(x))) * (size if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype.itemsize)
            for x in jax.tree_util.tree_leaves(qp.params)
        ) + sum(_nbytes(x) for x in jax.tree_util.tree_leaves(qp.act_scales))
    n_float = sum(int(np.prod(np.shape(x))) for x in leaves)
    total = qbytes + float_bytes
    fp32 = 4 * (n_qweights + n_float)
    fp16 = 2 * (n_qweights + n_float)
    return dict(
        layers=layers,
        quantized_bytes=qbytes,
        float_bytes=float_bytes,
        total_bytes=total,
        fp32_total_bytes=fp32,
        fp16_total_bytes=fp16,
        compression_vs_fp16=round(fp16 / total, 3),
        compression_vs_fp32=round(fp32 / total, 3),
    )


def format_bits_report(rep: dict[str, Any]) -> str:
    lines = [f"{'layer':40s} {'KxN / VxD':>12s} {'bits/w':>7s}  rule"]
    for lay in rep["layers"]:
        k, n = lay["shape"]
        lines.append(f"{lay['path']:40s} {f'{k}x{n}':>12s} {lay['bits_per_weight']:7.2f}  {lay['rule']}")
    lines.append(
        f"total {rep['total_bytes'] / 1e6:.3f} MB (quantized {rep['quantized_bytes'] / 1e6:.3f} MB + float "
        f"{rep['float_bytes'] / 1e6:.3f} MB); fp16 model {rep['fp16_total_bytes'] / 1e6:.3f} MB "
        f"({rep['compression_vs_fp16']}x), fp32 {rep['fp32_total_bytes'] / 1e6:.3f} MB"
    )
    return "\n".join(lines)
