"""A whole strength sweep, end to end: data -> train -> measure -> regimes -> outputs.

`run_sweep(SweepConfig(...), out_dir)` is what ``python -m experiments.sweep_eps`` calls.
It writes into `out_dir`:

* ``config.json``   every setting and the library versions;
* ``results.csv``   one row per (method, strength, seed) (see `result_columns`);
* ``regimes.json``  per method: regime labels, boundaries and the evidence;
* ``summary.json``  per method: crossover, peak alignment and where, boundaries;
* ``figure3.png``   the paper's Figure-3 layout; ``gradients_<method>.png`` grids;
* ``points/``       finished methods' measurements, ``checkpoints/`` orbax states.

Fault tolerance: training checkpoints every ``checkpoint_every`` steps; a rerun into the
same folder resumes from the last checkpoint and skips finished methods. A rerun with
different settings stops with `SettingsMismatchError` unless ``overwrite=True``.
Execution details (``steps_per_call``, ``checkpoint_every``, ``data_dir``, ``download``)
may differ between runs: they do not change what is computed. The strategy does (vmap,
loop and sharded round differently, and the differences grow through training), so the
resolved strategy is a setting: a resume with another one stops like any other change.
Damaged state is handled, never trusted: a checkpoint failing its digest is moved aside
(`pagjax.io.Checkpointer`); a bad ``points/`` file is named and re-measured; results
without a readable ``config.json`` stop the run with a message saying how to proceed.

Real images (``dataset`` one of `pagjax.data.dataset_names()`: ``digits`` always,
``mnist``, ``fashion_mnist``, ``cifar10``, ``imagenet64`` when prepared) have no known
manifold or density. The sweep then learns both, once per output folder (cached under
``learned/``): a tangent space from an autoencoder's decoder Jacobian (docs/theory.md §5,
`pagjax.autoencoder`) and a score from a denoiser (`pagjax.scores`). The denoiser is
class-conditional with an extra "no label" class, trained on every image twice (once with
its label, once with the null label), the classifier-free-guidance trick of Ho & Salimans
2022, so one network gives both grad log p_s(x|y) and grad log p_s(x) by Tweedie's formula;
their difference is the learned Bayes gradient grad log p_s(y|x). ``score_cosine`` is then
the cosine with the learned class-conditional score, ``learned_bayes_cosine`` the cosine
with the learned Bayes gradient (the figure's alignment curve and the LPIPS reference), and
``bayes_cosine`` / ``bayes_accuracy`` stay empty: they are exact quantities.
"""
from __future__ import annotations

import contextlib
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
from pagjax import methods as methods_lib
from pagjax import metrics as metrics_lib
from pagjax import models as models_lib
from pagjax import objectives as objectives_lib
from pagjax import plots, regimes, sweep, training, validation

# Fields that do not change what is computed. ``strategy`` is not one: vmap, loop and
# sharded round differently and the differences grow through training (a regime label
# can flip), so the resolved strategy is part of the settings a resume must match.
EXECUTION_FIELDS = ("steps_per_call", "checkpoint_every", "data_dir", "download")

# Default strength grids by dataset kind, the official-unit conversion and the strength
# labels all live in the method registry (`pagjax.methods`); these are live views of it.
DEFAULT_STRENGTHS = methods_lib.grid_table("known")  # built-in known manifolds
REAL_DEFAULT_STRENGTHS = methods_lib.grid_table("digits")  # the offline digits
TFDS_DEFAULT_STRENGTHS = methods_lib.grid_table("tfds")  # MNIST, Fashion-MNIST, CIFAR-10, ImageNet-64


def to_official_units(method: str, strengths, batch_size: int) -> tuple[float, ...]:
    """A textbook-unit grid in the official code's units (objectives module docstring):
    gradnorm's constant c = lambda * B^2 / 1e5, PGD's whole-batch eps = eps * sqrt(B); the
    smoothness and noise strengths mean the same in both."""
    return methods_lib.get(method, argument="method").to_official(strengths, batch_size)


def grid_kind(dataset: str) -> str:
    """Which registry grid (`pagjax.methods.GRID_KINDS`) serves `dataset`."""
    from pagjax import data as data_lib

    if dataset == "digits":
        return "digits"
    return "tfds" if data_lib.is_real_dataset(dataset) else "known"


def default_strengths(method: str, dataset: str, *, official: bool = False, batch_size: int = 128) -> tuple:
    """The default grid of ``method`` on ``dataset``, in official units when ``official``
    (so that an official sweep spans the same regimes as a textbook one)."""
    m = methods_lib.get(method, argument="method")
    grid = m.grid(grid_kind(dataset))
    return m.to_official(grid, batch_size) if official else tuple(grid)


STRENGTH_NAMES = methods_lib.View(lambda m: m.strength_label)  # figure labels, from the registry
# results.csv: these columns, every registered metric's (pagjax.metrics), then these
ID_COLUMNS = ("method", "strength", "seed")
STATUS_COLUMNS = ("regime", "diverged")


def result_columns(measure: measure_lib.MeasureConfig | None = None) -> tuple[str, ...]:
    """results.csv's columns, from the metric registry (with `measure`, also the columns
    that depend on its settings, e.g. ``on_change@<eps>``)."""
    return ID_COLUMNS + metrics_lib.columns(measure) + STATUS_COLUMNS


