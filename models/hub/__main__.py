"""Export a float jq8 model (a train.py run, or any hf: / gguf: checkpoint) as a Hugging Face directory.

    python -m models.hub export --ckpt runs/tiny --out hf/tiny [--overwrite]
    python -m models.hub export --ckpt gguf:model.gguf --out hf/model

The directory (config.json, model.safetensors, tokenizer.json) loads in ``transformers`` with
``AutoModelForCausalLM.from_pretrained`` and back in jq8 with ``load_pretrained("hf:hf/tiny")``. Bad input
is one ``error:`` line naming it (exit status 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jq8 import cli
from jq8.cli import UsageError
from models.hub import CheckpointError, export_hf, is_pretrained_spec, load_pretrained


def load_run(ckpt: str):
    """(ModelConfig, params, tokenizers.Tokenizer or None) of a train.py run (the run's own tokenizer)."""
    from jq8.data import load_tokenizer
    from jq8.training.checkpoint import describe_error, load_params
    from models.config import ModelConfig

    if not Path(ckpt).is_dir():
        raise UsageError(f"--ckpt {ckpt}: no such directory; pass a train.py run dir, hf:DIR or gguf:FILE")
    try:
        params, meta = load_params(ckpt)
    except Exception as e:  # Orbax raises many kinds; the user needs to know it is not a jq8 checkpoint
        raise UsageError(f"--ckpt {ckpt} is not a jq8 training checkpoint ({describe_error(e)})") from None
    try:
        config = ModelConfig.from_dict(meta["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"--ckpt {ckpt}: its model config does not load in this jq8 ({e})") from None
    spec = meta.get("tokenizer", {}).get("spec", "wiki-8k")
    if is_pretrained_spec(spec):
        from models.hub import load_tokenizer as hub_tokenizer

        return config, params, hub_tokenizer(spec)
    tok = getattr(load_tokenizer(spec), "tokenizer", None)  # the BPE's tokenizers.Tokenizer; bytes: none
    return config, params, tok


def main(argv: list[str] | None = None) -> Path:
    p = cli.ArgumentParser(prog="-m models.hub", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write a float model as a Hugging Face checkpoint directory")
    e.add_argument("--ckpt", required=True, help="train.py run dir, hf:DIR or gguf:FILE")
    e.add_argument("--out", required=True, help="the directory to write")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if Path(args.out).exists() and not args.overwrite:
        raise UsageError(f"--out {args.out} already exists; pass --overwrite to replace it, or another --out")
    if is_pretrained_spec(args.ckpt):
        try:
            config, params, tok = load_pretrained(args.ckpt, tokenizer=True)
        except (CheckpointError, OSError) as err:
            raise UsageError(f"--ckpt {args.ckpt}: {err}") from None
    else:
        config, params, tok = load_run(args.ckpt)
    out = export_hf(config, params, args.out, tokenizer=tok, overwrite=args.overwrite)
    print(f"wrote {out} ({config.family}, {config.num_layers} layers, d={config.d_model}, vocab {config.vocab_size})")
    return out


if __name__ == "__main__":
    sys.exit(cli.run(main))
