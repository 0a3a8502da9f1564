import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import linear_apply, linear_params, random_batch
from pagjax.gradients import TARGETS, input_gradients, value_and_input_gradients


def closed_form(params, x, y, target):
    """Input-gradients of a linear softmax model, by hand."""
    W = params["W"]
    xf = x.reshape((x.shape[0], -1))
    p = jax.nn.softmax(xf @ W.T + params["b"])
    onehot = jax.nn.one_hot(y, W.shape[0])
    g = {
        "logit": W[y],
        "logprob": (onehot - p) @ W,
        "loss": (p - onehot) @ W,
        "logit_sum": jnp.broadcast_to(W.sum(0), xf.shape),
    }[target]
    return g.reshape(x.shape)


@pytest.mark.parametrize("target", TARGETS)
def test_input_gradients_match_closed_form(target):
    x, y = random_batch(0, 6)
    params = linear_params(jax.random.key(0), 16, 3)
    got = input_gradients(linear_apply, params, x, y, target=target)
    np.testing.assert_allclose(got, closed_form(params, x, y, target), rtol=1e-5, atol=1e-6)


def test_values_are_the_per_example_scalars():
    x, y = random_batch(1, 5)
    params = linear_params(jax.random.key(1), 16, 3)
    values, _ = value_and_input_gradients(linear_apply, params, x, y, target="loss")
    logp = jax.nn.log_softmax(linear_apply(params, x))
    np.testing.assert_allclose(values, -logp[jnp.arange(5), y], rtol=1e-6)


def test_jit_and_vmap_over_models():
    x, y = random_batch(2, 4)
    stacked = jax.vmap(lambda k: linear_params(k, 16, 3))(jax.random.split(jax.random.key(0), 3))
    fn = jax.jit(jax.vmap(lambda p: input_gradients(linear_apply, p, x, y, target="logprob")))
    out = fn(stacked)
    assert out.shape == (3, *x.shape)
    one = input_gradients(linear_apply, jax.tree.map(lambda a: a[1], stacked), x, y)
    np.testing.assert_allclose(out[1], one, rtol=1e-5, atol=1e-6)


def test_errors_name_the_argument():
    x, y = random_batch(0, 4)
    params = linear_params(jax.random.key(0), 16, 3)
    with pytest.raises(ValueError, match="target"):
        input_gradients(linear_apply, params, x, y, target="logits")
    with pytest.raises(ValueError, match="labels are required"):
        input_gradients(linear_apply, params, x, None, target="logprob")
    with pytest.raises(ValueError, match="labels"):
        input_gradients(linear_apply, params, x, y[:3], target="logprob")
    with pytest.raises(ValueError, match="floating"):
        input_gradients(linear_apply, params, x.astype(jnp.int32), y)
    # logit_sum needs no labels
    assert input_gradients(linear_apply, params, x, target="logit_sum").shape == x.shape
