"""The registry of everything `pagjax.measure.measure_model` measures on a model.

A `Metric` is one entry of results.csv: its ``name``, what it ``needs`` (a tangent basis,
score or Bayes maps, an LPIPS network, a known manifold, ...: see `NEEDS`), a function
of the model's inputs (`MetricInputs`: the input-gradients, the eval set's maps, the model
itself where it must be run) returning ``{column: value}``, its results.csv ``columns``
and, for an alignment metric, the human labels the summary and Figure 3 show.

`measure_model` evaluates every registered metric whose needs the eval set meets and
leaves the columns of the others empty (None); results.csv's columns
(`pagjax.results.result_columns`) and the figure labels are read from this registry,
so a new metric is one `register` call (docs/extending.md, "Add a metric").

The alignment metrics compare maps through `pagjax.alignment.compare_maps`, the table
`pagjax.alignment.grad_align` uses, so both give the same numbers.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from pagjax import alignment, attacks, chunks, gradients, robustness
from pagjax.objectives import cross_entropy
from pagjax.static import Static

Array = jax.Array


# --------------------------------------------------------------------------- needs

# need -> (what it is, whether an (eval set, measure config) provides it)
NEEDS: dict[str, tuple[str, Callable[[Any, Any], bool]]] = {
    "basis": ("a tangent basis of the eval images (known manifold or autoencoder)",
              lambda ev, cfg: ev.basis is not None),
    "score_maps": ("class-conditional score maps grad log p_s(x|y) at align_noise",
                   lambda ev, cfg: ev.score_maps is not None),
    "bayes_maps": ("the exact Bayes gradient grad log p_s(y|x) (a known manifold)",
                   lambda ev, cfg: ev.bayes_maps is not None),
    "learned_bayes_maps": ("a learned Bayes gradient (real images)",
                           lambda ev, cfg: ev.learned_bayes_maps is not None),
    "bayes_reference": ("a Bayes gradient, exact or else learned",
                        lambda ev, cfg: ev.bayes_maps is not None or ev.learned_bayes_maps is not None),
    "paper_score_maps": ("the unconditional score at paper_noise (the paper's protocol)",
                         lambda ev, cfg: ev.paper_score_maps is not None),
    "lpips_net": ("a loaded LPIPS network (MeasureConfig.lpips)", lambda ev, cfg: ev.lpips_net is not None),
    "exact_manifold": ("a known manifold's exact density (Bayes-optimal accuracy)",
                       lambda ev, cfg: ev.bayes_accuracy is not None),
    "pgd": ("an attack radius (MeasureConfig.pgd_eps)", lambda ev, cfg: cfg.pgd_eps is not None),
}


# --------------------------------------------------------------------------- metric


@dataclasses.dataclass(frozen=True)
class AlignmentLabel:
    """How the summary (``reference``: what the gradient is compared with) and Figure 3
    (``curve``: the alignment curve's legend) name an alignment column."""

    reference: str
    curve: str


@dataclasses.dataclass(frozen=True)
class Metric:
    """One registered measurement.

    Attributes:
      name: unique name (usually its main column).
      needs: names of `NEEDS` it requires; without them its columns stay empty.
      fn: ``fn(inputs: MetricInputs) -> {column: value}``, values scalars (float or
        0-d array) or None; must return exactly its columns.
      columns: its results.csv columns.
      extra_columns: columns that depend on the settings, ``extra_columns(config)``
        (e.g. one per perturbation size); None if there are none.
      labels: column -> `AlignmentLabel`, for columns the figure can show as alignment.
    """

    name: str
    needs: tuple[str, ...]
    fn: Callable[[MetricInputs], Mapping[str, Any]]
    columns: tuple[str, ...]
    extra_columns: Callable[[Any], tuple[str, ...]] | None = None
    labels: Mapping[str, AlignmentLabel] = dataclasses.field(default_factory=dict)

    def column_names(self, config=None) -> tuple[str, ...]:
        """Its columns; with a `MeasureConfig` also the setting-dependent ones."""
        extra = self.extra_columns(config) if (config is not None and self.extra_columns) else ()
        return tuple(self.columns) + tuple(extra)

    def missing(self, evalset, config) -> tuple[str, ...]:
        """The needs that `evalset` / `config` do not meet."""
        return tuple(n for n in self.needs if not NEEDS[n][1](evalset, config))


class MetricInputs:
    """What a metric function sees for one model: the model (``apply_fn``, ``variables``),
    the eval set, the settings and a PRNG ``key``; the input-gradients are computed once,
    when a metric first asks for them."""

    def __init__(self, apply_fn, variables, evalset, config, key):
        self.apply_fn, self.variables, self.evalset, self.config, self.key = apply_fn, variables, evalset, config, key
        # two subkeys as before the registry, so measurements stay reproducible across versions;
        # a new metric needing randomness takes jax.random.fold_in(inputs.key, <its own number>)
        self.directions_key, self.attack_key = jax.random.split(key)

    @functools.cached_property
    def grads(self) -> Array:
        """Input-gradients of ``config.target`` at the eval images."""
        ev = self.evalset
        return _input_gradients(Static(self.apply_fn), self.variables, ev.x, ev.y, target=self.config.target)

    @functools.cached_property
    def paper_grads(self) -> Array:
        """Input-gradients of the sum of the logits (the paper's protocol)."""
        return _input_gradients(Static(self.apply_fn), self.variables, self.evalset.x, None, target="logit_sum")


# A sweep measures every model of a method with one apply_fn (`pagjax.models.build_model`
# returns one object per model): compiled once, not dispatched op by op for every model.
_input_gradients = jax.jit(gradients.input_gradients, static_argnums=0, static_argnames="target")


# --------------------------------------------------------------------------- registry

REGISTRY: dict[str, Metric] = {}


def register(metric: Metric) -> Metric:
    """Add `metric` to the registry (measured by every later `measure_model` call).

    Raises `ValueError` for an unknown need, a taken name or a column another metric
    already writes.
    """
    if metric.name in REGISTRY:
        raise ValueError(f"a metric named {metric.name!r} is already registered")
    unknown = [n for n in metric.needs if n not in NEEDS]
    if unknown:
        raise ValueError(f"metric {metric.name!r} needs {unknown}, which are not known needs; "
                         f"known: {sorted(NEEDS)}")
    if not metric.columns:
        raise ValueError(f"metric {metric.name!r} declares no columns")
    taken = {c: m.name for m in REGISTRY.values() for c in m.columns}
    for c in metric.columns:
        if c in taken:
            raise ValueError(f"column {c!r} of metric {metric.name!r} is already written by metric {taken[c]!r}")
    for c in metric.labels:
        if c not in metric.columns:
            raise ValueError(f"metric {metric.name!r} labels {c!r}, which is not one of its columns")
    REGISTRY[metric.name] = metric
    return metric


def unregister(name: str) -> Metric:
    """Remove the metric `name` from the registry and return it."""
    if name not in REGISTRY:
        raise KeyError(f"no metric named {name!r} is registered")
    return REGISTRY.pop(name)


def columns(config=None) -> tuple[str, ...]:
    """Every registered metric's columns, in registration order (with a `MeasureConfig`
    also the setting-dependent ones)."""
    return tuple(c for m in REGISTRY.values() for c in m.column_names(config))


def alignment_labels() -> dict[str, str]:
    """column -> what the gradient is compared with (the summary's ``alignment``)."""
    return {c: lab.reference for m in REGISTRY.values() for c, lab in m.labels.items()}


def alignment_curve_labels() -> dict[str, str]:
    """column -> Figure 3's alignment-curve legend."""
    return {c: lab.curve for m in REGISTRY.values() for c, lab in m.labels.items()}


def evaluate(metric: Metric, inputs: MetricInputs) -> dict[str, float | None]:
    """``{column: float or None}`` of one metric: None everywhere when a need is unmet.

    Raises `ValueError` naming the metric and the column when its function returns a
    column it does not declare or misses one it does.
    """
    names = metric.column_names(inputs.config)
    if metric.missing(inputs.evalset, inputs.config):
        return dict.fromkeys(names)
    values = dict(metric.fn(inputs))
    extra = [c for c in values if c not in names]
    lacking = [c for c in names if c not in values]
    if extra or lacking:
        raise ValueError(f"metric {metric.name!r} returned undeclared columns {extra} and lacks declared columns "
                         f"{lacking}")
    return {c: None if values[c] is None else float(values[c]) for c in names}


# --------------------------------------------------------------------------- the metrics


def accuracy(apply_fn, variables, x, y, batch_size: int = 1024) -> float:
    """Clean accuracy over (x, y), ``batch_size`` examples at a time."""
    static = Static(apply_fn)
    hits = chunks.map_chunks(lambda xy: _hits(static, variables, *xy), (x, y), batch_size)
    return float(jnp.mean(hits))


@functools.partial(jax.jit, static_argnums=0)
def _hits(apply_fn, variables, x, y):
    return jnp.argmax(apply_fn(variables, x), -1) == y


def robust_accuracy(apply_fn, variables, x, y, eps: float, num_steps: int, key) -> float:
    """Accuracy under a per-example L2 PGD attack of radius `eps` (no box)."""
    loss_fn = lambda inputs: cross_entropy(apply_fn(variables, inputs), y)  # noqa: E731
    delta = attacks.l2_pgd(loss_fn, x, key, eps=eps, num_steps=num_steps)
    return float(jnp.mean(jnp.argmax(apply_fn(variables, x + delta), -1) == y))


# A sweep compares many models' maps of one shape: compiled once per (metric, shape), not
# dispatched op by op (eager LPIPS cost 0.3 s a call, half of a small sweep's measuring).
_compare_maps = jax.jit(alignment.compare_maps, static_argnames=("metrics", "normalization", "options"))


def mean_alignment(a: Array, b: Array, metric: str = "cosine", *, lpips_net=None) -> Array:
    """Mean over examples of the alignment `metric` (`pagjax.alignment.MAP_METRICS`) of
    two batches of maps, each scaled by its max |value| first (the paper's convention, and
    `grad_align`'s default); LPIPS upsamples images too small for `lpips_net`."""
    options, params = alignment.MapOptions(), None
    if metric == "lpips":
        options = alignment.MapOptions(lpips_net=lpips_net.net,
                                       lpips_size=_lpips_size(lpips_net, a.shape[1], a.shape[2]))
        params = lpips_net.params
    return jnp.mean(_compare_maps(a, b, (metric,), "max_abs", lpips_params=params, options=options)[metric])


def _lpips_size(net, h, w):
    from pagjax import lpips as lpips_lib

    return lpips_lib.check_size(net, h, w, True)


def _accuracy(inp):
    ev = inp.evalset
    return {"accuracy": accuracy(inp.apply_fn, inp.variables, ev.x_test, ev.y_test)}


def _eps_columns(config) -> tuple[str, ...]:
    return tuple(f"{side}_change@{e:g}" for e in config.eps for side in ("on", "off"))


def _manifold_change(inp):
    cfg = inp.config
    change = robustness.on_off_manifold_change(inp.apply_fn, inp.variables, inp.evalset.x, inp.evalset.basis,
                                               list(cfg.eps), inp.directions_key, num_directions=cfg.num_directions)
    on, off = change.mean_on_l1, change.mean_off_l1
    out = {}
    for i, e in enumerate(cfg.eps):
        out[f"on_change@{e:g}"], out[f"off_change@{e:g}"] = on[i], off[i]
    j = list(cfg.eps).index(cfg.regime_eps)
    out.update(on_change=on[j], off_change=off[j], off_on_ratio=off[j] / jnp.maximum(on[j], 1e-12))
    return out


def _grad_fraction(inp):
    frac, baseline = robustness.gradient_on_manifold_fraction(inp.grads, inp.evalset.basis)
    return {"grad_on_manifold_fraction": jnp.mean(frac), "random_fraction": baseline}


def _bayes_fraction(inp):
    # a property of the eval set, not the model: the bar the models' fractions are read against
    return {"bayes_fraction": jnp.mean(robustness.gradient_on_manifold_fraction(
        inp.evalset.bayes_maps, inp.evalset.basis)[0])}


def _bayes_reference(ev):
    return ev.bayes_maps if ev.bayes_maps is not None else ev.learned_bayes_maps


def _lpips_alignment(inp):
    m = inp.config.lpips_images
    ref = _bayes_reference(inp.evalset)
    return {"lpips_alignment": mean_alignment(inp.grads[:m], ref[:m], "lpips", lpips_net=inp.evalset.lpips_net)}


def _paper_lpips(inp):
    m = inp.config.lpips_images
    return {"paper_lpips_alignment": mean_alignment(inp.paper_grads[:m], inp.evalset.paper_score_maps[:m], "lpips",
                                                    lpips_net=inp.evalset.lpips_net)}


def _robust_accuracy(inp):
    cfg, ev = inp.config, inp.evalset
    return {"robust_accuracy": robust_accuracy(inp.apply_fn, inp.variables, ev.x, ev.y, cfg.pgd_eps, cfg.pgd_steps,
                                               inp.attack_key)}


def _cosine_with(field: str, column: str, grads: str = "grads"):
    """A metric function: mean cosine of the model's `grads` with the eval set's `field` maps."""
    def fn(inp):
        return {column: mean_alignment(getattr(inp, grads), getattr(inp.evalset, field), "cosine")}
    return fn


def _register_builtins() -> None:
    L = AlignmentLabel  # noqa: N806
    for metric in (
        Metric("accuracy", (), _accuracy, ("accuracy",)),
        Metric("bayes_accuracy", ("exact_manifold",), lambda inp: {"bayes_accuracy": inp.evalset.bayes_accuracy},
               ("bayes_accuracy",)),
        Metric("manifold_change", ("basis",), _manifold_change, ("on_change", "off_change", "off_on_ratio"),
               extra_columns=_eps_columns),
        Metric("grad_on_manifold_fraction", ("basis",), _grad_fraction,
               ("grad_on_manifold_fraction", "random_fraction")),
        Metric("bayes_fraction", ("basis", "bayes_maps"), _bayes_fraction, ("bayes_fraction",)),
        Metric("score_cosine", ("score_maps",), _cosine_with("score_maps", "score_cosine"), ("score_cosine",),
               labels={"score_cosine": L("class-conditional score", "cosine with score")}),
        Metric("bayes_cosine", ("bayes_maps",), _cosine_with("bayes_maps", "bayes_cosine"), ("bayes_cosine",),
               labels={"bayes_cosine": L("exact Bayes gradient", "cosine with Bayes gradient")}),
        Metric("lpips_alignment", ("bayes_reference", "lpips_net"), _lpips_alignment, ("lpips_alignment",),
               labels={"lpips_alignment": L("1-LPIPS vs the Bayes gradient", "1 - LPIPS vs Bayes gradient")}),
        Metric("robust_accuracy", ("pgd",), _robust_accuracy, ("robust_accuracy",)),
        Metric("learned_bayes_cosine", ("learned_bayes_maps",),
               _cosine_with("learned_bayes_maps", "learned_bayes_cosine"), ("learned_bayes_cosine",),
               labels={"learned_bayes_cosine": L("learned Bayes gradient", "cosine with LEARNED Bayes gradient")}),
        Metric("paper_score_cosine", ("paper_score_maps",),
               _cosine_with("paper_score_maps", "paper_score_cosine", grads="paper_grads"), ("paper_score_cosine",),
               labels={"paper_score_cosine": L("paper: cosine(grad logit sum, unconditional score)",
                                               "paper protocol: cosine vs score")}),
        Metric("paper_lpips_alignment", ("paper_score_maps", "lpips_net"), _paper_lpips, ("paper_lpips_alignment",),
               labels={"paper_lpips_alignment": L("paper: 1-LPIPS(grad logit sum, unconditional score)",
                                                  "paper protocol: 1 - LPIPS vs score")}),
    ):
        register(metric)


_register_builtins()
