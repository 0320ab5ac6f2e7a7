"""Tests for jq8.data.wikitext (markup stripping) and jq8.data (tokenizers, token cache, batches)."""

from __future__ import annotations

import bz2
import json
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jq8 import data
from jq8.data import wikitext

# --------------------------------------------------------------------------------------------- wikitext


def test_nested_templates_and_tables_removed():
    src = (
        "Before {{Infobox|name={{lang|fr|x}}|a=[[b|c]]}} middle {{cite|t={{{1}}}|u=v}} after.\n"
        '{| class="wikitable"\n|-\n| cell {{flag|X}} || {{tl|y}}\n|}\nTail {{a|}} end.'
    )
    out = wikitext.strip_markup(src)
    assert out == "Before middle after.\n\nTail end."  # the removed table leaves a paragraph break


def test_unbalanced_template_does_not_swallow_text():
    out = wikitext.strip_markup("Start {{broken and more text [[Link|shown]] here.")
    assert "more text" in out and "shown here." in out and "{{" not in out


def test_refs_comments_and_tags():
    src = (
        'Claim<ref name="a/b">{{cite web|url=http://x.org}}</ref> holds<ref name=x /> true'
        "<!-- hidden [[Link]] --> and <small>small text</small> H<sub>2</sub>O<br/>."
        "<math>x^2</math>&nbsp;Ok &ndash; done"
    )
    out = wikitext.strip_markup(src)
    assert out == "Claim holds true and small text H2O. Ok \u2013 done"


def test_links_files_categories():
    src = (
        "A [[Target page|label one]] and [[Plain]] and [[Page#Section|sec]] [[Other#Part]].\n"
        "[[File:X.jpg|thumb|left|Caption with [[inner|link]] and [1.1.0] brackets.]]\n"
        "[[Image:Y.png|thumb]] [[Category:Things]] [[de:Anarchismus]] [[wikt:word]]"
        " [http://example.com Example site] [http://bare.org]"
    )
    out = wikitext.strip_markup(src)
    assert out.split("\n") == ["A label one and Plain and sec Other.", "", "word Example site"]


def test_quotes_headings_lists():
    src = (
        "'''Bold''' and ''italic'' and '''''both'''''.\n\n== History ==\n=== Early ===\n"
        "* item one\n# item two"
    )
    out = wikitext.strip_markup(src)
    assert out.split("\n") == [
        "Bold and italic and both.",
        "",
        "History",
        "",
        "Early",
        "",
        "item one",
        "item two",
    ]


def _write_dump(path: Path, pages: list[tuple[str, int, bool, str]]) -> None:
    body = []
    for title, ns, redirect, text in pages:
        red = '<redirect title="X" />' if redirect else ""
        esc = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        body.append(
            f"<page><title>{title}</title><ns>{ns}</ns><id>1</id>{red}<revision><id>2</id>"
            f'<text xml:space="preserve">{esc}</text></revision></page>'
        )
    xml = '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">' + "".join(body) + "</mediawiki>"
    path.write_bytes(bz2.compress(xml.encode()))


def test_iter_articles_skips_redirects_and_other_namespaces(tmp_path):
    long = "Word " * 60
    dump = tmp_path / "d.xml.bz2"
    _write_dump(
        dump,
        [
            ("Kept", 0, False, f"'''Kept''' text<ref>r</ref> {long}"),
            ("Redir", 0, True, "#REDIRECT [[Kept]]"),
            ("Wikipedia:Policy", 4, False, long),
            ("Short", 0, False, "tiny"),
            ("Second", 0, False, "{{stub}}" + long),
        ],
    )
    arts = list(wikitext.iter_articles(dump))
    assert [t for t, _ in arts] == ["Kept", "Second"]
    assert arts[0][1].startswith("Kept text Word")
    with pytest.raises(FileNotFoundError):
        list(wikitext.iter_articles(tmp_path / "missing.xml.bz2"))


# ------------------------------------------------------------------------------------------- tokenizers


def _random_text(rng: np.random.Generator, n_words: int) -> str:
    alphabet = list(string.ascii_letters + "äöüßé日本語—") + ["  ", "\t"]
    words = ["".join(rng.choice(alphabet, size=rng.integers(1, 9))) for _ in range(n_words)]
    return "w" + " ".join(words) + "."  # no edge whitespace: documents are stripped when split


