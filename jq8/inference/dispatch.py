"""Calling a jitted function on a large parameter tree with less host work per call.

Every call of ``jax.jit(f)(params, x)`` flattens ``params`` and checks its tree structure against the
compiled one before anything is launched. :func:`jit_bound` flattens once, when the parameters are bound,
and passes the leaves as a flat list on each call. On the H100 machine's host, a jitted call over a
48-layer W8A8 GPT-2 tree (774 leaves, QArray nodes) took 1.16 ms as a pytree and 0.70 ms as a flat list
(``benchmarks/dispatch_probe.py --trees gpt2-1.5b``, BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax


class BoundJit:
    """``jax.jit(fn)`` with its first argument bound to ``params`` (see :func:`jit_bound`).

    Calling it with ``*args`` returns ``jax.jit(fn)(params, *args)``. ``params`` and ``jitted`` (the
    jitted function of (leaves, *args)) are attributes; ``lower(*args)`` lowers it for inspection.
    """

    def __init__(self, fn: Callable[..., Any], params: Any, **jit_kwargs: Any):
        leaves, treedef = jax.tree_util.tree_flatten(params)
        bad = [type(x).__name__ for x in leaves if not isinstance(x, jax.Array)]
        if bad:
            raise TypeError(
                f"jit_bound binds a tree of jax.Arrays; {len(bad)} leaves are not ({sorted(set(bad))}): "
                "put them on the device with jax.device_put first, or pass them as arguments"
            )
        self.params = params
        self._leaves = leaves

        def call(flat: list[jax.Array], *args: Any) -> Any:
            return fn(jax.tree_util.tree_unflatten(treedef, flat), *args)

        call.__name__ = getattr(fn, "__name__", "bound")
        self.jitted = jax.jit(call, **jit_kwargs)

    def __call__(self, *args: Any) -> Any:
        return self.jitted(self._leaves, *args)

    def lower(self, *args: Any):
        return self.jitted.lower(self._leaves, *args)


def jit_bound(fn: Callable[..., Any], params: Any, **jit_kwargs: Any) -> BoundJit:
    """``jax.jit(fn)`` with ``fn``'s first argument fixed to ``params``, dispatched as a flat leaf list.

    fn: ``fn(params, *args)``, traceable. params: any pytree of ``jax.Array`` (a float params dict, a
    :class:`jq8.ptq.QuantizedParams`). jit_kwargs: passed to ``jax.jit`` (argument numbers count the
    leaf list as argument 0). The result is the same as ``jax.jit(fn)(params, *args)``; the parameters
    stay referenced (not copied) for the bound function's lifetime.
    """
    return BoundJit(fn, params, **jit_kwargs)
