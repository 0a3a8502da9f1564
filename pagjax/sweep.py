"""Training a whole strength sweep (strengths x seeds) with one function.

`train_models` trains K models of one method, model architecture and optimizer, which
differ only in strength and seed. Model k is trained as `pagjax.training.train` would
train it alone (up to floating-point rounding, which differs between strategies and can
grow through training; the sweep therefore records the strategy in its settings): parameters from ``split(key(seed_k), 3)[0]``, batches from
``batch_indices(data_key, step)``, step noise from ``fold_in(step_key, step)``. Only how
the K models share the hardware changes (``strategy``):

* ``"vmap"``: one program steps all K models at once (`jax.vmap` over the sweep axis).
  Best for small models and on GPU/TPU.
* ``"loop"``: the models are trained one after another by one compiled program. On CPU
  conv nets run faster this way (vmap over 8 conv-net copies was 5x slower on CPU).
* ``"sharded"``: like ``vmap`` with the sweep axis split over all devices of a mesh
  (K padded up to a multiple of the device count). Under ``jax.distributed`` the mesh
  spans every host's devices with the same code.
* ``"auto"``: ``sharded`` when there are several devices, else ``vmap`` for MLPs and
  on accelerators, ``loop`` for conv nets on CPU (see `choose_strategy`; the figures
  behind it come from ``python -m benchmarks.bench_sweep``). On CPU the command line
  splits the cores into devices for MLP sweeps first (`cpu_devices_for`), so ``auto``
  shards them.

Training runs on the one engine (`pagjax.engine.train_loop`): steps in chunks of
``steps_per_call``, looped on the device or, for conv nets on CPU, on the host
(`choose_step_loop`), orbax checkpoints every ``checkpoint_every`` steps, so a killed run
loses at most one interval. A model whose loss or gradient turns NaN/inf skips the update
(it cannot poison the others) and is flagged as diverged.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pagjax import engine
from pagjax import models as models_lib
from pagjax import training as train_lib
from pagjax import validation

Array = jax.Array
STRATEGIES = ("auto", "vmap", "loop", "sharded")


class SweepState(NamedTuple):
    """Stacked train states of K models, their keys and sticky divergence flags."""

    train: train_lib.TrainState
    data_keys: Array
    step_keys: Array
    strengths: Array
    diverged: Array  # (K,) bool: ever had a non-finite loss or gradient


def choose_strategy(model: models_lib.Model, num_models: int, backend: str | None = None,
                    num_devices: int | None = None) -> str:
    """The default strategy for this backend and model (see the module docstring)."""
    backend = backend or jax.default_backend()
    num_devices = num_devices or jax.device_count()
    if num_devices > 1 and num_models > 1:
        return "sharded"
    if backend == "cpu" and not isinstance(model.module, models_lib.MLP):
        return "loop"
    return "vmap"


def cpu_devices_for(models_per_method: Sequence[int], cores: int) -> int:
    """How many XLA CPU devices to split ``cores`` cores into for a sharded MLP sweep: the
    most, up to one per core, that divide every method's model count (no padded models).

    One CPU device ran the small batched matmuls of K vmapped MLPs on about one core, while
    each device's program runs on its own thread: with 2 devices on 2 cores the default
    sweep's steady steps took 8.4 instead of 15 ms (gradnorm) and 16 instead of 34 ms (PGD),
    63.5 s in all instead of 77 s (jax 0.10.2; `docs/benchmarks.md`). Measured on 2 cores
    only.
    """
    if not models_per_method or any(int(k) < 1 for k in models_per_method):
        raise ValueError(f"models_per_method must be positive counts, got {list(models_per_method)!r}")
    if int(cores) < 1:
        raise ValueError(f"cores must be at least 1, got {cores!r}")
    common = math.gcd(*(int(k) for k in models_per_method))
    return max(d for d in range(1, min(int(cores), common) + 1) if common % d == 0)


def choose_step_loop(model: models_lib.Model, backend: str | None = None) -> str:
    """Where the steps of a chunk are looped for ``model`` (see `engine.choose_step_loop`)."""
    return engine.choose_step_loop(not isinstance(model.module, models_lib.MLP), backend)


def init_sweep_state(model, optimizer, strengths, seeds, sample_x) -> SweepState:
    """Initial states of all models; model k starts as `train.train` with seed k would."""
    def one(seed):
        init_key, data_key, step_key = train_lib.seed_keys(seed)
        state = train_lib.create_train_state(model, optimizer, init_key, sample_x)
        return state, data_key, step_key

    states = [one(int(s)) for s in seeds]
    stack = lambda *xs: jnp.stack(xs)  # noqa: E731
    train_states = jax.tree.map(stack, *[s[0] for s in states])
    return SweepState(
        train_states,
        jnp.stack([s[1] for s in states]),
        jnp.stack([s[2] for s in states]),
        jnp.asarray(strengths, jnp.float32),
        jnp.zeros((len(seeds),), bool),
    )


def make_step_fn(model, objective, optimizer) -> Callable:
    """The engine's step of ONE model of a sweep: (SweepState slice, (x, y)) -> (state, metrics)."""
    update = train_lib.make_update_fn(model, objective, optimizer)

    def step(state: SweepState, batch):
        train, metrics = update(state.train, batch[0], batch[1], state.step_keys, state.strengths)
        return state._replace(train=train, diverged=state.diverged | ~metrics["finite"]), metrics

    return step


