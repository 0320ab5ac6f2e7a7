"""ZeroQuant LKD: layer-by-layer knowledge distillation of a quantized model, one block at a time.

For each transformer block k (in order):
  * the *teacher* is the float block k; the *student* is block k with its Dense layers quantized by the
    rules (weights and token-wise activations fake-quantized with a straight-through estimator, so the
    gradient reaches the float weights, which are re-quantized at the end);
  * the student gets an input X_k and is trained to reproduce the teacher's output on it (MSE), with a
    fresh optax AdamW over block k's parameters only: memory holds one block's optimizer state;
  * ``lkd_input="fp"`` (ZeroQuant): X_k is the float model's input to block k, the target its output;
    ``lkd_input="quantized"`` (GPTQ-style): X_k is the already-distilled quantized model's own output of
    block k-1, and the target is the float block k applied to that same X_k.
No labels are needed; the calibration text should be different from the evaluation text.

``last_block_loss`` (ZeroQuant allows it for the last block): "kl" trains the last block on
KL(softmax(teacher logits) || softmax(student logits)), the logits being the block outputs sent through the
model's own final norm + LM head in full precision (FP params, not trained); "mse+kl" adds the block MSE.
The head is found as the module calls that follow the last block (e.g. ``ln_f`` then ``wte.attend`` or
``lm_head``) and is checked to reproduce the model's output; a model without one (an encoder) is refused.
The head stays FP for teacher *and* student even when the rules quantize the embeddings / LM head
(``kind="embedding"`` rules, the schemes' optional ``lm_head`` rule): LKD trains block weights only, and an
FP head makes the KL measure the blocks' error alone; the INT8 head's own (small, per-channel) error is not
something the block can learn to undo.

Blocks are found generically: the modules whose paths match ``block_pattern`` (default ``h_<i>``,
``blocks_<i>``, ``layer_<i>``) are captured with ``flax.linen.intercept_methods`` during float forward
passes (their inputs, their other call arguments and an unbound clone of the module), so any Flax model
works; ``lkd_input="quantized"`` also needs x_{k+1} = block_k(x_k), which is checked. Build the model
without ``nn.remat`` around its blocks (a lifted block's inputs are internal tracers and cannot be
captured). Blocks of the same structure share one set of compiled functions (one compile for all layers).

``checkpoint_dir=`` saves the progress after each distilled block, atomically, as
``<checkpoint_dir>/block_<i>/`` (an Orbax checkpoint: the block's distilled float params and a JSON item with
its report row, the random key after it and a fingerprint of the run's inputs). A re-run with the same
inputs restores the finished blocks and goes on after the last one, with the same result as an uninterrupted
run: each block starts from scratch (fresh optimizer), so no optimizer state is kept, and under
``lkd_input="quantized"`` the quantized stream is recomputed from the restored blocks (forward passes only).
A directory holding another run's progress (other params, rules, calibration data or config) is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from jq8.ptq.checkpoint import atomic_directory
from jq8.ptq.infer import TOKEN_SPEC
from jq8.ptq.schemes import QuantRule, assign_rules, dense_paths
from jq8.quant import fake_quantize
from jq8.rules import compile_pattern, get_path, module_path, set_path

BLOCK_PATTERN = r"(^|/)(blocks|layer|layers|h)_\d+$"
LAST_BLOCK_LOSSES = ("mse", "kl", "mse+kl")


class ProgressMismatchError(ValueError):
    """An LKD ``checkpoint_dir`` that cannot hold this run's progress (another run's, or a file)."""


@dataclasses.dataclass(frozen=True)
class LKDConfig:
    """Per-block optimisation (ZeroQuant reference: ~100 steps, lr 5e-6..1e-4, batch 32, seq 128)."""

    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 8
    weight_decay: float = 0.0
    lkd_input: Literal["fp", "quantized"] = "fp"
    block_pattern: str = BLOCK_PATTERN
    seed: int = 0
    progress: bool = True
    # Objective of the last block: "mse" (block outputs), "kl" (logits through the FP final norm + LM
    # head) or "mse+kl" (mse + kl_weight * kl). Every other block always uses the MSE.
    last_block_loss: Literal["mse", "kl", "mse+kl"] = "mse"
    kl_weight: float = 1.0


# ------------------------------------------------------------------------------------------ student


def _ste(x: jax.Array, xq: jax.Array) -> jax.Array:
    """Forward xq, backward identity (straight-through estimator)."""
    return x + jax.lax.stop_gradient(xq - x)


def ste_linear(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, rule: QuantRule) -> jax.Array:
    """Fake-quantized Dense for distillation: x (..., K), kernel (K, N) float -> (..., N) f32.

    The same products as the INT8 path (codes x scales), computed in float, with straight-through
    gradients for both the weight and the activation quantizers.
    """
    if rule.act_mode == "static":
        raise ValueError(
            "LKD does not distill the static-activation baseline; use act_mode 'token' or 'none'"
        )
    wq = fake_quantize(kernel.astype(jnp.float32).T, rule.weight_spec()).T
    w = _ste(kernel.astype(jnp.float32), wq)
    x = x.astype(jnp.float32)
    if rule.act_mode == "token":
        x = _ste(x, fake_quantize(x.reshape(-1, x.shape[-1]), TOKEN_SPEC).reshape(x.shape))
    y = x @ w
    return y if bias is None else y + bias.astype(jnp.float32)


def ste_interceptor(rules_by_path: Mapping[str, QuantRule]) -> Callable:
    """Interceptor running each Dense whose module path has a rule as :func:`ste_linear`."""

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        rule = rules_by_path.get(_path(context.module))
        if rule is None:
            return next_fun(*args, **kwargs)
        p = context.module.variables["params"]
        return ste_linear(args[0], p["kernel"], p.get("bias"), rule).astype(args[0].dtype)

    return interceptor


# ---------------------------------------------------------------------------------- block capture


def _path(module: nn.Module) -> str:
    return module_path(module.path)


@dataclasses.dataclass
class _Block:
    path: str
    module: nn.Module  # unbound clone of the block
    template: tuple  # (treedef, leaves) of the call's (args[1:], kwargs); array leaves are None
    inputs: list = dataclasses.field(default_factory=list)  # per chunk: the block input, e.g. (B, T, D)
    arrays: list = dataclasses.field(default_factory=list)  # per chunk: the array call arguments (masks...)


def _as_args(chunk: Any) -> tuple:
    """A calibration chunk is one model input (tokens) or a tuple of positional inputs (ids, mask, ...)."""
    return chunk if isinstance(chunk, tuple) else (chunk,)


def _rebuild(template: tuple, arrays: list) -> tuple[tuple, dict]:
    treedef, leaves = template
    it = iter(arrays)
    return jax.tree_util.tree_unflatten(treedef, [next(it) if v is None else v for v in leaves])


def _capture_modules(
    model: nn.Module,
    params: Mapping[str, Any],
    example: Any,
    block_pattern: str,
    apply_kwargs: Mapping[str, Any],
) -> list[_Block]:
    """Block modules (unbound clones) and the static structure of their calls, in call order."""
    pattern = compile_pattern(block_pattern, "LKD block")
    blocks: dict[str, _Block] = {}

    def interceptor(next_fun, args, kwargs, context):
        path = _path(context.module)
        if context.method_name == "__call__" and path and pattern.search(path) and path not in blocks:
            leaves, treedef = jax.tree_util.tree_flatten((tuple(args[1:]), dict(kwargs)))
            leaves = tuple(None if isinstance(v, jax.Array) else v for v in leaves)
            blocks[path] = _Block(path, context.module.clone(parent=None), (treedef, leaves))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda p, b: model.apply({"params": p}, *_as_args(b), **apply_kwargs), params, example)
    if not blocks:
        raise ValueError(f"LKD found no block module matching {block_pattern!r}; pass block_pattern=")
    return list(blocks.values())


def block_paths(
    model: nn.Module,
    params: Mapping[str, Any],
    example: Any,
    block_pattern: str = BLOCK_PATTERN,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> list[str]:
    """The block module paths LKD would distill, in call order."""
    return [b.path for b in _capture_modules(model, params, example, block_pattern, dict(apply_kwargs or {}))]


def capture_blocks(
    model: nn.Module,
    params: Mapping[str, Any],
    chunks: list[Any],
    block_pattern: str,
    apply_kwargs: Mapping[str, Any],
) -> list[_Block]:
    """Runs the float model on each chunk, recording every block's input and array call arguments."""
    blocks = _capture_modules(model, params, chunks[0], block_pattern, apply_kwargs)
    by_path = {b.path: b for b in blocks}

    @jax.jit
    def run(p, b):
        found: dict[str, Any] = {}

        def interceptor(next_fun, args, kwargs, context):
            path = _path(context.module)
            if context.method_name == "__call__" and path in by_path:
                leaves = jax.tree_util.tree_leaves((tuple(args[1:]), dict(kwargs)))
                found[path] = (args[0], [v for v in leaves if isinstance(v, jax.Array)])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            model.apply({"params": p}, *_as_args(b), **apply_kwargs)
        return found

    for chunk in chunks:
        for path, (x, arrays) in run(params, chunk).items():
            by_path[path].inputs.append(x)
            by_path[path].arrays.append(arrays)
    return blocks


