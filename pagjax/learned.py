"""Learned geometry of real images: tangent spaces and scores, learned once per output folder.

Real images (``dataset`` one of `pagjax.data.dataset_names()`) have no known manifold or
density, so the sweep learns both and caches them under ``<out>/learned/`` (`pagjax.cache`:
an entry per model, with the settings that made it and a digest):

* ``autoencoder``: an autoencoder (`pagjax.autoencoder`); the tangent space at an image is
  the column space of its decoder Jacobian (docs/theory.md §5), cached in
  ``tangent_basis.npz`` for the eval images.
* ``denoiser``: a class-conditional denoiser (`pagjax.scores`) with an extra "no label"
  class, trained on every image twice (once with its label, once with the null label), the
  classifier-free-guidance trick of Ho & Salimans 2022, so one network gives both
  grad log p_s(x|y) and grad log p_s(x) by Tweedie's formula; their difference is the
  learned Bayes gradient grad log p_s(y|x).
* or, with ``score_backend="score_model"``, the EDM score model (`pagjax.score_model`) in
  ``score_model/``, which also gives the paper protocol's unconditional score.

Trainings checkpoint into ``learned/training/<what>-<settings digest>`` (the score model's
into ``learned/score_model/training/``; `pagjax.cache.training_checkpointer`), so a killed
run resumes and a run with other settings starts afresh. Each model's key is the purpose
key (`pagjax.keys`) of its name under ``LearnedConfig.seed``.
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

import jax.numpy as jnp

from pagjax import cache as cache_lib
from pagjax import io as io_lib
from pagjax.keys import purpose_key
from pagjax.sweep_config import SweepConfig
from pagjax.sweep_data import SweepData

Log = Callable[[str], None]


def data_identity(config: SweepConfig, data: SweepData) -> dict:
    """What identifies the training images in a cached model's settings."""
    return {"dataset": config.dataset, "image_size": config.image_size, "data_seed": config.data_seed,
            "n_train": int(data.x_train.shape[0]), "n_test": int(data.x_test.shape[0])}


def autoencoder_settings(config: SweepConfig, data: SweepData) -> dict:
    lc = config.learned
    return {**data_identity(config, data), "latent": lc.ae_latent, "arch": lc.ae_arch, "hidden": list(lc.ae_hidden),
            "features": list(lc.ae_features), "upsample": lc.ae_upsample, "steps": lc.ae_steps, "lr": lc.ae_lr,
            "seed": lc.seed}


def autoencoder(config: SweepConfig, data: SweepData, root: str, log: Log = print, progress: bool = True):
    """The autoencoder of ``root/autoencoder``, trained when not cached with these settings."""
    from pagjax import autoencoder as ae_lib

    lc = config.learned
    settings = autoencoder_settings(config, data)

    def train():
        t = time.perf_counter()
        # said first: building a conv autoencoder compiles for seconds before its bar appears
        log(f"autoencoder: training {lc.ae_steps} steps ({lc.ae_arch}, {lc.ae_latent} latents) on "
            f"{data.x_train.shape[0]} images")
        with cache_lib.training_checkpointer(root, "autoencoder", settings, lc.ae_steps, log) as ckpt:
            ae = ae_lib.train_autoencoder(jnp.asarray(data.x_train), latent_dim=lc.ae_latent, steps=lc.ae_steps,
                                          key=purpose_key(lc.seed, "autoencoder"), learning_rate=lc.ae_lr,
                                          arch=lc.ae_arch, hidden=lc.ae_hidden, features=lc.ae_features,
                                          upsample=lc.ae_upsample, checkpointer=ckpt,
                                          checkpoint_every=config.checkpoint_every,
                                          checkpoint_seconds=config.checkpoint_seconds,
                                          progress="autoencoder" if progress else None)
        log(f"autoencoder: trained {lc.ae_steps} steps in {time.perf_counter() - t:.0f} s, "
            f"final mse {float(ae.losses[-1]):.4f}")
        return ae

    return cache_lib.cached(os.path.join(root, "autoencoder"), settings, train,
                            lambda ae, target: ae_lib.save_autoencoder(target, ae, extra=settings),
                            ae_lib.load_autoencoder, what="autoencoder", log=log)


