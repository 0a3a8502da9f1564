"""The linear known manifold: closed forms checked against the theory (docs/theory.md §2, §6),
autodiff, a dense multivariate-normal reference, Tweedie's formula and Monte Carlo."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pagjax.manifolds import (LinearManifold, build_manifold, default_linear_manifold,
                              make_dataset, make_linear_manifold)
from pagjax.numerics import per_example_norm

SMALL = dict(image_shape=(6, 6, 1), intrinsic_dim=3, num_classes=3, components_per_class=2)


def to64(m):
    """The same manifold in float64, with U and V re-orthonormalised to float64 precision
    (the closed forms assume U^T U = I exactly; float32 QR gives it to ~1e-7 only)."""
    m = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), m)
    basis, _ = jnp.linalg.qr(m.basis)
    basis = basis * jnp.sign(jnp.sum(basis * m.basis, axis=0))
    v = m.normal_directions.T
    v = v - basis @ (basis.T @ v)
    v, _ = jnp.linalg.qr(v)
    v = v - basis @ (basis.T @ v)
    v = v / jnp.linalg.norm(v, axis=0)
    return dataclasses.replace(m, basis=basis, normal_directions=v.T)


def noisy(m, key, n, s):
    k1, k2 = jax.random.split(key)
    d = m.sample(k1, n)
    return d.x + s * jax.random.normal(k2, d.x.shape, d.x.dtype), d.y


def normal_part(m, g):
    gf = g.reshape(g.shape[0], -1)
    return gf - (gf @ m.basis) @ m.basis.T


@pytest.fixture(scope="module")
def default():
    return default_linear_manifold(0)


# ----------------------------------------------------------------------------- structure
def test_basis_orthonormal_smooth_and_normal_directions_orthogonal(default):
    m = default
    d, k = m.dim, m.intrinsic_dim
    assert m.basis.shape == (d, k) == (256, 8)
    np.testing.assert_allclose(m.basis.T @ m.basis, np.eye(k), atol=1e-5)
    np.testing.assert_allclose(m.normal_directions @ m.normal_directions.T, np.eye(4), atol=1e-5)
    np.testing.assert_allclose(m.normal_directions @ m.basis, 0.0, atol=1e-5)
    # smooth patterns: neighbouring pixels are far more similar than in random orthonormal images
    imgs = m.basis.T.reshape(k, 16, 16)
    rough = lambda a: float(jnp.mean(jnp.abs(jnp.diff(a, axis=1))) + jnp.mean(jnp.abs(jnp.diff(a, axis=2))))  # noqa: E731
    rand, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(0), (d, k)))
    assert rough(imgs) < 0.35 * rough(rand.T.reshape(k, 16, 16))
    tb = m.tangent_basis(jnp.zeros((5, k)))
    assert tb.shape == (5, d, k)
    np.testing.assert_array_equal(tb[3], m.basis)


def test_sample_shapes_range_and_determinism(default):
    m = default
    a = m.sample(jax.random.PRNGKey(3), 512)
    b = m.sample(jax.random.PRNGKey(3), 512)
    c = m.sample(jax.random.PRNGKey(4), 512)
    assert a.x.shape == (512, 16, 16, 1) and a.x.dtype == jnp.float32
    assert a.y.shape == (512,) and a.y.dtype == jnp.int32 and a.z.shape == (512, 8)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert not np.allclose(a.x, c.x)
    assert set(np.unique(a.y).tolist()) == {0, 1, 2, 3}
    # images sit around 0.5, latent coordinates have scale about 1
    assert abs(float(a.x.mean()) - 0.5) < 0.02
    assert 0.5 < float(a.z.std()) < 1.5
    assert float(jnp.mean((a.x > -0.25) & (a.x < 1.25))) > 0.99
    # z are the subspace coordinates of x; the normal part is offset + normal noise
    xf = a.x.reshape(512, -1) - 0.5
    np.testing.assert_allclose(xf @ m.basis, a.z, atol=1e-4)
    off = xf @ m.normal_directions.T                        # (n, C)
    own = off[jnp.arange(512), a.y]
    assert abs(float(own.mean()) - 0.1) < 0.005
    assert abs(float(own.std()) - 0.02) < 0.004
    # same seed -> same manifold; different seed -> different one
    np.testing.assert_array_equal(default_linear_manifold(0).basis, m.basis)
    assert not np.allclose(default_linear_manifold(1).basis, m.basis)


def test_make_dataset_split(default):
    data = make_dataset(default, jax.random.PRNGKey(0), 64, 40)
    assert data.x_train.shape == (64, 16, 16, 1) and data.x_test.shape == (40, 16, 16, 1)
    assert data.z_train.shape == (64, 8) and data.y_test.shape == (40,)
    assert data.manifold is default
    assert not np.allclose(data.x_train[:40], data.x_test)
    again = make_dataset(default, jax.random.PRNGKey(0), 64, 40)
    np.testing.assert_array_equal(again.x_test, data.x_test)


@pytest.mark.parametrize("kwargs, arg", [
    (dict(intrinsic_dim=36), "intrinsic_dim"),
    (dict(intrinsic_dim=40), "intrinsic_dim"),
    (dict(intrinsic_dim=0), "intrinsic_dim"),
    (dict(num_classes=0), "num_classes"),
    (dict(components_per_class=0), "components_per_class"),
    (dict(image_shape=(6, 0, 1)), "image_shape"),
    (dict(image_shape=(6, 6)), "image_shape"),
    (dict(component_std=0.0), "component_std"),
    (dict(normal_offset=-0.1), "normal_offset"),
    (dict(normal_offset=0.1, normal_noise=0.0), "normal_noise"),
    (dict(class_separation=float("nan")), "class_separation"),
])
def test_impossible_parameters_raise(kwargs, arg):
    params = dict(SMALL, **kwargs)
    with pytest.raises(ValueError, match=arg.split("[")[0]):
        make_linear_manifold(0, **params)


def test_bad_call_arguments_raise(default):
    with pytest.raises(ValueError, match="n"):
        default.sample(jax.random.PRNGKey(0), 0)
    with pytest.raises(ValueError, match="n_train"):
        make_dataset(default, jax.random.PRNGKey(0), 0, 10)
    with pytest.raises(ValueError, match="n_test"):
        make_dataset(default, jax.random.PRNGKey(0), 10, -1)
    x = jnp.zeros((2, 16, 16, 1))
    with pytest.raises(ValueError, match="s"):
        default.log_posterior(x, -0.1)
    with pytest.raises(ValueError, match="image shape"):
        default.log_posterior(jnp.zeros((2, 8, 8, 1)), 0.1)
    with pytest.raises(ValueError, match="linear"):
        build_manifold("no_such_manifold")


# ----------------------------------------------------------------------------- theory
def dense_log_likelihoods(m, s):
    """log p_s(x|y) for every class as a jax function of x, from the d x d covariance
    (component_std^2 + s^2) U U^T + (normal_noise^2 + s^2) P_perp and the component means
    center + U mu + offset * v_y, with no use of the closed forms' factorisation."""
    d = m.dim
    proj = m.basis @ m.basis.T
    cov = (m.component_std**2 + s**2) * proj + (m.normal_noise**2 + s**2) * (jnp.eye(d) - proj)
    prec = jnp.linalg.inv(cov)
    _, logdet = jnp.linalg.slogdet(cov)
    means = (m.center + jnp.einsum("cjk,dk->cjd", m.component_means, m.basis)
             + m.normal_offset * m.normal_directions[:, None, :])         # (C, J, d)

    def log_lik(x):
        diff = x.reshape(x.shape[0], 1, 1, d) - means[None]
        maha = jnp.einsum("ncjd,de,ncje->ncj", diff, prec, diff)
        comps = -0.5 * (maha + logdet + d * jnp.log(2 * jnp.pi))
        return jax.nn.logsumexp(comps, -1) - jnp.log(m.components_per_class)   # (n, C)

    return log_lik


