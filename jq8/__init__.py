"""jq8: INT8 training (Jetfire) and INT8/INT4 post-training quantization (ZeroQuant) in JAX."""

from jq8.quant import QArray, QuantSpec, dequantize, fake_quantize, quantize

__all__ = ["QArray", "QuantSpec", "dequantize", "fake_quantize", "quantize"]
__version__ = "0.1.0"