@pytest.mark.parametrize("spec", ["wiki-8k", "bytes"])
def test_tokenizer_round_trip(spec):
    tok = data.load_tokenizer(spec)
    rng = np.random.default_rng()
    texts = [_random_text(rng, 40) for _ in range(4)] + ["The history of anarchism.\n\nIt is a philosophy."]
    for text, ids in zip(texts, tok.encode_batch(texts)):
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    assert tok.decode(tok.encode_batch(["a"])[0] + [tok.eot_id]) == "a" + data.EOT


def test_committed_tokenizer_is_compressive():
    tok = data.load_tokenizer()
    assert (tok.vocab_size, tok.eot_id) == (8192, 0)
    text = "The United States is a country in North America. Its capital is Washington."
    assert len(tok.encode(text)) < len(text.encode()) / 3  # BPE on English text: > 3 bytes per token


def test_train_tokenizer_saves_and_reloads(tmp_path):
    src = tmp_path / "corpus.txt"
    rng = np.random.default_rng()
    src.write_text("\n\n".join(_random_text(rng, 80) for _ in range(6)))
    out = tmp_path / "tok.json"
    tok = data.train_tokenizer(src, vocab_size=300, out_path=out)
    again = data.load_tokenizer(out)
    assert tok.vocab_size == again.vocab_size <= 300
    assert tok.fingerprint() == again.fingerprint()
    text = src.read_text()[:500]
    assert again.decode(again.encode(text)) == text


# ------------------------------------------------------------------------------------------------ cache


def _write_corpus(path: Path, rng: np.random.Generator, n_docs: int = 12, words: int = 120) -> list[str]:
    docs = [_random_text(rng, words) for _ in range(n_docs)]
    path.write_text("\n\n".join(docs) + "\n")
    return docs


def _all_docs_from_cache(ds: data.TokenDataset, tok) -> list[str]:
    docs = []
    for split in ds.SPLITS:
        ids = np.asarray(ds.tokens(split)).tolist()
        docs += [d for d in tok.decode(ids).split(data.EOT) if d]
    return docs


def test_prepare_user_file_caches_and_retokenizes_on_change(tmp_path):
    rng = np.random.default_rng()
    src, cache = tmp_path / "user.txt", tmp_path / "cache"
    docs = _write_corpus(src, rng)
    ds = data.prepare(src, tokenizer="bytes", cache_dir=cache, val_fraction=0.2)
    assert not ds.from_cache
    # Every document comes back exactly once, train and val disjoint by document.
    assert sorted(_all_docs_from_cache(ds, data.ByteTokenizer())) == sorted(docs)
    assert ds.meta["splits"]["val"]["documents"] >= 1
    assert isinstance(ds.tokens("train"), np.memmap) and ds.tokens("train").dtype == np.uint16

    again = data.prepare(src, tokenizer="bytes", cache_dir=cache, val_fraction=0.2)
    assert again.from_cache and again.path == ds.path
    np.testing.assert_array_equal(again.tokens("train"), ds.tokens("train"))

    docs2 = _write_corpus(src, rng)  # changed source -> new key, re-tokenized
    changed = data.prepare(src, tokenizer="bytes", cache_dir=cache, val_fraction=0.2)
    assert not changed.from_cache and changed.path != ds.path
    assert sorted(_all_docs_from_cache(changed, data.ByteTokenizer())) == sorted(docs2)

    other_tok = data.prepare(src, tokenizer="wiki-8k", cache_dir=cache, val_fraction=0.2)
    assert not other_tok.from_cache and other_tok.vocab_size == 8192
    assert sorted(_all_docs_from_cache(other_tok, data.load_tokenizer())) == sorted(docs2)


def test_directory_source_equals_its_files(tmp_path):
    rng = np.random.default_rng()
    d = tmp_path / "texts"
    (d / "sub").mkdir(parents=True)
    docs_b = _write_corpus(d / "b.txt", rng, n_docs=3)
    docs_a = _write_corpus(d / "sub" / "a.txt", rng, n_docs=2)
    (d / "ignored.md").write_text("not a txt file")
    assert data.load_documents(d) == docs_b + docs_a  # sorted paths: b.txt < sub/a.txt
    ds = data.prepare(d, tokenizer="bytes", cache_dir=tmp_path / "c", val_fraction=0.2)
    assert sorted(_all_docs_from_cache(ds, data.ByteTokenizer())) == sorted(docs_a + docs_b)


