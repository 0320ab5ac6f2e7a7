"""Decode-size (M = 1) quantizing producers: LayerNorm + quantize and GELU + quantize, by warp count.

    PYTHONPATH=. python3 benchmarks/decode_producers.py              # H100
    PYTHONPATH=. python3 benchmarks/decode_producers.py --quick      # CPU smoke (interpret mode)

At batch-1 decode every producer is one row, so the kernel is one program on one SM and its time is the
latency of that program, not bandwidth: the warps per program decide it. Per row width (GPT-2 1.5B: 1600 for
LayerNorm, 6400 for GELU) this times ``layer_norm_quantize`` and ``bias_gelu_quantize`` (per-token INT8) at
each ``num_warps`` by the device time of its kernels in a profiler trace (one call is shorter than its
launch, so wall clocks measure the host), beside the same math in XLA (reference functions, jitted).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from profile_decode import device_profile  # noqa: E402

from jq8.quant import QuantSpec  # noqa: E402
from pallas_kernels.gelu_quantize import bias_gelu_quantize, bias_gelu_quantize_reference  # noqa: E402
from pallas_kernels.norm_quantize import layer_norm_quantize, layer_norm_quantize_reference  # noqa: E402
from pallas_kernels.quantize import QuantizeConfig  # noqa: E402

SPEC = QuantSpec((1, -1))  # per token


def device_us(fn, x, calls: int) -> float:
    """Device time per call of ``fn(x)`` (all its kernels; busiest line), from a profiler trace."""
    jax.block_until_ready(fn(x))
    return device_profile(fn, (x,), calls)["device_ms"] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="1600,6400,768,3072")
    ap.add_argument("--warps", default="default,2,4,8,16")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--json",
        metavar="PATH",
        help="write the results as JSON to PATH (default: $OUT/decode_producers.json when OUT is set)",
    )
    args = ap.parse_args()
    if args.quick:
        args.widths, args.warps, args.calls = "256", "default,4", 2
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    rows = []
    for n in (int(v) for v in args.widths.split(",")):
        x = jax.random.normal(jax.random.key(0), (1, n), jnp.bfloat16)
        gamma = jax.random.normal(jax.random.key(10), (n,)) * 0.1 + 1
        beta = jax.random.normal(jax.random.key(11), (n,)) * 0.1
        bias = jax.random.normal(jax.random.key(12), (n,)) * 0.1
        ops = {
            "layer_norm_quantize": (layer_norm_quantize, layer_norm_quantize_reference, (gamma, beta)),
            "bias_gelu_quantize": (bias_gelu_quantize, bias_gelu_quantize_reference, (bias,)),
        }
        for name, (kernel, reference, extra) in ops.items():
            t_xla = device_us(jax.jit(lambda x, f=reference, e=extra: f(x, *e, spec=SPEC)), x, args.calls)
            print(f"\n== {name} (1, {n}): XLA {t_xla:.2f} us", flush=True)
            row = dict(op=name, n=n, xla_us=t_xla, pallas={})
            for warps in args.warps.split(","):
                cfg = QuantizeConfig(num_warps=None if warps == "default" else int(warps))
                fn = jax.jit(lambda x, f=kernel, e=extra, c=cfg: f(x, *e, spec=SPEC, config=c))
                t = device_us(fn, x, args.calls)
                row["pallas"][warps] = t
                print(f"  warps {warps:>7s}: {t:6.2f} us  (x{t_xla / t:4.2f} XLA)", flush=True)
            rows.append(row)
    path = args.json or (os.path.join(os.environ["OUT"], "decode_producers.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
