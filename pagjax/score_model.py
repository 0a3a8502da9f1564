"""A denoising score model for images and known-manifold data, trained the EDM way.

One network D(x, sigma, y) gives both the unconditional and the class-conditional score:

* **Preconditioning** (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
  Generative Models", Table 1, "EDM" column), around the per-pixel data mean mu::

      D(x, sigma, y) = mu + c_skip (x - mu) + c_out F(c_in (x - mu), c_noise, y)
      c_skip = sigma_d^2 / (sigma^2 + sigma_d^2)      c_out = sigma sigma_d / sqrt(sigma^2 + sigma_d^2)
      c_in   = 1 / sqrt(sigma^2 + sigma_d^2)          c_noise = ln(sigma) / 4

  (subtracting mu is an invertible shift of the data, so it changes nothing about the
  optimum; it makes sigma_d the spread the network actually has to explain).
* **Loss**: denoising score matching over a continuum of noise levels,
  E lambda(sigma) ||D(x0 + sigma n, sigma, y) - x0||^2 with lambda(sigma) =
  (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 and ln sigma ~ N(P_mean, P_std^2) (EDM §5).
  With this weight the network's effective target has unit variance at every sigma.
* **Labels**: ``num_classes + 1`` class embeddings, the last one the learned "no label"
  class; during training a fraction ``label_dropout`` of the labels is replaced by it, so
  D(x, sigma, null) is the unconditional denoiser and D(x, sigma, y) the class-conditional one.
* **Tweedie**: the minimiser is E[x0 | x], and grad_x log p_sigma(x[|y]) =
  (E[x0 | x[, y]] - x) / sigma^2 ~ (D(x, sigma[, y]) - x) / sigma^2.
* Adam (warm-up + cosine decay, gradient clipping) with an exponential moving average of
  the weights (the EMA weights are what the model evaluates with), trained through the
  project's one engine `pagjax.engine.train_loop` (checkpoints, resume, progress).

Backbones: ``arch="unet"`` (images: residual blocks with GroupNorm, SiLU and FiLM noise/class
conditioning, resolutions halved per level, e.g. 28 -> 14 -> 7 or 16 -> 8 -> 4) or
``arch="mlp"`` (flattened vectors, `pagjax.scores.DenoiserNet`'s residual MLP with a
full-rank linear path; for the known manifolds).

Also here: the best linear denoiser (Wiener filter in the training set's PCA basis) and a
denoising-quality report comparing both at several noise levels.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from pagjax import chunks, engine, models
from pagjax import scores as scores_lib
from pagjax import validation
from pagjax.static import Static

Array = jax.Array
ARCHS = ("unet", "mlp")
REPORT_SIGMAS = (0.1, 0.3, 0.5, 1.0)


# --------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class ScoreModelConfig:
    """Network, noise distribution and optimisation of a score model.

    Attributes:
      arch: ``"unet"`` (images) or ``"mlp"`` (vectors / small images).
      channels: U-Net channels per resolution level (one halving between levels).
      blocks: residual blocks per level (down path; the up path has the same number).
      emb_dim: width of the noise (+ class) embedding.
      mlp_width, mlp_depth: the MLP backbone's width and residual blocks.
      num_classes: C > 0 adds C + 1 class embeddings (the last: "no label"); 0: unconditional.
      label_dropout: fraction of training labels replaced by "no label".
      p_mean, p_std: ln sigma ~ N(p_mean, p_std^2) during training (EDM: -1.2, 1.2).
      sigma_data: the data's spread around its mean (None: estimated from the training set).
      steps, batch_size, learning_rate, warmup_steps, grad_clip: optimisation.
      ema_decay: decay of the EMA weights (ramped up as (1 + t) / (10 + t) early on, so a
        short run is not dominated by the initial weights).
    """

    arch: str = "unet"
    channels: tuple[int, ...] = (32, 64)
    blocks: int = 1
    emb_dim: int = 128
    mlp_width: int = 256
    mlp_depth: int = 3
    num_classes: int = 0
    label_dropout: float = 0.15
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float | None = None
    steps: int = 2000
    batch_size: int = 64
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999

    def validate(self) -> None:
        """Raise ValueError on an unusable setting."""
        validation.check_choice("arch", self.arch, ARCHS)
        if not self.channels or any(not isinstance(c, (int, np.integer)) or c <= 0 for c in self.channels):
            raise ValueError(f"channels must be positive integers, got {self.channels!r}")
        for name in ("blocks", "emb_dim", "mlp_width", "mlp_depth", "steps", "batch_size"):
            validation.check_positive_int(name, getattr(self, name))
        if not isinstance(self.num_classes, (int, np.integer)) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0, got {self.num_classes!r}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout!r}")
        validation.check_positive("p_std", self.p_std)
        validation.check_positive("learning_rate", self.learning_rate)
        validation.check_positive("grad_clip", self.grad_clip)
        if self.sigma_data is not None:
            validation.check_positive("sigma_data", self.sigma_data)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if not isinstance(self.warmup_steps, (int, np.integer)) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")


# --------------------------------------------------------------------------- networks


def _groups(c: int) -> int:
    g = min(8, c)
    while c % g:
        g -= 1
    return g


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, FiLM by the embedding, GroupNorm-SiLU-conv, plus the skip."""

    features: int

    @nn.compact
    def __call__(self, h, emb):
        z = nn.Conv(self.features, (3, 3))(nn.silu(nn.GroupNorm(num_groups=_groups(h.shape[-1]))(h)))
        scale, shift = jnp.split(nn.Dense(2 * self.features)(emb)[:, None, None, :], 2, axis=-1)
        z = nn.GroupNorm(num_groups=_groups(self.features))(z) * (1 + scale) + shift
        # zero-initialised last conv: each block starts as the identity (stable early training)
        z = nn.Conv(self.features, (3, 3), kernel_init=nn.initializers.zeros)(nn.silu(z))
        skip = h if h.shape[-1] == self.features else nn.Conv(self.features, (1, 1))(h)
        return skip + z