def test_split_by_document_is_deterministic_and_order_free():
    rng = np.random.default_rng()
    docs = [_random_text(rng, int(rng.integers(5, 50))) for _ in range(30)]
    counts = [len(d) for d in docs]
    mask = data.split_documents(docs, counts, 0.1)
    assert 1 <= mask.sum() < len(docs)
    assert sum(c for c, m in zip(counts, mask) if m) >= 0.1 * sum(counts)
    perm = rng.permutation(len(docs))
    mask_perm = data.split_documents([docs[i] for i in perm], [counts[i] for i in perm], 0.1)
    assert {docs[i] for i in perm[mask_perm]} == {d for d, m in zip(docs, mask) if m}


def test_bundled_wiki_corpus(tmp_path):
    ds = data.prepare(cache_dir=tmp_path)
    n_train, n_val = len(ds.tokens("train")), len(ds.tokens("val"))
    assert n_train > 500_000 and 0.03 < n_val / (n_train + n_val) < 0.1
    text = ds.decode(np.asarray(ds.tokens("val")[:2000]))
    assert "{{" not in text and "[[" not in text and "<ref" not in text


# ---------------------------------------------------------------------------------------------- batches


@pytest.fixture(scope="module")
def small_ds(tmp_path_factory) -> data.TokenDataset:
    tmp = tmp_path_factory.mktemp("batches")
    _write_corpus(tmp / "c.txt", np.random.default_rng(), n_docs=10, words=150)
    return data.prepare(tmp / "c.txt", tokenizer="bytes", cache_dir=tmp / "cache", val_fraction=0.15)


def test_batches_deterministic_and_resumable(small_ds):
    b, t = 6, 37
    full = [next_b for _, next_b in zip(range(8), small_ds.batches("train", b, t, seed=3))]
    again = [next_b for _, next_b in zip(range(8), small_ds.batches("train", b, t, seed=3))]
    resumed = [next_b for _, next_b in zip(range(3), small_ds.batches("train", b, t, seed=3, start_step=5))]
    for x, y in zip(full, again):
        np.testing.assert_array_equal(x.inputs, y.inputs)
    for x, y in zip(full[5:], resumed):
        np.testing.assert_array_equal(x.inputs, y.inputs)
        np.testing.assert_array_equal(x.targets, y.targets)
    other = small_ds.batch("train", 0, b, t, seed=4)
    assert not np.array_equal(other.inputs, full[0].inputs)


def test_batch_matches_token_windows(small_ds):
    b, t = 5, 29
    toks = np.asarray(small_ds.tokens("train")).astype(np.int32)
    starts = small_ds.window_starts("train", 2, b, t, seed=1)
    batch = small_ds.batch("train", 2, b, t, seed=1)
    assert batch.inputs.shape == batch.targets.shape == (b, t) and batch.inputs.dtype == np.int32
    for row, s in enumerate(starts):
        np.testing.assert_array_equal(batch.inputs[row], toks[s : s + t])
        np.testing.assert_array_equal(batch.targets[row], toks[s + 1 : s + t + 1])


