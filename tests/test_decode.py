"""KV-cached decoding (jq8.inference.decode, AttentionBlock decode=True) and the attention implementation choice.

Every cached result is compared with the full-sequence model on random weights and tokens: a causal model's
logits at position i depend only on tokens <= i, so row i of one full pass is the reference for the cached
call that fed token i.
"""

from __future__ import annotations

import functools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jq8 import ptq
from jq8.inference import decode
from jq8.ptq import infer as ptq_infer
from jq8.training.nn import ATTENTION_IMPLEMENTATIONS, AttentionBlock, attention_implementation
from jq8.training.policy import Policy
from models.config import ATTENTION_CHOICES, ModelConfig
from models.presets import build_model, preset

FP32 = Policy.from_name("bf16", compute_dtype=jnp.float32, backend="xla")
BF16 = Policy.from_name("bf16", backend="xla")
B, L, MAX_LEN = 2, 10, 12  # batch, tokens compared, cache length (> L: unfilled slots must stay masked)


def _config(family: str, layers: int = 1, **kw) -> ModelConfig:
    """The tiny preset with a short position table; one layer unless asked (compiling is the cost here)."""
    return preset(f"{family}-tiny", num_layers=layers, max_seq_len=16, **kw)


def _perturbed_params(model, seed: int, example=None):
    """Initialized params with random 1-D leaves (biases, norm scales), so every parameter kind matters."""
    example = jnp.zeros((1, 4), jnp.int32) if example is None else example
    params = jax.jit(model.init)(jax.random.PRNGKey(seed), example)["params"]
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape) if x.ndim == 1 else x for x, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(tree, leaves)


@functools.cache  # one init per (family, layers) per test process
def _params(family: str, layers: int = 1):
    return _perturbed_params(build_model(_config(family, layers), FP32), seed=3)


def _tokens(shape, seed: int = 7) -> jax.Array:
    return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, 512, jnp.int32)  # both presets: vocab 512


def _cached_logits(make_apply_fn, weights, cache, tokens, chunks):
    """Feeds tokens (B, L) in consecutive chunks of the given sizes, then one token at a time, through
    ``make_apply_fn(weights)`` (weights are a jit argument, not baked-in constants).

    Returns (logits (B, L, V) of every fed position, final cache).
    """
    step = jax.jit(lambda w, t, c: make_apply_fn(w)(t, c))
    out, start = [], 0
    for size in list(chunks) + [1] * (tokens.shape[1] - sum(chunks)):
        logits, cache = step(weights, tokens[:, start : start + size], cache)
        out.append(logits)
        start += size
    return jnp.concatenate(out, axis=1), cache


def _indices(cache) -> list[int]:
    """Every integer counter in the cache (each layer's cache_index, GPT's pos)."""
    return [int(x) for x in jax.tree_util.tree_leaves(cache) if jnp.issubdtype(x.dtype, jnp.integer)]


def _assert_close(got, ref, rel: float):
    scale = float(jnp.max(jnp.abs(ref)))
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(ref, np.float32), rtol=0, atol=rel * scale
    )


# ------------------------------------------------------------------------------------- float model


@pytest.mark.parametrize("name", ["gpt", "llama"])
@pytest.mark.parametrize(
    # bf16: on a GPU the full pass runs cuDNN attention and the cached calls XLA / Pallas (1e-2 of the max)
    "policy,layers,rel",
    [(FP32, 2, 1e-5), (BF16, 1, 1e-2)],
    ids=["fp32-2layers-remat", "bf16-1layer"],
)
def test_cached_logits_match_full_sequence(name, policy, layers, rel):
    """Prefill in two chunks (3 + 4 tokens: causal inside a chunk at an offset, rotary from the cache
    index), then 3 single tokens; every fed position's logits vs the full pass (bf16: same policy).
    The two-layer models are built with remat=True (a training config): decode runs plain blocks."""
    model = build_model(_config(name, layers, remat=layers > 1), policy)
    params, tokens = _params(name, layers), _tokens((B, L))
    with jax.default_matmul_precision("highest"):  # a GPU's TF32 default differs at 1e-3, not the cache
        full = jax.jit(model.apply)({"params": params}, tokens)
        cache = decode.init_cache(model, B, MAX_LEN)
        assert decode.cache_length(cache) == MAX_LEN and set(_indices(cache)) == {0}
        fn = partial(decode.float_apply_fn, model)
        got, cache = _cached_logits(fn, params, cache, tokens, chunks=(3, 4))
    _assert_close(got, full, rel)
    assert set(_indices(cache)) == {L}  # every layer's index (and GPT's pos) advanced by L


