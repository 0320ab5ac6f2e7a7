"""Tile configurations for the INT8 GEMM kernels: a per-GPU JSON cache, a heuristic default, a timer.

Kernels call :func:`lookup_config` when ``config=None``: it returns the cached choice for
(kernel, M, N, K, key) on this GPU model, else :func:`heuristic_config`. Nothing is timed implicitly: tuning
runs only through :func:`autotune` (or ``python -m pallas_kernels.tune --shapes ...`` on a GPU), which
times each candidate (median of several runs after warm-up, ``block_until_ready``) and writes the winner to
``pallas_kernels/tuning/<gpu name>.json``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax

from pallas_kernels._common import TileConfig

TUNING_DIR = Path(__file__).parent / "tuning"
_LOCK = threading.Lock()
_CACHE: dict[str, dict[str, dict]] = {}  # gpu name -> {entry key -> TileConfig fields}


def gpu_name() -> str:
    """A file-name-safe device kind ("NVIDIA_H100_80GB_HBM3"), or "cpu"."""
    dev = jax.devices()[0]
    kind = dev.device_kind if dev.platform == "gpu" else dev.platform
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", kind).strip("_") or "unknown"


def entry_key(kernel: str, m: int, n: int, k: int, key: str) -> str:
    return f"{kernel}|{m}x{n}x{k}|{key}"


def cache_path(name: str | None = None) -> Path:
    return TUNING_DIR / f"{name or gpu_name()}.json"


def _load(name: str) -> dict[str, dict]:
    with _LOCK:
        if name not in _CACHE:
            path = cache_path(name)
            _CACHE[name] = json.loads(path.read_text()) if path.exists() else {}
        return _CACHE[name]


def lookup_entry(kernel: str, m: int, n: int, k: int, key: str = "") -> dict | None:
    """The cached fields for this shape on this GPU (a kernel's own config dataclass), or None."""
    return _load(gpu_name()).get(entry_key(kernel, m, n, k, key))


def lookup_config(kernel: str, m: int, n: int, k: int, key: str = "") -> TileConfig:
    """Cached config for this shape on this GPU, else the heuristic default."""
    entry = lookup_entry(kernel, m, n, k, key)
    if entry is not None:
        return TileConfig(**entry)
    return heuristic_config(kernel, m, n, k)


def store_config(kernel: str, m: int, n: int, k: int, key: str, cfg, *, save: bool = True) -> None:
    """Caches ``cfg`` (a TileConfig, or a kernel's own frozen config dataclass) for this shape."""
    name = gpu_name()
    table = _load(name)
    with _LOCK:
        table[entry_key(kernel, m, n, k, key)] = dataclasses.asdict(cfg)
        if save:
            TUNING_DIR.mkdir(parents=True, exist_ok=True)
            cache_path(name).write_text(json.dumps(dict(sorted(table.items())), indent=1) + "\n")


def heuristic_config(kernel: str, m: int, n: int, k: int) -> TileConfig:
    """Default tiles: 256x128x128 / 8 warps / 3 stages (best measured int8 NT tile on H100) for large GEMMs,
    smaller tiles when M or N is small so that enough programs exist to fill the GPU (untimed guesses; the
    tuning cache overrides them per shape). The block-scaled kernel
    keeps 128x128 (its in-loop f32 rescale needs registers beside the accumulator)."""
    bk = 128 if k >= 128 else 64
    if m >= 2048 and n >= 1024 and kernel == "int8_matmul":
        return TileConfig(256, 128, bk, num_warps=8, num_stages=3, group_m=8)
    if m >= 512 and n >= 256:
        return TileConfig(128, 128, bk, num_warps=8, num_stages=3, group_m=8)
    if m <= 16:  # decode-like: the weight stream dominates, so spread N over many programs
        return TileConfig(16, 32, 128, num_warps=4, num_stages=4, group_m=1)
    bm = 64 if m > 32 else 32
    bn = 64 if n > 32 else 32
    return TileConfig(bm, bn, 64, num_warps=4, num_stages=3, group_m=8)


def default_candidates(m: int, n: int, k: int) -> list[TileConfig]:
    """A short candidate list (the device-time budget is small); all have block_k >= 64 (block_k=16 is wrong
    on GPU and 256x256 tiles spill registers)."""
    c = [
        TileConfig(256, 128, 128, 8, 3, 8),
        TileConfig(256, 128, 128, 8, 4, 8),
        TileConfig(128, 256, 128, 8, 3, 8),
        TileConfig(128, 128, 128, 8, 3, 8),
        TileConfig(128, 128, 128, 4, 4, 8),
        TileConfig(128, 128, 64, 4, 4, 8),
        TileConfig(256, 128, 64, 8, 4, 8),
    ]
    if min(m, n) < 1024:
        c += [TileConfig(64, 128, 128, 4, 4, 8), TileConfig(64, 64, 128, 4, 3, 8)]
    return c


def time_fn(fn: Callable[[], object], *, iters: int = 10, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds (``block_until_ready`` after each call)."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def time_in_loop(
    call: Callable, a, weights: Sequence, *, reps: int = 10, iters: int = 5, residual=None
) -> float:
    """Device seconds per ``call(a, w)`` for kernels too short to time one call at a time (decode GEMVs).

    One jitted ``lax.fori_loop`` runs ``reps`` rounds of ``call(a, w)`` for every ``w`` in ``weights`` (give
    enough distinct weights to overflow L2: decode streams each layer's weights from HBM). Host dispatch is
    paid once per loop, not once per call; the loop's own cost (a body without the calls) is subtracted.
    ``a`` is rewritten from the results each round, so XLA cannot hoist the calls out of the loop.
    residual: an (M, N) array threaded through the calls as a decoder's residual stream is:
    ``call(a, w, r)`` returns the next ``r`` (a GEMV that adds into it in place needs no copy of it).
    """
    import jax.numpy as jnp

    def looped(with_calls: bool):
        def run(x, ws, r):
            def body(_, carry):
                x, acc, r = carry
                for w in ws:
                    if residual is None:
                        y = call(x, w) if with_calls else x
                        acc = acc + jnp.ravel(y)[0].astype(jnp.float32)
                    elif with_calls:  # r, live through the loop, has no other reader: nothing copies it
                        r = call(x, w, r)
                return jnp.where(acc > 3e38, x + 1, x), acc, r

            return jax.lax.fori_loop(0, reps, body, (x, jnp.float32(0), r))

        return jax.jit(run)

    r0 = jnp.float32(0) if residual is None else residual
    full, empty = looped(True), looped(False)
    t_full = time_fn(lambda: full(a, list(weights), r0), iters=iters)
    t_empty = time_fn(lambda: empty(a, list(weights), r0), iters=iters)
    return max(t_full - t_empty, 0.0) / (reps * len(weights))


def autotune(
    kernel: str,
    m: int,
    n: int,
    k: int,
    key: str,
    run: Callable[[TileConfig], object],
    candidates: Sequence[TileConfig] | None = None,
    *,
    iters: int = 10,
    save: bool = True,
    verbose: bool = False,
    timer: Callable[[TileConfig], float] | None = None,
) -> TileConfig:
    """Times ``run(config)`` for each candidate, caches and returns the fastest. Candidates that fail to
    compile (shared memory, registers) are skipped. Call on a GPU, outside jit. ``timer(config)`` (seconds)
    replaces the per-call wall clock for kernels shorter than a launch (see :func:`time_in_loop`)."""
    if jax.default_backend() != "gpu":
        raise RuntimeError("autotune times kernels on a GPU; on CPU kernels use the heuristic config")
    best, best_t = None, float("inf")
    for cfg in candidates or default_candidates(m, n, k):
        try:
            t = timer(cfg) if timer else time_fn(lambda cfg=cfg: run(cfg), iters=iters)
        except Exception as e:  # noqa: BLE001 - a candidate that does not compile is simply not chosen
            if verbose:
                print(f"  {cfg}: failed ({type(e).__name__}: {str(e)[:120]})")
            continue
        if verbose:
            print(f"  {cfg}: {t * 1e3:.3f} ms")
        if t < best_t:
            best, best_t = cfg, t
    if best is None:
        raise RuntimeError(f"no candidate config ran for {kernel} {m}x{n}x{k} {key}")
    store_config(kernel, m, n, k, key, best, save=save)
    return best
