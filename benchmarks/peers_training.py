"""INT8 training peers at the Jetfire block's shapes, one run: JAX bf16, Qwix, jq8, PyTorch bf16, torchao.

On the GPU machine (jax, flax, torch and triton installed; the wheels of qwix 0.1.8 and torchao 0.18.0, built
for torch 2.11, travel in the git-ignored ``.whl``: the device call names ``.whl`` in ``carry``):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl && export PYTHONPATH=/tmp/site:. || exit; PYTHONUNBUFFERED=1 python3 \
      benchmarks/peers_training.py --deadline-s 450

(hidden 4096 first, then 1024, each ``mlp`` then ``block``; under a 10-minute limit ``--deadline-s`` keeps
the end of the run and its table.) The wheels, where ``.whl`` lacks them (qwix's own needs, flax, numpy,
opt_einsum and absl-py, are on the GPU image; torchao needs nothing beyond torch):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl qwix==0.1.8 torchao==0.18.0

Elsewhere:

    PYTHONPATH=. python3 benchmarks/peers_training.py --tiny          # CPU smoke test (JAX rows; tiny shapes)
    PYTHONPATH=. python3 benchmarks/peers_training.py --tiny --torch-device cpu   # + the PyTorch rows on CPU
    ... --hidden 4096 --parts mlp --rows jax-bf16 qwix-int8 torchao-int8          # one slice

The workload is ``benchmarks/block_step.py``'s (GPT family): ``--parts mlp`` is the MLP residual branch
(LayerNorm -> fc1 (d -> 4d) -> exact GELU -> fc2 (4d -> d) + x), ``--parts block`` adds the pre-norm causal
attention branch before it (LayerNorm -> qkv (d -> 3d) -> softmax attention, d / 64 heads -> out + x);
``--tokens`` tokens in sequences of ``--seq``, fp32 master weights and residual stream, bf16 compute. Every
row starts from the same parameters, input and loss (sum((y - x) * probe)) and takes the gradient of the
loss with respect to all parameters and the input. Rows (``--rows``):

  jax-bf16        plain ``flax.linen`` (nn.LayerNorm, nn.Dense(dtype=bf16), nn.gelu, jax.nn.dot_product_attention,
                  cuDNN flash attention on GPU): the baseline every ``speedup`` divides.
  qwix-int8       the same module under ``qwix.quantize_model(model, qwix.QtProvider([qwix_rule()]))``: Qwix's
                  quantized training on the qkv / out / fc1 / fc2 dots, int8 weights and activations with
                  dynamic absmax scales per channel (Qwix's defaults), int8 gradients in both backward dots
                  (``bwd_qtype``) against the forward's quantized residuals; XLA int8 dots (s8 x s8 -> s32).
  qwix-int8-sr    the same with ``bwd_stochastic_rounding="uniform"`` (stochastic rounding of the gradients,
                  as Jetfire does).
  jq8:SPEC        benchmarks/block_step.py's GPT block (jq8.training.nn modules) under the policy SPEC
                  (``jq8.training.policy.parse_policy``): ``jq8:int8-row``, ``jq8:jetfire-int8``, ``jq8:bf16``.
  torch-bf16      the same block in PyTorch (nn.LayerNorm, nn.Linear, F.gelu, F.scaled_dot_product_attention),
                  fp32 parameters under ``torch.autocast(bf16)``, ``torch.compile``.
  torchao-int8    the PyTorch block after ``torchao.quantize_(model, Int8MixedPrecisionTrainingConfig(
                  module_swap=True))`` (``torchao.prototype.quantized_training``: row-wise dynamic int8 for
                  the output, grad-input and grad-weight matmuls of every nn.Linear on torchao's Triton int8
                  GEMM; why module swap: :func:`torchao_int8`), bf16 autocast, ``torch.compile``.

The PyTorch rows run where torch sees a CUDA device (``--torch-device cpu`` runs them on the CPU: a smoke
test, its times mean nothing); otherwise they are skipped with the reason. A peer that fails to import or
run is a row with its error; the run goes on. Timing as ``block_step.py``: median of ``--iters``
synchronised steps after warm-up, and ``b2b`` per step when ``--iters`` steps are enqueued back to back (JAX:
``block_until_ready``; PyTorch: CUDA events). Memory: XLA's compiled peak, arguments and outputs included
(JAX), or ``torch.cuda.max_memory_allocated`` over the steps, parameters, input and gradients included
(PyTorch). Gradient error: max over parameters and the input of |g - g_bf16| / |g_bf16| against the bf16 row
of the same framework, and against ``jax-bf16`` (also for ``torch-bf16``: a check that both frameworks run
the same block). ``int8 dots``: XLA dot_generals with int8 operands in the JAX step (forward and backward),
``pallas``: Pallas kernel calls in it.

Writes ``--json PATH`` (default ``$OUT/peers_training.json`` when ``OUT`` is set) after every row (atomic
replace), prints a row per line as JSON and a table at the end. ``--deadline-s`` skips, as rows that say so,
what would start after that many seconds, so a run under a time limit still returns its table.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import statistics
import sys
import time
import traceback

# Before jax is imported: JAX preallocates its pool as block_step.py's runs do (same allocator behaviour), but
# less than its default 75% of the GPU, since PyTorch shares the device in this process.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
# The torchao rows use its Python ops and Triton kernel only; its C++ extensions are built for one
# torch / CUDA pair and need not load.
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.block_step import Block, compiled_bytes, time_step  # noqa: E402  (the GPT block block_step.py times)
from jq8.training.policy import parse_policy  # noqa: E402
from train import write_json_atomic  # noqa: E402  (one atomic JSON writer)

DEFAULT_ROWS = ["jax-bf16", "qwix-int8", "jq8:int8-row", "jq8:jetfire-int8", "torch-bf16", "torchao-int8"]
TINY_ROWS = ["jax-bf16", "qwix-int8", "qwix-int8-sr", "jq8:bf16", "jq8:int8-row", "jq8:jetfire-int8",
             "torch-bf16", "torchao-int8"]  # fmt: skip
FIXED_ROWS = ("jax-bf16", "qwix-int8", "qwix-int8-sr", "torch-bf16", "torchao-int8")
QWIX_LAYERS = r".*/(qkv|out|fc1|fc2)"  # Qwix matches rules against "/"-joined linen module paths (fullmatch)
EPS = 1e-5  # LayerNorm epsilon of every row (jq8's and PyTorch's default; flax's is 1e-6)


def qwix_rule(stochastic: bool):
    """The Qwix quantized-training rule of the qwix-int8 rows (fields as ``qwix.QtRule`` documents them)."""
    import qwix

    return qwix.QtRule(
        module_path=QWIX_LAYERS,
        weight_qtype=jnp.int8,  # forward: int8 weights ...
        act_qtype=jnp.int8,  # ... and int8 activations, dynamic absmax scales (Qwix's XLA default)
        bwd_qtype=jnp.int8,  # backward: int8 incoming gradients in the grad-input and grad-weight dots
        bwd_stochastic_rounding="uniform" if stochastic else None,
    )


# ----------------------------------------------------------------------------------------------- JAX


class PlainAttention(nn.Module):
    """Pre-norm causal self-attention branch in plain Flax: x + out(attn(qkv(norm(x)))). x: (B, T, D) fp32.

    qkv is laid out [q | k | v] with heads contiguous, as ``jq8.training.nn.AttentionBlock``, so both read
    one parameter tree.
    """

    heads: int

    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        hd = d // self.heads
        h = nn.LayerNorm(epsilon=EPS, name="norm")(x)
        qkv = nn.Dense(3 * d, dtype=jnp.bfloat16, name="qkv")(h).reshape(b, t, 3 * self.heads, hd)
        q, k, v = jnp.split(qkv, 3, axis=2)
        gpu = jax.default_backend() == "gpu" and hd % 8 == 0 and hd <= 128 and t % 2 == 0
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn" if gpu else None)
        return x + nn.Dense(d, dtype=jnp.bfloat16, name="out")(o.reshape(b, t, d)).astype(jnp.float32)


class PlainMlp(nn.Module):
    """Pre-norm GELU MLP branch in plain Flax: x + fc2(gelu(fc1(norm(x)))). x: (..., D) fp32 -> fp32."""

    hidden: int

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(epsilon=EPS, name="norm")(x)
        h = nn.gelu(nn.Dense(self.hidden, dtype=jnp.bfloat16, name="fc1")(h), approximate=False)
        return x + nn.Dense(x.shape[-1], dtype=jnp.bfloat16, name="fc2")(h).astype(jnp.float32)


class PlainBlock(nn.Module):
    part: str

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        if self.part == "block":
            x = PlainAttention(max(1, d // 64), name="attn")(x)
        return PlainMlp(4 * d, name="mlp")(x)


def _subjaxprs(params):
    from jax.extend.core import ClosedJaxpr, Jaxpr

    for v in params.values():
        for item in v if isinstance(v, (tuple, list)) else (v,):
            if isinstance(item, ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, Jaxpr):
                yield item


def count_ops(jaxpr) -> tuple[int, int]:
    """(dot_generals with two int8 operands, pallas_calls) in a jaxpr and every jaxpr nested in it."""
    dots = calls = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general" and all(getattr(v.aval, "dtype", None) == jnp.int8 for v in eqn.invars):
            dots += 1
        calls += name == "pallas_call"
        for sub in _subjaxprs(eqn.params):
            d, c = count_ops(sub)
            dots, calls = dots + d, calls + c
    return dots, calls


def jax_module(row: str, part: str, kernels: bool, hidden: int):
    """(module, rng stream name, description) of a JAX row."""
    if row in ("jax-bf16", "qwix-int8", "qwix-int8-sr"):
        module = PlainBlock(part)
        if row == "jax-bf16":
            return module, None, "flax.linen bf16 compute, fp32 params"
        import qwix

        rule = qwix_rule(stochastic=row.endswith("-sr"))
        return qwix.quantize_model(module, qwix.QtProvider([rule])), "stochastic_rounding", f"qwix {rule!r}"
    policy = parse_policy(row.removeprefix("jq8:"), backend="pallas" if kernels else "xla")
    ops = "Pallas kernels" if kernels else "jnp references"
    return Block(policy, max(1, hidden // 64), part), "quant", f"jq8 policy {row.removeprefix('jq8:')} ({ops})"


def time_jax(row: str, part: str, params, x, probe, iters: int, kernels: bool):
    module, stream, desc = jax_module(row, part, kernels, x.shape[-1])

    def loss(params, x, key):
        rngs = {stream: key} if stream else {}
        y = module.apply({"params": params}, x, rngs=rngs)
        return jnp.sum((y - x) * probe)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    key = jax.random.PRNGKey(3)
    dots, calls = count_ops(jax.make_jaxpr(step)(params, x, key).jaxpr)
    compiled, out, compile_s, times, rounds = time_step(step, params, x, key, iters)
    loss_value, (g_params, g_x) = out
    grads = {jax.tree_util.keystr(p): np.asarray(g, np.float32)
             for p, g in jax.tree_util.tree_leaves_with_path(g_params)}  # fmt: skip
    grads["x"] = np.asarray(g_x, np.float32)
    row_out = dict(framework="jax", impl=desc, median_ms=statistics.median(times), min_ms=min(times),
                   back_to_back_ms=statistics.median(rounds), compile_s=compile_s,
                   memory_bytes=compiled_bytes(compiled), memory_kind="xla compiled peak",
                   int8_dots=dots, pallas_calls=calls)  # fmt: skip
    return float(loss_value), grads, row_out


# ------------------------------------------------------------------------------------------- PyTorch


def torch_unavailable(device: str) -> str | None:
    """Why the PyTorch rows cannot run on ``device`` ("auto" | "cuda" | "cpu"), or None."""
    try:
        import torch
    except Exception as e:  # not installed, or broken
        return f"torch does not import ({type(e).__name__}: {e})"
    if device in ("auto", "cuda") and not torch.cuda.is_available():
        return "torch sees no CUDA device (--torch-device cpu runs the PyTorch rows on the CPU)"
    return None


def torch_block(part: str, params: dict, device):
    """The PyTorch block, its weights copied from the JAX parameter tree (Dense kernel (in, out) = W.T)."""
    import torch
    import torch.nn.functional as F

    class Attention(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.heads = max(1, d // 64)
            self.norm = torch.nn.LayerNorm(d, eps=EPS)
            self.qkv = torch.nn.Linear(d, 3 * d)
            self.out = torch.nn.Linear(d, d)

        def forward(self, x):
            b, t, d = x.shape
            qkv = self.qkv(self.norm(x)).view(b, t, 3 * self.heads, d // self.heads).transpose(1, 2)
            q, k, v = qkv.chunk(3, dim=1)  # (B, H, T, Dh) each: heads [q | k | v] as in the JAX tree
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return x + self.out(o.transpose(1, 2).reshape(b, t, d))

    class Mlp(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.norm = torch.nn.LayerNorm(d, eps=EPS)
            self.fc1 = torch.nn.Linear(d, 4 * d)
            self.fc2 = torch.nn.Linear(4 * d, d)

        def forward(self, x):
            return x + self.fc2(F.gelu(self.fc1(self.norm(x))))

    class Block(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.attn = Attention(d) if part == "block" else None
            self.mlp = Mlp(d)

        def forward(self, x):
            return self.mlp(x if self.attn is None else self.attn(x))

    d = params["mlp"]["norm"]["scale"].shape[0]
    model = Block(d)
    with torch.no_grad():
        for name, sub in params.items():
            for layer, leaves in sub.items():
                mod = getattr(getattr(model, name), layer)
                w = leaves["scale"] if "scale" in leaves else np.asarray(leaves["kernel"]).T
                mod.weight.copy_(torch.from_numpy(np.array(w, np.float32)))
                mod.bias.copy_(torch.from_numpy(np.array(leaves["bias"], np.float32)))
    return model.to(device)


def torch_param_key(name: str) -> str:
    """'mlp.fc1.weight' -> "['mlp']['fc1']['kernel']" (the JAX tree's keystr)."""
    mod, layer, leaf = name.split(".")
    leaf = {"weight": "scale" if layer == "norm" else "kernel"}.get(leaf, leaf)
    return f"['{mod}']['{layer}']['{leaf}']"


@dataclasses.dataclass(frozen=True)
class FrozenInt8Config:
    """The fields torchao's int8 linear autograd function reads from its config, as a frozen dataclass."""

    output: bool
    grad_input: bool
    grad_weight: bool


def torchao_int8(model, config) -> int:
    """Applies torchao's int8 mixed-precision training to every nn.Linear of ``model``; the number swapped.

    ``quantize_(model, config)`` with ``module_swap=True`` (torchao's module-swap form): each nn.Linear
    becomes ``Int8MixedPrecisionTrainingLinear``, whose forward is torchao's int8 autograd function. Why
    not torchao's default tensor-subclass form: in torchao 0.17-0.18 it registers its F.linear override in
    the table ``__torch_dispatch__`` reads while only ``__torch_function__`` sees F.linear, so the model
    runs the float matmuls (and, with the override moved, still does under torch.compile with autocast and
    an input that needs its gradient). Two adjustments keep the module-swap form comparable, neither
    touching torchao's numerics: (1) the subclass form casts the linear's input, weight and bias to the
    autocast dtype (bf16) and the module-swap form does not, so the layers cast first; (2) torch.compile
    breaks the graph at every linear when the function gets torchao's (mutable) config object, so it gets
    the same three flags as a frozen dataclass, which dynamo treats as a constant.
    """
    import torch
    from torchao.prototype.quantized_training import int8_mixed_precision as mp
    from torchao.quantization import quantize_

    flags = FrozenInt8Config(config.output, config.grad_input, config.grad_weight)

    class AutocastInt8Linear(mp.Int8MixedPrecisionTrainingLinear):
        def forward(self, x):
            w, b = self.weight, self.bias
            if torch.is_autocast_enabled(x.device.type):
                dt = torch.get_autocast_dtype(x.device.type)
                x, w, b = x.to(dt), w.to(dt), None if b is None else b.to(dt)
            return mp._Int8MixedPrecisionTrainingLinearFunction.apply(x, w, b, flags)

    quantize_(model, config)
    swapped = [m for m in model.modules() if isinstance(m, mp.Int8MixedPrecisionTrainingLinear)]
    for m in swapped:
        m.__class__ = AutocastInt8Linear
    return len(swapped)


def check_torchao_int8(model) -> None:
    """Raises unless every quantized nn.Linear computes through int8 (output differs from the float matmul)."""
    import torch
    import torch.nn.functional as F

    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for name, m in linears:
            a = torch.randn(8, m.in_features, device=m.weight.device, dtype=m.weight.dtype)
            if torch.equal(m(a), F.linear(a, m.weight, m.bias)):
                raise RuntimeError(f"torchao left {name} on the float matmul (no int8 path taken)")


def time_torch(row: str, part: str, params, x, probe, iters: int, device: str):
    import torch

    dev = torch.device("cuda" if device in ("auto", "cuda") else "cpu")
    cuda = dev.type == "cuda"
    model = torch_block(part, params, dev)
    desc = "torch bf16 autocast, fp32 params, torch.compile"
    if row == "torchao-int8":
        from torchao.prototype.quantized_training import Int8MixedPrecisionTrainingConfig

        # int8 output, grad_input and grad_weight matmuls of every nn.Linear (qkv, out, fc1, fc2)
        config = Int8MixedPrecisionTrainingConfig(module_swap=True)
        swapped = torchao_int8(model, config)
        check_torchao_int8(model)
        desc = (f"torchao {importlib.metadata.version('torchao')} quantize_({config!r}) on {swapped} linears, "
                "bf16 autocast, torch.compile")
    # A fresh compile cache per row: the rows share their forward's code objects, so no row runs on graphs
    # compiled (or guarded) for another.
    torch._dynamo.reset()
    compiled = torch.compile(model)
    xt = torch.from_numpy(np.array(x, np.float32)).to(dev).requires_grad_(True)
    pt = torch.from_numpy(np.array(probe, np.float32)).to(dev)
    names = [n for n, _ in model.named_parameters()]
    leaves = [p for _, p in model.named_parameters()] + [xt]

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            y = compiled(xt)
        loss = ((y.float() - xt) * pt).sum()
        return loss, torch.autograd.grad(loss, leaves)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    loss, grads = step()  # compiles forward and backward
    sync()
    compile_s = time.perf_counter() - t0
    loss = float(loss.detach())
    out = {}
    for name, g in zip(names + ["x"], grads):
        g = g.detach().float().cpu().numpy()
        out["x" if name == "x" else torch_param_key(name)] = g.T if name.endswith("weight") and g.ndim == 2 else g
    del grads  # off the device before the peak is read
    for _ in range(2):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            step()
            times.append((time.perf_counter() - t) * 1e3)
    rounds = []
    for _ in range(3):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                step()
            end.record()
            end.synchronize()
            rounds.append(start.elapsed_time(end) / iters)
        else:
            t = time.perf_counter()
            for _ in range(iters):
                step()
            rounds.append((time.perf_counter() - t) * 1e3 / iters)
    memory = torch.cuda.max_memory_allocated() if cuda else None
    row_out = dict(framework="torch", impl=desc, median_ms=statistics.median(times), min_ms=min(times),
                   back_to_back_ms=statistics.median(rounds), compile_s=compile_s, memory_bytes=memory,
                   memory_kind="torch.cuda.max_memory_allocated over the steps" if cuda else None,
                   device=torch.cuda.get_device_name() if cuda else "cpu")  # fmt: skip
    return loss, out, row_out


# ---------------------------------------------------------------------------------------------- runner


def rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def max_grad_err(grads: dict, want: dict) -> tuple[float, str]:
    if grads.keys() != want.keys():
        raise ValueError(f"gradient trees differ: {sorted(grads)} vs {sorted(want)}")
    errs = {k: rel(grads[k], want[k]) for k in want}
    worst = max(errs, key=errs.get)
    return errs[worst], worst


def versions() -> dict:
    out = {}
    for name in ("jax", "jaxlib", "flax", "qwix", "torch", "triton", "torchao"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def run(hidden: int, tokens: int, seq: int, part: str, rows: list[str], iters: int, kernels: bool,
        torch_device: str, deadline: float | None = None, emit=None) -> list[dict]:
    """Every row of one (hidden, part) case; failures and skips are rows with ``status`` and ``error``."""
    x = jax.random.normal(jax.random.PRNGKey(0), (tokens // seq, seq, hidden), jnp.float32)
    probe = jax.random.normal(jax.random.PRNGKey(1), x.shape, jnp.float32)
    params = jax.jit(PlainBlock(part).init)(jax.random.PRNGKey(2), x)["params"]
    params_np = jax.tree.map(np.asarray, params)
    torch_skip = torch_unavailable(torch_device)
    base: dict[str, tuple[float, dict, dict]] = {}  # framework -> its bf16 row's (loss, grads, row)
    out = []
    for name in rows:
        row = dict(row=name, hidden=hidden, part=part, tokens=tokens, seq=seq, status="ok")
        framework = "torch" if name.startswith("torch") else "jax"
        try:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("skipped: --deadline-s passed before this row started")
            if framework == "torch":
                if torch_skip:
                    raise RuntimeError(f"skipped: {torch_skip}")
                loss, grads, res = time_torch(name, part, params_np, x, probe, iters, torch_device)
            else:
                loss, grads, res = time_jax(name, part, params, x, probe, iters, kernels)
            row.update(res, loss=loss)
            if not math.isfinite(loss) or not all(np.isfinite(g).all() for g in grads.values()):
                row["status"] = "non-finite loss or gradient"
            if name in ("jax-bf16", "torch-bf16"):
                base[framework] = (loss, grads, row)
            for ref_name, ref in (("framework_bf16", base.get(framework)), ("jax_bf16", base.get("jax"))):
                if ref is None or ref[2] is row:
                    continue
                row[f"grad_err_vs_{ref_name}"], row[f"worst_vs_{ref_name}"] = max_grad_err(grads, ref[1])
                row[f"loss_rel_err_vs_{ref_name}"] = abs(loss - ref[0]) / max(abs(ref[0]), 1e-30)
            if (not name.endswith("bf16") and row.get("grad_err_vs_framework_bf16") == 0.0
                    and row.get("loss_rel_err_vs_framework_bf16") == 0.0):  # fmt: skip
                row["status"] = "bitwise equal to the bf16 row: no int8 path taken"
            for ref_name in ("framework", "jax"):
                ref = base.get(framework if ref_name == "framework" else "jax")
                if ref is not None and ref[2] is not row:
                    row[f"speedup_vs_{ref_name}_bf16"] = ref[2]["median_ms"] / row["median_ms"]
                    row[f"b2b_speedup_vs_{ref_name}_bf16"] = ref[2]["back_to_back_ms"] / row["back_to_back_ms"]
                    if ref[2].get("memory_bytes") and row.get("memory_bytes") and ref_name == "framework":
                        row["memory_ratio_vs_framework_bf16"] = ref[2]["memory_bytes"] / row["memory_bytes"]
        except Exception as e:  # a peer that fails is a row, and the run goes on
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            skipped = msg.startswith("skipped:")
            row.update(status="skipped" if skipped else "error",
                       error=msg.removeprefix("skipped: ") if skipped else f"{type(e).__name__}: {msg}")  # fmt: skip
            if not skipped:
                traceback.print_exc(limit=4, file=sys.stderr)
        out.append(row)
        if emit is not None:
            emit(row)
    return out


def print_table(rows: list[dict]) -> None:
    mib = lambda b: f"{b / 2**20:9.1f}" if b else "        -"  # noqa: E731
    num = lambda r, k, w, p: f"{r[k]:{w}.{p}f}" if isinstance(r.get(k), (int, float)) else f"{'-':>{w}}"  # noqa: E731
    print(f"\n{'hidden':>6} {'part':>5} {'row':>18} {'med ms':>9} {'b2b ms':>9} {'x jax':>6} {'b2b x':>6} "
          f"{'x fw':>6} {'mem MiB':>9} {'grad err':>9} {'vs jax':>8} {'i8 dots':>7} {'pallas':>6}  status")
    for r in rows:
        print(f"{r['hidden']:>6} {r['part']:>5} {r['row']:>18} {num(r, 'median_ms', 9, 3)} "
              f"{num(r, 'back_to_back_ms', 9, 3)} {num(r, 'speedup_vs_jax_bf16', 6, 2)} "
              f"{num(r, 'b2b_speedup_vs_jax_bf16', 6, 2)} {num(r, 'speedup_vs_framework_bf16', 6, 2)} "
              f"{mib(r.get('memory_bytes'))} {num(r, 'grad_err_vs_framework_bf16', 9, 4)} "
              f"{num(r, 'grad_err_vs_jax_bf16', 8, 4)} {r.get('int8_dots', '-'):>7} {r.get('pallas_calls', '-'):>6}  "
              f"{r['status']}{': ' + r['error'] if r.get('error') else ''}")
    print("med ms: one synchronised step; b2b ms: per step, steps enqueued back to back. x jax, b2b x: jax-bf16 / "
          "this; x fw: the same framework's bf16 row / this. mem: XLA compiled peak (JAX), allocator peak over "
          "the steps (PyTorch). grad err: max over parameters and input of |g - g_bf16| / |g_bf16|, against the "
          "framework's bf16 row, and against jax-bf16 (vs jax). i8 dots: XLA int8 dot_generals in the step "
          "(forward + backward); pallas: Pallas kernel calls.")


def check_rows(ap: argparse.ArgumentParser, rows: list[str]) -> None:
    for name in rows:
        if name.startswith("jq8:"):
            try:
                parse_policy(name.removeprefix("jq8:"))
            except Exception as e:
                ap.error(f"--rows {name}: {e}")
        elif name not in FIXED_ROWS:
            ap.error(f"--rows: unknown row {name!r}; choose from {', '.join(FIXED_ROWS)} or jq8:POLICY_SPEC")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, nargs="+", default=[4096, 1024], help="model widths d (default 4096 1024)")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--parts", nargs="+", default=["mlp", "block"], choices=["mlp", "block"])
    ap.add_argument("--rows", nargs="+", default=None,
                    help=f"rows to run, in order (default {' '.join(DEFAULT_ROWS)}); also qwix-int8-sr, jq8:SPEC")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--reference", action="store_true", help="jq8 rows through the jnp references, not Pallas")
    ap.add_argument("--torch-device", default="auto", choices=["auto", "cuda", "cpu"],
                    help="auto: the PyTorch rows run where torch sees a CUDA device, else are skipped")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="rows that would start after this many seconds are reported as skipped")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: hidden 64, 96 tokens, 2 iters, all rows")
    ap.add_argument("--json", metavar="PATH",
                    help="write the results as JSON to PATH (default: $OUT/peers_training.json when OUT is set)")
    args = ap.parse_args()
    if args.tiny:
        args.hidden, args.tokens, args.seq, args.iters, args.reference = [64], 96, 48, 2, True
        args.rows = args.rows or list(TINY_ROWS)
    rows = args.rows or list(DEFAULT_ROWS)
    check_rows(ap, rows)
    for label, value in (("--tokens", args.tokens), ("--seq", args.seq), ("--iters", args.iters)):
        if value <= 0:
            ap.error(f"{label} must be positive, got {value}")
    if args.tokens % args.seq:
        ap.error(f"--tokens {args.tokens} is not a multiple of --seq {args.seq}")
    for h in args.hidden:
        if h <= 0 or (h >= 64 and h % 64):
            ap.error(f"--hidden {h}: widths must be positive and, from 64 up, multiples of 64 (heads of 64)")
    path = args.json or (os.path.join(os.environ["OUT"], "peers_training.json") if os.environ.get("OUT") else None)
    if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        ap.error(f"--json {path}: directory {os.path.dirname(os.path.abspath(path))} does not exist")
    deadline = None if args.deadline_s is None else time.monotonic() + args.deadline_s
    kernels = not args.reference
    info = dict(device=jax.devices()[0].device_kind, versions=versions(), jq8_ops="Pallas kernels" if kernels
                else "jnp references", qwix_rule=None, args=vars(args), rows=[])  # fmt: skip
    if any(r.startswith("qwix") for r in rows):
        try:
            info["qwix_rule"] = repr(qwix_rule(stochastic=False))
        except Exception as e:
            info["qwix_rule"] = f"qwix does not import ({type(e).__name__}: {e})"
    print(f"device: {info['device']}; {json.dumps(info['versions'])}; jq8 INT8 ops: {info['jq8_ops']}")

    def emit(row: dict) -> None:
        info["rows"].append(row)
        print(json.dumps(row), flush=True)
        if path:
            write_json_atomic(path, info)

    for hidden in args.hidden:
        for part in args.parts:
            run(hidden, args.tokens, args.seq, part, rows, args.iters, kernels, args.torch_device, deadline, emit)
    print_table(info["rows"])
    if path:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
