"""The sweep on real images (offline digits): learned tangent spaces and scores stand in
for the exact ones; caches are reused; missing tfds data fail fast through the CLI."""
import csv
import json
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


@pytest.mark.slow  # through the module fixture `real_run`
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


@pytest.mark.slow  # through the module fixture `real_run`
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
    # Fashion-MNIST and CIFAR-10: the defaults docs/real_images.md's table gives
    for name in ("fashion_mnist", "cifar10"):
        cfg = sweep_eps.config_from_args(sweep_eps.parse_args(["--dataset", name, "--data-dir", TINY_TFDS_DIR]))
        lc = cfg.learned
        assert (cfg.model, cfg.steps, cfg.batch_size, cfg.n_train, cfg.n_test) == ("mlp:width=256", 1000, 128, 8192, 1024)
        assert cfg.strengths["noise"] == (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0) and cfg.strengths["gradnorm"][-1] == 100
        gray = name == "fashion_mnist"  # 28x28x1 like MNIST: the dense autoencoder, a narrower score model
        assert (lc.ae_arch, lc.ae_latent, lc.ae_steps) == ("mlp" if gray else "conv", 128, 2000)
        assert lc.ae_hidden == (512,) if gray else (lc.ae_features, lc.ae_upsample) == ((32, 64), "nearest")
        assert (lc.score_backend, lc.sm_bayes) == ("score_model", "classifier")
        assert (cfg.checkpoint_every, cfg.checkpoint_seconds) == (None, 60.0)
        assert (lc.sm_channels, lc.sm_steps) == (((16, 32), 800) if gray else ((32, 64), 1000))
        cfg.validate()  # prepared under tests/data/tfds
    t = time.perf_counter()
    rc = sweep_eps.main(["--dataset", "mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    assert rc == 2 and time.perf_counter() - t < 5
    assert "python -m pagjax.data download mnist" in capsys.readouterr().err


# --------------------------------------------------------------------------- tfds data through the command line

TINY_TFDS_DIR = os.path.join(os.path.dirname(__file__), "data", "tfds")  # make_tiny_tfds.py: 20 + 10 images each
# The sweep command with each dataset's own defaults (autoencoder, EDM score model and noise
# denoiser, 128 latents unless given), only shortened: 4 steps everywhere, a checkpoint
# every 2, so a kill after the first checkpoint leaves work to resume; vmap, not auto's
# sharding over the faked devices (fewer compilations; the sharded sweep: test_sweep.py).
TINY_CLI = ["--methods", "noise", "--strengths", "0,1", "--seeds", "0", "--steps", "4", "--batch-size", "10",
            "--ae-steps", "4", "--denoiser-steps", "4", "--score-model-steps", "4", "--ae-latent", "4", "--no-lpips", "--model", "mlp:width=16",
            "--checkpoint-every", "2", "--data-dir", TINY_TFDS_DIR, "--strategy", "vmap"]


class Killed(BaseException):
    """Stands for a kill or Ctrl-C right after a checkpoint: nothing in the sweep catches it."""


@pytest.fixture
def checkpoints(monkeypatch):
    """`kill_after(folder, step)` makes the save of `step` into a checkpoint folder whose name
    starts with `folder` the last thing a run does; `restored` records (folder, step) of every
    restore (step None: nothing to restore, a fresh start)."""
    from pagjax import io as io_lib

    save, restore = io_lib.Checkpointer.save, io_lib.Checkpointer.restore_latest
    kill, restored = {}, []

    def save_then_die(self, step, tree):
        save(self, step, tree)
        if os.path.basename(self.directory).startswith(kill.get("folder", "\0")) and step == kill["step"]:
            kill.clear()
            raise Killed(f"killed after the checkpoint of step {step} in {self.directory}")

    def recording(self, like):
        out = restore(self, like)
        restored.append((os.path.basename(self.directory).split("-")[0], None if out is None else out[0]))
        return out

    monkeypatch.setattr(io_lib.Checkpointer, "save", save_then_die)
    monkeypatch.setattr(io_lib.Checkpointer, "restore_latest", recording)

    class Control:
        def kill_after(self, folder, step):
            kill.update(folder=folder, step=step)

    control = Control()
    control.restored = restored
    return control


def _results(out):
    with open(os.path.join(out, "results.csv")) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_cifar10_sweep_from_the_command_line_shows_every_phase_and_resumes_a_killed_run(tmp_path, capsys, checkpoints):
    from experiments import sweep_eps

    out = str(tmp_path / "cifar10")
    argv = ["--dataset", "cifar10", "--out", out, *TINY_CLI]
    checkpoints.kill_after("noise", 2)  # the classifiers' first checkpoint, after every learned phase
    with pytest.raises(Killed):
        sweep_eps.main(argv)
    first = capsys.readouterr()
    # each phase said it started and moved: data, autoencoder, tangent basis, score model, the method
    assert "loading cifar10 train" in first.err and "loading cifar10 test" in first.err
    assert "data: cifar10, 20 train + 10 test examples of shape 32x32x3" in first.out
    assert "autoencoder: training 4 steps (conv, 4 latents)" in first.out and "autoencoder: 100%" in first.err
    assert "tangent basis: 10 eval images" in first.out
    assert "score model: training 4 steps (U-Net, channels [32, 64])" in first.out and "score model: 100%" in first.err
    assert "noise classifier: 100%" in first.err
    # the instrument's quality beside the noisy input and the best linear denoiser, per sigma
    report = json.load(open(os.path.join(out, "learned", "score_model_denoising.json")))
    assert [r["sigma"] for r in report] == [0.1, 0.3, 0.5, 1.0] and "ratio_to_wiener" in first.out
    # the noisy input's per-pixel MSE is sigma^2 (10 images x 3072 pixels: ~1% Monte Carlo error)
    assert all(abs(r["mse_noisy"] / r["sigma"] ** 2 - 1) < 0.1 and r["ratio_to_wiener"] > 0 for r in report)
    assert "noise: compiling" in first.err  # killed right after its checkpoint, before the bar moved
    assert not os.path.exists(os.path.join(out, "results.csv"))

    assert sweep_eps.main(argv) == 0  # the same command again
    second = capsys.readouterr()
    assert "autoencoder: loaded from cache" in second.out and "score model: loaded from cache" in second.out
    assert "learned Bayes maps: loaded from cache" in second.out  # the noise classifier is not retrained
    assert "score model denoising report: loaded from cache" in second.out
    assert "noise: resuming from the checkpoint at step 2 of 4" in second.out
    assert ("noise", 2) in checkpoints.restored  # from the checkpoint, not from step 0
    assert "noise step 4/4" in second.err and "noise step 2/4" not in second.err
    assert "noise: 2 models trained and measured" in second.out
    rows = _results(out)
    assert [(r["method"], float(r["strength"])) for r in rows] == [("noise", 0.0), ("noise", 1.0)]
    assert all(r["accuracy"] != "" and r["learned_bayes_cosine"] != "" for r in rows)
    for name in ("figure3.png", "gradients_noise.png", "learned/autoencoder/config.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name


@pytest.mark.slow
def test_fashion_mnist_sweep_resumes_a_run_killed_while_learning_its_score(tmp_path, capsys, checkpoints):
    from experiments import sweep_eps

    out = str(tmp_path / "fashion_mnist")
    argv = ["--dataset", "fashion_mnist", "--out", out, *TINY_CLI]
    checkpoints.kill_after("score_model", 2)  # learned/score_model/training/score_model-<settings digest>
    with pytest.raises(Killed):
        sweep_eps.main(argv)
    first = capsys.readouterr()
    assert "loading fashion_mnist train" in first.err
    assert "data: fashion_mnist, 20 train + 10 test examples of shape 28x28x1" in first.out
    assert "autoencoder: trained 4 steps" in first.out and "score model: trained" not in first.out

    assert sweep_eps.main([*argv, "--no-progress"]) == 0  # --no-progress: the phase lines, no bars
    second = capsys.readouterr()
    assert "data: fashion_mnist, 20 train + 10 test" in second.out and "loading" not in second.err
    assert "autoencoder: loaded from cache" in second.out
    assert "score model: resuming from the checkpoint at step 2 of 4" in second.out
    assert ("score_model", 2) in checkpoints.restored
    assert "score model: trained 4 steps" in second.out and "noise: 2 models trained and measured" in second.out
    assert "%|" not in second.err
    assert len(_results(out)) == 2
