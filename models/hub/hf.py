"""Hugging Face checkpoint directories -> jq8 model configs and parameter trees (no PyTorch needed).

A directory holds ``config.json``, the weights (``model.safetensors`` or the shards that
``model.safetensors.index.json`` names) and usually ``tokenizer.json``. Supported ``model_type`` values
(:data:`SUPPORTED`):

* ``gpt2``: Conv1D weights are stored (in, out), which is already jq8's Dense layout; learned positions;
  the LM head is the token embedding (tied). ``activation_function`` "gelu_new" (GPT-2's own) is the tanh
  form of GELU, "gelu" the exact one.
* ``llama``, ``mistral``, ``qwen2`` (SmolLM checkpoints are ``llama``): RMSNorm eps, rotary theta,
  grouped-query attention (``num_key_value_heads``, kept grouped), tied or untied head, Qwen2's q/k/v
  biases. torch ``Linear`` weights are (out, in) and are transposed; q, k and v are concatenated into
  jq8's one qkv projection (D, (H + 2 Hkv) Dh). The half-split rotary layout of these checkpoints is
  jq8's own, so no rows are permuted.

Every tensor is checked against the shape the config implies, and every tensor of the file must be used
(a checkpoint of another architecture fails instead of loading half); the errors are
:class:`~models.hub.errors.CheckpointError` lines naming the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from models.config import ModelConfig
from models.hub.errors import CheckpointError, CheckpointNotFoundError
from models.hub.safetensors_io import TensorStore

SUPPORTED = ("gpt2", "llama", "mistral", "qwen2")
LLAMA_TYPES = ("llama", "mistral", "qwen2")
GELU = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"

Params = dict[str, Any]


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointNotFoundError(path, "no such file")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"not valid JSON ({e})") from None


def _rope_theta(hf: Mapping[str, Any], path: Path) -> float:
    """rotary base: ``rope_theta``, or ``rope_parameters.rope_theta``; scaled rotary variants refused."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type")) or params.get("rope_type", "default")
    if kind != "default":
        raise CheckpointError(path, f"rotary scaling {kind!r} is not supported (only the default rotary)")
    return float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))


