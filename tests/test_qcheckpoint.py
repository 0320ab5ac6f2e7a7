"""Compact quantized checkpoints: round trip, sharded restore, atomic writes, size on disk, versions, errors."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_ptq import run_int8, tiny_gpt
from test_quantize_cli import SMALL, ckpt  # noqa: F401, F811 (ckpt: a fixture)

from jq8 import ptq
from jq8.ptq import checkpoint as qcheckpoint
from jq8.ptq import infer as ptq_infer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quantized():
    model, params, tokens = tiny_gpt(d=64, heads=2, vocab=97, seq=16, seed=5)
    qp = ptq.quantize_params(params, ptq.scheme("w4/8-a8", int4_group=32))
    return model, qp, tokens


def assert_same(qp2, qp, float_dtype="float32"):
    """qp2 holds exactly what a checkpoint of qp stores (float params rounded through float_dtype)."""
    assert qp2.rules == qp.rules and dict(qp2.assignment) == dict(qp.assignment)
    assert qp2.folded_norms == qp.folded_norms and sorted(qp2.act_scales) == sorted(qp.act_scales)
    for mine, theirs in ((qp2.weights, qp.weights), (qp2.embeddings, qp.embeddings)):
        assert sorted(mine) == sorted(theirs)
        for path, q in theirs.items():
            q2 = mine[path]
            assert q2.spec == q.spec and q2.shape == q.shape and q2.dtype == q.dtype
            assert q2.values.dtype == q.values.dtype
            np.testing.assert_array_equal(q2.values, q.values)
            np.testing.assert_array_equal(q2.scale, q.scale)
            assert (q2.zero_point is None) == (q.zero_point is None)
    # (module dicts left empty by quantization, e.g. {"wte": {}}, are not stored)
    stored = qcheckpoint._flatten(qcheckpoint.as_stored(qp, float_dtype).params)
    loaded = qcheckpoint._flatten(qp2.params)
    assert sorted(stored) == sorted(loaded)
    for k, a in stored.items():
        assert loaded[k].dtype == jnp.float32
        np.testing.assert_array_equal(a, loaded[k])
    for k, s in qp.act_scales.items():
        np.testing.assert_array_equal(qp2.act_scales[k], s)


@pytest.mark.parametrize("float_dtype", ["float16", "bfloat16", "float32"])
def test_round_trip_is_exact_and_runs(tmp_path, quantized, float_dtype):
    model, qp, tokens = quantized
    out = qcheckpoint.save_quantized(
        tmp_path / "q", qp, model_config={"d_model": 64}, extra={"x": 1}, float_dtype=float_dtype
    )
    qp2, manifest = qcheckpoint.load_quantized(out)
    assert manifest["model_config"] == {"d_model": 64} and manifest["extra"] == {"x": 1}
    assert manifest["format_version"] == qcheckpoint.FORMAT_VERSION == 4
    assert (out / qcheckpoint.MANIFEST).is_file() and (out / qcheckpoint.ARRAYS).is_dir()
    assert_same(qp2, qp, float_dtype)
    stored = qcheckpoint.as_stored(qp, float_dtype)
    np.testing.assert_array_equal(run_int8(model, qp2, tokens), run_int8(model, stored, tokens))


def test_orbax_alone_restores_codes_and_manifest(tmp_path, quantized):
    """The directory is a plain Orbax checkpoint: INT4 codes stay packed uint8, the manifest is JSON."""
    import orbax.checkpoint as ocp

    _, qp, _ = quantized
    out = qcheckpoint.save_quantized(tmp_path / "q", qp)
    args = ocp.args.Composite(arrays=ocp.args.PyTreeRestore(), manifest=ocp.args.JsonRestore())
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        got = ckptr.restore(out, args=args)
    assert got["manifest"] == json.loads((out / qcheckpoint.MANIFEST).read_text())
    path, q = next((p, q) for p, q in qp.weights.items() if q.spec.bits == 4)
    node = got["arrays"]["w"]
    for k in path.split("/"):
        node = node[k]
    assert node["values"].dtype == np.uint8 and node["values"].shape[1] * 2 == q.shape[1]  # 2 codes a byte
    np.testing.assert_array_equal(node["values"], q.values)
    assert got["manifest"]["weights"][path]["spec"]["bits"] == 4


def test_relative_paths_save_and_load(quantized, tmp_path, monkeypatch):
    """quantize.py --out runs/x passes a relative path; Orbax itself takes absolute ones only."""
    _, qp, _ = quantized
    monkeypatch.chdir(tmp_path)
    qcheckpoint.save_quantized("runs/q", qp)
    back, _ = qcheckpoint.load_quantized("runs/q")
    path = next(iter(qp.weights))
    np.testing.assert_array_equal(back.weights[path].values, qp.weights[path].values)


@pytest.mark.parametrize("compress", [False, True])
def test_size_on_disk_is_the_bits(tmp_path, quantized, compress):
    _, qp, _ = quantized
    out = qcheckpoint.save_quantized(tmp_path / "q", qp, float_dtype="float32", compress=compress)
    bits = ptq.bits_report(qp, "float32")["total_bytes"]
    disk = qcheckpoint.disk_bytes(out)
    n_arrays = sum(2 + (q.zero_point is not None) for q in [*qp.weights.values(), *qp.embeddings.values()])
    n_arrays += len(jax.tree.leaves(qp.params))
    # Orbax's own files: ~16 KB a checkpoint + ~0.6 KB an array (metadata, sharding, OCDBT index).
    overhead = 24_000 + 1_000 * n_arrays
    if compress:  # INT8 / INT4 codes and f32 scales barely compress
        assert 0.6 * bits < disk <= bits + overhead, (disk, bits)
    else:
        assert bits <= disk <= bits + overhead, (disk, bits, n_arrays)


def test_static_scales_survive(tmp_path):
    model, params, tokens = tiny_gpt(d=32, heads=2, vocab=61, seq=8, seed=2)
    qp = ptq.quantize_params(params, ptq.scheme("static-w8a8"))
    qp = ptq_infer.calibrate_static(model, params, [tokens], qp)
    qp2, _ = qcheckpoint.load_quantized(qcheckpoint.save_quantized(tmp_path / "s", qp, float_dtype="float32"))
    assert set(qp2.act_scales) == set(qp.act_scales) and qp.act_scales
    assert_same(qp2, qp)
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
    with pytest.raises(ValueError, match="float_dtype"):
        qcheckpoint.save_quantized(tmp_path / "x", qp, float_dtype="int8")
    with pytest.raises(ValueError, match="mesh= or shardings="):
        qcheckpoint.load_quantized(dest, mesh=jax.make_mesh((1,), ("x",)), shardings=jax.devices()[0])


def test_failed_write_keeps_the_old_checkpoint_and_leaves_nothing(tmp_path, quantized, monkeypatch):
    import orbax.checkpoint as ocp

    _, qp, _ = quantized
    dest = qcheckpoint.save_quantized(tmp_path / "q", qp, extra={"v": 1})
    before = sorted(str(p.relative_to(dest)) for p in dest.rglob("*"))

    async def boom(*a, **k):  # the arrays are (partly) written by now; the manifest fails
        raise OSError("disk full")

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", boom)
    with pytest.raises(OSError, match="disk full"):
        qcheckpoint.save_quantized(dest, qp, extra={"v": 2}, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        qcheckpoint.save_quantized(tmp_path / "new", qp)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    monkeypatch.undo()
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == before
    qp2, manifest = qcheckpoint.load_quantized(dest)
    assert manifest["extra"] == {"v": 1}
    assert_same(qp2, qp, "float16")


def test_damaged_arrays_are_one_clear_error(tmp_path, quantized):
    _, qp, _ = quantized
    dest = qcheckpoint.save_quantized(tmp_path / "q", qp)
    biggest = max((p for p in (dest / qcheckpoint.ARRAYS).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    os.truncate(biggest, 100)
    with pytest.raises(ValueError, match="cannot read the arrays") as e:
        qcheckpoint.load_quantized(dest)
    assert "\n" not in str(e.value) and str(dest) in str(e.value)


# --------------------------------------------------------------------------------- versions that load


def write_format_3(out, qp, float_dtype: str = "float16") -> dict:
    """A checkpoint in the layout jq8 0.1.0 wrote (format 3: manifest.json + uncompressed arrays.npz),
    reproduced from that release's writer; returns its manifest."""
    arrays = {}

    def put(key, q):
        arrays[f"{key}/values"] = np.asarray(q.values)
        arrays[f"{key}/scale"] = np.asarray(q.scale, np.float32)
        if q.zero_point is not None:
            arrays[f"{key}/zero_point"] = np.asarray(q.zero_point, np.float32)
        spec = {"tile": list(q.spec.tile), "bits": q.spec.bits, "symmetric": q.spec.symmetric}
        return {"shape": list(q.shape), "dtype": jnp.dtype(q.dtype).name, "spec": spec}

    weights = {p: put(f"w/{p}", q) for p, q in qp.weights.items()}
    tables = {p: put(f"e/{p}", q) for p, q in qp.embeddings.items()}
    floats = {}
    for path, v in qcheckpoint._flatten(qp.params).items():
        keep = jnp.dtype(float_dtype) if jnp.issubdtype(v.dtype, jnp.floating) else jnp.dtype(v.dtype)
        a = np.asarray(jnp.asarray(v).astype(keep))
        arrays[f"p/{path}"] = a.view(np.uint16) if keep == jnp.bfloat16 else a
        floats[path] = keep.name
    for path, s in qp.act_scales.items():
        arrays[f"s/{path}"] = np.asarray(s, np.float32)
    manifest = {
        "format": "jq8-quantized",
        "format_version": 3,
        "rules": [r.__dict__ for r in qp.rules],
        "assignment": {p: i for p, i in qp.assignment},
        "weights": weights,
        "embeddings": tables,
        "folded_norms": list(qp.folded_norms),
        "float_params": floats,
        "float_dtype": float_dtype,
        "model_config": {},
        "extra": {},
    }
    out.mkdir()
    with open(out / "arrays.npz", "wb") as f:
        np.savez(f, **arrays)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


