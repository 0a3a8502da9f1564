"""On/off-manifold robustness and the gradient's on-manifold fraction (docs/theory.md §5).

* `on_off_manifold_change`: for each image x, Gaussian directions n ~ N(0, I) are split
  into their tangent part P n and normal part (I - P) n, each scaled to unit L2 norm, and
  the softmax output's change ``softmax(f(x + eps u)) - softmax(f(x))`` is measured in L1
  (the paper's, in [0, 2]) and L2, for every eps of a list, averaged over
  ``num_directions`` directions per image. The relative off-manifold robustness is the
  ratio of the image-averaged off- and on-manifold changes (Srinivas, Bordt & Lakkaraju,
  NeurIPS 2023, section 3 / Figure 3).
* `manifold_directions` + `on_off_change`: the same measurement in two steps, so the
  directions (geometry only) are drawn once and reused for every model.
* `gradient_on_manifold_fraction`: ``||P g|| / ||g||``, the quantity bounded by the
  paper's theorem; random directions give about ``sqrt(k / d)``.

The whole batch, all eps and all directions go through the model in one jitted call
(optionally in chunks of ``batch_size`` perturbed images). A fixed ``key`` gives the same
directions for every model, so models are compared on common random numbers.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pagjax import chunks, geometry, numerics, validation
from pagjax.static import Static

Array = jax.Array
ApplyFn = Callable[..., Array]


class ManifoldChange(NamedTuple):
    """Softmax change under unit tangent (on) and normal (off) perturbations.

    Attributes:
      eps: (E,) perturbation sizes (L2 norm of the perturbation).
      on_l1, off_l1: (n, E) L1 change ``sum_k |p'_k - p_k|`` per image, averaged over
        directions.
      on_l2, off_l2: (n, E) the same in L2.
      mean_on_l1, mean_off_l1, mean_on_l2, mean_off_l2: (E,) averages over images.
      off_on_ratio: (E,) ``mean_off_l1 / mean_on_l1`` (relative off-manifold robustness;
        < 1 means off-manifold robust). 0/0 is reported as 0, never NaN.
      off_on_ratio_l2: (E,) the same ratio in L2.
    """

    eps: Array
    on_l1: Array
    off_l1: Array
    on_l2: Array
    off_l2: Array
    mean_on_l1: Array
    mean_off_l1: Array
    mean_on_l2: Array
    mean_off_l2: Array
    off_on_ratio: Array
    off_on_ratio_l2: Array


# --------------------------------------------------------------------------- checks


def _check_eps(eps) -> np.ndarray:
    arr = np.asarray(eps, dtype=np.float64)
    if arr.ndim > 1 or arr.size == 0:
        raise ValueError(f"eps must be a number or a non-empty 1-D list of numbers, got {eps!r}")
    validation.check_strength("eps", arr)
    return np.atleast_1d(arr).astype(np.float32)


def _check_x_basis(x, basis) -> Array:
    validation.check_images("x", x, ranks=(2, 3, 4))  # not finite=True: also checks computed gradients
    basis = geometry._basis_array(basis)
    geometry.check_basis("basis", basis, d=geometry.num_features(x), n=x.shape[0])
    return basis


@jax.jit
def _orthonormality(b: Array) -> tuple[Array, Array]:
    """(all finite, max |U^T U - I| over the non-zero columns): one compiled program, not
    a dozen eager ops (20 ms per measured model in the default sweep)."""
    gram = jnp.einsum("...dk,...dl->...kl", b, b)
    # zero columns are allowed: `geometry.orthonormalize` pads a rank-deficient basis with them
    unit = jnp.diagonal(gram, axis1=-2, axis2=-1) > 0.5
    ideal = jnp.eye(b.shape[-1], dtype=b.dtype) * unit[..., None, :]
    return jnp.isfinite(b).all(), jnp.max(jnp.abs(gram - ideal), initial=0.0)


def _check_orthonormal(name: str, basis, atol: float = 1e-3) -> None:
    """A tangent basis for on/off-manifold changes must be finite with orthonormal
    columns and leave a normal space: the projections assume P = U U^T, and a skewed
    basis moves the off/on ratio (0.60 -> 0.85 in one probe) without any error."""
    if not validation._is_concrete(basis):
        return
    with jax.ensure_compile_time_eval():  # concrete: evaluate now, even inside a caller's trace
        b = jnp.asarray(basis, jnp.float32)
        finite, err = _orthonormality(b)
        finite, err = bool(finite), float(err)
    d, k = b.shape[-2], b.shape[-1]
    if not finite:
        raise ValueError(f"{name} must be finite, but it holds NaN or inf values")
    if k >= d:
        raise ValueError(f"{name} spans all {d} input dimensions (shape {tuple(b.shape)}): "
                         "there is no off-manifold direction; the tangent dimension k must be < d")
    if err > atol:
        raise ValueError(f"{name} must have orthonormal columns (U^T U = I, zero columns allowed); it is off by "
                         f"up to {err:.3g}. Orthonormalise it first, e.g. pagjax.geometry.orthonormalize")


def _check_directions(name: str, v, x, min_directions: int = 0) -> None:
    """Raise ValueError unless `v` has shape (n, R, d) for the batch `x`, R >= min_directions."""
    n, d = x.shape[0], geometry.num_features(x)
    shape = getattr(v, "shape", None)
    if shape is None or len(shape) != 3 or shape[0] != n or shape[2] != d or shape[1] < min_directions:
        raise ValueError(f"{name} must have shape (n={n}, R, d={d}), got {shape}")


# --------------------------------------------------------------------------- directions


class ManifoldDirections(NamedTuple):
    """Unit tangent and unit normal directions, each (n, R, d) (R per example)."""

    tangent: Array
    normal: Array


def manifold_directions(key: Array, basis, n: int, num_directions: int = 1) -> ManifoldDirections:
    """Random unit tangent and unit normal directions, each of shape (n, R, d).

    Draws ``n ~ N(0, I_d)`` (R per example), splits it into ``P n`` and ``(I - P) n`` and
    scales each part to unit L2 norm (a zero part, e.g. for rank 0, stays zero).

    The directions depend on the data's geometry only, not on a model: draw them once and
    pass them to `on_off_change` for every model (the projections read the whole basis,
    (n, d, k) for per-image bases, which costs about half a CNN measurement on CPU).
    """
    basis = geometry._basis_array(basis)
    geometry.check_basis("basis", basis, n=n)
    validation.check_positive_int("n", n)
    validation.check_positive_int("num_directions", num_directions)
    return ManifoldDirections(*_directions_jit(key, basis, n, num_directions))


def _directions(key, basis, n, num_directions):
    d = basis.shape[-2]
    noise = jax.random.normal(key, (n, num_directions, d), dtype=basis.dtype)
    if basis.ndim == 2:
        coef = noise @ basis  # (n, R, k)
        tangent = coef @ basis.T
    else:
        coef = jnp.einsum("nrd,ndk->nrk", noise, basis)
        tangent = jnp.einsum("nrk,ndk->nrd", coef, basis)
    normal = noise - tangent

    def unit(v):
        norm = numerics.safe_norm(v, axis=-1, keepdims=True)
        return numerics.safe_ratio(v, norm)

    return unit(tangent), unit(normal)


_directions_jit = jax.jit(_directions, static_argnums=(2, 3))


# --------------------------------------------------------------------------- softmax change


def _softmax_change(apply_fn, params, x, directions, eps, batch_size):
    """(l1, l2) of shape (n, E, R): change of softmax(f) at x + eps * direction."""
    n, r = directions.shape[:2]
    e = eps.shape[0]
    img = x.shape[1:]
    flat = x.reshape((n, 1, 1, -1))
    pert = flat + eps[None, :, None, None] * directions[:, None, :, :]  # (n, E, R, d)
    # Clean and perturbed inputs go through the model in one call: one big batch uses
    # the CPU's cores better than two (XLA:CPU parallelises large batches only).
    both = jnp.concatenate([x.reshape((n,) + img), pert.reshape((n * e * r,) + img)])
    logits = chunks.map_chunks(lambda b: apply_fn(params, b), both, batch_size)
    if logits.ndim != 2 or logits.shape[0] != n * (1 + e * r):
        raise ValueError(f"apply_fn must return logits of shape (batch, classes), got {logits.shape}")
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    p0 = probs[:n]  # (n, K)
    p = probs[n:].reshape((n, e, r, -1))
    diff = p - p0[:, None, None, :]
    l1 = jnp.sum(jnp.abs(diff), axis=-1)
    l2 = numerics.safe_norm(diff, axis=-1)
    return l1, l2


def softmax_change(
    apply_fn: ApplyFn, params, x: Array, directions: Array, eps, *, batch_size: int | None = None
) -> tuple[Array, Array]:
    """Change of the softmax output along given directions, for every eps.

    Args:
      apply_fn: ``apply_fn(params, x) -> logits`` (B, K), inference mode.
      params: model parameters.
      x: (n, ...) inputs.
      directions: (n, R, d) flat perturbation directions (used as given, not normalised).
      eps: number or list of E sizes; the perturbation is ``eps * direction``.
      batch_size: evaluate the n*E*R perturbed inputs in chunks of this size (None: at once).

    Returns:
      ``(l1, l2)``, each (n, E, R): ``sum_k |p'_k - p_k|`` and ``||p' - p||_2``.
    """
    validation.check_images("x", x, ranks=(2, 3, 4))
    eps_arr = _check_eps(eps)
    _check_directions("directions", directions, x)
    if batch_size is not None:
        validation.check_positive_int("batch_size", batch_size)
    return _softmax_change_jit(Static(apply_fn), params, x, directions, jnp.asarray(eps_arr), batch_size)


# apply_fn (a `Static`) and batch_size are static
_softmax_change_jit = jax.jit(_softmax_change, static_argnums=(0, 5))


# --------------------------------------------------------------------------- on/off manifold


def _on_off_impl(apply_fn, params, x, basis, eps, key, num_directions, batch_size):
    tangent, normal = _directions(key, basis.astype(x.dtype), x.shape[0], num_directions)
    return _change_impl(apply_fn, params, x, tangent, normal, eps, batch_size)


def _change_impl(apply_fn, params, x, tangent, normal, eps, batch_size):
    dirs = jnp.concatenate([tangent, normal], axis=1).astype(x.dtype)  # (n, 2R, d)
    l1, l2 = _softmax_change(apply_fn, params, x, dirs, eps, batch_size)
    r = tangent.shape[1]
    on_l1, off_l1 = l1[..., :r].mean(-1), l1[..., r:].mean(-1)
    on_l2, off_l2 = l2[..., :r].mean(-1), l2[..., r:].mean(-1)
    m_on1, m_off1, m_on2, m_off2 = (a.mean(0) for a in (on_l1, off_l1, on_l2, off_l2))
    return ManifoldChange(
        eps=eps,
        on_l1=on_l1, off_l1=off_l1, on_l2=on_l2, off_l2=off_l2,
        mean_on_l1=m_on1, mean_off_l1=m_off1, mean_on_l2=m_on2, mean_off_l2=m_off2,
        off_on_ratio=numerics.safe_ratio(m_off1, m_on1),
        off_on_ratio_l2=numerics.safe_ratio(m_off2, m_on2),
    )


# apply_fn (a `Static`), num_directions and batch_size are static
_on_off_jit = jax.jit(_on_off_impl, static_argnums=(0, 6, 7))
_change_jit = jax.jit(_change_impl, static_argnums=(0, 6))


def on_off_manifold_change(
    apply_fn: ApplyFn,
    params,
    x: Array,
    basis,
    eps: float | Sequence[float],
    key: Array,
    *,
    num_directions: int = 1,
    batch_size: int | None = None,
) -> ManifoldChange:
    """On- and off-manifold softmax change of a model, for a whole batch at every eps.

    Args:
      apply_fn: ``apply_fn(params, x) -> logits`` (B, K), pure, inference mode.
      params: model parameters.
      x: (n, ...) inputs (NHWC images or flat vectors).
      basis: tangent basis (d, k) shared, (n, d, k) per image, or a `TangentBasis`.
      eps: perturbation sizes (L2 norm), a number or a list, e.g. the paper's
        ``[1.44, 2.64, 4.83, 8.86]`` for CIFAR-10 in [0, 1] pixel units.
      key: PRNG key for the Gaussian directions (same key -> same directions).
      num_directions: random directions per image (results are averaged over them).
      batch_size: evaluate the ``n * E * 2 * num_directions`` perturbed inputs in chunks
        of this size (bounds memory); None evaluates them in one call.

    Returns:
      `ManifoldChange` with per-image (n, E) and image-averaged (E,) changes and the
      off/on ratio.
    """
    basis = _check_x_basis(x, basis)
    validation.check_finite("x", x)
    _check_orthonormal("basis", basis)
    eps_arr = jnp.asarray(_check_eps(eps))
    validation.check_positive_int("num_directions", num_directions)
    if batch_size is not None:
        validation.check_positive_int("batch_size", batch_size)
    return _on_off_jit(Static(apply_fn), params, x, basis, eps_arr, key, num_directions, batch_size)


def on_off_change(
    apply_fn: ApplyFn,
    params,
    x: Array,
    directions: ManifoldDirections,
    eps: float | Sequence[float],
    *,
    batch_size: int | None = None,
) -> ManifoldChange:
    """`on_off_manifold_change` along given directions (from `manifold_directions`).

    ``on_off_change(f, p, x, manifold_directions(key, basis, n, R), eps)`` equals
    ``on_off_manifold_change(f, p, x, basis, eps, key, num_directions=R)``; drawing the
    directions once and reusing them skips the per-model projections onto the tangent
    spaces (the models are then compared on common random numbers, as with a fixed key).

    Args:
      apply_fn, params, x, eps, batch_size: as in `on_off_manifold_change`.
      directions: `ManifoldDirections` (or a ``(tangent, normal)`` pair), each (n, R, d)
        with unit rows, R >= 1.
    """
    validation.check_images("x", x, ranks=(2, 3, 4))
    eps_arr = jnp.asarray(_check_eps(eps))
    if not isinstance(directions, tuple) or len(directions) != 2:
        raise ValueError("directions must be a (tangent, normal) pair from manifold_directions, "
                         f"got {type(directions).__name__}")
    tangent, normal = directions
    _check_directions("directions.tangent", tangent, x, min_directions=1)
    _check_directions("directions.normal", normal, x, min_directions=1)
    if tangent.shape != normal.shape:
        raise ValueError(f"directions.tangent {tangent.shape} and directions.normal {normal.shape} differ in shape")
    if batch_size is not None:
        validation.check_positive_int("batch_size", batch_size)
    return _change_jit(Static(apply_fn), params, x, tangent, normal, eps_arr, batch_size)


# --------------------------------------------------------------------------- gradient fraction


def gradient_on_manifold_fraction(grads: Array, basis) -> tuple[Array, Array]:
    """Fraction ``||P g|| / ||g||`` of each input-gradient lying in the tangent space.

    Args:
      grads: (n, ...) input-gradients (e.g. from `pagjax.gradients.input_gradients`).
      basis: tangent basis (d, k), (n, d, k) or a `TangentBasis`.

    Returns:
      ``(fraction, random_baseline)``: fraction (n,) in [0, 1] (a zero gradient, e.g. an
      underflowed log-probability gradient of a confident model, gives 0, never NaN),
      and the scalar ``sqrt(k / d)`` that a random direction gives on average, with k the
      tangent dimension (``||U||_F^2``, so zero columns of a rank-deficient basis don't
      count; averaged over examples for per-example bases).
    """
    basis = _check_x_basis(grads, basis)
    return _fraction(grads, basis)


@jax.jit
def _fraction(grads, basis):
    flat = grads.reshape((grads.shape[0], -1)).astype(jnp.float32)
    basis = basis.astype(jnp.float32)
    d = flat.shape[1]
    tangent = geometry._expand(geometry._coefficients(flat, basis), basis)
    frac = numerics.safe_ratio(numerics.safe_norm(tangent, axis=-1), numerics.safe_norm(flat, axis=-1))
    frac = jnp.clip(frac, 0.0, 1.0)
    k = jnp.sum(jnp.square(basis)) / (basis.shape[0] if basis.ndim == 3 else 1)
    return frac, jnp.sqrt(k / d)
