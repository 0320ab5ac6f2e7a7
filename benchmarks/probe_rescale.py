"""Probe: what makes the in-loop rescale of a block-scaled INT8 GEMM cheap on Hopper (Pallas-Triton).

The h100 notes measured the straightforward rescale (convert int32 -> f32, multiply, add) at 0.28x bf16
for K groups of 32. On sm_90 the int32 -> f32 convert (I2F) runs at a fraction of the FMA rate, so this
probe also tries the magic-number conversion: for |p| < 2**22, float(p) == bitcast(p + 0x4B400000) - 2**23
- 2**22; the constant is folded out of the loop (acc += bitcast(p + MAGIC) * s, then subtract
MAGIC_F * sum(s) once in the epilogue), leaving one integer add and one FMA per element per K group.

NT layout: a (M, K) int8, b (N, K) int8. Variants (qk = K group):
  none        int32 accumulation, scales in the epilogue only (upper bound)
  row/cvt     a's scale varies along K (per row, per group), b per column: acc += f32(p) * sa
  row/magic   same with the magic conversion
  sq/cvt      square qk x qk blocks on both operands with bm = bn = qk: the scale is a scalar per group
  sq/magic    same with the magic conversion
  two/cvt|magic  per-row x per-column scales per group (the general Jetfire case)
Run: PYTHONPATH=. python3 benchmarks/probe_rescale.py   (N=8192 default; INTERPRET=1 N=256 on CPU)
"""

import functools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import compiler_params

INTERPRET = os.environ.get("INTERPRET") == "1"
N = int(os.environ.get("N", 8192))
ITERS = int(os.environ.get("ITERS", 20))
NT = (((1,), (1,)), ((), ()))
MAGIC_I = 0x4B400000  # bit pattern of 12582912.0 = 2**23 + 2**22
MAGIC_F = 12582912.0


def _to_f32(p, magic):
    if magic:
        return lax.bitcast_convert_type(p + jnp.int32(MAGIC_I), jnp.float32)
    return p.astype(jnp.float32)


def kernel(a_ref, sa_ref, b_ref, sb_ref, o_ref, *, bk, qk, nk, mode, magic, pipe=False):
    bm, bn = o_ref.shape
    g = bk // qk

    def body(i, carry):
        acc, ssum = carry
        for j in range(g):
            kk = i * bk + j * qk
            p = lax.dot_general(a_ref[:, pl.ds(kk, qk)], b_ref[:, pl.ds(kk, qk)], NT,
                                preferred_element_type=jnp.int32)
            gi = i * g + j
            if mode == "row":
                s = sa_ref[:, gi][:, None]
            elif mode == "sq":
                s = sa_ref[0, gi] * sb_ref[0, gi]
            else:
                s = sa_ref[:, gi][:, None] * sb_ref[:, gi][None, :]
            acc = acc + _to_f32(p, magic) * s
            ssum = ssum + s
        return acc, ssum

    if pipe:
        # Software-pipelined by hand: issue the MMA of group i, then rescale group i - 1's partial, so the
        # CUDA-core rescale has no data dependency on the tensor-core work in flight.
        assert g == 1 and mode in ("row", "sq")

        def scale_of(gi):
            return sa_ref[:, gi][:, None] if mode == "row" else sa_ref[0, gi] * sb_ref[0, gi]

        def pbody(i, carry):
            acc, p_prev = carry
            p = lax.dot_general(a_ref[:, pl.ds(i * bk, bk)], b_ref[:, pl.ds(i * bk, bk)], NT,
                                preferred_element_type=jnp.int32)
            acc = acc + p_prev.astype(jnp.float32) * scale_of(jnp.maximum(i - 1, 0))
            return acc, p

        zero = jnp.zeros((bm, bn), jnp.int32)
        acc, p_last = lax.fori_loop(0, nk, pbody, (jnp.zeros((bm, bn), jnp.float32), zero))
        acc = acc + p_last.astype(jnp.float32) * scale_of(nk - 1)
        if mode == "row":
            acc = acc * sb_ref[:, 0][None, :]
        o_ref[...] = acc.astype(o_ref.dtype)
        return

    if mode == "none":
        def ibody(i, acc):
            return acc + lax.dot_general(a_ref[:, pl.ds(i * bk, bk)], b_ref[:, pl.ds(i * bk, bk)], NT,
                                         preferred_element_type=jnp.int32)
        acc = lax.fori_loop(0, nk, ibody, jnp.zeros((bm, bn), jnp.int32))
        out = acc.astype(jnp.float32) * sa_ref[:, 0][:, None] * sb_ref[:, 0][None, :]
    else:
        ssum0 = jnp.zeros((bm, bn) if mode == "two" else ((bm, 1) if mode == "row" else ()), jnp.float32)
        acc, ssum = lax.fori_loop(0, nk, body, (jnp.zeros((bm, bn), jnp.float32), ssum0))
        if magic:
            acc = acc - MAGIC_F * ssum
        if mode == "row":
            acc = acc * sb_ref[:, 0][None, :]
        out = acc
    o_ref[...] = out.astype(o_ref.dtype)


