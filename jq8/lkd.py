"""ZeroQuant LKD: layer-by-layer knowledge distillation of a quantized model, one block at a time.

For each transformer block k (in order):
  * the *teacher* is the float block k; the *student* is block k with its Dense layers quantized by the
    rules (weights and token-wise activations fake-quantized with a straight-through estimator, so the
    gradient reaches the float weights that are re-quantized at the end);
  * the student gets an input X_k and is trained to reproduce the teacher's output on it, MSE, with a
    fresh optax AdamW over block k's parameters only (so memory holds one block's optimizer state);
  * ``lkd_input="fp"`` (ZeroQuant): X_k is the float model's input to block k and the target its output;
    ``lkd_input="quantized"`` (GPTQ-style): X_k is the already-distilled quantized model's own output of
    block k-1, and the target is the float block k applied to that same X_k.
No labels are needed; the calibration text should be different from the evaluation text.

Blocks are found generically: the modules whose paths match ``block_pattern`` (default ``blocks_<i>`` /
``layer_<i>``) are captured with ``flax.linen.intercept_methods`` during one float forward pass (their
inputs, their other call arguments and an unbound clone of the module), so any Flax model whose blocks
are applied in sequence (x_{k+1} = block_k(x_k)) works; that sequencing is checked.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jq8.ptq import QuantRule, assign_rules, dense_paths, get_path
from jq8.ptq_infer import TOKEN_SPEC
from jq8.quant import fake_quantize

BLOCK_PATTERN = r"(^|/)(blocks|layer|layers|h)_\d+$"


@dataclasses.dataclass(frozen=True)
class LKDConfig:
    """steps/lr/batch_size per block (ZeroQuant reference: ~100 steps, lr 5e-6..1e-4, batch 32)."""

    steps: int = 100
    lr: float = 5e-5
    batch_size: int = 8
    weight_decay: float = 0.0
    lkd_input: Literal["fp", "quantized"] = "fp"
    block_pattern: str = BLOCK_PATTERN
    seed: int = 0
    progress: bool = True


def _ste(x: jax.Array, xq: jax.Array) -> jax.Array:
    """Forward xq, backward identity (straight-through estimator)."""
    return x + jax.lax.stop_gradient(xq - x)


def ste_linear(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, rule: QuantRule,
               static_scale: jax.Array | None = None) -> jax.Array:
    """Fake-quantized Dense for distillation: x (..., K), kernel (K, N) float -> (..., N) f32.

    Numerically the same products as the INT8 path (codes x scales), in float, with straight-through
    gradients for both the weight and the activation quantizers.
    """
    wq = fake_quantize(kernel.astype(jnp.float32).T, rule.weight_spec()).T
    w = _ste(kernel.astype(jnp.float32), wq)
    x = x.astype(jnp.float32)
    if rule.act_mode == "token":
        x2 = x.reshape(-1, x.shape[-1])
        x = _ste(x, fake_quantize(x2, TOKEN_SPEC).reshape(x.shape))
    elif rule.act_mode == "static":
        raise ValueError("LKD does not distill the static-activation baseline; use act_mode 'token' or 'none'")
    y = x @ w
    return y if bias is None else y + bias.astype(jnp.float32)


def ste_interceptor(rules_by_path: Mapping[str, QuantRule], prefix: str = "") -> Callable:
    """Interceptor running each Dense whose (prefixed) path has a rule as :func:`ste_linear`."""

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        rel = "/".join(str(p) for p in context.module.path)
        path = f"{prefix}/{rel}" if prefix and rel else (prefix or rel)
        rule = rules_by_path.get(path)
        if rule is None:
            return next_fun(*args, **kwargs)
        p = context.module.variables["params"]
        y = ste_linear(args[0], p["kernel"], p.get("bias"), rule)
        return y.astype(args[0].dtype)

    return interceptor


# ---------------------------------------------------------------------------------- block capture


@dataclasses.dataclass
class _Block:
    path: str
    module: nn.Module  # unbound clone of the block
    call: tuple  # (treedef, leaves) of the call's (args[1:], kwargs); array leaves are None placeholders
    inputs: list = dataclasses.field(default_factory=list)  # per chunk: the block input (B, T, D)
    extras: list = dataclasses.field(default_factory=list)  # per chunk: (args[1:], kwargs)


def _path(module: nn.Module) -> str:
    return "/".join(str(p) for p in module.path)


def _capture_modules(model: nn.Module, params: Mapping[str, Any], example: Any, block_pattern: str,
                     apply_kwargs: Mapping[str, Any]) -> list[_Block]:
    """Block modules (unbound clones) and the structure of their calls, in call order (abstract trace)."""
    pattern = re.compile(block_pattern)
    blocks: dict[str, _Block] = {}

    def interceptor(next_fun, args, kwargs, context):
        path = _path(context.module)
        if context.method_name == "__call__" and path and pattern.search(path) and path not in blocks:
            leaves, treedef = jax.tree_util.tree_flatten((args[1:], dict(kwargs)))
            leaves = [None if isinstance(v, jax.Array) else v for v in leaves]
            blocks[path] = _Block(path, context.module.clone(parent=None), (treedef, leaves))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda p, b: model.apply({"params": p}, b, **apply_kwargs), params, example)
    if not blocks:
        raise ValueError(f"LKD found no block module matching {block_pattern!r}; pass block_pattern=")
    return list(blocks.values())


def block_paths(model: nn.Module, params: Mapping[str, Any], example: Any, block_pattern: str = BLOCK_PATTERN,
                apply_kwargs: Mapping[str, Any] | None = None) -> list[str]:
    """The block module paths LKD would distill, in call order."""
    return [b.path for b in _capture_modules(model, params, example, block_pattern, dict(apply_kwargs or {}))]


def capture_blocks(model: nn.Module, params: Mapping[str, Any], chunks: list[Any], block_pattern: str,
                   apply_kwargs: Mapping[str, Any]) -> list[_Block]:
    """Runs the float model on each chunk, recording every block's input and other call arguments."""
    blocks = _capture_modules(model, params, chunks[0], block_pattern, apply_kwargs)
    by_path = {b.path: b for b in blocks}

    @jax.jit
    def run(p, b):
        found: dict[str, Any] = {}

        def interceptor(next_fun, args, kwargs, context):
            path = _path(context.module)
            if context.method_name == "__call__" and path in by_path:
                leaves = jax.tree_util.tree_leaves((args[1:], dict(kwargs)))
                found[path] = (args[0], [v for v in leaves if isinstance(v, jax.Array)])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            model.apply({"params": p}, b, **apply_kwargs)
        return found

    for chunk in chunks:
        for path, (x, arrays) in run(params, chunk).items():
            blk = by_path[path]
            treedef, leaves = blk.call
            it = iter(arrays)
            blk.inputs.append(x)
            blk.extras.append(jax.tree_util.tree_unflatten(treedef, [next(it) if v is None else v for v in leaves]))
    return blocks


