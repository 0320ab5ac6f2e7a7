"""W8A8 INT8 GEMM on Hopper through Pallas Mosaic GPU: warp-specialised wgmma + TMA, fused epilogue.

    out = act(a @ b.T * a_scale * b_scale + bias) + residual

The same contract as :func:`pallas_kernels.gemm.int8_matmul` (NT layout: a (M, K), b (N, K), both
K-contiguous, the layout int8 wgmma requires for both operands), restricted to the prefill case it is
for: per-row / per-column scales, an 8-bit weight, a float output (optionally split into column parts).

Why a second backend: the Pallas-Triton kernel issues its int8 MMAs from the same warps that wait on the
loads, and at K = 1600-6400 it reaches about half of cuBLAS INT8 (BENCHMARKS.md). Here one
producer warpgroup streams A and B tiles into a ring of shared-memory stages with TMA while two consumer
warpgroups run wgmma on them (``plgpu.emit_pipeline_warp_specialized``, as in JAX's
``hopper_matmul_mgpu.py``); the CTAs are persistent and walk output tiles in a planar snake order for L2
reuse. The epilogue dequantises the int32 accumulator in registers (row and column scales and bias were
fetched into shared memory by TMA), applies the activation, adds the residual tile (TMA-loaded into the
output staging buffer) and stores through shared memory with TMA.

Two options serve the fused MLP of the W8A8 model (fc1 -> fc2 without a separate quantize pass):
``out_spec`` with tiles (1, g) requantizes the output in the epilogue, one scale per row and per g columns
(the warpgroup's tile width), so fc1 writes int8 codes + (M, N / g) scales instead of a bf16 tensor that a
second kernel would read back; and ``a_scale`` of shape (M, K / g) gives A one scale per row and per K
group of g = ``tile_k``, which the main loop folds in step by step (see ``_kernel``), so fc2 reads those
codes as they are.

Shapes must tile exactly (no masking here): M by the CTA's rows, N by its columns, K by ``tile_k``.
:func:`fit_config` picks tiles that do, or raises; :func:`unsupported_reason` says why a call cannot run
here, so the dispatcher in ``int8_matmul`` falls back to the Triton kernel. Mosaic GPU needs JAX >= 0.10 and
an sm_90 GPU; there is no CPU path (Mosaic GPU's interpreter has no transposed int8 wgmma), so on CPU
``int8_matmul`` always runs the Triton kernel (interpret mode) and this one is tested on the H100.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

try:  # Mosaic GPU's Pallas API; absent in JAX builds without it
    import jax.experimental.pallas.mosaic_gpu as plgpu
except ImportError:  # pragma: no cover - every JAX this project supports has it
    plgpu = None

from jq8.quant import SCALE_FLOOR, QArray, QuantSpec, qmax
from pallas_kernels._common import on_gpu
from pallas_kernels.int8_matmul_triton import ACTIVATIONS, activation_fn

MEMORY_REGISTERS = 40  # the TMA producer warpgroup needs few registers; the consumers get the rest
# MosaicTileConfig.epilogue_math -> pallas_kernels.int8_matmul_triton.activation_fn's erf
ERF_OF_MATH = {"precise": "approx", "approx": "rational_rsqrt", "tanh": "tanh"}


@dataclasses.dataclass(frozen=True)
class MosaicTileConfig:
    """Tiles of the warp-specialised kernel (hashable: a static jit argument).

    Each of the two consumer warpgroups owns a (tile_m, tile_n) int32 accumulator; ``wg_dim`` says whether
    they sit side by side along N (CTA tile tile_m x 2 tile_n) or along M (2 tile_m x tile_n).
    ``stages``: shared-memory ring depth. ``epi_tile_*``: the staging tile of the output store.
    ``grid_minor`` / ``grid_width``: the planar-snake order of output tiles over the persistent CTAs.
    ``mma_in_flight``: wgmma groups left running when a K step's body returns (0: wait for each; 1: the
    stage is released one step later, so the next wgmma issues while this one runs).
    ``residual_prefetch``: TMA-load the first staging slots' residual tiles while the main loop runs,
    instead of at the start of the epilogue (where each load's latency is exposed).
    ``epilogue_math``: "precise" computes GELU's erf with :func:`erf_approx` (an IEEE division and an exp);
    "approx" with :func:`erf_rational` (no exp, its division as ``rsqrt.approx``: the kernel compiles with
    Mosaic GPU's ``approx_math``), within 1e-6 of exact erf either way; "tanh" takes GELU's tanh form on
    ``tanh.approx.f32`` (``approx_math``), within about 1e-3 of exact GELU.
    """

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 128
    stages: int = 4
    wg_dim: str = "n"
    epi_tile_m: int = 64
    epi_tile_n: int = 64
    grid_minor: str = "n"
    grid_width: int = 8
    mma_in_flight: int = 1
    residual_prefetch: bool = True
    epilogue_math: str = "precise"

    @property
    def cta_m(self) -> int:
        return self.tile_m * (2 if self.wg_dim == "m" else 1)

    @property
    def cta_n(self) -> int:
        return self.tile_n * (2 if self.wg_dim == "n" else 1)


# ------------------------------------------------------------------------------------------- reference


def int8_matmul_mgpu_reference(
    a, b, a_scale, b_scale, *, bias=None, activation=None, residual=None, out_dtype=jnp.bfloat16,
    out_spec=None, split_cols=None, config=None, interpret=None,
):  # fmt: skip
    """Plain-XLA definition of :func:`int8_matmul_mgpu` (``config``/``interpret`` ignored)."""
    del config, interpret
    from pallas_kernels.int8_matmul_triton import epilogue_reference, int8_matmul_reference

    m, k = a.shape
    groups = _a_groups(a_scale, m)
    if groups == 1:
        out = int8_matmul_reference(
            a, b, a_scale, b_scale, bias=bias, activation=activation, residual=residual, out_dtype=out_dtype,
            out_spec=out_spec,
        )  # fmt: skip
    else:  # one exact int32 product per K group, each scaled by its row scales
        gk = k // groups
        ag, bg = a.reshape(m, groups, gk), b.reshape(-1, groups, gk)
        part = jnp.einsum("mgk,ngk->gmn", ag, bg, preferred_element_type=jnp.int32)
        y = jnp.einsum("gmn,mg->mn", part.astype(jnp.float32), jnp.asarray(a_scale, jnp.float32))
        y = y * jnp.asarray(b_scale, jnp.float32).reshape(1, -1)
        out = epilogue_reference(
            y, bias=bias, activation=activation, residual=residual, out_dtype=out_dtype, out_spec=out_spec
        )
    if split_cols is None:
        return out
    return tuple(jnp.split(out, out.shape[1] // split_cols, axis=1))


# ------------------------------------------------------------------------------------------ dispatching


def available() -> bool:
    """Mosaic GPU can compile here: its Pallas API imports and the default device is a Hopper GPU."""
    if plgpu is None or not on_gpu():
        return False
    kind = getattr(jax.devices()[0], "compute_capability", "")
    return str(kind).startswith("9")


def _epi_tile(tile: int, want: int) -> int:
    e = min(tile, want)
    while tile % e:
        e //= 2
    return e


def _a_groups(a_scale, m: int) -> int:
    """K groups of A's scales: 1 for per-row scales ((M,) or (M, 1)), G for (M, G)."""
    shape = tuple(a_scale.shape)
    if shape in ((m,), (m, 1)):
        return 1
    if len(shape) == 2 and shape[0] == m:
        return shape[1]
    raise ValueError(f"a_scale must be (M,), (M, 1) or (M, G) with M={m}, got {shape}")


def out_group_of(out_spec, n: int) -> int:
    """The column group g of an ``out_spec`` this kernel can write (symmetric INT8, tiles (1, g)), or a
    ValueError saying why not."""
    tm, tn = out_spec.resolve(1, n)
    if out_spec.bits != 8 or not out_spec.symmetric or out_spec.tile[0] != 1 or tn == n or n % tn:
        raise ValueError(
            f"the Mosaic GPU kernel requantizes to symmetric INT8 tiles (1, g) with g dividing N={n}, got "
            f"{out_spec}"
        )
    return tn


def fit_config(
    m: int, n: int, k: int, *, split_cols: int | None = None, residual: bool = False,
    out_group: int | None = None, a_group: int | None = None,
) -> MosaicTileConfig:  # fmt: skip
    """The default tiles for an (M, N, K) problem, or a ValueError saying which dimension does not tile.

    K takes 128-byte steps (the widest swizzle) when it can, else 64. The two warpgroups split N when N is a
    multiple of 256, else they split M and one warpgroup covers the largest tile_n <= 256 that divides N
    and has an epilogue tile of >= 32 columns (see :func:`check_config`). Without a residual
    (``residual=False``), warpgroups of 129-160 columns take 128 rows each (a 256-row CTA, 160 accumulator
    registers a thread) where M allows it and the ring keeps >= 4 stages: 14% faster at the 1.5B qkv GEMM,
    while with a residual to stage, or 3 stages, the 64-row tiles were faster (BENCHMARKS.md).
    Rings of 3 stages over >= 32 K steps wait for each K step's wgmma (``mma_in_flight=0``).

    out_group: the output is requantized per row and per ``out_group`` columns, so the warpgroup tile is
    that wide (its row maxima are the scales). a_group: A's scales change every ``a_group`` of K, so
    that is ``tile_k`` (64, 128 or 256) and each K step waits for its own wgmma (``mma_in_flight=0``).
    """
    if out_group is not None:
        return _fit_out_group(m, n, k, out_group, a_group=a_group)
    if a_group is not None:
        if a_group not in (64, 128, 256) or k % a_group:
            raise ValueError(f"A's K groups must be 64, 128 or 256 wide and divide K={k}, got {a_group}")
        tile_k = a_group
    elif k % 128 == 0:
        tile_k = 128
    elif k % 64 == 0:
        tile_k = 64
    else:
        raise ValueError(f"K={k} must be a multiple of 64 for the Mosaic GPU kernel")
    part = split_cols or n
    if n % 256 == 0 and part % 128 == 0:
        cfg = MosaicTileConfig(tile_m=128, tile_n=128, tile_k=tile_k, wg_dim="n")
    else:
        tile_n = next(
            (t for t in range(256, 31, -16) if n % t == 0 and part % t == 0 and _epi_tile(t, 64) >= 32), None
        )
        if tile_n is None:
            raise ValueError(
                f"N={n} has no tile width (a multiple of 32 or of 64 up to 256) for the Mosaic GPU kernel"
            )
        tile_m = 64 if tile_n > 128 else 128  # the int32 accumulator lives in registers: <= 128 per thread
        cfg = MosaicTileConfig(tile_m=tile_m, tile_n=tile_n, tile_k=tile_k, wg_dim="m")
    cfg = dataclasses.replace(cfg, epi_tile_m=min(64, cfg.tile_m), epi_tile_n=_epi_tile(cfg.tile_n, 64))
    groups = 1 if a_group is None else k // a_group
    if a_group is not None:  # y (f32) and each step's product live beside each other: 64-row tiles
        cfg = dataclasses.replace(cfg, mma_in_flight=0, tile_m=64, epi_tile_m=64)
    cfg = dataclasses.replace(cfg, stages=max_stages(cfg, out_bytes=4, a_groups=groups))
    tall_ok = a_group is None and not residual and m % 256 == 0
    if cfg.wg_dim == "m" and cfg.tile_m == 64 and cfg.tile_n <= 160 and tall_ok:
        tall = dataclasses.replace(cfg, tile_m=128)
        tall = dataclasses.replace(tall, stages=max_stages(tall, out_bytes=4, a_groups=groups))
        cfg = tall if tall.stages >= 4 else cfg
    if cfg.stages < 4 and k // cfg.tile_k >= 32:
        # A wgmma left in flight holds its stage one step longer: a 3-stage ring then prefetches only one
        # step ahead. On long K loops (the Jetfire block's GEMMs: K >= 4096, 128 x 256 CTAs, 3 stages)
        # waiting was 5-9% faster; on the 124M prefill's short ones (6-24 steps) it was slower.
        cfg = dataclasses.replace(cfg, mma_in_flight=0)
    check_config(m, n, k, cfg, split_cols=split_cols, a_groups=groups)
    _check_fits(cfg, out_bytes=4, a_groups=groups)
    return cfg


def _fit_out_group(m: int, n: int, k: int, g: int, *, a_group: int | None) -> MosaicTileConfig:
    """Tiles whose warpgroup is exactly g columns wide (the requantization group), 128 rows a warpgroup up
    to 128 columns (<= 128 accumulator registers a thread). The two warpgroups stack along M (a 256-row
    CTA) where M allows: at the GPT-2 fc1 shapes that was 6-8% faster than side by side along N
    (BENCHMARKS.md)."""
    if n % g or g % 16 or not 32 <= g <= 256:
        raise ValueError(
            f"the requantization group must be a multiple of 16 in [32, 256] dividing N={n}, got {g}"
        )
    tile_k = a_group or (128 if k % 128 == 0 else 64)
    if k % tile_k:
        raise ValueError(f"K={k} must be a multiple of 64 for the Mosaic GPU kernel")
    cfg = MosaicTileConfig(
        tile_m=128 if g <= 128 else 64, tile_n=g, tile_k=tile_k,
        wg_dim="m" if m % (256 if g <= 128 else 128) == 0 or n % (2 * g) else "n",
        epi_tile_n=_epi_tile(g, 64), mma_in_flight=0 if a_group else 1,
    )  # fmt: skip
    groups = 1 if a_group is None else k // a_group
    cfg = dataclasses.replace(cfg, stages=max_stages(cfg, out_bytes=1, a_groups=groups, requantize=True))
    check_config(m, n, k, cfg, a_groups=groups)
    _check_fits(cfg, out_bytes=1, a_groups=groups, requantize=True)
    return cfg


SMEM_BYTES = 232448 - 1024  # H100's per-block limit, less room for the pipeline's barriers


def max_stages(
    cfg: MosaicTileConfig, *, out_bytes: int, a_groups: int = 1, requantize: bool = False, limit: int = 6
) -> int:
    """The deepest operand ring (<= limit, >= 2) that fits in shared memory beside the output staging tiles
    and each warpgroup's scale / bias vectors (see :func:`smem_bytes`); 2 when none does, which
    :func:`fit_config` then refuses."""
    fixed = smem_bytes(dataclasses.replace(cfg, stages=0), out_bytes=out_bytes, a_groups=a_groups,
                       requantize=requantize)  # fmt: skip
    return max(2, min(limit, (SMEM_BYTES - fixed) // ((cfg.cta_m + cfg.cta_n) * cfg.tile_k)))


def smem_bytes(cfg: MosaicTileConfig, *, out_bytes: int, a_groups: int = 1, requantize: bool = False) -> int:
    """Shared memory of ``cfg``: the operand ring, the output staging tiles, and each warpgroup's vectors
    (A's (a_groups, tile_m) scales, the column scales and bias, with ``requantize`` the output's row
    scales)."""
    ring = cfg.stages * (cfg.cta_m + cfg.cta_n) * cfg.tile_k
    staging = 2 * 2 * cfg.epi_tile_m * cfg.epi_tile_n * out_bytes
    vectors = 2 * 4 * (a_groups * cfg.tile_m + 2 * cfg.tile_n + (cfg.tile_m if requantize else 0))
    return ring + staging + vectors


def _check_fits(cfg: MosaicTileConfig, **kw) -> None:
    need = smem_bytes(cfg, **kw)
    if need > SMEM_BYTES:
        raise ValueError(
            f"{cfg} needs {need} B of shared memory even with a 2-stage ring, over the H100's {SMEM_BYTES}"
        )


def check_config(
    m: int, n: int, k: int, cfg: MosaicTileConfig, *, split_cols: int | None = None, a_groups: int = 1
) -> None:
    """Raise a ValueError naming the first dimension that ``cfg`` does not tile exactly."""
    if m % cfg.cta_m:
        raise ValueError(f"M={m} must be a multiple of the CTA's {cfg.cta_m} rows for the Mosaic GPU kernel")
    if n % cfg.cta_n:
        raise ValueError(f"N={n} must be a multiple of the CTA's {cfg.cta_n} columns")
    if k % cfg.tile_k:
        raise ValueError(f"K={k} must be a multiple of tile_k={cfg.tile_k}")
    if cfg.tile_m % 64 or cfg.tile_n % 16 or cfg.tile_n > 256:
        raise ValueError(f"wgmma needs tile_m % 64 == 0 and tile_n a multiple of 16 <= 256, got {cfg}")
    if cfg.mma_in_flight not in (0, 1) or cfg.stages <= cfg.mma_in_flight:
        raise ValueError(f"mma_in_flight must be 0 or 1 and below stages, got {cfg}")
    if cfg.tile_m % cfg.epi_tile_m or cfg.tile_n % cfg.epi_tile_n:
        raise ValueError(f"epilogue tiles must divide the warpgroup tile, got {cfg}")
    if cfg.epilogue_math not in ERF_OF_MATH:
        raise ValueError(f"epilogue_math must be one of {sorted(ERF_OF_MATH)}, got {cfg}")
    if cfg.epi_tile_n < 32:
        # 16-column staging tiles faulted with a misaligned address on the H100, which
        # poisons the CUDA context for every later call: refuse them here.
        raise ValueError(f"epi_tile_n must be >= 32, got {cfg}")
    if split_cols is not None and (n % split_cols or split_cols % cfg.epi_tile_n):
        raise ValueError(f"split_cols={split_cols} must divide N={n} and be a multiple of epi_tile_n")
    if a_groups > 1 and (k != a_groups * cfg.tile_k or a_groups > 256 or cfg.mma_in_flight):
        # one TMA box (<= 256 rows) holds a warpgroup's group scales; each K step reads its wgmma's result
        raise ValueError(
            f"A's {a_groups} K groups need tile_k = K / groups (K={k}), at most 256 groups and "
            f"mma_in_flight=0, got {cfg}"
        )


def unsupported_reason(
    m: int, n: int, k: int, *, b_bits: int, scales: bool, out_spec, residual, out_dtype, split_cols,
    a_group: int | None = None, check_device: bool = True,
) -> str | None:  # fmt: skip
    """Why ``int8_matmul`` with these arguments cannot run on this kernel, or None when it can.

    scales: both a_scale and b_scale are given (the epilogue reads per-row and per-column scales).
    a_group: A's scales come in K groups this wide (None: per row). check_device=False answers for the
    shapes alone (as on an H100), whatever the default device is.
    """
    if check_device and not available():
        return "it runs compiled on an sm_90 (Hopper) GPU only (Mosaic GPU's interpreter has no int8 wgmma)"
    if b_bits != 8 or not scales:
        return "it needs an int8 b and both scales"
    out_group = None
    if out_spec is not None:
        if residual is not None or split_cols is not None:
            return "a requantized output (out_spec) takes no residual and no split_cols"
        try:
            out_group = out_group_of(out_spec, n)
        except ValueError as e:
            return str(e)
    if residual is not None and jnp.dtype(residual.dtype) != jnp.dtype(out_dtype):
        # the residual tile is loaded into the output staging buffer
        return f"the residual must have the output dtype {jnp.dtype(out_dtype)}, got {residual.dtype}"
    try:
        fit_config(
            m, n, k, split_cols=split_cols, residual=residual is not None, out_group=out_group,
            a_group=a_group,
        )  # fmt: skip
    except ValueError as e:
        return str(e)
    return None


# ---------------------------------------------------------------------------------------------- kernel


def _num_sms() -> int:
    return jax.devices()[0].core_count


def int8_matmul_mgpu(
    a: jax.Array,
    b: jax.Array,
    a_scale: jax.Array,
    b_scale: jax.Array,
    *,
    bias: jax.Array | None = None,
    activation=None,
    residual: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
    out_spec: QuantSpec | None = None,
    split_cols: int | None = None,
    config: MosaicTileConfig | None = None,
    interpret: bool | None = None,
) -> jax.Array | QArray | tuple[jax.Array, ...]:
    """``act(a @ b.T * a_scale * b_scale + bias) + residual`` on Hopper wgmma.

    a: (M, K) int8; b: (N, K) int8; a_scale: (M,) or (M, 1) f32 per row, or (M, G) f32 per row and per
    K / G columns of K (G groups, K / G = 64, 128 or 256); b_scale: (N,) or (1, N) f32; bias: (N,) float or
    None;
    residual: (M, N) ``out_dtype`` or None. Returns (M, N) ``out_dtype``, or with ``split_cols`` a tuple of
    N / split_cols (M, split_cols) arrays (column blocks in order), or with ``out_spec`` (symmetric INT8,
    tiles (1, g)) a :class:`QArray` of int8 codes and (M, N / g) scales requantized in the epilogue.
    Runs compiled on an sm_90 GPU only; ``interpret=True`` (or no such GPU) is a ValueError.
    """
    if interpret or not available():
        raise ValueError(
            "the Mosaic GPU INT8 GEMM runs compiled on an sm_90 (Hopper) GPU only: Mosaic GPU's interpreter "
            "has no transposed int8 wgmma; use backend='triton' (int8_matmul) elsewhere"
        )
    m, k = a.shape
    n = b.shape[0]
    if a.dtype != jnp.int8 or b.dtype != jnp.int8 or b.shape[1] != k:
        raise ValueError(f"a (M, K) and b (N, K) must be int8 with the same K, got {a.shape} {a.dtype}, "
                         f"{b.shape} {b.dtype}")  # fmt: skip
    groups = _a_groups(a_scale, m)
    if math.prod(b_scale.shape) != n:
        raise ValueError(f"b_scale must hold N={n} values, got {b_scale.shape}")
    if k % groups:
        raise ValueError(f"a_scale's {groups} K groups must divide K={k}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    out_dtype = jnp.dtype(out_dtype)
    if residual is not None and (residual.shape != (m, n) or residual.dtype != out_dtype):
        raise ValueError(f"residual must be ({m}, {n}) {out_dtype}, got {residual.shape} {residual.dtype}")
    out_group = None
    if out_spec is not None:
        if residual is not None or split_cols is not None:
            raise ValueError("a requantized output (out_spec) takes no residual and no split_cols")
        out_group = out_group_of(out_spec, n)
    a_group = None if groups == 1 else k // groups
    cfg = config or fit_config(
        m, n, k, split_cols=split_cols, residual=residual is not None, out_group=out_group, a_group=a_group
    )  # fmt: skip
    check_config(m, n, k, cfg, split_cols=split_cols, a_groups=groups)
    if out_group is not None and cfg.tile_n != out_group:
        raise ValueError(f"out_spec's group of {out_group} columns must be the warpgroup's tile_n, got {cfg}")

    # A's scales as (G, M): a warpgroup's block of them is one TMA box (G = 1 for per-row scales).
    a_scale = jnp.asarray(a_scale, jnp.float32).reshape(m, groups).T
    inputs = [a, b, a_scale, jnp.asarray(b_scale, jnp.float32).reshape(n)]
    if bias is not None:
        inputs.append(jnp.asarray(bias, jnp.float32).reshape(n))
    if residual is not None:
        inputs.append(residual)
    parts = 1 if split_cols is None else n // split_cols
    width = n // parts
    if out_group is None:
        out_type = tuple(jax.ShapeDtypeStruct((m, width), out_dtype) for _ in range(parts))
    else:  # codes, and the scales as (N / g, M): each warpgroup stores its row vector contiguously
        out_type = (
            jax.ShapeDtypeStruct((m, n), jnp.int8),
            jax.ShapeDtypeStruct((n // out_group, m), jnp.float32),
        )
    tiles = (m // cfg.cta_m) * (n // cfg.cta_n)
    kernel = functools.partial(
        _kernel, cfg=cfg, k=k, activation=activation, has_bias=bias is not None,
        has_residual=residual is not None, width=width, groups=groups, requantize=out_group is not None,
    )  # fmt: skip
    f = plgpu.kernel(
        kernel,
        out_type=out_type,
        grid=(min(tiles, _num_sms()),),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=cfg.epilogue_math != "precise"),
    )
    out = f(*inputs)
    if out_group is not None:
        codes, scales = out
        return QArray(codes, scales.T, None, out_spec, (m, n), out_dtype)
    return out[0] if parts == 1 else tuple(out)


def _swizzled(cols: int, dtype) -> tuple:
    swizzle = plgpu.find_swizzle(cols * jnp.dtype(dtype).itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))


def _kernel(
    *refs, cfg: MosaicTileConfig, k: int, activation, has_bias: bool, has_residual: bool, width: int,
    groups: int, requantize: bool,
):  # fmt: skip
    a_gmem, b_gmem, as_gmem, bs_gmem, *rest = refs
    bias_gmem = rest.pop(0) if has_bias else None
    res_gmem = rest.pop(0) if has_residual else None
    outs = rest
    if requantize:
        outs, qs_gmem = rest[:1], rest[1]
    m = a_gmem.shape[0]
    n = b_gmem.shape[0]
    out_dtype = outs[0].dtype
    tm, tn, tk = cfg.tile_m, cfg.tile_n, cfg.tile_k
    cta_m, cta_n = cfg.cta_m, cfg.cta_n
    em, en = cfg.epi_tile_m, cfg.epi_tile_n
    m_iters, n_iters = m // cta_m, n // cta_n
    in_transforms = _swizzled(tk, jnp.int8)
    out_transforms = _swizzled(en, out_dtype)
    epi_tiles = (tm // em) * (tn // en)
    slots = min(2, epi_tiles)
    shape = (tm, tn)

    def operand_spec(rows):  # a (rows, tile_k) K step of A or B in the shared-memory ring
        return plgpu.BlockSpec(
            (rows, tk), lambda kk: (0, kk), transforms=in_transforms, memory_space=plgpu.SMEM,
            delay_release=cfg.mma_in_flight,
        )  # fmt: skip

    def pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k // tk,),
            memory_registers=MEMORY_REGISTERS,
            in_specs=[operand_spec(cta_m), operand_spec(cta_n)],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=cfg.stages,
            compute_context=context,
        )

    ignore = lambda *_, **__: None  # noqa: E731 - allocations do not depend on the body

    @functools.partial(
        pl.run_scoped,
        pipeline_allocs=pipeline(ignore, ignore).get_allocations(a_gmem, b_gmem),
        out_smem=plgpu.SMEM((2, slots, em, en), out_dtype, transforms=out_transforms),
        row_smem=plgpu.SMEM((2, groups, tm), jnp.float32),
        col_smem=plgpu.SMEM((2, 2, tn), jnp.float32),
        qs_smem=plgpu.SMEM((2, tm if requantize else 1), jnp.float32),
        vec_barrier=plgpu.Barrier(num_arrivals=3 if has_bias else 2, num_barriers=2),
        res_barrier=plgpu.Barrier(num_barriers=2 * slots),
        collective_axes="wg",
    )
    def _scope(pipeline_allocs, out_smem, row_smem, col_smem, qs_smem, vec_barrier, res_barrier):
        wg = lax.axis_index("wg")

        def row_scales(g):  # the warpgroup's A scales of K group g, one per row, in accumulator layout
            v = plgpu.load(row_smem.at[wg, g], (), layout=plgpu.Layout.WGMMA.reduce(1))
            return lax.broadcast_in_dim(v, shape, [0])

        @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
        def _tile_loop(info):
            (lin,) = info.index
            mi, ni = plgpu.planar_snake(
                lin, (m_iters, n_iters),
                1 if cfg.grid_minor == "n" else 0,
                cfg.grid_width,
            )  # fmt: skip
            if cfg.wg_dim == "m":
                row0 = mi * cta_m + wg * tm
                col0 = ni * cta_n
                a_rows, b_rows = pl.ds(wg * tm, tm), slice(None)
            else:
                row0 = mi * cta_m
                col0 = ni * cta_n + wg * tn
                a_rows, b_rows = slice(None), pl.ds(wg * tn, tn)

            prefetched = slots if has_residual and cfg.residual_prefetch else 0

            def epi_origin(e):
                """(gmem rows, first column) of the warpgroup's e-th epilogue tile."""
                ei, ej = divmod(e, tn // en)
                return pl.ds(row0 + ei * em, em), col0 + ej * en

            def load_residual(e):
                rows, c0 = epi_origin(e)
                slot = e % slots
                barrier = res_barrier.at[wg * slots + slot]
                plgpu.copy_gmem_to_smem(res_gmem.at[rows, pl.ds(c0, en)], out_smem.at[wg, slot], barrier)

            def context(run_pipeline):
                if prefetched:  # the staging slots' residual tiles load during the main loop
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's stores left them
                    for e in range(prefetched):
                        load_residual(e)
                # Fetch this warpgroup's scales and bias while the main loop runs.
                plgpu.copy_gmem_to_smem(as_gmem.at[:, pl.ds(row0, tm)], row_smem.at[wg], vec_barrier.at[wg])
                plgpu.copy_gmem_to_smem(bs_gmem.at[pl.ds(col0, tn)], col_smem.at[wg, 0], vec_barrier.at[wg])
                if has_bias:
                    plgpu.copy_gmem_to_smem(
                        bias_gmem.at[pl.ds(col0, tn)], col_smem.at[wg, 1], vec_barrier.at[wg]
                    )

                if groups == 1:

                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC(shape, jnp.int32))
                    def _acc_scope(acc_ref):
                        run_pipeline(acc_ref)
                        plgpu.wgmma_wait(0)  # the last mma_in_flight groups
                        plgpu.barrier_wait(vec_barrier.at[wg])
                        epilogue(acc_ref[...].astype(jnp.float32) * row_scales(0))

                else:  # the first K step needs the group scales: they land with its operands
                    plgpu.barrier_wait(vec_barrier.at[wg])
                    y0 = plgpu.layout_cast(jnp.full(shape, 0, jnp.float32), plgpu.Layout.WGMMA)
                    epilogue(run_pipeline(y0))

            def epilogue(y):
                """Dequantized (tm, tn) f32 product -> bias, activation, requantize or residual, store."""
                cs = plgpu.load(col_smem.at[wg, 0], (), layout=plgpu.Layout.WGMMA.reduce(0))
                y = y * lax.broadcast_in_dim(cs, shape, [1])
                if has_bias:
                    bias = plgpu.load(col_smem.at[wg, 1], (), layout=plgpu.Layout.WGMMA.reduce(0))
                    y = y + lax.broadcast_in_dim(bias, shape, [1])
                # Mosaic GPU has no erf layout rule: GELU takes a kernel-safe erf (see epilogue_math)
                y = activation_fn(y, activation, erf=ERF_OF_MATH[cfg.epilogue_math])
                if requantize:
                    y = _requantize(y, row0, col0)
                _store_epilogue(y, wg, row0, col0)

            def _mma(idx, a_smem, b_smem, acc_ref):
                del idx
                b_t = plgpu.transpose_ref(b_smem.at[b_rows], (1, 0))
                plgpu.wgmma(acc_ref, a_smem.at[a_rows], b_t)
                plgpu.wgmma_wait(cfg.mma_in_flight)  # its stage is released mma_in_flight steps later
                return acc_ref

            def _mma_grouped(idx, a_smem, b_smem, y):
                """One K step = one K group of A's scales: its exact int32 product, in a fresh accumulator,
                scaled per row into the f32 sum ``y``. (A running accumulator would save the zeroing, but then
                the accumulator, its f32 copy and y are three register sets live at once.)"""
                (kk,) = idx
                b_t = plgpu.transpose_ref(b_smem.at[b_rows], (1, 0))

                def product(acc_ref):
                    plgpu.wgmma(acc_ref, a_smem.at[a_rows], b_t)
                    return acc_ref[...]  # waits for this step's wgmma

                part = pl.run_scoped(product, plgpu.ACC(shape, jnp.int32))
                return y + part.astype(jnp.float32) * row_scales(kk)

            def _requantize(y, row0, col0):
                """Symmetric INT8 per row of the warpgroup's tile (as ``jq8.quant.quantize`` with tiles
                (1, tn)): stores the scales, returns the codes."""
                amax = jnp.max(jnp.abs(y), axis=1)
                scale = jnp.maximum(amax * np.float32(1.0 / qmax(8)), np.float32(SCALE_FLOOR))
                inv = np.float32(1.0) / scale
                # |y * inv| <= qmax up to an ulp, so rounding (half away from zero) needs no clamp
                q = lax.round(y * lax.broadcast_in_dim(inv, shape, [0]))
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's scale store left qs_smem
                qs_smem.at[wg][...] = scale
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(qs_smem.at[wg], qs_gmem.at[col0 // tn, pl.ds(row0, tm)])
                return q.astype(jnp.int8)

            def _store_epilogue(y, wg, row0, col0):
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the staging buffer is free again
                for ei in range(tm // em):
                    for ej in range(tn // en):
                        e = ei * (tn // en) + ej
                        slot = e % slots
                        rows, c0 = epi_origin(e)
                        part_tile = y[ei * em : (ei + 1) * em, ej * en : (ej + 1) * en]
                        stage = out_smem.at[wg, slot]
                        if e >= prefetched:
                            plgpu.wait_smem_to_gmem(slots - 1, wait_read_only=True)
                            if has_residual:
                                load_residual(e)
                        if has_residual:
                            plgpu.barrier_wait(res_barrier.at[wg * slots + slot])
                            r = plgpu.load(stage, (), layout=plgpu.Layout.WGMMA).astype(jnp.float32)
                            part_tile = part_tile + r
                        stage[...] = part_tile.astype(out_dtype)
                        plgpu.commit_smem()
                        if len(outs) == 1:
                            plgpu.copy_smem_to_gmem(stage, outs[0].at[rows, pl.ds(c0, en)])
                        else:
                            which = c0 // width
                            for p, out in enumerate(outs):

                                @pl.when(which == p)
                                def _(out=out, p=p, stage=stage, rows=rows, c0=c0):
                                    dst = out.at[rows, pl.ds(c0 - p * width, en)]
                                    plgpu.copy_smem_to_gmem(stage, dst)

            pipeline(_mma if groups == 1 else _mma_grouped, context)(
                a_gmem.at[pl.ds(mi * cta_m, cta_m), :],
                b_gmem.at[pl.ds(ni * cta_n, cta_n), :],
                allocations=pipeline_allocs,
            )

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
