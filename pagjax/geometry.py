"""Manifold geometry: tangent spaces by forward-mode JVPs, projections, principal angles.

Conventions (shared by `pagjax.robustness` and every caller):

* Inputs are batch first, ``(n, ...)`` (NHWC images or flat vectors); ``d`` is the number
  of features of one example, ``prod(shape[1:])``.
* A *tangent basis* is an array with orthonormal columns, either ``(d, k)`` (one subspace
  shared by every example, e.g. a linear manifold) or ``(n, d, k)`` (one per example).
  Columns beyond a generator's numerical rank are exactly zero, so ``U @ U.T`` is still the
  orthogonal projector onto the tangent space (docs/theory.md §1: ``P``), and
  ``trace(P) = ||U||_F^2`` is the rank.

The tangent space of a generated manifold ``x = g(z)`` at ``z`` is the column space of the
Jacobian ``dg/dz``; it is built here with one forward-mode JVP per *latent* direction
(``jax.jacfwd``, vmapped over the batch), i.e. ``m`` JVPs for an ``m``-dimensional latent,
instead of one backward pass per *output pixel*.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pagjax import cache as cache_lib
from pagjax import io as io_lib
from pagjax import validation
from pagjax.static import Static

Array = jax.Array


class TangentBasis(NamedTuple):
    """Orthonormal tangent bases, one per example.

    Attributes:
      basis: ``(n, d, k)``, orthonormal columns; columns ``rank[i]:`` of example ``i`` are 0.
      rank: ``(n,)`` int32, numerical rank of each Jacobian (singular values above
        ``rank_tol * largest``).
    """

    basis: Array
    rank: Array


# --------------------------------------------------------------------------- checks


def _basis_array(basis) -> Array:
    """Accept a `TangentBasis` or a raw array; return the array."""
    if isinstance(basis, TangentBasis):
        return basis.basis
    return basis


def check_basis(name: str, basis, *, d: int | None = None, n: int | None = None) -> None:
    """Raise ValueError unless `basis` is a (d, k) or (n, d, k) floating array with k <= d."""
    shape = getattr(basis, "shape", None)
    dtype = getattr(basis, "dtype", None)
    if shape is None or dtype is None:
        raise ValueError(f"{name} must be an array of shape (d, k) or (n, d, k), got {type(basis).__name__}")
    if len(shape) not in (2, 3):
        raise ValueError(f"{name} must have shape (d, k) or (n, d, k), got shape {tuple(shape)}")
    if not np.issubdtype(np.dtype(dtype), np.floating):
        raise ValueError(f"{name} must have a floating dtype, got {dtype}")
    bd, bk = shape[-2], shape[-1]
    if bk > bd:
        raise ValueError(f"{name} has more columns than rows: shape {tuple(shape)} (need k <= d)")
    if d is not None and bd != d:
        raise ValueError(
            f"{name} has {bd} rows but the inputs have d = {d} features per example "
            f"(basis shape {tuple(shape)}); the tangent basis is of the wrong size"
        )
    if n is not None and len(shape) == 3 and shape[0] != n:
        raise ValueError(
            f"{name} is a per-example basis for {shape[0]} examples but the batch has {n}"
        )


def _check_batch(name: str, v) -> None:
    shape = getattr(v, "shape", None)
    if shape is None or getattr(v, "dtype", None) is None:
        raise ValueError(f"{name} must be an array, got {type(v).__name__}")
    if len(shape) < 2:
        raise ValueError(f"{name} must be batch first with rank >= 2, e.g. (n, d) or NHWC, got shape {tuple(shape)}")
    if not np.issubdtype(np.dtype(v.dtype), np.floating):
        raise ValueError(f"{name} must have a floating dtype, got {v.dtype}")


def num_features(x) -> int:
    """d = prod(x.shape[1:]), the number of features of one example of a batch."""
    return int(math.prod(x.shape[1:]))


# --------------------------------------------------------------------------- tangent bases


ORTHO_METHODS = ("svd", "gram", "cholesky")
GRAM_MIN_TOL = 1e-3  # a float32 Gram matrix resolves singular-value ratios only to ~sqrt(eps)


def _svd_basis(jac, rank_tol):
    u, s, _ = jnp.linalg.svd(jac, full_matrices=False)
    smax = s[:, :1]
    keep = (s > rank_tol * smax) & (smax > 0)
    return u * keep[:, None, :].astype(u.dtype), keep


def _gram_pass(a, rel_tol):
    """Orthonormal basis of range(a) from the eigen-decomposition of the small a^T a."""
    gram = jnp.swapaxes(a, -1, -2) @ a
    lam, v = jnp.linalg.eigh(gram)  # ascending
    lam, v = lam[:, ::-1], v[:, :, ::-1]  # descending, like the SVD
    s = jnp.sqrt(jnp.maximum(lam, 0.0))
    smax = s[:, :1]
    keep = (s > rel_tol * smax) & (smax > 0)
    inv = jnp.where(keep, 1.0 / jnp.where(keep, s, 1.0), 0.0)
    return (a @ v) * inv[:, None, :], keep


def _gram_basis(jac, rank_tol):
    u, keep = _gram_pass(jac, max(rank_tol, GRAM_MIN_TOL))
    # second pass (as in CholeskyQR2) restores orthonormality to float32 precision
    u2, keep2 = _gram_pass(u, 0.5)
    return u2 * keep2[:, None, :].astype(u2.dtype), keep


def _cholesky_basis(jac, rank_tol):
    return _cholesky_basis_rows(jnp.swapaxes(jac, -1, -2), rank_tol)


def _cholesky_basis_rows(rows, rank_tol):
    """Shifted CholeskyQR2 of the Jacobian given as its transpose ``rows`` (n, m, d).

    The row layout is the one the JVPs produce (one row per latent direction); working in
    it and writing the (n, d, m) basis only in the last product saves a transpose of the
    big array (about 10% of a CIFAR-sized tangent space on CPU).
    """
    m = rows.shape[-2]
    eye = jnp.eye(m, dtype=rows.dtype)

    def chol_inv(a, shift):
        """(R^-1, diag R, scale) with R R^T = a a^T + shift * scale * I, a (n, m, d)."""
        gram = a @ jnp.swapaxes(a, -1, -2)
        scale = jnp.trace(gram, axis1=-2, axis2=-1)[:, None, None] / m
        r = jnp.linalg.cholesky(gram + shift * jnp.maximum(scale, 1e-30) * eye)  # lower
        r_inv = jax.scipy.linalg.solve_triangular(r, jnp.broadcast_to(eye, r.shape), lower=True)
        return r_inv, jnp.diagonal(r, axis1=-2, axis2=-1), scale[:, :, 0]

    shift = 1e-5
    r_inv, diag, scale = chol_inv(rows, shift)  # shifted CholeskyQR: no breakdown in float32
    tol = max(rank_tol, GRAM_MIN_TOL)
    # a column inside the span of the previous ones has diag^2 ~ shift * scale
    floor = jnp.maximum(tol**2 * jnp.max(diag, axis=-1, keepdims=True) ** 2, 4 * shift * scale)
    keep = diag**2 > floor
    mask = keep.astype(rows.dtype)
    # Dropped directions are zeroed in the small (m, m) factors, not in the big arrays.
    q_rows = (r_inv * mask[:, :, None]) @ rows  # (n, m, d): Q^T of the first pass
    r_inv2, _, _ = chol_inv(q_rows, 1e-7)
    basis = jnp.swapaxes(q_rows, -1, -2) @ (jnp.swapaxes(r_inv2, -1, -2) * mask[:, None, :])
    return basis, keep


def orthonormalize(jac: Array, *, rank_tol: float = 1e-6, method: str = "svd") -> TangentBasis:
    """Orthonormal bases of the column spaces of Jacobians ``jac`` (n, d, m).

    ``method="svd"``: thin SVD; singular values ``<= rank_tol * max`` count as zero.
    ``method="gram"``: eigen-decomposition of the small (m, m) Gram matrix ``J^T J``, then
    ``U = J V S^-1``, applied twice (the second pass fixes the orthonormality, as in
    CholeskyQR2; Fukaya et al., 2014). Far cheaper for tall Jacobians (d >> m) but in
    float32 it resolves singular values only down to ``1e-3 * max``, so the effective
    tolerance is ``max(rank_tol, 1e-3)``.
    ``method="cholesky"``: shifted CholeskyQR2 (Fukaya et al., SIAM J. Sci. Comput.
    2020), the cheapest on CPU (no eigen-solver); meant for Jacobians of full column rank
    (decoders): the rank is read off the unpivoted Cholesky diagonal (distance of each
    column from the span of the previous ones), resolving about 1e-2 of the rms column
    norm; exact dependencies are found, near ones are approximate.

    Dropped directions become zero columns and ``rank`` says how many were kept; the
    result has ``k = min(d, m)`` columns, kept ones first.
    """
    if jac.ndim != 3:
        raise ValueError(f"jac must have shape (n, d, m), got {tuple(jac.shape)}")
    validation.check_positive("rank_tol", rank_tol)
    validation.check_choice("method", method, ORTHO_METHODS)
    if method != "svd" and jac.shape[2] > jac.shape[1]:
        method = "svd"  # more latents than features: the Gram matrix is singular
    fn = {"svd": _svd_basis, "gram": _gram_basis, "cholesky": _cholesky_basis}[method]
    basis, keep = fn(jac, rank_tol)
    return TangentBasis(basis=basis, rank=jnp.sum(keep, axis=-1).astype(jnp.int32))


def _orthonormalize_rows(rows: Array, rank_tol: float, method: str) -> TangentBasis:
    """`orthonormalize` of ``swapaxes(rows, 1, 2)``, from the JVPs' (n, m, d) layout."""
    if method == "cholesky" and rows.shape[1] <= rows.shape[2]:
        basis, keep = _cholesky_basis_rows(rows, rank_tol)
        return TangentBasis(basis=basis, rank=jnp.sum(keep, axis=-1).astype(jnp.int32))
    return orthonormalize(jnp.swapaxes(rows, 1, 2), rank_tol=rank_tol, method=method)