@pytest.mark.parametrize("float_dtype", ["bfloat16", "float16"])
def test_format_3_npz_checkpoints_still_load(tmp_path, quantized, float_dtype):
    model, qp, tokens = quantized
    write_format_3(tmp_path / "v3", qp, float_dtype)
    qp2, manifest = qcheckpoint.load_quantized(tmp_path / "v3")
    assert manifest["format_version"] == 3
    assert_same(qp2, qp, float_dtype)
    stored = qcheckpoint.as_stored(qp, float_dtype)
    np.testing.assert_array_equal(run_int8(model, qp2, tokens), run_int8(model, stored, tokens))
    # ... and one written before folded_norms existed: the norms run with their stored unit affine.
    m = json.loads((tmp_path / "v3" / "manifest.json").read_text())
    del m["folded_norms"]
    (tmp_path / "v3" / "manifest.json").write_text(json.dumps(m))
    assert qcheckpoint.load_quantized(tmp_path / "v3")[0].folded_norms == ()


@pytest.mark.parametrize("version", [1, 2])
def test_pre_release_formats_are_refused_with_the_fix(tmp_path, quantized, version):
    _, qp, _ = quantized
    m = write_format_3(tmp_path / "old", qp)
    (tmp_path / "old" / "manifest.json").write_text(json.dumps({**m, "format_version": version}))
    with pytest.raises(ValueError, match=f"format_version {version} was written by a pre-release") as e:
        qcheckpoint.load_quantized(tmp_path / "old")
    assert "quantize the model again" in str(e.value) and "\n" not in str(e.value)