MAX_STEPS = 10_000_000
MAX_SEED = 1_000_000_000


def check_model_options(name: str) -> None:
    """Integer options of a model name (``mlp:width=256``) must be integers >= 1 (depth >= 0).

    `models.build_model` accepts any value and the network fails only when first traced,
    seconds later and deep in flax; this check says which option is wrong, at once.
    """
    base, _, opts = name.partition(":")
    validation.check_choice("model name", base, models_lib.MODEL_NAMES)
    fields = {f.name: f.default for f in dataclasses.fields(models_lib._MODULES[base])}
    for item in filter(None, opts.split(",")):
        key, eq, value = item.partition("=")
        default = fields.get(key.strip())
        if eq and isinstance(default, int) and not isinstance(default, bool):
            v, least = value.strip(), 0 if key.strip() == "depth" else 1  # depth 0: a linear model
            if not v.isdigit() or int(v) < least:
                raise ValueError(f"model option {key.strip()} of {name!r} must be an integer >= {least}, got {v!r}")
    models_lib.build_model(name, 2)  # raises on an unknown option or activation


class SettingsMismatchError(ValueError):
    """The output folder holds a run with different settings."""


@dataclasses.dataclass(frozen=True)
class LearnedConfig:
    """How the tangent spaces and scores of real images are learned (cached in ``learned/``).

    Autoencoder (`pagjax.autoencoder.train_autoencoder`): ``ae_latent`` latents (the paper:
    128 on CIFAR-10), ``ae_arch`` "mlp" or "conv", Adam at ``ae_lr`` for ``ae_steps``.
    Denoiser (`pagjax.scores.train_denoiser`), trained at the alignment noise level:
    ``den_arch``, ``den_width``, ``den_depth``, Adam at ``den_lr`` for ``den_steps``.
    ``basis_method``: orthonormalisation of the decoder Jacobian (`geometry.orthonormalize`).
    """

    ae_latent: int = 8
    ae_arch: str = "mlp"
    ae_hidden: tuple[int, ...] = (256,)
    ae_features: tuple[int, ...] = (32, 64)
    # resize + conv: 6x faster than transposed convolutions on XLA:CPU with the engine's
    # host step loop (benchmarks.bench_engine), the same parameters and FLOPs
    ae_upsample: str = "nearest"
    ae_steps: int = 2000
    ae_lr: float = 1e-3
    den_arch: str = "mlp"
    den_width: int = 256
    den_depth: int = 3
    den_steps: int = 2000
    den_lr: float = 1e-3
    basis_method: str = "svd"
    seed: int = 0
    # "score_model": the EDM score model (`pagjax.score_model`, U-Net) instead of the
    # denoiser; it also gives the paper protocol's unconditional score at sigma 0.5
    score_backend: str = "denoiser"
    sm_channels: tuple[int, ...] = (32, 64)
    sm_steps: int = 2000
    # the learned Bayes gradient with the score model: "classifier" (input-gradient of a
    # noise-conditional classifier, direct; cosine 0.93 vs 0.71 with the exact one on
    # linear_default, 0.54 vs 0.53 on curved_default) or "difference" (class - unconditional score)
    sm_bayes: str = "classifier"

    def validate(self, image_shape: tuple[int, ...] | None = None) -> None:
        """Check the settings (and, given the example shape, the architectures)."""
        for name in ("ae_latent", "ae_steps", "den_width", "den_depth", "den_steps"):
            validation.check_positive_int(name, getattr(self, name))
        validation.check_positive("ae_lr", self.ae_lr)
        validation.check_positive("den_lr", self.den_lr)
        validation.check_choice("ae_arch", self.ae_arch, ("mlp", "conv"))
        validation.check_choice("den_arch", self.den_arch, ("mlp", "conv"))
        validation.check_choice("score_backend", self.score_backend, ("denoiser", "score_model"))
        validation.check_positive_int("sm_steps", self.sm_steps)
        validation.check_choice("sm_bayes", self.sm_bayes, ("classifier", "difference"))
        from pagjax import geometry

        validation.check_choice("basis_method", self.basis_method, geometry.ORTHO_METHODS)
        if image_shape is not None:
            from pagjax import autoencoder

            autoencoder.make_autoencoder(image_shape, self.ae_latent, arch=self.ae_arch, hidden=self.ae_hidden,
                                         features=self.ae_features, upsample=self.ae_upsample)
            d = int(np.prod(image_shape))
            if self.ae_latent > d:
                raise ValueError(f"ae_latent {self.ae_latent} exceeds the {d} pixels of an image")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """Every setting of a sweep (see ``python -m experiments.sweep_eps --help``)."""

    methods: tuple[str, ...] = dataclasses.field(default_factory=methods_lib.robust_names)
    strengths: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_STRENGTHS))
    seeds: tuple[int, ...] = (0, 1)
    dataset: str = "linear_default"
    dataset_kwargs: dict = dataclasses.field(default_factory=lambda: {"normal_offset": 0.2})  # built-in manifolds only
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
    # reproduction switches of the official CIFAR-10 training (pagjax.objectives docstring)
    official_grad_accumulation: bool = False
    official_bn_updates: bool = False
    measure: measure_lib.MeasureConfig = measure_lib.MeasureConfig()
    strategy: str = "auto"  # a setting, resolved per machine: strategies round differently
    steps_per_call: int = 100
    checkpoint_every: int = 200
    image_size: int | None = None  # real data: resize to image_size x image_size
    augment: str = "none"  # "crop_flip": the paper's random crop (pad 4) + horizontal flip
    learned: LearnedConfig = LearnedConfig()
    data_dir: str | None = None  # real data: tfds data directory (execution detail)
    download: bool = False  # real data: download if not prepared (execution detail)

    @property
    def is_real(self) -> bool:
        """Whether the dataset is a real-image dataset (learned tangent spaces and scores)."""
        from pagjax import data as data_lib

        return data_lib.is_real_dataset(self.dataset)

    def validate(self) -> None:
        """Check every setting before any data is built or anything compiled."""
        if not self.methods:
            raise ValueError("methods must name at least one method")
        if len(set(self.methods)) != len(self.methods):  # would train and write the same rows twice
            raise ValueError(f"methods must be distinct, got {list(self.methods)}")
        for m in self.methods:
            methods_lib.get(m, argument="SweepConfig.methods")
            if m not in self.strengths or not len(self.strengths[m]):
                raise ValueError(f"strengths has no values for method {m!r}")
            s = np.asarray(self.strengths[m], float)
            validation.check_strength(f"strengths[{m!r}]", s)
            if np.any(np.diff(s) <= 0):
                raise ValueError(f"strengths[{m!r}] must be strictly increasing, got {s.tolist()}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct integers, got {self.seeds}")
        for seed in self.seeds:
            # JAX keys take 32-bit seeds, and the measurement adds 10_000 to a seed
            if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < MAX_SEED:
                raise ValueError(f"seeds must be integers in [0, {MAX_SEED}), got {seed!r}")
        validation.check_positive_int("steps", self.steps)
        if self.steps > MAX_STEPS:  # the step counter is int32; no sweep needs this many steps
            raise ValueError(f"steps must be at most {MAX_STEPS}, got {self.steps}")
        for k, v in self.dataset_kwargs.items():
            if isinstance(v, (float, np.floating)) and not np.isfinite(v):
                raise ValueError(f"dataset option {k} must be finite, got {v!r}")
        check_model_options(self.model)
        from pagjax import data as data_lib
        from pagjax.manifolds import manifold_names

        validation.check_choice("dataset", self.dataset, tuple(manifold_names()) + data_lib.dataset_names())
        validation.check_choice("augment", self.augment, data_lib.AUGMENTATIONS)
        if self.image_size is not None:
            validation.check_positive_int("image_size", self.image_size)
        if self.is_real:
            shape = data_lib.TFDS_DATASETS[self.dataset].shape if self.dataset in data_lib.TFDS_DATASETS else (8, 8, 1)
            if self.image_size is not None:
                shape = (self.image_size, self.image_size, shape[2])
            self.learned.validate(shape)
            data_lib.check_available(self.dataset, data_dir=self.data_dir, download=self.download)  # fast; offline unless download
        validation.check_positive_int("n_train", self.n_train)
        validation.check_positive_int("n_test", self.n_test)
        training.TrainConfig(model=self.model, steps=self.steps, batch_size=self.batch_size,
                             optimizer=self.optimizer, pgd_steps=self.pgd_steps,
                             smoothness_noise_std=self.smoothness_noise_std).validate()
        objectives_lib.make_objective("pgd", pgd_steps=self.pgd_steps, smoothness_noise_std=self.smoothness_noise_std,
                                      official_grad_accumulation=self.official_grad_accumulation,
                                      official_bn_updates=self.official_bn_updates)
        if self.batch_size > self.n_train:
            raise ValueError(f"batch_size {self.batch_size} exceeds n_train {self.n_train}")
        if self.dataset == "digits" and self.batch_size > 1797 - data_lib.DIGITS_TEST:
            raise ValueError(f"batch_size {self.batch_size} exceeds the {1797 - data_lib.DIGITS_TEST} digits training images")
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
        d["strategy"] = self.resolved_strategies()
        return d

    def resolved_strategies(self) -> dict:
        """Per method, the strategy its models train with on this machine (``auto``
        resolved: it depends on the backend, the device count and the number of models)."""
        if self.strategy != "auto":
            return {m: self.strategy for m in self.methods}
        model = models_lib.build_model(self.model, 2)
        return {m: sweep.choose_strategy(model, len(self.strengths[m]) * len(self.seeds)) for m in self.methods}