# ------------------------------------------------------------------------------------ LM head (KL)


@dataclasses.dataclass(frozen=True)
class _HeadCall:
    """One module call between the last block and the model's output (final norm, LM head)."""

    path: str
    module: nn.Module  # unbound clone
    method: str  # "__call__", or e.g. "attend" for a tied embedding
    template: tuple  # (treedef, leaves) of the call's (args[1:], kwargs); no array leaves


def capture_head(
    model: nn.Module,
    params: Mapping[str, Any],
    example: Any,
    last_block: str,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> tuple[_HeadCall, ...]:
    """The outermost module calls made after block ``last_block`` returns, in call order.

    For models.gpt: (ln_f.__call__, wte.attend); models.llama: (ln_f.__call__, lm_head.__call__); an
    encoder that returns its last block's output (models.bert) gives (). Raises if one of them takes array
    arguments besides its input (masks...), which the KL head does not carry.
    """
    state = {"after": False, "active": 0}
    calls: list[tuple[_HeadCall, bool]] = []

    def interceptor(next_fun, args, kwargs, context):
        path = _path(context.module)
        if path == last_block and context.method_name == "__call__":
            out = next_fun(*args, **kwargs)
            state["after"] = True
            calls.clear()
            return out
        if not state["after"] or state["active"] or not path:
            return next_fun(*args, **kwargs)
        leaves, treedef = jax.tree_util.tree_flatten((tuple(args[1:]), dict(kwargs)))
        has_arrays = any(isinstance(v, jax.Array) for v in leaves)
        clone = context.module.clone(parent=None)
        calls.append((_HeadCall(path, clone, context.method_name, (treedef, tuple(leaves))), has_arrays))
        state["active"] += 1
        try:
            return next_fun(*args, **kwargs)
        finally:
            state["active"] -= 1

    with nn.intercept_methods(interceptor):
        jax.eval_shape(
            lambda p, b: model.apply({"params": p}, *_as_args(b), **dict(apply_kwargs or {})), params, example
        )
    bad = [c.path for c, has_arrays in calls if has_arrays]
    if bad:
        raise ValueError(
            f"the KL loss cannot run the model's head: the calls after {last_block!r} to {bad} take array "
            "arguments besides their input; use last_block_loss='mse'"
        )
    return tuple(c for c, _ in calls)


def _head_params(fp_params: Mapping[str, Any], head: tuple[_HeadCall, ...]) -> tuple:
    """The FP params of each head call (an empty dict for a parameter-free module)."""
    out = []
    for c in head:
        try:
            out.append(get_path(fp_params, c.path))
        except KeyError:
            out.append({})
    return tuple(out)


def head_logits(head: tuple[_HeadCall, ...], head_params: tuple, x: jax.Array) -> jax.Array:
    """The head calls applied in order: last block output x (B, T, d) -> logits (B, T, vocab) f32."""
    for c, hp in zip(head, head_params):
        args, kwargs = _rebuild(c.template, [])
        x = c.module.apply({"params": hp}, x, *args, method=c.method, **kwargs)
    return x.astype(jnp.float32)


def kl_divergence(teacher_logits: jax.Array, student_logits: jax.Array) -> jax.Array:
    """KL(softmax(teacher) || softmax(student)) over the last axis, mean over the others -> f32 scalar.

    Exactly 0 for identical logits (the log-probabilities cancel term by term).
    """
    lt = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    ls = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1))


