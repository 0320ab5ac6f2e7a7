"""benchmarks/peers_training.py at tiny shapes: the Qwix and jq8 rows train the same MLP branch as bf16."""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys

import pytest

pytest.importorskip("qwix")

PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "peers_training.py"


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("peers_training", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_int8_rows_match_bf16(peers):
    rows = peers.run(64, 96, 48, "mlp", ["jax-bf16", "qwix-int8", "jq8:int8-row"], iters=1, kernels=False,
                     torch_device="auto")  # fmt: skip
    by_name = {r["row"]: r for r in rows}
    assert [r["status"] for r in rows] == ["ok"] * 3, rows
    for name in ("qwix-int8", "jq8:int8-row"):
        r = by_name[name]
        assert math.isfinite(r["loss"])
        # INT8 noise, not a different computation: within a few percent of bf16, and not bitwise bf16
        assert 0 < r["loss_rel_err_vs_jax_bf16"] < 0.1, r
        assert 1e-4 < r["grad_err_vs_jax_bf16"] < 0.1, r
    # Qwix really runs int8 XLA dots: forward, grad-input and grad-weight of fc1 and fc2
    assert by_name["qwix-int8"]["int8_dots"] == 6
    assert by_name["jax-bf16"]["int8_dots"] == 0


def test_bad_input_is_one_line_error(peers, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["peers_training.py", "--tokens", "100", "--seq", "48"])
    with pytest.raises(SystemExit) as e:
        peers.main()
    assert e.value.code == 2
    assert "--tokens 100 is not a multiple of --seq 48" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["peers_training.py", "--rows", "qwix-int4"])
    with pytest.raises(SystemExit):
        peers.main()
    assert "unknown row 'qwix-int4'" in capsys.readouterr().err
