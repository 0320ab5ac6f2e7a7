"""Compact quantized checkpoints: round trip, atomic writes, size on disk, clear errors."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from test_ptq import run_int8, tiny_gpt

from jq8 import ptq
from jq8.ptq import checkpoint as qcheckpoint
from jq8.ptq import infer as ptq_infer


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


def as_format_2(out) -> dict:
    """Rewrites a saved checkpoint's INT4 codes in the adjacent-pair packing of formats 1 and 2 (column 2i
    in the low nibble of byte i) and labels it format 2; returns the manifest."""
    from jq8.quant import unpack_int4

    with np.load(out / qcheckpoint.ARRAYS) as z:
        arrays = {k: z[k] for k in z.files}
    manifest = json.loads((out / qcheckpoint.MANIFEST).read_text())
    for prefix, section in (("w", "weights"), ("e", "embeddings")):
        for path, m in manifest.get(section, {}).items():
            if m["spec"]["bits"] != 4:
                continue
            n = m["shape"][-1]
            codes = np.asarray(unpack_int4(jax.numpy.asarray(arrays[f"{prefix}/{path}/values"]), n))
            u = (np.pad(codes, ((0, 0), (0, n % 2))).astype(np.int32) & 0xF).astype(np.uint8)
            arrays[f"{prefix}/{path}/values"] = u[:, 0::2] | (u[:, 1::2] << 4)
    manifest["format_version"] = 2
    np.savez(out / qcheckpoint.ARRAYS, **arrays)
    (out / qcheckpoint.MANIFEST).write_text(json.dumps(manifest))
    return manifest


def test_format_2_int4_checkpoints_are_repacked_on_load(tmp_path, quantized):
    """Before format 3, INT4 codes were packed in adjacent pairs: an old checkpoint still loads the same."""
    _, qp, _ = quantized
    out = qcheckpoint.save_quantized(tmp_path / "q", qp, float_dtype="float32")
    manifest = as_format_2(out)
    assert any(m["spec"]["bits"] == 4 for m in manifest["weights"].values())
    qp2, _ = qcheckpoint.load_quantized(out)
    for path, q in qp.weights.items():
        np.testing.assert_array_equal(qp2.weights[path].values, q.values)
