"""ZeroQuant inference speed on GPU: INT8/INT4 (Pallas kernels, fused path) vs a bf16 inference model.

    PYTHONPATH=. python3 benchmarks/ptq_speed.py                         # GPT-2 124M and 1.5B, H100
    PYTHONPATH=. python3 benchmarks/ptq_speed.py --presets gpt2-1.5b     # one preset per call
    PYTHONPATH=. python3 benchmarks/ptq_speed.py --quick                 # CPU smoke (gpt-tiny), < 1 min

Per preset (random-init params; median of --iters after two warm-up calls, block_until_ready):
  * decode proxy: batch 1, one token through the whole model, so every GEMM runs at M = 1. The models have
    no KV cache: this times the per-token weight traffic (attention over a cache is not included). Reported
    as ms/token, tokens/s, the weight bytes one token reads (every GEMM weight + scales, the tied LM head's
    table, one row of the position table) and the implied GB/s;
  * prefill (presets in --prefill-presets only: a 1.5B prefill doubles the compile time): batch x seq
    tokens, W8A8 / W4/8-A8 on the Pallas kernels and on XLA int8 dots, vs bf16; one synchronised call, and
    (``b2b``) per call with --iters calls enqueued back to back, as a server drains a queue of batches;
  * compact checkpoint size vs fp16 (prefill presets only: it writes the checkpoint to disk).
The bf16 baseline is a true bf16 inference model: bf16 params, and its tied LM head (models/gpt.py runs
``wte.attend`` on an fp32 query, which promotes the bf16 table to fp32) is intercepted to run in bf16. The
quantized models are those of the same bf16 checkpoint (:func:`as_bf16_checkpoint`) with the same bf16 query
to the head: bf16 logits from a bf16 head, or from an INT8 GEMM when the scheme quantizes the embeddings
(the table says which).
Every model's parameters are bound to its jitted function with jq8.inference.dispatch.jit_bound (``--dispatch tree``:
passed as the pytree on each call instead).
Correctness before timing: logits vs the bf16 model's (relative RMS error) and Pallas vs the XLA integer
path on the same quantized params, at the decode input. Writes $OUT/ptq_speed_<preset>.json when $OUT is set
and ``--json PATH`` (all presets) when given.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jq8 import ptq
from jq8.inference import decode
from jq8.inference.dispatch import jit_bound
from jq8.ptq import checkpoint as qcheckpoint
from jq8.ptq import infer as ptq_infer
from jq8.training.policy import Policy
from models.presets import build_model, preset

SCHEMES = ("w8a8", "w4/8-a8")
# W4/8-A8 as it keeps a Q4_1 GGUF's 4-bit grid (the real-model accuracy row): INT4 scale + min in K-groups
# of 32, norms not folded, INT8 table. Timed on request (--schemes ... w4/8-a8:scale-min-g32).
SCALE_MIN = "w4/8-a8:scale-min-g32"


def scheme_params(params, scheme: str, int4_group: int):
    """quantize_params for one of SCHEMES or SCALE_MIN."""
    if scheme == SCALE_MIN:
        rules = ptq.scheme("w4/8-a8", int4_group=32, int4_symmetric=False, embedding_bits=8)
        return ptq.quantize_params(params, rules, fold_norms=False)
    return ptq.quantize_params(params, ptq.scheme(scheme, int4_group=int4_group))
BIG_PARAMS = 500e6  # presets above this use --big-iters


def timeit(fn, *args, iters: int) -> float:
    """Median wall time (ms) of fn(*args) after two warm-up calls."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def timeit_back_to_back(fn, *args, iters: int) -> float:
    """Wall ms per call with ``iters`` calls enqueued back to back and one wait at the end (a server's
    queue of prefill batches): the host's per-call lead overlaps the device's work. Median of 3 rounds."""
    jax.block_until_ready(fn(*args))
    rounds = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)  # earlier outputs are dropped: the stream runs in order, the last one waits
        jax.block_until_ready(out)
        rounds.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(rounds)


def bind(fn, params, dispatch: str):
    """fn(params, tokens) as a jitted function of tokens: ``bound`` passes the parameters as a flat leaf
    list (:func:`jq8.inference.dispatch.jit_bound`), ``tree`` as the pytree (``jax.jit(fn)`` with params bound)."""
    if dispatch == "bound":
        return jit_bound(fn, params)
    return functools.partial(jax.jit(fn), params)


