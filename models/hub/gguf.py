"""GGUF files (llama.cpp's format) -> jq8 model config, float32 parameters and a ``tokenizers`` tokenizer.

Read with the ``gguf`` package's ``GGUFReader`` (metadata and raw tensor bytes, memory-mapped); the
tensors are dequantized here (:func:`dequantize`) from F32 / F16 / BF16 / Q8_0 / Q4_0 / Q4_1. Block
layouts (32 values a block, ggml's ``block_q8_0`` / ``block_q4_0`` / ``block_q4_1``):

    Q8_0  d: f16, q: int8[32]                       x = d * q                         34 bytes
    Q4_0  d: f16, qs: uint8[16]                     x = d * (nibble - 8)              18 bytes
    Q4_1  d: f16, m: f16, qs: uint8[16]             x = d * nibble + m                20 bytes

with value j of a block in the low nibble of qs[j] and value j + 16 in its high nibble. Other types
raise :class:`~models.hub.errors.CheckpointError` naming the type and the tensor.

Architectures (``general.architecture``): ``llama`` (also Mistral and SmolLM files) and ``qwen2``.
llama.cpp's converter stores a ``llama`` file's q and k projection rows permuted for its interleaved
rotary (each head's rows as (Dh/2, 2) pairs); :func:`unpermute_rows` restores the half-split order jq8
(and Hugging Face) use, per head for q (``head_count`` heads) and per KV head for k (``head_count_kv``).
``qwen2`` files keep the half-split order. No ``output.weight`` means the head is the tied embedding.

Tokenizer: ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE: the file's tokens and merges, the
pre-tokenizer its ``tokenizer.ggml.pre`` names) or ``"llama"`` (SentencePiece BPE: merges ranked by the
pieces' scores, byte fallback); control tokens are special tokens. The BOS token is added only when
``tokenizer.ggml.add_bos_token`` is true (absent: true for SentencePiece vocabularies, as in llama.cpp).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from models.config import ModelConfig
from models.hub.errors import CheckpointError, CheckpointNotFoundError

ARCHITECTURES = ("llama", "qwen2")
QK = 32  # values per block of the Q8_0 / Q4_0 / Q4_1 formats
BLOCK_BYTES = {"Q8_0": 2 + QK, "Q4_0": 2 + QK // 2, "Q4_1": 4 + QK // 2}
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")

# Pre-tokenizer regexes of byte-level BPE vocabularies, by tokenizer.ggml.pre (the models' own patterns).
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_REGEX = {"llama-bpe": _LLAMA3, "llama3": _LLAMA3, "llama-v3": _LLAMA3, "qwen2": _QWEN2}
BYTE_LEVEL_PRE = ("default", "gpt2", "gpt-2", "smollm") + tuple(SPLIT_REGEX)
TOKENIZER_MODELS = ("gpt2", "llama")  # byte-level BPE; SentencePiece BPE

Params = dict[str, Any]


# ------------------------------------------------------------------------------------------ dequantize


def _f16(raw: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 little-endian halves -> (n, 1) float32."""
    return np.ascontiguousarray(raw).view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) uint8 -> (n, 32) float32: the low nibbles (values 0..15), then the high nibbles (16..31)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)


