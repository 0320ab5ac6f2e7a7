"""Training metrics: JSONL on disk (always), TensorBoard (optional), and loss-curve plots.

Each run directory holds ``metrics.jsonl``: one JSON object per line with ``step`` and whatever was logged
(``loss``, ``lr``, ``tokens_per_s``, ``val_loss``, ``val_ppl``, ...). Plot runs against each other::

    python -m jq8.training.metrics plot runs/tiny_bf16 runs/tiny_int8 --out loss.png [--metric loss]
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any

import jax

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """Appends metrics to ``<run_dir>/metrics.jsonl`` (only on process 0); optionally to TensorBoard."""

    def __init__(self, run_dir: str, *, tensorboard: bool = False):
        self.run_dir = run_dir
        self.enabled = jax.process_index() == 0
        self._tb = None
        if self.enabled:
            os.makedirs(run_dir, exist_ok=True)
            if tensorboard:
                try:
                    from tensorboardX import SummaryWriter
                except ImportError:
                    raise ImportError(
                        "tensorboard=True needs the tensorboardX package: pip install tensorboardX "
                        "(metrics.jsonl is always written)"
                    ) from None
                self._tb = SummaryWriter(os.path.join(run_dir, "tb"))
        self._file = open(os.path.join(run_dir, METRICS_FILE), "a") if self.enabled else None

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


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """All rows of a run's metrics.jsonl; a resumed run's repeated steps keep the last value written."""
    path = run_dir if run_dir.endswith(".jsonl") else os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir!r}")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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
        raise ImportError(
            "plotting needs matplotlib: pip install matplotlib (or pip install 'jq8[plot]')"
        ) from None
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
    parser = argparse.ArgumentParser(prog="python -m jq8.training.metrics")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plot", help="plot a metric of several runs against step")
    p.add_argument("runs", nargs="+", help="run directories (holding metrics.jsonl)")
    p.add_argument("--out", default="loss.png")
    p.add_argument("--metric", default="loss", help="loss, val_loss, val_ppl, tokens_per_s, ...")
    p.add_argument("--labels", nargs="*", default=None)
    args = parser.parse_args(argv)
    print(plot(args.runs, args.out, args.metric, args.labels))


if __name__ == "__main__":
    main()
