"""A table of bad inputs, each with the message it must give, before any work.

`CLI_CASES` go through ``python -m experiments.sweep_eps`` (its `main`): each must exit
with status 2 and a one-line message naming the flag or argument, in well under a second,
without writing anything. `API_CASES` go through the Python API: each must raise
`ValueError` with the message. ``HANDLED_CASES`` is the count the issue asked the tests to
keep; `test_the_table_counts_its_cases` fails if a case is lost.
"""
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import sweep_eps
from pagjax import experiment, gradients, io, models, robustness, training, validation
from pagjax.experiment import SweepConfig
from pagjax.measure import MeasureConfig

# "Before any work": an error must come before data is built or a model compiled, which
# takes several seconds; the bound is that guard, with room for a loaded machine, not a
# speed target.
BEFORE_ANY_WORK_S = 5.0

TINY_FLAGS = ["--steps", "4", "--n-train", "256", "--n-test", "64", "--seeds", "0", "--methods", "noise",
              "--strengths", "0.1", "--no-lpips", "--no-progress"]


def _with(*flags):
    """The tiny run's flags with `flags` replacing (or adding) the named ones."""
    out, given = list(TINY_FLAGS), list(flags)
    i = 0
    while i < len(given):
        flag = given[i]
        takes_value = i + 1 < len(given) and not given[i + 1].startswith("--")
        if flag in out:
            j = out.index(flag)
            if takes_value:
                out[j + 1] = given[i + 1]
        else:
            out += given[i:i + 1 + takes_value]
        i += 1 + takes_value
    if "--log-range" in given and "--strengths" not in given:  # the two exclude each other
        j = out.index("--strengths")
        del out[j:j + 2]
    return out