def kv_decode_ms(make_apply, weights, model, args, iters: int) -> float:
    """ms per generated token of a real KV-cache decode loop (:func:`jq8.inference.decode.generate`, batch 1): one
    jitted call prefills ``--kv-prompt`` tokens and greedily decodes; the time of ``--kv-steps`` extra
    steps over a 1-step call, divided by ``--kv-steps`` (the prefill cancels)."""
    prompt = jax.random.randint(jax.random.PRNGKey(7), (1, args.kv_prompt), 0, model.config.vocab_size)
    cache = decode.init_cache(model, 1, args.kv_prompt + args.kv_steps)

    def gen(steps):
        return jax.jit(lambda w, c, t: decode.generate(make_apply(w), c, t, steps=steps))

    long, short = gen(args.kv_steps + 1), gen(1)
    return (
        timeit(long, weights, cache, prompt, iters=iters) - timeit(short, weights, cache, prompt, iters=iters)
    ) / args.kv_steps


def with_bf16_head(apply_fn):
    """An apply_fn whose tied LM head runs in bf16 (see bf16_lm_head)."""

    def wrapped(tokens, cache):
        with nn.intercept_methods(bf16_lm_head):
            return apply_fn(tokens, cache)

    return wrapped


@jax.jit
def _rel_rms(a, b):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)  # on the device: prefill logits are 1.6 GB at 1.5B
    return jnp.sqrt(jnp.mean((a - b) ** 2)) / (jnp.sqrt(jnp.mean(b**2)) + 1e-12)


def rel_rms(a, b) -> float:
    return float(_rel_rms(jnp.asarray(a), jnp.asarray(b)))


def bf16_lm_head(next_fun, args, kwargs, context):
    """nn.intercept_methods hook: ``nn.Embed.attend`` (the tied LM head) on a bf16 query, so the bf16 table
    is not promoted to fp32 (bf16 logits, fp32 accumulation in the GEMM)."""
    if isinstance(context.module, nn.Embed) and context.method_name == "attend":
        return next_fun(args[0].astype(jnp.bfloat16), *args[1:], **kwargs)
    return next_fun(*args, **kwargs)


def bytes_per_token(tree, tokens: int = 1) -> int:
    """Bytes of ``tree``'s arrays one forward pass of ``tokens`` tokens reads: everything (GEMM weights,
    scales, norms, the tied head's whole table) except the position table, of which ``tokens`` rows."""
    total = 0
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        nbytes = int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
        if "wpe" in jax.tree_util.keystr(path):
            nbytes = nbytes * tokens // max(1, x.shape[0])
        total += nbytes
    return total


def embeddings_to_bf16(tree):
    """Float embedding tables (leaves named ``embedding``) cast to bf16; other leaves unchanged."""

    def cast(path, x):
        named = getattr(path[-1], "key", None) == "embedding"
        return x.astype(jnp.bfloat16) if named and jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree_util.tree_map_with_path(cast, tree)


def as_bf16_checkpoint(qp):
    """The quantized model of a bf16 checkpoint, as the bf16 baseline is one: float embedding tables in
    bf16, and quantized tables marked bf16 (their lookups and an INT8 tied head's logits come out in bf16,
    the bf16 head's output dtype; the codes and scales are unchanged)."""
    tables = {p: dataclasses.replace(q, dtype=jnp.bfloat16) for p, q in qp.embeddings.items()}
    return dataclasses.replace(qp, params=embeddings_to_bf16(qp.params), embeddings=tables)


def head_label(qp) -> str | None:
    """ "int8" / "int4" when the scheme quantized the tied table ``wte``, else None (float head)."""
    tables = getattr(qp, "embeddings", {}) or {}
    bits = [q.spec.bits for p, q in tables.items() if p.split("/")[-1] == "wte"]
    return f"int{bits[0]}" if bits else None


def fc1_groups_row(apply_fn, qp, tokens, args, iters: int, groups: tuple[int, ...]) -> dict:
    """The same W8A8 prefill with ``ptq_infer.FC1_CODES_GROUPS`` set to ``groups`` while the call compiles:
    () = fc1 writes bf16 and a per-token quantize pass runs before fc2 (the path before fc1 requantized its
    own output); (g,) = fc1's codes in g-column groups wherever that group fits."""
    real = ptq_infer.FC1_CODES_GROUPS
    ptq_infer.FC1_CODES_GROUPS = groups
    try:
        fn = bind(apply_fn, qp, args.dispatch)
        fn(tokens)  # compiles under the patch
    finally:
        ptq_infer.FC1_CODES_GROUPS = real
    name = f"w8a8 (fc1 codes in groups of {groups[0]})" if groups else "w8a8 (fc1 bf16 + quantize pass)"
    return dict(
        model=name,
        prefill_ms=timeit(fn, tokens, iters=iters),
        prefill_b2b_ms=timeit_back_to_back(fn, tokens, iters=iters),
    )