def library_versions() -> dict:
    import flax
    import optax

    import pagjax

    return {"pagjax": pagjax.__version__, "jax": jax.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "numpy": np.__version__, "python": sys.version.split()[0],
            "backend": jax.default_backend(), "devices": jax.device_count()}


RESULT_FILES = ("results.csv", "regimes.json", "summary.json", "figure3.png")


def _results_present(out_dir: str) -> list[str]:
    """The results and state in `out_dir` that a settings record must vouch for."""
    found = [f for f in RESULT_FILES if os.path.exists(os.path.join(out_dir, f))]
    found += sorted(f for f in os.listdir(out_dir) if f.startswith("gradients_") and f.endswith(".png"))
    for sub in ("points", "checkpoints"):
        folder = os.path.join(out_dir, sub)
        if os.path.isdir(folder) and os.listdir(folder):
            found.append(sub + "/")
    return found


def _delete_results(out_dir: str) -> None:
    for sub in ("points", "checkpoints"):
        shutil.rmtree(os.path.join(out_dir, sub), ignore_errors=True)
    for f in _results_present(out_dir):  # old figures too: they must not sit beside new results
        if not f.endswith("/"):
            os.remove(os.path.join(out_dir, f))


def prepare_output(out_dir: str, config: SweepConfig, overwrite: bool) -> None:
    """Create `out_dir`, or check that an existing run there has the same settings.

    Raises `pagjax.io.OutputNotWritableError` when `out_dir` cannot be written, and
    `SettingsMismatchError` when it holds results made with other settings or results
    whose settings record (``config.json``) is missing or damaged; ``overwrite`` deletes
    those results instead. Leftover ``.tmp-*`` files of killed writes are removed.
    """
    io_lib.check_writable_dir(out_dir, "output folder")
    io_lib.remove_temp_files(out_dir)
    path = os.path.join(out_dir, "config.json")
    settings = config.settings()
    problem = None
    if os.path.exists(path):
        try:
            record = io_lib.read_json(path)
            if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
                raise io_lib.DamagedFileError(f"{os.path.abspath(path)} is damaged (no settings record)")
            old = record["settings"]
            if old != settings:
                diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
                problem = f"{out_dir} holds a sweep with different settings (differing: {', '.join(diff)})"
                if "strategy" in diff and isinstance(old.get("strategy"), dict):
                    # vmap, loop and sharded round differently, so a resume must keep the strategy
                    made = sorted(set(old["strategy"].values()))
                    problem += (f"; it was trained with --strategy {' / '.join(made)}, which rounds differently "
                                "from the one asked for: resume with that strategy")
        except (io_lib.DamagedFileError, OSError) as e:
            problem = f"{out_dir} holds results but its settings record is unreadable: {e}"
    else:
        # The settings check must not hinge on one file that can vanish: results without a
        # record could have been made with any settings.
        found = _results_present(out_dir)
        if found:
            problem = (f"{out_dir} holds results ({', '.join(found)}) but no settings record "
                       f"({os.path.abspath(path)} is missing), so they cannot be checked against these settings")
    if problem is not None:
        if not overwrite:
            raise SettingsMismatchError(
                f"{problem}. Use another output folder, or pass overwrite (--overwrite) to delete the old results.")
        _delete_results(out_dir)
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