class UNet(nn.Module):
    """F(x_in, c_noise, y) for (B, H, W, C) images; one halving of H, W between levels."""

    out_channels: int
    channels: tuple[int, ...] = (32, 64)
    blocks: int = 1
    emb_dim: int = 128
    num_classes: int = 0  # > 0: num_classes + 1 embeddings, the last "no label"

    @nn.compact
    def __call__(self, x, c_noise, y=None):
        """Apply F to (B, H, W, C) inputs, (B,) noise conditioning and (B,) labels."""
        emb = nn.Dense(self.emb_dim)(scores_lib._noise_embedding(c_noise, self.emb_dim))
        if self.num_classes:
            emb = emb + nn.Embed(self.num_classes + 1, self.emb_dim)(y)
        emb = nn.silu(nn.Dense(self.emb_dim)(nn.silu(emb)))
        h = nn.Conv(self.channels[0], (3, 3))(x)
        skips = []
        for i, c in enumerate(self.channels):
            for _ in range(self.blocks):
                h = ResBlock(c)(h, emb)
            skips.append(h)
            if i + 1 < len(self.channels):  # 28 -> 14 -> 7 (SAME padding: 7 -> 4 as well)
                h = nn.Conv(self.channels[i + 1], (3, 3), strides=(2, 2))(h)
        h = ResBlock(self.channels[-1])(h, emb)
        for i in reversed(range(len(self.channels))):
            skip = skips[i]
            if h.shape[1:3] != skip.shape[1:3]:
                h = jax.image.resize(h, (h.shape[0], *skip.shape[1:3], h.shape[-1]), "nearest")
                h = nn.Conv(self.channels[i], (3, 3))(h)
            h = jnp.concatenate([h, skip], axis=-1)
            for _ in range(self.blocks):
                h = ResBlock(self.channels[i])(h, emb)
        h = nn.silu(nn.GroupNorm(num_groups=_groups(h.shape[-1]))(h))
        return nn.Conv(self.out_channels, (3, 3), kernel_init=nn.initializers.zeros)(h)