def epilogue_math_row(apply_fn, qp, tokens, ref, args, iters: int, math_: str) -> dict:
    """The same W8A8 prefill with every Mosaic GEMM's GELU epilogue under ``math_`` (the
    ``MosaicTileConfig.epilogue_math`` that ``fit_config`` picks is replaced while the call compiles);
    ``ref``: the bf16 model's prefill logits, for the error of these."""
    from pallas_kernels import int8_matmul_mgpu as mg

    real = mg.fit_config
    mg.fit_config = lambda *a, **k: dataclasses.replace(real(*a, **k), epilogue_math=math_)
    jax.clear_caches()  # int8_matmul is jitted: its cached traces would keep the configs picked before
    try:
        fn = bind(apply_fn, qp, args.dispatch)
        err = rel_rms(fn(tokens), ref)  # compiles under the patch
    finally:
        mg.fit_config = real
        jax.clear_caches()
    return dict(model=f"w8a8 (GELU epilogue {math_})", prefill_ms=timeit(fn, tokens, iters=iters),
                prefill_b2b_ms=timeit_back_to_back(fn, tokens, iters=iters), prefill_rel_rms=err)


def bench_preset(name: str, args, prefill: bool) -> dict:
    base = dataclasses.replace(preset(name), attention=args.attention)
    cfg = dataclasses.replace(base, max_seq_len=max(args.seq, base.max_seq_len)) if prefill else base
    model = build_model(cfg, Policy.from_name("bf16"))  # bf16 compute, float params
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    iters = args.big_iters if n_params > BIG_PARAMS else args.iters
    params_bf16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (args.batch, args.seq), 0, cfg.vocab_size)
    one = tokens[:1, :1]
    dev = jax.devices()[0].device_kind
    head = f"{n_params / 1e6:.0f}M params, device {dev}, iters {iters}, attention {cfg.attention}"
    print(f"\n== {name}: {head}", flush=True)

    def bf16_apply(p, t):
        with nn.intercept_methods(bf16_lm_head):
            return model.apply({"params": p}, t)

    fp_fn = bind(bf16_apply, params_bf16, args.dispatch)
    ref1 = fp_fn(one)
    rows = []
    t1 = timeit(fp_fn, one, iters=iters)
    row = dict(model="bf16", head="bf16", decode_ms=t1, weight_bytes=bytes_per_token(params_bf16))
    if args.kv_steps:
        row["kv_decode_ms"] = kv_decode_ms(
            lambda p: with_bf16_head(decode.float_apply_fn(model, p)), params_bf16, model, args, iters
        )
    if prefill:
        row["prefill_ms"] = timeit(fp_fn, tokens, iters=iters)
        row["prefill_b2b_ms"] = timeit_back_to_back(fp_fn, tokens, iters=iters)
    rows.append(row)
    print("row", json.dumps(row), flush=True)
    ref_prefill = fp_fn(tokens) if prefill and args.compare_epilogue_math else None
    sizes = {}
    for scheme in args.schemes:
        qp = scheme_params(params, scheme, args.int4_group)
        int8_head = head_label(qp)
        qp = as_bf16_checkpoint(qp)

        def q_apply(q, t, backend):
            with nn.intercept_methods(bf16_lm_head):  # bf16 query; an INT8 head gives bf16 logits too
                return ptq_infer.apply_quantized(model, q, t, backend=backend)

        q_fn = bind(lambda q, t: q_apply(q, t, "pallas"), qp, args.dispatch)
        x_fn = bind(lambda q, t: q_apply(q, t, "xla"), qp, args.dispatch)
        out1 = q_fn(one)
        row = dict(
            model=scheme,
            head=int8_head or "bf16",
            rel_rms_vs_bf16=rel_rms(out1, ref1),
            pallas_vs_xla=rel_rms(out1, x_fn(one)),
            decode_ms=timeit(q_fn, one, iters=iters),
            weight_bytes=bytes_per_token(qp),
        )
        if args.kv_steps:

            def make_apply(q):
                return with_bf16_head(decode.quantized_apply_fn(model, q, backend="pallas"))

            row["kv_decode_ms"] = kv_decode_ms(make_apply, qp, model, args, iters)
        if prefill and args.compare_epilogue_math and scheme == "w8a8":
            row["prefill_rel_rms"] = rel_rms(q_fn(tokens), ref_prefill)
        if prefill:
            row["prefill_ms"] = timeit(q_fn, tokens, iters=iters)
            row["prefill_b2b_ms"] = timeit_back_to_back(q_fn, tokens, iters=iters)
        rows.append(row)
        print("row", json.dumps(row), flush=True)  # survives a run cut short by a time limit
        fc1_groups = args.compare_fc1_codes
        fc1_groups = (fc1_groups or [0]) if fc1_groups is not None and prefill and scheme == "w8a8" else []
        for g in fc1_groups:
            groups = () if g == 0 else (g,)
            rows.append(fc1_groups_row(lambda q, t: q_apply(q, t, "pallas"), qp, tokens, args, iters, groups))
            print("row", json.dumps(rows[-1]), flush=True)
        if prefill and scheme == "w8a8" and args.compare_fold:
            rules = ptq.scheme(scheme, int4_group=args.int4_group)
            unfolded = ptq.quantize_params(params, rules, fold_norms=False)
            fn = bind(lambda q, t: q_apply(q, t, "pallas"), as_bf16_checkpoint(unfolded), args.dispatch)
            rows.append(dict(
                model="w8a8 (norm affines not folded)",
                prefill_ms=timeit(fn, tokens, iters=iters),
                prefill_b2b_ms=timeit_back_to_back(fn, tokens, iters=iters),
            ))  # fmt: skip
            print("row", json.dumps(rows[-1]), flush=True)
            del unfolded, fn
        for math_ in args.compare_epilogue_math if prefill and scheme == "w8a8" else ():
            rows.append(epilogue_math_row(lambda q, t: q_apply(q, t, "pallas"), qp, tokens, ref_prefill, args,
                                          iters, math_))
            print("row", json.dumps(rows[-1]), flush=True)
        if prefill and args.xla_rows:
            rows.append(dict(model=f"{scheme} (xla int8 dots)", prefill_ms=timeit(x_fn, tokens, iters=iters)))
            print("row", json.dumps(rows[-1]), flush=True)
        if prefill:
            with tempfile.TemporaryDirectory() as d:
                qcheckpoint.save_quantized(os.path.join(d, "q"), qp, float_dtype="float16")
                sizes[scheme] = qcheckpoint.disk_bytes(os.path.join(d, "q"))
        del qp
    for r in rows:
        if "decode_ms" in r:
            r["decode_tok_s"] = 1e3 / r["decode_ms"]
            r["gb_s"] = r["weight_bytes"] / r["decode_ms"] / 1e6
    _print_table(rows, prefill, args)
    fp16_bytes = n_params * 2
    for scheme, b in sizes.items():
        print(
            f"checkpoint {scheme}: {b / 1e6:.2f} MB on disk vs fp16 {fp16_bytes / 1e6:.2f} MB "
            f"({fp16_bytes / b:.2f}x)"
        )
    return dict(
        device=dev,
        preset=name,
        params=n_params,
        batch=args.batch,
        seq=args.seq,
        iters=iters,
        jax=jax.__version__,
        rows=rows,
        checkpoint_bytes=sizes,
        fp16_bytes=fp16_bytes,
    )


