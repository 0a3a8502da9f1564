"""End-to-end sweep: the physics the default run must show (on a smaller, faster version),
outputs, resume after a crash, and refusing to mix settings."""
import csv
import json
import os

import chex
import numpy as np
import pytest

from pagjax import experiment
from pagjax.experiment import SettingsMismatchError, SweepConfig, run_sweep
from pagjax.measure import MeasureConfig
from pagjax.training import OptimizerConfig
from tests.helpers import optimized_compilation

# A faster cousin of the default run: two methods, three strengths each, one seed, a smaller
# MLP. The class-informative normal feature is larger (0.3) and the on-manifold classes
# overlap more (separation 0.6), so the weak model leans on the off-manifold feature
# within 600 steps: off/on is about 16 at the weakest strength (about 1.1 without the
# smaller separation, too close to 1 to test reliably). Gradnorm's middle strength, 0.15,
# has off/on about 0.26; at 0.1 it was 0.74-0.89 depending on how many models shared the
# vmapped sweep, too close to 1.
PHYSICS_STRENGTHS = {"noise": (0.01, 0.3, 3.0), "gradnorm": (1e-3, 0.15, 100.0)}
PHYSICS = SweepConfig(
    methods=("noise", "gradnorm"), strengths=PHYSICS_STRENGTHS, seeds=(0,),
    dataset_kwargs={"normal_offset": 0.3, "class_separation": 0.6}, n_train=2048, n_test=512, model="mlp:width=128", steps=600,
    optimizer=OptimizerConfig(learning_rate=3e-3), measure=MeasureConfig(num_eval=128, num_directions=2, lpips=False),
)
TINY = SweepConfig(
    methods=("noise", "gradnorm"), strengths={"noise": (0.0, 0.5), "gradnorm": (0.0, 0.1)}, seeds=(0,),
    n_train=256, n_test=64, model="mlp:width=16", steps=30, batch_size=32, steps_per_call=10, checkpoint_every=10,
    measure=MeasureConfig(num_eval=16, num_directions=1, lpips=False, grid_images=3),
)