def test_epoch_visits_every_window_once(small_ds):
    t = 41
    windows = small_ds.epoch_windows("train", t)
    assert windows == small_ds.num_windows("train", t) - 1
    offsets = []
    for epoch in range(5):  # with batch_size == windows, step e is exactly epoch e
        starts = small_ds.window_starts("train", epoch, windows, t, seed=7)
        rel = np.sort(starts - starts.min())
        np.testing.assert_array_equal(rel, np.arange(windows) * t)  # non-overlapping, each once
        assert starts.min() >= 0 and starts.max() + t + 1 <= len(small_ds.tokens("train"))
        offsets.append(starts.min())
    assert len(set(offsets)) > 1  # boundaries shift between epochs (5 draws from >= 42 offsets)
    # Small batches crossing an epoch boundary give the same windows as the whole-epoch view.
    steps = range(windows // 7 + 2)
    small = np.concatenate([small_ds.window_starts("train", s, 7, t, seed=7) for s in steps])
    whole = np.concatenate([small_ds.window_starts("train", e, windows, t, seed=7) for e in (0, 1)])
    np.testing.assert_array_equal(small, whole[: len(small)])


def test_shards_tile_the_global_batch(small_ds):
    b, t, n = 12, 23, 3
    full = small_ds.batch("train", 4, b, t, seed=2)
    parts = [small_ds.batch("train", 4, b, t, seed=2, shard=i, num_shards=n) for i in range(n)]
    np.testing.assert_array_equal(np.concatenate([p.inputs for p in parts]), full.inputs)
    shard_stream = small_ds.batches("train", b, t, seed=2, start_step=4, shard=1, num_shards=n)
    np.testing.assert_array_equal(next(shard_stream).inputs, parts[1].inputs)


def test_eval_batches_cover_val_in_order(small_ds):
    b, t = 3, 19
    toks = np.asarray(small_ds.tokens("val")).astype(np.int32)
    batches = list(small_ds.eval_batches("val", b, t))
    assert len(batches) == small_ds.num_windows("val", t) // b
    rows = np.concatenate([x.inputs for x in batches])
    np.testing.assert_array_equal(rows.reshape(-1), toks[: rows.size])
    assert len(list(small_ds.eval_batches("val", b, t, max_batches=1))) == 1
    # Fewer windows than the batch: one batch whose rows wrap around.
    windows = small_ds.num_windows("val", 2 * t)
    (wrapped,) = small_ds.eval_batches("val", windows + 2, 2 * t)
    assert wrapped.inputs.shape == (windows + 2, 2 * t)
    np.testing.assert_array_equal(wrapped.inputs[windows:], wrapped.inputs[:2])


def test_clear_errors(tmp_path, small_ds):
    with pytest.raises(FileNotFoundError, match="not found"):
        data.prepare(tmp_path / "nope.txt", tokenizer="bytes", cache_dir=tmp_path)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="no .txt or .jsonl files"):
        data.prepare(tmp_path / "empty_dir", tokenizer="bytes", cache_dir=tmp_path)
    (tmp_path / "one.txt").write_text("a single document without blank lines")
    with pytest.raises(ValueError, match="single document"):
        data.prepare(tmp_path / "one.txt", tokenizer="bytes", cache_dir=tmp_path)
    too_long = len(small_ds.tokens("val"))
    with pytest.raises(ValueError, match=f"needs at least {too_long + 1}"):
        small_ds.batch("val", 0, 2, too_long)
    with pytest.raises(ValueError, match="not divisible"):
        small_ds.batch("train", 0, 6, 8, num_shards=4)
    with pytest.raises(ValueError, match="val_fraction"):
        data.prepare(tmp_path / "one.txt", tokenizer="bytes", cache_dir=tmp_path, val_fraction=1.0)
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        data.load_tokenizer(tmp_path / "missing.json")


def test_no_val_split_is_allowed_but_val_batches_explain(tmp_path):
    (tmp_path / "one.txt").write_text("a single document without blank lines " * 20)
    ds = data.prepare(tmp_path / "one.txt", tokenizer="bytes", cache_dir=tmp_path / "c", val_fraction=0.0)
    assert len(ds.tokens("val")) == 0 and ds.batch("train", 0, 2, 16).inputs.shape == (2, 16)
    with pytest.raises(ValueError, match="val_fraction=0"):
        ds.batch("val", 0, 2, 16)
    assert json.loads((ds.path / "meta.json").read_text())["splits"]["val"]["tokens"] == 0


def test_tokenizer_object_and_decode(tmp_path):
    rng = np.random.default_rng()
    docs = _write_corpus(tmp_path / "c.txt", rng, n_docs=4)
    tok = data.ByteTokenizer()
    ds = data.prepare(tmp_path / "c.txt", tokenizer=tok, cache_dir=tmp_path / "cache", val_fraction=0.25)
    ids = np.asarray(ds.tokens("train"))
    assert ds.decode(ids, tok).split(data.EOT)[0] in docs
    with pytest.raises(ValueError, match="pass it"):
        ds.decode(ids)


