"""pagjax: which models have perceptually-aligned gradients, in JAX."""
from pagjax.gradients import input_gradients, value_and_input_gradients
from pagjax.models import Model, build_model
from pagjax.objectives import METHODS, ObjectiveOptions, make_objective
from pagjax.training import OptimizerConfig, TrainConfig, TrainState, make_train_step, train

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "Model",
    "ObjectiveOptions",
    "OptimizerConfig",
    "TrainConfig",
    "TrainState",
    "build_model",
    "input_gradients",
    "make_objective",
    "make_train_step",
    "train",
    "value_and_input_gradients",
]
