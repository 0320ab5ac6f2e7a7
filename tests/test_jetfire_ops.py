"""Jetfire custom_vjp ops against jax.grad of the fp32 references (CPU, jnp references of the kernels)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jq8.quant import QArray, dequantize, quantize
from jq8.training import jetfire_ops as ops
from jq8.training.jetfire import (
    _mlp_fwd,
    jetfire_linear,
    jetfire_mlp,
    jetfire_norm_linear,
    linear_reference,
    mlp_reference,
    norm_linear_reference,
)
from jq8.training.policy import Policy, parse_policy

INT8 = Policy.from_name("jetfire-int8", backend="xla", compute_dtype=jnp.float32)
F32 = Policy.from_name("bf16", compute_dtype=jnp.float32)
M = 45  # ragged token count: not a multiple of the 32-row block


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def rand(key, shape, scale=1.0):
    # numpy draws: no per-shape XLA compilation (eager jax.random costs seconds per test on this CPU)
    return jnp.asarray(scale * np.random.default_rng(key).standard_normal(shape), jnp.float32)


def mlp_params(d, f, activation="gelu", rms=False, seed=0):
    k = iter(range(seed * 10, seed * 10 + 10))
    bias = activation == "gelu"
    p = {
        "norm": {"scale": 1.0 + rand(next(k), (d,), 0.1)},
        "fc1": {"kernel": rand(next(k), (d, f), d**-0.5)},
        "fc2": {"kernel": rand(next(k), (f, d), f**-0.5)},
    }
    if not rms:
        p["norm"]["bias"] = rand(next(k), (d,), 0.1)
    if bias:
        p["fc1"]["bias"] = rand(next(k), (f,), 0.1)
        p["fc2"]["bias"] = rand(next(k), (d,), 0.1)
    if activation == "swiglu":
        p["gate"] = {"kernel": rand(next(k), (d, f), d**-0.5)}
    return p


def check_grads(fn_int8, fn_ref, args, tol, label):
    """Forward output and every gradient of sum(out * probe) within ``tol`` relative error."""
    n = len(args)
    probe = rand(99, jax.eval_shape(fn_ref, *args).shape)
    # One jit per implementation: output and all gradients (eager dispatch is slow on CPU).
    both = lambda f: jax.jit(
        jax.value_and_grad(
            lambda *a: (jnp.sum(f(*a).astype(jnp.float32) * probe), f(*a)),
            argnums=tuple(range(n)),
            has_aux=True,
        )
    )
    (_, out8), g8 = both(fn_int8)(*args)
    (_, out_ref), gr = both(fn_ref)(*args)
    errs = {"out": rel(out8, out_ref)}
    for i, (a, b) in enumerate(zip(g8, gr)):
        for (path, x8), xr in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
            errs[f"arg{i}{jax.tree_util.keystr(path)}"] = rel(x8, xr)
    print(label, {k: round(v, 4) for k, v in errs.items()})
    bad = {k: v for k, v in errs.items() if not v < tol}
    assert not bad, f"{label}: relative errors above {tol}: {bad}"
    return errs


# --------------------------------------------------------------------------------------- composed ops


def test_linear_grads_match_fp32_reference():
    x, w, b = rand(1, (3, 15, 64)), rand(2, (64, 96), 0.125), rand(3, (96,), 0.1)
    key = jax.random.PRNGKey(7)
    check_grads(
        lambda x, w, b: jetfire_linear(x, w, b, key, INT8),
        lambda x, w, b: linear_reference(x, w, b),
        (x, w, b),
        5e-2,
        "linear",
    )


def test_linear_without_bias_and_bf16_compute():
    pol = Policy.from_name("jetfire-int8", backend="xla")  # bf16 outputs
    x, w = rand(1, (M, 32)), rand(2, (32, 64), 0.2)
    y = jax.eval_shape(lambda x, w: jetfire_linear(x, w, None, jax.random.PRNGKey(0), pol), x, w)
    assert y.dtype == jnp.bfloat16 and y.shape == (M, 64)
    loss = lambda f: jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) ** 2), argnums=(0, 1)))
    dx, dw = loss(lambda x, w: jetfire_linear(x, w, None, jax.random.PRNGKey(0), pol))(x, w)
    dxr, dwr = loss(lambda x, w: linear_reference(x, w, None))(x, w)
    assert dx.dtype == x.dtype and rel(dx, dxr) < 5e-2 and rel(dw, dwr) < 5e-2


# Per-token tiles (1 x 32) for activations and gradients with 32 x 32 weight blocks: the Hopper policy's
# shape (jetfire-int8-g128) at widths a CPU test can afford.
ROLE_TILES = "jetfire-int8:block=32,act_block=1x32,grad_block=1x32"


@pytest.mark.parametrize(
    "activation,rms,spec",
    [("gelu", False, "jetfire-int8"), ("swiglu", True, "jetfire-int8"), ("gelu", False, "int8-row"),
     ("gelu", False, ROLE_TILES), ("swiglu", True, ROLE_TILES)],
)
def test_mlp_grads_match_fp32_reference(activation, rms, spec):
    d, f = 64, 128
    x, p = rand(4, (M, d)), mlp_params(d, f, activation, rms)
    key = jax.random.PRNGKey(3)
    pol = parse_policy(spec, backend="xla", compute_dtype=jnp.float32)
    check_grads(
        lambda x, p: jetfire_mlp(x, p, key, pol, activation=activation, rms=rms),
        lambda x, p: mlp_reference(x, p, activation=activation, rms=rms),
        (x, p),
        5e-2,
        f"mlp[{activation}, rms={rms}, {spec}]",
    )


def test_norm_linear_grads_match_fp32_reference():
    x, w, b = rand(5, (2, 20, 64)), rand(6, (64, 96), 0.125), rand(7, (96,), 0.1)
    norm = {"scale": 1.0 + rand(8, (64,), 0.1), "bias": rand(9, (64,), 0.1)}
    key = jax.random.PRNGKey(11)
    check_grads(
        lambda x, n, w, b: jetfire_norm_linear(x, n, w, b, key, INT8),
        lambda x, n, w, b: norm_linear_reference(x, n, w, b),
        (x, norm, w, b),
        5e-2,
        "norm_linear",
    )


@pytest.mark.parametrize("granularity", ["block", "row"])
@pytest.mark.parametrize("use_kernels", [False, True])
def test_norm_linear_split_cols_equals_packed_output_and_grads(granularity, use_kernels):
    """split_cols=D gives q, k, v apart: the same values and the same gradients (same noise key) as the
    packed (.., 3D) output sliced afterwards."""
    pol = Policy.from_name("jetfire-int8", backend="pallas" if use_kernels else "xla", granularity=granularity)
    x, w, b = rand(21, (2, 32, 64)), rand(22, (64, 192), 0.125), rand(23, (192,), 0.1)
    norm = {"scale": 1.0 + rand(24, (64,), 0.1), "bias": rand(25, (64,), 0.1)}
    key, ct = jax.random.PRNGKey(3), rand(26, (2, 32, 192))

    def packed(x, n, w, b):
        return jnp.sum(jetfire_norm_linear(x, n, w, b, key, pol).astype(jnp.float32) * ct)

    def split(x, n, w, b):
        parts = jetfire_norm_linear(x, n, w, b, key, pol, split_cols=64)
        assert len(parts) == 3 and all(p.shape == (2, 32, 64) for p in parts)
        return jnp.sum(jnp.concatenate(parts, axis=-1).astype(jnp.float32) * ct)

    v1, g1 = jax.value_and_grad(packed, argnums=(0, 1, 2, 3))(x, norm, w, b)
    v2, g2 = jax.value_and_grad(split, argnums=(0, 1, 2, 3))(x, norm, w, b)
    np.testing.assert_allclose(v2, v1, rtol=1e-6)
    for a, c in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="split_cols=50 must be a positive divisor"):
        jetfire_norm_linear(x, norm, w, b, key, pol, split_cols=50)


@pytest.mark.parametrize("op", ["norm_linear", "mlp"])
@pytest.mark.parametrize("granularity,use_kernels", [("block", True), ("row", True), ("row", False)])
def test_return_input_residual_equals_outside_add(op, granularity, use_kernels):
    """x + branch(x) with x passed through the op (return_input: the residual's gradient is added inside the
    op's LayerNorm backward) has the values and gradients of the residual added outside."""
    pol = Policy.from_name("jetfire-int8", backend="pallas" if use_kernels else "xla", granularity=granularity)
    x, key = rand(31, (2, 48, 64)), jax.random.PRNGKey(4)
    ct = rand(32, (2, 48, 64))
    if op == "mlp":
        params = mlp_params(64, 128)

        def branch(x, p, return_input=False):
            return jetfire_mlp(x, p, key, pol, return_input=return_input)
    else:
        params = {"w": rand(33, (64, 64), 0.125), "b": rand(34, (64,), 0.1),
                  "norm": {"scale": 1.0 + rand(35, (64,), 0.1), "bias": rand(36, (64,), 0.1)}}

        def branch(x, p, return_input=False):
            return jetfire_norm_linear(x, p["norm"], p["w"], p["b"], key, pol, return_input=return_input)

    def outside(x, p):
        return jnp.sum((x + branch(x, p).astype(jnp.float32)) * ct)

    def through(x, p):
        y, x_res = branch(x, p, return_input=True)
        assert x_res.shape == x.shape
        return jnp.sum((x_res + y.astype(jnp.float32)) * ct)

    v1, g1 = jax.value_and_grad(outside, argnums=(0, 1))(x, params)
    v2, g2 = jax.value_and_grad(through, argnums=(0, 1))(x, params)
    np.testing.assert_allclose(v2, v1, rtol=1e-6)
    for a, c in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)
    if op == "mlp":  # x + branch from fc2's epilogue: fp32 sum, where outside rounds the branch to bf16
        def added(x, p):
            y = jetfire_mlp(x, p, key, pol, add_input=True)
            assert y.dtype == x.dtype
            return jnp.sum(y * ct)

        v3, g3 = jax.value_and_grad(added, argnums=(0, 1))(x, params)
        np.testing.assert_allclose(v3, v1, rtol=1e-2)
        for a, c in zip(jax.tree.leaves(g3), jax.tree.leaves(g1)):
            np.testing.assert_allclose(a, c, rtol=0.05, atol=0.05 * np.abs(c).max())
        with pytest.raises(ValueError, match="exclude each other"):
            jetfire_mlp(x, params, key, pol, add_input=True, return_input=True)