def test_sentence_groups():
    groups = data.load_sentence_groups()
    flat = [s for g in groups for s in g]
    assert len(groups) >= 20 and all(len(g) >= 2 for g in groups)
    assert 60 <= len(flat) <= 100 and len(set(flat)) == len(flat)
    assert not any(s.startswith("#") for s in flat)


# ------------------------------------------------------------------------------------- non-text input


def test_random_bytes_are_refused_naming_the_file(tmp_path):
    blob = tmp_path / "x.bin"
    blob.write_bytes(np.random.default_rng().bytes(1 << 20))
    with pytest.raises(ValueError, match=r"x\.bin: \d+% of the first 1 MiB is not UTF-8 text") as err:
        data.prepare(blob, tokenizer="bytes", cache_dir=tmp_path / "c")
    assert "\n" not in str(err.value) and "NUL" in str(err.value)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
    # Inside a directory, the bad file is the one named.
    d = tmp_path / "corpus"
    d.mkdir()
    _write_corpus(d / "a.txt", np.random.default_rng(), n_docs=3)
    (d / "b.txt").write_bytes(np.random.default_rng().bytes(5000))
    with pytest.raises(ValueError, match=r"b\.txt: \d+% of the file is not UTF-8 text"):
        data.prepare(d, tokenizer="bytes", cache_dir=tmp_path / "c")


@pytest.mark.parametrize(
    "payload, found",
    [
        (b"fine text\n\nsecond\0document\n" * 50, "NUL"),  # a NUL byte at all: binary
        ("héllo wörld ".encode("latin-1") * 200, "invalid UTF-8"),  # a legacy 8-bit encoding
        (b"\x1b[31mred\x1b[0m \x07" * 100, "control characters"),
        ("UTF-16 text here\n".encode("utf-16"), "UTF-16"),
    ],
)
def test_non_utf8_text_is_refused(tmp_path, payload, found):
    path = tmp_path / "in.txt"
    path.write_bytes(payload)
    with pytest.raises(ValueError, match=found):
        data.check_text_file(path)
    with pytest.raises(ValueError, match=r"in\.txt"):
        data.load_documents(path)


def test_valid_non_ascii_text_passes(tmp_path):
    docs = [
        "Ελληνικά: το γρήγορο καφέ αλεπού\tπηδάει.",
        "日本語のテキストです。改行なし。\fページ区切りも文字。",
        "Русский текст — с тире и «кавычками».",
        "العربية نص قصير 😀 emoji 🚀 and ASCII.",
        "a stray \x1b escape in real text is fine " + "word " * 200,
    ]
    path = tmp_path / "multi.txt"
    path.write_bytes(("\r\n\r\n".join(docs) + "\r\n").encode())
    data.check_text_file(path)
    ds = data.prepare(path, tokenizer="wiki-8k", cache_dir=tmp_path / "c", val_fraction=0.2)
    assert sorted(_all_docs_from_cache(ds, data.load_tokenizer())) == sorted(d.strip() for d in docs)


# ------------------------------------------------------------------------------- streaming documents

_PIECES = ["word", "ünï", "日本", "😀", " ", "  ", "\t", "\n", "\n", "\n", "\r\n", "\r", "\x0c", "\u3000",
           "\u2028", "\x85", "\u00a0", "\n \n", "\n\u3000\n"]


@pytest.mark.parametrize("paragraphs", [True, False])
def test_streamed_text_documents_equal_the_whole_file_rule(tmp_path, paragraphs):
    """Line-by-line streaming splits a file exactly as `split_text_documents` splits its whole text,
    whitespace corner cases and an invalid byte included."""
    rng = np.random.default_rng()
    inline = [p for p in _PIECES if "\n" not in p]
    for trial in range(20):
        if paragraphs:
            raw = "".join(_PIECES[i] for i in rng.integers(0, len(_PIECES), 300)).encode()
        else:  # no line is blank: every line holds a word between runs of any other whitespace
            lines = ["".join(inline[i] for i in rng.integers(0, len(inline), 6)) + "w" for _ in range(40)]
            raw = "".join(line + ("\r\n" if rng.random() < 0.3 else "\n") for line in lines).encode()
        cut = int(rng.integers(0, len(raw)))
        raw = raw[:cut] + b"\xff" + raw[cut:]  # one invalid byte: U+FFFD either way
        path = tmp_path / f"t{trial}.txt"
        path.write_bytes(raw)
        expect = data.split_text_documents(raw.decode("utf-8", errors="replace"))
        assert list(data.iter_documents(path)) == expect, raw
        # The blank-line scan reads blocks: a match split across blocks of any size is still found.
        blank = data.corpus._BLANK_LINE.search(raw.decode("utf-8", errors="replace").replace("\r\n", "\n"))
        for chunk in (1, 2, 3, 5):
            assert data.corpus._has_blank_line(path, chunk=chunk) == bool(blank), (chunk, raw)


