"""The one seam between callers and kernel backends.

Every kernel wrapper takes ``interpret: bool | None`` and calls :func:`resolve_interpret`: ``None`` means
"compiled Triton on a GPU, interpret mode everywhere else". :func:`compiler_params` is always passed to
``pallas_call`` so JAX 0.10.x (which defaults to Mosaic GPU without it) and 0.11.x both pick the Triton
lowering. A Mosaic GPU implementation of a kernel would be chosen here, per kernel, without touching callers.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.experimental.pallas import triton as plgpu


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def resolve_interpret(interpret: bool | None) -> bool:
    """``None`` -> interpret unless the default backend is a GPU."""
    return (not on_gpu()) if interpret is None else bool(interpret)


def compiler_params(num_warps: int = 4, num_stages: int = 3) -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """A GEMM / elementwise tile configuration (hashable: it is a static jit argument)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8  # programs along M sharing a band of B, for L2 reuse (grouped ordering)
