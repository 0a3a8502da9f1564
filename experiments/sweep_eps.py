"""Sweep a robustness strength, train the models, measure, label the three regimes.

    python -m experiments.sweep_eps                      # default: built-in data, 4 methods
    python -m experiments.sweep_eps --methods noise --strengths 0,0.1,1 --seeds 0
    python -m experiments.sweep_eps --log-range 1e-3,10,7 --methods gradnorm
    python -m experiments.sweep_eps --dataset digits     # real images, offline (learned geometry)
    python -m experiments.sweep_eps --dataset fashion_mnist --data-dir ~/tensorflow_datasets
    python -m experiments.sweep_eps --dataset cifar10 --data-dir ~/tensorflow_datasets --model resnet18

A killed run resumes when the same command is run again: every training (classifiers,
autoencoder, denoiser, score model) is checkpointed every --checkpoint-seconds (60 s by default)
or --checkpoint-every steps.

The default run trains 4 methods x 6 strengths x 2 seeds = 48 MLPs on the built-in
linear known-manifold data (no download) and should show, for every method, the weak ->
Bayes-aligned -> excessive sequence (docs/results.md; flags and outputs: docs/sweep.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np



def _floats(text: str, flag: str) -> tuple[float, ...]:
    """Comma-separated finite numbers; an empty list or a bad item is an error naming `flag`."""
    items = [v.strip() for v in text.split(",")]
    if not any(items):
        raise ValueError(f"{flag} is empty; give comma-separated numbers, e.g. {flag} 0.1,1")
    out = []
    for v in items:
        if not v:
            raise ValueError(f"{flag} has an empty item in {text!r}")
        try:
            out.append(float(v))
        except ValueError:
            raise ValueError(f"{flag} must be comma-separated numbers, got {v!r} in {text!r}") from None
        if not np.isfinite(out[-1]):
            raise ValueError(f"{flag} must be finite numbers, got {v!r}")
    return tuple(out)


def _ints(text: str, flag: str) -> tuple[int, ...]:
    items = [v.strip() for v in text.split(",")]
    if not all(items):
        raise ValueError(f"{flag} must be comma-separated integers with no empty item, got {text!r}")
    try:
        return tuple(int(v) for v in items)
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None


def _names(text: str, flag: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in text.split(","))
    if not all(items):
        raise ValueError(f"{flag} must be comma-separated names with no empty item, got {text!r}")
    dup = sorted({v for v in items if items.count(v) > 1})
    if dup:  # each name would train and write the same models twice
        raise ValueError(f"{flag} names {', '.join(dup)} more than once")
    return items


def _log_range(text: str) -> tuple[float, ...]:
    """--log-range LOW,HIGH,N: N log-spaced strengths from LOW to HIGH (both > 0)."""
    parts = [v.strip() for v in text.split(",")]
    if len(parts) != 3:
        raise ValueError(f"--log-range must be LOW,HIGH,N (three items), got {text!r}")
    try:
        lo, hi, n = float(parts[0]), float(parts[1]), int(parts[2])
    except ValueError:
        raise ValueError(f"--log-range must be LOW,HIGH,N with numbers LOW, HIGH and an integer N, got {text!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and 0 < lo < hi):
        raise ValueError(f"--log-range needs finite 0 < LOW < HIGH (log-spaced), got LOW={parts[0]} HIGH={parts[1]}")
    if not 2 <= n <= 1000:
        raise ValueError(f"--log-range N must be an integer in [2, 1000], got {parts[2]}")
    return tuple(float(v) for v in np.logspace(np.log10(lo), np.log10(hi), n))


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a flag's default unless it is None or the help text already states it."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Bad flags get one line naming the flag, not the whole usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv=None) -> argparse.Namespace:
    from pagjax import methods
    from pagjax.training import PAPER_SGD
    from pagjax.sweep_config import KNOWN_DATA

    p = _Parser(description=__doc__.split("\n")[0], formatter_class=_HelpFormatter)
    p.add_argument("--out", default="runs/sweep_eps", help="output folder (results.csv, figures, checkpoints)")
    p.add_argument("--methods", default=",".join(methods.robust_names()),
                   help="comma-separated registered methods (pagjax.methods): " + methods.help_text().replace("%", "%%"))
    p.add_argument("--strengths", default=None, help="comma-separated strengths for every chosen method (default: per-method, per-dataset grids; "
                        "with --official converted to official units: gradnorm c = lambda*B^2/1e5, PGD eps*sqrt(B))")
    p.add_argument("--log-range", default=None, help="LOW,HIGH,N: N log-spaced strengths for every chosen method")
    p.add_argument("--seeds", default="0,1", help="comma-separated integer seeds")
    p.add_argument("--data-seed", type=int, default=0,
                   help="which draw of the data: a known manifold and its samples, or the subset of real images")
    p.add_argument("--dataset", default="linear_default",
                   help="built-in known manifold (pagjax.manifolds.manifold_names) or real dataset: digits (offline), "
                        "mnist, fashion_mnist, cifar10, imagenet64 (prepared tfds data)")
    p.add_argument("--data-dir", default=None, help="real data: tensorflow-datasets data directory holding the prepared data")
    p.add_argument("--download", action="store_true", help="real data: download and prepare it if missing (needs network)")
    p.add_argument("--image-size", type=int, default=None, help="real data: resize images to this size (e.g. 16 for digits)")
    p.add_argument("--n-train", type=int, default=None, help="training examples (default: 8192; real data: at most this many)")
    p.add_argument("--n-test", type=int, default=None, help="test examples (default: 1024)")
    p.add_argument("--augment", default="none", help="none or crop_flip (the paper's random crop with pad 4 + flip)")
    p.add_argument("--ae-latent", type=int, default=None, help="real data: autoencoder latents = tangent dimension (default 8 for digits, else 128)")
    p.add_argument("--ae-steps", type=int, default=None, help="real data: autoencoder training steps (default 2000)")
    p.add_argument("--denoiser-steps", type=int, default=None, help="real data: denoiser (learned score) training steps (default 2000)")
    p.add_argument("--score-backend", default=None, choices=("denoiser", "score_model"),
                   help="real data: learned score from the denoiser or the EDM score model (U-Net, pagjax.score_model; "
                        "default: score_model on tfds data, denoiser on digits)")
    p.add_argument("--score-model-steps", type=int, default=None,
                   help="real data: score model training steps (default 800 on MNIST / Fashion-MNIST, 1000 on colour images)")
    p.add_argument("--normal-offset", type=float, default=KNOWN_DATA["normal_offset"],
                   help="built-in data: size of the class-informative off-manifold feature")
    p.add_argument("--class-separation", type=float, default=KNOWN_DATA["class_separation"],
                   help="built-in data: scale of the class means on the manifold")
    p.add_argument("--model", default=None, help="model name, e.g. mlp:width=512, cnn, resnet18:act=softplus (default: "
                   "mlp:width=128 on the built-in data, mlp:width=256 on real images)")
    p.add_argument("--steps", type=int, default=None, help="training steps per model (default 600; tfds images: 1000)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size")
    p.add_argument("--lr", type=float, default=None,
                   help=f"learning rate (default for adam: 3e-3 on the built-in data, 2e-3 on real images; "
                        f"the paper's {PAPER_SGD.learning_rate:g} for sgd)")
    p.add_argument("--optimizer", default="adam", help="adam or sgd (sgd: the paper's recipe: lr 0.025, momentum 0.9, "
                                                       "weight decay 5e-4, piecewise schedule)")
    p.add_argument("--official", action="store_true", help="use the official PyTorch code's conventions (gradnorm constant, whole-batch PGD ball)")
    p.add_argument("--official-grad-accumulation", action="store_true",
                   help="pgd: reproduce the official CIFAR-10 training, whose parameter update adds the gradients of "
                        "every attack step (about 10x the norm of the stated objective's gradient; off: the stated objective)")
    p.add_argument("--official-bn-updates", action="store_true",
                   help="smoothness, pgd: update BatchNorm running statistics on every training forward, as the official "
                        "code does (2 per step for smoothness, steps + 1 for pgd; off: one per step)")
    p.add_argument("--pgd-steps", type=int, default=5, help="PGD steps per training batch")
    p.add_argument("--eps", default="0.5,1,2", help="comma-separated perturbation sizes for the on/off-manifold change")
    p.add_argument("--regime-eps", type=float, default=1.0, help="which eps drives the regime labels")
    p.add_argument("--align-noise", type=float, default=0.3, help="noise level of the score / Bayes gradient used for alignment")
    p.add_argument("--no-lpips", action="store_true", help="skip the LPIPS alignment (faster)")
    p.add_argument("--alignment", default="default", choices=("default", "paper"),
                   help="alignment protocol of the figure and summary: default (grad log p(y|x) vs Bayes gradient) or "
                        "paper (1 - LPIPS between grad of the logit sum and the unconditional score at sigma 0.5); "
                        "results.csv holds both")
    p.add_argument("--robust-eps", type=float, default=None, help="also measure PGD robust accuracy at this L2 radius")
    p.add_argument("--strategy", default="auto", help="how models share the hardware: auto, vmap, loop, sharded. They round differently, so "
                        "the resolved strategy is recorded and a resume must use the same")
    add_cpu_devices_flag(p)
    p.add_argument("--overwrite", action="store_true", help="delete results in --out that were made with other settings")
    from pagjax.experiment import SweepConfig  # its default: one place for it

    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="steps between the checkpoints of every training (default: by time, see --checkpoint-seconds); "
                        "a rerun resumes from the last one")
    p.add_argument("--checkpoint-seconds", type=float, default=SweepConfig.checkpoint_seconds,
                   help="seconds of training between checkpoints: a kill loses at most this much of a training")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (the phase lines are still printed)")
    add_compile_cache_flags(p)
    return p.parse_args(argv)


def add_compile_cache_flags(p: argparse.ArgumentParser) -> None:
    """--compile-cache DIR / --no-compile-cache, for every command line that trains."""
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="keep compiled programs here, so that a rerun skips most compiling (default: "
                        "$PAGJAX_COMPILE_CACHE, else $XDG_CACHE_HOME/pagjax/xla, else ~/.cache/pagjax/xla)")
    p.add_argument("--no-compile-cache", action="store_true", help="compile everything afresh and keep nothing")


def start_compile_cache(args: argparse.Namespace) -> None:
    """Turn on the persistent compile cache the flags ask for (`pagjax.xla.use_compile_cache`);
    call it before anything compiles. A folder that cannot be made costs a note, not the run."""
    if args.no_compile_cache:
        return
    from pagjax import xla

    folder = args.compile_cache or xla.default_compile_cache_dir()
    if xla.use_compile_cache(folder) is None:
        print(f"note: cannot create the compile cache {folder}; compiling everything (--compile-cache DIR to "
              "choose another folder)", file=sys.stderr)


def _device_count(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def add_cpu_devices_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpu-devices", type=_device_count, default=None,
                   help="split the CPU into N XLA devices, so the sharded strategy trains groups of models side by side "
                        "(default for MLP sweeps with --strategy auto: one per core, as many as divide every method's "
                        "models; 1: one device)")


def start_cpu_devices(args: argparse.Namespace, config) -> None:
    """Split the CPU into devices for the sharded strategy (`pagjax.sweep.cpu_devices_for`);
    call it before the first JAX operation. Where JAX has already started (a notebook, the
    tests) the devices stay as they are."""
    from pagjax import devices, models, sweep

    n = args.cpu_devices
    if n is None:
        # the architecture as `sweep.choose_strategy` tells it (building a module starts no JAX)
        mlp = isinstance(models.build_model(config.model, num_classes=2).module, models.MLP)
        if config.strategy not in ("auto", "sharded") or not mlp:
            return
        n = sweep.cpu_devices_for([config.num_models(m) for m in config.methods], devices.available_cores())
    if not devices.split_cpu(n) and args.cpu_devices is not None:
        print(f"note: JAX has already started, so --cpu-devices {n} does not apply", file=sys.stderr)


def config_from_args(args: argparse.Namespace):
    from pagjax import data as data_lib
    from pagjax import methods as methods_lib
    from pagjax.experiment import SweepConfig, default_strengths
    from pagjax.sweep_config import classifier_defaults, learned_defaults
    from pagjax.measure import MeasureConfig
    from pagjax.training import PAPER_SGD, OptimizerConfig

    real = data_lib.is_real_dataset(args.dataset)
    defaults = classifier_defaults(args.dataset)

    methods = _names(args.methods, "--methods")
    for m in methods:  # names the flag and lists the registered methods
        methods_lib.get(m, argument="--methods")
    if args.strengths is not None and args.log_range is not None:
        raise ValueError("give --strengths or --log-range, not both")
    if args.log_range is not None:
        grid = _log_range(args.log_range)
        strengths = {m: grid for m in methods}
    elif args.strengths is not None:  # an empty --strengths is an error, not the default grid
        strengths = {m: _floats(args.strengths, "--strengths") for m in methods}
    else:
        # per-dataset grids, in official units under --official
        strengths = {m: default_strengths(m, args.dataset, official=args.official, batch_size=args.batch_size)
                     for m in methods}
    if args.optimizer == "adam":
        optimizer = OptimizerConfig(name="adam", learning_rate=defaults.learning_rate if args.lr is None else args.lr)
    else:  # the paper's SGD recipe, its learning rate included unless --lr is given
        optimizer = dataclasses.replace(PAPER_SGD, name=args.optimizer,
                                        learning_rate=PAPER_SGD.learning_rate if args.lr is None else args.lr)
    measure = MeasureConfig(eps=_floats(args.eps, "--eps"), regime_eps=args.regime_eps, align_noise=args.align_noise,
                            lpips=not args.no_lpips, pgd_eps=args.robust_eps, alignment=args.alignment)
    steps = args.steps if args.steps is not None else defaults.steps
    extra = {}
    if real:
        # per-dataset defaults (sweep_config.learned_defaults), each overridden by its flag
        given = {"ae_latent": args.ae_latent, "ae_steps": args.ae_steps, "den_steps": args.denoiser_steps,
                 "score_backend": args.score_backend, "sm_steps": args.score_model_steps}
        learned = dataclasses.replace(learned_defaults(args.dataset), **{k: v for k, v in given.items() if v is not None})
        extra = dict(dataset_kwargs={}, image_size=args.image_size, data_dir=args.data_dir, download=args.download,
                     learned=learned)
    else:
        extra = dict(dataset_kwargs={"normal_offset": args.normal_offset, "class_separation": args.class_separation})
    if args.n_train is not None:
        extra["n_train"] = args.n_train
    if args.n_test is not None:
        extra["n_test"] = args.n_test
    return SweepConfig(methods=methods, strengths=strengths, seeds=_ints(args.seeds, "--seeds"), data_seed=args.data_seed,
                       dataset=args.dataset, model=args.model or defaults.model, steps=steps, batch_size=args.batch_size,
                       optimizer=optimizer, official=args.official, pgd_steps=args.pgd_steps,
                       official_grad_accumulation=args.official_grad_accumulation,
                       official_bn_updates=args.official_bn_updates, measure=measure,
                       strategy=args.strategy, augment=args.augment, checkpoint_every=args.checkpoint_every,
                       checkpoint_seconds=args.checkpoint_seconds, **extra)


def run_and_report(config, out: str, *, overwrite: bool, progress: bool) -> int:
    """Run a sweep for a command line: exit status 2 with a one-line message on a settings
    mismatch or damaged settings record, 1 on an output folder or file that cannot be
    written (unwritable, full), instead of a traceback."""
    from pagjax import io as io_lib
    from pagjax.experiment import SettingsMismatchError, run_sweep

    try:
        run_sweep(config, out, overwrite=overwrite, progress=progress)
    except SettingsMismatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (io_lib.OutputNotWritableError, io_lib.CheckpointWriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. a full disk mid-run: the path and the reason, not a traceback
        where = f" {e.filename}" if getattr(e, "filename", None) else f" in {out}"
        print(f"error: cannot write{where}: {e.strerror or e}. Free space or fix permissions, then rerun "
              "the same command to resume.", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    from pagjax import io as io_lib

    try:
        config = config_from_args(args)
        config.validate()
        io_lib.check_writable_dir(args.out, "--out")  # before any data is built or model trained
    except (ValueError, io_lib.OutputNotWritableError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start_compile_cache(args)
    start_cpu_devices(args, config)
    return run_and_report(config, args.out, overwrite=args.overwrite, progress=not args.no_progress)


if __name__ == "__main__":
    sys.exit(main())
