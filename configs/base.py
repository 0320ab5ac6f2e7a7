"""The training configuration (a dataclass) and ``--key=value`` command-line overrides.

A config file is a Python module with ``get_config() -> TrainConfig``. Overrides use the field names;
model fields are reached with a ``model.`` prefix: ``--steps=200 --policy=jetfire-int8 --model.num_layers=4``.
Each key's description is its line in the dataclass docstring (:func:`field_docs`), which is also what
``python train.py --help`` prints (:func:`keys_help`). Bad keys or values raise
:class:`jq8.cli.UsageError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import inspect
import os
import re
import types
import typing
from typing import Any

from jq8.cli import UsageError
from models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; ``python train.py --help`` prints these lines.

    model: the model's hyper-parameters (``models.config.ModelConfig``), overridden as ``--model.<key>``.
    policy: precision policy: "bf16", "jetfire-int8", "int8-row", or a spec NAME:field=value such as
      "jetfire-int8:block=64". "jetfire-int8" is Jetfire (32x32 blocks), "int8-row" per-row scales along K
      (the fast path on Hopper); the spec grammar is ``jq8.training.policy.parse_policy``'s, and the GPU
      kernels take blocks of 32 or more.
    backend: where the INT8 ops run: "auto" (Pallas kernels on GPU, jnp references on CPU), "pallas", "xla".
    run_dir: the run's folder: config.json, metrics.jsonl and checkpoints/ go here.
    dataset: training text (a jq8.data source): "wiki" (bundled Wikipedia sample), "lee", or a text path.
    tokenizer: jq8.data tokenizer: "wiki-8k" (committed BPE), "bytes", or a tokenizer JSON path.
    init: start from pretrained weights, "hf:DIR" (Hugging Face checkpoint directory) or "gguf:FILE"
      (llama.cpp GGUF); the model's fields and tokenizer come from it ("": random initial weights).
    batch_size: global batch in sequences, split over all devices (a multiple of the device count).
    seq_len: tokens per training sequence (<= model.max_seq_len).
    steps: optimizer updates of the whole run (AdamW on fp32 master weights).
    lr: peak learning rate, reached after warmup_steps of linear warm-up, then cosine decay to min_lr.
    min_lr: learning rate at the end of the cosine decay.
    warmup_steps: updates of linear learning-rate warm-up from 0.
    weight_decay: AdamW decoupled weight decay, on matrices only.
    beta1: AdamW first-moment decay.
    beta2: AdamW second-moment decay.
    grad_clip: global gradient-norm clipping threshold; 0 disables.
    seed: seed of the initial weights, the data order and the per-step noise.
    log_every: write loss / lr / grad norm / tokens per second to metrics.jsonl every this many steps.
    eval_every: validation loss every this many steps (0: only at the end).
    eval_batches: validation batches per evaluation (0: no evaluation).
    ckpt_every: save a checkpoint every this many steps (0: only at the end, -1: never).
    keep_checkpoints: how many of the most recent checkpoints to keep.
    async_checkpoint: write checkpoints in a background thread while training continues.
    resume: continue from the latest checkpoint in run_dir (false refuses a run_dir that has checkpoints).
    tensorboard: also log to TensorBoard under run_dir/tb (needs the tensorboard extra).
    progress: show a tqdm progress bar.
    sharding: "fsdp" (parameters split over the devices) or "dp" (parameters replicated).
    fsdp_min_size: arrays with fewer elements than this stay replicated under fsdp.
    num_devices: use the first N devices (0: all).
    data_parallel: how a step splits over devices, "auto", "gspmd" or "shard_map". "gspmd": jit shardings
      (XLA partitions the model); "shard_map": each device runs the whole step on its tokens; "auto":
      shard_map when the INT8 policy runs Pallas kernels, which XLA cannot partition, or when a
      grad_reduce key below is set.
    grad_reduce_dtype: the dtype the gradient all-reduce sums in under shard_map, "float32" or "bfloat16"
      (half the bytes; each device's gradient rounded to bf16, the mean cast back to float32).
    grad_reduce_buckets: gradient all-reduces per step under shard_map (0: one psum of the whole tree). N
      packs the gradients into N buckets of whole layers, last layer first, so that each reduction can
      overlap the rest of the backward.
    distributed: call jax.distributed.initialize() first (multi-host runs).
    """

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    policy: str = "bf16"
    backend: str = "auto"
    run_dir: str = "runs/default"
    # data
    dataset: str = "wiki"
    tokenizer: str = "wiki-8k"
    init: str = ""
    batch_size: int = 16
    seq_len: int = 64
    # optimizer
    steps: int = 300
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    # logging / evaluation / checkpoints
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 100
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    resume: bool = True
    tensorboard: bool = False
    progress: bool = True
    # devices
    sharding: str = "fsdp"
    fsdp_min_size: int = 2**14
    num_devices: int = 0
    data_parallel: str = "auto"
    grad_reduce_dtype: str = "float32"
    grad_reduce_buckets: int = 0
    distributed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str) -> TrainConfig:
    """Imports ``path`` (a configs/*.py file) and returns its ``get_config()``."""
    fix = "pass a config file such as --config configs/tiny.py"
    if not os.path.exists(path):
        raise UsageError(f"--config {path}: no such file; {fix}")
    if not os.path.isfile(path) or not path.endswith(".py"):
        raise UsageError(f"--config {path}: not a Python file; {fix}")
    spec = importlib.util.spec_from_file_location("_jq8_config", path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
        cfg = mod.get_config() if hasattr(mod, "get_config") else None
    except Exception as e:  # the user's file: report where it failed, in one line
        raise UsageError(
            f"--config {path} failed to load ({type(e).__name__}: {e}); fix the file or {fix}"
        ) from None
    if not isinstance(cfg, TrainConfig):
        raise UsageError(f"--config {path} must define get_config() returning a TrainConfig; {fix}")
    return cfg


def valid_keys() -> list[str]:
    """Every overridable key: TrainConfig fields, then ``model.<field>`` for each ModelConfig field."""
    top = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "model"]
    return top + ["model." + f.name for f in dataclasses.fields(ModelConfig)]


