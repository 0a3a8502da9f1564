"""Everything measured on one trained model, against an evaluation set prepared once.

`prepare_eval_set` does the per-dataset work a single time (the eval subset, the tangent
basis, the score and Bayes-gradient maps at the alignment noise level, the Bayes-optimal
accuracy, the LPIPS network); `measure_model` then measures any number of models
against it:

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

from pagjax import alignment, attacks, gradients, robustness, validation
from pagjax.objectives import cross_entropy

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
    bayes_fraction: float | None = None  # on-manifold fraction of the exact Bayes gradient
    learned_bayes_maps: Array | None = None  # real data: a learned Bayes gradient (not exact)
    paper_score_maps: Array | None = None  # unconditional score at paper_noise (the paper's reference)


def prepare_eval_set(x_test, y_test, num_classes: int, config: MeasureConfig, *, manifold=None, z_test=None,
                     basis=None, key=None, score_maps=None, learned_bayes_maps=None,
                     paper_score_maps=None) -> EvalSet:
    """Prepare the evaluation set once. With a known `manifold` the tangent basis, the
    exact score and Bayes maps and the Bayes-optimal accuracy come from it; otherwise pass a
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
        key = key if key is not None else jax.random.key(0)
        bayes_acc = float(manifold.bayes_accuracy(key, 0.0))
    lpips_net = None
    if config.lpips and (bayes_maps is not None or learned_bayes_maps is not None or paper_score_maps is not None):
        from pagjax import lpips as lpips_lib

        lpips_net = lpips_lib.load_lpips("alexnet")
    bayes_frac = None
    if bayes_maps is not None and basis is not None:
        bayes_frac = float(jnp.mean(robustness.gradient_on_manifold_fraction(bayes_maps, basis)[0]))
    return EvalSet(jnp.asarray(x_test), jnp.asarray(y_test), x, y, basis, score_maps, bayes_maps, bayes_acc,
                   num_classes, lpips_net, bayes_frac, learned_bayes_maps, paper_score_maps)


def accuracy(apply_fn, variables, x, y, batch_size: int = 1024) -> float:
    """Clean accuracy over (x, y) in batches."""
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        logits = apply_fn(variables, x[i : i + batch_size])
        correct += int(jnp.sum(jnp.argmax(logits, -1) == y[i : i + batch_size]))
    return correct / x.shape[0]


def robust_accuracy(apply_fn, variables, x, y, eps: float, num_steps: int, key) -> float:
    """Accuracy under a per-example L2 PGD attack of radius `eps` (no box)."""
    loss_fn = lambda inputs: cross_entropy(apply_fn(variables, inputs), y)  # noqa: E731
    delta = attacks.l2_pgd(loss_fn, x, key, eps=eps, num_steps=num_steps)
    return float(jnp.mean(jnp.argmax(apply_fn(variables, x + delta), -1) == y))


def measure_model(apply_fn, variables, evalset: EvalSet, config: MeasureConfig, key) -> tuple[dict, np.ndarray]:
    """All measurements of one model: (row of scalars, input-gradient maps of the first
    ``grid_images`` eval images)."""
    k_dir, k_pgd = jax.random.split(key)
    row: dict[str, Any] = {
        "accuracy": accuracy(apply_fn, variables, evalset.x_test, evalset.y_test),
        "bayes_accuracy": evalset.bayes_accuracy,
        "bayes_fraction": evalset.bayes_fraction,
    }
    x, y = evalset.x, evalset.y
    grads = gradients.input_gradients(apply_fn, variables, x, y, target=config.target)
    if evalset.basis is not None:
        change = robustness.on_off_manifold_change(
            apply_fn, variables, x, evalset.basis, list(config.eps), k_dir, num_directions=config.num_directions
        )
        on, off = np.asarray(change.mean_on_l1), np.asarray(change.mean_off_l1)
        for e, a, b in zip(config.eps, on, off):
            row[f"on_change@{e:g}"] = float(a)
            row[f"off_change@{e:g}"] = float(b)
        j = list(config.eps).index(config.regime_eps)
        row["on_change"], row["off_change"] = float(on[j]), float(off[j])
        row["off_on_ratio"] = float(off[j] / max(on[j], 1e-12))
        frac, baseline = robustness.gradient_on_manifold_fraction(grads, evalset.basis)
        row["grad_on_manifold_fraction"] = float(jnp.mean(frac))
        row["random_fraction"] = float(baseline)
    if evalset.score_maps is not None:
        row["score_cosine"] = float(jnp.mean(alignment.cosine_similarity(grads, evalset.score_maps)))
    if evalset.bayes_maps is not None:
        row["bayes_cosine"] = float(jnp.mean(alignment.cosine_similarity(grads, evalset.bayes_maps)))
    if evalset.learned_bayes_maps is not None:
        row["learned_bayes_cosine"] = float(jnp.mean(alignment.cosine_similarity(grads, evalset.learned_bayes_maps)))
    reference = evalset.bayes_maps if evalset.bayes_maps is not None else evalset.learned_bayes_maps
    if reference is not None and evalset.lpips_net is not None:
        m = config.lpips_images
        a = alignment.normalize_maps(grads[:m], "max_abs")
        b = alignment.normalize_maps(reference[:m], "max_abs")
        row["lpips_alignment"] = float(jnp.mean(
            alignment.lpips_alignment(a, b, net=evalset.lpips_net, upsample=True)))
    if evalset.paper_score_maps is not None:
        # the paper's protocol: gradient of the sum of the logits vs the unconditional score
        paper_grads = gradients.input_gradients(apply_fn, variables, x, None, target="logit_sum")
        row["paper_score_cosine"] = float(jnp.mean(alignment.cosine_similarity(paper_grads, evalset.paper_score_maps)))
        if evalset.lpips_net is not None:
            m = config.lpips_images
            a = alignment.normalize_maps(paper_grads[:m], "max_abs")
            b = alignment.normalize_maps(evalset.paper_score_maps[:m], "max_abs")
            row["paper_lpips_alignment"] = float(jnp.mean(
                alignment.lpips_alignment(a, b, net=evalset.lpips_net, upsample=True)))
    if config.pgd_eps is not None:
        row["robust_accuracy"] = robust_accuracy(apply_fn, variables, x, y, config.pgd_eps, config.pgd_steps, k_pgd)
    return row, np.asarray(grads[: config.grid_images])
