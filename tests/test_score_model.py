"""Tests of pagjax.score_model: EDM preconditioning, Tweedie, the Wiener filter, resume
through the engine, the ScoreSource adapter, and scores learned on a known manifold.

Stated target on `linear_default` (trained here, a width-128 depth-2 MLP backbone, a few
seconds on a shared CPU): cosine >= 0.95 with the exact unconditional and class-conditional
scores at s = 0.3 and 0.5, and >= 0.5 with the exact Bayes gradient at s = 0.3 (measured
with 1000 steps on 4096 samples: 0.999 / 0.999 and 0.72, see benchmarks/bench_score_model.py;
here, over two data/initialisation seeds: 0.996 / 0.997 and 0.63-0.79).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagjax import io as io_lib
from pagjax import models
from pagjax import score_model as sm
from pagjax import scores as scores_lib

TINY = sm.ScoreModelConfig(arch="mlp", mlp_width=32, mlp_depth=1, steps=20, batch_size=16, warmup_steps=5)


# --------------------------------------------------------------------------- EDM preconditioning


def test_preconditioning_gives_unit_variance_targets():
    # Karras et al. 2022, Table 1 / App. B.6: with x = x0 + sigma n (Var x0 = sigma_d^2), the
    # network's target (x0 - c_skip x) / c_out has unit variance, its input c_in x too, and
    # the loss weight is exactly 1 / c_out^2.
    sd = 0.3
    sigma = jnp.asarray([0.01, 0.1, 0.5, 1.0, 10.0])
    c_skip, c_out, c_in, c_noise = sm.precondition(sigma, sd)
    target_var = ((1 - c_skip) ** 2 * sd**2 + c_skip**2 * sigma**2) / c_out**2
    np.testing.assert_allclose(target_var, 1.0, rtol=1e-5)
    np.testing.assert_allclose(c_in**2 * (sd**2 + sigma**2), 1.0, rtol=1e-5)
    np.testing.assert_allclose(sm.loss_weight(sigma, sd) * c_out**2, 1.0, rtol=1e-5)
    np.testing.assert_allclose(c_noise, np.log(np.asarray(sigma)) / 4, rtol=1e-6)


def test_unet_shapes_and_identity_at_init():
    # zero-initialised output conv: at initialisation D(x) = mu + c_skip (x - mu)
    for shape in ((28, 28, 1), (16, 16, 1), (8, 8, 3)):
        cfg = sm.ScoreModelConfig(channels=(8, 16), emb_dim=16, num_classes=3)
        net = sm.make_network(cfg, shape)
        x = jax.random.normal(jax.random.key(0), (2, *shape))
        params = models.init_variables(net, jax.random.key(1), x, jnp.zeros((2,)), jnp.asarray([0, 3]))["params"]
        mean = jnp.full(shape, 0.2)
        model = sm.ScoreModel(params=params, mean=mean, sigma_data=0.5, config=cfg, image_shape=shape)
        d = sm.denoise(model, x, 0.5, jnp.asarray([1, 2]))
        assert d.shape == x.shape
        c_skip = 0.25 / (0.25 + 0.25)
        np.testing.assert_allclose(d, mean + c_skip * (x - mean), atol=1e-6)


def test_config_validation():
    with pytest.raises(ValueError):
        sm.ScoreModelConfig(arch="transformer").validate()
    with pytest.raises(ValueError):
        sm.ScoreModelConfig(label_dropout=1.0).validate()
    with pytest.raises(ValueError):
        sm.ScoreModelConfig(channels=()).validate()
    with pytest.raises(ValueError, match="y is required"):
        sm.train_score_model(jnp.zeros((8, 4, 4, 1)), None, dataclasses.replace(TINY, num_classes=2),
                             jax.random.key(0), progress=None)


# --------------------------------------------------------------------------- Wiener filter


def test_wiener_filter_matches_closed_form_and_gaussian_optimum():
    rng = np.random.default_rng(0)
    d, n = 6, 200_000
    a = rng.normal(size=(d, d)) * np.linspace(1.0, 0.05, d)
    cov = a @ a.T
    mu = rng.normal(size=d)
    x0 = rng.multivariate_normal(mu, cov, size=n).astype(np.float32).reshape(n, d, 1, 1)
    w = sm.fit_wiener(x0)
    sigma = 0.5
    xn = x0[:2000] + sigma * rng.normal(size=x0[:2000].shape).astype(np.float32)
    # closed form of the fitted filter: mu + S (S + sigma^2 I)^-1 (x - mu), S the sample covariance
    flat = x0.reshape(n, d).astype(np.float64)
    s_hat = np.cov(flat.T, bias=True)
    ref = flat.mean(0) + (xn.reshape(-1, d) - flat.mean(0)) @ np.linalg.solve(s_hat + sigma**2 * np.eye(d), s_hat).T
    np.testing.assert_allclose(np.asarray(sm.wiener_denoise(w, jnp.asarray(xn), sigma)).reshape(-1, d), ref,
                               atol=2e-4)
    # for Gaussian data it is the posterior mean: MC MSE equals mean(lam s^2 / (lam + s^2))
    xm = x0[:50_000]
    noisy = xm + sigma * rng.normal(size=xm.shape).astype(np.float32)
    mc = float(jnp.mean(jnp.square(sm.wiener_denoise(w, jnp.asarray(noisy), sigma) - xm)))
    assert mc == pytest.approx(float(sm.wiener_mse(w, sigma)), rel=0.02)
    # and no other gain does better: shrinking more or less raises the MSE
    for f in (0.8, 1.25):
        w2 = w.replace(variances=w.variances * f)
        worse = float(jnp.mean(jnp.square(sm.wiener_denoise(w2, jnp.asarray(noisy), sigma) - xm)))
        assert worse > mc


def test_wiener_filter_from_fewer_images_than_pixels_is_the_same_filter():
    """n < d takes the thin SVD of the images: the same closed form, the same expected MSE."""
    rng = np.random.default_rng(1)
    n, d, sigma = 12, 40, 0.3
    x0 = rng.normal(size=(n, d, 1, 1)).astype(np.float32)
    w = sm.fit_wiener(x0)
    assert w.basis.shape == (d, n) and w.variances.shape == (n,)
    flat = x0.reshape(n, d).astype(np.float64)
    s_hat = np.cov(flat.T, bias=True)
    xn = rng.normal(size=(5, d)).astype(np.float32)
    ref = flat.mean(0) + (xn - flat.mean(0)) @ np.linalg.solve(s_hat + sigma**2 * np.eye(d), s_hat).T
    np.testing.assert_allclose(np.asarray(sm.wiener_denoise(w, jnp.asarray(xn.reshape(5, d, 1, 1)), sigma)).reshape(5, d),
                               ref, atol=1e-5)
    lam = np.clip(np.linalg.eigvalsh(s_hat), 0.0, None)
    assert float(sm.wiener_mse(w, sigma)) == pytest.approx(np.mean(lam * sigma**2 / (lam + sigma**2)), rel=1e-5)


# --------------------------------------------------------------------------- training, Tweedie, adapter


def _toy_data(n=64):
    x = jax.random.uniform(jax.random.key(3), (n, 4, 4, 1))
    y = jnp.arange(n) % 3
    return x, y


def test_resume_through_engine_matches_uninterrupted_run(tmp_path):
    import shutil

    x, y = _toy_data()
    cfg = dataclasses.replace(TINY, num_classes=3, steps=20)
    full, _ = sm.train_score_model(x, y, cfg, jax.random.key(0), progress=None, steps_per_call=5)
    ck = io_lib.Checkpointer(str(tmp_path / "ck"), max_to_keep=2)
    try:
        sm.train_score_model(x, y, cfg, jax.random.key(0), checkpointer=ck, checkpoint_every=10, progress=None,
                             steps_per_call=5)
    finally:
        ck.close()
    # simulate a kill after step 10: drop the final checkpoint, then call again
    shutil.rmtree(tmp_path / "ck" / "20")
    ck = io_lib.Checkpointer(str(tmp_path / "ck"), max_to_keep=2)
    try:
        resumed, r2 = sm.train_score_model(x, y, cfg, jax.random.key(0), checkpointer=ck, checkpoint_every=10,
                                           progress=None, steps_per_call=5)
    finally:
        ck.close()
    assert r2.start_step == 10
    assert not np.any(r2.nonfinite)
    # batches, noise and label dropout are pure in (key, step): the resumed run is the same run
    jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, atol=1e-6), resumed.params, full.params)


def test_tweedie_bayes_and_score_source():
    x, y = _toy_data()
    model, res = sm.train_score_model(x, y, dataclasses.replace(TINY, num_classes=3), jax.random.key(0),
                                      progress=None)
    assert np.isfinite(res.history["loss"]).all()
    xn = x[:8] + 0.3 * jax.random.normal(jax.random.key(1), x[:8].shape)
    s = 0.3
    np.testing.assert_allclose(sm.score(model, xn, s), (sm.denoise(model, xn, s) - xn) / s**2, rtol=1e-5, atol=1e-5)
    # "no label" is the unconditional score; the Bayes gradient is their difference
    np.testing.assert_allclose(sm.score(model, xn, s), sm.score(model, xn, s, jnp.full((8,), 3)), atol=1e-5)
    np.testing.assert_allclose(sm.bayes_gradient(model, xn, s, y[:8]),
                               sm.score(model, xn, s, y[:8]) - sm.score(model, xn, s), atol=1e-3)
    for kind, ref in (("score", sm.score(model, xn, s)), ("class_score", sm.score(model, xn, s, y[:8])),
                      ("bayes_gradient", sm.bayes_gradient(model, xn, s, y[:8]))):
        src = sm.score_source(model, kind)
        assert src.needs_labels == (kind != "score")
        got = scores_lib.compute_scores(src, xn, y[:8], noise_level=s, chunk_size=3)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    # training changed the denoiser away from its identity-at-init form
    assert float(jnp.max(jnp.abs(sm.denoise(model, xn, s) - (model.mean + (xn - model.mean) * 0.0)))) > 0
    rows = sm.denoising_report(model, x, y, jax.random.key(2), wiener=sm.fit_wiener(x), sigmas=(0.5,))
    assert rows[0]["mse_noisy"] == pytest.approx(0.25, rel=0.2)
    assert rows[0]["mse_wiener"] < rows[0]["mse_noisy"]
    assert "mse_model_class" in rows[0]


# --------------------------------------------------------------------------- known manifold


@pytest.mark.slow
def test_learned_scores_match_exact_on_linear_manifold():
    from pagjax.manifolds import build_manifold, make_dataset

    m = build_manifold("linear_default")
    d = make_dataset(m, jax.random.key(0), 2048, 256)
    cfg = sm.ScoreModelConfig(arch="mlp", num_classes=int(m.num_classes), steps=250, batch_size=256, mlp_width=128,
                              mlp_depth=2)
    model, _ = sm.train_score_model(d.x_train, d.y_train, cfg, jax.random.key(1), progress=None)
    for i, s in enumerate((0.3, 0.5)):
        x = d.x_test + s * jax.random.normal(jax.random.key(10 + i), d.x_test.shape)
        cu = float(jnp.mean(sm.cosine(sm.score(model, x, s), m.score(x, s))))
        cc = float(jnp.mean(sm.cosine(sm.score(model, x, s, d.y_test), m.class_score(x, d.y_test, s))))
        assert cu >= 0.95 and cc >= 0.95, (s, cu, cc)
        if s == 0.3:
            cb = float(jnp.mean(sm.cosine(sm.bayes_gradient(model, x, s, d.y_test), m.bayes_gradient(x, d.y_test, s))))
            assert cb >= 0.5, cb


def test_save_load_cache_and_reference_maps(tmp_path):
    x, y = _toy_data()
    cfg = dataclasses.replace(TINY, num_classes=3)
    logs = []
    m1 = sm.cached_score_model(str(tmp_path / "sm"), x, y, cfg, jax.random.key(0), {"data": "toy"}, log=logs.append)
    m2 = sm.cached_score_model(str(tmp_path / "sm"), x, y, cfg, jax.random.key(0), {"data": "toy"}, log=logs.append)
    assert logs[0].startswith("score model: training ")  # said before the compilation
    done = [line for line in logs if not line.startswith("score model: training ")]
    assert done[0].startswith("score model: trained") and done[1] == "score model: loaded from cache"
    jax.tree.map(lambda p, q: np.testing.assert_array_equal(p, q), m1.params, m2.params)
    assert m2.config == cfg and m2.sigma_data == m1.sigma_data
    # other settings (here: other data) retrain from scratch, not from the old run's checkpoint
    m3 = sm.cached_score_model(str(tmp_path / "sm"), 0.5 * x, y, cfg, jax.random.key(0), {"data": "other"},
                               log=logs.append)
    done = [line for line in logs if not line.startswith("score model: training ")]
    assert done[2].startswith("score model: trained") and m3.config == cfg
    assert not np.allclose(jax.tree.leaves(m3.params)[0], jax.tree.leaves(m1.params)[0])
    refs = sm.reference_maps(m2, x[:5], y[:5], align_noise=0.3)
    np.testing.assert_allclose(refs["paper_score_maps"], sm.score(m1, x[:5], 0.5), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(refs["learned_bayes_maps"], sm.bayes_gradient(m1, x[:5], 0.3, y[:5]), rtol=1e-4,
                               atol=1e-4)


class _Killed(Exception):
    pass


def test_a_killed_cached_training_resumes_from_its_settings_folder_and_other_settings_start_afresh(
        tmp_path, monkeypatch):
    from pagjax import cache as cache_lib

    x, y = _toy_data()
    cfg = dataclasses.replace(TINY, num_classes=3)
    directory = str(tmp_path / "sm")
    full_settings = cache_lib.canonical_settings({"data": "toy", "config": dataclasses.asdict(cfg)})
    folder = cache_lib.training_folder(directory, "score model", full_settings)
    assert folder == os.path.join(directory, "training", "score_model-" + cache_lib.settings_digest(full_settings))
    # the old layout's checkpoint folder and settings file: never read, whatever they say
    old = io_lib.Checkpointer(os.path.join(directory, "ckpt"))
    old.save(15, {"junk": jnp.zeros(3)})
    old.close()
    io_lib.write_json(os.path.join(directory, "ckpt_settings.json"), full_settings)
    restored = []
    restore = io_lib.Checkpointer.restore_latest

    def recording(self, like):
        out = restore(self, like)
        restored.append((self.directory, None if out is None else out[0]))
        return out

    monkeypatch.setattr(io_lib.Checkpointer, "restore_latest", recording)

    def kill_at_10(p):
        if p.step >= 10:  # right after the checkpoint of step 10
            raise _Killed

    def run(data_name, data, progress=None, logs=None):
        return sm.cached_score_model(directory, data, y, cfg, jax.random.key(0), {"data": data_name},
                                     log=(logs if logs is not None else []).append, checkpoint_every=10,
                                     progress=progress)

    with pytest.raises(_Killed):
        run("toy", x, kill_at_10)
    assert restored == [(folder, None)]
    assert os.listdir(os.path.join(directory, "training")) == [os.path.basename(folder)]
    with contextlib.closing(io_lib.Checkpointer(folder)) as ck:
        assert ck.latest_step() == 10

    # other settings: another folder, from step 0; the killed run's folder is left as it was
    run("other", 0.5 * x)
    assert len(restored) == 2 and restored[1][0] != folder and restored[1][1] is None
    assert not os.path.exists(restored[1][0])  # removed once its training finished
    with contextlib.closing(io_lib.Checkpointer(folder)) as ck:
        assert ck.latest_step() == 10

    # the same settings again: resumed from step 10, the same model as an uninterrupted run
    logs = []
    resumed = run("toy", x, logs=logs)
    assert restored[2] == (folder, 10)
    assert "score model: resuming from the checkpoint at step 10 of 20" in logs
    assert not os.path.exists(folder) and os.listdir(os.path.join(directory, "training")) == []
    assert all(d != os.path.join(directory, "ckpt") for d, _ in restored)
    full, _ = sm.train_score_model(x, y, cfg, jax.random.key(0), progress=None)
    jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, atol=1e-6), resumed.params, full.params)


@pytest.mark.slow
def test_noise_classifier_gives_a_direct_bayes_gradient_on_linear_manifold():
    # measured (width 256, depth 3): 0.88 after 500 steps, 0.93 after 1500 (8192 samples); the
    # score difference: 0.71. Here (width 128, depth 2, 300 steps): 0.78-0.79 over two seeds.
    from pagjax.manifolds import build_manifold, make_dataset

    m = build_manifold("linear_default")
    d = make_dataset(m, jax.random.key(0), 4096, 256)
    clf = sm.train_noise_classifier(d.x_train, d.y_train, int(m.num_classes),
                                    sm.ScoreModelConfig(steps=300, batch_size=256), jax.random.key(1), width=128,
                                    depth=2)
    s = 0.3
    x = d.x_test + s * jax.random.normal(jax.random.key(5), d.x_test.shape)
    cb = float(jnp.mean(sm.cosine(sm.classifier_bayes_gradient(clf, x, s, d.y_test), m.bayes_gradient(x, d.y_test, s))))
    assert cb >= 0.7, cb
