"""Data parallel + FSDP-style parameter sharding over all devices, with ``jax.sharding``.

One mesh axis, ``"data"``, spans every device (of every process). The batch is split along it; with
``mode="fsdp"`` each large parameter (and its Adam moments) is also split along it (ZeRO-3 style: XLA
all-gathers a weight before its use and reduce-scatters its gradient); ``mode="dp"`` replicates parameters.

Quantized arrays (:class:`jq8.quant.QArray`) are sharded as one unit: the codes and the per-tile scales are
split along the same axis at tile boundaries, so every device holds the scales of exactly the codes it holds.

Multi-host: call :func:`initialize_distributed` (``train.py --distributed=True``) before any other JAX call.
On a cluster JAX reads the coordinator address, process count and id from the environment (SLURM, Open MPI,
Cloud TPU/GKE); elsewhere set ``JAX_COORDINATOR_ADDRESS=host:port``, ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID`` on every host. Each process then feeds its own slice of the global batch
(:func:`shard_batch`), and ``jax.devices()`` lists the devices of all hosts.
"""

from __future__ import annotations

import os
from typing import Any

import jax
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
