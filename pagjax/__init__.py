"""pagjax: which models have perceptually-aligned gradients, in JAX.

The most used entry points are re-exported here; every module is importable on its own
(`pagjax.manifolds`, `pagjax.geometry`, `pagjax.robustness`, `pagjax.scores`, ...).
"""
from pagjax.gradients import input_gradients, value_and_input_gradients
from pagjax.alignment import AlignmentResult, grad_align
from pagjax.models import Model, build_model
from pagjax.objectives import METHODS, ObjectiveOptions, make_objective
from pagjax.regimes import label_regimes
from pagjax.training import OptimizerConfig, TrainConfig, TrainState, make_train_step, train

__version__ = "0.1.0"

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
