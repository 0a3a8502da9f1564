"""One training engine for every network the project trains.

`train_loop(step_fn, state, data, data_key, steps=..., batch_size=...)` runs
``state, metrics = step_fn(state, batch)`` for ``steps`` steps, where ``batch`` is
``data`` (any pytree of arrays with a leading example axis) at this step's indices.
Classifiers, the sweep's stacked classifiers, the autoencoder and the score model all go
through it; it provides, once:

* **batches as a pure function of (data_key, step)**: each epoch is a permutation drawn
  from ``fold_in(data_key, epoch)`` (remainder dropped), computed once per epoch, not
  once per step, so a resumed run sees exactly the batches of an uninterrupted one;
* **one jitted, donated program**, the steps of a chunk looped on the device
  (`lax.fori_loop` with the trip count as an argument: few dispatches, one compilation)
  or on the host (one dispatch per step), chosen per backend and network by
  `choose_step_loop`;
* **several models at once** (``models="vmap"``, ``"loop"`` or ``"sharded"`` over a
  leading model axis of ``state`` and ``data_key``);
* **NaN/inf steps recorded**, sticky per model (``step_fn`` skips the update itself and
  reports ``metrics["finite"]``), optionally stopping when every model has diverged;
* **orbax checkpoints** every ``checkpoint_every`` steps, restored on the next call, so a
  kill loses at most one interval; chunks end on checkpoint and epoch boundaries;
* **progress**: a tqdm bar with the loss (``progress="name"``) or a callback.

``step_fn`` owns its randomness (``fold_in(key, state.step)`` of a key in its state) and
its step counter; the engine counts steps on the host to find batches and checkpoints.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core
import numpy as np

from pagjax import validation
from pagjax.xla import jit_one_shot

Array = jax.Array
STEP_LOOPS = ("auto", "device", "host")
MODEL_MODES = ("single", "vmap", "loop", "sharded")


# --------------------------------------------------------------------------- batches


def epoch_permutation(data_key: Array, epoch, num_examples: int) -> Array:
    """The example order of ``epoch``: a permutation of ``num_examples`` from (key, epoch)."""
    return jax.random.permutation(jax.random.fold_in(data_key, epoch), num_examples)


# Compiled once per process and example count (not once per training): each runs once an epoch.
_epoch_permutation = jit_one_shot(epoch_permutation, static_argnums=2)
_stacked_epoch_permutations = jit_one_shot(jax.vmap(epoch_permutation, in_axes=(0, None, None)), static_argnums=2)


def batch_slice(perm: Array, offset, batch_size: int) -> Array:
    """Indices of batch ``offset`` of an epoch's permutation."""
    return jax.lax.dynamic_slice_in_dim(perm, offset * batch_size, batch_size)


def batch_indices(data_key: Array, step, num_examples: int, batch_size: int) -> Array:
    """Indices of the batch of ``step`` (what `train_loop` feeds): pure in (key, step)."""
    per_epoch = num_examples // batch_size
    epoch, offset = step // per_epoch, step % per_epoch
    return batch_slice(epoch_permutation(data_key, epoch, num_examples), offset, batch_size)


# --------------------------------------------------------------------------- step loops


def _has_convolution(jaxpr) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            return True
        if any(_has_convolution(sub) for sub in jax_core.jaxprs_in_params(eqn.params)):
            return True
    return False


def uses_convolution(fn: Callable, *args) -> bool:
    """Whether ``fn(*args)`` traces to a convolution (in any sub-program)."""
    return _has_convolution(jax.make_jaxpr(fn)(*args).jaxpr)


def choose_step_loop(has_convolution: bool, backend: str | None = None) -> str:
    """``"device"`` (steps in one `lax.fori_loop`) or ``"host"`` (one dispatch per step).

    On XLA:CPU a conv net's step inside a while loop ran several times slower than the
    same step dispatched alone (small CNN, batch 64: 36.7 vs 4.7 ms; conv autoencoder,
    28x28, batch 128: 2.75 vs 0.58 s), while MLPs were unaffected (0.88 vs 0.80 ms). So
    conv nets on CPU loop on the host; everything else, and every accelerator, on device.
    """
    backend = backend or jax.default_backend()
    return "host" if backend == "cpu" and has_convolution else "device"


# --------------------------------------------------------------------------- the loop


class Progress(NamedTuple):
    """What a progress callback sees after each chunk."""

    step: int
    total_steps: int
    metrics: dict  # the chunk's last step, host arrays ((K,) per metric with a model axis)
    seconds: float  # since this call started


class LoopResult(NamedTuple):
    """The final state and what happened on the way."""

    state: Any
    nonfinite: np.ndarray  # bool, () or (K,): ever had a skipped NaN/inf step (sticky)
    first_nonfinite: np.ndarray  # int, () or (K,): end of the chunk where it first happened, -1 if never
    history: dict  # "step" and each metric: one entry per chunk (its last step)
    start_step: int  # where this call started (the restored checkpoint's step, or 0)


def _gather(data, idx):
    return jax.tree.map(lambda a: a[idx], data)