@jax.jit
def _dense_scores(m, x, y, s):
    """jax.grad of the dense density: grad log p_s(x|y), grad log p_s(x), grad log p_s(y|x)."""
    log_lik = dense_log_likelihoods(m, s)
    pick = lambda v: jnp.sum(jnp.take_along_axis(v, y[:, None], 1))  # noqa: E731
    return (jax.grad(lambda x: pick(log_lik(x)))(x),
            jax.grad(lambda x: jnp.sum(jax.nn.logsumexp(log_lik(x), -1)))(x),
            jax.grad(lambda x: pick(jax.nn.log_softmax(log_lik(x), -1)))(x))


@pytest.mark.parametrize("offset, normal_noise", [(0.0, 0.0), (0.0, 0.02), (0.1, 0.02)])
def test_exact_case_normal_parts_from_autodiff_of_the_density(offset, normal_noise):
    """normal_offset = 0: every class score has the same large normal part (the pull back
    to the subspace), so the score's normal part is that pull and the Bayes gradient's
    normal part cancels to zero: not by construction, as in the closed form, but in jax.grad
    of a dense Gaussian-mixture density, at every s (s = 0 included) and far off the subspace.
    The control, offset 0.1, shows that the check sees a normal part where there is one."""
    with jax.enable_x64(True):
        m = to64(default_linear_manifold(0, normal_offset=offset, normal_noise=normal_noise))
        tau0 = m.normal_noise
        for s in ([0.01, 0.1, 1.0] if tau0 == 0 else [0.0, 0.1, 1.0]):  # tau = s = 0: no density off U
            x, y = noisy(m, jax.random.PRNGKey(1), 64, s)
            x = x.astype(jnp.float64).at[:32].add(0.5 * jax.random.normal(jax.random.PRNGKey(2), x[:32].shape))
            class_score, score, bayes = _dense_scores(m, x, y, s)
            pull = normal_part(m, score)
            np.testing.assert_allclose(bayes.reshape(64, -1), m.bayes_gradient(x, y, s).reshape(64, -1),
                                       rtol=1e-6, atol=1e-8 * float(jnp.max(jnp.abs(bayes))) + 1e-12)
            ratio = np.asarray(per_example_norm(normal_part(m, bayes)) / per_example_norm(pull))
            if offset == 0:
                np.testing.assert_allclose(normal_part(m, class_score), pull, rtol=1e-6,
                                           atol=1e-9 * float(jnp.max(jnp.abs(pull))))
                # the pull is minus the normal residual over tau^2, and it dominates the score
                r = normal_part(m, x.reshape(64, -1) - m.center)
                np.testing.assert_allclose(pull, -r / (tau0**2 + s**2), rtol=1e-6, atol=1e-9)
                assert float(jnp.min(per_example_norm(pull) / per_example_norm(score))) > 0.5
                assert ratio.max() < 1e-9, (s, ratio.max())
            else:
                assert ratio.max() > 1e-3, (s, ratio.max())  # where the posterior is not saturated