def _check_head(
    model: nn.Module,
    fp_params: Mapping[str, Any],
    chunk: Any,
    last: _Block,
    head: tuple[_HeadCall, ...],
    apply_kwargs: Mapping[str, Any],
) -> None:
    """The KL loss needs logits: the head must exist and map the last block's output to the model's."""
    if not head:
        raise ValueError(
            "the KL loss of last_block_loss 'kl'/'mse+kl' needs an LM head, but the model returns its last "
            f"block {last.path!r}'s output directly (an encoder such as BERT/MiniLM has no LM head); "
            "use last_block_loss='mse'"
        )
    args, kwargs = _rebuild(last.template, last.arrays[0])
    y = last.module.apply({"params": get_path(fp_params, last.path)}, last.inputs[0], *args, **kwargs)
    logits = head_logits(head, _head_params(fp_params, head), y)
    ref = model.apply({"params": fp_params}, *_as_args(chunk), **apply_kwargs)
    names = [f"{c.path}.{c.method}" for c in head]
    ok = isinstance(ref, jax.Array) and ref.shape == logits.shape
    err = float(jnp.max(jnp.abs(ref.astype(jnp.float32) - logits))) if ok else float("inf")
    if not err <= 1e-3 * (float(jnp.max(jnp.abs(logits))) + 1e-6):
        raise ValueError(
            f"the KL loss of last_block_loss 'kl'/'mse+kl' needs an LM head, but the calls after block "
            f"{last.path!r} ({names}) do not reproduce the model's output (max abs difference {err:.3g}); "
            "use last_block_loss='mse'"
        )


