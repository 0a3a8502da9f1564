"""A whole strength sweep, end to end: data -> train -> measure -> regimes -> outputs.

`run_sweep(SweepConfig(...), out_dir)` is what ``python -m experiments.sweep_eps`` calls.
It writes into `out_dir`:

* ``config.json``   every setting and the library versions;
* ``results.csv``   one row per (method, strength, seed) (see `RESULT_COLUMNS`);
* ``regimes.json``  per method: regime labels, boundaries and the evidence;
* ``summary.json``  per method: crossover, peak alignment and where, boundaries;
* ``figure3.png``   the paper's Figure-3 layout; ``gradients_<method>.png`` grids;
* ``points/``       finished methods' measurements, ``checkpoints/`` orbax states.

Fault tolerance: training checkpoints every ``checkpoint_every`` steps; a rerun into the
same folder resumes from the last checkpoint and skips finished methods. A rerun with
different settings stops with `SettingsMismatchError` unless ``overwrite=True``.
Execution details (``strategy``, ``steps_per_call``, ``checkpoint_every``) may differ
between runs: they do not change what is computed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pagjax import io as io_lib
from pagjax import measure as measure_lib
from pagjax import models as models_lib
from pagjax import objectives as objectives_lib
from pagjax import plots, regimes, sweep, training, validation

EXECUTION_FIELDS = ("strategy", "steps_per_call", "checkpoint_every")

# Default grids for the built-in data (linear_default with normal_offset 0.2, MLP width
# 256): each spans weak -> Bayes-aligned -> excessive (found by probe runs, README).
DEFAULT_STRENGTHS = {
    "gradnorm": (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0),
    "smoothness": (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0),
    "noise": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
    "pgd": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
}
STRENGTH_NAMES = {"gradnorm": "lambda", "smoothness": "lambda", "noise": "noise s", "pgd": "eps (L2)", "ce": "-"}
RESULT_COLUMNS = (
    "method", "strength", "seed", "accuracy", "bayes_accuracy", "on_change", "off_change", "off_on_ratio",
    "grad_on_manifold_fraction", "random_fraction", "bayes_fraction", "score_cosine", "bayes_cosine", "lpips_alignment",
    "robust_accuracy", "regime", "diverged",
)


class SettingsMismatchError(ValueError):
    """The output folder holds a run with different settings."""


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """Every setting of a sweep (see ``python -m experiments.sweep_eps --help``)."""

    methods: tuple[str, ...] = ("gradnorm", "smoothness", "noise", "pgd")
    strengths: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_STRENGTHS))
    seeds: tuple[int, ...] = (0, 1)
    dataset: str = "linear_default"
    dataset_kwargs: dict = dataclasses.field(default_factory=lambda: {"normal_offset": 0.2})
    data_seed: int = 0
    n_train: int = 8192
    n_test: int = 1024
    model: str = "mlp:width=256"
    steps: int = 1000
    batch_size: int = 128
    optimizer: training.OptimizerConfig = training.OptimizerConfig(name="adam", learning_rate=2e-3)
    official: bool = False
    pgd_steps: int = 5
    smoothness_noise_std: float = 0.1
    measure: measure_lib.MeasureConfig = measure_lib.MeasureConfig()
    strategy: str = "auto"
    steps_per_call: int = 100
    checkpoint_every: int = 200

    def validate(self) -> None:
        """Check every setting before any data is built or anything compiled."""
        if not self.methods:
            raise ValueError("methods must name at least one method")
        for m in self.methods:
            validation.check_choice("method", m, objectives_lib.METHODS)
            if m not in self.strengths or not len(self.strengths[m]):
                raise ValueError(f"strengths has no values for method {m!r}")
            s = np.asarray(self.strengths[m], float)
            validation.check_strength(f"strengths[{m!r}]", s)
            if np.any(np.diff(s) <= 0):
                raise ValueError(f"strengths[{m!r}] must be strictly increasing, got {s.tolist()}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct integers, got {self.seeds}")
        from pagjax.manifolds import manifold_names

        validation.check_choice("dataset", self.dataset, manifold_names())
        validation.check_positive_int("n_train", self.n_train)
        validation.check_positive_int("n_test", self.n_test)
        models_lib.build_model(self.model, 2)  # raises on a bad name or option
        training.TrainConfig(model=self.model, steps=self.steps, batch_size=self.batch_size,
                             optimizer=self.optimizer, pgd_steps=self.pgd_steps,
                             smoothness_noise_std=self.smoothness_noise_std).validate()
        objectives_lib.make_objective("pgd", pgd_steps=self.pgd_steps, smoothness_noise_std=self.smoothness_noise_std)
        if self.batch_size > self.n_train:
            raise ValueError(f"batch_size {self.batch_size} exceeds n_train {self.n_train}")
        self.measure.validate()
        validation.check_choice("strategy", self.strategy, sweep.STRATEGIES)
        validation.check_positive_int("steps_per_call", self.steps_per_call)
        validation.check_positive_int("checkpoint_every", self.checkpoint_every)

    def settings(self) -> dict:
        """The settings that determine the results (execution details removed)."""
        d = json.loads(json.dumps(dataclasses.asdict(self), default=list))
        for f in EXECUTION_FIELDS:
            d.pop(f)
        d["strengths"] = {m: [float(v) for v in d["strengths"][m]] for m in self.methods}
        return d


def library_versions() -> dict:
    import flax
    import optax

    import pagjax

    return {"pagjax": pagjax.__version__, "jax": jax.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "numpy": np.__version__, "python": sys.version.split()[0],
            "backend": jax.default_backend(), "devices": jax.device_count()}


def prepare_output(out_dir: str, config: SweepConfig, overwrite: bool) -> None:
    """Create `out_dir`, or check that an existing run there has the same settings."""
    path = os.path.join(out_dir, "config.json")
    settings = config.settings()
    if os.path.exists(path):
        old = io_lib.read_json(path).get("settings", {})
        if old != settings:
            if not overwrite:
                diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
                raise SettingsMismatchError(
                    f"{out_dir} holds a sweep with different settings (differing: {', '.join(diff)}). "
                    "Use another output folder, or pass overwrite (--overwrite) to delete the old results."
                )
            for sub in ("points", "checkpoints"):
                shutil.rmtree(os.path.join(out_dir, sub), ignore_errors=True)
            for f in ("results.csv", "regimes.json", "summary.json"):
                if os.path.exists(os.path.join(out_dir, f)):
                    os.remove(os.path.join(out_dir, f))
    os.makedirs(out_dir, exist_ok=True)
    io_lib.write_json(path, {"settings": settings, "versions": library_versions()})


@dataclasses.dataclass
class SweepData:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    z_test: np.ndarray | None
    num_classes: int
    manifold: object | None


def load_data(config: SweepConfig) -> SweepData:
    """The sweep's dataset (built-in known manifolds, generated from `data_seed`)."""
    from pagjax.manifolds import build_manifold, make_dataset

    manifold = build_manifold(config.dataset, key=config.data_seed, **config.dataset_kwargs)
    d = make_dataset(manifold, jax.random.key(config.data_seed + 1), config.n_train, config.n_test)
    return SweepData(np.asarray(d.x_train), np.asarray(d.y_train), np.asarray(d.x_test), np.asarray(d.y_test),
                     np.asarray(d.z_test), manifold.num_classes, manifold)


