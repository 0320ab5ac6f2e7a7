"""Precision policy: which GEMMs run in INT8 (Jetfire data flow) and which stay high precision.

A :class:`Policy` is a frozen, hashable dataclass, so it can be a Flax module attribute and a static
argument of ``jax.jit`` / ``jax.custom_vjp``. Named policies (:data:`NAMED_POLICIES`, the names
``train.py --policy`` takes):

    "bf16"          plain bf16-compute layers with fp32 parameters (the baseline)
    "jetfire-int8-32x32"  Jetfire INT8 training as in the paper: block-quantized (32 x 32) activations,
                    weights and gradients; INT8 between LayerNorm -> fc1 -> GELU -> fc2 and into the attention
                    projections
    "jetfire-int8-g128"  the same data flow in the tiles Hopper's int8 wgmma favours (DeepSeek-style): 1 x 128
                    activation and gradient tiles (per token, per 128 features), 128 x 128 weight blocks;
                    one scale change every 128 along K instead of every 32 (faster on the H100, and closer to
                    bf16 in BENCHMARKS.md's loss-parity and GEMM-error tables)
    "jetfire-int8"  the block policy for the device: "jetfire-int8-g128" when the default device is a Hopper
                    (sm_90) GPU, else "jetfire-int8-32x32". With a ``block=`` override it is the paper's
                    square tiles at that size on every device. train.py narrows the Hopper tiles to
                    1 x G / G x G for a model whose widths 128 does not divide (:func:`resolve_spec`)
    "int8-row"      the same INT8 data flow with per-row scales along K on every GEMM operand (per token,
                    per output channel): all scaling in the GEMM epilogue, the fast path on Hopper

A policy spec string is a name with optional field overrides, ``"jetfire-int8:block=64"`` or
``"int8-row:rounding_bwd=nearest"`` (:func:`parse_policy`).

:data:`HIGH_PRECISION_ISLANDS` lists, in one place, what never runs in INT8 under any policy.

:func:`jq8.training.policy_rules.apply_policy` puts policies on an existing Flax model by module-path rules.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from jq8.quant import QuantSpec
from jq8.rules import module_path
from pallas_kernels.gemm import BLOCK_BACKENDS

PolicyName = Literal["bf16", "jetfire-int8"]
POLICY_NAMES: tuple[str, ...] = ("bf16", "jetfire-int8")
# Named policies: name -> the Policy fields it sets.
NAMED_POLICIES: dict[str, dict[str, Any]] = {
    "bf16": dict(name="bf16"),
    "jetfire-int8-32x32": dict(name="jetfire-int8", granularity="block", block=(32, 32)),
    "jetfire-int8-g128": dict(name="jetfire-int8", granularity="block", block=(128, 128), act_block=(1, 128),
                              grad_block=(1, 128)),
    "jetfire-int8": {},  # resolved per device by Policy.from_name (see jetfire_int8_fields)
    "int8-row": dict(name="jetfire-int8", granularity="row"),
}
ROLES: tuple[str, ...] = ("act", "weight", "grad")


def on_hopper() -> bool:
    """Whether JAX's default device is an sm_90 (Hopper) GPU."""
    dev = jax.devices()[0]
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def jetfire_int8_fields(overrides: dict[str, Any]) -> dict[str, Any]:
    """The fields "jetfire-int8" stands for: the Hopper tiles on sm_90, else the paper's 32 x 32 blocks;
    the paper's square tiles wherever ``overrides`` set ``block`` (``jetfire-int8:block=64`` is 64 x 64)."""
    hopper = on_hopper() and "block" not in overrides
    return NAMED_POLICIES["jetfire-int8-g128" if hopper else "jetfire-int8-32x32"]

# What stays in high precision under every policy, and why (Jetfire's split, kept explicit here).
HIGH_PRECISION_ISLANDS: tuple[tuple[str, str], ...] = (
    ("embeddings", "a gather, not a GEMM; token/position tables are looked up in fp32"),
    ("residual stream", "x + branch(x) is accumulated in fp32 so INT8 errors do not compound across layers"),
    ("attention core", "softmax(QK^T)V via jax.nn.dot_product_attention in compute dtype on the qkv GEMM's "
     "high-precision output (its INT8 operands are the LN output and the weight)"),
    ("final norm", "the last LayerNorm feeds the LM head; its output is not quantized"),
    ("LM head", "logits need the full dynamic range; the tied/untied head stays a bf16/fp32 GEMM"),
    ("loss", "softmax cross-entropy in fp32"),
    ("optimizer", "AdamW on fp32 master weights; INT8 weights are re-quantized from them every step"),
    ("norm statistics", "LayerNorm/RMSNorm mean and rstd are fp32 full-row statistics"),
    ("bias / norm gradients", "bias, gamma and beta gradients are fp32 reductions"),
)

