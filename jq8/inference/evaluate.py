"""Evaluation of (quantized) language models: held-out perplexity and text generation.

Both take a ``logits_fn(tokens (B, T) int32) -> logits (B, T, V) float`` so the float model, the INT8
model (``jq8.ptq.infer.apply_quantized``) and a reloaded compact checkpoint are evaluated by one code path.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

LogitsFn = Callable[[jax.Array], jax.Array]


def perplexity(logits_fn: Callable, batches: Iterable[tuple[Any, Any]], params: Any = None) -> dict[str, float]:
    """exp(mean next-token cross-entropy) over ``batches`` of (inputs, targets), each (B, T) int.

    ``logits_fn(inputs)``, or with ``params`` given ``logits_fn(params, inputs)``: pass a real model's weights
    that way, so they reach the jitted step as arguments (captured in the closure they would be constants
    that XLA folds, which takes minutes for a quantized 100M-parameter model).
    Returns {"ppl", "loss", "tokens", "seconds"}; every batch is weighted by its token count.
    """

    @jax.jit
    def batch_nll(params, inputs, targets):
        logits = (logits_fn(inputs) if params is None else logits_fn(params, inputs)).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).sum()

    total, count = 0.0, 0
    t0 = time.perf_counter()
    for inputs, targets in batches:
        total += float(batch_nll(params, jnp.asarray(inputs, jnp.int32), jnp.asarray(targets, jnp.int32)))
        count += int(np.prod(np.shape(targets)))
    if count == 0:
        raise ValueError("perplexity got no evaluation batches")
    loss = total / count
    return {
        "ppl": math.exp(min(loss, 700.0)),
        "loss": loss,
        "tokens": count,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def generate(
    logits_fn: LogitsFn,
    prompt: list[int],
    *,
    max_new_tokens: int,
    window: int,
    top_k: int | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    eot_id: int | None = None,
) -> list[int]:
    """Greedy (``top_k`` None or 1) or top-k sampled continuation of ``prompt`` (token ids).

    The model sees the last ``window`` tokens (its max sequence length), padded on the right to a fixed
    length so every step reuses one compiled program; a causal model ignores the padding. Every step
    re-runs the whole window: for any ``logits_fn`` and for continuations longer than the window. Models
    with a KV cache (GPT, LLaMA) decode far faster with :func:`jq8.inference.decode.generate` (one token per step);
    quantize.py uses it whenever prompt + new tokens fit the window.
    """
    if not prompt:
        raise ValueError("generate needs a non-empty prompt")

    @jax.jit
    def next_logits(buf, pos):
        return logits_fn(buf[None])[0, pos].astype(jnp.float32)

    ids = list(prompt)
    key = jax.random.PRNGKey(seed)
    for _ in range(max_new_tokens):
        ctx = ids[-window:]
        buf = np.zeros((window,), np.int32)
        buf[: len(ctx)] = ctx
        logits = next_logits(jnp.asarray(buf), len(ctx) - 1)
        if top_k is None or top_k <= 1:
            nxt = int(jnp.argmax(logits))
        else:
            key, sub = jax.random.split(key)
            vals, idx = jax.lax.top_k(logits / max(temperature, 1e-6), top_k)
            nxt = int(idx[jax.random.categorical(sub, vals)])
        ids.append(nxt)
        if eot_id is not None and nxt == eot_id:
            break
    return ids[len(prompt) :]


# ------------------------------------------------------------------------------- sentence encoders


def read_sentence_groups(path: str) -> tuple[list[str], np.ndarray]:
    """A paraphrase file (one sentence a line, blank line between groups, '#' comments) ->
    (sentences, group id per sentence (n,) int)."""
    sentences: list[str] = []
    groups: list[int] = []
    gid = 0
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("#"):
                continue
            if not line:
                if groups and groups[-1] == gid:
                    gid += 1
                continue
            sentences.append(line)
            groups.append(gid)
    if not sentences:
        raise ValueError(f"{path} holds no sentences")
    return sentences, np.asarray(groups)


def embedding_agreement(fp: np.ndarray, q: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """How a quantized sentence encoder agrees with the float one. fp, q: (n, H) unit-norm embeddings.

    cos_mean / cos_min: cosine between each sentence's float and quantized embedding;
    nn_agreement: fraction of sentences whose nearest other sentence is the same under both models;
    paraphrase_top1_fp / _q: fraction whose nearest other sentence is a paraphrase (same group).
    """
    fp, q = np.asarray(fp, np.float64), np.asarray(q, np.float64)
    cos = np.sum(fp * q, axis=1) / (np.linalg.norm(fp, axis=1) * np.linalg.norm(q, axis=1))

    def nearest(e):
        s = e @ e.T
        np.fill_diagonal(s, -np.inf)
        return np.argmax(s, axis=1)

    nn_fp, nn_q = nearest(fp), nearest(q)
    return {
        "cos_mean": float(cos.mean()),
        "cos_min": float(cos.min()),
        "nn_agreement": float(np.mean(nn_fp == nn_q)),
        "paraphrase_top1_fp": float(np.mean(groups[nn_fp] == groups)),
        "paraphrase_top1_q": float(np.mean(groups[nn_q] == groups)),
    }