def make_network(config: ScoreModelConfig, image_shape: tuple[int, ...]) -> nn.Module:
    """The backbone F of ``config`` for examples of ``image_shape`` (H, W, C)."""
    if config.arch == "unet":
        return UNet(out_channels=int(image_shape[-1]), channels=tuple(config.channels), blocks=config.blocks,
                    emb_dim=config.emb_dim, num_classes=config.num_classes)
    # DenoiserNet embeds num_classes labels: one more for "no label"
    return scores_lib.DenoiserNet(image_shape=tuple(image_shape), width=config.mlp_width, depth=config.mlp_depth,
                                  arch="mlp", num_classes=config.num_classes + 1 if config.num_classes else 0)


# --------------------------------------------------------------------------- the model


@struct.dataclass
class ScoreModel:
    """A trained denoiser D(x, sigma[, y]) (EMA weights) and what it needs to evaluate.

    Attributes:
      params: EMA parameters of the backbone.
      mean: per-pixel data mean (H, W, C).
      sigma_data: the data's spread around ``mean`` (EDM's sigma_d).
      config: the `ScoreModelConfig`.
      image_shape: (H, W, C).
    """

    params: Any
    mean: Array
    sigma_data: float = struct.field(pytree_node=False)
    config: ScoreModelConfig = struct.field(pytree_node=False)
    image_shape: tuple = struct.field(pytree_node=False)

    @property
    def null_label(self) -> int:
        """The "no label" class index (num_classes)."""
        return self.config.num_classes


def precondition(sigma: Array, sigma_data: float):
    """EDM's (c_skip, c_out, c_in, c_noise) of noise levels ``sigma`` (Karras et al. 2022, Table 1)."""
    sd2 = sigma_data**2
    c_skip = sd2 / (sigma**2 + sd2)
    c_out = sigma * sigma_data / jnp.sqrt(sigma**2 + sd2)
    c_in = 1.0 / jnp.sqrt(sigma**2 + sd2)
    return c_skip, c_out, c_in, jnp.log(sigma) / 4.0


def loss_weight(sigma: Array, sigma_data: float) -> Array:
    """EDM's lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 = 1 / c_out^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def _apply_denoiser(net, sigma_data, params, mean, x, sigma, y):
    sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), (x.shape[0],))
    c_skip, c_out, c_in, c_noise = precondition(sigma, sigma_data)
    b = (-1,) + (1,) * (x.ndim - 1)
    xc = x - mean
    f = net.apply({"params": params}, c_in.reshape(b) * xc, c_noise, y)
    return mean + c_skip.reshape(b) * xc + c_out.reshape(b) * f


# one program per network and input shape (modules compare by configuration); eager
# evaluation compiled each operation separately
_apply_denoiser_jit = jax.jit(_apply_denoiser, static_argnums=0)


def _labels(model_num_classes: int, y, n: int):
    if not model_num_classes:
        return None
    if y is None:
        return jnp.full((n,), model_num_classes, jnp.int32)
    return jnp.broadcast_to(jnp.asarray(y, jnp.int32), (n,))


def denoise(model: ScoreModel, x: Array, sigma, y: Array | None = None) -> Array:
    """D(x, sigma[, y]) ~ E[x0 | x]: ``y=None`` is unconditional (the "no label" class)."""
    net = make_network(model.config, model.image_shape)
    return _apply_denoiser_jit(net, model.sigma_data, model.params, model.mean, x, sigma,
                               _labels(model.config.num_classes, y, x.shape[0]))


def score(model: ScoreModel, x: Array, sigma, y: Array | None = None) -> Array:
    """grad_x log p_sigma(x[|y]) by Tweedie: (D(x, sigma[, y]) - x) / sigma^2."""
    return (denoise(model, x, sigma, y) - x) / jnp.square(jnp.asarray(sigma, x.dtype))


def bayes_gradient(model: ScoreModel, x: Array, sigma, y: Array) -> Array:
    """Learned grad_x log p_sigma(y|x) = class score - unconditional score.

    = (D(x, sigma, y) - D(x, sigma, null)) / sigma^2: the x terms cancel exactly, so only
    the two denoisers' difference is divided by sigma^2 (no cancellation of the large -x/sigma^2).
    """
    if not model.config.num_classes:
        raise ValueError("bayes_gradient needs a class-conditional score model (num_classes > 0)")
    return (denoise(model, x, sigma, y) - denoise(model, x, sigma, None)) / jnp.square(jnp.asarray(sigma, x.dtype))


# --------------------------------------------------------------------------- training


@struct.dataclass
class TrainState:
    """Everything that changes during training (the engine's ``state``)."""

    step: Array
    params: Any
    ema: Any
    opt_state: Any
    key: Array


def _optimizer(config: ScoreModelConfig):
    warm = min(config.warmup_steps, max(config.steps - 1, 0))
    sched = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, max(warm, 1), max(config.steps, warm + 1),
                                               end_value=0.05 * config.learning_rate)
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), optax.adam(sched))


