"""A whole strength sweep, end to end: data -> train -> measure -> regimes -> outputs.

`run_sweep(SweepConfig(...), out_dir)` is what ``python -m experiments.sweep_eps`` calls.
It writes into `out_dir`:

* ``config.json``   every setting and the library versions;
* ``results.csv``   one row per (method, strength, seed) (see `result_columns`);
* ``regimes.json``  per method: regime labels, boundaries and the evidence;
* ``summary.json``  per method: crossover, peak alignment and where, boundaries;
* ``figure3.png``   the paper's Figure-3 layout; ``gradients_<method>.png`` grids;
* ``points/``       finished methods' measurements, ``checkpoints/`` orbax states;
* ``learned/``      real images only: the learned geometry (`pagjax.learned`).

This module is the composition; each idea has its own module:

* `pagjax.sweep_config`: `SweepConfig`, `LearnedConfig`, their checks and defaults;
* `pagjax.outputs`: the output folder (`prepare_output`) and the finished methods' points;
* `pagjax.sweep_data`: the data (`load_data`);
* `pagjax.learned`: real images' learned tangent spaces and scores, cached (`pagjax.cache`);
* `pagjax.results`: curves, regime labels, summaries, the table and the results files.

The names users and recipes import from here (``from pagjax.experiment import SweepConfig``)
stay importable here.

Fault tolerance: training checkpoints every ``checkpoint_seconds`` (or ``checkpoint_every``
steps); a rerun into the
same folder resumes from the last checkpoint and skips finished methods. A rerun with
different settings stops with `SettingsMismatchError` unless ``overwrite=True``.
Execution details (``steps_per_call``, ``checkpoint_every``, ``checkpoint_seconds``, ``data_dir``,
``download``)
may differ between runs: they do not change what is computed. The strategy does (vmap,
loop and sharded round differently, and the differences grow through training), so the
resolved strategy is a setting: a resume with another one stops like any other change.
Damaged state is handled, never trusted: a checkpoint failing its digest is moved aside
(`pagjax.io.Checkpointer`); a bad ``points/`` file is named and re-measured; a damaged
cache entry of ``learned/`` is named and recomputed; results without a readable
``config.json`` stop the run with a message saying how to proceed.

Real images (``dataset`` one of `pagjax.data.dataset_names()`) have no known manifold or
density: ``score_cosine`` is then the cosine with the learned class-conditional score,
``learned_bayes_cosine`` the cosine with the learned Bayes gradient (the figure's alignment
curve and the LPIPS reference), and ``bayes_cosine`` / ``bayes_accuracy`` stay empty: they
are exact quantities.

Randomness: a model's keys come from its seed (`pagjax.training.seed_keys`), the data's
from ``data_seed`` and the learned models' from ``LearnedConfig.seed``, each use by its
purpose name (`pagjax.keys.purpose_key`).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable

import jax
import numpy as np

from pagjax import io as io_lib
from pagjax import measure as measure_lib
from pagjax import metrics as metrics_lib
from pagjax import models as models_lib
from pagjax import objectives as objectives_lib
from pagjax import sweep, training
from pagjax.keys import purpose_key
from pagjax.learned import learned_geometry
from pagjax.outputs import (RESULT_FILES, SettingsMismatchError, finished_points, library_versions, load_points,
                            prepare_output, save_points)
from pagjax.results import (CHANCE_MARGIN, ID_COLUMNS, STATUS_COLUMNS, at_chance, format_table, method_curves,
                            model_health, result_columns, seed_disagreements, seed_evidence, summarize,
                            write_outputs)
from pagjax.sweep_config import (DEFAULT_STRENGTHS, EXECUTION_FIELDS, KNOWN_DATA, ClassifierDefaults,
                                 classifier_defaults, MAX_SEED, MAX_STEPS, REAL_DEFAULT_STRENGTHS,
                                 STRENGTH_NAMES, TFDS_DEFAULT_STRENGTHS, LearnedConfig, SweepConfig,
                                 check_model_options, default_strengths, grid_kind, method_points,
                                 to_official_units)
from pagjax.sweep_data import SweepData, load_data

__all__ = [
    # this module: the sweep's steps
    "run_sweep", "train_method", "make_eval_set", "measure_method",
    # pagjax.sweep_config
    "SweepConfig", "LearnedConfig", "KNOWN_DATA", "ClassifierDefaults", "classifier_defaults", "EXECUTION_FIELDS",
    "DEFAULT_STRENGTHS", "REAL_DEFAULT_STRENGTHS",
    "TFDS_DEFAULT_STRENGTHS", "STRENGTH_NAMES", "MAX_STEPS", "MAX_SEED", "check_model_options",
    "default_strengths", "grid_kind", "method_points", "to_official_units",
    # pagjax.outputs
    "SettingsMismatchError", "RESULT_FILES", "prepare_output", "library_versions", "load_points",
    # pagjax.sweep_data, pagjax.learned
    "SweepData", "load_data", "learned_geometry",
    # pagjax.results
    "ID_COLUMNS", "STATUS_COLUMNS", "CHANCE_MARGIN", "result_columns", "method_curves", "summarize",
    "format_table", "at_chance", "seed_evidence", "model_health", "write_outputs",
]


def train_method(config: SweepConfig, method: str, data: SweepData, out_dir: str,
                 progress: Callable | None = None, log: Callable[[str], None] | None = None) -> sweep.SweepState:
    """Train all (strength, seed) models of one method, resuming from its checkpoint."""
    from pagjax import data as data_lib

    model = models_lib.build_model(config.model, data.num_classes)
    objective = objectives_lib.make_objective(
        method, official=config.official, pgd_steps=config.pgd_steps, smoothness_noise_std=config.smoothness_noise_std,
        official_grad_accumulation=config.official_grad_accumulation, official_bn_updates=config.official_bn_updates)
    objective = data_lib.with_augmentation(objective, config.augment)
    optimizer = training.make_optimizer(config.optimizer, config.steps)
    strengths, seeds = method_points(config, method)
    ckpt = io_lib.Checkpointer(os.path.join(out_dir, "checkpoints", method))
    io_lib.log_resume(ckpt, method, config.steps, log)
    try:
        return sweep.train_models(model, objective, optimizer, data.x_train, data.y_train, strengths, seeds,
                                  steps=config.steps, batch_size=config.batch_size, strategy=config.strategy,
                                  steps_per_call=config.steps_per_call, checkpointer=ckpt,
                                  checkpoint_every=config.checkpoint_every,
                                  checkpoint_seconds=config.checkpoint_seconds, on_progress=progress)
    finally:
        ckpt.close()


def make_eval_set(config: SweepConfig, data: SweepData, out_dir: str, log: Callable[[str], None] = print,
                  progress: bool = True) -> measure_lib.EvalSet:
    """The evaluation set: exact maps for a known manifold, learned ones for real images."""
    if data.manifold is not None:
        return measure_lib.prepare_eval_set(data.x_test, data.y_test, data.num_classes, config.measure,
                                            manifold=data.manifold, z_test=data.z_test,
                                            key=purpose_key(config.data_seed, "bayes accuracy"))
    geo = learned_geometry(config, data, out_dir, log, progress)
    return measure_lib.prepare_eval_set(data.x_test, data.y_test, data.num_classes, config.measure, **geo)


def measure_method(config: SweepConfig, method: str, state: sweep.SweepState, evalset,
                   data: SweepData) -> tuple[list, np.ndarray]:
    """Measure every model of a method: rows and gradient maps (K, grid, H, W, C)."""
    model = models_lib.build_model(config.model, data.num_classes)
    strengths, seeds = method_points(config, method)
    diverged = np.asarray(state.diverged)
    # every model's variables on the host at once, each then put on one device (the eval set's
    # cached maps live on one): slicing a sharded sweep state on the devices compiled a
    # gather per variable
    stacked = jax.device_get(training.variables_of(state.train))
    rows, grids = [], []
    for i, (s, seed) in enumerate(zip(strengths, seeds)):
        # every column, empty until measured: a diverged model's row is complete too
        row = {"method": method, "strength": s, "seed": seed, "diverged": bool(diverged[i]),
               **dict.fromkeys(metrics_lib.columns(config.measure))}
        host = jax.tree.map(lambda a: a[i], stacked)
        finite = all(bool(np.all(np.isfinite(a))) for a in jax.tree.leaves(host))
        variables = jax.device_put(host, jax.devices()[0])
        if diverged[i] or not finite:
            row["diverged"] = True
            grids.append(np.full((config.measure.grid_images, *data.x_test.shape[1:]), np.nan, np.float32))
        else:
            key = purpose_key(seed, "measurement directions")  # the same for every strength of a seed
            values, grads = measure_lib.measure_model(model.apply, variables, evalset, config.measure, key)
            row.update(values)
            grids.append(grads)
        rows.append(row)
    return rows, np.stack(grids)


def _run_method(config: SweepConfig, method: str, data: SweepData, evalset, out_dir: str, bar,
                log: Callable[[str], None]) -> tuple[list, np.ndarray]:
    """Train (or resume) and measure one method's models, then save its points."""
    k = config.num_models(method)
    seen = [0]

    def on_progress(p):
        bar.update((p.step - seen[0]) * k)
        seen[0] = p.step
        bar.set_postfix_str(f"{method} step {p.step}/{p.total_steps} loss {np.nanmean(p.metrics['loss']):.3f} "
                            f"acc {np.nanmean(p.metrics['accuracy']):.3f}")

    t = time.perf_counter()
    bar.set_postfix_str(f"{method}: compiling")  # the first chunk of a conv net can take a minute on a CPU
    state = train_method(config, method, data, out_dir, progress=on_progress, log=log)
    if seen[0] == 0:  # restored a finished checkpoint
        bar.update(k * config.steps)
    bar.set_postfix_str(f"{method}: measuring {k} models")
    rows, grids = measure_method(config, method, state, evalset, data)
    log(f"{method}: {k} models trained and measured in {time.perf_counter() - t:.0f} s")
    save_points(out_dir, method, rows, grids)
    return rows, grids


