"""Compact quantized checkpoints: INT8 / packed-INT4 codes + scales on disk, restorable onto a device mesh.

A checkpoint is an Orbax checkpoint directory (format version 4)::

    manifest/metadata       JSON item: {"format": "jq8-quantized", "format_version": 4, "rules": [...],
                            "assignment": {...}, "weights": {path: {shape, dtype, spec}},
                            "embeddings": {path: {shape, dtype, spec}}, "folded_norms": [...],
                            "float_params": {path: stored dtype}, "float_dtype", "model_config", "extra"}
    arrays/                 Orbax PyTree (OCDBT) of the arrays, nested by module path:
                            w/<path>/values|scale[|zero_point]   Dense kernels, (N, K) codes + scales
                            e/<path>/values|scale                quantized embedding tables, (V, D)
                            p/<path>                             float params, stored as ``float_dtype``
                            s/<path>                             static activation scales, () float32

INT4 codes stay packed two per byte (:func:`jq8.quant.pack_int4`) and nothing is compressed by default, so
the size on disk is what :func:`jq8.ptq.bits_report` counts plus ~16 KB of Orbax metadata and ~0.6 KB per
array. Orbax alone restores it: ``ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(path,
args=ocp.args.Composite(arrays=ocp.args.PyTreeRestore(), manifest=ocp.args.JsonRestore()))``.

:func:`load_quantized` restores each array straight into its target sharding (``mesh=`` shards the
output-channel axis of every weight, see :func:`output_channel_shardings`). Arrays are stored in chunks of
at most :data:`CHUNK_BYTES`: a device reads the chunks that overlap its slice, no host buffers more than a
few chunks of an array it does not hold, and a model larger than one host's memory restores across a mesh.

Versions that load: 4 (this layout) and 3 (``manifest.json`` + ``arrays.npz``, the layout jq8 0.1.0 wrote:
same keys in an uncompressed numpy archive; ``folded_norms`` may be absent, the norms then run with their
stored unit gamma / zero beta, which computes the same function; an npz archive is read whole on the host
before it is placed on the mesh). Versions 1 and 2 (INT4 packed in adjacent pairs) were written only by
pre-release development snapshots, for a few hours before format 3, and no released jq8 wrote them: they are
refused with the fix (quantize the model again). A newer version is refused with the fix: upgrade jq8.

Writes are atomic: everything goes to a temporary sibling directory which is renamed into place; an
existing destination is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from jq8.ptq.schemes import QuantizedParams, QuantRule
from jq8.quant import QArray, QuantSpec
from jq8.training.checkpoint import describe_error

FORMAT = "jq8-quantized"
FORMAT_VERSION = 4
MANIFEST = "manifest/metadata"  # the manifest (Orbax JSON item), relative to the checkpoint directory
ARRAYS = "arrays"  # the Orbax PyTree of the arrays
NPZ_MANIFEST, NPZ_ARRAYS = "manifest.json", "arrays.npz"  # format 3
_NPZ_VERSION = 3
# Arrays are stored in chunks of at most this many bytes (Orbax cuts the largest axis first): a device
# restoring a slice reads the chunks that overlap it, and no host buffers a whole large array.
CHUNK_BYTES = 8 << 20

# Where each array of a checkpoint goes: (key, array) -> Sharding. key: "w/<path>" / "e/<path>" for a
# quantized weight / table, given as a QArray of ShapeDtypeStructs (its codes, scales and zero points all
# take the returned sharding); "p/<path>" (float param) / "s/<path>" (activation scale) with a
# ShapeDtypeStruct.
ShardingFn = Callable[[str, "jax.ShapeDtypeStruct | QArray"], jax.sharding.Sharding]


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        p = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(_flatten(v, p))
        else:
            out[p] = v
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        keys = path.split("/")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = v
    return tree


def _spec_json(spec: QuantSpec) -> dict:
    out = {"tile": list(spec.tile), "bits": spec.bits, "symmetric": spec.symmetric}
    if not spec.exact_zero:
        out["exact_zero"] = False
    return out


def _put_qarray(arrays: dict[str, jax.Array], key: str, q: QArray) -> dict:
    """Adds q's codes / scales (/ zero points) to ``arrays`` under ``key``; returns its manifest entry."""
    arrays[f"{key}/values"] = q.values
    arrays[f"{key}/scale"] = jnp.asarray(q.scale, jnp.float32)
    if q.zero_point is not None:
        arrays[f"{key}/zero_point"] = jnp.asarray(q.zero_point, jnp.float32)
    return {"shape": list(q.shape), "dtype": jnp.dtype(q.dtype).name, "spec": _spec_json(q.spec)}


