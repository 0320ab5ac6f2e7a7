"""Shared fixtures."""

from __future__ import annotations

import pytest


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