@pytest.fixture(scope="module")
def physics_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("physics"))
    with optimized_compilation():  # 600 steps of 6 models: 16 s optimised, 23 s not
        summaries = run_sweep(PHYSICS, out, progress=False, log=lambda s: None)
    with open(os.path.join(out, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    return out, summaries, rows


@pytest.mark.slow  # through the module fixture `physics_run`
@pytest.mark.parametrize("method", PHYSICS.methods)
def test_known_manifold_sweep_shows_weak_then_aligned_then_excessive(physics_run, method):
    _, summaries, all_rows = physics_run
    rows = [r for r in all_rows if r["method"] == method]
    v = lambda col: np.array([float(r[col]) for r in rows])  # noqa: E731  (rows in strength order)
    weakest, middle, _ = PHYSICS_STRENGTHS[method]
    assert v("strength").tolist() == list(PHYSICS_STRENGTHS[method])
    on, off, frac, cos, acc = v("on_change"), v("off_change"), v("grad_on_manifold_fraction"), v("bayes_cosine"), v("accuracy")
    bayes_frac = v("bayes_fraction")[0]
    # weakest: off-manifold change above on-manifold, gradient far less on-manifold than Bayes
    assert off[0] > 3 * on[0]
    assert frac[0] < bayes_frac - 0.2
    # stronger: the off/on ratio falls below 1; fraction and Bayes alignment rise to a peak
    assert np.min(off / on) < 1.0
    assert frac.max() > frac[0] + 0.2 and cos.max() > cos[0] + 0.05
    # strongest: accuracy and on-manifold change collapse
    assert acc[-1] < 0.6 * acc.max() and on[-1] < 0.5 * on.max()
    assert [r["regime"] for r in rows] == ["weak", "bayes_aligned", "excessive"]
    s = next(x for x in summaries if x["method"] == method)
    assert s["crossover"] is not None and weakest < s["crossover"] < middle
    assert s["peak_at"] == middle


@pytest.mark.slow  # through the module fixture `physics_run`
def test_outputs_are_complete(physics_run):
    out, _, rows = physics_run
    for name in ("config.json", "results.csv", "regimes.json", "summary.json", "figure3.png", "gradients_noise.png",
                 "gradients_gradnorm.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert set(experiment.result_columns(PHYSICS.measure)) == set(rows[0])
    assert rows[0]["lpips_alignment"] == "" and rows[0]["diverged"] == "false"
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["settings"]["strengths"] == {m: list(v) for m, v in PHYSICS_STRENGTHS.items()}
    assert "jax" in cfg["versions"]
    assert cfg["settings"]["official_grad_accumulation"] is False and cfg["settings"]["official_bn_updates"] is False
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]  # atomic writes left no temp files


@pytest.mark.slow
def test_rerun_skips_finished_work_and_refuses_other_settings(tmp_path):
    out = str(tmp_path)
    run_sweep(TINY, out, progress=False, log=lambda s: None)
    os.remove(os.path.join(out, "gradients_noise.png"))
    logs = []
    run_sweep(TINY, out, progress=False, log=logs.append)
    assert "noise: already finished, skipped" in logs
    assert os.path.isfile(os.path.join(out, "gradients_noise.png"))  # a skipped method's grid is drawn again
    changed = SweepConfig(**{**TINY.__dict__, "steps": 40})
    with pytest.raises(SettingsMismatchError, match="steps"):
        run_sweep(changed, out, progress=False, log=lambda s: None)
    # execution details are not settings; the strategy is (it rounds differently)
    run_sweep(SweepConfig(**{**TINY.__dict__, "steps_per_call": 5}), out, progress=False, log=lambda s: None)
    with pytest.raises(SettingsMismatchError, match="strategy"):
        run_sweep(SweepConfig(**{**TINY.__dict__, "strategy": "loop"}), out, progress=False, log=lambda s: None)
    run_sweep(changed, out, overwrite=True, progress=False, log=lambda s: None)
    assert json.load(open(os.path.join(out, "config.json")))["settings"]["steps"] == 40


def test_each_gradient_grid_is_drawn_once_and_figure3_as_often_as_due(tmp_path, monkeypatch):
    from pagjax import plots

    drawn, draw = [], plots.gradient_grid
    monkeypatch.setattr(plots, "gradient_grid", lambda rows, labels, path, **kw: (drawn.append(os.path.basename(path)),
                                                                                 draw(rows, labels, path, **kw)))
    figures, figure = [], plots.figure3
    monkeypatch.setattr(plots, "figure3", lambda *a, **kw: (figures.append(1), figure(*a, **kw)))
    monkeypatch.setattr(experiment, "FIGURE_EVERY_S", 1e9)  # a short sweep: figure3 once, at the end
    run_sweep(TINY, str(tmp_path / "short"), progress=False, log=lambda s: None)
    assert sorted(drawn) == ["gradients_gradnorm.png", "gradients_noise.png"] and len(figures) == 1
    monkeypatch.setattr(experiment, "FIGURE_EVERY_S", 0.0)  # a long one: after every method too
    run_sweep(TINY, str(tmp_path / "long"), progress=False, log=lambda s: None)
    assert len(drawn) == 4 and len(figures) == 3
    assert os.path.isfile(str(tmp_path / "short" / "figure3.png"))


class Crash(Exception):
    pass


def test_a_killed_run_resumes_from_its_last_checkpoint_exactly(tmp_path):
    data = experiment.load_data(TINY)
    full = experiment.train_method(TINY, "noise", data, str(tmp_path / "full"))

    def crash_after_20(p):
        if p.step >= 20:
            raise Crash()

    out = str(tmp_path / "crashed")
    with pytest.raises(Crash):
        experiment.train_method(TINY, "noise", data, out, progress=crash_after_20)
    steps_seen = []
    resumed = experiment.train_method(TINY, "noise", data, out, progress=lambda p: steps_seen.append(p.step))
    # only the steps after the checkpoint at step 20 were trained again (chunks also end at
    # epoch ends: 8 batches of 32 per epoch)
    assert steps_seen == [24, 30]
    chex.assert_trees_all_close(resumed.train.params, full.train.params, rtol=1e-5, atol=1e-6)


def test_diverged_models_are_recorded_not_fatal(tmp_path):
    cfg = SweepConfig(**{**TINY.__dict__, "methods": ("noise",), "strengths": {"noise": (0.1, 1e38)}})
    run_sweep(cfg, str(tmp_path), progress=False, log=lambda s: None)
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["diverged"] for r in rows] == ["false", "true"]
    assert rows[1]["accuracy"] == "" and rows[1]["regime"] == "diverged"
    assert rows[0]["accuracy"] != ""


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(methods=("adv",)), "method"),
        (dict(strengths={"noise": (0.5, 0.1), "gradnorm": (0.0,)}), "increasing"),
        (dict(strengths={"noise": (-1.0,), "gradnorm": (0.0,)}), "strengths"),
        (dict(seeds=(0, 0)), "seeds"),
        (dict(dataset="cifar11"), "dataset"),
        (dict(model="transformer"), "model name"),
        (dict(measure=MeasureConfig(eps=(1.0,), regime_eps=2.0)), "regime_eps"),
        (dict(strategy="gpu"), "strategy"),
    ],
)
def test_bad_settings_fail_before_any_work(tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        run_sweep(SweepConfig(**{**TINY.__dict__, **change}), str(tmp_path), progress=False)
    assert not os.listdir(tmp_path)  # nothing written


def test_cli_help_and_bad_flags(capsys):
    from experiments import sweep_eps

    with pytest.raises(SystemExit) as e:
        sweep_eps.parse_args(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--methods", "--strengths", "--log-range", "--seeds", "--model", "--steps", "--official", "--out"):
        assert flag in help_text
    assert sweep_eps.main(["--methods", "noise", "--strengths", "1,0.1", "--no-progress"]) == 2
    assert "increasing" in capsys.readouterr().err
    cfg = sweep_eps.config_from_args(sweep_eps.parse_args(["--methods", "pgd", "--log-range", "0.01,1,3"]))
    np.testing.assert_allclose(cfg.strengths["pgd"], [0.01, 0.1, 1.0])


def test_cli_optimizer_defaults_and_reproduction_switches():
    from experiments import sweep_eps

    config = lambda *argv: sweep_eps.config_from_args(sweep_eps.parse_args(list(argv)))  # noqa: E731
    adam, sgd = config().optimizer, config("--optimizer", "sgd").optimizer
    assert (adam.name, adam.learning_rate) == ("adam", 3e-3)
    assert config("--dataset", "digits").optimizer.learning_rate == 2e-3  # real images: their own defaults
    assert (sgd.name, sgd.learning_rate, sgd.momentum, sgd.weight_decay, sgd.schedule) == (
        "sgd", 0.025, 0.9, 5e-4, "piecewise")
    assert config("--optimizer", "sgd", "--lr", "0.1").optimizer.learning_rate == 0.1
    assert config("--lr", "0.01").optimizer.learning_rate == 0.01
    plain, switched = config(), config("--official", "--official-grad-accumulation", "--official-bn-updates")
    assert not (plain.official_grad_accumulation or plain.official_bn_updates)
    assert switched.official and switched.official_grad_accumulation and switched.official_bn_updates
    assert switched.settings()["official_grad_accumulation"] and switched.settings()["official_bn_updates"]


def test_the_library_default_is_the_main_job():
    from experiments import sweep_eps

    cli = sweep_eps.config_from_args(sweep_eps.parse_args([]))
    assert cli.settings() == SweepConfig().settings()
    assert (cli.model, cli.steps, cli.dataset_kwargs) == ("mlp:width=128", 600, experiment.KNOWN_DATA)
    digits = sweep_eps.config_from_args(sweep_eps.parse_args(["--dataset", "digits"]))
    assert (digits.model, digits.steps, digits.dataset_kwargs) == ("mlp:width=256", 600, {})


def test_execution_details_are_not_settings():
    assert not set(experiment.EXECUTION_FIELDS) & set(TINY.settings())
