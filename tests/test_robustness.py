"""Tests for pagjax.robustness: on/off-manifold softmax change and gradient fraction."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagjax import gradients
from pagjax.geometry import project_normal, project_tangent, tangent_basis_from_generator
from pagjax.robustness import (
    ManifoldChange,
    gradient_on_manifold_fraction,
    ManifoldDirections,
    manifold_directions,
    on_off_change,
    on_off_manifold_change,
    softmax_change,
)

IMG = (4, 4, 1)
D = 16
K = 3
C = 4  # classes
EPS = [0.1, 0.5, 2.0]


@pytest.fixture(scope="module")
def setup():
    ku, km, kw, kz = jax.random.split(jax.random.PRNGKey(0), 4)
    q, _ = jnp.linalg.qr(jax.random.normal(ku, (D, D)))
    u, v = q[:, :K], q[:, K:]  # tangent basis and its orthogonal complement
    mean = jax.random.normal(km, (D,))
    z = jax.random.normal(kz, (8, K))
    x = (mean + z @ u.T).reshape((8,) + IMG)
    w = jax.random.normal(kw, (C, D))
    return dict(u=u, v=v, mean=mean, z=z, x=x, w=w)


def tangent_only_apply(params, x):
    """logits = W U^T (x - mean): depends only on the tangent coordinates."""
    flat = x.reshape(x.shape[0], -1) - params["mean"]
    return (flat @ params["u"]) @ params["w"][:, :K].T


def normal_only_apply(params, x):
    """logits = W V^T x: depends only on the normal coordinates."""
    flat = x.reshape(x.shape[0], -1)
    return 0.5 * (flat @ params["v"]) @ params["w"][:, : D - K].T


def generic_apply(params, x):
    return jnp.tanh(x.reshape(x.shape[0], -1)) @ params["w"].T


# --------------------------------------------------------------------- on/off change


@pytest.mark.parametrize("per_example", [False, True])
def test_tangent_only_model_has_zero_off_manifold_change_and_fraction_one(setup, per_example):
    s = setup
    params = {"u": s["u"], "mean": s["mean"], "w": s["w"]}
    if per_example:
        gen = lambda z: (s["mean"] + z @ s["u"].T).reshape((z.shape[0],) + IMG)  # noqa: E731
        basis = tangent_basis_from_generator(gen, s["z"])
    else:
        basis = s["u"]
    res = on_off_manifold_change(tangent_only_apply, params, s["x"], basis, EPS, jax.random.PRNGKey(1),
                                 num_directions=3)
    assert isinstance(res, ManifoldChange)
    assert res.on_l1.shape == (8, 3) and res.mean_off_l1.shape == (3,)
    np.testing.assert_allclose(res.off_l1, 0.0, atol=1e-5)
    np.testing.assert_allclose(res.off_l2, 0.0, atol=1e-5)
    assert float(jnp.min(res.on_l1)) > 1e-3
    assert float(jnp.max(res.off_on_ratio)) < 1e-3
    # change grows with eps and stays within [0, 2]
    assert bool(jnp.all(jnp.diff(res.mean_on_l1) > 0)) and float(jnp.max(res.on_l1)) <= 2.0
    # L2 <= L1 <= sqrt(K) L2
    assert bool(jnp.all(res.on_l2 <= res.on_l1 + 1e-6))
    assert bool(jnp.all(res.on_l1 <= np.sqrt(C) * res.on_l2 + 1e-6))
    labels = jnp.arange(8, dtype=jnp.int32) % C
    g = gradients.input_gradients(tangent_only_apply, params, s["x"], labels, target="logprob")
    frac, baseline = gradient_on_manifold_fraction(g, basis)
    np.testing.assert_allclose(frac, 1.0, atol=1e-5)
    np.testing.assert_allclose(baseline, np.sqrt(K / D), rtol=1e-5)


def test_normal_only_model_has_zero_on_manifold_change_and_fraction_zero(setup):
    s = setup
    params = {"v": s["v"], "w": s["w"]}
    res = on_off_manifold_change(normal_only_apply, params, s["x"], s["u"], EPS, jax.random.PRNGKey(2),
                                 num_directions=2)
    np.testing.assert_allclose(res.on_l1, 0.0, atol=1e-5)
    assert float(jnp.min(res.off_l1)) > 1e-3
    assert float(jnp.min(res.off_on_ratio)) > 1e3  # on ~ 0: huge, finite, not NaN
    assert bool(jnp.all(jnp.isfinite(res.off_on_ratio)))
    labels = jnp.zeros(8, jnp.int32)
    g = gradients.input_gradients(normal_only_apply, params, s["x"], labels, target="logprob")
    frac, _ = gradient_on_manifold_fraction(g, s["u"])
    np.testing.assert_allclose(frac, 0.0, atol=1e-5)


def test_softmax_change_closed_form_two_class_linear():
    # logits (0, a.x): softmax change = |sigmoid(a.(x+eps u)) - sigmoid(a.x)| per class
    ka, kx, ku = jax.random.split(jax.random.PRNGKey(3), 3)
    a = jax.random.normal(ka, (D,))
    apply = lambda p, x: jnp.stack([jnp.zeros(x.shape[0]), x.reshape(x.shape[0], -1) @ p], -1)  # noqa: E731
    x = jax.random.normal(kx, (5,) + IMG)
    dirs = jax.random.normal(ku, (5, 2, D))
    l1, l2 = softmax_change(apply, a, x, dirs, EPS)
    assert l1.shape == (5, 3, 2)
    s0 = jax.nn.sigmoid(x.reshape(5, -1) @ a)[:, None, None]
    s1 = jax.nn.sigmoid((x.reshape(5, 1, 1, -1) + jnp.array(EPS)[None, :, None, None] * dirs[:, None]) @ a)
    np.testing.assert_allclose(l1, 2 * jnp.abs(s1 - s0), atol=1e-6)
    np.testing.assert_allclose(l2, np.sqrt(2) * jnp.abs(s1 - s0), atol=1e-6)
    # chunked evaluation gives the same numbers
    l1c, l2c = softmax_change(apply, a, x, dirs, EPS, batch_size=7)
    np.testing.assert_allclose(l1c, l1, atol=1e-6)
    np.testing.assert_allclose(l2c, l2, atol=1e-6)


def test_on_off_is_mean_over_directions_of_the_drawn_unit_directions(setup):
    s = setup
    key = jax.random.PRNGKey(4)
    params = {"w": s["w"]}
    res = on_off_manifold_change(generic_apply, params, s["x"], s["u"], EPS, key, num_directions=5)
    tan, nor = manifold_directions(key, s["u"], 8, 5)
    assert tan.shape == (8, 5, D)
    # unit norm, tangent part in the span, normal part orthogonal to it
    np.testing.assert_allclose(jnp.linalg.norm(tan, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(nor, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(project_normal(tan.reshape(40, D), s["u"]), 0.0, atol=1e-5)
    np.testing.assert_allclose(project_tangent(nor.reshape(40, D), s["u"]), 0.0, atol=1e-5)
    on1, on2 = softmax_change(generic_apply, params, s["x"], tan, EPS)
    off1, off2 = softmax_change(generic_apply, params, s["x"], nor, EPS)
    np.testing.assert_allclose(res.on_l1, on1.mean(-1), atol=1e-6)
    np.testing.assert_allclose(res.off_l2, off2.mean(-1), atol=1e-6)
    np.testing.assert_allclose(res.mean_off_l1, off1.mean((0, 2)), atol=1e-6)
    np.testing.assert_allclose(res.off_on_ratio, off1.mean((0, 2)) / on1.mean((0, 2)), rtol=1e-5)
    # same key -> same numbers (common random numbers across models); chunking changes nothing
    res2 = on_off_manifold_change(generic_apply, params, s["x"], s["u"], EPS, key, num_directions=5,
                                  batch_size=13)
    np.testing.assert_allclose(res2.on_l1, res.on_l1, atol=1e-6)
    # a different key gives different directions
    res3 = on_off_manifold_change(generic_apply, params, s["x"], s["u"], EPS, jax.random.PRNGKey(5),
                                  num_directions=5)
    assert float(jnp.max(jnp.abs(res3.on_l1 - res.on_l1))) > 1e-4


@pytest.mark.parametrize("per_example", [False, True])
def test_reused_directions_give_the_same_measurement(setup, per_example):
    # Directions drawn once (geometry only) and reused for a model equal the all-in-one call.
    s = setup
    params = {"w": s["w"]}
    basis = jnp.broadcast_to(s["u"], (8, D, K)) if per_example else s["u"]
    key = jax.random.PRNGKey(11)
    dirs = manifold_directions(key, basis, 8, 3)
    assert isinstance(dirs, ManifoldDirections) and dirs.tangent.shape == (8, 3, D)
    ref = on_off_manifold_change(generic_apply, params, s["x"], basis, EPS, key, num_directions=3)
    got = on_off_change(generic_apply, params, s["x"], dirs, EPS)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # a plain (tangent, normal) pair works too, and a second model reuses the same directions
    other = {"w": 2.0 * s["w"]}
    got2 = on_off_change(generic_apply, other, s["x"], (dirs.tangent, dirs.normal), EPS, batch_size=5)
    ref2 = on_off_manifold_change(generic_apply, other, s["x"], basis, EPS, key, num_directions=3)
    np.testing.assert_allclose(got2.off_on_ratio, ref2.off_on_ratio, rtol=1e-5)
    assert float(jnp.max(jnp.abs(got2.on_l1 - got.on_l1))) > 1e-4  # it did measure the other model


def test_first_order_theorem_small_eps(setup):
    # For small eps and many directions, E||J_p u||^2 over unit u uniform in the tangent
    # space is ||J_p U||_F^2 / k (J_p: Jacobian of the softmax). Check mean(l2^2)/eps^2.
    s = setup
    params = {"w": s["w"]}
    x = s["x"][:2]
    eps = 1e-3
    r = 4000
    tan, nor = manifold_directions(jax.random.PRNGKey(6), s["u"], 2, r)
    _, l2 = softmax_change(generic_apply, params, x, tan, [eps])
    sm = lambda xi: jax.nn.softmax(generic_apply(params, xi[None]))[0]  # noqa: E731
    jac = jax.vmap(jax.jacfwd(sm))(x).reshape(2, C, D)
    expected = jnp.sum((jac @ s["u"]) ** 2, axis=(1, 2)) / K
    np.testing.assert_allclose(jnp.mean(l2[:, 0] ** 2, -1) / eps**2, expected, rtol=0.1)
    _, l2n = softmax_change(generic_apply, params, x, nor, [eps])
    expected_n = jnp.sum((jac @ s["v"]) ** 2, axis=(1, 2)) / (D - K)
    np.testing.assert_allclose(jnp.mean(l2n[:, 0] ** 2, -1) / eps**2, expected_n, rtol=0.1)


# --------------------------------------------------------------------- gradient fraction


def test_gradient_fraction_random_baseline_and_zero_gradient(setup):
    u = setup["u"]
    g = jax.random.normal(jax.random.PRNGKey(7), (2000, D))
    frac, baseline = gradient_on_manifold_fraction(g, u)
    # E[||P g||^2/||g||^2] = k/d exactly for isotropic g
    np.testing.assert_allclose(jnp.mean(frac**2), K / D, rtol=0.05)
    np.testing.assert_allclose(baseline, np.sqrt(K / D), rtol=1e-6)
    # a zero gradient (underflowed log-prob of a confident model) gives 0, not NaN
    z = jnp.zeros((3,) + IMG).at[1].set(1.0)
    frac0, _ = gradient_on_manifold_fraction(z, u)
    assert bool(jnp.all(jnp.isfinite(frac0)))
    assert float(frac0[0]) == 0.0 and float(frac0[2]) == 0.0 and 0.0 < float(frac0[1]) <= 1.0
    # its gradient is also NaN-free
    dfrac = jax.grad(lambda a: gradient_on_manifold_fraction(a, u)[0].sum())(z)
    assert bool(jnp.all(jnp.isfinite(dfrac)))


def test_gradient_fraction_rank_deficient_basis_baseline():
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(8), (D, 4)))
    basis = q.at[:, 3].set(0.0)  # rank 3 in a 4-column basis
    _, baseline = gradient_on_manifold_fraction(jnp.ones((2, D)), basis)
    np.testing.assert_allclose(baseline, np.sqrt(3 / D), rtol=1e-5)


# --------------------------------------------------------------------- errors


def test_bad_arguments_give_clear_errors(setup):
    s = setup
    params = {"w": s["w"]}
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="basis.*wrong size"):
        on_off_manifold_change(generic_apply, params, s["x"], jnp.ones((D - 1, K)), EPS, key)
    with pytest.raises(ValueError, match="basis.*3 examples"):
        on_off_manifold_change(generic_apply, params, s["x"], jnp.ones((3, D, K)), EPS, key)
    with pytest.raises(ValueError, match="eps"):
        on_off_manifold_change(generic_apply, params, s["x"], s["u"], [1.0, -1.0], key)
    with pytest.raises(ValueError, match="eps"):
        on_off_manifold_change(generic_apply, params, s["x"], s["u"], [], key)
    with pytest.raises(ValueError, match="num_directions"):
        on_off_manifold_change(generic_apply, params, s["x"], s["u"], EPS, key, num_directions=0)
    with pytest.raises(ValueError, match="x must have rank"):
        on_off_manifold_change(generic_apply, params, s["x"][0, 0, 0], s["u"], EPS, key)
    with pytest.raises(ValueError, match="logits of shape"):
        on_off_manifold_change(lambda p, x: x, params, s["x"], s["u"], EPS, key)
    with pytest.raises(ValueError, match="basis.*wrong size"):
        gradient_on_manifold_fraction(jnp.ones((2, D + 2)), s["u"])
    with pytest.raises(ValueError, match="directions must have shape"):
        softmax_change(generic_apply, params, s["x"], jnp.ones((8, 1, D + 1)), EPS)
    dirs = manifold_directions(key, s["u"], 8, 2)
    with pytest.raises(ValueError, match="directions must be a .tangent, normal. pair"):
        on_off_change(generic_apply, params, s["x"], dirs.tangent, EPS)
    with pytest.raises(ValueError, match=r"directions.tangent must have shape \(n=4"):
        on_off_change(generic_apply, params, s["x"][:4], dirs, EPS)
    with pytest.raises(ValueError, match="differ in shape"):
        on_off_change(generic_apply, params, s["x"], (dirs.tangent, dirs.normal[:, :1]), EPS)
    with pytest.raises(ValueError, match="eps"):
        on_off_change(generic_apply, params, s["x"], dirs, [-1.0])
