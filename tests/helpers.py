"""Small shared fixtures for the tests: a linear softmax model with closed forms, and full
compiler optimisation for the few tests whose time is training, not compiling."""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np


def linear_apply(params, x):
    """logits = W x + b on flattened inputs; W has shape (K, d)."""
    return x.reshape((x.shape[0], -1)) @ params["W"].T + params["b"]


def linear_forward(params, x):
    return linear_apply(params, x), {}


def linear_params(key, d, k, scale=1.0):
    kw, kb = jax.random.split(key)
    return {"W": scale * jax.random.normal(kw, (k, d)), "b": 0.1 * jax.random.normal(kb, (k,))}


def random_batch(seed, batch, shape=(4, 4, 1), k=3):
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(batch, *shape)).astype(np.float32)
    y = rng.integers(0, k, size=batch).astype(np.int32)
    return jnp.asarray(x), jnp.asarray(y)


def toy_task(n=256, seed=0):
    """A 2-class task on 4x4 images: is the top half brighter than the bottom half?"""
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(n, 4, 4, 1)).astype(np.float32)
    y = (x.reshape(n, -1)[:, :8].mean(1) > x.reshape(n, -1)[:, 8:].mean(1)).astype(np.int32)
    return x, y


@contextlib.contextmanager
def optimized_compilation():
    """Compile with XLA's full optimisation inside (conftest.py switches most of it off).

    For tests that run one program for many steps: a 1500-step denoiser training took
    11 s optimised against 20 s unoptimised, where compiling is a second either way.
    """
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)