def generator_jacobian(
    generator: Callable[[Array], Array],
    z: Array,
    *,
    direction_chunk: int | None = None,
    example_chunk: int | None = None,
) -> Array:
    """Jacobians ``dg/dz`` of a batched generator at each row of ``z``: shape (n, d, m).

    ``generator(z)`` maps latents (n, m) to outputs (n, ...) with rows independent (a
    decoder in inference mode). Each Jacobian is ``m`` forward-mode JVPs of the
    linearised generator, vmapped over latent directions and over the batch.

    ``direction_chunk`` / ``example_chunk`` bound the working set: JVPs are pushed
    ``direction_chunk`` directions at a time (chunks unrolled in the trace), for
    ``example_chunk`` examples at a time (``lax.map``). None (default) vmaps everything at once (best on accelerators); on CPU
    cache-sized chunks (e.g. 32 directions, 1 example for a 32x32x3 conv decoder) are
    several times faster.
    """
    validation.check_images("z", z, ranks=(2,))
    if direction_chunk is not None:
        validation.check_positive_int("direction_chunk", direction_chunk)
    if example_chunk is not None:
        validation.check_positive_int("example_chunk", example_chunk)
    return jnp.swapaxes(_jacobian_rows(generator, z, direction_chunk, example_chunk), 1, 2)


