"""A sweep's settings: `SweepConfig` (what is trained and measured), `LearnedConfig` (how
real images' tangent spaces and scores are learned), their checks, and the defaults.

`SweepConfig.validate` checks every setting before any data is built or anything compiled;
`SweepConfig.settings` is the record of what determines the results (``config.json``),
execution details removed. The default strength grids, their official-unit conversion and
the strength labels are views of the method registry (`pagjax.methods`).
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np

from pagjax import measure as measure_lib
from pagjax import methods as methods_lib
from pagjax import models as models_lib
from pagjax import objectives as objectives_lib
from pagjax import sweep, training, validation


# Fields that do not change what is computed. ``strategy`` is not one: vmap, loop and
# sharded round differently and the differences grow through training (a regime label
# can flip), so the resolved strategy is part of the settings a resume must match.
EXECUTION_FIELDS = ("steps_per_call", "checkpoint_every", "checkpoint_seconds", "data_dir", "download")

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



def _check_seed(what: str, seed) -> None:
    # JAX keys take 32-bit seeds; a round bound well inside them
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < MAX_SEED:
        raise ValueError(f"{what} in [0, {MAX_SEED}), got {seed!r}")


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


def learned_defaults(dataset: str) -> LearnedConfig:
    """The learned-geometry settings a sweep on real ``dataset`` uses by default.

    Chosen by measurements on real MNIST (8192 training images, 2 CPU cores, docs/real_images.md):
    * 28x28 grayscale (mnist, fashion_mnist): a dense autoencoder (784-512-128), 2000 steps
      in about 25 s, reconstruction MSE 0.005; the conv one costs 20x more per step.
      The EDM score model (U-Net, channels 16, 32) for the scores and the paper protocol:
      0.41 s per step; at 400 steps its denoising MSE at sigma 0.5 was already 0.57x the
      Wiener filter's, so 800 steps (about 5 minutes) keep the learned phase near 7 minutes.
    * colour images (cifar10, imagenet64): the conv autoencoder (the paper's CIFAR-10
      setting), the same score model with wider channels.
    * digits (8x8, offline): the small dense autoencoder and the dense denoiser (seconds).

    With ``--score-backend denoiser`` on tfds data the conv denoiser is 64 wide: at 256 it
    was about 0.5 TFLOP per step at batch 32 (benchmarks.bench_engine), 16x more.
    """
    if dataset == "digits":
        return LearnedConfig(ae_latent=8)
    if dataset in ("mnist", "fashion_mnist"):
        return LearnedConfig(ae_latent=128, ae_arch="mlp", ae_hidden=(512,), ae_steps=2000,
                             score_backend="score_model", sm_channels=(16, 32), sm_steps=800,
                             den_arch="conv", den_width=64)
    return LearnedConfig(ae_latent=128, ae_arch="conv", ae_steps=2000, score_backend="score_model",
                         sm_channels=(32, 64), sm_steps=1000, den_arch="conv", den_width=64)


# The built-in data's default draw: a class-informative off-manifold feature of 0.3 and
# on-manifold classes that overlap (separation 0.6), so a weakly robust model leans on the
# off-manifold feature (off/on about 15-30 at the weakest strengths, every method and seed);
# with 0.2 and 1.0 the weak regime was marginal and depended on the draw (docs/results.md).
KNOWN_DATA = {"normal_offset": 0.3, "class_separation": 0.6}


@dataclasses.dataclass(frozen=True)
class ClassifierDefaults:
    """The classifiers a sweep trains on a dataset by default (each overridden by its flag)."""

    model: str
    steps: int
    learning_rate: float  # Adam's


KNOWN_CLASSIFIER = ClassifierDefaults("mlp:width=128", 600, 3e-3)  # the default sweep's (SweepConfig's)


def classifier_defaults(dataset: str) -> ClassifierDefaults:
    """Per dataset kind: the built-in known manifolds train a width-128 MLP for 600 steps
    (Adam 3e-3): enough to show all three regimes for every method (docs/results.md), at
    about a quarter of the compute of the real-image setting; digits the width-256 MLP for
    600 steps; tfds images the width-256 MLP for 1000 steps (Adam 2e-3 for both)."""
    from pagjax import data as data_lib

    if not data_lib.is_real_dataset(dataset):
        return KNOWN_CLASSIFIER
    return ClassifierDefaults("mlp:width=256", 600 if dataset == "digits" else 1000, 2e-3)


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """Every setting of a sweep (see ``python -m experiments.sweep_eps --help``)."""

    methods: tuple[str, ...] = dataclasses.field(default_factory=methods_lib.robust_names)
    strengths: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_STRENGTHS))
    seeds: tuple[int, ...] = (0, 1)
    dataset: str = "linear_default"
    dataset_kwargs: dict = dataclasses.field(default_factory=lambda: dict(KNOWN_DATA))  # built-in manifolds only
    data_seed: int = 0
    n_train: int = 8192
    n_test: int = 1024
    model: str = KNOWN_CLASSIFIER.model  # the default dataset's (classifier_defaults)
    steps: int = KNOWN_CLASSIFIER.steps
    batch_size: int = 128
    optimizer: training.OptimizerConfig = training.OptimizerConfig(name="adam",
                                                                   learning_rate=KNOWN_CLASSIFIER.learning_rate)
    official: bool = False
    pgd_steps: int = 5
    smoothness_noise_std: float = 0.1
    # reproduction switches of the official CIFAR-10 training (pagjax.objectives docstring)
    official_grad_accumulation: bool = False
    official_bn_updates: bool = False
    measure: measure_lib.MeasureConfig = measure_lib.MeasureConfig()
    strategy: str = "auto"  # a setting, resolved per machine: strategies round differently
    steps_per_call: int = 100
    checkpoint_every: int | None = None  # steps between checkpoints; None: by time
    checkpoint_seconds: float | None = 60.0  # seconds of training between checkpoints
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

    def num_models(self, method: str) -> int:
        """How many models `method` trains: one per (strength, seed)."""
        return len(self.strengths[method]) * len(self.seeds)

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
            _check_seed("seeds must be integers", seed)
        _check_seed("data_seed must be an integer", self.data_seed)
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
        if self.checkpoint_every is not None:
            validation.check_positive_int("checkpoint_every", self.checkpoint_every)
        if self.checkpoint_seconds is not None:
            validation.check_positive("checkpoint_seconds", self.checkpoint_seconds)

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


def method_points(config: SweepConfig, method: str) -> tuple[list[float], list[int]]:
    """The (strength, seed) of each model of `method`, strength-major: the order in which
    the sweep trains them and results.csv lists them."""
    strengths = [float(s) for s in config.strengths[method] for _ in config.seeds]
    seeds = [int(seed) for _ in config.strengths[method] for seed in config.seeds]
    return strengths, seeds
