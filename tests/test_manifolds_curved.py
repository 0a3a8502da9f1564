"""The curved known manifold: generator geometry, quadrature accuracy against a much finer
integral and against Monte Carlo, and the theory's claim that the Bayes gradient is tangent."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagjax.manifolds import (CurvedManifold, build_manifold, make_curved_manifold, make_dataset)
from pagjax.numerics import per_example_norm

N = 64  # one batch shape for every quadrature call: one compilation per manifold


# quadratures on a fine grid: these tests start first, and their time is spent running the
# quadratures, so they compile with full optimisation (tests/conftest.py): 66 s -> 37 s
pytestmark = [pytest.mark.slow, pytest.mark.optimized]


@pytest.fixture(scope="module")
def manifold():
    return make_curved_manifold()


@pytest.fixture(scope="module")
def fine():
    return make_curved_manifold(grid_size=36, refine_size=12, refine_cells=3, batch_size=16)


@pytest.fixture(scope="module")
def data(manifold):
    return manifold.sample(jax.random.PRNGKey(0), N)


def noisy(d, s, seed=1):
    return d.x + s * jax.random.normal(jax.random.PRNGKey(seed), d.x.shape)


def tangent_fraction(g, basis):
    gf = g.reshape(g.shape[0], -1)
    return per_example_norm(jnp.einsum("nd,ndk->nk", gf, basis)) / per_example_norm(gf)


def test_samples_shapes_determinism_and_classes(manifold):
    a = manifold.sample(jax.random.PRNGKey(3), 1024)
    b = manifold.sample(jax.random.PRNGKey(3), 1024)
    assert a.x.shape == (1024, 16, 16, 1) and a.x.dtype == jnp.float32
    assert a.y.dtype == jnp.int32 and a.z.shape == (1024, 3)
    np.testing.assert_array_equal(a.x, b.x)
    assert not np.allclose(manifold.sample(jax.random.PRNGKey(4), 1024).x, a.x)
    assert float(jnp.max(jnp.abs(a.z))) <= 1.0
    # class = bend category: mean bend increases with the class index
    bends = [float(jnp.mean(a.z[a.y == c, 2])) for c in range(4)]
    assert bends == sorted(bends) and bends[0] < -0.5 and bends[-1] > 0.5
    # x = g(z) + observation noise of the stated size
    resid = a.x - manifold.generate(a.z)
    assert abs(float(resid.std()) - 0.05) < 0.003
    clean = manifold.generate(a.z)
    assert float(clean.min()) >= 0.0 and 0.8 < float(clean.max()) < 1.3   # strokes about 1 on 0
    data = make_dataset(manifold, jax.random.PRNGKey(0), 32, 16)
    assert data.x_train.shape == (32, 16, 16, 1) and data.z_test.shape == (16, 3)


def test_tangent_basis_orthonormal_and_contains_finite_differences(manifold, data):
    z = data.z
    basis = manifold.tangent_basis(z)
    assert basis.shape == (N, 256, 3)
    gram = jnp.einsum("ndk,ndl->nkl", basis, basis)
    np.testing.assert_allclose(gram, jnp.broadcast_to(jnp.eye(3), gram.shape), atol=1e-5)
    h = 1e-2
    for i in range(3):
        e = jnp.zeros(3).at[i].set(h)
        zp = jnp.clip(z + e, -1, 1)
        zm = jnp.clip(z - e, -1, 1)
        fd = (manifold.generate(zp) - manifold.generate(zm)).reshape(N, -1)
        frac = tangent_fraction(fd, basis)
        assert float(jnp.min(frac)) > 0.995, (i, float(jnp.min(frac)))
    # and random directions are not contained (baseline sqrt(k/d) ~ 0.11)
    rnd = jax.random.normal(jax.random.PRNGKey(0), (N, 256))
    assert float(jnp.median(tangent_fraction(rnd, basis))) < 0.2
    # the manifold is curved: tangent spaces at different points differ
    overlap = jnp.linalg.svd(basis[0].T @ basis[1], compute_uv=False)
    assert float(jnp.min(overlap)) < 0.9


@pytest.mark.parametrize("s", [0.0, 0.3, 1.0])
def test_posterior_normalised_and_matches_much_finer_integral(manifold, fine, data, s):
    x = noisy(data, s)
    lp = manifold.log_posterior(x, s)
    assert bool(jnp.all(jnp.isfinite(lp)))
    np.testing.assert_allclose(jnp.sum(jnp.exp(lp), -1), 1.0, atol=1e-5)
    ll, ll_fine = manifold.log_likelihood(x, s), fine.log_likelihood(x, s)
    lp_fine = jax.nn.log_softmax(ll_fine, axis=-1)  # fine.log_posterior, without a second quadrature
    assert float(jnp.max(jnp.abs(jnp.exp(lp) - jnp.exp(lp_fine)))) < 0.02
    assert float(jnp.median(jnp.abs(ll - ll_fine))) < 0.05
    g, g_fine = manifold.bayes_gradient(x, data.y, s), fine.bayes_gradient(x, data.y, s)
    cos = jnp.sum(g * g_fine, axis=(1, 2, 3)) / (per_example_norm(g) * per_example_norm(g_fine) + 1e-30)
    assert float(jnp.median(cos)) > 0.98


def test_density_matches_monte_carlo_over_the_prior(manifold, data):
    """At large noise the integrand is smooth: a plain Monte-Carlo average of N(x; g(z), sigma^2)
    over z ~ p(z|y) is accurate and checks the whole density, priors' normalisers included."""
    s = 1.0
    x = noisy(data, s)[:8].reshape(8, -1)
    sigma2 = manifold.observation_noise**2 + s**2
    n_mc = 20000
    ll = manifold.log_likelihood(jnp.concatenate([x.reshape(8, 16, 16, 1)] * 8), s)[:8]
    for c in range(4):
        key = jax.random.fold_in(jax.random.PRNGKey(5), c)
        k1, k2 = jax.random.split(key)
        pos = jax.random.uniform(k1, (n_mc, 2), minval=-1, maxval=1)
        sd, m = manifold.class_std, float(manifold.class_centres[c])
        b = m + sd * jax.random.truncated_normal(k2, (-1 - m) / sd, (1 - m) / sd, (n_mc,))
        imgs = manifold.generate(jnp.concatenate([pos, b[:, None]], -1)).reshape(n_mc, -1)
        sq = jnp.sum((x[:, None, :] - imgs[None]) ** 2, -1)
        mc = jax.nn.logsumexp(-0.5 * sq / sigma2, axis=1) - math.log(n_mc) - 128 * math.log(2 * math.pi * sigma2)
        err = jnp.abs(ll[:, c] - mc)   # measured MC spread across seeds: up to about 0.1 nats
        assert float(jnp.max(err)) < 0.25 and float(jnp.mean(err)) < 0.06, err