# (id, extra flags, text the message must contain)
CLI_CASES = [
    ("strengths-empty", ["--strengths", ""], "--strengths is empty"),
    ("strengths-empty-item", ["--strengths", "0.1,,1"], "--strengths has an empty item"),
    ("strengths-word", ["--strengths", "a"], "--strengths must be comma-separated numbers"),
    ("strengths-nan", ["--strengths", "nan"], "--strengths must be finite"),
    ("strengths-inf", ["--strengths", "0.1,inf"], "--strengths must be finite"),
    ("strengths-decreasing", ["--strengths", "1,0.1"], "strictly increasing"),
    ("strengths-negative", ["--strengths", "-1"], "must be >= 0"),
    ("strengths-and-log-range", ["--log-range", "0.01,1,3", "--strengths", "0.1"], "not both"),
    ("methods-duplicate", ["--methods", "noise,noise"], "--methods names noise more than once"),
    ("methods-empty", ["--methods", ""], "--methods must be comma-separated names"),
    ("methods-empty-item", ["--methods", "noise,"], "--methods must be comma-separated names"),
    ("methods-unknown", ["--methods", "adv"], "unknown method 'adv'"),
    ("steps-huge", ["--steps", "99999999999"], "steps must be at most"),
    ("steps-3e9", ["--steps", "3000000000"], "steps must be at most"),
    ("steps-zero", ["--steps", "0"], "steps must be a positive integer"),
    ("steps-negative", ["--steps", "-5"], "steps must be a positive integer"),
    ("steps-word", ["--steps", "abc"], "--steps"),
    ("seeds-word", ["--seeds", "a"], "--seeds must be comma-separated integers"),
    ("seeds-empty", ["--seeds", ""], "--seeds must be comma-separated integers"),
    ("seeds-float", ["--seeds", "0.5"], "--seeds must be comma-separated integers"),
    ("seeds-duplicate", ["--seeds", "0,0"], "seeds must be distinct"),
    ("seeds-huge", ["--seeds", "99999999999999999999"], "seeds must be integers in [0,"),
    ("seeds-negative", ["--seeds", "-1"], "seeds must be integers in [0,"),
    ("log-range-two-items", ["--log-range", "1e-3,10"], "--log-range must be LOW,HIGH,N"),
    ("log-range-zero-low", ["--log-range", "0,10,3"], "--log-range needs finite 0 < LOW < HIGH"),
    ("log-range-reversed", ["--log-range", "10,1,3"], "--log-range needs finite 0 < LOW < HIGH"),
    ("log-range-negative", ["--log-range", "0.001,-1,3"], "--log-range needs finite 0 < LOW < HIGH"),
    ("log-range-nan", ["--log-range", "nan,1,3"], "--log-range needs finite 0 < LOW < HIGH"),
    ("log-range-n-word", ["--log-range", "1e-3,10,x"], "--log-range must be LOW,HIGH,N with numbers"),
    ("log-range-n-one", ["--log-range", "1e-3,10,1"], "--log-range N must be an integer in [2, 1000]"),
    ("log-range-n-huge", ["--log-range", "1e-3,10,100000"], "--log-range N must be an integer in [2, 1000]"),
    ("model-width-negative", ["--model", "mlp:width=-3"], "model option width of 'mlp:width=-3' must be an integer >= 1"),
    ("model-width-word", ["--model", "mlp:width=abc"], "model option width"),
    ("model-width-zero", ["--model", "mlp:width=0"], "model option width"),
    ("model-depth-negative", ["--model", "mlp:depth=-1"], "model option depth"),
    ("model-cnn-width-zero", ["--model", "cnn:width=0"], "model option width"),
    ("model-unknown-option", ["--model", "mlp:foo=3"], "unknown option(s) ['foo']"),
    ("model-no-value", ["--model", "mlp:width"], "must look like key=value"),
    ("model-unknown", ["--model", "transformer"], "unknown model name"),
    ("model-activation", ["--model", "mlp:act=tanhh"], "unknown activation"),
    ("normal-offset-nan", ["--normal-offset", "nan"], "dataset option normal_offset must be finite"),
    ("normal-offset-inf", ["--normal-offset", "inf"], "dataset option normal_offset must be finite"),
    ("eps-empty", ["--eps", ""], "--eps is empty"),
    ("eps-word", ["--eps", "1,x"], "--eps must be comma-separated numbers"),
    ("eps-negative", ["--eps", "-1", "--regime-eps", "-1"], "eps must be a finite number > 0"),
    ("regime-eps-not-in-eps", ["--regime-eps", "3"], "regime_eps 3.0 must be one of eps"),
    ("lr-nan", ["--lr", "nan"], "learning_rate must be a finite number > 0"),
    ("lr-negative", ["--lr", "-1"], "learning_rate must be a finite number > 0"),
    ("lr-zero", ["--lr", "0"], "learning_rate must be a finite number > 0"),
    ("batch-size-zero", ["--batch-size", "0"], "batch_size must be a positive integer"),
    ("batch-size-over-data", ["--batch-size", "100000"], "batch_size 100000 exceeds n_train 256"),
    ("n-train-zero", ["--n-train", "0"], "n_train must be a positive integer"),
    ("n-test-negative", ["--n-test", "-5"], "n_test must be a positive integer"),
    ("strategy-unknown", ["--strategy", "gpu"], "unknown strategy 'gpu'"),
    ("optimizer-unknown", ["--optimizer", "rmsprop"], "unknown optimizer 'rmsprop'"),
    ("augment-unknown", ["--augment", "rotate"], "unknown augment 'rotate'"),
    ("dataset-unknown", ["--dataset", "cifar11"], "unknown dataset 'cifar11'"),
    ("align-noise-zero", ["--align-noise", "0"], "align_noise must be a finite number > 0"),
    ("robust-eps-negative", ["--robust-eps", "-1"], "pgd_eps must be a finite number > 0"),
    ("pgd-steps-negative", ["--pgd-steps", "-1"], "pgd_steps must be an integer >= 0"),
    ("out-empty", ["--out", ""], "--out must be a folder path"),
    ("out-is-a-file", ["--out", "{file}"], "exists and is not a folder"),
    ("out-under-proc", ["--out", "/proc/pagjax-out"], "is not writable"),
    ("out-read-only", ["--out", "{readonly}/sub"], "is not writable"),
]


@pytest.fixture(scope="module")
def warm():
    """Import and build everything once, so each case's timing is its own."""
    sweep_eps.main(_with("--steps", "0"))


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_fails_fast_naming_the_flag(case, warm, tmp_path, capsys, monkeypatch):
    name, flags, message = case
    if name == "out-read-only" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    monkeypatch.chdir(tmp_path)
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    (tmp_path / "afile").write_text("x")
    flags = [f.format(file=str(tmp_path / "afile"), readonly=str(readonly)) for f in flags]
    argv = _with(*flags)
    if "--out" not in flags:
        argv += ["--out", str(tmp_path / "out")]
    capsys.readouterr()
    t = time.perf_counter()
    try:
        status = sweep_eps.main(argv)
    except SystemExit as e:  # argparse's own type errors
        status = e.code
    elapsed = time.perf_counter() - t
    err = capsys.readouterr().err
    assert status == 2, err
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert elapsed < BEFORE_ANY_WORK_S, f"{name} took {elapsed:.2f} s"
    assert not (tmp_path / "out").exists()  # nothing written


