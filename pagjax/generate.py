"""Generation, denoising and in-painting with a classifier's input-gradient alone.

docs/theory.md §1: perceptually-aligned gradients give robust classifiers rudimentary
generative abilities. The three procedures below use nothing but
``grad_x log p(y|x)`` of a trained classifier ``apply_fn(params, x) -> logits`` (pure,
inference mode); no generative model is involved.

All three are one loop (`make_ascent`): projected gradient *ascent* of the per-example
log-probability ``log softmax(f(x))_y``, looped with `lax.fori_loop`, with

* a step along the L2-normalised gradient (``normalize=True``) of size
  ``step_size * schedule(t)``, or along the raw gradient times ``step_size``
  (``normalize=False``, used by the Tweedie-like denoiser);
* an optional accept-if-better rule with backtracking (``max_backtracks``): candidates at
  ``eta, eta/2, ..., eta/2^J`` are evaluated together and the first that raises the
  target log-probability is taken; if none does, the image stays. So with
  ``max_backtracks >= 0`` the log-probability never decreases, and it increases at every
  step whenever some halving of the step is an ascent step (any smooth model with a
  non-zero gradient, for J large enough);
* projections: an L2 ball of radius ``radius`` around an anchor image (None: no ball),
  a pixel box ``box`` (None: no box) and, for in-painting, a mask: pixels outside the
  mask are reset to the observed image after every step, bit for bit.

The box defaults to (0, 1), the range of real images. The built-in known-manifold images
sit around 0.5 (about 0.3-0.7), are not clipped, and their Bayes quantities are defined
on all of R^d: use ``box=None`` for them (a box would add clipping moves that are not the
model's gradient). ``python -m experiments.generate`` does so.

Public factories return pure functions that take an explicit PRNG key, work on batches
(NHWC, or any batch-first shape) and run unchanged on a batch sharded over a device mesh
(`pagjax.devices.shard_leading`): every operation is per example, so GSPMD splits the
whole loop. Arguments are checked in Python before tracing (ValueError naming the
argument); under an outer `jax.jit` the value checks are skipped, the shape checks kept.

* `make_generator`: class-conditional generation from a seed image (`seed_images`).
* `make_denoiser`: steps ``x <- x + step * s^2 grad log p(y|x) / T`` (Tweedie's scaling:
  for the Bayes-optimal classifier at noise s one step adds E[x0|x,y] - E[x0|x]) inside
  the ball of radius ``radius_factor * s * sqrt(d)`` around the noisy image.
* `make_inpainter`: only masked pixels move.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pagjax import attacks, validation
from pagjax.gradients import per_example_scalar
from pagjax.numerics import per_example_norm

Array = jax.Array
ApplyFn = Callable[..., Array]

SCHEDULES = ("constant", "linear", "cosine")


class AscentResult(NamedTuple):
    """What a procedure returns.

    x: the final images (shape of the input); labels: (B,) the class that was ascended;
    logprob: (num_steps + 1, B) the target log-probability before the first step and after
    every step; accepted: (num_steps, B) whether each step moved the image (always True
    without the accept-if-better rule); start: the images the loop started from.
    """

    x: Array
    labels: Array
    logprob: Array
    accepted: Array
    start: Array


# --------------------------------------------------------------------------- checks

def _check_num_steps(num_steps) -> None:
    validation.check_positive_int("num_steps", num_steps)


def _check_box(box) -> None:
    if box is None:
        return
    try:
        low, high = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"box must be None or a pair (low, high), got {box!r}") from None
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise ValueError(f"box must be None or finite (low, high) with low < high, got {box!r}")


def _check_optional_positive(name: str, value) -> None:
    if value is not None:
        validation.check_positive(name, value)


def _check_backtracks(value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"max_backtracks must be None or an integer >= 0, got {value!r}")


def _check_x(name: str, x) -> None:
    validation.check_images(name, x, ranks=(2, 3, 4))
    if x.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one example, got shape {tuple(x.shape)}")


def _check_labels(name: str, labels, batch: int) -> None:
    validation.check_labels(name, labels, batch=batch)
    if validation._is_concrete(labels) and batch > 0 and int(np.asarray(labels).min()) < 0:
        raise ValueError(f"{name} must be >= 0")


def check_mask(mask, x) -> None:
    """A mask must broadcast to ``x`` along every non-batch axis, hold only 0/1 (or bool),
    and select at least one pixel of every example. Raises ValueError otherwise."""
    shape = getattr(mask, "shape", None)
    if shape is None:
        raise ValueError(f"mask must be an array, got {type(mask).__name__}")
    if len(shape) != x.ndim:
        raise ValueError(f"mask must have the rank of x ({x.ndim}, batch first), got shape {tuple(shape)}")
    for axis, (m, n) in enumerate(zip(shape, x.shape)):
        if m not in (1, n):
            raise ValueError(f"mask shape {tuple(shape)} does not broadcast to x shape {tuple(x.shape)} (axis {axis})")
    if not validation._is_concrete(mask):
        return
    arr = np.asarray(mask)
    if arr.dtype != bool:
        if not np.all((arr == 0) | (arr == 1)):
            raise ValueError("mask must hold only 0/1 or booleans (1 = missing pixel to in-paint)")
    sel = np.broadcast_to(arr.astype(bool), (shape[0],) + tuple(x.shape[1:]))
    per_example = sel.reshape(sel.shape[0], -1).sum(1)
    if np.any(per_example == 0):
        raise ValueError(f"mask selects no pixel in example(s) {np.nonzero(per_example == 0)[0].tolist()[:5]}: "
                         "nothing to in-paint")
    if np.all(sel):
        raise ValueError("mask selects every pixel: nothing is observed (use make_generator to generate)")


# --------------------------------------------------------------------------- pieces

def _bcast(v: Array, x: Array) -> Array:
    return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim))


def schedule_factor(t, num_steps: int, schedule: str) -> Array:
    """Step-size multiplier at step t (0-based) of `num_steps`: constant 1, linear decay
    from 1 to 1/num_steps, or cosine decay from 1 towards 0 (never exactly 0)."""
    t = jnp.asarray(t, jnp.float32)
    if schedule == "constant":
        return jnp.ones((), jnp.float32)
    if schedule == "linear":
        return 1.0 - t / num_steps
    if schedule == "cosine":
        return 0.5 * (1.0 + jnp.cos(jnp.pi * (t + 0.5) / num_steps))
    raise ValueError(f"unknown schedule {schedule!r}; expected one of {list(SCHEDULES)}")


def target_logprob(apply_fn: ApplyFn, params, x: Array, labels: Array) -> Array:
    """log softmax(apply_fn(params, x))_labels, per example (B,)."""
    return per_example_scalar(apply_fn(params, x), labels, "logprob")


def predicted_labels(apply_fn: ApplyFn, params, x: Array) -> Array:
    """argmax of the logits, int32 (B,)."""
    return jnp.argmax(apply_fn(params, x), axis=-1).astype(jnp.int32)


def _project(x_new, anchor, observed, mask, radius, box):
    """Ball around `anchor`, then box, then reset unmasked pixels to `observed`."""
    delta = x_new - anchor
    if radius is not None:
        delta = attacks.project_l2_ball(delta, radius)
    delta = attacks.project_box(anchor, delta, box)
    out = anchor + delta
    if mask is not None:
        out = jnp.where(mask, out, observed)
    return out


def seed_images(key: Array, shape, *, mean=0.5, std: float = 0.1, low_res: int | None = None,
                box: tuple[float, float] | None = None) -> Array:
    """Seed images for generation: ``mean + std * noise`` of the given (B, H, W, C) shape.

    ``mean`` is a scalar or an array broadcastable to ``shape`` (e.g. the class-mean images
    of the targets, the class-mean start). ``low_res`` draws the noise on a
    ``low_res x low_res`` grid and resizes it bilinearly to (H, W): a low-frequency start.
    With ``box`` the seeds are clipped into it.
    """
    shape = tuple(int(v) for v in shape)
    if len(shape) != 4:
        raise ValueError(f"shape must be (B, H, W, C), got {shape}")
    for name, v in zip(("B", "H", "W", "C"), shape):
        validation.check_positive_int(f"shape[{name}]", v)
    if not (np.isfinite(std) and std >= 0):
        raise ValueError(f"std must be finite and >= 0, got {std!r}")
    if low_res is not None:
        validation.check_positive_int("low_res", low_res)
    _check_box(box)
    b, h, w, c = shape
    if low_res is None:
        noise = jax.random.normal(key, shape, jnp.float32)
    else:
        small = jax.random.normal(key, (b, low_res, low_res, c), jnp.float32)
        noise = jax.image.resize(small, shape, method="linear")
        noise = noise / jnp.maximum(jnp.std(noise), 1e-12)  # unit per-pixel std again
    x = jnp.asarray(mean, jnp.float32) + std * noise
    x = jnp.broadcast_to(x, shape)
    if box is not None:
        x = jnp.clip(x, box[0], box[1])
    return x


# --------------------------------------------------------------------------- the loop

def make_ascent(
    apply_fn: ApplyFn,
    *,
    num_steps: int,
    step_size: float,
    radius: float | None = None,
    box: tuple[float, float] | None = (0.0, 1.0),
    schedule: str = "constant",
    normalize: bool = True,
    max_backtracks: int | None = 6,
) -> Callable:
    """The shared loop: returns ``ascend(params, x0, labels, anchor, mask=None, observed=None)``.

    Ascends ``log softmax(apply_fn(params, x))_labels`` from ``x0`` for ``num_steps`` steps
    (see the module docstring). ``anchor`` is the centre of the L2 ball (usually ``x0``);
    ``mask`` (broadcastable to x, True = may move) with ``observed`` clamps the other
    pixels. ``max_backtracks=None`` takes every step as it comes (no accept rule). Pure
    and jit-able; returns an `AscentResult`.
    """
    _check_num_steps(num_steps)
    validation.check_positive("step_size", step_size)
    _check_optional_positive("radius", radius)
    _check_box(box)
    validation.check_choice("schedule", schedule, SCHEDULES)
    _check_backtracks(max_backtracks)
    box = None if box is None else (float(box[0]), float(box[1]))
    etas = None if max_backtracks is None else 0.5 ** np.arange(max_backtracks + 1, dtype=np.float32)

    def ascend(params, x0: Array, labels: Array, anchor: Array, mask: Array | None = None,
               observed: Array | None = None) -> AscentResult:
        def value_and_grad(x):
            def total(inputs):
                v = target_logprob(apply_fn, params, inputs, labels)
                return jnp.sum(v), v

            (_, v), g = jax.value_and_grad(total, has_aux=True)(x)
            return v, g

        def direction(g):
            if mask is not None:
                g = jnp.where(mask, g, 0.0)
            if not normalize:
                return g
            norms = _bcast(per_example_norm(g), g)
            return jnp.where(norms > 0, g / jnp.maximum(norms, 1e-30), 0.0)

        def body(t, carry):
            x, value, trace, accepted = carry
            _, g = value_and_grad(x)
            d = direction(g)
            eta = step_size * schedule_factor(t, num_steps, schedule)
            if etas is None:
                x_new = _project(x + eta * d, anchor, observed, mask, radius, box)
                v_new = target_logprob(apply_fn, params, x_new, labels)
                ok = jnp.ones(labels.shape, bool)
            else:
                def candidate(frac):
                    xc = _project(x + (eta * frac) * d, anchor, observed, mask, radius, box)
                    return xc, target_logprob(apply_fn, params, xc, labels)

                xs, vs = jax.lax.map(candidate, jnp.asarray(etas))    # (J+1, B, ...), (J+1, B)
                better = vs > value[None, :]
                ok = jnp.any(better, axis=0)
                first = jnp.argmax(better, axis=0)                   # first improving halving
                pick = lambda a: jnp.take_along_axis(  # noqa: E731
                    a, jnp.reshape(first, (1, -1) + (1,) * (a.ndim - 2)), axis=0)[0]
                x_new = jnp.where(_bcast(ok, x), pick(xs), x)
                v_new = jnp.where(ok, pick(vs), value)
            trace = trace.at[t + 1].set(v_new)
            accepted = accepted.at[t].set(ok)
            return x_new, v_new, trace, accepted

        x_start = _project(x0, anchor, observed, mask, radius, box)
        v0, _ = value_and_grad(x_start)
        b = x0.shape[0]
        trace = jnp.zeros((num_steps + 1, b), v0.dtype).at[0].set(v0)
        acc = jnp.zeros((num_steps, b), bool)
        x, _, trace, acc = jax.lax.fori_loop(0, num_steps, body, (x_start, v0, trace, acc))
        return AscentResult(x, labels, trace, acc, x_start)

    return ascend


# --------------------------------------------------------------------------- procedures

def make_generator(
    apply_fn: ApplyFn,
    *,
    num_steps: int = 60,
    step_size: float = 0.1,
    radius: float | None = None,
    box: tuple[float, float] | None = (0.0, 1.0),
    schedule: str = "constant",
    max_backtracks: int | None = 6,
) -> Callable:
    """Class-conditional generation by ascending log p(target | x).

    Returns ``generate(params, seeds, targets, key, init_noise=0.0) -> AscentResult``:
    starts from ``seeds + init_noise * N(0, I)`` (drawn from ``key``; make the seeds with
    `seed_images`), then takes ``num_steps`` L2-normalised gradient steps of size
    ``step_size * schedule(t)``, kept within the L2 ball of ``radius`` around the start
    (None: unbounded) and the pixel ``box``. With ``max_backtracks`` (default 6) a step is
    taken only if it raises the target log-probability, halving it up to 6 times; the
    ``logprob`` trace is then non-decreasing.
    """
    ascend = make_ascent(apply_fn, num_steps=num_steps, step_size=step_size, radius=radius, box=box,
                         schedule=schedule, normalize=True, max_backtracks=max_backtracks)

    @jax.jit
    def core(params, seeds, targets, key, init_noise):
        x0 = seeds + init_noise * jax.random.normal(key, seeds.shape, seeds.dtype)
        if box is not None:
            x0 = jnp.clip(x0, box[0], box[1])
        return ascend(params, x0, targets, x0)

    def generate(params, seeds: Array, targets: Array, key: Array, init_noise: float = 0.0) -> AscentResult:
        _check_x("seeds", seeds)
        _check_labels("targets", targets, seeds.shape[0])
        if validation._is_concrete(init_noise) and not (np.isfinite(init_noise) and init_noise >= 0):
            raise ValueError(f"init_noise must be finite and >= 0, got {init_noise!r}")
        return core(params, seeds, targets, key, jnp.asarray(init_noise, seeds.dtype))

    return generate


def make_denoiser(
    apply_fn: ApplyFn,
    *,
    num_steps: int = 10,
    step_scale: float = 1.0,
    radius_factor: float | None = 1.0,
    box: tuple[float, float] | None = (0.0, 1.0),
) -> Callable:
    """Denoising along the input-gradient of the predicted (or given) class.

    Returns ``denoise(params, x_noisy, noise_level, key, labels=None) -> AscentResult``.
    The class is ``labels`` or the model's prediction at ``x_noisy``. Each of the
    ``num_steps`` steps adds ``step_scale * noise_level^2 / num_steps * grad log p(y|x)``:
    Tweedie's scaling, so for the Bayes-optimal classifier at that noise level one full step
    adds E[x0|x,y] - E[x0|x]. The image stays within ``radius_factor * noise_level *
    sqrt(d)`` (the expected norm of the noise) of ``x_noisy``, and in ``box``. No accept
    rule (the raw gradient's size carries the information). ``key`` is accepted for a
    uniform signature; the procedure is deterministic.
    """
    _check_num_steps(num_steps)
    validation.check_positive("step_scale", step_scale)
    _check_optional_positive("radius_factor", radius_factor)
    _check_box(box)

    @jax.jit
    def core(params, x_noisy, noise_level, labels):
        d = x_noisy[0].size
        radius = None if radius_factor is None else radius_factor * noise_level * float(np.sqrt(d))
        ascend = make_ascent(apply_fn, num_steps=num_steps, step_size=step_scale * noise_level**2 / num_steps,
                             radius=radius, box=box, normalize=False, max_backtracks=None)
        return ascend(params, x_noisy, labels, x_noisy)

    def denoise(params, x_noisy: Array, noise_level, key: Array | None = None,
                labels: Array | None = None) -> AscentResult:
        del key
        _check_x("x_noisy", x_noisy)
        validation.check_positive("noise_level", noise_level)
        if labels is None:
            labels = predicted_labels(apply_fn, params, x_noisy)
        else:
            _check_labels("labels", labels, x_noisy.shape[0])
        return core(params, x_noisy, jnp.asarray(noise_level, x_noisy.dtype), labels)

    return denoise


def make_inpainter(
    apply_fn: ApplyFn,
    *,
    num_steps: int = 60,
    step_size: float = 0.05,
    radius: float | None = None,
    box: tuple[float, float] | None = (0.0, 1.0),
    schedule: str = "constant",
    max_backtracks: int | None = 6,
) -> Callable:
    """In-painting: only the masked pixels move, the others stay the observed image.

    Returns ``inpaint(params, observed, mask, key, labels=None, fill=None, init_noise=0.0)
    -> AscentResult``. ``mask`` (rank of ``observed``, broadcastable; True/1 = missing)
    selects the pixels to fill; they start at ``fill`` (default: each example's mean
    observed pixel) plus ``init_noise * N(0, I)`` from ``key``, and then ascend
    log p(y|x) with L2-normalised steps restricted to the mask (same rules as
    `make_generator`; the ball, if any, is around the start). The class is ``labels`` or the
    prediction at the start. Unmasked pixels equal ``observed`` exactly, at every step.
    """
    ascend = make_ascent(apply_fn, num_steps=num_steps, step_size=step_size, radius=radius, box=box,
                         schedule=schedule, normalize=True, max_backtracks=max_backtracks)

    def start_of(observed, mask, key, fill, init_noise):
        keep = ~mask
        if fill is None:
            axes = tuple(range(1, observed.ndim))
            count = jnp.maximum(jnp.sum(jnp.broadcast_to(keep, observed.shape), axis=axes), 1)
            fill = jnp.sum(jnp.where(keep, observed, 0.0), axis=axes) / count
            fill = _bcast(fill, observed)
        x0 = fill + init_noise * jax.random.normal(key, observed.shape, observed.dtype)
        if box is not None:
            x0 = jnp.clip(x0, box[0], box[1])
        return jnp.where(mask, x0, observed)

    @jax.jit
    def core(params, observed, mask, key, labels, fill, init_noise):
        x0 = start_of(observed, mask, key, fill, init_noise)
        if labels is None:
            labels = predicted_labels(apply_fn, params, x0)
        return ascend(params, x0, labels, x0, mask, observed)

    def inpaint(params, observed: Array, mask: Array, key: Array, labels: Array | None = None,
                fill=None, init_noise: float = 0.0) -> AscentResult:
        _check_x("observed", observed)
        check_mask(mask, observed)
        if labels is not None:
            _check_labels("labels", labels, observed.shape[0])
        if validation._is_concrete(init_noise) and not (np.isfinite(init_noise) and init_noise >= 0):
            raise ValueError(f"init_noise must be finite and >= 0, got {init_noise!r}")
        if fill is not None:
            fill = jnp.asarray(fill, observed.dtype)
            try:
                jnp.broadcast_shapes(fill.shape, observed.shape)
            except ValueError:
                raise ValueError(f"fill of shape {fill.shape} does not broadcast to observed {observed.shape}") from None
        return core(params, observed, jnp.asarray(mask).astype(bool), key, labels, fill,
                    jnp.asarray(init_noise, observed.dtype))

    return inpaint


# --------------------------------------------------------------------------- measures on known manifolds

def _normal_norm(v: Array, basis) -> Array:
    from pagjax.geometry import project_normal

    return per_example_norm(project_normal(v, basis))


def _mean(v) -> float:
    return float(np.mean(np.asarray(v, np.float64)))


def _ratio(num: Array, den: Array) -> Array:
    return jnp.where(den > 0, num / jnp.maximum(den, 1e-30), 0.0)


def data_subspace_basis(manifold) -> Array | None:
    """Orthonormal basis (d, k') of the directions a linear manifold's data vary along: the
    tangent basis U, plus the class offset directions v_y when ``normal_offset > 0`` (the data
    are center + U t + normal_offset v_y + small isotropic noise). None for other manifolds."""
    basis = getattr(manifold, "basis", None)
    if basis is None:
        return None
    if getattr(manifold, "normal_offset", 0.0) > 0:
        return jnp.concatenate([basis, jnp.asarray(manifold.normal_directions).T], axis=1)
    return basis


def measure_generation(result: AscentResult, targets: Array, *, manifold=None, bayes_noise: float = 0.3,
                       model_logits: Array | None = None, basis=None) -> dict:
    """Summary of a generation run (means over the batch).

    * ``move``: ||x_T - x_0||; ``logprob_gain``: the target log-probability's increase;
    * ``model_success``: fraction whose model prediction is the target (``model_logits`` at x_T);
    * with a known ``manifold``: ``bayes_target_acc`` (the Bayes-optimal classifier at
      ``bayes_noise`` predicts the target) and ``bayes_target_prob``;
    * with a linear manifold (a global ``basis`` U and ``center`` c): ``move_normal_fraction``
      ||P_perp (x_T - x_0)|| / ||x_T - x_0|| (0 for a move along the manifold) and
      ``normal_ratio`` ||P_perp (x_T - c)|| / ||P_perp (x_0 - c)|| (the distance from the
      manifold's subspace at the end relative to the start), with P_perp against U (or
      ``basis``); ``move_offdata_fraction`` is the same fraction against
      `data_subspace_basis` (U plus the class offset directions: the directions the data
      never vary along, where only noise lives).
    """
    x, x0 = result.x, result.start
    move = x - x0
    out = {"move": _mean(per_example_norm(move)),
           "logprob_gain": _mean(result.logprob[-1] - result.logprob[0])}
    if model_logits is not None:
        out["model_success"] = _mean(jnp.argmax(model_logits, -1) == targets)
    if manifold is not None:
        log_post = manifold.log_posterior(x, bayes_noise)
        out["bayes_target_acc"] = _mean(jnp.argmax(log_post, -1) == targets)
        out["bayes_target_prob"] = _mean(jnp.exp(jnp.take_along_axis(log_post, targets[:, None], -1)))
        basis = getattr(manifold, "basis", None) if basis is None else basis
        center = getattr(manifold, "center", None)
        if basis is not None and center is not None:
            c = jnp.reshape(center, (1, *x.shape[1:]))
            mnorm = per_example_norm(move)
            out["move_normal_fraction"] = _mean(_ratio(_normal_norm(move, basis), mnorm))
            out["normal_ratio"] = _mean(_ratio(_normal_norm(x - c, basis), _normal_norm(x0 - c, basis)))
            data_basis = data_subspace_basis(manifold)
            if data_basis is not None:
                out["move_offdata_fraction"] = _mean(_ratio(_normal_norm(move, data_basis), mnorm))
    return out


def measure_denoising(result: AscentResult, clean: Array, noisy: Array, noise_level, *, manifold=None) -> dict:
    """Per-pixel mean squared errors against the clean images: ``mse`` (the output),
    ``mse_noisy`` (the input) and, on a known manifold, ``mse_tweedie`` (the Bayes-optimal
    denoiser E[x0|x] at ``noise_level``); with a linear manifold also the norms of the
    on-manifold (tangent) part of each error, ``tangent_err``, ``tangent_err_noisy``,
    ``tangent_err_tweedie`` (the part a classifier's gradient can fix: the pull back onto
    the manifold cancels in grad log p(y|x))."""
    from pagjax.geometry import project_tangent

    mse = lambda a: _mean(jnp.mean(jnp.square(a - clean), axis=tuple(range(1, a.ndim))))  # noqa: E731
    out = {"mse": mse(result.x), "mse_noisy": mse(noisy)}
    tweedie = None
    if manifold is not None:
        tweedie = manifold.posterior_mean(noisy, noise_level)
        out["mse_tweedie"] = mse(tweedie)
    basis = getattr(manifold, "basis", None)
    if basis is not None:
        terr = lambda a: _mean(per_example_norm(project_tangent(a - clean, basis)))  # noqa: E731
        out.update(tangent_err=terr(result.x), tangent_err_noisy=terr(noisy), tangent_err_tweedie=terr(tweedie))
    return out


def subspace_inpainting(observed: Array, mask: Array, basis: Array, center: Array) -> Array:
    """Reference in-painting for a linear manifold: the least-squares fit center + U t to
    the observed pixels, used for the missing ones (uses the true subspace; an oracle)."""
    b = observed.shape[0]
    flat_obs = jnp.reshape(observed, (b, -1))
    keep = jnp.reshape(jnp.broadcast_to(~jnp.asarray(mask, bool), observed.shape), (b, -1)).astype(observed.dtype)

    def one(xo, k):
        a = basis * k[:, None]
        t, *_ = jnp.linalg.lstsq(a, (xo - center) * k)
        return center + basis @ t

    fit = jnp.reshape(jax.vmap(one)(flat_obs, keep), observed.shape)
    return jnp.where(mask, fit, observed)


def measure_inpainting(result: AscentResult, clean: Array, mask: Array, *, manifold=None) -> dict:
    """Mean squared error on the masked pixels only: ``mse`` (the output), ``mse_fill`` (the
    start) and, for a linear manifold, ``mse_subspace`` (`subspace_inpainting`, an oracle)."""
    m = jnp.broadcast_to(jnp.asarray(mask, bool), clean.shape)
    count = jnp.maximum(jnp.sum(m, axis=tuple(range(1, clean.ndim))), 1)
    err = lambda a: _mean(jnp.sum(jnp.where(m, jnp.square(a - clean), 0.0), axis=tuple(range(1, clean.ndim))) / count)  # noqa: E731
    out = {"mse": err(result.x), "mse_fill": err(result.start)}
    basis, center = getattr(manifold, "basis", None), getattr(manifold, "center", None)
    if basis is not None and center is not None:
        observed = jnp.where(m, 0.0, clean)
        out["mse_subspace"] = err(subspace_inpainting(observed, m, basis, center))
    return out
