"""Fold a pre-norm branch's LayerNorm / RMSNorm affine into the Dense layers that read the norm's output.

In jq8.training.nn's branches (``MlpBlock``: norm -> fc1 [and gate]; ``AttentionBlock``: norm -> qkv) the norm's
output feeds only those Dense layers, so

    (n(x) * gamma + beta) @ W + b  ==  n(x) @ (gamma[:, None] * W) + (beta @ W + b)

exactly in real arithmetic. :func:`fold_branch` (through :func:`jq8.ptq.fold_norm_affines`) rewrites the
float params that way (gamma -> ones, beta -> zeros, the consumers' kernels and biases absorbing them), so
every path that runs the float LayerNorm still computes the same function, and the W8A8 prefill's
LayerNorm-quantize kernel may skip the affine for the folded branches (``QuantizedParams.folded_norms``):
0.33-0.49 ms less per GPT-2 1.5B prefill of 8 x 1024 tokens, which runs 96 of them (H100, BENCHMARKS.md).

What changes is what gets quantized: the token-wise activation scale is taken over n(x) instead of
n(x) * gamma + beta, and the weight's per-channel scale over gamma-scaled rows (SmoothQuant's migration with
the norm's own gamma as the smoothing factor). The accuracy effect is measured per scheme in BENCHMARKS.md.

Branches are found by name in the params tree (a ``norm`` beside ``fc1`` / ``gate`` or ``qkv``), which is
jq8.training.nn's layout. A model of its own whose modules use those names with another data flow (the norm's output
also feeding something else, as in a post-norm block) must quantize with ``fold_norms=False``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

# A branch node (a dict of the params tree) with a "norm" child and these Dense children, which are the
# only readers of the norm's output in jq8.training.nn's MlpBlock and AttentionBlock.
NORM_CONSUMERS = (("fc1", "gate"), ("qkv",))


def _consumers(node: Mapping[str, Any]) -> tuple[str, ...]:
    for names in NORM_CONSUMERS:
        present = tuple(n for n in names if isinstance(node.get(n), Mapping) and "kernel" in node[n])
        if present and present[0] == names[0]:
            return present
    return ()


def foldable_branches(params: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """Branch path -> the Dense names reading its norm, for every jq8.training.nn-style pre-norm branch whose norm
    has an affine to fold (a ``scale`` and/or ``bias``) and whose consumers can take it (a norm bias needs
    a bias on every consumer: a bias-less Dense has no slot for beta @ W)."""
    out: dict[str, tuple[str, ...]] = {}

    def walk(node: Mapping[str, Any], prefix: tuple[str, ...]) -> None:
        norm = node.get("norm")
        names = _consumers(node)
        if isinstance(norm, Mapping) and names and ("scale" in norm or "bias" in norm):
            if "bias" not in norm or all("bias" in node[n] for n in names):
                out["/".join(prefix)] = names
        for k, v in node.items():
            if isinstance(v, Mapping):
                walk(v, prefix + (str(k),))

    walk(params, ())
    return out


def fold_branch(node: Mapping[str, Any], names: tuple[str, ...]) -> dict:
    """One branch node with its norm's affine folded into the Dense layers ``names`` (see the module
    docstring). Kernels (K, N) and biases (N,) keep their dtypes; the arithmetic is fp32."""
    norm = dict(node["norm"])
    gamma = norm.get("scale")
    beta = norm.get("bias")
    new = dict(node)
    for name in names:
        dense = dict(node[name])
        w = jnp.asarray(dense["kernel"], jnp.float32)
        if beta is not None:
            b = jnp.asarray(dense["bias"], jnp.float32) + jnp.asarray(beta, jnp.float32) @ w
            dense["bias"] = b.astype(dense["bias"].dtype)
        if gamma is not None:
            dense["kernel"] = (jnp.asarray(gamma, jnp.float32)[:, None] * w).astype(dense["kernel"].dtype)
        new[name] = dense
    if gamma is not None:
        norm["scale"] = jnp.ones_like(gamma)
    if beta is not None:
        norm["bias"] = jnp.zeros_like(beta)
    new["norm"] = norm
    return new