class _Programs:
    """The jitted programs of one `train_loop` call: a device loop of any length (the trip
    count is an argument, so one compilation serves every chunk) or a single step.

    The step is traced once, on the first call: that trace gives the metrics' names, whether
    the step convolves (``step_loop="auto"``, `choose_step_loop`) and, for a host loop, the
    program itself; a device loop traces once more, inside its `lax.fori_loop`. (Tracing
    a U-Net's training step takes seconds; this was three traces.)
    """

    def __init__(self, step_fn, batch_size, vmapped, step_loop):
        def one(state, data, perm, offset):
            return step_fn(state, _gather(data, batch_slice(perm, offset, batch_size)))

        self.one = jax.vmap(one, in_axes=(0, None, 0, None)) if vmapped else one
        self.step_loop = step_loop
        self._program = None  # the jitted device loop or single step, made by `prepare`
        self._metrics_like = None

    def _single(self, state, bad, data, perm, offset):
        s, m = self.one(state, data, perm, offset)
        if not isinstance(m, dict) or "loss" not in m or "finite" not in m:
            raise ValueError(f"step_fn's metrics must be a dict with 'loss' and 'finite', got {m!r}")
        return s, bad | ~m["finite"], m

    def _chunk(self, state, bad, data, perm, offset, n):
        def body(i, carry):
            s, b, _ = carry
            return self._single(s, b, data, perm, offset + i)

        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), self._metrics_like)
        return jax.lax.fori_loop(0, n, body, (state, bad, zeros))

    def prepare(self, state, bad, data, perm):
        """Trace one step, choose the loop and make its program."""
        single = jax.jit(self._single, donate_argnums=(0, 1))
        # a call of `single` with arguments like these reuses this trace
        traced = single.trace(state, bad, data, perm, jnp.int32(0))
        self._metrics_like = traced.out_info[2]
        if self.step_loop == "auto":
            self.step_loop = choose_step_loop(_has_convolution(traced.jaxpr.jaxpr))
        self._program = single if self.step_loop == "host" else jax.jit(self._chunk, donate_argnums=(0, 1))

    def advance(self, state, bad, data, perm, offset, n):
        """n steps from batch ``offset`` of the epoch whose order is ``perm``."""
        if self._program is None:
            self.prepare(state, bad, data, perm)
        if self.step_loop == "device":
            return self._program(state, bad, data, perm, jnp.int32(offset), jnp.int32(n))
        metrics = None
        for i in range(n):
            state, bad, metrics = self._program(state, bad, data, perm, jnp.int32(offset + i))
        return state, bad, metrics


