"""The training configuration (a dataclass) and ``--key=value`` command-line overrides.

A config file is a Python module with ``get_config() -> TrainConfig``. Overrides use the field names;
model fields are reached with a ``model.`` prefix: ``--steps=200 --policy=jetfire-int8 --model.num_layers=4``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import types
import typing
from typing import Any

from models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    # precision policy spec (jq8.training.policy.parse_policy): "bf16", "jetfire-int8" (Jetfire, 32x32 blocks),
    # "int8-row" (per-row scales along K: the fast path on Hopper), or NAME:field=value,... e.g.
    # "jetfire-int8:block=64"
    policy: str = "bf16"
    backend: str = "auto"  # INT8 ops: "auto" (Pallas kernels on GPU, jnp references on CPU), "pallas", "xla"
    run_dir: str = "runs/default"  # checkpoints/, metrics.jsonl and config.json go here
    # data
    dataset: str = "wiki"  # jq8.data source: "wiki" (bundled Wikipedia sample), "lee", or a text path
    tokenizer: str = "wiki-8k"  # jq8.data tokenizer: "wiki-8k" (committed BPE), "bytes", or a JSON path
    batch_size: int = 16  # global batch, split over all devices
    seq_len: int = 64  # <= model.max_seq_len
    # optimizer: AdamW on fp32 master weights, linear warm-up then cosine decay to min_lr
    steps: int = 300
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # global-norm clipping; 0 disables
    seed: int = 0
    # logging / evaluation / checkpoints
    log_every: int = 10
    eval_every: int = 100  # 0: only at the end
    eval_batches: int = 8  # 0: no evaluation
    ckpt_every: int = 100  # 0: only at the end, -1: never
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    resume: bool = True  # continue from the latest complete checkpoint in run_dir
    tensorboard: bool = False
    progress: bool = True  # tqdm bar
    # devices
    sharding: str = "fsdp"  # "fsdp" (params split over devices) | "dp" (params replicated)
    fsdp_min_size: int = 2**14  # arrays smaller than this stay replicated
    num_devices: int = 0  # use the first N devices (0: all)
    # how the step splits over devices: "gspmd" (jit shardings; XLA partitions the model), "shard_map" (each
    # device runs the whole step on its tokens), "auto" (shard_map when the INT8 policy runs Pallas kernels)
    data_parallel: str = "auto"
    distributed: bool = False  # call jax.distributed.initialize() first (multi-host)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str) -> TrainConfig:
    """Imports ``path`` (a configs/*.py file) and returns its ``get_config()``."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    spec = importlib.util.spec_from_file_location("_jq8_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "get_config"):
        raise AttributeError(f"{path} must define get_config() -> TrainConfig")
    return mod.get_config()


def valid_keys() -> list[str]:
    """Every overridable key: TrainConfig fields, then ``model.<field>`` for each ModelConfig field."""
    top = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "model"]
    return top + ["model." + f.name for f in dataclasses.fields(ModelConfig)]


# nanoGPT / HF names people type by habit -> ours (only used for the "did you mean" hint).
_ALIASES = {"learning_rate": "lr", "max_iters": "steps", "max_steps": "steps", "n_layer": "model.num_layers",
            "n_head": "model.num_heads", "n_embd": "model.d_model", "block_size": "seq_len",
            "dropout": "model.dropout_rate", "out_dir": "run_dir", "eval_interval": "eval_every"}


def _unknown(key: str) -> ValueError:
    close = [_ALIASES[key]] if key in _ALIASES else difflib.get_close_matches(key, valid_keys(), n=1)
    hint = f" (did you mean --{close[0]}?)" if close else ""
    return ValueError(f"unknown config key {key!r}{hint}; valid keys: {', '.join(valid_keys())}")


def _parse(value: str, typ: Any, key: str) -> Any:
    if isinstance(typ, str):  # postponed annotations
        typ = {"int": int, "float": float, "str": str, "bool": bool}[typ]
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
        raise ValueError(f"--{key}={value!r}: expected a value of type {name}") from None


def apply_overrides(cfg: TrainConfig, args: list[str]) -> TrainConfig:
    """Applies ``--key=value`` strings. Unknown keys raise ValueError listing every valid key."""
    top: dict[str, Any] = {}
    model: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    mfields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            keys = ", ".join(valid_keys())
            raise ValueError(f"override {arg!r} must look like --key=value; valid keys: {keys}")
        key, value = arg[2:].split("=", 1)
        key = key.replace("-", "_")
        if key.startswith("model.") and key[6:] in mfields:
            model[key[6:]] = _parse(value, mfields[key[6:]].type, key)
        elif key in fields and key != "model":
            top[key] = _parse(value, fields[key].type, key)
        else:
            raise _unknown(key)
    if model:
        top["model"] = dataclasses.replace(cfg.model, **model)
    return dataclasses.replace(cfg, **top)


def from_dict(d: dict[str, Any]) -> TrainConfig:
    """Inverse of ``TrainConfig.to_dict`` (e.g. from a checkpoint's meta)."""
    d = dict(d)
    d["model"] = ModelConfig.from_dict(d["model"])
    # Runs written before the policy became one spec string kept its fields apart.
    granularity, block = d.pop("int8_granularity", "block"), d.pop("int8_block", 32)
    if d.get("policy") == "jetfire-int8" and (granularity, block) != ("block", 32):
        d["policy"] = "int8-row" if granularity == "row" else f"jetfire-int8:block={block}"
    if "use_kernels" in d:
        d["backend"] = {"true": "pallas", "false": "xla"}.get(str(d.pop("use_kernels")).lower(), "auto")
    return TrainConfig(**d)