@pytest.mark.parametrize("name,policy,rel", [("gpt", FP32, 1e-5), ("llama", BF16, 1e-2)])
def test_pallas_decode_attention_matches_full_sequence(name, policy, rel):
    """attention="pallas": the one-token cached calls run the Pallas decode kernel (interpret mode here);
    the chunks before them take XLA. Every position's logits vs the full pass."""
    model = build_model(_config(name, attention="pallas"), policy)
    params, tokens = _params(name), _tokens((B, L), seed=11)
    with jax.default_matmul_precision("highest"):
        full = jax.jit(model.apply)({"params": params}, tokens)
        fn = partial(decode.float_apply_fn, model)
        got, _ = _cached_logits(fn, params, decode.init_cache(model, B, MAX_LEN), tokens, chunks=(4,))
    _assert_close(got, full, rel)


def test_cache_created_by_init_matches_init_cache():
    model = build_model(_config("gpt", layers=2), BF16)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((B, MAX_LEN), jnp.int32), decode=True)
    )
    cache = decode.init_cache(model, B, MAX_LEN)
    spec = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), cache)
    assert spec == jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), dict(variables["cache"]))
    assert spec["h_1"]["attn"]["cached_key"] == ((B, MAX_LEN, 4, 32), jnp.bfloat16)  # compute dtype
    assert spec["pos"] == ((), jnp.int32)
    assert not any(x.any() for x in jax.tree_util.tree_leaves(cache))


def test_attention_block_decode_with_mask():
    """An explicit mask over the cache positions (B, 1, T, max_len) is ANDed with the causal cache mask."""
    block = AttentionBlock(4, FP32, norm="rmsnorm", rotary=True)
    x = jax.random.normal(jax.random.PRNGKey(0), (B, 6, 128))
    params = _perturbed_params(block, seed=4, example=x)
    mask = jax.random.bernoulli(jax.random.PRNGKey(2), 0.6, (B, 1, 6, 6)) | jnp.eye(6, dtype=bool)
    full = jax.jit(block.apply)({"params": params}, x, mask=mask)
    shapes = jax.eval_shape(lambda: block.init(jax.random.PRNGKey(1), jnp.zeros((B, 8, 128)), decode=True))
    cache = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])

    def cached(x, m):
        return block.apply({"params": params, "cache": cache}, x, mask=m, decode=True, mutable=["cache"])

    got, mutated = jax.jit(cached)(x, jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, 2))))
    _assert_close(got, full, 1e-5)
    assert int(mutated["cache"]["cache_index"]) == 6
    with pytest.raises(ValueError, match="cache length"):  # a (T, T) mask does not cover the cache
        jax.eval_shape(cached, x, mask)
    with pytest.raises(ValueError, match="exceeds the KV cache length 8"):
        jax.eval_shape(cached, jnp.ones((B, 9, 128)), None)


# --------------------------------------------------------------------------------- quantized model


# Pallas (interpret mode on CPU: slow) on one scheme per family rather than the full cross product.
@pytest.mark.parametrize(
    "name,scheme,backend",
    [
        ("gpt", "w8a8", "xla"),
        ("gpt", "w4/8-a8", "xla"),
        ("llama", "w8a8", "xla"),
        ("llama", "w4/8-a8", "xla"),
        ("gpt", "w8a8", "pallas"),
        ("llama", "w4/8-a8", "pallas"),
    ],
)
def test_quantized_cached_logits_match_full_sequence(name, scheme, backend):
    """The INT8 model through the fused interceptor: the same cache, the same integer math per row."""
    # The float attention island at full fp32 (a GPU's default TF32 dots differ by ~1e-3 between the
    # cached and the full computation, which moves many INT8 roundings downstream: seen on the H100).
    with jax.default_matmul_precision("highest"):
        _check_quantized_cached_logits(name, scheme, backend)