def test_small_noise_is_stable(manifold, data):
    for s in [0.0, 1e-4]:
        x = noisy(data, s)
        ll = manifold.log_likelihood(x, s)
        g = manifold.bayes_gradient(x, data.y, s)
        assert bool(jnp.all(jnp.isfinite(ll))) and bool(jnp.all(jnp.isfinite(g)))
        # the likelihood is near its Gaussian peak: -d/2 log(2 pi sigma^2) minus about d/2
        peak = -128 * math.log(2 * math.pi * (0.05**2 + s**2))
        assert float(jnp.median(jnp.max(ll, -1))) > peak - 0.5 * 256 - 20


def test_bayes_gradient_on_manifold_fraction_approaches_one_as_noise_shrinks(manifold, data):
    basis = manifold.tangent_basis(data.z)
    medians = []
    for s in [0.0, 0.1, 0.3, 1.0]:
        g = manifold.bayes_gradient(noisy(data, s), data.y, s)
        medians.append(float(jnp.median(tangent_fraction(g, basis))))
    baseline = math.sqrt(3 / 256)
    assert medians[0] > 0.98, medians
    assert all(a >= b - 1e-3 for a, b in zip(medians, medians[1:])), medians
    assert medians[2] > 5 * baseline, medians


def test_scores_and_autodiff_consistency(manifold, data):
    s = 0.2
    x = noisy(data, s)
    y = data.y
    g = manifold.bayes_gradient(x, y, s)
    cs = manifold.class_score(x, y, s)
    np.testing.assert_allclose(g, cs - manifold.score(x, s), atol=1e-4 * float(jnp.max(jnp.abs(g))) + 1e-4)
    # the scores are the exact derivatives of the quadrature log-density
    pick = lambda v: jnp.sum(jnp.take_along_axis(v, y[:, None], axis=1))  # noqa: E731
    ad = jax.grad(lambda x: pick(manifold.log_likelihood(x, s)))(x)
    np.testing.assert_allclose(ad, cs, atol=2e-3 * float(jnp.max(jnp.abs(cs))))
    # finite difference of log p_s(y|x) along the Bayes gradient direction. The quadrature
    # nodes follow x (mode search), so the estimate's total derivative differs from the
    # fixed-node derivative by the quadrature's own x-dependence: measured about 4%.
    u = g / per_example_norm(g)[:, None, None, None]
    eps = 1e-2
    lp_plus = jnp.take_along_axis(manifold.log_posterior(x + eps * u, s), y[:, None], 1)[:, 0]
    lp_minus = jnp.take_along_axis(manifold.log_posterior(x - eps * u, s), y[:, None], 1)[:, 0]
    fd = (lp_plus - lp_minus) / (2 * eps)
    rel = jnp.abs(fd - per_example_norm(g)) / (per_example_norm(g) + 0.05)
    assert float(jnp.median(rel)) < 0.07 and float(jnp.max(rel)) < 0.3, rel


