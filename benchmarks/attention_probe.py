"""Attention core alone: XLA vs cuDNN flash attention (``jax.nn.dot_product_attention``), bf16, causal.

    PYTHONPATH=. python3 benchmarks/attention_probe.py       # GPU

Per shape (batch, tokens, heads, head_dim): forward and forward+backward (grad of the sum w.r.t. q, k, v)
median ms of 20 after warm-up, XLA's compiled temporary memory of the backward, and the largest output
difference between the two implementations. "xla" materialises the T x T probabilities (and keeps them for
the backward); "cudnn" does not. This is what ``AttentionBlock(implementation="auto")`` picks between.
"""

import statistics
import time

import jax
import jax.numpy as jnp


def t(fn, *a, n=20):
    for _ in range(3):
        jax.block_until_ready(fn(*a))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*a))
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def main() -> None:
    for b, s, h, d in [(16, 1024, 12, 64), (16, 1024, 64, 64), (16, 1024, 25, 64)]:
        ks = jax.random.split(jax.random.key(0), 3)
        q, k, v = [jax.random.normal(kk, (b, s, h, d), jnp.bfloat16) for kk in ks]
        res = {}
        for impl in ["xla", "cudnn"]:
            try:

                def f(q, k, v, impl=impl):
                    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)

                fwd = jax.jit(f)
                g = jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v).astype(jnp.float32)), (0, 1, 2)))
                o = fwd(q, k, v)
                mem = g.lower(q, k, v).compile().memory_analysis()
                res[impl] = dict(
                    fwd=t(fwd, q, k, v),
                    fwdbwd=t(g, q, k, v),
                    temp_gb=getattr(mem, "temp_size_in_bytes", 0) / 2**30,
                    out=o,
                )
            except Exception as e:  # noqa: BLE001 - report an implementation that does not run here
                res[impl] = dict(err=repr(e)[:300])
        if "out" in res["xla"] and "out" in res.get("cudnn", {}):
            diff = res["xla"]["out"].astype(jnp.float32) - res["cudnn"]["out"].astype(jnp.float32)
            err = float(jnp.max(jnp.abs(diff)))
        else:
            err = None
        for r in res.values():
            r.pop("out", None)
        print((b, s, h, d), res, "maxdiff", err, flush=True)


if __name__ == "__main__":
    main()
