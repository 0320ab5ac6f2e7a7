"""Offline text data: documents -> tokenizer -> cached token files -> deterministic batches.

Nothing here downloads. The default corpus is the bundled English Wikipedia sample (``data/``, CC BY-SA 4.0,
see ``data/README.md``); a user's text file, JSONL file or directory of them goes through the same path::

    ds = prepare()                                   # bundled wiki sample, committed 8k BPE tokenizer
    ds = prepare("notes.txt", tokenizer="bytes")     # any UTF-8 text file, byte-level (256 + EOT) tokens
    ds = prepare("corpus/", tokenizer="ckpt/tokenizer.json")  # .txt + .jsonl files, a model's own tokenizer
    for step, batch in zip(range(start, steps), ds.batches("train", 32, 256, seed=0, start_step=start)):
        batch.inputs, batch.targets                  # (32, 256) int32 each, targets = inputs shifted by 1

``prepare`` tokenizes once, in one streaming pass over the source spread over all cores, into
``<cache_dir>/<name>-<key>/{train,val}.bin`` (uint16 ids, or uint32 when the vocabulary exceeds 65536;
documents joined by the end-of-document token) plus ``meta.json``. The key hashes the source files' names
and bytes, the tokenizer, the token width and the split settings, so a changed source or tokenizer gives a
fresh cache and an unchanged one is a cache hit. The train/val split is by document and depends only on
document contents. Batch ``step`` is a pure function of ``(seed, step)``: a run resumed at ``start_step``
sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import argparse
import codecs
import functools
import hashlib
import itertools
import json
import multiprocessing
import os
import pickle
import re
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from jq8.data import wikitext

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
WIKI_SAMPLE = DATA_DIR / "enwiki-sample.xml.bz2"
LEE_BACKGROUND = DATA_DIR / "lee_background.txt"
DEFAULT_TOKENIZER = DATA_DIR / "tokenizer-wiki-8k.json"
SENTENCES = DATA_DIR / "sentences.txt"
EOT = "<|endoftext|>"
# End-of-document tokens of common tokenizers, tried in this order when none is named.
EOS_CANDIDATES = (EOT, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
CACHE_FORMAT = 2
TEXT_SUFFIXES = (".txt", ".jsonl")
_NAMED_SOURCES = {"wiki": WIKI_SAMPLE, "lee": LEE_BACKGROUND}
_BLANK_LINE = re.compile(r"\n\s*\n")


# ----------------------------------------------------------------------------------------------- sources
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
            f"text source not found: {path}. Pass a UTF-8 .txt or .jsonl file, a directory of them, a "
            f"MediaWiki .xml/.xml.bz2 dump, or one of the bundled names {sorted(_NAMED_SOURCES)}.")
    return path


def _is_wiki_dump(path: Path) -> bool:
    return path.name.endswith((".xml", ".xml.bz2"))


def _is_jsonl(path: Path) -> bool:
    return path.suffix == ".jsonl"


def source_files(source: str | os.PathLike | None = None) -> list[Path]:
    """The files a source reads, in reading order (a directory: its ``*.txt`` and ``*.jsonl`` files,
    recursively, sorted by path)."""
    path = resolve_source(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
        if not files:
            raise FileNotFoundError(f"directory {path} holds no .txt or .jsonl files")
        return files
    return [path]


# Bytes that do not belong in text: C0 controls other than \t \n \f \r, and DEL.
_CONTROL = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f]")
_ESCAPED = re.compile("[\udc80-\udcff]")  # undecodable bytes under errors="surrogateescape"
TEXT_SAMPLE_BYTES = 1 << 20
MAX_BAD_SHARE = 0.01


def check_text_file(path: str | os.PathLike, sample_bytes: int = TEXT_SAMPLE_BYTES) -> None:
    """Raise ``ValueError`` naming ``path`` unless its first ``sample_bytes`` read as UTF-8 text.

    Refused: any NUL byte, or more than 1% of the sample being bytes that are not valid UTF-8 or are
    control characters other than tab, newline, carriage return and form feed. ``.bz2`` files are checked
    after decompression. Binary files, UTF-16 and legacy 8-bit encodings fail; UTF-8 in any script passes.
    """
    path = Path(path)
    try:
        if path.suffix == ".bz2":
            import bz2

            with bz2.open(path, "rb") as f:
                raw = f.read(sample_bytes)
        else:
            with open(path, "rb") as f:
                raw = f.read(sample_bytes)
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot be read as text ({e})") from None
    if not raw:
        return
    # final=False keeps a multi-byte character cut by the sample's end from counting as invalid.
    text = codecs.getincrementaldecoder("utf-8")("surrogateescape").decode(raw, final=len(raw) < sample_bytes)
    invalid = len(_ESCAPED.findall(text))
    controls = _CONTROL.findall(text)
    nul = controls.count("\x00")
    share = (invalid + len(controls)) / len(raw)
    if nul or share > MAX_BAD_SHARE:
        counts = {"invalid UTF-8 byte": invalid, "control character": len(controls) - nul, "NUL byte": nul}
        found = [f"{n:,} {what}{'s' if n > 1 else ''}" for what, n in counts.items() if n]
        where = "the file" if len(raw) < sample_bytes else f"the first {_human_bytes(sample_bytes)}"
        utf16 = raw[:2] in (b"\xff\xfe", b"\xfe\xff")
        hint = " (UTF-16 text? convert it: iconv -f UTF-16 -t UTF-8)" if utf16 else ""
        raise ValueError(
            f"{path}: {share:.0%} of {where} is not UTF-8 text ({', '.join(found)}){hint}; a text source "
            f"must be UTF-8 .txt or .jsonl files (or a MediaWiki .xml[.bz2] dump)")


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" or n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def split_text_documents(text: str) -> list[str]:
    """One text file -> documents: separated by blank lines, or one per line when there are none.

    Each document is stripped of surrounding whitespace; empty ones are dropped. `iter_documents` streams
    files with exactly this rule.
    """
    text = text.replace("\r\n", "\n")
    parts = _BLANK_LINE.split(text) if _BLANK_LINE.search(text) else text.split("\n")
    return [p.strip() for p in parts if p.strip()]


@functools.cache
def _blank_line_bytes() -> re.Pattern[bytes]:
    """`_BLANK_LINE` (``\\n\\s*\\n`` over decoded text) as a pattern over UTF-8 bytes, so a file's document
    rule is found without decoding it: ``\\s`` becomes the UTF-8 encodings of every whitespace character."""
    spaces = [chr(c) for c in range(0x110000) if chr(c).isspace() and not 0xD800 <= c < 0xE000]
    alternatives = b"|".join(re.escape(c.encode("utf-8")) for c in spaces)
    return re.compile(b"\n(?:" + alternatives + b")*\n")


def _has_blank_line(path: Path, chunk: int = 1 << 24) -> bool:
    pattern, carry = _blank_line_bytes(), b""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            text = carry + block
            if pattern.search(text):
                return True
            # A match that crosses into the next block starts at this block's last newline.
            last = text.rfind(b"\n")
            carry = text[last:] if last >= 0 else b""
    return False


def _iter_text_file(path: Path) -> Iterator[tuple[str, int]]:
    """Documents of one text file under `split_text_documents`' rule, streamed line by line:
    ``(document, bytes read so far)``. Memory holds one document at a time."""
    paragraphs = _has_blank_line(path)
    lines: list[str] = []
    done = 0
    with open(path, "rb") as f:
        for raw in f:
            done += len(raw)
            terminated = raw.endswith(b"\n")
            # UTF-8 never uses the byte \n inside a character, so decoding line by line equals decoding
            # the whole file (invalid bytes become U+FFFD either way).
            line = raw.decode("utf-8", errors="replace")
            line = line[:-2] if line.endswith("\r\n") else line[:-1] if terminated else line
            if not paragraphs:
                if line.strip():
                    yield line.strip(), done
            elif line and not line.isspace():
                lines.append(line)
            elif terminated and lines:  # a blank line ends the document
                yield "\n".join(lines).strip(), done
                lines = []
        if lines:
            yield "\n".join(lines).strip(), done


class _Task(NamedTuple):
    """One unit of work for a tokenizer process: a slice of one file."""

    kind: str  # "docs": items are documents; "jsonl": raw lines (bytes); "wiki": raw page wikitext
    path: str
    first_line: int  # 1-based line number of items[0] (JSONL error messages)
    items: list
    text_field: str
    nbytes: int  # source bytes this task covers (progress only)


# Text per task: large enough to amortize inter-process traffic, small enough to bound memory.
TASK_CHARS = 1 << 20


def _tasks(files: Sequence[Path], text_field: str, task_chars: int = TASK_CHARS) -> Iterator[_Task]:
    """The source as ordered tasks of about ``task_chars`` characters each; every file is checked to be
    text before it is read."""
    for path in files:
        check_text_file(path)
        items: list = []
        size = first = 0
        if _is_wiki_dump(path):
            for _, raw in wikitext.iter_pages(path):
                items.append(raw)
                size += len(raw)
                if size >= task_chars:
                    yield _Task("wiki", str(path), 0, items, text_field, 0)
                    items, size = [], 0
            if items:
                yield _Task("wiki", str(path), 0, items, text_field, 0)
        elif _is_jsonl(path):
            first = 1
            with open(path, "rb") as f:
                for lineno, raw in enumerate(f, 1):
                    items.append(raw)
                    size += len(raw)
                    if size >= task_chars:
                        yield _Task("jsonl", str(path), first, items, text_field, size)
                        items, size, first = [], 0, lineno + 1
            if items:
                yield _Task("jsonl", str(path), first, items, text_field, size)
        else:
            last = 0
            for doc, done in _iter_text_file(path):
                items.append(doc)
                size += len(doc)
                if size >= task_chars:
                    yield _Task("docs", str(path), 0, items, text_field, done - last)
                    items, size, last = [], 0, done
            if items:
                yield _Task("docs", str(path), 0, items, text_field, path.stat().st_size - last)


def _jsonl_documents(task: _Task) -> list[str]:
    docs = []
    for lineno, raw in enumerate(task.items, task.first_line):
        if not raw.strip():
            continue
        where = f"{task.path}:{lineno}"
        try:
            record = json.loads(raw)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            raise ValueError(f"{where}: not a JSON object ({e}); a .jsonl file holds one JSON object per "
                             "line") from None
        if not isinstance(record, dict) or task.text_field not in record:
            keys = type(record).__name__
            if isinstance(record, dict):
                keys = ", ".join(list(map(str, record))[:8]) + (", ..." if len(record) > 8 else "")
            raise ValueError(f"{where}: no {task.text_field!r} field (found: {keys}); name the field that "
                             "holds the text with text_field=")
        text = record[task.text_field]
        if not isinstance(text, str):
            raise ValueError(f"{where}: field {task.text_field!r} is {type(text).__name__}, not a string")
        docs.append(text)
    return docs


def _task_documents(task: _Task) -> list[str]:
    """A task's documents, stripped, empty ones dropped (the same in every process)."""
    if task.kind == "wiki":
        docs = [wikitext.strip_markup(raw) for raw in task.items]
        docs = [d for d in docs if len(d) >= wikitext.MIN_ARTICLE_CHARS]
    elif task.kind == "jsonl":
        docs = _jsonl_documents(task)
    else:
        docs = task.items
    return [s for s in (d.strip() for d in docs) if s]


