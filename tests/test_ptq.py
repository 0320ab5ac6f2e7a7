"""ZeroQuant PTQ: rules and schemes, weight quantization, the INT8 GEMM path and the Flax interception."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jq8 import ptq
from jq8.ptq import checkpoint as qcheckpoint
from jq8.ptq import infer as ptq_infer
from jq8.quant import QArray, QuantSpec, dequantize, fake_quantize, int4_width, quantize


def tiny_gpt(layers: int = 2, d: int = 64, heads: int = 4, vocab: int = 203, seq: int = 24, seed: int = 0):
    """(model, params, tokens) for a small models.gpt GPT run in fp32; weights scaled up to be non-trivial."""
    from jq8.training.policy import Policy
    from models.presets import build_model, preset

    cfg = dataclasses.replace(
        preset("gpt-tiny"), num_layers=layers, d_model=d, num_heads=heads, vocab_size=vocab, max_seq_len=seq
    )
    model = build_model(cfg, Policy.from_name("bf16", compute_dtype=jnp.float32, backend="xla"))
    tokens = jax.random.randint(jax.random.PRNGKey(seed + 1), (3, seq), 0, vocab)
    params = jax.jit(model.init)(jax.random.PRNGKey(seed), tokens)["params"]
    # Random biases and LN params so every parameter kind matters (init leaves them 0 / 1).
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 2), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape) if x.ndim == 1 else x for x, k in zip(leaves, keys)]
    return model, jax.tree_util.tree_unflatten(tree, leaves), tokens


_JITTED: dict = {}


def run_int8(model, qp, tokens, backend=None):
    """The INT8 model's logits, jitted once per model (eager dispatch of every small op is slow on CPU)."""
    key = (id(model), backend)
    if key not in _JITTED:
        _JITTED[key] = (model, jax.jit(lambda q, t: ptq_infer.apply_quantized(model, q, t, backend=backend)))
    return _JITTED[key][1](qp, tokens)


@pytest.fixture(scope="module")
def gpt():
    return tiny_gpt(layers=1, d=32, heads=2, vocab=101, seq=16)


# ------------------------------------------------------------------------------------------- rules


def test_dense_paths_and_first_match_wins(gpt):
    _, params, _ = gpt
    paths = ptq.dense_paths(params)
    assert sorted(paths) == sorted(
        f"h_{i}/{s}" for i in range(1) for s in ("attn/qkv", "attn/out", "mlp/fc1", "mlp/fc2")
    )
    rules = [ptq.QuantRule(r"h_0/mlp/fc1$", 4, 16), ptq.QuantRule(r"mlp/", 8), ptq.QuantRule(r"attn/qkv", 8)]
    qp = ptq.quantize_params(params, rules)
    assert qp.rule_for("h_0/mlp/fc1").weight_bits == 4
    assert qp.rule_for("h_0/mlp/fc2").weight_bits == 8
    assert qp.rule_for("h_0/attn/out") is None  # matched by nothing: stays float
    assert "kernel" in params["h_0"]["attn"]["out"] and "kernel" in qp.params["h_0"]["attn"]["out"]
    assert "kernel" not in qp.params["h_0"]["mlp"]["fc1"] and "bias" in qp.params["h_0"]["mlp"]["fc1"]


def test_rule_matching_nothing_lists_paths(gpt):
    _, params, _ = gpt
    with pytest.raises(ValueError, match=r"match no Dense.*h_0/attn/qkv"):
        ptq.quantize_params(params, [ptq.QuantRule("mlp/"), ptq.QuantRule("does_not_exist")])


def test_unknown_scheme_lists_names():
    with pytest.raises(ValueError, match=r"w4/8-a8.*static-w8a8"):
        ptq.scheme("w3a3")


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(weight_bits=3), "weight_bits"),
        (dict(group_axis="cols"), "group_axis"),
        (dict(act_mode="dyn"), "act_mode"),
        (dict(group_size=-1), "per-tensor"),
        (dict(symmetric=False, kind="embedding"), "symmetric"),
        (dict(group_size=0), "positive"),
    ],
)
def test_rule_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ptq.QuantRule("fc1", **kw)
    with pytest.raises(ValueError, match="regex"):
        ptq.QuantRule("fc1(")