def _jacobian_rows(generator, z, direction_chunk, example_chunk) -> Array:
    """Transposed Jacobians (n, m, d): row j is the JVP along latent direction j."""
    m = z.shape[1]

    def single(zi):
        return jnp.reshape(generator(zi[None])[0], (-1,))

    def jac_one(zi):
        _, lin = jax.linearize(single, zi)
        eye = jnp.eye(m, dtype=zi.dtype)
        if direction_chunk is None or direction_chunk >= m:
            cols = jax.vmap(lin)(eye)  # (m, d)
        else:
            # Chunks unrolled in the trace, not a `lax.map` loop: XLA:CPU ran conv
            # JVPs inside a while loop markedly slower (see `pagjax.sweep.choose_step_loop`).
            cols = jnp.concatenate([jax.vmap(lin)(eye[i:i + direction_chunk])
                                    for i in range(0, m, direction_chunk)])
        return cols

    if example_chunk is None:
        return jax.vmap(jac_one)(z)
    return jax.lax.map(jac_one, z, batch_size=example_chunk)


def tangent_basis_from_generator(
    generator: Callable[[Array], Array],
    z: Array,
    *,
    rank_tol: float = 1e-6,
    method: str = "svd",
    direction_chunk: int | None = None,
    example_chunk: int | None = None,
) -> TangentBasis:
    """Orthonormal tangent bases of the manifold ``x = generator(z)`` at each latent row.

    Args:
      generator: batched ``(n, m) -> (n, ...)``, differentiable, rows independent.
      z: latents ``(n, m)``.
      rank_tol: relative singular-value threshold for the numerical rank.
      method: ``"svd"`` (exact rank), ``"gram"`` or ``"cholesky"`` (fast for d >> m), see
        `orthonormalize`.
      direction_chunk, example_chunk: memory/cache chunking, see `generator_jacobian`.

    Returns:
      `TangentBasis` with ``basis`` (n, d, min(d, m)) and ``rank`` (n,).

    The computation is jitted with ``generator`` as a static argument (`pagjax.static.Static`):
    pass the same generator object again to reuse the compiled function.
    """
    validation.check_images("z", z, ranks=(2,))
    validation.check_positive("rank_tol", rank_tol)
    validation.check_choice("method", method, ORTHO_METHODS)
    return _tangent_basis_jit(Static(generator), z, rank_tol, method, direction_chunk, example_chunk)