def _set_path(tree: Mapping[str, Any], path: str, value: Any) -> dict:
    keys = path.split("/")
    new = dict(tree)
    new[keys[0]] = value if len(keys) == 1 else _set_path(tree[keys[0]], "/".join(keys[1:]), value)
    return new


# ------------------------------------------------------------------------------------------- LKD


def distill(
    model: nn.Module,
    params: Mapping[str, Any],
    rules: list[QuantRule] | tuple[QuantRule, ...],
    calib_chunks: list[Any],
    config: LKDConfig = LKDConfig(),
    apply_kwargs: Mapping[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[dict, list[dict]]:
    """Layer-wise KD of every block; returns (distilled float params, per-block report).

    calib_chunks: list of model inputs (e.g. token arrays (B, T) int32), the calibration set.
    The returned params are still float: quantize them with ``jq8.ptq.quantize_params(params, rules)``.
    Report rows: {block, loss_before, loss_after, seconds}; losses are the mean MSE over the whole
    calibration set between student and teacher outputs.
    """
    apply_kwargs = dict(apply_kwargs or {})
    rules = tuple(rules)
    if config.lkd_input not in ("fp", "quantized"):
        raise ValueError(f"lkd_input must be 'fp' or 'quantized', got {config.lkd_input!r}")
    if not calib_chunks:
        raise ValueError("LKD needs calibration data (calib_chunks is empty)")
    assignment = assign_rules(dense_paths(params), rules)
    rules_by_path = {p: rules[i] for p, i in assignment.items()}
    blocks = capture_blocks(model, params, list(calib_chunks), config.block_pattern, apply_kwargs)
    fp_params = params
    params = dict(params)
    key = jax.random.PRNGKey(config.seed)
    report: list[dict] = []
    q_stream = None  # quantized model's input to the current block (lkd_input="quantized")

    bar = None
    if config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(blocks), desc="LKD", unit="block")
    for bi, blk in enumerate(blocks):
        t0 = time.perf_counter()
        mod = blk.module
        teacher_p = get_path(params, blk.path)
        block_rules = {p: r for p, r in rules_by_path.items() if p.startswith(blk.path + "/")}

        def teacher(p, x, extra, mod=mod):
            args, kwargs = extra
            return mod.apply({"params": p}, x, *args, **kwargs)

        def student(p, x, extra, mod=mod, block_rules=block_rules, path=blk.path):
            args, kwargs = extra
            with nn.intercept_methods(ste_interceptor(block_rules, prefix=path)):
                return mod.apply({"params": p}, x, *args, **kwargs)

        if bi > 0 and config.lkd_input == "quantized":
            _check_sequential(blocks[bi - 1], blk, get_path(fp_params, blocks[bi - 1].path))
        xs = blk.inputs if (config.lkd_input == "fp" or q_stream is None) else q_stream
        teacher_j = jax.jit(teacher)
        student_j = jax.jit(student)
        targets = [teacher_j(teacher_p, x, e) for x, e in zip(xs, blk.extras)]

        def full_loss(p, xs=xs, targets=targets, student_j=student_j, blk=blk):
            tot = 0.0
            for x, e, y in zip(xs, blk.extras, targets):
                tot += float(jnp.mean((student_j(p, x, e).astype(jnp.float32) - y.astype(jnp.float32)) ** 2))
            return tot / len(xs)

        before = full_loss(teacher_p)
        opt = optax.adamw(config.lr, weight_decay=config.weight_decay)
        new_p = teacher_p
        if config.steps > 0:
            new_p, key = _train_block(student, teacher_p, opt, xs, blk.extras, targets, config, key)
        after = full_loss(new_p)
        if after > before:  # never make a block worse than plain quantization
            new_p, after_kept = teacher_p, before
        else:
            after_kept = after
        params = _set_path(params, blk.path, new_p)
        if config.lkd_input == "quantized":
            q_stream = [student_j(new_p, x, e) for x, e in zip(xs, blk.extras)]
        row = dict(block=blk.path, loss_before=before, loss_after=after_kept, loss_after_raw=after,
                   seconds=round(time.perf_counter() - t0, 3))
        report.append(row)
        msg = f"{blk.path}: mse {before:.4g} -> {after_kept:.4g}"
        if bar is not None:
            bar.set_postfix_str(msg)
            bar.update(1)
        if log is not None:
            log(msg)
    if bar is not None:
        bar.close()
    return params, report


def _train_block(student, p0, opt, xs, extras, targets, config: LKDConfig, key):
    """AdamW on one block's params against the teacher targets; minibatches sampled across chunks."""
    # Flatten the calibration chunks into one sample axis so minibatches can be any size.
    x_all = jnp.concatenate(xs, axis=0)
    y_all = jnp.concatenate(targets, axis=0)
    n = x_all.shape[0]
    args0, kwargs0 = extras[0]
    per_sample = _per_sample_extras(extras, xs)
    bs = min(config.batch_size, n)

    def loss_fn(p, x, y, ps):
        args = tuple(ps["args"].get(i, a) for i, a in enumerate(args0))
        kwargs = {k: ps["kwargs"].get(k, v) for k, v in kwargs0.items()}
        out = student(p, x, (args, kwargs))
        return jnp.mean((out.astype(jnp.float32) - y.astype(jnp.float32)) ** 2)

    @jax.jit
    def step(p, s, idx):
        ps = jax.tree_util.tree_map(lambda a: a[idx], per_sample)
        loss, g = jax.value_and_grad(loss_fn)(p, x_all[idx], y_all[idx], ps)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss

    p, s = p0, opt.init(p0)
    for _ in range(config.steps):
        key, sub = jax.random.split(key)
        idx = jax.random.choice(sub, n, (bs,), replace=False)
        p, s, _ = step(p, s, idx)
    return p, key


def _per_sample_extras(extras, xs) -> dict:
    """Array call arguments with a per-sample leading axis, concatenated across chunks (e.g. masks)."""
    args0, kwargs0 = extras[0]
    out: dict[str, dict] = {"args": {}, "kwargs": {}}
    for i, a in enumerate(args0):
        if isinstance(a, jax.Array) and a.ndim and a.shape[0] == xs[0].shape[0]:
            out["args"][i] = jnp.concatenate([e[0][i] for e in extras], axis=0)
    for k, v in kwargs0.items():
        if isinstance(v, jax.Array) and v.ndim and v.shape[0] == xs[0].shape[0]:
            out["kwargs"][k] = jnp.concatenate([e[1][k] for e in extras], axis=0)
    return out


def _check_sequential(prev: _Block, blk: _Block, prev_params: Any) -> None:
    """lkd_input="quantized" feeds block k with block k-1's output: check the float model does the same."""
    args, kwargs = prev.extras[0]
    y = prev.module.apply({"params": prev_params}, prev.inputs[0], *args, **kwargs)
    x = blk.inputs[0]
    err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - x.astype(jnp.float32))))
    scale = float(jnp.max(jnp.abs(x.astype(jnp.float32)))) + 1e-6
    if y.shape != x.shape or err > 1e-3 * scale:
        raise ValueError(
            f"lkd_input='quantized' needs block {blk.path!r}'s input to be block {prev.path!r}'s output, but they "
            f"differ (max abs {err:.3g}); use lkd_input='fp'"
        )