def _check_quantized_cached_logits(name, scheme, backend):
    model, tokens = build_model(_config(name), FP32), _tokens((B, L))
    qp = ptq.quantize_params(_params(name), ptq.scheme(scheme, int4_group=32))
    full = jax.jit(lambda q, t: ptq_infer.apply_quantized(model, q, t, backend=backend))(qp, tokens)
    make = partial(decode.quantized_apply_fn, model, backend=backend)
    got, cache = _cached_logits(make, qp, decode.init_cache(model, B, MAX_LEN), tokens, chunks=(4,))
    # Rows are quantized per token, so a cached row runs the full pass's integer GEMMs; only the float
    # attention sums differ in order (~1e-7 relative), which could move one INT8 rounding of its output
    # (~1e-3 at most). The quantization error itself is far larger (2-20% of the logits here).
    _assert_close(got, full, 1e-3)
    assert set(_indices(cache)) == {L}


@pytest.fixture
def fresh_traces():
    """Clears JAX's trace caches around a test that monkeypatches a function jitted kernels call while
    tracing: another test's cached trace would skip the patch, and the patched traces must not outlive it."""
    jax.clear_caches()
    yield
    jax.clear_caches()


def test_quantized_pallas_decode_defers_the_split_k_qkv_sum(monkeypatch, fresh_traces):
    """Every decode GEMV split in two (as the tuned 1.5B qkv is): the one-token calls hand the qkv GEMV's
    partial sums to the attention kernel unfinished (SplitKSum), and the logits still match the full pass."""
    from pallas_kernels import decode_attention as attention_module
    from pallas_kernels import int8_matmul_decode as decode_module

    split = decode_module.DecodeConfig(block_n=32, block_k=64, split_k=2)
    monkeypatch.setattr(decode_module, "lookup_decode_config", lambda *a, **k: split)
    seen = []
    orig = attention_module.decode_attention_update
    spy = lambda qkv, *a, **k: (seen.append(type(qkv)), orig(qkv, *a, **k))[1]  # noqa: E731
    monkeypatch.setattr(attention_module, "decode_attention_update", spy)
    model = build_model(_config("gpt", attention="pallas"), FP32)
    tokens = _tokens((B, 6), seed=5)
    qp = ptq.quantize_params(_params("gpt"), ptq.scheme("w8a8"))
    with jax.default_matmul_precision("highest"):
        full = jax.jit(lambda q, t: ptq_infer.apply_quantized(model, q, t, backend="pallas"))(qp, tokens)
        make = partial(decode.quantized_apply_fn, model, backend="pallas")
        got, _ = _cached_logits(make, qp, decode.init_cache(model, B, MAX_LEN), tokens, chunks=(4,))
    assert seen and all(t is decode_module.SplitKSum for t in seen)
    _assert_close(got, full, 1e-3)


def test_quantized_decode_goes_through_fused_attention(monkeypatch):
    """The fused interceptor passes decode to module.attend, which mutates the cache from inside it."""
    model = build_model(_config("gpt", layers=2), FP32)
    qp = ptq.quantize_params(_params("gpt", 2), ptq.scheme("w8a8"))
    seen = []
    orig = ptq_infer._fused_attention
    spy = lambda *a, **k: (seen.append(k["decode"]), orig(*a, **k))[1]  # noqa: E731
    monkeypatch.setattr(ptq_infer, "_fused_attention", spy)
    cache = decode.init_cache(model, 1, 4)
    step = jax.jit(lambda q, t, c: decode.quantized_apply_fn(model, q)(t, c))
    _, cache = step(qp, jnp.array([[5, 6, 7]], jnp.int32), cache)
    assert seen == [True, True]  # both layers, decode=True
    assert _indices(cache) == [3, 3, 3]
    written = np.asarray(cache["h_1"]["attn"]["cached_value"][0])
    assert np.all(np.abs(written[:3]).max(axis=(1, 2)) > 0) and not written[3].any()


def test_apply_quantized_variables_cannot_replace_params():
    model = build_model(_config("gpt"), FP32)
    qp = ptq.quantize_params(_params("gpt"), ptq.scheme("w8a8"))
    with pytest.raises(ValueError, match="params"):
        ptq_infer.apply_quantized(model, qp, jnp.zeros((1, 2), jnp.int32), variables={"params": {}})