def _mlp():
    model = models.build_model("mlp:width=8", 3)
    x = jnp.ones((4, 2, 2, 1), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    return model, variables, x


def _basis(kind):
    d, k = 4, 2
    if kind == "skewed":
        return jnp.asarray(np.array([[1.0, 0.5], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]], np.float32))
    if kind == "full-rank":
        return jnp.eye(d, dtype=jnp.float32)
    if kind == "nan":
        return jnp.full((d, k), jnp.nan, jnp.float32)
    if kind == "wrong-rows":
        return jnp.eye(5, k, dtype=jnp.float32)
    if kind == "long-columns":
        return 2.0 * jnp.eye(d, k, dtype=jnp.float32)
    raise AssertionError(kind)


def _grads(**kw):
    model, variables, x = _mlp()
    args = dict(labels=jnp.array([0, 1, 2, 0]), target="logprob")
    args.update(kw)
    x = args.pop("x", x)
    return gradients.input_gradients(model.apply, variables, x, **args)


def _onoff(basis=None, **kw):
    model, variables, x = _mlp()
    args = dict(eps=1.0, key=jax.random.key(0))
    args.update(kw)
    x = args.pop("x", x)
    return robustness.on_off_manifold_change(model.apply, variables, x,
                                             _basis(basis) if basis else jnp.eye(4, 2, dtype=jnp.float32), **args)


def _train(x=None, y=None, **kw):
    cfg = training.TrainConfig(model="mlp:width=8", steps=2, batch_size=4, method="ce", strength=0.0)
    xs = jnp.ones((8, 2, 2, 1), jnp.float32) if x is None else x
    ys = jnp.array([0, 1] * 4) if y is None else y
    return training.train(cfg, xs, ys, progress=False, **kw)


def _train_config(**kw):
    base = dict(model="mlp:width=8", steps=2, batch_size=4, method="ce", strength=0.0)
    training.TrainConfig(**{**base, **kw}).validate()


TINY = SweepConfig(methods=("noise",), strengths={"noise": (0.1,)}, seeds=(0,), n_train=256, n_test=64,
                   model="mlp:width=16", steps=4, batch_size=32, measure=MeasureConfig(lpips=False))


def _sweep(**change):
    SweepConfig(**{**TINY.__dict__, **change}).validate()


# (id, call, text the ValueError must contain)
API_CASES = [
    ("grads-labels-out-of-range", lambda: _grads(labels=jnp.array([0, 1, 2, 0]) + 10), "labels must lie in [0, 3)"),
    ("grads-labels-negative", lambda: _grads(labels=jnp.array([0, -1, 2, 0])), "labels must lie in [0, 3)"),
    ("grads-labels-float", lambda: _grads(labels=jnp.array([0.0, 1.0, 2.0, 0.0])), "integer dtype"),
    ("grads-labels-wrong-count", lambda: _grads(labels=jnp.array([0, 1])), "labels must have 4 entries"),
    ("grads-labels-missing", lambda: _grads(labels=None), "labels are required"),
    ("grads-x-nan", lambda: _grads(x=jnp.full((4, 2, 2, 1), jnp.nan)), "x must be finite"),
    ("grads-x-int", lambda: _grads(x=jnp.ones((4, 2, 2, 1), jnp.int32)), "floating dtype"),
    ("grads-target-unknown", lambda: _grads(target="prob"), "unknown target 'prob'"),
    ("check-images-nan", lambda: validation.check_images("x", np.full((2, 2, 2, 1), np.nan, np.float32), finite=True),
     "x must be finite"),
    ("check-images-inf", lambda: validation.check_images("x", jnp.ones((2, 2, 2, 1)).at[0, 0, 0, 0].set(jnp.inf),
                                                         finite=True), "x must be finite"),
    ("train-nan-in-x", lambda: _train(x=jnp.ones((8, 2, 2, 1)).at[3, 0, 0, 0].set(jnp.nan)), "x must"),
    ("train-one-class", lambda: _train(y=jnp.zeros(8, jnp.int32), num_classes=1), "num_classes must be >= 2"),
    ("train-labels-out-of-range", lambda: _train(y=jnp.array([0, 1, 2, 3] * 2), num_classes=2), "y must lie in [0, 2)"),
    ("train-batch-over-data", lambda: _train(x=jnp.ones((2, 2, 2, 1)), y=jnp.array([0, 1])), "exceeds the 2 training"),
    ("train-steps-zero", lambda: _train_config(steps=0), "steps must be a positive integer"),
    ("train-method-unknown", lambda: _train_config(method="adv"), "unknown method"),
    ("train-strength-nan", lambda: _train_config(strength=float("nan")), "strength must be finite"),
    ("onoff-basis-skewed", lambda: _onoff("skewed"), "basis must have orthonormal columns"),
    ("onoff-basis-long-columns", lambda: _onoff("long-columns"), "basis must have orthonormal columns"),
    ("onoff-basis-full-rank", lambda: _onoff("full-rank"), "there is no off-manifold direction"),
    ("onoff-basis-nan", lambda: _onoff("nan"), "basis must be finite"),
    ("onoff-basis-wrong-rows", lambda: _onoff("wrong-rows"), "basis has 5 rows"),
    ("onoff-x-nan", lambda: _onoff(x=jnp.full((4, 2, 2, 1), jnp.nan)), "x must be finite"),
    ("onoff-eps-negative", lambda: _onoff(eps=-1.0), "eps"),
    ("onoff-directions-zero", lambda: _onoff(num_directions=0), "num_directions must be a positive integer"),
    ("sweep-methods-duplicate", lambda: _sweep(methods=("noise", "noise")), "methods must be distinct"),
    ("sweep-steps-huge", lambda: _sweep(steps=3_000_000_000), "steps must be at most"),
    ("sweep-seed-huge", lambda: _sweep(seeds=(10**20,)), "seeds must be integers in [0,"),
    ("sweep-seed-bool", lambda: _sweep(seeds=(True,)), "seeds must be integers in [0,"),
    ("sweep-seed-float", lambda: _sweep(seeds=(0.5,)), "seeds must be integers in [0,"),
    ("sweep-dataset-option-nan", lambda: _sweep(dataset_kwargs={"normal_offset": float("nan")}), "normal_offset must be finite"),
    ("sweep-model-width", lambda: _sweep(model="mlp:width=-3"), "model option width"),
    ("sweep-strategy", lambda: _sweep(strategy="gpu"), "unknown strategy"),
    ("sweep-no-methods", lambda: _sweep(methods=()), "methods must name at least one method"),
    ("sweep-strengths-missing", lambda: _sweep(methods=("noise", "pgd")), "strengths has no values for method 'pgd'"),
    ("sweep-steps-per-call", lambda: _sweep(steps_per_call=0), "steps_per_call must be a positive integer"),
    ("model-unknown", lambda: models.build_model("transformer", 2), "unknown model name"),
    ("model-one-class", lambda: models.build_model("mlp", 0), "num_classes must be a positive integer"),
    ("writable-empty-path", lambda: io.check_writable_dir(""), "must be a folder path"),
    ("writable-proc", lambda: io.check_writable_dir("/proc/pagjax-out"), "is not writable"),
]