def test_exact_case_posterior_depends_only_on_subspace_coordinates():
    m = default_linear_manifold(0, normal_offset=0.0, normal_noise=0.02)
    x, _ = noisy(m, jax.random.PRNGKey(1), 64, 0.3)
    push = normal_part(m, jax.random.normal(jax.random.PRNGKey(5), (64, 256))).reshape(x.shape)
    for s in [0.0, 0.3]:
        np.testing.assert_allclose(m.log_posterior(x + push, s), m.log_posterior(x, s), atol=2e-4)


@pytest.mark.parametrize("s", [0.0, 0.05, 0.3, 2.0])
def test_bayes_gradient_is_difference_of_scores(default, s):
    x, y = noisy(default, jax.random.PRNGKey(7), 64, s)
    g = default.bayes_gradient(x, y, s)
    diff = default.class_score(x, y, s) - default.score(x, s)
    scale = float(jnp.max(jnp.abs(default.score(x, s))))
    np.testing.assert_allclose(g, diff, atol=1e-5 * scale + 1e-5)


@jax.jit
def _autodiff_and_closed_forms(m, x, y, s):
    pick = lambda v: jnp.sum(jnp.take_along_axis(v, y[:, None], axis=1))  # noqa: E731
    autodiff = (jax.grad(lambda x: pick(m.log_likelihood(x, s)))(x),
                jax.grad(lambda x: jnp.sum(m.log_marginal(x, s)))(x),
                jax.grad(lambda x: pick(m.log_posterior(x, s)))(x))
    closed = (m.class_score(x, y, s), m.score(x, s), m.bayes_gradient(x, y, s))
    return autodiff, closed