def test_newer_or_mislabelled_versions_are_refused(tmp_path, quantized):
    _, qp, _ = quantized
    dest = qcheckpoint.save_quantized(tmp_path / "q", qp)
    m = json.loads((dest / qcheckpoint.MANIFEST).read_text())
    (dest / qcheckpoint.MANIFEST).write_text(json.dumps({**m, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99 is newer than this jq8 reads .* upgrade jq8"):
        qcheckpoint.load_quantized(dest)
    m3 = write_format_3(tmp_path / "v3", qp)
    (tmp_path / "v3" / "manifest.json").write_text(json.dumps({**m3, "format_version": 4}))
    with pytest.raises(ValueError, match="does not match its file layout"):
        qcheckpoint.load_quantized(tmp_path / "v3")
    (tmp_path / "v3" / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        qcheckpoint.read_manifest(tmp_path / "v3")


# --------------------------------------------------------------------------------- sharded restore

SHARDED = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, REPO); sys.path.insert(0, os.path.join(REPO, "tests"))
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from test_ptq import tiny_gpt
    from test_qcheckpoint import write_format_3
    from jq8 import ptq
    from jq8.ptq import checkpoint as qcheckpoint
    from jq8.ptq import infer as ptq_infer

    assert jax.device_count() == 8, jax.devices()
    # d=64: qkv (192, 64), out (64, 64), fc1 (256, 64), fc2 (64, 256) as (N, K); vocab 100 (not 8 | 100).
    model, params, tokens = tiny_gpt(d=64, heads=2, vocab=100, seq=16, seed=3)
    rules = ptq.scheme("w4/8-a8", int4_group=32)
    rules = [ptq.QuantRule(r"h_0/attn/qkv$", 8, 32, "rows"), *rules]  # row groups of 32: 192 = 6 x 32
    qp = qcheckpoint.as_stored(ptq.quantize_params(params, rules), "bfloat16")
    ref = np.asarray(jax.jit(lambda q, t: ptq_infer.apply_quantized(model, q, t, backend="xla"))(qp, tokens))
    qcheckpoint.save_quantized(os.path.join(TMP, "q"), qp, float_dtype="bfloat16")
    write_format_3(__import__("pathlib").Path(TMP) / "v3", qp, "bfloat16")
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 4), ("data", "model"))
    out = {}
    # Small chunks: each array is read back from several.
    qcheckpoint.CHUNK_BYTES = 2048
    qcheckpoint.save_quantized(os.path.join(TMP, "chunked"), qp, float_dtype="bfloat16")
    import orbax.checkpoint as ocp
    h = ocp.CompositeCheckpointHandler(arrays=ocp.PyTreeCheckpointHandler(), manifest=ocp.JsonCheckpointHandler())
    with ocp.Checkpointer(h) as ckptr:
        stored = ckptr.metadata(os.path.join(TMP, "chunked")).item_metadata["arrays"].tree
    fc1 = stored["w"]["h_1"]["mlp"]["fc1"]["values"]
    out["chunk"] = {"shape": list(fc1.shape), "chunk": list(fc1.storage.chunk_shape)}

    def describe(qp2):
        arrays = {}
        for sec, d in (("w", qp2.weights), ("e", qp2.embeddings)):
            for path, q in d.items():
                for f in ("values", "scale"):
                    a = getattr(q, f)
                    arrays[f"{sec}/{path}/{f}"] = a
        for path, a in jax.tree_util.tree_flatten_with_path(qp2.params)[0]:
            arrays["p/" + "/".join(k.key for k in path)] = a
        res = {}
        for k, a in arrays.items():
            shard = a.addressable_shards[0].data.shape
            res[k] = {"spec": str(a.sharding.spec), "shard": list(shard), "shape": list(a.shape),
                      "devices": len(a.sharding.device_set), "mesh": a.sharding.mesh.shape_tuple == mesh.shape_tuple}
        return res

    def same(qp2):
        pairs = [(qp.weights[p].values, q.values) for p, q in qp2.weights.items()]
        pairs += [(qp.weights[p].scale, q.scale) for p, q in qp2.weights.items()]
        pairs += [(qp.embeddings[p].values, q.values) for p, q in qp2.embeddings.items()]
        pairs += list(zip(jax.tree.leaves(qp.params), jax.tree.leaves(qp2.params)))
        return all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs)

    for name in ("q", "v3", "chunked"):
        qp2, _ = qcheckpoint.load_quantized(os.path.join(TMP, name), mesh=mesh)
        got = jax.jit(lambda q, t: ptq_infer.apply_quantized(model, q, t, backend="xla"))(qp2, tokens)
        out[name] = {"arrays": describe(qp2), "same": same(qp2),
                     "logits_err": float(np.max(np.abs(np.asarray(got) - ref))),
                     "logits_scale": float(np.max(np.abs(ref)))}
    # Only the "model" axis; and a function of one's own.
    by_model = qcheckpoint.output_channel_shardings(mesh, "model")
    qp3, _ = qcheckpoint.load_quantized(os.path.join(TMP, "q"), shardings=by_model)
    out["model_axis"] = describe(qp3)
    rep = NamedSharding(mesh, P())
    seen = []
    def mine(key, x):
        seen.append((key, type(x).__name__))
        return rep
    qp4, _ = qcheckpoint.load_quantized(os.path.join(TMP, "q"), shardings=mine)
    out["mine_keys"] = sorted(set(seen))
    out["mine_specs"] = sorted({str(s["spec"]) for s in describe(qp4).values()})
    out["mine_same"] = same(qp4)
    try:
        qcheckpoint.output_channel_shardings(mesh, "tensor")
    except ValueError as e:
        out["bad_axis"] = str(e)
    print("RESULT " + json.dumps(out))
