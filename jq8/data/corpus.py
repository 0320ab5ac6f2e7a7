"""Offline text data: documents -> tokenizer -> cached uint16 token files -> deterministic batches.

Nothing here downloads. The default corpus is the bundled English Wikipedia sample (``data/``, CC BY-SA 4.0,
see ``data/README.md``); a user text file or a directory of ``.txt`` files goes through the same path::

    ds = prepare()                                   # bundled wiki sample, committed 8k BPE tokenizer
    ds = prepare("notes.txt", tokenizer="bytes")     # any text file, byte-level (256 + EOT) tokens
    for step, batch in zip(range(start, steps), ds.batches("train", 32, 256, seed=0, start_step=start)):
        batch.inputs, batch.targets                  # (32, 256) int32 each, targets = inputs shifted by 1

``prepare`` tokenizes once into ``<cache_dir>/<name>-<key>/{train,val}.bin`` (uint16, documents joined by the
end-of-text token) plus ``meta.json``; the key hashes the source bytes, the tokenizer and the split settings,
so a changed source or tokenizer gives a fresh cache and an unchanged one is a cache hit. The train/val split
is by document (article) and depends only on document contents. Batch ``step`` is a pure function of
``(seed, step)``: a run resumed at ``start_step`` sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np

from jq8.data import wikitext

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
WIKI_SAMPLE = DATA_DIR / "enwiki-sample.xml.bz2"
LEE_BACKGROUND = DATA_DIR / "lee_background.txt"
DEFAULT_TOKENIZER = DATA_DIR / "tokenizer-wiki-8k.json"
SENTENCES = DATA_DIR / "sentences.txt"
EOT = "<|endoftext|>"
CACHE_FORMAT = 1
_NAMED_SOURCES = {"wiki": WIKI_SAMPLE, "lee": LEE_BACKGROUND}
_BLANK_LINE = re.compile(r"\n\s*\n")


# ----------------------------------------------------------------------------------------------- documents
def resolve_source(source: str | os.PathLike | None = None) -> Path:
    """``None``/``"wiki"`` -> bundled wiki sample, ``"lee"`` -> bundled news text, else an existing path."""
    if source is None:
        source = "wiki"
    if isinstance(source, str) and source in _NAMED_SOURCES:
        path = _NAMED_SOURCES[source]
    else:
        path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"text source not found: {path}. Pass a .txt file, a directory of .txt files, a MediaWiki "
            f".xml/.xml.bz2 dump, or one of the bundled names {sorted(_NAMED_SOURCES)}.")
    return path


def _is_wiki_dump(path: Path) -> bool:
    return path.name.endswith((".xml", ".xml.bz2"))


def source_files(source: str | os.PathLike | None = None) -> list[Path]:
    """The files a source reads, in reading order (a directory: its ``*.txt`` files, recursively, sorted)."""
    path = resolve_source(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise FileNotFoundError(f"directory {path} holds no .txt files")
        return files
    return [path]


def split_text_documents(text: str) -> list[str]:
    """One text file -> documents: separated by blank lines, or one per line when there are none."""
    text = text.replace("\r\n", "\n")
    parts = _BLANK_LINE.split(text) if _BLANK_LINE.search(text) else text.split("\n")
    return [p.strip() for p in parts if p.strip()]


def load_documents(source: str | os.PathLike | None = None) -> list[str]:
    """All documents of a source as plain-text strings (wiki dumps are cleaned by `jq8.data.wikitext`)."""
    docs: list[str] = []
    for path in source_files(source):
        if _is_wiki_dump(path):
            docs.extend(text for _, text in wikitext.iter_articles(path))
        else:
            docs.extend(split_text_documents(path.read_text(encoding="utf-8", errors="replace")))
    if not docs:
        raise ValueError(f"source {source!r} holds no text")
    return docs


def source_fingerprint(source: str | os.PathLike | None = None) -> str:
    """sha256 over the source's file names (relative) and bytes, plus the wiki cleaner version."""
    path = resolve_source(source)
    h = hashlib.sha256(f"cleaner={wikitext.CLEANER_VERSION}".encode())
    for f in source_files(source):
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def load_sentence_groups(path: str | os.PathLike | None = None) -> list[list[str]]:
    """Paraphrase groups from ``data/sentences.txt`` (or ``path``): a blank line ends a group, ``#`` lines
    are comments. For retrieval checks: a sentence's nearest neighbour should be in its own group."""
    path = Path(path) if path is not None else SENTENCES
    if not path.is_file():
        raise FileNotFoundError(f"sentence groups file not found: {path}")
    groups: list[list[str]] = [[]]
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith("#"):
            continue
        if line:
            groups[-1].append(line)
        elif groups[-1]:
            groups.append([])
    return [g for g in groups if g]


