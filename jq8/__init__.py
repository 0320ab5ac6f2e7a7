"""jq8: INT8 training (Jetfire) and INT8/INT4 post-training quantization (ZeroQuant) in JAX.

Floors, bottom to top: ``jq8.quant`` (numerics: specs, QArray, rounding, packing) -> ``pallas_kernels``
-> ``jq8.training`` (policies, custom_vjp INT8 ops, Flax modules), ``jq8.ptq`` (ZeroQuant), ``jq8.data``
-> ``models`` -> ``jq8.inference`` and the scripts. ``jq8.rules`` is the module-path rule matcher that
training policies and PTQ schemes share.

The names below resolve lazily, so importing ``jq8.quant`` (as every kernel does) imports neither Flax
nor the training stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_LAZY = {
    "QArray": "jq8.quant",
    "QuantSpec": "jq8.quant",
    "dequantize": "jq8.quant",
    "fake_quantize": "jq8.quant",
    "quantize": "jq8.quant",
    "Policy": "jq8.training.policy",
    "apply_policy": "jq8.training.policy_rules",
    "HIGH_PRECISION_ISLANDS": "jq8.training.policy",
}
__all__ = sorted(_LAZY)
__version__ = "0.1.0"

if TYPE_CHECKING:
    from jq8.quant import QArray, QuantSpec, dequantize, fake_quantize, quantize  # noqa: F401
    from jq8.training.policy import HIGH_PRECISION_ISLANDS, Policy  # noqa: F401
    from jq8.training.policy_rules import apply_policy  # noqa: F401


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jq8' has no attribute {name!r}")
