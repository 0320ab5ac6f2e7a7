"""GPT / LLaMA models: preset sizes, shapes, causality, tied head, and that training lowers the loss."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jq8.training.policy import Policy
from models.config import ModelConfig
from models.gpt import lm_loss
from models.presets import PRESETS, build_model, preset

BF16 = Policy.from_name("bf16")
INT8 = Policy.from_name("jetfire-int8", backend="xla")  # jnp references: fast on CPU


def _init(model, tokens, seed: int = 0):
    """Jitted init (eager Flax init compiles every op separately: slow on a small CPU)."""
    return jax.jit(model.init)(jax.random.key(seed), tokens)["params"]


def _apply(model, params, tokens):
    return jax.jit(model.apply)({"params": params}, tokens)


def _n_params(cfg: ModelConfig) -> int:
    model = build_model(cfg, BF16)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith("gpt")])
def test_gpt_preset_sizes_match_gpt2_formula(name):
    c = PRESETS[name]
    d, L = c.d_model, c.num_layers
    # tied embedding + positions + per block (qkv, out, fc1, fc2 with biases, two LayerNorms) + final LN
    expected = c.vocab_size * d + c.max_seq_len * d + L * (12 * d * d + 13 * d) + 2 * d
    assert _n_params(c) == expected


def test_gpt2_124m_is_124m():
    assert 124e6 < _n_params(PRESETS["gpt2-124m"]) < 125e6
    assert 1.55e9 < _n_params(PRESETS["gpt2-1.5b"]) < 1.56e9  # 1.5B with the padded 50304 vocab


def test_llama_preset_size_formula():
    c = PRESETS["llama-tiny"]
    d, h = c.d_model, c.hidden
    assert h % 64 == 0 and h >= 8 * d // 3
    expected = 2 * c.vocab_size * d + c.num_layers * (4 * d * d + 3 * d * h + 2 * d) + d
    assert _n_params(c) == expected


def _tiny(family: str) -> ModelConfig:
    # One layer keeps compile time (most of these tests' cost on a CPU) low; layers are identical anyway.
    return preset(f"{family}-tiny", num_layers=1, d_model=64, num_heads=2, vocab_size=131, max_seq_len=48)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_forward_shapes_dtype_and_causality(family):
    cfg = _tiny(family)
    model = build_model(cfg, BF16)
    key1, key2 = jax.random.split(jax.random.key(3))
    t = 37  # ragged: not a multiple of the 32-token blocks
    tokens = jax.random.randint(key1, (3, t), 0, cfg.vocab_size)
    params = _init(model, tokens)
    logits = _apply(model, params, tokens)
    assert logits.shape == (3, t, cfg.vocab_size) and logits.dtype == jnp.float32
    assert bool(jnp.isfinite(logits).all())
    # Changing the tokens after position 20 must not change the logits up to position 20.
    changed = tokens.at[:, 21:].set(jax.random.randint(key2, (3, t - 21), 0, cfg.vocab_size))
    logits2 = _apply(model, params, changed)
    np.testing.assert_array_equal(np.asarray(logits[:, :21]), np.asarray(logits2[:, :21]))
    assert not np.allclose(np.asarray(logits[:, 21:]), np.asarray(logits2[:, 21:]))


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_int8_forward_is_close_to_bf16(family):
    """Same fp32 params under both policies: INT8 logits track bf16 logits (ragged token count).

    Not exactly causal: a 32 x 32 block's scale is shared by 32 consecutive (flattened) tokens, so a later
    token's magnitude can move an earlier token's rounding; hence a closeness check, not causality.
    """
    cfg = _tiny(family)
    tokens = jax.random.randint(jax.random.key(4), (3, 37), 0, cfg.vocab_size)
    params = _init(build_model(cfg, BF16), tokens)
    ref = _apply(build_model(cfg, BF16), params, tokens)
    got = _apply(build_model(cfg, INT8), params, tokens)
    assert got.shape == ref.shape and got.dtype == jnp.float32
    rel = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
    assert rel < 0.1, rel


def test_gpt_head_is_tied_and_llama_head_is_not():
    for family, has_head in (("gpt", False), ("llama", True)):
        cfg = preset(f"{family}-tiny", d_model=64, num_heads=2, vocab_size=100)
        params = jax.eval_shape(build_model(cfg, BF16).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))[
            "params"
        ]
        assert ("lm_head" in params) == has_head
        assert ("wpe" in params) == (family == "gpt")
    # Tied: the logits are the final hidden state times the token embedding (check via its gradient).
    cfg = _tiny("gpt")
    model = build_model(cfg, BF16)
    tokens = jnp.array([[1, 2, 3]])
    params = _init(model, tokens)
    g = jax.jit(jax.grad(lambda p: model.apply({"params": p}, tokens)[0, -1, 77]))(params)
    assert float(jnp.abs(g["wte"]["embedding"][77]).sum()) > 0  # row 77 is used as an output weight


def test_config_errors():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        ModelConfig(d_model=100, num_heads=3)
    with pytest.raises(ValueError, match="family"):
        ModelConfig(family="bert")
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("gpt5")
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({"d_model": 64, "n_embd": 3})
    cfg = preset("gpt-tiny", d_model=64, num_heads=2, max_seq_len=16, vocab_size=50)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        jax.eval_shape(build_model(cfg, BF16).init, jax.random.key(0), jnp.zeros((1, 17), jnp.int32))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


# gpt-bf16 and llama-int8 are covered end to end in tests/test_train.py.
@pytest.mark.parametrize("family,policy", [("gpt", INT8)], ids=["gpt-int8"])
def test_loss_decreases_on_tiny_data(family, policy):
    """A few AdamW steps on one fixed batch of random tokens (memorisation) must lower the loss a lot."""
    cfg = dataclasses.replace(_tiny(family), vocab_size=97)
    model = build_model(cfg, policy)
    tokens = jax.random.randint(jax.random.key(7), (4, 33), 0, cfg.vocab_size)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    params = _init(model, inputs)
    tx = optax.adamw(1e-2)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, key):
        loss, g = jax.value_and_grad(
            lambda p: lm_loss(model.apply({"params": p}, inputs, rngs={"quant": key}), targets)
        )(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    losses = []
    for i in range(25):
        params, opt, loss = step(params, opt, jax.random.key(i))
        losses.append(float(loss))
    assert abs(losses[0] - np.log(cfg.vocab_size)) < 0.5  # starts near a uniform guess
    assert losses[-1] < losses[0] - 1.5, losses


def test_remat_gives_the_same_gradients():
    cfg = _tiny("gpt")
    tokens = jax.random.randint(jax.random.key(2), (2, 33), 0, cfg.vocab_size)
    params = _init(build_model(cfg, BF16), tokens[:, :-1])

    def grads(c):
        model = build_model(c, BF16)
        loss = lambda p: lm_loss(model.apply({"params": p}, tokens[:, :-1]), tokens[:, 1:])
        return jax.tree.leaves(jax.jit(jax.grad(loss))(params))

    for a, b in zip(grads(cfg), grads(dataclasses.replace(cfg, remat=True))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
