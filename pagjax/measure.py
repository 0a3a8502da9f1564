"""Everything measured on one trained model, against an evaluation set prepared once.

`prepare_eval_set` does the per-dataset work a single time (the eval subset, the tangent
basis, the score and Bayes-gradient maps at the alignment noise level, the Bayes-optimal
accuracy, the LPIPS network); `measure_model` then measures any number of models
against it, evaluating every metric of the registry `pagjax.metrics` whose needs the eval
set meets (the built-in ones below; docs/extending.md shows how to add one):

* ``accuracy`` on the whole test set (and ``bayes_accuracy``, where the density is known);
* on/off-manifold softmax change (L1, docs/theory.md §5) at every eps of
  ``eps``, averaged over images and ``num_directions`` random directions, and their ratio
  at ``regime_eps``;
* ``grad_on_manifold_fraction`` ||P g|| / ||g|| of the input-gradient of ``target``
  (``random_fraction`` = sqrt(k/d) and ``bayes_fraction``, the exact Bayes gradient's at
  ``align_noise``, beside it);
* ``score_cosine``: cosine of that gradient with the class-conditional score
  grad log p_s(x|y) at ``align_noise``; ``bayes_cosine``: with the exact Bayes-optimal
  gradient grad log p_s(y|x) at ``align_noise`` (the theory's prediction);
* ``lpips_alignment``: 1 - LPIPS (AlexNet, maps scaled by their max |value|, images
  upsampled to 32 px when smaller) between the gradient and the Bayes gradient;
* on real images, where no exact density is known, `prepare_eval_set` takes learned maps
  instead: ``score_maps`` (a learned class-conditional score, giving ``score_cosine``) and
  ``learned_bayes_maps`` (a learned Bayes gradient, giving ``learned_bayes_cosine`` and the
  LPIPS alignment); ``bayes_cosine`` and ``bayes_accuracy`` then stay empty;
* optionally ``robust_accuracy`` under L2 PGD of radius ``pgd_eps``;
* the paper's protocol (Srinivas et al. 2023, §5), where ``paper_score_maps`` (the
  *unconditional* score grad log p_s(x) at ``paper_noise`` = 0.5: exact on a known manifold,
  learned on real images) are available: ``paper_lpips_alignment`` = 1 - LPIPS (AlexNet,
  both maps scaled by their max |value|) between the input-gradient of the *sum of the
  logits* and that score, and ``paper_score_cosine`` their cosine. The project's default
  (``lpips_alignment``, ``bayes_cosine``) compares the gradient of log p(y|x) with the Bayes
  gradient instead; the two can disagree because the pull towards the data manifold is in
  the score, not in any classifier's gradient.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pagjax import gradients, validation
from pagjax import metrics as metrics_lib

Array = jax.Array
# "default": grad log p(y|x) vs the Bayes gradient (exact, or learned on real images);
# "paper": 1 - LPIPS between grad of the logit sum and the unconditional score at paper_noise
ALIGNMENT_PROTOCOLS = ("default", "paper")


@dataclasses.dataclass(frozen=True)
class MeasureConfig:
    """What to measure and on how many images."""

    eps: tuple[float, ...] = (0.5, 1.0, 2.0)
    regime_eps: float = 1.0
    num_directions: int = 4
    num_eval: int = 256
    align_noise: float = 0.3
    target: str = "logprob"
    lpips: bool = True
    lpips_images: int = 64
    pgd_eps: float | None = None
    pgd_steps: int = 10
    grid_images: int = 6
    paper_noise: float = 0.5  # the paper protocol's noise level (EDM sigma)
    alignment: str = "default"  # the figure's/summary's alignment protocol: "default" or "paper"

    def validate(self):
        if not self.eps:
            raise ValueError("eps must list at least one perturbation size")
        for e in self.eps:
            validation.check_positive("eps", e)
        if self.regime_eps not in self.eps:
            raise ValueError(f"regime_eps {self.regime_eps} must be one of eps {list(self.eps)}")
        validation.check_positive_int("num_directions", self.num_directions)
        validation.check_positive_int("num_eval", self.num_eval)
        validation.check_positive("align_noise", self.align_noise)
        validation.check_choice("target", self.target, gradients.TARGETS)
        validation.check_positive_int("lpips_images", self.lpips_images)
        validation.check_positive_int("grid_images", self.grid_images)
        validation.check_positive("paper_noise", self.paper_noise)
        validation.check_choice("alignment", self.alignment, ALIGNMENT_PROTOCOLS)
        if self.pgd_eps is not None:
            validation.check_positive("pgd_eps", self.pgd_eps)


@dataclasses.dataclass
class EvalSet:
    """Per-dataset quantities shared by every model's measurement."""

    x_test: Array
    y_test: Array
    x: Array  # eval subset
    y: Array
    basis: Array | None
    score_maps: Array | None
    bayes_maps: Array | None
    bayes_accuracy: float | None
    num_classes: int
    lpips_net: Any = None
    learned_bayes_maps: Array | None = None  # real data: a learned Bayes gradient (not exact)
    paper_score_maps: Array | None = None  # unconditional score at paper_noise (the paper's reference)