def _tangent_basis_impl(generator, z, rank_tol, method, direction_chunk, example_chunk):
    rows = _jacobian_rows(generator, z, direction_chunk, example_chunk)
    return _orthonormalize_rows(rows, rank_tol, method)


_tangent_basis_jit = jax.jit(_tangent_basis_impl, static_argnums=(0, 2, 3, 4, 5))


# --------------------------------------------------------------------------- projections


def _coefficients(flat: Array, basis: Array) -> Array:
    if basis.ndim == 2:
        return flat @ basis  # (n, k)
    return jnp.einsum("nd,ndk->nk", flat, basis)


def _expand(coef: Array, basis: Array) -> Array:
    if basis.ndim == 2:
        return coef @ basis.T
    return jnp.einsum("nk,ndk->nd", coef, basis)


def project_tangent(v: Array, basis) -> Array:
    """Orthogonal projection ``P v = U U^T v`` of each example of ``v`` (n, ...).

    ``basis`` is (d, k) (shared), (n, d, k) (per example) or a `TangentBasis`; the
    result has the shape of ``v`` (image shaped or flat).
    """
    basis = _basis_array(basis)
    _check_batch("v", v)
    check_basis("basis", basis, d=num_features(v), n=v.shape[0])
    flat = jnp.reshape(v, (v.shape[0], -1))
    return jnp.reshape(_expand(_coefficients(flat, basis), basis), v.shape)


def project_normal(v: Array, basis) -> Array:
    """Projection ``(I - P) v`` onto the orthogonal complement of the tangent space."""
    return v - project_tangent(v, basis)


# --------------------------------------------------------------------------- principal angles