def train_models(
    model: models_lib.Model,
    objective,
    optimizer,
    x_train,
    y_train,
    strengths,
    seeds,
    *,
    steps: int,
    batch_size: int,
    strategy: str = "auto",
    steps_per_call: int = 100,
    state: SweepState | None = None,
    checkpointer=None,
    checkpoint_every: int | None = None,
    checkpoint_seconds: float | None = None,
    on_progress: Callable[[engine.Progress], None] | None = None,
    step_loop: str = "auto",
) -> SweepState:
    """Train K = len(strengths) models (one method) and return their final `SweepState`.

    Args:
      model, objective, optimizer: as for `pagjax.training.make_update_fn` (optimizer built
        for `steps` total steps).
      x_train, y_train: training arrays (shared by all models).
      strengths, seeds: (K,) strength and integer seed of each model.
      steps, batch_size: training length and batch size of every model.
      strategy: ``auto``, ``vmap``, ``loop`` or ``sharded`` (module docstring).
      steps_per_call: the most steps per compiled call.
      state: a `SweepState` to start from (its step counter says where), instead of the
        fresh one of `init_sweep_state`.
      checkpointer, checkpoint_every, checkpoint_seconds: a `pagjax.io.Checkpointer`: its
        latest checkpoint is restored first, and one is saved every ``checkpoint_every``
        steps or ``checkpoint_seconds`` of training and at the end (`engine.train_loop`).
      on_progress: called with an `engine.Progress` after each chunk.
      step_loop: ``auto``, ``device`` or ``host`` (see `choose_step_loop`).

    Returns:
      the final `SweepState`; its ``diverged`` flags say which models had a NaN/inf step.
    """
    strengths = np.asarray(strengths, np.float64)
    seeds = [int(s) for s in seeds]
    validation.check_choice("strategy", strategy, STRATEGIES)
    validation.check_strength("strengths", strengths)
    validation.check_positive_int("steps", steps)
    validation.check_positive_int("batch_size", batch_size)
    validation.check_positive_int("steps_per_call", steps_per_call)
    validation.check_choice("step_loop", step_loop, engine.STEP_LOOPS)
    if strengths.ndim != 1 or len(seeds) != strengths.shape[0] or not seeds:
        raise ValueError(f"strengths and seeds must be non-empty and of equal length, got {strengths.shape} and {len(seeds)}")
    train_lib.check_training_data(x_train, y_train, model.num_classes, batch_size)
    if strategy == "auto":
        strategy = choose_strategy(model, len(seeds))
    # step_loop "auto" is resolved by the engine from the traced step (any convolution)
    x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)
    if state is None:
        state = init_sweep_state(model, optimizer, strengths, seeds, x_train[:batch_size])
    done = int(np.asarray(state.train.step).reshape(-1)[0])
    result = engine.train_loop(
        make_step_fn(model, objective, optimizer), state, (x_train, y_train), state.data_keys,
        steps=steps, batch_size=batch_size, models=strategy, step_loop=step_loop, steps_per_call=steps_per_call,
        checkpointer=checkpointer, checkpoint_every=checkpoint_every, checkpoint_seconds=checkpoint_seconds,
        progress=on_progress, start_step=done)
    return result.state


def model_variables(state: SweepState, i: int) -> dict:
    """Variables of model i of a sweep, for `Model.apply`."""
    return train_lib.variables_of(jax.tree.map(lambda a: a[i], state.train))
