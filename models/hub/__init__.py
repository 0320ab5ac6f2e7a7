"""Pretrained checkpoints in and out: Hugging Face directories and GGUF files <-> jq8 GPT / LLaMA models.

One entry point for the scripts::

    config, params, tokenizer = load_pretrained("hf:path/to/dir")     # or "gguf:path/to/model.gguf"
    model = build_model(config, Policy.from_name("bf16"))
    logits = model.apply({"params": params}, tokens)

``params`` is a float32 numpy parameter tree in jq8's layout (:mod:`jq8.training.nn`), checked against
the model's own parameter shapes; ``tokenizer`` a ``tokenizers.Tokenizer`` (encode with
``add_special_tokens=True`` to get the BOS the checkpoint asks for, if any). :func:`export_hf` writes a
float jq8 model back as an HF directory. Every loading problem is a :class:`CheckpointError` (a
``ValueError``; a missing file is also a ``FileNotFoundError``) whose message is one line naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from models.config import ModelConfig
from models.hub.errors import CheckpointError, CheckpointNotFoundError
from models.hub.export import export_hf

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "SPEC_PREFIXES",
    "check_params",
    "export_hf",
    "is_pretrained_spec",
    "load_pretrained",
    "load_tokenizer",
]

SPEC_PREFIXES = ("hf:", "gguf:")


def is_pretrained_spec(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` names a pretrained checkpoint (``hf:DIR`` or ``gguf:FILE``)."""
    return isinstance(spec, str) and spec.startswith(SPEC_PREFIXES)


def check_params(config: ModelConfig, params: Any, source: str | os.PathLike) -> None:
    """Raises CheckpointError unless ``params`` has exactly the tree and shapes of ``config``'s model."""
    import jax
    import jax.numpy as jnp

    from jq8.training.policy import Policy
    from models.presets import build_model

    model = build_model(config, Policy.from_name("bf16"))
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    want = jax.eval_shape(lambda t: model.init(jax.random.PRNGKey(0), t), tokens)["params"]
    flat_want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(want)[0]}
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_got = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in flat}
    for key in sorted(set(flat_want) | set(flat_got)):
        if key not in flat_got:
            raise CheckpointError(source, f"no tensor for the model's parameter {key}")
        if key not in flat_want:
            raise CheckpointError(source, f"parameter {key} is not part of the model {config}")
        if tuple(flat_want[key]) != flat_got[key]:
            raise CheckpointError(source, f"parameter {key} has shape {flat_got[key]}, the model needs "
                                          f"{tuple(flat_want[key])}")


def load_tokenizer(spec: str):
    """The ``tokenizers.Tokenizer`` of ``"hf:DIR"`` / ``"gguf:FILE"`` alone (no weights are read)."""
    if not is_pretrained_spec(spec):
        raise CheckpointError(spec, "a pretrained tokenizer is 'hf:DIR' or 'gguf:FILE'")
    kind, _, path = spec.partition(":")
    path = os.path.expanduser(path)
    if kind == "hf":
        from models.hub.hf import load_tokenizer as hf_tokenizer

        return hf_tokenizer(path)
    from models.hub.gguf import GGUFFile, tokenizer_from_gguf

    return tokenizer_from_gguf(GGUFFile(path))


def load_pretrained(spec: str, *, tokenizer: bool = True) -> tuple[ModelConfig, dict[str, Any], Any]:
    """(ModelConfig, float32 numpy params, ``tokenizers.Tokenizer`` or None) of ``spec``.

    spec: ``"hf:DIR"`` (an HF checkpoint directory: config.json, model.safetensors or a sharded index,
    tokenizer.json) or ``"gguf:FILE"`` (a llama.cpp GGUF file). tokenizer: False skips the tokenizer
    (returned as None) instead of requiring it.
    """
    if not is_pretrained_spec(spec):
        raise CheckpointError(spec, "a pretrained checkpoint is 'hf:DIR' (Hugging Face directory) or "
                                    "'gguf:FILE' (llama.cpp GGUF file)")
    kind, _, path = spec.partition(":")
    path = os.path.expanduser(path)
    if kind == "hf":
        from models.hub.hf import load_hf

        config, params, tok = load_hf(path, tokenizer=tokenizer)
    else:
        from models.hub.gguf import load_gguf

        config, params, tok = load_gguf(path, tokenizer=tokenizer)
    check_params(config, params, Path(path))
    return config, params, tok