FIGURE_EVERY_S = 60.0  # while a sweep runs, figure3.png is redrawn at most this often


def run_sweep(config: SweepConfig, out_dir: str, *, overwrite: bool = False, progress: bool = True,
              log: Callable[[str], None] = print) -> list[dict]:
    """Run (or resume) a sweep into `out_dir`; returns the per-method summaries."""
    from tqdm.auto import tqdm

    config.validate()
    prepare_output(out_dir, config, overwrite)
    t0 = time.perf_counter()
    data = load_data(config, progress=progress, log=log)
    evalset = make_eval_set(config, data, out_dir, log, progress)
    rows_by_method, grids_by_method = {}, {}
    total = sum(config.num_models(m) * config.steps for m in config.methods)
    bar = tqdm(total=total, disable=not progress, unit="model-step", smoothing=0.1)
    drawn = []  # methods whose gradient grid this run has written
    figure_at = time.perf_counter()  # when figure3.png was last due
    for i, method in enumerate(config.methods):
        found = finished_points(config, method, out_dir, data, log)
        trained = found is None
        if trained:
            found = _run_method(config, method, data, evalset, out_dir, bar, log)
        else:
            bar.update(config.num_models(method) * config.steps)
        rows_by_method[method], grids_by_method[method] = found
        if trained and i < len(config.methods) - 1:  # the results so far: readable while the sweep runs
            # figure3 too once a minute has passed: a long sweep's figure follows it, a short
            # sweep draws it once (about 2 s a drawing)
            due = time.perf_counter() - figure_at >= FIGURE_EVERY_S
            write_outputs(config, out_dir, rows_by_method, grids_by_method, data.num_classes, evalset,
                          grid_methods=(method,), figure=due)
            figure_at = time.perf_counter() if due else figure_at
            drawn.append(method)
    bar.close()
    summaries = write_outputs(config, out_dir, rows_by_method, grids_by_method, data.num_classes, evalset,
                              grid_methods=[m for m in config.methods if m not in drawn])
    log(format_table(summaries))
    regime_info = io_lib.read_json(os.path.join(out_dir, "regimes.json"))
    for line in model_health(rows_by_method, data.num_classes) + seed_disagreements(config, regime_info):
        log(line)
    log(f"wrote {out_dir}/results.csv, figure3.png, gradients_*.png in {time.perf_counter() - t0:.0f} s")
    return summaries
