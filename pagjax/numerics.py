"""Numerically safe primitives shared by every module.

`safe_norm` follows the optax convention: the norm is floored at `min_norm` *before*
the square root, so its gradient at zero is finite (zero) instead of NaN.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def safe_norm(x: Array, min_norm: float = 0.0, axis=None, keepdims: bool = False) -> Array:
    """L2 norm of `x` over `axis`, with a NaN-free gradient at x = 0.

    Returns max(||x||, min_norm). Where the squared norm is zero the square root is
    taken of 1 instead and masked out, so `jax.grad` gives 0 there, never NaN.
    """
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=keepdims)
    positive = sq > min_norm**2
    safe_sq = jnp.where(positive, sq, 1.0)
    return jnp.where(positive, jnp.sqrt(safe_sq), jnp.asarray(min_norm, sq.dtype))


def per_example_norm(x: Array, min_norm: float = 0.0) -> Array:
    """L2 norm of each example of a batch `x` of shape (B, ...): returns shape (B,)."""
    axes = tuple(range(1, x.ndim))
    return safe_norm(x, min_norm=min_norm, axis=axes)


def safe_ratio(num: Array, den: Array, eps: float = 1e-30) -> Array:
    """num / den with 0 / 0 defined as NaN-free 0 (den floored at `eps`)."""
    return num / jnp.maximum(den, eps)


def flatten_examples(x: Array) -> Array:
    """(B, ...) -> (B, prod(...))."""
    return jnp.reshape(x, (x.shape[0], -1))