def iter_documents(source: str | os.PathLike | None = None, text_field: str = "text") -> Iterator[str]:
    """Stream a source's documents in order, one string each, in this process.

    ``.txt``: split by `split_text_documents`' rule; ``.jsonl``: one document per line, the string in
    field ``text_field``; ``.xml[.bz2]``: articles cleaned by `jq8.data.wikitext`. Documents are stripped
    and empty ones dropped. A file that is not UTF-8 text raises ``ValueError`` (see `check_text_file`).
    """
    for task in _tasks(source_files(source), text_field):
        yield from _task_documents(task)


def load_documents(source: str | os.PathLike | None = None, text_field: str = "text") -> list[str]:
    """All documents of a source (`iter_documents`) as a list."""
    docs = list(iter_documents(source, text_field))
    if not docs:
        raise ValueError(f"source {source!r} holds no text")
    return docs


RACY_NS = 2 * 10**9  # a file changed this recently may change again without its stat changing


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def source_fingerprint(source: str | os.PathLike | None = None,
                       memo_path: str | os.PathLike | None = None) -> str:
    """sha256 over the source's file names (relative) and contents, plus the wiki cleaner version.

    ``memo_path``: a JSON file remembering each file's content hash by its (size, mtime, ctime, inode), so a
    cache hit on a many-GB corpus does not re-read it. Files changed in the last two seconds are not
    remembered (a write in the same clock tick would leave their stat unchanged).
    """
    path = resolve_source(source)
    memo: dict[str, Any] = {}
    if memo_path is not None and Path(memo_path).is_file():
        try:
            memo = json.loads(Path(memo_path).read_text())
        except ValueError:
            memo = {}  # a damaged memo only costs re-hashing
    changed = False
    h = hashlib.sha256(f"cleaner={wikitext.CLEANER_VERSION}".encode())
    for f in source_files(source):
        st = f.stat()
        stat = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        entry = memo.get(str(f.resolve()))
        if entry is not None and entry.get("stat") == stat:
            digest = entry["sha256"]
        else:
            digest = _file_sha256(f)
            if memo_path is not None and time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_NS:
                memo[str(f.resolve())] = {"stat": stat, "sha256": digest}
                changed = True
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + b"\0" + digest.encode())
    if changed:  # forget files that are gone, so the memo does not grow without bound
        memo = {k: v for k, v in memo.items() if os.path.exists(k)}
        _atomic_write_text(Path(memo_path), json.dumps(memo))
    return h.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    """What `prepare` needs from a tokenizer. Ids are in ``[0, vocab_size)``; ``eot_id`` ends a document.

    `prepare` sends the tokenizer to its worker processes by pickling, so it must be picklable (or pass
    ``workers=1``).
    """

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


