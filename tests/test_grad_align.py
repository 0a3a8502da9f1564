"""Tests of pagjax.alignment (grad_align): metrics, normalisation, exact-score alignment, errors."""
from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests._gm_fixture import make_fixture

# the implementation lives in pagjax.alignment; `pagjax.grad_align` is a callable module forwarding to it
ga = importlib.import_module("pagjax.alignment")
scores = importlib.import_module("pagjax.scores")
lpips_lib = importlib.import_module("pagjax.lpips")

S = 0.3


@pytest.fixture(scope="module")
def fixture_data():
    m = make_fixture()
    x, y, _ = m.sample(jax.random.key(0), 12)
    return m, x, y


@pytest.fixture(scope="module")
def alexnet():
    return lpips_lib.load_lpips("alexnet")


def _maps(seed, shape=(3, 8, 8, 1)):
    return jax.random.normal(jax.random.key(seed), shape)


# --------------------------------------------------------------------------- cosine / normalisation


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**30), scale=st.floats(1e-3, 1e3))
def test_cosine_with_itself_is_one_and_with_negation_minus_one(seed, scale):
    a = _maps(seed) * scale
    np.testing.assert_allclose(ga.cosine_similarity(a, a), 1.0, atol=1e-5)
    np.testing.assert_allclose(ga.cosine_similarity(a, -a), -1.0, atol=1e-5)
    b = _maps(seed + 1)
    c = ga.cosine_similarity(a, b)
    assert np.all(np.abs(c) <= 1 + 1e-6)


def test_cosine_with_zero_map_is_zero_not_nan():
    a = _maps(0)
    z = jnp.zeros_like(a)
    np.testing.assert_array_equal(ga.cosine_similarity(a, z), 0.0)
    np.testing.assert_array_equal(ga.cosine_similarity(z, z), 0.0)
    g = jax.grad(lambda v: ga.cosine_similarity(v, a).sum())(z)
    assert np.all(np.isfinite(g))