def make_step_fn(config: ScoreModelConfig, image_shape, mean: Array, sigma_data: float):
    """The pure ``(TrainState, (x0, y)) -> (TrainState, metrics)`` step of `engine.train_loop`."""
    net = make_network(config, image_shape)
    tx = _optimizer(config)
    cond = config.num_classes > 0

    def loss_fn(params, x0, y, sigma, noise):
        b = (-1,) + (1,) * (x0.ndim - 1)
        d = _apply_denoiser(net, sigma_data, params, mean, x0 + sigma.reshape(b) * noise, sigma, y)
        per = jnp.mean(jnp.square(d - x0).reshape(x0.shape[0], -1), axis=1)
        return jnp.mean(loss_weight(sigma, sigma_data) * per)

    def step_fn(state: TrainState, batch):
        x0, y = batch
        k_s, k_n, k_d = jax.random.split(jax.random.fold_in(state.key, state.step), 3)
        n = x0.shape[0]
        sigma = jnp.exp(config.p_mean + config.p_std * jax.random.normal(k_s, (n,), x0.dtype))
        noise = jax.random.normal(k_n, x0.shape, x0.dtype)
        yy = None
        if cond:  # label dropout to the learned "no label" class
            drop = jax.random.uniform(k_d, (n,)) < config.label_dropout
            yy = jnp.where(drop, config.num_classes, y.astype(jnp.int32))
        loss, grads = jax.value_and_grad(loss_fn)(state.params, x0, yy, sigma, noise)
        return _adam_ema_update(state, loss, grads, tx, config.ema_decay)

    return step_fn, net, tx


