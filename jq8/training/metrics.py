"""Training metrics: JSONL on disk (always), TensorBoard (optional), and loss-curve plots.

Each run directory holds ``metrics.jsonl``: one JSON object per line with ``step`` and whatever was logged
(``loss``, ``lr``, ``tokens_per_s``, ``val_loss``, ``val_ppl``, ...). Plot runs against each other::

    python -m jq8.training.metrics plot runs/tiny_bf16 runs/tiny_int8 --out loss.png [--metric loss]
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any

import jax

from jq8.cli import ArgumentParser, UsageError, require_module

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """Appends metrics to ``<run_dir>/metrics.jsonl`` (only on process 0); optionally to TensorBoard.

    resume_step: the step a run (re)starts from. The rows of later steps, which the run is about to redo,
    are dropped first (the file is rewritten atomically), so a resumed run's metrics read as one run.
    """

    def __init__(self, run_dir: str, *, tensorboard: bool = False, resume_step: int | None = None):
        self.run_dir = run_dir
        self.enabled = jax.process_index() == 0
        self._tb = None
        path = os.path.join(run_dir, METRICS_FILE)
        if self.enabled:
            os.makedirs(run_dir, exist_ok=True)
            if resume_step is not None and os.path.exists(path):
                keep_rows_until(path, resume_step)
            if tensorboard:
                try:
                    from tensorboardX import SummaryWriter
                except ImportError:
                    raise ImportError(
                        'tensorboard=True needs the tensorboardX package: pip install "jq8[tensorboard]" '
                        "(metrics.jsonl is always written)"
                    ) from None
                # purge_step: TensorBoard drops its own events of the steps being redone.
                purge = None if resume_step is None else resume_step + 1
                self._tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=purge)
        self._file = open(path, "a") if self.enabled else None

    def write(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in values.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, float(v), step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _rows(lines) -> list[dict[str, Any]]:
    """Parsed rows; a line that is not JSON (torn by a run killed mid-write) is skipped."""
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def keep_rows_until(path: str, step: int) -> int:
    """Rewrites the metrics file ``path`` keeping only rows with ``step <= step``; returns how many were
    dropped. Atomic: the new file is written beside it and renamed over it."""
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [json.dumps(r) + "\n" for r in _rows(lines) if r["step"] <= step]
    if len(kept) == len(lines):
        return 0
    fd, tmp = tempfile.mkstemp(prefix=".metrics.", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return len(lines) - len(kept)


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """All rows of a run's metrics.jsonl (a line torn by a run killed mid-write is skipped)."""
    path = run_dir if run_dir.endswith(".jsonl") else os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir!r}")
    with open(path) as f:
        return _rows(f)


def series(rows: list[dict[str, Any]], metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, sorted by step, last write wins for repeated steps."""
    by_step = {r["step"]: r[metric] for r in rows if metric in r}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot(run_dirs: list[str], out: str, metric: str = "loss", labels: list[str] | None = None) -> str:
    """Draws ``metric`` against step for each run (e.g. bf16 vs INT8) into ``out`` (png/pdf/svg)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError('plotting needs matplotlib: pip install "jq8[plot]"') from None
    labels = labels or [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for d, label in zip(run_dirs, labels):
        steps, values = series(read_metrics(d), metric)
        if not steps:
            raise ValueError(f"run {d!r} logged no {metric!r}")
        finite = [v for v in values if math.isfinite(v)]
        ax.plot(steps, values, label=f"{label} (last {finite[-1]:.3f})" if finite else label)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    """``plot RUN_DIR ... [--out loss.png] [--metric loss] [--labels ...]``; bad input raises UsageError."""
    parser = ArgumentParser(prog="train.py")
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=ArgumentParser)
    p = sub.add_parser("plot", help="plot a metric of several runs against step")
    p.add_argument("runs", nargs="+", help="run directories (holding metrics.jsonl)")
    p.add_argument("--out", default="loss.png", help="image to write (.png, .pdf, .svg)")
    p.add_argument("--metric", default="loss", help="loss, val_loss, val_ppl, tokens_per_s, ...")
    p.add_argument("--labels", nargs="*", default=None, help="one legend label per run (default: its name)")
    args = parser.parse_args(argv)
    require_module("matplotlib", "plot", "plotting")
    for d in args.runs:
        path = d if d.endswith(".jsonl") else os.path.join(d, METRICS_FILE)
        if not os.path.isfile(path):
            raise UsageError(f"{d}: no {METRICS_FILE} there; pass train.py run directories")
        if not series(read_metrics(d), args.metric)[0]:
            raise UsageError(f"{d}: its {METRICS_FILE} has no {args.metric!r} rows; pick another --metric")
    if args.labels is not None and len(args.labels) != len(args.runs):
        raise UsageError(f"--labels: {len(args.labels)} labels for {len(args.runs)} runs; give one per run")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir) or os.path.isdir(args.out):
        raise UsageError(f"--out {args.out}: not a file in an existing directory")
    print(plot(args.runs, args.out, args.metric, args.labels))


if __name__ == "__main__":
    import sys

    from jq8.cli import run

    sys.exit(run(main))