# ------------------------------------------------------------------------------- compiled functions


@dataclasses.dataclass
class _BlockFns:
    teacher: Callable  # (p, x, arrays) -> y
    student: Callable  # (p, x, arrays) -> y
    loss: Callable  # (p, x, arrays, y, head_params) -> objective (mse, kl or mse + w * kl)
    step: Callable  # (p, opt_state, xs, arrays, ys, idx, head_params) -> (p, opt_state, loss)


def _block_fns(
    blk: _Block,
    rel_rules: Mapping[str, QuantRule],
    opt: optax.GradientTransformation,
    per_sample: tuple[bool, ...],
    objective: str = "mse",
    head: tuple[_HeadCall, ...] = (),
    kl_weight: float = 1.0,
) -> _BlockFns:
    """Jitted teacher / student / loss / AdamW step of one block. ``y`` is the teacher block's output;
    for the KL objectives the teacher logits are recomputed from it each step (storing (N, T, vocab) f32
    logits for the whole calibration set would not fit), through the FP ``head`` with ``head_params``."""
    mod, template = blk.module, blk.template

    def teacher(p, x, arrays):
        args, kwargs = _rebuild(template, arrays)
        return mod.apply({"params": p}, x, *args, **kwargs)

    def student(p, x, arrays):
        args, kwargs = _rebuild(template, arrays)
        with nn.intercept_methods(ste_interceptor(rel_rules)):
            return mod.apply({"params": p}, x, *args, **kwargs)

    def loss(p, x, arrays, y, hp):
        out = student(p, x, arrays).astype(jnp.float32)
        y = y.astype(jnp.float32)
        mse = jnp.mean((out - y) ** 2)
        if objective == "mse":
            return mse
        kl = kl_divergence(jax.lax.stop_gradient(head_logits(head, hp, y)), head_logits(head, hp, out))
        return kl if objective == "kl" else mse + kl_weight * kl

    def step(p, s, xs, arrays, ys, idx, hp):
        arrays = [a[idx] if ps else a for a, ps in zip(arrays, per_sample)]
        val, g = jax.value_and_grad(loss)(p, xs[idx], arrays, ys[idx], hp)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, val

    return _BlockFns(jax.jit(teacher), jax.jit(student), jax.jit(loss), jax.jit(step))


# Compiled per-block functions, shared by blocks of one structure and across distill calls.
_FNS_CACHE: dict[Any, _BlockFns] = {}

