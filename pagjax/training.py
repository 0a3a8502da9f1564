"""Training one model: optimizers, the jitted donated train step, and `train`.

The step is ``step(state, x, y, key, strength) -> (state, metrics)``:

* one jit, the state donated (updated in place on accelerators);
* the step's randomness is ``fold_in(key, state.step)``, so a resumed run draws exactly
  the noise an uninterrupted one would have drawn;
* ``strength`` is an argument, not a constant: one compilation serves a whole sweep, and
  `jax.vmap` can batch many models with different strengths;
* if the loss or any parameter gradient is NaN/inf the update is skipped (state kept)
  and ``metrics["finite"]`` is False, so the caller can record divergence.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pagjax import engine
from pagjax import methods as methods_lib
from pagjax import models as models_lib
from pagjax import objectives as objectives_lib
from pagjax import validation

Array = jax.Array
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "piecewise")


class TrainState(NamedTuple):
    """Everything that changes during training (a pytree)."""

    step: Array
    params: Any
    model_state: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer and learning-rate schedule.

    The paper's recipe is ``sgd`` with momentum 0.9, weight decay 5e-4, lr 0.025 divided
    by 10 at 75% and 87.5% of training (epochs 150 and 175 of 200): ``schedule="piecewise"``.
    """

    name: str = "adam"
    learning_rate: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"
    boundaries: tuple[float, ...] = (0.75, 0.875)  # fractions of total steps
    decay_factor: float = 0.1

    def validate(self):
        validation.check_choice("optimizer", self.name, OPTIMIZERS)
        validation.check_choice("schedule", self.schedule, SCHEDULES)
        validation.check_positive("learning_rate", self.learning_rate)
        validation.check_strength("weight_decay", self.weight_decay)
        validation.check_strength("momentum", self.momentum)


PAPER_SGD = OptimizerConfig(name="sgd", learning_rate=0.025, momentum=0.9, weight_decay=5e-4, schedule="piecewise")


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """An optax optimizer for `config` over `total_steps` steps."""
    config.validate()
    validation.check_positive_int("total_steps", total_steps)
    if config.schedule == "constant":
        lr = config.learning_rate
    else:
        lr = optax.piecewise_constant_schedule(
            config.learning_rate,
            {int(b * total_steps): config.decay_factor for b in config.boundaries},
        )
    if config.name == "sgd":
        # Coupled L2 weight decay, as torch.optim.SGD(weight_decay=...) in the official code.
        return optax.chain(
            optax.add_decayed_weights(config.weight_decay),
            optax.sgd(lr, momentum=config.momentum or None),
        )
    if config.weight_decay:
        return optax.adamw(lr, weight_decay=config.weight_decay)
    return optax.adam(lr)


def create_train_state(model: models_lib.Model, optimizer, key: Array, sample_x: Array) -> TrainState:
    """Initialise parameters, model state and optimizer state."""
    variables = model.init(key, sample_x)
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    return TrainState(jnp.zeros((), jnp.int32), params, model_state, optimizer.init(params))


def variables_of(state: TrainState) -> dict:
    """The variables dict `Model.apply` expects, from a train state."""
    return {"params": state.params, **state.model_state}


def make_update_fn(model: models_lib.Model, objective, optimizer) -> Callable:
    """The pure (un-jitted) train step; see the module docstring."""

    def update(state: TrainState, x: Array, y: Array, key: Array, strength) -> tuple[TrainState, dict]:
        step_key = jax.random.fold_in(key, state.step)

        def forward(params, inputs, model_state=None):
            # model_state: statistics to continue from instead of the step's, for an
            # objective that chains several training-mode forwards (pagjax.objectives)
            variables = {"params": params, **state.model_state, **(model_state or {})}
            return model.forward(variables, inputs)

        def loss_fn(params):
            per_example, aux = objective(forward, params, x, y, step_key, strength)
            return jnp.mean(per_example), aux

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        model_state = {**state.model_state, **aux["model_state"]}
        finite = jnp.isfinite(loss) & engine.all_finite(grads)
        new_state = TrainState(state.step + 1, params, model_state, opt_state)
        # Skip a non-finite update but still advance the step counter.
        kept = engine.skip_nonfinite(new_state, state, finite)._replace(step=state.step + 1)
        metrics = {
            "loss": loss,
            "ce": jnp.mean(aux["ce"]),
            "penalty": jnp.mean(aux["penalty"]),
            "accuracy": jnp.mean(jnp.argmax(aux["logits"], -1) == y),
            "grad_norm": optax.tree.norm(grads),
            "finite": finite,
        }
        return kept, metrics

    return update


def make_train_step(model: models_lib.Model, objective, optimizer) -> Callable:
    """`make_update_fn` jitted with the state donated.

    The returned function checks the batch's rank and dtype and a concrete strength in
    Python before dispatching (so bad input fails before compilation), and passes the
    strength as a float32 array, so Python floats share the arrays' compilation.

    Args:
      model: a `pagjax.models.Model`.
      objective: from `pagjax.objectives.make_objective`.
      optimizer: an optax optimizer (e.g. from `make_optimizer`).

    Returns:
      ``train_step(state, x, y, key, strength) -> (state, metrics)``; ``state`` is donated.
    """
    jitted = jax.jit(make_update_fn(model, objective, optimizer), donate_argnums=0)

    def train_step(state, x, y, key, strength):
        validation.check_images("x", x)
        validation.check_labels("y", y, batch=x.shape[0])
        validation.check_strength("strength", strength)
        # one dtype for Python floats and arrays alike: a weakly typed float would retrace
        return jitted(state, x, y, key, jnp.asarray(strength, jnp.float32))

    train_step.jitted = jitted
    return train_step


