"""The method registry: its entries' properties, the views derived from it, and a new method
added end to end (the docs/extending.md walkthrough, done once)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pagjax
from helpers import linear_forward, linear_params, random_batch, toy_task
from pagjax import experiment, methods, objectives, training

KEY = jax.random.key(0)
BUILTIN = ("ce", "gradnorm", "smoothness", "noise", "pgd")


# ----------------------------------------------------------------- the built-in entries
def test_the_five_methods_are_registered_in_order():
    assert methods.names()[:5] == BUILTIN
    assert objectives.METHODS == methods.names() and pagjax.METHODS == BUILTIN
    assert methods.robust_names()[:4] == BUILTIN[1:]  # plain CE has no strength


@pytest.mark.parametrize("name", BUILTIN)
def test_every_grid_is_positive_and_strictly_increasing(name):
    m = methods.get(name)
    if not m.robust:
        assert not m.grids and all(m.grid(k) == (0.0,) for k in methods.SWEEP_KINDS)
        return
    assert set(methods.SWEEP_KINDS) <= set(m.grids)
    for kind, grid in m.grids.items():
        g = np.asarray(grid)
        assert g.ndim == 1 and len(g) >= 3, kind
        assert np.all(g > 0) and np.all(np.isfinite(g)) and np.all(np.diff(g) > 0), (kind, grid)
    # real data needs stronger models than the known manifolds to reach the excessive regime
    assert max(m.grid("tfds")) >= max(m.grid("known"))


@pytest.mark.parametrize("batch", [1, 64, 128, 200])
def test_official_units_match_the_closed_forms(batch):
    lam = np.array([1e-3, 0.1, 7.0])
    np.testing.assert_allclose(methods.get("gradnorm").to_official(lam, batch), lam * batch**2 / 1e5, rtol=1e-12)
    np.testing.assert_allclose(methods.get("pgd").to_official(lam, batch), lam * math.sqrt(batch), rtol=1e-12)
    for name in ("ce", "smoothness", "noise"):
        assert methods.get(name).to_official(lam, batch) == tuple(lam)
    # and the conversion inverts the one the official gradnorm objective applies
    c = np.asarray(methods.get("gradnorm").to_official(lam, batch))
    np.testing.assert_allclose(objectives.official_gradnorm_lambda(c, batch), lam, rtol=1e-12)


def test_an_unknown_name_names_the_argument_and_lists_the_registered(capsys):
    with pytest.raises(ValueError, match=r"unknown method 'adv' given as --methods; registered methods: ce, gradnorm"):
        methods.get("adv", argument="--methods")
    with pytest.raises(ValueError, match="make_objective name"):
        objectives.make_objective("adv")
    with pytest.raises(ValueError, match="TrainConfig.method"):
        training.TrainConfig(method="adv").validate()
    with pytest.raises(ValueError, match="SweepConfig.methods"):
        experiment.SweepConfig(methods=("adv",), strengths={"adv": (0.1,)}).validate()
    with pytest.raises(ValueError, match="given as method"):
        experiment.default_strengths("adv", "linear_default")
    from experiments import sweep_eps

    assert sweep_eps.main(["--methods", "noise,adv", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--methods" in err and "'adv'" in err and all(n in err for n in BUILTIN)


def test_derived_views_equal_the_registry():
    from benchmarks import bench_step
    from configs import common

    robust = methods.robust_names()
    for view, kind in [(experiment.DEFAULT_STRENGTHS, "known"), (experiment.REAL_DEFAULT_STRENGTHS, "digits"),
                       (experiment.TFDS_DEFAULT_STRENGTHS, "tfds")]:
        assert dict(view) == {m: methods.get(m).grids[kind] for m in robust}
    assert dict(common.GRIDS) == {m: methods.get(m).grids["paper"] for m in robust}
    assert dict(experiment.STRENGTH_NAMES) == {m: methods.get(m).strength_label for m in methods.names()}
    assert experiment.STRENGTH_NAMES["ce"] == "-" and experiment.STRENGTH_NAMES["pgd"] == "eps (L2)"
    for dataset, kind in [("linear_default", "known"), ("digits", "digits"), ("mnist", "tfds"), ("cifar10", "tfds")]:
        assert experiment.grid_kind(dataset) == kind
        for m in methods.names():
            assert experiment.default_strengths(m, dataset) == methods.get(m).grid(kind)
            assert experiment.default_strengths(m, dataset, official=True, batch_size=32) == \
                methods.get(m).to_official(methods.get(m).grid(kind), 32)
            assert experiment.to_official_units(m, (1.0,), 32) == methods.get(m).to_official((1.0,), 32)
    assert experiment.SweepConfig().methods == robust
    assert experiment.SweepConfig().strengths == dict(experiment.DEFAULT_STRENGTHS)
    assert bench_step.OBJECTIVES == methods.names()
    assert dict(bench_step.STRENGTH) == {m: methods.get(m).bench_strength for m in methods.names()}
    assert [bench_step.ideal_ratio(m, 4) for m in BUILTIN] == [1, 3, 2, 1, 5]


def test_make_objective_hands_the_options_to_the_entry():
    seen = []
    spy = methods.Method("spy", lambda opts: seen.append(opts) or objectives.plain_ce, "records its options")
    with methods.registered(spy):
        assert objectives.make_objective("spy", pgd_steps=3, official=True) is objectives.plain_ce
        with pytest.raises(ValueError, match="pgd_steps"):  # options are checked before the entry sees them
            objectives.make_objective("spy", pgd_steps=-1)
    assert seen == [objectives.ObjectiveOptions(pgd_steps=3, official=True)]
    pgd = objectives.make_objective("pgd", pgd_steps=3, official=True, pgd_box=(0.0, 1.0))
    assert pgd.func is objectives.pgd_training
    assert (pgd.keywords["num_steps"], pgd.keywords["official"], pgd.keywords["box"]) == (3, True, (0.0, 1.0))
    assert objectives.make_objective("smoothness", smoothness_noise_std=0.3).keywords["noise_std"] == 0.3
    assert objectives.make_objective("gradnorm", official=True).keywords == {"official": True}


# ----------------------------------------------------------------- entries are checked
def _objective(opts):
    return objectives.plain_ce


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="Bad Name"), "lower-case"),
    (dict(strength_name="s", grids={"known": (0.1, 1.0)}), "no default grid"),
    (dict(strength_name="s", grids={"known": (1.0, 0.1), "digits": (1.0,), "tfds": (1.0,)}), "strictly increasing"),
    (dict(strength_name="s", grids={"known": (0.0, 1.0), "digits": (1.0,), "tfds": (1.0,)}), "positive"),
    (dict(grids={"known": (0.1,)}), "ignores its strength"),
    (dict(strength_name="s", grids={"known": (1.0,), "digits": (1.0,), "tfds": (1.0,), "imagenet": (1.0,)}),
     "unknown grid kinds"),
])
def test_a_malformed_method_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        methods.Method(**{"name": "toy", "objective": _objective, "description": "toy", **kwargs})


def test_registering_twice_is_an_error_and_registered_restores():
    toy = methods.Method("toy", _objective, "toy")
    ce = methods.get("ce")
    with methods.registered(toy):
        assert methods.names()[-1] == "toy"
        with pytest.raises(ValueError, match="already registered"):
            methods.register(toy)
    assert "toy" not in methods.names()
    with methods.registered(methods.Method("ce", _objective, "a replacement"), replace=True):
        assert methods.get("ce").description == "a replacement"
    assert methods.get("ce") is ce and methods.names()[:5] == BUILTIN
    methods.register(toy)
    assert methods.unregister("toy") is toy and "toy" not in methods.names()


# ----------------------------------------------------------------- a new method, end to end
def input_dropout(forward, params, x, y, key, strength):
    """CE(f(m * x / (1 - p)), y), m ~ Bernoulli(1 - p) per pixel: input dropout at rate p."""
    keep = jax.random.uniform(key, x.shape, x.dtype) >= strength  # all kept at p = 0: plain CE exactly
    logits, state = forward(params, jnp.where(keep, x / (1.0 - strength), 0.0))
    ce = objectives.cross_entropy(logits, y)
    return ce, {"ce": ce, "penalty": jnp.zeros_like(ce), "logits": logits, "model_state": state}


INPUT_DROPOUT = methods.Method(
    name="input_dropout",
    objective=lambda options: input_dropout,
    description="CE on inputs with pixels dropped at rate p",
    strength_name="drop p",
    grids={"known": (0.05, 0.1, 0.2, 0.4, 0.8), "digits": (0.05, 0.1, 0.2, 0.4, 0.8),
           "tfds": (0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9)},
    bench_strength=0.2,
)


@pytest.fixture
def dropout_method():
    with methods.registered(INPUT_DROPOUT) as m:
        yield m
    assert "input_dropout" not in methods.names()  # nothing leaks into other tests


def test_a_new_method_goes_through_every_derived_view(dropout_method):
    from experiments import sweep_eps

    x, y = random_batch(1, 16)
    params = linear_params(KEY, 16, 3)
    obj = objectives.make_objective("input_dropout")
    loss0, aux = obj(linear_forward, params, x, y, KEY, 0.0)
    np.testing.assert_allclose(loss0, objectives.plain_ce(linear_forward, params, x, y, KEY)[0], rtol=1e-6)
    loss, _ = obj(linear_forward, params, x, y, KEY, 0.5)
    assert np.all(np.isfinite(loss)) and not np.allclose(loss, loss0)

    assert experiment.default_strengths("input_dropout", "linear_default") == INPUT_DROPOUT.grids["known"]
    assert experiment.default_strengths("input_dropout", "mnist") == INPUT_DROPOUT.grids["tfds"]
    assert experiment.default_strengths("input_dropout", "digits", official=True) == INPUT_DROPOUT.grids["digits"]
    assert experiment.STRENGTH_NAMES["input_dropout"] == "drop p"
    assert "input_dropout" in experiment.SweepConfig().methods and "input_dropout" in objectives.METHODS

    # the sweep CLI: listed in --help, accepted by --methods, its default grid used
    assert "input_dropout: CE on inputs with pixels dropped at rate p" in _sweep_help(sweep_eps)
    cfg = sweep_eps.config_from_args(sweep_eps.parse_args(["--methods", "input_dropout,noise", "--seeds", "0"]))
    assert cfg.strengths["input_dropout"] == INPUT_DROPOUT.grids["known"]
    cfg.validate()

    from benchmarks import bench_step

    assert "input_dropout" in bench_step.OBJECTIVES and bench_step.ideal_ratio("input_dropout", 10) == 1


def _sweep_help(sweep_eps):
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        sweep_eps.parse_args(["--help"])
    return " ".join(out.getvalue().split())  # argparse wraps the lines


def test_a_new_method_trains(dropout_method):
    x, y = toy_task(n=64)
    cfg = training.TrainConfig(model="mlp:width=8", method="input_dropout", strength=0.2, steps=3, batch_size=16,
                               optimizer=training.OptimizerConfig(name="adam", learning_rate=1e-2))
    res = training.train(cfg, x, y, num_classes=2, log_every=3, progress=False)
    assert not res.diverged and np.all(np.isfinite(res.history["loss"]))
