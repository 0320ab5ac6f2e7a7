"""Data parallel + FSDP on 8 simulated CPU devices (a subprocess: the XLA flag must precede JAX start-up)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jq8.quant import QArray, QuantSpec, quantize
from jq8.training import checkpoint, sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, REPO)
    import jax, numpy as np
    import train
    from jq8.training import checkpoint, sharding
    from jq8.quant import QuantSpec, quantize, dequantize

    assert jax.device_count() == 8, jax.devices()
    base = ["--config", os.path.join(REPO, "configs", "tiny.py"), "--dataset=lee", "--tokenizer=bytes",
            "--model.d_model=64", "--model.num_heads=2", "--model.num_layers=1", "--batch_size=16",
            "--seq_len=32", "--steps=4", "--warmup_steps=1", "--lr=3e-3", "--eval_batches=0",
            "--ckpt_every=0", "--log_every=1", "--progress=false", "--fsdp_min_size=1024"]
    out = {}
    no_ckpt = ["--ckpt_every=-1"]
    for name, extra in [("fsdp8", []), ("one", ["--num_devices=1", *no_ckpt]),
                        ("int8_fsdp8", ["--policy=jetfire-int8", *no_ckpt]),
                        ("sm8", ["--data_parallel=shard_map", *no_ckpt]),
                        ("int8_sm8", ["--policy=jetfire-int8", "--data_parallel=shard_map", *no_ckpt]),
                        # the Pallas kernels (interpret mode) per device, as on GPUs (data_parallel=auto)
                        ("int8_sm8_kernels", ["--policy=jetfire-int8", "--backend=pallas", "--steps=2",
                                              *no_ckpt])]:
        run = os.path.join(TMP, name)
        r = train.main(base + extra + ["--run_dir=" + run])
        out[name] = [l for _, l in r["history"]]
        if name == "fsdp8":
            p = r["params"]
            out["specs"] = {k: str(v.sharding.spec) for k, v in
                            [("wte", p["wte"]["embedding"]), ("fc1", p["h_0"]["mlp"]["fc1"]["kernel"]),
                             ("ln_f", p["ln_f"]["scale"])]}
            out["n_shard_devices"] = len(p["wte"]["embedding"].sharding.device_set)
            out["shard_rows"] = p["wte"]["embedding"].addressable_shards[0].data.shape[0]
            # The sharded checkpoint loads onto one device with the same values.
            loaded, meta = checkpoint.load_params(os.path.join(run, "checkpoints"))
            out["ckpt_equal"] = all(np.array_equal(np.asarray(a), np.asarray(b))
                                    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(loaded)))
            out["ckpt_step"] = meta["step"]
            out["ckpt_sum"] = float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree.leaves(p)))

    # QArray: codes and scales split together at tile boundaries.
    mesh = sharding.make_mesh()
    x = jax.random.normal(jax.random.key(0), (256, 96)) * np.linspace(0.1, 3, 96)
    q = quantize(x, QuantSpec.blocks((32, 32)))
    shs = sharding.qarray_sharding(q, mesh)
    qs = jax.tree.map(jax.device_put, q, shs)
    ok = True
    for vs, ss in zip(qs.values.addressable_shards, qs.scale.addressable_shards):
        rows = vs.index[0]
        ok &= vs.device == ss.device and ss.index[0] == slice(rows.start // 32, rows.stop // 32)
        local = dequantize(type(q)(vs.data, ss.data, None, q.spec, vs.data.shape, q.dtype))
        ok &= bool(np.array_equal(np.asarray(local), np.asarray(dequantize(q))[rows]))
    out["qarray_shards_ok"] = bool(ok)
    out["qarray_spec"] = str(qs.values.sharding.spec)
    out["qarray_dequant_equal"] = bool(np.array_equal(np.asarray(dequantize(qs)), np.asarray(dequantize(q))))
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("shard"))
    # Lower XLA optimisation: these programs are tiny and compile time dominates on a CPU.
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    code = f"REPO = {REPO!r}\nTMP = {tmp!r}\n" + SCRIPT
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return {**json.loads(line[len("RESULT ") :]), "tmp": tmp}


def test_fsdp_params_are_split_over_all_devices(result):
    assert result["n_shard_devices"] == 8
    assert result["specs"]["wte"] == str(P("data", None))  # (320, 64): rows split 8 ways
    assert result["shard_rows"] == 320 // 8
    assert "data" in result["specs"]["fc1"]
    assert result["specs"]["ln_f"] == str(P())  # small vectors stay replicated


def test_sharded_training_matches_one_device(result):
    np.testing.assert_allclose(result["fsdp8"], result["one"], rtol=2e-5)
    assert result["fsdp8"][-1] < result["fsdp8"][0]


def test_int8_sharded_training_tracks_bf16(result):
    # Same data and init: the Jetfire INT8 run follows the bf16 one within quantization noise.
    a, b = np.asarray(result["int8_fsdp8"]), np.asarray(result["one"])
    assert np.isfinite(a).all()
    np.testing.assert_allclose(a, b, rtol=2e-2)
    assert not np.array_equal(a, b)  # the INT8 path really ran


def test_sharded_checkpoint_loads_on_one_device(result):
    assert result["ckpt_equal"] and result["ckpt_step"] == 4
    # ... and in this single-device process, which never saw the 8-device layout.
    params, meta = checkpoint.load_params(os.path.join(result["tmp"], "fsdp8", "checkpoints"))
    total = sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree.leaves(params))
    assert meta["step"] == 4 and total == pytest.approx(result["ckpt_sum"], rel=1e-12)
    assert params["wte"]["embedding"].shape == (320, 64)


def test_qarray_values_and_scales_shard_together(result):
    assert result["qarray_spec"] == str(P("data", None))
    assert result["qarray_shards_ok"] and result["qarray_dequant_equal"]


def _qarray(shape, spec):
    """A QArray with the right array shapes (the split rules only read shapes)."""
    m, n = shape
    cols = -(-n // 2) if spec.bits == 4 else n
    scale = np.ones(spec.scale_shape(m, n), np.float32)
    return QArray(np.zeros((m, cols), np.int8), scale, None, spec, shape, np.float32)


def test_qarray_split_axis_rules():
    """Codes and scales split at tile boundaries only; otherwise the other axis, else replication."""
    blocks = QuantSpec.blocks((32, 32))
    split = lambda shape, spec, n=8, min_size=0: sharding.qarray_split_axis(_qarray(shape, spec), n, min_size)
    assert split((96, 256), blocks) == 1  # 3 row tiles, 8 column tiles
    assert split((256, 96), blocks) == 0  # 8 row tiles
    assert split((90, 250), blocks) is None  # partial tiles: no clean split
    assert split((256, 96), QuantSpec.per_row()) == 0
    assert split((96, 256), blocks, min_size=10**6) is None  # small: replicate
    assert split((256, 96), blocks, n=1) is None  # one device
    int4 = QuantSpec.groups(64, axis=1, bits=4)
    assert split((90, 256), int4, n=4) == 1 and split((90, 256), int4, n=3) == 0
    mesh1 = sharding.make_mesh(jax.devices()[:1])
    one = sharding.qarray_sharding(quantize(jnp.ones((256, 96)), blocks), mesh1)
    assert one.values.spec == P() and one.scale.spec == P()


def test_resume_on_another_device_count(result):
    """The 8-device FSDP checkpoint (params + Adam state) resumes in this 1-device process."""
    import train

    run = os.path.join(result["tmp"], "fsdp8")
    out = train.main(
        [
            "--config",
            os.path.join(REPO, "configs", "tiny.py"),
            "--dataset=lee",
            "--tokenizer=bytes",
            "--model.d_model=64",
            "--model.num_heads=2",
            "--model.num_layers=1",
            "--batch_size=16",
            "--seq_len=32",
            "--steps=6",
            "--warmup_steps=1",
            "--lr=3e-3",
            "--eval_batches=0",
            "--ckpt_every=-1",
            "--log_every=1",
            "--progress=false",
            "--fsdp_min_size=1024",
            f"--run_dir={run}",
        ]
    )
    assert out["start_step"] == 4 and [s for s, _ in out["history"]] == [5, 6]
    # Continues from the trained state, not from a fresh init (which would start near log(320) = 5.77).
    assert out["history"][0][1] < result["fsdp8"][0] - 0.05


def test_shard_map_step_matches_one_device(result):
    # Each device's forward and backward on its tokens, gradients averaged: the same updates as one device.
    np.testing.assert_allclose(result["sm8"], result["one"], rtol=2e-5)


def test_int8_shard_map_step_matches_partitioned_step(result):
    # 32x32 quantization tiles do not cross the 64-token shards, so per-device quantization gives the
    # same codes; only the per-device stochastic-rounding noise differs.
    np.testing.assert_allclose(result["int8_sm8"], result["int8_fsdp8"], rtol=1e-4)
    np.testing.assert_allclose(result["int8_sm8_kernels"], result["int8_fsdp8"][:2], rtol=1e-4)
    assert not np.array_equal(result["int8_sm8"], result["int8_fsdp8"])  # its own noise per device