@pytest.fixture(scope="module")
def warm_api():
    """Compile the tiny model's forward and gradient once, so each case's timing is its own."""
    _grads()
    _onoff()


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input_raises_naming_the_argument(case, warm_api):
    name, call, message = case
    t = time.perf_counter()
    with pytest.raises((ValueError, OSError)) as e:
        call()
    assert message in str(e.value)
    assert time.perf_counter() - t < BEFORE_ANY_WORK_S, f"{name} took {time.perf_counter() - t:.2f} s"


def test_run_sweep_into_a_file_fails_before_any_work(tmp_path):
    target = tmp_path / "afile"
    target.write_text("x")
    with pytest.raises(io.OutputNotWritableError, match="exists and is not a folder"):
        experiment.run_sweep(TINY, str(target), progress=False, log=lambda s: None)
    assert target.read_text() == "x"


def test_good_inputs_still_pass():
    """The checks reject the bad, not the good: a near-orthonormal basis with a zero
    column, the default CLI flags and labels at the top of their range are fine."""
    basis = jnp.eye(4, 3, dtype=jnp.float32).at[:, 2].set(0.0)
    _onoff(basis=None)
    model, variables, x = _mlp()
    robustness.on_off_manifold_change(model.apply, variables, x, basis, 1.0, jax.random.key(0))
    assert _grads(labels=jnp.array([2, 2, 2, 2])).shape == (4, 2, 2, 1)
    sweep_eps.config_from_args(sweep_eps.parse_args(_with())).validate()
    cfg = sweep_eps.config_from_args(sweep_eps.parse_args(_with("--log-range", "0.01,1,3")))
    np.testing.assert_allclose(cfg.strengths["noise"], [0.01, 0.1, 1.0])


HANDLED_CASES = len(CLI_CASES) + len(API_CASES)


def test_the_table_counts_its_cases():
    """The count is kept: dropping a case fails here (adding one updates the numbers)."""
    assert len({c[0] for c in CLI_CASES}) == len(CLI_CASES) and len({c[0] for c in API_CASES}) == len(API_CASES)
    assert (len(CLI_CASES), len(API_CASES), HANDLED_CASES) == (64, 40, 104)
