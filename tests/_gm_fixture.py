"""A closed-form known-manifold fixture for the grad_align / scores tests.

Class-conditional Gaussians on a linear subspace: x0 = c + mu_y + U z, z ~ N(0, tau^2 I_k),
U (d, k) orthonormal, mu_y in span(U). Convolved with N(0, s^2 I) each class is
N(c + mu_y, Sigma_s) with Sigma_s = tau^2 U U^T + s^2 I, whose inverse is
(I - P) / s^2 + P / (tau^2 + s^2) (P = U U^T). Everything below is exact.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class GaussianSubspace:
    basis: np.ndarray  # (d, k) orthonormal
    means: np.ndarray  # (C, d)
    tau: float
    image_shape: tuple
    centre: float = 0.5

    @property
    def num_classes(self):
        return self.means.shape[0]

    def _flat(self, x):
        return jnp.reshape(x, (x.shape[0], -1)) - self.centre

    def _prec_apply(self, v, s):
        u = jnp.asarray(self.basis, v.dtype)
        pv = (v @ u) @ u.T
        return (v - pv) / s**2 + pv / (self.tau**2 + s**2)

    def _log_lik(self, x, s):  # (n, C), up to a class-independent constant
        v = self._flat(x)[:, None, :] - jnp.asarray(self.means, x.dtype)[None]
        quad = jnp.sum(v * jax.vmap(lambda w: self._prec_apply(w, s))(v), axis=-1)
        return -0.5 * quad

    def log_posterior(self, x, s):
        return jax.nn.log_softmax(self._log_lik(x, s), axis=-1)

    def class_score(self, x, y, s):
        v = self._flat(x) - jnp.asarray(self.means, x.dtype)[y]
        return jnp.reshape(-self._prec_apply(v, s), x.shape)

    def score(self, x, s):
        post = jnp.exp(self.log_posterior(x, s))  # (n, C)
        v = self._flat(x)[:, None, :] - jnp.asarray(self.means, x.dtype)[None]
        per = -jax.vmap(lambda w: self._prec_apply(w, s))(v)  # (n, C, d)
        return jnp.reshape(jnp.sum(post[..., None] * per, axis=1), x.shape)

    def bayes_gradient(self, x, y, s):
        return self.class_score(x, y, s) - self.score(x, s)

    def posterior_mean(self, x, s):
        return x + s**2 * self.score(x, s)

    def sample(self, key, n):
        ky, kz = jax.random.split(key)
        y = jax.random.randint(ky, (n,), 0, self.num_classes)
        z = self.tau * jax.random.normal(kz, (n, self.basis.shape[1]))
        x = self.centre + jnp.asarray(self.means)[y] + z @ jnp.asarray(self.basis).T
        return jnp.reshape(x, (n, *self.image_shape)).astype(jnp.float32), y.astype(jnp.int32), z


def make_fixture(seed=0, image_shape=(16, 16, 1), k=8, num_classes=4, tau=0.1, sep=0.15):
    rng = np.random.default_rng(seed)
    d = int(np.prod(image_shape))
    basis, _ = np.linalg.qr(rng.normal(size=(d, k)))
    coeffs = rng.normal(size=(num_classes, k))
    coeffs = sep * coeffs / np.linalg.norm(coeffs, axis=1, keepdims=True) * np.sqrt(k) / 2
    means = coeffs @ basis.T
    return GaussianSubspace(basis=basis.astype(np.float32), means=means.astype(np.float32),
                            tau=tau, image_shape=tuple(image_shape))