def _adam_ema_update(state: TrainState, loss, grads, tx, ema_decay: float):
    """The optimizer step, then the EMA of the weights (warm-up decay (1+t)/(10+t) capped at
    ``ema_decay``); a NaN/inf step leaves the weights as they were (only the counter moves on)."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    t = state.step.astype(jnp.float32)
    decay = jnp.minimum(ema_decay, (1.0 + t) / (10.0 + t))
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, params)
    finite = engine.all_finite((loss, grads))
    new = engine.skip_nonfinite(TrainState(state.step + 1, params, ema, opt_state, state.key),
                                state.replace(step=state.step + 1), finite)
    return new, {"loss": loss, "finite": finite}


def data_statistics(x: Array) -> tuple[Array, float]:
    """(per-pixel mean, sigma_data): the spread of all pixels around the mean."""
    x = jnp.asarray(x, jnp.float32)
    mean = jnp.mean(x, axis=0)
    return mean, float(jnp.maximum(jnp.std(x - mean), 1e-3))


def train_score_model(
    x: Array,
    y: Array | None,
    config: ScoreModelConfig,
    key: Array,
    *,
    checkpointer=None,
    checkpoint_every: int | None = None,
    checkpoint_seconds: float | None = None,
    progress="score model",
    steps_per_call: int = 100,
) -> tuple[ScoreModel, engine.LoopResult]:
    """Train a score model on ``x`` (N, H, W, C) [and labels ``y`` (N,)] through `engine.train_loop`.

    Args:
      x: training examples (any float range; the per-pixel mean is removed).
      y: int labels in [0, config.num_classes) (required when num_classes > 0).
      config: `ScoreModelConfig`.
      key: PRNG key (initialisation, batch order, noise levels, noise, label dropout).
      checkpointer: a `pagjax.io.Checkpointer`: resumed from, saved to.
      checkpoint_every, checkpoint_seconds, progress, steps_per_call: passed to the engine.

    Returns:
      (`ScoreModel` with the EMA weights, the engine's `LoopResult`).
    """
    config.validate()
    validation.check_images("x", x, ranks=(4,))
    n = int(x.shape[0])
    if config.num_classes:
        if y is None:
            raise ValueError("y is required for a class-conditional score model (num_classes > 0)")
        validation.check_labels("y", y, num_classes=config.num_classes, batch=n)
        y = jnp.asarray(y, jnp.int32)
    else:
        y = jnp.zeros((n,), jnp.int32)
    x = jnp.asarray(x, jnp.float32)
    image_shape = tuple(int(v) for v in x.shape[1:])
    mean, sd = data_statistics(x)
    sigma_data = float(config.sigma_data) if config.sigma_data is not None else sd
    step_fn, net, tx = make_step_fn(config, image_shape, mean, sigma_data)
    k_init, k_data, k_train = jax.random.split(key, 3)
    y0 = jnp.zeros((1,), jnp.int32) if config.num_classes else None
    params = models.init_variables(net, k_init, x[:1], jnp.zeros((1,), jnp.float32), y0)["params"]
    state = TrainState(jnp.zeros((), jnp.int32), params, jax.tree.map(jnp.copy, params), tx.init(params), k_train)
    res = engine.train_loop(step_fn, state, (x, y), k_data, steps=config.steps, batch_size=min(config.batch_size, n),
                            checkpointer=checkpointer, checkpoint_every=checkpoint_every,
                            checkpoint_seconds=checkpoint_seconds, progress=progress,
                            steps_per_call=steps_per_call)
    model = ScoreModel(params=res.state.ema, mean=mean, sigma_data=sigma_data, config=config, image_shape=image_shape)
    return model, res


# --------------------------------------------------------------------------- score sources


SOURCE_KINDS = ("score", "class_score", "bayes_gradient")


def _model_maps(config: ScoreModelConfig, image_shape: tuple, sigma_data: float, kind: str, params, x, y, s):
    """A `ScoreSource`'s ``fn(params, x, y, s)`` of a score model, bound to the model's
    configuration by `Static` (one compilation serves every model of one configuration)."""
    m = ScoreModel(params=params["params"], mean=params["mean"], sigma_data=sigma_data, config=config,
                   image_shape=image_shape)
    if kind == "score":
        return score(m, x, s)
    if kind == "class_score":
        return score(m, x, s, y)
    return bayes_gradient(m, x, s, y)


def score_source(model: ScoreModel, kind: str = "score", *, name: str | None = None) -> scores_lib.ScoreSource:
    """A `pagjax.scores.ScoreSource` of the model: its unconditional score ``"score"``, its
    class-conditional score ``"class_score"`` or its Bayes gradient ``"bayes_gradient"``
    (both need labels), so `pagjax.scores.compute_scores` and its cache can use it."""
    validation.check_choice("kind", kind, SOURCE_KINDS)
    if kind != "score" and not model.config.num_classes:
        raise ValueError(f"kind {kind!r} needs a class-conditional score model (num_classes > 0)")
    if name is None:
        name = f"score-model-{kind}-" + scores_lib.fingerprint([model.config, list(model.image_shape), model.sigma_data,
                                                                  model.params, model.mean])
    fn = Static(_model_maps, model.config, tuple(model.image_shape), float(model.sigma_data), kind)
    return scores_lib.ScoreSource(fn=fn,
                                  params={"params": model.params, "mean": model.mean},
                                  needs_labels=kind != "score", kind="learned", name=name)


# --------------------------------------------------------------------------- linear denoiser


@struct.dataclass
class WienerFilter:
    """The best linear denoiser of data with mean ``mean`` and covariance U diag(lam) U^T."""

    mean: Array  # (d,)
    basis: Array  # (d, r) eigenvectors (columns) of the training covariance; r = d, or n < d (below)
    variances: Array  # (r,) eigenvalues lam >= 0; the d - r directions left out have lam = 0


def fit_wiener(x: Array) -> WienerFilter:
    """Mean and PCA of the training set (closed form, float64 on the host).

    With fewer images than pixels (n < d) the covariance has rank below n, so the thin SVD of
    the centred images gives all of its nonzero part in O(n^2 d) instead of an O(d^3)
    eigendecomposition (20 CIFAR-10 images, d = 3072: 0.02 s instead of tens of seconds). The
    directions left out have variance 0, hence gain 0: the filter is the same.
    """
    a = np.asarray(x, np.float64).reshape(x.shape[0], -1)
    mu = a.mean(0)
    n, d = a.shape
    if n < d:
        _, s, vt = np.linalg.svd(a - mu, full_matrices=False)
        lam, u = np.square(s) / n, vt.T
    else:
        lam, u = np.linalg.eigh((a - mu).T @ (a - mu) / n)
    return WienerFilter(jnp.asarray(mu, jnp.float32), jnp.asarray(u, jnp.float32),
                        jnp.asarray(np.clip(lam, 0.0, None), jnp.float32))


def wiener_denoise(w: WienerFilter, x: Array, sigma) -> Array:
    """x_hat = mu + U diag(lam / (lam + sigma^2)) U^T (x - mu).

    Among all affine maps of x = x0 + sigma n this minimises E||x_hat - x0||^2 (it depends on
    the data only through mean and covariance), and it is E[x0 | x] when x0 is Gaussian.
    """
    shape = x.shape
    z = (x.reshape(shape[0], -1) - w.mean) @ w.basis
    gain = w.variances / (w.variances + jnp.square(jnp.asarray(sigma, x.dtype)))
    return (w.mean + (z * gain) @ w.basis.T).reshape(shape)


def wiener_mse(w: WienerFilter, sigma) -> Array:
    """Expected per-coordinate MSE of the filter on its own training distribution:
    mean over the d components of lam sigma^2 / (lam + sigma^2) (those left out add 0)."""
    s2 = jnp.square(jnp.asarray(sigma, jnp.float32))
    return jnp.sum(w.variances * s2 / (w.variances + s2)) / w.mean.shape[0]


# --------------------------------------------------------------------------- report


_denoise_jit = jax.jit(denoise)  # the model is a pytree: one compilation per configuration


def denoising_report(
    model: ScoreModel,
    x_test: Array,
    y_test: Array | None,
    key: Array,
    *,
    wiener: WienerFilter,
    sigmas=REPORT_SIGMAS,
    chunk: int = 256,
) -> list[dict]:
    """Per-pixel MSE at each sigma: the model (unconditional, and class-conditional when it
    has classes and ``y_test`` is given), the noisy input, and the Wiener filter, all on the
    same noisy draws ``x_test + sigma n``. ``ratio_to_wiener`` = model / Wiener."""
    x_test = jnp.asarray(x_test, jnp.float32)
    rows = []
    for i, s in enumerate(sigmas):
        xn = x_test + s * jax.random.normal(jax.random.fold_in(key, i), x_test.shape)
        mse = lambda d: float(jnp.mean(jnp.square(d - x_test)))  # noqa: E731
        row = {"sigma": float(s), "mse_noisy": mse(xn), "mse_wiener": mse(wiener_denoise(wiener, xn, s)),
               "mse_model": mse(chunks.map_chunks(lambda a: _denoise_jit(model, a, s), xn, chunk))}
        if model.config.num_classes and y_test is not None:
            row["mse_model_class"] = mse(chunks.map_chunks(lambda ay: _denoise_jit(model, ay[0], s, ay[1]),
                                                           (xn, jnp.asarray(y_test)), chunk))
        row["ratio_to_wiener"] = row["mse_model"] / row["mse_wiener"]
        rows.append(row)
    return rows


def format_report(rows: list[dict]) -> str:
    """A markdown table of `denoising_report` rows."""
    cols = [c for c in ("sigma", "mse_noisy", "mse_wiener", "mse_model", "mse_model_class", "ratio_to_wiener")
            if c in rows[0]]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.4g}" for c in cols) + " |")
    return "\n".join(lines)


def cosine(a: Array, b: Array) -> Array:
    """Per-example cosine of two batches of maps."""
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    return jnp.sum(a * b, 1) / (jnp.linalg.norm(a, axis=1) * jnp.linalg.norm(b, axis=1) + 1e-12)


# --------------------------------------------------------------------------- saving, sweep references


def save_score_model(path: str, model: ScoreModel, extra: dict | None = None) -> None:
    """Save to directory ``path`` (orbax arrays + ``config.json`` with ``extra`` settings)."""
    from pagjax import io as io_lib

    cfg = {"config": dataclasses.asdict(model.config), "image_shape": list(model.image_shape),
           "sigma_data": float(model.sigma_data), "extra": extra}
    io_lib.save_checkpoint_dir(path, "arrays", {"params": model.params, "mean": model.mean}, cfg)


def load_score_model(path: str) -> tuple[ScoreModel, dict | None]:
    """(model, the ``extra`` settings it was saved with) from `save_score_model`'s directory."""
    from pagjax import io as io_lib

    cfg = io_lib.read_checkpoint_config(path, "score model")
    c = dict(cfg["config"])
    c["channels"] = tuple(c["channels"])
    config = ScoreModelConfig(**c)
    shape = tuple(cfg["image_shape"])
    net = make_network(config, shape)
    y0 = jnp.zeros((1,), jnp.int32) if config.num_classes else None
    like = jax.eval_shape(lambda: {"params": net.init(jax.random.key(0), jnp.zeros((1, *shape)), jnp.zeros((1,)),
                                                      y0)["params"],
                                   "mean": jnp.zeros(shape, jnp.float32)})
    arrays = io_lib.restore_checkpoint_dir(path, "arrays", like)
    model = ScoreModel(params=arrays["params"], mean=arrays["mean"], sigma_data=float(cfg["sigma_data"]),
                       config=config, image_shape=shape)
    return model, cfg.get("extra")


def reference_maps(model: ScoreModel, x: Array, y: Array, *, align_noise: float, paper_noise: float = 0.5,
                   chunk_size: int = 64) -> dict:
    """The sweep's learned references for eval images ``x`` (labels ``y``), as keyword
    arguments of `pagjax.measure.prepare_eval_set`: ``score_maps`` (class-conditional score
    at ``align_noise``), ``learned_bayes_maps`` (class score - unconditional score there) and
    ``paper_score_maps`` (the unconditional score at ``paper_noise``, the paper's reference)."""
    from pagjax import scores as sc

    def maps(kind, s):
        return sc.compute_scores(score_source(model, kind), x, y, noise_level=s, chunk_size=chunk_size)

    return {"score_maps": maps("class_score", align_noise), "learned_bayes_maps": maps("bayes_gradient", align_noise),
            "paper_score_maps": maps("score", paper_noise)}


def cached_score_model(directory: str, x: Array, y: Array, config: ScoreModelConfig, key: Array, settings: dict,
                       log=print, *, checkpoint_every: int | None = 500, checkpoint_seconds: float | None = None,
                       progress="score model") -> ScoreModel:
    """The score model cached in ``directory/model`` (`pagjax.cache`) when it was trained
    with ``settings`` (JSON-able: the data's identity and everything that shapes training),
    else trained and saved, checkpointed every ``checkpoint_every`` steps in
    ``directory/training/score_model-<settings digest>`` (`pagjax.cache.training_checkpointer`:
    a killed run resumes, one with other settings starts afresh). ``progress``: the
    engine's (a bar's name, a callback or None)."""
    import os
    import time

    from pagjax import cache as cache_lib

    settings = cache_lib.canonical_settings({**settings, "config": dataclasses.asdict(config)})

    def train() -> ScoreModel:
        t = time.perf_counter()
        log(f"score model: training {config.steps} steps (U-Net, channels {list(config.channels)})")
        with cache_lib.training_checkpointer(directory, "score model", settings, config.steps, log) as ck:
            model, _ = train_score_model(x, y, config, key, checkpointer=ck, checkpoint_every=checkpoint_every,
                                         checkpoint_seconds=checkpoint_seconds,
                                         progress=progress)
        log(f"score model: trained {config.steps} steps in {time.perf_counter() - t:.0f} s")
        return model

    return cache_lib.cached(os.path.join(directory, "model"), settings, train,
                            lambda model, target: save_score_model(target, model, extra=settings),
                            lambda path: load_score_model(path)[0], what="score model", log=log)


# --------------------------------------------------------------------------- direct Bayes gradient


class NoiseClassifier(nn.Module):
    """logits(x, c_noise): a residual MLP (SiLU: smooth input-gradients) with FiLM by the noise level."""

    num_classes: int
    width: int = 256
    depth: int = 3

    @nn.compact
    def __call__(self, x, c_noise):
        emb = nn.silu(nn.Dense(self.width)(scores_lib._noise_embedding(c_noise, 64)))
        h = nn.Dense(self.width)(x.reshape(x.shape[0], -1))
        for _ in range(self.depth):
            scale, shift = jnp.split(nn.Dense(2 * self.width)(emb), 2, axis=-1)
            z = nn.LayerNorm()(h) * (1 + scale) + shift
            h = h + nn.Dense(self.width)(nn.silu(nn.Dense(self.width)(nn.silu(z))))
        return nn.Dense(self.num_classes)(nn.silu(nn.LayerNorm()(h)))


@struct.dataclass
class NoiseClassifierModel:
    """A trained noise-conditional classifier p_sigma(y | x) (EMA weights)."""

    params: Any
    num_classes: int = struct.field(pytree_node=False)
    width: int = struct.field(pytree_node=False, default=256)
    depth: int = struct.field(pytree_node=False, default=3)

    def logits(self, x, sigma):
        net = NoiseClassifier(self.num_classes, self.width, self.depth)
        s = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), (x.shape[0],))
        return net.apply({"params": self.params}, x, jnp.log(s) / 4.0)