def test_head_weight_only_keeps_tables_quantized_and_head_input_float(gpt):
    _, params, _ = gpt
    rules = ptq.head_weight_only(ptq.scheme("w8a8"))
    qp = ptq.quantize_params(params, rules)
    assert qp.embeddings and all(qp.rule_for(p).act_mode == "none" for p in qp.embeddings)
    assert all(qp.rules[i].act_mode == "token" for p, i in qp.assignment if qp.rules[i].kind == "dense")


def test_w48_scheme_assigns_int4_to_mlp_int8_to_attention(gpt):
    _, params, _ = gpt
    qp = ptq.quantize_params(params, ptq.scheme("w4/8-a8", int4_group=32, embedding_bits=8))
    for path, q in qp.weights.items():
        n, k = q.shape
        if "/mlp/" in path:
            assert q.spec.bits == 4 and q.values.dtype == jnp.uint8 and q.values.shape == (n, int4_width(k))
            assert q.scale.shape == (n, -(-k // 32))
        else:
            assert q.spec.bits == 8 and q.values.dtype == jnp.int8 and q.scale.shape == (n, 1)
    assert sorted(qp.embeddings) == ["wpe", "wte"]  # INT8 tables as asked (the w4 default is INT4)
    rep = ptq.bits_report(qp)
    for lay in rep["layers"]:
        k, n = lay["shape"]  # Dense: the kernel's (K, N); a table: (V, D), one scale per row
        if lay["path"] in qp.embeddings:
            k, n = n, k
        w_bits, n_scales = (4, n * -(-k // 32)) if "/mlp/" in lay["path"] else (8, n)
        row_bytes = int4_width(k) if w_bits == 4 else k  # INT4 rows: whole 64-code blocks (padded)
        expect = (n * row_bytes * 8 + 32 * n_scales) / (n * k)  # codes + one f32 per scale
        assert lay["bits_per_weight"] == pytest.approx(expect, abs=1e-3)
    assert rep["total_bytes"] == rep["quantized_bytes"] + rep["float_bytes"]


@pytest.mark.parametrize(
    "bits, group_size, axis",
    [
        (8, None, "contraction"),
        (8, 3, "rows"),
        (4, 16, "contraction"),
        (8, -1, "rows"),
        (4, 24, "contraction"),
    ],
)
def test_quantize_weight_is_transposed_and_within_half_step(bits, group_size, axis):
    rule = ptq.QuantRule("x", bits, group_size, axis)
    w = jax.random.normal(jax.random.PRNGKey(3), (72, 37)) * 0.3  # (K, N): ragged vs every group
    q = ptq.quantize_weight(w, rule)
    assert q.shape == (37, 72)
    err = jnp.abs(q.dequantize(jnp.float32).T - w)
    tile = rule.weight_spec().resolve(37, 72)
    step = jnp.repeat(jnp.repeat(q.scale, tile[0], 0), tile[1], 1)[:37, :72].T
    assert bool(jnp.all(err <= 0.5 * step + 1e-7))


# ------------------------------------------------------------------------------------------- GEMMs


def _ref_product(a, b, bias=None, activation=None, residual=None):
    y = dequantize(a, jnp.float32) @ dequantize(b, jnp.float32).T
    if bias is not None:
        y = y + bias
    if activation == "gelu":
        y = jax.nn.gelu(y, approximate=False)
    return y if residual is None else y + residual


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec.per_row(8),
        QuantSpec.row_runs(5, 8),
        QuantSpec.per_tensor(8),
        QuantSpec.groups(32, 1, 8),
        QuantSpec.groups(32, 1, 4),
        QuantSpec.per_row(4),
        QuantSpec(tile=(1, 32), bits=4, symmetric=False, exact_zero=False),  # scale + min, K groups
        QuantSpec(tile=(1, -1), bits=8, symmetric=False),  # integer zero point per channel
    ],
)
def test_int8_gemm_xla_matches_dequantized_product(spec):
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(7), 4)
    m, k, n = 13, 72, 29
    a = quantize(jax.random.normal(k1, (m, k)), QuantSpec.per_row(8))
    b = quantize(jax.random.normal(k2, (n, k)), spec)
    bias, res = jax.random.normal(k3, (n,)), jax.random.normal(k4, (m, n))
    got = ptq_infer.matmul_qarrays_xla(
        a, b, bias=bias, activation="gelu", residual=res, out_dtype=jnp.float32
    )
    np.testing.assert_allclose(got, _ref_product(a, b, bias, "gelu", res), rtol=2e-5, atol=2e-5)


def test_quantize_static_saturates_and_rounds_like_quant():
    x = jax.random.normal(jax.random.PRNGKey(0), (9, 17)) * 2
    s = jnp.float32(1.5 / 127)  # range [-1.5, 1.5]: larger values saturate
    q = ptq_infer.quantize_static(x, s)
    d = q.dequantize(jnp.float32)
    np.testing.assert_allclose(
        d, jnp.clip(fake_quantize(jnp.clip(x, -1.5, 1.5), QuantSpec.per_tensor()), -1.5, 1.5), atol=1.5 / 127
    )
    assert int(jnp.max(jnp.abs(q.values))) == 127
    inside = jnp.abs(x) < 1.5
    assert bool(jnp.all(jnp.abs(d - x)[inside] <= 0.5 * s + 1e-6))


# ------------------------------------------------------------------------------- whole-model path


def _fake_quant_reference(model, params, qp, tokens):
    """The float model with each quantized Dense replaced by dequant(Q(x)) @ dequant(Q(W)), each quantized
    table by its dequantized value and a tied head by dequant(Q(x)) @ table.T (simulation)."""
    import flax.linen as nn

    from jq8.ptq.lkd import ste_interceptor

    rules = {p: qp.rules[i] for p, i in qp.assignment if qp.rules[i].kind == "dense"}
    dense = ste_interceptor(rules)

    def head_acts(next_fun, args, kwargs, context):
        path = "/".join(context.module.path)
        rule = qp.rule_for(path)
        if context.method_name == "attend" and path in qp.embeddings and rule.act_mode == "token":
            return next_fun(fake_quantize(args[0], QuantSpec.per_row(8)))
        return next_fun(*args, **kwargs)

    @jax.jit
    def run(p, t):
        with nn.intercept_methods(dense), nn.intercept_methods(head_acts):
            return model.apply({"params": p}, t)

    # Float kernels (ste_interceptor quantizes them itself; the norm affines folded as quantize_params did),
    # dequantized tables.
    params = ptq.fold_norm_affines(params, qp.rules)[0] if qp.folded_norms else params
    sim_params = ptq.restore_kernels(dataclasses.replace(qp, params=params, weights={}))
    return run(sim_params, tokens)


@pytest.mark.parametrize("name", ["w8a8", "w4/8-a8", "w4a16"])
def test_int8_model_equals_fake_quant_simulation(gpt, name):
    model, params, tokens = gpt
    qp = ptq.quantize_params(params, ptq.scheme(name, int4_group=32))
    # f32 dots at full precision: on a GPU the default lets XLA use TF32 for the float simulation's GEMMs.
    with jax.default_matmul_precision("highest"):
        got = run_int8(model, qp, tokens)
        sim = _fake_quant_reference(model, params, qp, tokens)
        fp = jax.jit(model.apply)({"params": params}, tokens)
    assert got.shape == fp.shape and got.dtype == jnp.float32
    # Same integer products; differences are fp32 summation order only (plus rare token-scale ties).
    np.testing.assert_allclose(got, sim, rtol=1e-3, atol=1e-3 * float(jnp.max(jnp.abs(fp))))
    err = float(jnp.sqrt(jnp.mean((got - fp) ** 2)) / jnp.sqrt(jnp.mean(fp**2)))
    # INT4 schemes also put the tied LM head in INT4 K-groups (their default): the larger bound.
    assert 0 < err < (0.02 if "8" in name.split("-")[0][:3] and "4" not in name else 0.3), err


def test_int8_path_runs_integer_dots(gpt):
    """The quantized forward contains int8 x int8 -> int32 dots (no float GEMM for quantized layers)."""
    model, params, tokens = gpt
    qp = ptq.quantize_params(params, ptq.scheme("w8a8"))
    text = (
        jax.jit(lambda q, t: ptq_infer.apply_quantized(model, q, t, backend="xla"))
        .lower(qp, tokens)
        .as_text()
    )
    n_int_dots = sum(
        1 for line in text.splitlines() if "dot_general" in line and "xi8" in line and "xi32" in line
    )
    assert n_int_dots >= len(qp.weights), n_int_dots


def test_static_calibration_uses_input_ranges(gpt):
    model, params, tokens = gpt
    qp = ptq.quantize_params(params, ptq.scheme("static-w8a8"))
    with pytest.raises(ValueError, match="calibrate_static"):
        ptq_infer.apply_quantized(model, qp, tokens)

    @jax.jit
    def input_amax(p, t):
        found = {}
        with ptq_infer.record_dense_inputs(
            qp.paths, lambda path, x: found.setdefault(path, jnp.max(jnp.abs(x)))
        ):
            model.apply({"params": p}, t)
        return found

    seen = [input_amax(params, tokens[:2]), input_amax(params, tokens[2:])]
    qp = ptq_infer.calibrate_static(model, params, [tokens[:2], tokens[2:]], qp)
    for p in qp.paths:
        amax = max(float(found[p]) for found in seen)
        np.testing.assert_allclose(float(qp.act_scales[p]), amax / 127, rtol=1e-6)
    out = run_int8(model, qp, tokens)
    fp = jax.jit(model.apply)({"params": params}, tokens)
    assert float(jnp.sqrt(jnp.mean((out - fp) ** 2)) / jnp.sqrt(jnp.mean(fp**2))) < 0.1


def test_fused_branches_match_per_dense_path(gpt, monkeypatch):
    """jq8.training.nn blocks run fused (LN/GELU + quantize in one op); same numbers as intercepting each Dense."""
    model, params, tokens = gpt
    calls = []
    for name in ("_fused_mlp", "_fused_attention"):
        orig = getattr(ptq_infer, name)
        monkeypatch.setattr(
            ptq_infer, name, lambda *a, _o=orig, _n=name, **k: (calls.append(_n), _o(*a, **k))[1]
        )
    qp = ptq.quantize_params(params, ptq.scheme("w4/8-a8", int4_group=32))
    per_dense = jax.jit(lambda q, t: ptq_infer.apply_quantized(model, q, t, fused=False))(qp, tokens)
    assert calls == []
    fused = jax.jit(lambda q, t: ptq_infer.apply_quantized(model, q, t, fused=True))(qp, tokens)
    assert sorted(calls) == ["_fused_attention", "_fused_mlp"]
    np.testing.assert_allclose(fused, per_dense, rtol=1e-5, atol=1e-5)
    # Weight-only layers are not fused (no activation quantization to fuse).
    calls.clear()
    jax.jit(lambda q, t: ptq_infer.apply_quantized(model, q, t))(
        ptq.quantize_params(params, ptq.scheme("w8a16")), tokens
    )
    assert calls == []


def test_fused_pallas_kernels_match_xla(monkeypatch):
    """The Pallas kernels (interpret mode on CPU) give the XLA path's numbers through the whole model. At
    decode sizes (M = 8 tokens here) the GEMMs quantize their own inputs, but an INT4 one after a
    LayerNorm."""
    from pallas_kernels import gemm as bs

    # d=48: ragged against every kernel block. (d=32 trips a K < block_k slicing bug in int8_matmul's
    # interpret mode, reported to the kernel owner.)
    model, params, tokens = tiny_gpt(layers=1, d=48, heads=2, vocab=101, seq=8, seed=4)
    qp = ptq.quantize_params(params, ptq.scheme("w4/8-a8", int4_group=32))
    ref = run_int8(model, qp, tokens[:1], backend="xla")
    norms, residuals, real = [], [], bs.quantize_matmul_qarray

    def spy(*a, **k):
        norms.append(k.get("norm"))
        residuals.append(k.get("residual") is not None)
        return real(*a, **k)

    monkeypatch.setattr(bs, "quantize_matmul_qarray", spy)
    got = run_int8(model, qp, tokens[:1], backend="pallas")
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(ref))))
    # qkv, out, fc2, tied LM head; fc1 (INT4) takes the LayerNorm-quantize kernel's codes (measured faster)
    assert norms == ["layernorm", None, None, None]
    assert residuals == [False, True, True, False]  # out and fc2 add the residual stream in their epilogue


