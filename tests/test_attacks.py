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
    params = linear_params(jax.random.key(seed), side * side, 3, scale=3.0)
    delta = attacks.l2_pgd(_loss_fn(params, y), x, jax.random.key(seed), eps=eps, num_steps=steps, start=start)
    assert delta.shape == x.shape
    assert np.all(np.isfinite(delta))
    assert np.all(_norms(delta) <= eps * (1 + 1e-5) + 1e-7)


@settings(max_examples=10, deadline=None)
@given(batch=st.integers(1, 6), eps=st.floats(0.0, 3.0), steps=st.integers(0, 5), seed=st.integers(0, 1000))
def test_whole_batch_ball_bounds_the_batch_norm(batch, eps, steps, seed):
    x, y = random_batch(seed, batch)
    params = linear_params(jax.random.key(seed), 16, 3)
    delta = attacks.l2_pgd(
        _loss_fn(params, y), x, jax.random.key(seed), eps=eps, num_steps=steps, ball="whole_batch", start="positive_uniform"
    )
    assert np.linalg.norm(np.asarray(delta)) <= eps * (1 + 1e-5) + 1e-7


def test_box_keeps_pixels_in_range_and_ball():
    x, y = random_batch(3, 8)
    params = linear_params(jax.random.key(3), 16, 3, scale=5.0)
    delta = attacks.l2_pgd(_loss_fn(params, y), x, jax.random.key(0), eps=2.0, num_steps=5, box=(0.0, 1.0))
    adv = np.asarray(x + delta)
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    assert np.all(_norms(delta) <= 2.0 + 1e-5)


def test_pgd_beats_a_random_perturbation_of_the_same_norm():
    x, y = random_batch(4, 64, shape=(8, 8, 1))
    params = linear_params(jax.random.key(4), 64, 3, scale=0.5)
    loss_fn = _loss_fn(params, y)
    delta = attacks.l2_pgd(loss_fn, x, jax.random.key(1), eps=1.0, num_steps=10)
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


def test_pgd_is_differentiable_wrt_eps_without_nan_and_jits():
    x, y = random_batch(6, 4)
    params = linear_params(jax.random.key(6), 16, 3)
    f = jax.jit(lambda eps: jnp.sum(attacks.l2_pgd(_loss_fn(params, y), x, jax.random.key(0), eps=eps, num_steps=3)))
    assert np.isfinite(f(0.5)) and np.isfinite(f(0.0))


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