def test_normalize_maps_modes():
    a = _maps(1) * 5 + 2
    m = ga.normalize_maps(a, "max_abs")
    np.testing.assert_allclose(jnp.max(jnp.abs(m), axis=(1, 2, 3)), 1.0, rtol=1e-6)
    s = ga.normalize_maps(a, "standardize")
    np.testing.assert_allclose(jnp.mean(s, axis=(1, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(jnp.std(s, axis=(1, 2, 3)), 1.0, rtol=1e-4)
    np.testing.assert_array_equal(ga.normalize_maps(a, "none"), a)
    for mode in ("max_abs", "standardize"):
        np.testing.assert_array_equal(ga.normalize_maps(jnp.zeros_like(a), mode), 0.0)
    # standardised cosine is the Pearson correlation
    b = _maps(2)
    r = ga.cosine_similarity(ga.normalize_maps(a, "standardize"), ga.normalize_maps(b, "standardize"))
    want = [np.corrcoef(np.ravel(a[i]), np.ravel(b[i]))[0, 1] for i in range(a.shape[0])]
    np.testing.assert_allclose(r, want, atol=1e-5)
    with pytest.raises(ValueError, match="normalization"):
        ga.normalize_maps(a, "l2")


# --------------------------------------------------------------------------- SSIM / LPIPS


def test_ssim_identical_is_one_and_falls_with_noise():
    a = ga.normalize_maps(_maps(3, (4, 16, 16, 1)))
    np.testing.assert_allclose(ga.ssim_alignment(a, a), 1.0, atol=1e-5)
    vals = [float(ga.ssim_alignment(a, a + sig * _maps(4, a.shape)).mean()) for sig in (0.05, 0.3, 1.0)]
    assert vals[0] > vals[1] > vals[2]


def test_lpips_identical_is_about_zero_and_grows_with_noise(alexnet):
    base = jax.image.resize(_maps(5, (2, 8, 8, 3)), (2, 32, 32, 3), "bilinear")
    a = ga.normalize_maps(base)
    same = ga.lpips_alignment(a, a, net=alexnet)  # 1 - LPIPS
    np.testing.assert_allclose(same, 1.0, atol=1e-4)
    dist = []
    for sig in (0.05, 0.2, 0.8):
        b = jnp.clip(a + sig * _maps(6, a.shape), -1, 1)
        dist.append(float(1.0 - ga.lpips_alignment(a, b, net=alexnet).mean()))
    assert 0 < dist[0] < dist[1] < dist[2]


def test_lpips_grayscale_small_images_vgg16_or_upsampled(fixture_data, alexnet):
    _, x, _ = fixture_data  # 16x16x1
    a = ga.normalize_maps(x[:2] - 0.5)
    b = ga.normalize_maps(x[2:4] - 0.5)
    with pytest.raises(ValueError, match="too small for LPIPS alexnet.*lpips_upsample=True.*vgg16"):
        ga.lpips_alignment(a, b, net=alexnet)
    up = ga.lpips_alignment(a, b, net=alexnet, upsample=True)
    vgg = ga.lpips_alignment(a, b, net="vgg16")
    assert np.all(np.isfinite(up)) and np.all(np.isfinite(vgg))
    np.testing.assert_allclose(ga.lpips_alignment(a, a, net="vgg16"), 1.0, atol=1e-4)
    assert np.all(up < 1.0) and np.all(vgg < 1.0)
    with pytest.raises(ValueError, match="too small for LPIPS vgg16"):
        ga.lpips_alignment(a[:, :8, :8], b[:, :8, :8], net="vgg16")


def test_missing_lpips_weights_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights not found"):
        lpips_lib.load_lpips("alexnet", weights_path=str(tmp_path / "nope.ckpt"))
    with pytest.raises(ValueError, match="lpips net"):
        lpips_lib.load_lpips("resnet")


# --------------------------------------------------------------------------- grad_align with exact scores


def test_bayes_optimal_model_aligns_with_exact_bayes_gradient(fixture_data):
    m, x, y = fixture_data
    apply_fn = lambda p, xx: m.log_posterior(xx, S)  # noqa: E731  the Bayes-optimal classifier
    src = scores.exact_score(m, "bayes_gradient")
    r = ga.grad_align(apply_fn, None, x, y, score=src, noise_level=S, metrics=("cosine", "ssim"))
    np.testing.assert_allclose(r.per_example["cosine"], 1.0, atol=1e-5)
    np.testing.assert_allclose(r.mean["ssim"], 1.0, atol=1e-4)
    assert r.per_example["cosine"].shape == (x.shape[0],)
    assert r.target == "logprob" and r.noise_level == S
    # the unconditional score is a different map: not aligned at cosine 1
    r2 = ga.grad_align(apply_fn, None, x, y, score=scores.exact_score(m, "score"), noise_level=S)
    assert float(r2.mean["cosine"]) < 0.9
    # precomputed maps and a callable give the same answer
    maps = scores.compute_scores(src, x, y, noise_level=S)
    r3 = ga.grad_align(apply_fn, None, x, y, score=maps)
    np.testing.assert_allclose(r3.per_example["cosine"], r.per_example["cosine"], atol=1e-6)
    r4 = ga.grad_align(apply_fn, None, x, y, score=lambda xx: m.bayes_gradient(xx, y, S))
    np.testing.assert_allclose(r4.per_example["cosine"], 1.0, atol=1e-5)


def test_chunked_and_jitted_match_unchunked(fixture_data):
    m, x, y = fixture_data
    params = {"w": jnp.float32(2.0)}
    apply_fn = lambda p, xx: p["w"] * m.log_posterior(xx, S)  # noqa: E731
    src = scores.exact_score(m, "score")
    kw = dict(score=src, noise_level=S, metrics=("cosine", "ssim"), normalization="standardize")
    full = ga.grad_align(apply_fn, params, x, y, **kw)
    host = ga.grad_align(apply_fn, params, np.asarray(x), np.asarray(y), chunk_size=5, **kw)  # 5+5+2
    jitted = jax.jit(lambda p, xx, yy: ga.grad_align(apply_fn, p, xx, yy, chunk_size=5, **kw))(params, x, y)
    for r in (host, jitted):
        for k in ("cosine", "ssim"):
            np.testing.assert_allclose(r.per_example[k], full.per_example[k], atol=1e-5)
        np.testing.assert_allclose(r.grad_norm, full.grad_norm, rtol=1e-5)
    assert isinstance(jitted, ga.AlignmentResult) and jitted.normalization == "standardize"


def test_targets_and_zero_gradients(fixture_data):
    m, x, y = fixture_data
    maps = scores.compute_scores(scores.exact_score(m, "score"), x, noise_level=S)
    # the logit_sum target needs no labels; a constant model has zero gradients -> cosine 0, no NaN
    const = lambda p, xx: jnp.zeros((xx.shape[0], 4)) + p  # noqa: E731
    r = ga.grad_align(const, jnp.float32(1.0), x, None, score=maps, target="logit_sum",
                      metrics=("cosine", "ssim"))
    np.testing.assert_array_equal(r.per_example["cosine"], 0.0)
    np.testing.assert_array_equal(r.grad_norm, 0.0)
    assert np.all(np.isfinite(r.per_example["ssim"]))
    # the log-posterior's logit_sum gradient is identically zero (softmax shift invariance);
    # its logit gradient is not
    lp = lambda p, xx: m.log_posterior(xx, S)  # noqa: E731
    r_logit = ga.grad_align(lp, None, x, y, score=maps, target="logit")
    assert np.all(r_logit.grad_norm > 0)


def test_lpips_through_grad_align_records_upsampling(fixture_data, alexnet):
    m, x, y = fixture_data
    apply_fn = lambda p, xx: m.log_posterior(xx, S)  # noqa: E731
    src = scores.exact_score(m, "bayes_gradient")
    with pytest.raises(ValueError, match="too small"):
        ga.grad_align(apply_fn, None, x[:4], y[:4], score=src, noise_level=S, metrics=("lpips",),
                      lpips_net=alexnet)
    r = ga.grad_align(apply_fn, None, x[:4], y[:4], score=src, noise_level=S,
                      metrics=("lpips", "cosine"), lpips_net=alexnet, lpips_upsample=True)
    np.testing.assert_allclose(r.per_example["lpips"], 1.0, atol=1e-4)
    assert any("upsampled" in n for n in r.notes)


def test_score_cache_computes_once(fixture_data, tmp_path):
    m, x, y = fixture_data
    src = scores.exact_score(m, "class_score")
    cache = scores.ScoreCache(directory=str(tmp_path))
    a = scores.compute_scores(src, x, y, noise_level=S, cache=cache)
    b = scores.compute_scores(src, x, y, noise_level=S, cache=cache)
    assert (cache.misses, cache.hits) == (1, 1)
    np.testing.assert_array_equal(a, b)
    scores.compute_scores(src, x, y, noise_level=0.5, cache=cache)  # another noise level
    assert cache.misses == 2 and len(list(tmp_path.glob("*.npz"))) == 2
    assert not list(tmp_path.glob(".tmp-*"))
    # a fresh cache (another process) reads the disk copy
    fresh = scores.ScoreCache(directory=str(tmp_path))
    c = scores.compute_scores(src, x, y, noise_level=S, cache=fresh)
    assert fresh.hits == 1 and fresh.misses == 0
    np.testing.assert_array_equal(a, c)
    # grad_align with a cache reuses the maps for every model
    apply_fn = lambda p, xx: p * m.log_posterior(xx, S)  # noqa: E731
    for w in (1.0, 3.0):
        ga.grad_align(apply_fn, jnp.float32(w), x, y, score=src, noise_level=S, cache=fresh)
    assert fresh.misses == 0 and fresh.hits == 3


def test_clear_errors(fixture_data):
    m, x, y = fixture_data
    apply_fn = lambda p, xx: m.log_posterior(xx, S)  # noqa: E731
    maps = jnp.zeros_like(x)
    with pytest.raises(ValueError, match="shape of x"):
        ga.grad_align(apply_fn, None, x, y, score=maps[:, :8])
    with pytest.raises(ValueError, match="same shape"):
        ga.cosine_similarity(maps, maps[:2])
    with pytest.raises(ValueError, match="noise_level is required"):
        ga.grad_align(apply_fn, None, x, y, score=scores.exact_score(m))
    with pytest.raises(ValueError, match="labels are required"):
        ga.grad_align(apply_fn, None, x, None, score=maps, target="logprob")
    with pytest.raises(ValueError, match="metric"):
        ga.grad_align(apply_fn, None, x, y, score=maps, metrics=("psnr",))
    with pytest.raises(ValueError, match="target"):
        ga.grad_align(apply_fn, None, x, y, score=maps, target="prob")
    with pytest.raises(ValueError, match="score must be"):
        ga.grad_align(apply_fn, None, x, y, score="exact")
    with pytest.raises(ValueError, match="chunk_size"):
        ga.grad_align(apply_fn, None, x, y, score=maps, chunk_size=0)
    with pytest.raises(ValueError, match="labels are required"):
        ga.grad_align(apply_fn, None, x, None, score=scores.exact_score(m, "bayes_gradient"),
                      noise_level=S, target="logit_sum")


# --------------------------------------------------------------------------- the project's known manifolds


def _linear_manifold(**kw):
    manifolds = pytest.importorskip("pagjax.manifolds")
    if hasattr(manifolds, "build_manifold"):
        return manifolds.build_manifold("linear", **kw)
    if hasattr(manifolds, "make_linear_manifold"):
        return manifolds.make_linear_manifold(**kw)
    pytest.skip("pagjax.manifolds has no linear manifold builder yet")


def _bayes_apply(params, x):
    """A model whose logits are the Bayes-optimal log-posterior; params = (manifold, s)."""
    manifold, s = params
    return manifold.log_posterior(x, s)


@pytest.mark.parametrize("normal_offset", [0.0, 0.1])
def test_model_equal_to_bayes_log_posterior_aligns_at_cosine_one(normal_offset):
    m = _linear_manifold(normal_offset=normal_offset, normal_noise=0.02 if normal_offset else 0.0)
    data = m.sample(jax.random.key(1), 16)
    x = data.x + 0.1 * jax.random.normal(jax.random.key(2), data.x.shape)
    src = scores.exact_score(m, "bayes_gradient")
    for s in (0.1, 0.5):
        params = (m, jnp.float32(s))
        r = ga.grad_align(_bayes_apply, params, x, data.y, score=src, noise_level=s,
                          target="logprob", metrics=("cosine",))
        # In float32 both sides lose their digits where the posterior saturates
        # (1 - p(y|x) < 1e-5: the gradient is a difference of nearly equal terms), so the
        # exact identity is checked where p(y|x) is not saturated.
        p_y = np.exp(np.asarray(_bayes_apply(params, x)))[np.arange(16), np.asarray(data.y)]
        ok = p_y < 1 - 1e-5
        assert ok.sum() >= 8
        np.testing.assert_allclose(np.asarray(r.per_example["cosine"])[ok], 1.0, atol=1e-4)
        assert np.all(np.isfinite(r.per_example["cosine"]))
