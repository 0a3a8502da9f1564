"""Tests of pagjax.scores: learned denoiser scores vs exact ones, Tweedie, orbax, cache keys.

The denoiser is trained here (a few seconds on CPU) on the project's linear known manifold
(16x16x1, `pagjax.manifolds`), falling back to the closed-form fixture if that package is
missing. Stated targets, at every training noise level s in {0.1, 0.3, 1.0}:

* denoising MSE at most 1.35x the exact Bayes (Tweedie posterior-mean) MSE
  (measured: 1.15/1.15/1.05x unconditional, 1.11/1.10/1.05x conditional);
* cosine between the learned score (D(x, s) - x) / s^2 and the exact score at noisy
  inputs x0 + s n at least 0.99 (measured: 0.9974/0.9985/0.9996 unconditional,
  0.9984/0.9989/0.9998 conditional).

Width 96 (it was 128: 1.21/1.13/1.06x unconditional) trains faster and is as accurate: over
two other data/initialisation seeds the worst ratio was 1.17x, the lowest cosine 0.997.
Width 64 was not robust enough (one seed reached 1.33x).
"""
from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests._gm_fixture import make_fixture
from tests.helpers import optimized_compilation

# the implementation lives in pagjax.alignment; `pagjax.grad_align` is a callable module forwarding to it
ga = importlib.import_module("pagjax.alignment")
scores = importlib.import_module("pagjax.scores")

LEVELS = (0.1, 0.3, 1.0)
MSE_RATIO_MAX = 1.35
NOISY_COSINE_MIN = 0.99


def _manifold():
    try:
        from pagjax import manifolds
    except ImportError:
        return make_fixture(tau=0.3)
    if hasattr(manifolds, "build_manifold"):
        return manifolds.build_manifold("linear")
    if hasattr(manifolds, "make_linear_manifold"):
        return manifolds.make_linear_manifold()
    return make_fixture(tau=0.3)


@pytest.fixture(scope="module")
def setup():
    m = _manifold()
    tr = m.sample(jax.random.key(0), 2048)
    te = m.sample(jax.random.key(1), 256)
    kw = dict(noise_levels=LEVELS, steps=1500, width=96, depth=2, key=jax.random.key(2))
    with optimized_compilation():  # 3000 training steps: running, not compiling, is the time
        uncond = scores.train_denoiser(tr[0], **kw)
        cond = scores.train_denoiser(tr[0], tr[1], conditional=True, **kw)
    return m, te[0], te[1], uncond, cond


def _check_denoiser(m, x, y, den, conditional):
    src = scores.learned_score(den)
    assert src.needs_labels == conditional
    rows = []
    for i, s in enumerate(LEVELS):
        k = jax.random.key(10 + i)
        if conditional:
            exact_d = lambda xn, ss, yy: xn + ss**2 * m.class_score(xn, yy, ss)  # noqa: E731
            exact_s = lambda xx: m.class_score(xx, y, s)  # noqa: E731
        else:
            exact_d = lambda xn, ss, yy: m.posterior_mean(xn, ss)  # noqa: E731
            exact_s = lambda xx: m.score(xx, s)  # noqa: E731
        mse = float(scores.denoising_mse(den, x, y if conditional else None, s, k))
        floor = float(scores.denoising_mse(exact_d, x, y, s, k))
        xn = x + s * jax.random.normal(k, x.shape)
        cos = float(ga.cosine_similarity(src(xn, y, noise_level=s), exact_s(xn)).mean())
        rows.append((s, mse, floor, cos))
        assert mse <= MSE_RATIO_MAX * floor, (s, mse, floor)
        assert cos >= NOISY_COSINE_MIN, (s, cos)
    return rows


@pytest.mark.slow  # through the module fixture `setup`
def test_unconditional_denoiser_reaches_stated_error_and_score_alignment(setup):
    m, x, y, uncond, _ = setup
    rows = _check_denoiser(m, x, y, uncond, conditional=False)
    print("unconditional (s, mse, exact mse, cosine):", rows)