@pytest.mark.parametrize("granularity,use_kernels", [("row", True), ("row", False), ("block", True)])
def test_linear_residual_is_added_in_the_epilogue(granularity, use_kernels):
    """jetfire_linear(..., residual=r) = r + x @ W + b in r's dtype; r's gradient is the output's."""
    pol = Policy.from_name("jetfire-int8", backend="pallas" if use_kernels else "xla", granularity=granularity)
    x, w, b, r = rand(41, (2, 40, 64)), rand(42, (64, 96), 0.125), rand(43, (96,), 0.1), rand(44, (2, 40, 96))
    key, ct = jax.random.PRNGKey(5), rand(45, (2, 40, 96))
    y = jetfire_linear(x, w, b, key, pol, residual=r)
    assert y.dtype == jnp.float32 and y.shape == r.shape
    ref = r + jetfire_linear(x, w, b, key, pol).astype(jnp.float32)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-2 * np.abs(np.asarray(ref - r)).max())
    gx, gr = jax.grad(lambda x, r: jnp.sum(jetfire_linear(x, w, b, key, pol, residual=r) * ct), (0, 1))(x, r)
    np.testing.assert_array_equal(gr, ct)
    gx_ref = jax.grad(lambda x: jnp.sum(jetfire_linear(x, w, b, key, pol).astype(jnp.float32) * ct))(x)
    np.testing.assert_allclose(gx, gx_ref, rtol=0, atol=0.05 * np.abs(np.asarray(gx_ref)).max())
    with pytest.raises(ValueError, match="residual must have shape"):
        jetfire_linear(x, w, b, key, pol, residual=r[:, :5])


