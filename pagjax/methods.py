"""The method registry: one `Method` entry holds everything the project knows about a method.

A training method (``ce``, ``gradnorm``, ``smoothness``, ``noise``, ``pgd``) is more than
its loss: the sweep needs its default strength grids, the figures the name of its strength,
the ``--official`` switch a unit conversion, the step benchmark a strength and a pass-count
ideal. All of it is one frozen `Method` here, and every other place derives its view from
the registry (``objectives.make_objective``, ``objectives.METHODS``,
``sweep_config.default_strengths`` / ``to_official_units`` / ``STRENGTH_NAMES``,
``configs.common.GRIDS``, ``benchmarks.bench_step``, the ``--methods`` help). The loss
functions themselves stay in `pagjax.objectives`.

Adding a method is one `register` call (docs/extending.md, "Add a method"); `registered`
adds one for the length of a ``with`` block (tests, notebooks).

Grid kinds (`GRID_KINDS`), the strengths a sweep uses when none are given:

* ``known``: the built-in known-manifold data (linear_default with normal_offset 0.3 and
  class_separation 0.6, MLP width 128, 600 steps); ``digits``: the offline 8x8 digits; ``tfds``: MNIST, Fashion-MNIST, CIFAR-10,
  ImageNet-64. These three are in textbook units and every method with a strength has them.
* ``paper``: the official 30-value CIFAR-10 grid (docs/theory.md §4), in the official
  code's units (docs/design.md §4); optional, read by ``configs/common.py``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
import types
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from pagjax import objectives

GRID_KINDS = ("known", "digits", "tfds", "paper")
SWEEP_KINDS = ("known", "digits", "tfds")  # every method with a strength has these

# Method names become file names (checkpoints/<name>, gradients_<name>.png) and CLI items.
_NAME = re.compile(r"[a-z][a-z0-9_]*")


def same_units(batch_size: int) -> float:
    """Official units per textbook unit for a method whose strength means the same in both."""
    del batch_size
    return 1.0


def one_pass(k: int) -> float:
    """Pass-count cost of a step that is one forward and one backward, like plain CE."""
    del k
    return 1.0


@dataclasses.dataclass(frozen=True)
class Method:
    """Everything about one training method.

    Attributes:
      name: the method's name in CLIs, results.csv, config.json and file names.
      objective: ``objective(options: ObjectiveOptions) -> objective`` (the pure per-example
        loss of `pagjax.objectives`); reads only the option fields it concerns.
      description: one line (the ``--methods`` help).
      strength_name: the strength's axis label in figures; ``None`` for a method that
        ignores its strength (``ce``).
      grids: default strength grids by kind (module docstring); a method with a strength
        needs ``known``, ``digits`` and ``tfds``, each positive and strictly increasing.
      official_scale: ``official_scale(batch_size)``: official units per textbook unit
        (``--official`` grids are the textbook grids times this).
      bench_strength: the strength the step benchmark trains at.
      ideal_ratio: ``ideal_ratio(k)``: the step's cost in plain-CE steps by counting passes
        (forward F, a reverse pass 2x its graph), ``k`` the attack steps where there are any.
      pass_count: the counting behind ``ideal_ratio``, for the benchmark's report.
      inner_steps: whether the step runs an inner loop of ``k = options.pgd_steps`` iterations
        (PGD's attack): the benchmark then reports k and corrects XLA's FLOP count of a loop.
    """

    name: str
    objective: Callable[[objectives.ObjectiveOptions], objectives.Objective]
    description: str
    strength_name: str | None = None
    grids: Mapping[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)
    official_scale: Callable[[int], float] = same_units
    bench_strength: float = 0.0
    ideal_ratio: Callable[[int], float] = one_pass
    pass_count: str = "F + 2F = 3F -> 1"
    inner_steps: bool = False

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValueError(f"Method name must be lower-case letters, digits and _ (a file name), got {self.name!r}")
        unknown = sorted(set(self.grids) - set(GRID_KINDS))
        if unknown:
            raise ValueError(f"Method {self.name!r}: unknown grid kinds {unknown}; kinds are {list(GRID_KINDS)}")
        if self.robust:
            missing = [k for k in SWEEP_KINDS if k not in self.grids]
            if missing:
                raise ValueError(f"Method {self.name!r} has a strength but no default grid for {missing}")
        elif self.grids:
            raise ValueError(f"Method {self.name!r} ignores its strength (strength_name None) but has grids")
        grids = {}
        for kind, grid in self.grids.items():
            g = tuple(float(v) for v in grid)
            a = np.asarray(g)
            if not g or not np.all(np.isfinite(a)) or np.any(a <= 0) or np.any(np.diff(a) <= 0):
                raise ValueError(f"Method {self.name!r}: grid {kind!r} must be positive, finite and strictly "
                                 f"increasing, got {list(g)}")
            grids[kind] = g
        # read-only, so that a registered entry cannot be changed behind the registry's back
        object.__setattr__(self, "grids", types.MappingProxyType(grids))

    @property
    def robust(self) -> bool:
        """Whether the strength means something (every method but plain CE)."""
        return self.strength_name is not None

    @property
    def strength_label(self) -> str:
        return self.strength_name or "-"

    def grid(self, kind: str) -> tuple[float, ...]:
        """The default grid of `kind`; ``(0.0,)`` for a method without a strength."""
        if not self.robust:
            return (0.0,)
        if kind not in self.grids:
            raise ValueError(f"Method {self.name!r} has no {kind!r} grid; it has {sorted(self.grids)}")
        return self.grids[kind]

    def to_official(self, strengths, batch_size: int) -> tuple[float, ...]:
        """Textbook-unit strengths in the official code's units at batch `batch_size`."""
        scale = float(self.official_scale(batch_size))
        return tuple(float(v) * scale for v in strengths)


_REGISTRY: dict[str, Method] = {}


def register(method: Method, *, replace: bool = False) -> Method:
    """Add `method`; a second method of the same name is an error unless ``replace``."""
    if not isinstance(method, Method):
        raise TypeError(f"register takes a Method, got {type(method).__name__}")
    if method.name in _REGISTRY and not replace:
        raise ValueError(f"a method named {method.name!r} is already registered (replace=True to override)")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> Method:
    """Remove and return the method `name`."""
    get(name, argument="unregister name")  # an unknown name: the registry's error
    return _REGISTRY.pop(name)


@contextlib.contextmanager
def registered(method: Method, *, replace: bool = False) -> Iterator[Method]:
    """Register `method` for the length of a ``with`` block; the registry is restored after
    (a replaced entry comes back), so that a test's method does not leak into others."""
    previous = _REGISTRY.get(method.name)
    register(method, replace=replace)
    try:
        yield method
    finally:
        if previous is None:
            _REGISTRY.pop(method.name, None)
        else:
            _REGISTRY[method.name] = previous


def names() -> tuple[str, ...]:
    """The registered method names, in registration order."""
    return tuple(_REGISTRY)


def get(name: str, *, argument: str = "name") -> Method:
    """The method `name`; an unknown name is a `ValueError` naming `argument` (the caller's
    flag or field) and listing the registered names."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r} given as {argument}; registered methods: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def robust_names() -> tuple[str, ...]:
    """The methods with a strength: a sweep's default methods."""
    return tuple(m.name for m in _REGISTRY.values() if m.robust)


class View(Mapping):
    """A read-only ``{name: project(method)}`` over the registered methods that `keep`, read at
    each access (a method registered later shows up; a plain dict would be a stale copy)."""

    def __init__(self, project: Callable[[Method], object], keep: Callable[[Method], bool] = lambda m: True):
        self._project, self._keep = project, keep

    def _methods(self) -> dict[str, Method]:
        return {n: m for n, m in _REGISTRY.items() if self._keep(m)}

    def __getitem__(self, name):
        m = self._methods()[name]
        return self._project(m)

    def __iter__(self):
        return iter(self._methods())

    def __len__(self):
        return len(self._methods())

    def __repr__(self):
        return repr(dict(self))


def grid_table(kind: str) -> View:
    """``{method: its grid of kind}`` for the methods that have one (module docstring)."""
    if kind not in GRID_KINDS:
        raise ValueError(f"unknown grid kind {kind!r}; kinds are {list(GRID_KINDS)}")
    return View(lambda m: m.grids[kind], keep=lambda m: kind in m.grids)


def help_text() -> str:
    """``name: description; ...`` of every registered method, for a CLI's help."""
    return "; ".join(f"{m.name}: {m.description}" for m in _REGISTRY.values())


# ------------------------------------------------------------------ the five built-in methods
def _gradnorm_official_scale(batch_size: int) -> float:
    # official c * 1e5 / B^2 = textbook lambda (objectives docstring)
    return batch_size**2 / objectives.OFFICIAL_GRADNORM_SCALE


def _pgd_official_scale(batch_size: int) -> float:
    # the official ball bounds the whole batch: one image moves by about eps / sqrt(B)
    return math.sqrt(batch_size)


def _make_ce(opts):
    return objectives.plain_ce


def _make_gradnorm(opts):
    return functools.partial(objectives.gradnorm, official=opts.official)


def _make_smoothness(opts):
    return functools.partial(objectives.smoothness, noise_std=opts.smoothness_noise_std,
                             official_bn_updates=opts.official_bn_updates)


def _make_noise(opts):
    return objectives.noise_augmentation


def _make_pgd(opts):
    return functools.partial(objectives.pgd_training, num_steps=opts.pgd_steps, official=opts.official,
                             box=opts.pgd_box, official_grad_accumulation=opts.official_grad_accumulation,
                             official_bn_updates=opts.official_bn_updates)


def _paper_grid(lo: int, hi: int) -> tuple[float, ...]:
    return tuple(float(v) for v in np.logspace(lo, hi, 30))


# Grids, found by probe runs (docs/results.md):
# known: each spans weak -> Bayes-aligned -> excessive on the sweep's linear_default draw
#   (sweep_config.KNOWN_DATA). Noise and PGD cross over near 0.15-0.2 and collapse by 1, so
#   their grid is dense there: Bayes-aligned at 0.2-0.5 (noise), 0.3-0.5 (PGD).
# digits (8x8, MLP width 256, 600 steps): noise and PGD reach accuracy 0.98-0.99 up to 0.3,
#   lose accuracy at 1-3 (PGD at eps 3 collapses to chance); the gradient's on-manifold
#   fraction (8-latent autoencoder) rises from 0.64 to 0.8-0.86 and falls again. Even the
#   weakest model is off-manifold robust: these smooth digits show no weak regime.
# tfds (MNIST probed; Fashion-MNIST and CIFAR-10 share them, unprobed; MLP width 256, 600
#   steps, 8192 images): test accuracy at noise s = 1, 3, 10: 0.92, 0.75, 0.12 (chance); PGD
#   eps = 1, 3, 10: 0.96, 0.86, 0.12; gradnorm lambda = 10, 100: 0.78, 0.38; smoothness
#   lambda = 1000: 0.18. The digits grids stop at 3, too weak to reach the excessive regime.
_DECADES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
_HALF_DECADES = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
_SMOOTHNESS = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
_KNOWN_NOISE = (0.01, 0.1, 0.2, 0.3, 0.5, 1.0)

register(Method(
    "ce", _make_ce, "plain cross-entropy CE(f(x), y), the standard model",
    bench_strength=0.0, pass_count="F + 2F = 3F -> 1"))
register(Method(
    "gradnorm", _make_gradnorm, "CE + lambda ||grad_x CE||^2 (input-gradient norm penalty)",
    strength_name="lambda",
    grids={"known": _DECADES, "digits": _DECADES, "tfds": _DECADES + (100.0,), "paper": _paper_grid(-5, 2)},
    official_scale=_gradnorm_official_scale, bench_strength=0.1,
    ideal_ratio=lambda k: 3.0, pass_count="(F + 2F) + 2 x 3F = 9F -> 3"))
register(Method(
    "smoothness", _make_smoothness, "CE + lambda ||f(x) - f(x + n)||^2, n ~ N(0, t^2 I) (logit smoothness)",
    strength_name="lambda",
    grids={"known": _SMOOTHNESS, "digits": _SMOOTHNESS, "tfds": _SMOOTHNESS, "paper": _paper_grid(-4, 4)},
    bench_strength=0.1, ideal_ratio=lambda k: 2.0, pass_count="2F + 2 x 2F = 6F -> 2"))
register(Method(
    "noise", _make_noise, "CE(f(x + n), y), n ~ N(0, s^2 I) (Gaussian noise augmentation)",
    strength_name="noise s",
    grids={"known": _KNOWN_NOISE, "digits": _HALF_DECADES, "tfds": _HALF_DECADES + (10.0,),
           "paper": _paper_grid(-3, 2)},
    bench_strength=0.1, pass_count="3F -> 1"))
register(Method(
    "pgd", _make_pgd, "CE(f(x + delta*), y), delta* from L2 PGD of radius eps (adversarial training)",
    strength_name="eps (L2)",
    grids={"known": _KNOWN_NOISE, "digits": _HALF_DECADES, "tfds": _HALF_DECADES + (10.0,),
           "paper": _paper_grid(-5, 4)},
    official_scale=_pgd_official_scale, bench_strength=0.5,
    ideal_ratio=lambda k: float(k + 1), pass_count="k x 3F + 3F -> k + 1", inner_steps=True))
