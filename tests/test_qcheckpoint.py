"""Compact quantized checkpoints: round trip, atomic writes, size on disk, clear errors."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from test_ptq import run_int8, tiny_gpt

from jq8 import ptq, ptq_infer, qcheckpoint


@pytest.fixture(scope="module")
def quantized():
    model, params, tokens = tiny_gpt(d=64, heads=2, vocab=97, seq=16, seed=5)
    qp = ptq.quantize_params(params, ptq.scheme("w4/8-a8", int4_group=32))
    return model, qp, tokens


@pytest.mark.parametrize("float_dtype", ["float16", "bfloat16", "float32"])
def test_round_trip_is_exact_and_runs(tmp_path, quantized, float_dtype):
    model, qp, tokens = quantized
    out = qcheckpoint.save_quantized(
        tmp_path / "q", qp, model_config={"d_model": 64}, extra={"x": 1}, float_dtype=float_dtype
    )
    qp2, manifest = qcheckpoint.load_quantized(out)
    assert manifest["model_config"] == {"d_model": 64} and manifest["extra"] == {"x": 1}
    assert qp2.rules == qp.rules and dict(qp2.assignment) == dict(qp.assignment)
    for path, q in qp.weights.items():
        q2 = qp2.weights[path]
        assert q2.spec == q.spec and q2.shape == q.shape and q2.values.dtype == q.values.dtype
        np.testing.assert_array_equal(q2.values, q.values)
        np.testing.assert_array_equal(q2.scale, q.scale)
    stored = qcheckpoint.as_stored(qp, float_dtype)
    for a, b in zip(jax.tree_util.tree_leaves(stored.params), jax.tree_util.tree_leaves(qp2.params)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(run_int8(model, qp2, tokens), run_int8(model, stored, tokens))


def test_size_on_disk_matches_bits(tmp_path, quantized):
    _, qp, _ = quantized
    out = qcheckpoint.save_quantized(tmp_path / "q", qp, float_dtype="float32")
    rep = ptq.bits_report(qp)
    disk = qcheckpoint.disk_bytes(out)
    n_entries = 2 * len(qp.weights) + len(jax.tree_util.tree_leaves(qp.params))
    assert rep["total_bytes"] <= disk <= rep["total_bytes"] + 400 * n_entries + 8192, (
        disk,
        rep["total_bytes"],
    )


def test_static_scales_survive(tmp_path):
    model, params, tokens = tiny_gpt(d=32, heads=2, vocab=61, seq=8, seed=2)
    qp = ptq.quantize_params(params, ptq.scheme("static-w8a8"))
    qp = ptq_infer.calibrate_static(model, params, [tokens], qp)
    qp2, _ = qcheckpoint.load_quantized(qcheckpoint.save_quantized(tmp_path / "s", qp, float_dtype="float32"))
    assert set(qp2.act_scales) == set(qp.act_scales)
    np.testing.assert_array_equal(run_int8(model, qp2, tokens), run_int8(model, qp, tokens))


def test_atomic_overwrite_and_errors(tmp_path, quantized):
    _, qp, _ = quantized
    dest = tmp_path / "q"
    qcheckpoint.save_quantized(dest, qp)
    with pytest.raises(FileExistsError, match="overwrite"):
        qcheckpoint.save_quantized(dest, qp)
    qcheckpoint.save_quantized(dest, qp, extra={"v": 2}, overwrite=True)
    assert qcheckpoint.read_manifest(dest)["extra"] == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no temp or old dirs left behind
    with pytest.raises(FileNotFoundError):
        qcheckpoint.load_quantized(tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    with pytest.raises(ValueError, match="not a jq8 quantized checkpoint"):
        qcheckpoint.load_quantized(tmp_path / "junk")
    m = json.loads((dest / "manifest.json").read_text())
    m["format_version"] = 99
    (dest / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="newer"):
        qcheckpoint.load_quantized(dest)


def test_failed_write_leaves_no_partial_checkpoint(tmp_path, quantized, monkeypatch):
    _, qp, _ = quantized

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(qcheckpoint.np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        qcheckpoint.save_quantized(tmp_path / "q", qp)
    assert list(tmp_path.iterdir()) == []