def _get_qarray(arrays: Mapping[str, jax.Array], key: str, meta: Mapping[str, Any]) -> QArray:
    s = meta["spec"]
    return QArray(
        arrays[f"{key}/values"],
        arrays[f"{key}/scale"],
        arrays.get(f"{key}/zero_point"),
        QuantSpec(tuple(s["tile"]), s["bits"], s["symmetric"], s.get("exact_zero", True)),
        tuple(meta["shape"]),
        jnp.dtype(meta["dtype"]),
    )


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary sibling of ``directory`` to fill; on success it is renamed to ``directory``.

    On any error the temporary directory is removed and ``directory`` is left as it was. An existing
    ``directory`` is replaced only with ``overwrite=True`` (else FileExistsError, before anything is written).
    """
    out = Path(directory).absolute()  # Orbax takes absolute paths only
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (quantize.py: --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp / "new"
        if out.exists():
            os.replace(out, tmp / "old")
        os.replace(tmp / "new", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(
        ocp.CompositeCheckpointHandler(arrays=ocp.PyTreeCheckpointHandler(), manifest=ocp.JsonCheckpointHandler())
    )


def save_quantized(
    directory: str | os.PathLike,
    qp: QuantizedParams,
    *,
    model_config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    float_dtype: str = "float16",
    overwrite: bool = False,
    compress: bool = False,
) -> Path:
    """Writes ``qp`` to ``directory`` (an Orbax checkpoint, format 4) atomically.

    Float params are stored as ``float_dtype`` (float16, bfloat16 or float32); integer params as they are.
    Arrays may be sharded over this process's devices (the write is single-process: the atomic rename
    happens here). compress: zstd-compress the arrays (a few % smaller, mostly from the float params: INT8 /
    INT4 codes barely compress).

    Returns the directory. Raises FileExistsError if it exists and ``overwrite`` is False.
    """
    if float_dtype not in ("float16", "float32", "bfloat16"):
        raise ValueError(f"float_dtype must be float16, bfloat16 or float32, got {float_dtype!r}")
    arrays: dict[str, jax.Array] = {}
    weights_meta = {path: _put_qarray(arrays, f"w/{path}", q) for path, q in qp.weights.items()}
    tables_meta = {path: _put_qarray(arrays, f"e/{path}", q) for path, q in qp.embeddings.items()}
    store = jnp.dtype(float_dtype)
    float_meta: dict[str, str] = {}
    for path, v in _flatten(qp.params).items():
        v = jnp.asarray(v)
        keep = store if jnp.issubdtype(v.dtype, jnp.floating) else v.dtype
        arrays[f"p/{path}"] = v.astype(keep)
        float_meta[path] = jnp.dtype(keep).name
    for path, s in qp.act_scales.items():
        arrays[f"s/{path}"] = jnp.asarray(s, jnp.float32)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "rules": [r.__dict__ for r in qp.rules],
        "assignment": {p: i for p, i in qp.assignment},
        "weights": weights_meta,
        "embeddings": tables_meta,
        "folded_norms": list(qp.folded_norms),
        "float_params": float_meta,
        "float_dtype": float_dtype,
        "model_config": dict(model_config or {}),
        "extra": dict(extra or {}),
    }
    tree = _unflatten(arrays)
    save_args = _unflatten({k: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES) for k in arrays})
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        handler = ocp.CompositeCheckpointHandler(
            arrays=ocp.PyTreeCheckpointHandler(use_compression=compress),
            manifest=ocp.JsonCheckpointHandler(),
        )
        with ocp.Checkpointer(handler) as ckptr:
            ckptr.save(
                tmp,
                args=ocp.args.Composite(
                    arrays=ocp.args.PyTreeSave(tree, save_args=save_args), manifest=ocp.args.JsonSave(manifest)
                ),
            )
    return Path(directory)


def _check_version(d: Path, manifest: Mapping[str, Any], layout_version: int) -> None:
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{d}: manifest format is {manifest.get('format')!r}, expected {FORMAT!r}")
    v = manifest.get("format_version")
    if not isinstance(v, int):
        raise ValueError(f"{d}: manifest has no integer format_version (got {v!r}); write it again with quantize.py")
    if v > FORMAT_VERSION:
        raise ValueError(f"{d}: format_version {v} is newer than this jq8 reads (up to {FORMAT_VERSION}); upgrade jq8")
    if v < _NPZ_VERSION:
        raise ValueError(
            f"{d}: format_version {v} was written by a pre-release development build of jq8 and is no longer "
            f"read (versions {_NPZ_VERSION} and {FORMAT_VERSION} are); quantize the model again with quantize.py"
        )
    if v != layout_version:
        raise ValueError(f"{d}: format_version {v} does not match its file layout (that of version {layout_version})")


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of a quantized checkpoint (format 3 or 4); clear errors for anything that is not one."""
    d = Path(directory).absolute()
    if not d.is_dir():
        raise FileNotFoundError(f"no quantized checkpoint directory at {d}")
    if (d / MANIFEST).is_file() and (d / ARRAYS).is_dir():
        path, version = d / MANIFEST, FORMAT_VERSION
    elif (d / NPZ_MANIFEST).is_file() and (d / NPZ_ARRAYS).is_file():
        path, version = d / NPZ_MANIFEST, _NPZ_VERSION
    else:
        raise ValueError(
            f"{d} is not a jq8 quantized checkpoint (expected {MANIFEST} and {ARRAYS}/, or {NPZ_MANIFEST} and "
            f"{NPZ_ARRAYS})"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} is not a jq8 quantized checkpoint manifest")
    _check_version(d, manifest, version)
    return manifest


