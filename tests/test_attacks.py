import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from helpers import linear_apply, linear_params, random_batch
from pagjax import attacks
from pagjax.objectives import cross_entropy


def _loss_fn(params, y):
    return lambda inputs: cross_entropy(linear_apply(params, inputs), y)


@functools.partial(jax.jit, static_argnames=("num_steps", "start", "ball", "box"))
def _pgd(params, x, y, key, eps, **kw):
    """`attacks.l2_pgd` on the linear model as one compiled program, eps traced: run eagerly,
    every operation was compiled on its own for each new shape."""
    return attacks.l2_pgd(_loss_fn(params, y), x, key, eps=eps, **kw)


@functools.partial(jax.jit, static_argnames=("scale", "num_steps", "start", "ball"))
def _random_model_pgd(seed_key, x, y, eps, scale=1.0, **kw):
    """`_pgd` on ``linear_params(seed_key, ...)``, drawn inside the same program (every
    example of the property tests has new shapes, so each compiles once)."""
    params = linear_params(seed_key, x[0].size, 3, scale=scale)
    return attacks.l2_pgd(_loss_fn(params, y), x, seed_key, eps=eps, **kw)


def _norms(d):
    return np.linalg.norm(np.asarray(d).reshape(d.shape[0], -1), axis=1)


@settings(max_examples=15, deadline=None)
@given(
    batch=st.integers(1, 5),
    side=st.integers(1, 4),
    eps=st.floats(0.0, 5.0),
    steps=st.integers(0, 6),
    start=st.sampled_from(attacks.STARTS),
    seed=st.integers(0, 1000),
)
def test_pgd_stays_in_every_examples_ball(batch, side, eps, steps, start, seed):
    x, y = random_batch(seed, batch, shape=(side, side, 1))
    delta = _random_model_pgd(jax.random.key(seed), x, y, eps, scale=3.0, num_steps=steps, start=start)
    assert delta.shape == x.shape
    assert np.all(np.isfinite(delta))
    assert np.all(_norms(delta) <= eps * (1 + 1e-5) + 1e-7)


@settings(max_examples=10, deadline=None)
@given(batch=st.integers(1, 6), eps=st.floats(0.0, 3.0), steps=st.integers(0, 5), seed=st.integers(0, 1000))
def test_whole_batch_ball_bounds_the_batch_norm(batch, eps, steps, seed):
    x, y = random_batch(seed, batch)
    delta = _random_model_pgd(jax.random.key(seed), x, y, eps, num_steps=steps, ball="whole_batch",
                              start="positive_uniform")
    assert np.linalg.norm(np.asarray(delta)) <= eps * (1 + 1e-5) + 1e-7


def test_box_keeps_pixels_in_range_and_ball():
    x, y = random_batch(3, 8)
    params = linear_params(jax.random.key(3), 16, 3, scale=5.0)
    delta = _pgd(params, x, y, jax.random.key(0), 2.0, num_steps=5, box=(0.0, 1.0))
    adv = np.asarray(x + delta)
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    assert np.all(_norms(delta) <= 2.0 + 1e-5)


def test_pgd_beats_a_random_perturbation_of_the_same_norm():
    x, y = random_batch(4, 64, shape=(8, 8, 1))
    params = linear_params(jax.random.key(4), 64, 3, scale=0.5)
    loss_fn = jax.jit(_loss_fn(params, y))
    delta = _pgd(params, x, y, jax.random.key(1), 1.0, num_steps=10)
    rand = jax.random.normal(jax.random.key(2), x.shape)
    rand = rand / _norms(rand)[:, None, None, None] * _norms(delta)[:, None, None, None]
    adv_loss, rand_loss, clean = loss_fn(x + delta), loss_fn(x + rand), loss_fn(x)
    assert np.all(adv_loss >= rand_loss - 1e-5)
    assert float(jnp.mean(adv_loss)) > float(jnp.mean(rand_loss)) + 0.1
    assert float(jnp.mean(adv_loss)) > float(jnp.mean(clean))


def test_projection_is_idempotent_and_fixes_the_inside():
    d = jax.random.normal(jax.random.key(0), (5, 3, 3, 1)) * jnp.arange(1, 6)[:, None, None, None]
    once = attacks.project_l2_ball(d, 2.0)
    np.testing.assert_allclose(attacks.project_l2_ball(once, 2.0), once, rtol=1e-6)
    small = d * 0.01
    np.testing.assert_allclose(attacks.project_l2_ball(small, 2.0), small, rtol=1e-6)


def test_eps_zero_gives_exactly_zero_and_zero_gradient_is_safe():
    x, y = random_batch(5, 4)
    zero_model = {"W": jnp.zeros((3, 16)), "b": jnp.zeros(3)}  # input-gradient exactly 0
    for start in attacks.STARTS:
        d0 = attacks.l2_pgd(_loss_fn(zero_model, y), x, jax.random.key(0), eps=0.0, num_steps=3, start=start)
        np.testing.assert_array_equal(d0, 0.0)
        d1 = attacks.l2_pgd(_loss_fn(zero_model, y), x, jax.random.key(0), eps=1.0, num_steps=3, start=start)
        assert np.all(np.isfinite(d1))