def dequantize(raw: np.ndarray, type_name: str, shape: tuple[int, ...], *, name: str = "?",
               path: str | os.PathLike = "?") -> np.ndarray:
    """A GGUF tensor's data -> float32 array of ``shape`` (row-major, the last axis ggml's ne[0]).

    raw: the tensor's bytes as the reader gives them (any shape; uint8 for block types, the element
    dtype for F32 / F16). type_name: the ggml type's name (``GGMLQuantizationType(...).name``).
    """
    n = int(np.prod(shape))
    if type_name == "F32":
        out = np.ascontiguousarray(raw).view("<f4")
    elif type_name == "F16":
        out = np.ascontiguousarray(raw).view("<f2").astype(np.float32)
    elif type_name == "BF16":  # the high half of a float32
        out = (np.ascontiguousarray(raw).view("<u2").astype(np.uint32) << 16).view(np.float32)
    elif type_name in BLOCK_BYTES:
        if n % QK:
            raise CheckpointError(path, f"tensor {name!r}: {n} values are not whole {type_name} blocks")
        b = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
        if b.size != n // QK * BLOCK_BYTES[type_name]:
            raise CheckpointError(path, f"tensor {name!r}: {b.size} bytes do not hold {n} {type_name} values")
        b = b.reshape(n // QK, BLOCK_BYTES[type_name])
        if type_name == "Q8_0":
            out = _f16(b[:, :2]) * b[:, 2:].view(np.int8).astype(np.float32)
        elif type_name == "Q4_0":
            out = _f16(b[:, :2]) * (_nibbles(b[:, 2:]) - 8.0)
        else:
            out = _f16(b[:, :2]) * _nibbles(b[:, 4:]) + _f16(b[:, 2:4])
    else:
        raise CheckpointError(path, f"tensor {name!r} has ggml type {type_name}, which jq8 does not "
                                    f"dequantize (supported: {', '.join(TYPES)})")
    out = out.reshape(-1)
    if out.size != n:
        raise CheckpointError(path, f"tensor {name!r}: {out.size} values where its shape {shape} needs {n}")
    return out.reshape(shape).astype(np.float32, copy=False)


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a q or k projection (rows = heads * Dh, any columns).

    llama.cpp stores each head's rows in the order (Dh/2, 2) (rotation pairs adjacent); jq8 and Hugging
    Face use (2, Dh/2) (the two halves of the head). Works on weights (rows, in) and biases (rows,).
    """
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# -------------------------------------------------------------------------------------------- reading


class GGUFFile:
    """Metadata and tensors of one GGUF file (``gguf.GGUFReader``), with errors naming the file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointNotFoundError(self.path, "no such GGUF file")
        try:
            import gguf
        except ImportError:
            raise CheckpointError(self.path, "reading GGUF needs the 'gguf' package") from None
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as e:  # the reader raises ValueError / struct errors on foreign files
            raise CheckpointError(self.path, f"not a readable GGUF file ({e})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def need(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise CheckpointError(self.path, f"metadata key {key!r} is missing")
        return value

    def tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Dequantized float32 tensor ``name`` (row-major shape: ggml's ne reversed), shape-checked."""
        t = self.tensors.get(name)
        if t is None:
            raise CheckpointError(self.path, f"tensor {name!r} is missing")
        stored = tuple(int(s) for s in reversed(t.shape.tolist()))
        if stored != tuple(shape):
            raise CheckpointError(self.path, f"tensor {name!r} has shape {stored}, but the metadata implies "
                                             f"{tuple(shape)}")
        return dequantize(t.data, t.tensor_type.name, stored, name=name, path=self.path)


def config_from_gguf(f: GGUFFile) -> ModelConfig:
    """The jq8 ModelConfig of a GGUF file's metadata (``<arch>.*`` keys)."""
    arch = f.need("general.architecture")
    if arch not in ARCHITECTURES:
        supported = ", ".join(ARCHITECTURES)
        raise CheckpointError(f.path, f"architecture {arch!r} is not supported; supported: {supported}")
    scaling = f.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in f.tensors:
        raise CheckpointError(f.path, f"rotary scaling {scaling!r} is not supported (only plain rotary)")
    d, heads = int(f.need(f"{arch}.embedding_length")), int(f.need(f"{arch}.attention.head_count"))
    kv = int(f.get(f"{arch}.attention.head_count_kv", heads))
    rot = f.get(f"{arch}.rope.dimension_count")
    if rot is not None and int(rot) * heads != d:
        raise CheckpointError(f.path, f"rotary dimension {rot} is not the head dim {d // heads} "
                                      "(partial rotary is not supported)")
    emb = f.tensors.get("token_embd.weight")
    vocab = f.get(f"{arch}.vocab_size") or (int(emb.shape[1]) if emb is not None else None)
    if vocab is None:
        raise CheckpointError(f.path, "cannot tell the vocabulary size (no vocab_size, no token_embd.weight)")
    try:
        return ModelConfig(
            family="llama",
            vocab_size=int(vocab),
            max_seq_len=int(f.get(f"{arch}.context_length", 2048)),
            num_layers=int(f.need(f"{arch}.block_count")),
            num_heads=heads,
            d_model=d,
            mlp_hidden=int(f.need(f"{arch}.feed_forward_length")),
            num_kv_heads=kv,
            rope_theta=float(f.get(f"{arch}.rope.freq_base", 10000.0)),
            norm_eps=float(f.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            qkv_bias=arch == "qwen2",
            tie_embeddings="output.weight" not in f.tensors,
        )
    except ValueError as e:
        raise CheckpointError(f.path, f"invalid {arch} metadata: {e}") from None


def params_from_gguf(f: GGUFFile, c: ModelConfig) -> Params:
    """jq8 LLaMA parameters (float32 numpy) from the file's tensors, q / k rows un-permuted for ``llama``."""
    arch = f.need("general.architecture")
    d, hid, dh = c.d_model, c.hidden, c.head_dim
    nq, nkv = c.num_heads * dh, c.kv_heads * dh
    permuted = arch == "llama"

    def linear(name, n_in, n_out):  # ggml (ne0=in, ne1=out) = row-major (out, in) -> kernel (in, out)
        return f.tensor(name, (n_out, n_in))

    used: set[str] = set()

    def take(name, *args):
        used.add(name)
        return linear(name, *args) if len(args) == 2 else f.tensor(name, args[0])

    p: Params = {
        "wte": {"embedding": take("token_embd.weight", (c.vocab_size, d))},
        "ln_f": {"scale": take("output_norm.weight", (d,))},
    }
    for i in range(c.num_layers):
        blk = f"blk.{i}"
        q, k = take(f"{blk}.attn_q.weight", d, nq), take(f"{blk}.attn_k.weight", d, nkv)
        if permuted:
            q, k = unpermute_rows(q, c.num_heads), unpermute_rows(k, c.kv_heads)
        qkv = {"kernel": np.concatenate([q.T, k.T, take(f"{blk}.attn_v.weight", d, nkv).T], axis=1)}
        if c.qkv_bias:
            qb, kb = take(f"{blk}.attn_q.bias", (nq,)), take(f"{blk}.attn_k.bias", (nkv,))
            if permuted:
                qb, kb = unpermute_rows(qb, c.num_heads), unpermute_rows(kb, c.kv_heads)
            qkv["bias"] = np.concatenate([qb, kb, take(f"{blk}.attn_v.bias", (nkv,))])
        p[f"h_{i}"] = {
            "attn": {"norm": {"scale": take(f"{blk}.attn_norm.weight", (d,))}, "qkv": qkv,
                     "out": {"kernel": take(f"{blk}.attn_output.weight", nq, d).T}},
            "mlp": {"norm": {"scale": take(f"{blk}.ffn_norm.weight", (d,))},
                    "fc1": {"kernel": take(f"{blk}.ffn_up.weight", d, hid).T},
                    "gate": {"kernel": take(f"{blk}.ffn_gate.weight", d, hid).T},
                    "fc2": {"kernel": take(f"{blk}.ffn_down.weight", hid, d).T}},
        }
    if not c.tied_head:
        p["lm_head"] = {"kernel": take("output.weight", d, c.vocab_size).T}
    left = sorted(set(f.tensors) - used)
    if left:
        raise CheckpointError(f.path, f"unexpected tensors for a {arch} model: {', '.join(left[:5])}")
    return p


def sentencepiece_merges(tokens: list[str], scores: list[float], normal: set[int]) -> list[tuple[str, str]]:
    """BPE merges of a SentencePiece-BPE vocabulary, which stores scores instead of merges.

    SentencePiece joins the adjacent pair whose joined piece scores highest. As BPE merges: every way to cut
    a normal piece into two pieces of the vocabulary is a merge, ranked by the joined piece's score (higher
    first), then by the longer left part, then by vocabulary order.
    """
    ids = {t: i for i, t in enumerate(tokens)}
    found = []
    for i, piece in enumerate(tokens):
        if i not in normal:
            continue
        cuts = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in ids and piece[k:] in ids]
        cuts.sort(key=lambda lr: (ids[lr[0]], ids[lr[1]]))
        found += [(scores[i], left, right) for left, right in cuts]
    found.sort(key=lambda m: (-m[0], -len(m[1]), -len(m[2])))  # stable: ties keep vocabulary order
    return [(left, right) for _, left, right in found]


def _byte_level_bpe(f: GGUFFile, tokens: list[str]):
    """tokenizer.ggml.model "gpt2": the file's merges, the pre-tokenizer its tokenizer.ggml.pre names."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = f.get("tokenizer.ggml.pre", "default")
    if pre not in BYTE_LEVEL_PRE:
        supported = ", ".join(BYTE_LEVEL_PRE)
        raise CheckpointError(f.path, f"pre-tokenizer {pre!r} is not supported; supported: {supported}")
    merges = [tuple(m.split(" ", 1)) for m in f.need("tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    if pre in SPLIT_REGEX:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_REGEX[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif pre == "smollm":  # digits one by one, then GPT-2's split (llama.cpp's and the model's own rule)
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(f: GGUFFile, tokens: list[str], types: list[int]):
    """tokenizer.ggml.model "llama": SentencePiece BPE (LLaMA 1/2, Mistral, TinyLlama): pieces with "▁" for
    spaces, merges from the scores, unknown characters as <0xXX> byte pieces, a space prepended to the text
    unless tokenizer.ggml.add_space_prefix is false."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    scores = [float(x) for x in f.need("tokenizer.ggml.scores")]
    if len(scores) != len(tokens):
        raise CheckpointError(f.path, f"{len(scores)} token scores for {len(tokens)} tokens")
    normal = {i for i, t in enumerate(types) if t == 1} if types else set(range(len(tokens)))
    unk = int(f.get("tokenizer.ggml.unknown_token_id", 0))
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                               merges=sentencepiece_merges(tokens, scores, normal),
                               unk_token=tokens[unk], fuse_unk=True, byte_fallback=True))
    prefix = bool(f.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first" if prefix else "never",
                                                 split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
    return tok


def tokenizer_from_gguf(f: GGUFFile):
    """The ``tokenizers.Tokenizer`` the file holds (see the module doc).

    BOS is added only when ``tokenizer.ggml.add_bos_token`` says so (SentencePiece vocabularies that do not
    say: added, as llama.cpp does).
    """
    from tokenizers import AddedToken, processors

    kind = f.get("tokenizer.ggml.model")
    if kind is None:
        raise CheckpointError(f.path, "tokenizer missing (no tokenizer.ggml.model in the metadata)")
    if kind not in TOKENIZER_MODELS:
        raise CheckpointError(f.path, f"tokenizer model {kind!r} is not supported; supported: "
                                      f"{', '.join(TOKENIZER_MODELS)}")
    tokens = list(f.need("tokenizer.ggml.tokens"))
    types = [int(t) for t in (f.get("tokenizer.ggml.token_type") or [])]
    tok = _byte_level_bpe(f, tokens) if kind == "gpt2" else _sentencepiece_bpe(f, tokens, types)
    # CONTROL (3) tokens match whole and are special; USER_DEFINED (4) match whole too
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, t in enumerate(types) if t == 3])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                    for i, t in enumerate(types) if t == 4])
    bos = f.get("tokenizer.ggml.bos_token_id")
    if f.get("tokenizer.ggml.add_bos_token", kind == "llama") and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B",
            special_tokens=[(tokens[bos], int(bos))])
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise CheckpointError(f.path, f"tokenizer has {tok.get_vocab_size()} ids after conversion, the file "
                                      f"lists {len(tokens)} tokens")
    return tok


def load_gguf(path: str | os.PathLike, *, tokenizer: bool = True) -> tuple[ModelConfig, Params, Any]:
    """(ModelConfig, float32 numpy parameter tree, ``tokenizers.Tokenizer`` or None) of a GGUF file."""
    f = GGUFFile(path)
    config = config_from_gguf(f)
    tok = tokenizer_from_gguf(f) if tokenizer else None  # before the weights: the cheaper check first
    return config, params_from_gguf(f, config), tok
