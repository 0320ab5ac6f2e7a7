"""MediaWiki XML export -> plain text, one string per article.

`strip_markup(wikitext) -> str` turns one page's wikitext into readable prose: templates ``{{...}}`` (nested)
and tables ``{| ... |}`` are removed, ``<ref>`` citations, HTML comments and tags are dropped (inline tags
keep their text), ``[[target|label]]`` becomes ``label``, ``[[File:..]]``/``[[Category:..]]``/interlanguage
links are removed, bold/italic quotes go away and ``== Heading ==`` becomes the line ``Heading``.
`iter_articles(path)` streams ``(title, text)`` from a ``.xml`` or ``.xml.bz2`` dump, skipping redirects and
pages outside the main namespace. It is a pragmatic cleaner for language-model text, not a MediaWiki parser.
"""

from __future__ import annotations

import bz2
import html
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

# Bump when the cleaning rules change: jq8.data folds it into the token-cache key.
CLEANER_VERSION = 1
# Articles shorter than this once cleaned (stubs, disambiguation debris) are not documents.
MIN_ARTICLE_CHARS = 200

# Links whose target starts with one of these are media/metadata, not prose.
_DROP_LINK_NAMESPACES = frozenset({"file", "image", "media", "category"})
# Elements whose content is not prose (citations, formulas, galleries, ...).
_DROP_ELEMENTS = ("ref", "math", "gallery", "timeline", "score", "syntaxhighlight", "source", "imagemap",
                  "templatedata", "references")

