"""Tests for pagjax.autoencoder: training, learned tangent spaces, orbax checkpoints."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagjax import autoencoder as ae_lib
from pagjax.geometry import principal_angles, tangent_basis_from_generator

D, K = 16, 3


@pytest.fixture(scope="module")
def trained():
    ku, km, kz, kt = jax.random.split(jax.random.PRNGKey(0), 4)
    u, _ = jnp.linalg.qr(jax.random.normal(ku, (D, K)))
    mean = 0.3 * jax.random.normal(km, (D,))
    z = jax.random.normal(kz, (512, K))
    x = (mean + z @ u.T).reshape(512, 4, 4, 1)
    ae = ae_lib.train_autoencoder(x, latent_dim=K, steps=300, key=kt, batch_size=64,
                                  learning_rate=1e-2, hidden=(32,), log_every=1)
    return dict(u=u, x=x, ae=ae)


@pytest.mark.slow  # through the module fixture `trained`
def test_autoencoder_on_linear_manifold_recovers_its_subspace(trained):
    ae, x, u = trained["ae"], trained["x"], trained["u"]
    assert ae.losses.shape == (300,) and ae.steps_logged.tolist() == list(range(1, 301))
    assert float(ae.losses[-20:].mean()) < 0.01 * float(ae.losses[0])
    tb = ae_lib.learned_tangent_basis(ae, x[:16])
    assert tb.basis.shape == (16, D, K)
    np.testing.assert_array_equal(tb.rank, K)
    gram = jnp.einsum("ndk,ndj->nkj", tb.basis, tb.basis)
    np.testing.assert_allclose(gram, jnp.broadcast_to(jnp.eye(K), gram.shape), atol=1e-5)
    angles = principal_angles(tb.basis, u)
    assert float(angles.max()) < 0.3 and float(angles.mean()) < 0.1
    # far better than a random 3-d subspace of R^16 (largest angle typically > 1 rad)
    rand, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(9), (D, K)))
    assert float(principal_angles(rand, u).max()) > 3 * float(angles.max())


@pytest.mark.slow  # through the module fixture `trained`
def test_learned_basis_is_the_decoder_jacobian_at_the_code(trained):
    ae, x = trained["ae"], trained["x"][:4]
    tb = ae_lib.learned_tangent_basis(ae, x)
    code = ae_lib.encode(ae, x)
    ref = tangent_basis_from_generator(lambda z: ae_lib.decode(ae, z), code)
    assert float(principal_angles(tb.basis, ref.basis).max()) < 1e-3
    # raw params + model give the same
    tb2 = ae_lib.learned_tangent_basis(ae.params, x, model=ae.model)
    np.testing.assert_allclose(tb2.basis, tb.basis, atol=1e-6)


@pytest.mark.slow  # through the module fixture `trained`
def test_checkpoint_round_trip(trained, tmp_path):
    ae, x = trained["ae"], trained["x"][:4]
    path = tmp_path / "ae"
    ae_lib.save_autoencoder(str(path), ae, extra={"data": "linear"})
    ae_lib.save_autoencoder(str(path), ae)  # overwriting works
    loaded = ae_lib.load_autoencoder(str(path))
    assert loaded.model == ae.model
    np.testing.assert_allclose(ae_lib.decode(loaded, ae_lib.encode(loaded, x)),
                               ae.model.apply(ae.params, x), atol=1e-6)
    with pytest.raises(ValueError, match="no autoencoder checkpoint"):
        ae_lib.load_autoencoder(str(tmp_path / "missing"))


def test_conv_autoencoder_tangent_basis_shape_and_orthonormality():
    model = ae_lib.make_autoencoder((8, 8, 3), 5, arch="conv", features=(4, 8))
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8, 3))
    params = model.init(jax.random.PRNGKey(2), x)
    assert model.apply(params, x).shape == x.shape
    tb = ae_lib.learned_tangent_basis(params, x, model=model)
    assert tb.basis.shape == (2, 192, 5)
    np.testing.assert_array_equal(tb.rank, 5)
    gram = jnp.einsum("ndk,ndj->nkj", tb.basis, tb.basis)
    np.testing.assert_allclose(gram, jnp.broadcast_to(jnp.eye(5), gram.shape), atol=1e-4)


def test_conv_decoder_upsamplings_share_shapes_and_old_checkpoints_load_as_transpose(tmp_path):
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8, 1))
    counts = {}
    for up in ae_lib.UPSAMPLES:
        model = ae_lib.make_autoencoder((8, 8, 1), 3, arch="conv", features=(4, 8), upsample=up)
        params = model.init(jax.random.PRNGKey(2), x)
        assert model.apply(params, x).shape == x.shape
        counts[up] = sum(a.size for a in jax.tree.leaves(params))
    # resize + conv has exactly the transposed convolution's parameters
    assert len(set(counts.values())) == 1
    assert ae_lib.make_autoencoder((8, 8, 1), 3, arch="conv").upsample == "transpose"
    with pytest.raises(ValueError, match="upsample"):
        ae_lib.make_autoencoder((8, 8, 1), 3, arch="conv", upsample="cubic")
    # checkpoints written before the option existed hold a transposed-conv decoder
    model = ae_lib.make_autoencoder((8, 8, 1), 3, arch="conv", features=(4, 8), upsample="transpose")
    ae = ae_lib.TrainedAutoencoder(model, model.init(jax.random.PRNGKey(2), x), jnp.zeros((0,)))
    ae_lib.save_autoencoder(str(tmp_path), ae)
    cfg_path = tmp_path / "config.json"
    record = json.loads(cfg_path.read_text())
    del record["model"]["upsample"]
    cfg_path.write_text(json.dumps(record))
    loaded = ae_lib.load_autoencoder(str(tmp_path))
    assert loaded.model.upsample == "transpose"
    np.testing.assert_allclose(loaded.model.apply(loaded.params, x), model.apply(ae.params, x), atol=1e-6)


def test_autoencoder_bad_arguments():
    x = jnp.ones((4, 6, 6, 1))
    with pytest.raises(ValueError, match="divisible by 4"):
        ae_lib.train_autoencoder(x, latent_dim=2, steps=1, key=jax.random.PRNGKey(0), arch="conv")
    with pytest.raises(ValueError, match="arch"):
        ae_lib.make_autoencoder((6,), 2, arch="vae")
    with pytest.raises(ValueError, match="latent_dim"):
        ae_lib.make_autoencoder((6,), 0)
    with pytest.raises(ValueError, match="steps"):
        ae_lib.train_autoencoder(x, latent_dim=2, steps=0, key=jax.random.PRNGKey(0))
    model = ae_lib.make_autoencoder((6, 6, 1), 2)
    with pytest.raises(ValueError, match="model is required"):
        ae_lib.learned_tangent_basis({}, x)
    with pytest.raises(ValueError, match="example shape"):
        ae_lib.learned_tangent_basis({}, jnp.ones((2, 5, 5, 1)), model=model)