def tangent_basis(config: SweepConfig, data: SweepData, ae, x_eval, root: str, log: Log = print):
    """The autoencoder's tangent bases at the eval images `x_eval` (`pagjax.geometry.TangentBasis`),
    cached in ``root/tangent_basis.npz``."""
    from pagjax import autoencoder as ae_lib
    from pagjax import geometry

    lc = config.learned
    n = int(x_eval.shape[0])

    def compute():
        t = time.perf_counter()
        tb = ae_lib.learned_tangent_basis(ae, x_eval, method=lc.basis_method, example_chunk=32)
        log(f"tangent basis: {n} eval images from the decoder Jacobian in {time.perf_counter() - t:.0f} s")
        return tb

    settings = {**autoencoder_settings(config, data), "num_eval": n, "method": lc.basis_method}
    return geometry.cached_tangent_basis(os.path.join(root, "tangent_basis.npz"), settings, compute, log=log)


def denoiser_maps(config: SweepConfig, data: SweepData, root: str, x_eval, y_eval, log: Log = print,
                  progress: bool = True) -> dict:
    """``score_maps`` (learned grad log p_s(x|y)) and ``learned_bayes_maps`` (learned
    grad log p_s(y|x)) of the eval images at the alignment noise level s, from the
    class-conditional denoiser of ``root/denoiser`` (trained when not cached)."""
    from pagjax import scores as scores_lib

    lc, s, k = config.learned, float(config.measure.align_noise), data.num_classes
    settings = {**data_identity(config, data), "noise": s, "arch": lc.den_arch, "width": lc.den_width,
                "depth": lc.den_depth, "steps": lc.den_steps, "lr": lc.den_lr, "seed": lc.seed}

    def train():
        t = time.perf_counter()
        log(f"denoiser: training {lc.den_steps} steps ({lc.den_arch}, width {lc.den_width}) at noise {s:g}")
        # every image twice: with its label and with the null label k (module docstring)
        x2 = jnp.concatenate([jnp.asarray(data.x_train)] * 2)
        y2 = jnp.concatenate([jnp.asarray(data.y_train, jnp.int32), jnp.full((data.x_train.shape[0],), k, jnp.int32)])
        with cache_lib.training_checkpointer(root, "denoiser", settings, lc.den_steps, log) as ckpt:
            den = scores_lib.train_denoiser(x2, y2, noise_levels=s, steps=lc.den_steps,
                                            key=purpose_key(lc.seed, "denoiser"), conditional=True,
                                            num_classes=k + 1, learning_rate=lc.den_lr, width=lc.den_width,
                                            depth=lc.den_depth, arch=lc.den_arch, checkpointer=ckpt,
                                            checkpoint_every=config.checkpoint_every,
                                            checkpoint_seconds=config.checkpoint_seconds,
                                            progress="denoiser" if progress else None)
        log(f"denoiser: trained {lc.den_steps} steps in {time.perf_counter() - t:.0f} s")
        return den

    den = cache_lib.cached(os.path.join(root, "denoiser"), settings, train,
                           lambda d, target: scores_lib.save_denoiser(target, d), scores_lib.load_denoiser,
                           what="denoiser", log=log)
    source = scores_lib.learned_score(den)
    class_score = scores_lib.compute_scores(source, x_eval, y_eval, noise_level=s, chunk_size=64)
    uncond = scores_lib.compute_scores(source, x_eval, jnp.full_like(y_eval, k), noise_level=s, chunk_size=64)
    return {"score_maps": class_score, "learned_bayes_maps": class_score - uncond}


def score_model_maps(config: SweepConfig, data: SweepData, root: str, x_eval, y_eval, log: Log = print,
                     progress: bool = True) -> dict:
    """The eval images' score maps from the EDM score model of ``root/score_model``
    (`pagjax.score_model.reference_maps`), its learned Bayes gradient as ``sm_bayes`` says."""
    from pagjax import score_model as sm_lib

    lc = config.learned
    smc = sm_lib.ScoreModelConfig(channels=tuple(lc.sm_channels), steps=lc.sm_steps, num_classes=data.num_classes)
    model = sm_lib.cached_score_model(os.path.join(root, "score_model"), jnp.asarray(data.x_train),
                                      jnp.asarray(data.y_train), smc, purpose_key(lc.seed, "score model"),
                                      {**data_identity(config, data), "seed": lc.seed}, log=log,
                                      checkpoint_every=config.checkpoint_every,
                                      checkpoint_seconds=config.checkpoint_seconds,
                                      progress="score model" if progress else None)
    denoising_quality(config, data, root, model, log)
    maps = sm_lib.reference_maps(model, x_eval, y_eval, align_noise=config.measure.align_noise,
                                 paper_noise=config.measure.paper_noise)
    if lc.sm_bayes == "classifier":
        maps["learned_bayes_maps"] = classifier_bayes_maps(config, data, root, smc, x_eval, y_eval, log, progress)
    return maps