@pytest.mark.parametrize("name", ["static-w8a8", "w4/8-a8"])
def test_llama_without_biases_runs_quantized(name, tmp_path):
    """Regression: a reloaded bias-less LLaMA has no float entry left for its qkv layer (KeyError 'qkv')."""
    from jq8.training.policy import Policy
    from models.presets import build_model, preset

    cfg = dataclasses.replace(
        preset("llama-tiny"), num_layers=1, d_model=32, num_heads=2, vocab_size=97, max_seq_len=16
    )
    model = build_model(cfg, Policy.from_name("bf16", compute_dtype=jnp.float32, backend="xla"))
    tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 16), 0, 97)
    params = jax.jit(model.init)(jax.random.PRNGKey(4), tokens)["params"]
    qp = ptq.quantize_params(params, ptq.scheme(name, int4_group=32))
    if name == "static-w8a8":
        qp = ptq_infer.calibrate_static(model, params, [tokens], qp)
    qcheckpoint.save_quantized(tmp_path / "q", qp, model_config=cfg.to_dict(), float_dtype="float32")
    qp, _ = qcheckpoint.load_quantized(tmp_path / "q")  # the reload drops the now-empty param dicts
    out = jax.jit(lambda q, t: ptq_infer.apply_quantized(model, q, t))(qp, tokens)
    fp = jax.jit(model.apply)({"params": params}, tokens)
    bound = 0.3 if "4" in name else 0.2  # INT4 schemes: INT4 LM head too (their default)
    assert float(jnp.sqrt(jnp.mean((out - fp) ** 2)) / jnp.sqrt(jnp.mean(fp**2))) < bound


