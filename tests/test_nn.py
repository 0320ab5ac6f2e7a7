"""jq8.training.nn and jq8.training.policy: parameter trees, bf16 vs INT8 blocks under jit + grad, policy rules."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jq8.training.jetfire import mlp_reference
from jq8.training.nn import AttentionBlock, Dense, LayerNorm, MlpBlock
from jq8.training.policy import HIGH_PRECISION_ISLANDS, Policy
from jq8.training.policy_rules import apply_policy

BF16 = Policy.from_name("bf16")
F32 = Policy.from_name("bf16", compute_dtype=jnp.float32)  # the float block: no INT8, fp32 compute
INT8 = Policy.from_name("jetfire-int8", backend="xla")


class Block(nn.Module):
    """The GPT block models/ builds: pre-norm attention and MLP branches on an fp32 residual stream."""

    policy: Policy
    activation: str = "gelu"
    norm: str = "layernorm"
    rotary: bool = False
    dropout_rate: float = 0.1

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        x = x + AttentionBlock(
            2, self.policy, norm=self.norm, rotary=self.rotary, dropout_rate=self.dropout_rate, name="attn"
        )(x, deterministic)
        x = x + MlpBlock(
            128,
            self.policy,
            activation=self.activation,
            norm=self.norm,
            dropout_rate=self.dropout_rate,
            name="mlp",
        )(x, deterministic)
        return x


def normal(seed: int, shape) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


X = normal(0, (2, 21, 64))  # 42 tokens: ragged vs 32-row blocks


VARIANTS = [("gelu", "layernorm", False), ("swiglu", "rmsnorm", True)]


def shapes(tree):
    return jax.tree.map(lambda a: (a.shape, a.dtype), tree)


@pytest.mark.parametrize("activation,norm,rotary", VARIANTS)
def test_parameter_tree_is_policy_independent(activation, norm, rotary):
    trees = [
        shapes(jax.eval_shape(Block(p, activation, norm, rotary).init, jax.random.PRNGKey(1), X))
        for p in (BF16, INT8)
    ]
    assert trees[0] == trees[1]
    params = trees[0]["params"]
    assert set(params["attn"]) == {"norm", "qkv", "out"}
    assert params["attn"]["qkv"]["kernel"] == ((64, 192), jnp.float32)
    mlp = {"norm", "fc1", "fc2"} | ({"gate"} if activation == "swiglu" else set())
    assert set(params["mlp"]) == mlp
    assert params["mlp"]["fc1"]["kernel"] == ((64, 128), jnp.float32)
    assert ("bias" in params["mlp"]["fc1"]) == (activation == "gelu")
    assert ("bias" in params["mlp"]["norm"]) == (norm == "layernorm")


@pytest.mark.parametrize("activation,norm,rotary", VARIANTS)
def test_block_int8_vs_float_gradients(activation, norm, rotary):
    """A whole block under jit + grad with dropout: INT8 gradients vs the fp32 block, error per parameter."""
    variables = jax.jit(Block(BF16, activation, norm, rotary).init)(jax.random.PRNGKey(1), X)
    probe = normal(2, X.shape)

    def loss(params, policy, key):
        y = Block(policy, activation, norm, rotary).apply(
            {"params": params}, X, deterministic=False, rngs={"dropout": key}
        )
        return jnp.sum((y - X) * probe), y - X  # the branches' contribution (x passes through unchanged)

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    key = jax.random.PRNGKey(3)
    ((_, yb), gb), ((_, yi), gi) = grad(variables["params"], F32, key), grad(variables["params"], INT8, key)
    assert rel(yi, yb) < 5e-2  # same dropout mask, INT8 vs fp32 branch outputs
    errs = {
        jax.tree_util.keystr(p): rel(a, b)
        for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(gi), jax.tree.leaves(gb))
    }
    print(f"\nINT8 vs fp32 gradient relative error per parameter ({activation}, {norm}):")
    for k, v in errs.items():
        print(f"  {k:40s} {v:.4f}")
    assert all(np.isfinite(v) for v in errs.values())
    assert max(errs.values()) < 8e-2, errs


def test_bf16_mlp_block_matches_reference_and_dtype():
    m = MlpBlock(128, BF16)
    v = jax.jit(m.init)(jax.random.PRNGKey(1), X)
    y = jax.jit(m.apply)(v, X)
    assert y.dtype == jnp.float32 and y.shape == X.shape
    want = mlp_reference(X, v["params"])  # fp32 everywhere
    assert 1e-4 < rel(y, want) < 2e-2  # bf16 compute: close to, but not identical with, fp32


def test_dropout_uses_rng_and_deterministic_flag():
    m = MlpBlock(128, INT8, dropout_rate=0.5)
    v = jax.jit(m.init)(jax.random.PRNGKey(1), X)
    f = jax.jit(lambda key: m.apply(v, X, deterministic=False, rngs={"dropout": key}))
    y1, y2 = f(jax.random.PRNGKey(1)), f(jax.random.PRNGKey(2))
    y0 = jax.jit(lambda: m.apply(v, X))()
    assert not np.allclose(y1, y2)
    zeros = float(jnp.mean(y1 == 0))
    assert 0.35 < zeros < 0.65
    kept = y1 != 0
    # bf16 resolution: XLA on a GPU may keep excess precision (skip a bf16 rounding) in one path only
    np.testing.assert_allclose(np.asarray(y1)[kept], 2 * np.asarray(y0)[kept], rtol=2.0**-7, atol=1e-6)


def test_int8_dimension_errors_name_the_dimension():
    with pytest.raises(ValueError, match=r"hidden=100 is not a multiple of the INT8 block size 32"):
        jax.eval_shape(MlpBlock(100, INT8).init, jax.random.PRNGKey(0), X)
    with pytest.raises(ValueError, match=r"model_dim=48"):
        jax.eval_shape(AttentionBlock(2, INT8).init, jax.random.PRNGKey(0), jnp.ones((1, 4, 48)))
    # bf16 accepts any width
    jax.eval_shape(MlpBlock(100, BF16).init, jax.random.PRNGKey(0), X)


def test_dense_and_layernorm_modules():
    x = normal(4, (37, 64))
    d = Dense(96, policy=INT8)
    v = jax.jit(d.init)(jax.random.PRNGKey(0), x)
    assert shapes(v)["params"] == {"kernel": ((64, 96), jnp.float32), "bias": ((96,), jnp.float32)}
    y8, yb = jax.jit(d.apply)(v, x), jax.jit(Dense(96, policy=BF16).apply)(v, x)
    assert y8.dtype == yb.dtype == jnp.bfloat16
    assert 1e-3 < rel(y8, yb) < 3e-2
    ln = LayerNorm(rms=True)
    vl = jax.jit(ln.init)(jax.random.PRNGKey(0), x)
    assert set(vl["params"]) == {"scale"}
    y = jax.jit(ln.apply)(vl, x)
    np.testing.assert_allclose(np.mean(np.square(np.asarray(y)), axis=-1), 1.0, rtol=1e-3)


def test_policy_validation_and_names():
    assert Policy.from_name("jetfire-int8").int8 and not Policy.from_name("bf16").int8
    assert not Policy.from_name("bf16", int8_forward=True).int8_forward  # bf16 has no INT8 GEMM
    assert not Policy.from_name(
        "jetfire-int8", int8_forward=False, int8_grad_input=False, int8_grad_weight=False
    ).int8
    with pytest.raises(ValueError, match="unknown policy name"):
        Policy.from_name("fp8")
    with pytest.raises(ValueError, match="powers of two"):
        Policy.from_name("jetfire-int8", block=(24, 24))
    with pytest.raises(ValueError, match="rounding_bwd"):
        Policy(name="jetfire-int8", rounding_bwd="up")
    with pytest.raises(ValueError, match="unknown Policy field"):
        Policy.from_name("bf16", blocks=(32, 32))
    with pytest.raises(ValueError, match="compute_dtype"):
        Policy(compute_dtype=jnp.int8)
    assert hash(Policy.from_name("jetfire-int8")) == hash(Policy(name="jetfire-int8"))
    assert {name for name, _ in HIGH_PRECISION_ISLANDS} >= {"attention core", "LM head", "loss", "optimizer"}


class PlainMlp(nn.Module):
    """A model written with flax.linen.Dense, unaware of jq8."""

    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(128, name="fc1")(x))
        return nn.Dense(64, name="fc2")(h) + nn.Dense(64, name="skip")(x)


def test_apply_policy_reroutes_matching_dense_layers():
    model = PlainMlp()
    x = normal(5, (40, 64))
    v = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    pm = apply_policy(
        model, {r"fc[12]": Policy.from_name("jetfire-int8", backend="xla", compute_dtype=jnp.float32)}
    )
    assert shapes(jax.eval_shape(pm.init, jax.random.PRNGKey(0), x)) == shapes(v)

    def run(apply, p):  # output and gradient of a quadratic loss, one jit
        f = lambda p: jnp.sum(apply({"params": p}, x, rngs={"quant": jax.random.PRNGKey(1)}) ** 2)
        return jax.jit(jax.value_and_grad(f))(p)

    (l_plain, g_plain), (l_q, g_q) = run(model.apply, v["params"]), run(pm.apply, v["params"])
    assert 1e-4 < abs(float(l_q - l_plain)) / float(l_plain) < 3e-2  # quantized, and close
    for name in ("fc1", "fc2", "skip"):
        assert rel(g_q[name]["kernel"], g_plain[name]["kernel"]) < 6e-2
    with pytest.raises(ValueError, match=r"\['fc3'\] matched no nn.Dense"):
        apply_policy(model, [(r"fc[12]", "jetfire-int8"), (r"fc3", "jetfire-int8")]).apply(v, x)
    with pytest.raises(ValueError, match="policy rule pattern 'fc\\[' is not a valid regex"):
        apply_policy(model, {r"fc[": "jetfire-int8"})


def test_named_policies_and_spec_strings():
    from jq8.training.policy import NAMED_POLICIES, parse_policy

    for name in NAMED_POLICIES:  # every documented name builds, by name and by spec string
        assert Policy.from_name(name) == parse_policy(name)
    row = parse_policy("int8-row")
    assert row.int8 and row.granularity == "row"
    blk = parse_policy("jetfire-int8:block=64,rounding_bwd=nearest", backend="xla")
    assert (blk.block, blk.rounding_bwd, blk.backend, blk.granularity) == ((64, 64), "nearest", "xla", "block")
    assert parse_policy("jetfire-int8:block=32x128").block == (32, 128)
    assert parse_policy("jetfire-int8:int8_grad_weight=false").int8_grad_weight is False
    for bad, msg in [("int9", "unknown policy name 'int9'"), ("jetfire-int8:block", "is not field=value"),
                     ("jetfire-int8:block=6x4x2", "block must be N or RxC"), ("jetfire-int8:colour=red", "colour")]:
        with pytest.raises(ValueError, match=msg):
            parse_policy(bad)
    with pytest.raises(ValueError, match=r"--policy=jetfire-int8:block=64"):
        Policy.from_name("jetfire-int8", block=(128, 128)).check_dims(in_features=192)


def test_training_and_ptq_rules_share_one_matcher():
    """A pattern selects the same module paths in apply_policy and in PTQ's QuantRule (jq8.rules)."""
    from jq8 import rules
    from jq8.ptq import QuantRule, assign_rules

    paths = ["blocks_0/mlp/fc1", "blocks_0/mlp/fc10", "blocks_1/attn/qkv"]
    for pattern in (r"(^|/)fc1$", r"mlp/fc1", r"^blocks_1/"):
        want = {p for p in paths if rules.matches(pattern, p)}
        assert {p for p in paths if QuantRule(pattern).matches(p)} == want
        assert set(assign_rules(paths, [QuantRule(pattern)])) == want
    assert rules.assign(paths, [r"fc1$", r"nothing"]) == ({"blocks_0/mlp/fc1": 0}, [1])
    tree = {"a": {"b": {"kernel": jnp.ones((2, 2))}}, "c": {"embedding": jnp.ones((3, 2))}}
    assert rules.paths_holding(tree, "kernel") == ["a/b"]
    assert rules.get_path(rules.set_path(tree, "a/b", 1), "a/b") == 1 and "kernel" in tree["a"]["b"]