def denoising_quality(config: SweepConfig, data: SweepData, root: str, model, log: Log = print,
                      num_images: int = 512) -> list[dict]:
    """How well the score model denoises the test images: per-pixel MSE at sigma 0.1, 0.3, 0.5
    and 1 beside the noisy input's and the Wiener filter's (the best linear denoiser, closed
    form in the training set's PCA basis), logged as a table and cached in
    ``root/score_model_denoising.json``: the instrument's quality, stated with its numbers."""
    from pagjax import score_model as sm_lib

    n = min(num_images, int(data.x_test.shape[0]))
    settings = {**data_identity(config, data), "seed": config.learned.seed, "num_images": n,
                "model": dataclasses.asdict(model.config)}

    def compute():
        wiener = sm_lib.fit_wiener(jnp.asarray(data.x_train))
        y = jnp.asarray(data.y_test[:n]) if model.config.num_classes else None
        return sm_lib.denoising_report(model, jnp.asarray(data.x_test[:n]), y,
                                       purpose_key(config.learned.seed, "denoising report"), wiener=wiener)

    rows = cache_lib.cached(os.path.join(root, "score_model_denoising.json"), settings, compute,
                            lambda rows, target: io_lib.write_json(target, rows), io_lib.read_json,
                            what="score model denoising report", log=log)
    log(f"score model: denoising MSE on {n} test images (ratio_to_wiener < 1: better than the best linear "
        f"denoiser)\n{sm_lib.format_report(rows)}")
    return rows


def classifier_bayes_maps(config: SweepConfig, data: SweepData, root: str, smc, x_eval, y_eval, log: Log = print,
                          progress: bool = True):
    """The learned Bayes gradient grad log p_s(y|x) of the eval images from a noise-conditional
    classifier (`pagjax.score_model.train_noise_classifier`), cached as maps in
    ``root/classifier_bayes_maps.npy``: a rerun neither trains nor loads the classifier."""
    import numpy as np

    from pagjax import score_model as sm_lib

    lc, s = config.learned, float(config.measure.align_noise)
    settings = {**data_identity(config, data), "seed": lc.seed, "config": dataclasses.asdict(smc), "noise": s,
                "num_eval": int(x_eval.shape[0])}

    def compute():
        t = time.perf_counter()
        log(f"noise classifier: training {smc.steps} steps for the learned Bayes gradient")
        clf = sm_lib.train_noise_classifier(jnp.asarray(data.x_train), jnp.asarray(data.y_train), data.num_classes,
                                            smc, purpose_key(lc.seed, "noise classifier"),
                                            progress="noise classifier" if progress else None)
        maps = np.asarray(sm_lib.classifier_bayes_gradient(clf, x_eval, s, y_eval))
        log(f"noise classifier: trained and applied in {time.perf_counter() - t:.0f} s")
        return maps

    def save(maps, target):
        with open(target, "wb") as f:  # written where the cache says, under exactly that name
            np.save(f, maps)

    return jnp.asarray(cache_lib.cached(os.path.join(root, "classifier_bayes_maps.npy"), settings, compute, save,
                                        np.load, what="learned Bayes maps", log=log))


def learned_geometry(config: SweepConfig, data: SweepData, out_dir: str, log: Log = print,
                     progress: bool = True) -> dict:
    """Learned tangent bases and score maps of the first ``num_eval`` test images, as keyword
    arguments of `pagjax.measure.prepare_eval_set`: ``basis`` (n, d, k), ``score_maps``
    (learned grad log p_s(x|y)) and ``learned_bayes_maps`` (learned grad log p_s(y|x)) at the
    alignment noise level s, and with the score model ``paper_score_maps``."""
    root = os.path.join(out_dir, "learned")
    n = min(config.measure.num_eval, data.x_test.shape[0])
    x_eval, y_eval = jnp.asarray(data.x_test[:n]), jnp.asarray(data.y_test[:n])
    ae = autoencoder(config, data, root, log, progress)
    tb = tangent_basis(config, data, ae, x_eval, root, log)
    maps = score_model_maps if config.learned.score_backend == "score_model" else denoiser_maps
    return {"basis": tb.basis, **maps(config, data, root, x_eval, y_eval, log, progress)}