# --------------------------------------------------------------------------------------- generate


def _greedy_reference(logits_fn, weights, prompt, steps: int) -> jax.Array:
    """Greedy continuation (B, steps) re-running ``logits_fn(weights, tokens)`` on the whole prefix each
    step; the prefix is right-padded to one fixed length (one compiled program), which a causal model
    ignores."""
    b, p = prompt.shape
    buf = jnp.zeros((b, p + steps), jnp.int32).at[:, :p].set(prompt)
    fn = jax.jit(logits_fn)
    for i in range(steps):
        buf = buf.at[:, p + i].set(jnp.argmax(fn(weights, buf)[:, p + i - 1], -1).astype(jnp.int32))
    return buf[:, p:]


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_generate_greedy_matches_full_rerun(name):
    model, params, prompt, steps = build_model(_config(name), FP32), _params(name), _tokens((B, 5)), 6
    ref = _greedy_reference(lambda p, t: model.apply({"params": p}, t), params, prompt, steps)
    gen = jax.jit(lambda p, c, t: decode.generate(decode.float_apply_fn(model, p), c, t, steps=steps))
    got = gen(params, decode.init_cache(model, B, 5 + steps - 1), prompt)
    assert got.shape == (B, steps) and got.dtype == jnp.int32
    np.testing.assert_array_equal(got, ref)


def test_generate_greedy_quantized_matches_full_rerun():
    model, prompt = build_model(_config("llama"), FP32), _tokens((B, 4), seed=4)
    qp = ptq.quantize_params(_params("llama"), ptq.scheme("w8a8"))
    with jax.default_matmul_precision("highest"):  # a GPU's TF32 float attention flips near-tied argmaxes
        ref = _greedy_reference(lambda q, t: ptq_infer.apply_quantized(model, q, t), qp, prompt, 5)
        gen = jax.jit(lambda q, c, t: decode.generate(decode.quantized_apply_fn(model, q), c, t, steps=5))
        np.testing.assert_array_equal(gen(qp, decode.init_cache(model, B, 8), prompt), ref)


