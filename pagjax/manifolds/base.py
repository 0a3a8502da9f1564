"""The common interface of known-manifold datasets.

A *known manifold* is a synthetic, image-shaped data distribution whose manifold, tangent
spaces, noise-convolved densities and Bayes-optimal classifier are known exactly (or to a
controlled numerical accuracy). For a noise level ``s >= 0`` of Gaussian noise augmentation,
``p_s = p_0 * N(0, s^2 I)``; every exact quantity is a function of ``(x, s)``:

* ``log_likelihood``  log p_s(x | y) for every class (n, C)
* ``log_marginal``    log p_s(x) with the uniform class prior (n,)
* ``log_posterior``   log p_s(y | x), the Bayes-optimal classifier (n, C)
* ``class_score``     grad_x log p_s(x | y)
* ``score``           grad_x log p_s(x)
* ``bayes_gradient``  grad_x log p_s(y | x) = class_score - score  (docs/theory.md §2)
* ``posterior_mean``  E[x0 | x], so that score = (E[x0 | x] - x) / s^2 (Tweedie)

Images are NHWC float32, labels int32, latents (n, latent_dim). Class priors are uniform.
``s`` may be a Python float or a traced scalar: everything here is jit- and vmap-able.
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from pagjax import validation

Array = jax.Array


class Samples(NamedTuple):
    """Clean samples of a known manifold: images x (n,H,W,C), labels y (n,), latents z (n,m)."""

    x: Array
    y: Array
    z: Array


class KnownManifoldData(NamedTuple):
    """Train/test split drawn from a known manifold, with the manifold itself attached."""

    x_train: Array
    y_train: Array
    z_train: Array
    x_test: Array
    y_test: Array
    z_test: Array
    manifold: Any


def check_noise_level(s) -> None:
    """Validate a noise level (finite, >= 0) when it is concrete; traced values pass."""
    validation.check_strength("s", s)


def jit_method(method):
    """Decorate a ``(self, x, ..., s)`` method: validate ``s`` and ``x`` eagerly (clear
    ValueErrors), then run it under ``jax.jit`` with the manifold itself as a pytree argument,
    so every call after the first reuses the compiled code (also inside a caller's jit)."""
    jitted = jax.jit(method)

    @functools.wraps(method)
    def wrapper(self, x, *args, **kwargs):
        s = kwargs["s"] if "s" in kwargs else (args[-1] if args else None)
        if s is not None:
            check_noise_level(s)
        self._flat(x)  # shape check only (cheap, works on tracers)
        return jitted(self, x, *args, **kwargs)

    return wrapper


class KnownManifold:
    """Base class: subclasses implement ``sample``, ``tangent_basis``, ``log_likelihood``,
    ``class_score``/``posterior_mean`` machinery; the rest is derived here.

    Subclasses are frozen dataclasses registered as JAX pytrees, with fields
    ``image_shape`` (H, W, C), ``num_classes`` and ``intrinsic_dim`` (k).
    """

    image_shape: tuple[int, int, int]
    num_classes: int
    intrinsic_dim: int

    # ---------------------------------------------------------------- shapes
    @property
    def dim(self) -> int:
        """Flattened pixel dimension d = H * W * C."""
        h, w, c = self.image_shape
        return h * w * c

    @property
    def latent_dim(self) -> int:
        """Dimension of the latent vector ``z`` returned by ``sample``."""
        return self.intrinsic_dim

    def _flat(self, x: Array) -> Array:
        """(n, H, W, C) or (n, d) -> (n, d), validating the trailing shape."""
        if x.ndim == 4 and tuple(x.shape[1:]) != tuple(self.image_shape):
            raise ValueError(
                f"x must have image shape {tuple(self.image_shape)}, got {tuple(x.shape[1:])}"
            )
        if x.ndim not in (2, 4):
            raise ValueError(f"x must be a batch of images (n,H,W,C) or (n,d), got shape {x.shape}")
        return jnp.reshape(x, (x.shape[0], -1))

    def _unflat(self, v: Array, like: Array) -> Array:
        return jnp.reshape(v, like.shape)

    # ---------------------------------------------------------------- abstract
    def sample(self, key: Array, n: int) -> Samples:  # pragma: no cover - abstract
        """Draw ``n`` clean labelled samples."""
        raise NotImplementedError

    def tangent_basis(self, z: Array) -> Array:  # pragma: no cover - abstract
        """Orthonormal tangent basis (n, d, k) at latents ``z`` (n, latent_dim)."""
        raise NotImplementedError

    def log_likelihood(self, x: Array, s) -> Array:  # pragma: no cover - abstract
        """log p_s(x | y) for every class: (n, C)."""
        raise NotImplementedError

    def class_score(self, x: Array, y: Array, s) -> Array:  # pragma: no cover - abstract
        """grad_x log p_s(x | y) for the given labels, shaped like x."""
        raise NotImplementedError

    def score(self, x: Array, s) -> Array:  # pragma: no cover - abstract
        """grad_x log p_s(x), shaped like x."""
        raise NotImplementedError

    def bayes_gradient(self, x: Array, y: Array, s) -> Array:  # pragma: no cover - abstract
        """grad_x log p_s(y | x), shaped like x."""
        raise NotImplementedError

    def posterior_mean(self, x: Array, s) -> Array:  # pragma: no cover - abstract
        """E[x0 | x] under the noise-convolved data, shaped like x."""
        raise NotImplementedError

    # ---------------------------------------------------------------- derived
    @jit_method
    def log_marginal(self, x: Array, s) -> Array:
        """log p_s(x) = logsumexp_y log p_s(x|y) - log C (uniform class prior): (n,)."""
        ll = self.log_likelihood(x, s)
        return jax.nn.logsumexp(ll, axis=-1) - math.log(self.num_classes)

    @jit_method
    def log_posterior(self, x: Array, s) -> Array:
        """log p_s(y | x) of the Bayes-optimal classifier (uniform prior): (n, C)."""
        return jax.nn.log_softmax(self.log_likelihood(x, s), axis=-1)

    @jit_method
    def predict(self, x: Array, s) -> Array:
        """Bayes-optimal decision argmax_y p_s(y | x): (n,) int32."""
        return jnp.argmax(self.log_likelihood(x, s), axis=-1).astype(jnp.int32)

    def bayes_accuracy(self, key: Array, s, n: int = 4096, test_noise=None,
                       batch_size: int = 1024) -> float:
        """Monte-Carlo accuracy of the Bayes-optimal classifier p_s(y|x).

        Test inputs are fresh clean samples plus Gaussian noise of std ``test_noise``
        (default ``s``: the Bayes accuracy on the noise-convolved distribution, the best any
        classifier can do there). ``test_noise=0`` gives the clean-data accuracy of the
        classifier that is Bayes-optimal for noise level ``s``. Standard error is about
        sqrt(a(1-a)/n).
        """
        check_noise_level(s)
        validation.check_positive_int("n", n)
        validation.check_positive_int("batch_size", batch_size)
        test_noise = s if test_noise is None else test_noise
        check_noise_level(test_noise)
        k_sample, k_noise = jax.random.split(key)
        data = self.sample(k_sample, n)
        x = data.x + test_noise * jax.random.normal(k_noise, data.x.shape, data.x.dtype)
        correct = 0
        for start in range(0, n, batch_size):
            pred = self.predict(x[start:start + batch_size], s)
            correct += int(jnp.sum(pred == data.y[start:start + batch_size]))
        return correct / n


def make_dataset(manifold: KnownManifold, key: Array, n_train: int, n_test: int) -> KnownManifoldData:
    """Draw a train and a test split (independent keys) from ``manifold``.

    Deterministic for a given key. Raises ValueError on non-positive sizes.
    """
    validation.check_positive_int("n_train", n_train)
    validation.check_positive_int("n_test", n_test)
    k_train, k_test = jax.random.split(key)
    train = manifold.sample(k_train, n_train)
    test = manifold.sample(k_test, n_test)
    return KnownManifoldData(train.x, train.y, train.z, test.x, test.y, test.z, manifold)