def _method_points(config: SweepConfig, method: str):
    strengths = [float(s) for s in config.strengths[method] for _ in config.seeds]
    seeds = [int(seed) for _ in config.strengths[method] for seed in config.seeds]
    return strengths, seeds


def train_method(config: SweepConfig, method: str, data: SweepData, out_dir: str,
                 progress: Callable | None = None) -> sweep.SweepState:
    """Train all (strength, seed) models of one method, resuming from its checkpoint."""
    model = models_lib.build_model(config.model, data.num_classes)
    objective = objectives_lib.make_objective(
        method, official=config.official, pgd_steps=config.pgd_steps, smoothness_noise_std=config.smoothness_noise_std)
    optimizer = training.make_optimizer(config.optimizer, config.steps)
    strengths, seeds = _method_points(config, method)
    init = sweep.init_sweep_state(model, optimizer, strengths, seeds, jnp.asarray(data.x_train[: config.batch_size]))
    ckpt = io_lib.Checkpointer(os.path.join(out_dir, "checkpoints", method))
    restored = ckpt.restore_latest(init)
    state = restored[1] if restored is not None else init
    last_saved = [int(np.asarray(state.train.step)[0])]

    def on_chunk(s):
        step = int(np.asarray(s.train.step)[0])
        if step - last_saved[0] >= config.checkpoint_every or step == config.steps:
            ckpt.save(step, s)
            last_saved[0] = step

    chunk = min(config.steps_per_call, config.checkpoint_every)
    try:
        return sweep.train_models(model, objective, optimizer, data.x_train, data.y_train, strengths, seeds,
                                  steps=config.steps, batch_size=config.batch_size, strategy=config.strategy,
                                  steps_per_call=chunk, state=state, on_chunk=on_chunk, on_progress=progress)
    finally:
        ckpt.close()


