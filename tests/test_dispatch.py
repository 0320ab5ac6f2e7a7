"""jq8.inference.dispatch.jit_bound: same results as jax.jit(fn)(params, ...), on float and quantized trees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jq8 import ptq
from jq8.inference.dispatch import jit_bound
from jq8.ptq import infer as ptq_infer
from jq8.training.policy import Policy
from models.presets import build_model, preset


def test_matches_jit_on_a_dict_tree():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"w": jax.random.normal(k1, (8, 5)), "b": {"bias": jax.random.normal(k2, (5,))}}
    x = jax.random.normal(k3, (3, 8))

    def fn(p, x, scale):
        return jnp.tanh(x @ p["w"] + p["b"]["bias"]) * scale

    bound = jit_bound(fn, params)
    np.testing.assert_array_equal(bound(x, 2.0), jax.jit(fn)(params, x, 2.0))
    assert bound.params is params
    assert "tanh" in bound.lower(x, 2.0).as_text()


def test_quantized_model_logits_match():
    model = build_model(preset("gpt-tiny"), Policy.from_name("bf16"))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, model.config.vocab_size)
    params = model.init(jax.random.PRNGKey(2), tokens)["params"]
    qp = ptq.quantize_params(params, ptq.scheme("w8a8"))

    def apply(q, t):
        return ptq_infer.apply_quantized(model, q, t, backend="xla")

    np.testing.assert_array_equal(jit_bound(apply, qp)(tokens), jax.jit(apply)(qp, tokens))


def test_non_array_leaves_are_an_error():
    with pytest.raises(TypeError, match="not .*ndarray.*device_put"):
        jit_bound(lambda p, x: x, {"w": np.ones(3)})
