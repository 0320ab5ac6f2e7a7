"""Training checkpoints: a thin wrapper over Orbax's ``CheckpointManager``.

Layout of ``<directory>/<step>/`` (one folder per saved step, written atomically by Orbax: it is built
under ``<step>.orbax-checkpoint-tmp`` and renamed when complete, so a run killed mid-save leaves only a
tmp folder that is never listed as a step, and which the next ``Checkpointer`` deletes)::

    params/     Orbax PyTree (OCDBT): the fp32 master weights, the Flax ``params`` collection
                (e.g. {"wte": {"embedding": ...}, "h_0": {...}, ..., "ln_f": {...}})
    opt_state/  Orbax PyTree: the Optax state (same leaves as params for AdamW's mu / nu, plus counts)
    meta/       JSON: {"step", "data_position", "rng" (uint32 key data), "model_config", "train_config",
                "policy", "format_version", ...}: everything needed to rebuild the model and resume

``load_params`` reads only ``params`` + ``meta`` (what ``quantize.py`` needs); ``Checkpointer.restore``
reads everything and first checks the saved parameter shapes against the model being built.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

FORMAT_VERSION = 1


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model / optimizer being restored into."""


class CheckpointDamagedError(ValueError):
    """A checkpoint step cannot be read (a truncated or missing file, missing metadata).

    ``step`` / ``path``: the damaged step and its folder; ``intact``: the other complete steps, newest last
    (not checked).
    """

    def __init__(self, message: str, step: int, path: str, intact: list[int]):
        super().__init__(message)
        self.step, self.path, self.intact = step, path, intact


def describe_error(e: BaseException, limit: int = 200) -> str:
    """``Type: message`` of a storage error on one short line: its root cause (Orbax wraps TensorStore's
    error, which names the file), without TensorStore's appended spec."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = " ".join(str(e).split("[tensorstore_spec=")[0].split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _handlers() -> dict[str, ocp.CheckpointHandler]:
    return {
        "params": ocp.StandardCheckpointHandler(),
        "opt_state": ocp.StandardCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }


def _path_str(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def check_compatible(saved: Any, expected: Any, what: str = "params") -> None:
    """Raises :class:`CheckpointMismatchError` naming the parameters whose paths or shapes differ.

    saved: the metadata tree of a checkpoint item (leaves with ``.shape``/``.dtype``);
    expected: the abstract tree being restored into (arrays or ``jax.ShapeDtypeStruct``).
    """
    saved_leaves = {_path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
    want_leaves = {_path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
    missing = sorted(set(want_leaves) - set(saved_leaves))
    extra = sorted(set(saved_leaves) - set(want_leaves))
    if missing or extra:
        raise CheckpointMismatchError(
            f"checkpoint {what} do not match the model: missing from checkpoint {missing[:5]}, "
            f"unexpected in checkpoint {extra[:5]}. Was it written for another model family/config?"
        )
    bad = [
        f"'{name}' has shape {tuple(saved_leaves[name].shape)} in the checkpoint but the model expects "
        f"{tuple(want.shape)}"
        for name, want in want_leaves.items()
        if tuple(saved_leaves[name].shape) != tuple(want.shape)
    ]
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise CheckpointMismatchError(
            f"checkpoint {what} do not fit the model: " + "; ".join(bad[:5]) + more + ". The checkpoint was "
            "written for another model shape (check num_layers / d_model / vocab_size / max_seq_len, or use "
            "a fresh run_dir)."
        )


_PARTIAL = re.compile(r"^\d+\.orbax-checkpoint-tmp")


def remove_partial_saves(directory: str) -> list[str]:
    """Deletes ``<step>.orbax-checkpoint-tmp*`` folders (saves a killed run never finished); returns them.

    Orbax never lists them as steps anyway; removing them up front (synchronously, unlike Orbax's own
    background clean-up) keeps the folder tidy and lets that step be saved again.
    """
    if not os.path.isdir(directory):
        return []
    removed = [n for n in sorted(os.listdir(directory)) if _PARTIAL.match(n)]
    for name in removed:
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    return removed


def existing_steps(directory: str | os.PathLike) -> list[int]:
    """The steps with a ``<step>/`` folder in ``directory``, sorted ([] if it does not exist).

    Reads the folder names only (no Orbax, nothing created): unfinished saves
    (``<step>.orbax-checkpoint-tmp``) and set-aside steps (``<step>.damaged-<n>``) are not steps.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    return sorted(
        int(n) for n in os.listdir(directory) if n.isdigit() and os.path.isdir(os.path.join(directory, n))
    )