def measure_method(config: SweepConfig, method: str, state: sweep.SweepState, evalset, data: SweepData) -> tuple[list, np.ndarray]:
    """Measure every model of a method: rows and gradient maps (K, grid, H, W, C)."""
    model = models_lib.build_model(config.model, data.num_classes)
    strengths, seeds = _method_points(config, method)
    diverged = np.asarray(state.diverged)
    rows, grids = [], []
    for i, (s, seed) in enumerate(zip(strengths, seeds)):
        row = {"method": method, "strength": s, "seed": seed, "diverged": bool(diverged[i])}
        variables = sweep.model_variables(state, i)
        finite = all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(variables))
        if diverged[i] or not finite:
            row["diverged"] = True
            grids.append(np.full((config.measure.grid_images, *data.x_test.shape[1:]), np.nan, np.float32))
        else:
            key = jax.random.key(10_000 + seed)  # same directions for every strength of a seed
            values, grads = measure_lib.measure_model(model.apply, variables, evalset, config.measure, key)
            row.update(values)
            grids.append(grads)
        rows.append(row)
    return rows, np.stack(grids)


def method_curves(rows: list[dict], config: SweepConfig, method: str, num_classes: int) -> tuple[dict, regimes.RegimeResult]:
    """(S, seeds) arrays of a method's measurements and its regime labels."""
    strengths = np.asarray(config.strengths[method], float)
    seeds = list(config.seeds)

    def grid(col):
        out = np.full((len(strengths), len(seeds)), np.nan)
        for r in rows:
            if r["method"] == method and not r["diverged"] and r.get(col) is not None:
                out[list(strengths).index(r["strength"]), seeds.index(r["seed"])] = r[col]
        return out

    curves = {c: grid(c) for c in ("on_change", "off_change", "accuracy", "bayes_cosine", "score_cosine",
                                   "grad_on_manifold_fraction", "lpips_alignment")}
    with warnings.catch_warnings():  # all-NaN rows (diverged or unmeasured) are expected
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = {c: np.nanmean(v, 1) for c, v in curves.items()}
    ok = np.isfinite(mean["on_change"]) & np.isfinite(mean["off_change"]) & np.isfinite(mean["accuracy"])
    labels = ["diverged"] * len(strengths)
    result = None
    if ok.any():
        result = regimes.label_regimes(strengths[ok], mean["on_change"][ok], mean["off_change"][ok],
                                       mean["accuracy"][ok], chance=1.0 / num_classes)
        for i, lab in zip(np.nonzero(ok)[0], result.labels):
            labels[i] = lab
    curves.update(strengths=strengths, labels=labels, mean=mean)
    return curves, result


def summarize(curves: dict, result: regimes.RegimeResult | None, method: str) -> dict:
    """The per-method line of the final table."""
    align = curves["mean"]["bayes_cosine"]
    out = {"method": method}
    if np.isfinite(align).any():
        i = int(np.nanargmax(align))
        out.update(peak_bayes_cosine=float(align[i]), peak_at=float(curves["strengths"][i]),
                   accuracy_at_peak=float(curves["mean"]["accuracy"][i]),
                   weakest_bayes_cosine=float(align[0]))
    if result is not None:
        out.update(crossover=result.crossover, first_aligned=result.first_aligned,
                   first_excessive=result.first_excessive)
    out["regimes"] = list(curves["labels"])
    return out


def format_table(summaries: list[dict]) -> str:
    """The short table printed at the end of a sweep."""
    def f(v):
        return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.3g}"

    head = f"{'method':<11}{'crossover':>10}{'peak cos':>9}{'at':>8}{'acc@peak':>9}{'weakest cos':>12}{'aligned from':>13}{'excessive from':>15}"
    lines = [head, "-" * len(head)]
    for s in summaries:
        lines.append(f"{s['method']:<11}{f(s.get('crossover')):>10}{f(s.get('peak_bayes_cosine')):>9}"
                     f"{f(s.get('peak_at')):>8}{f(s.get('accuracy_at_peak')):>9}{f(s.get('weakest_bayes_cosine')):>12}"
                     f"{f(s.get('first_aligned')):>13}{f(s.get('first_excessive')):>15}")
    return "\n".join(lines)