def output_channel_shardings(mesh: jax.sharding.Mesh, axis: str | tuple[str, ...] | None = None) -> ShardingFn:
    """The sharding rule :func:`load_quantized` uses for ``mesh=``, as a :data:`ShardingFn`.

    axis: the mesh axis (or axes) to shard over; default all of ``mesh``'s axes (n devices in all).
    A quantized weight (N, K) or table (V, D) is split along its rows (output channels) when they split
    into n runs of whole scale tiles: codes, scales and zero points together, so each device holds the
    scales of its own rows. A float param of 2+ dimensions is split along its last axis (the output
    channels of a Flax kernel (K, N)) when n divides it, else along its first when n divides that. The rest
    (1-D params such as norms and biases, scalars, anything n does not divide) is replicated.
    """
    names = tuple(mesh.axis_names) if axis is None else (axis if isinstance(axis, tuple) else (axis,))
    missing = [a for a in names if a not in mesh.axis_names]
    if missing:
        raise ValueError(f"axis {missing} is not an axis of the mesh (its axes: {mesh.axis_names})")
    n = int(np.prod([mesh.shape[a] for a in names]))
    part = names[0] if len(names) == 1 else names

    def split(ndim: int, dim: int | None) -> NamedSharding:
        spec = [None] * ndim
        if dim is not None:
            spec[dim] = part
        return NamedSharding(mesh, PartitionSpec(*spec))

    def rule(key: str, x: jax.ShapeDtypeStruct | QArray) -> jax.sharding.Sharding:
        if isinstance(x, QArray):
            m, k = x.shape_2d
            tm, _ = x.spec.resolve(m, k)
            return split(x.values.ndim, 0 if m % (n * tm) == 0 else None)
        shape = tuple(x.shape)
        if len(shape) < 2:
            return split(len(shape), None)
        dims = [len(shape) - 1, 0]
        return split(len(shape), next((i for i in dims if shape[i] % n == 0), None))

    return rule


def _sharding_fn(mesh, shardings) -> ShardingFn:
    if mesh is not None and shardings is not None:
        raise ValueError("pass mesh= or shardings=, not both")
    if mesh is not None:
        return output_channel_shardings(mesh)
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        return lambda key, x, s=shardings: s
    if callable(shardings):
        return shardings
    raise TypeError(
        f"shardings must be a jax.sharding.Sharding or a function (key, array) -> Sharding, got {shardings!r}"
    )


def _placements(
    manifest: Mapping[str, Any], shapes: Mapping[str, jax.ShapeDtypeStruct], where: ShardingFn
) -> dict[str, jax.sharding.Sharding]:
    """The sharding of every stored array: ``where`` is asked once per quantized array (its codes, scales
    and zero points go alike) and once per other array."""
    out: dict[str, jax.sharding.Sharding] = {}
    for prefix, section in (("w", "weights"), ("e", "embeddings")):
        for path, meta in manifest[section].items():
            key = f"{prefix}/{path}"
            q = _get_qarray(shapes, key, meta)
            s = where(key, q)
            out.update({f"{key}/{f}": s for f in ("values", "scale", "zero_point") if f"{key}/{f}" in shapes})
    for key, x in shapes.items():
        if key not in out:
            out[key] = where(key, x)
    return out


