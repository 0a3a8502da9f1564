import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagjax.numerics import per_example_norm, safe_norm, safe_ratio


def test_safe_norm_matches_norm_away_from_zero():
    x = jnp.array([[3.0, 4.0], [1.0, 0.0]])
    np.testing.assert_allclose(per_example_norm(x), [5.0, 1.0], rtol=1e-6)


@pytest.mark.parametrize("min_norm", [0.0, 1e-6])
def test_safe_norm_gradient_at_zero_is_finite(min_norm):
    g = jax.grad(lambda v: safe_norm(v, min_norm=min_norm))(jnp.zeros(5))
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(g, 0.0)


def test_safe_norm_gradient_is_unit_vector_elsewhere():
    v = jnp.array([3.0, -4.0])
    np.testing.assert_allclose(jax.grad(safe_norm)(v), v / 5.0, rtol=1e-6)


def test_safe_ratio_zero_over_zero_is_zero():
    assert float(safe_ratio(jnp.array(0.0), jnp.array(0.0))) == 0.0
