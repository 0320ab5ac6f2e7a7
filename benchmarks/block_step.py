"""Forward + backward of one transformer block (or its MLP branch), bf16 vs Jetfire INT8, same run.

``--family gpt`` (default): LayerNorm, GELU MLP of 4 d, learned-position-free attention with biases.
``--family llama``: RMSNorm, SwiGLU MLP of 8/3 d rounded up to 256 (LLaMA-7B's 11008 at d = 4096), rotary
attention, no biases.

    PYTHONPATH=. python3 benchmarks/block_step.py           # GPU: hidden 1024 and 4096, 16384 tokens
    PYTHONPATH=. python3 benchmarks/block_step.py --tiny    # CPU smoke test (tiny shapes)
    ... --hidden 4096 --parts block --policies bf16 jetfire-int8 --block 128    # one slice (10-min limit)

For each width and policy it jits grad(loss) over the block's parameters and input, checks the INT8
gradients against the bf16 ones (relative error per parameter, max reported), then times the step
(median of ``--iters`` after warm-up) and reports peak memory: XLA's compiled memory analysis (temp +
arguments + outputs) and, on GPU, the allocator's peak_bytes_in_use. Writes ``$OUT/block_step.json`` when
``OUT`` is set and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jq8.training.nn import AttentionBlock, MlpBlock
from jq8.training.policy import Policy, parse_policy

DEFAULT_POLICIES = ["bf16", "jetfire-int8", "int8-row"]


def mlp_width(family: str, d: int) -> int:
    return 4 * d if family == "gpt" else -(-8 * d // 3 // 256) * 256


class Block(nn.Module):
    """GPT or LLaMA block: x + attn(x), then + mlp(x); or the MLP branch alone (part="mlp")."""

    policy: Policy
    heads: int
    part: str = "block"
    attention: str = "auto"  # AttentionBlock.implementation: auto (cuDNN flash on GPU) | xla | cudnn
    family: str = "gpt"

    @nn.compact
    def __call__(self, x):
        # Each branch adds its own residual, as models/gpt.py's DecoderBlock (what train.py runs) does: the
        # INT8 ops then add it in a GEMM epilogue and its gradient in the LayerNorm backward.
        llama = self.family == "llama"
        norm = "rmsnorm" if llama else "layernorm"
        if self.part == "block":
            attn = AttentionBlock(self.heads, self.policy, norm=norm, rotary=llama, implementation=self.attention,
                                  name="attn")  # fmt: skip
            x = attn(x, residual=x)
        mlp = MlpBlock(mlp_width(self.family, x.shape[-1]), self.policy, activation="swiglu" if llama else "gelu",
                       norm=norm, name="mlp")  # fmt: skip
        return mlp(x, residual=x)


def peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def compiled_bytes(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
        return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:  # not every backend reports it
        return None


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def max_grad_err(grads, want) -> tuple[float, str]:
    errs = {jax.tree_util.keystr(p): rel(a, b)
            for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want))}
    worst = max(errs, key=errs.get)
    return errs[worst], worst


def time_step(step, params, x, key, iters: int):
    """Compile ``step(params, x, key)`` and time it -> (compiled, first output, compile s, per-call ms
    synchronised (one per key), per-call ms back to back (median-ready list of 3 rounds))."""
    t0 = time.perf_counter()
    compiled = step.lower(params, x, key).compile()
    compile_s = time.perf_counter() - t0
    out = compiled(params, x, key)
    jax.block_until_ready(out)
    for _ in range(2):
        jax.block_until_ready(compiled(params, x, key))
    keys = [jax.random.fold_in(key, i) for i in range(iters)]  # outside the timed region
    times = []
    for k in keys:
        t = time.perf_counter()
        jax.block_until_ready(compiled(params, x, k))
        times.append((time.perf_counter() - t) * 1e3)
    # Back to back, as train.py runs its steps: the host enqueues step i+1 while the device runs step i, so
    # the per-call host lead (dispatch to first kernel) is hidden. Rounds of ``iters`` steps.
    rounds = []
    for _ in range(3):
        t = time.perf_counter()
        outs = [compiled(params, x, k) for k in keys]
        jax.block_until_ready(outs)
        rounds.append((time.perf_counter() - t) * 1e3 / len(keys))
        del outs
    return compiled, out, compile_s, times, rounds


def run_case(hidden: int, tokens: int, seq: int, part: str, policy_name: str, iters: int, use_kernels: bool,
             block: tuple[int, int] | None, check_reference: bool, attention: str = "auto", family: str = "gpt"):
    policy = parse_policy(policy_name, backend="pallas" if use_kernels else "xla")
    if block is not None and policy.granularity == "block" and "block=" not in policy_name:
        policy = dataclasses.replace(policy, block=block)
    heads = max(1, hidden // 64)
    x = jax.random.normal(jax.random.PRNGKey(0), (tokens // seq, seq, hidden), jnp.float32)
    probe = jax.random.normal(jax.random.PRNGKey(1), x.shape, jnp.float32)
    params = jax.jit(Block(Policy(), heads, part, attention, family).init)(jax.random.PRNGKey(2), x)["params"]

    def make_loss(policy):
        def loss(params, x, key):
            y = Block(policy, heads, part, attention, family).apply({"params": params}, x, rngs={"quant": key})
            return jnp.sum((y - x) * probe)
        return loss

    loss = make_loss(policy)
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    # Bytes autodiff keeps for the backward (the vjp closure's arrays: activations + weight copies).
    residuals = jax.eval_shape(lambda p, x, k: jax.vjp(lambda p, x: loss(p, x, k), p, x)[1], params, x,
                               jax.random.PRNGKey(0))
    residual_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(residuals))
    key = jax.random.PRNGKey(3)
    compiled, out, compile_s, times, rounds = time_step(step, params, x, key, iters)
    row = dict(hidden=hidden, tokens=tokens, part=part, family=family, policy=policy_name,
               tiles=[list(t) for t in policy.tiles], attention=attention, median_ms=statistics.median(times),
               min_ms=min(times),
               back_to_back_ms=statistics.median(rounds),
               compile_s=compile_s,
               compiled_bytes=compiled_bytes(compiled), peak_bytes=peak_bytes(),
               residual_bytes=residual_bytes)
    if check_reference and policy.int8 and use_kernels:
        # Same step through the kernels' jnp references, same key (so the same stochastic-rounding noise):
        # differences come only from accumulation order and the requantizations it flips.
        ref = dataclasses.replace(policy, backend="xla")
        ref_step = jax.jit(jax.value_and_grad(make_loss(ref), argnums=(0, 1)))
        _, ref_grads = ref_step(params, x, key)
        row["kernel_vs_reference_err"], row["kernel_vs_reference_worst"] = max_grad_err(out[1], ref_grads)
        # Yardstick: how far the reference moves between two stochastic-rounding keys. A kernel-vs-
        # reference gap inside that spread is rounding noise (ties flipped by accumulation order), not a bug.
        _, other = ref_step(params, x, jax.random.fold_in(key, 10**6))
        row["reference_key_spread"] = max_grad_err(other, ref_grads)[0]
        limit = max(2e-2, row["reference_key_spread"])
        row["kernel_check"] = "ok" if row["kernel_vs_reference_err"] <= limit else "FAIL"
    return out, row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--parts", nargs="+", default=["mlp", "block"], choices=["mlp", "block"])
    ap.add_argument("--family", default="gpt", choices=["gpt", "llama"],
                    help="gpt: LayerNorm + GELU; llama: RMSNorm + SwiGLU + rotary, no biases")
    ap.add_argument("--policies", nargs="+", default=DEFAULT_POLICIES,
                    help="policy spec strings (jq8.training.policy.parse_policy), e.g. bf16 jetfire-int8 int8-row "
                    "jetfire-int8:block=64 'jetfire-int8:int8_grad_input=false,int8_grad_weight=false'")
    ap.add_argument("--block", type=int, default=None,
                    help="square INT8 block of block policies that name none (default: each policy's own)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn"],
                    help="attention core (auto: cuDNN flash attention on GPU for bf16)")
    ap.add_argument("--reference", action="store_true", help="jnp references instead of Pallas kernels")
    ap.add_argument("--check-hidden", type=int, default=1024,
                    help="compare kernel gradients with the jnp-reference step for widths up to this")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: hidden 64, 96 tokens, 2 iters")
    ap.add_argument(
        "--json",
        metavar="PATH",
        help="write the results as JSON to PATH (default: $OUT/block_step.json when OUT is set)",
    )
    args = ap.parse_args()
    if args.tiny:
        args.hidden, args.tokens, args.seq, args.iters = [64], 96, 48, 2
        args.reference = True
        args.policies = list(DEFAULT_POLICIES)
    use_kernels = not args.reference
    ops = 'Pallas kernels' if use_kernels else 'jnp references'
    print(f"device: {jax.devices()[0].device_kind}; INT8 ops: {ops}")
    rows = []
    for hidden in args.hidden:
        for part in args.parts:
            base = None
            for pname in args.policies:
                (lv, grads), row = run_case(hidden, args.tokens, args.seq, part, pname, args.iters,
                                            use_kernels, args.block and (args.block, args.block),
                                            hidden <= args.check_hidden, args.attention, args.family)
                if base is None:
                    base = (lv, grads, row)
                else:
                    row["max_grad_rel_err_vs_first"], row["worst_param"] = max_grad_err(grads, base[1])
                    row["loss_rel_err_vs_first"] = abs(float(lv - base[0])) / abs(float(base[0]))
                    row["speedup_vs_first"] = base[2]["median_ms"] / row["median_ms"]
                    row["back_to_back_speedup_vs_first"] = base[2]["back_to_back_ms"] / row["back_to_back_ms"]
                    if base[2]["compiled_bytes"] and row["compiled_bytes"]:
                        row["memory_ratio_vs_first"] = base[2]["compiled_bytes"] / row["compiled_bytes"]
                    row["residual_ratio_vs_first"] = base[2]["residual_bytes"] / row["residual_bytes"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    path = args.json or (os.path.join(os.environ["OUT"], "block_step.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as f:
            json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows), f, indent=1)
    mib = lambda b: f"{b / 2**20:9.1f}" if b else "        -"
    print(f"\n{'hidden':>6} {'part':>5} {'policy':>14} {'median ms':>10} {'speedup':>8} {'b2b ms':>8} "
          f"{'b2b x':>6} {'mem MiB':>9} {'mem x':>6} {'saved MiB':>9} {'saved x':>7} {'grad err':>9} "
          f"{'kernel':>7}")
    for r in rows:
        print(f"{r['hidden']:>6} {r['part']:>5} {r['policy']:>14} {r['median_ms']:10.3f} "
              f"{r.get('speedup_vs_first', 1.0):8.2f} {r['back_to_back_ms']:8.3f} "
              f"{r.get('back_to_back_speedup_vs_first', 1.0):6.2f} {mib(r['compiled_bytes'])} "
              f"{r.get('memory_ratio_vs_first', 1.0):6.2f} {mib(r['residual_bytes'])} "
              f"{r.get('residual_ratio_vs_first', 1.0):7.2f} {r.get('max_grad_rel_err_vs_first', 0.0):9.4f} "
              f"{r.get('kernel_check', '-'):>7}")
    print("median ms: one step, synchronised; b2b ms: per step when steps are enqueued back to back (as "
          "train.py runs them). speedup, b2b x, mem x, saved x: first policy / this. mem: XLA compiled peak "
          "(args + temps + outputs); "
          "saved: bytes kept for the backward; grad err: max over parameters of |g - g_first| / |g_first|; "
          "kernel: INT8 step through Pallas kernels vs their jnp references (same noise), ok within the "
          "references' own spread between two rounding keys (or 2%)")


if __name__ == "__main__":
    main()