def test_fused_prefill_pallas_matches_xla(monkeypatch):
    """At prefill sizes (M = 24 > 16 tokens) the fused path runs the GEMM kernels with their epilogues: qkv
    written as q, k, v apart (attend gets a tuple), fc1 with bias + GELU, a per-token quantize, fc2 with the
    residual; the same numbers as the XLA integer path."""
    from jq8.training.nn import AttentionBlock

    model, params, tokens = tiny_gpt(layers=1, d=48, heads=2, vocab=101, seq=8, seed=5)
    qp = ptq.quantize_params(params, ptq.scheme("w8a8"))
    ref = run_int8(model, qp, tokens, backend="xla")
    kinds, real = [], AttentionBlock.attend

    def spy(self, qkv, *a, **k):
        kinds.append(type(qkv).__name__)
        return real(self, qkv, *a, **k)

    monkeypatch.setattr(AttentionBlock, "attend", spy)
    jax.clear_caches()
    got = jax.jit(lambda q, t: ptq_infer.apply_quantized(model, q, t, backend="pallas"))(qp, tokens)
    jax.clear_caches()
    assert kinds == ["tuple"]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(ref))))


def test_fc1_codes_path_matches_xla_and_per_token_path(monkeypatch):
    """The Hopper prefill MLP (fc1 requantizes its output per token and per 128 columns, fc2 folds those
    scales in per K group), forced on here: the Pallas kernels (interpret mode) give the XLA twin's numbers,
    and the model stays as close to the per-token path as one quantization step allows."""
    model, params, tokens = tiny_gpt(layers=1, d=64, heads=2, vocab=101, seq=12, seed=6)
    qp = ptq.quantize_params(params, ptq.scheme("w8a8"))
    per_token = run_int8(model, qp, tokens, backend="xla")
    groups = []

    def forced(m, w1, w2, backend):
        groups.append(w1.shape_2d)
        return 128

    monkeypatch.setattr(ptq_infer, "fc1_codes_group", forced)
    jax.clear_caches()
    try:
        ref = run_int8(model, qp, tokens, backend="xla")
        got = run_int8(model, qp, tokens, backend="pallas")
    finally:
        jax.clear_caches()
    assert groups and all(shape == (256, 64) for shape in groups)  # fc1: d_ff 256 = two groups
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(ref))))
    rel = float(jnp.sqrt(jnp.mean((ref - per_token) ** 2) / jnp.mean(per_token**2)))
    assert 0 < rel < 0.02, rel  # a different (finer) quantization of u, not the same numbers


