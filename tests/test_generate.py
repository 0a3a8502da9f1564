"""Generation, denoising and in-painting with input-gradients (pagjax.generate)."""
import csv
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagjax import devices, generate as G
from pagjax.geometry import project_normal
from pagjax.manifolds import build_manifold, make_dataset
from pagjax.numerics import per_example_norm

SHAPE = (4, 4, 1)
K = 3


def mlp_apply(params, x):
    """A fixed smooth 2-layer tanh network (pure, per example)."""
    h = jnp.tanh(x.reshape((x.shape[0], -1)) @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def mlp_params(seed=0, d=16, width=32, k=K):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {"w1": jax.random.normal(k1, (d, width)) / np.sqrt(d), "b1": 0.1 * jax.random.normal(k3, (width,)),
            "w2": 2.0 * jax.random.normal(k2, (width, k)) / np.sqrt(width), "b2": jnp.zeros((k,))}


def batch(seed=0, b=8):
    x = jax.random.uniform(jax.random.key(100 + seed), (b, *SHAPE), jnp.float32, 0.2, 0.8)
    y = (jnp.arange(b) % K).astype(jnp.int32)
    return x, y


@pytest.fixture(scope="module")
def linear_exact():
    return build_manifold("linear_exact", key=0)


# --------------------------------------------------------------------------- generation

def test_generation_increases_target_logprob_at_every_step():
    params = mlp_params()
    x, y = batch()
    gen = G.make_generator(mlp_apply, num_steps=12, step_size=0.3, box=None)
    res = gen(params, x, y, jax.random.key(0), init_noise=0.05)
    trace = np.asarray(res.logprob)
    assert trace.shape == (13, 8)
    assert np.all(np.diff(trace, axis=0) > 0), np.diff(trace, axis=0).min()
    assert bool(np.all(res.accepted))
    # the trace is the true value at the final image, and the target became the prediction
    np.testing.assert_allclose(trace[-1], G.target_logprob(mlp_apply, params, res.x, y), rtol=1e-5, atol=1e-6)
    assert np.mean(np.asarray(jnp.argmax(mlp_apply(params, res.x), -1)) == np.asarray(y)) == 1.0


def test_accept_rule_is_what_makes_it_monotone():
    """The same large steps without the accept-if-better rule do go downhill somewhere."""
    params = mlp_params()
    x, y = batch()
    plain = G.make_generator(mlp_apply, num_steps=12, step_size=6.0, box=None, max_backtracks=None)
    guarded = G.make_generator(mlp_apply, num_steps=12, step_size=6.0, box=None, max_backtracks=8)
    d_plain = np.diff(np.asarray(plain(params, x, y, jax.random.key(0)).logprob), axis=0)
    d_guard = np.diff(np.asarray(guarded(params, x, y, jax.random.key(0)).logprob), axis=0)
    assert d_plain.min() < 0
    assert d_guard.min() >= 0


def test_generation_respects_ball_and_box():
    params = mlp_params()
    x, y = batch()
    res = G.make_generator(mlp_apply, num_steps=20, step_size=0.5, radius=0.7, box=(0.0, 1.0),
                           schedule="cosine")(params, x, y, jax.random.key(1), init_noise=0.3)
    assert float(jnp.max(per_example_norm(res.x - res.start))) <= 0.7 + 1e-5
    assert float(res.x.min()) >= 0.0 and float(res.x.max()) <= 1.0
    assert float(res.start.min()) >= 0.0  # the noisy start was clipped into the box too


def test_zero_gradient_gives_no_nan():
    const = lambda p, x: jnp.zeros((x.shape[0], K))  # noqa: E731
    x, y = batch()
    res = G.make_generator(const, num_steps=3, step_size=0.1, box=None)(None, x, y, jax.random.key(0))
    assert np.all(np.isfinite(np.asarray(res.x)))
    np.testing.assert_array_equal(np.asarray(res.x), np.asarray(x))
    assert not np.any(np.asarray(res.accepted))


# --------------------------------------------------------------------------- in-painting

def test_inpainting_never_changes_unmasked_pixels():
    params = mlp_params()
    x, y = batch(b=8)
    rng = np.random.default_rng(0)
    mask = jnp.asarray(rng.uniform(size=(8, *SHAPE)) < 0.4)
    mask = mask.at[:, 0, 0, 0].set(True).at[:, 0, 1, 0].set(False)  # every example has both kinds
    for steps in (1, 9):
        res = G.make_inpainter(mlp_apply, num_steps=steps, step_size=0.4, box=(0.0, 1.0))(
            params, x, mask, jax.random.key(2), init_noise=0.2)
        out, obs = np.asarray(res.x), np.asarray(x)
        m = np.asarray(mask)
        np.testing.assert_array_equal(out[~m], obs[~m])
        np.testing.assert_array_equal(np.asarray(res.start)[~m], obs[~m])
        assert np.abs(out[m] - obs[m]).max() > 1e-3
        assert np.all(np.diff(np.asarray(res.logprob), axis=0) >= 0)


def test_inpainting_broadcast_mask_and_default_fill():
    params = mlp_params()
    x, y = batch(b=4)
    mask = jnp.zeros((1, *SHAPE), bool).at[:, :, 2:].set(True)  # right half, shared by all
    res = G.make_inpainter(mlp_apply, num_steps=0 + 1, step_size=1e-9)(params, x, mask, jax.random.key(0), labels=y)
    fill = np.asarray(x)[:, :, :2].mean(axis=(1, 2, 3))
    np.testing.assert_allclose(np.asarray(res.start)[:, :, 2:], np.broadcast_to(fill[:, None, None, None], (4, 4, 2, 1)),
                               rtol=1e-6)


# --------------------------------------------------------------------------- the theory's exact case

def test_bayes_model_moves_within_the_linear_manifold(linear_exact):
    m = linear_exact
    bayes = lambda p, x: m.log_posterior(x, 0.3)  # noqa: E731  the exact Bayes posterior, normal part 0
    seeds = G.seed_images(jax.random.key(0), (8, *m.image_shape), std=0.05, low_res=4)
    targets = (jnp.arange(8) % m.num_classes).astype(jnp.int32)
    res = G.make_generator(bayes, num_steps=10, step_size=0.2, box=None)(None, seeds, targets, jax.random.key(1))
    move = res.x - res.start
    norms = per_example_norm(move)
    assert float(norms.min()) > 0.1
    assert float(jnp.max(per_example_norm(project_normal(move, m.basis)) / norms)) < 1e-4
    meas = G.measure_generation(res, targets, manifold=m, bayes_noise=0.3, model_logits=bayes(None, res.x))
    assert meas["move_normal_fraction"] < 1e-4 and meas["bayes_target_acc"] == 1.0
    assert abs(meas["normal_ratio"] - 1.0) < 1e-4
    # denoising with the same model: its moves are tangent too
    noisy = m.sample(jax.random.key(3), 8).x + 0.3 * jax.random.normal(jax.random.key(4), (8, *m.image_shape))
    den = G.make_denoiser(bayes, num_steps=3, box=None)(None, noisy, 0.3, jax.random.key(0))
    dmove = den.x - noisy
    assert float(jnp.mean(per_example_norm(dmove))) > 1e-3
    assert float(jnp.max(per_example_norm(project_normal(dmove, m.basis)))) < 1e-5  # float32 rounding only


def test_one_denoising_step_is_the_tweedie_class_step(linear_exact):
    """For the Bayes classifier at s, one step adds s^2 grad log p_s(y|x) = E[x0|x,y] - E[x0|x]."""
    m = linear_exact
    s = 0.3
    bayes = lambda p, x: m.log_posterior(x, s)  # noqa: E731
    x = m.sample(jax.random.key(5), 6).x + s * jax.random.normal(jax.random.key(6), (6, *m.image_shape))
    y = jnp.asarray([0, 1, 2, 3, 0, 1], jnp.int32)
    res = G.make_denoiser(bayes, num_steps=1, radius_factor=None, box=None)(None, x, s, None, labels=y)
    expected = x + s**2 * m.bayes_gradient(x, y, s)
    np.testing.assert_allclose(np.asarray(res.x), np.asarray(expected), atol=2e-5)
    # labels default to the prediction
    pred = G.make_denoiser(bayes, num_steps=1, radius_factor=None, box=None)(None, x, s, None)
    np.testing.assert_array_equal(np.asarray(pred.labels), np.asarray(m.predict(x, s)))


def test_measures_on_known_manifold(linear_exact):
    m = linear_exact
    d = make_dataset(m, jax.random.key(0), 8, 16)
    mask = jnp.zeros((1, *m.image_shape), bool).at[:, :, 8:].set(True)
    res = G.make_inpainter(lambda p, x: m.log_posterior(x, 0.3), num_steps=2, step_size=0.05, box=None)(
        None, jnp.where(mask, 0.0, d.x_test), mask, jax.random.key(0), labels=d.y_test)
    meas = G.measure_inpainting(res, d.x_test, mask, manifold=m)
    assert meas["mse_subspace"] < 1e-8 < meas["mse_fill"]  # data exactly on the subspace: the oracle is exact
    noisy = d.x_test + 0.3 * jax.random.normal(jax.random.key(1), d.x_test.shape)
    den = G.make_denoiser(lambda p, x: m.log_posterior(x, 0.3), num_steps=2, box=None)(None, noisy, 0.3, None)
    dm = G.measure_denoising(den, d.x_test, noisy, 0.3, manifold=m)
    assert dm["mse_tweedie"] < 0.2 * dm["mse_noisy"]
    assert dm["tangent_err_tweedie"] < dm["tangent_err_noisy"]


# --------------------------------------------------------------------------- devices

def test_sharded_batch_equals_unsharded():
    mesh = devices.make_mesh()
    n_dev = mesh.shape["batch"]
    assert n_dev > 1, "tests/conftest.py fakes several CPU devices"
    params = mlp_params()
    x, y = batch(b=2 * n_dev)
    mask = jnp.zeros((2 * n_dev, *SHAPE), bool).at[:, 1:3, 1:3].set(True)
    gen = G.make_generator(mlp_apply, num_steps=5, step_size=0.3, radius=1.0)
    inp = G.make_inpainter(mlp_apply, num_steps=5, step_size=0.3)
    ref = (gen(params, x, y, jax.random.key(0), 0.1), inp(params, x, mask, jax.random.key(1), init_noise=0.1))
    xs, ys, ms = devices.shard_leading(mesh, (x, y, mask))
    params_r = devices.replicate(mesh, params)
    out = (gen(params_r, xs, ys, jax.random.key(0), 0.1), inp(params_r, xs, ms, jax.random.key(1), init_noise=0.1))
    assert len(out[0].x.sharding.device_set) == n_dev
    for a, b in zip(ref, out):
        np.testing.assert_allclose(np.asarray(a.x), np.asarray(b.x), atol=1e-5)
        np.testing.assert_allclose(np.asarray(a.logprob), np.asarray(b.logprob), atol=1e-4)


# --------------------------------------------------------------------------- argument checks

@pytest.mark.parametrize("kwargs, match", [
    (dict(num_steps=0), "num_steps"), (dict(num_steps=2.5), "num_steps"), (dict(num_steps=True), "num_steps"),
    (dict(step_size=0.0), "step_size"), (dict(step_size=float("nan")), "step_size"),
    (dict(radius=-1.0), "radius"), (dict(box=(1.0, 0.0)), "box"), (dict(box=(0.0,)), "box"),
    (dict(schedule="exp"), "schedule"), (dict(max_backtracks=-1), "max_backtracks"),
])
def test_bad_factory_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        G.make_generator(mlp_apply, **kwargs)


def test_bad_call_arguments():
    params = mlp_params()
    x, y = batch(b=4)
    gen = G.make_generator(mlp_apply, num_steps=2, step_size=0.1)
    with pytest.raises(ValueError, match="targets"):
        gen(params, x, y[:3], jax.random.key(0))
    with pytest.raises(ValueError, match="targets"):
        gen(params, x, y.astype(jnp.float32), jax.random.key(0))
    with pytest.raises(ValueError, match="seeds"):
        gen(params, x[None], y, jax.random.key(0))
    with pytest.raises(ValueError, match="seeds"):
        gen(params, (x * 255).astype(jnp.uint8), y, jax.random.key(0))
    with pytest.raises(ValueError, match="init_noise"):
        gen(params, x, y, jax.random.key(0), init_noise=-0.1)
    den = G.make_denoiser(mlp_apply, num_steps=2)
    with pytest.raises(ValueError, match="noise_level"):
        den(params, x, 0.0, None)
    with pytest.raises(ValueError, match="num_steps"):
        G.make_denoiser(mlp_apply, num_steps=-3)
    inp = G.make_inpainter(mlp_apply, num_steps=2)
    good = jnp.zeros((1, *SHAPE), bool).at[:, 0].set(True)
    for bad, match in [(good[0], "rank"), (jnp.zeros((1, 3, 4, 1), bool), "broadcast"),
                       (good.astype(jnp.float32) * 0.5 + 0.25, "0/1"),
                       (jnp.zeros((1, *SHAPE), bool), "no pixel"), (jnp.ones((1, *SHAPE), bool), "every pixel"),
                       (jnp.zeros((4, *SHAPE), bool).at[:3, 0].set(True), "no pixel")]:
        with pytest.raises(ValueError, match=match):
            inp(params, x, bad, jax.random.key(0))
    with pytest.raises(ValueError, match="shape"):
        G.seed_images(jax.random.key(0), (4, 4, 1))


def test_seed_images_low_frequency_and_class_means():
    means = jnp.stack([jnp.full(SHAPE, v) for v in (0.2, 0.8)])
    x = G.seed_images(jax.random.key(0), (2, 8, 8, 1), mean=0.5, std=0.1, low_res=2)
    assert x.shape == (2, 8, 8, 1)
    # bilinear upsampling of a 2x2 grid: neighbouring pixels are strongly correlated
    a, b = np.asarray(x[:, :, :-1]).ravel() - 0.5, np.asarray(x[:, :, 1:]).ravel() - 0.5
    assert np.corrcoef(a, b)[0, 1] > 0.9
    c = G.seed_images(jax.random.key(1), (2, *SHAPE), mean=means, std=0.0, box=(0.0, 1.0))
    np.testing.assert_allclose(np.asarray(c), np.asarray(means))


# --------------------------------------------------------------------------- the command

@pytest.mark.slow
def test_command_small_run(tmp_path):
    from experiments import generate as cmd

    out = str(tmp_path / "gen")
    rc = cmd.main(["--out", out, "--steps", "5", "--n-train", "256", "--num-examples", "8", "--grid", "4",
                   "--gen-steps", "2", "--denoise-steps", "1", "--inpaint-steps", "2", "--no-progress"])
    assert rc == 0
    for f in ("generation.png", "denoising.png", "inpainting.png", "generate_results.csv", "config.json"):
        assert os.path.getsize(os.path.join(out, f)) > 0
    with open(os.path.join(out, "generate_results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["regime"] for r in rows] == ["standard", "weak", "Bayes-aligned", "excessive", "reference"]
    bayes = rows[-1]
    assert float(bayes["gen_move_offdata_fraction"]) < 1e-3  # the exact Bayes gradient stays in the data's span
    assert float(bayes["gen_move_normal_fraction"]) > 0.05  # ... but uses the off-manifold class feature
    assert cmd.main(["--out", out, "--gen-steps", "0"]) == 2
