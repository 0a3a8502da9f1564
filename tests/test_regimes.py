import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pagjax.regimes import ALIGNED, EXCESSIVE, WEAK, label_regimes


def synthetic_curves(n_weak, n_aligned, n_excessive):
    """Curves with known boundaries: off > on, then off < on with on kept, then on collapses."""
    n = n_weak + n_aligned + n_excessive
    s = np.logspace(-3, 2, n)
    on = np.concatenate([np.full(n_weak, 0.2), np.full(n_aligned, 0.3), np.full(n_excessive, 0.05)])
    off = np.concatenate([np.full(n_weak, 0.6), np.full(n_aligned, 0.1), np.full(n_excessive, 0.01)])
    acc = np.concatenate([np.full(n_weak, 0.95), np.full(n_aligned, 0.9), np.full(n_excessive, 0.85)])
    return s, on, off, acc


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 5), st.integers(1, 5), st.integers(0, 5))
def test_recovers_known_boundaries(n_weak, n_aligned, n_excessive):
    s, on, off, acc = synthetic_curves(n_weak, n_aligned, n_excessive)
    r = label_regimes(s, on, off, acc, chance=0.25)
    assert r.labels == (WEAK,) * n_weak + (ALIGNED,) * n_aligned + (EXCESSIVE,) * n_excessive
    assert r.first_aligned == s[n_weak]
    assert r.first_excessive == (s[n_weak + n_aligned] if n_excessive else None)
    if n_weak:
        assert s[n_weak - 1] < r.crossover < s[n_weak]


def test_crossover_is_log_interpolated():
    r = label_regimes([0.1, 1.0], [1.0, 2.0], [2.0, 1.0], [0.9, 0.9])
    # log ratio goes from log 2 to -log 2: crosses half way in log strength.
    np.testing.assert_allclose(r.crossover, np.sqrt(0.1 * 1.0))


def test_accuracy_collapse_alone_marks_excessive():
    s = [0.01, 0.1, 1.0, 10.0]
    r = label_regimes(s, [0.1, 0.3, 0.3, 0.3], [0.5, 0.1, 0.1, 0.1], [0.9, 0.9, 0.85, 0.4], chance=0.25)
    assert r.labels == (WEAK, ALIGNED, ALIGNED, EXCESSIVE)
    assert "accuracy 0.4" in r.reasons[-1]


def test_on_change_still_rising_after_the_crossover_is_not_excessive():
    """Off/on < 1 while on-change is far below its later peak: Bayes-aligned, not excessive."""
    s = [1e-3, 1e-2, 1e-1, 1.0, 10.0]
    on = [0.02, 0.05, 0.2, 0.15, 0.01]
    off = [0.08, 0.04, 0.03, 0.01, 0.001]
    acc = [0.99, 0.98, 0.9, 0.8, 0.4]
    r = label_regimes(s, on, off, acc, chance=0.25)
    assert r.labels == (WEAK, ALIGNED, ALIGNED, ALIGNED, EXCESSIVE)
    assert r.peak_on_change == 0.2 and r.aligned_accuracy == 0.9


def test_excessive_is_absorbing():
    r = label_regimes([1, 2, 3, 4], [0.5, 0.5, 0.1, 0.5], [0.1, 0.1, 0.01, 0.1], [0.9] * 4)
    assert r.labels == (ALIGNED, ALIGNED, EXCESSIVE, EXCESSIVE)


def test_never_crossing_is_all_weak():
    r = label_regimes([1, 2], [0.1, 0.1], [0.5, 0.4], [0.9, 0.9])
    assert r.labels == (WEAK, WEAK) and r.crossover is None and r.first_excessive is None


@pytest.mark.parametrize(
    "args, match",
    [
        (([1, 2], [1], [1, 2], [1, 2]), "equal length"),
        (([2, 1], [1, 1], [1, 1], [1, 1]), "increasing"),
        (([], [], [], []), "empty"),
    ],
)
def test_bad_curves_raise(args, match):
    with pytest.raises(ValueError, match=match):
        label_regimes(*args)


def test_bad_thresholds_raise():
    with pytest.raises(ValueError, match="on_collapse"):
        label_regimes([1], [1], [1], [1], on_collapse=1.5)