# ---------------------------------------------------------------------------------------------- tokenizers
class TextTokenizer(Protocol):
    """What `prepare` needs from a tokenizer. Ids must fit uint16 (vocab_size <= 65536)."""

    name: str
    vocab_size: int
    eot_id: int

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def fingerprint(self) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, end-of-text = 256 (vocab 257). Needs no training file."""

    name = "bytes"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        # EOT renders as its text form, like the BPE tokenizer's decode.
        out, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
            else:
                out.append(run.decode("utf-8", errors="replace") + EOT)
                run = bytearray()
        return "".join(out) + run.decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return hashlib.sha256(b"jq8-bytes-v1").hexdigest()


class BPETokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` (lossless: decode(encode(s)) == s) with an EOT token."""

    def __init__(self, tokenizer, name: str = "bpe"):  # tokenizer: tokenizers.Tokenizer
        eot = tokenizer.token_to_id(EOT)
        if eot is None:
            raise ValueError(f"tokenizer {name!r} has no {EOT!r} special token; use train_tokenizer()")
        self.tokenizer = tokenizer
        self.name = name
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eot_id = eot

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> BPETokenizer:
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path} (retrain with "
                                    f"`python -m jq8.data train-tokenizer --out {path}`)")
        return cls(Tokenizer.from_file(str(path)), name=path.stem)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def fingerprint(self) -> str:
        # The vocabulary and merges define the ids; hash them in a canonical order.
        model = json.loads(self.tokenizer.to_str())["model"]
        canon = json.dumps({"vocab": sorted(model["vocab"].items(), key=lambda kv: kv[1]),
                            "merges": model["merges"], "eot": self.eot_id}, ensure_ascii=False)
        return hashlib.sha256(canon.encode()).hexdigest()


def load_tokenizer(spec: str | os.PathLike | TextTokenizer = "wiki-8k") -> TextTokenizer:
    """``"wiki-8k"`` -> the committed ``data/tokenizer-wiki-8k.json``; ``"bytes"`` -> `ByteTokenizer`;
    a path -> a saved `tokenizers` JSON; a tokenizer object is returned unchanged."""
    if not isinstance(spec, (str, os.PathLike)):
        return spec
    if spec == "bytes":
        return ByteTokenizer()
    if spec == "wiki-8k":
        return BPETokenizer.from_file(DEFAULT_TOKENIZER)
    return BPETokenizer.from_file(spec)


def train_tokenizer(source: str | os.PathLike | None = None, vocab_size: int = 8192,
                    out_path: str | os.PathLike | None = None, min_frequency: int = 2) -> BPETokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenization, all 256 bytes in the alphabet, EOT id 0).

    Takes seconds on the bundled sample. Saves JSON to ``out_path`` when given. Retraining is not
    guaranteed to reproduce the committed file bit for bit (merge ties), which is why that file is committed.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not 257 <= vocab_size <= 65536:
        raise ValueError(f"vocab_size={vocab_size} must be in [257, 65536] (256 bytes + EOT; uint16 ids)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
                                  max_token_length=16)
    tok.train_from_iterator(load_documents(source), trainer=trainer)
    name = f"bpe-{vocab_size}"
    if out_path is not None:
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(out_path))
        name = out_path.stem
    return BPETokenizer(tok, name=name)


# --------------------------------------------------------------------------------------------- token cache
class Batch(NamedTuple):
    """inputs, targets: (batch, seq_len) int32; targets[:, t] == inputs[:, t + 1] within the text."""

    inputs: np.ndarray
    targets: np.ndarray


