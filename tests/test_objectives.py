import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import linear_apply, linear_forward, linear_params, random_batch
from pagjax import objectives
from pagjax.objectives import cross_entropy, make_objective

KEY = jax.random.key(0)


def _setup(seed=0, batch=8):
    x, y = random_batch(seed, batch)
    return x, y, linear_params(jax.random.key(seed), 16, 3)


def closed_form_penalty(params, x, y):
    """||grad_x CE||^2 = ||W^T (p - e_y)||^2 for a linear softmax model."""
    W, xf = params["W"], x.reshape((x.shape[0], -1))
    r = jax.nn.softmax(xf @ W.T + params["b"]) - jax.nn.one_hot(y, W.shape[0])
    return jnp.sum(jnp.square(r @ W), axis=-1)


def closed_form_penalty_param_grad(params, x, y):
    """d/dW and d/db of sum_i ||W^T r_i||^2 derived by hand (J = diag(p) - p p^T)."""
    W, b, xf = params["W"], params["b"], x.reshape((x.shape[0], -1))
    p = jax.nn.softmax(xf @ W.T + b)
    r = p - jax.nn.one_hot(y, W.shape[0])
    g = r @ W  # (B, d)
    Wg = g @ W.T  # (B, K)
    JWg = p * Wg - p * jnp.sum(p * Wg, axis=-1, keepdims=True)
    dW = 2 * (r.T @ g) + 2 * (JWg.T @ xf)
    db = 2 * jnp.sum(JWg, axis=0)
    return {"W": dW, "b": db}


def test_gradnorm_penalty_matches_closed_form():
    x, y, params = _setup()
    loss, aux = make_objective("gradnorm")(linear_forward, params, x, y, KEY, 0.3)
    np.testing.assert_allclose(aux["penalty"], closed_form_penalty(params, x, y), rtol=1e-5)
    np.testing.assert_allclose(loss, aux["ce"] + 0.3 * closed_form_penalty(params, x, y), rtol=1e-5)


def test_gradnorm_parameter_gradient_matches_hand_derivation_and_finite_differences():
    x, y, params = _setup(1)
    obj = make_objective("gradnorm")
    penalty_sum = lambda p: jnp.sum(obj(linear_forward, p, x, y, KEY, 1.0)[1]["penalty"])  # noqa: E731
    got = jax.grad(penalty_sum)(params)
    want = closed_form_penalty_param_grad(params, x, y)
    np.testing.assert_allclose(got["W"], want["W"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["b"], want["b"], rtol=1e-4, atol=1e-5)
    # central finite differences on a few weights, in float64 for accuracy
    with jax.enable_x64():
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        x64 = jnp.asarray(x, jnp.float64)
        f = lambda p: float(jnp.sum(closed_form_penalty(p, x64, y)))  # noqa: E731
        for idx in [(0, 0), (1, 5), (2, 15)]:
            h = 1e-6
            up = {"W": p64["W"].at[idx].add(h), "b": p64["b"]}
            dn = {"W": p64["W"].at[idx].add(-h), "b": p64["b"]}
            np.testing.assert_allclose(got["W"][idx], (f(up) - f(dn)) / (2 * h), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("name", ["ce", "gradnorm", "smoothness", "noise", "pgd"])
@pytest.mark.parametrize("official", [False, True])
def test_strength_zero_is_plain_cross_entropy_exactly(name, official):
    x, y, params = _setup(2)
    loss, aux = make_objective(name, official=official)(linear_forward, params, x, y, KEY, 0.0)
    np.testing.assert_array_equal(loss, cross_entropy(linear_apply(params, x), y))
    assert np.all(np.isfinite(jax.grad(lambda p: jnp.mean(make_objective(name)(linear_forward, p, x, y, KEY, 0.0)[0]))(params)["W"]))


def test_official_gradnorm_equals_the_official_formula_and_conversion():
    x, y, params = _setup(3, batch=16)
    B, c = x.shape[0], 2e-3
    # The official code: mean CE + c * 1e5 / B * ||grad_x mean_i CE_i||^2 (whole batch).
    mean_ce = lambda inputs: jnp.mean(cross_entropy(linear_apply(params, inputs), y))  # noqa: E731
    official = mean_ce(x) + c * 1e5 / B * jnp.sum(jnp.square(jax.grad(mean_ce)(x)))
    ours, _ = make_objective("gradnorm", official=True)(linear_forward, params, x, y, KEY, c)
    np.testing.assert_allclose(jnp.mean(ours), official, rtol=1e-5)
    lam = objectives.official_gradnorm_lambda(c, B)
    np.testing.assert_allclose(lam, c * 1e5 / B**2)
    textbook, _ = make_objective("gradnorm")(linear_forward, params, x, y, KEY, lam)
    np.testing.assert_allclose(ours, textbook, rtol=1e-6)


def test_official_pgd_uses_a_whole_batch_ball():
    x, y, params = _setup(4, batch=16)
    eps = 1.0
    seen = {}

    def spy_forward(p, inputs):
        seen.setdefault("inputs", []).append(inputs)
        return linear_forward(p, inputs)

    make_objective("pgd", official=True, pgd_steps=3)(spy_forward, params, x, y, KEY, eps)
    delta = seen["inputs"][-1] - x
    assert np.linalg.norm(np.asarray(delta)) <= eps * (1 + 1e-5)  # whole batch in the ball
    assert np.linalg.norm(np.asarray(delta)) > 0.5 * eps  # and it moved
    per_image = np.linalg.norm(np.asarray(delta).reshape(16, -1), axis=1)
    assert per_image.max() < eps  # so no image reaches the textbook per-image radius


def test_noise_objective_perturbs_with_the_requested_scale():
    x, y, params = _setup(5, batch=256)
    seen = {}

    def spy_forward(p, inputs):
        seen["inputs"] = inputs
        return linear_forward(p, inputs)

    make_objective("noise")(spy_forward, params, x, y, KEY, 0.3)
    np.testing.assert_allclose(np.std(np.asarray(seen["inputs"] - x)), 0.3, rtol=0.05)


def test_smoothness_penalty_is_logit_distance_under_input_noise():
    x, y, params = _setup(6, batch=4)
    loss, aux = make_objective("smoothness", smoothness_noise_std=0.2)(linear_forward, params, x, y, KEY, 0.5)
    n = 0.2 * jax.random.normal(KEY, x.shape)
    want = jnp.sum(jnp.square(linear_apply(params, x) - linear_apply(params, x + n)), -1)
    np.testing.assert_allclose(aux["penalty"], want, rtol=1e-5)
    np.testing.assert_allclose(loss, aux["ce"] + 0.5 * want, rtol=1e-5)


def test_gradnorm_is_nan_free_at_a_zero_input_gradient():
    x, y, _ = _setup(7)
    zero = {"W": jnp.zeros((3, 16)), "b": jnp.zeros(3)}
    for name in ["gradnorm", "pgd"]:
        grads = jax.grad(lambda p: jnp.mean(make_objective(name)(linear_forward, p, x, y, KEY, 1.0)[0]))(zero)
        assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize(
    "args, match",
    [(("adversarial",), "objective"), (("pgd",), "pgd_steps"), (("smoothness",), "smoothness_noise_std")],
)
def test_bad_objective_arguments(args, match):
    kwargs = {"pgd": dict(pgd_steps=-2), "smoothness": dict(smoothness_noise_std=0.0)}.get(args[0], {})
    with pytest.raises(ValueError, match=match):
        make_objective(*args, **kwargs)
