"""Data parallel + FSDP on 8 simulated CPU devices (a subprocess: the XLA flag must precede JAX start-up)."""

from __future__ import annotations

import functools
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
# One xdist worker takes the module (README's `--dist loadgroup`), so its one-minute subprocess runs once.
pytestmark = pytest.mark.xdist_group("sharding")

SCRIPT = textwrap.dedent(r"""
    import dataclasses, json, os, re, shutil, sys
    sys.path.insert(0, REPO)
    import jax, jax.numpy as jnp, numpy as np
    import train
    from models.presets import build_model
    from jq8.training import checkpoint, sharding
    from jq8.quant import QuantSpec, quantize, dequantize

    assert jax.device_count() == 8, jax.devices()
    base = ["--config", os.path.join(REPO, "configs", "tiny.py"), "--dataset=lee", "--tokenizer=bytes",
            "--model.d_model=64", "--model.num_heads=2", "--model.num_layers=1", "--batch_size=16",
            "--seq_len=32", "--steps=4", "--warmup_steps=1", "--lr=3e-3", "--eval_batches=0",
            "--ckpt_every=0", "--log_every=1", "--progress=false", "--fsdp_min_size=1024"]
    out = {}
    no_ckpt = ["--ckpt_every=-1"]
    sm, b3, bf16 = "--data_parallel=shard_map", "--grad_reduce_buckets=3", "--grad_reduce_dtype=bfloat16"
    for name, extra in [("fsdp8", ["--ckpt_every=2"]), ("one", ["--num_devices=1", "--ckpt_every=2"]),
                        ("int8_fsdp8", ["--policy=jetfire-int8", *no_ckpt]),
                        ("sm8", [sm, *no_ckpt]),
                        ("int8_sm8", ["--policy=jetfire-int8", sm, *no_ckpt]),
                        # the Pallas kernels (interpret mode) per device, as on GPUs (data_parallel=auto)
                        ("int8_sm8_kernels", ["--policy=jetfire-int8", "--backend=pallas", "--steps=2",
                                              *no_ckpt]),
                        # gradient reduction options (auto picks shard_map for them)
                        ("sm8_b3", [b3, *no_ckpt]),
                        ("int8_sm8_b3_bf16", ["--policy=jetfire-int8", b3, bf16, *no_ckpt])]:
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

    # Restores across device counts: the step-2 checkpoint alone in a fresh run directory, run to step 4.
    for name, src, extra in [("8to1", "fsdp8", ["--num_devices=1"]),
                             ("8to4", "fsdp8", ["--num_devices=4", sm, b3]),
                             ("1to8", "one", [])]:
        run = os.path.join(TMP, "restore_" + name)
        shutil.copytree(os.path.join(TMP, src, "checkpoints", "2"), os.path.join(run, "checkpoints", "2"))
        r = train.main(base + extra + ["--ckpt_every=-1", "--run_dir=" + run])
        out["restore_" + name] = {"start": r["start_step"], "history": r["history"]}

    # The HLO JAX hands to XLA: one all-reduce per bucket (plus the loss's), summing in the asked dtype.
    def lowered(extra):
        cfg = train.parse_args(base + extra)
        policy = train.make_policy(cfg)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=320))
        model, tx = build_model(cfg.model, policy), train.make_optimizer(cfg)
        mesh = sharding.make_mesh()
        params = jax.eval_shape(lambda k: model.init({"params": k}, jnp.zeros((1, 32), jnp.int32))["params"],
                                jax.random.key(0))
        opt = jax.eval_shape(tx.init, params)
        psh, osh = (sharding.tree_shardings(t, mesh, cfg.sharding, cfg.fsdp_min_size) for t in (params, opt))
        step = train.make_train_step(cfg, model, tx, policy, mesh, psh, osh, jax.random.key(0))
        tok = jax.ShapeDtypeStruct((16, 32), jnp.int32, sharding=sharding.batch_sharding(mesh))
        put = lambda t, sh: jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), t, sh)
        low = step.lower(put(params, psh), put(opt, osh), tok, tok, jax.ShapeDtypeStruct((), jnp.int32))
        text = low.as_text()
        types = re.findall(r'"stablehlo.all_reduce".*?\}\) : \((tensor<[^>]*>)', text, re.S)
        size = lambda t: sum(x.size for x in jax.tree.leaves(t))
        return {"all_reduce_types": types, "barriers": text.count("optimization_barrier"),
                "n_leaves": len(jax.tree.leaves(params)), "ln_f": size(params["ln_f"]),
                "embeddings": size((params["wte"], params["wpe"]))}

    try:  # XLA places gspmd's reductions: the explicit reduction keys are refused there, nothing written
        train.main(base + ["--data_parallel=gspmd", b3, "--run_dir=" + os.path.join(TMP, "refused")])
        out["gspmd_refused"] = None
    except train.UsageError as e:
        out["gspmd_refused"] = [str(e), os.path.exists(os.path.join(TMP, "refused"))]

    out["hlo"] = {"default": lowered([sm]), "b3": lowered([b3]), "b3_bf16": lowered([b3, bf16]),
                  "gspmd": lowered(["--data_parallel=gspmd"])}

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


def _run_script(tmp: str) -> dict:
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


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return _run_script(str(tmp_path_factory.mktemp("sharding_runs")))


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


def test_bucketed_reduction_matches_one_reduction(result):
    # Same sums, packed into 3 flat buffers instead of one psum: the same updates, to float32 rounding.
    np.testing.assert_allclose(result["sm8_b3"], result["sm8"], rtol=1e-6)


def test_bf16_reduction_tracks_float32(result):
    # Each device's gradient rounded to 8 significant bits before the sum: Adam's normalised updates move
    # the 4-step loss curve by < 1e-3 relative (the INT8 policy's own noise is ~1e-2, see above).
    a, b = np.asarray(result["int8_sm8_b3_bf16"]), np.asarray(result["int8_sm8"])
    assert np.isfinite(a).all()
    np.testing.assert_allclose(a, b, rtol=1e-3)
    # The INT8 policy's noise is the same in both runs (same keys), so a difference is the bf16 reduction.
    assert not np.array_equal(a, b)


def test_lowered_step_has_one_all_reduce_per_bucket(result):
    hlo = result["hlo"]
    scalar = "tensor<f32>"
    # One psum of (loss, grads): JAX emits an all-reduce per array (XLA's combiner merges them).
    assert len(hlo["default"]["all_reduce_types"]) == hlo["default"]["n_leaves"] + 1
    for name, dtype in (("b3", "f32"), ("b3_bf16", "bf16")):
        types = hlo[name]["all_reduce_types"]
        assert types.count(scalar) == 1 and len(types) == 4, types  # the loss + 3 gradient buckets
        grads = [t for t in types if t != scalar]
        assert all(t.endswith(f"x{dtype}>") for t in grads), grads
    # 3 buckets of a 1-block model: [ln_f], [h_0], [wte, wpe]; together every gradient element once.
    elements = lambda t: int(np.prod([int(n) for n in t[len("tensor<"):-1].split("x")[:-1]]))
    sizes = [elements(t) for t in hlo["b3"]["all_reduce_types"] if t != scalar]
    assert sizes[0] == hlo["b3"]["ln_f"] and sizes[2] == hlo["b3"]["embeddings"]
    assert sum(sizes) == sum(elements(t) for t in hlo["default"]["all_reduce_types"] if t != scalar)
    # gspmd: no collective or barrier in the program JAX hands over; XLA's partitioner inserts and
    # schedules the reductions.
    assert hlo["gspmd"]["all_reduce_types"] == [] and hlo["gspmd"]["barriers"] == 0
    message, written = result["gspmd_refused"]
    assert "--data_parallel=shard_map" in message and not written


def test_checkpoint_resumes_on_other_device_counts(result):
    """Step-2 checkpoints continue the curve of the run that wrote them: 8 -> 1, 8 -> 4 (shard_map with
    bucketed reduction) and 1 -> 8 devices, to the same float32 tolerance as 8 vs 1 devices."""
    for name, src in (("8to1", "fsdp8"), ("8to4", "fsdp8"), ("1to8", "one")):
        r = result["restore_" + name]
        assert r["start"] == 2 and [s for s, _ in r["history"]] == [3, 4]
        np.testing.assert_allclose([loss for _, loss in r["history"]], result[src][2:], rtol=2e-5)


def test_gradient_buckets_follow_the_backward():
    """Whole layers, last block first, embeddings last; about equal bytes; at most one bucket per layer."""
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    block = lambda d: {"attn": {"qkv": {"kernel": f32(d, 3 * d)}}, "mlp": {"fc1": {"kernel": f32(d, 4 * d)},
                                                                           "fc2": {"kernel": f32(4 * d, d)}}}
    tree = {"wte": {"embedding": f32(64, 16)}, "wpe": {"embedding": f32(8, 16)}, "ln_f": {"scale": f32(16)},
            **{f"h_{i}": block(16) for i in range(4)}}
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    names = lambda bucket: {paths[i].split("'")[1] for i in bucket}
    assert [names(b) for b in sharding.gradient_buckets(tree, 6)] == [
        {"ln_f"}, {"h_3"}, {"h_2"}, {"h_1"}, {"h_0"}, {"wpe", "wte"}]
    assert [names(b) for b in sharding.gradient_buckets(tree, 60)] == [
        names(b) for b in sharding.gradient_buckets(tree, 6)]  # never a layer split
    two = sharding.gradient_buckets(tree, 2)
    assert [names(b) for b in two] == [{"ln_f", "h_3", "h_2"}, {"h_1", "h_0", "wpe", "wte"}]
    assert sorted(i for b in sharding.gradient_buckets(tree, 3) for i in b) == list(range(len(paths)))
    with pytest.raises(ValueError, match="buckets"):
        sharding.gradient_buckets(tree, 0)


def test_reduce_gradients_rounds_to_the_reduce_dtype():
    """On a one-device axis the mean is the gradient itself: exact in float32, rounded once in bfloat16,
    returned in float32 either way (bucketed or not)."""
    mesh = sharding.make_mesh(jax.devices()[:1])
    g = {"h_0": {"k": jax.random.normal(jax.random.key(1), (5, 7))}, "ln_f": {"s": jnp.linspace(-3, 3, 7)}}
    for buckets in (0, 2):
        for dtype in (jnp.float32, jnp.bfloat16):
            reduce = functools.partial(sharding.reduce_gradients, buckets=buckets, dtype=dtype)
            fn = jax.shard_map(reduce, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)
            out = fn(g)
            for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(g)):
                assert a.dtype == jnp.float32 and a.shape == b.shape
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b.astype(dtype).astype(jnp.float32)))


def test_grad_reduce_keys_are_checked_and_pick_shard_map():
    import train
    from configs.base import TrainConfig
    from jq8.cli import UsageError
    from jq8.training.policy import Policy

    class TwoDevices:  # use_shard_map reads only the mesh's size
        size = 2

    bf16, two, one = Policy.from_name("bf16"), TwoDevices(), sharding.make_mesh(jax.devices()[:1])
    with pytest.raises(UsageError, match="--grad_reduce_dtype=float16: expected float32 or bfloat16"):
        train.use_shard_map(TrainConfig(grad_reduce_dtype="float16"), bf16, two)
    with pytest.raises(UsageError, match="--grad_reduce_buckets=-1: must be >= 0"):
        train.use_shard_map(TrainConfig(grad_reduce_buckets=-1), bf16, two)
    with pytest.raises(UsageError, match="need --data_parallel=shard_map"):
        train.use_shard_map(TrainConfig(data_parallel="gspmd", grad_reduce_buckets=4), bf16, two)
    assert not train.use_shard_map(TrainConfig(), bf16, two)  # bf16: XLA partitions the step
    assert train.use_shard_map(TrainConfig(grad_reduce_buckets=4), bf16, two)
    assert train.use_shard_map(TrainConfig(grad_reduce_dtype="bfloat16"), bf16, two)
    # One device has nothing to reduce: the keys are accepted and change nothing.
    assert not train.use_shard_map(TrainConfig(data_parallel="gspmd", grad_reduce_buckets=4), bf16, one)