@pytest.mark.parametrize(
    "fwd,gi,gw",
    [
        (True, False, False),
        (False, True, False),
        (False, False, True),
    ],
)
def test_per_gemm_toggles(fwd, gi, gw):
    pol = Policy.from_name(
        "jetfire-int8",
        backend="xla",
        compute_dtype=jnp.float32,
        int8_forward=fwd,
        int8_grad_input=gi,
        int8_grad_weight=gw,
    )
    x, p = rand(4, (M, 64)), mlp_params(64, 96)
    errs = check_grads(
        lambda x, p: jetfire_mlp(x, p, jax.random.PRNGKey(1), pol),
        lambda x, p: mlp_reference(x, p),
        (x, p),
        5e-2,
        f"toggles fwd={fwd} gi={gi} gw={gw}",
    )
    # A GEMM left in fp32 leaves its result exact: the forward output, or (with only grad-weight INT8
    # and an fp32 forward) the fc2 bias gradient, which reads the exact output gradient.
    if not fwd:
        assert errs["out"] < 1e-5
    else:
        assert errs["out"] > 1e-4  # the INT8 forward really ran


def test_stochastic_rounding_is_unbiased():
    """Averaged over keys, INT8 weight/input gradients converge to those of the (nearest-rounded) forward
    operands with the exact output gradient: the backward quantization adds noise, not bias."""
    x, w = rand(1, (64, 64)), rand(2, (64, 64), 0.125)
    g = rand(3, (64, 64))

    def grads(key):
        _, vjp = jax.vjp(lambda x, w: jetfire_linear(x, w, None, key, INT8), x, w)
        return vjp(g)

    keys = jax.random.split(jax.random.PRNGKey(0), 128)
    dx, dw = jax.jit(jax.vmap(grads))(keys)
    xq = dequantize(quantize(x, INT8.act_spec), jnp.float32)
    wq = dequantize(quantize(w, INT8.weight_spec), jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    want_dx, want_dw = jnp.dot(g, wq.T, precision=hi), jnp.dot(xq.T, g, precision=hi)
    one_dx, one_dw = rel(dx[0], want_dx), rel(dw[0], want_dw)
    mean_dx, mean_dw = rel(dx.mean(0), want_dx), rel(dw.mean(0), want_dw)
    print(f"SR error, one key: dx {one_dx:.4f} dw {one_dw:.4f}; 128 keys: dx {mean_dx:.5f} dw {mean_dw:.5f}")
    # Independent noise shrinks like 1/sqrt(128) = 1/11; a bias would not shrink.
    assert mean_dx < one_dx / 6 and mean_dw < one_dw / 6
    assert one_dx > 1e-3  # the gradients really were quantized
    # Different keys give different noise, one key is reproducible.
    assert not np.allclose(dw[0], dw[1])
    np.testing.assert_array_equal(grads(keys[0])[1], dw[0])


def test_nearest_backward_rounding_is_deterministic_across_keys():
    pol = Policy.from_name("jetfire-int8", backend="xla", rounding_bwd="nearest")
    x, w = rand(1, (40, 32)), rand(2, (32, 32))
    grad = jax.jit(
        lambda k: jax.grad(lambda w: jnp.sum(jetfire_linear(x, w, None, k, pol).astype(jnp.float32) ** 2))(w)
    )
    np.testing.assert_array_equal(grad(jax.random.PRNGKey(0)), grad(jax.random.PRNGKey(1)))


# --------------------------------------------------------------------------------------- single ops


@pytest.mark.parametrize("rms", [False, True])
def test_layer_norm_backward_is_exact(rms):
    x, gamma, beta = rand(1, (M, 96), 3.0) + 1.5, 1.0 + rand(2, (96,), 0.2), rand(3, (96,), 0.2)
    beta = None if rms else beta
    dh = rand(4, (M, 96))

    @jax.jit
    def run(x, gamma, beta, dh):
        _, _, res = ops.layer_norm_fwd(x, gamma, beta, F32, eps=1e-5, rms=rms)
        ours = ops.layer_norm_bwd(dh, res, gamma, rms=rms, has_beta=not rms)
        _, vjp = jax.vjp(lambda x, g, b: ops.layer_norm_float(x, g, b, eps=1e-5, rms=rms)[0], x, gamma, beta)
        return ours, vjp(dh)

    (dx, dgamma, dbeta), (rx, rg, rb) = run(x, gamma, beta, dh)
    assert rel(dx, rx) < 1e-5 and rel(dgamma, rg) < 1e-5
    if not rms:
        assert rel(dbeta, rb) < 1e-5


def test_layer_norm_forward_saves_int8_and_full_row_stats():
    x = rand(1, (M, 160), 2.0) + 3.0  # 160 = 5 blocks: statistics must span every block of the row
    gamma, beta = 1.0 + rand(2, (160,), 0.1), rand(3, (160,), 0.1)
    fwd = jax.jit(lambda x, g, b: ops.layer_norm_fwd(x, g, b, INT8, eps=1e-5, rms=False))
    h, h_dw, (x_saved, mean, rstd) = fwd(x, gamma, beta)
    assert isinstance(h, QArray) and h.values.dtype == jnp.int8 and h.values.shape == (M, 160)
    assert isinstance(h_dw, QArray) and h_dw.values.shape == (160, M)
    assert isinstance(x_saved, QArray) and x_saved.values.dtype == jnp.int8
    np.testing.assert_allclose(mean, x.mean(1), rtol=1e-5)
    np.testing.assert_allclose(rstd, 1 / np.sqrt(np.var(np.asarray(x), 1) + 1e-5), rtol=1e-4)
    ref = ops.layer_norm_float(x, gamma, beta, eps=1e-5, rms=False)[0]
    assert rel(dequantize(h, jnp.float32), ref) < 1e-2
    assert rel(dequantize(h_dw, jnp.float32), ref.T) < 1e-2


def test_gelu_backward_matches_autodiff():
    u, da = rand(1, (M, 64), 2.0), rand(2, (M, 64))
    pol = Policy.from_name("jetfire-int8", backend="xla", int8_grad_input=False, int8_grad_weight=False)

    @jax.jit
    def run(da, u):
        _, vjp = jax.vjp(lambda u: jax.nn.gelu(u, approximate=False), u)
        return (
            ops.gelu_bwd(da, u, pol, jnp.zeros(2, jnp.uint32))[2],
            ops.gelu_bwd(da, u, INT8, jnp.array([1, 2], jnp.uint32)),
            vjp(da)[0],
        )

    db, (q, qt, db8), want = run(da, u)
    assert rel(db, want.sum(0)) < 1e-5
    assert q.values.dtype == jnp.int8 and qt.values.shape == (64, M)
    assert rel(dequantize(q, jnp.float32), want) < 2e-2 and rel(db8, want.sum(0)) < 5e-2


def test_mlp_residuals_are_int8():
    """What the MLP keeps for its backward: the residual-stream input and fc1/GELU outputs as INT8 blocks."""
    d, f = 64, 128
    x, p = rand(4, (M, d)), mlp_params(d, f)
    seeds = jnp.zeros((3, 2), jnp.uint32)
    _, res = jax.eval_shape(lambda x, p: _mlp_fwd(x, p, seeds, INT8, "gelu", 1e-5, False, "none"), x, p)
    (x_saved, _, _), h_dw, u, _, a_dw = res[:5]
    expected = [("x", x_saved, (M, d)), ("h^T", h_dw, (d, M)), ("u", u, (M, f)), ("a^T", a_dw, (f, M))]
    for name, q, shape in expected:
        assert isinstance(q, QArray) and q.values.dtype == jnp.int8, name
        assert q.values.shape == shape, (name, q.values.shape)
    float_bytes = sum(
        a.size * a.dtype.itemsize
        for a in jax.tree.leaves(res)
        if a.dtype == jnp.float32 and a.ndim == 2 and a.shape[0] >= M
    )
    assert float_bytes == 0, "no (tokens, features) fp32 activation should be saved"


def test_dimension_not_multiple_of_block_raises():
    with pytest.raises(ValueError, match="hidden=100 is not a multiple of the INT8 block size 32"):
        jax.eval_shape(lambda x, p: jetfire_mlp(x, p, None, INT8), rand(1, (8, 64)), mlp_params(64, 100))
    with pytest.raises(ValueError, match="in_features=48"):
        jax.eval_shape(
            lambda x, w: jetfire_linear(x, w, None, None, INT8), rand(1, (8, 48)), rand(2, (48, 64))
        )


@pytest.mark.parametrize(
    "spec,hidden", [("jetfire-int8", 64), ("int8-row", 64), ("int8-row", 192), (ROLE_TILES, 64)]
)
def test_kernel_path_matches_reference_path(spec, hidden):
    """backend="pallas" (Pallas, interpret mode on CPU) against backend="xla" on one small MLP."""
    pk, pr = (parse_policy(spec, backend=k, compute_dtype=jnp.float32) for k in ("pallas", "xla"))
    # tokens > 64: int8_matmul fails for K < block_k. hidden 192: fc1's (1, 128) row groups are ragged (row).
    x, p = rand(4, (72, 64)), mlp_params(64, hidden)
    key = jax.random.PRNGKey(5)
    f = lambda pol: jax.jit(
        jax.value_and_grad(lambda x, p: jnp.sum(jetfire_mlp(x, p, key, pol) ** 2), argnums=(0, 1))
    )(x, p)
    (vk, gk), (vr, gr) = f(pk), f(pr)
    assert abs(float(vk) - float(vr)) <= 1e-3 * abs(float(vr))
    for a, b in zip(jax.tree.leaves(gk), jax.tree.leaves(gr)):
        assert rel(a, b) < 1e-2
