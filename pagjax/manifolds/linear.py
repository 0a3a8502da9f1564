"""Linear known manifold: Gaussian mixtures on a k-dimensional subspace of image space.

Generative model (all in flattened pixel space R^d, d = H*W*C):

    y ~ Uniform{0..C-1},   j ~ Uniform{0..J-1}          (J components per class)
    t ~ N(mu[y, j], component_std^2 I_k)                  (latent subspace coordinates)
    x0 = center + U t + normal_offset * v_y + normal_noise * P_perp e,   e ~ N(0, I_d)

``U`` (d, k) has orthonormal columns that are smooth image patterns (a random low-pass
field, orthonormalised), ``v_y`` are orthonormal directions in the normal complement
(high-frequency: the "non-robust features" of docs/theory.md §6) and ``P_perp = I - U U^T``.

Scale: latent coordinates t have scale about 1 (component means ~ N(0, class_separation^2/2)
per coordinate, within-component std ``component_std``); images sit around ``center`` = 0.5,
with pixel standard deviation about sqrt(k/d) (about 0.2 for d=256, k=8), so most pixels
lie in [0, 1]. Values are never clipped (clipping would break the exact densities).

With Gaussian noise augmentation of std s, x = x0 + s * n and, per component,

    x | y, j ~ N(center + U mu_yj + a v_y,
                 (component_std^2 + s^2) U U^T + (normal_noise^2 + s^2) P_perp)

so in subspace coordinates t = U^T (x - center) and normal residual r = P_perp (x - center)
the density factorises into a k-dim isotropic Gaussian and a (d-k)-dim isotropic Gaussian.
Everything below is closed form in log space. When ``normal_noise == 0`` and ``s == 0`` the
normal variance tau^2 vanishes; then (only allowed with ``normal_offset == 0``) the normal
factor is identical for all classes and is dropped: densities are taken with respect to the
Lebesgue measure of the affine subspace, and scores have no normal part.

References: Tweedie's formula E[x0|x] = x + s^2 grad log p_s(x) (Robbins 1956, Efron 2011);
the Bayes gradient as a difference of scores, docs/theory.md §2.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from pagjax import validation
from pagjax.xla import jit_one_shot
from pagjax.manifolds.base import KnownManifold, Samples, check_noise_level, jit_method

Array = jax.Array


def _check_nonneg(name: str, value) -> None:
    v = float(value)
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def smooth_orthonormal_patterns(key: Array, image_shape, num_patterns: int) -> Array:
    """``num_patterns`` orthonormal smooth images as columns of a (d, num_patterns) matrix.

    Each pattern is a random sum of 2-D cosine (DCT-II) modes whose amplitudes decay like a
    Gaussian in frequency, so the patterns look like smooth blobs and gradients, not pixels;
    the set is then orthonormalised by QR. The bandwidth grows with ``num_patterns`` so that
    many patterns stay well conditioned.
    """
    h, w, c = image_shape
    bandwidth = max(2.0, 0.75 * math.sqrt(num_patterns / c))
    p = np.arange(h)
    q = np.arange(w)
    cos_h = np.cos(np.pi * p[:, None] * (np.arange(h)[None, :] + 0.5) / h)  # (freq, pixel)
    cos_w = np.cos(np.pi * q[:, None] * (np.arange(w)[None, :] + 0.5) / w)
    decay = np.exp(-(p[:, None] ** 2 + q[None, :] ** 2) / (2 * bandwidth**2))  # (fh, fw)
    coeffs = jax.random.normal(key, (num_patterns, c, h, w), jnp.float32) * jnp.asarray(decay, jnp.float32)
    # pattern[n, i, j, ch] = sum_{p,q} coeffs[n, ch, p, q] cos_h[p, i] cos_w[q, j]
    images = jnp.einsum("ncpq,pi,qj->nijc", coeffs, jnp.asarray(cos_h, jnp.float32),
                        jnp.asarray(cos_w, jnp.float32))
    mat = jnp.reshape(images, (num_patterns, h * w * c)).T
    basis, _ = jnp.linalg.qr(mat)
    return basis


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["basis", "normal_directions", "component_means", "center"],
    meta_fields=["image_shape", "num_classes", "intrinsic_dim", "components_per_class",
                 "component_std", "normal_offset", "normal_noise"],
)
@dataclasses.dataclass(frozen=True)
class LinearManifold(KnownManifold):
    """Gaussian mixtures on a linear subspace (see the module docstring for the model).

    Fields: ``basis`` U (d, k) orthonormal smooth patterns; ``normal_directions`` V (C, d)
    orthonormal, orthogonal to U; ``component_means`` (C, J, k); ``center`` (d,) the mean
    image (0.5 everywhere by default). Build it with :func:`make_linear_manifold`.
    """

    basis: Array
    normal_directions: Array
    component_means: Array
    center: Array
    image_shape: tuple[int, int, int]
    num_classes: int
    intrinsic_dim: int
    components_per_class: int
    component_std: float
    normal_offset: float
    normal_noise: float

    # ---------------------------------------------------------------- sampling
    def sample(self, key: Array, n: int) -> Samples:
        """``n`` clean samples: images (n,H,W,C) float32, labels (n,) int32, latents t (n,k).

        The latent ``z`` is the subspace coordinate t = U^T (x0 - center) (normal parts excluded).
        """
        validation.check_positive_int("n", n)
        return _sample_linear(self, key, n)

    def tangent_basis(self, z: Array) -> Array:
        """The constant tangent basis U broadcast to (n, d, k) for latents z (n, k)."""
        return jnp.broadcast_to(self.basis, (z.shape[0], *self.basis.shape))

    def embed(self, t: Array) -> Array:
        """Noise-free images center + U t for subspace coordinates t (n, k): (n, H, W, C)."""
        x = self.center[None, :] + t @ self.basis.T
        return jnp.reshape(x, (t.shape[0], *self.image_shape))

    # ---------------------------------------------------------------- internals
    def _parts(self, x: Array, s):
        """Shared closed-form pieces for a batch x at noise level s.

        Returns (xf, t, r, var_t, tau2, normal_on, comp_ll, common): comp_ll[n, y, j] + common[n]
        is the log of (1/J) * N(x; mean_yj, Sigma_s) (class prior not included); ``common`` is
        the class-independent part of the normal factor.
        """
        check_noise_level(s)
        xf = self._flat(x)
        s2 = jnp.asarray(s, xf.dtype) ** 2
        k, d = self.intrinsic_dim, self.dim
        centered = xf - self.center[None, :]
        t = centered @ self.basis                                   # (n, k)
        r = centered - t @ self.basis.T                             # (n, d) normal residual
        var_t = self.component_std**2 + s2
        # In-subspace Gaussian mixture: log N_k(t; mu, var_t I).
        diff = t[:, None, None, :] - self.component_means[None]     # (n, C, J, k)
        ll_t = (-0.5 * jnp.sum(diff**2, axis=-1) / var_t
                - 0.5 * k * jnp.log(2 * jnp.pi * var_t))           # (n, C, J)
        # Normal complement: log N_{d-k}(r; a v_y, tau2 I), dropped when tau2 == 0.
        tau2 = self.normal_noise**2 + s2
        normal_on = tau2 > 0
        tau2_safe = jnp.where(normal_on, tau2, 1.0)
        a = self.normal_offset
        r_dot_v = centered @ self.normal_directions.T               # (n, C); v_y is orthogonal to U
        r_sq = jnp.sum(r**2, axis=-1)                               # (n,)
        # ||r - a v_y||^2 = ||r||^2 - 2 a r.v_y + a^2: the ||r||^2 part is common to all classes
        # and kept apart, so posteriors never suffer its cancellation error far off the subspace.
        ll_n_class = jnp.where(normal_on, (a * r_dot_v - 0.5 * a**2) / tau2_safe, 0.0)      # (n, C)
        common = jnp.where(normal_on,
                           -0.5 * r_sq / tau2_safe - 0.5 * (d - k) * jnp.log(2 * jnp.pi * tau2_safe),
                           0.0)                                     # (n,)
        comp_ll = ll_t + ll_n_class[:, :, None] - math.log(self.components_per_class)
        return xf, t, r, var_t, tau2_safe, normal_on, comp_ll, common

    def _class_means_and_posterior(self, x: Array, s):
        """Per-class posterior means of the latent, E[mu_yj | x, y] (n, C, k), and log p_s(y|x)."""
        xf, t, r, var_t, tau2, normal_on, comp_ll, _ = self._parts(x, s)
        class_ll = jax.nn.logsumexp(comp_ll, axis=-1)                # (n, C), up to a common term
        resp = jax.nn.softmax(comp_ll, axis=-1)                      # (n, C, J) within class
        mean_mu = jnp.einsum("ncj,cjk->nck", resp, self.component_means)
        log_post = jax.nn.log_softmax(class_ll, axis=-1)
        return xf, t, r, var_t, tau2, normal_on, class_ll, mean_mu, log_post

    def _class_scores_flat(self, x: Array, s):
        """grad_x log p_s(x|y) for every class, flattened: (n, C, d); and log p_s(y|x)."""
        xf, t, r, var_t, tau2, normal_on, _, mean_mu, log_post = self._class_means_and_posterior(x, s)
        tangent = ((mean_mu - t[:, None, :]) / var_t) @ self.basis.T            # (n, C, d)
        normal = (self.normal_offset * self.normal_directions[None] - r[:, None, :]) / tau2
        normal = jnp.where(normal_on, normal, 0.0)
        return tangent + normal, log_post

    # ---------------------------------------------------------------- exact quantities
    @jit_method
    def log_likelihood(self, x: Array, s) -> Array:
        """Closed-form log p_s(x | y) for every class: (n, C).

        Density w.r.t. Lebesgue measure on R^d, or on the affine subspace when the normal
        variance normal_noise^2 + s^2 is zero (see module docstring).
        """
        comp_ll, common = self._parts(x, s)[-2:]
        return jax.nn.logsumexp(comp_ll, axis=-1) + common[:, None]

    @jit_method
    def log_posterior(self, x: Array, s) -> Array:
        """Closed-form log p_s(y | x) (n, C), from the class-dependent terms only."""
        comp_ll = self._parts(x, s)[-2]
        return jax.nn.log_softmax(jax.nn.logsumexp(comp_ll, axis=-1), axis=-1)

    @jit_method
    def predict(self, x: Array, s) -> Array:
        """Bayes-optimal decision argmax_y p_s(y | x): (n,) int32."""
        comp_ll = self._parts(x, s)[-2]
        return jnp.argmax(jax.nn.logsumexp(comp_ll, axis=-1), axis=-1).astype(jnp.int32)

    @jit_method
    def class_score(self, x: Array, y: Array, s) -> Array:
        """Closed-form grad_x log p_s(x | y) for labels y (n,), shaped like x."""
        scores, _ = self._class_scores_flat(x, s)
        picked = jnp.take_along_axis(scores, y[:, None, None], axis=1)[:, 0]
        return self._unflat(picked, x)

    @jit_method
    def score(self, x: Array, s) -> Array:
        """Closed-form grad_x log p_s(x) = sum_y p_s(y|x) grad_x log p_s(x|y), shaped like x."""
        scores, log_post = self._class_scores_flat(x, s)
        return self._unflat(jnp.einsum("nc,ncd->nd", jnp.exp(log_post), scores), x)

    @jit_method
    def bayes_gradient(self, x: Array, y: Array, s) -> Array:
        """Closed-form grad_x log p_s(y | x), shaped like x.

        Computed as a difference of *means*, not of scores, so the class-independent pull
        towards the subspace cancels exactly:
        U sum_y' p(y'|x) (m_y - m_y') / (component_std^2 + s^2)
        + normal_offset sum_y' p(y'|x) (v_y - v_y') / (normal_noise^2 + s^2),
        with m_y = E[mu_yj | x, y]. With normal_offset = 0 the normal part is exactly 0.
        """
        xf, t, r, var_t, tau2, normal_on, _, mean_mu, log_post = self._class_means_and_posterior(x, s)
        post = jnp.exp(log_post)                                    # (n, C)
        # sum_y' p(y'|x) (m_y - m_y'): no cancellation, so a confident posterior still gives
        # the (tiny) exact gradient instead of rounding to 0.
        m_y = jnp.take_along_axis(mean_mu, y[:, None, None], axis=1)             # (n, 1, k)
        grad = jnp.einsum("nc,nck->nk", post, m_y - mean_mu) / var_t @ self.basis.T
        if self.normal_offset > 0:
            v_y = self.normal_directions[y]                                       # (n, d)
            normal = jnp.einsum("nc,ncd->nd", post, v_y[:, None, :] - self.normal_directions[None])
            grad = grad + jnp.where(normal_on, self.normal_offset * normal / tau2, 0.0)
        return self._unflat(grad, x)

    @jit_method
    def posterior_mean(self, x: Array, s) -> Array:
        """E[x0 | x], computed from component responsibilities (independently of the score).

        Per component (y, j) the Gaussian conditional mean is
        center + U (mu + c_t (t - mu)) + a v_y + c_n (r - a v_y), with shrinkage factors
        c_t = component_std^2 / (component_std^2 + s^2) and c_n = normal_noise^2 / tau^2
        (c_n = 1 when tau^2 = 0, i.e. s = 0); these are averaged with weights p_s(y, j | x).
        """
        xf, t, r, var_t, tau2, normal_on, comp_ll, _ = self._parts(x, s)
        n = xf.shape[0]
        flat_ll = jnp.reshape(comp_ll, (n, -1))
        resp = jnp.reshape(jax.nn.softmax(flat_ll, axis=-1), comp_ll.shape)   # (n, C, J)
        c_t = self.component_std**2 / var_t
        mu = self.component_means[None]                                       # (1, C, J, k)
        t_mean = jnp.einsum("ncj,ncjk->nk", resp, mu + c_t * (t[:, None, None, :] - mu))
        class_post = jnp.sum(resp, axis=-1)                                   # (n, C)
        c_n = jnp.where(normal_on, self.normal_noise**2 / tau2, 1.0)
        a = self.normal_offset
        av = a * self.normal_directions                                       # (C, d)
        normal_mean = jnp.einsum("nc,ncd->nd", class_post, av[None] + c_n * (r[:, None, :] - av[None]))
        out = self.center[None, :] + t_mean @ self.basis.T + normal_mean
        return self._unflat(out, x)


@jit_one_shot(static_argnums=(2,))
def _sample_linear(m: LinearManifold, key: Array, n: int) -> Samples:
    ky, kj, kt, kn = jax.random.split(key, 4)
    y = jax.random.randint(ky, (n,), 0, m.num_classes, dtype=jnp.int32)
    j = jax.random.randint(kj, (n,), 0, m.components_per_class, dtype=jnp.int32)
    mu = m.component_means[y, j]
    t = mu + m.component_std * jax.random.normal(kt, mu.shape, mu.dtype)
    x = m.center[None, :] + t @ m.basis.T
    if m.normal_offset > 0:
        x = x + m.normal_offset * m.normal_directions[y]
    if m.normal_noise > 0:
        e = jax.random.normal(kn, x.shape, x.dtype)
        e = e - (e @ m.basis) @ m.basis.T
        x = x + m.normal_noise * e
    return Samples(jnp.reshape(x, (n, *m.image_shape)), y, t)


@jit_one_shot(static_argnums=(1, 2, 3, 4, 5))
def _linear_arrays(key, image_shape, intrinsic_dim, num_classes, components_per_class,
                   class_separation):
    d = image_shape[0] * image_shape[1] * image_shape[2]
    k_basis, k_normal, k_means = jax.random.split(key, 3)
    basis = smooth_orthonormal_patterns(k_basis, image_shape, intrinsic_dim)
    g = jax.random.normal(k_normal, (d, num_classes), jnp.float32)
    g = g - basis @ (basis.T @ g)
    normal_dirs, _ = jnp.linalg.qr(g)
    normal_dirs = normal_dirs - basis @ (basis.T @ normal_dirs)  # re-project: float hygiene
    normal_dirs = normal_dirs / jnp.linalg.norm(normal_dirs, axis=0, keepdims=True)
    means = (class_separation / math.sqrt(2.0)) * jax.random.normal(
        k_means, (num_classes, components_per_class, intrinsic_dim), jnp.float32)
    return basis, normal_dirs.T, means


def make_linear_manifold(
    key: Array | int = 0,
    *,
    image_shape=(16, 16, 1),
    intrinsic_dim: int = 8,
    num_classes: int = 4,
    components_per_class: int = 2,
    class_separation: float = 1.0,
    component_std: float = 0.6,
    normal_offset: float = 0.0,
    normal_noise: float = 0.0,
    center: float = 0.5,
) -> LinearManifold:
    """Build a :class:`LinearManifold`, deterministically from ``key`` (a PRNG key or int seed;
    0 by default, so that the default manifold is one fixed draw everywhere).

    Args:
      image_shape: (H, W, C) of the images; d = H*W*C.
      intrinsic_dim: k, the subspace dimension (1 <= k < d).
      num_classes: C >= 1.
      components_per_class: J >= 1 Gaussian components per class.
      class_separation: scale of the component means (each coordinate ~ N(0, sep^2 / 2)).
      component_std: within-component std in latent units (> 0).
      normal_offset: size a of each class's offset along its own normal direction v_y
        (0 = data exactly on the subspace, the theorem's exact case).
      normal_noise: std of isotropic noise in the (d-k)-dim normal complement; must be > 0
        when normal_offset > 0.
      center: the mean image value (0.5).

    Raises ValueError, naming the argument, on impossible parameters (before any work).
    """
    if not (isinstance(image_shape, (tuple, list)) and len(image_shape) == 3):
        raise ValueError(f"image_shape must be (H, W, C), got {image_shape!r}")
    for name, v in zip(("image_shape[0] (H)", "image_shape[1] (W)", "image_shape[2] (C)"), image_shape):
        validation.check_positive_int(name, v)
    image_shape = tuple(int(v) for v in image_shape)
    validation.check_positive_int("intrinsic_dim", intrinsic_dim)
    validation.check_positive_int("num_classes", num_classes)
    validation.check_positive_int("components_per_class", components_per_class)
    validation.check_positive("component_std", component_std)
    _check_nonneg("class_separation", class_separation)
    _check_nonneg("normal_offset", normal_offset)
    _check_nonneg("normal_noise", normal_noise)
    d = image_shape[0] * image_shape[1] * image_shape[2]
    if intrinsic_dim >= d:
        raise ValueError(f"intrinsic_dim must be < d = H*W*C = {d}, got {intrinsic_dim}")
    if num_classes > d - intrinsic_dim:
        raise ValueError(
            f"num_classes must be <= d - intrinsic_dim = {d - intrinsic_dim} (one normal direction "
            f"per class), got {num_classes}"
        )
    if normal_offset > 0 and normal_noise == 0:
        raise ValueError("normal_noise must be > 0 when normal_offset > 0 (otherwise the classes "
                         "live on disjoint affine subspaces and p_0(y|x) is degenerate)")
    if not math.isfinite(float(center)):
        raise ValueError(f"center must be finite, got {center!r}")
    if isinstance(key, (int, np.integer)):
        key = jax.random.PRNGKey(int(key))
    basis, normal_dirs, means = _linear_arrays(key, image_shape, int(intrinsic_dim), int(num_classes),
                                               int(components_per_class), float(class_separation))
    return LinearManifold(
        basis=basis,
        normal_directions=normal_dirs,
        component_means=means,
        center=jnp.full((d,), center, jnp.float32),
        image_shape=image_shape,
        num_classes=int(num_classes),
        intrinsic_dim=int(intrinsic_dim),
        components_per_class=int(components_per_class),
        component_std=float(component_std),
        normal_offset=float(normal_offset),
        normal_noise=float(normal_noise),
    )


def default_linear_manifold(key: Array | int = 0, **overrides) -> LinearManifold:
    """The project's default sweep data: 16x16x1 images (d = 256), k = 8, 4 classes,
    2 components per class, normal_offset = 0.1, normal_noise = 0.02 (docs/theory.md §6),
    drawn from ``key`` (0 by default: one fixed draw). Keyword ``overrides`` replace any of these."""
    params = dict(image_shape=(16, 16, 1), intrinsic_dim=8, num_classes=4, components_per_class=2,
                  normal_offset=0.1, normal_noise=0.02)
    params.update(overrides)
    return make_linear_manifold(key, **params)