def load_data(config: SweepConfig, *, progress: bool = False, log: Callable[[str], None] | None = None) -> SweepData:
    """The sweep's dataset: a built-in known manifold generated from `data_seed`, or a real
    dataset (`pagjax.data`, at most n_train / n_test images chosen by `data_seed`).
    ``progress``: a bar while tfds images are read; ``log``: one line saying what was loaded."""
    t = time.perf_counter()
    if config.is_real:
        from pagjax import data as data_lib

        d = data_lib.load_splits(config.dataset, n_train=config.n_train, n_test=config.n_test, data_dir=config.data_dir,
                                 download=config.download, image_size=config.image_size, seed=config.data_seed,
                                 progress=progress)
        out = SweepData(d.x_train, d.y_train, d.x_test, d.y_test, None, d.num_classes, None)
    else:
        from pagjax.manifolds import build_manifold, make_dataset

        manifold = build_manifold(config.dataset, key=config.data_seed, **config.dataset_kwargs)
        d = make_dataset(manifold, jax.random.key(config.data_seed + 1), config.n_train, config.n_test)
        out = SweepData(np.asarray(d.x_train), np.asarray(d.y_train), np.asarray(d.x_test), np.asarray(d.y_test),
                        np.asarray(d.z_test), manifold.num_classes, manifold)
    if log is not None:
        shape = "x".join(str(v) for v in out.x_train.shape[1:])
        log(f"data: {config.dataset}, {out.x_train.shape[0]} train + {out.x_test.shape[0]} test examples of "
            f"shape {shape}, loaded in {time.perf_counter() - t:.1f} s")
    return out


def _method_points(config: SweepConfig, method: str):
    strengths = [float(s) for s in config.strengths[method] for _ in config.seeds]
    seeds = [int(seed) for _ in config.strengths[method] for seed in config.seeds]
    return strengths, seeds


def _log_resume(ckpt: io_lib.Checkpointer, what: str, total: int, log: Callable[[str], None] | None) -> None:
    """Say that a training resumes, and where, before its (possibly long) compilation; a
    checkpoint that then fails its check is set aside with its own warning."""
    step = ckpt.latest_step()
    if log is not None and step:
        log(f"{what}: resuming from the checkpoint at step {step} of {total}")


def train_method(config: SweepConfig, method: str, data: SweepData, out_dir: str,
                 progress: Callable | None = None, log: Callable[[str], None] | None = None) -> sweep.SweepState:
    """Train all (strength, seed) models of one method, resuming from its checkpoint."""
    model = models_lib.build_model(config.model, data.num_classes)
    objective = objectives_lib.make_objective(
        method, official=config.official, pgd_steps=config.pgd_steps, smoothness_noise_std=config.smoothness_noise_std,
        official_grad_accumulation=config.official_grad_accumulation, official_bn_updates=config.official_bn_updates)
    from pagjax import data as data_lib

    objective = data_lib.with_augmentation(objective, config.augment)
    optimizer = training.make_optimizer(config.optimizer, config.steps)
    strengths, seeds = _method_points(config, method)
    ckpt = io_lib.Checkpointer(os.path.join(out_dir, "checkpoints", method))
    _log_resume(ckpt, method, config.steps, log)
    try:
        return sweep.train_models(model, objective, optimizer, data.x_train, data.y_train, strengths, seeds,
                                  steps=config.steps, batch_size=config.batch_size, strategy=config.strategy,
                                  steps_per_call=config.steps_per_call, checkpointer=ckpt,
                                  checkpoint_every=config.checkpoint_every, on_progress=progress)
    finally:
        ckpt.close()