@pytest.mark.slow  # through the module fixture `setup`
def test_conditional_denoiser_reaches_stated_error_and_score_alignment(setup):
    m, x, y, _, cond = setup
    rows = _check_denoiser(m, x, y, cond, conditional=True)
    print("conditional (s, mse, exact mse, cosine):", rows)
    with pytest.raises(ValueError, match="needs labels"):
        scores.learned_score(cond)(x, None, noise_level=0.3)


@pytest.mark.slow  # through the module fixture `setup`
def test_tweedie_formula_and_orbax_round_trip(setup, tmp_path):
    m, x, y, uncond, cond = setup
    s = 0.3
    src = scores.learned_score(uncond)
    np.testing.assert_allclose(src(x, noise_level=s), (uncond(x, s) - x) / s**2, rtol=1e-4, atol=1e-3)
    for den, yy in ((uncond, None), (cond, y)):
        path = tmp_path / f"den{den.num_classes}"
        scores.save_denoiser(str(path), den)
        back = scores.load_denoiser(str(path))
        assert back.config() == den.config()
        np.testing.assert_array_equal(back(x, s, yy), den(x, s, yy))
        # same contents -> same cache key (reusable across processes)
        assert scores.learned_score(back).name == scores.learned_score(den).name
    with pytest.raises(FileNotFoundError, match="no denoiser checkpoint"):
        scores.load_denoiser(str(tmp_path / "missing"))


@pytest.mark.slow  # through the module fixture `setup`
def test_learned_score_in_grad_align_with_cache(setup):
    m, x, y, _, cond = setup
    s = 0.3
    # evaluate at noisy inputs x0 + s n, where the denoiser was trained
    xn = x[:16] + s * jax.random.normal(jax.random.key(5), x[:16].shape)
    y = y[:16]
    src = scores.learned_score(cond)
    cache = scores.ScoreCache()
    apply_fn = lambda p, xx: m.log_posterior(xx, p)  # noqa: E731
    exact = ga.grad_align(apply_fn, jnp.float32(s), xn, y, score=scores.exact_score(m, "class_score"),
                          noise_level=s)
    learned = ga.grad_align(apply_fn, jnp.float32(s), xn, y, score=src, noise_level=s, cache=cache)
    ga.grad_align(apply_fn, jnp.float32(1.0), xn, y, score=src, noise_level=s, cache=cache)
    assert (cache.misses, cache.hits) == (1, 1)
    # the learned score gives the same per-example alignment as the exact one
    np.testing.assert_allclose(learned.per_example["cosine"], exact.per_example["cosine"], atol=0.1)


def test_train_denoiser_errors():
    x = jnp.zeros((8, 4, 4, 1))
    with pytest.raises(ValueError, match="y_train is required"):
        scores.train_denoiser(x, noise_levels=0.1, steps=1, key=jax.random.key(0), conditional=True)
    with pytest.raises(ValueError, match="noise_levels"):
        scores.train_denoiser(x, noise_levels=(0.1, -1.0), steps=1, key=jax.random.key(0))
    with pytest.raises(ValueError, match="steps"):
        scores.train_denoiser(x, noise_levels=0.1, steps=0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="x_train"):
        scores.train_denoiser(x[..., 0], noise_levels=0.1, steps=1, key=jax.random.key(0))


def test_conv_denoiser_trains_and_is_finite():
    x = 0.5 + 0.1 * jax.random.normal(jax.random.key(0), (32, 8, 8, 1))
    y = jnp.arange(32, dtype=jnp.int32) % 2
    den = scores.train_denoiser(x, y, noise_levels=(0.2, 0.5), steps=20, key=jax.random.key(1),
                                conditional=True, arch="conv", width=8, depth=1,
                                noise_sampling="log_uniform")
    out = scores.learned_score(den)(x, y, noise_level=0.3)
    assert out.shape == x.shape and np.all(np.isfinite(out))
    assert den.num_classes == 2 and den.arch == "conv"


def test_fingerprint_is_content_based():
    a = {"w": np.arange(4.0), "n": 3}
    assert scores.fingerprint(a) == scores.fingerprint({"n": 3, "w": np.arange(4.0)})
    assert scores.fingerprint(a) != scores.fingerprint({"w": np.arange(4.0) + 1, "n": 3})
    with pytest.raises(TypeError):
        scores.fingerprint(lambda: 0)
