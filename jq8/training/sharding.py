"""Data parallel + FSDP-style parameter sharding over all devices, with ``jax.sharding``.

One mesh axis, ``"data"``, spans every device (of every process). The batch is split along it; with
``mode="fsdp"`` each large parameter (and its Adam moments) is also split along it (ZeRO-3 style: XLA
all-gathers a weight before its use and reduce-scatters its gradient); ``mode="dp"`` replicates parameters.

Quantized arrays (:class:`jq8.quant.QArray`) are sharded as one unit: the codes and the per-tile scales are
split along the same axis at tile boundaries, so every device holds the scales of exactly the codes it holds.

Under ``shard_map`` (:func:`data_parallel_value_and_grad`) each device runs forward and backward on its own
tokens and the gradients are averaged explicitly (:func:`reduce_gradients`): in one reduction over the whole
tree, or in buckets of whole layers in the order the backward finishes them, optionally in bfloat16.

Multi-host: call :func:`initialize_distributed` (``train.py --distributed=True``) before any other JAX call.
On a cluster JAX reads the coordinator address, process count and id from the environment (SLURM, Open MPI,
Cloud TPU/GKE); elsewhere set ``JAX_COORDINATOR_ADDRESS=host:port``, ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID`` on every host. Each process then feeds its own slice of the global batch
(:func:`shard_batch`), and ``jax.devices()`` lists the devices of all hosts.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jq8.quant import QArray

AXIS = "data"


def initialize_distributed() -> None:
    """``jax.distributed.initialize`` from the environment (see module docstring); call it first."""
    kwargs = {}
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        kwargs = dict(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    jax.distributed.initialize(**kwargs)


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh named ``"data"`` over ``devices`` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """(B, ...) arrays split along B."""
    return NamedSharding(mesh, P(AXIS))


def _shard_axis(shape: tuple[int, ...], n: int) -> int | None:
    """The largest axis divisible by n (ties: the first), or None."""
    best = None
    for i, s in enumerate(shape):
        if s % n == 0 and (best is None or s > shape[best]):
            best = i
    return best


def array_sharding(shape: tuple[int, ...], mesh: Mesh, mode: str = "fsdp", min_size: int = 2**14):
    """NamedSharding for one parameter-like array: split along its largest divisible axis under fsdp when
    it has at least ``min_size`` elements (small vectors and scalars stay replicated)."""
    if mode not in ("fsdp", "dp"):
        raise ValueError(f"sharding mode must be 'fsdp' or 'dp', got {mode!r}")
    n = mesh.shape[AXIS]
    if mode == "dp" or n == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return replicated(mesh)
    axis = _shard_axis(tuple(shape), n)
    if axis is None:
        return replicated(mesh)
    spec = [None] * len(shape)
    spec[axis] = AXIS
    return NamedSharding(mesh, P(*spec))


def qarray_split_axis(q: QArray, n: int, min_size: int = 2**14) -> int | None:
    """Which axis of the 2-D view to split ``q`` along over ``n`` devices so that each device gets whole
    tiles (codes and their scales together): 0 (rows) when the row tiles divide evenly and are full, else
    1 (columns) under the same rule (INT4 packs two codes per byte, so a column split also needs an even
    tile width), else None (replicate). Small arrays (< min_size codes) are not split."""
    m, k = q.shape_2d
    tm, tn = q.spec.resolve(m, k)
    gm, gn = q.scale.shape
    if n <= 1 or q.values.ndim != 2 or q.values.size < min_size:
        return None
    if gm % n == 0 and m == gm * tm:
        return 0
    if gn % n == 0 and k == gn * tn and (q.spec.bits == 8 or tn % 2 == 0):
        return 1
    return None


def qarray_sharding(q: QArray, mesh: Mesh, min_size: int = 2**14) -> QArray:
    """A QArray of NamedShardings (same pytree structure as ``q``) splitting codes and scales together
    along :func:`qarray_split_axis` (replicated when it is None)."""
    axis = qarray_split_axis(q, mesh.shape[AXIS], min_size)
    spec = P() if axis is None else (P(AXIS, None) if axis == 0 else P(None, AXIS))
    sh = NamedSharding(mesh, spec)
    return QArray(sh, sh, None if q.zero_point is None else sh, q.spec, q.shape, q.dtype)


def tree_shardings(tree: Any, mesh: Mesh, mode: str = "fsdp", min_size: int = 2**14) -> Any:
    """Shardings for every leaf of ``tree`` (arrays, ShapeDtypeStructs or QArrays, which shard as units).

    Adam's moments have the shapes of the params, so params and optimizer state get matching layouts.
    """

    def one(x):
        if isinstance(x, QArray):
            if mode == "fsdp":
                return qarray_sharding(x, mesh, min_size)
            return jax.tree.map(lambda _: replicated(mesh), x)
        return array_sharding(tuple(np.shape(x)), mesh, mode, min_size)

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, QArray))


def shard_batch(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """This process's rows of the global batch -> one global array split along the batch axis."""
    return jax.make_array_from_process_local_data(sharding, local)


# ------------------------------------------------------------------------------------ gradient reduction