def test_generate_top_k_samples_within_top_k():
    model, params, prompt = build_model(_config("gpt"), FP32), _params("gpt"), _tokens((B, 3), seed=6)
    steps, k = 6, 3

    @jax.jit
    def sample(p, c, t, key):
        apply_fn = decode.float_apply_fn(model, p)
        return decode.generate(apply_fn, c, t, steps=steps, top_k=k, temperature=0.7, key=key)

    cache = decode.init_cache(model, B, 3 + steps - 1)
    got = sample(params, cache, prompt, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(got, sample(params, cache, prompt, jax.random.PRNGKey(0)))  # deterministic
    logits = jax.jit(model.apply)({"params": params}, jnp.concatenate([prompt, got], axis=1))
    top = np.argsort(-np.asarray(logits[:, 2 : 2 + steps]), axis=-1)[..., :k]  # (B, steps, k)
    assert all(int(got[b, i]) in top[b, i] for b in range(B) for i in range(steps))
    assert not np.array_equal(got, top[..., 0])  # sampled, not greedy


def test_generate_refuses_to_overflow_the_cache():
    model, params = build_model(_config("gpt"), FP32), _params("gpt")
    prompt = _tokens((1, 5))

    def gen(c, t, steps):
        return decode.generate(decode.float_apply_fn(model, params), c, t, steps=steps)

    cache = decode.init_cache(model, 1, 8)
    with pytest.raises(ValueError, match="needs 9 cache positions, but the KV cache holds 8"):
        jax.eval_shape(partial(gen, steps=5), cache, prompt)  # static: raised while tracing, as under jit
    assert jax.eval_shape(partial(gen, steps=4), cache, prompt).shape == (1, 4)  # exactly fills the cache
    _, used = jax.jit(lambda c, t: decode.float_apply_fn(model, params)(t, c))(cache, prompt)
    with pytest.raises(ValueError, match="after the 5 filled"):  # a concrete (untraced) index is checked
        gen(used, prompt, steps=1)
    with pytest.raises(ValueError, match="steps >= 1"):
        gen(cache, prompt, steps=0)


def test_quantize_cli_cached_continuation_matches_window_rerun():
    """quantize.py --generate now decodes from the KV cache: same greedy ids as the old per-token rerun."""
    import argparse

    import quantize
    from jq8.inference import evaluate

    model = build_model(_config("gpt"), FP32)
    qp = ptq.quantize_params(_params("gpt"), ptq.scheme("w8a8"))
    args = argparse.Namespace(max_new_tokens=5, top_k=1, backend=None)
    prompt = [int(t) for t in _tokens((4,), seed=8)]
    logits = quantize.quantized_logits(model, None)
    old = evaluate.generate(lambda t: logits(qp, t), prompt, max_new_tokens=5, window=16)
    assert quantize.continuation(args, model, qp, True, prompt, seq_len=16) == old


# --------------------------------------------------------------------------- attention implementation


def test_attention_xla_and_auto_identical_on_cpu():
    if jax.default_backend() == "gpu":
        pytest.skip("on GPU 'auto' may pick cuDNN")
    auto = build_model(_config("llama"), BF16)
    xla = build_model(_config("llama", attention="xla"), BF16)
    out = [jax.jit(m.apply)({"params": _params("llama")}, _tokens((B, 8))) for m in (auto, xla)]
    np.testing.assert_array_equal(out[0], out[1])


def test_attention_choice_validation():
    assert ATTENTION_CHOICES == ATTENTION_IMPLEMENTATIONS
    with pytest.raises(ValueError, match="attention must be one of"):
        _config("gpt", attention="flash")
    block = AttentionBlock(2, FP32, implementation="flash")
    with pytest.raises(ValueError, match="attention implementation must be one of"):
        jax.eval_shape(block.init, jax.random.PRNGKey(0), jnp.ones((1, 4, 32)))
    old = _config("gpt").to_dict()
    del old["attention"]  # a checkpoint written before the field existed
    assert ModelConfig.from_dict(old) == _config("gpt")


def test_cudnn_on_cpu_is_a_clear_error():
    if jax.default_backend() == "gpu":
        pytest.skip("needs a non-GPU backend")
    model = build_model(_config("gpt", attention="cudnn"), BF16)
    with pytest.raises(ValueError, match="'cudnn'.*needs a GPU"):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))


def test_auto_picks_cudnn_only_where_it_applies(monkeypatch):
    """The decision table of "auto" as if on a GPU (nothing runs there: only the choice is checked)."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")

    def pick(choice="auto", dtype=jnp.bfloat16, head_dim=64, masked=False, decode=False, one_token=False,
             seq_len=None):
        return attention_implementation(
            choice, dtype, head_dim, masked=masked, decode=decode, one_token=one_token, seq_len=seq_len
        )

    assert pick() == "cudnn" and pick(dtype=jnp.float16, head_dim=128) == "cudnn"
    assert pick(seq_len=1024) == "cudnn" and pick(seq_len=21) == "xla"  # cuDNN refuses odd lengths
    assert pick(dtype=jnp.float32) == "xla"
    assert pick(head_dim=60) == "xla" and pick(head_dim=160) == "xla"
    assert pick(masked=True) == "xla" and pick(decode=True) == "xla"
    assert pick("xla") == "xla" and pick("cudnn", dtype=jnp.float32) == "cudnn"  # explicit wins
    assert pick("cudnn", decode=True) == "xla"  # the cached path is always XLA
    # one-token cached calls: the Pallas decode kernel, unless masked, a chunk, or head_dim not a power of 2
    tok = dict(decode=True, one_token=True)
    assert pick(**tok) == "pallas" and pick("pallas", **tok) == "pallas"
    assert pick(**tok, masked=True) == "xla" and pick(decode=True, one_token=False) == "xla"
    assert pick(**tok, head_dim=48) == "xla" and pick("xla", **tok) == "xla"
    assert pick("pallas") == "xla"  # "pallas" only covers the one-token cached call
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert pick() == "xla" and pick(**tok) == "xla"
    assert pick("pallas", **tok) == "pallas"  # explicit: interpret mode off a GPU
