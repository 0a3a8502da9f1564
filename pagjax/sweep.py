"""Training a whole strength sweep (strengths x seeds) with one function.

`train_models` trains K models of one method, model architecture and optimizer, which
differ only in strength and seed. Model k is trained exactly as `pagjax.training.train`
would train it alone: parameters from ``split(key(seed_k), 3)[0]``, batches from
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
  behind it come from ``python -m benchmarks.bench_sweep``).

Steps run in chunks of ``steps_per_call``, inside one `lax.fori_loop` (few dispatches) or,
for conv nets on CPU, one step per dispatch (`choose_step_loop`); a checkpoint callback is
called after each chunk, so a killed run loses at most one
chunk. A model whose loss or gradient turns NaN/inf skips the update (it cannot poison
the others) and is flagged as diverged.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pagjax import devices as devices_lib
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


STEP_LOOPS = ("auto", "device", "host")


def choose_step_loop(model: models_lib.Model, backend: str | None = None) -> str:
    """Where the steps of a chunk are looped: ``device`` (one `lax.fori_loop`, few
    dispatches) or ``host`` (one compiled step per dispatch).

    On XLA:CPU a conv-net step inside a while loop ran about 8x slower than the same step
    dispatched alone (small CNN, batch 64: 36.7 ms vs 4.7 ms; MLPs were unaffected: 0.88
    vs 0.80 ms), so conv nets on CPU loop on the host.
    """
    backend = backend or jax.default_backend()
    if backend == "cpu" and not isinstance(model.module, models_lib.MLP):
        return "host"
    return "device"


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


def make_chunk_fn(model, objective, optimizer, batch_size: int, num_steps: int) -> Callable:
    """Pure function running `num_steps` steps of ONE model: (state, data, ...) -> (state, metrics)."""
    update = train_lib.make_update_fn(model, objective, optimizer)

    def run(state, diverged, data_key, step_key, strength, x_train, y_train):
        n = x_train.shape[0]

        def body(_, carry):
            state, diverged, _ = carry
            idx = train_lib.batch_indices(data_key, state.step, n, batch_size)
            state, metrics = update(state, x_train[idx], y_train[idx], step_key, strength)
            last = jnp.stack([metrics["loss"], metrics["accuracy"]])
            return state, diverged | ~metrics["finite"], last

        init = (state, diverged, jnp.zeros((2,), jnp.float32))
        if num_steps == 1:  # no while loop at all (see `choose_step_loop`)
            return body(0, init)
        return jax.lax.fori_loop(0, num_steps, body, init)

    return run


class SweepProgress(NamedTuple):
    step: int
    total_steps: int
    loss: np.ndarray  # (K,) last loss of each model
    accuracy: np.ndarray
    seconds: float


def _pad(tree, k_pad):
    if k_pad == 0:
        return tree
    return jax.tree.map(lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], k_pad, 0)]), tree)


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
    on_chunk: Callable[[SweepState], None] | None = None,
    on_progress: Callable[[SweepProgress], None] | None = None,
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
      steps_per_call: steps per compiled call; checkpoints happen between calls.
      state: a restored `SweepState` to resume from (its step counter says where).
      on_chunk: called with the state after each chunk (e.g. to checkpoint it); the
        next chunk donates the state's buffers, so copy (or save) what you keep.
      on_progress: called with a `SweepProgress` after each chunk.
      step_loop: ``auto``, ``device`` or ``host`` (see `choose_step_loop`); the same
        steps either way.
    """
    strengths = np.asarray(strengths, np.float64)
    seeds = [int(s) for s in seeds]
    validation.check_choice("strategy", strategy, STRATEGIES)
    validation.check_strength("strengths", strengths)
    validation.check_positive_int("steps", steps)
    validation.check_positive_int("batch_size", batch_size)
    validation.check_positive_int("steps_per_call", steps_per_call)
    validation.check_choice("step_loop", step_loop, STEP_LOOPS)
    if strengths.ndim != 1 or len(seeds) != strengths.shape[0] or not seeds:
        raise ValueError(f"strengths and seeds must be non-empty and of equal length, got {strengths.shape} and {len(seeds)}")
    train_lib.check_training_data(x_train, y_train, model.num_classes, batch_size)
    k = len(seeds)
    if strategy == "auto":
        strategy = choose_strategy(model, k)
    if step_loop == "auto":
        step_loop = choose_step_loop(model)
    x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)
    if state is None:
        state = init_sweep_state(model, optimizer, strengths, seeds, x_train[:batch_size])

    chunk_cache: dict[int, Callable] = {}

    def compiled(n):
        if n not in chunk_cache:
            run = make_chunk_fn(model, objective, optimizer, batch_size, n)
            if strategy != "loop":
                run = jax.vmap(run, in_axes=(0, 0, 0, 0, 0, None, None))
            chunk_cache[n] = jax.jit(run, donate_argnums=(0, 1))
        return chunk_cache[n]

    mesh = None
    k_pad = 0
    if strategy == "sharded":
        mesh = devices_lib.make_mesh("models", jax.devices())
        k_pad = -k % mesh.size
        x_train, y_train = devices_lib.replicate(mesh, (x_train, y_train))

    start = int(np.asarray(state.train.step).reshape(-1)[0])
    t0 = time.perf_counter()
    done = start
    def advance(fn_args, n):
        """n steps from fn_args = (train, diverged, data_keys, step_keys, strengths)."""
        if step_loop == "device":
            return compiled(n)(*fn_args, x_train, y_train)
        one_step = compiled(1)
        train_state, diverged, keys = fn_args[0], fn_args[1], fn_args[2:]
        for _ in range(n):
            train_state, diverged, last = one_step(train_state, diverged, *keys, x_train, y_train)
        return train_state, diverged, last

    while done < steps:
        n = min(steps_per_call, steps - done)
        args = (state.train, state.diverged, state.data_keys, state.step_keys, state.strengths)
        if strategy == "loop":
            outs = [advance(jax.tree.map(lambda a: a[i], args), n) for i in range(k)]
            train_state = jax.tree.map(lambda *xs: jnp.stack(xs), *[o[0] for o in outs])
            diverged = jnp.stack([o[1] for o in outs])
            last = jnp.stack([o[2] for o in outs])
        else:
            if strategy == "sharded":
                args = devices_lib.shard_leading(mesh, _pad(args, k_pad))
            train_state, diverged, last = advance(args, n)
            if k_pad:
                train_state, diverged, last = jax.tree.map(lambda a: a[:k], (train_state, diverged, last))
        state = state._replace(train=train_state, diverged=diverged)
        done += n
        if on_chunk is not None:
            on_chunk(state)
        if on_progress is not None:
            last = np.asarray(last)
            on_progress(SweepProgress(done, steps, last[:, 0], last[:, 1], time.perf_counter() - t0))
    return state