def _jsonl(path: Path, records: list, field: str = "text") -> None:
    lines = [json.dumps(r if isinstance(r, dict) else {"id": i, field: r}, ensure_ascii=bool(i % 2))
             for i, r in enumerate(records)]
    path.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")  # a blank line is skipped


def test_jsonl_source_and_text_field(tmp_path):
    rng = np.random.default_rng()
    docs = [_random_text(rng, 40) + "\n\nsecond paragraph\u2028same document" for _ in range(8)]
    _jsonl(tmp_path / "a.jsonl", docs)
    assert data.load_documents(tmp_path / "a.jsonl") == docs
    ds = data.prepare(tmp_path / "a.jsonl", tokenizer="bytes", cache_dir=tmp_path / "c", val_fraction=0.25)
    assert sorted(_all_docs_from_cache(ds, data.ByteTokenizer())) == sorted(docs)
    assert ds.meta["text_field"] == "text" and ds.meta["documents"] == len(docs)

    _jsonl(tmp_path / "b.jsonl", docs, field="content")
    with pytest.raises(ValueError, match=r"b\.jsonl:1: no 'text' field \(found: id, content\)"):
        data.prepare(tmp_path / "b.jsonl", tokenizer="bytes", cache_dir=tmp_path / "c")
    other = data.prepare(tmp_path / "b.jsonl", tokenizer="bytes", cache_dir=tmp_path / "c",
                         val_fraction=0.25, text_field="content")
    np.testing.assert_array_equal(other.tokens("train"), ds.tokens("train"))


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "ok"', r"bad\.jsonl:5: not a JSON object"),
        ('{"text": 3}', r"bad\.jsonl:5: field 'text' is int"),
        ('["text"]', r"bad\.jsonl:5: no 'text' field \(found: list\)"),
    ],
)
def test_bad_jsonl_line_is_named_and_leaves_no_cache(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([json.dumps({"text": f"document {i}"}) for i in range(4)] + [line]) + "\n")
    with pytest.raises(ValueError, match=message):
        data.prepare(path, tokenizer="bytes", cache_dir=tmp_path / "c")
    assert [p.name for p in (tmp_path / "c").iterdir()] in ([], ["file-hashes.json"])


def test_workers_and_split_match_the_in_memory_reference(tmp_path, monkeypatch):
    """A pool of workers writes the same files as one process, and the streamed, bucketed val choice
    equals `split_documents` over the whole corpus (few buckets, so ranking inside a bucket matters)."""
    monkeypatch.setattr(data.corpus, "BUCKET_BITS", 2)
    monkeypatch.setattr(data.corpus, "TASK_CHARS", 700)  # many small tasks, out-of-order completion
    rng = np.random.default_rng()
    d = tmp_path / "corpus"
    d.mkdir()
    docs = _write_corpus(d / "a.txt", rng, n_docs=25, words=30)
    docs += [docs[3]]  # a duplicate document: equal hashes rank by position
    (d / "a.txt").write_text("\n\n".join(docs))
    more = [_random_text(rng, int(rng.integers(3, 60))) for _ in range(20)]
    _jsonl(d / "b.jsonl", more)
    docs += more
    tok = data.load_tokenizer("wiki-8k")
    one = data.prepare(d, tokenizer=tok, cache_dir=tmp_path / "c1", val_fraction=0.3, workers=1)
    two = data.prepare(d, tokenizer=tok, cache_dir=tmp_path / "c2", val_fraction=0.3, workers=2)
    for split in one.SPLITS:
        np.testing.assert_array_equal(one.tokens(split), two.tokens(split))
    assert one.meta["splits"] == two.meta["splits"]
    counts = [len(ids) + 1 for ids in tok.encode_batch(docs)]
    is_val = data.split_documents(docs, counts, 0.3)
    expect_val = [d for d, v in zip(docs, is_val) if v]
    got_val = [x for x in tok.decode(np.asarray(one.tokens("val")).tolist()).split(data.EOT) if x]
    assert got_val == expect_val  # document order kept within the split
    got_train = [x for x in tok.decode(np.asarray(one.tokens("train")).tolist()).split(data.EOT) if x]
    assert got_train == [d for d, v in zip(docs, is_val) if not v]


