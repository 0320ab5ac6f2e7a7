"""Compact quantized checkpoints: INT8 / packed-INT4 codes + scales on disk, loadable and runnable.

Layout of a checkpoint directory::

    manifest.json   {"format": "jq8-quantized", "format_version": 3, "rules": [...], "assignment": {...},
                     "weights": {path: {shape, dtype, spec}}, "embeddings": {path: {shape, dtype, spec}},
                     "folded_norms": [...], "float_dtype", "model_config", "extra": {...}}
    arrays.npz      uncompressed numpy archive: w/<path>/values|scale|zero_point (Dense kernels),
                    e/<path>/values|scale (INT8 embedding tables), p/<path> (float params),
                    s/<path> (static activation scales)

Versions: 2 added quantized embedding tables (``embeddings``, ``e/``) and the rule fields ``kind`` /
``optional``; version-1 checkpoints (no quantized tables) load unchanged. 3 packs INT4 codes in the
half-split layout of :func:`jq8.quant.pack_int4` (adjacent pairs before); older INT4 arrays are repacked on
load. ``folded_norms`` (the branches whose norm affine the float params hold folded into the next Dense,
:mod:`jq8.ptq.norm_fold`) is optional: without it the norms run with their stored (unit) gamma and (zero) beta,
which computes the same function.

Why npz + JSON and not Orbax: the checkpoint is a handful of arrays written once and read whole; an
uncompressed npz costs the bytes of the arrays plus ~100 B per entry (so the size on disk is what
:func:`jq8.ptq.bits_report` says), is one file and loads with numpy alone. Measured on the tiny GPT
(W4/8-A8, float embeddings and params fp16): bits 2,395,136 B; npz 2,404,872 B (+0.4%); Orbax
StandardCheckpointer of the same pytree 2,233,608 B in 12 files (it compresses: -7%); ``compress=True``
(np.savez_compressed) 2,214,616 B. INT8/INT4 codes barely compress (-5%); the savings came from the fp16
embeddings (now INT8 by default). Orbax is not bloated, but buys nothing here that ``compress=True``
does not.

Writes are atomic: everything goes to a temporary sibling directory which is renamed into place; an
existing destination is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jq8.ptq.schemes import QuantizedParams, QuantRule
from jq8.quant import QArray, QuantSpec, pack_int4, unpack_int4_pairs

FORMAT = "jq8-quantized"
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
ARRAYS = "arrays.npz"


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
    return {"tile": list(spec.tile), "bits": spec.bits, "symmetric": spec.symmetric}


def _put_qarray(arrays: dict[str, np.ndarray], key: str, q: QArray) -> dict:
    """Adds q's codes / scales (/ zero points) to ``arrays`` under ``key``; returns its manifest entry."""
    arrays[f"{key}/values"] = np.asarray(q.values)
    arrays[f"{key}/scale"] = np.asarray(q.scale, np.float32)
    if q.zero_point is not None:
        arrays[f"{key}/zero_point"] = np.asarray(q.zero_point, np.float32)
    return {"shape": list(q.shape), "dtype": jnp.dtype(q.dtype).name, "spec": _spec_json(q.spec)}


def _get_qarray(arrays: Mapping[str, np.ndarray], key: str, meta: Mapping[str, Any], version: int) -> QArray:
    s = meta["spec"]
    zp = arrays.get(f"{key}/zero_point")
    spec = QuantSpec(tuple(s["tile"]), s["bits"], s["symmetric"])
    shape = tuple(meta["shape"])
    values = jnp.asarray(arrays[f"{key}/values"])
    if spec.bits == 4 and version < 3:  # INT4 was packed in adjacent pairs before version 3: repack
        n = shape[-1] if shape else 1
        values = pack_int4(unpack_int4_pairs(values, n))
    return QArray(
        values,
        jnp.asarray(arrays[f"{key}/scale"]),
        None if zp is None else jnp.asarray(zp),
        spec,
        shape,
        jnp.dtype(meta["dtype"]),
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
    """Writes ``qp`` to ``directory`` atomically; float params are stored as ``float_dtype``.

    compress: zlib-compress the archive (a few % smaller, mostly from the float params; slower to load).

    Returns the directory. Raises FileExistsError if it exists and ``overwrite`` is False.
    """
    out = Path(directory)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (quantize.py: --overwrite)")
    if float_dtype not in ("float16", "float32", "bfloat16"):
        raise ValueError(f"float_dtype must be float16, bfloat16 or float32, got {float_dtype!r}")
    arrays: dict[str, np.ndarray] = {}
    weights_meta = {path: _put_qarray(arrays, f"w/{path}", q) for path, q in qp.weights.items()}
    tables_meta = {path: _put_qarray(arrays, f"e/{path}", q) for path, q in qp.embeddings.items()}
    store = jnp.dtype(float_dtype)
    float_meta: dict[str, str] = {}
    for path, v in _flatten(qp.params).items():
        dt = jnp.dtype(v.dtype)
        keep = dt if not jnp.issubdtype(dt, jnp.floating) else store
        # numpy has no bfloat16 of its own: bf16 goes to disk as its raw uint16 bits.
        a = np.asarray(jnp.asarray(v).astype(keep))
        arrays[f"p/{path}"] = a.view(np.uint16) if keep == jnp.bfloat16 else a
        float_meta[path] = keep.name
    for path, s in qp.act_scales.items():
        arrays[f"s/{path}"] = np.asarray(s, np.float32)
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with open(tmp / ARRAYS, "wb") as f:
            (np.savez_compressed if compress else np.savez)(f, **arrays)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of a quantized checkpoint; clear errors for anything that is not one."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"no quantized checkpoint directory at {d}")
    mpath = d / MANIFEST
    if not mpath.exists() or not (d / ARRAYS).exists():
        raise ValueError(f"{d} is not a jq8 quantized checkpoint (expected {MANIFEST} and {ARRAYS})")
    manifest = json.loads(mpath.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{d}: manifest format is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{d}: format_version {manifest['format_version']} is newer than this jq8 reads "
            f"({FORMAT_VERSION}); upgrade jq8"
        )
    return manifest


def load_quantized(directory: str | os.PathLike) -> tuple[QuantizedParams, dict]:
    """Reads a checkpoint written by :func:`save_quantized` -> (QuantizedParams, manifest).

    Float params come back as float32 (they were stored as ``manifest["float_dtype"]``).
    """
    d = Path(directory)
    manifest = read_manifest(d)
    with np.load(d / ARRAYS) as z:
        arrays = {k: z[k] for k in z.files}
    rules = tuple(QuantRule(**r) for r in manifest["rules"])  # v1 rules: kind / optional take defaults
    version = manifest.get("format_version", 1)
    weights = {path: _get_qarray(arrays, f"w/{path}", m, version) for path, m in manifest["weights"].items()}
    tables = {
        path: _get_qarray(arrays, f"e/{path}", m, version)
        for path, m in manifest.get("embeddings", {}).items()
    }
    flat = {}
    for path, dt in manifest["float_params"].items():
        a = arrays[f"p/{path}"]
        if dt == "bfloat16":
            a = a.view(jnp.bfloat16)
        a = jnp.asarray(a)
        flat[path] = a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a
    scales = {k[2:]: jnp.asarray(v) for k, v in arrays.items() if k.startswith("s/")}
    assignment = tuple((p, int(i)) for p, i in manifest["assignment"].items())
    folded = tuple(manifest.get("folded_norms", ()))
    qp = QuantizedParams(_unflatten(flat), weights, scales, rules, assignment, tables, folded)
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