def _print_table(rows, prefill: bool, args) -> None:
    base = rows[0]
    hdr = f"{'model':24s} {'head':>5s} {'ms/token':>9s} {'tok/s':>8s} {'x bf16':>7s}"
    hdr += f" {'MB/token':>9s} {'GB/s':>7s} {'KV-loop ms/tok':>14s} {'x bf16':>7s}"
    if prefill:
        hdr += f" {f'prefill {args.batch}x{args.seq} ms':>22s} {'x bf16':>7s} {'b2b ms':>8s} {'x bf16':>7s}"
    print(hdr + f" {'relRMS vs bf16':>15s} {'pallas vs xla':>14s} {'prefill relRMS':>15s}")
    for r in rows:
        line = f"{r['model']:24s} {r.get('head', '-'):>5s}"
        if "decode_ms" in r:
            line += (
                f" {r['decode_ms']:9.3f} {r['decode_tok_s']:8.1f}"
                f" {r['decode_tok_s'] / base['decode_tok_s']:7.2f}"
                f" {r['weight_bytes'] / 1e6:9.1f} {r['gb_s']:7.0f}"
            )
            if "kv_decode_ms" in r:
                line += f" {r['kv_decode_ms']:14.3f} {base['kv_decode_ms'] / r['kv_decode_ms']:7.2f}"
            else:
                line += f" {'-':>14s} {'-':>7s}"
        else:
            line += f" {'-':>9s} {'-':>8s} {'-':>7s} {'-':>9s} {'-':>7s} {'-':>14s} {'-':>7s}"
        if prefill:
            line += f" {r['prefill_ms']:22.2f} {base['prefill_ms'] / r['prefill_ms']:7.2f}"
            if "prefill_b2b_ms" in r:
                line += f" {r['prefill_b2b_ms']:8.2f} {base['prefill_b2b_ms'] / r['prefill_b2b_ms']:7.2f}"
            else:
                line += f" {'-':>8s} {'-':>7s}"
        for key, width in (("rel_rms_vs_bf16", 15), ("pallas_vs_xla", 14), ("prefill_rel_rms", 15)):
            line += f" {r[key]:>{width}.3g}" if key in r else f" {'-':>{width}s}"
        print(line)
    print(
        "head: the tied LM head precision (bf16: intercepted bf16 attend; int8/int4: scheme-quantized "
        "table); prefill ms: one synchronised call; b2b ms: per call with calls enqueued back to back"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["gpt2-124m", "gpt2-1.5b"])
    ap.add_argument("--prefill-presets", nargs="*", default=["gpt2-124m", "gpt-tiny"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument(
        "--big-iters", type=int, default=10, help=f"iters for presets over {BIG_PARAMS / 1e6:.0f}M"
    )
    ap.add_argument("--int4-group", type=int, default=128)
    ap.add_argument(
        "--attention",
        default="auto",
        help="ModelConfig.attention for every model (auto: the Pallas decode kernel for one-token cached "
        "calls on a GPU; xla: XLA's softmax attention there)",
    )
    ap.add_argument("--kv-steps", type=int, default=64, help="KV-cache decode steps timed (0: skip)")
    ap.add_argument("--kv-prompt", type=int, default=32, help="prompt length before the timed decode steps")
    ap.add_argument("--quick", action="store_true", help="CPU smoke: gpt-tiny, batch 2 x 32, 2 iters")
    ap.add_argument(
        "--dispatch",
        choices=["bound", "tree"],
        default="bound",
        help="how every model's parameters reach its jitted call: a flat leaf list (jq8.inference.dispatch.jit_bound) "
        "or the pytree, flattened on each call",
    )
    ap.add_argument(
        "--compare-fc1-codes",
        type=int,
        nargs="*",
        default=None,
        help="also time the W8A8 prefill with fc1's codes in these column groups only (0, or the bare flag: "
        "no fc1 codes, a per-token quantize pass between fc1 and fc2)",
    )
    ap.add_argument(
        "--compare-fold",
        action="store_true",
        help="also time the W8A8 prefill with the LayerNorm affines left in the norms (fold_norms=False)",
    )
    ap.add_argument("--schemes", nargs="+", choices=(*SCHEMES, SCALE_MIN), default=list(SCHEMES))
    ap.add_argument(
        "--compare-epilogue-math",
        nargs="*",
        default=[],
        metavar="MATH",
        help="also time the W8A8 prefill with the Mosaic GEMMs' GELU epilogue under each of these "
        "MosaicTileConfig.epilogue_math settings (precise, approx, tanh)",
    )
    ap.add_argument("--no-xla-rows", dest="xla_rows", action="store_false",
                    help="skip the prefill rows of the XLA int8 path")
    ap.add_argument(
        "--json",
        metavar="PATH",
        help="write the results as JSON to PATH {preset: result}; default: $OUT/ptq_speed_<preset>.json per "
        "preset when OUT is set",
    )
    args = ap.parse_args()
    if args.quick:
        args.presets, args.batch, args.seq, args.iters, args.big_iters = ["gpt-tiny"], 2, 32, 2, 2
        args.kv_steps, args.kv_prompt = 4, 8
    out = os.environ.get("OUT")
    results = {}
    for name in args.presets:
        res = results[name] = bench_preset(name, args, prefill=name in args.prefill_presets)
        if out:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, f"ptq_speed_{name}.json"), "w") as f:
                json.dump(res, f, indent=1)
        if args.json:  # rewritten after every preset, so a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