def prepare_eval_set(x_test, y_test, num_classes: int, config: MeasureConfig, *, manifold=None, z_test=None,
                     basis=None, key=None, score_maps=None, learned_bayes_maps=None,
                     paper_score_maps=None) -> EvalSet:
    """Prepare the evaluation set once. With a known `manifold` the tangent basis, the
    exact score and Bayes maps and the Bayes-optimal accuracy (a Monte-Carlo estimate: pass
    its `key`, required with a manifold) come from it; otherwise pass a
    learned `basis` (or None to skip the manifold measurements) and optionally learned
    ``score_maps`` / ``learned_bayes_maps`` / ``paper_score_maps`` (a learned unconditional
    score at ``paper_noise``, for the paper's protocol) for the first ``num_eval`` test images."""
    config.validate()
    n = min(config.num_eval, x_test.shape[0])
    x, y = jnp.asarray(x_test[:n]), jnp.asarray(y_test[:n])
    for name, maps in (("score_maps", score_maps), ("learned_bayes_maps", learned_bayes_maps),
                       ("paper_score_maps", paper_score_maps)):
        if maps is not None and tuple(maps.shape) != tuple(x.shape):
            raise ValueError(f"{name} must have the eval images' shape {tuple(x.shape)}, got {tuple(maps.shape)}")
    if manifold is not None and (score_maps is not None or learned_bayes_maps is not None
                                 or paper_score_maps is not None):
        raise ValueError("pass either manifold (exact maps) or learned score_maps / learned_bayes_maps, not both")
    score_maps = None if score_maps is None else jnp.asarray(score_maps)
    learned_bayes_maps = None if learned_bayes_maps is None else jnp.asarray(learned_bayes_maps)
    paper_score_maps = None if paper_score_maps is None else jnp.asarray(paper_score_maps)
    bayes_maps = bayes_acc = None
    if manifold is not None:
        if basis is None:
            basis = getattr(manifold, "basis", None)
            if basis is None:
                basis = manifold.tangent_basis(jnp.asarray(z_test[:n]))
        s = config.align_noise
        score_maps = manifold.class_score(x, y, s)
        bayes_maps = manifold.bayes_gradient(x, y, s)
        paper_score_maps = manifold.score(x, config.paper_noise)
        if key is None:
            raise ValueError("key is required with a manifold: it draws the Bayes accuracy's Monte-Carlo samples")
        bayes_acc = float(manifold.bayes_accuracy(key, 0.0))
    lpips_net = None
    if config.lpips and (bayes_maps is not None or learned_bayes_maps is not None or paper_score_maps is not None):
        from pagjax import lpips as lpips_lib

        lpips_net = lpips_lib.load_lpips("alexnet")
    return EvalSet(jnp.asarray(x_test), jnp.asarray(y_test), x, y, basis, score_maps, bayes_maps, bayes_acc,
                   num_classes, lpips_net, learned_bayes_maps, paper_score_maps)


def measure_model(apply_fn, variables, evalset: EvalSet, config: MeasureConfig, key) -> tuple[dict, np.ndarray]:
    """All measurements of one model: (row, input-gradient maps of the first
    ``grid_images`` eval images).

    The row holds every column of every registered metric (`pagjax.metrics.REGISTRY`):
    the values of those whose needs `evalset` and `config` meet, None for the others.
    """
    inputs = metrics_lib.MetricInputs(apply_fn, variables, evalset, config, key)
    row: dict[str, Any] = {}
    for metric in metrics_lib.REGISTRY.values():
        row.update(metrics_lib.evaluate(metric, inputs))
    return row, np.asarray(inputs.grads[: config.grid_images])
