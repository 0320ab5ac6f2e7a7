"""Grouped-query attention (num_kv_heads < num_heads) in jq8's model, KV cache, INT8 paths, PTQ and LKD.

Each check compares to a reference that repeats every KV head for its query heads (plain multi-head
attention), written here in the tests only: the model itself never expands the KV heads.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jq8 import ptq
from jq8.inference import decode
from jq8.ptq import infer as ptq_infer
from jq8.ptq import lkd
from jq8.training.nn import AttentionBlock, rotary
from jq8.training.policy import Policy
from models.presets import build_model, preset

F32 = Policy.from_name("bf16", compute_dtype=jnp.float32)


def _attention_reference(params, x, heads, kv_heads, *, rope_theta, eps=1e-5):
    """RMSNorm -> qkv -> rotary -> attention over KV heads repeated to ``heads`` -> out, in fp32."""
    p = params
    xf = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * p["norm"]["scale"]
    y = xf @ p["qkv"]["kernel"] + p["qkv"].get("bias", 0.0)
    b, t, d = x.shape
    dh = d // heads
    q, k, v = jnp.split(y, [heads * dh, (heads + kv_heads) * dh], axis=-1)
    q, k, v = q.reshape(b, t, heads, dh), k.reshape(b, t, kv_heads, dh), v.reshape(b, t, kv_heads, dh)
    q, k = rotary(q, rope_theta), rotary(k, rope_theta)
    k, v = (jnp.repeat(a, heads // kv_heads, axis=2) for a in (k, v))
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh)
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v).reshape(b, t, d)
    return o @ p["out"]["kernel"]


@pytest.mark.parametrize("heads,kv_heads,qkv_bias", [(4, 2, False), (6, 1, True), (4, 4, False)])
def test_attention_block_matches_repeated_kv_reference(heads, kv_heads, qkv_bias):
    block = AttentionBlock(heads, F32, norm="rmsnorm", rotary=True, num_kv_heads=kv_heads, qkv_bias=qkv_bias,
                           rope_theta=5e4)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 48))
    params = block.init(jax.random.PRNGKey(1), x)["params"]
    dh = 48 // heads
    assert params["qkv"]["kernel"].shape == (48, (heads + 2 * kv_heads) * dh)
    assert ("bias" in params["qkv"]) == qkv_bias and "bias" not in params["out"]
    if qkv_bias:
        params = jax.tree_util.tree_map(lambda a: a, params)
        params["qkv"]["bias"] = jax.random.normal(jax.random.PRNGKey(2), params["qkv"]["bias"].shape)
    got = block.apply({"params": params}, x)
    want = _attention_reference(params, x, heads, kv_heads, rope_theta=5e4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _llama(kv_heads=2, layers=2, **kw):
    cfg = dataclasses.replace(preset("llama-tiny"), num_layers=layers, d_model=64, num_heads=4, num_kv_heads=kv_heads,
                              vocab_size=97, max_seq_len=32, **kw)
    model = build_model(cfg, F32)
    params = jax.jit(model.init)(jax.random.PRNGKey(3), jnp.zeros((1, 8), jnp.int32))["params"]
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(4), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape) if x.ndim == 1 else x for x, k in zip(leaves, keys)]
    return cfg, model, jax.tree_util.tree_unflatten(tree, leaves)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_kv_cache_holds_kv_heads_and_decodes_like_the_full_pass(impl):
    cfg, _, params = _llama(qkv_bias=True, tie_embeddings=True, attention=impl)
    model = build_model(cfg, F32)
    tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 9), 0, cfg.vocab_size)
    full = model.apply({"params": params}, tokens)
    cache = decode.init_cache(model, batch=2, max_len=16)
    assert cache["h_0"]["attn"]["cached_key"].shape == (2, 16, 2, 16)  # (B, L, Hkv, Dh): not expanded
    apply_fn = jax.jit(decode.float_apply_fn(model, params))
    logits, cache = apply_fn(tokens[:, :5], cache)
    steps = [logits]
    for i in range(5, 9):  # one token a step: the Pallas decode kernel with impl="pallas"
        logits, cache = apply_fn(tokens[:, i : i + 1], cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, rtol=1e-4, atol=1e-4)


def test_jetfire_int8_attention_with_grouped_heads():
    """The INT8 training path splits the qkv GEMM's output into KV-head-wide blocks: close to bf16."""
    x = jax.random.normal(jax.random.PRNGKey(6), (1, 32, 64))
    kw = dict(norm="rmsnorm", rotary=True, num_kv_heads=2)
    block = AttentionBlock(4, F32, **kw)
    params = block.init(jax.random.PRNGKey(7), x)["params"]
    want = block.apply({"params": params}, x)
    int8 = AttentionBlock(4, Policy.from_name("jetfire-int8"), **kw)
    rngs = {"quant": jax.random.PRNGKey(0)}
    got = int8.apply({"params": params}, x, rngs=rngs)
    rel = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    assert got.shape == want.shape and rel < 0.05, rel
    g = jax.grad(lambda p: jnp.sum(int8.apply({"params": p}, x, rngs=rngs) * want))(params)["qkv"]["kernel"]
    g_ref = jax.grad(lambda p: jnp.sum(block.apply({"params": p}, x) * want))(params)["qkv"]["kernel"]
    rel_g = float(jnp.linalg.norm(g - g_ref) / jnp.linalg.norm(g_ref))
    assert rel_g < 0.1, rel_g