def test_int8_dot_general_in_flax_dense():
    import functools

    from jq8.training.nn import Int8DotGeneral

    pol = Policy.from_name("jetfire-int8", backend="xla", compute_dtype=jnp.float32)
    x = normal(6, (2, 19, 64))
    plain = nn.Dense(96)
    q = nn.Dense(96, dot_general_cls=functools.partial(Int8DotGeneral, policy=pol))
    v = jax.jit(plain.init)(jax.random.PRNGKey(0), x)
    assert shapes(jax.eval_shape(q.init, jax.random.PRNGKey(0), x)) == shapes(v)

    def f(m):
        def loss(p):
            y = m.apply({"params": p}, x, rngs={"quant": jax.random.PRNGKey(1)})
            return jnp.sum(y**2), y

        return jax.jit(jax.value_and_grad(loss, has_aux=True))

    ((_, yp), gp), ((_, yq), gq) = f(plain)(v["params"]), f(q)(v["params"])
    assert 1e-3 < rel(yq, yp) < 3e-2  # quantized, and close
    assert rel(gq["kernel"], gp["kernel"]) < 5e-2 and rel(gq["bias"], gp["bias"]) < 5e-2


def test_role_tiles_and_their_transposed_copies():
    from jq8.training.policy import parse_policy

    paper, hopper = parse_policy("jetfire-int8"), parse_policy("jetfire-int8-g128")
    for role in ("act", "weight", "grad"):  # square 32 x 32 everywhere: one set of scales for both layouts
        assert paper.role_spec(role).tile == paper.role_spec_t(role).tile == (32, 32)
    # per-token tiles: the transposed copy is quantized again in (1 x 128) tiles (K groups along tokens)
    assert hopper.act_spec.tile == hopper.act_spec_t.tile == hopper.grad_spec_t.tile == (1, 128)
    assert hopper.weight_spec.tile == hopper.weight_spec_t.tile == (128, 128)
    assert parse_policy("jetfire-int8:block=32x128").weight_spec_t.tile == (128, 32)  # mirrored, same scales
    assert hopper.tiles == ((1, 128), (128, 128)) and hopper.storage_spec.tile == (1, 128)
    custom = parse_policy("jetfire-int8:act_block=1x64,weight_block=64,grad_block=32", backend="xla")
    assert (custom.tile("act"), custom.tile("weight"), custom.tile("grad")) == ((1, 64), (64, 64), (32, 32))
    with pytest.raises(ValueError, match="act_block must be two powers of two"):
        parse_policy("jetfire-int8:act_block=1x96")
    with pytest.raises(ValueError, match="grad_block must be N or RxC"):
        parse_policy("jetfire-int8:grad_block=wide")
    with pytest.raises(ValueError, match="role must be one of"):
        hopper.tile("bias")
    assert parse_policy("jetfire-int8-g128:block_gemm=triton").block_gemm == "triton"
    with pytest.raises(ValueError, match="block_gemm must be one of"):
        parse_policy("jetfire-int8:block_gemm=cuda")
    with pytest.raises(ValueError, match=r"model_dim=576 is not a multiple of the INT8 block size 128"):
        hopper.check_dims(model_dim=576)  # SmolLM2's width: 128 x 128 blocks do not tile it


