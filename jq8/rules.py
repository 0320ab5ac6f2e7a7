"""Module paths and the regex rules that match them: one matcher for training policies and PTQ schemes.

A module path is a Flax scope path joined by "/" (``"blocks_0/mlp/fc1"``); parameter trees are nested
dicts addressed by the same paths. A rule's pattern matches a path with ``re.search``, so
``r"(^|/)fc1$"`` selects every ``fc1`` and ``r"^blocks_0/"`` one block; rules are tried in order and the
first match wins. A rule that matches nothing is reported (it is almost always a typo).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any


def module_path(scope_path: Iterable[Any]) -> str:
    """A Flax scope path (``module.scope.path`` / ``module.path``) joined by "/"."""
    return "/".join(str(p) for p in scope_path)


def compile_pattern(pattern: str, what: str = "rule") -> re.Pattern:
    """``re.compile(pattern)``, with a one-line error naming the rule on a bad regex."""
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{what} pattern {pattern!r} is not a valid regex: {e}") from None


def matches(pattern: str | re.Pattern, path: str) -> bool:
    """Whether ``pattern`` selects ``path`` (``re.search``)."""
    return re.search(pattern, path) is not None


def first_match(patterns: Sequence[str | re.Pattern], path: str) -> int | None:
    """Index of the first pattern selecting ``path``, or None."""
    return next((i for i, p in enumerate(patterns) if matches(p, path)), None)


def assign(paths: Iterable[str], patterns: Sequence[str | re.Pattern]) -> tuple[dict[str, int], list[int]]:
    """(path -> index of its first matching pattern, indices of patterns that matched no path)."""
    assignment: dict[str, int] = {}
    for p in paths:
        i = first_match(patterns, p)
        if i is not None:
            assignment[p] = i
    used = set(assignment.values())
    return assignment, [i for i in range(len(patterns)) if i not in used]


# ---------------------------------------------------------------------------------- parameter trees


def get_path(tree: Mapping[str, Any], path: str) -> Any:
    """The node of a nested-dict tree at a "/"-joined path."""
    node = tree
    for k in path.split("/"):
        node = node[k]
    return node


def map_path(tree: Mapping[str, Any], path: str, fn: Callable[[Any], Any]) -> dict:
    """A copy of ``tree`` (dicts copied along ``path`` only) with the node at ``path`` replaced by fn(node)."""
    head, _, rest = path.partition("/")
    new = dict(tree)
    new[head] = fn(tree[head]) if not rest else map_path(tree[head], rest, fn)
    return new


def set_path(tree: Mapping[str, Any], path: str, value: Any) -> dict:
    """A copy of ``tree`` with the node at ``path`` set to ``value``."""
    return map_path(tree, path, lambda _: value)


def paths_holding(tree: Mapping[str, Any], leaf: str) -> list[str]:
    """Paths, in tree order, of every dict in ``tree`` holding a 2-D array named ``leaf`` (``"kernel"``:
    Dense layers; ``"embedding"``: embedding tables)."""
    out: list[str] = []

    def walk(node: Mapping[str, Any], prefix: tuple[str, ...]) -> None:
        for k, v in node.items():
            if isinstance(v, Mapping):
                walk(v, (*prefix, str(k)))
            elif k == leaf and getattr(v, "ndim", 0) == 2:
                out.append("/".join(prefix))

    walk(tree, ())
    return out