class TokenDataset:
    """Memory-mapped token splits written by `prepare` (``train.bin``/``val.bin``: uint16, 1-D).

    Batches sample non-overlapping ``seq_len + 1`` windows without replacement within an epoch: window order
    is a permutation seeded by ``(seed, epoch)``, plus a per-epoch offset in ``[0, seq_len]`` or more so
    window boundaries move between epochs (a small corpus trained for many epochs sees varied contexts).
    Global sample ``g = step * batch_size + row`` fixes everything, so batches are reproducible from
    ``(seed, step)`` alone; shard ``s`` of ``num_shards`` takes global rows ``[s * B/num_shards,
    (s+1) * B/num_shards)``, so each host reads only its own rows of the same global batch.
    """

    SPLITS = ("train", "val")

    def __init__(self, path: str | os.PathLike, from_cache: bool = False):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"no token cache at {self.path} (no meta.json); run jq8.data.prepare()")
        self.meta = json.loads(meta_path.read_text())
        self.vocab_size: int = self.meta["vocab_size"]
        self.eot_id: int = self.meta["eot_id"]
        self.from_cache = from_cache
        self._splits = {s: _open_tokens(self.path / f"{s}.bin", self.meta["splits"][s]["tokens"])
                        for s in self.SPLITS}
        self._perm_cache: dict[tuple, tuple[np.ndarray, int]] = {}

    def tokens(self, split: str) -> np.ndarray:
        """The whole split: (n,) uint16, memory-mapped (read-only)."""
        if split not in self._splits:
            raise ValueError(f"unknown split {split!r}; expected one of {self.SPLITS}")
        return self._splits[split]

    def num_windows(self, split: str, seq_len: int) -> int:
        """Non-overlapping (seq_len + 1)-token windows per epoch (consecutive windows share one token)."""
        return max(0, (len(self.tokens(split)) - 1) // seq_len)

    def epoch_windows(self, split: str, seq_len: int) -> int:
        """Windows sampled per training epoch: one fewer than `num_windows` (when there are at least two),
        so the leftover is >= seq_len and the per-epoch offset can shift window boundaries by any amount."""
        windows = self.num_windows(split, seq_len)
        return windows - 1 if windows > 1 else windows

    def steps_per_epoch(self, split: str, batch_size: int, seq_len: int) -> float:
        """Global batches per training epoch (fractional: epochs roll over mid-batch)."""
        return self.epoch_windows(split, seq_len) / batch_size

    def _check(self, split: str, seq_len: int, batch_size: int, num_shards: int, shard: int) -> int:
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1")
        if num_shards < 1 or not 0 <= shard < num_shards:
            raise ValueError(f"shard={shard} must be in [0, num_shards={num_shards})")
        if batch_size % num_shards:
            raise ValueError(f"global batch_size={batch_size} is not divisible by num_shards={num_shards}")
        windows = self.num_windows(split, seq_len)
        if windows < 1:
            n = len(self.tokens(split))
            hint = " (prepare() was called with val_fraction=0)" if split == "val" and n == 0 else ""
            raise ValueError(f"split {split!r} has {n} tokens{hint}; seq_len={seq_len} needs at least "
                             f"{seq_len + 1}. Use a shorter seq_len, a larger corpus or larger val_fraction.")
        return windows

    def _epoch_order(self, split: str, seq_len: int, seed: int, epoch: int) -> tuple[np.ndarray, int]:
        key = (split, seq_len, seed, epoch)
        if key not in self._perm_cache:
            windows = self.epoch_windows(split, seq_len)
            rng = np.random.default_rng([seed, epoch, self.SPLITS.index(split), seq_len])
            slack = len(self.tokens(split)) - 1 - windows * seq_len
            offset = int(rng.integers(0, slack + 1))
            if len(self._perm_cache) >= 4:
                self._perm_cache.pop(next(iter(self._perm_cache)))
            self._perm_cache[key] = (rng.permutation(windows), offset)
        return self._perm_cache[key]

    def window_starts(self, split: str, step: int, batch_size: int, seq_len: int, seed: int = 0,
                      shard: int = 0, num_shards: int = 1) -> np.ndarray:
        """Token offsets of this shard's rows of global batch ``step``: (batch_size // num_shards,) int64."""
        self._check(split, seq_len, batch_size, num_shards, shard)
        windows = self.epoch_windows(split, seq_len)
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        local = batch_size // num_shards
        g = step * batch_size + shard * local + np.arange(local, dtype=np.int64)
        starts = np.empty(local, dtype=np.int64)
        for epoch in np.unique(g // windows):
            perm, offset = self._epoch_order(split, seq_len, seed, int(epoch))
            sel = g // windows == epoch
            starts[sel] = offset + perm[g[sel] % windows] * seq_len
        return starts

    def _gather(self, split: str, starts: np.ndarray, seq_len: int) -> Batch:
        toks = self.tokens(split)
        rows = np.stack([np.asarray(toks[s:s + seq_len + 1]) for s in starts]).astype(np.int32)
        return Batch(rows[:, :-1], rows[:, 1:])

    def batch(self, split: str, step: int, batch_size: int, seq_len: int, seed: int = 0,
              shard: int = 0, num_shards: int = 1) -> Batch:
        """Global batch ``step`` (or this shard's ``batch_size // num_shards`` rows of it)."""
        starts = self.window_starts(split, step, batch_size, seq_len, seed, shard, num_shards)
        return self._gather(split, starts, seq_len)

    def batches(self, split: str, batch_size: int, seq_len: int, seed: int = 0, start_step: int = 0,
                shard: int = 0, num_shards: int = 1) -> Iterator[Batch]:
        """Endless `batch` stream from ``start_step``: resuming at step k reproduces the original stream."""
        self._check(split, seq_len, batch_size, num_shards, shard)
        step = start_step
        while True:
            yield self.batch(split, step, batch_size, seq_len, seed, shard, num_shards)
            step += 1

    def eval_batches(self, split: str = "val", batch_size: int = 8, seq_len: int = 256,
                     max_batches: int | None = None, shard: int = 0, num_shards: int = 1) -> Iterator[Batch]:
        """The split's non-overlapping windows in order, as full batches (static shapes for jit).
        Deterministic, no seed: the same val loss every time.

        ``windows // batch_size`` batches (a final partial batch is dropped); a split with fewer windows
        than ``batch_size`` gives one batch whose rows wrap around to the first windows again, so a large
        global batch still evaluates (repeated windows then weigh double).
        """
        windows = self._check(split, seq_len, batch_size, num_shards, shard)
        count = max(1, windows // batch_size)
        count = min(count, max_batches) if max_batches is not None else count
        local = batch_size // num_shards
        for b in range(count):
            first = b * batch_size + shard * local
            index = np.arange(first, first + local, dtype=np.int64) % windows
            yield self._gather(split, index * seq_len, seq_len)

    def decode(self, ids: Sequence[int], tokenizer: str | os.PathLike | TextTokenizer | None = None) -> str:
        """Ids -> text with the tokenizer this cache was built with (or the one given)."""
        spec = tokenizer if tokenizer is not None else self.meta["tokenizer_spec"]
        if spec is None:
            raise ValueError(f"this cache was built with a tokenizer object ({self.meta['tokenizer']!r}); "
                             "pass it: ds.decode(ids, tokenizer)")
        return load_tokenizer(spec).decode([int(i) for i in ids])

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={len(self.tokens(s)):,}" for s in self.SPLITS)
        return f"TokenDataset({self.path}, vocab={self.vocab_size}, tokens: {sizes})"


def _open_tokens(path: Path, n: int) -> np.ndarray:
    if n == 0:  # np.memmap cannot map an empty file
        return np.zeros(0, dtype=np.uint16)
    arr = np.memmap(path, dtype=np.uint16, mode="r")
    if arr.shape[0] != n:
        raise ValueError(f"{path} holds {arr.shape[0]} tokens, meta.json says {n}: the cache is corrupt, "
                         f"delete {path.parent}")
    return arr


# ----------------------------------------------------------------------------------------------- prepare
def default_cache_dir() -> Path:
    """``$JQ8_DATA_CACHE`` or ``./.cache/data``."""
    return Path(os.environ.get("JQ8_DATA_CACHE", Path.cwd() / ".cache" / "data"))


def split_documents(docs: Sequence[str], token_counts: Sequence[int], val_fraction: float) -> np.ndarray:
    """Boolean (n_docs,) mask of validation documents.

    Documents are ranked by the sha256 of their text (independent of order, tokenizer and seed) and taken
    into val until they hold ``val_fraction`` of all tokens (at least one document, never all of them).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    is_val = np.zeros(len(docs), dtype=bool)
    if val_fraction == 0.0:
        return is_val
    if len(docs) < 2:
        raise ValueError("the source holds a single document, so it cannot be split by document; separate "
                         "documents by blank lines (or one per line), or pass val_fraction=0")
    order = sorted(range(len(docs)), key=lambda i: hashlib.sha256(docs[i].encode()).hexdigest())
    target, taken = val_fraction * sum(token_counts), 0
    for i in order[:-1]:
        if taken >= target:
            break
        is_val[i] = True
        taken += token_counts[i]
    return is_val


def _encode_documents(tok: TextTokenizer, docs: Sequence[str], chunk: int = 512) -> list[np.ndarray]:
    """Each document -> (n_i + 1,) uint16 ids ending with EOT; encoded in chunks so memory stays at
    2 bytes per token rather than a Python int per token."""
    out: list[np.ndarray] = []
    for start in range(0, len(docs), chunk):
        for ids in tok.encode_batch(docs[start:start + chunk]):
            out.append(np.asarray(list(ids) + [tok.eot_id], dtype=np.uint16))
    return out


def _write_tokens(path: Path, docs: list[np.ndarray]) -> int:
    with open(path, "wb") as f:
        for ids in docs:
            f.write(ids.tobytes())
    return int(sum(d.shape[0] for d in docs))


def prepare(source: str | os.PathLike | None = None,
            tokenizer: str | os.PathLike | TextTokenizer = "wiki-8k",
            cache_dir: str | os.PathLike | None = None, val_fraction: float = 0.05,
            verbose: bool = False) -> TokenDataset:
    """Tokenize a source once and memory-map the result; later calls with the same inputs hit the cache.

    source: None/"wiki" (bundled wiki sample), "lee", a text file, a directory of .txt files, or a
      MediaWiki .xml[.bz2] dump. tokenizer: "wiki-8k" (committed BPE), "bytes", a tokenizer JSON path, or
      a `TextTokenizer`. Returns a `TokenDataset` whose ``from_cache`` says whether it was a cache hit.
    Every document is followed by the EOT token. Safe with several processes preparing the same cache.
    """
    tok = load_tokenizer(tokenizer)
    if tok.vocab_size > 65536:
        raise ValueError(f"tokenizer vocab_size={tok.vocab_size} does not fit the uint16 token cache")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    src_path = resolve_source(source)
    key_fields = {"format": CACHE_FORMAT, "source_sha256": source_fingerprint(source),
                  "tokenizer_sha256": tok.fingerprint(), "val_fraction": val_fraction}
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", src_path.name.split(".")[0] or "source")
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache_root / f"{stem}-{tok.name}-{key}"
    if (final / "meta.json").is_file():
        return TokenDataset(final, from_cache=True)

    docs = load_documents(source)
    encoded = _encode_documents(tok, docs)
    is_val = split_documents(docs, [e.shape[0] for e in encoded], val_fraction)
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=cache_root))
    try:
        splits = {}
        for name, mask in (("train", ~is_val), ("val", is_val)):
            chosen = [e for e, m in zip(encoded, mask) if m]
            splits[name] = {"tokens": _write_tokens(tmp / f"{name}.bin", chosen),
                            "documents": len(chosen)}
        if isinstance(tokenizer, str) and tokenizer in ("wiki-8k", "bytes"):
            spec = tokenizer
        elif isinstance(tokenizer, (str, os.PathLike)):
            spec = str(Path(tokenizer).resolve())
        else:
            spec = None  # a tokenizer object: decode() then needs it passed explicitly
        meta = {**key_fields, "key": key, "source": str(src_path), "tokenizer": tok.name,
                "tokenizer_spec": spec, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
                "cleaner_version": wikitext.CLEANER_VERSION, "dtype": "uint16", "splits": splits}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.replace(tmp, final)  # atomic: readers never see a half-written cache
        except OSError:
            if not (final / "meta.json").is_file():  # not a lost race with another process: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(f"jq8.data: tokenized {len(docs)} documents from {src_path} -> {final}")
    return TokenDataset(final, from_cache=False)


# ------------------------------------------------------------------------------------------------- CLI
def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jq8.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train-tokenizer", help="retrain the byte-level BPE tokenizer")
    t.add_argument("--source", default=None, help="text source (default: bundled wiki sample)")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--out", default=str(DEFAULT_TOKENIZER))
    p = sub.add_parser("prepare", help="tokenize a source into the cache and print its summary")
    p.add_argument("--source", default=None)
    p.add_argument("--tokenizer", default="wiki-8k")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--val-fraction", type=float, default=0.05)
    args = parser.parse_args(argv)
    if args.cmd == "train-tokenizer":
        tok = train_tokenizer(args.source, args.vocab_size, args.out)
        print(f"saved {args.out}: vocab {tok.vocab_size}, eot id {tok.eot_id}")
    else:
        ds = prepare(args.source, args.tokenizer, args.cache_dir, args.val_fraction, verbose=True)
        chars = sum(len(d) for d in load_documents(args.source))
        ntok = sum(len(ds.tokens(s)) for s in ds.SPLITS)
        print(ds, f"cache hit: {ds.from_cache}", f"chars/token: {chars / max(ntok, 1):.2f}", sep="\n")


if __name__ == "__main__":
    _main()