def write_outputs(config: SweepConfig, out_dir: str, rows_by_method: dict, grids_by_method: dict,
                  data: SweepData, evalset) -> list[dict]:
    """results.csv, regimes.json, summary.json and the figures, from finished methods."""
    all_rows, summaries, regime_info, fig_curves = [], [], {}, {}
    for method in config.methods:
        if method not in rows_by_method:
            continue
        rows = rows_by_method[method]
        curves, result = method_curves(rows, config, method, data.num_classes)
        label_of = dict(zip(curves["strengths"].tolist(), curves["labels"]))
        for r in rows:
            all_rows.append({**r, "regime": label_of[r["strength"]]})
        summaries.append(summarize(curves, result, method))
        regime_info[method] = result.as_dict() if result is not None else None
        fig_curves[method] = {"strengths": curves["strengths"], "labels": curves["labels"],
                              "on_change": curves["on_change"], "off_change": curves["off_change"],
                              "accuracy": curves["accuracy"], "alignment": curves["bayes_cosine"],
                              "alignment_label": "cosine with Bayes gradient"}
        grids = grids_by_method[method]
        strengths, seeds = _method_points(config, method)
        first_seed = [i for i, sd in enumerate(seeds) if sd == config.seeds[0]]
        rows_img = [grids[i] for i in first_seed]
        labels_img = [f"{STRENGTH_NAMES.get(method, 's')}={plots.strength_label(strengths[i])}" for i in first_seed]
        if evalset.bayes_maps is not None:
            rows_img.append(np.asarray(evalset.bayes_maps[: config.measure.grid_images]))
            labels_img.append(f"Bayes s={config.measure.align_noise:g}")
        plots.gradient_grid(rows_img, labels_img, os.path.join(out_dir, f"gradients_{method}.png"),
                            title=f"input-gradients of log p(y|x), {method} (seed {config.seeds[0]})")
    extra = sorted({k for r in all_rows for k in r if k.startswith(("on_change@", "off_change@"))})
    io_lib.write_csv(os.path.join(out_dir, "results.csv"), all_rows, list(RESULT_COLUMNS) + extra)
    io_lib.write_json(os.path.join(out_dir, "regimes.json"), regime_info)
    io_lib.write_json(os.path.join(out_dir, "summary.json"), summaries)
    if fig_curves:
        plots.figure3(fig_curves, os.path.join(out_dir, "figure3.png"), strength_names=STRENGTH_NAMES)
    return summaries


def run_sweep(config: SweepConfig, out_dir: str, *, overwrite: bool = False, progress: bool = True,
              log: Callable[[str], None] = print) -> list[dict]:
    """Run (or resume) a sweep into `out_dir`; returns the per-method summaries."""
    from tqdm.auto import tqdm

    config.validate()
    prepare_output(out_dir, config, overwrite)
    t0 = time.perf_counter()
    data = load_data(config)
    evalset = measure_lib.prepare_eval_set(data.x_test, data.y_test, data.num_classes, config.measure,
                                           manifold=data.manifold, z_test=data.z_test)
    rows_by_method, grids_by_method = {}, {}
    total = sum(len(config.strengths[m]) * len(config.seeds) * config.steps for m in config.methods)
    bar = tqdm(total=total, disable=not progress, unit="model-step", smoothing=0.1)
    for method in config.methods:
        k = len(config.strengths[method]) * len(config.seeds)
        point_file = os.path.join(out_dir, "points", f"{method}.json")
        grid_file = os.path.join(out_dir, "points", f"{method}_gradients.npz")
        if os.path.exists(point_file) and os.path.exists(grid_file):
            rows_by_method[method] = io_lib.read_json(point_file)
            grids_by_method[method] = np.load(grid_file)["grads"]
            bar.update(k * config.steps)
            log(f"{method}: already finished, skipped")
            continue
        seen = [0]

        def on_progress(p, method=method, k=k, seen=seen):
            bar.update((p.step - seen[0]) * k)
            seen[0] = p.step
            bar.set_postfix_str(f"{method} step {p.step}/{p.total_steps} loss {np.nanmean(p.loss):.3f} "
                                f"acc {np.nanmean(p.accuracy):.3f}")

        state = train_method(config, method, data, out_dir, progress=on_progress)
        if seen[0] == 0:  # restored a finished checkpoint
            bar.update(k * config.steps)
        rows, grids = measure_method(config, method, state, evalset, data)
        io_lib.save_npz(grid_file, grads=grids)
        io_lib.write_json(point_file, rows)
        rows_by_method[method], grids_by_method[method] = rows, grids
        write_outputs(config, out_dir, rows_by_method, grids_by_method, data, evalset)
    bar.close()
    summaries = write_outputs(config, out_dir, rows_by_method, grids_by_method, data, evalset)
    log(format_table(summaries))
    log(f"wrote {out_dir}/results.csv, figure3.png, gradients_*.png in {time.perf_counter() - t0:.0f} s")
    return summaries
