"""Generation, denoising and in-painting with classifiers' input-gradients, measured.

    python -m experiments.generate                                  # train 4 MLPs, built-in data
    python -m experiments.generate --from-sweep runs/sweep_eps      # reuse a sweep's noise models
    python -m experiments.generate --strengths 0.03,0.3,3 --num-examples 128

Trains (or loads from a sweep's checkpoints) a standard model (plain cross-entropy) and
noise-augmented models at three strengths, by default s = 0.03 (weak), 0.3
(Bayes-aligned) and 3 (excessive) on the default known-manifold data, and runs
`pagjax.generate`'s three procedures on every model and, as a reference row, on the
exact Bayes-optimal classifier p_s(y|x) at ``--bayes-noise``. Writes to ``--out``:

* ``generation.png``, ``denoising.png``, ``inpainting.png``: rows are models, columns
  examples (first row the start, last rows the references);
* ``generate_results.csv``: one row per model with the measures of
  `pagjax.generate.measure_generation`, `measure_denoising`, `measure_inpainting`
  (prefixed ``gen_``, ``den_``, ``inp_``) and the test accuracy;
* ``config.json``: every setting.

The known-manifold images are not clipped (values around 0.5), so the procedures run
without a pixel box there; other datasets use the box (0, 1).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np

REGIME_NAMES = ("weak", "Bayes-aligned", "excessive")
TABLE_COLUMNS = (
    ("model", "model", "{:<18}"), ("accuracy", "acc", "{:>6.3f}"),
    ("gen_model_success", "gen ok", "{:>7.2f}"), ("gen_bayes_target_acc", "gen Bayes", "{:>10.2f}"),
    ("gen_move", "move", "{:>6.2f}"), ("gen_move_normal_fraction", "mv off", "{:>7.3f}"),
    ("gen_move_offdata_fraction", "mv offdata", "{:>11.3f}"), ("gen_normal_ratio", "off ratio", "{:>10.3f}"),
    ("den_mse", "den mse", "{:>9.5f}"), ("den_mse_noisy", "noisy", "{:>9.5f}"), ("den_mse_tweedie", "tweedie", "{:>9.5f}"),
    ("den_tangent_err", "den tan", "{:>8.3f}"), ("den_tangent_err_noisy", "tan noisy", "{:>10.3f}"),
    ("inp_mse", "inp mse", "{:>9.5f}"), ("inp_mse_fill", "fill", "{:>9.5f}"), ("inp_mse_subspace", "oracle", "{:>9.5f}"),
)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/generate", help="output folder")
    p.add_argument("--from-sweep", default=None, help="a sweep output folder: load its models (config.json + checkpoints/) instead of training")
    from pagjax import methods

    p.add_argument("--sweep-method", default="noise", help="which of the sweep's methods supplies the robust models: "
                   + ", ".join(methods.robust_names()))
    p.add_argument("--dataset", default="linear_default", help="dataset name accepted by the sweep (pagjax.experiment.load_data)")
    p.add_argument("--normal-offset", type=float, default=0.2, help="normal feature of linear_default (0.2: the data of docs/generation.md; the sweep now uses 0.3)")
    p.add_argument("--strengths", default="0.03,0.3,3", help="noise-augmentation strengths of the robust models (weak, Bayes-aligned, excessive)")
    p.add_argument("--model", default="mlp:width=256", help="model architecture")
    p.add_argument("--steps", type=int, default=1000, help="training steps per model")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    p.add_argument("--n-train", type=int, default=8192, help="training examples")
    p.add_argument("--num-examples", type=int, default=64, help="test images per procedure")
    p.add_argument("--grid", type=int, default=8, help="examples shown per figure row")
    p.add_argument("--gen-steps", type=int, default=60, help="generation steps")
    p.add_argument("--gen-step-size", type=float, default=0.1, help="generation step length (L2)")
    p.add_argument("--gen-radius", type=float, default=3.0, help="L2 ball around the seed (0 = none)")
    p.add_argument("--seed-std", type=float, default=0.05, help="per-pixel std of the seeds' noise around the mean training image")
    p.add_argument("--denoise-noise", type=float, default=0.3, help="noise level s of the denoising task")
    p.add_argument("--denoise-steps", type=int, default=10, help="denoising steps")
    p.add_argument("--inpaint-steps", type=int, default=60, help="in-painting steps")
    p.add_argument("--inpaint-step-size", type=float, default=0.05, help="in-painting step length (L2)")
    p.add_argument("--inpaint-radius", type=float, default=0.5, help="L2 ball around the in-painting start (0 = none)")
    p.add_argument("--bayes-noise", type=float, default=0.3, help="noise level of the Bayes-optimal reference classifier")
    p.add_argument("--seed", type=int, default=0, help="seed of the procedures' randomness")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    from experiments.sweep_eps import add_compile_cache_flags

    add_compile_cache_flags(p)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- models

@dataclasses.dataclass
class Entry:
    name: str
    method: str
    strength: float
    regime: str
    apply: object
    variables: object


def _sweep_config_from_json(settings: dict):
    from pagjax.experiment import SweepConfig
    from pagjax.measure import MeasureConfig
    from pagjax.training import OptimizerConfig

    def tup(d):
        return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}

    s = dict(settings)
    s["methods"] = tuple(s["methods"])
    s["seeds"] = tuple(s["seeds"])
    s["strengths"] = {m: tuple(v) for m, v in s["strengths"].items()}
    s["optimizer"] = OptimizerConfig(**tup(s["optimizer"]))
    s["measure"] = MeasureConfig(**tup(s["measure"]))
    fields = {f.name: f for f in dataclasses.fields(SweepConfig)}
    for name, f in fields.items():  # other nested settings dataclasses (e.g. learned-geometry settings)
        default = f.default if f.default is not dataclasses.MISSING else None
        if name in s and isinstance(s[name], dict) and dataclasses.is_dataclass(default):
            s[name] = type(default)(**tup(s[name]))
    return SweepConfig(**{k: v for k, v in s.items() if k in fields})


def _restore_method(config, method: str, data, sweep_dir: str):
    """(strengths, seeds, SweepState) of a finished method of a sweep, or None."""
    import jax.numpy as jnp

    from pagjax import experiment, io as io_lib, models as models_lib, sweep, training

    path = os.path.join(sweep_dir, "checkpoints", method)
    if not os.path.isdir(path):
        return None
    model = models_lib.build_model(config.model, data.num_classes)
    optimizer = training.make_optimizer(config.optimizer, config.steps)
    strengths, seeds = experiment.method_points(config, method)
    init = sweep.init_sweep_state(model, optimizer, strengths, seeds, jnp.asarray(data.x_train[: config.batch_size]))
    ckpt = io_lib.Checkpointer(path)
    try:
        restored = ckpt.restore_latest(init)
    finally:
        ckpt.close()
    if restored is None:
        return None
    step, state = restored
    if step < config.steps:
        print(f"warning: {method} checkpoint is at step {step} of {config.steps} (unfinished sweep)", file=sys.stderr)
    return strengths, seeds, state


def _train(config, method, strength, data, progress):
    from pagjax import training

    result = training.train(
        training.TrainConfig(model=config.model, method=method, strength=float(strength), steps=config.steps,
                             batch_size=config.batch_size, seed=int(config.seeds[0]), optimizer=config.optimizer,
                             official=config.official, pgd_steps=config.pgd_steps,
                             smoothness_noise_std=config.smoothness_noise_std),
        data.x_train, data.y_train, num_classes=data.num_classes, progress=progress)
    if result.diverged:
        print(f"warning: {method}={strength:g} diverged at step {result.diverged_at}", file=sys.stderr)
    return result.variables


def build_entries(args, config, data) -> list[Entry]:
    """The standard model and the robust models, trained here or restored from a sweep."""
    from pagjax import models as models_lib, sweep

    model = models_lib.build_model(config.model, data.num_classes)
    wanted = _floats(args.strengths)
    names = list(REGIME_NAMES) if len(wanted) == 3 else [""] * len(wanted)
    entries = []
    if args.from_sweep:
        ce = _restore_method(config, "ce", data, args.from_sweep)
        if ce is not None:
            entries.append(Entry("standard (ce)", "ce", 0.0, "standard", model.apply, sweep.model_variables(ce[2], 0)))
        else:
            print("the sweep has no ce model: training the standard model with the sweep's settings")
            entries.append(Entry("standard (ce)", "ce", 0.0, "standard", model.apply,
                                 _train(config, "ce", 0.0, data, not args.no_progress)))
        restored = _restore_method(config, args.sweep_method, data, args.from_sweep)
        if restored is None:
            raise SystemExit(f"error: {args.from_sweep} has no checkpoints for method {args.sweep_method!r}")
        strengths, seeds, state = restored
        for w, regime in zip(wanted, names):
            cands = [i for i, sd in enumerate(seeds) if sd == seeds[0]]
            i = min(cands, key=lambda j: abs(np.log(max(strengths[j], 1e-12)) - np.log(max(w, 1e-12))))
            if not np.isclose(strengths[i], w):
                print(f"note: the sweep has no {args.sweep_method}={w:g}; using the nearest, {strengths[i]:g}")
            entries.append(Entry(f"{args.sweep_method} {strengths[i]:g}", args.sweep_method, float(strengths[i]),
                                 regime, model.apply, sweep.model_variables(state, i)))
        return entries
    entries.append(Entry("standard (ce)", "ce", 0.0, "standard", model.apply,
                         _train(config, "ce", 0.0, data, not args.no_progress)))
    for w, regime in zip(wanted, names):
        entries.append(Entry(f"noise {w:g}", "noise", w, regime, model.apply,
                             _train(config, "noise", w, data, not args.no_progress)))
    return entries


# --------------------------------------------------------------------------- main

def run(args) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from pagjax import experiment, generate as G, io as io_lib, plots
    from pagjax.training import OptimizerConfig

    t0 = time.perf_counter()
    if args.from_sweep:
        settings = io_lib.read_json(os.path.join(args.from_sweep, "config.json"))["settings"]
        config = _sweep_config_from_json(settings)
    else:
        kwargs = {"normal_offset": args.normal_offset} if args.dataset == "linear_default" else {}
        config = experiment.SweepConfig(methods=("noise",), strengths={"noise": _floats(args.strengths)}, seeds=(0,),
                                        dataset=args.dataset, dataset_kwargs=kwargs, model=args.model, steps=args.steps,
                                        n_train=args.n_train, n_test=max(1024, args.num_examples),
                                        optimizer=OptimizerConfig(name="adam", learning_rate=args.lr))
        config.validate()
    data = experiment.load_data(config)
    manifold = data.manifold
    known = manifold is not None
    box = None if known else (0.0, 1.0)
    n = min(args.num_examples, data.x_test.shape[0])
    entries = build_entries(args, config, data)
    if known:
        bn = float(args.bayes_noise)
        entries.append(Entry(f"Bayes s={bn:g}", "bayes", bn, "reference",
                             lambda _, x: manifold.log_posterior(x, bn), None))
    os.makedirs(args.out, exist_ok=True)
    io_lib.write_json(os.path.join(args.out, "config.json"), {"args": vars(args), "data_settings": config.settings(),
                                                               "versions": experiment.library_versions()})

    key = jax.random.key(args.seed)
    k_seed, k_gen, k_noise, k_inp = jax.random.split(key, 4)
    x_test = jnp.asarray(data.x_test[:n])
    y_test = jnp.asarray(data.y_test[:n])
    c = data.num_classes
    # Generation: seeds = mean training image + noise; targets cycle through the classes.
    mean_image = jnp.asarray(np.mean(data.x_train, axis=0))
    seeds = G.seed_images(k_seed, (n, *x_test.shape[1:]), mean=mean_image, std=args.seed_std, box=box)
    targets = jnp.arange(n, dtype=jnp.int32) % c
    # Denoising: Gaussian noise at --denoise-noise on test images.
    noisy = x_test + args.denoise_noise * jax.random.normal(k_noise, x_test.shape, x_test.dtype)
    if box is not None:
        noisy = jnp.clip(noisy, *box)
    # In-painting: the right half of every image is missing; the true class is given.
    w = x_test.shape[2]
    mask = jnp.zeros((1, *x_test.shape[1:]), bool).at[:, :, w // 2:].set(True)
    observed = jnp.where(mask, 0.0, x_test)

    radius = args.gen_radius if args.gen_radius > 0 else None
    rows, figs = [], {"gen": [], "den": [], "inp": []}
    procedures = {}  # one set of compiled procedures per apply function (all trained models share one)
    for e in entries:
        if id(e.apply) not in procedures:
            procedures[id(e.apply)] = (
                G.make_generator(e.apply, num_steps=args.gen_steps, step_size=args.gen_step_size, radius=radius, box=box),
                G.make_denoiser(e.apply, num_steps=args.denoise_steps, box=box),
                G.make_inpainter(e.apply, num_steps=args.inpaint_steps, step_size=args.inpaint_step_size,
                                 radius=args.inpaint_radius if args.inpaint_radius > 0 else None, box=box))
        gen, den, inp = procedures[id(e.apply)]
        rg = gen(e.variables, seeds, targets, k_gen)
        rd = den(e.variables, noisy, args.denoise_noise, None)
        ri = inp(e.variables, observed, mask, k_inp, labels=y_test)
        row = {"model": e.name, "method": e.method, "strength": e.strength, "regime": e.regime,
               "accuracy": float(np.mean(np.asarray(jnp.argmax(e.apply(e.variables, jnp.asarray(data.x_test)), -1))
                                         == data.y_test))}
        mg = G.measure_generation(rg, targets, manifold=manifold, bayes_noise=args.bayes_noise,
                                  model_logits=e.apply(e.variables, rg.x))
        row.update({f"gen_{k}": v for k, v in mg.items()})
        row.update({f"den_{k}": v for k, v in G.measure_denoising(rd, x_test, noisy, args.denoise_noise, manifold=manifold).items()})
        row.update({f"inp_{k}": v for k, v in G.measure_inpainting(ri, x_test, mask, manifold=manifold).items()})
        rows.append(row)
        label = e.name if not e.regime or e.regime in ("standard", "reference") else f"{e.name}\n({e.regime})"
        figs["gen"].append((np.asarray(rg.x[: args.grid]), label))
        figs["den"].append((np.asarray(rd.x[: args.grid]), label))
        figs["inp"].append((np.asarray(ri.x[: args.grid]), label))
        print(f"{e.name}: done ({time.perf_counter() - t0:.0f} s)", flush=True)

    g = args.grid
    gen_rows = [np.asarray(seeds[:g])] + [r for r, _ in figs["gen"]]
    gen_labels = ["seed"] + [lab for _, lab in figs["gen"]]
    plots.image_grid(gen_rows, gen_labels, os.path.join(args.out, "generation.png"),
                     title=f"generation: ascend log p(target|x) from noisy seeds; targets {np.asarray(targets[:g]).tolist()}")
    den_rows = [np.asarray(noisy[:g])] + [r for r, _ in figs["den"]] + [np.asarray(x_test[:g])]
    den_labels = [f"noisy s={args.denoise_noise:g}"] + [lab for _, lab in figs["den"]] + ["clean"]
    if known:
        den_rows.insert(-1, np.asarray(manifold.posterior_mean(noisy[:g], args.denoise_noise)))
        den_labels.insert(-1, "Tweedie E[x0|x]")
    clean_range = tuple(np.percentile(np.asarray(x_test), [1, 99]))
    plots.image_grid(den_rows, den_labels, os.path.join(args.out, "denoising.png"),
                     title="denoising along grad log p(predicted class|x) (Tweedie step size)", value_range=clean_range)
    shown_obs = np.asarray(jnp.where(mask, jnp.asarray(clean_range[0]), x_test))[:g]
    inp_rows = [shown_obs] + [r for r, _ in figs["inp"]] + [np.asarray(x_test[:g])]
    inp_labels = ["observed (right half missing)"] + [lab for _, lab in figs["inp"]] + ["clean"]
    plots.image_grid(inp_rows, inp_labels, os.path.join(args.out, "inpainting.png"),
                     title="in-painting: only the missing half follows grad log p(y|x)", value_range=clean_range)

    columns = ["model", "method", "strength", "regime", "accuracy"] + sorted(
        {k for r in rows for k in r if k.startswith(("gen_", "den_", "inp_"))})
    io_lib.write_csv(os.path.join(args.out, "generate_results.csv"), rows, columns)
    print(format_table(rows))
    print(f"wrote {args.out}/generation.png, denoising.png, inpainting.png, generate_results.csv "
          f"in {time.perf_counter() - t0:.0f} s")
    return rows


def format_table(rows: list[dict]) -> str:
    """The printed table (columns missing for a dataset are left out)."""
    cols = [c for c in TABLE_COLUMNS if any(c[0] in r for r in rows)]
    head = "".join(f"{h:<18}" if k == "model" else f"{h:>{len(fmt.format(0.0)) if k != 'model' else 18}}"
                   for k, h, fmt in cols)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = []
        for k, _, fmt in cols:
            v = r.get(k)
            if k == "model":
                cells.append(fmt.format(str(v)[:18]))
            elif v is None:
                cells.append(" " * len(fmt.format(0.0)))
            else:
                cells.append(fmt.format(v))
        lines.append("".join(cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    for name in ("num_examples", "grid", "gen_steps", "denoise_steps", "inpaint_steps", "steps"):
        if getattr(args, name) <= 0:
            print(f"error: --{name.replace('_', '-')} must be a positive integer", file=sys.stderr)
            return 2
    from experiments.sweep_eps import start_compile_cache

    start_compile_cache(args)
    try:
        run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
