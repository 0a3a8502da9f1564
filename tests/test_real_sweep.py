"""The sweep on real images (offline digits): learned tangent spaces and scores stand in
for the exact ones; caches are reused; missing tfds data fail fast through the CLI."""
import csv
import os
import time

import numpy as np
import pytest

from pagjax.experiment import LearnedConfig, SweepConfig, run_sweep
from pagjax.measure import MeasureConfig
from pagjax.regimes import label_regimes

TINY_REAL = SweepConfig(
    methods=("noise",), strengths={"noise": (0.0, 1.0)}, seeds=(0,), dataset="digits", dataset_kwargs={},
    n_train=512, n_test=64, model="mlp:width=32", steps=40, batch_size=64, steps_per_call=20, checkpoint_every=20,
    learned=LearnedConfig(ae_latent=6, ae_hidden=(32,), ae_steps=60, den_width=32, den_depth=1, den_steps=60),
    measure=MeasureConfig(num_eval=24, num_directions=1, lpips=False, grid_images=3),
)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("digits"))
    logs = []
    summaries = run_sweep(TINY_REAL, out, progress=False, log=logs.append)
    with open(os.path.join(out, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    return out, summaries, rows, logs


def test_digits_sweep_writes_outputs_with_learned_geometry(real_run):
    out, summaries, rows, logs = real_run
    for name in ("results.csv", "figure3.png", "gradients_noise.png", "learned/tangent_basis.npz",
                 "learned/autoencoder/config.json", "learned/denoiser/config.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert len(rows) == 2 and float(rows[0]["accuracy"]) > 0.3  # 10 classes: chance 0.1
    # noise of std 1 on images in [0, 1] costs accuracy (measured 0.66 -> 0.30)
    assert float(rows[1]["accuracy"]) < float(rows[0]["accuracy"]) - 0.1
    for r in rows:
        v = {k: float(x) for k, x in r.items() if k.startswith(("on_change", "off_change", "off_on"))}
        assert r["bayes_cosine"] == "" and r["bayes_accuracy"] == ""  # exact quantities: unknown
        assert r["score_cosine"] != "" and r["learned_bayes_cosine"] != ""  # learned ones: measured
        assert float(r["random_fraction"]) == pytest.approx(np.sqrt(6 / 64))  # k = 6 latents, d = 64
        # the regime columns are the changes at regime_eps = 1, and off/on is their ratio
        assert v["on_change"] == v["on_change@1"] and v["off_change"] == v["off_change@1"]
        assert v["off_on_ratio"] == pytest.approx(v["off_change"] / v["on_change"], rel=1e-5)
        # small perturbations: the change grows about linearly with eps (measured ratios 1.85-1.98)
        for side in ("on_change", "off_change"):
            assert v[f"{side}@0.5"] < v[f"{side}@1"] < v[f"{side}@2"]
            assert 1.5 < v[f"{side}@2"] / v[f"{side}@1"] < 2.5, (side, v)
    # the labels are those of the regime rules applied to these rows
    f = lambda col: [float(r[col]) for r in rows]  # noqa: E731
    labels = label_regimes(f("strength"), f("on_change"), f("off_change"), f("accuracy"), chance=0.1).labels
    assert [r["regime"] for r in rows] == list(labels)
    # the learned tangent spaces: one orthonormal 64 x 6 basis per evaluation image
    basis = np.load(os.path.join(out, "learned", "tangent_basis.npz"))["basis"]
    assert basis.shape == (24, 64, 6)
    np.testing.assert_allclose(np.einsum("ndk,ndl->nkl", basis, basis), np.broadcast_to(np.eye(6), (24, 6, 6)),
                               atol=1e-5)
    assert summaries[0]["alignment"] == "learned Bayes gradient"
    assert any(line.startswith("autoencoder: trained") for line in logs)


def test_rerun_loads_the_cached_autoencoder_and_denoiser(real_run, tmp_path):
    out, _, rows, _ = real_run
    logs = []
    cfg = SweepConfig(**{**TINY_REAL.__dict__, "strengths": {"noise": (0.0, 1.0, 2.0)}})
    run_sweep(cfg, out, overwrite=True, progress=False, log=logs.append)
    assert "autoencoder: loaded from cache" in logs and "denoiser: loaded from cache" in logs
    with open(os.path.join(out, "results.csv")) as f:
        again = list(csv.DictReader(f))
    # same learned geometry, same model at strength 0: same measurements
    assert again[0]["grad_on_manifold_fraction"] == rows[0]["grad_on_manifold_fraction"]
    assert again[0]["score_cosine"] == rows[0]["score_cosine"]


def test_real_dataset_config_checks(tmp_path):
    with pytest.raises(ValueError, match="ae_latent"):
        SweepConfig(**{**TINY_REAL.__dict__, "learned": LearnedConfig(ae_latent=100)}).validate()
    with pytest.raises(ValueError, match="augment"):
        SweepConfig(**{**TINY_REAL.__dict__, "augment": "mixup"}).validate()
    t = time.perf_counter()
    with pytest.raises(ValueError, match="not prepared|does not exist"):
        SweepConfig(**{**TINY_REAL.__dict__, "dataset": "cifar10", "data_dir": str(tmp_path)}).validate()
    assert time.perf_counter() - t < 5
    # data_dir and download are execution details, not settings
    a = SweepConfig(**{**TINY_REAL.__dict__, "data_dir": "/x"}).settings()
    assert a == TINY_REAL.settings() and "data_dir" not in a


def test_sweep_cli_accepts_real_datasets(tmp_path, capsys):
    from experiments import sweep_eps

    args = sweep_eps.parse_args(["--dataset", "digits", "--methods", "noise", "--seeds", "0"])
    cfg = sweep_eps.config_from_args(args)
    assert cfg.dataset == "digits" and cfg.dataset_kwargs == {} and cfg.learned.ae_latent == 8
    assert cfg.steps == 600 and cfg.strengths["noise"][0] == 0.01
    cfg.validate()
    t = time.perf_counter()
    rc = sweep_eps.main(["--dataset", "mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    assert rc == 2 and time.perf_counter() - t < 5
    assert "python -m pagjax.data download mnist" in capsys.readouterr().err