@contextlib.contextmanager
def _training_checkpointer(root: str, what: str, settings: dict, log: Callable[[str], None] | None = None):
    """Checkpoints of one learned model's training, in a folder named by its settings, so a
    killed run resumes and a run with other settings starts afresh; removed once done."""
    from pagjax import scores as scores_lib

    path = os.path.join(root, "training", f"{what}-{scores_lib.fingerprint(json.loads(json.dumps(settings)))}")
    ckpt = io_lib.Checkpointer(path)
    _log_resume(ckpt, what, settings["steps"], log)
    try:
        yield ckpt
    finally:
        ckpt.close()
    shutil.rmtree(path, ignore_errors=True)  # reached only when training finished


def learned_geometry(config: SweepConfig, data: SweepData, out_dir: str, log: Callable[[str], None] = print,
                     progress: bool = True) -> dict:
    """Learned tangent bases and score maps of the first ``num_eval`` test images.

    Trains (or loads from ``out_dir/learned/``) an autoencoder and a denoiser (see the
    module docstring), and returns ``basis`` (n, d, k), ``score_maps`` (learned
    grad log p_s(x|y)) and ``learned_bayes_maps`` (learned grad log p_s(y|x)) at the
    alignment noise level s, each for the n eval images.
    """
    from pagjax import autoencoder as ae_lib
    from pagjax import geometry
    from pagjax import scores as scores_lib

    lc, mc = config.learned, config.measure
    root = os.path.join(out_dir, "learned")
    n = min(mc.num_eval, data.x_test.shape[0])
    x_eval, y_eval = jnp.asarray(data.x_test[:n]), jnp.asarray(data.y_test[:n])
    data_id = {"dataset": config.dataset, "image_size": config.image_size, "data_seed": config.data_seed,
               "n_train": int(data.x_train.shape[0]), "n_test": int(data.x_test.shape[0])}
    ae_settings = {**data_id, "latent": lc.ae_latent, "arch": lc.ae_arch, "hidden": list(lc.ae_hidden),
                   "features": list(lc.ae_features), "upsample": lc.ae_upsample, "steps": lc.ae_steps,
                   "lr": lc.ae_lr, "seed": lc.seed}
    ae_dir = os.path.join(root, "autoencoder")
    ae = None
    if os.path.exists(os.path.join(ae_dir, "config.json")):
        if io_lib.read_json(os.path.join(ae_dir, "config.json")).get("extra") == json.loads(json.dumps(ae_settings)):
            ae = ae_lib.load_autoencoder(ae_dir)
            log("autoencoder: loaded from cache")
    if ae is None:
        t = time.perf_counter()
        # said first: building a conv autoencoder compiles for seconds before its bar appears
        log(f"autoencoder: training {lc.ae_steps} steps ({lc.ae_arch}, {lc.ae_latent} latents) on "
            f"{data.x_train.shape[0]} images")
        with _training_checkpointer(root, "autoencoder", ae_settings, log) as ckpt:
            ae = ae_lib.train_autoencoder(jnp.asarray(data.x_train), latent_dim=lc.ae_latent, steps=lc.ae_steps,
                                          key=jax.random.key(lc.seed), learning_rate=lc.ae_lr, arch=lc.ae_arch,
                                          hidden=lc.ae_hidden, features=lc.ae_features,
                                          upsample=lc.ae_upsample, checkpointer=ckpt,
                                          checkpoint_every=config.checkpoint_every,
                                          progress="autoencoder" if progress else None)
        ae_lib.save_autoencoder(ae_dir, ae, extra=ae_settings)
        log(f"autoencoder: trained {lc.ae_steps} steps in {time.perf_counter() - t:.0f} s, final mse {float(ae.losses[-1]):.4f}")
    def tangent_basis():
        t = time.perf_counter()
        tb = ae_lib.learned_tangent_basis(ae, x_eval, method=lc.basis_method, example_chunk=32)
        log(f"tangent basis: {n} eval images from the decoder Jacobian in {time.perf_counter() - t:.0f} s")
        return tb

    tb = geometry.cached_tangent_basis(
        os.path.join(root, "tangent_basis.npz"), {**ae_settings, "num_eval": n, "method": lc.basis_method},
        tangent_basis)

    s = float(mc.align_noise)
    if lc.score_backend == "score_model":
        return {"basis": tb.basis, **_score_model_maps(config, data, root, data_id, x_eval, y_eval, log, progress)}
    den_settings = {**data_id, "noise": s, "arch": lc.den_arch, "width": lc.den_width, "depth": lc.den_depth,
                    "steps": lc.den_steps, "lr": lc.den_lr, "seed": lc.seed}
    den_dir = os.path.join(root, "denoiser")
    den_meta = os.path.join(root, "denoiser_settings.json")
    den = None
    if os.path.exists(den_meta) and io_lib.read_json(den_meta) == json.loads(json.dumps(den_settings)):
        den = scores_lib.load_denoiser(den_dir)
        log("denoiser: loaded from cache")
    if den is None:
        t = time.perf_counter()
        log(f"denoiser: training {lc.den_steps} steps ({lc.den_arch}, width {lc.den_width}) at noise {s:g}")
        k = data.num_classes
        x2 = jnp.concatenate([jnp.asarray(data.x_train)] * 2)
        y2 = jnp.concatenate([jnp.asarray(data.y_train, jnp.int32), jnp.full((data.x_train.shape[0],), k, jnp.int32)])
        with _training_checkpointer(root, "denoiser", den_settings, log) as ckpt:
            den = scores_lib.train_denoiser(x2, y2, noise_levels=s, steps=lc.den_steps,
                                            key=jax.random.key(lc.seed + 1), conditional=True, num_classes=k + 1,
                                            learning_rate=lc.den_lr, width=lc.den_width, depth=lc.den_depth,
                                            arch=lc.den_arch, checkpointer=ckpt,
                                            checkpoint_every=config.checkpoint_every,
                                            progress="denoiser" if progress else None)
        scores_lib.save_denoiser(den_dir, den)
        io_lib.write_json(den_meta, den_settings)
        log(f"denoiser: trained {lc.den_steps} steps in {time.perf_counter() - t:.0f} s")
    source = scores_lib.learned_score(den)
    class_score = scores_lib.compute_scores(source, x_eval, y_eval, noise_level=s, chunk_size=64)
    null = jnp.full_like(y_eval, data.num_classes)
    uncond = scores_lib.compute_scores(source, x_eval, null, noise_level=s, chunk_size=64)
    return {"basis": tb.basis, "score_maps": class_score, "learned_bayes_maps": class_score - uncond}


