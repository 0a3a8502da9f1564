"""pagjax: which models have perceptually-aligned gradients, and why, in JAX.

A reimplementation of Srinivas, Bordt & Lakkaraju, "Which Models have Perceptually-Aligned
Gradients? An Explanation via Off-Manifold Robustness" (NeurIPS 2023). Everything is a pure
function of arrays, parameters and explicit PRNG keys, and runs under `jax.jit` on CPU, GPU
and TPU.

Where to start:

* ``notebooks/quickstart.ipynb``: known-manifold data, a robust and a standard model,
  `grad_align` against the exact Bayes gradient and a learned score, on every device.
* ``docs/theory.md``: the science (the three regimes, off-manifold robustness, the
  Bayes-optimal gradient); ``docs/design.md``: the library's conventions.
* ``python -m experiments.sweep_eps``: the main experiment (see README.md).

Exported here (the most used entry points):

* models: `build_model` -> `Model` (pure ``init`` / ``apply`` / ``forward``);
* training: `make_objective` (one of `METHODS`, options in `ObjectiveOptions`),
  `make_train_step` (one jitted step on a `TrainState`), `train` (one model, from a
  `TrainConfig` with an `OptimizerConfig`);
* gradients: `input_gradients`, `value_and_input_gradients`;
* alignment: `grad_align` -> `AlignmentResult` (``import pagjax.grad_align`` and
  ``from pagjax import grad_align`` give the same callable);
* regimes: `label_regimes` (weak / Bayes-aligned / excessive).

Every module is importable on its own; the main ones beside these:
`pagjax.methods` (the method registry: grids, labels, units; docs/extending.md),
`pagjax.manifolds` (known-manifold data with exact tangent spaces, scores and Bayes
quantities), `pagjax.scores` (exact and learned scores), `pagjax.robustness` (on/off-manifold
change, the gradient's on-manifold fraction), `pagjax.geometry` (tangent spaces),
`pagjax.sweep` (many models at once), `pagjax.devices` (meshes), `pagjax.data` (real
images), `pagjax.generate`, `pagjax.distractor`, `pagjax.plots`, `pagjax.io`,
`pagjax.cache` (settings-keyed disk cache), `pagjax.keys` (keys for named purposes), and
the sweep: `pagjax.experiment` (`run_sweep`) composed of `pagjax.sweep_config`,
`pagjax.sweep_data`, `pagjax.learned`, `pagjax.results` and `pagjax.outputs`.
"""
from pagjax.gradients import input_gradients, value_and_input_gradients
from pagjax.alignment import AlignmentResult
# `grad_align` is a callable submodule (see pagjax/grad_align.py): imported here so that
# `pagjax.grad_align` is the same object whether users write `import pagjax.grad_align` or
# `from pagjax import grad_align`, in any order.
from pagjax import grad_align
from pagjax.models import Model, build_model
from pagjax.objectives import ObjectiveOptions, make_objective
from pagjax.regimes import label_regimes
from pagjax.training import OptimizerConfig, TrainConfig, TrainState, make_train_step, train

__version__ = "0.1.0"


def __getattr__(name):
    # METHODS: the registered method names (pagjax.methods), read at each access, so that a
    # method registered after this import is listed too
    if name == "METHODS":
        from pagjax import methods

        return methods.names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AlignmentResult",
    "METHODS",
    "Model",
    "ObjectiveOptions",
    "OptimizerConfig",
    "TrainConfig",
    "TrainState",
    "build_model",
    "grad_align",
    "input_gradients",
    "label_regimes",
    "make_objective",
    "make_train_step",
    "train",
    "value_and_input_gradients",
]