def _word_level_tokenizer(vocab_size: int, eos: str = data.EOT):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(vocab_size - 2)]
    vocab = {eos: 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok, words


def test_large_vocabulary_writes_uint32_tokens(tmp_path):
    tok, words = _word_level_tokenizer(70_000, eos="</s>")
    rng = np.random.default_rng()
    docs = [" ".join(rng.choice(words, 50)) for _ in range(6)]
    (tmp_path / "c.txt").write_text("\n".join(docs))
    ds = data.prepare(tmp_path / "c.txt", tokenizer=tok, cache_dir=tmp_path / "c", val_fraction=0.2)
    assert ds.meta["dtype"] == "uint32" and ds.tokens("train").dtype == np.uint32
    assert (ds.vocab_size, ds.eot_id, ds.meta["eot_token"]) == (70_000, 0, "</s>")
    expect = sorted(ids + [0] for ids in data.load_tokenizer(tok).encode_batch(docs))
    got = np.concatenate([ds.tokens("train"), ds.tokens("val")]).tolist()
    runs, start = [], 0
    for i, t in enumerate(got):
        if t == 0:
            runs.append(got[start : i + 1])
            start = i + 1
    assert sorted(runs) == expect and max(got) >= 1 << 16
    assert ds.decode(ds.tokens("val")[:3]).split() == [words[i - 2] for i in ds.tokens("val")[:3]]
    again = data.TokenDataset(ds.path)
    assert again.batch("train", 0, 2, 16).inputs.max() >= 0 and again.dtype == np.uint32
    # A small vocabulary object: uint16; a different tokenizer is a different cache.
    small, _ = _word_level_tokenizer(300)
    (tmp_path / "s.txt").write_text("\n".join(" ".join(rng.choice(words[:298], 20)) for _ in range(4)))
    assert data.prepare(tmp_path / "s.txt", tokenizer=small, cache_dir=tmp_path / "c").dtype == np.uint16
    no_eos, _ = _word_level_tokenizer(300, eos="[SEP]")
    with pytest.raises(ValueError, match="eos_token="):
        data.load_tokenizer(no_eos)
    assert data.load_tokenizer(no_eos, eos_token="[SEP]").eot_id == 0


def test_source_hash_memo_skips_rereading_unchanged_files(tmp_path, monkeypatch):
    src, cache = tmp_path / "u.txt", tmp_path / "c"
    _write_corpus(src, np.random.default_rng(), n_docs=4)
    monkeypatch.setattr(data.corpus, "RACY_NS", 0)  # the file was just written: remember it anyway
    ds = data.prepare(src, tokenizer="bytes", cache_dir=cache, val_fraction=0.25)
    reads = []
    real = data.corpus._file_sha256
    monkeypatch.setattr(data.corpus, "_file_sha256", lambda p: reads.append(p) or real(p))
    assert data.prepare(src, tokenizer="bytes", cache_dir=cache, val_fraction=0.25).from_cache and not reads
    _write_corpus(src, np.random.default_rng(), n_docs=4)  # new content, new stat: re-read, new key
    changed = data.prepare(src, tokenizer="bytes", cache_dir=cache, val_fraction=0.25)
    assert reads == [src] and not changed.from_cache and changed.path != ds.path


def test_cli_prepare_errors_are_one_line(tmp_path):
    (tmp_path / "x.bin").write_bytes(bytes(range(256)) * 64)
    cmd = [sys.executable, "-m", "jq8.data", "prepare", "--source", str(tmp_path / "x.bin"),
           "--tokenizer", "bytes", "--cache-dir", str(tmp_path / "c")]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert res.returncode != 0 and res.stderr.count("\n") == 1 and "x.bin" in res.stderr, res.stderr
