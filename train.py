"""Train a GPT / LLaMA language model with jq8, in bf16 or Jetfire INT8 (``--policy``).

    python train.py --config configs/tiny.py                                   # CPU, about a minute
    python train.py --config configs/tiny.py --policy=jetfire-int8 --run_dir=runs/tiny_int8
    python train.py --config configs/gpt2_124m.py --steps=5000 --model.dropout_rate=0.1
    python train.py plot runs/tiny runs/tiny_int8 --out loss.png               # bf16 vs INT8 curves

Reads top to bottom: config, data, model, optimizer, devices, resume, step functions, loop. A run writes
``<run_dir>/config.json``, ``<run_dir>/metrics.jsonl`` and ``<run_dir>/checkpoints/<step>/`` (see
``jq8.training.checkpoint``); running the same command again resumes from the latest complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from configs.base import TrainConfig, apply_overrides, load_config
from jq8 import data
from jq8.training import checkpoint, metrics, sharding
from jq8.training.policy import Policy, parse_policy
from models.gpt import lm_loss
from models.presets import build_model


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


def parse_args(argv: list[str]) -> TrainConfig:
    config_path, overrides = None, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ValueError("--config needs a path, e.g. --config configs/tiny.py")
            config_path, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        else:
            overrides.append(arg)
        i += 1
    if config_path is None:
        raise ValueError("usage: python train.py --config configs/tiny.py [--key=value ...]")
    return apply_overrides(load_config(config_path), overrides)


def make_policy(cfg: TrainConfig) -> Policy:
    if cfg.backend not in ("auto", "pallas", "xla"):
        raise ValueError(f"--backend={cfg.backend!r}: expected auto, pallas or xla")
    use_kernels = jax.default_backend() == "gpu" if cfg.backend == "auto" else cfg.backend == "pallas"
    return parse_policy(cfg.policy, use_kernels=use_kernels)


def use_shard_map(cfg: TrainConfig, policy: Policy, mesh: jax.sharding.Mesh) -> bool:
    """Whether the training step runs per device under ``jax.shard_map`` (see ``cfg.data_parallel``)."""
    mode = cfg.data_parallel.lower()
    if mode not in ("auto", "shard_map", "gspmd"):
        raise ValueError(f"data_parallel must be auto/shard_map/gspmd, got {cfg.data_parallel!r}")
    if mesh.size == 1:
        return False
    if mode == "auto":  # the INT8 policy's Pallas kernels cannot be partitioned by XLA
        return policy.name != "bf16" and policy.use_kernels
    return mode == "shard_map"


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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs training from command-line style arguments (default ``sys.argv[1:]``).

    Returns {"history": [(step, loss), ...] for the steps run here, "final_loss", "start_step" (0, or the
    resumed step), "params" (final, sharded), "config" (the resolved TrainConfig)}.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "plot":
        metrics.main(argv)
        return {}

    # ---------------------------------------------------------------- config
    cfg = parse_args(argv)
    if cfg.distributed:
        sharding.initialize_distributed()
    is_main = jax.process_index() == 0
    os.makedirs(cfg.run_dir, exist_ok=True)

    # ---------------------------------------------------------------- data
    ds = data.prepare(cfg.dataset, cfg.tokenizer)
    model_cfg = cfg.model
    if model_cfg.vocab_size == 0:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=-(-ds.vocab_size // 64) * 64)
    if model_cfg.vocab_size < ds.vocab_size:
        raise ValueError(f"model.vocab_size={model_cfg.vocab_size} < tokenizer vocab {ds.vocab_size}; "
                         "use --model.vocab_size=0 to take it from the tokenizer")
    if cfg.seq_len > model_cfg.max_seq_len:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}")
    cfg = dataclasses.replace(cfg, model=model_cfg)
    if is_main:
        with open(os.path.join(cfg.run_dir, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)

    # ---------------------------------------------------------------- model + optimizer
    policy = make_policy(cfg)
    model = build_model(model_cfg, policy)
    tx = make_optimizer(cfg)
    base_key = jax.random.key(cfg.seed)

    def init_params(key):
        dummy = jnp.zeros((1, cfg.seq_len), jnp.int32)
        return model.init({"params": key}, dummy)["params"]

    # ---------------------------------------------------------------- devices: data parallel + FSDP
    mesh = sharding.make_mesh(jax.devices()[: cfg.num_devices] if cfg.num_devices else None)
    batch_sh = sharding.batch_sharding(mesh)
    if cfg.batch_size % mesh.size:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the {mesh.size} devices")
    abstract_params = jax.eval_shape(init_params, base_key)
    param_sh = sharding.tree_shardings(abstract_params, mesh, cfg.sharding, cfg.fsdp_min_size)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_sh = sharding.tree_shardings(abstract_opt, mesh, cfg.sharding, cfg.fsdp_min_size)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(abstract_params))

    # ---------------------------------------------------------------- resume or start fresh
    ckpt = checkpoint.Checkpointer(
        os.path.join(cfg.run_dir, "checkpoints"), keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoint
    )
    start = 0
    if cfg.resume and ckpt.latest_step() is not None:
        # Restore straight into the shards this run uses (any device count, whatever the writer used).
        def target(abstract, shards):
            struct = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
            return jax.tree.map(struct, abstract, shards)

        params, opt_state, meta = ckpt.restore(target(abstract_params, param_sh),
                                               target(abstract_opt, opt_sh))
        pos = meta["data_position"]
        start = int(pos["step"])
        if is_main:
            print(f"resumed from {ckpt.step_dir(meta['step'])} (step {start})")
            now = dict(seed=cfg.seed, batch_size=cfg.batch_size, seq_len=cfg.seq_len, dataset=ds.meta["key"])
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

        params, opt_state = jax.jit(init_state, out_shardings=(param_sh, opt_sh))(base_key)
    if is_main:
        print(f"{model_cfg.family} {n_params / 1e6:.2f}M params, policy {policy.name}, {mesh.size} device(s) "
              f"({cfg.sharding}), vocab {model_cfg.vocab_size}, {ds}")

    # ---------------------------------------------------------------- step functions
    dropout = model_cfg.dropout_rate > 0

    def loss_fn(params, inputs, targets, key):
        rngs = dict(zip(("dropout", "quant"), jax.random.split(key)))
        logits = model.apply({"params": params}, inputs, deterministic=not dropout, rngs=rngs)
        return lm_loss(logits, targets)

    def local_grads(params, inputs, targets, key):
        """One device's share of the batch under shard_map: its own noise; loss and gradients averaged over
        the devices (one all-reduce each)."""
        key = jax.random.fold_in(key, jax.lax.axis_index(sharding.AXIS))
        return jax.lax.pmean(jax.value_and_grad(loss_fn)(params, inputs, targets, key), sharding.AXIS)

    loss_and_grads = jax.value_and_grad(loss_fn)
    if use_shard_map(cfg, policy, mesh):
        # Pallas kernels are custom calls that XLA's partitioner cannot split: under plain jit shardings each
        # device would all-gather the batch and run every kernel on all of it. shard_map runs forward and
        # backward on each device's tokens instead (parameters gathered whole, every INT8 tensor quantized on
        # its own device), then averages the gradients. check_vma=False: the INT8 ops' custom VJPs return
        # per-device weight gradients for replicated weights; the pmean above is what makes them replicated.
        tokens = P(sharding.AXIS)
        loss_and_grads = jax.shard_map(local_grads, mesh=mesh, in_specs=(P(), tokens, tokens, P()),
                                       out_specs=P(), check_vma=False)

    def train_step(params, opt_state, inputs, targets, step):
        key = jax.random.fold_in(base_key, step)  # per-step noise: reproducible on resume
        loss, grads = loss_and_grads(params, inputs, targets, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        finite = jnp.all(jnp.stack([jnp.isfinite(p).all() for p in jax.tree.leaves(params)]))
        return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), "params_finite": finite}

    train_step = jax.jit(train_step, out_shardings=(param_sh, opt_sh, None), donate_argnums=(0, 1))

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
    writer = metrics.MetricsWriter(cfg.run_dir, tensorboard=cfg.tensorboard)
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

    pending = None  # (step, metrics) of the previous step: read one step late so dispatch stays ahead
    try:
        for it in range(start, cfg.steps):
            step = it + 1  # optimizer updates done after this iteration
            batch = ds.batch("train", it, cfg.batch_size, cfg.seq_len, cfg.seed, shard, num_shards)
            params, opt_state, m = train_step(params, opt_state, *global_batch(batch), jnp.int32(it))
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
                save(step)
        if pending is not None:
            check(*pending)
    finally:
        bar.close()
        writer.close()
        ckpt.close()
    final = history[-1][1] if history else float("nan")
    return {"history": history, "final_loss": final, "start_step": start, "params": params, "config": cfg}


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, TrainingDiverged, checkpoint.CheckpointMismatchError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
