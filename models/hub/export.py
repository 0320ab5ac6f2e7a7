"""Float jq8 GPT / LLaMA models -> Hugging Face checkpoint directories that ``transformers`` loads.

The inverse of :mod:`models.hub.hf`: a GPT becomes ``gpt2`` (``GPT2LMHeadModel``), a LLaMA ``llama``
(``LlamaForCausalLM``), or ``qwen2`` (``Qwen2ForCausalLM``) when its q/k/v projection has biases. The
directory gets ``config.json``, ``model.safetensors`` (float32) and, when a tokenizer is given,
``tokenizer.json``. It is written next to its destination and renamed into place, so a failed export
leaves nothing half-written, and an existing destination is only replaced with ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from models.config import ModelConfig
from models.hub.safetensors_io import SINGLE, write_file

GELU_NAMES = {"gelu": "gelu", "gelu_tanh": "gelu_new"}


def _np(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def hf_config(c: ModelConfig, tokenizer=None) -> dict[str, Any]:
    """The ``config.json`` dict of a jq8 config (special token ids from ``tokenizer`` when it has them)."""
    special = {}
    if tokenizer is not None:
        for key, names in (("bos_token_id", ("<|endoftext|>", "<s>", "<|im_start|>")),
                           ("eos_token_id", ("<|endoftext|>", "</s>", "<|im_end|>"))):
            ids = [tokenizer.token_to_id(n) for n in names]
            ids = [i for i in ids if i is not None]
            if ids:
                special[key] = ids[0]
    eps = 1e-5 if c.norm_eps is None else c.norm_eps  # see export_hf on configs without norm_eps
    if c.family == "gpt":
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
            "n_positions": c.max_seq_len, "n_embd": c.d_model, "n_layer": c.num_layers, "n_head": c.num_heads,
            "n_inner": c.hidden, "activation_function": GELU_NAMES[c.mlp_activation],
            "layer_norm_epsilon": eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "tie_word_embeddings": True, "torch_dtype": "float32", **special,
        }
    qwen = c.qkv_bias
    return {
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen else "llama", "vocab_size": c.vocab_size, "hidden_size": c.d_model,
        "intermediate_size": c.hidden, "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.kv_heads, "head_dim": c.head_dim, "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": eps, "rope_theta": c.rope_theta, "hidden_act": "silu",
        "tie_word_embeddings": c.tied_head, "attention_bias": False, "mlp_bias": False,
        "use_sliding_window": False, "torch_dtype": "float32", **special,
    }


def hf_tensors(c: ModelConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The HF state dict (name -> float32 array) of jq8 parameters ``params`` under config ``c``."""
    p = params
    out: dict[str, np.ndarray] = {}
    if c.family == "gpt":
        t = "transformer."
        out[t + "wte.weight"] = _np(p["wte"]["embedding"])
        out[t + "wpe.weight"] = _np(p["wpe"]["embedding"])
        out[t + "ln_f.weight"], out[t + "ln_f.bias"] = _np(p["ln_f"]["scale"]), _np(p["ln_f"]["bias"])
        for i in range(c.num_layers):
            blk, h = p[f"h_{i}"], f"{t}h.{i}."
            for hf_name, (branch, name) in {"ln_1": ("attn", "norm"), "ln_2": ("mlp", "norm")}.items():
                out[h + hf_name + ".weight"] = _np(blk[branch][name]["scale"])
                out[h + hf_name + ".bias"] = _np(blk[branch][name]["bias"])
            for hf_name, (branch, name) in {"attn.c_attn": ("attn", "qkv"), "attn.c_proj": ("attn", "out"),
                                            "mlp.c_fc": ("mlp", "fc1"), "mlp.c_proj": ("mlp", "fc2")}.items():
                out[h + hf_name + ".weight"] = _np(blk[branch][name]["kernel"])  # Conv1D: (in, out) as jq8
                out[h + hf_name + ".bias"] = _np(blk[branch][name]["bias"])
        return out
    m = "model."
    nq, nkv = c.num_heads * c.head_dim, c.kv_heads * c.head_dim
    out[m + "embed_tokens.weight"] = _np(p["wte"]["embedding"])
    out[m + "norm.weight"] = _np(p["ln_f"]["scale"])
    for i in range(c.num_layers):
        blk, a, mlp = p[f"h_{i}"], f"{m}layers.{i}.self_attn.", f"{m}layers.{i}.mlp."
        out[f"{m}layers.{i}.input_layernorm.weight"] = _np(blk["attn"]["norm"]["scale"])
        out[f"{m}layers.{i}.post_attention_layernorm.weight"] = _np(blk["mlp"]["norm"]["scale"])
        kernel = _np(blk["attn"]["qkv"]["kernel"])
        q, k, v = np.split(kernel, [nq, nq + nkv], axis=1)
        for name, w in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
            out[a + name + ".weight"] = _np(w.T)
        if c.qkv_bias:
            for name, b in zip(("q_proj", "k_proj", "v_proj"),
                               np.split(_np(blk["attn"]["qkv"]["bias"]), [nq, nq + nkv])):
                out[a + name + ".bias"] = _np(b)
        out[a + "o_proj.weight"] = _np(_np(blk["attn"]["out"]["kernel"]).T)
        for name, jq in (("up_proj", "fc1"), ("gate_proj", "gate"), ("down_proj", "fc2")):
            out[mlp + name + ".weight"] = _np(_np(blk["mlp"][jq]["kernel"]).T)
    if not c.tied_head:
        out["lm_head.weight"] = _np(_np(p["lm_head"]["kernel"]).T)
    return out


def export_hf(config: ModelConfig, params: Mapping[str, Any], directory: str | os.PathLike, *,
              tokenizer=None, overwrite: bool = False) -> Path:
    """Writes a float jq8 model as an HF checkpoint directory; returns its path.

    params: the model's float parameter tree (``{"params": ...}`` is unwrapped). tokenizer: a
    ``tokenizers.Tokenizer`` saved as ``tokenizer.json`` (None: no tokenizer file). An existing
    ``directory`` raises FileExistsError unless ``overwrite``.

    HF configs have one norm epsilon. A config with ``norm_eps=None`` (jq8's own default: 1e-5 in the
    blocks, 1e-6 in the final norm) is written with 1e-5 for every norm, which moves the final norm's
    output by about 1e-5 / (2 var(x)) relative; set ``norm_eps`` for an exact export.
    """
    directory = Path(directory)
    if "params" in params and len(params) == 1:
        params = params["params"]
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory}: already exists (overwrite=True / --overwrite replaces it)")
    tensors = hf_tensors(config, params)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        write_file(tmp / SINGLE, tensors, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(config, tokenizer), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(str(tmp / "tokenizer.json"))
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