def _restore_orbax(d: Path, manifest: Mapping[str, Any], where: ShardingFn) -> dict[str, jax.Array]:
    """The arrays of a format-4 checkpoint, each read straight into its sharding; float params as float32."""
    floats = {f"p/{p}" for p, dt in manifest["float_params"].items() if jnp.issubdtype(jnp.dtype(dt), jnp.floating)}
    with _checkpointer() as ckptr:
        try:
            stored = _flatten(ckptr.metadata(d).item_metadata["arrays"].tree)
            shapes = {
                k: jax.ShapeDtypeStruct(tuple(m.shape), jnp.float32 if k in floats else m.dtype)
                for k, m in stored.items()
            }
            placed = _placements(manifest, shapes, where)
            args = {
                k: ocp.ArrayRestoreArgs(sharding=placed[k], global_shape=x.shape, dtype=x.dtype)
                for k, x in shapes.items()
            }
            restore = ocp.args.PyTreeRestore(item=_unflatten({k: 0 for k in shapes}), restore_args=_unflatten(args))
            out = ckptr.restore(d, args=ocp.args.Composite(arrays=restore))["arrays"]
        except Exception as e:  # any storage / format error: name the checkpoint and the cause
            raise ValueError(f"{d}: cannot read the arrays of this checkpoint ({describe_error(e)})") from e
    return _flatten(out)


def _restore_npz(d: Path, manifest: Mapping[str, Any], where: ShardingFn) -> dict[str, jax.Array]:
    """The arrays of a format-3 checkpoint (read whole on the host), placed by ``where``; float params
    as float32."""
    with np.load(d / NPZ_ARRAYS) as z:
        arrays = {k: z[k] for k in z.files}
    for path, dt in manifest["float_params"].items():
        a = arrays[f"p/{path}"]
        if dt == "bfloat16":  # numpy has no bfloat16: format 3 stored its raw uint16 bits
            a = a.view(jnp.bfloat16)
        arrays[f"p/{path}"] = a.astype(np.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a
    placed = _placements(manifest, {k: jax.ShapeDtypeStruct(a.shape, a.dtype) for k, a in arrays.items()}, where)
    return {k: jax.device_put(a, placed[k]) for k, a in arrays.items()}


def load_quantized(
    directory: str | os.PathLike,
    *,
    mesh: jax.sharding.Mesh | None = None,
    shardings: jax.sharding.Sharding | ShardingFn | None = None,
) -> tuple[QuantizedParams, dict]:
    """Reads a checkpoint written by :func:`save_quantized` (or format 3) -> (QuantizedParams, manifest).

    mesh: restore onto this mesh, every array sharded by :func:`output_channel_shardings` (weights along
      their output channels); each device reads only its slice.
    shardings: instead, one Sharding for every array, or a :data:`ShardingFn` (key, array) -> Sharding:
      ``("w/h_0/mlp/fc1", QArray of ShapeDtypeStructs)`` for a quantized weight (codes, scales and zero
      points go alike), ``("p/ln_f/scale", ShapeDtypeStruct)`` for a float param.
    Neither: every array on the first local device.
    Codes keep their stored dtypes (int8, or uint8 holding two INT4 codes); float params come back float32.
    """
    d = Path(directory).absolute()  # Orbax takes absolute paths only
    manifest = read_manifest(d)
    where = _sharding_fn(mesh, shardings)
    if manifest["format_version"] == _NPZ_VERSION:
        arrays = _restore_npz(d, manifest, where)
    else:
        arrays = _restore_orbax(d, manifest, where)
    rules = tuple(QuantRule(**r) for r in manifest["rules"])
    weights = {path: _get_qarray(arrays, f"w/{path}", m) for path, m in manifest["weights"].items()}
    tables = {path: _get_qarray(arrays, f"e/{path}", m) for path, m in manifest["embeddings"].items()}
    params = _unflatten({path: arrays[f"p/{path}"] for path in manifest["float_params"]})
    scales = {k[2:]: v for k, v in arrays.items() if k.startswith("s/")}
    assignment = tuple((p, int(i)) for p, i in manifest["assignment"].items())
    folded = tuple(manifest.get("folded_norms", ()))
    qp = QuantizedParams(params, weights, scales, rules, assignment, tables, folded)
    return qp, manifest


def disk_bytes(directory: str | os.PathLike) -> int:
    """Total size of the files under ``directory``."""
    return sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())


def as_stored(qp: QuantizedParams, float_dtype: str = "float16") -> QuantizedParams:
    """``qp`` with its float params rounded through ``float_dtype`` (what a saved checkpoint holds)."""
    dt = jnp.dtype(float_dtype)

    def rt(v):
        return v.astype(dt).astype(v.dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v

    return dataclasses.replace(qp, params=jax.tree_util.tree_map(rt, qp.params))