""")


# The tests that share it go to one xdist worker (README's `--dist loadgroup`): the subprocess runs once.
on_one_worker = pytest.mark.xdist_group("qshard")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("qshard"))
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    code = f"REPO = {REPO!r}\nTMP = {tmp!r}\n" + SHARDED
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


@on_one_worker
@pytest.mark.parametrize("name", ["q", "v3", "chunked"])
def test_restore_onto_a_mesh_splits_output_channels(sharded, name):
    res = sharded[name]
    arrays = res["arrays"]
    assert res["same"], "values changed on the way to the mesh"
    assert res["logits_err"] <= 1e-5 * res["logits_scale"], res
    split = str(jax.sharding.PartitionSpec(("data", "model"), None))
    for path, rows in [("h_1/attn/qkv", 192), ("h_0/attn/out", 64), ("h_1/mlp/fc1", 256), ("h_1/mlp/fc2", 64)]:
        for f in ("values", "scale"):
            a = arrays[f"w/{path}/{f}"]
            assert a["spec"] == split and a["devices"] == 8 and a["mesh"], (path, f, a)
            assert a["shard"][0] * 8 == a["shape"][0] and a["shard"][1] == a["shape"][1], (path, f, a)
        assert arrays[f"w/{path}/values"]["shape"][0] == rows
    # Scales of 32-row groups on h_0's qkv: 192 rows do not split 8 ways in whole groups (24 rows a
    # device), and the vocabulary (100 rows) not at all: those stay whole on every device.
    whole = str(jax.sharding.PartitionSpec(None, None))
    for key in ("w/h_0/attn/qkv/values", "w/h_0/attn/qkv/scale", "e/wte/values", "e/wte/scale"):
        assert arrays[key]["spec"] == whole and arrays[key]["shard"] == arrays[key]["shape"], key
    assert arrays["w/h_0/attn/qkv/scale"]["shape"] == [6, 1]
    # Float params: 1-D (norms, biases) replicated.
    assert arrays["p/ln_f/scale"]["spec"] == str(jax.sharding.PartitionSpec(None))
    assert arrays["p/h_0/attn/qkv/bias"]["shard"] == [192]


@on_one_worker
def test_restore_onto_one_mesh_axis_and_custom_shardings(sharded):
    a = sharded["model_axis"]["w/h_1/mlp/fc1/values"]
    assert a["spec"] == str(jax.sharding.PartitionSpec("model", None)) and a["shard"][0] * 4 == a["shape"][0]
    keys = dict(sharded["mine_keys"])
    assert keys["w/h_0/mlp/fc1"] == "QArray" and keys["e/wte"] == "QArray"
    assert keys["p/ln_f/scale"] == "ShapeDtypeStruct" and "w/h_0/mlp/fc1/values" not in keys
    assert sharded["mine_specs"] == [str(jax.sharding.PartitionSpec())] and sharded["mine_same"]
    assert "not an axis of the mesh" in sharded["bad_axis"]


# ------------------------------------------------------------------------------------ LKD progress


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def three_blocks():
    model, params, _ = tiny_gpt(layers=3, d=32, heads=2, vocab=61, seq=8, seed=7)
    tokens = jax.random.randint(jax.random.PRNGKey(8), (8, 8), 0, 61)
    return model, params, [tokens[:4], tokens[4:]]


def interrupt_after(n: int):
    """A ``log`` callback that raises once ``n`` blocks have been reported (i.e. saved)."""
    seen = []

    def log(msg):
        seen.append(msg)
        if len(seen) == n:
            raise Stop(msg)

    return log


@pytest.mark.parametrize("mode", ["fp", "quantized"])
def test_lkd_resumes_after_the_last_finished_block_with_the_same_result(tmp_path, three_blocks, mode):
    from jq8.ptq import lkd

    model, params, chunks = three_blocks
    rules = ptq.scheme("w4/8-a8", int4_group=16)
    cfg = lkd.LKDConfig(steps=6, lr=3e-4, batch_size=4, lkd_input=mode, progress=False)
    want, want_rep = lkd.distill(model, params, rules, chunks, cfg)
    assert all(r["loss_after_raw"] < r["loss_before"] for r in want_rep), want_rep  # every block trained
    saved = tmp_path / "lkd"
    with pytest.raises(Stop, match="h_0"):
        lkd.distill(model, params, rules, chunks, cfg, log=interrupt_after(1), checkpoint_dir=saved)
    assert sorted(p.name for p in saved.iterdir()) == ["block_0000"]
    msgs = []
    got, got_rep = lkd.distill(model, params, rules, chunks, cfg, log=msgs.append, checkpoint_dir=saved)
    assert [m.endswith("(restored)") for m in msgs] == [True, False, False], msgs
    assert sorted(p.name for p in saved.iterdir()) == ["block_0000", "block_0001", "block_0002"]
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b)  # bit for bit
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(got_rep) == drop(want_rep)
    # A finished run restores every block and trains none.
    msgs.clear()
    again, _ = lkd.distill(model, params, rules, chunks, cfg, log=msgs.append, checkpoint_dir=saved)
    assert all(m.endswith("(restored)") for m in msgs) and len(msgs) == 3
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)


def test_lkd_refuses_the_progress_of_another_run(tmp_path, three_blocks):
    from jq8.ptq import lkd

    model, params, chunks = three_blocks
    rules = ptq.scheme("w8a8")
    cfg = lkd.LKDConfig(steps=1, batch_size=4, progress=False)
    saved = tmp_path / "lkd"
    with pytest.raises(Stop):
        lkd.distill(model, params, rules, chunks, cfg, log=interrupt_after(1), checkpoint_dir=saved)
    other_params = jax.tree.map(lambda x: x, params)
    other_params["h_2"]["mlp"]["fc1"]["bias"] = params["h_2"]["mlp"]["fc1"]["bias"].at[3].add(1e-3)
    for kwargs in (
        dict(config=dataclasses.replace(cfg, seed=1)),
        dict(config=dataclasses.replace(cfg, steps=2)),
        dict(calib_chunks=[chunks[0], chunks[1].at[0, 0].set((chunks[1][0, 0] + 1) % 61)]),
        dict(params=other_params),
        dict(rules=ptq.scheme("w4/8-a8", int4_group=16)),
    ):
        args = {**dict(model=model, params=params, rules=rules, calib_chunks=chunks, config=cfg), **kwargs}
        with pytest.raises(ValueError, match="holds the progress of another run") as e:
            lkd.distill(**args, checkpoint_dir=saved)
        assert "\n" not in str(e.value)
    assert sorted(p.name for p in saved.iterdir()) == ["block_0000"]  # nothing of it was touched
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        lkd.distill(model, params, rules, chunks, cfg, checkpoint_dir=tmp_path / "f")


@on_one_worker
def test_arrays_are_stored_in_row_chunks(sharded):
    """fc1's (256, 32) packed INT4 codes in 2 KB chunks: 64 whole rows each (the longest axis is cut)."""
    assert sharded["chunk"] == {"shape": [256, 32], "chunk": [64, 32]}, sharded["chunk"]
