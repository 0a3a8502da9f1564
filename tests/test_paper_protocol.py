"""The paper's alignment protocol in `pagjax.measure` (Srinivas et al. 2023, §5): 1 - LPIPS
between the input-gradient of the sum of the logits and the unconditional score at
sigma = 0.5, each map scaled by its max |value|.

A "classifier" whose logits sum to log p_0.5(x) has exactly the score as that gradient, so
it must reach cosine 1 and 1 - LPIPS = 1; a random linear model must not.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagjax import measure, metrics


@pytest.fixture(scope="module")
def setup():
    from pagjax.manifolds import build_manifold, make_dataset

    m = build_manifold("linear_default")
    d = make_dataset(m, jax.random.key(0), 64, 64)
    cfg = measure.MeasureConfig(num_eval=16, lpips_images=8, eps=(1.0,), num_directions=1)
    ev = measure.prepare_eval_set(d.x_test, d.y_test, m.num_classes, cfg, manifold=m, z_test=d.z_test,
                                  key=jax.random.key(1))
    return m, d, cfg, ev


def test_paper_maps_are_the_exact_unconditional_score(setup):
    m, d, cfg, ev = setup
    np.testing.assert_allclose(ev.paper_score_maps, m.score(ev.x, cfg.paper_noise), rtol=1e-5, atol=1e-5)


def test_paper_alignment_is_one_for_the_score_and_lower_for_a_random_model(setup):
    m, d, cfg, ev = setup
    c = m.num_classes

    def score_logits(v, x):  # logits summing to log p_s(x): their gradient is the score
        return jnp.repeat(m.log_marginal(x, cfg.paper_noise)[:, None], c, 1) / c

    row, _ = measure.measure_model(score_logits, None, ev, cfg, jax.random.key(1))
    assert row["paper_score_cosine"] == pytest.approx(1.0, abs=1e-4)
    assert row["paper_lpips_alignment"] == pytest.approx(1.0, abs=1e-3)
    w = jax.random.normal(jax.random.key(2), (int(np.prod(m.image_shape)), c))
    rand_row, _ = measure.measure_model(lambda v, x: x.reshape(x.shape[0], -1) @ v, w, ev, cfg, jax.random.key(1))
    assert abs(rand_row["paper_score_cosine"]) < 0.5
    assert rand_row["paper_lpips_alignment"] < row["paper_lpips_alignment"] - 0.05


@pytest.mark.parametrize("protocol,column", [("default", "bayes_cosine"), ("paper", "paper_lpips_alignment")])
def test_sweep_alignment_curve_follows_the_protocol(protocol, column):
    from pagjax import experiment

    strengths = (0.1, 0.3, 1.0)
    cfg = experiment.SweepConfig(methods=("noise",), strengths={"noise": strengths}, seeds=(0,),
                                 measure=measure.MeasureConfig(alignment=protocol))
    rows = [{"method": "noise", "strength": s, "seed": 0, "diverged": False, "accuracy": 0.9, "on_change": 0.1,
             "off_change": 0.1, "bayes_cosine": 0.1 * i, "paper_lpips_alignment": 0.5 - 0.1 * i,
             "paper_score_cosine": 0.2} for i, s in enumerate(strengths)]
    curves, _ = experiment.method_curves(rows, cfg, "noise", 4)
    assert curves["alignment_column"] == column
    summary = experiment.summarize(curves, None, "noise")
    assert summary["alignment"] == metrics.alignment_labels()[column]
    # the peak is where the chosen protocol peaks: the strongest model (default), the weakest (paper)
    assert summary["peak_at"] == (1.0 if protocol == "default" else 0.1)
    with pytest.raises(ValueError):
        measure.MeasureConfig(alignment="bogus").validate()


@pytest.mark.slow
def test_digits_sweep_with_the_score_model_and_the_paper_protocol(tmp_path):
    import csv
    import dataclasses
    import os

    from pagjax.experiment import LearnedConfig, SweepConfig, run_sweep

    cfg = SweepConfig(
        methods=("noise",), strengths={"noise": (0.0, 1.0)}, seeds=(0,), dataset="digits", dataset_kwargs={},
        n_train=256, n_test=32, model="mlp:width=32", steps=20, batch_size=64, steps_per_call=20, checkpoint_every=20,
        learned=LearnedConfig(ae_latent=6, ae_hidden=(32,), ae_steps=20, score_backend="score_model",
                              sm_channels=(8, 16), sm_steps=10, sm_bayes="classifier"),
        measure=measure.MeasureConfig(num_eval=16, num_directions=1, lpips=False, grid_images=3, alignment="paper"),
    )
    logs = []
    summaries = run_sweep(cfg, str(tmp_path), progress=False, log=logs.append)
    assert any(line.startswith("score model: trained") for line in logs)
    assert any(line.startswith("noise classifier: trained and applied") for line in logs)  # the learned Bayes gradient
    with open(os.path.join(tmp_path, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert all(np.isfinite(float(r["paper_score_cosine"])) for r in rows)
    assert all(np.isfinite(float(r["learned_bayes_cosine"])) for r in rows)
    assert all(r["paper_lpips_alignment"] == "" for r in rows)  # lpips off: empty, not made up
    assert summaries[0]["alignment"] == "paper: cosine(grad logit sum, unconditional score)"
    assert os.path.isfile(os.path.join(tmp_path, "gradients_noise.png"))
    # a rerun with more strengths reuses the cached score model
    logs2 = []
    cfg2 = dataclasses.replace(cfg, strengths={"noise": (0.0, 1.0, 2.0)})
    run_sweep(cfg2, str(tmp_path), overwrite=True, progress=False, log=logs2.append)
    assert "score model: loaded from cache" in logs2
