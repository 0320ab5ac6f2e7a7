"""Probe: what bounds a per-token LayerNorm-quantize of the f32 residual stream at prefill sizes.

    PYTHONPATH=. python3 benchmarks/ln_probe.py            # H100
    PYTHONPATH=. python3 benchmarks/ln_probe.py --quick    # CPU smoke (interpret mode)

A minimal Pallas kernel (whole rows, ``rows`` rows per program) with switches for each piece of work:
``affine`` (gamma, beta loads), ``stats`` ("two_round": mean, then the centred sum of squares, as
``layer_norm_quantize``; "one_round": sum and sum of squares reduced together), ``amax`` ("after": absmax of
the normalized row, a third dependent reduction; "minmax": from max(x) and min(x) of the first round, exact
when there is no affine, since (x - mean) * rstd is monotonic in x) ``cache`` (gamma/beta loaded with
evict_last, x with evict_first), ``loop`` (``rows`` rows one at a time in a loop, gamma/beta loaded once),
``rank2`` (gamma/beta as (1, N) arrays loaded as (1, bn) rows) and ``preload`` (gamma/beta loaded before the
reductions). Each variant is timed by device time next to the library kernel and checked against the jnp
reference (codes within one step).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from decode_producers import device_us  # noqa: E402

from jq8.quant import QuantSpec  # noqa: E402
from pallas_kernels._common import compiler_params, next_pow2, resolve_interpret  # noqa: E402
from pallas_kernels.norm_quantize import layer_norm_quantize, layer_norm_quantize_reference  # noqa: E402
from pallas_kernels.quantize import QuantizeConfig  # noqa: E402

SPEC = QuantSpec((1, -1))


def _kernel(x_ref, g_ref, b_ref, q_ref, s_ref, *, n, bn, rows, affine, stats, amax, cache, preload, rank2,
            loop):
    cols = jnp.arange(bn, dtype=jnp.int32)[None, :]
    xkw = dict(eviction_policy="evict_first") if cache else {}
    akw = dict(eviction_policy="evict_last") if cache else {}  # JAX 0.11's ".ca" lookup raises KeyError

    def load_affine(mask):
        if rank2:  # (1, N) refs loaded as (1, bn): the layout of x's rows, no conversion of a 1-D vector
            return tuple(plgpu.load(r.at[pl.ds(0, 1), pl.ds(0, bn)], mask=mask[:1], other=0.0, **akw)
                         for r in (g_ref, b_ref))
        g = plgpu.load(g_ref.at[pl.ds(0, bn)], mask=mask[0], other=0.0, **akw)[None, :]
        b = plgpu.load(b_ref.at[pl.ds(0, bn)], mask=mask[0], other=0.0, **akw)[None, :]
        return g, b

    def block(r0, nrows, gb):
        mask = jnp.broadcast_to(cols < n, (nrows, bn))
        x = plgpu.load(x_ref.at[pl.ds(r0, nrows), pl.ds(0, bn)], mask=mask, other=0.0, **xkw)
        mean = jnp.sum(x, axis=1, keepdims=True) / n
        if stats == "one_round":
            var = jnp.maximum(jnp.sum(x * x, axis=1, keepdims=True) / n - mean * mean, 0.0)
        else:
            xc = jnp.where(mask, x - mean, 0.0)
            var = jnp.sum(xc * xc, axis=1, keepdims=True) / n
        rstd = jax.lax.rsqrt(var + 1e-5)
        y = (x - mean) * rstd
        if affine:
            g, b = gb if gb is not None else load_affine(mask)
            y = y * g + b
        y = jnp.where(mask, y, 0.0)
        if amax == "minmax":
            hi = jnp.max(jnp.where(mask, x, -jnp.inf), axis=1, keepdims=True)
            lo = jnp.min(jnp.where(mask, x, jnp.inf), axis=1, keepdims=True)
            a = jnp.maximum((hi - mean) * rstd, (mean - lo) * rstd)
        else:
            a = jnp.max(jnp.abs(y), axis=1, keepdims=True)
        scale = jnp.where(a > 0, a / 127.0, 1.0)
        v = y * (1.0 / scale)
        q = jnp.clip(jnp.where(v >= 0, jnp.floor(v + 0.5), jnp.ceil(v - 0.5)), -127, 127).astype(jnp.int8)
        plgpu.store(q_ref.at[pl.ds(r0, nrows), pl.ds(0, bn)], q, mask=mask)
        plgpu.store(s_ref.at[pl.ds(r0, nrows), pl.ds(0, 1)], scale)

    r0 = pl.program_id(0) * rows
    if loop:  # rows one at a time, gamma/beta loaded once for all of them
        gb = load_affine(cols < n) if affine else None
        jax.lax.fori_loop(0, rows, lambda i, c: block(r0 + i, 1, gb) or c, 0)
    else:
        # preload: gamma/beta issued before the reductions
        block(r0, rows, load_affine(jnp.broadcast_to(cols < n, (rows, bn))) if affine and preload else None)


@functools.partial(jax.jit, static_argnames=("rows", "warps", "affine", "stats", "amax", "cache", "preload",
                                             "rank2", "loop", "interpret"))
def probe_ln(x, g, b, *, rows=1, warps=4, affine=True, stats="two_round", amax="after", cache=False,
             preload=False, rank2=False, loop=False, interpret=False):
    m, n = x.shape
    assert m % rows == 0
    bn = next_pow2(n)
    kernel = functools.partial(_kernel, n=n, bn=bn, rows=rows, affine=affine, stats=stats, amax=amax,
                               cache=cache, preload=preload, rank2=rank2, loop=loop)
    any_spec = pl.BlockSpec(memory_space=plgpu.ANY) if hasattr(plgpu, "ANY") else pl.BlockSpec(
        memory_space=pl.ANY)
    return pl.pallas_call(
        kernel,
        grid=(m // rows,),
        in_specs=[any_spec] * 3,
        out_specs=[any_spec] * 2,
        out_shape=[jax.ShapeDtypeStruct((m, n), jnp.int8), jax.ShapeDtypeStruct((m, 1), jnp.float32)],
        compiler_params=compiler_params(num_warps=warps, num_stages=1),
        interpret=interpret,
    )(x, *((g.reshape(1, n), b.reshape(1, n)) if rank2 else (g, b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=8192)
    ap.add_argument("--widths", default="1600,768")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    interpret = resolve_interpret(None)
    if args.quick:
        args.m, args.widths, args.calls = 8, "200", 2
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, M = {args.m}", flush=True)
    variants = [
        dict(),
        dict(rank2=True),
        dict(rank2=True, loop=True),
        dict(rank2=True, loop=True, stats="one_round"),
        dict(affine=False),
    ]
    shapes = [dict(rows=1, warps=w) for w in (2, 4, 8)] + [dict(rows=2, warps=4), dict(rows=4, warps=8)]
    loops = [dict(rows=r, warps=w) for r in (2, 4, 8, 16) for w in (4, 8)]
    for n in (int(v) for v in args.widths.split(",")):
        x = jax.random.normal(jax.random.key(0), (args.m, n)) * 2 + 0.5
        g = jax.random.normal(jax.random.key(1), (n,)) * 0.1 + 1
        b = jax.random.normal(jax.random.key(2), (n,)) * 0.1
        lib = jax.jit(lambda x, g=g, b=b: layer_norm_quantize(x, g, b, spec=SPEC)[0].values)
        t = device_us(lib, x, args.calls)
        print(f"\n== ({args.m}, {n}) f32: layer_norm_quantize {t:.1f} us", flush=True)
        configs = [(1, 4), (1, 8), (1, 16), (2048, None), (2048, 8), (4096, 8)]
        for rbe, w in configs[: 1 if args.quick else None]:
            cfg = QuantizeConfig(row_block_elems=rbe, num_warps=w)
            fn = jax.jit(lambda x, c=cfg, g=g, b=b: layer_norm_quantize(x, g, b, spec=SPEC, config=c)[0])
            print(f"  {device_us(fn, x, args.calls):6.1f} us  layer_norm_quantize row_block_elems {rbe} "
                  f"warps {w}", flush=True)
        for v in variants:
            ref = layer_norm_quantize_reference(x, g if v.get("affine", True) else None,
                                                b if v.get("affine", True) else None, spec=SPEC)[0]
            for s in (loops if v.get("loop") else shapes)[: 1 if args.quick else None]:
                kw = {**v, **s}
                fn = jax.jit(lambda x, kw=kw, g=g, b=b: probe_ln(x, g, b, interpret=interpret, **kw))
                try:
                    q, _ = fn(x)
                    err = int(jnp.max(jnp.abs(q.astype(jnp.int32) - ref.values.astype(jnp.int32))))
                    t = device_us(fn, x, args.calls)
                except Exception as e:  # a variant the compiler rejects: report it and go on
                    print(f"  {kw}: failed {type(e).__name__}: {e}"[:200], flush=True)
                    continue
                print(f"  {t:6.1f} us  max code diff {err}  {kw}", flush=True)


if __name__ == "__main__":
    main()
