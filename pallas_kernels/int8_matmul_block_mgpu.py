"""Block-scaled INT8 GEMM on Hopper through Pallas Mosaic GPU: scales that vary along K on both operands.

    out = act(sum_g (a_g @ b_g.T) * sa[m, g] * sb[n, g] + bias) + residual     (float)
    out = quantize(act(sum_g (a_g @ b_g.T) * sa[m, g] * sb[n, g] + bias), tiles (1, q))   (``out_spec``)

NT layout as :func:`pallas_kernels.int8_matmul_block_scaled.int8_matmul_block_scaled` (the Triton kernel, and
its reference :func:`~pallas_kernels.int8_matmul_block_scaled.int8_matmul_block_scaled_reference`, which
this kernel is tested against): a (M, K) and b (N, K) int8, K-contiguous (what int8 wgmma needs for both
operands); a_scale (cdiv(M, ta_m), cdiv(K, ta_k)), b_scale (cdiv(N, tb_n), cdiv(K, tb_k)) f32, any row
tiles (Jetfire's 32x32 blocks, DeepSeek-style 1 x 128 activation tiles with 128 x 128 weight blocks), K tiles
multiples of one K group G in {32, 64, 128, 256}.

Why its own kernel: int8 wgmma accumulates exactly in int32, and a scale that changes every G along K forces
an int32 -> f32 promotion of the whole accumulator once per group, on CUDA cores. The Triton kernel waits
for each group's MMA before that promotion, so the two add up (BENCHMARKS.md, the rescale probe). Here, as
in DeepGEMM's FP8 GEMM:
  * one producer warpgroup streams A, B and both operands' per-group scales into a ring of shared-memory
    stages with TMA (``plgpu.emit_pipeline_warp_specialized``), while two consumer warpgroups run wgmma;
  * each K group's wgmmas accumulate into a fresh int32 accumulator, promoted once into an f32 sum
    ``y += p * (sa * sb)``; while one consumer warpgroup promotes, the other's wgmma keeps the tensor core
    busy (``pingpong`` makes them alternate strictly); with two groups a step a warpgroup also promotes
    one group while its next group's wgmma runs (``schedule="pair"`` within a step, ``"carry"`` across
    steps, so that a wgmma is always in flight);
  * the promotion converts the int32 accumulator (``convert="cvt"``, the default: measured ~10% faster on
    the H100, BENCHMARKS.md) or, with ``convert="magic"``, starts it at the bit pattern of 1.5 * 2**23 so
    that its value read as f32 is 1.5 * 2**23 + p exactly (|p| <= 2**22 for G <= 256) and the convert
    becomes one FADD before the FMA, or, with ``convert="magic_add"``, adds that bit pattern to the finished
    accumulator (an integer add instead of the start value); all three are exact;
  * ``schedule="running"`` never resets the int32 accumulator: it holds the running sum S_g of the groups'
    products, and summation by parts, ``sum_g p_g s_g = sum_g S_g (s_g - s_{g+1})``, turns each group's
    promotion into one convert and one FMA with the difference of consecutive scale vectors (the
    accumulator is zeroed once a tile, not once a group). The convert rounds S_g once it passes 2**24
    (relative 6e-8), so the result is f32-accurate rather than exact; it needs one weight scale per
    warpgroup tile, and is the default there (without ``config``): on the H100 it measured 1.22-1.31x
    XLA bf16 at G = 128 against 1.15-1.20x for "wait" (Nsight Compute: stall samples at the warpgroup
    arrive / wait instructions 30% -> 17%);
  * a scale constant over a warpgroup's columns (weight blocks at least as wide as the warpgroup tile) is
    one scalar per group, folded into the row vector of A's scales before it touches the accumulator.

With ``out_spec`` (symmetric INT8 tiles (1, q), q dividing the warpgroup's columns) the epilogue writes
the output as the next GEMM's activation operand: int8 codes and one scale per row and q columns, the row
maxima of the f32 tile in registers (Jetfire's fc1 -> activation: no float (M, N) tensor round-trips memory).

The accumulator (int32) and the f32 sum both live in registers: a consumer warpgroup owns 64 x 128 (or
64 x tile_n) outputs, so a CTA is 128 x 128 (two warpgroups stacked along M; 192 x 128 with three). N must
tile by the CTA's columns and K by G (times the groups a step); M needs only one CTA's rows: where it does
not tile, the last row tile ends at M and overlaps the one before (the shared rows are computed and written
twice, with the same values). Anything else is a ValueError naming the dimension, and
:func:`unsupported_reason` lets a dispatcher fall back to the Triton kernel. The kernel runs
compiled on an sm_90 GPU; ``interpret=True`` runs it in Mosaic GPU's interpreter on any host (pipeline,
scale indexing, promotion and epilogue as compiled; each group's product as a dot of the loaded tiles,
since the interpreter has no transposed wgmma operand nor preinitialised accumulators).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from jq8.quant import SCALE_FLOOR, QArray, QuantSpec, qmax
from pallas_kernels.int8_matmul_block_scaled import resolve_tiles
from pallas_kernels.int8_matmul_mgpu import (
    ACTIVATIONS,
    ERF_OF_MATH,
    MEMORY_REGISTERS,
    SMEM_BYTES,
    _epi_tile,
    _num_sms,
    _swizzled,
    activation_fn,
    available,
    out_group_of,
    plgpu,
)

K_GROUPS = (32, 64, 128, 256)
_INTERPRET_OPTIONS: dict = {}  # extra InterpretGPUParams fields when debugging (e.g. detect_races=True)
SCHEDULES = ("wait", "pair", "carry", "running")
CONVERTS = ("magic", "magic_add", "cvt")
MAGIC_BITS = 0x4B400000  # the bit pattern of MAGIC_FLOAT
MAGIC_FLOAT = 12582912.0  # 1.5 * 2**23: bitcast_f32(MAGIC_BITS + p) == MAGIC_FLOAT + p exactly for |p| <= 2**22


@dataclasses.dataclass(frozen=True)
class BlockTileConfig:
    """Tiles and schedule of the block-scaled kernel (hashable: a static jit argument).

    Each consumer warpgroup owns a (tile_m, tile_n) output tile: an int32 accumulator per K group in flight
    and the f32 sum, all in registers; they sit along M (a consumers * tile_m x tile_n CTA, one B tile for
    all). ``group``: G, the K group of the scales; ``groups_per_step`` K groups per pipeline
    step (each its own TMA boxes). ``schedule``: "wait" promotes each group after its wgmma completes;
    "pair" (two groups a step) issues both groups' wgmmas and promotes the first while the second runs;
    "carry" (two groups a step, two accumulators) issues group i + 1's wgmma before promoting group i, also
    across steps (a step's stage is then released one step later); "running" keeps the running sum in the
    accumulator and promotes it against the change of scale (see the module docstring); with two groups a
    step it keeps two running sums (even and odd groups), each promoted while the other's wgmma runs.
    ``pingpong``: the two warpgroups meet at a barrier after each step's wgmma issue, so one promotes while
    the other's wgmma runs. ``convert``: see the module docstring. ``cluster_m``: two CTAs along M form a
    cluster and share B's tile through TMA multicast (half of B's loads from L2). ``consumers``: consumer
    warpgroups stacked along M (2 or 3); a third puts one more warp on each scheduler to hide the
    promotions' latency, in registers the producer gives up (160 a thread instead of 232: room for one
    64 x 128 int32 accumulator and the f32 sum). ``stages``: shared-memory ring depth. ``epi_tile_*``: the
    output staging tile. ``grid_minor`` / ``grid_width``: the planar-snake order of output tiles over the
    persistent CTAs.
    """

    group: int = 128
    tile_m: int = 64
    tile_n: int = 128
    groups_per_step: int = 1
    schedule: str = "wait"
    pingpong: bool = False
    convert: str = "cvt"
    cluster_m: bool = False
    consumers: int = 2
    stages: int = 4
    epi_tile_m: int = 64
    epi_tile_n: int = 64
    grid_minor: str = "n"
    grid_width: int = 8
    epilogue_math: str = "precise"

    @property
    def cta_m(self) -> int:
        return self.consumers * self.tile_m

    @property
    def cta_n(self) -> int:
        return self.tile_n

    @property
    def step_k(self) -> int:
        return self.group * self.groups_per_step


# ------------------------------------------------------------------------------------------ tiles / fit


def k_group_of(a_tile: tuple[int, int], b_tile: tuple[int, int], k: int) -> int:
    """G: the narrowest K tile of the operands whose scales vary along K (K tiles that do not vary count as
    K). Every K tile must be a multiple of G, and G one of :data:`K_GROUPS`; else a ValueError."""
    varying = [t[1] for t in (a_tile, b_tile) if t[1] < k]
    if not varying:
        raise ValueError(
            "neither operand's scales vary along K: use the W8A8 GEMM (per-row / per-column scales in the "
            "epilogue) instead of the block-scaled one"
        )
    g = min(varying)
    if g not in K_GROUPS or any(t % g for t in varying):
        raise ValueError(
            f"the Mosaic GPU block-scaled GEMM needs K tiles that are multiples of one group G in {K_GROUPS}; "
            f"got K tiles {sorted(set(varying))}"
        )
    return g


def smem_bytes(cfg: BlockTileConfig, *, out_bytes: int, out_group: int | None = None) -> int:
    """Shared memory of ``cfg``: the ring (operands and both scale rows per group), the output staging
    tiles, each warpgroup's bias vector and, requantizing per ``out_group`` columns, its output scales."""
    per_step = (cfg.cta_m + cfg.cta_n) * cfg.step_k + 4 * cfg.groups_per_step * (cfg.cta_m + cfg.cta_n)
    staging = cfg.consumers * _slots(cfg) * cfg.epi_tile_m * cfg.epi_tile_n * out_bytes
    out_scales = cfg.consumers * 4 * cfg.tile_m * (cfg.tile_n // out_group) if out_group else 0
    return cfg.stages * per_step + staging + cfg.consumers * 4 * cfg.tile_n + out_scales


def _slots(cfg: BlockTileConfig) -> int:
    return min(2, (cfg.tile_m // cfg.epi_tile_m) * (cfg.tile_n // cfg.epi_tile_n))


def max_stages(cfg: BlockTileConfig, *, out_bytes: int, out_group: int | None = None, limit: int = 8) -> int:
    """The deepest ring (<= limit) that fits in shared memory beside the staging tiles (at least 2)."""
    fixed = smem_bytes(dataclasses.replace(cfg, stages=0), out_bytes=out_bytes, out_group=out_group)
    per_step = smem_bytes(dataclasses.replace(cfg, stages=1), out_bytes=out_bytes, out_group=out_group) - fixed
    return max(2, min(limit, (SMEM_BYTES - fixed) // per_step))


def check_config(
    m: int, n: int, k: int, cfg: BlockTileConfig, *, out_bytes: int = 4, out_group: int | None = None
) -> None:
    """Raise a ValueError naming the first dimension or field that ``cfg`` cannot run. ``out_group``: the
    output is requantized per row and per that many columns."""
    if cfg.group not in K_GROUPS:
        raise ValueError(f"group must be one of {K_GROUPS}, got {cfg}")
    if cfg.groups_per_step not in (1, 2) or cfg.schedule not in SCHEDULES or cfg.convert not in CONVERTS:
        raise ValueError(
            f"groups_per_step must be 1 or 2, schedule one of {SCHEDULES}, convert one of {CONVERTS}; got {cfg}"
        )
    if cfg.schedule in ("pair", "carry") and cfg.groups_per_step != 2:
        raise ValueError(f"schedule={cfg.schedule!r} needs groups_per_step=2, got {cfg}")
    if cfg.schedule == "running" and cfg.convert != "cvt":
        # a running sum outgrows the magic number's exact range (|p| <= 2**22)
        raise ValueError(f"schedule='running' needs convert='cvt', got {cfg}")
    two_accumulators = cfg.schedule in ("pair", "carry") or (cfg.schedule == "running" and cfg.groups_per_step == 2)
    if cfg.tile_m != 64 or cfg.tile_n % 16 or not 16 <= cfg.tile_n <= 192:
        # the int32 accumulator(s) and the f32 sum share a thread's registers: 64 rows a warpgroup
        raise ValueError(f"warpgroup tiles must be 64 x (a multiple of 16 <= 192); got {cfg}")
    if cfg.consumers not in (2, 3) or (cfg.consumers == 3 and (cfg.pingpong or cfg.tile_n > 128 or two_accumulators)):
        # three warpgroups fit one 64 x 128 accumulator and the f32 sum in 160 registers a thread; ping-pong
        # alternates two warpgroups
        raise ValueError(
            f"consumers must be 2, or 3 with tile_n <= 128, one accumulator (schedule 'wait' or one-group "
            f"'running') and no pingpong; got {cfg}"
        )
    if two_accumulators and cfg.tile_n > 128:
        raise ValueError(f"schedule={cfg.schedule!r} keeps two accumulators live: tile_n <= 128, got {cfg}")
    rows = cfg.cta_m * (2 if cfg.cluster_m else 1)
    if m < rows:
        raise ValueError(
            f"M={m} must be at least the {rows} rows of a CTA tile for the Mosaic GPU block-scaled GEMM (pad M, "
            "or use the Triton kernel)"
        )
    if n % cfg.cta_n:
        raise ValueError(f"N={n} must be a multiple of the CTA's {cfg.cta_n} columns")
    if k % cfg.step_k:
        raise ValueError(f"K={k} must be a multiple of the K step {cfg.step_k} (group {cfg.group})")
    if cfg.tile_m % cfg.epi_tile_m or cfg.tile_n % cfg.epi_tile_n or cfg.epi_tile_n < 32:
        raise ValueError(f"epilogue tiles must divide the warpgroup tile and be >= 32 columns, got {cfg}")
    if cfg.epilogue_math not in ERF_OF_MATH:
        raise ValueError(f"epilogue_math must be one of {sorted(ERF_OF_MATH)}, got {cfg}")
    if out_group is not None and (cfg.tile_n % out_group or out_group % cfg.epi_tile_n):
        raise ValueError(
            f"the requantization group of {out_group} columns must divide the warpgroup's tile_n and be a "
            f"multiple of epi_tile_n, got {cfg}"
        )
    if cfg.stages < 2:
        raise ValueError(f"stages must be >= 2, got {cfg}")
    need = smem_bytes(cfg, out_bytes=out_bytes, out_group=out_group)
    if need > SMEM_BYTES:
        raise ValueError(f"{cfg} needs {need} B of shared memory, over the H100's {SMEM_BYTES}")


def fit_config(
    m: int, n: int, k: int, group: int, *, out_dtype=jnp.bfloat16, out_group: int | None = None, **overrides
) -> BlockTileConfig:
    """The default tiles for an (M, N, K) problem with K group ``group``, or a ValueError naming the
    dimension that does not tile. Warpgroups of 64 x 128 (64 x 64 where N needs it) stacked along M (a
    128-row CTA); the deepest ring that fits. ``out_group``: the output is requantized to int8 per row and
    per that many columns (32, 64 or 128), which the warpgroup's tile must hold whole. ``overrides``: any
    other field."""
    out_bytes = 1 if out_group else jnp.dtype(out_dtype).itemsize
    if out_group is not None and out_group not in (32, 64, 128):
        raise ValueError(f"the Mosaic GPU block-scaled GEMM requantizes per 32, 64 or 128 columns, got {out_group}")
    tile_n = next((t for t in (128, 64) if n % t == 0 and t % (out_group or 1) == 0), 128)
    cfg = BlockTileConfig(group=group, tile_n=tile_n, epi_tile_n=_epi_tile(min(tile_n, out_group or tile_n), 64))
    cfg = dataclasses.replace(cfg, **overrides)
    fit = dict(out_bytes=out_bytes, out_group=out_group)
    if "stages" not in overrides:
        cfg = dataclasses.replace(cfg, stages=max_stages(cfg, **fit))
        narrow = dataclasses.replace(cfg, epi_tile_n=32)
        narrow = dataclasses.replace(narrow, stages=max_stages(narrow, **fit))
        if cfg.stages < 4 and "epi_tile_n" not in overrides and narrow.stages > cfg.stages:
            cfg = narrow  # half the staging tile buys a ring stage (two-group steps of 128)
    check_config(m, n, k, cfg, **fit)
    return cfg


def unsupported_reason(
    m: int, n: int, k: int, *, a_tile, b_tile, b_bits: int = 8, out_spec=None, residual=None,
    out_dtype=jnp.bfloat16, check_device: bool = True,
) -> str | None:  # fmt: skip
    """Why :func:`int8_matmul_block_mgpu` cannot take these arguments, or None when it can.

    a_tile / b_tile: the resolved (rows, K) scale tiles. check_device=False answers for the shapes alone
    (as on an H100), whatever the default device is.
    """
    if check_device and not available():
        return "it runs compiled on an sm_90 (Hopper) GPU only"
    if b_bits != 8:
        return "it needs an int8 b"
    if jnp.dtype(out_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        return f"it writes bfloat16 or float32, got {jnp.dtype(out_dtype)}"
    if residual is not None and jnp.dtype(residual.dtype) != jnp.dtype(out_dtype):
        return f"the residual must have the output dtype {jnp.dtype(out_dtype)}, got {residual.dtype}"
    if out_spec is not None and residual is not None:
        return "a requantized output (out_spec) takes no residual"
    try:
        out_group = None if out_spec is None else out_group_of(out_spec, n)
        cfg = fit_config(m, n, k, k_group_of(a_tile, b_tile, k), out_dtype=out_dtype, out_group=out_group)
    except ValueError as e:
        return str(e)
    if m % cfg.cta_m:  # the overlapping last row tile is checked in Mosaic GPU's interpreter only
        return f"M={m} is not a multiple of the CTA's {cfg.cta_m} rows"
    return None


def group_scales(scale: jax.Array, tile: tuple[int, int], rows: int, k: int, group: int) -> jax.Array:
    """(row tiles, K tiles) scales -> (K / group, rows) f32: each row's scale in each K group, K groups
    major so that a pipeline step's scales for a CTA's rows are one TMA box."""
    tr, tk = tile
    s = jnp.asarray(scale, jnp.float32)
    s = jnp.take(s, jnp.arange(rows) // tr, axis=0)
    s = jnp.take(s, (jnp.arange(k // group) * group) // tk, axis=1)
    return s.T


# ---------------------------------------------------------------------------------------------- wrapper


def int8_matmul_block_mgpu(
    a: jax.Array,
    a_scale: jax.Array,
    b: jax.Array,
    b_scale: jax.Array,
    *,
    bias: jax.Array | None = None,
    activation=None,
    residual: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
    out_spec: QuantSpec | None = None,
    a_tile: tuple[int, int] | None = None,
    b_tile: tuple[int, int] | None = None,
    config: BlockTileConfig | None = None,
    interpret: bool | None = None,
) -> jax.Array | QArray:
    """``act(dequant(a) @ dequant(b).T + bias) + residual`` with block scales, on Hopper wgmma.

    a: (M, K) int8 with a_scale (cdiv(M, ta_m), cdiv(K, ta_k)) f32; b: (N, K) int8 with b_scale
    (cdiv(N, tb_n), cdiv(K, tb_k)) f32. Tiles are inferred from the scale shapes as in
    :func:`~pallas_kernels.int8_matmul_block_scaled.int8_matmul_block_scaled` unless given. bias: (N,) or
    None; residual: (M, N) ``out_dtype`` or None; activation: one of
    :data:`pallas_kernels.int8_matmul_mgpu.ACTIVATIONS`. Returns (M, N) ``out_dtype`` (bf16 or f32), or with
    ``out_spec`` (symmetric INT8 tiles (1, q), q in {32, 64, 128}; no residual) a :class:`QArray` of (M, N)
    int8 codes and (M, N / q) f32 scales requantized in the epilogue, dequantizing to ``out_dtype``.
    ``config``: tiles and schedule; None fits them to the shapes (:func:`fit_config`), with
    ``schedule="running"`` where one weight scale covers a warpgroup tile's columns.
    ``interpret=True`` runs Mosaic GPU's interpreter (slow; any host); otherwise no sm_90 GPU is a ValueError.
    """
    if not interpret and not available():
        raise ValueError(
            "the Mosaic GPU block-scaled INT8 GEMM runs compiled on an sm_90 (Hopper) GPU only; pass "
            "interpret=True for Mosaic GPU's interpreter (slow), or use int8_matmul_block_scaled elsewhere"
        )
    m, k = a.shape
    n = b.shape[0]
    if a.dtype != jnp.int8 or b.dtype != jnp.int8 or b.shape[1] != k:
        raise ValueError(
            f"a (M, K) and b (N, K) must be int8 with the same K, got {a.shape} {a.dtype}, {b.shape} {b.dtype}"
        )
    ta = resolve_tiles((m, k), a_scale.shape, a_tile)
    tb = resolve_tiles((n, k), b_scale.shape, b_tile)
    out_dtype = jnp.dtype(out_dtype)
    if out_dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        raise ValueError(f"out_dtype must be bfloat16 or float32, got {out_dtype}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if residual is not None and (residual.shape != (m, n) or residual.dtype != out_dtype):
        raise ValueError(f"residual must be ({m}, {n}) {out_dtype}, got {residual.shape} {residual.dtype}")
    if bias is not None and bias.size != n:
        raise ValueError(f"bias must hold N={n} values, got shape {bias.shape}")
    out_group = None
    if out_spec is not None:
        if residual is not None:
            raise ValueError("a requantized output (out_spec) takes no residual")
        out_group = out_group_of(out_spec, n)
    g = k_group_of(ta, tb, k)
    b_uniform_over = lambda tile_n: tb[0] % tile_n == 0 or tb[0] >= n  # noqa: E731
    cfg = config
    if cfg is None:
        cfg = fit_config(m, n, k, g, out_dtype=out_dtype, out_group=out_group)
        if b_uniform_over(cfg.tile_n):  # ~10% faster than "wait" on the H100 (BENCHMARKS.md)
            cfg = dataclasses.replace(cfg, schedule="running")
    if cfg.group != g:
        raise ValueError(f"config.group={cfg.group} must be the scales' K group {g}")
    check_config(m, n, k, cfg, out_bytes=1 if out_group else out_dtype.itemsize, out_group=out_group)
    b_uniform = b_uniform_over(cfg.tile_n)
    if cfg.schedule == "running" and not b_uniform:
        raise ValueError(
            f"schedule='running' needs one weight scale per warpgroup tile: b's row tile {tb[0]} must be a "
            f"multiple of tile_n={cfg.tile_n}; use schedule='wait'"
        )
    out = _block_mgpu(
        a, group_scales(a_scale, ta, m, k, g), b, group_scales(b_scale, tb, n, k, g), bias, residual,
        activation=activation, out_dtype=out_dtype, out_group=out_group, cfg=cfg,
        b_uniform=b_uniform, interpret=bool(interpret),
    )  # fmt: skip
    if out_group is None:
        return out
    codes, scales = out
    return QArray(codes, scales.T, None, out_spec, (m, n), out_dtype)


def _block_mgpu(
    a, sa, b, sb, bias, residual, *, activation, out_dtype, out_group: int | None, cfg: BlockTileConfig,
    b_uniform: bool, interpret: bool,
):  # fmt: skip
    m, k = a.shape
    n = b.shape[0]
    inputs = [a, b, sa, sb]
    if bias is not None:
        inputs.append(jnp.asarray(bias, jnp.float32).reshape(n))
    if residual is not None:
        inputs.append(residual)
    cluster = 2 if cfg.cluster_m else 1
    tiles = pl.cdiv(m, cfg.cta_m * cluster) * (n // cfg.cta_n)
    kernel = functools.partial(
        _kernel, cfg=cfg, activation=activation, has_bias=bias is not None, has_residual=residual is not None,
        out_group=out_group, b_uniform=b_uniform, interpret=interpret,
    )  # fmt: skip
    if out_group is None:
        out_type = jax.ShapeDtypeStruct((m, n), out_dtype)
    else:  # codes, and the scales as (N / q, M): each warpgroup stores its rows' vectors as one TMA box
        out_type = (jax.ShapeDtypeStruct((m, n), jnp.int8), jax.ShapeDtypeStruct((n // out_group, m), jnp.float32))
    extra = {}
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        extra["interpret"] = InterpretGPUParams(**_INTERPRET_OPTIONS)
    if cluster > 1:
        extra = dict(cluster=(cluster,), cluster_names=("cluster",))
    f = plgpu.kernel(
        kernel,
        out_type=out_type,
        grid=(min(tiles, _num_sms() // cluster),),
        grid_names=("sm",),
        num_threads=cfg.consumers + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=cfg.epilogue_math != "precise"),
        **extra,
    )
    return f(*inputs)


# ---------------------------------------------------------------------------------------------- kernel


def _kernel(
    *refs, cfg: BlockTileConfig, activation, has_bias: bool, has_residual: bool, out_group: int | None,
    b_uniform: bool, interpret: bool,
):  # fmt: skip
    # Register layouts matter to the compiler only; Mosaic GPU's interpreter reads refs plainly.
    def load(ref, layout):
        return ref[...] if interpret else plgpu.load(ref, (), layout=layout)

    def cast(x, layout):
        return x if interpret else plgpu.layout_cast(x, layout)

    a_gmem, b_gmem, sa_gmem, sb_gmem, *rest = refs
    bias_gmem = rest.pop(0) if has_bias else None
    res_gmem = rest.pop(0) if has_residual else None
    out_gmem, *qs = rest  # the codes' scales follow them when requantizing
    m = a_gmem.shape[0]
    n = b_gmem.shape[0]
    k = a_gmem.shape[1]
    out_dtype = out_gmem.dtype
    tm, tn, g, gps = cfg.tile_m, cfg.tile_n, cfg.group, cfg.groups_per_step
    cta_m, cta_n, consumers = cfg.cta_m, cfg.cta_n, cfg.consumers
    cluster = 2 if cfg.cluster_m else 1
    em, en = cfg.epi_tile_m, cfg.epi_tile_n
    m_iters, n_iters = pl.cdiv(m, cta_m * cluster), n // cta_n
    in_transforms = _swizzled(g, jnp.int8)
    out_transforms = _swizzled(en, out_dtype)
    slots = _slots(cfg)
    shape = (tm, tn)
    b_collective = ("cluster",) if cluster > 1 else ()

    # "carry" and two-group "running" leave wgmmas running past the step: its stage is released a step later
    delay = 1 if cfg.schedule == "carry" or (cfg.schedule == "running" and gps == 2) else 0

    def operand_spec(rows, j, collective=()):  # group j of a step: a (rows, G) box of A or B
        extra = dict(collective_axes=collective) if collective else {}
        return plgpu.BlockSpec(
            (rows, g), lambda kk: (0, gps * kk + j), transforms=in_transforms, memory_space=plgpu.SMEM,
            delay_release=delay, **extra,
        )  # fmt: skip

    def scale_spec(rows):  # the step's (groups, rows) scales
        return plgpu.BlockSpec((gps, rows), lambda kk: (kk, 0), memory_space=plgpu.SMEM, delay_release=delay)

    in_specs = [
        *[operand_spec(cta_m, j) for j in range(gps)],
        *[operand_spec(cta_n, j, b_collective) for j in range(gps)],
        scale_spec(cta_m),
        scale_spec(cta_n),
    ]

    def pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k // cfg.step_k,),
            # three consumers: 160 registers each (FlashAttention-3's split); two: 232 each
            memory_registers=MEMORY_REGISTERS if consumers == 2 else 32,
            in_specs=in_specs,
            wg_axis="wg",
            num_compute_wgs=consumers,
            max_concurrent_steps=cfg.stages,
            compute_context=context,
        )

    ignore = lambda *_, **__: None  # noqa: E731 - allocations do not depend on the body
    gmem_args = lambda a_, b_, sa_, sb_: (*[a_] * gps, *[b_] * gps, sa_, sb_)  # noqa: E731

    @functools.partial(
        pl.run_scoped,
        pipeline_allocs=pipeline(ignore, ignore).get_allocations(*gmem_args(a_gmem, b_gmem, sa_gmem, sb_gmem)),
        out_smem=plgpu.SMEM((consumers, slots, em, en), out_dtype, transforms=out_transforms),
        bias_smem=plgpu.SMEM((consumers, tn), jnp.float32),
        qs_smem=plgpu.SMEM((consumers, tn // out_group, tm) if out_group else (consumers, 1, 1), jnp.float32),
        bias_barrier=plgpu.Barrier(num_barriers=consumers),
        res_barrier=plgpu.Barrier(num_barriers=consumers * slots),
        sched_barrier=plgpu.Barrier(num_arrivals=2),
        collective_axes="wg",
    )
    def _scope(pipeline_allocs, out_smem, bias_smem, qs_smem, bias_barrier, res_barrier, sched_barrier):
        wg = lax.axis_index("wg")
        cta = lax.axis_index("cluster") if cluster > 1 else 0

        def rendezvous():  # both consumer warpgroups meet: with one offset by a phase, they alternate
            plgpu.barrier_arrive(sched_barrier)
            plgpu.barrier_wait(sched_barrier)

        @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
        def _tile_loop(info):
            (lin,) = info.index
            mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), 1 if cfg.grid_minor == "n" else 0, cfg.grid_width)
            # Ragged M: the last row tile ends at M, overlapping the one before; the rows they share are
            # computed twice and written twice with the same values (no operand box leaves the arrays).
            cta_row0 = jnp.minimum(mi * (cta_m * cluster), m - cta_m * cluster) + cta * cta_m
            row0, col0 = cta_row0 + wg * tm, ni * cta_n  # each warpgroup: its 64 rows of the CTA tile
            a_rows, b_rows = pl.ds(wg * tm, tm), slice(None)
            sa_rows, sb_col = pl.ds(wg * tm, tm), 0

            def scale_vectors(sa_smem, sb_smem, j):
                """The step's group j scales as vectors: (A's row scales times the weight's scalar,) when the
                weight's scale is one value over the warpgroup's columns, else (row scales, column scales)."""
                sa = load(sa_smem.at[j, sa_rows], plgpu.Layout.WGMMA.reduce(1))
                if b_uniform:  # fold the weight's scalar into A's vector: one FMA an element stays
                    return (sa * sb_smem[j, sb_col],)
                sb = load(sb_smem.at[j, pl.ds(sb_col, tn)], plgpu.Layout.WGMMA.reduce(0))
                return sa, sb

            def zero_vectors():
                vecs = [cast(jnp.full((tm,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))]
                if not b_uniform:
                    vecs.append(cast(jnp.full((tn,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(0)))
                return tuple(vecs)

            def broadcast(vecs):
                s = lax.broadcast_in_dim(vecs[0], shape, [0])
                return s if len(vecs) == 1 else s * lax.broadcast_in_dim(vecs[1], shape, [1])

            def init():
                value = MAGIC_BITS if cfg.convert == "magic" else 0
                return cast(jnp.full(shape, value, jnp.int32), plgpu.Layout.WGMMA)

            def promote(y, part, s):
                if cfg.convert == "magic":
                    f = lax.bitcast_convert_type(part, jnp.float32) - np.float32(MAGIC_FLOAT)
                elif cfg.convert == "magic_add":
                    f = lax.bitcast_convert_type(part + MAGIC_BITS, jnp.float32) - np.float32(MAGIC_FLOAT)
                else:
                    f = part.astype(jnp.float32)
                return y + f * broadcast(s)

            def interpret_dot(a_ref, b_t):  # one group's int32 product, as a plain dot of the loaded tiles
                a_tile, b_tile = a_ref.at[a_rows][...], b_t_of[id(b_t)][...]
                return lax.dot_general(a_tile, b_tile, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)

            def product(a_ref, b_t, sync=False):
                """One group's int32 accumulator (MAGIC_BITS + p with convert="magic"), its wgmma waited for.
                ``sync``: meet the other warpgroup between the wgmma's issue and the wait (pingpong)."""
                if interpret:  # the interpreter has neither transposed wgmma operands nor run_state
                    part = interpret_dot(a_ref, b_t)
                    return part + MAGIC_BITS if cfg.convert == "magic" else part

                def one(acc):
                    plgpu.wgmma(acc, a_ref.at[a_rows], b_t)
                    if sync:
                        rendezvous()

                return pl.run_state(one)(plgpu.ACC.init(init()))

            accs = []  # the "carry" (two) or "running" (one) schedule's accumulators, allocated in ``context``
            b_t_of = {}  # interpret mode: each transposed B view's untransposed (N, K) ref

            def body_carry(a_refs, b_ts, scales, y, s_prev, *pending):
                """Groups 2k and 2k + 1; group 2k - 1's wgmma (issued last step) is still in flight."""
                if interpret:  # the same order of promotions; group 2k + 1's product waits in the carry
                    y = promote(y, pending[0], s_prev)
                    y = promote(y, product(a_refs[0], b_ts[0]), scales[0])
                    return y, scales[1], product(a_refs[1], b_ts[1])
                acc0, acc1 = accs
                acc0[...] = init()
                plgpu.wgmma(acc0, a_refs[0].at[a_rows], b_ts[0])
                if cfg.pingpong:
                    rendezvous()
                y = promote(y, plgpu.wgmma_accumulator_load(acc1, wait_n=1), s_prev)
                acc1[...] = init()
                plgpu.wgmma(acc1, a_refs[1].at[a_rows], b_ts[1])
                y = promote(y, plgpu.wgmma_accumulator_load(acc0, wait_n=1), scales[0])
                return y, scales[1]  # group 2k + 1 is promoted next step (its stage is released then)

            def body_running(a_refs, b_ts, scales, z, *state):
                """Each group j of the step into its own running sum S_j (with two groups a step, the even and
                the odd groups'): z += S_j (s_j,prev - s_j), then S_j += p_j on the tensor core. With two, each
                sum is promoted while the other's wgmma runs: on entry the last step's two may be in flight."""
                s_prev, totals = state[:gps], state[gps:]  # totals: the sums themselves, interpret mode only
                deltas = [(p[0] - s[0],) for p, s in zip(s_prev, scales)]
                if interpret:
                    for total, d in zip(totals, deltas):
                        z = z + total.astype(jnp.float32) * broadcast(d)
                    totals = [t + interpret_dot(a_refs[j], b_ts[j]) for j, t in enumerate(totals)]
                    return z, *scales, *totals
                for j, acc in enumerate(accs):
                    z = z + plgpu.wgmma_accumulator_load(acc, wait_n=gps - 1).astype(jnp.float32) * broadcast(deltas[j])
                    plgpu.wgmma(acc, a_refs[j].at[a_rows], b_ts[j])
                if cfg.pingpong:
                    rendezvous()
                if not delay:
                    plgpu.wgmma_wait(0)  # the stage is released after this body
                return z, *scales

            def body(idx, *refs):
                del idx
                a_refs, b_refs = refs[:gps], refs[gps : 2 * gps]
                sa_smem, sb_smem, y = refs[2 * gps :]
                b_ts = [plgpu.transpose_ref(r.at[b_rows], (1, 0)) for r in b_refs]
                b_t_of.update({id(t): r.at[b_rows] for t, r in zip(b_ts, b_refs)})
                scales = [scale_vectors(sa_smem, sb_smem, j) for j in range(gps)]
                if cfg.schedule == "carry":
                    return body_carry(a_refs, b_ts, scales, *y)
                if cfg.schedule == "running":
                    return body_running(a_refs, b_ts, scales, *y)
                if cfg.schedule == "pair" and not interpret:

                    def both(refs):
                        acc0, acc1, y_ref = refs
                        plgpu.wgmma(acc0, a_refs[0].at[a_rows], b_ts[0])
                        plgpu.wgmma(acc1, a_refs[1].at[a_rows], b_ts[1])
                        if cfg.pingpong:
                            rendezvous()
                        # group 0 is done while group 1's wgmma still runs
                        p0 = plgpu.wgmma_accumulator_load(acc0, wait_n=1)
                        y_ref[...] = promote(y_ref[...], p0, scales[0])

                    _, p1, y = pl.run_state(both)((plgpu.ACC.init(init()), plgpu.ACC.init(init()), y))
                    return promote(y, p1, scales[1])
                for j in range(gps):
                    sync = cfg.pingpong and j == gps - 1
                    y = promote(y, product(a_refs[j], b_ts[j], sync), scales[j])
                return y

            def context(run_pipeline):
                if has_bias:
                    plgpu.copy_gmem_to_smem(bias_gmem.at[pl.ds(col0, tn)], bias_smem.at[wg], bias_barrier.at[wg])
                if cfg.pingpong:
                    pl.when(wg == 1)(rendezvous)
                y0 = cast(jnp.full(shape, 0, jnp.float32), plgpu.Layout.WGMMA)
                if cfg.schedule == "running":
                    zero = cast(jnp.full(shape, 0, jnp.int32), plgpu.Layout.WGMMA)

                    def running(*acc_refs):  # one running sum per group of a step
                        if interpret:
                            z, *rest = run_pipeline((y0, *[zero_vectors()] * gps, *[zero] * gps))
                            s_last, totals = rest[:gps], rest[gps:]
                        else:
                            accs[:] = acc_refs
                            for acc in acc_refs:
                                acc[...] = zero
                            z, *s_last = run_pipeline((y0, *[zero_vectors()] * gps))
                            # the sums' last wgmmas complete in the order they were issued
                            totals = [plgpu.wgmma_accumulator_load(a, wait_n=gps - 1 - j)
                                      for j, a in enumerate(acc_refs)]  # fmt: skip
                        if cfg.pingpong:
                            pl.when(wg == 0)(rendezvous)
                        for total, s in zip(totals, s_last):
                            z = z + total.astype(jnp.float32) * broadcast(s)
                        epilogue(z)

                    if interpret:
                        running()
                    else:
                        pl.run_scoped(running, *[plgpu.ACC(shape, jnp.int32)] * gps)
                    return
                if cfg.schedule != "carry":
                    y = run_pipeline(y0)
                    if cfg.pingpong:
                        pl.when(wg == 0)(rendezvous)
                    epilogue(y)
                    return

                if interpret:
                    y, s_last, p_last = run_pipeline((y0, zero_vectors(), init()))
                    if cfg.pingpong:
                        pl.when(wg == 0)(rendezvous)
                    epilogue(promote(y, p_last, s_last))
                    return

                def carried(acc0, acc1):
                    accs[:] = [acc0, acc1]
                    acc1[...] = init()  # read (times zero scales) by the first step
                    y, s_last = run_pipeline((y0, zero_vectors()))
                    if cfg.pingpong:
                        pl.when(wg == 0)(rendezvous)
                    epilogue(promote(y, acc1[...], s_last))  # the last group: wait for its wgmma

                pl.run_scoped(carried, plgpu.ACC(shape, jnp.int32), plgpu.ACC(shape, jnp.int32))

            def epilogue(y):
                if has_bias:
                    plgpu.barrier_wait(bias_barrier.at[wg])
                    bias = load(bias_smem.at[wg], plgpu.Layout.WGMMA.reduce(0))
                    y = y + lax.broadcast_in_dim(bias, shape, [1])
                y = activation_fn(y, activation, erf=ERF_OF_MATH[cfg.epilogue_math])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's stores left the staging
                parts = requantize(y) if out_group else [y]  # column parts of out_group (or tn) columns
                q = out_group or tn
                for ei in range(tm // em):
                    for ej in range(tn // en):
                        e = ei * (tn // en) + ej
                        slot = e % slots
                        rows, cols = pl.ds(row0 + ei * em, em), pl.ds(col0 + ej * en, en)
                        c = (ej * en) % q
                        tile = parts[ej * en // q][ei * em : (ei + 1) * em, c : c + en]
                        stage = out_smem.at[wg, slot]
                        if e >= slots:
                            plgpu.wait_smem_to_gmem(slots - 1, wait_read_only=True)
                        if has_residual:
                            barrier = res_barrier.at[wg * slots + slot]
                            plgpu.copy_gmem_to_smem(res_gmem.at[rows, cols], stage, barrier)
                            plgpu.barrier_wait(barrier)
                            tile = tile + load(stage, plgpu.Layout.WGMMA).astype(jnp.float32)
                        stage[...] = tile.astype(out_dtype)
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(stage, out_gmem.at[rows, cols])

            def requantize(y):
                """Symmetric INT8 per row and per q = out_group columns, as ``jq8.quant.quantize`` with tiles
                (1, q): stores the warpgroup's (tn / q, tm) scales, returns the rounded codes (f32) per part."""
                parts = []
                for j in range(tn // out_group):
                    part = y[:, j * out_group : (j + 1) * out_group]
                    amax = jnp.max(jnp.abs(part), axis=1)
                    scale = jnp.maximum(amax * np.float32(1.0 / qmax(8)), np.float32(SCALE_FLOOR))
                    qs_smem.at[wg, j][...] = scale
                    # |part / scale| <= qmax up to an ulp, so rounding (half away from zero) needs no clamp
                    inv = lax.broadcast_in_dim(np.float32(1.0) / scale, (tm, out_group), [0])
                    parts.append(lax.round(part * inv))
                plgpu.commit_smem()
                dst = qs[0].at[pl.ds(col0 // out_group, tn // out_group), pl.ds(row0, tm)]
                plgpu.copy_smem_to_gmem(qs_smem.at[wg], dst)
                return parts

            pipeline(body, context)(
                *gmem_args(
                    a_gmem.at[pl.ds(cta_row0, cta_m), :],
                    b_gmem.at[pl.ds(ni * cta_n, cta_n), :],
                    sa_gmem.at[:, pl.ds(cta_row0, cta_m)],
                    sb_gmem.at[:, pl.ds(ni * cta_n, cta_n)],
                ),
                allocations=pipeline_allocs,
            )

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