# ------------------------------------------------------------------------------------------- LKD


def distill(
    model: nn.Module,
    params: Mapping[str, Any],
    rules: list[QuantRule] | tuple[QuantRule, ...],
    calib_chunks: list[Any],
    config: LKDConfig = LKDConfig(),
    apply_kwargs: Mapping[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
) -> tuple[dict, list[dict]]:
    """Layer-wise KD of every block; returns (distilled float params, per-block report).

    calib_chunks: model inputs forming the calibration set: token arrays (B, T) int32, or tuples of
      positional inputs (e.g. BERT's (ids, mask, types)); all chunks must have the same shapes.
    The returned params are float: quantize them with ``jq8.ptq.quantize_params(params, rules)``.
    A block whose distillation ends with a higher loss than it started keeps its original weights.
    Report rows: {block, objective, loss_before, loss_after, loss_after_raw, seconds}; losses are the
    block's objective averaged over the whole calibration set: the MSE between student and teacher
    outputs, or for the last block with ``config.last_block_loss`` "kl" / "mse+kl" the KL of the logits
    (plus the MSE).
    log: called with one line per block, after that block's progress is saved.
    checkpoint_dir: save progress there after each block and resume from it (module docstring); created if
      missing. :class:`ProgressMismatchError` if it holds the progress of a run with other inputs.
    """
    apply_kwargs = dict(apply_kwargs or {})
    rules = tuple(rules)
    if config.lkd_input not in ("fp", "quantized"):
        raise ValueError(f"lkd_input must be 'fp' or 'quantized', got {config.lkd_input!r}")
    if config.last_block_loss not in LAST_BLOCK_LOSSES:
        raise ValueError(
            f"last_block_loss must be one of {LAST_BLOCK_LOSSES}, got {config.last_block_loss!r}"
        )
    if not calib_chunks:
        raise ValueError("LKD needs calibration data (calib_chunks is empty)")
    # Dense rules only: embedding-table rules (kind="embedding") and a head outside the blocks are
    # quantized afterwards by quantize_params and are not distilled.
    assignment = assign_rules(dense_paths(params), rules)
    blocks = capture_blocks(model, params, list(calib_chunks), config.block_pattern, apply_kwargs)
    fp_params, params = params, dict(params)
    head: tuple[_HeadCall, ...] = ()
    head_params: tuple = ()
    if config.last_block_loss != "mse":  # find + check the head before spending time on any block
        head = capture_head(model, fp_params, calib_chunks[0], blocks[-1].path, apply_kwargs)
        _check_head(model, fp_params, calib_chunks[0], blocks[-1], head, apply_kwargs)
        head_params = _head_params(fp_params, head)
    key = jax.random.PRNGKey(config.seed)
    opt = optax.adamw(config.lr, weight_decay=config.weight_decay)
    resumed: list[tuple[Any, dict, Any]] = []
    fingerprint = ""
    if checkpoint_dir is not None:
        fingerprint = run_fingerprint(fp_params, rules, calib_chunks, config, [b.path for b in blocks], apply_kwargs)
        resumed = _restore_progress(Path(checkpoint_dir).absolute(), blocks, fp_params, fingerprint)
    report: list[dict] = []
    q_stream: list | None = None  # the quantized model's input to the current block
    bar = None
    if config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(blocks), desc="LKD", unit="block")

    def progress(msg: str) -> None:  # one block done (distilled or restored)
        if bar is not None:
            bar.set_postfix_str(msg)
            bar.update(1)
        if log is not None:
            log(msg)

    for bi, blk in enumerate(blocks):
        t0 = time.perf_counter()
        prefix = blk.path + "/"
        rel_rules = {p[len(prefix) :]: rules[i] for p, i in assignment.items() if p.startswith(prefix)}
        n0 = blk.inputs[0].shape[0]
        per_sample = tuple(bool(a.ndim and a.shape[0] == n0) for a in blk.arrays[0])
        is_last = bi == len(blocks) - 1
        objective = config.last_block_loss if is_last else "mse"
        blk_head, hp = (head, head_params) if objective != "mse" else ((), ())
        # Blocks with the same structure (module config, call template, rules) share compiled functions.
        ckey = (
            repr(blk.module.clone(name="block")),
            blk.template,
            tuple(sorted(rel_rules.items())),
            per_sample,
            config.lr,
            config.weight_decay,
            objective,
            config.kl_weight if objective == "mse+kl" else None,
            tuple((c.path, repr(c.module), c.method, c.template) for c in blk_head),
        )
        if ckey not in _FNS_CACHE:
            if len(_FNS_CACHE) >= 8:
                _FNS_CACHE.pop(next(iter(_FNS_CACHE)))
            _FNS_CACHE[ckey] = _block_fns(
                blk, rel_rules, opt, per_sample, objective, blk_head, config.kl_weight
            )
        fns = _FNS_CACHE[ckey]
        p0 = get_path(fp_params, blk.path)
        if config.lkd_input == "quantized" and bi > 0:
            _check_sequential(blocks[bi - 1], blk, get_path(fp_params, blocks[bi - 1].path))
        xs = q_stream if (config.lkd_input == "quantized" and q_stream is not None) else blk.inputs
        if bi < len(resumed):  # finished by an earlier run: its params, report row and the key after it
            p, row, key = resumed[bi]
            params = set_path(params, blk.path, p)
            if config.lkd_input == "quantized":
                q_stream = [fns.student(p, x, a) for x, a in zip(xs, blk.arrays)]
            report.append(row)
            progress(f"{blk.path}: {objective} {row['loss_before']:.4g} -> {row['loss_after']:.4g} (restored)")
            continue
        targets = [fns.teacher(p0, x, a) for x, a in zip(xs, blk.arrays)]

        def full_loss(p, xs=xs, targets=targets, blk=blk, fns=fns, hp=hp):
            return sum(float(fns.loss(p, x, a, y, hp)) for x, a, y in zip(xs, blk.arrays, targets)) / len(xs)

        before = full_loss(p0)
        p = p0
        if config.steps > 0:
            p, key = _train_block(fns, p0, opt, xs, blk.arrays, targets, per_sample, config, key, hp)
        after = full_loss(p)
        if not after <= before:  # never leave a block worse than plain quantization (or NaN)
            p = p0
        params = set_path(params, blk.path, p)
        if config.lkd_input == "quantized":
            q_stream = [fns.student(p, x, a) for x, a in zip(xs, blk.arrays)]
        row = dict(
            block=blk.path,
            objective=objective,
            loss_before=before,
            loss_after=min(before, after),
            loss_after_raw=after,
            seconds=round(time.perf_counter() - t0, 3),
        )
        report.append(row)
        if checkpoint_dir is not None:
            _save_progress(Path(checkpoint_dir).absolute(), bi, blk.path, p, row, key, fingerprint)
        progress(f"{blk.path}: {objective} {before:.4g} -> {row['loss_after']:.4g}")
    if bar is not None:
        bar.close()
    return params, report