REDUCE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_LAYER = re.compile(r"[A-Za-z]\w*?_(\d+)")  # h_3, layers_3 (not fc1, not ln_f)
_EMBEDDING = re.compile(r"emb|wte|wpe|tok", re.IGNORECASE)


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def _backward_rank(path) -> float:
    """When the backward pass finishes this leaf's gradient, larger first: the layers after the last block
    (final norm, output head) first, then block L-1 ... block 0 (the outermost ``name_<i>`` in the path),
    then the input embeddings (whose gradient, tied to the head or not, completes last)."""
    names = _path_names(path)
    for name in names:
        m = _LAYER.fullmatch(name)
        if m:
            return float(m.group(1))
    return -1.0 if names and _EMBEDDING.search(names[0]) else math.inf


def gradient_buckets(tree: Any, buckets: int) -> list[list[int]]:
    """Leaf indices (in ``jax.tree.leaves`` order) of ``tree`` split into at most ``buckets`` groups of whole
    layers, in the order the backward pass finishes them (see :func:`_backward_rank`), of about equal bytes.

    A layer is never split, so a model with G layer groups (blocks plus the parts before and after them)
    gets ``min(buckets, G)`` buckets. Only shapes and dtypes are read: ``tree`` may hold ShapeDtypeStructs.
    """
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    groups: dict[float, list[int]] = {}
    for i, (path, _) in enumerate(leaves):
        groups.setdefault(_backward_rank(path), []).append(i)
    order = [groups[r] for r in sorted(groups, reverse=True)]
    sizes = [sum(int(np.prod(np.shape(leaves[i][1]))) * np.dtype(leaves[i][1].dtype).itemsize for i in g)
             for g in order]
    n = min(buckets, len(order))
    out, i = [], 0
    for b in range(n):
        left = n - b
        target = sum(sizes[i:]) / left
        j, acc = i + 1, sizes[i]
        # Take the next layer while its middle still fits the bucket's share, leaving one per later bucket.
        while j < len(order) - (left - 1) and acc + sizes[j] / 2 <= target:
            acc += sizes[j]
            j += 1
        out.append([k for g in order[i:j] for k in g])
        i = j
    return out


def reduce_gradients(grads: Any, axis: str = AXIS, *, buckets: int = 0, dtype: Any = jnp.float32) -> Any:
    """The mean of ``grads`` over mesh axis ``axis``, inside ``shard_map``; same tree, shapes and dtypes.

    buckets: 0 reduces the whole tree in one ``psum`` (JAX emits one all-reduce per array, which XLA's
      all-reduce combiner merges as it sees fit). N >= 1 packs the gradients into at most N flat buffers of
      whole layers (:func:`gradient_buckets`), one all-reduce each: a bucket's reduction can start as soon as
      the backward has finished its layers, while the rest of the backward still runs.
    dtype: the dtype the all-reduce sums in. float32 gives the same sums however the buckets are packed;
      bfloat16 sends half the bytes and rounds each device's gradient (and the partial sums) to 8
      significant bits. The mean is taken in float32 and returned in each gradient's own dtype either way.
    """
    dtype = jnp.dtype(dtype)
    n = jax.lax.axis_size(axis)
    leaves, treedef = jax.tree.flatten(grads)
    if not buckets:
        summed = jax.lax.psum([g.astype(dtype) for g in leaves], axis)
        out = [(s.astype(jnp.float32) / n).astype(g.dtype) for s, g in zip(summed, leaves)]
        return jax.tree.unflatten(treedef, out)
    out = list(leaves)
    for idx in gradient_buckets(grads, buckets):
        flat = jnp.concatenate([leaves[i].astype(dtype).ravel() for i in idx])
        flat = jax.lax.psum(flat, axis).astype(jnp.float32) / n
        start = 0
        for i in idx:
            size = leaves[i].size
            out[i] = flat[start : start + size].reshape(leaves[i].shape).astype(leaves[i].dtype)
            start += size
    return jax.tree.unflatten(treedef, out)


def data_parallel_value_and_grad(
    loss_fn: Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array],
    mesh: Mesh,
    *,
    buckets: int = 0,
    reduce_dtype: Any = jnp.float32,
) -> Callable[[Any, jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]:
    """``jax.value_and_grad(loss_fn)`` split over the devices of ``mesh`` with ``shard_map``.

    ``loss_fn(params, inputs, targets, key) -> scalar``; inputs and targets (B, ...) are split along B over
    the ``"data"`` axis, params and key are replicated. Each device runs forward and backward on its own
    rows with its own key (``fold_in(key, device index)``); the loss and the gradients are averaged over the
    devices (:func:`reduce_gradients` with ``buckets`` and ``reduce_dtype``), so every device returns the
    same (loss, grads). With equal shards per device this equals ``value_and_grad`` of the mean loss.

    ``check_vma=False``: custom VJPs (the INT8 ops) return per-device weight gradients for replicated
    weights; the reduction is what makes them replicated.
    """
    reduce_dtype = jnp.dtype(reduce_dtype)
    explicit = buckets or reduce_dtype != jnp.float32

    def local(params, inputs, targets, key):
        key = jax.random.fold_in(key, jax.lax.axis_index(AXIS))
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets, key)
        if not explicit:
            return jax.lax.pmean((loss, grads), AXIS)
        return jax.lax.pmean(loss, AXIS), reduce_gradients(grads, AXIS, buckets=buckets, dtype=reduce_dtype)

    tokens = P(AXIS)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), tokens, tokens, P()), out_specs=P(), check_vma=False)