def _call(a, sa, b, sb, mode, magic, qk, bk, bm, bn, warps, stages, pipe=False):
    m, k = a.shape
    n = b.shape[0]
    # "sq" scales are one row per 128-row block: a (1, groups) block indexed by the program's block.
    sa_rows = 1 if mode == "sq" else bm
    sb_rows = 1 if mode == "sq" else bn
    return pl.pallas_call(
        functools.partial(kernel, bk=bk, qk=qk, nk=k // bk, mode=mode, magic=magic, pipe=pipe),
        out_shape=jax.ShapeDtypeStruct((m, n), jnp.bfloat16),
        grid=(m // bm, n // bn),
        in_specs=[pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
                  pl.BlockSpec((sa_rows, sa.shape[1]), lambda i, j: (i, 0)),
                  pl.BlockSpec((bn, k), lambda i, j: (j, 0)),
                  pl.BlockSpec((sb_rows, sb.shape[1]), lambda i, j: (j, 0))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=compiler_params(warps, stages),
        interpret=INTERPRET,
    )(a, sa, b, sb)


def bench(f, args_list):
    for args in args_list:
        jax.block_until_ready(f(*args))
    ts = []
    for it in range(ITERS):
        args = args_list[it % len(args_list)]
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    n = N
    print("jax", jax.__version__, jax.devices(), flush=True)
    keys = jax.random.split(jax.random.key(0), 4)
    sets = []
    for s in range(2):
        a8 = jax.random.randint(keys[2 * s], (n, n), -127, 128, jnp.int32).astype(jnp.int8)
        b8 = jax.random.randint(keys[2 * s + 1], (n, n), -127, 128, jnp.int32).astype(jnp.int8)
        sets.append((a8, b8))
    abf = jax.random.normal(keys[0], (n, n), jnp.bfloat16)
    bbf = jax.random.normal(keys[1], (n, n), jnp.bfloat16)
    flops = 2 * n**3
    rows = []

    def rel(o, ref):
        return f"err={float(jnp.linalg.norm(o.astype(jnp.float32) - ref) / jnp.linalg.norm(ref)):.1e}"

    def add(name, f, args_list, check=None):
        try:
            t = bench(f, args_list)
            err = check(f(*args_list[0])) if check else ""
            rows.append(dict(variant=name, ms=t * 1e3, tops=flops / t / 1e12, err=err))
            print(f"{name:55s} {t * 1e3:8.3f} ms {flops / t / 1e12:7.1f} TOP/s {err}", flush=True)
        except Exception as e:  # a variant that fails to lower is a result too
            print("FAIL", name, type(e).__name__, str(e)[:300], flush=True)

    add("xla bf16 x@w", jax.jit(lambda x, y: x @ y), [(abf, bbf), (bbf, abf)])
    add("xla int8 NT s32", jax.jit(lambda x, y: lax.dot_general(x, y, NT, preferred_element_type=jnp.int32)),
        sets)
    tiles = [(128, 128, 8, 3), (256, 128, 8, 3), (128, 256, 8, 3)]
    if INTERPRET:
        tiles = [(64, 64, 4, 2)]
    for qk in () if os.environ.get("ONLY_PIPE") else (32, 64, 128, 256):
        if qk > n:
            continue
        kg = n // qk
        sa = jax.random.uniform(keys[0], (n, kg), jnp.float32, 0.5, 1.5)
        sb = jax.random.uniform(keys[1], (n, kg), jnp.float32, 0.5, 1.5)
        a8, b8 = sets[0]
        af = (a8.astype(jnp.float32).reshape(n, kg, qk) * sa[:, :, None]).reshape(n, n)
        bf = (b8.astype(jnp.float32).reshape(n, kg, qk) * sb[:, :, None]).reshape(n, n)
        ref2 = lax.dot_general(af, bf, NT, precision=lax.Precision.HIGHEST)

        for mode in ("row", "sq", "two") if qk < 256 else ("row", "sq"):
            if mode == "sq":
                sa_m = jnp.repeat(sa[::qk], qk, axis=0)[:n]
                sb_m = jnp.repeat(sb[::qk], qk, axis=0)[:n]
                saq, sbq = sa[::qk], sb[::qk]
                afm = (a8.astype(jnp.float32).reshape(n, kg, qk) * sa_m[:, :, None]).reshape(n, n)
                bfm = (b8.astype(jnp.float32).reshape(n, kg, qk) * sb_m[:, :, None]).reshape(n, n)
                ref = lax.dot_general(afm, bfm, NT, precision=lax.Precision.HIGHEST)
                args = [(s[0], saq, s[1], sbq) for s in sets]
            elif mode == "row":
                sbc = sb[:, :1]
                bfc = b8.astype(jnp.float32) * sbc
                ref = lax.dot_general(af, bfc, NT, precision=lax.Precision.HIGHEST)
                args = [(s[0], sa, s[1], sbc) for s in sets]
            else:
                ref = ref2
                args = [(s[0], sa, s[1], sb) for s in sets]
            for magic in (False, True):
                for bm, bn, w, st in tiles:
                    if mode == "sq" and (bm != qk or bn != qk) and not INTERPRET:
                        if not (bm == 128 and bn == 128):
                            continue
                    if mode == "sq" and not INTERPRET and qk != 128:
                        continue
                    bk = max(qk, 64) if qk < 64 else qk
                    if bk > 128 and bm * bn > 128 * 128:
                        continue
                    f = jax.jit(functools.partial(_call, mode=mode, magic=magic, qk=qk, bk=bk, bm=bm, bn=bn,
                                                  warps=w, stages=st))
                    add(f"{mode}/{'magic' if magic else 'cvt'} qk={qk} bk={bk} {bm}x{bn} w{w} s{st}", f, args,
                        check=lambda o, ref=ref: rel(o, ref))
    # Hand-pipelined rescale (MMA of group i overlaps the rescale of group i - 1).
    for qk in (64, 128, 256):
        if qk > n:
            continue
        kg = n // qk
        sa = jax.random.uniform(keys[0], (n, kg), jnp.float32, 0.5, 1.5)
        sb = jax.random.uniform(keys[1], (n, kg), jnp.float32, 0.5, 1.5)
        a8, b8 = sets[0]
        for mode in ("row", "sq"):
            if mode == "sq" and (INTERPRET or qk != 128):
                continue
            if mode == "row":
                sbc = sb[:, :1]
                af = (a8.astype(jnp.float32).reshape(n, kg, qk) * sa[:, :, None]).reshape(n, n)
                ref = lax.dot_general(af, b8.astype(jnp.float32) * sbc, NT, precision=lax.Precision.HIGHEST)
                args = [(s[0], sa, s[1], sbc) for s in sets]
            else:
                sa_m = jnp.repeat(sa[::qk], qk, axis=0)[:n]
                sb_m = jnp.repeat(sb[::qk], qk, axis=0)[:n]
                afm = (a8.astype(jnp.float32).reshape(n, kg, qk) * sa_m[:, :, None]).reshape(n, n)
                bfm = (b8.astype(jnp.float32).reshape(n, kg, qk) * sb_m[:, :, None]).reshape(n, n)
                ref = lax.dot_general(afm, bfm, NT, precision=lax.Precision.HIGHEST)
                args = [(s[0], sa[::qk], s[1], sb[::qk]) for s in sets]
            for bm, bn, w, st in tiles:
                if qk > 128 and bm * bn > 128 * 128:
                    continue
                if mode == "sq" and (bm, bn) != (128, 128):
                    continue
                f = jax.jit(functools.partial(_call, mode=mode, magic=False, qk=qk, bk=qk, bm=bm, bn=bn,
                                              warps=w, stages=st, pipe=True))
                name = f"{mode}/pipe qk={qk} {bm}x{bn} w{w} s{st}"
                add(name, f, args, check=lambda o, ref=ref: rel(o, ref))

    # Upper bound: no rescale in the loop.
    for bm, bn, w, st in tiles:
        sa1 = jnp.ones((n, 1), jnp.float32)
        bk = 64 if INTERPRET else 128
        f = jax.jit(functools.partial(_call, mode="none", magic=False, qk=128, bk=bk,
                                      bm=bm, bn=bn, warps=w, stages=st))
        add(f"none bk=128 {bm}x{bn} w{w} s{st}", f, [(s[0], sa1, s[1], sa1) for s in sets])
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "probe_rescale.json"), "w") as fh:
            json.dump(dict(n=n, jax=jax.__version__, device=str(jax.devices()[0]), rows=rows), fh, indent=1)
    print("\n| variant | ms | TOP/s | err |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['variant']} | {r['ms']:.3f} | {r['tops']:.0f} | {r['err']} |")


if __name__ == "__main__":
    main()