def test_matmul_qarrays_xla_groups_of_a_equal_per_row_when_scales_agree():
    ks = jax.random.split(jax.random.key(3), 3)
    a = jax.random.randint(ks[0], (16, 256), -127, 128, jnp.int8)
    b = quantize(jax.random.normal(ks[1], (48, 256)), QuantSpec.per_row(8))
    s = jax.random.uniform(ks[2], (16, 1), minval=0.01, maxval=0.02)
    per_row = QArray(a, s, None, QuantSpec.per_row(8), (16, 256), jnp.float32)
    grouped = QArray(a, jnp.tile(s, (1, 2)), None, QuantSpec(tile=(1, 128)), (16, 256), jnp.float32)
    y1 = ptq_infer.matmul_qarrays_xla(per_row, b, out_dtype=jnp.float32)
    y2 = ptq_infer.matmul_qarrays_xla(grouped, b, out_dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(y2), np.asarray(y1), rtol=1e-5, atol=1e-5)
    k_groups = quantize(jax.random.normal(ks[1], (48, 256)), QuantSpec(tile=(1, 64)))
    with pytest.raises(ValueError, match="per-channel"):
        ptq_infer.matmul_qarrays_xla(grouped, k_groups)


def test_fc1_codes_group_only_where_measured_faster(monkeypatch):
    """On Hopper at prefill sizes: GPT-2 124M's MLP (fc2 tiles 128 wide) takes fc1's own codes, 1.5B's
    (160 wide) keeps the per-token pass; never on XLA, at decode sizes or with INT4 weights."""
    from pallas_kernels import int8_matmul_mgpu as mg

    monkeypatch.setattr(mg, "available", lambda: True)

    def weights(d, f, scheme="w8a8"):
        ks = jax.random.split(jax.random.key(d), 3)
        params = {
            "attn": {"out": {"kernel": jax.random.normal(ks[2], (d, d))}},  # the schemes' attention rules
            "mlp": {"fc1": {"kernel": jax.random.normal(ks[0], (d, f))},
                    "fc2": {"kernel": jax.random.normal(ks[1], (f, d))}},
        }  # fmt: skip
        qp = ptq.quantize_params(params, ptq.scheme(scheme, int4_group=128))
        return qp.weights["mlp/fc1"], qp.weights["mlp/fc2"]

    w1, w2 = weights(768, 3072)
    assert ptq_infer.fc1_codes_group(8192, w1, w2, "pallas") == 128
    assert ptq_infer.fc1_codes_group(8192, w1, w2, "xla") is None
    assert ptq_infer.fc1_codes_group(8, w1, w2, "pallas") is None
    assert ptq_infer.fc1_codes_group(8192, *weights(1600, 6400), "pallas") is None  # fc2 tiles 160 wide
    monkeypatch.setattr(ptq_infer, "FC1_CODES_GROUPS", (256, 128))
    # 124M's fc2 with 256-wide K steps would not fit in shared memory: the next group is taken
    assert ptq_infer.fc1_codes_group(8192, w1, w2, "pallas") == 128
    assert ptq_infer.fc1_codes_group(8192, *weights(1600, 6400), "pallas") == 256
    assert ptq_infer.fc1_codes_group(8192, *weights(768, 3072, "w4/8-a8"), "pallas") is None
