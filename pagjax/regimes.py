"""Labelling the three regimes of docs/theory.md §3 from measured curves.

Along a sweep of increasing robustness strength:

1. ``weak``: the off-manifold change exceeds the on-manifold change (off/on > 1);
2. ``bayes_aligned``: from the crossover (off/on <= 1) on, while the model keeps its
   on-manifold sensitivity and its accuracy;
3. ``excessive``: from the first strength past the peak of the on-manifold change where it
   has fallen below ``on_collapse`` times that peak (default: half), or the accuracy has
   fallen more than ``accuracy_collapse`` of the way from its Bayes-aligned level to
   chance (default: half way). Once excessive, stronger settings stay excessive.

The peak is taken over the points at or after the crossover, and the Bayes-aligned
accuracy is the accuracy at that peak. The on-manifold change often keeps rising after
the crossover; until its peak nothing is excessive. All inputs are curves over strengths
(means over seeds).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

WEAK, ALIGNED, EXCESSIVE = "weak", "bayes_aligned", "excessive"
REGIMES = (WEAK, ALIGNED, EXCESSIVE)


@dataclasses.dataclass(frozen=True)
class RegimeResult:
    """Labels per strength and the evidence behind the boundaries."""

    strengths: np.ndarray
    labels: tuple[str, ...]
    crossover: float | None  # strength where off/on crosses 1 (log-interpolated), None if never
    first_aligned: float | None  # first strength labelled bayes_aligned
    first_excessive: float | None  # first strength labelled excessive
    peak_on_change: float
    aligned_accuracy: float
    on_threshold: float
    accuracy_threshold: float
    reasons: tuple[str, ...]  # one short sentence per strength

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["strengths"] = self.strengths.tolist()
        return d


def _interpolate_crossover(s0, s1, r0, r1) -> float:
    """Strength where log(off/on) crosses 0 between two points (log-x when both > 0)."""
    l0, l1 = math.log(max(r0, 1e-12)), math.log(max(r1, 1e-12))
    t = l0 / (l0 - l1) if l0 != l1 else 0.5
    if s0 > 0 and s1 > 0:
        return float(math.exp(math.log(s0) + t * (math.log(s1) - math.log(s0))))
    return float(s0 + t * (s1 - s0))


def label_regimes(
    strengths,
    on_change,
    off_change,
    accuracy,
    *,
    chance: float = 0.0,
    on_collapse: float = 0.5,
    accuracy_collapse: float = 0.5,
) -> RegimeResult:
    """Label each strength weak / bayes_aligned / excessive (see the module docstring).

    Args:
      strengths: increasing strengths (S,).
      on_change, off_change: on- and off-manifold softmax change at each strength (S,).
      accuracy: clean accuracy at each strength (S,).
      chance: chance accuracy (1 / number of classes).
      on_collapse: excessive once on-change < on_collapse * its peak.
      accuracy_collapse: excessive once accuracy < aligned - accuracy_collapse * (aligned - chance).

    Returns:
      a `RegimeResult`: one label per strength (``"weak"``, ``"bayes_aligned"``,
      ``"excessive"``), the crossover strength (None if off/on never falls to 1), the first
      strength of each later regime, the thresholds used and one reason per label.
    """
    s = np.asarray(strengths, np.float64)
    on, off, acc = (np.asarray(a, np.float64) for a in (on_change, off_change, accuracy))
    if s.ndim != 1 or not (on.shape == off.shape == acc.shape == s.shape):
        raise ValueError(
            f"strengths, on_change, off_change and accuracy must be 1-D of equal length, got shapes "
            f"{s.shape}, {on.shape}, {off.shape}, {acc.shape}"
        )
    if s.size == 0:
        raise ValueError("strengths must not be empty")
    if np.any(np.diff(s) <= 0):
        raise ValueError(f"strengths must be strictly increasing, got {s.tolist()}")
    for name, v in (("on_collapse", on_collapse), ("accuracy_collapse", accuracy_collapse)):
        if not 0 < v < 1:
            raise ValueError(f"{name} must lie in (0, 1), got {v}")

    ratio = off / np.maximum(on, 1e-12)
    below = np.nonzero(ratio <= 1.0)[0]
    labels = [WEAK] * s.size
    reasons = [f"off/on = {r:.3g} > 1" for r in ratio]
    if below.size == 0:
        return RegimeResult(s, tuple(labels), None, None, None, float(on.max()), float(acc.max()),
                            math.nan, math.nan, tuple(reasons))
    c = int(below[0])
    crossover = float(s[0]) if c == 0 else _interpolate_crossover(s[c - 1], s[c], ratio[c - 1], ratio[c])
    peak = c + int(np.argmax(on[c:]))
    peak_on = float(on[peak])
    aligned_acc = float(acc[peak])
    on_thr = on_collapse * peak_on
    acc_thr = aligned_acc - accuracy_collapse * (aligned_acc - chance)
    excessive = False
    for i in range(c, s.size):
        if not excessive and i > peak and (on[i] < on_thr or acc[i] < acc_thr):
            excessive = True
        if excessive:
            labels[i] = EXCESSIVE
            reasons[i] = (f"on-change {on[i]:.3g} vs threshold {on_thr:.3g}, "
                          f"accuracy {acc[i]:.3g} vs threshold {acc_thr:.3g}")
        else:
            labels[i] = ALIGNED
            reasons[i] = f"off/on = {ratio[i]:.3g} <= 1, on-change {on[i]:.3g} >= {on_thr:.3g}"
    first = lambda lab: next((float(v) for v, l in zip(s, labels) if l == lab), None)  # noqa: E731
    return RegimeResult(s, tuple(labels), crossover, first(ALIGNED), first(EXCESSIVE), peak_on, aligned_acc,
                        on_thr, acc_thr, tuple(reasons))