def config_from_hf(hf: Mapping[str, Any], path: str | os.PathLike = CONFIG) -> ModelConfig:
    """The jq8 :class:`ModelConfig` of an HF ``config.json`` dict (``path`` names it in errors)."""
    path = Path(path)
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        supported = ", ".join(SUPPORTED)
        raise CheckpointError(path, f"model_type {kind!r} is not supported; supported: {supported}")

    def need(*keys: str):
        for k in keys:
            if k in hf:
                return hf[k]
        raise CheckpointError(path, f"{kind} config has no {keys[0]!r}")

    def refuse(key: str, ok, what: str):
        if hf.get(key, ok) != ok:
            raise CheckpointError(path, f"{key}={hf[key]!r} is not supported ({what})")

    try:
        if kind == "gpt2":
            act = hf.get("activation_function", "gelu_new")
            if act not in GELU:
                raise CheckpointError(path, f"activation_function {act!r} is not supported; "
                                            f"one of {sorted(GELU)}")
            refuse("scale_attn_by_inverse_layer_idx", False, "jq8 attention scales by 1/sqrt(head_dim) only")
            refuse("reorder_and_upcast_attn", False, "jq8 attention has no reordered upcast")
            refuse("scale_attn_weights", True, "jq8 attention always scales by 1/sqrt(head_dim)")
            refuse("tie_word_embeddings", True, "jq8's GPT ties its LM head to the token embedding")
            return ModelConfig(
                family="gpt",
                vocab_size=int(need("vocab_size")),
                max_seq_len=int(need("n_positions", "max_position_embeddings")),
                num_layers=int(need("n_layer", "num_hidden_layers")),
                num_heads=int(need("n_head", "num_attention_heads")),
                d_model=int(need("n_embd", "hidden_size")),
                mlp_hidden=int(hf.get("n_inner") or 0),
                norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                activation=GELU[act],
            )
        refuse("hidden_act", "silu", "the LLaMA MLP is SwiGLU with silu")
        refuse("mlp_bias", False, "the MLP has no biases")
        if kind != "qwen2":
            refuse("attention_bias", False, "LLaMA biases on all four projections; Qwen2 q/k/v ones load")
        d, heads = int(need("hidden_size")), int(need("num_attention_heads"))
        head_dim = hf.get("head_dim")
        if head_dim is not None and head_dim * heads != d:
            raise CheckpointError(path, f"head_dim={head_dim} x {heads} heads != hidden_size={d} (jq8 "
                                        "needs head_dim = hidden_size / num_attention_heads)")
        max_len = int(hf.get("max_position_embeddings", 2048))
        window = hf.get("sliding_window") if (kind == "mistral" or hf.get("use_sliding_window")) else None
        if window:  # within the window, sliding-window attention is full causal attention
            max_len = min(max_len, int(window))
        return ModelConfig(
            family="llama",
            vocab_size=int(need("vocab_size")),
            max_seq_len=max_len,
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            d_model=d,
            mlp_hidden=int(need("intermediate_size")),
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            rope_theta=_rope_theta(hf, path),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            qkv_bias=kind == "qwen2",
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(path, f"invalid {kind} config: {e}") from None


class _Taker:
    """Pops tensors from a store by name, checking shapes and converting to float32; reports leftovers."""

    def __init__(self, store: Mapping[str, np.ndarray], file_of, prefix: str = ""):
        self.store, self.file_of, self.prefix = store, file_of, prefix
        self.used: set[str] = set()

    def __call__(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        full = self.prefix + name
        if full not in self.store:
            raise CheckpointError(self.file_of(full), f"tensor {full!r} is missing")
        a = self.store[full]
        if tuple(a.shape) != tuple(shape):
            raise CheckpointError(self.file_of(full), f"tensor {full!r} has shape {tuple(a.shape)}, but the "
                                                      f"config implies {tuple(shape)}")
        self.used.add(full)
        return np.asarray(a, dtype=np.float32)

    def has(self, name: str) -> bool:
        return self.prefix + name in self.store

    def check_all_used(self, ignore: tuple[str, ...] = ()) -> None:
        left = sorted(n for n in self.store if n not in self.used and not n.endswith(ignore))
        if left:
            shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
            raise CheckpointError(self.file_of(left[0]), f"unexpected tensors for this architecture: {shown}")


def _prefix(store: Mapping[str, np.ndarray], probe: str, prefixes: tuple[str, ...]) -> str:
    for p in prefixes:
        if p + probe in store:
            return p
    return prefixes[0]


def gpt2_params(take: _Taker, c: ModelConfig) -> Params:
    """jq8 GPT parameters from GPT-2 tensor names (``take`` already strips any ``transformer.`` prefix)."""
    d, hid = c.d_model, c.hidden

    def dense(name, n_in, n_out):
        return {"kernel": take(f"{name}.weight", (n_in, n_out)), "bias": take(f"{name}.bias", (n_out,))}

    def norm(name):
        return {"scale": take(f"{name}.weight", (d,)), "bias": take(f"{name}.bias", (d,))}

    p: Params = {
        "wte": {"embedding": take("wte.weight", (c.vocab_size, d))},
        "wpe": {"embedding": take("wpe.weight", (c.max_seq_len, d))},
        "ln_f": norm("ln_f"),
    }
    for i in range(c.num_layers):
        h = f"h.{i}"
        p[f"h_{i}"] = {
            "attn": {"norm": norm(f"{h}.ln_1"), "qkv": dense(f"{h}.attn.c_attn", d, 3 * d),
                     "out": dense(f"{h}.attn.c_proj", d, d)},
            "mlp": {"norm": norm(f"{h}.ln_2"), "fc1": dense(f"{h}.mlp.c_fc", d, hid),
                    "fc2": dense(f"{h}.mlp.c_proj", hid, d)},
        }
    return p


def llama_params(take: _Taker, c: ModelConfig, head: _Taker | None) -> Params:
    """jq8 LLaMA parameters from LLaMA / Mistral / Qwen2 tensor names (``take`` strips ``model.``).

    ``head``: the taker for the untied ``lm_head.weight`` (its names carry no ``model.`` prefix).
    """
    d, hid, dh = c.d_model, c.hidden, c.head_dim
    nq, nkv = c.num_heads * dh, c.kv_heads * dh

    def linear(name, n_in, n_out):  # torch Linear (out, in) -> jq8 Dense kernel (in, out)
        return take(f"{name}.weight", (n_out, n_in)).T

    p: Params = {
        "wte": {"embedding": take("embed_tokens.weight", (c.vocab_size, d))},
        "ln_f": {"scale": take("norm.weight", (d,))},
    }
    for i in range(c.num_layers):
        a, m = f"layers.{i}.self_attn", f"layers.{i}.mlp"
        qkv = {"kernel": np.concatenate([linear(f"{a}.q_proj", d, nq), linear(f"{a}.k_proj", d, nkv),
                                         linear(f"{a}.v_proj", d, nkv)], axis=1)}
        if c.qkv_bias:
            qkv["bias"] = np.concatenate([take(f"{a}.q_proj.bias", (nq,)), take(f"{a}.k_proj.bias", (nkv,)),
                                          take(f"{a}.v_proj.bias", (nkv,))])
        p[f"h_{i}"] = {
            "attn": {"norm": {"scale": take(f"layers.{i}.input_layernorm.weight", (d,))}, "qkv": qkv,
                     "out": {"kernel": linear(f"{a}.o_proj", nq, d)}},
            "mlp": {"norm": {"scale": take(f"layers.{i}.post_attention_layernorm.weight", (d,))},
                    "fc1": {"kernel": linear(f"{m}.up_proj", d, hid)},
                    "gate": {"kernel": linear(f"{m}.gate_proj", d, hid)},
                    "fc2": {"kernel": linear(f"{m}.down_proj", hid, d)}},
        }
    if not c.tied_head:
        p["lm_head"] = {"kernel": head("lm_head.weight", (c.vocab_size, d)).T}
    return p


def load_tokenizer(directory: str | os.PathLike):
    """The ``tokenizers.Tokenizer`` of ``directory/tokenizer.json`` (CheckpointNotFoundError if absent)."""
    from tokenizers import Tokenizer

    path = Path(directory) / TOKENIZER
    if not path.is_file():
        raise CheckpointNotFoundError(path, "tokenizer missing (jq8 reads the fast-tokenizer tokenizer.json; "
                                            "save one with the model's tokenizer.save_pretrained)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own Exception type for malformed files
        raise CheckpointError(path, f"not a tokenizers JSON file ({str(e).splitlines()[0]})") from None


def load_hf(directory: str | os.PathLike, *, tokenizer: bool = True) -> tuple[ModelConfig, Params, Any]:
    """(ModelConfig, float32 numpy parameter tree, ``tokenizers.Tokenizer`` or None) of an HF checkpoint dir.

    tokenizer: read ``tokenizer.json`` (its absence is an error); False returns None in its place.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointNotFoundError(directory, "no such checkpoint directory")
    config = config_from_hf(read_json(directory / CONFIG), directory / CONFIG)
    store = TensorStore(directory)
    if config.family == "gpt":
        take = _Taker(store, store.file_of, _prefix(store, "wte.weight", ("", "transformer.")))
        params = gpt2_params(take, config)
        # attention-mask buffers some GPT-2 checkpoints carry; a tied head saved anyway
        take.check_all_used(ignore=(".attn.bias", ".attn.masked_bias", "lm_head.weight"))
    else:
        take = _Taker(store, store.file_of, _prefix(store, "embed_tokens.weight", ("model.", "")))
        head = _Taker(store, store.file_of)
        params = llama_params(take, config, head)
        take.used |= head.used
        tied = ("lm_head.weight",) if config.tied_head else ()
        take.check_all_used(ignore=("rotary_emb.inv_freq", *tied))
    tok = load_tokenizer(directory) if tokenizer else None
    return config, params, tok
