"""Reading and writing safetensors files as numpy arrays, single files and sharded checkpoints.

Reading parses the format itself (an 8-byte little-endian header length, a JSON header of
``{name: {dtype, shape, data_offsets}}``, then the raw little-endian data) and memory-maps the data, so
bf16 tensors (which ``safetensors.numpy`` cannot return: numpy has no bfloat16) come back as
``ml_dtypes.bfloat16`` arrays and nothing is copied until a tensor is converted. Writing goes through
``safetensors.numpy.save_file``.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from models.hub.errors import CheckpointError, CheckpointNotFoundError

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
MAX_HEADER = 100 * 2**20  # the format's own limit on the JSON header


def read_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file: {name: read-only memory-mapped array} (shapes as stored)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(path, "no such safetensors file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(path, "not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(MAX_HEADER, size - 8):
            raise CheckpointError(path, f"not a safetensors file (header length {n} of a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(path, f"not a safetensors file (header is not JSON: {e})") from None
    header.pop("__metadata__", None)
    start, out = 8 + n, {}
    data = np.memmap(path, dtype=np.uint8, mode="r") if header else None
    for name, info in header.items():
        dtype = DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(path, f"tensor {name!r} has dtype {info.get('dtype')!r}; "
                                        f"readable: {sorted(DTYPES)}")
        shape = tuple(int(s) for s in info["shape"])
        lo, hi = (int(o) for o in info["data_offsets"])
        if hi - lo != int(np.prod(shape)) * np.dtype(dtype).itemsize or start + hi > size:
            raise CheckpointError(path, f"tensor {name!r}: data offsets {lo}..{hi} do not fit shape {shape} "
                                        f"of {info['dtype']} in a {size}-byte file (truncated?)")
        out[name] = data[start + lo : start + hi].view(dtype).reshape(shape)
    return out


def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    """The weight files of an HF checkpoint directory: model.safetensors, or every shard its index names."""
    directory = Path(directory)
    if (directory / SINGLE).is_file():
        return [directory / SINGLE]
    index = directory / INDEX
    if not index.is_file():
        raise CheckpointNotFoundError(directory, f"no {SINGLE} and no {INDEX} (only safetensors weights "
                                                 "are read; convert a pytorch_model.bin first)")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(index, f"not a safetensors index (needs a 'weight_map': {e})") from None
    files = sorted(set(weight_map.values()))
    for name in files:
        if not (directory / name).is_file():
            raise CheckpointNotFoundError(directory / name, f"shard named in {INDEX} is missing")
    return [directory / name for name in files]


class TensorStore(Mapping):
    """The tensors of a checkpoint directory (all shards) by name, with the file each came from."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self._tensors: dict[str, np.ndarray] = {}
        self._file: dict[str, Path] = {}
        for path in checkpoint_files(self.directory):
            for name, array in read_file(path).items():
                if name in self._tensors:
                    raise CheckpointError(path, f"tensor {name!r} also appears in {self._file[name].name}")
                self._tensors[name], self._file[name] = array, path

    def __getitem__(self, name: str) -> np.ndarray:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def file_of(self, name: str) -> Path:
        """The file holding ``name`` (the directory's weights file when the name is absent)."""
        return self._file.get(name, self.directory / SINGLE)


def write_file(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
               metadata: Mapping[str, str] | None = None) -> None:
    """Writes ``tensors`` (contiguous numpy arrays, no bf16) as one safetensors file, atomically."""
    from safetensors.numpy import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp),
              metadata=dict(metadata) if metadata else None)
    os.replace(tmp, path)