def test_jetfire_int8_names_the_block_policy_of_the_device(monkeypatch):
    from jq8.training import policy as policy_lib

    paper, hopper = Policy.from_name("jetfire-int8-32x32"), Policy.from_name("jetfire-int8-g128")
    monkeypatch.setattr(policy_lib, "on_hopper", lambda: False)
    assert Policy.from_name("jetfire-int8") == paper
    monkeypatch.setattr(policy_lib, "on_hopper", lambda: True)
    assert policy_lib.parse_policy("jetfire-int8") == hopper
    assert policy_lib.parse_policy("jetfire-int8:rounding_bwd=nearest").tiles == hopper.tiles
    # an explicit block size means the paper's square tiles at that size, on every device
    assert policy_lib.parse_policy("jetfire-int8:block=64").tiles == ((64, 64),)


def test_device_default_tiles_narrow_to_the_model_widths(monkeypatch):
    from jq8.training import policy as policy_lib

    resolve = policy_lib.resolve_spec
    monkeypatch.setattr(policy_lib, "on_hopper", lambda: True)
    g64 = "jetfire-int8-g128:block=64,act_block=1x64,grad_block=1x64"
    assert resolve("jetfire-int8", (576, 1536), 32) == g64  # SmolLM2: 576 = 4.5 x 128
    assert policy_lib.parse_policy(g64).tiles == ((1, 64), (64, 64))
    assert resolve("jetfire-int8:rounding_bwd=nearest", (576, 1536), 32) == g64 + ",rounding_bwd=nearest"
    assert resolve("jetfire-int8", (96, 384), 32) == "jetfire-int8-g128:block=32,act_block=1x32,grad_block=1x32"
    assert resolve("jetfire-int8", (4096, 16384), 32) == "jetfire-int8-g128"  # 128 fits: unchanged
    assert resolve("jetfire-int8", (100, 400), 32) == "jetfire-int8-g128"  # nothing fits: train.py's error
    # a spec that names a tile, or names the tiles outright, is taken as given
    assert resolve("jetfire-int8:act_block=1x128", (576, 1536), 32) == "jetfire-int8-g128:act_block=1x128"
    assert resolve("jetfire-int8-g128", (576, 1536), 32) == "jetfire-int8-g128"
    monkeypatch.setattr(policy_lib, "on_hopper", lambda: False)
    assert resolve("jetfire-int8", (576, 1536), 32) == "jetfire-int8-32x32"
