"""Tests of pagjax.static.Static, the one way the library passes callables to `jit` as
static arguments, and of what it gives the entry points that take callables:

* compile sharing: a second call with new parameters but the same function (hashable or
  not) does not trace again, nor does a new denoiser / score model of one configuration;
* purity: each entry point called inside the caller's `jit` (and `vmap` over models)
  gives the eager call's numbers.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagjax import alignment, distractor, geometry, robustness, score_model, scores
from pagjax.static import Static
from tests._gm_fixture import make_fixture

SHAPE = (4, 4, 1)
D = 16
N = 6
EPS = [0.1, 0.5]
S = 0.3


def add(a, b):
    return a + b


class CountingApply:
    """``apply_fn(params, x) = tanh(flat(x)) @ params`` that counts its traces (hashable by identity)."""

    def __init__(self):
        self.traces = 0

    def __call__(self, params, x):
        self.traces += 1
        return jnp.tanh(x.reshape(x.shape[0], -1)) @ params


class UnhashableCountingApply(CountingApply):
    __hash__ = None


@pytest.fixture(scope="module")
def data():
    kx, kb, kw, kd = jax.random.split(jax.random.key(0), 4)
    x = jax.random.uniform(kx, (N, *SHAPE))
    y = jnp.arange(N, dtype=jnp.int32) % 3
    basis, _ = jnp.linalg.qr(jax.random.normal(kb, (D, 3)))
    w1, w2 = jax.random.normal(kw, (2, D, 3))
    dirs = robustness.manifold_directions(kd, basis, N, 2)
    return dict(x=x, y=y, basis=basis, w1=w1, w2=w2, dirs=dirs, maps=jax.random.normal(kd, (N, *SHAPE)))


# --------------------------------------------------------------------------- Static itself


def test_static_is_equal_by_value_when_hashable_by_identity_otherwise():
    assert Static(add, 1) == Static(add, 1) and hash(Static(add, 1)) == hash(Static(add, 1))
    assert Static(add, 1) != Static(add, 2)
    assert Static(add, 1)(2) == 3  # bound arguments come first
    assert Static(add) != add
    bound = [1]  # unhashable: compared by identity
    assert Static(add, bound) == Static(add, bound) and Static(add, bound) != Static(add, [1])
    f = UnhashableCountingApply()
    assert Static(f) == Static(f) and Static(f) != Static(UnhashableCountingApply())
    assert hash(Static(f)) == hash(Static(f))
    assert {Static(f): 1}[Static(f)] == 1


# --------------------------------------------------------------------------- compile sharing


def _entry_points(d):
    """name -> call(apply_fn, params): every entry point that takes an apply_fn."""
    x, y = d["x"], d["y"]
    key = jax.random.key(3)
    slot = jnp.arange(N, dtype=jnp.int32) % 2
    return {
        "grad_align": lambda f, p: alignment.grad_align(f, p, x, y, score=d["maps"], chunk_size=4).per_example,
        "on_off_manifold_change": lambda f, p: robustness.on_off_manifold_change(f, p, x, d["basis"], EPS, key,
                                                                                 batch_size=16).on_l1,
        "on_off_change": lambda f, p: robustness.on_off_change(f, p, x, d["dirs"], EPS, batch_size=16).off_l1,
        "softmax_change": lambda f, p: robustness.softmax_change(f, p, x, d["dirs"].normal, EPS)[0],
        "noise_sensitivity": lambda f, p: distractor.noise_sensitivity(f, p, x, slot, [0.3], key)["signal"],
    }


@pytest.mark.parametrize("apply_cls", [CountingApply, UnhashableCountingApply])
def test_same_apply_fn_with_new_params_does_not_trace_again(data, apply_cls):
    for name, call in _entry_points(data).items():
        f = apply_cls()
        first = call(f, data["w1"])
        traces = f.traces
        assert traces > 0, name
        second = call(f, data["w2"])
        assert f.traces == traces, f"{name}: traced again for new params"
        # the new params were used, not baked into the compiled function
        assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second))), name


def test_same_generator_with_new_latents_does_not_trace_again():
    traces = []
    w = jax.random.normal(jax.random.key(1), (2, D))

    class Generator:
        __hash__ = None  # unhashable: reused by identity

        def __call__(self, z):
            traces.append(1)
            return jnp.sin(z @ w)

    gen = Generator()
    z1, z2 = jax.random.normal(jax.random.key(2), (2, 5, 2))
    b1 = geometry.tangent_basis_from_generator(gen, z1)
    count = len(traces)
    b2 = geometry.tangent_basis_from_generator(gen, z2)
    assert count > 0 and len(traces) == count
    assert not np.allclose(b1.basis, b2.basis)


def _denoiser(mean_value, width=12):
    den = scores.Denoiser(params=None, mean=jnp.full(SHAPE, mean_value), image_shape=SHAPE, width=width, depth=1)
    params = den.net().init(jax.random.key(0), jnp.zeros((1, *SHAPE)), jnp.zeros((1,)))["params"]
    return den.replace(params=params)


def test_new_denoiser_of_the_same_configuration_does_not_trace_again(data, monkeypatch):
    traces = []
    real = scores._denoise
    monkeypatch.setattr(scores, "_denoise", lambda *a: traces.append(1) or real(*a))
    src1, src2 = scores.learned_score(_denoiser(0.0)), scores.learned_score(_denoiser(0.5))
    assert src1.name != src2.name and src1.fn == src2.fn
    x = data["x"]
    m1 = scores.compute_scores(src1, x, noise_level=S, chunk_size=4)  # chunks of 4 and 2 (padded): one trace
    assert len(traces) == 1
    m2 = scores.compute_scores(src2, x, noise_level=S, chunk_size=4)
    assert len(traces) == 1
    assert not np.allclose(m1, m2)
    # the same through grad_align (the maps computed per chunk inside its jitted function)
    f = CountingApply()
    r1 = alignment.grad_align(f, data["w1"], x, data["y"], score=src1, noise_level=S)
    count = len(traces)
    r2 = alignment.grad_align(f, data["w1"], x, data["y"], score=src2, noise_level=S)
    assert len(traces) == count
    assert not np.allclose(r1.per_example["cosine"], r2.per_example["cosine"])


def _count_denoiser_traces(monkeypatch) -> list:
    """A list that grows by one each time a program calling the score model's denoiser is
    traced: `score_model.denoise` builds its network (a Python call, run only while tracing
    under jit) each time it runs."""
    traces = []
    real = score_model.make_network
    monkeypatch.setattr(score_model, "make_network", lambda *a: traces.append(1) or real(*a))
    return traces


def _tiny_score_models(width: int, means) -> list:
    """Score models of one small MLP configuration, one per mean image value."""
    config = score_model.ScoreModelConfig(arch="mlp", mlp_width=width, mlp_depth=1)
    net = score_model.make_network(config, SHAPE)
    params = net.init(jax.random.key(0), jnp.zeros((1, *SHAPE)), jnp.zeros((1,)))["params"]
    return [score_model.ScoreModel(params=params, mean=jnp.full(SHAPE, v), sigma_data=0.5, config=config,
                                   image_shape=SHAPE) for v in means]


def test_new_score_model_of_the_same_configuration_does_not_trace_again(data, monkeypatch):
    models = _tiny_score_models(12, (0.0, 0.5))
    traces = _count_denoiser_traces(monkeypatch)
    maps = []
    for model in models:
        maps.append(scores.compute_scores(score_model.score_source(model), data["x"], noise_level=S))
        assert len(traces) == 1
    assert not np.allclose(maps[0], maps[1])


# --------------------------------------------------------------------------- inside the caller's jit


def test_robustness_entry_points_under_the_callers_jit_and_vmap_match_eager(data):
    f = CountingApply()
    x, basis, dirs, w = data["x"], data["basis"], data["dirs"], data["w1"]
    key = jax.random.key(4)
    eager = robustness.on_off_manifold_change(f, w, x, basis, EPS, key, num_directions=2, batch_size=10)
    jitted = jax.jit(lambda p, xx, b, k: robustness.on_off_manifold_change(f, p, xx, b, EPS, k, num_directions=2,
                                                                           batch_size=10))(w, x, basis, key)
    for a, b in zip(eager, jitted):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)

    eager = robustness.on_off_change(f, w, x, dirs, EPS, batch_size=10)
    jitted = jax.jit(lambda p, xx, dd: robustness.on_off_change(f, p, xx, dd, EPS, batch_size=10))(w, x, dirs)
    for a, b in zip(eager, jitted):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    # many models at once (what the sweep does): vmap over params
    ws = jnp.stack([data["w1"], data["w2"]])
    vmapped = jax.vmap(lambda p: robustness.on_off_change(f, p, x, dirs, EPS, batch_size=10).mean_off_l1)(ws)
    for i in range(2):
        np.testing.assert_allclose(vmapped[i], robustness.on_off_change(f, ws[i], x, dirs, EPS).mean_off_l1,
                                   rtol=1e-5, atol=1e-6)

    eager = robustness.softmax_change(f, w, x, dirs.tangent, EPS, batch_size=7)
    jitted = jax.jit(lambda p, xx: robustness.softmax_change(f, p, xx, dirs.tangent, EPS, batch_size=7))(w, x)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)

    eager = robustness.manifold_directions(key, basis, N, 3)
    jitted = jax.jit(lambda k, b: robustness.manifold_directions(k, b, N, 3))(key, basis)
    np.testing.assert_allclose(jitted.normal, eager.normal, rtol=1e-6, atol=1e-6)

    g = jax.random.normal(key, (N, *SHAPE))
    eager = robustness.gradient_on_manifold_fraction(g, basis)
    jitted = jax.jit(robustness.gradient_on_manifold_fraction)(g, basis)
    np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-6)


def test_compute_scores_under_the_callers_jit_matches_eager(data):
    m = make_fixture(image_shape=SHAPE, k=2, num_classes=3)  # not a pytree: its methods are bound by `Static`
    x, y = data["x"], data["y"]
    for src in (scores.exact_score(m, "class_score"), scores.learned_score(_denoiser(0.5, width=10))):
        eager = scores.compute_scores(src, np.asarray(x), y, noise_level=S, chunk_size=4)
        jitted = jax.jit(lambda xx, yy, s: scores.compute_scores(src, xx, yy, noise_level=s, chunk_size=4))(x, y, S)
        np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(eager, src(x, y, noise_level=S), rtol=1e-5, atol=1e-5)
    # a cache keys the maps by the data's contents: it needs concrete inputs
    with pytest.raises(ValueError, match="concrete"):
        jax.jit(lambda xx: scores.compute_scores(src, xx, y, noise_level=S, cache=scores.ScoreCache()))(x)


def test_tangent_basis_from_generator_under_the_callers_jit_matches_eager():
    w = jax.random.normal(jax.random.key(1), (2, D))
    gen = lambda z: jnp.sin(z @ w)  # noqa: E731
    z = jax.random.normal(jax.random.key(2), (5, 2))
    eager = geometry.tangent_basis_from_generator(gen, z)
    jitted = jax.jit(lambda zz: geometry.tangent_basis_from_generator(gen, zz))(z)
    np.testing.assert_allclose(jitted.basis, eager.basis, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(jitted.rank, eager.rank)


def test_score_model_report_uses_one_compilation_for_every_chunk(monkeypatch):
    (model,) = _tiny_score_models(10, (0.0,))
    traces = _count_denoiser_traces(monkeypatch)
    x = jax.random.uniform(jax.random.key(1), (7, *SHAPE))
    rows = score_model.denoising_report(model, x, None, jax.random.key(2), wiener=score_model.fit_wiener(x),
                                        sigmas=(0.3, 0.6), chunk=3)  # chunks of 3, 3, 1 at two sigmas
    assert len(traces) == 1
    assert [r["sigma"] for r in rows] == [0.3, 0.6] and all(np.isfinite(r["mse_model"]) for r in rows)