def test_eps_may_be_traced_one_compilation_serves_every_eps_and_vmap_agrees():
    """A sweep passes eps as a traced scalar (jit, vmap over models): same results as
    concrete eps, one trace for all values, and eps = 0 inside the batch stays exactly 0."""
    x, y = random_batch(6, 4)
    params = linear_params(jax.random.key(6), 16, 3)
    attack = lambda eps: attacks.l2_pgd(_loss_fn(params, y), x, jax.random.key(0), eps=eps, num_steps=3)  # noqa: E731
    jitted = jax.jit(chex.assert_max_traces(attack, n=1))
    grid = jnp.array([0.0, 0.5, 2.0])
    batched = jax.vmap(attack)(grid)
    for i, eps in enumerate([0.0, 0.5, 2.0]):
        want = attack(eps)
        np.testing.assert_allclose(jitted(jnp.float32(eps)), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(batched[i], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(_norms(want), eps, rtol=1e-4)  # a linear loss: the attack reaches the sphere
    np.testing.assert_array_equal(batched[0], 0.0)


def test_attack_is_not_differentiated_through():
    """Danskin: training differentiates the loss at the attack point, so the returned delta
    carries no gradient, w.r.t. eps or the model (the result is a stop_gradient), while the
    loss at x + delta has the plain gradient there, finite also at eps = 0."""
    x, y = random_batch(7, 4)
    params = linear_params(jax.random.key(7), 16, 3)

    def attacked(p, eps):
        return attacks.l2_pgd(_loss_fn(p, y), x, jax.random.key(0), eps=eps, num_steps=3)

    d_eps = jax.grad(lambda eps: jnp.sum(attacked(params, eps) ** 2))(1.0)
    d_params = jax.grad(lambda p: jnp.sum(attacked(p, 1.0) ** 2))(params)
    assert float(d_eps) == 0.0 and all(np.all(g == 0) for g in jax.tree.leaves(d_params))
    for eps in (0.0, 1.0):
        delta = attacked(params, eps)
        got = jax.grad(lambda p: jnp.sum(_loss_fn(p, y)(x + attacked(p, eps))))(params)
        want = jax.grad(lambda p: jnp.sum(_loss_fn(p, y)(x + delta)))(params)
        chex.assert_trees_all_close(got, want, rtol=1e-5)  # a few float32 ulps; a leaked gradient is O(1)
        assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(got))


@pytest.mark.parametrize("ball", attacks.BALLS)
@pytest.mark.parametrize("eps", [0.1, 3.0, 1000.0])
def test_positive_uniform_start_is_nonnegative_at_half_the_radius(ball, eps):
    """The official start: U[0, 1) rescaled to norm exactly eps / 2 (whole batch or each
    example), never projected: ||U|| is about 2.3 per example here, far below eps = 1000."""
    x = jnp.zeros((6, 4, 4, 1))
    d = np.asarray(attacks.init_delta(jax.random.key(1), x, eps, "positive_uniform", ball), np.float64)
    assert np.all(d >= 0)
    norms = _norms(d) if ball == "per_example" else np.linalg.norm(d)
    np.testing.assert_allclose(norms, eps / 2, rtol=1e-5)
    u = np.asarray(jax.random.uniform(jax.random.key(1), x.shape), np.float64)
    unorm = _norms(u)[:, None, None, None] if ball == "per_example" else np.linalg.norm(u)
    np.testing.assert_allclose(d, eps * u / unorm / 2, rtol=1e-5)


def test_carry_is_threaded_through_every_step():
    """`l2_pgd_carry` calls the ascent once per step, in order, and returns its last carry;
    the carry may change structure on the first step (None -> a count)."""
    x, y = random_batch(8, 4)
    params = linear_params(jax.random.key(8), 16, 3)
    grad = jax.grad(lambda d: jnp.sum(_loss_fn(params, y)(x + d)))

    def ascent(delta, carry):
        count, norms = (0, jnp.zeros(5)) if carry is None else carry
        return grad(delta), (count + 1, norms.at[count].set(jnp.linalg.norm(delta)))

    delta, (count, norms) = attacks.l2_pgd_carry(ascent, x, jax.random.key(0), None, eps=1.0, num_steps=5)
    assert int(count) == 5
    assert np.all(np.asarray(norms) > 0)  # every step wrote its slot
    np.testing.assert_allclose(delta, attacks.l2_pgd(_loss_fn(params, y), x, jax.random.key(0), eps=1.0, num_steps=5),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(eps=-1.0), "eps"),
        (dict(eps=float("nan")), "eps"),
        (dict(eps=1.0, num_steps=-1), "num_steps"),
        (dict(eps=1.0, ball="linf"), "ball"),
        (dict(eps=1.0, start="gauss"), "start"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    x, y = random_batch(0, 2)
    params = linear_params(jax.random.key(0), 16, 3)
    with pytest.raises(ValueError, match=match):
        attacks.l2_pgd(_loss_fn(params, y), x, jax.random.key(0), **kwargs)