class Checkpointer:
    """Periodic async saves, keep-last-N, resume from the latest complete step.

    directory: where steps are written (created if missing). keep: how many recent steps to keep.
    async_save: write in a background thread while training continues (``wait()`` blocks on it).
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        self.removed_partial = remove_partial_saves(self.directory) if jax.process_index() == 0 else []
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=_handlers())

    def latest_step(self) -> int | None:
        """The newest complete step, or None. Partial (tmp) folders are never counted."""
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, params: Any, opt_state: Any, meta: Mapping[str, Any]) -> None:
        """Starts saving ``step`` (returns before the write finishes when async). meta must be JSON-able."""
        has_opt = bool(jax.tree.leaves(opt_state))  # Orbax refuses empty trees (e.g. plain SGD's state)
        meta = {**meta, "step": int(step), "format_version": FORMAT_VERSION, "has_opt_state": has_opt}
        items = dict(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta))
        if has_opt:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        self._mngr.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, abstract_params: Any, abstract_opt_state: Any, step: int | None = None):
        """Restores (params, opt_state, meta) of ``step`` (default: latest) into the given abstract trees.

        The abstract trees (``jax.ShapeDtypeStruct`` with shardings, e.g. from ``jax.eval_shape``) decide
        the restored dtypes and shardings. Raises CheckpointMismatchError naming the first mismatching
        parameter if the checkpoint was written for another model shape.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        md = self._mngr.item_metadata(step)
        check_compatible(md["params"].tree, abstract_params, "params")
        items = dict(params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore())
        try:  # a step saved without optimizer state (see ``save``) has no such item
            has_opt = md["opt_state"] is not None
        except KeyError:
            has_opt = False
        if has_opt:
            check_compatible(md["opt_state"].tree, abstract_opt_state, "optimizer state")
            items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
        elif jax.tree.leaves(abstract_opt_state):
            raise CheckpointMismatchError(
                f"checkpoint step {step} holds no optimizer state, but the optimizer has one"
            )
        out = self._mngr.restore(step, args=ocp.args.Composite(**items))
        return out["params"], (out["opt_state"] if has_opt else abstract_opt_state), out["meta"]

    def restore_newest(
        self,
        abstract_params: Any,
        abstract_opt_state: Any,
        check_meta: Callable[[dict[str, Any]], None] | None = None,
    ) -> tuple[tuple[Any, Any, dict[str, Any]], list[tuple[int, str, str]]]:
        """Restores the newest step that reads back whole, setting damaged newer steps aside.

        Steps are tried newest first. A step that fails to restore (or whose meta ``check_meta`` rejects by
        raising) while an older one restores is damaged: it is renamed to ``<step>.damaged-<n>`` (kept for
        inspection, never deleted, no longer a step). When no step restores, nothing is renamed (the cause
        may be this code or environment rather than the files) and :class:`CheckpointDamagedError` names
        the newest. A :class:`CheckpointMismatchError` (a checkpoint of another model) is raised as is.

        Returns ``(restored, set_aside)``: restore()'s (params, opt_state, meta), and (step, new path,
        reason) for each step set aside. Raises FileNotFoundError when there is no step at all.
        """
        failed: list[tuple[int, str]] = []
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        for step in steps:
            try:
                restored = self.restore(abstract_params, abstract_opt_state, step)
                if check_meta is not None:
                    check_meta(restored[2])
            except CheckpointMismatchError:
                raise
            except Exception as e:  # any storage / format error means this step cannot be resumed from
                failed.append((step, describe_error(e)))
            else:
                return restored, [(s, self.set_aside(s), why) for s, why in failed]
            _drop_abandoned_reads()
        newest, why = failed[0]
        raise CheckpointDamagedError(
            f"no checkpoint in {self.directory} restores (steps {', '.join(str(s) for s, _ in failed)}); the "
            f"newest, step {newest}: {why}",
            newest,
            self.step_dir(newest),
            [],
        )

    def set_aside(self, step: int) -> str:
        """Renames step ``step``'s folder to ``<step>.damaged-<n>`` (first free n); returns the new path.

        Only process 0 renames; every process forgets the step.
        """
        src = self.step_dir(step)
        n = 1
        while os.path.exists(f"{src}.damaged-{n}"):
            n += 1
        dst = f"{src}.damaged-{n}"
        if jax.process_index() == 0 and os.path.exists(src):
            os.replace(src, dst)
        self._mngr.reload()
        return dst

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        """Blocks until any in-flight async save is complete on disk."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_params(
    directory: str | os.PathLike, step: int | None = None, *, sharding: jax.sharding.Sharding | None = None
) -> tuple[Any, dict[str, Any]]:
    """Reads the fp32 params and the meta dict of a training checkpoint (no optimizer state).

    directory: a train.py run folder (``runs/tiny``), its checkpoint folder (``runs/tiny/checkpoints``), or
      one step folder (``runs/tiny/checkpoints/300``). Returns (params, meta): params is the Flax
      ``params`` dict of jax.Arrays placed on ``sharding`` (default: the first local device), whatever
      the device layout of the run that wrote it; ``meta["model_config"]`` rebuilds the model with
      ``models.presets.build_model``.
    """
    directory = os.path.abspath(os.fspath(directory))
    if os.path.isdir(os.path.join(directory, "checkpoints")):
        directory = os.path.join(directory, "checkpoints")
    base = os.path.basename(directory)
    if step is None and base.isdigit() and os.path.isdir(os.path.join(directory, "params")):
        directory, step = os.path.dirname(directory), int(base)
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    with _quiet_read_only():
        mngr = ocp.CheckpointManager(directory, options=options, item_handlers=_handlers())
    with mngr:
        steps = list(mngr.all_steps())
        step = (steps[-1] if steps else None) if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {directory}")
        sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        why = None
        try:
            tree = mngr.item_metadata(step)["params"].tree
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree)
            restore = ocp.args.Composite(params=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
            out = mngr.restore(step, args=restore)
        except Exception as e:  # any storage / format error: name the step and the others to try
            why = describe_error(e)
        if why is not None:
            _drop_abandoned_reads()
            path = os.path.join(directory, str(step))
            others = [s for s in steps if s != step]
            raise CheckpointDamagedError(f"checkpoint {path} cannot be read ({why})", step, path, others)
    return out["params"], out["meta"]


class _quiet_read_only(contextlib.AbstractContextManager):
    """Drops Orbax's "Given directory is read only" warning: reading a checkpoint is not news."""

    @staticmethod
    def _filter(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Given directory is read only")

    def __enter__(self):
        logging.getLogger("absl").addFilter(self._filter)
        return self

    def __exit__(self, *exc):
        logging.getLogger("absl").removeFilter(self._filter)


def _drop_abandoned_reads() -> None:
    """Collects, quietly, the reads a failed Orbax restore left as unfinished coroutines: otherwise each prints
    "Exception ignored in <coroutine ...>" whenever the garbage collector happens to meet it."""
    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        gc.collect()
    finally:
        sys.unraisablehook = hook


def rng_to_json(key: jax.Array) -> list[int]:
    """A typed or raw jax.random key -> JSON list of its uint32 words."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return [int(v) for v in np.asarray(key).reshape(-1)]


def rng_from_json(words: list[int]) -> jax.Array:
    return jax.random.wrap_key_data(np.asarray(words, dtype=np.uint32))