def _train_block(fns: _BlockFns, p0, opt, xs, arrays, targets, per_sample, config: LKDConfig, key, hp=()):
    """``config.steps`` AdamW steps on one block's params; minibatches drawn across all chunks."""
    x_all = jnp.concatenate(xs, axis=0)
    y_all = jnp.concatenate(targets, axis=0)
    a_all = [
        jnp.concatenate([a[j] for a in arrays], axis=0) if ps else arrays[0][j]
        for j, ps in enumerate(per_sample)
    ]
    n = x_all.shape[0]
    bs = min(config.batch_size, n)
    p, s = p0, opt.init(p0)
    for _ in range(config.steps):
        key, sub = jax.random.split(key)
        idx = jax.random.choice(sub, n, (bs,), replace=False)
        p, s, _ = fns.step(p, s, x_all, a_all, y_all, idx, hp)
    return p, key


def _check_sequential(prev: _Block, blk: _Block, prev_params: Any) -> None:
    """lkd_input="quantized" feeds block k with block k-1's output: check the float model does the same."""
    args, kwargs = _rebuild(prev.template, prev.arrays[0])
    y = prev.module.apply({"params": prev_params}, prev.inputs[0], *args, **kwargs)
    x = blk.inputs[0]
    err = (
        float(jnp.max(jnp.abs(y.astype(jnp.float32) - x.astype(jnp.float32)))) if y.shape == x.shape else 1.0
    )
    scale = float(jnp.max(jnp.abs(x.astype(jnp.float32)))) + 1e-6
    if y.shape != x.shape or err > 1e-3 * scale:
        raise ValueError(
            f"lkd_input='quantized' needs block {blk.path!r}'s input to equal block {prev.path!r}'s output, "
            f"but they differ (max abs {err:.3g}); use lkd_input='fp'"
        )