_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_DROP_ELEMENT = re.compile(
    r"<(" + "|".join(_DROP_ELEMENTS) + r")\b[^>]*?(?:/>|>.*?</\1\s*>)", re.S | re.I)
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*\b[^<>]*>")
_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+(?:\s+([^\]]*))?\]")
_BOLD_ITALIC = re.compile(r"'{2,5}")
_HEADING = re.compile(r"^\s*(={1,6})\s*(.*?)\s*\1\s*$", re.M)
_LIST_MARKER = re.compile(r"^[*#:;]+\s*", re.M)
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_INTERLANGUAGE = re.compile(r"^[a-z]{2,3}(?:-[a-z]+)?$")
_SPACES = re.compile(r"[ \t\u00a0]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def remove_nested(text: str) -> str:
    """Remove templates ``{{ ... }}`` and tables ``{| ... |}``, which nest in each other.

    A table opens only at the start of a line (MediaWiki's rule). An opener that is never closed is
    dropped on its own so a stray ``{{`` does not swallow the rest of the article.
    """
    out: list[str] = []
    stack: list[tuple[str, int]] = []  # (kind, position of the opener)
    i, n, keep_from = 0, len(text), 0
    while i < n:
        two = text[i:i + 2]
        if two == "{{":
            if not stack:
                out.append(text[keep_from:i])
            stack.append(("{{", i))
            i += 2
        elif two == "{|" and _at_line_start(text, i):
            if not stack:
                out.append(text[keep_from:i])
            stack.append(("{|", i))
            i += 2
        elif stack and ((two == "}}" and stack[-1][0] == "{{") or (two == "|}" and stack[-1][0] == "{|")):
            stack.pop()
            i += 2
            if not stack:
                keep_from = i
        else:
            i += 1
    if stack:  # unbalanced: drop the outermost opener only and clean what follows it
        start = stack[0][1]
        return "".join(out) + remove_nested(text[start + 2:])
    out.append(text[keep_from:])
    return "".join(out)


def _at_line_start(text: str, i: int) -> bool:
    j = i - 1
    while j >= 0 and text[j] in " \t":
        j -= 1
    return j < 0 or text[j] == "\n"


def _link_text(inner: str) -> str:
    """The visible text of one ``[[inner]]`` link whose own nested links are already replaced."""
    target, _, label = inner.partition("|")
    prefix, colon, _ = target.strip().partition(":")
    if colon:
        if prefix.strip().lower() in _DROP_LINK_NAMESPACES or _INTERLANGUAGE.match(prefix.strip()):
            return ""
        if not label:  # e.g. [[wikt:word]] or [[:Category:X]]: show the page name
            return target.strip().lstrip(":").split(":", 1)[-1]
    if label:
        return label.rsplit("|", 1)[-1]
    return target.split("#", 1)[0] if not target.startswith("#") else target[1:]


def replace_links(text: str) -> str:
    """``[[target|label]]`` -> label, ``[[target]]`` -> target; media/category/interlanguage links -> "".

    Links nest (a ``[[File:x|caption with [[a link]] and [brackets]]]``), so the scan balances ``[[``/``]]``
    and replaces inner links first; the media link is then removed whole. An unclosed ``[[`` is kept as text.
    """
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        start = text.find("[[", i)
        if start < 0:
            out.append(text[i:])
            break
        out.append(text[i:start])
        depth, j = 1, start + 2
        while j < n and depth:
            if text.startswith("[[", j):
                depth, j = depth + 1, j + 2
            elif text.startswith("]]", j):
                depth, j = depth - 1, j + 2
            else:
                j += 1
        if depth:  # unclosed: keep the brackets literally and move on
            out.append("[[")
            i = start + 2
            continue
        out.append(_link_text(replace_links(text[start + 2:j - 2])))
        i = j
    return _EXTERNAL_LINK.sub(lambda m: m.group(1) or "", "".join(out))


def strip_markup(wikitext: str) -> str:
    """One article's wikitext -> plain text (paragraphs separated by blank lines, headings as lines)."""
    text = _COMMENT.sub("", wikitext)
    text = _DROP_ELEMENT.sub("", text)
    text = remove_nested(text)
    text = replace_links(text)
    text = _TAG.sub("", text)
    text = _BOLD_ITALIC.sub("", text)
    text = _MAGIC_WORD.sub("", text)
    text = _HEADING.sub(lambda m: "\n" + m.group(2) + "\n", text)
    text = _LIST_MARKER.sub("", text)
    text = html.unescape(text)  # &nbsp; &ndash; ... (the XML layer already decoded &lt; &amp; ...)
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    # Lines made only of leftover punctuation (table/template debris) are not prose.
    lines = [line for line in lines if not line or any(ch.isalnum() for ch in line)]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def iter_pages(path: str | Path) -> Iterator[tuple[str, str]]:
    """Stream ``(title, raw wikitext)`` of main-namespace, non-redirect pages from a ``.xml[.bz2]`` dump.

    A file that is not XML (or not bzip2 when named ``.bz2``) raises ``ValueError`` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MediaWiki dump not found: {path}")
    opener = bz2.open if path.suffix == ".bz2" else open
    try:
        with opener(path, "rb") as f:
            root = None
            for event, elem in ET.iterparse(f, events=("start", "end")):
                if root is None:
                    root = elem
                if event != "end" or _local(elem.tag) != "page":
                    continue
                fields = {_local(child.tag): child for child in elem}
                ns = fields.get("ns")
                title = (fields["title"].text or "") if "title" in fields else ""
                is_redirect = "redirect" in fields
                text_elem = next((e for e in elem.iter() if _local(e.tag) == "text"), None)
                raw = (text_elem.text or "") if text_elem is not None else ""
                root.clear()  # drop finished pages: memory stays flat on dumps of any size
                if is_redirect or (ns is not None and (ns.text or "0").strip() != "0"):
                    continue
                if raw.lstrip().upper().startswith("#REDIRECT"):
                    continue
                yield title, raw
    except (ET.ParseError, OSError, EOFError) as e:
        kind = "bzip2-compressed MediaWiki XML" if path.suffix == ".bz2" else "MediaWiki XML"
        raise ValueError(f"{path}: not a {kind} dump ({e}); pass a .xml or .xml.bz2 export") from None


def iter_articles(path: str | Path, min_chars: int = MIN_ARTICLE_CHARS) -> Iterator[tuple[str, str]]:
    """Stream ``(title, plain text)`` per article; articles shorter than ``min_chars`` after cleaning
    (stubs, disambiguation debris) are skipped."""
    for title, raw in iter_pages(path):
        text = strip_markup(raw)
        if len(text) >= min_chars:
            yield title, text
