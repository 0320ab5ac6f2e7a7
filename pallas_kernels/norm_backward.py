"""LayerNorm / RMSNorm backward as one Pallas GPU kernel (Triton lowering).

Given the forward's saved input x (dense, or the INT8 QArray the forward kept), its per-row ``mean`` and
``rstd`` and the upstream gradient dh, in fp32 (D = the row length; means are over D)::

    xhat = (x - mean) * rstd            dxhat = dh * gamma
    proj = mean_D(dxhat * xhat)         centred = dxhat - mean_D(dxhat)   (RMSNorm: centred = dxhat)
    dx = rstd * (centred - xhat * proj) [+ residual_grad]
    dgamma = sum_M(dh * xhat)           dbeta = sum_M(dh)

dx needs two full-row sums; dgamma / dbeta need full-column sums. Each program owns ``rows_per_program``
whole rows and walks them ``block_rows`` at a time, so its dgamma / dbeta partials are one (1, D) row each:
an XLA sum over the programs' partials (a few MB) finishes them. No atomics: the result does not depend on
scheduling. Rows that fit the register budget (:class:`NormBackwardConfig`) take one pass: dh, x
(dequantized in registers) and residual_grad are read once, dx written once, and the column partials stay
in registers across the row groups. Longer rows are swept in column chunks, per row group: a first sweep
for the two row sums, which also adds the chunks' column partials to the program's partial row in memory
(read back by the program itself, behind a barrier), and a second for dx.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jq8.quant import QArray, dequantize
from pallas_kernels._common import cdiv, compiler_params, is_pow2, next_pow2, resolve_interpret
from pallas_kernels.quantize import FEW_PROGRAMS, BlockPlan, Operand, as_operand, block_mask, load_operand

F32 = jnp.float32
_BIAS = Operand("bias")  # a (D,) vector read as a (1, bn) row: gamma

# --------------------------------------------------------------------------------------------- config

ROW_BLOCK_ELEMS = 2048  # one-pass route: block_rows = max(1, this // next_pow2(D)), as norm_quantize's rows
PROGRAMS_PER_SM = 4  # rows_per_program None: about this many programs per SM (FEW_PROGRAMS SMs)
SWEEP_ROWS = 2  # column sweep: block_rows when None (a group's rows stay in L2 for the second pass)


@dataclasses.dataclass(frozen=True)
class NormBackwardConfig:
    """Launch configuration of :func:`layer_norm_backward` (hashable). None fields are planned from (M, D)
    by :func:`plan_norm_backward`.

    block_rows: rows per loaded block (a power of two). None: max(1, 2048 // next_pow2(D)) for whole rows
      (1 row at D = 4096 / 2048, 2 at D = 768 / 1024), ``SWEEP_ROWS`` for the column sweep.
    rows_per_program: rows one program owns (a multiple of block_rows), looping over them block_rows at a
      time; its dgamma / dbeta partials are one (1, D) row each, so more rows per program means fewer
      partials to write and sum, fewer rows means more programs to hide memory latency. None: about
      ``PROGRAMS_PER_SM`` programs per SM (32 rows at M = 16384).
    num_warps: None: one warp per 1024 elements of the block, 4 to 16 (4 at D <= 4096). On the H100 at
      16384 x 4096 (``benchmarks/norm_backward.py``, BENCHMARKS.md): 4 warps 0.378 ms, 8 warps
      0.452, 16 warps 0.440; XLA 0.658.
    max_block_elems: register budget of one (block_rows, next_pow2(D)) block, per operand; rows wider than
      this are swept in (block_rows, budget / block_rows)-column chunks (dh and x read twice, the second
      time mostly from L2).
    """

    block_rows: int | None = None
    rows_per_program: int | None = None
    num_warps: int | None = None
    num_stages: int = 1
    max_block_elems: int = 8192


@dataclasses.dataclass(frozen=True)
class NormBackwardPlan:
    """The resolved launch (static): (bm, bn) blocks, ``rows_per_program`` rows per program, one program
    per ``rows_per_program`` rows (the grid). ``sweep``: bn < D, each row is swept in column chunks."""

    m: int
    d: int
    bm: int
    bn: int
    rows_per_program: int
    sweep: bool
    num_warps: int
    num_stages: int = 1

    @property
    def grid(self) -> int:
        return cdiv(self.m, self.rows_per_program)

    @property
    def num_chunks(self) -> int:
        return cdiv(self.d, self.bn)

    @property
    def block(self) -> BlockPlan:
        """The block geometry the shared load helpers take."""
        return BlockPlan(self.m, self.d, self.bm, self.bn, 1 if self.sweep else None)


def _prev_pow2(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def plan_norm_backward(m: int, d: int, config: NormBackwardConfig) -> NormBackwardPlan:
    """Resolves ``config`` for an (M, D) backward. Raises ValueError on a config it cannot honour."""
    bm = config.block_rows
    if bm is not None and not is_pow2(bm):
        raise ValueError(f"block_rows must be a power of two, got {bm}")
    budget = config.max_block_elems
    width = next_pow2(d)
    sweep = (bm or 1) * width > budget
    if not sweep:
        bm = min(bm or max(1, min(ROW_BLOCK_ELEMS, budget) // width), next_pow2(m))
        bn = width
    else:
        bm = bm or min(SWEEP_ROWS, _prev_pow2(budget))
        bn = min(width, _prev_pow2(max(1, budget // bm)))
    rows = config.rows_per_program
    if rows is None:
        rows = bm * cdiv(cdiv(m, PROGRAMS_PER_SM * FEW_PROGRAMS), bm)
        rows = bm * cdiv(cdiv(m, cdiv(m, rows)), bm)  # even out: the last program is about as full
    elif rows <= 0 or rows % bm:
        raise ValueError(f"rows_per_program ({rows}) must be a positive multiple of block_rows ({bm})")
    warps = config.num_warps or min(16, max(4, next_pow2(bm * bn // 1024)))
    return NormBackwardPlan(m, d, bm, bn, rows, sweep, warps, config.num_stages)


# ------------------------------------------------------------------------------------------- the kernel


def _row_stats(ref, r0, blk: BlockPlan) -> jax.Array:
    """(bm, 1) f32 of an (M, 1) per-row array at row r0; 0 past M (rstd 0 makes xhat 0 there)."""
    rows = r0 + jnp.arange(blk.bm, dtype=jnp.int32)[:, None]
    return plgpu.load(ref.at[pl.ds(r0, blk.bm), pl.ds(0, 1)], mask=rows < blk.m, other=0.0).astype(F32)


def _block(dh_ref, x_op, x_refs, mean, rstd, gamma, r0, c0, blk: BlockPlan):
    """(mask, dh, xhat, dxhat) of the (bm, bn) block at (r0, c0), fp32, each 0 outside the array."""
    mask = block_mask(r0, c0, blk)
    dh = plgpu.load(dh_ref.at[pl.ds(r0, blk.bm), pl.ds(c0, blk.bn)], mask=mask, other=0.0).astype(F32)
    x = load_operand(x_op, x_refs, r0, c0, blk)
    xhat = jnp.where(mask, (x - mean) * rstd, 0.0)  # padding columns would be -mean * rstd
    return mask, dh, xhat, dh * gamma


def _store_dx(dx_ref, rg_ref, mask, dxhat, xhat, rstd, s1, s2, r0, c0, *, plan: NormBackwardPlan, rms):
    """dx = rstd * (centred - xhat * proj) [+ residual_grad] from the row sums s1 = sum(dxhat),
    s2 = sum(dxhat * xhat) ((bm, 1) each), stored masked in dx's dtype."""
    inv_d = 1.0 / plan.d
    centred = dxhat if rms else dxhat - s1 * inv_d
    dx = rstd * (centred - xhat * (s2 * inv_d))
    if rg_ref is not None:
        rg = plgpu.load(rg_ref.at[pl.ds(r0, plan.bm), pl.ds(c0, plan.bn)], mask=mask, other=0.0)
        dx = dx + rg.astype(F32)
    plgpu.store(dx_ref.at[pl.ds(r0, plan.bm), pl.ds(c0, plan.bn)], dx.astype(dx_ref.dtype), mask=mask)


def _column_mask(c0, plan: NormBackwardPlan) -> jax.Array:
    return (c0 + jnp.arange(plan.bn, dtype=jnp.int32) < plan.d)[None, :]


def _store_partial(ref, value, pid, c0, plan: NormBackwardPlan) -> None:
    """This program's (1, bn) column partial at (pid, c0) of a (grid, D) array."""
    plgpu.store(ref.at[pl.ds(pid, 1), pl.ds(c0, plan.bn)], value, mask=_column_mask(c0, plan))


def _add_partial(ref, value, pid, c0, plan: NormBackwardPlan, first) -> None:
    """Adds ``value`` (1, bn) to this program's partial at (pid, c0); ``first`` (traced bool): store only
    (the output starts uninitialised)."""
    cmask = _column_mask(c0, plan)
    at = ref.at[pl.ds(pid, 1), pl.ds(c0, plan.bn)]
    plgpu.store(at, plgpu.load(at, mask=cmask & ~first, other=0.0) + value, mask=cmask)


def _norm_backward_kernel(dh_ref, *refs, x_op, plan: NormBackwardPlan, rms, has_beta, has_residual,
                          interpret):
    """refs: x (codes [, scales]), mean (M, 1), rstd (M, 1), gamma (D,), [residual_grad], then the outputs
    dx (M, D), dgamma partials (grid, D) [, dbeta partials (grid, D)]."""
    x_refs, refs = refs[: x_op.n_refs], refs[x_op.n_refs :]
    mean_ref, rstd_ref, gamma_ref, *refs = refs
    rg_ref = refs.pop(0) if has_residual else None
    dx_ref, *partial_refs = refs
    blk = plan.block
    pid = pl.program_id(0)
    store_dx = functools.partial(_store_dx, dx_ref, rg_ref, plan=plan, rms=rms)

    if not plan.sweep:
        gamma = load_operand(_BIAS, (gamma_ref,), 0, 0, blk)

        def group(k, accs):
            r0 = pid * plan.rows_per_program + k * plan.bm
            mean, rstd = _row_stats(mean_ref, r0, blk), _row_stats(rstd_ref, r0, blk)
            mask, dh, xhat, dxhat = _block(dh_ref, x_op, x_refs, mean, rstd, gamma, r0, 0, blk)
            s1 = jnp.sum(dxhat, axis=1, keepdims=True)
            s2 = jnp.sum(dxhat * xhat, axis=1, keepdims=True)
            store_dx(mask, dxhat, xhat, rstd, s1, s2, r0, 0)
            # (bm, bn) accumulators: the reduction over the block's rows runs once, after the loop
            return (accs[0] + dh * xhat, *((accs[1] + dh,) if has_beta else ()))

        init = tuple(jnp.zeros((plan.bm, plan.bn), F32) for _ in partial_refs)
        accs = lax.fori_loop(0, plan.rows_per_program // plan.bm, group, init)
        for ref, acc in zip(partial_refs, accs):
            _store_partial(ref, jnp.sum(acc, axis=0, keepdims=True), pid, 0, plan)
        return

    # Column sweep, per row group: pass 1 the row sums (adding the chunks' column partials to this
    # program's partial row in memory), pass 2 dx (dh and x read again, from L2: a group is a few rows).
    def group(k, carry):
        r0 = pid * plan.rows_per_program + k * plan.bm
        mean, rstd = _row_stats(mean_ref, r0, blk), _row_stats(rstd_ref, r0, blk)
        if not interpret:
            # The partial row is read back by other threads of this program than the ones that stored it:
            # bar.sync orders the previous group's stores before this group's loads.
            plgpu.debug_barrier()

        def chunk(j):
            c0 = j * plan.bn
            gamma = load_operand(_BIAS, (gamma_ref,), r0, c0, blk)
            return (c0, *_block(dh_ref, x_op, x_refs, mean, rstd, gamma, r0, c0, blk))

        def row_sums(j, sums):
            c0, _, dh, xhat, dxhat = chunk(j)
            for ref, v in zip(partial_refs, (dh * xhat, dh)):
                _add_partial(ref, jnp.sum(v, axis=0, keepdims=True), pid, c0, plan, first=k == 0)
            return (sums[0] + jnp.sum(dxhat, axis=1, keepdims=True),
                    sums[1] + jnp.sum(dxhat * xhat, axis=1, keepdims=True))  # fmt: skip

        zeros = jnp.zeros((plan.bm, 1), F32)
        s1, s2 = lax.fori_loop(0, plan.num_chunks, row_sums, (zeros, zeros))

        @pl.loop(0, plan.num_chunks)
        def _(j):
            c0, mask, _, xhat, dxhat = chunk(j)
            store_dx(mask, dxhat, xhat, rstd, s1, s2, r0, c0)

        return carry

    lax.fori_loop(0, plan.rows_per_program // plan.bm, group, 0)


@functools.partial(
    jax.jit, static_argnames=("x_op", "plan", "rms", "has_beta", "out_dtype", "interpret")
)
def _norm_backward_call(dh, x_arrays, mean, rstd, gamma, residual_grad, *, x_op, plan, rms, has_beta,
                        out_dtype, interpret):  # fmt: skip
    m, d = plan.m, plan.d
    has_residual = residual_grad is not None
    # (M, 1): a (bm, 1) block of per-row statistics broadcasts against (bm, bn) without a reshape in-kernel
    operands = [dh, *x_arrays, mean.reshape(m, 1), rstd.reshape(m, 1), gamma]
    operands += [residual_grad] if has_residual else []
    partial = jax.ShapeDtypeStruct((plan.grid, d), F32)
    shapes = [jax.ShapeDtypeStruct((m, d), out_dtype), partial] + ([partial] if has_beta else [])
    kernel = functools.partial(
        _norm_backward_kernel, x_op=x_op, plan=plan, rms=rms, has_beta=has_beta, has_residual=has_residual,
        interpret=interpret,
    )
    dx, *partials = pl.pallas_call(
        kernel,
        grid=(plan.grid,),
        out_shape=shapes,
        compiler_params=compiler_params(plan.num_warps, plan.num_stages),
        interpret=interpret,
        name="layer_norm_backward",
    )(*operands)
    sums = [jnp.sum(p, axis=0) for p in partials]
    return dx, sums[0], (sums[1] if has_beta else None)


# ------------------------------------------------------------------------------------------------ public API


def _check_inputs(dh, x, mean, rstd, gamma, residual_grad, out_dtype):
    """Validates shapes and dtypes -> (dh, mean, rstd, gamma, residual_grad as arrays, out_dtype)."""
    dh = jnp.asarray(dh)
    if dh.ndim != 2 or not jnp.issubdtype(dh.dtype, jnp.floating):
        raise ValueError(f"dh must be a float (M, D) array, got {dh.dtype}{dh.shape}")
    m, d = dh.shape
    x_shape = x.shape if isinstance(x, QArray) else jnp.shape(x)
    if tuple(x_shape) != (m, d):
        raise ValueError(f"x must have dh's shape ({m}, {d}), got {tuple(x_shape)}")
    mean, rstd, gamma = jnp.asarray(mean, F32), jnp.asarray(rstd, F32), jnp.asarray(gamma)
    for name, a, shape in (("mean", mean, (m,)), ("rstd", rstd, (m,)), ("gamma", gamma, (d,))):
        if a.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    if residual_grad is not None:
        residual_grad = jnp.asarray(residual_grad)
        if residual_grad.shape != (m, d) or not jnp.issubdtype(residual_grad.dtype, jnp.floating):
            got = f"{residual_grad.dtype}{residual_grad.shape}"
            raise ValueError(f"residual_grad must be a float ({m}, {d}) array, got {got}")
    out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    return dh, mean, rstd, gamma, residual_grad, out_dtype


def layer_norm_backward(
    dh: jax.Array,
    x: jax.Array | QArray,
    mean: jax.Array,
    rstd: jax.Array,
    gamma: jax.Array,
    *,
    rms: bool = False,
    has_beta: bool = True,
    residual_grad: jax.Array | None = None,
    out_dtype=None,
    interpret: bool | None = None,
    config: NormBackwardConfig | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Exact LayerNorm / RMSNorm backward in one pass over the rows (fp32 math; see the module docstring).

    dh: (M, D) f32 / bf16, dL/dLN(x). x: the LN input, (M, D) float, or a QArray of symmetric INT8 codes
      whose non-whole tile sizes are powers of two (Jetfire's 32 x 32 blocks; M, D need not be multiples).
    mean, rstd: (M,) f32 from the forward (mean is zeros for RMSNorm). gamma: (D,) float.
    rms: RMSNorm (no centring term). has_beta: also return dbeta.
    residual_grad: None or (M, D) float, added to dx in the same pass (the residual stream's gradient).
    out_dtype: dx's dtype; None: x's (for a QArray its ``.dtype``).
    config: blocks / rows per program / warps (:class:`NormBackwardConfig`; None plans them from (M, D)).
    Returns (dx (M, D) out_dtype, dgamma (D,) f32, dbeta (D,) f32 or None without has_beta).
    """
    dh, mean, rstd, gamma, residual_grad, out_dtype = _check_inputs(
        dh, x, mean, rstd, gamma, residual_grad, out_dtype
    )
    m, d = dh.shape
    x_op, x_arrays = as_operand(x, m, d)
    plan = plan_norm_backward(m, d, config or NormBackwardConfig())
    return _norm_backward_call(
        dh, x_arrays, mean, rstd, gamma, residual_grad, x_op=x_op, plan=plan, rms=bool(rms),
        has_beta=bool(has_beta), out_dtype=out_dtype, interpret=resolve_interpret(interpret),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ reference


def layer_norm_backward_reference(
    dh: jax.Array,
    x: jax.Array | QArray,
    mean: jax.Array,
    rstd: jax.Array,
    gamma: jax.Array,
    *,
    rms: bool = False,
    has_beta: bool = True,
    residual_grad: jax.Array | None = None,
    out_dtype=None,
    interpret: bool | None = None,
    config: NormBackwardConfig | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Same contract as :func:`layer_norm_backward`, in plain jnp fp32 (the formulas of the docstring)."""
    del interpret, config
    dh, mean, rstd, gamma, residual_grad, out_dtype = _check_inputs(
        dh, x, mean, rstd, gamma, residual_grad, out_dtype
    )
    xf = dequantize(x, F32) if isinstance(x, QArray) else jnp.asarray(x, F32)
    xhat = (xf - mean[:, None]) * rstd[:, None]
    dh = dh.astype(F32)
    dxhat = dh * gamma.astype(F32)
    proj = jnp.mean(dxhat * xhat, axis=1, keepdims=True)
    centred = dxhat if rms else dxhat - jnp.mean(dxhat, axis=1, keepdims=True)
    dx = rstd[:, None] * (centred - xhat * proj)
    if residual_grad is not None:
        dx = dx + residual_grad.astype(F32)
    return dx.astype(out_dtype), jnp.sum(dh * xhat, axis=0), (jnp.sum(dh, axis=0) if has_beta else None)