def test_tweedie_score_matches_a_monte_carlo_posterior_mean(manifold, data):
    """Tweedie: x + s^2 grad log p_s(x) = E[x0 | x]. The right side by Monte Carlo, with no use
    of the quadrature: latents z from the prior (the sampler), self-normalised weights
    N(x; g(z), sigma^2 I) give E[g(z) | x], and given g(z) and x the observation noise is
    Gaussian, so E[x0 | x] = E[g|x] + (observation_noise^2 / sigma^2) (x - E[g|x]). Errors are
    relative to how far E[x0 | x] is from its prior counterpart (measured: about 0.01-0.03,
    the quadrature's and the Monte Carlo's errors together; the effective sample sizes are
    40-5000)."""
    n_mc, obs2 = 40000, manifold.observation_noise**2
    g = manifold.generate(manifold.sample(jax.random.PRNGKey(5), n_mc).z).reshape(n_mc, -1)
    prior_g = jnp.mean(g, 0)
    for s in (0.5, 1.0):
        x = noisy(data, s)
        xf = x[:8].reshape(8, -1)
        sigma2 = obs2 + s**2
        w = jax.nn.softmax(-0.5 * jnp.sum((xf[:, None] - g[None]) ** 2, -1) / sigma2, -1)   # (8, n_mc)
        e_g = w @ g
        mc = e_g + obs2 / sigma2 * (xf - e_g)
        tweedie = xf + s**2 * manifold.score(x, s)[:8].reshape(8, -1)
        scale = per_example_norm(mc - (prior_g + obs2 / sigma2 * (xf - prior_g)))
        rel = np.asarray(per_example_norm(tweedie - mc) / scale)
        assert rel.max() < 0.08 and rel.mean() < 0.04, (s, rel)


def test_bayes_accuracy_and_calibration(manifold):
    key = jax.random.PRNGKey(2)
    accs = [manifold.bayes_accuracy(key, s, n=256, batch_size=N) for s in [0.0, 3.0]]
    assert 0.6 < accs[0] < 0.97, accs                  # overlapping bend classes: not trivial
    assert accs[1] < accs[0] - 0.2, accs               # heavy noise destroys the bend
    d = manifold.sample(jax.random.PRNGKey(9), 256)
    probs = jnp.concatenate([jnp.exp(manifold.log_posterior(d.x[i:i + N], 0.0)) for i in range(0, 256, N)])
    acc = float(jnp.mean(jnp.argmax(probs, -1) == d.y))
    assert abs(acc - float(jnp.mean(jnp.max(probs, -1)))) < 0.08


@pytest.mark.parametrize("kwargs, arg", [
    (dict(num_classes=0), "num_classes"),
    (dict(observation_noise=0.0), "observation_noise"),
    (dict(grid_size=4, refine_cells=2), "grid_size"),
    (dict(refine_size=0), "refine_size"),
    (dict(num_splats=1), "num_splats"),
    (dict(stroke_width=-1.0), "stroke_width"),
])
def test_impossible_parameters_raise(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        make_curved_manifold(**kwargs)


def test_bad_calls_raise_and_registry(manifold):
    with pytest.raises(ValueError, match="n"):
        manifold.sample(jax.random.PRNGKey(0), 0)
    with pytest.raises(ValueError, match="s"):
        manifold.log_posterior(jnp.zeros((N, 16, 16, 1)), -1.0)
    assert isinstance(build_manifold("curved"), CurvedManifold)
    with pytest.raises(ValueError, match="curved"):
        build_manifold("curvy")