def principal_angles(basis_a, basis_b) -> Array:
    """Principal angles (radians, ascending) between the column spaces of two bases.

    Both bases have orthonormal columns, shape (d, ka) / (d, kb), or (n, d, k) for a batch
    of pairs (a (d, k) basis is broadcast against an (n, d, k) one). Returns
    ``min(ka, kb)`` angles (per pair). Small angles are taken from the sines, large ones
    from the cosines, which keeps both accurate in float32 (Bjorck & Golub, 1973;
    Knyazev & Argentati, SIAM J. Sci. Comput. 2002).
    """
    a = _basis_array(basis_a)
    b = _basis_array(basis_b)
    check_basis("basis_a", a)
    check_basis("basis_b", b, d=a.shape[-2])
    if a.ndim == 3 and b.ndim == 3 and a.shape[0] != b.shape[0]:
        raise ValueError(
            f"basis_a and basis_b must hold the same number of bases, got {a.shape[0]} and {b.shape[0]}"
        )
    if a.shape[-1] < b.shape[-1]:  # angles are symmetric; keep b the thinner one
        a, b = b, a
    return _principal_angles(a, b)


@jax.jit
def _principal_angles(a, b):
    cross = jnp.swapaxes(a, -1, -2) @ b  # (..., ka, kb)
    cos = jnp.linalg.svd(cross, compute_uv=False)  # descending, kb values
    resid = b - a @ cross  # (I - A A^T) B
    sin = jnp.linalg.svd(resid, compute_uv=False)[..., ::-1]  # ascending
    cos = jnp.clip(cos, 0.0, 1.0)
    sin = jnp.clip(sin, 0.0, 1.0)
    return jnp.where(cos**2 < 0.5, jnp.arccos(cos), jnp.arcsin(sin))


# --------------------------------------------------------------------------- disk cache


def _write_npz(tb: TangentBasis, target: str) -> None:
    with open(target, "wb") as f:  # a file object: np.savez would append ".npz" to a name
        np.savez(f, basis=np.asarray(tb.basis), rank=np.asarray(tb.rank))


def _describe(tb: TangentBasis) -> dict:
    rank = np.asarray(tb.rank)
    return {"shape": list(np.shape(tb.basis)), "rank_min": int(rank.min()) if rank.size else 0,
            "rank_max": int(rank.max()) if rank.size else 0}


def _read_tangent_basis(path: str) -> TangentBasis:
    basis, rank = io_lib.load_npz(path, "basis"), io_lib.load_npz(path, "rank")
    return TangentBasis(basis=jnp.asarray(basis), rank=jnp.asarray(rank))


def cached_tangent_basis(path: str, settings: dict, compute_fn: Callable[[], TangentBasis], *,
                         log: Callable[[str], None] | None = None) -> TangentBasis:
    """Return the tangent basis cached at ``path`` if it was made with ``settings``.

    Otherwise call ``compute_fn()`` (returning a `TangentBasis`, or a basis array (n, d, k)
    or (d, k); a shared (d, k) array is kept shared, with a scalar ``rank``), store
    the result with ``settings`` (`pagjax.cache`: the npz, and a record ``path + '.json'``
    with the settings and a digest, written atomically), and return it. A damaged entry is
    computed again, said in `log` (or a warning). ``settings`` must be a JSON-serialisable
    dict describing everything that determines the basis (data, model checkpoint, latent
    points, rank_tol, ...): compute it once, reuse it for every model.
    """
    def compute() -> TangentBasis:
        tb = compute_fn()
        if not isinstance(tb, TangentBasis):
            arr = jnp.asarray(tb)
            check_basis("compute_fn()", arr)
            rank = jnp.full(arr.shape[:-2], arr.shape[-1], jnp.int32)
            tb = TangentBasis(basis=arr, rank=rank)
        return tb

    return cache_lib.cached(path, settings, compute, _write_npz, _read_tangent_basis, what="tangent basis", log=log,
                            describe=_describe)
