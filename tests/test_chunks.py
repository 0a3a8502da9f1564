"""Tests of pagjax.chunks.map_chunks: the same result as the unchunked computation, with
every chunk of one shape, eager (host loop) and traced (lax.map)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagjax.chunks import map_chunks


def per_chunk(xs):
    """A per-example computation with a pytree input and a pytree output."""
    x, y = xs
    flat = x.reshape(x.shape[0], -1)
    return {"sum": jnp.sum(flat, axis=1) + y, "scaled": 2.0 * x}


def batch(n):
    x = np.arange(n * 6, dtype=np.float32).reshape(n, 2, 3)
    y = np.arange(n, dtype=np.float32) * 10.0
    return x, y


@pytest.mark.parametrize("n, chunk_size", [(7, 3), (6, 3), (5, 1), (4, 10), (4, None), (4, 4)])
def test_eager_and_traced_match_unchunked(n, chunk_size):
    xs = batch(n)
    full = per_chunk(jax.tree.map(jnp.asarray, xs))
    eager_numpy = map_chunks(per_chunk, xs, chunk_size)  # host NumPy inputs
    eager_device = map_chunks(per_chunk, jax.tree.map(jnp.asarray, xs), chunk_size)
    traced = jax.jit(lambda a: map_chunks(per_chunk, a, chunk_size))(xs)
    for got in (eager_numpy, eager_device, traced):
        assert jax.tree.structure(got) == jax.tree.structure(full)
        for k in full:
            assert got[k].shape == full[k].shape
            np.testing.assert_array_equal(got[k], full[k])


def test_host_loop_sees_one_chunk_shape_and_numpy_chunks_stay_numpy():
    seen = []

    def fn(xs):
        x, y = xs
        seen.append((type(x), x.shape))
        return jnp.asarray(x) * 3.0

    x, y = batch(7)
    out = map_chunks(fn, (x, y), 3)  # chunks of 3, 3 and 1 (padded to 3)
    np.testing.assert_array_equal(out, 3.0 * x)
    assert seen == [(np.ndarray, (3, 2, 3))] * 3
    # the traced path calls the function once, on one chunk's shape, inside lax.map
    seen.clear()
    jax.jit(lambda a: map_chunks(fn, a, 3))((x, y))
    assert [s for _, s in seen] == [(3, 2, 3)]


def test_none_leaves_and_grad_and_vmap():
    x, _ = batch(5)
    xj = jnp.asarray(x)
    out = map_chunks(lambda xs: xs[0] * 2.0, (xj, None), 2)
    np.testing.assert_array_equal(out, 2.0 * x)
    # differentiable through the traced path, and under vmap
    loss = lambda a: jnp.sum(map_chunks(lambda c: jnp.sin(c), a, 2))  # noqa: E731
    np.testing.assert_allclose(jax.grad(loss)(xj), jnp.cos(xj), rtol=1e-6)
    stacked = jnp.stack([xj, -xj])
    got = jax.vmap(lambda a: map_chunks(lambda c: c**2, a, 2))(stacked)
    np.testing.assert_allclose(got, stacked**2)


def test_mismatched_leading_axes_raise():
    with pytest.raises(ValueError, match="leading axes"):
        map_chunks(per_chunk, (np.zeros((4, 2)), np.zeros((3,))), 2)
    with pytest.raises(ValueError, match="at least one array"):
        map_chunks(lambda xs: xs, (None,), 2)
