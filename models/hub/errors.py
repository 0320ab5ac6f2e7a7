"""The errors a checkpoint loader raises: one line naming the file and the problem.

Scripts catch :class:`CheckpointError` (a ``ValueError``) and print it; a missing file or shard is a
:class:`CheckpointNotFoundError`, which is also a ``FileNotFoundError``.
"""

from __future__ import annotations

import os


class CheckpointError(ValueError):
    """A checkpoint that cannot be read into a jq8 model: ``"<file>: <problem>"``."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint file (config, weights, shard, tokenizer) that does not exist."""
