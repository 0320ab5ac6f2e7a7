"""Decode-size (M = 1) quantizing producers: LayerNorm + quantize and GELU + quantize, by warp count.

    PYTHONPATH=. python3 benchmarks/decode_producers.py              # H100
    PYTHONPATH=. python3 benchmarks/decode_producers.py --quick      # CPU smoke (interpret mode)

At batch-1 decode every producer is one row, so the kernel is one program on one SM and its time is the
latency of that program, not bandwidth: the warps per program decide it. Per row width (GPT-2 1.5B: 1600 for
LayerNorm, 6400 for GELU) this times ``layer_norm_quantize`` and ``bias_gelu_quantize`` (per-token INT8) at
each ``num_warps`` inside one device loop (:func:`pallas_kernels.autotune.time_in_loop`), beside the same
math in XLA (reference functions, jitted). Each call first adds the loop-carried input to a fresh weight
row (so nothing is hoisted out of the loop): that add is a kernel of its own before the Pallas op, and
fused into the XLA one, so the XLA column is flattered by about one launch.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp

from jq8.quant import QuantSpec
from pallas_kernels import autotune
from pallas_kernels.gelu_quantize import bias_gelu_quantize, bias_gelu_quantize_reference
from pallas_kernels.norm_quantize import layer_norm_quantize, layer_norm_quantize_reference
from pallas_kernels.quantize import QuantizeConfig

SPEC = QuantSpec((1, -1))  # per token


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="1600,6400,768,3072")
    ap.add_argument("--warps", default="default,2,4,8,16")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.widths, args.warps, args.reps, args.iters = "256", "default,4", 1, 1
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    rows = []
    for n in (int(v) for v in args.widths.split(",")):
        xs = [jax.random.normal(jax.random.key(i), (1, n), jnp.bfloat16) for i in range(4)]
        gamma = jax.random.normal(jax.random.key(10), (n,)) * 0.1 + 1
        beta = jax.random.normal(jax.random.key(11), (n,)) * 0.1
        bias = jax.random.normal(jax.random.key(12), (n,)) * 0.1
        ops = {
            "layer_norm_quantize": (layer_norm_quantize, layer_norm_quantize_reference, (gamma, beta)),
            "bias_gelu_quantize": (bias_gelu_quantize, bias_gelu_quantize_reference, (bias,)),
        }
        for name, (kernel, reference, extra) in ops.items():

            def xla(x, w, reference=reference, extra=extra):
                out = reference(x + w, *extra, spec=SPEC)
                return (out[0] if isinstance(out, tuple) else out).values

            loop = dict(reps=args.reps, iters=args.iters)
            t_xla = autotune.time_in_loop(xla, xs[0], xs, **loop)
            print(f"\n== {name} (1, {n}): XLA {t_xla * 1e6:.2f} us", flush=True)
            row = dict(op=name, n=n, xla_us=t_xla * 1e6, pallas={})
            for warps in args.warps.split(","):
                cfg = QuantizeConfig(num_warps=None if warps == "default" else int(warps))

                def call(x, w, kernel=kernel, extra=extra, cfg=cfg):
                    out = kernel(x + w, *extra, spec=SPEC, config=cfg)
                    return (out[0] if isinstance(out, tuple) else out).values

                t = autotune.time_in_loop(call, xs[0], xs, **loop)
                row["pallas"][warps] = t * 1e6
                print(f"  warps {warps:>7s}: {t * 1e6:6.2f} us  (x{t_xla / t:4.2f} XLA)", flush=True)
            rows.append(row)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "decode_producers.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