class HFTokenizer:
    """Any Hugging Face `tokenizers.Tokenizer` (BPE, Unigram, WordPiece; e.g. a checkpoint's
    ``tokenizer.json``) with an end-of-document token.

    ``eos_token``: the token that ends each document; by default the first of `EOS_CANDIDATES` the
    vocabulary holds. Encoding adds no special tokens (no BOS): documents are joined by the EOS token only.
    ``vocab_size`` is the largest id + 1 (added tokens included).
    """

    def __init__(self, tokenizer, name: str = "hf", eos_token: str | None = None):
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        candidates = (eos_token,) if eos_token is not None else EOS_CANDIDATES
        eos = next((t for t in candidates if t in vocab), None)
        if eos is None:
            raise ValueError(f"tokenizer {name!r} has no end-of-document token ({' / '.join(candidates)} not "
                             "in its vocabulary); name the one it uses with eos_token=")
        self.tokenizer = tokenizer
        self.name = name
        self.eos_token = eos
        self.eot_id = vocab[eos]
        self.vocab_size = max(vocab.values()) + 1

    @classmethod
    def from_file(cls, path: str | os.PathLike, eos_token: str | None = None) -> HFTokenizer:
        """A ``tokenizer.json`` file, or a checkpoint directory holding one."""
        from tokenizers import Tokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path} (pass a tokenizers JSON file, e.g. a "
                                    "checkpoint's tokenizer.json, or retrain the bundled one with "
                                    f"`python -m jq8.data train-tokenizer --out {path}`)")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"{path}: not a tokenizers JSON file ({str(e).splitlines()[0]})") from None
        return cls(tok, name=path.stem if path.stem != "tokenizer" else path.parent.name or "tokenizer",
                   eos_token=eos_token)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def fingerprint(self) -> str:
        # Everything that decides the ids (normalizer, pre-tokenizer, model, added tokens), key order fixed.
        canon = json.dumps(json.loads(self.tokenizer.to_str()), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(f"{canon}\0eos={self.eot_id}".encode()).hexdigest()


BPETokenizer = HFTokenizer  # the committed wiki-8k tokenizer is a byte-level BPE


def load_tokenizer(spec: Any = "wiki-8k", eos_token: str | None = None) -> TextTokenizer:
    """``"wiki-8k"`` -> the committed ``data/tokenizer-wiki-8k.json``; ``"bytes"`` -> `ByteTokenizer`;
    a path -> a `tokenizers` JSON file (or a directory holding ``tokenizer.json``); a `tokenizers.Tokenizer`
    -> `HFTokenizer`; any other tokenizer object is returned unchanged."""
    if isinstance(spec, (str, os.PathLike)):
        if spec == "bytes":
            return ByteTokenizer()
        return HFTokenizer.from_file(DEFAULT_TOKENIZER if spec == "wiki-8k" else spec, eos_token=eos_token)
    try:
        from tokenizers import Tokenizer
    except ImportError:  # no tokenizers installed: spec can only be a tokenizer object of another kind
        Tokenizer = ()
    if isinstance(spec, Tokenizer):
        return HFTokenizer(spec, eos_token=eos_token)
    return spec


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned width holding ids ``[0, vocab_size)``: uint16 up to 65536, else uint32."""
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise ValueError(f"vocab_size={vocab_size} exceeds uint32 token ids")


def train_tokenizer(source: str | os.PathLike | None = None, vocab_size: int = 8192,
                    out_path: str | os.PathLike | None = None, min_frequency: int = 2) -> HFTokenizer:
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
    tok.train_from_iterator(iter_documents(source), trainer=trainer)
    name = f"bpe-{vocab_size}"
    if out_path is not None:
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(out_path))
        name = out_path.stem
    return HFTokenizer(tok, name=name)


# --------------------------------------------------------------------------------------------- token cache
class Batch(NamedTuple):
    """inputs, targets: (batch, seq_len) int32; targets[:, t] == inputs[:, t + 1] within the text."""

    inputs: np.ndarray
    targets: np.ndarray


class TokenDataset:
    """Memory-mapped token splits written by `prepare` (``train.bin``/``val.bin``: 1-D, the dtype that
    ``meta.json`` records, uint16 or uint32).

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
        self.dtype = np.dtype(self.meta.get("dtype", "uint16"))
        if self.dtype not in (np.uint16, np.uint32):
            raise ValueError(f"{meta_path}: unsupported token dtype {self.dtype}; delete {self.path}")
        self.from_cache = from_cache
        self._splits = {s: _open_tokens(self.path / f"{s}.bin", self.meta["splits"][s]["tokens"], self.dtype)
                        for s in self.SPLITS}
        self._perm_cache: dict[tuple, tuple[np.ndarray, int]] = {}

    def tokens(self, split: str) -> np.ndarray:
        """The whole split: (n,) uint16 or uint32 (``self.dtype``), memory-mapped (read-only)."""
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

    def decode(self, ids: Sequence[int], tokenizer: Any = None) -> str:
        """Ids -> text with the tokenizer this cache was built with (or the one given)."""
        if tokenizer is None:
            saved = self.path / "tokenizer.json"
            if saved.is_file():  # the exact tokenizer that wrote the ids
                tokenizer = HFTokenizer.from_file(saved, eos_token=self.meta.get("eot_token"))
            elif self.meta["tokenizer_spec"] is not None:
                tokenizer = self.meta["tokenizer_spec"]
            else:
                raise ValueError(f"this cache was built with a tokenizer object ({self.meta['tokenizer']!r});"
                                 " pass it: ds.decode(ids, tokenizer)")
        return load_tokenizer(tokenizer).decode([int(i) for i in ids])

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={len(self.tokens(s)):,}" for s in self.SPLITS)
        return f"TokenDataset({self.path}, vocab={self.vocab_size}, {self.dtype}, tokens: {sizes})"


def _open_tokens(path: Path, n: int, dtype: np.dtype) -> np.ndarray:
    if n == 0:  # np.memmap cannot map an empty file
        return np.zeros(0, dtype=dtype)
    arr = np.memmap(path, dtype=dtype, mode="r")
    if arr.shape[0] != n:
        raise ValueError(f"{path} holds {arr.shape[0]} tokens, meta.json says {n}: the cache is corrupt, "
                         f"delete {path.parent}")
    return arr


# -------------------------------------------------------------------------------- streaming tokenization
_DOC_RECORD = np.dtype([("hash", "<u8"), ("count", "<u4")])  # per document: text hash prefix, tokens + EOT
BUCKET_BITS = 16  # the val split histograms token counts over the top bits of the document hash


class _Encoded(NamedTuple):
    tokens: np.ndarray  # (sum(counts),) documents' ids, each followed by EOT
    docs: np.ndarray  # (n_docs,) _DOC_RECORD
    chars: int


def _encode_task(tok: TextTokenizer, dtype: np.dtype, task: _Task) -> _Encoded:
    docs = _task_documents(task)
    ids = tok.encode_batch(docs) if docs else []
    records = np.empty(len(docs), _DOC_RECORD)
    # The split ranks documents by sha256 of their text; the first 8 bytes, big-endian, keep that order.
    records["hash"] = [int.from_bytes(hashlib.sha256(d.encode()).digest()[:8], "big") for d in docs]
    records["count"] = [len(x) + 1 for x in ids]
    eot = (tok.eot_id,)
    flat = np.fromiter(itertools.chain.from_iterable(itertools.chain(x, eot) for x in ids), dtype=dtype,
                       count=int(records["count"].sum()))
    return _Encoded(flat, records, sum(map(len, docs)))


_WORKER: tuple[TextTokenizer, np.dtype] | None = None


def _init_worker(tok: TextTokenizer, dtype: np.dtype) -> None:
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already; no nested threads
    _WORKER = (tok, dtype)


def _run_task(task: _Task) -> _Encoded:
    assert _WORKER is not None
    return _encode_task(*_WORKER, task)


def default_workers() -> int:
    """Cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _StreamStats(NamedTuple):
    tokens: int
    documents: int
    chars: int
    histogram: np.ndarray  # (2**BUCKET_BITS,) int64 tokens per hash bucket


def _tokenize_to_files(tasks: Iterator[_Task], tok: TextTokenizer, dtype: np.dtype, tokens_path: Path,
                       docs_path: Path, workers: int, progress=None) -> _StreamStats:
    """Encode tasks in order, appending ids to ``tokens_path`` and `_DOC_RECORD`s to ``docs_path``.

    With ``workers > 1`` a pool encodes up to ``2 * workers`` tasks ahead of the writer; results are
    written in task order, so the files equal a single-process run's.
    """
    hist = np.zeros(1 << BUCKET_BITS, np.int64)
    totals = [0, 0, 0, 0]  # tokens, documents, chars, source bytes

    def write(enc: _Encoded, nbytes: int) -> None:
        enc.tokens.tofile(tok_f)
        enc.docs.tofile(doc_f)
        hist[:] += np.bincount((enc.docs["hash"] >> (64 - BUCKET_BITS)).astype(np.intp),
                               weights=enc.docs["count"], minlength=hist.size).astype(np.int64)
        for i, v in enumerate((enc.tokens.size, enc.docs.size, enc.chars, nbytes)):
            totals[i] += v
        if progress is not None:
            progress(*totals)

    with open(tokens_path, "wb") as tok_f, open(docs_path, "wb") as doc_f:
        if workers <= 1:
            for task in tasks:
                write(_encode_task(tok, dtype, task), task.nbytes)
        else:
            # forkserver: workers never fork this (possibly multi-threaded, e.g. JAX) process itself.
            method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
            ctx = multiprocessing.get_context(method)
            with ctx.Pool(workers, initializer=_init_worker, initargs=(tok, dtype)) as pool:
                pending: deque = deque()
                for task in tasks:
                    pending.append((pool.apply_async(_run_task, (task,)), task.nbytes))
                    if len(pending) >= 2 * workers:
                        result, nbytes = pending.popleft()
                        write(result.get(), nbytes)
                while pending:
                    result, nbytes = pending.popleft()
                    write(result.get(), nbytes)
    return _StreamStats(totals[0], totals[1], totals[2], hist)


def _doc_chunks(docs_path: Path, n_docs: int, chunk: int = 1 << 18) -> Iterator[tuple[int, np.ndarray]]:
    """(index of the first document, records) over the document file, ``chunk`` records at a time. Read,
    not memory-mapped: a mapping's touched pages would count toward the resident set on huge corpora."""
    with open(docs_path, "rb") as f:
        for start in range(0, n_docs, chunk):
            yield start, np.fromfile(f, dtype=_DOC_RECORD, count=min(chunk, n_docs - start))


def _select_val(docs_path: Path, stats: _StreamStats, val_fraction: float) -> tuple[int, np.ndarray]:
    """The validation documents `split_documents` would choose, from the document file in bounded memory.

    Returns ``(bucket, extra)``: val = every document whose hash bucket is below ``bucket``, plus the
    documents with indices ``extra`` (sorted int64) from bucket ``bucket`` itself. Only that one bucket's
    documents (about n_docs / 2**BUCKET_BITS) are ever held and sorted.
    """
    shift = 64 - BUCKET_BITS
    target = val_fraction * stats.tokens
    cum = np.cumsum(stats.histogram)
    bucket = int(np.searchsorted(cum, target, side="left"))  # first bucket whose cumulative count >= target
    before = int(cum[bucket - 1]) if bucket else 0
    hashes, counts, index = [], [], []
    last = (-1, -1)  # (hash, index) of the last document in rank order: never in val
    for start, rec in _doc_chunks(docs_path, stats.documents):
        h = rec["hash"]
        top = int(np.argmax(h[::-1]))  # the latest index among equal maxima ranks last
        i = len(h) - 1 - top
        if (int(h[i]), start + i) > last:
            last = (int(h[i]), start + i)
        sel = np.nonzero((h >> shift) == bucket)[0]
        hashes.append(h[sel])
        counts.append(rec["count"][sel].astype(np.int64))
        index.append(sel + start)
    hashes, counts, index = (np.concatenate(a) for a in (hashes, counts, index))
    order = np.lexsort((index, hashes))  # rank: hash, then document order (a stable sort)
    taken = before + np.concatenate([[0], np.cumsum(counts[order])[:-1]])
    extra = index[order][taken < target]  # a document is taken while the tokens taken before it < target
    extra = extra[extra != last[1]]
    return bucket, np.sort(extra)


def _split_files(tokens_path: Path, val_path: Path, docs_path: Path, stats: _StreamStats, bucket: int,
                 extra: np.ndarray, dtype: np.dtype, block_tokens: int = 1 << 22) -> dict:
    """Move the val documents' tokens from ``tokens_path`` to ``val_path`` and compact the rest in place
    (train keeps document order). Works block by block: memory is one block, disk is never doubled."""
    shift, item = 64 - BUCKET_BITS, dtype.itemsize
    out = {"train": {"tokens": 0, "documents": 0}, "val": {"tokens": 0, "documents": 0}}
    read_pos = write_pos = 0  # in tokens; write_pos <= read_pos, so a write never clobbers unread data
    fd = os.open(tokens_path, os.O_RDWR)
    try:
        with open(val_path, "wb") as val_f:
            for start, rec in _doc_chunks(docs_path, stats.documents):
                is_val = (rec["hash"] >> shift) < bucket
                is_val |= np.isin(np.arange(start, start + len(rec)), extra)
                counts = rec["count"].astype(np.int64)
                ends = np.cumsum(counts)
                lo = 0
                while lo < len(rec):  # blocks of whole documents, about block_tokens each
                    base = ends[lo - 1] if lo else 0
                    hi = max(lo + 1, int(np.searchsorted(ends, base + block_tokens, side="right")))
                    n = int(ends[hi - 1] - base)
                    sel, cnt = is_val[lo:hi], counts[lo:hi]
                    if not sel.any() and write_pos == read_pos:
                        kept = n  # nothing moves until the first val document
                    else:
                        block = np.frombuffer(_pread(fd, n * item, read_pos * item), dtype)
                        mask = np.repeat(sel, cnt)
                        block[mask].tofile(val_f)
                        kept_tokens = block[~mask]
                        _pwrite(fd, kept_tokens, write_pos * item)
                        kept = kept_tokens.size
                    out["val"]["tokens"] += n - kept
                    out["val"]["documents"] += int(sel.sum())
                    out["train"]["documents"] += int((~sel).sum())
                    read_pos += n
                    write_pos += kept
                    lo = hi
        os.ftruncate(fd, write_pos * item)
    finally:
        os.close(fd)
    out["train"]["tokens"] = write_pos
    return out


def _pread(fd: int, n: int, offset: int) -> bytearray:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.pread(fd, n - len(buf), offset + len(buf))
        if not chunk:
            raise OSError(f"unexpected end of the token file at byte {offset + len(buf)}")
        buf += chunk
    return buf


def _pwrite(fd: int, data: np.ndarray, offset: int) -> None:
    view = memoryview(np.ascontiguousarray(data)).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


# ----------------------------------------------------------------------------------------------- prepare
def default_cache_dir() -> Path:
    """``$JQ8_DATA_CACHE`` or ``./.cache/data``."""
    return Path(os.environ.get("JQ8_DATA_CACHE", Path.cwd() / ".cache" / "data"))


_SINGLE_DOCUMENT = ("the source holds a single document, so it cannot be split by document; separate "
                    "documents by blank lines (or one per line), or pass val_fraction=0")


def split_documents(docs: Sequence[str], token_counts: Sequence[int], val_fraction: float) -> np.ndarray:
    """Boolean (n_docs,) mask of validation documents.

    Documents are ranked by the sha256 of their text (independent of order, tokenizer and seed) and taken
    into val until they hold ``val_fraction`` of all tokens (at least one document, never all of them).
    `prepare` makes the same choice while streaming, without holding the documents.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    is_val = np.zeros(len(docs), dtype=bool)
    if val_fraction == 0.0:
        return is_val
    if len(docs) < 2:
        raise ValueError(_SINGLE_DOCUMENT)
    order = sorted(range(len(docs)), key=lambda i: hashlib.sha256(docs[i].encode()).hexdigest())
    target, taken = val_fraction * sum(token_counts), 0
    for i in order[:-1]:
        if taken >= target:
            break
        is_val[i] = True
        taken += token_counts[i]
    return is_val


def prepare(source: str | os.PathLike | None = None, tokenizer: Any = "wiki-8k",
            cache_dir: str | os.PathLike | None = None, val_fraction: float = 0.05,
            verbose: bool = False, *, text_field: str = "text", eos_token: str | None = None,
            workers: int | None = None) -> TokenDataset:
    """Tokenize a source once and memory-map the result; later calls with the same inputs hit the cache.

    source: None/"wiki" (bundled wiki sample), "lee", a UTF-8 ``.txt`` file (documents separated by blank
      lines, or one per line), a ``.jsonl`` file (one document per line in field ``text_field``), a
      directory of them (recursively, in path order), or a MediaWiki ``.xml[.bz2]`` dump.
    tokenizer: "wiki-8k" (committed BPE), "bytes", a `tokenizers` JSON path or a directory holding
      ``tokenizer.json`` (a model's own tokenizer), a `tokenizers.Tokenizer`, or a `TextTokenizer`.
      ``eos_token`` names its end-of-document token (default: the first of `EOS_CANDIDATES` it has).
    workers: processes that tokenize (default: every core when the source is over 16 MiB, else 1). They
      start without forking this process (forkserver), so a calling script needs the usual
      ``if __name__ == "__main__":`` guard, and the tokenizer must be picklable.

    One streaming pass: memory holds ``2 * workers`` tasks of about 1 MiB of text plus one document, not
    the corpus. Token files are uint16 when the vocabulary fits, else uint32. Every document is followed by
    the end-of-document token. Returns a `TokenDataset` whose ``from_cache`` says whether it was a cache
    hit. The cache appears atomically: safe with several processes preparing the same cache, and an
    interrupted run leaves nothing half-written.
    """
    tok = load_tokenizer(tokenizer, eos_token=eos_token)
    dtype = token_dtype(tok.vocab_size)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    src_path = resolve_source(source)
    files = source_files(source)
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key_fields = {"format": CACHE_FORMAT,
                  "source_sha256": source_fingerprint(source, memo_path=cache_root / "file-hashes.json"),
                  "tokenizer_sha256": tok.fingerprint(), "val_fraction": val_fraction, "dtype": dtype.name}
    if any(_is_jsonl(f) for f in files):
        key_fields["text_field"] = text_field
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", src_path.name.split(".")[0] or "source")
    final = cache_root / f"{stem}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', tok.name)}-{key}"
    if (final / "meta.json").is_file():
        return TokenDataset(final, from_cache=True)

    total_bytes = sum(f.stat().st_size for f in files)
    if workers is None:
        workers = default_workers() if total_bytes > 16 << 20 else 1
    if workers < 1:
        raise ValueError(f"workers={workers} must be >= 1")
    if workers > 1:
        try:
            pickle.dumps(tok)
        except Exception as e:
            raise ValueError(f"tokenizer {tok.name!r} cannot be sent to worker processes ({e}); make it "
                             "picklable or pass workers=1") from None
    progress = _Progress(total_bytes) if verbose else None
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=cache_root))
    try:
        t0 = time.perf_counter()
        stats = _tokenize_to_files(_tasks(files, text_field), tok, dtype, tmp / "train.bin", tmp / "docs.bin",
                                   workers, progress)
        if stats.documents == 0:
            raise ValueError(f"source {str(src_path)!r} holds no text")
        if val_fraction > 0 and stats.documents < 2:
            raise ValueError(_SINGLE_DOCUMENT)
        if val_fraction > 0:
            bucket, extra = _select_val(tmp / "docs.bin", stats, val_fraction)
            splits = _split_files(tmp / "train.bin", tmp / "val.bin", tmp / "docs.bin", stats, bucket, extra,
                                  dtype)
        else:
            (tmp / "val.bin").touch()
            splits = {"train": {"tokens": stats.tokens, "documents": stats.documents},
                      "val": {"tokens": 0, "documents": 0}}
        (tmp / "docs.bin").unlink()
        if isinstance(tokenizer, str) and tokenizer in ("wiki-8k", "bytes"):
            spec = tokenizer
        elif isinstance(tokenizer, (str, os.PathLike)):
            spec = str(Path(tokenizer).resolve())
        else:
            spec = None  # an object: decode() uses the saved tokenizer.json, or needs the object passed
        if isinstance(tok, HFTokenizer):
            tok.tokenizer.save(str(tmp / "tokenizer.json"))
        meta = {**key_fields, "key": key, "source": str(src_path), "files": len(files),
                "source_bytes": total_bytes, "tokenizer": tok.name, "tokenizer_spec": spec,
                "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
                "eot_token": getattr(tok, "eos_token", None), "cleaner_version": wikitext.CLEANER_VERSION,
                "characters": stats.chars, "documents": stats.documents, "splits": splits,
                "text_field": text_field if "text_field" in key_fields else None,
                "seconds": round(time.perf_counter() - t0, 3), "workers": workers}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.replace(tmp, final)  # atomic: readers never see a half-written cache
        except OSError:
            if not (final / "meta.json").is_file():  # not a lost race with another process: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(f"jq8.data: tokenized {stats.documents:,} documents ({stats.tokens:,} tokens) from {src_path} "
              f"-> {final}", file=sys.stderr)
    return TokenDataset(final, from_cache=False)


class _Progress:
    """A line on stderr every 10 s while a large source tokenizes."""

    def __init__(self, total_bytes: int, every: float = 10.0):
        self.total, self.every = total_bytes, every
        self.start = self.last = time.perf_counter()

    def __call__(self, tokens: int, documents: int, chars: int, nbytes: int) -> None:
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            rate = tokens / (now - self.start)
            done = f"{nbytes / self.total:.0%} of {_human_bytes(self.total)}, " if nbytes else ""
            print(f"jq8.data: {done}{tokens:,} tokens, {documents:,} documents, {rate:,.0f} tokens/s",
                  file=sys.stderr)


# ------------------------------------------------------------------------------------------------- CLI
def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jq8.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train-tokenizer", help="retrain the byte-level BPE tokenizer")
    t.add_argument("--source", default=None, help="text source (default: bundled wiki sample)")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--out", default=str(DEFAULT_TOKENIZER))
    p = sub.add_parser("prepare", help="tokenize a source into the cache and print its summary")
    p.add_argument("--source", default=None, help="wiki, lee, a .txt/.jsonl file or a directory of them")
    p.add_argument("--tokenizer", default="wiki-8k", help="wiki-8k, bytes, or a tokenizer.json path")
    p.add_argument("--cache-dir", default=None, help="default: $JQ8_DATA_CACHE or ./.cache/data")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--text-field", default="text", help="the JSONL field holding each document's text")
    p.add_argument("--eos-token", default=None, help="the tokenizer's end-of-document token")
    p.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: all cores)")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "train-tokenizer":
            tok = train_tokenizer(args.source, args.vocab_size, args.out)
            print(f"saved {args.out}: vocab {tok.vocab_size}, eot id {tok.eot_id}")
        else:
            ds = prepare(args.source, args.tokenizer, args.cache_dir, args.val_fraction, verbose=True,
                         text_field=args.text_field, eos_token=args.eos_token, workers=args.workers)
            ntok = sum(len(ds.tokens(s)) for s in ds.SPLITS)
            print(ds, f"cache hit: {ds.from_cache}",
                  f"chars/token: {ds.meta['characters'] / max(ntok, 1):.2f}", sep="\n")
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    _main()