def _slice(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def train_loop(
    step_fn: Callable,
    state,
    data,
    data_key: Array,
    *,
    steps: int,
    batch_size: int,
    models: str = "single",
    step_loop: str = "auto",
    steps_per_call: int = 100,
    checkpointer=None,
    checkpoint_every: int | None = None,
    checkpoint_seconds: float | None = None,
    progress: str | Callable[[Progress], None] | None = None,
    stop_when_all_nonfinite: bool = False,
    mesh=None,
    start_step: int = 0,
) -> LoopResult:
    """Train ``state`` for ``steps`` steps of ``step_fn`` on minibatches of ``data``.

    Args:
      step_fn: pure ``(state, batch) -> (state, metrics)`` of ONE model; ``metrics`` is a
        dict of scalars with at least ``"loss"`` and ``"finite"`` (False when the step
        was non-finite and skipped). Not jitted by the caller: the engine jits it.
      state: the initial state (one model, or K models stacked on a leading axis). Its
        buffers are donated: do not use it after the call.
      data: pytree of arrays with a common leading example axis (e.g. ``(x, y)``).
      data_key: the key of the batch order (K keys with a model axis).
      steps: total steps (a restored checkpoint says how many are done).
      batch_size: examples per batch (at most the number of examples).
      models: ``"single"``; or with a leading model axis: ``"vmap"`` (one program for all),
        ``"loop"`` (one model after another per chunk) or ``"sharded"`` (like vmap, the
        model axis split over ``mesh``, padded to a multiple of its size).
      step_loop: ``"auto"`` (`choose_step_loop` from the traced step), ``"device"`` or
        ``"host"``: the same steps either way.
      steps_per_call: the most steps per chunk; chunks also end at epoch ends and
        checkpoints.
      checkpointer: a `pagjax.io.Checkpointer`; its latest checkpoint is restored first,
        and one is saved every ``checkpoint_every`` steps, at the first chunk end
        ``checkpoint_seconds`` after the last save, and at the end (with neither given:
        after every chunk). Seconds bound the work a kill loses whatever a step costs,
        without paying a save every few steps on a fast model.
      progress: None, a tqdm bar's description, or a callback taking `Progress`.
      stop_when_all_nonfinite: stop early once every model has had a non-finite step.
      mesh: for ``models="sharded"``: a 1-D mesh (default: all devices).
      start_step: the step ``state`` is at (a restored checkpoint overrides it).

    Returns:
      `LoopResult`.
    """
    validation.check_positive_int("steps", steps)
    validation.check_positive_int("batch_size", batch_size)
    validation.check_positive_int("steps_per_call", steps_per_call)
    validation.check_choice("step_loop", step_loop, STEP_LOOPS)
    validation.check_choice("models", models, MODEL_MODES)
    if checkpoint_every is not None:
        validation.check_positive_int("checkpoint_every", checkpoint_every)
    if checkpoint_seconds is not None:
        validation.check_positive("checkpoint_seconds", checkpoint_seconds)
    leaves = jax.tree.leaves(data)
    if not leaves:
        raise ValueError("data must hold at least one array")
    n = int(leaves[0].shape[0])
    if any(int(a.shape[0]) != n for a in leaves):
        raise ValueError(f"data arrays must share their leading axis, got {[a.shape for a in leaves]}")
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} exceeds the {n} training examples")
    stacked = models != "single"
    k = int(data_key.shape[0]) if stacked else None
    if stacked and (data_key.ndim != 1 or any(int(a.shape[0]) != k for a in jax.tree.leaves(state))):
        raise ValueError(f"models={models!r} needs state leaves and data_key with a leading axis of the same size")

    bad = jnp.zeros((k,) if stacked else (), bool)
    start = int(start_step)
    if checkpointer is not None:
        restored = checkpointer.restore_latest({"state": state, "nonfinite": bad})
        if restored is not None:
            start, tree = restored
            state, bad = tree["state"], tree["nonfinite"]
    first = np.where(np.asarray(bad), start, -1)

    data = jax.tree.map(jnp.asarray, data)
    data_key = jnp.copy(data_key)  # kept: the state's own copy is donated
    programs = _Programs(step_fn, batch_size, models in ("vmap", "sharded"), step_loop)
    perm_fn = _stacked_epoch_permutations if stacked else _epoch_permutation

    k_pad = 0
    if models == "sharded":
        from pagjax import devices as devices_lib

        mesh = mesh or devices_lib.make_mesh("models", jax.devices())
        k_pad = -k % mesh.size
        data = devices_lib.replicate(mesh, data)

        def pad(tree):
            if k_pad:
                tree = jax.tree.map(lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], k_pad, 0)]), tree)
            return devices_lib.shard_leading(mesh, tree)

        state, bad, data_key = pad(state), pad(bad), pad(data_key)

    def unpadded(tree):
        return jax.tree.map(lambda a: a[:k], tree) if k_pad else tree

    bar = None
    if isinstance(progress, str):
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc=progress, unit="step", smoothing=0.1)

    per_epoch = n // batch_size
    history: dict[str, list] = {"step": []}
    perm, perm_epoch = None, None
    t0 = time.perf_counter()
    step = start
    last_saved, last_saved_at = start, time.perf_counter()
    every_chunk = checkpoint_every is None and checkpoint_seconds is None
    try:
        while step < steps:
            epoch, offset = divmod(step, per_epoch)
            if epoch != perm_epoch:
                perm, perm_epoch = perm_fn(data_key, epoch, n), epoch
            # chunks end on multiples of steps_per_call, epoch ends and checkpoints
            todo = min(steps_per_call - step % steps_per_call, steps - step, per_epoch - offset)
            if checkpointer is not None and checkpoint_every is not None:
                todo = min(todo, last_saved + checkpoint_every - step)
            if models == "loop":
                outs = [programs.advance(_slice(state, i), bad[i], data, perm[i], offset, todo) for i in range(k)]
                state, bad, metrics = _stack([o[0] for o in outs]), jnp.stack([o[1] for o in outs]), _stack(
                    [o[2] for o in outs])
            else:
                state, bad, metrics = programs.advance(state, bad, data, perm, offset, todo)
            step += todo
            host_bad, metrics = jax.device_get((unpadded(bad), unpadded(metrics)))
            first = np.where((first < 0) & np.asarray(host_bad), step, first)
            history["step"].append(step)
            for name, value in metrics.items():
                history.setdefault(name, []).append(value)
            if checkpointer is not None and (
                    every_chunk or step == steps
                    or (checkpoint_every is not None and step - last_saved >= checkpoint_every)
                    or (checkpoint_seconds is not None and time.perf_counter() - last_saved_at >= checkpoint_seconds)):
                checkpointer.save(step, {"state": unpadded(state), "nonfinite": unpadded(bad)})
                last_saved, last_saved_at = step, time.perf_counter()
            if bar is not None:
                bar.update(todo)
                bar.set_postfix(loss=f"{np.nanmean(metrics['loss']):.4g}")
            elif callable(progress):
                progress(Progress(step, steps, metrics, time.perf_counter() - t0))
            if stop_when_all_nonfinite and np.all(host_bad):
                break
    finally:
        if bar is not None:
            bar.close()
    hist = {name: np.asarray(v) for name, v in history.items()}
    return LoopResult(unpadded(state), np.asarray(jax.device_get(unpadded(bad))), first, hist, start)


def all_finite(tree) -> Array:
    """True when every leaf of ``tree`` is finite (for a step's ``metrics["finite"]``)."""
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def skip_nonfinite(new_state, old_state, finite: Array):
    """``new_state`` where ``finite``, else ``old_state`` (a NaN/inf update is skipped)."""
    return jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, old_state)
