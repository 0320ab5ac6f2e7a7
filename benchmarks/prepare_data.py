"""Corpus preparation speed and memory: tokens/s and peak resident memory of `jq8.data.prepare`.

Builds a corpus of the requested size by repeating the bundled Wikipedia sample's cleaned articles (under
``--workdir``, outside the repository), tokenizes it into a fresh cache and reports::

    python benchmarks/prepare_data.py                          # 32 MiB of .txt, wiki-8k, every core
    python benchmarks/prepare_data.py --size-mb 1024 --json /tmp/prepare_1g.json
    python benchmarks/prepare_data.py --input my_corpus/ --tokenizer hf_ckpt/tokenizer.json

Memory is sampled every 0.1 s as the resident set (VmRSS) of this process and of every process below it
(the tokenizer workers), summed: the memory the preparation holds at once. ``getrusage`` maxima are
reported beside it (workers are not this process's children under the forkserver start method, so only the
sampled sum covers them). The CPU may be shared: the load average before and after is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jq8 import data  # noqa: E402


def make_corpus(path: Path, size_bytes: int, fmt: str) -> int:
    """Write the bundled wiki articles, repeated, until ``size_bytes``; returns the bytes written.

    txt: articles separated by blank lines (so each paragraph is a document); jsonl: one article per line.
    """
    articles = data.load_documents("wiki")
    if fmt == "jsonl":
        block = "".join(json.dumps({"text": a}, ensure_ascii=False) + "\n" for a in articles).encode()
    else:
        block = ("\n\n".join(articles) + "\n\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(path, "wb") as f:
        while written < size_bytes:
            f.write(block)
            written += len(block)
    return written


def _tree_rss_kib(root: int) -> tuple[int, int]:
    """(VmRSS of ``root``, summed VmRSS of ``root`` and all its descendants), in KiB (Linux /proc)."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    parents[int(entry.name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        kids = [p for p, pp in parents.items() if pp in frontier and p not in tree]
        tree.update(kids)
        frontier = kids
    own = total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/status") as f:
                rss = next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
        except OSError:
            continue
        total += rss
        own = rss if pid == root else own
    return own, total


class MemorySampler(threading.Thread):
    def __init__(self, interval: float = 0.1):
        super().__init__(daemon=True)
        self.interval, self.stop_event = interval, threading.Event()
        self.peak_own = self.peak_tree = 0

    def run(self) -> None:
        while not self.stop_event.is_set():
            own, tree = _tree_rss_kib(os.getpid())
            self.peak_own, self.peak_tree = max(self.peak_own, own), max(self.peak_tree, tree)
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=float, default=32, help="generated corpus size in MiB (default 32)")
    parser.add_argument("--format", choices=("txt", "jsonl"), default="txt", help="generated corpus format")
    parser.add_argument("--input", default=None, help="tokenize this source instead of a generated one")
    parser.add_argument("--tokenizer", default="wiki-8k", help="wiki-8k, bytes, or a tokenizer.json path")
    parser.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: all cores)")
    parser.add_argument("--workdir", default="/tmp/jq8-prepare-bench", help="generated corpus and cache")
    parser.add_argument("--keep", action="store_true", help="keep the generated corpus and token cache")
    parser.add_argument("--json", default=None, help="also write the results as JSON to this path")
    args = parser.parse_args(argv)

    workdir = Path(args.workdir)
    if args.input is not None:
        source = Path(args.input)
        files = data.source_files(source)
        input_bytes = sum(f.stat().st_size for f in files)
    else:
        source = workdir / f"corpus-{args.size_mb:g}mb.{args.format}"
        want = int(args.size_mb * (1 << 20))
        if not source.is_file() or source.stat().st_size < want:
            t = time.perf_counter()
            make_corpus(source, want, args.format)
            print(f"generated {source} ({source.stat().st_size / 2**20:.0f} MiB) in "
                  f"{time.perf_counter() - t:.1f} s", file=sys.stderr)
        input_bytes = source.stat().st_size
    cache = workdir / f"cache-{os.getpid()}"
    workers = args.workers or data.default_workers()

    load_before = os.getloadavg()
    sampler = MemorySampler()
    sampler.start()
    t0 = time.perf_counter()
    try:
        ds = data.prepare(source, args.tokenizer, cache_dir=cache, workers=workers, verbose=True)
        seconds = time.perf_counter() - t0
        sampler.stop()
        t1 = time.perf_counter()
        hit = data.prepare(source, args.tokenizer, cache_dir=cache, workers=workers)
        hit_seconds = time.perf_counter() - t1
        assert hit.from_cache
    finally:
        if sampler.is_alive():
            sampler.stop()
        if not args.keep:
            shutil.rmtree(cache, ignore_errors=True)
    tokens = sum(int(s["tokens"]) for s in ds.meta["splits"].values())
    self_ru = resource.getrusage(resource.RUSAGE_SELF)
    result = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "input": str(source),
        "input_bytes": input_bytes,
        "format": args.format if args.input is None else "user",
        "tokenizer": args.tokenizer,
        "dtype": ds.meta["dtype"],
        "documents": ds.meta["documents"],
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds),
        "input_mib_per_s": round(input_bytes / 2**20 / seconds, 2),
        "cache_hit_seconds": round(hit_seconds, 3),
        "workers": workers,
        "cores": os.cpu_count(),
        "peak_rss_parent_mib": round(sampler.peak_own / 1024, 1),
        "peak_rss_all_processes_mib": round(sampler.peak_tree / 1024, 1),
        "ru_maxrss_parent_mib": round(self_ru.ru_maxrss / 1024, 1),
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "cpu_seconds_parent": round(self_ru.ru_utime + self_ru.ru_stime, 1),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.input is None and not args.keep:
        source.unlink(missing_ok=True)
    return result


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


if __name__ == "__main__":
    main()