def _score_model_maps(config: SweepConfig, data: SweepData, root: str, data_id: dict, x_eval, y_eval, log,
                      progress: bool = True) -> dict:
    """`learned_geometry`'s score maps from the EDM score model (cached in ``learned/score_model``)."""
    from pagjax import score_model as sm_lib

    lc = config.learned
    smc = sm_lib.ScoreModelConfig(channels=tuple(lc.sm_channels), steps=lc.sm_steps, num_classes=data.num_classes)
    model = sm_lib.cached_score_model(os.path.join(root, "score_model"), jnp.asarray(data.x_train),
                                      jnp.asarray(data.y_train), smc, jax.random.key(lc.seed + 1),
                                      {**data_id, "seed": lc.seed}, log=log,
                                      checkpoint_every=config.checkpoint_every,
                                      progress="score model" if progress else None)
    maps = sm_lib.reference_maps(model, x_eval, y_eval, align_noise=config.measure.align_noise,
                                 paper_noise=config.measure.paper_noise)
    if lc.sm_bayes == "classifier":  # cheap (an MLP): trained afresh, not cached
        clf = sm_lib.train_noise_classifier(jnp.asarray(data.x_train), jnp.asarray(data.y_train), data.num_classes,
                                            smc, jax.random.key(lc.seed + 2),
                                            progress="noise classifier" if progress else None)
        maps["learned_bayes_maps"] = sm_lib.classifier_bayes_gradient(clf, x_eval, config.measure.align_noise, y_eval)
        log("score model: learned Bayes gradient from a noise-conditional classifier")
    return maps


def make_eval_set(config: SweepConfig, data: SweepData, out_dir: str, log: Callable[[str], None] = print,
                  progress: bool = True):
    """The evaluation set: exact maps for a known manifold, learned ones for real images."""
    if data.manifold is not None:
        return measure_lib.prepare_eval_set(data.x_test, data.y_test, data.num_classes, config.measure,
                                            manifold=data.manifold, z_test=data.z_test)
    geo = learned_geometry(config, data, out_dir, log, progress)
    return measure_lib.prepare_eval_set(data.x_test, data.y_test, data.num_classes, config.measure, **geo)


def measure_method(config: SweepConfig, method: str, state: sweep.SweepState, evalset, data: SweepData) -> tuple[list, np.ndarray]:
    """Measure every model of a method: rows and gradient maps (K, grid, H, W, C)."""
    model = models_lib.build_model(config.model, data.num_classes)
    strengths, seeds = _method_points(config, method)
    diverged = np.asarray(state.diverged)
    rows, grids = [], []
    for i, (s, seed) in enumerate(zip(strengths, seeds)):
        # every column, empty until measured: a diverged model's row is complete too
        row = {"method": method, "strength": s, "seed": seed, "diverged": bool(diverged[i]),
               **dict.fromkeys(metrics_lib.columns(config.measure))}
        # one device: a model sliced from a sharded sweep state lives on several devices,
        # and the eval set's cached maps on one
        variables = jax.device_put(jax.device_get(sweep.model_variables(state, i)), jax.devices()[0])
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

    curves = {c: grid(c) for c in metrics_lib.columns()}
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
    learned = not np.isfinite(mean["bayes_cosine"]).any() and np.isfinite(mean["learned_bayes_cosine"]).any()
    column = "learned_bayes_cosine" if learned else "bayes_cosine"
    if config.measure.alignment == "paper":  # the paper's protocol (pagjax.measure docstring)
        column = "paper_lpips_alignment" if np.isfinite(mean["paper_lpips_alignment"]).any() else "paper_score_cosine"
    curves.update(strengths=strengths, labels=labels, mean=mean, alignment_column=column)
    return curves, result


