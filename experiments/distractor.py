"""The signal/distractor experiment: robust models ignore the task-irrelevant half.

    python -m experiments.distractor                       # offline digits, a few minutes on 2 CPU cores
    python -m experiments.distractor --dataset mnist --data-dir ~/tensorflow_datasets --model cnn --steps 3000

Builds two-slot canvases (a digit in one half, a rendered letter in the other, position
random, label from the digit), trains a standard model, an L2-PGD model and a noise-
augmented model, then adds Gaussian noise of each level (log range) to the signal half
only or the distractor half only and records the softmax change. Writes to --out:
``results.csv`` (model, level, signal_change, distractor_change, ratio), ``summary.json``
(accuracy, gradient signal fraction, mean ratio per model), ``ratio.png`` (ratio vs noise
level, and both changes) and ``examples.png`` (canvases and input-gradients).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/distractor", help="output folder")
    p.add_argument("--dataset", default="digits", help="digits (offline, 8x8 -> 16x8 canvas), mnist or fashion_mnist (56x28)")
    p.add_argument("--data-dir", default=None, help="tensorflow-datasets data directory (mnist)")
    p.add_argument("--download", action="store_true", help="download mnist if not prepared (needs network)")
    p.add_argument("--n-train", type=int, default=20000, help="training canvases (at most the dataset's size)")
    p.add_argument("--n-test", type=int, default=512, help="test canvases measured")
    p.add_argument("--model", default="mlp:width=256", help="model name (pagjax.models)")
    p.add_argument("--steps", type=int, default=1500, help="training steps per model")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    p.add_argument("--pgd-eps", type=float, default=1.0, help="L2 radius of the PGD model")
    p.add_argument("--pgd-steps", type=int, default=5)
    p.add_argument("--noise-s", type=float, default=0.5, help="noise level of the noise-augmented model")
    p.add_argument("--levels", default="0.01,10,10", help="LOW,HIGH,N: log-spaced noise levels (paper: logspace(-2, 1))")
    p.add_argument("--draws", type=int, default=2, help="noise draws per image and level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    from experiments.sweep_eps import add_compile_cache_flags

    add_compile_cache_flags(p)
    return p.parse_args(argv)


def load_digits_source(args):
    """(x_train, y_train, x_test, y_test) of the signal images."""
    from pagjax import data

    if args.dataset == "digits":
        d = data.digits(seed=args.seed)
    else:
        d = data.load_splits(args.dataset, n_train=args.n_train, n_test=args.n_test, data_dir=args.data_dir,
                             download=args.download, seed=args.seed)
    return d.x_train, d.y_train, d.x_test, d.y_test


def run(args, log=print) -> dict:
    """Train the three models, measure, write outputs; returns the summary."""
    import jax
    import jax.numpy as jnp

    from pagjax import distractor, gradients, io as io_lib, models, plots, training
    import os

    t0 = time.perf_counter()
    lo, hi, n = args.levels.split(",")
    levels = np.logspace(np.log10(float(lo)), np.log10(float(hi)), int(n))
    xtr, ytr, xte, yte = load_digits_source(args)
    # the 1500 training digits are reused with fresh letters and positions for each canvas
    reps = max(1, -(-args.n_train // xtr.shape[0]))
    idx = np.arange(reps * xtr.shape[0])[: max(args.n_train, args.batch_size)] % xtr.shape[0]
    train = distractor.make_distractor_dataset(xtr[idx], ytr[idx], seed=args.seed + 1)
    test = distractor.make_distractor_dataset(xte[: args.n_test], yte[: args.n_test], seed=args.seed + 2)
    specs = [("standard", "ce", 0.0), (f"pgd eps={args.pgd_eps:g}", "pgd", args.pgd_eps),
             (f"noise s={args.noise_s:g}", "noise", args.noise_s)]
    model = models.build_model(args.model, 10)
    rows, summary, grads_img = [], [], []
    for name, method, strength in specs:
        cfg = training.TrainConfig(model=args.model, method=method, strength=strength, steps=args.steps,
                                   batch_size=args.batch_size, seed=args.seed, pgd_steps=args.pgd_steps,
                                   optimizer=training.OptimizerConfig(name="adam", learning_rate=args.lr))
        res = training.train(cfg, train.x, train.y, num_classes=10, progress=not args.no_progress)
        v = res.variables
        x, y = jnp.asarray(test.x), jnp.asarray(test.y)
        acc = float(jnp.mean(jnp.argmax(model.apply(v, x), -1) == y))
        sens = distractor.noise_sensitivity(model.apply, v, x, test.signal_slot, levels, jax.random.key(args.seed + 7),
                                            num_draws=args.draws)
        g = gradients.input_gradients(model.apply, v, x, y, target="logprob")
        frac = float(jnp.mean(distractor.gradient_signal_fraction(g, test.signal_slot)))
        grads_img.append(np.asarray(g[:6]))
        for i, s in enumerate(levels):
            rows.append({"model": name, "level": float(s), "signal_change": float(sens["signal_change"][i]),
                         "distractor_change": float(sens["distractor_change"][i]), "ratio": float(sens["ratio"][i])})
        valid = sens["distractor_change"] > 1e-3  # ratios of changes too small to measure are left out
        summary.append({"model": name, "method": method, "strength": strength, "accuracy": acc,
                        "gradient_signal_fraction": frac, "mean_ratio": float(np.mean(sens["ratio"][valid])) if valid.any() else None,
                        "max_ratio": float(np.max(sens["ratio"][valid])) if valid.any() else None, "diverged": res.diverged})
        log(f"{name:<14} accuracy {acc:.3f}  gradient signal fraction {frac:.3f}  "
            f"ratio signal/distractor: mean {summary[-1]['mean_ratio']:.2f}, max {summary[-1]['max_ratio']:.2f}")
    os.makedirs(args.out, exist_ok=True)
    io_lib.write_csv(os.path.join(args.out, "results.csv"), rows, ["model", "level", "signal_change", "distractor_change", "ratio"])
    io_lib.write_json(os.path.join(args.out, "summary.json"),
                      {"settings": vars(args), "levels": levels.tolist(), "models": summary})
    _plot(rows, [s["model"] for s in summary], os.path.join(args.out, "ratio.png"))
    plots.gradient_grid([test.x[:6]] + grads_img, ["canvas"] + [s["model"] for s in summary],
                        os.path.join(args.out, "examples.png"), title="canvases and input-gradients of log p(y|x)")
    log(f"wrote {args.out}/results.csv, summary.json, ratio.png, examples.png in {time.perf_counter() - t0:.0f} s")
    return {"levels": levels.tolist(), "models": summary}


def _plot(rows, names, path):
    from matplotlib.figure import Figure

    from pagjax import plots

    fig = Figure(figsize=(9, 3.4))
    a, b = fig.subplots(1, 2)
    for name in names:
        r = [x for x in rows if x["model"] == name]
        lv = [x["level"] for x in r]
        a.plot(lv, [x["ratio"] for x in r], "o-", label=name)
        line, = b.plot(lv, [x["signal_change"] for x in r], "o-", label=f"{name}: signal")
        b.plot(lv, [x["distractor_change"] for x in r], "x--", color=line.get_color(), label=f"{name}: distractor")
    a.axhline(1.0, color="grey", lw=0.8)
    for ax in (a, b):
        ax.set_xscale("log")
        ax.set_xlabel("noise level s")
        ax.grid(alpha=0.3)
    a.set_yscale("log")
    a.set_ylabel("softmax change: signal / distractor")
    b.set_ylabel("softmax change (L1)")
    a.legend(fontsize=7)
    b.legend(fontsize=6)
    fig.tight_layout()
    plots._save(fig, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dataset not in ("digits", "mnist", "fashion_mnist"):
        print(f"error: unknown dataset {args.dataset!r}; expected digits, mnist or fashion_mnist", file=sys.stderr)
        return 2
    from experiments.sweep_eps import start_compile_cache

    start_compile_cache(args)
    try:
        run(args)
    except ValueError as e:  # includes DatasetUnavailableError
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
