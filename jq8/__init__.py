"""jq8: INT8 training (Jetfire) and INT8/INT4 post-training quantization (ZeroQuant) in JAX.

Submodules: ``quant`` (numerics), ``policy`` / ``nn`` / ``jetfire`` (INT8 training), ``ptq`` / ``lkd`` /
``ptq_infer`` / ``qcheckpoint`` (post-training quantization), ``data``, ``checkpoint``, ``metrics``,
``dispatch`` (jitted calls on large parameter trees).
"""

from jq8.policy import HIGH_PRECISION_ISLANDS, Policy, apply_policy
from jq8.quant import QArray, QuantSpec, dequantize, fake_quantize, quantize

__all__ = [
    "HIGH_PRECISION_ISLANDS",
    "Policy",
    "QArray",
    "QuantSpec",
    "apply_policy",
    "dequantize",
    "fake_quantize",
    "quantize",
]
__version__ = "0.1.0"
