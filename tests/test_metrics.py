"""The metric registry (`pagjax.metrics`): closed-form values of the built-in metrics,
`measure_model` rows holding exactly the registry's columns, the registry's errors, and
adding a metric (docs/extending.md, "Add a metric") from this file alone."""
import csv
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import linear_apply
from pagjax import alignment, experiment, gradients, measure, metrics, numerics

D, K, N = 6, 3, 8  # pixels, classes, eval images
CFG = measure.MeasureConfig(num_eval=N, eps=(0.5, 1.0), regime_eps=1.0, num_directions=1, lpips=False, grid_images=2)


def _data():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(N, D)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, K, size=N).astype(np.int32))
    return x, y


def _tangent_basis():
    """The first two coordinate axes of R^6: a flat manifold, tangent basis (d, k)."""
    return jnp.eye(D, dtype=jnp.float32)[:, :2]


def _linear_model(rows_in_span_of):
    """A linear model whose weight rows lie in the span of the given (d, m) columns: its
    log-probability gradients W^T (e_y - p) then lie in that span too."""
    coef = jax.random.normal(jax.random.key(1), (K, rows_in_span_of.shape[1]))
    return {"W": coef @ rows_in_span_of.T, "b": jnp.zeros((K,))}


@pytest.mark.parametrize("span,expected", [("tangent", 1.0), ("normal", 0.0)])
def test_on_manifold_fraction_is_one_in_the_tangent_space_and_zero_off_it(span, expected):
    x, y = _data()
    basis = _tangent_basis()
    normal = jnp.eye(D, dtype=jnp.float32)[:, 2:]
    params = _linear_model(basis if span == "tangent" else normal)
    ev = measure.prepare_eval_set(x, y, K, CFG, basis=basis)
    row, _ = measure.measure_model(linear_apply, params, ev, CFG, jax.random.key(0))
    assert row["grad_on_manifold_fraction"] == pytest.approx(expected, abs=1e-5)
    assert row["random_fraction"] == pytest.approx(np.sqrt(2 / D), rel=1e-5)
    # a model varying only along the manifold does not change under normal perturbations
    if span == "tangent":
        assert row["off_change"] == pytest.approx(0.0, abs=1e-6) and row["on_change"] > 0
        assert row["off_on_ratio"] == pytest.approx(0.0, abs=1e-5)


def test_cosine_of_a_map_with_itself_is_one_and_measure_agrees_with_grad_align():
    x, y = _data()
    params = _linear_model(jnp.eye(D, dtype=jnp.float32))
    own = gradients.input_gradients(linear_apply, params, x, y)
    assert float(metrics.mean_alignment(own, own, "cosine")) == pytest.approx(1.0, abs=1e-6)
    assert float(metrics.mean_alignment(own, -own, "cosine")) == pytest.approx(-1.0, abs=1e-6)
    ev = measure.prepare_eval_set(x, y, K, CFG, score_maps=own)
    row, grid = measure.measure_model(linear_apply, params, ev, CFG, jax.random.key(0))
    assert row["score_cosine"] == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(grid, own[: CFG.grid_images], rtol=1e-6)
    # the same number through grad_align's path, against other maps
    other = jax.random.normal(jax.random.key(3), x.shape)
    ev = measure.prepare_eval_set(x, y, K, CFG, score_maps=other)
    row, _ = measure.measure_model(linear_apply, params, ev, CFG, jax.random.key(0))
    via_grad_align = alignment.grad_align(linear_apply, params, x, y, score=other, metrics="cosine")
    assert row["score_cosine"] == pytest.approx(float(via_grad_align.mean["cosine"]), abs=1e-6)


def test_a_row_holds_every_registered_column_empty_where_needs_are_unmet():
    x, y = _data()
    params = _linear_model(jnp.eye(D, dtype=jnp.float32))
    ev = measure.prepare_eval_set(x, y, K, CFG)  # no basis, no maps: only accuracy is measurable
    row, _ = measure.measure_model(linear_apply, params, ev, CFG, jax.random.key(0))
    assert tuple(row) == metrics.columns(CFG)
    assert "on_change@0.5" in row and "off_change@1" in row
    assert 0.0 <= row["accuracy"] <= 1.0
    assert all(v is None for k, v in row.items() if k != "accuracy")
    assert metrics.REGISTRY["manifold_change"].missing(ev, CFG) == ("basis",)