@pytest.mark.parametrize("scheme", ["w8a8", "w4/8-a8"])
def test_ptq_fused_path_matches_per_dense_path(scheme):
    cfg, model, params = _llama(qkv_bias=True)
    tokens = jax.random.randint(jax.random.PRNGKey(8), (2, 12), 0, cfg.vocab_size)
    qp = ptq.quantize_params(params, ptq.scheme(scheme, int4_group=32))
    # eager: under jit XLA may order float ops differently in the two programs, which can move a token's
    # INT8 code by one step
    fused = ptq_infer.apply_quantized(model, qp, tokens, fused=True)
    per_dense = ptq_infer.apply_quantized(model, qp, tokens, fused=False)
    np.testing.assert_allclose(fused, per_dense, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(per_dense))))
    fp = model.apply({"params": params}, tokens)
    rel = float(jnp.sqrt(jnp.mean((fused - fp) ** 2) / jnp.mean(fp**2)))
    assert rel < (0.3 if "4" in scheme else 0.1), rel


def _greedy(model, qp, prompt, *, steps: int, backend: str) -> np.ndarray:
    """``steps`` greedy tokens after ``prompt`` (1, P) from the quantized model's KV cache."""
    cache = decode.init_cache(model, batch=1, max_len=prompt.shape[1] + steps - 1)
    gen = jax.jit(lambda q, c, t: decode.generate(decode.quantized_apply_fn(model, q, backend=backend), c, t,
                                                   steps=steps))
    return np.asarray(gen(qp, cache, prompt))


def test_ptq_fused_pallas_matches_xla_and_generates_from_the_cache():
    """Pallas kernels in interpret mode (the GQA decode kernel finishing the split-K qkv sums) vs XLA."""
    cfg, model, params = _llama(attention="pallas", layers=1)
    qp = ptq.quantize_params(params, ptq.scheme("w8a8"))
    prompt = jax.random.randint(jax.random.PRNGKey(9), (1, 5), 0, cfg.vocab_size)
    outs = {b: _greedy(model, qp, prompt, steps=3, backend=b) for b in ("xla", "pallas")}
    np.testing.assert_array_equal(outs["pallas"], outs["xla"])
    # greedy tokens from the cache = argmax of the quantized model re-run on the whole sequence
    seq = np.concatenate([np.asarray(prompt), outs["xla"]], 1)
    logits = ptq_infer.apply_quantized(model, qp, jnp.asarray(seq[:, :-1]), backend="xla")
    np.testing.assert_array_equal(np.argmax(logits[:, 4:], -1), outs["xla"])


def test_lkd_distills_a_grouped_query_model():
    cfg, model, params = _llama()
    tokens = jax.random.randint(jax.random.PRNGKey(10), (8, 16), 0, cfg.vocab_size)
    rules = ptq.scheme("w4/8-a8", int4_group=32)
    new, rep = lkd.distill(model, params, rules, [tokens[:4], tokens[4:]],
                           lkd.LKDConfig(steps=8, lr=2e-3, batch_size=4, progress=False))
    assert [r["block"] for r in rep] == ["h_0", "h_1"]
    assert all(r["loss_after"] <= r["loss_before"] for r in rep), rep
    assert new["h_0"]["attn"]["qkv"]["kernel"].shape == (64, (4 + 2 * 2) * 16)
    out = ptq_infer.apply_quantized(model, ptq.quantize_params(new, rules), tokens[:2])
    assert bool(jnp.all(jnp.isfinite(out)))


def test_scale_min_int4_llama_matches_simulation_and_reload(tmp_path):
    """W4/8-A8 with asymmetric scale + min INT4 MLP weights (what keeps a Q4_1 GGUF's grid) on a GQA LLaMA:
    the XLA integer path equals the fake-quant simulation and the compact checkpoint reloads the same model
    (the Pallas routes of asymmetric weights are checked kernel by kernel in test_kernels_matmul)."""
    import flax.linen as nn

    from jq8.ptq import checkpoint as qcheckpoint

    cfg, model, params = _llama(layers=1)
    rules = ptq.scheme("w4/8-a8", int4_group=32, int4_symmetric=False)
    qp = ptq.quantize_params(params, rules, fold_norms=False)
    asym = {p for p, w in qp.weights.items() if w.zero_point is not None}
    assert asym == {"h_0/mlp/fc1", "h_0/mlp/gate", "h_0/mlp/fc2"}, asym
    tokens = jax.random.randint(jax.random.PRNGKey(11), (2, 12), 0, cfg.vocab_size)
    with jax.default_matmul_precision("highest"):
        got = jax.jit(lambda q, t: ptq_infer.apply_quantized(model, q, t, backend="xla"))(qp, tokens)
        dense = {p: qp.rules[i] for p, i in qp.assignment if qp.rules[i].kind == "dense"}
        sim_params = ptq.restore_kernels(dataclasses.replace(qp, params=params, weights={}))
        with nn.intercept_methods(lkd.ste_interceptor(dense)):  # lm_head is a Dense (untied): a dense rule
            sim = model.apply({"params": sim_params}, tokens)
    np.testing.assert_allclose(got, sim, rtol=1e-3, atol=1e-3 * float(jnp.max(jnp.abs(sim))))

    qcheckpoint.save_quantized(tmp_path / "q", qp, model_config=dataclasses.asdict(cfg), float_dtype="float32")
    qp2, _ = qcheckpoint.load_quantized(tmp_path / "q")
    w, w2 = qp.weights["h_0/mlp/fc2"], qp2.weights["h_0/mlp/fc2"]
    assert w2.spec == w.spec and not w2.spec.exact_zero
    np.testing.assert_array_equal(w2.zero_point, w.zero_point)
    again = jax.jit(lambda q, t: ptq_infer.apply_quantized(model, q, t, backend="xla"))(qp2, tokens)
    np.testing.assert_array_equal(again, got)