# nanoGPT / HF names people type by habit -> ours (only used for the "did you mean" hint).
_ALIASES = {"learning_rate": "lr", "max_iters": "steps", "max_steps": "steps", "n_layer": "model.num_layers",
            "n_head": "model.num_heads", "n_embd": "model.d_model", "block_size": "seq_len",
            "dropout": "model.dropout_rate", "out_dir": "run_dir", "eval_interval": "eval_every"}


def _unknown(key: str) -> UsageError:
    close = [_ALIASES[key]] if key in _ALIASES else difflib.get_close_matches(key, valid_keys(), n=1)
    hint = f" (did you mean --{close[0]}?)" if close else ""
    return UsageError(f"unknown config key {key!r}{hint}; valid keys: {', '.join(valid_keys())}")


def _parse(value: str, typ: Any, key: str) -> Any:
    if isinstance(typ, str):  # postponed annotations ("float | None": an optional field takes the type)
        typ = {"int": int, "float": float, "str": str, "bool": bool}[typ.split("|")[0].strip()]
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        typ = next(t for t in typing.get_args(typ) if t is not type(None))
    try:
        if typ is bool:
            low = value.lower()
            if low not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(value)
            return low in ("1", "true", "yes")
        if typ is int:
            return int(float(value)) if "e" in value.lower() else int(value)
        return typ(value)
    except ValueError:
        name = getattr(typ, "__name__", typ)
        valid = " (true/false)" if typ is bool else ""
        raise UsageError(f"--{key}={value!r}: expected a value of type {name}{valid}") from None


