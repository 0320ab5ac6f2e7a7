"""Where does the INT4 decode GEMV lose its time? The in-kernel nibble interleave vs a half-split layout.

    PYTHONPATH=. python3 benchmarks/int4_probe.py            # H100
    PYTHONPATH=. python3 benchmarks/int4_probe.py --quick    # CPU smoke (interpret mode)

INT4 decode GEMVs stream about 0.5 TB/s of packed bytes where INT8 streams 2 TB/s (BENCHMARKS.md, session
3). Today's packing puts K columns 2i and 2i+1 in one byte, so the kernel sign-extends both nibbles and
interleaves them back into a (bn, bk) tile (a join + reshape: a register shuffle through shared memory)
before the MMA. A *half-split* packing puts K columns i and P/2 + i of each P-column block in one byte: the
two nibble planes are then two contiguous halves of the block, each multiplied by its own contiguous half
of the activation, with no interleave. Both nibbles are used as 16x their code, exactly, without any shift
back (``b << 4`` and ``b & 0xF0`` read as int8), and the int32 sum is shifted right by 4 at the end.

Per case (N x K, per-channel scales, M = 1) this times, in one device loop over weights that overflow L2:
XLA bf16, the INT8 decode kernel, today's INT4 decode kernel, and the half-split probe kernel at P = 64,
128, 256 (the K width of each pair of dots: P / 2).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import autotune
from pallas_kernels import int8_matmul_decode as dec
from pallas_kernels._common import cdiv, compiler_params, resolve_interpret
from pallas_kernels.int8_matmul import _store, int_dot, load_k_tile


def pack_half_split(codes: jax.Array, p: int) -> jax.Array:
    """(N, K) int8 codes in [-8, 7], K % p == 0 -> (N, K/2) uint8: byte i of each p-block holds columns i
    (low nibble) and p/2 + i (high nibble) of the block."""
    n, k = codes.shape
    u = (codes.astype(jnp.int32) & 0xF).reshape(n, k // p, 2, p // 2)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).astype(jnp.uint8).reshape(n, k // 2)


def _half_kernel(a_ref, b_ref, o_ref, *, p: int, bn: int, steps: int, m: int, unroll: bool):
    pid_n, s = pl.program_id(0), pl.program_id(1)
    col0 = pl.multiple_of(pid_n * bn, bn)
    rows = jnp.arange(16) < m
    half = p // 2

    def one(i, acc):
        k0 = (s * steps + i) * p
        packed = b_ref[pl.ds(col0, bn), pl.ds(pl.multiple_of(k0 // 2, half), half)]
        sb = lax.bitcast_convert_type(packed, jnp.int8)
        lo16 = lax.shift_left(sb, jnp.int8(4))  # 16 x the low code, exact in int8
        hi16 = lax.bitwise_and(sb, jnp.int8(-16))  # 16 x the high code
        a_lo = load_k_tile(a_ref, 0, 16, k0, half, row_mask=rows, k_valid=None)
        a_hi = load_k_tile(a_ref, 0, 16, k0 + half, half, row_mask=rows, k_valid=None)
        return acc + int_dot(a_lo, lo16) + int_dot(a_hi, hi16)

    acc = jnp.zeros((16, bn), jnp.int32)
    if unroll:
        for i in range(steps):
            acc = one(i, acc)
    else:
        acc = lax.fori_loop(0, steps, one, acc)
    acc = lax.shift_right_arithmetic(acc, jnp.int32(4))  # every product is a multiple of 16: exact
    _store(o_ref.at[s, pl.ds(0, 16), pl.ds(col0, bn)], acc, rows[:, None])


@functools.partial(jax.jit, static_argnames=("p", "bn", "split", "warps", "stages", "unroll", "interpret"))
def half_split_gemv(a, b, sa, sb, *, p, bn, split, warps=4, stages=4, unroll=False, interpret=None):
    """a (M<=16, K) int8, b (N, K/2) half-split packed, sa (M, 1), sb (1, N) -> (M, N) bf16."""
    m, k = a.shape
    n = b.shape[0]
    blocks = k // p
    if k % p or blocks % split or n % bn:
        raise ValueError(f"probe needs K % p == 0, (K/p) % split == 0, N % bn == 0: {k=} {p=} {split=} {n=}")
    parts = pl.pallas_call(
        functools.partial(_half_kernel, p=p, bn=bn, steps=blocks // split, m=m, unroll=unroll),
        grid=(n // bn, split),
        out_shape=jax.ShapeDtypeStruct((split, m, n), jnp.int32),
        compiler_params=compiler_params(warps, stages),
        interpret=resolve_interpret(interpret),
        name="int4_half_split_gemv",
    )(a, b)
    y = jnp.sum(parts, axis=0).astype(jnp.float32) * sa * sb
    return y.astype(jnp.bfloat16)


def weights(n, k, bits, count, layout):
    out = []
    for i in range(count):
        kb, ks = jax.random.split(jax.random.key(i + 1))
        lo, hi = (-8, 8) if bits == 4 else (-127, 128)
        codes = jax.random.randint(kb, (n, k), lo, hi, jnp.int32).astype(jnp.int8)
        sb = jax.random.uniform(ks, (1, n), jnp.float32, 1e-3, 2e-3)
        if bits == 8:
            packed = codes
        elif layout == "pairs":
            from jq8.quant import pack_int4

            packed = pack_int4(codes)
        else:
            packed = pack_half_split(codes, layout)
        out.append((packed, sb, codes))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="6400x1600,1600x6400,3072x768,768x3072")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--budget", type=float, default=400.0, help="seconds before remaining cases are skipped")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.cases, args.reps, args.iters = "64x256", 1, 1
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    loop = dict(reps=args.reps, iters=args.iters)
    rows = []
    sa = jnp.full((1, 1), 1e-2, jnp.float32)
    deadline = time.time() + args.budget
    for case in args.cases.split(","):
        if time.time() > deadline:
            print(f"skipped {case}: time budget", flush=True)
            continue
        n, k = (int(v) for v in case.split("x"))
        count = 2 if args.quick else max(2, min(16, cdiv(128 << 20, n * k // 2)))
        a = jax.random.randint(jax.random.key(99), (1, k), -127, 128, jnp.int32).astype(jnp.int8)
        ws16 = [jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) for i in range(count)]
        t16 = autotune.time_in_loop(lambda x, w: x.astype(jnp.bfloat16) @ w, a, ws16, **loop)
        print(f"\n== {n}x{k}: INT4 {n * k / 2e6:.2f} MB; XLA bf16 {t16 * 1e6:.2f} us", flush=True)
        row = dict(n=n, k=k, bf16_us=t16 * 1e6, results=[])

        def report(name, cfg, call, ws, nbytes, row=row, t16=t16, a=a):
            try:
                t = autotune.time_in_loop(call, a, [w[:2] for w in ws], **loop)
            except Exception as e:  # noqa: BLE001 - a variant that does not compile is reported, not fatal
                print(f"  {name:10s} {cfg}: failed {type(e).__name__}: {str(e)[:160]}", flush=True)
                return
            row["results"].append(dict(variant=name, cfg=cfg, us=t * 1e6, gb_s=nbytes / t / 1e9))
            gbs = nbytes / t / 1e9
            print(f"  {name:10s} {t * 1e6:7.2f} us {gbs:6.0f} GB/s x{t16 / t:5.2f}  {cfg}", flush=True)

        ws8 = weights(n, k, 8, count, None)
        wsp = weights(n, k, 4, count, "pairs")
        for bn in (32, 64):
            for split in (1, 2, 4):
                cfg = dec.DecodeConfig(bn, 128, split)
                for name, ws, bits in (("int8", ws8, 8), ("int4-pairs", wsp, 4)):

                    def call(x, w, cfg=cfg, bits=bits):
                        return dec.int8_matmul_decode(x, w[0], sa, w[1], b_bits=bits, config=cfg)

                    report(name, str(cfg), call, ws, n * k * bits // 8)
        for p in (64, 128, 256):
            if k % p:
                continue
            wsh = weights(n, k, 4, count, p)
            # exactness against the int32 reference on one weight
            got = half_split_gemv(a, wsh[0][0], jnp.ones((1, 1)), jnp.ones((1, n)), p=p, bn=32, split=1)
            want = (a.astype(jnp.int32) @ wsh[0][2].astype(jnp.int32).T).astype(jnp.bfloat16)
            ok = bool(jnp.all(got == want))
            print(f"  half-split p={p}: exact vs int32 reference: {ok}", flush=True)
            for bn in (32, 64):
                for split in (1, 2, 4, 5, 8):
                    if (k // p) % split:
                        continue
                    for warps, unroll in ((4, False), (4, True)):
                        if unroll and k // p // split > 8:
                            continue
                        kw = dict(p=p, bn=bn, split=split, warps=warps, unroll=unroll)

                        def call(x, w, kw=kw):
                            return half_split_gemv(x, w[0], sa, w[1], **kw)

                        report(f"half{p}", str(kw), call, wsh, n * k // 2)
        rows.append(row)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "int4_probe.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