def test_closed_forms_match_autodiff_in_float64():
    with jax.enable_x64(True):
        for offset, noise in [(0.0, 0.0), (0.1, 0.02)]:
            m = to64(default_linear_manifold(0, normal_offset=offset, normal_noise=noise))
            for s in ([0.0, 0.3] if noise > 0 else [0.3]):  # noise = s = 0: no density off the subspace
                x, y = noisy(m, jax.random.PRNGKey(11), 64, s)
                autodiff, closed = _autodiff_and_closed_forms(m, x.astype(jnp.float64), y, s)
                for a, c in zip(autodiff, closed):
                    np.testing.assert_allclose(c, a, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("s", [0.02, 0.5, 3.0])
def test_tweedie_score_equals_posterior_mean_residual(s):
    """score(x) = (E[x0|x] - x) / s^2, with E[x0|x] from component responsibilities."""
    with jax.enable_x64(True):
        m = to64(default_linear_manifold(0))
        x, _ = noisy(m, jax.random.PRNGKey(2), 64, s)
        x = x.astype(jnp.float64)
        tweedie = (m.posterior_mean(x, s) - x) / s**2
        np.testing.assert_allclose(m.score(x, s), tweedie, rtol=1e-8, atol=1e-8)
    # float32 agrees too, with float32 tolerances
    m32 = default_linear_manifold(0)
    x32, _ = noisy(m32, jax.random.PRNGKey(2), 64, s)
    np.testing.assert_allclose(m32.score(x32, s) * s**2, m32.posterior_mean(x32, s) - x32, atol=2e-5)


def test_posterior_mean_is_identity_at_zero_noise(default):
    x, _ = noisy(default, jax.random.PRNGKey(2), 64, 0.0)
    np.testing.assert_allclose(default.posterior_mean(x, 0.0), x, atol=1e-5)


@pytest.mark.parametrize("offset, noise", [(0.0, 0.0), (0.2, 0.05)])
def test_log_likelihood_matches_dense_multivariate_normal(offset, noise):
    """Closed form vs. a dense numpy float64 Gaussian-mixture logpdf with the full d x d
    covariance (sw^2 + s^2) U U^T + (noise^2 + s^2) P_perp."""
    with jax.enable_x64(True):
        m = to64(make_linear_manifold(3, **SMALL, normal_offset=offset, normal_noise=noise))
        d = m.dim
        basis, means = np.asarray(m.basis), np.asarray(m.component_means)
        v, center = np.asarray(m.normal_directions), np.asarray(m.center)
        for s in [0.05, 0.7]:
            x, _ = noisy(m, jax.random.PRNGKey(9), 64, s)
            x = x.astype(jnp.float64)
            xf = np.asarray(x).reshape(64, d)
            proj = basis @ basis.T
            cov = (m.component_std**2 + s**2) * proj + (noise**2 + s**2) * (np.eye(d) - proj)
            _, logdet = np.linalg.slogdet(cov)
            prec = np.linalg.inv(cov)
            ref = np.zeros((64, m.num_classes))
            for c in range(m.num_classes):
                comps = []
                for j in range(m.components_per_class):
                    diff = xf - (center + basis @ means[c, j] + offset * v[c])
                    maha = np.einsum("ni,ij,nj->n", diff, prec, diff)
                    comps.append(-0.5 * (maha + logdet + d * np.log(2 * np.pi)))
                comps = np.stack(comps, -1)
                top = comps.max(-1, keepdims=True)
                ref[:, c] = (top[:, 0] + np.log(np.exp(comps - top).sum(-1))
                             - np.log(m.components_per_class))
            np.testing.assert_allclose(m.log_likelihood(x, s), ref, rtol=1e-9, atol=1e-7)
            top = ref.max(-1, keepdims=True)
            marg = top[:, 0] + np.log(np.exp(ref - top).sum(-1)) - np.log(m.num_classes)
            np.testing.assert_allclose(m.log_marginal(x, s), marg, rtol=1e-9, atol=1e-7)


def test_zero_noise_degenerate_case_is_the_subspace_mixture():
    """normal_noise = 0, s = 0: the posterior is that of the k-dim mixture of t = U^T(x - c)."""
    m = default_linear_manifold(0, normal_offset=0.0, normal_noise=0.0)
    x, _ = noisy(m, jax.random.PRNGKey(4), 64, 0.0)
    lp = m.log_posterior(x, 0.0)
    assert bool(jnp.all(jnp.isfinite(lp)))
    t = (x.reshape(64, -1) - 0.5) @ m.basis
    comp = -0.5 * jnp.sum((t[:, None, None] - m.component_means[None]) ** 2, -1) / m.component_std**2
    ref = jax.nn.log_softmax(jax.nn.logsumexp(comp, -1), -1)
    np.testing.assert_allclose(lp, ref, atol=1e-4)
    assert bool(jnp.all(jnp.isfinite(m.score(x, 0.0))))


def test_posterior_is_normalised_and_calibrated(default):
    """Sums to one; and E[max_y p_s(y|x)] equals the Monte-Carlo Bayes accuracy (the
    samples really come from the density the posterior is computed from)."""
    for s in [0.1, 0.3]:
        x, y = noisy(default, jax.random.PRNGKey(21), 4096, s)
        lp = default.log_posterior(x, s)
        np.testing.assert_allclose(jnp.sum(jnp.exp(lp), -1), 1.0, atol=1e-5)
        expected_acc = float(jnp.mean(jnp.max(jnp.exp(lp), -1)))
        acc = float(jnp.mean(jnp.argmax(lp, -1) == y))
        assert abs(acc - expected_acc) < 0.025, (s, acc, expected_acc)
        # log-likelihood of the true class is on average the highest (proper scoring)
        assert float(jnp.mean(lp[jnp.arange(4096), y])) > float(jnp.mean(lp))


def test_bayes_accuracy_behaviour(default):
    key = jax.random.PRNGKey(0)
    accs = [default.bayes_accuracy(key, s, n=2048) for s in [0.0, 0.1, 1.0, 10.0]]
    assert accs[0] > 0.99                              # normal offsets separate classes at s = 0
    assert accs[0] >= accs[1] >= accs[2] >= accs[3] - 0.02
    assert abs(accs[3] - 0.25) < 0.08                  # at huge noise: chance
    exact = default_linear_manifold(0, normal_offset=0.0)
    a0 = exact.bayes_accuracy(key, 0.0, n=2048)
    assert 0.7 < a0 < 0.97                             # on-manifold task: informative but not trivial
    # the classifier optimal for s evaluated on clean data
    assert default.bayes_accuracy(key, 1.0, n=2048, test_noise=0.0) > accs[2]


def test_on_manifold_fraction_rises_with_noise_level(default):
    """normal_offset > 0: the Bayes gradient is mostly normal for s << offset and becomes
    almost tangent as s grows past the normal component's size (docs/theory.md §6)."""
    m = default
    medians = []
    for s in [0.0, 0.03, 0.1, 0.3, 1.0, 3.0]:
        with jax.enable_x64(True):  # avoid exactly-saturated posteriors (0/0) at small s
            m64 = to64(m)
            x, y = noisy(m64, jax.random.PRNGKey(5), 512, s)
            g = m64.bayes_gradient(x.astype(jnp.float64), y, s)
            gn = per_example_norm(g)
            frac = per_example_norm((g.reshape(512, -1) @ m64.basis)) / gn
            frac = np.asarray(frac)[np.asarray(gn) > 0]
            assert frac.size > 400
            medians.append(float(np.median(frac)))
    random_baseline = math.sqrt(8 / 256)
    assert medians[0] < random_baseline                # weak regime: gradient sits off-manifold
    assert all(b >= a - 1e-3 for a, b in zip(medians, medians[1:])), medians
    assert medians[-2] > 0.98 and medians[-1] > 0.98, medians


def test_jit_vmap_and_traced_noise_level(default):
    x, y = noisy(default, jax.random.PRNGKey(8), 64, 0.2)
    f = jax.jit(lambda m, x, s: m.bayes_gradient(x, y, s))
    np.testing.assert_allclose(f(default, x, 0.2), default.bayes_gradient(x, y, 0.2), rtol=1e-5, atol=1e-6)
    ss = jnp.array([0.0, 0.1, 1.0])
    lp = jax.vmap(lambda s: default.log_posterior(x, s))(ss)
    for i, s in enumerate([0.0, 0.1, 1.0]):
        np.testing.assert_allclose(lp[i], default.log_posterior(x, s), rtol=1e-5, atol=1e-5)
    # per-example vmap over a batch of 1 matches the batched call
    one = jax.vmap(lambda xi: default.score(xi[None], 0.2)[0])(x)
    np.testing.assert_allclose(one, default.score(x, 0.2), rtol=1e-5, atol=1e-5)


def test_build_manifold_presets():
    m = build_manifold("linear_default")
    assert isinstance(m, LinearManifold)
    assert (m.image_shape, m.intrinsic_dim, m.num_classes) == ((16, 16, 1), 8, 4)
    assert (m.normal_offset, m.normal_noise) == (0.1, 0.02)
    m2 = build_manifold("linear", **SMALL)
    assert m2.dim == 36 and m2.normal_offset == 0.0


@jax.jit
def _autodiff_minus_closed_form(m, x, y, s):
    ad = jax.grad(lambda x: jnp.sum(jnp.take_along_axis(m.log_posterior(x, s), y[:, None], 1)))(x)
    return ad, m.bayes_gradient(x, y, s), jnp.sum(jnp.exp(m.log_posterior(x, s)), -1)


@settings(max_examples=5, deadline=None)
@given(s=st.floats(0.0, 5.0), seed=st.integers(0, 2**16), offset=st.sampled_from([0.0, 0.3]))
def test_property_closed_form_scores_match_autodiff(s, seed, offset):
    m = make_linear_manifold(seed, **SMALL, normal_offset=offset, normal_noise=0.1)
    x, y = noisy(m, jax.random.PRNGKey(seed), 64, s)
    ad, g, total = _autodiff_minus_closed_form(m, x, y, s)
    scale = float(jnp.max(jnp.abs(ad))) + 1e-3
    np.testing.assert_allclose(g, ad, atol=1e-4 * scale)
    np.testing.assert_allclose(total, 1.0, atol=1e-5)
