"""Policies on an existing Flax model: (module-path regex, policy) rules over its ``nn.Dense`` layers.

Matching ``Dense`` calls are rerouted through :func:`jq8.training.jetfire.jetfire_linear` with
``flax.linen.intercept_methods``; parameters are untouched, so the same checkpoint runs under any rules.
Patterns match module paths as PTQ's rules do (:mod:`jq8.rules`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jq8.rules import compile_pattern, first_match, module_path
from jq8.training.jetfire import jetfire_linear
from jq8.training.policy import Policy, as_policy, quant_key

Rules = Sequence[tuple[str, Policy | str]] | Mapping[str, Policy | str]


@dataclasses.dataclass
class PolicyModel:
    """A Flax model with a policy applied by rules; ``init`` / ``apply`` mirror ``flax.linen.Module``.

    rules: (regex, policy) pairs matched against a Dense module's path (``"blocks_0/mlp/fc1"``) by
    :mod:`jq8.rules` (``re.search``, as PTQ's rules); the first matching rule wins; Dense modules that match no rule
    run unchanged. After each ``init``/``apply``, a rule that matched no ``nn.Dense`` raises ValueError.
    Stochastic rounding draws keys from the ``"quant"`` rng stream when given, else from ``"dropout"``,
    else a fixed key (deterministic noise: pass an rng to vary it per step).
    """

    model: nn.Module
    rules: tuple[tuple[re.Pattern, Policy], ...]

    def _interceptor(self, matched: set[int], seen: list[str]) -> Callable:
        def intercept(next_fun, args, kwargs, context):
            mod = context.module
            if context.method_name != "__call__" or not isinstance(mod, nn.Dense):
                return next_fun(*args, **kwargs)
            path = module_path(mod.scope.path)
            seen.append(path)
            hit = first_match([rx for rx, _ in self.rules], path)
            if hit is None:
                return next_fun(*args, **kwargs)
            matched.add(hit)
            policy = self.rules[hit][1]
            if mod.is_initializing() or not policy.int8:
                return next_fun(*args, **kwargs)  # creates the parameters / plain layer
            (x,) = args
            kernel = mod.get_variable("params", "kernel")
            bias = mod.get_variable("params", "bias") if mod.use_bias else None
            key = quant_key(mod)
            y = jetfire_linear(x, kernel, bias, key, policy)
            # nn.Dense's output dtype: its ``dtype``, else inferred from input and kernel.
            return y.astype(mod.dtype or jnp.result_type(x.dtype, kernel.dtype))

        return intercept

    def _run(self, fn: Callable, *args, **kwargs):
        matched: set[int] = set()
        seen: list[str] = []
        with nn.intercept_methods(self._interceptor(matched, seen)):
            out = fn(*args, **kwargs)
        missing = [self.rules[i][0].pattern for i in range(len(self.rules)) if i not in matched]
        if missing:
            raise ValueError(
                f"policy rule(s) {missing} matched no nn.Dense module; Dense paths seen: {sorted(set(seen))}"
            )
        return out

    def init(self, *args, **kwargs):
        return self._run(self.model.init, *args, **kwargs)

    def apply(self, *args, **kwargs):
        return self._run(self.model.apply, *args, **kwargs)


def apply_policy(model: nn.Module, rules: Rules) -> PolicyModel:
    """Applies policies to ``model``'s ``nn.Dense`` layers by module-path regex (see :class:`PolicyModel`).

    Example: ``apply_policy(model, {r".*mlp/fc[12]": "jetfire-int8"}).apply(variables, x, rngs=...)``.
    Only 2-D-kernel Dense layers (kernel (in, out)) whose ``in``/``out`` are block multiples qualify.
    """
    items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    if not items:
        raise ValueError("apply_policy needs at least one (regex, policy) rule")
    compiled = [(compile_pattern(pattern, "policy rule"), as_policy(policy)) for pattern, policy in items]
    return PolicyModel(model, tuple(compiled))
