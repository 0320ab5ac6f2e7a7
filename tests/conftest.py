"""Shared fixtures, and XLA's CPU compiler settings for the suite."""

from __future__ import annotations

import os

# Mosaic GPU's interpreter runs each warpgroup as an XLA CPU computation that blocks in a host callback at
# every barrier, so XLA's CPU client needs a thread per warpgroup; its pool has NPROC threads (default: one
# per CPU), and a 2-CPU host stalls the block-scaled kernel's three warpgroups. Set before jax starts.
if len(os.sched_getaffinity(0)) < 4:
    os.environ.setdefault("NPROC", "4")

import jax  # noqa: E402
import pytest  # noqa: E402

# On CPU most of the suite's time is XLA compiling many small programs (Pallas kernels run in interpret
# mode); its optimisation passes buy nothing at test sizes and cost about a quarter of the CPU time. Results
# are checked against references under the same setting. GPU runs keep the default, and so does a run that
# sets JAX_DISABLE_MOST_OPTIMIZATIONS itself.
if "JAX_DISABLE_MOST_OPTIMIZATIONS" not in os.environ and jax.default_backend() == "cpu":
    jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture
def verified_triton_modules(monkeypatch):
    """Run the MLIR verifier on every Triton module lowered during the test; yields their text.

    Lowering alone accepts ill-typed ops: an atomic whose mask was not in its value's shape cross-lowered on
    CPU and then failed to parse on the H100.
    """
    from jax._src.pallas.triton import pallas_call_registration as registration

    real = registration.lowering.lower_jaxpr_to_triton_module
    modules: list[str] = []

    def lower_and_verify(*args, **kwargs):
        result = real(*args, **kwargs)
        result.module.operation.verify()
        modules.append(str(result.module))
        return result

    monkeypatch.setattr(registration.lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
    return modules