def test_results_columns_and_figure_labels_derive_from_the_registry():
    cols = experiment.result_columns(CFG)
    assert cols[:3] == experiment.ID_COLUMNS and cols[-2:] == experiment.STATUS_COLUMNS
    assert len(set(cols)) == len(cols)
    for old in ("accuracy", "bayes_accuracy", "on_change", "off_change", "off_on_ratio", "grad_on_manifold_fraction",
                "random_fraction", "bayes_fraction", "score_cosine", "bayes_cosine", "lpips_alignment",
                "robust_accuracy", "learned_bayes_cosine", "paper_score_cosine", "paper_lpips_alignment"):
        assert old in cols
    labels, curve_labels = metrics.alignment_labels(), metrics.alignment_curve_labels()
    assert labels["bayes_cosine"] == "exact Bayes gradient"
    assert curve_labels["learned_bayes_cosine"] == "cosine with LEARNED Bayes gradient"
    assert set(labels) == set(curve_labels)


def _toy(name="toy", needs=(), columns=("toy",), fn=None):
    return metrics.Metric(name, needs, fn or (lambda inp: {"toy": 0.0}), columns)


def test_registry_errors_name_the_problem():
    with pytest.raises(ValueError, match="'exact_density'.*not known needs"):
        metrics.register(_toy(needs=("exact_density",)))
    with pytest.raises(ValueError, match="'accuracy' is already registered"):
        metrics.register(_toy(name="accuracy"))
    with pytest.raises(ValueError, match="column 'score_cosine'.*already written by metric 'score_cosine'"):
        metrics.register(_toy(columns=("score_cosine",)))
    with pytest.raises(KeyError, match="no metric named 'toy'"):
        metrics.unregister("toy")
    assert "toy" not in metrics.REGISTRY  # a refused registration leaves no trace

    # a function returning a column it did not declare (or missing one) is refused, by name
    x, y = _data()
    ev = measure.prepare_eval_set(x, y, K, CFG)
    inputs = metrics.MetricInputs(linear_apply, _linear_model(jnp.eye(D)), ev, CFG, jax.random.key(0))
    with pytest.raises(ValueError, match=r"'toy' returned undeclared columns \['tyo'\].*lacks.*\['toy'\]"):
        metrics.evaluate(_toy(fn=lambda inp: {"tyo": 1.0}), inputs)


# --------------------------------------------------------------------------- adding a metric
# The docs/extending.md example: a metric is one Metric and one register call.


def grad_l2_norm(inputs: metrics.MetricInputs) -> dict:
    """Mean L2 norm of the model's input-gradients (a saturated model's is near 0)."""
    return {"grad_l2_norm": jnp.mean(numerics.per_example_norm(inputs.grads))}


@pytest.fixture
def toy_metric():
    metric = metrics.register(metrics.Metric("grad_l2_norm", (), grad_l2_norm, ("grad_l2_norm",)))
    try:
        yield metric
    finally:  # undo the registration: other tests see the built-in registry
        metrics.unregister("grad_l2_norm")


def test_a_registered_metric_reaches_the_row_and_results_csv(toy_metric, tmp_path):
    x, y = _data()
    params = _linear_model(jnp.eye(D, dtype=jnp.float32))
    ev = measure.prepare_eval_set(x, y, K, CFG)
    row, _ = measure.measure_model(linear_apply, params, ev, CFG, jax.random.key(0))
    g = gradients.input_gradients(linear_apply, params, x, y)
    assert row["grad_l2_norm"] == pytest.approx(float(np.mean(np.linalg.norm(np.asarray(g), axis=1))), rel=1e-5)

    cfg = experiment.SweepConfig(
        methods=("noise",), strengths={"noise": (0.1,)}, seeds=(0,), n_train=128, n_test=32, model="mlp:width=8",
        steps=10, batch_size=32, steps_per_call=10, checkpoint_every=10,
        measure=measure.MeasureConfig(num_eval=8, eps=(1.0,), num_directions=1, lpips=False, grid_images=2))
    experiment.run_sweep(cfg, str(tmp_path), progress=False, log=lambda s: None)
    with open(os.path.join(tmp_path, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert "grad_l2_norm" in rows[0] and float(rows[0]["grad_l2_norm"]) > 0


def test_the_registration_was_undone():
    assert "grad_l2_norm" not in metrics.REGISTRY and "grad_l2_norm" not in experiment.result_columns(CFG)


def test_accuracy_counts_every_example_once_whatever_the_batch_size():
    # a linear "model" whose prediction is known: class 1 when the first pixel exceeds 0.5
    apply_fn = lambda w, x: jnp.stack([0.5 - x[:, 0, 0, 0], x[:, 0, 0, 0] - 0.5], -1) * w  # noqa: E731
    x = jnp.linspace(0.0, 1.0, 37).reshape(37, 1, 1, 1)
    y = jnp.zeros(37, jnp.int32).at[:10].set(1)  # some right, some wrong
    truth = (np.asarray(x[:, 0, 0, 0] > 0.5).astype(int) == np.asarray(y)).mean()
    for batch_size in (5, 16, 37, 100):
        assert metrics.accuracy(apply_fn, 1.0, x, y, batch_size=batch_size) == pytest.approx(truth)