def train_noise_classifier(x: Array, y: Array, num_classes: int, config: ScoreModelConfig, key: Array, *,
                           width: int = 256, depth: int = 3, progress=None) -> NoiseClassifierModel:
    """Cross-entropy on x0 + sigma n with ln sigma ~ N(p_mean, p_std^2) (the score model's noise
    distribution), through `engine.train_loop`; its optimum is p_sigma(y | x) at every sigma."""
    net = NoiseClassifier(num_classes, width, depth)
    tx = _optimizer(config)
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.int32)

    def step_fn(state: TrainState, batch):
        x0, yb = batch
        k_s, k_n = jax.random.split(jax.random.fold_in(state.key, state.step))
        sigma = jnp.exp(config.p_mean + config.p_std * jax.random.normal(k_s, (x0.shape[0],)))
        xn = x0 + sigma.reshape((-1,) + (1,) * (x0.ndim - 1)) * jax.random.normal(k_n, x0.shape)

        def loss_fn(p):
            logp = jax.nn.log_softmax(net.apply({"params": p}, xn, jnp.log(sigma) / 4.0))
            return -jnp.mean(jnp.take_along_axis(logp, yb[:, None], 1))

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return _adam_ema_update(state, loss, grads, tx, config.ema_decay)

    k_init, k_data, k_train = jax.random.split(key, 3)
    params = models.init_variables(net, k_init, x[:1], jnp.zeros((1,)))["params"]
    state = TrainState(jnp.zeros((), jnp.int32), params, jax.tree.map(jnp.copy, params), tx.init(params), k_train)
    res = engine.train_loop(step_fn, state, (x, y), k_data, steps=config.steps,
                            batch_size=min(config.batch_size, x.shape[0]), progress=progress)
    return NoiseClassifierModel(res.state.ema, num_classes, width, depth)


@jax.jit  # one program, not an op-by-op dispatch (and compilation) of every layer
def classifier_bayes_gradient(clf: NoiseClassifierModel, x: Array, sigma, y: Array) -> Array:
    """grad_x log p_sigma(y | x) of the noise-conditional classifier: a direct estimate of the
    Bayes gradient (no difference of two nearly equal scores)."""
    def f(xx):
        logp = jax.nn.log_softmax(clf.logits(xx, sigma))
        return jnp.sum(jnp.take_along_axis(logp, y[:, None], 1))

    return jax.grad(f)(x)