# ------------------------------------------------------------------------------------------ resume


@jax.jit
def _checksum(x: jax.Array) -> jax.Array:
    """Two uint32 words of x's bits (a plain and a position-weighted sum, both mod 2**32): any changed
    element or swapped pair changes them."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    b = jax.lax.bitcast_convert_type(x, width).reshape(-1).astype(jnp.uint32)
    i = jnp.arange(b.size, dtype=jnp.uint32)
    return jnp.stack([jnp.sum(b, dtype=jnp.uint32), jnp.sum(b * (2 * i + 1), dtype=jnp.uint32)])


def run_fingerprint(
    params: Any, rules: tuple, calib_chunks: list, config: LKDConfig, blocks: list[str], apply_kwargs: Mapping
) -> str:
    """A hex digest of everything that decides an LKD run's result: the float params and calibration data
    (shapes, dtypes and checksums of their bits), the rules, the config (but ``progress``) and the blocks."""

    def arrays(tree) -> list:
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return [
            [jax.tree_util.keystr(k), list(jnp.shape(v)), str(jnp.asarray(v).dtype), _checksum(jnp.asarray(v)).tolist()]
            if isinstance(v, (jax.Array, np.ndarray))
            else [jax.tree_util.keystr(k), repr(v)]
            for k, v in leaves
        ]

    cfg = {k: v for k, v in dataclasses.asdict(config).items() if k != "progress"}
    blob = {
        "params": arrays(params),
        "calib": arrays(list(calib_chunks)),
        "apply_kwargs": arrays(dict(apply_kwargs)),
        "rules": [r.__dict__ for r in rules],
        "config": cfg,
        "blocks": blocks,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def _block_dir(directory: Path, index: int) -> Path:
    return directory / f"block_{index:04d}"


def _save_progress(directory: Path, index: int, path: str, p: Any, row: dict, key: jax.Array, fingerprint: str):
    """Writes block ``index``'s distilled params and its meta (atomically: a killed run leaves no half block)."""
    meta = {"index": index, "block": path, "row": row, "key": np.asarray(key).tolist(), "fingerprint": fingerprint}
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_directory(_block_dir(directory, index), overwrite=True) as tmp:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            ckptr.save(tmp, args=ocp.args.Composite(params=ocp.args.PyTreeSave(p), meta=ocp.args.JsonSave(meta)))


def _restore_progress(directory: Path, blocks: list[_Block], fp_params: Any, fingerprint: str) -> list[tuple]:
    """(params, report row, key) of the blocks an earlier run with this fingerprint finished, in order."""
    if directory.exists() and not directory.is_dir():
        raise ProgressMismatchError(f"LKD checkpoint_dir {directory} is a file; pass a directory")
    for stale in directory.glob(".block_*.tmp-*"):  # the temporary folder of a save a killed run began
        shutil.rmtree(stale, ignore_errors=True)
    out = []
    for i, blk in enumerate(blocks):
        d = _block_dir(directory, i)
        if not d.is_dir():
            break
        p0 = get_path(fp_params, blk.path)
        target = jax.tree.map(
            lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype),
            jax.tree.map(jnp.asarray, p0),
        )
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            meta = ckptr.restore(d, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            if meta.get("fingerprint") != fingerprint or meta.get("block") != blk.path:
                raise ProgressMismatchError(
                    f"LKD checkpoint_dir {directory} holds the progress of another run (other params, rules, "
                    "calibration data or config); pass another directory, or delete it to start over"
                )
            args = ocp.args.Composite(params=ocp.args.PyTreeRestore(item=p0, restore_args=target))
            p = ckptr.restore(d, args=args)["params"]
        out.append((p, meta["row"], jnp.asarray(np.asarray(meta["key"], np.uint32))))
    return out
