"""Train a GPT / LLaMA language model with jq8, in bf16 or Jetfire INT8 (``--policy``).

    python train.py --config configs/tiny.py                                   # CPU, about a minute
    python train.py --config configs/tiny.py --policy=jetfire-int8 --run_dir=runs/tiny_int8
    python train.py --config configs/gpt2_124m.py --steps=5000 --model.dropout_rate=0.1
    python train.py plot runs/tiny runs/tiny_int8 --out loss.png               # bf16 vs INT8 curves

    python train.py --help                                                     # every key, its default

Reads top to bottom: config, data, model, optimizer, devices, resume, step functions, loop. A run writes
``<run_dir>/config.json``, ``<run_dir>/metrics.jsonl`` and ``<run_dir>/checkpoints/<step>/`` (see
``jq8.training.checkpoint``); running the same command again resumes from the latest complete checkpoint.
A checkpoint that no longer reads back (a truncated or missing file) is renamed ``<step>.damaged-<n>`` and
the run resumes from the newest one that does; on resume, metrics.jsonl drops the rows of the steps redone.

Everything the run depends on is checked before anything is written: bad input is one ``error:`` line
naming the input and the fix, exit status 2, and no run directory is created. Ctrl-C stops cleanly: the
current step is saved (when its state is intact and finite) and the last checkpoint named, exit status 130.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from configs.base import TrainConfig, apply_overrides, keys_help, load_config
from jq8 import cli, data
from jq8.cli import UsageError
from jq8.ptq import checkpoint as qcheckpoint
from jq8.training import checkpoint, metrics, sharding
from jq8.training.policy import ROLES, Policy, parse_policy, resolve_spec
from models.gpt import lm_loss
from models.presets import build_model

USAGE = """usage: python train.py --config CONFIG.py [--key=value ...]
       python train.py plot RUN_DIR [RUN_DIR ...] [--out loss.png] [--metric loss] [--labels A B ...]
       python train.py [--config CONFIG.py] --help"""

# The GPU kernels' smallest K group (pallas_kernels.int8_matmul_block_scaled.MIN_K_GROUP): block-scaled
# int8 dots need block_k >= 32.
MIN_KERNEL_BLOCK = 32


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


def split_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """(--config path or None, the other arguments)."""
    config_path, rest = None, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise UsageError("--config needs a path, e.g. --config configs/tiny.py")
            config_path, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return config_path, rest


def parse_args(argv: list[str]) -> TrainConfig:
    config_path, overrides = split_args(argv)
    if config_path is None:
        usage = USAGE.splitlines()[0][len("usage: ") :]
        raise UsageError(f"no --config given; {usage} (python train.py --help lists the keys)")
    return apply_overrides(load_config(config_path), overrides)


def help_text(argv: list[str]) -> str:
    """Usage, then every key with its type, value (the --config file's, else the default) and meaning."""
    config_path, _ = split_args([a for a in argv if a not in ("-h", "--help")])
    cfg = load_config(config_path) if config_path else TrainConfig()
    where = f"its value in {config_path}" if config_path else "its default (a --config file sets its own)"
    return (
        f"{USAGE}\n\n{__doc__.splitlines()[0]}\n\nKeys: --key=type, {where}, its meaning. Bools take "
        f"true/false.\n{keys_help(cfg)}"
    )


def ops_backend(cfg: TrainConfig) -> str:
    """--backend resolved: "pallas" (the kernels) or "xla" (their jnp references); auto = pallas on a GPU."""
    if cfg.backend not in ("auto", "pallas", "xla"):
        raise UsageError(f"--backend={cfg.backend!r}: expected auto, pallas or xla")
    return ("pallas" if jax.default_backend() == "gpu" else "xla") if cfg.backend == "auto" else cfg.backend


def make_policy(cfg: TrainConfig) -> Policy:
    return parse_policy(cfg.policy, backend=ops_backend(cfg))


def use_shard_map(cfg: TrainConfig, policy: Policy, mesh: jax.sharding.Mesh) -> bool:
    """Whether the training step runs per device under ``jax.shard_map`` (see ``cfg.data_parallel``); checks
    the data_parallel and grad_reduce keys."""
    mode = cfg.data_parallel.lower()
    if mode not in ("auto", "shard_map", "gspmd"):
        raise UsageError(f"--data_parallel={cfg.data_parallel}: data_parallel must be auto/shard_map/gspmd")
    if cfg.grad_reduce_dtype not in sharding.REDUCE_DTYPES:
        raise UsageError(f"--grad_reduce_dtype={cfg.grad_reduce_dtype}: expected "
                         f"{' or '.join(sharding.REDUCE_DTYPES)}")
    if cfg.grad_reduce_buckets < 0:
        raise UsageError(f"--grad_reduce_buckets={cfg.grad_reduce_buckets}: must be >= 0 (0: one reduction)")
    explicit = cfg.grad_reduce_dtype != "float32" or cfg.grad_reduce_buckets > 0
    if explicit and mode == "gspmd" and mesh.size > 1:  # XLA's partitioner places gspmd's reductions itself
        raise UsageError(f"--grad_reduce_dtype={cfg.grad_reduce_dtype} --grad_reduce_buckets="
                         f"{cfg.grad_reduce_buckets} need --data_parallel=shard_map (or auto), not gspmd")
    if mesh.size == 1:
        return False
    if mode == "auto":  # the INT8 policy's Pallas kernels cannot be partitioned by XLA
        return explicit or (policy.name != "bf16" and policy.backend == "pallas")
    return mode == "shard_map"


def check_ranges(cfg: TrainConfig) -> None:
    """Raises UsageError for a numeric key outside the range it can take."""
    m = cfg.model
    rules = [
        ("steps", cfg.steps, cfg.steps >= 1, ">= 1"),
        ("batch_size", cfg.batch_size, cfg.batch_size >= 1, ">= 1"),
        ("seq_len", cfg.seq_len, cfg.seq_len >= 1, ">= 1"),
        ("lr", cfg.lr, cfg.lr >= 0, ">= 0"),
        ("min_lr", cfg.min_lr, cfg.min_lr >= 0, ">= 0"),
        ("warmup_steps", cfg.warmup_steps, cfg.warmup_steps >= 0, ">= 0"),
        ("weight_decay", cfg.weight_decay, cfg.weight_decay >= 0, ">= 0"),
        ("beta1", cfg.beta1, 0 <= cfg.beta1 < 1, "in [0, 1)"),
        ("beta2", cfg.beta2, 0 <= cfg.beta2 < 1, "in [0, 1)"),
        ("grad_clip", cfg.grad_clip, cfg.grad_clip >= 0, ">= 0 (0 disables clipping)"),
        ("log_every", cfg.log_every, cfg.log_every >= 1, ">= 1"),
        ("eval_every", cfg.eval_every, cfg.eval_every >= 0, ">= 0 (0: only at the end)"),
        ("eval_batches", cfg.eval_batches, cfg.eval_batches >= 0, ">= 0 (0: no evaluation)"),
        ("ckpt_every", cfg.ckpt_every, cfg.ckpt_every >= -1, ">= -1 (0: only at the end, -1: never)"),
        ("keep_checkpoints", cfg.keep_checkpoints, cfg.keep_checkpoints >= 1, ">= 1"),
        ("fsdp_min_size", cfg.fsdp_min_size, cfg.fsdp_min_size >= 0, ">= 0"),
        ("num_devices", cfg.num_devices, cfg.num_devices >= 0, ">= 0 (0: all devices)"),
        ("model.vocab_size", m.vocab_size, m.vocab_size >= 0, ">= 0 (0: from the tokenizer)"),
        ("model.max_seq_len", m.max_seq_len, m.max_seq_len >= 1, ">= 1"),
        ("model.num_layers", m.num_layers, m.num_layers >= 1, ">= 1"),
        ("model.num_heads", m.num_heads, m.num_heads >= 1, ">= 1"),
        ("model.d_model", m.d_model, m.d_model >= 1, ">= 1"),
        ("model.mlp_hidden", m.mlp_hidden, m.mlp_hidden >= 0, ">= 0 (0: the family's default width)"),
        ("model.dropout_rate", m.dropout_rate, 0 <= m.dropout_rate < 1, "in [0, 1)"),
    ]
    for key, value, ok, rule in rules:
        if not ok:  # (NaN fails every comparison, so it lands here too)
            raise UsageError(f"--{key}={value}: must be {rule}")
    if cfg.seq_len > m.max_seq_len:
        raise UsageError(
            f"--seq_len={cfg.seq_len} exceeds --model.max_seq_len={m.max_seq_len}; use --seq_len="
            f"{m.max_seq_len} or raise --model.max_seq_len (a GPT's position table grows with it)"
        )
    if cfg.sharding not in ("fsdp", "dp"):
        raise UsageError(f"--sharding={cfg.sharding}: expected fsdp or dp")


def check_run_dir(cfg: TrainConfig) -> list[int]:
    """Raises UsageError for a run_dir train.py must not write into; returns its checkpoint steps.

    A run_dir is new, empty, or a train.py run (config.json / metrics.jsonl / checkpoints/). A run that has
    checkpoints is only continued: ``resume=false`` there is refused (it would write a second run over it).
    """
    d = cfg.run_dir
    fix = "pass a new or empty directory as --run_dir"
    if not d:
        raise UsageError(f"--run_dir is empty; {fix}")
    above = os.path.abspath(d)
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise UsageError(f"--run_dir={d}: {above} is a file, not a directory; {fix}")
    if not os.access(above, os.W_OK | os.X_OK):
        raise UsageError(f"--run_dir={d}: {above} is not writable; {fix}")
    if above != os.path.abspath(d):
        return []  # does not exist yet: created once everything else checked out
    if any(os.path.exists(os.path.join(d, m)) for m in (qcheckpoint.MANIFEST, qcheckpoint.NPZ_MANIFEST)):
        raise UsageError(f"--run_dir={d} is a quantized checkpoint (quantize.py output), not a run; {fix}")
    entries = set(os.listdir(d))
    if entries and not entries & {"config.json", "metrics.jsonl", "checkpoints"}:
        raise UsageError(
            f"--run_dir={d} holds other files and no train.py run (no config.json, metrics.jsonl or "
            f"checkpoints/); {fix}"
        )
    if "config.json" in entries:
        try:
            with open(os.path.join(d, "config.json")) as f:
                old = json.load(f)
        except (OSError, ValueError) as e:
            old = e
        if not isinstance(old, dict) or "model" not in old:
            raise UsageError(f"--run_dir={d}: its config.json is not a train.py config; {fix}")
    steps = checkpoint.existing_steps(os.path.join(d, "checkpoints"))
    if steps and not cfg.resume:
        raise UsageError(
            f"--resume=false, but --run_dir={d} already holds checkpoints (steps "
            f"{', '.join(map(str, steps))}); pass a new --run_dir to start over, or drop --resume=false to "
            "continue this run"
        )
    return steps


def check_devices(cfg: TrainConfig) -> list:
    """The devices the run uses; UsageError when there are too few or the batch does not split over them."""
    devices = jax.devices()
    if cfg.num_devices > len(devices):
        raise UsageError(
            f"--num_devices={cfg.num_devices}, but only {len(devices)} {jax.default_backend()} device(s) are "
            f"available; use --num_devices={len(devices)} (or 0: all)"
        )
    devices = devices[: cfg.num_devices] if cfg.num_devices else devices
    n = len(devices)
    if cfg.batch_size % n:
        raise UsageError(
            f"--batch_size={cfg.batch_size} is not divisible by the {n} devices the batch is split over; use "
            f"--batch_size={-(-cfg.batch_size // n) * n} (or --num_devices=1)"
        )
    return devices


def check_int8_dims(model_cfg, policy: Policy, given: str) -> None:
    """UsageError when the INT8 blocks do not fit the GPU kernels or the model widths; the hint names a
    --policy (or a --model.d_model) that works. given: the --policy value."""
    if not policy.int8 or policy.granularity != "block":
        return
    kernels = policy.backend == "pallas"
    block = max(b for tile in policy.tiles for b in tile)

    def spec(b: int) -> str:  # every tile scaled to b along its blocked axes (1 x 128 -> 1 x b)
        fields = [f"block={b}"] + [
            f"{r}_block={'x'.join(str(b if d > 1 else 1) for d in getattr(policy, f'{r}_block'))}"
            for r in ROLES if getattr(policy, f"{r}_block") is not None
        ]  # fmt: skip
        return f"--policy={policy.name}:{','.join(fields)}"

    if kernels and min(tile[1] for tile in policy.tiles) < MIN_KERNEL_BLOCK:
        raise UsageError(
            f"--policy={given}: the INT8 GPU kernels need blocks at least {MIN_KERNEL_BLOCK} wide along K; use "
            f"{spec(MIN_KERNEL_BLOCK)} (or --backend=xla to run the jnp references)"
        )
    widths = {"model.d_model": model_cfg.d_model, "model.mlp_hidden": model_cfg.hidden}
    bad = [(k, n) for k, n in widths.items() if n % block]
    if not bad:
        return
    key, n = bad[0]
    lo = MIN_KERNEL_BLOCK if kernels else 2
    fits = [b for b in (128, 64, 32, 16, 8, 4, 2) if b >= lo and all(w % b == 0 for w in widths.values())]
    fits = [b for b in fits if b < block] or fits
    if fits:
        hint = f"use {spec(fits[0])}, or --policy=int8-row (per-row scales)"
    else:
        step = math.lcm(block, model_cfg.num_heads * (2 if model_cfg.family == "llama" else 1))
        d = -(-model_cfg.d_model // step) * step
        hint = f"use --model.d_model={d}" + (" and --model.mlp_hidden=0" if model_cfg.mlp_hidden else "")
        hint += ", or --policy=int8-row (per-row scales)"
    what = f"{n} (the MLP width)" if key == "model.mlp_hidden" and not model_cfg.mlp_hidden else n
    raise UsageError(f"--{key}={what} is not a multiple of the INT8 block {block} of --policy={given}; {hint}")


def load_data(cfg: TrainConfig, tokenizer: Any = None) -> data.TokenDataset:
    """The tokenized corpus; UsageError naming --dataset / --tokenizer if it is unreadable or too short.

    tokenizer: a tokenizer object to use instead of ``cfg.tokenizer`` (the --init checkpoint's own)."""
    try:
        ds = data.prepare(cfg.dataset, cfg.tokenizer if tokenizer is None else tokenizer)
    except (OSError, ValueError, UnicodeError) as e:
        raise UsageError(f"--dataset={cfg.dataset} --tokenizer={cfg.tokenizer}: {e}") from None
    for split, needed in (("train", True), ("val", cfg.eval_batches > 0)):
        if needed and ds.num_windows(split, cfg.seq_len) < 1:
            n = len(ds.tokens(split))
            extra = "" if split == "train" else " or --eval_batches=0"
            raise UsageError(
                f"the {split} split of --dataset={cfg.dataset} has {n} tokens, fewer than --seq_len="
                f"{cfg.seq_len} + 1; use a shorter --seq_len, a larger --dataset{extra}"
            )
    return ds


# The model fields a pretrained checkpoint (--init) fixes; dropout_rate, remat and attention stay the run's.
CHECKPOINT_MODEL_FIELDS = ("family", "vocab_size", "max_seq_len", "num_layers", "num_heads", "d_model", "mlp_hidden",
                           "num_kv_heads", "rope_theta", "norm_eps", "qkv_bias", "tie_embeddings", "activation")


def load_init(cfg: TrainConfig, argv: list[str]) -> tuple[TrainConfig, Any, Any]:
    """--init=hf:DIR|gguf:FILE: (cfg with the checkpoint's model fields and tokenizer, float32 params, tokenizer).

    A --model.<field> given on the command line that disagrees with the checkpoint is an error, as is a
    --tokenizer other than the checkpoint's; the --config file's model fields are replaced.
    """
    from models import hub

    if not hub.is_pretrained_spec(cfg.init):
        raise UsageError(f"--init={cfg.init}: expected hf:DIR (Hugging Face checkpoint directory) or gguf:FILE")
    try:
        model_cfg, params, tok = hub.load_pretrained(cfg.init)
    except (hub.CheckpointError, OSError) as e:
        raise UsageError(f"--init={cfg.init}: {e}") from None
    given = {a[2:].split("=", 1)[0].replace("-", "_") for a in split_args(argv)[1]}
    for key in sorted(given):
        field = key[len("model."):]
        if key.startswith("model.") and field in CHECKPOINT_MODEL_FIELDS:
            mine, theirs = getattr(cfg.model, field), getattr(model_cfg, field)
            if mine != theirs:
                raise UsageError(f"--model.{field}={mine} conflicts with --init={cfg.init}, whose {field} is "
                                 f"{theirs}; drop --model.{field} (the checkpoint fixes the architecture)")
    if "tokenizer" in given and cfg.tokenizer != cfg.init:
        raise UsageError(f"--tokenizer={cfg.tokenizer} with --init={cfg.init}: a pretrained model trains with its "
                         "own tokenizer; drop --tokenizer")
    keep = {f.name: getattr(cfg.model, f.name) for f in dataclasses.fields(model_cfg)
            if f.name not in CHECKPOINT_MODEL_FIELDS}
    return dataclasses.replace(cfg, model=dataclasses.replace(model_cfg, **keep), tokenizer=cfg.init), params, tok


def write_json_atomic(path: str, obj: Any) -> None:
    """Writes ``obj`` as JSON to ``path`` through a temporary file and a rename: never a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=".config.", suffix=".json", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Learning rate at 0-based update i: linear warm-up from 0 to lr, then cosine decay to min_lr."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.steps, cfg.warmup_steps + 1), end_value=cfg.min_lr,
    )


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW (weight decay on matrices only) with the schedule above, after global-norm clipping."""
    schedule = make_schedule(cfg)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    adamw = optax.adamw(schedule, b1=cfg.beta1, b2=cfg.beta2, weight_decay=cfg.weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw) if cfg.grad_clip > 0 else adamw


def make_train_step(cfg: TrainConfig, model, tx: optax.GradientTransformation, policy: Policy,
                    mesh: jax.sharding.Mesh, param_sh: Any, opt_sh: Any, base_key: jax.Array):
    """The jitted step ``(params, opt_state, inputs (B, T) int32, targets (B, T) int32, step int32) ->
    (params, opt_state, {"loss", "grad_norm", "params_finite"})``; params and opt_state are donated.

    Under gspmd XLA partitions the step and places (and schedules) the gradient reductions itself; under
    shard_map (:func:`use_shard_map`) each device runs forward and backward on its tokens and the gradients
    are averaged as ``cfg.grad_reduce_dtype`` / ``cfg.grad_reduce_buckets`` say.
    """
    dropout = cfg.model.dropout_rate > 0

    def loss_fn(params, inputs, targets, key):
        rngs = dict(zip(("dropout", "quant"), jax.random.split(key)))
        logits = model.apply({"params": params}, inputs, deterministic=not dropout, rngs=rngs)
        return lm_loss(logits, targets)

    loss_and_grads = jax.value_and_grad(loss_fn)
    if use_shard_map(cfg, policy, mesh):
        # Pallas kernels are custom calls that XLA's partitioner cannot split: under plain jit shardings each
        # device would all-gather the batch and run every kernel on all of it. shard_map runs forward and
        # backward on each device's tokens instead (parameters gathered whole, every INT8 tensor quantized on
        # its own device), then averages the gradients.
        loss_and_grads = sharding.data_parallel_value_and_grad(
            loss_fn, mesh, buckets=cfg.grad_reduce_buckets, reduce_dtype=cfg.grad_reduce_dtype
        )

    def train_step(params, opt_state, inputs, targets, step):
        key = jax.random.fold_in(base_key, step)  # per-step noise: reproducible on resume
        loss, grads = loss_and_grads(params, inputs, targets, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        finite = jnp.all(jnp.stack([jnp.isfinite(p).all() for p in jax.tree.leaves(params)]))
        return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), "params_finite": finite}

    return jax.jit(train_step, out_shardings=(param_sh, opt_sh, None), donate_argnums=(0, 1))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs training from command-line style arguments (default ``sys.argv[1:]``).

    Returns {"history": [(step, loss), ...] for the steps run here, "final_loss", "start_step" (0, or the
    resumed step), "params" (final, sharded), "config" (the resolved TrainConfig)}.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "plot":
        metrics.main(argv)
        return {}
    if "-h" in argv or "--help" in argv:
        print(help_text(argv))
        return {}

    # ---------------------------------------------------------------- config: all checked before any write
    cfg = parse_args(argv)
    init_params_host, init_tokenizer = None, None
    if cfg.init:  # the checkpoint's model fields and tokenizer, before every check that reads them
        cfg, init_params_host, init_tokenizer = load_init(cfg, argv)
    check_ranges(cfg)
    if cfg.tensorboard:
        cli.require_module("tensorboardX", "tensorboard", "--tensorboard=true")
    check_run_dir(cfg)
    if cfg.distributed:
        sharding.initialize_distributed()
    is_main = jax.process_index() == 0
    devices = check_devices(cfg)
    given_policy = cfg.policy
    widths = (cfg.model.d_model, cfg.model.hidden)
    min_block = MIN_KERNEL_BLOCK if ops_backend(cfg) == "pallas" else 2
    # config.json records the tiles used; the device default narrows its tiles to fit the model's widths
    cfg = dataclasses.replace(cfg, policy=resolve_spec(cfg.policy, widths, min_block))
    if is_main and cfg.policy != resolve_spec(given_policy):
        print(f"--policy={given_policy} is {cfg.policy} here: 128 does not divide the model widths {widths}")
    try:
        policy = make_policy(cfg)
    except UsageError:
        raise
    except ValueError as e:  # Policy's own checks: name, fields, granularity, block
        name = given_policy.partition(":")[0]
        hint = f"; e.g. --policy={name}:block={MIN_KERNEL_BLOCK}" if "block must be" in str(e) else ""
        raise UsageError(f"--policy={given_policy}: {e}{hint}") from None

    # ---------------------------------------------------------------- data
    ds = load_data(cfg, init_tokenizer)
    model_cfg = cfg.model
    if model_cfg.vocab_size == 0:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=-(-ds.vocab_size // 64) * 64)
    if model_cfg.vocab_size < ds.vocab_size:
        raise UsageError(f"--model.vocab_size={model_cfg.vocab_size} < the tokenizer's {ds.vocab_size} ids; "
                         "use --model.vocab_size=0 to take it from the tokenizer")
    cfg = dataclasses.replace(cfg, model=model_cfg)
    check_int8_dims(model_cfg, policy, given_policy)

    # ---------------------------------------------------------------- model + optimizer
    model = build_model(model_cfg, policy)
    tx = make_optimizer(cfg)
    base_key = jax.random.key(cfg.seed)

    def init_params(key):
        dummy = jnp.zeros((1, cfg.seq_len), jnp.int32)
        return model.init({"params": key}, dummy)["params"]

    try:
        abstract_params = jax.eval_shape(init_params, base_key)
    except ValueError as e:  # the model's own shape checks
        raise UsageError(f"the model of --config does not build under --policy={cfg.policy}: {e}") from None

    # ---------------------------------------------------------------- devices: data parallel + FSDP
    mesh = sharding.make_mesh(devices)
    use_shard_map(cfg, policy, mesh)  # checks data_parallel before anything is written
    batch_sh = sharding.batch_sharding(mesh)
    param_sh = sharding.tree_shardings(abstract_params, mesh, cfg.sharding, cfg.fsdp_min_size)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_sh = sharding.tree_shardings(abstract_opt, mesh, cfg.sharding, cfg.fsdp_min_size)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(abstract_params))

    # ---------------------------------------------------------------- resume or start fresh
    # The first write: a start that fails from here on leaves no run directory it created behind.
    ckpt_dir = os.path.join(cfg.run_dir, "checkpoints")
    created = [d for d in (cfg.run_dir, ckpt_dir) if is_main and not os.path.exists(d)]

    def undo_start():
        """Removes the directories this start created, when they hold no checkpoint."""
        for d in created[::-1]:
            if not checkpoint.existing_steps(ckpt_dir):
                shutil.rmtree(d, ignore_errors=True)

    try:
        ckpt = checkpoint.Checkpointer(ckpt_dir, keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoint)
    except BaseException:
        undo_start()
        raise
    start = 0
    try:
        restored = None
        if cfg.resume and ckpt.all_steps():
            # Restore straight into the shards this run uses (any device count, whatever the writer used).
            def target(abstract, shards):
                struct = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                return jax.tree.map(struct, abstract, shards)

            def check_meta(meta):
                int(meta["data_position"]["step"])  # a checkpoint must say where the data stream stands

            try:
                restored, set_aside = ckpt.restore_newest(
                    target(abstract_params, param_sh), target(abstract_opt, opt_sh), check_meta
                )
            except checkpoint.CheckpointMismatchError as e:
                raise UsageError(f"--run_dir={cfg.run_dir}: {e}") from None
            except checkpoint.CheckpointDamagedError as e:
                raise UsageError(
                    f"--run_dir={cfg.run_dir}: {e}. Move {ckpt_dir} aside to start this run over"
                ) from None
            damaged = "; ".join(f"checkpoint step {s} is damaged ({why}), moved to {to}" for s, to, why in set_aside)
        if restored is not None:
            params, opt_state, meta = restored
            pos = meta["data_position"]
            start = int(pos["step"])
            if is_main:
                note = f": {damaged}" if damaged else ""
                print(f"resumed from {ckpt.step_dir(meta['step'])} (step {start}){note}")
                now = dict(
                    seed=cfg.seed, batch_size=cfg.batch_size, seq_len=cfg.seq_len, dataset=ds.meta["key"]
                )
                changed = {k: (pos.get(k), v) for k, v in now.items() if pos.get(k) != v}
                if changed:
                    print(f"warning: the data stream differs from the checkpointed run (old, new): {changed}")
                old = meta.get("train_config", {})
                sched = {k: (old.get(k), getattr(cfg, k)) for k in ("steps", "lr", "min_lr", "warmup_steps")
                         if old.get(k) != getattr(cfg, k)}
                if sched:
                    print(f"note: the learning-rate schedule changed on resume (old, new): {sched}")
        else:
            # Created directly in their shards: a model larger than one device's memory never exists whole.
            def init_state(key):
                params = init_params(key)
                return params, tx.init(params)

            if init_params_host is not None:  # --init: the pretrained weights, placed in their shards
                params = jax.device_put(init_params_host, param_sh)
                opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
            else:
                params, opt_state = jax.jit(init_state, out_shardings=(param_sh, opt_sh))(base_key)
        config_json = os.path.join(cfg.run_dir, "config.json")
        if is_main and (start < cfg.steps or not os.path.exists(config_json)):  # nothing to do: keep the old one
            write_json_atomic(config_json, cfg.to_dict())
        # A resumed run's metrics read as one run: the rows of steps after the checkpoint are redone.
        writer = metrics.MetricsWriter(cfg.run_dir, tensorboard=cfg.tensorboard, resume_step=start)
    except BaseException:
        ckpt.close()
        undo_start()
        raise
    if is_main:
        tiles = f" (tiles {'/'.join('x'.join(map(str, t)) for t in policy.tiles)})" if policy.int8 and \
            policy.granularity == "block" else ""
        print(f"{model_cfg.family} {n_params / 1e6:.2f}M params, policy {cfg.policy}{tiles}, {mesh.size} device(s) "
              f"({cfg.sharding}), vocab {model_cfg.vocab_size}, {ds}")

    # ---------------------------------------------------------------- step functions
    train_step = make_train_step(cfg, model, tx, policy, mesh, param_sh, opt_sh, base_key)

    @jax.jit
    def eval_step(params, inputs, targets):
        logits = model.apply({"params": params}, inputs, deterministic=True)
        return lm_loss(logits, targets)

    shard, num_shards = jax.process_index(), jax.process_count()

    def global_batch(b: data.Batch):
        return sharding.shard_batch(b.inputs, batch_sh), sharding.shard_batch(b.targets, batch_sh)

    def evaluate(params) -> float:
        it = ds.eval_batches("val", cfg.batch_size, cfg.seq_len, cfg.eval_batches, shard, num_shards)
        losses = [eval_step(params, *global_batch(b)) for b in it]
        return float(jnp.mean(jnp.stack(losses)))

    def save(step: int) -> None:
        meta = {
            "data_position": {"split": "train", "step": step, "seed": cfg.seed, "batch_size": cfg.batch_size,
                              "seq_len": cfg.seq_len, "dataset": ds.meta["key"]},
            "rng": checkpoint.rng_to_json(base_key),
            "model_config": model_cfg.to_dict(),
            "train_config": cfg.to_dict(),
            "policy": policy.name,
            "tokenizer": {"spec": cfg.tokenizer, "vocab_size": ds.vocab_size, "eot_id": ds.eot_id},
        }
        ckpt.save(step, params, opt_state, meta)

    # ---------------------------------------------------------------- training loop
    lr_at = make_schedule(cfg)
    history: list[tuple[int, float]] = []
    tokens_per_step = cfg.batch_size * cfg.seq_len
    bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and is_main), dynamic_ncols=True)
    t_last, steps_since = time.perf_counter(), 0

    def diverged(step: int, what: str) -> TrainingDiverged:
        # The loss logged at step s is computed on the weights after s - 1 updates, so a non-finite loss at
        # step s condemns checkpoint s - 1; checkpoints <= s - 2 gave a finite loss afterwards.
        ckpt.wait()
        good = [s for s in ckpt.all_steps() if s <= step - 2]
        where = ckpt.step_dir(good[-1]) if good else "none (no checkpoint before the divergence)"
        return TrainingDiverged(
            f"{what} at step {step}; stopping. Last good checkpoint: {where}. "
            "Try a lower --lr, a longer --warmup_steps or --grad_clip=1.0."
        )

    def check(step: int, m: dict) -> float:
        loss = float(m["loss"])
        if not math.isfinite(loss):
            raise diverged(step, f"loss is {loss}")
        history.append((step, loss))
        return loss

    def interrupted(done: int, m: dict | None, saved: int) -> cli.Interrupted:
        """After Ctrl-C: saves step ``done`` when its state is intact (not donated to a step that never
        returned) and finite, and names the last checkpoint."""
        alive = not any(x.is_deleted() for x in jax.tree.leaves((params, opt_state)))
        if done > saved and m is not None and alive and cfg.ckpt_every >= 0:
            if math.isfinite(float(m["loss"])) and bool(m["params_finite"]):
                save(done)
        ckpt.wait()
        last = checkpoint.existing_steps(ckpt.directory)
        where = f"last checkpoint: {ckpt.step_dir(last[-1])}" if last else "no checkpoint was saved"
        return cli.Interrupted(
            f"interrupted after step {done} of {cfg.steps}; {where}. Run the same command to resume."
        )

    if is_main and start >= cfg.steps:
        print(f"nothing to train: the run is at step {start} and --steps={cfg.steps}; raise --steps to continue it")
    pending = None  # (step, metrics) of the previous step: read one step late so dispatch stays ahead
    done, m, saved = start, None, start  # steps whose update is in params; its metrics; the last saved step
    try:
        for it in range(start, cfg.steps):
            step = it + 1  # optimizer updates done after this iteration
            batch = ds.batch("train", it, cfg.batch_size, cfg.seq_len, cfg.seed, shard, num_shards)
            params, opt_state, m = train_step(params, opt_state, *global_batch(batch), jnp.int32(it))
            done = step
            if pending is not None:
                check(*pending)
            pending = (step, m)
            steps_since += 1
            bar.update(1)
            if it == start:  # the first step includes compilation: keep it out of tokens/s
                jax.block_until_ready(m["loss"])
                t_last, steps_since = time.perf_counter(), 0

            if step % cfg.log_every == 0 or step == cfg.steps:
                loss = check(*pending)
                pending = None
                dt = time.perf_counter() - t_last
                speed = {"tokens_per_s": steps_since * tokens_per_step / dt} if steps_since else {}
                writer.write(step, loss=loss, lr=float(lr_at(it)), grad_norm=float(m["grad_norm"]), **speed)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{speed.get('tokens_per_s', 0):,.0f}")
                t_last, steps_since = time.perf_counter(), 0

            if cfg.eval_batches and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                val = evaluate(params)
                writer.write(step, val_loss=val, val_ppl=math.exp(min(val, 50.0)))
                if is_main:
                    bar.write(f"step {step}: val loss {val:.4f}, ppl {math.exp(min(val, 50.0)):.2f}")
                t_last = time.perf_counter()  # do not count eval time in tokens/s

            if cfg.ckpt_every >= 0 and ((cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps):
                if pending is not None:
                    check(*pending)  # never save a state whose loss was not finite
                    pending = None
                if not bool(m["params_finite"]):
                    raise diverged(step + 1, "weights became non-finite")
                saved = step
                save(step)
        if pending is not None:
            check(*pending)
    except KeyboardInterrupt:
        raise interrupted(done, m, saved) from None
    finally:
        bar.close()
        writer.close()
        ckpt.close()
    final = history[-1][1] if history else float("nan")
    return {"history": history, "final_loss": final, "start_step": start, "params": params, "config": cfg}


def run(argv: list[str] | None = None) -> int:
    """The command line: :func:`main`, with bad input as one ``error:`` line and exit status 2, divergence
    exit status 1, Ctrl-C 130 (see ``jq8.cli``)."""
    return cli.run(main, argv, failures=(TrainingDiverged,))


if __name__ == "__main__":
    sys.exit(run())
