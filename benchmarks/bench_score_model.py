"""Benchmark-style report of the score model (`pagjax.score_model`).

* ``manifolds``: train the score model (MLP backbone, class-conditional with the "no label"
  class) on samples of the built-in known manifolds and compare with the exact scores on
  held-out noisy points x0 + s n: cosine of the unconditional score and of the
  class-conditional score at s = 0.3 and 0.5, and of the learned Bayes gradient
  (class score - unconditional score) at s = 0.3, and of the direct estimate of it, the
  input-gradient of a noise-conditional classifier trained on the same noisy samples.
* ``denoise``: train the score model (U-Net) on a real image dataset and report the
  denoising MSE at sigma in {0.1, 0.3, 0.5, 1} beside the noisy input's and the Wiener
  filter's (best linear denoiser, closed form in the training set's PCA basis).

    python -m benchmarks.bench_score_model manifolds [--steps N] [--json PATH]
    python -m benchmarks.bench_score_model denoise --dataset mnist --data-dir DIR [--steps N] [--ckpt DIR]

Prints tables and writes JSON (default ``benchmarks/results/score_model_<mode>.json``).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from pagjax import io as io_lib
from pagjax import score_model as sm

MANIFOLDS = ("linear_default", "curved_default")
COSINE_SIGMAS = (0.3, 0.5)
BAYES_SIGMA = 0.3


def manifold_cosines(name: str, config: sm.ScoreModelConfig, *, n_train: int = 8192, n_eval: int = 512,
                     seed: int = 0, progress=None) -> dict:
    """Train on ``n_train`` samples of manifold ``name``; mean cosines with the exact scores."""
    from pagjax.manifolds import build_manifold, make_dataset

    m = build_manifold(name)
    d = make_dataset(m, jax.random.key(seed), n_train, n_eval)
    cfg = dataclasses.replace(config, num_classes=int(m.num_classes))
    t = time.perf_counter()
    model, res = sm.train_score_model(d.x_train, d.y_train, cfg, jax.random.key(seed + 1), progress=progress)
    jax.block_until_ready(model.params)
    out = {"manifold": name, "train_seconds": time.perf_counter() - t, "steps": cfg.steps,
           "final_loss": float(res.history["loss"][-1])}
    t = time.perf_counter()
    clf = sm.train_noise_classifier(d.x_train, d.y_train, int(m.num_classes), cfg, jax.random.key(seed + 2))
    jax.block_until_ready(clf.params)
    out["classifier_train_seconds"] = time.perf_counter() - t
    x0, y = d.x_test, d.y_test
    for i, s in enumerate(sorted(set(COSINE_SIGMAS) | {BAYES_SIGMA})):
        x = x0 + s * jax.random.normal(jax.random.key(1000 + i), x0.shape)
        if s in COSINE_SIGMAS:
            out[f"cos_score_s{s:g}"] = float(jnp.mean(sm.cosine(sm.score(model, x, s), m.score(x, s))))
            out[f"cos_class_score_s{s:g}"] = float(jnp.mean(sm.cosine(sm.score(model, x, s, y), m.class_score(x, y, s))))
        if s == BAYES_SIGMA:
            out[f"cos_bayes_s{s:g}"] = float(jnp.mean(sm.cosine(sm.bayes_gradient(model, x, s, y),
                                                                 m.bayes_gradient(x, y, s))))
            # the direct estimate: gradient of a noise-conditional classifier on the same noisy samples
            out[f"cos_bayes_classifier_s{s:g}"] = float(jnp.mean(sm.cosine(
                sm.classifier_bayes_gradient(clf, x, s, y), m.bayes_gradient(x, y, s))))
    return out


def run_manifolds(config: sm.ScoreModelConfig, names=MANIFOLDS, **kw) -> dict:
    rows = [manifold_cosines(n, config, **kw) for n in names]
    return {"config": dataclasses.asdict(config), "rows": rows, "machine": common.machine_description()}


def run_denoise(dataset: str, data_dir: str | None, config: sm.ScoreModelConfig, *, n_train: int, n_test: int,
                ckpt: str | None = None, seed: int = 0) -> dict:
    from pagjax import data as data_lib

    sp = data_lib.load_splits(dataset, n_train=n_train, n_test=n_test, data_dir=data_dir)
    cfg = dataclasses.replace(config, num_classes=int(sp.num_classes))
    ckptr = io_lib.Checkpointer(ckpt) if ckpt else None
    t = time.perf_counter()
    try:
        model, res = sm.train_score_model(sp.x_train, sp.y_train, cfg, jax.random.key(seed), checkpointer=ckptr,
                                          checkpoint_every=100 if ckptr else None)
        jax.block_until_ready(model.params)
    finally:
        if ckptr is not None:
            ckptr.close()
    secs = time.perf_counter() - t
    wiener = sm.fit_wiener(sp.x_train)
    rows = sm.denoising_report(model, sp.x_test, sp.y_test, jax.random.key(seed + 7), wiener=wiener)
    return {"dataset": dataset, "n_train": n_train, "n_test": n_test, "config": dataclasses.asdict(cfg),
            "train_seconds_this_call": secs, "resumed_from": int(res.start_step),
            "final_loss": float(res.history["loss"][-1]) if len(res.history["loss"]) else None,
            "rows": rows, "machine": common.machine_description()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("manifolds", "denoise"))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--channels", type=str, default=None, help="U-Net channels, e.g. 32,64")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--n-train", type=int, default=10000)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--ckpt", default=None, help="checkpoint directory (resumed from)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.mode == "manifolds":
        cfg = sm.ScoreModelConfig(arch="mlp", steps=a.steps or 3000, batch_size=a.batch_size or 256)
        out = run_manifolds(cfg)
        for r in out["rows"]:
            print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    else:
        cfg = sm.ScoreModelConfig(arch="unet", steps=a.steps or 2000, batch_size=a.batch_size or 64)
        if a.channels:
            cfg = dataclasses.replace(cfg, channels=tuple(int(c) for c in a.channels.split(",")))
        out = run_denoise(a.dataset, a.data_dir, cfg, n_train=a.n_train, n_test=a.n_test, ckpt=a.ckpt)
        print(f"{a.dataset}: trained {cfg.steps} steps ({out['train_seconds_this_call']:.0f} s this call)")
        print(sm.format_report(out["rows"]))
    path = a.json or os.path.join(common.RESULTS_DIR, f"score_model_{a.mode}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    io_lib.write_json(path, out)
    return out


if __name__ == "__main__":
    main()
