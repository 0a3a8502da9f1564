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

from pagjax import measure


@pytest.fixture(scope="module")
def setup():
    from pagjax.manifolds import build_manifold, make_dataset

    m = build_manifold("linear_default")
    d = make_dataset(m, jax.random.key(0), 64, 64)
    cfg = measure.MeasureConfig(num_eval=16, lpips_images=8, eps=(1.0,), num_directions=1)
    ev = measure.prepare_eval_set(d.x_test, d.y_test, m.num_classes, cfg, manifold=m, z_test=d.z_test)
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
    assert summary["alignment"] == experiment.ALIGNMENT_LABELS[column]
    # the peak is where the chosen protocol peaks: the strongest model (default), the weakest (paper)
    assert summary["peak_at"] == (1.0 if protocol == "default" else 0.1)
    with pytest.raises(ValueError):
        measure.MeasureConfig(alignment="bogus").validate()
