"""Tests for pagjax.geometry: JVP tangent bases, projections, principal angles, the cache."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagjax import geometry
from pagjax.geometry import (
    TangentBasis,
    cached_tangent_basis,
    generator_jacobian,
    principal_angles,
    project_normal,
    project_tangent,
    tangent_basis_from_generator,
)

IMG = (4, 4, 1)
D = 16
K = 3


def random_subspace(key, d, k):
    q, _ = jnp.linalg.qr(jax.random.normal(key, (d, k)))
    return q


def linear_generator(u, mean):
    """z (n, k) -> mean + U z, image shaped (n, 4, 4, 1)."""
    return lambda z: jnp.reshape(mean + z @ u.T, (z.shape[0],) + IMG)


def blob_generator(z):
    """Gaussian blob on an 8x8 grid: latent (cx, cy, log width) -> image (n, 8, 8, 1)."""
    grid = jnp.arange(8.0)
    cx, cy, logw = z[:, 0, None, None], z[:, 1, None, None], z[:, 2, None, None]
    w = jnp.exp(logw)
    img = jnp.exp(-((grid[None, :, None] - cx) ** 2 + (grid[None, None, :] - cy) ** 2) / (2 * w**2))
    return img[..., None]


@pytest.fixture(scope="module")
def subspace():
    ku, km = jax.random.split(jax.random.PRNGKey(0))
    return random_subspace(ku, D, K), jax.random.normal(km, (D,))


# --------------------------------------------------------------------- projections


@pytest.mark.parametrize("per_example", [False, True])
@pytest.mark.parametrize("image_shaped", [False, True])
def test_projections_idempotent_orthogonal_norm_splitting(per_example, image_shaped):
    n = 5
    kb, kv = jax.random.split(jax.random.PRNGKey(1))
    if per_example:
        basis = jax.vmap(lambda k: random_subspace(k, D, K))(jax.random.split(kb, n))
    else:
        basis = random_subspace(kb, D, K)
    v = jax.random.normal(kv, (n,) + (IMG if image_shaped else (D,)))
    t = project_tangent(v, basis)
    nrm = project_normal(v, basis)
    assert t.shape == v.shape and nrm.shape == v.shape
    # idempotent
    np.testing.assert_allclose(project_tangent(t, basis), t, atol=1e-5)
    np.testing.assert_allclose(project_normal(nrm, basis), nrm, atol=1e-5)
    np.testing.assert_allclose(project_tangent(nrm, basis), 0.0, atol=1e-5)
    # complementary and orthogonal
    np.testing.assert_allclose(t + nrm, v, atol=1e-6)
    flat_t, flat_n, flat_v = (a.reshape(n, -1) for a in (t, nrm, v))
    np.testing.assert_allclose(jnp.sum(flat_t * flat_n, -1), 0.0, atol=1e-5)
    # Pythagoras: the norm splits
    np.testing.assert_allclose(
        jnp.sum(flat_t**2, -1) + jnp.sum(flat_n**2, -1), jnp.sum(flat_v**2, -1), rtol=1e-5
    )
    # the projection is non-trivial (k/d of the energy on average, not 0 or all)
    frac = jnp.sum(flat_t**2) / jnp.sum(flat_v**2)
    assert 0.02 < float(frac) < 0.6


def test_projection_accepts_tangent_basis_tuple(subspace):
    u, _ = subspace
    tb = TangentBasis(basis=jnp.broadcast_to(u, (2, D, K)), rank=jnp.array([K, K]))
    v = jax.random.normal(jax.random.PRNGKey(2), (2, D))
    np.testing.assert_allclose(project_tangent(v, tb), project_tangent(v, u), atol=1e-6)


# --------------------------------------------------------------------- JVP tangent bases


def test_jvp_basis_spans_linear_manifold_exactly(subspace):
    u, mean = subspace
    z = jax.random.normal(jax.random.PRNGKey(3), (6, K))
    tb = tangent_basis_from_generator(linear_generator(u, mean), z)
    assert tb.basis.shape == (6, D, K)
    np.testing.assert_array_equal(tb.rank, K)
    # orthonormal columns
    gram = jnp.einsum("ndk,ndj->nkj", tb.basis, tb.basis)
    np.testing.assert_allclose(gram, jnp.broadcast_to(jnp.eye(K), gram.shape), atol=1e-5)
    # same subspace as U: principal angles ~ 0 and U is fixed by the projector
    angles = principal_angles(tb.basis, u)
    assert angles.shape == (6, K)
    assert float(jnp.max(angles)) < 1e-3
    pu = project_tangent(jnp.broadcast_to(u.T[None], (6, K, D)).reshape(6 * K, D),
                         jnp.repeat(tb.basis, K, axis=0))
    np.testing.assert_allclose(pu, jnp.tile(u.T, (6, 1)), atol=1e-5)


def test_jvp_jacobian_matches_finite_differences_on_curved_manifold():
    z = jnp.array([[3.2, 4.1, 0.3], [2.0, 5.5, 0.0], [4.5, 3.0, 0.5]], jnp.float32)
    jac = generator_jacobian(blob_generator, z)  # (n, 64, 3)
    assert jac.shape == (3, 64, 3)
    h = 1e-2
    for j in range(3):
        e = jnp.zeros(3).at[j].set(h)
        fd = (blob_generator(z + e) - blob_generator(z - e)).reshape(3, -1) / (2 * h)
        scale = float(jnp.max(jnp.abs(fd)))
        np.testing.assert_allclose(jac[:, :, j], fd, atol=2e-3 * scale)
    tb = tangent_basis_from_generator(blob_generator, z)
    np.testing.assert_array_equal(tb.rank, 3)
    # the FD tangent vectors lie in the JVP tangent space (curved: it varies with z)
    fd_all = jnp.stack(
        [(blob_generator(z + h * jnp.eye(3)[j]) - blob_generator(z - h * jnp.eye(3)[j])).reshape(3, -1) / (2 * h)
         for j in range(3)], axis=1)  # (n, 3, d)
    for j in range(3):
        resid = project_normal(fd_all[:, j], tb)
        rel = jnp.linalg.norm(resid, axis=-1) / jnp.linalg.norm(fd_all[:, j], axis=-1)
        assert float(jnp.max(rel)) < 1e-3
    # different points have different tangent spaces
    assert float(jnp.max(principal_angles(tb.basis[0], tb.basis[1]))) > 0.1


def test_rank_deficient_generator_reports_rank_and_zero_columns(subspace):
    u, mean = subspace
    mix = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # 3 latents, rank 2

    def gen(z):
        return (mean + (z @ mix) @ u[:, :2].T).reshape((z.shape[0],) + IMG)

    tb = tangent_basis_from_generator(gen, jax.random.normal(jax.random.PRNGKey(4), (2, 3)))
    np.testing.assert_array_equal(tb.rank, 2)
    np.testing.assert_allclose(tb.basis[:, :, 2], 0.0, atol=0)
    assert float(jnp.max(principal_angles(tb.basis[:, :, :2], u[:, :2]))) < 1e-3


# --------------------------------------------------------------------- principal angles


def test_principal_angles_closed_form():
    d = 10
    e = jnp.eye(d)
    for theta in (1e-4, 0.3, 1.2, np.pi / 2):
        a = e[:, :2]
        b = jnp.stack([e[:, 0], np.cos(theta) * e[:, 1] + np.sin(theta) * e[:, 5]], axis=1)
        ang = principal_angles(a, b)
        np.testing.assert_allclose(ang, [0.0, theta], atol=2e-6, rtol=1e-4)
        np.testing.assert_allclose(principal_angles(b, a), ang, atol=1e-6)
    # unequal dimensions: min(ka, kb) angles; a 1-d line inside a plane has angle 0
    line = (e[:, 0:1] + e[:, 1:2]) / np.sqrt(2)
    np.testing.assert_allclose(principal_angles(e[:, :2], line), [0.0], atol=1e-6)
    np.testing.assert_allclose(principal_angles(e[:, 2:4], line), [np.pi / 2], atol=1e-6)


# --------------------------------------------------------------------- cache


def test_cached_tangent_basis_computes_once_and_respects_settings(tmp_path, subspace):
    u, mean = subspace
    z = jax.random.normal(jax.random.PRNGKey(5), (3, K))
    calls = []

    def compute():
        calls.append(1)
        return tangent_basis_from_generator(linear_generator(u, mean), z)

    path = str(tmp_path / "cache" / "tangent.npz")
    settings = {"data": "linear", "n": 3, "rank_tol": 1e-6, "shape": (4, 4, 1)}
    first = cached_tangent_basis(path, settings, compute)
    second = cached_tangent_basis(path, dict(settings), compute)
    assert len(calls) == 1
    np.testing.assert_array_equal(first.basis, second.basis)
    np.testing.assert_array_equal(first.rank, second.rank)
    meta = json.load(open(path + ".json"))
    assert meta["settings"]["data"] == "linear" and meta["shape"] == [3, D, K]
    # other settings -> recompute and overwrite
    cached_tangent_basis(path, {**settings, "n": 4}, compute)
    assert len(calls) == 2
    cached_tangent_basis(path, {**settings, "n": 4}, compute)
    assert len(calls) == 2
    # no temp files left behind
    assert sorted(os.listdir(tmp_path / "cache")) == ["tangent.npz", "tangent.npz.json"]
    # a corrupt file is recomputed, not trusted
    with open(path, "wb") as f:
        f.write(b"garbage")
    with pytest.warns(RuntimeWarning, match="tangent.npz is damaged"):
        cached_tangent_basis(path, {**settings, "n": 4}, compute)
    assert len(calls) == 3
    with pytest.raises(ValueError, match="settings"):
        cached_tangent_basis(path, {"f": object()}, compute)


# --------------------------------------------------------------------- errors


def test_bad_shapes_give_clear_errors(subspace):
    u, mean = subspace
    v = jnp.ones((4, D))
    with pytest.raises(ValueError, match="basis.*wrong size"):
        project_tangent(v, jnp.ones((D + 1, K)))
    with pytest.raises(ValueError, match="basis.*3 examples.*4"):
        project_tangent(v, jnp.ones((3, D, K)))
    with pytest.raises(ValueError, match="basis.*shape"):
        project_tangent(v, jnp.ones((D,)))
    with pytest.raises(ValueError, match="more columns than rows"):
        project_tangent(v, jnp.ones((D, D + 1)))
    with pytest.raises(ValueError, match="v must be batch first"):
        project_normal(jnp.ones((D,)), u)
    with pytest.raises(ValueError, match="z must have rank 2"):
        tangent_basis_from_generator(linear_generator(u, mean), jnp.ones((K,)))
    with pytest.raises(ValueError, match="rank_tol"):
        tangent_basis_from_generator(linear_generator(u, mean), jnp.ones((2, K)), rank_tol=-1.0)
    with pytest.raises(ValueError, match="basis_b.*wrong size"):
        principal_angles(u, jnp.ones((D - 1, 2)))


def test_gram_orthonormalization_matches_svd():
    # tall Jacobians with a spread of singular values, one exactly rank deficient
    key = jax.random.PRNGKey(6)
    ka, kb = jax.random.split(key)
    left, _ = jnp.linalg.qr(jax.random.normal(ka, (64, 6)))
    right, _ = jnp.linalg.qr(jax.random.normal(kb, (6, 6)))
    sv = jnp.array([[10.0, 3.0, 1.0, 0.3, 0.1, 0.05], [5.0, 2.0, 1.0, 0.5, 0.2, 0.0]])
    jac = jnp.einsum("dk,nk,kj->ndj", left, sv, right)
    svd = geometry.orthonormalize(jac, method="svd")
    gram = geometry.orthonormalize(jac, method="gram")
    np.testing.assert_array_equal(svd.rank, [6, 5])
    np.testing.assert_array_equal(gram.rank, [6, 5])
    gtg = jnp.einsum("ndk,ndj->nkj", gram.basis, gram.basis)
    expected = np.stack([np.eye(6), np.diag([1.0] * 5 + [0.0])])
    np.testing.assert_allclose(gtg, expected, atol=1e-5)
    np.testing.assert_allclose(gram.basis[1, :, 5], 0.0, atol=0)
    assert float(jnp.max(principal_angles(gram.basis[0], svd.basis[0]))) < 1e-3
    assert float(jnp.max(principal_angles(gram.basis[1, :, :5], svd.basis[1, :, :5]))) < 1e-3
    # the same through the generator API
    u, _ = jnp.linalg.qr(jax.random.normal(key, (D, K)))
    gen = linear_generator(u, jnp.zeros(D))
    tb = tangent_basis_from_generator(gen, jnp.ones((2, K)), method="gram")
    assert float(jnp.max(principal_angles(tb.basis, u))) < 1e-3
    with pytest.raises(ValueError, match="method"):
        tangent_basis_from_generator(gen, jnp.ones((2, K)), method="qr")


def test_cholesky_orthonormalization_and_chunked_jacobian_agree_with_defaults():
    key = jax.random.PRNGKey(7)
    jac = jax.random.normal(key, (3, 64, 6)) * jnp.array([1.0, 0.5, 0.2, 0.1, 0.05, 0.02])
    svd = geometry.orthonormalize(jac, method="svd")
    chol = geometry.orthonormalize(jac, method="cholesky")
    np.testing.assert_array_equal(chol.rank, 6)
    gtg = jnp.einsum("ndk,ndj->nkj", chol.basis, chol.basis)
    np.testing.assert_allclose(gtg, np.broadcast_to(np.eye(6), gtg.shape), atol=1e-5)
    assert float(jnp.max(principal_angles(chol.basis, svd.basis))) < 1e-3
    # an exactly repeated column is detected and dropped
    dup = jac.at[:, :, 3].set(jac[:, :, 1])
    chol_dup = geometry.orthonormalize(dup, method="cholesky")
    np.testing.assert_array_equal(chol_dup.rank, 5)
    np.testing.assert_allclose(chol_dup.basis[:, :, 3], 0.0, atol=0)
    assert float(jnp.max(principal_angles(chol_dup.basis[:, :, jnp.array([0, 1, 2, 4, 5])],
                                          geometry.orthonormalize(dup, method="svd").basis[:, :, :5]))) < 1e-3
    # chunked JVPs give the same Jacobian
    z = jnp.array([[3.2, 4.1, 0.3], [2.0, 5.5, 0.0], [4.5, 3.0, 0.5]], jnp.float32)
    full = generator_jacobian(blob_generator, z)
    chunked = generator_jacobian(blob_generator, z, direction_chunk=2, example_chunk=2)
    np.testing.assert_allclose(chunked, full, atol=1e-6)