batch_indices = engine.batch_indices  # the batches every training run sees


def seed_keys(seed: int) -> tuple[Array, Array, Array]:
    """(init_key, data_key, step_key) of a model trained with `seed`.

    `train` and the sweep engine (`pagjax.sweep`) both derive their keys here, so a model
    of a sweep is exactly the model `train` gives for the same seed.
    """
    init_key, data_key, step_key = jax.random.split(jax.random.key(seed), 3)
    return init_key, data_key, step_key


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One model's training run (the fields a sweep varies are `method`, `strength`, `seed`)."""

    model: str = "mlp"
    method: str = "ce"
    strength: float = 0.0
    official: bool = False
    steps: int = 1500
    batch_size: int = 128
    seed: int = 0
    optimizer: OptimizerConfig = OptimizerConfig()
    pgd_steps: int = 10
    pgd_box: tuple[float, float] | None = None
    smoothness_noise_std: float = 0.1
    official_grad_accumulation: bool = False  # reproduction switches (pagjax.objectives)
    official_bn_updates: bool = False

    def validate(self):
        methods_lib.get(self.method, argument="TrainConfig.method")
        validation.check_strength("strength", self.strength)
        validation.check_positive_int("steps", self.steps)
        validation.check_positive_int("batch_size", self.batch_size)
        if not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        self.optimizer.validate()

    def objective_options(self) -> objectives_lib.ObjectiveOptions:
        return objectives_lib.ObjectiveOptions(
            official=self.official,
            pgd_steps=self.pgd_steps,
            pgd_box=self.pgd_box,
            smoothness_noise_std=self.smoothness_noise_std,
            official_grad_accumulation=self.official_grad_accumulation,
            official_bn_updates=self.official_bn_updates,
        )


class TrainResult(NamedTuple):
    variables: dict
    history: dict[str, np.ndarray]
    diverged: bool
    diverged_at: int | None


def check_training_data(x, y, num_classes: int, batch_size: int) -> None:
    """Validate training arrays once, before any compilation (a NaN in x would make every
    step non-finite and skipped: refused here instead)."""
    validation.check_images("x", x, finite=True)
    validation.check_labels("y", y, num_classes=num_classes, batch=x.shape[0])
    if x.shape[0] < batch_size:
        raise ValueError(f"batch_size {batch_size} exceeds the {x.shape[0]} training examples")


def train(
    config: TrainConfig,
    x_train,
    y_train,
    *,
    num_classes: int | None = None,
    log_every: int = 50,
    progress: bool = True,
    checkpointer=None,
    checkpoint_every: int | None = None,
) -> TrainResult:
    """Train one model on arrays in memory (through `pagjax.engine.train_loop`).

    Args:
      config: the run's settings (validated before anything is compiled).
      x_train, y_train: (N, H, W, C) float images and (N,) integer labels.
      num_classes: default ``max(y_train) + 1``.
      log_every: steps between history entries (and progress updates).
      progress: show a progress bar with the loss.
      checkpointer, checkpoint_every: a `pagjax.io.Checkpointer` to resume from and save
        to every ``checkpoint_every`` steps (default: every ``log_every``).

    Returns:
      `TrainResult`: the variables, the history (``step`` and each metric, every
      ``log_every`` steps), and whether and where (the end of the logging interval in
      which) a step first had a NaN/inf loss or gradient. Every step is checked; the
      run stops there, with the update skipped.
    """
    config.validate()
    validation.check_positive_int("log_every", log_every)
    num_classes = num_classes or int(np.max(np.asarray(y_train))) + 1
    check_training_data(x_train, y_train, num_classes, config.batch_size)
    model = models_lib.build_model(config.model, num_classes)
    objective = objectives_lib.make_objective(config.method, config.objective_options())
    optimizer = make_optimizer(config.optimizer, config.steps)
    init_key, data_key, step_key = seed_keys(config.seed)
    x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)
    state = create_train_state(model, optimizer, init_key, x_train[: config.batch_size])
    update = make_update_fn(model, objective, optimizer)
    strength = jnp.asarray(config.strength, jnp.float32)

    def step_fn(state, batch):
        return update(state, batch[0], batch[1], step_key, strength)

    result = engine.train_loop(
        step_fn, state, (x_train, y_train), data_key, steps=config.steps, batch_size=config.batch_size,
        steps_per_call=log_every, checkpointer=checkpointer, checkpoint_every=checkpoint_every,
        progress=f"{config.method}={config.strength:g}" if progress else None, stop_when_all_nonfinite=True)
    diverged = bool(result.nonfinite)
    steps = result.history["step"]
    logged = (steps % log_every == 0) | (steps == steps.max(initial=0))  # not the epoch ends in between
    history = {name: v[logged] for name, v in result.history.items()}
    return TrainResult(variables_of(result.state), history, diverged,
                       int(result.first_nonfinite) if diverged else None)