def summarize(curves: dict, result: regimes.RegimeResult | None, method: str) -> dict:
    """The per-method line of the final table."""
    column = curves.get("alignment_column", "bayes_cosine")
    align = curves["mean"][column]
    out = {"method": method, "alignment": metrics_lib.alignment_labels().get(column, column)}
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


CHANCE_MARGIN = 0.1  # "at chance": accuracy within 10% of the chance-to-perfect range above chance


def at_chance(accuracy: float, num_classes: int) -> bool:
    """Whether a model's accuracy is at chance: trained to nothing (e.g. by a huge learning
    rate or strength) without ever producing a NaN, so it is not marked diverged."""
    chance = 1.0 / num_classes
    return bool(np.isfinite(accuracy) and accuracy <= chance + CHANCE_MARGIN * (1.0 - chance))


def seed_evidence(curves: dict, num_classes: int) -> list[dict]:
    """Per strength: the label, each seed's off/on ratio and accuracy, whether the seeds
    agree on the weak / Bayes-aligned side (off/on above or below 1) and which seeds are
    at chance. A label its seeds do not agree on hinges on rounding and seeds: it needs
    more seeds, not more trust."""
    out = []
    for i, s in enumerate(curves["strengths"]):
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = curves["off_change"][i] / curves["on_change"][i]
        acc = curves["accuracy"][i]
        ok = np.isfinite(ratio)
        sides = {bool(r > 1) for r in ratio[ok]}
        chance_seeds = [j for j, a in enumerate(acc) if at_chance(a, num_classes)]
        out.append({
            "strength": float(s), "label": curves["labels"][i],
            "off_on_per_seed": [None if not np.isfinite(r) else float(r) for r in ratio],
            "off_on_spread": [float(ratio[ok].min()), float(ratio[ok].max())] if ok.any() else None,
            "accuracy_per_seed": [None if not np.isfinite(a) else float(a) for a in acc],
            "seeds_agree": len(sides) <= 1 and int(ok.sum()) >= 2,
            "measured_seeds": int(ok.sum()),
            "at_chance_seeds": chance_seeds,
        })
    return out


def model_health(rows_by_method: dict, num_classes: int) -> list[str]:
    """Console lines naming the diverged and collapsed (at-chance) models, and why a
    method has no labels at all; empty when every model trained."""
    lines = []
    for method, rows in rows_by_method.items():
        diverged = [r for r in rows if r.get("diverged")]
        collapsed = [r for r in rows if not r.get("diverged") and at_chance(float(r.get("accuracy", np.nan)), num_classes)]
        name = lambda r: f"{r['strength']:g}/seed {r['seed']}"  # noqa: E731
        if diverged and len(diverged) == len(rows):
            lines.append(f"{method}: every model diverged (a NaN/inf loss or gradient): no regime labels; "
                         "lower the learning rate (--lr) or the strengths")
        elif diverged:
            lines.append(f"{method}: {len(diverged)} of {len(rows)} models diverged (NaN/inf), left out of the "
                         f"curves: {', '.join(map(name, diverged))}")
        if collapsed:
            lines.append(f"{method}: {len(collapsed)} of {len(rows)} models are at chance accuracy (collapsed "
                         f"without a NaN; their labels are not evidence): {', '.join(map(name, collapsed))}")
    return lines


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
        if regime_info[method] is not None:
            regime_info[method]["per_seed"] = seed_evidence(curves, data.num_classes)
        fig_curves[method] = {"strengths": curves["strengths"], "labels": curves["labels"],
                              "on_change": curves["on_change"], "off_change": curves["off_change"],
                              "accuracy": curves["accuracy"], "alignment": curves[curves["alignment_column"]],
                              "alignment_label": metrics_lib.alignment_curve_labels()[curves["alignment_column"]]}
        grids = grids_by_method[method]
        strengths, seeds = _method_points(config, method)
        first_seed = [i for i, sd in enumerate(seeds) if sd == config.seeds[0]]
        rows_img = [grids[i] for i in first_seed]
        labels_img = [f"{STRENGTH_NAMES.get(method, 's')}={plots.strength_label(strengths[i])}" for i in first_seed]
        if evalset.bayes_maps is not None:
            rows_img.append(np.asarray(evalset.bayes_maps[: config.measure.grid_images]))
            labels_img.append(f"Bayes s={config.measure.align_noise:g}")
        elif evalset.learned_bayes_maps is not None:
            rows_img.append(np.asarray(evalset.learned_bayes_maps[: config.measure.grid_images]))
            labels_img.append(f"learned Bayes s={config.measure.align_noise:g}")
            if evalset.paper_score_maps is not None:  # the paper's reference: the learned score
                rows_img.append(np.asarray(evalset.paper_score_maps[: config.measure.grid_images]))
                labels_img.append(f"learned score s={config.measure.paper_noise:g}")
            rows_img.insert(0, np.asarray(evalset.x[: config.measure.grid_images]))
            labels_img.insert(0, "image")
        plots.gradient_grid(rows_img, labels_img, os.path.join(out_dir, f"gradients_{method}.png"),
                            title=f"input-gradients of log p(y|x), {method} (seed {config.seeds[0]})")
    io_lib.write_csv(os.path.join(out_dir, "results.csv"), all_rows, result_columns(config.measure))
    io_lib.write_json(os.path.join(out_dir, "regimes.json"), regime_info)
    io_lib.write_json(os.path.join(out_dir, "summary.json"), summaries)
    if fig_curves:
        plots.figure3(fig_curves, os.path.join(out_dir, "figure3.png"), strength_names=STRENGTH_NAMES)
    return summaries