def model_variables(state: SweepState, i: int) -> dict:
    """Variables of model i of a sweep, for `Model.apply`."""
    return train_lib.variables_of(jax.tree.map(lambda a: a[i], state.train))


def stacked_variables(state: SweepState) -> dict:
    """Variables of all models stacked on a leading axis (for `jax.vmap` over models)."""
    return train_lib.variables_of(state.train)


@dataclasses.dataclass(frozen=True)
class StrategyTiming:
    strategy: str
    seconds_per_step: float
    model_steps_per_second: float


def time_strategies(model, objective, optimizer, x_train, y_train, strengths, seeds, *, batch_size: int,
                    steps: int = 20, strategies=("vmap", "loop", "sharded")) -> list[StrategyTiming]:
    """Measure model-steps per second of each strategy after compilation (used by benchmarks)."""
    out = []
    for strategy in strategies:
        if strategy == "sharded" and jax.device_count() == 1:
            continue
        kw = dict(steps=steps, batch_size=batch_size, strategy=strategy, steps_per_call=steps)
        s = train_models(model, objective, optimizer, x_train, y_train, strengths, seeds, **kw)  # compile
        jax.block_until_ready(s.train.params)
        t = time.perf_counter()
        s = train_models(model, objective, optimizer, x_train, y_train, strengths, seeds, **kw)
        jax.block_until_ready(s.train.params)
        dt = (time.perf_counter() - t) / steps
        out.append(StrategyTiming(strategy, dt, len(seeds) / dt))
    return out
