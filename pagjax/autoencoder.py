"""A Flax autoencoder whose decoder Jacobian gives the tangent space of real images.

The paper (Srinivas, Bordt & Lakkaraju, NeurIPS 2023, section 3) estimates the tangent
space of CIFAR-10 at an image x from a 128-latent autoencoder: the column space of the
decoder's Jacobian at the encoder's code of x. This module provides

* `Autoencoder`: linen module, MLP or convolutional, configurable latent size; a
  deterministic encoder, so its output *is* the mean code;
* `train_autoencoder`: Adam on the MSE, trained by the one engine (`pagjax.engine`);
* `save_autoencoder` / `load_autoencoder`: orbax checkpoint of the parameters plus a JSON
  record of the architecture and training settings;
* `learned_tangent_basis`: orthonormalised decoder Jacobian (forward-mode, one JVP per
  latent direction, batched) at the codes of a batch of images.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from pagjax import io as io_lib
from pagjax import engine, geometry, validation

Array = jax.Array
ARCHS = ("mlp", "conv")
# How the conv decoder doubles the resolution at each stage. "transpose": a stride-2
# transposed convolution (the default, and what checkpoints saved without the field hold).
# "nearest"/"bilinear": a 2x resize, then a 3x3 convolution with the same parameters. On
# XLA:CPU a training step dispatched from Python is about 6x faster with resize + conv
# (the transposed convolution is a convolution of a 2x-dilated input, which XLA:CPU runs
# slowly), but inside a `lax.scan` training loop it was slower (docs/benchmarks.md,
# benchmarks/bench_engine.py): choose "nearest" where the steps are looped on the host.
UPSAMPLES = ("transpose", "nearest", "bilinear")


class Encoder(nn.Module):
    """Image (n, ...) -> code (n, latent_dim)."""

    latent_dim: int
    arch: str = "mlp"
    hidden: tuple[int, ...] = (256,)
    features: tuple[int, ...] = (32, 64)

    @nn.compact
    def __call__(self, x):
        n = x.shape[0]
        if self.arch == "conv":
            h = x
            for f in self.features:
                h = nn.gelu(nn.Conv(f, (3, 3), strides=(2, 2))(h))
            h = h.reshape((n, -1))
        else:
            h = x.reshape((n, -1))
            for width in self.hidden:
                h = nn.gelu(nn.Dense(width)(h))
        return nn.Dense(self.latent_dim)(h)


class Decoder(nn.Module):
    """Code (n, latent_dim) -> image (n, *image_shape). Smooth (GELU) so its Jacobian is."""

    image_shape: tuple[int, ...]
    arch: str = "mlp"
    hidden: tuple[int, ...] = (256,)
    features: tuple[int, ...] = (32, 64)
    upsample: str = "transpose"

    @nn.compact
    def __call__(self, z):
        n = z.shape[0]
        if self.arch == "conv":
            hgt, wid, ch = self.image_shape
            s = 2 ** len(self.features)
            h = nn.gelu(nn.Dense((hgt // s) * (wid // s) * self.features[-1])(z))
            h = h.reshape((n, hgt // s, wid // s, self.features[-1]))
            for f in reversed(self.features):
                if self.upsample == "transpose":
                    h = nn.ConvTranspose(f, (3, 3), strides=(2, 2))(h)
                else:
                    b, hh, ww, c = h.shape
                    h = nn.Conv(f, (3, 3))(jax.image.resize(h, (b, 2 * hh, 2 * ww, c), self.upsample))
                h = nn.gelu(h)
            return nn.Conv(ch, (3, 3))(h)
        h = z
        for width in reversed(self.hidden):
            h = nn.gelu(nn.Dense(width)(h))
        h = nn.Dense(math.prod(self.image_shape))(h)
        return h.reshape((n,) + tuple(self.image_shape))


class Autoencoder(nn.Module):
    """Deterministic autoencoder; ``apply(params, x)`` reconstructs, methods encode/decode.

    Attributes:
      image_shape: shape of one example, e.g. (32, 32, 3) or (d,) (``"mlp"`` only).
      latent_dim: code size (the paper: 128 on CIFAR-10).
      arch: ``"mlp"`` or ``"conv"`` (NHWC with H, W divisible by 2**len(features)).
      hidden: MLP widths; features: conv channels per stride-2 stage.
      upsample: the conv decoder's 2x upsampling, one of `UPSAMPLES` (see there).
    """

    image_shape: tuple[int, ...]
    latent_dim: int = 128
    arch: str = "mlp"
    hidden: tuple[int, ...] = (256,)
    features: tuple[int, ...] = (32, 64)
    upsample: str = "transpose"

    def setup(self):
        self.encoder = Encoder(self.latent_dim, self.arch, self.hidden, self.features)
        self.decoder = Decoder(tuple(self.image_shape), self.arch, self.hidden, self.features, self.upsample)

    def encode(self, x):
        """Code of each example (n, latent_dim)."""
        return self.encoder(x)

    def decode(self, z):
        """Reconstruction (n, *image_shape) from codes (n, latent_dim)."""
        return self.decoder(z)

    def __call__(self, x):
        return self.decode(self.encode(x))


class TrainedAutoencoder(NamedTuple):
    """A model definition with its parameters and its training curve."""

    model: Autoencoder
    params: Any
    losses: Array  # the training loss at the end of each logged chunk (see ``steps_logged``)
    steps_logged: Any = None  # the step of each entry of ``losses``


def _check_model_config(image_shape, latent_dim, arch, features, upsample="transpose"):
    validation.check_positive_int("latent_dim", latent_dim)
    validation.check_choice("arch", arch, ARCHS)
    validation.check_choice("upsample", upsample, UPSAMPLES)
    if arch == "conv":
        if len(image_shape) != 3:
            raise ValueError(f"arch='conv' needs NHWC images, got example shape {tuple(image_shape)}")
        s = 2 ** len(features)
        if image_shape[0] % s or image_shape[1] % s:
            raise ValueError(
                f"arch='conv' with {len(features)} stride-2 stages needs H and W divisible by {s}, "
                f"got {tuple(image_shape)}"
            )


def make_autoencoder(image_shape: Sequence[int], latent_dim: int, *, arch: str = "mlp",
                     hidden: Sequence[int] = (256,), features: Sequence[int] = (32, 64),
                     upsample: str = "transpose") -> Autoencoder:
    """An `Autoencoder` for examples of ``image_shape``, with argument checks."""
    _check_model_config(tuple(image_shape), latent_dim, arch, tuple(features), upsample)
    return Autoencoder(tuple(int(s) for s in image_shape), int(latent_dim), arch,
                       tuple(int(h) for h in hidden), tuple(int(f) for f in features), upsample)


def train_autoencoder(
    x_train: Array,
    *,
    latent_dim: int,
    steps: int,
    key: Array,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    arch: str = "mlp",
    hidden: Sequence[int] = (256,),
    features: Sequence[int] = (32, 64),
    upsample: str = "transpose",
    log_every: int = 50,
    checkpointer=None,
    checkpoint_every: int | None = None,
    checkpoint_seconds: float | None = None,
    progress: str | None = None,
) -> TrainedAutoencoder:
    """Train an autoencoder on ``x_train`` (N, ...) by Adam on the mean squared error.

    Training runs on the project's one engine (`pagjax.engine.train_loop`): epochs of
    shuffled minibatches, the step loop chosen per backend, optional orbax checkpoints
    (a rerun with the same ``checkpointer`` resumes) and a progress bar.

    Args:
      x_train: (N, ...) float examples.
      latent_dim, arch, hidden, features, upsample: the architecture (`make_autoencoder`).
      steps, batch_size, learning_rate: the optimisation.
      key: PRNG key (initialisation and batch order).
      log_every: steps between entries of the returned loss curve.
      checkpointer, checkpoint_every, checkpoint_seconds: a `pagjax.io.Checkpointer` and its
        interval in steps or seconds (`pagjax.engine.train_loop`).
      progress: a progress-bar title, or None for none.

    Returns:
      a `TrainedAutoencoder` (model, params, losses every ``log_every`` steps).
    """
    validation.check_images("x_train", x_train, ranks=(2, 3, 4))
    validation.check_positive_int("steps", steps)
    validation.check_positive_int("batch_size", batch_size)
    validation.check_positive("learning_rate", learning_rate)
    model = make_autoencoder(x_train.shape[1:], latent_dim, arch=arch, hidden=hidden, features=features,
                             upsample=upsample)
    init_key, data_key = jax.random.split(key)
    params = model.init(init_key, x_train[:1])
    tx = optax.adam(learning_rate)

    def step_fn(state, batch):
        p, opt = state

        def loss_fn(p):
            return jnp.mean(jnp.square(model.apply(p, batch) - batch))

        loss, g = jax.value_and_grad(loss_fn)(p)
        updates, new_opt = tx.update(g, opt, p)
        finite = jnp.isfinite(loss) & engine.all_finite(g)
        new = engine.skip_nonfinite((optax.apply_updates(p, updates), new_opt), state, finite)
        return new, {"loss": loss, "finite": finite}

    result = engine.train_loop(step_fn, (params, tx.init(params)), jnp.asarray(x_train), data_key, steps=steps,
                               batch_size=min(batch_size, x_train.shape[0]), steps_per_call=log_every,
                               checkpointer=checkpointer, checkpoint_every=checkpoint_every,
                               checkpoint_seconds=checkpoint_seconds, progress=progress)
    hist = result.history
    return TrainedAutoencoder(model, result.state[0], jnp.asarray(hist.get("loss", np.zeros(0))),
                              np.asarray(hist["step"]))


# --------------------------------------------------------------------------- tangent spaces


def encode(ae: TrainedAutoencoder, x: Array) -> Array:
    """Codes of a batch under a trained autoencoder."""
    return ae.model.apply(ae.params, x, method=Autoencoder.encode)


def decode(ae: TrainedAutoencoder, z: Array) -> Array:
    """Decoded images of a batch of codes."""
    return ae.model.apply(ae.params, z, method=Autoencoder.decode)


def learned_tangent_basis(ae_params, x: Array, *, model: Autoencoder | None = None,
                          rank_tol: float = 1e-6, method: str = "svd",
                          direction_chunk: int | None = None,
                          example_chunk: int | None = None) -> geometry.TangentBasis:
    """Tangent bases of real images: orthonormalised decoder Jacobians at their codes.

    Args:
      ae_params: a `TrainedAutoencoder`, or raw parameters together with ``model``.
      x: images (n, ...) of the autoencoder's example shape.
      model: the `Autoencoder` definition when ``ae_params`` are raw parameters.
      rank_tol: relative singular-value threshold for the reported rank.
      method: ``"svd"``, ``"gram"`` or ``"cholesky"`` (much faster for d >> latent_dim),
        see `geometry.orthonormalize`.
      direction_chunk, example_chunk: JVP chunking, see `geometry.generator_jacobian`.

    Returns:
      `geometry.TangentBasis`: basis (n, d, latent_dim) (for latent_dim <= d), rank (n,).
    """
    if isinstance(ae_params, TrainedAutoencoder):
        model, params = ae_params.model, ae_params.params
    else:
        params = ae_params
        if model is None:
            raise ValueError("model is required when ae_params are raw parameters (not a TrainedAutoencoder)")
    validation.check_images("x", x, ranks=(2, 3, 4))
    if tuple(x.shape[1:]) != tuple(model.image_shape):
        raise ValueError(f"x must have example shape {tuple(model.image_shape)}, got {tuple(x.shape[1:])}")
    validation.check_positive("rank_tol", rank_tol)
    validation.check_choice("method", method, geometry.ORTHO_METHODS)
    return _learned_basis(model, params, x, rank_tol, method, direction_chunk, example_chunk)


@partial(jax.jit, static_argnums=(0, 3, 4, 5, 6))
def _learned_basis(model, params, x, rank_tol, method, direction_chunk, example_chunk):
    z = model.apply(params, x, method=Autoencoder.encode)
    gen = lambda zz: model.apply(params, zz, method=Autoencoder.decode)  # noqa: E731
    rows = geometry._jacobian_rows(gen, z, direction_chunk, example_chunk)
    return geometry._orthonormalize_rows(rows, rank_tol, method)


# --------------------------------------------------------------------------- checkpoints


def _config(model: Autoencoder) -> dict:
    return {"image_shape": list(model.image_shape), "latent_dim": model.latent_dim, "arch": model.arch,
            "hidden": list(model.hidden), "features": list(model.features), "upsample": model.upsample}


def save_autoencoder(path: str, ae: TrainedAutoencoder, *, extra: dict | None = None) -> None:
    """Save ``ae`` to directory ``path``: orbax checkpoint ``params/`` + ``config.json``.

    ``extra`` (JSON-serialisable) is stored in the config record, e.g. the data set and
    training settings. An existing checkpoint at ``path`` is overwritten.
    """
    record = {"model": _config(ae.model), "final_loss": float(ae.losses[-1]) if len(ae.losses) else None,
              "steps": int(ae.steps_logged[-1]) if ae.steps_logged is not None and len(ae.steps_logged) else 0,
              "extra": extra or {}}
    io_lib.save_checkpoint_dir(path, "params", ae.params, record)


def load_autoencoder(path: str) -> TrainedAutoencoder:
    """Load an autoencoder saved by `save_autoencoder` (losses are not stored: empty)."""
    cfg = io_lib.read_checkpoint_config(path, "autoencoder")["model"]
    model = make_autoencoder(cfg["image_shape"], cfg["latent_dim"], arch=cfg["arch"],
                             hidden=cfg["hidden"], features=cfg["features"],
                             upsample=cfg.get("upsample", "transpose"))
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                              jnp.zeros((1,) + tuple(cfg["image_shape"]), jnp.float32))
    params = io_lib.restore_checkpoint_dir(path, "params", abstract)
    return TrainedAutoencoder(model, params, jnp.zeros((0,), jnp.float32))