_COMPUTE_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


@dataclasses.dataclass(frozen=True)
class Policy:
    """Numerics of the transformer-block GEMMs.

    name: "bf16" or "jetfire-int8". Under "bf16" the int8 flags are set to False.
    block: (rows, cols) tile of the Jetfire block quantization (powers of two; 32 x 32 in the paper), the
      tile of every operand role not given its own below.
    act_block / weight_block / grad_block: the tile of one operand role, or None for ``block``: activations
      (LayerNorm / GELU / SwiGLU outputs, (tokens, features)), weights ((in, out) masters) and gradients
      ((tokens, features)). cols run along the forward GEMM's K for activations. A tile of at least 32
      rows serves both GEMM layouts with one set of scales (the transposed copy reuses them); a thinner tile
      (1 x 128, per token) has its transposed copy quantized again in the same pass with the same tile shape,
      since the grad-weight GEMM contracts over tokens and its K groups must be >= 32 wide.
    rounding_bwd: rounding of backward (gradient) quantization: "stochastic" (unbiased) or "nearest".
      Forward quantization is always round-to-nearest.
    int8_forward / int8_grad_input / int8_grad_weight: per-GEMM switches (the forward GEMM Y = X W, the
      grad-input GEMM dX = dY W^T, the grad-weight GEMM dW = X^T dY); a GEMM switched off runs in
      ``compute_dtype`` with fp32 accumulation.
    compute_dtype: dtype of the high-precision GEMMs and of block outputs' intermediate values.
    backend: "pallas" runs the INT8 ops on the Pallas kernels (interpret mode on CPU); "xla" runs their
      pure-jnp references through XLA (fast on CPU, for tests; the same name PTQ inference takes).
    block_gemm: the kernel of GEMMs whose scales vary along K on both operands, under "pallas": "auto" takes
      the warp-specialised Hopper kernel (``int8_matmul_block_mgpu``) on sm_90 where the shapes tile and the
      output is float or requantized in 1 x q tiles (fc1's), else Triton; "triton" keeps Triton everywhere.
    granularity: scales of the GEMM operands. "block" (Jetfire): each role's tiles (above); the GEMM
      rescales its int32 partial once per K block. "row" (torchao style, an
      experiment for speed): every GEMM operand is scaled per row of its (., K) layout, so all scaling
      happens in the GEMM epilogue, at the price of quantizing each tensor once per layout; tensors kept
      only for the backward stay in ``block`` tiles (the LayerNorm input) or in the GEMM epilogue's tiles
      (fc1's output, see ``epilogue_spec``).
    """

    name: PolicyName = "bf16"
    block: tuple[int, int] = (32, 32)
    act_block: tuple[int, int] | None = None
    weight_block: tuple[int, int] | None = None
    grad_block: tuple[int, int] | None = None
    rounding_bwd: Literal["stochastic", "nearest"] = "stochastic"
    int8_forward: bool = True
    int8_grad_input: bool = True
    int8_grad_weight: bool = True
    compute_dtype: Any = jnp.bfloat16
    backend: Literal["pallas", "xla"] = "pallas"
    block_gemm: Literal["auto", "triton"] = "auto"
    granularity: Literal["block", "row"] = "block"

    def __post_init__(self):
        if self.name not in POLICY_NAMES:
            raise ValueError(f"unknown policy name {self.name!r}; expected one of {POLICY_NAMES}")
        for field in ("block", *(f"{r}_block" for r in ROLES)):
            value = getattr(self, field)
            if value is None and field != "block":
                continue
            tile = tuple(int(b) for b in value) if isinstance(value, (tuple, list)) else ()
            if len(tile) != 2 or not all(_is_pow2(b) for b in tile):
                raise ValueError(
                    f"{field} must be two powers of two (the kernels' tile sizes), got {value}; "
                    "Jetfire uses (32, 32)"
                )
            object.__setattr__(self, field, tile)
        if self.granularity not in ("block", "row"):
            raise ValueError(f"granularity must be 'block' or 'row', got {self.granularity!r}")
        if self.backend not in ("pallas", "xla"):
            raise ValueError(f"backend must be 'pallas' or 'xla', got {self.backend!r}")
        if self.block_gemm not in BLOCK_BACKENDS:
            raise ValueError(f"block_gemm must be one of {BLOCK_BACKENDS}, got {self.block_gemm!r}")
        if self.rounding_bwd not in ("stochastic", "nearest"):
            raise ValueError(f"rounding_bwd must be 'stochastic' or 'nearest', got {self.rounding_bwd!r}")
        dt = jnp.dtype(self.compute_dtype)
        if dt not in _COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be bfloat16, float16 or float32, got {dt}")
        object.__setattr__(self, "compute_dtype", dt)
        if self.name == "bf16":  # no INT8 GEMM under bf16, whatever the flags said
            for f in ("int8_forward", "int8_grad_input", "int8_grad_weight"):
                object.__setattr__(self, f, False)

    @classmethod
    def from_name(cls, name: str, **overrides) -> Policy:
        """The named policy (a key of :data:`NAMED_POLICIES`), with any field overridden by keyword."""
        if name not in NAMED_POLICIES:
            raise ValueError(f"unknown policy name {name!r}; expected one of {sorted(NAMED_POLICIES)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - fields
        if unknown:
            raise ValueError(f"unknown Policy field(s) {sorted(unknown)}; valid fields: {sorted(fields)}")
        named = jetfire_int8_fields(overrides) if name == "jetfire-int8" else NAMED_POLICIES[name]
        return cls(**{**named, **overrides})

    @property
    def int8(self) -> bool:
        """True when at least one GEMM runs in INT8."""
        return self.name == "jetfire-int8" and (
            self.int8_forward or self.int8_grad_input or self.int8_grad_weight
        )

    def tile(self, role: str) -> tuple[int, int]:
        """The block tile of an operand role ("act", "weight" or "grad"; see the class docstring)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        return getattr(self, f"{role}_block") or self.block

    @property
    def tiles(self) -> tuple[tuple[int, int], ...]:
        """The distinct tiles of the three roles."""
        return tuple(dict.fromkeys(self.tile(r) for r in ROLES))

    def role_spec(self, role: str) -> QuantSpec:
        """Spec of a role's operand in its stored layout: activations and gradients (tokens, features),
        weights (in, out). Per row along the features under "row"."""
        return QuantSpec.per_row() if self.granularity == "row" else QuantSpec.blocks(self.tile(role))

    def role_spec_t(self, role: str) -> QuantSpec:
        """Spec of the transposed copy: the mirrored tile (same scales) when the tile has >= 32 rows,
        else the same tile shape again on the transposed tensor (requantized); per row under "row"."""
        if self.granularity == "row":
            return QuantSpec.per_row()
        r, c = self.tile(role)
        return QuantSpec.blocks((c, r) if r >= 32 else (r, c))

    @property
    def act_spec(self) -> QuantSpec:
        return self.role_spec("act")

    @property
    def act_spec_t(self) -> QuantSpec:
        return self.role_spec_t("act")

    @property
    def weight_spec(self) -> QuantSpec:
        return self.role_spec("weight")

    @property
    def weight_spec_t(self) -> QuantSpec:
        return self.role_spec_t("weight")

    @property
    def grad_spec(self) -> QuantSpec:
        return self.role_spec("grad")

    @property
    def grad_spec_t(self) -> QuantSpec:
        return self.role_spec_t("grad")

    @property
    def storage_spec(self) -> QuantSpec:
        """Spec of tensors saved for the backward but not fed to a GEMM (the LayerNorm input): the
        activation tile (``block`` under "row")."""
        return QuantSpec.blocks(self.block if self.granularity == "row" else self.tile("act"))

    @property
    def epilogue_spec(self) -> QuantSpec:
        """Spec of a GEMM output requantized in its epilogue and kept for the backward (fc1's output, the
        GELU input): the activation tile, or under "row" groups of 128 columns per row, the tiles the Hopper
        GEMM requantizes to (one scale per row of each 128-column warpgroup tile)."""
        return QuantSpec((1, 128)) if self.granularity == "row" else QuantSpec.blocks(self.tile("act"))

    def check_dims(self, **dims: int) -> None:
        """Raises if an INT8 policy meets a contraction/feature dimension that is not a block multiple.

        Only dimensions that become a GEMM's K or a weight axis are checked (tokens may be ragged: the
        kernels mask partial tiles). Pass them by name, e.g. ``check_dims(in_features=768)``.
        """
        if not self.int8 or self.granularity == "row":
            return
        sizes = sorted({b for t in self.tiles for b in t if b > 1}, reverse=True)
        for label, n in dims.items():
            for b in sizes:
                if n % b:
                    works = [c for c in (128, 64, 32) if n % c == 0]
                    hint = (
                        f"use a block that divides it, e.g. --policy=jetfire-int8:block={works[0]} "
                        f"(Policy.from_name('jetfire-int8', block=({works[0]}, {works[0]})))"
                        if works
                        else "make it a multiple of 32 (the smallest block the kernels take), or use "
                        "--policy=int8-row (per-row scales, no block constraint)"
                    )
                    raise ValueError(
                        f"{label}={n} is not a multiple of the INT8 block size {b} (policy tiles {self.tiles}); "
                        + hint
                    )


def parse_policy(spec: str, **overrides) -> Policy:
    """A Policy from a spec string ``NAME[:field=value[,field=value...]]``, e.g. ``"int8-row"`` or
    ``"jetfire-int8:block=64"`` (``block=64`` means 64 x 64; ``block=32x128`` a (32, 128) tile).
    Keyword ``overrides`` apply last (e.g. ``backend="xla"``)."""
    name, _, rest = spec.partition(":")
    fields: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"policy spec {spec!r}: {item!r} is not field=value (e.g. jetfire-int8:block=64)")
        key = key.strip()
        value = value.strip()
        if key == "block" or key in (f"{r}_block" for r in ROLES):
            dims = value.lower().split("x")
            if not all(d.isdigit() for d in dims) or len(dims) > 2:
                raise ValueError(f"policy spec {spec!r}: {key} must be N or RxC (e.g. {key}=64 or 1x128), "
                                 f"got {value!r}")
            fields[key] = (int(dims[0]), int(dims[-1]))
        elif key.startswith("int8_"):
            if value.lower() not in ("true", "false"):
                raise ValueError(f"policy spec {spec!r}: {key} must be true or false, got {value!r}")
            fields[key] = value.lower() == "true"
        else:
            fields[key] = value
    return Policy.from_name(name.strip(), **{**fields, **overrides})


def resolve_spec(spec: str, widths: tuple[int, ...] = (), min_block: int = 2) -> str:
    """``spec`` with the device-dependent name "jetfire-int8" replaced by the named policy it stands for here
    ("jetfire-int8-g128" on sm_90, else "jetfire-int8-32x32"), so that a run records what it trained with.

    ``widths``: the model's GEMM widths along K (d_model, the MLP width). Where the bare device default would
    give Hopper's 1 x 128 / 128 x 128 tiles and 128 does not divide every width, the tiles become 1 x G /
    G x G for the largest G >= ``min_block`` (a power of two below 128) that does (SmolLM2's d = 576 -> G = 64).
    A spec that names a tile (``block``, ``act_block``, ...) is never changed, and neither is any other name.
    """
    name, sep, rest = spec.partition(":")
    if name.strip() != "jetfire-int8":
        return spec
    keys = {item.partition("=")[0].strip() for item in rest.split(",")}
    concrete = "jetfire-int8-g128" if on_hopper() and "block" not in keys else "jetfire-int8-32x32"
    tile_keys = {"block", *(f"{r}_block" for r in ROLES)}
    if concrete == "jetfire-int8-g128" and not keys & tile_keys and any(w % 128 for w in widths):
        fits = [g for g in (64, 32, 16, 8, 4, 2) if g >= min_block and all(w % g == 0 for w in widths)]
        if fits:
            g = fits[0]
            tiles = f"block={g},act_block=1x{g},grad_block=1x{g}"
            return f"{concrete}:{tiles}" + (f",{rest}" if rest.strip() else "")
    return concrete + sep + rest


def as_policy(policy: Policy | str) -> Policy:
    """A Policy from a Policy or a policy spec string (see :func:`parse_policy`)."""
    return policy if isinstance(policy, Policy) else parse_policy(policy)


def quant_key(module: nn.Module) -> jax.Array:
    """A per-call key for stochastic rounding: the 'quant' rng, else 'dropout', else a fixed path key.

    ``make_rng`` folds in the module path and a call counter, so every op and step gets its own noise.
    """
    for stream in ("quant", "dropout"):
        if module.has_rng(stream):
            return module.make_rng(stream)
    path = module_path(module.scope.path)
    return jax.random.fold_in(jax.random.PRNGKey(0), zlib.crc32(path.encode()) & 0x7FFFFFFF)