def apply_overrides(cfg: TrainConfig, args: list[str]) -> TrainConfig:
    """Applies ``--key=value`` strings. Unknown keys raise UsageError listing every valid key."""
    top: dict[str, Any] = {}
    model: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    mfields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            keys = ", ".join(valid_keys())
            raise UsageError(f"override {arg!r} must look like --key=value; valid keys: {keys}")
        key, value = arg[2:].split("=", 1)
        key = key.replace("-", "_")
        if key.startswith("model.") and key[6:] in mfields:
            model[key[6:]] = _parse(value, mfields[key[6:]].type, key)
        elif key in fields and key != "model":
            top[key] = _parse(value, fields[key].type, key)
        else:
            raise _unknown(key)
    if model:
        try:
            top["model"] = dataclasses.replace(cfg.model, **model)
        except ValueError as e:  # ModelConfig's own checks (family, heads dividing d_model, ...)
            given = " ".join(f"--model.{k}={v}" for k, v in model.items())
            raise UsageError(f"{given}: {e}") from None
    return dataclasses.replace(cfg, **top)


def from_dict(d: dict[str, Any]) -> TrainConfig:
    """Inverse of ``TrainConfig.to_dict`` (e.g. from a checkpoint's meta)."""
    d = dict(d)
    d["model"] = ModelConfig.from_dict(d["model"])
    # Runs written before the policy became one spec string kept its fields apart.
    granularity, block = d.pop("int8_granularity", "block"), d.pop("int8_block", 32)
    if d.get("policy") == "jetfire-int8" and (granularity, block) != ("block", 32):
        d["policy"] = "int8-row" if granularity == "row" else f"jetfire-int8:block={block}"
    elif d.get("policy") == "jetfire-int8":  # runs record the resolved name; a bare one trained 32x32 blocks
        d["policy"] = "jetfire-int8-32x32"
    if "use_kernels" in d:
        d["backend"] = {"true": "pallas", "false": "xla"}.get(str(d.pop("use_kernels")).lower(), "auto")
    return TrainConfig(**d)

_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")  # :func:`x` -> x


def field_docs(cls: type) -> dict[str, str]:
    """{field name: description} from the ``name: text`` entries of a dataclass docstring.

    An entry starts at the docstring's left margin and continues on more-indented lines; ``a / b: text``
    documents several fields. Sphinx roles are reduced to their target.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    docs: dict[str, str] = {}
    current: list[str] = []
    for line in inspect.cleandoc(cls.__doc__ or "").splitlines():
        m = re.match(r"^(\w+(?:\s*/\s*\w+)*):\s+(.*)$", line)
        if m and set(re.split(r"\s*/\s*", m.group(1))) <= names:
            current = re.split(r"\s*/\s*", m.group(1))
            for n in current:
                docs[n] = m.group(2)
        elif current and line.startswith(" "):
            for n in current:
                docs[n] += " " + line.strip()
        else:
            current = []
    return {n: _ROLE.sub(r"\1", " ".join(d.split())) for n, d in docs.items()}


def first_sentence(text: str, limit: int = 110) -> str:
    """The first sentence of ``text`` (up to a period, a space and a capital or a quote), without the period; one
    longer than ``limit`` is cut at its first clause (": ", "; " or " (") that leaves 20 characters."""
    s = re.split(r"\.\s+(?=[A-Z\"])", text.strip(), maxsplit=1)[0].rstrip(".")
    if len(s) > limit:
        cuts = [m.start() for m in re.finditer(r": |; | \(", s) if m.start() >= 20]
        s = s[: cuts[0]] if cuts else s
    return s


def keys_help(cfg: TrainConfig | None = None) -> str:
    """One line per overridable key: ``--key=type``, the value in ``cfg`` (default: TrainConfig()), and the
    first sentence of its docstring entry."""
    cfg = cfg or TrainConfig()
    rows = []
    for prefix, obj, cls in (("", cfg, TrainConfig), ("model.", cfg.model, ModelConfig)):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name == "model" and cls is TrainConfig:
                continue
            typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            typ = typ.replace(" ", "")  # "float | None" -> "float|None": one word per column
            value = getattr(obj, f.name)
            shown = str(value).lower() if isinstance(value, bool) else str(value)
            rows.append((f"--{prefix}{f.name}={typ}", shown, first_sentence(docs.get(f.name, ""))))
    w0 = max(len(r[0]) for r in rows)
    w1 = min(max(len(r[1]) for r in rows), 14)
    return "\n".join(f"  {k:<{w0}}  {v:<{w1}}  {d}".rstrip() for k, v, d in rows)
