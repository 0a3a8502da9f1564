"""The paper-recipe configs: their settings are the paper's, and --smoke runs end to end."""
import csv
import glob
import os

import numpy as np
import pytest

from experiments import run_config
from pagjax import training

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "cifar10_*.py")))


def test_every_config_states_how_to_run_hardware_result_and_cost():
    assert len(CONFIGS) == 4
    for path in CONFIGS:
        head = open(path).read().split('"""')[1]
        for word in ("Run:", "Smoke:", "Hardware:", "Expect:", "Cost:", "hours"):
            assert word in head, (path, word)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_full_configs_hold_the_paper_settings(path):
    cfg = run_config.load_config(path, smoke=False)
    (method,) = cfg.methods
    grid = np.asarray(cfg.strengths[method])
    lo, hi = {"gradnorm": (-5, 2), "smoothness": (-4, 4), "noise": (-3, 2), "pgd": (-5, 4)}[method]
    np.testing.assert_allclose(grid, np.logspace(lo, hi, 30))
    assert cfg.dataset == "cifar10" and cfg.model == "resnet18" and cfg.batch_size == 128
    assert cfg.steps == 200 * (50_000 // 128) and cfg.optimizer == training.PAPER_SGD
    assert cfg.augment == "crop_flip" and cfg.official and cfg.pgd_steps == 10
    m = cfg.measure
    assert m.eps == (1.44, 2.64, 4.83, 8.86) and m.regime_eps == 2.64 and m.num_eval == 201 and m.align_noise == 0.5
    assert cfg.learned.ae_latent == 128
    # the schedule drops the lr at epochs 150 and 175
    opt = training.make_optimizer(cfg.optimizer, cfg.steps)
    assert opt is not None and cfg.optimizer.boundaries == (0.75, 0.875)
    smoke = run_config.load_config(path, smoke=True)
    smoke.validate()
    assert smoke.methods == cfg.methods and smoke.model.startswith("resnet18") and smoke.augment == "crop_flip"
    assert smoke.dataset == "digits" and set(smoke.strengths[method]) <= set(grid)


@pytest.mark.slow
def test_smoke_run_writes_the_sweep_outputs(tmp_path):
    path = [p for p in CONFIGS if p.endswith("cifar10_noise.py")][0]
    out = str(tmp_path / "smoke")
    # loop: one single-model program, as auto gives on a one-device CPU; auto on the faked
    # devices would shard vmapped ResNets (measured: 30% more of this test's time, same rows)
    assert run_config.main([path, "--smoke", "--out", out, "--strategy", "loop"]) == 0
    for f in ("results.csv", "figure3.png", "gradients_noise.png", "config.json", "learned/tangent_basis.npz"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    rows = list(csv.DictReader(open(os.path.join(out, "results.csv"))))
    assert len(rows) == 3 and all(r["on_change@2.64"] != "" for r in rows)
    assert all(r["bayes_cosine"] == "" and r["learned_bayes_cosine"] != "" for r in rows)


def test_missing_cifar10_fails_fast(tmp_path, capsys):
    path = [p for p in CONFIGS if p.endswith("cifar10_noise.py")][0]
    assert run_config.main([path, "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "python -m pagjax.data download cifar10" in capsys.readouterr().err
    assert run_config.main([str(tmp_path / "nope.py")]) == 2


def test_data_seed_flag_draws_other_data_and_is_checked(capsys):
    from experiments import sweep_eps
    from pagjax.experiment import load_data

    small = ["--n-train", "64", "--n-test", "16"]
    cfg0, cfg3 = (sweep_eps.config_from_args(sweep_eps.parse_args([*small, *extra])) for extra in ([], ["--data-seed", "3"]))
    assert (cfg0.data_seed, cfg3.data_seed) == (0, 3)
    d0, d3 = load_data(cfg0), load_data(cfg3)
    assert d0.x_train.shape == d3.x_train.shape and not np.allclose(d0.x_train, d3.x_train)
    np.testing.assert_array_equal(load_data(cfg3).x_train, d3.x_train)  # a draw is a function of the seed
    assert sweep_eps.main(["--data-seed", "-1", "--out", "unused"]) == 2
    assert "data_seed must be an integer" in capsys.readouterr().err


def test_default_grids_per_dataset_and_in_official_units():
    from experiments import sweep_eps
    from pagjax.experiment import default_strengths

    textbook = sweep_eps.config_from_args(sweep_eps.parse_args(["--methods", "gradnorm,pgd,noise"]))
    official = sweep_eps.config_from_args(sweep_eps.parse_args(["--methods", "gradnorm,pgd,noise", "--official",
                                                                "--batch-size", "64"]))
    np.testing.assert_allclose(official.strengths["pgd"], np.asarray(textbook.strengths["pgd"]) * 8.0)
    np.testing.assert_allclose(official.strengths["gradnorm"], np.asarray(textbook.strengths["gradnorm"]) * 64**2 / 1e5)
    assert official.strengths["noise"] == textbook.strengths["noise"]
    # real MNIST reaches chance accuracy at PGD eps 10 and noise 10: its grids go there
    assert max(default_strengths("pgd", "mnist")) >= 10 > max(default_strengths("pgd", "digits"))
    assert max(default_strengths("noise", "cifar10")) >= 10