def load_points(config: SweepConfig, method: str, point_file: str, grid_file: str, data: SweepData):
    """A finished method's rows and gradient grids, checked against the settings.

    Raises `pagjax.io.DamagedFileError` naming the file when it is unreadable or does not
    hold exactly one row per (strength, seed) of `method` (e.g. ``[]``) or grids of the
    expected shape; `FileNotFoundError` when one of the pair is missing.
    """
    for f in (point_file, grid_file):
        if not os.path.exists(f):
            raise FileNotFoundError(f"{f} is missing")
    rows = io_lib.read_json(point_file)
    strengths, seeds = _method_points(config, method)
    want = list(zip(strengths, seeds))

    def bad(why):
        return io_lib.DamagedFileError(f"{os.path.abspath(point_file)} is damaged ({why})")

    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise bad("not a list of rows")
    try:
        got = [(float(r["strength"]), int(r["seed"])) for r in rows]
    except (KeyError, TypeError, ValueError):
        raise bad("a row lacks a numeric strength or seed") from None
    if got != want or any(r.get("method") != method or not isinstance(r.get("diverged"), bool) for r in rows):
        raise bad(f"holds {len(rows)} rows, expected one per (strength, seed) of {method}: {len(want)}")
    known = set(ID_COLUMNS + STATUS_COLUMNS) | set(metrics_lib.columns(config.measure))
    for r in rows:
        unknown = sorted(set(r) - known)
        if unknown:  # measured by a metric no longer registered: measure again rather than drop it
            raise bad(f"row {method} strength {r['strength']:g} seed {r['seed']} has columns no registered "
                      f"metric writes: {unknown}")
    # metrics registered since these rows were measured: empty (not measured), never made up
    rows = [{**dict.fromkeys(metrics_lib.columns(config.measure)), **r} for r in rows]
    for r in rows:
        for key in ("accuracy", "on_change", "off_change"):
            v = r.get(key)
            if not r["diverged"] and not (isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)):
                raise bad(f"row {method} strength {r['strength']:g} seed {r['seed']} has no finite {key}")
    grids = io_lib.load_npz(grid_file, "grads")
    shape = (len(want), "grid", *data.x_test.shape[1:])
    if grids.ndim != len(shape) or grids.shape[0] != len(want) or grids.shape[2:] != data.x_test.shape[1:]:
        raise io_lib.DamagedFileError(f"{os.path.abspath(grid_file)} is damaged (shape {grids.shape}, expected {shape})")
    return rows, grids


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
    total = sum(len(config.strengths[m]) * len(config.seeds) * config.steps for m in config.methods)
    bar = tqdm(total=total, disable=not progress, unit="model-step", smoothing=0.1)
    for method in config.methods:
        k = len(config.strengths[method]) * len(config.seeds)
        point_file = os.path.join(out_dir, "points", f"{method}.json")
        grid_file = os.path.join(out_dir, "points", f"{method}_gradients.npz")
        if os.path.exists(point_file) or os.path.exists(grid_file):
            try:
                rows, grids = load_points(config, method, point_file, grid_file, data)
                rows_by_method[method], grids_by_method[method] = rows, grids
                bar.update(k * config.steps)
                log(f"{method}: already finished, skipped")
                continue
            except (io_lib.DamagedFileError, FileNotFoundError) as e:
                log(f"{method}: {e}; measuring it again")
                for f in (point_file, grid_file):
                    if os.path.exists(f):
                        os.remove(f)
        seen = [0]

        def on_progress(p, method=method, k=k, seen=seen):
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
        io_lib.save_npz(grid_file, grads=grids)
        io_lib.write_json(point_file, rows)
        rows_by_method[method], grids_by_method[method] = rows, grids
        write_outputs(config, out_dir, rows_by_method, grids_by_method, data, evalset)
    bar.close()
    summaries = write_outputs(config, out_dir, rows_by_method, grids_by_method, data, evalset)
    log(format_table(summaries))
    for line in model_health(rows_by_method, data.num_classes):
        log(line)
    for method in config.methods:  # labels whose seeds disagree hinge on rounding
        info = io_lib.read_json(os.path.join(out_dir, "regimes.json")).get(method) or {}
        shaky = [e for e in info.get("per_seed", []) if e["measured_seeds"] >= 2 and not e["seeds_agree"]]
        if shaky:
            where = ", ".join(f"{e['strength']:g}" for e in shaky)
            log(f"{method}: seeds disagree on the weak / Bayes-aligned side at strength {where} "
                "(per-seed off/on in regimes.json): run more seeds")
    log(f"wrote {out_dir}/results.csv, figure3.png, gradients_*.png in {time.perf_counter() - t0:.0f} s")
    return summaries
