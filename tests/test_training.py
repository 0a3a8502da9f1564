import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import NUM_FAKE_DEVICES
from helpers import toy_task
from pagjax import devices
from pagjax import io as io_lib
from pagjax.models import build_model
from pagjax.objectives import make_objective
from pagjax.training import (
    OptimizerConfig,
    TrainConfig,
    batch_indices,
    create_train_state,
    make_optimizer,
    make_train_step,
    make_update_fn,
    train,
)


def _state_and_step(method="gradnorm", model_name="mlp:width=16", opt=OptimizerConfig(), pgd_steps=2, **model_options):
    model = build_model(model_name, 2, **model_options)
    optimizer = make_optimizer(opt, 100)
    x, y = toy_task(32)
    state = create_train_state(model, optimizer, jax.random.key(0), jnp.asarray(x))
    update = make_update_fn(model, make_objective(method, pgd_steps=pgd_steps), optimizer)
    return state, update, jnp.asarray(x), jnp.asarray(y)


def _fresh(method="noise", model_name="mlp:width=16"):
    """(model, optimizer, objective, initial state, x, y): create again for an identical state."""
    model = build_model(model_name, 2)
    optimizer = make_optimizer(OptimizerConfig(), 100)
    x, y = toy_task(32)
    state = create_train_state(model, optimizer, jax.random.key(0), jnp.asarray(x))
    return model, optimizer, make_objective(method), state, jnp.asarray(x), jnp.asarray(y)


def test_train_step_compiles_once_for_all_strengths_keys_and_steps():
    model, optimizer, objective, state, x, y = _fresh("gradnorm")

    # The objective is called once per trace of make_train_step's own jit: a retrace fails here.
    @chex.assert_max_traces(n=1)
    def counted(*args):
        return objective(*args)

    step = make_train_step(model, counted, optimizer)
    for i, strength in enumerate([0.0, 0.1, jnp.float32(3.0), 2]):  # Python numbers and arrays
        state, metrics = step(state, x, y, jax.random.key(i), strength)
    assert int(state.step) == 4
    assert bool(metrics["finite"])
    assert step.jitted._cache_size() == 1


def test_per_step_key_is_fold_in_of_the_key_and_the_step_counter():
    """The update at step 5 draws its noise from fold_in(key, 5), not from key itself."""
    model, optimizer, objective, state, x, y = _fresh("noise")
    key = jax.random.key(7)
    new, _ = jax.jit(make_update_fn(model, objective, optimizer))(state._replace(step=jnp.int32(5)), x, y, key, 0.5)
    forward = lambda p, inputs: model.forward({"params": p}, inputs)  # noqa: E731

    def by_hand(step_key):
        grads = jax.grad(lambda p: jnp.mean(objective(forward, p, x, y, step_key, 0.5)[0]))(state.params)
        updates, _ = optimizer.update(grads, state.opt_state, state.params)
        return optax.apply_updates(state.params, updates)

    chex.assert_trees_all_close(new.params, by_hand(jax.random.fold_in(key, 5)), rtol=1e-5, atol=1e-7)
    for other in (key, jax.random.fold_in(key, 4)):  # the noise really depends on the step's key
        diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new.params, by_hand(other))
        assert max(jax.tree.leaves(diff)) > 1e-5


def test_a_run_resumed_from_a_checkpoint_on_disk_equals_an_uninterrupted_one(tmp_path):
    model, optimizer, objective, state, x, y = _fresh("noise")
    step = make_train_step(model, objective, optimizer)
    key = jax.random.key(7)
    for _ in range(4):
        state, _ = step(state, x, y, key, jnp.float32(0.5))
    interrupted = _fresh("noise")[3]
    for _ in range(2):
        interrupted, _ = step(interrupted, x, y, key, jnp.float32(0.5))
    ckpt = io_lib.Checkpointer(str(tmp_path))
    ckpt.save(2, interrupted)
    ckpt.close()
    ckpt = io_lib.Checkpointer(str(tmp_path))
    saved_step, resumed = ckpt.restore_latest(_fresh("noise")[3])  # a new process would start here
    ckpt.close()
    assert saved_step == 2 and int(resumed.step) == 2
    for _ in range(2):
        resumed, _ = step(resumed, x, y, key, jnp.float32(0.5))
    chex.assert_trees_all_close(state.params, resumed.params, rtol=0, atol=0)
    chex.assert_trees_all_close(state.opt_state, resumed.opt_state, rtol=0, atol=0)


def test_non_finite_update_is_skipped_and_reported():
    state, update, x, y = _state_and_step()
    step = jax.jit(update)
    bad_x = x.at[0, 0, 0, 0].set(jnp.nan)
    new, metrics = step(state, bad_x, y, jax.random.key(0), 0.1)
    assert not bool(metrics["finite"])
    chex.assert_trees_all_equal(new.params, state.params)
    assert int(new.step) == int(state.step) + 1


@pytest.mark.parametrize("method", ["ce", "gradnorm", "pgd"])
def test_step_sharded_over_fake_devices_matches_single_device(method):
    assert len(jax.devices()) == NUM_FAKE_DEVICES
    state, update, x, y = _state_and_step(method=method)
    step = jax.jit(update)
    key = jax.random.key(3)
    single, m1 = step(state, x, y, key, 0.1)
    mesh = devices.make_mesh()
    xs, ys = devices.shard_leading(mesh, (x, y))
    assert len(xs.sharding.device_set) == NUM_FAKE_DEVICES
    sharded, m2 = step(devices.replicate(mesh, state), xs, ys, key, 0.1)
    chex.assert_trees_all_close(single.params, sharded.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)


def test_batch_norm_statistics_are_threaded_through_training():
    # one residual block (stages=(1,)) keeps BatchNorm in the stem and the block, and compiles
    # several times faster than eight (gradnorm differentiates twice)
    state, update, x, y = _state_and_step(method="gradnorm", model_name="resnet18:width=4", stages=(1,))
    before = jax.tree.leaves(state.model_state)
    new, metrics = jax.jit(update)(state, x, y, jax.random.key(0), 0.1)
    after = jax.tree.leaves(new.model_state)
    assert bool(metrics["finite"])
    assert any(not np.allclose(a, b) for a, b in zip(after, before))


def test_train_learns_a_simple_task_with_every_method():
    x, y = toy_task(512)
    for method, strength in [("ce", 0.0), ("gradnorm", 0.01), ("smoothness", 0.1), ("noise", 0.05), ("pgd", 0.1)]:
        cfg = TrainConfig(model="mlp:width=32", method=method, strength=strength, steps=150, batch_size=64, pgd_steps=2,
                          optimizer=OptimizerConfig(learning_rate=3e-3))
        result = train(cfg, x, y, num_classes=2, progress=False, log_every=10)
        assert not result.diverged
        assert result.history["accuracy"][-3:].mean() > 0.8, method
        assert result.history["ce"][-3:].mean() < result.history["ce"][0]


def test_train_reports_divergence():
    x, y = toy_task(128)
    cfg = TrainConfig(model="mlp:width=16", method="ce", steps=50, batch_size=32,
                      optimizer=OptimizerConfig(name="sgd", learning_rate=1e30))
    result = train(cfg, x * 1e10, y, num_classes=2, progress=False, log_every=1)
    assert result.diverged and result.diverged_at is not None
    assert not result.history["finite"][-1]


def test_paper_schedule_divides_the_learning_rate_by_ten_twice():
    opt = make_optimizer(OptimizerConfig(name="sgd", learning_rate=1.0, momentum=0.0, schedule="piecewise"), 200)
    params = {"w": jnp.zeros(())}
    state = opt.init(params)
    lrs = []
    for _ in range(200):
        upd, state = opt.update({"w": jnp.ones(())}, state, params)
        lrs.append(-float(upd["w"]))
    np.testing.assert_allclose([lrs[0], lrs[149], lrs[150], lrs[174], lrs[175], lrs[199]], [1, 1, 0.1, 0.1, 0.01, 0.01], rtol=1e-6)


def test_batch_indices_are_epoch_permutations_and_pure():
    key = jax.random.key(0)
    epoch = np.concatenate([np.asarray(batch_indices(key, s, 40, 10)) for s in range(4)])
    assert sorted(epoch.tolist()) == list(range(40))
    np.testing.assert_array_equal(batch_indices(key, 5, 40, 10), batch_indices(key, 5, 40, 10))
    assert not np.array_equal(batch_indices(key, 4, 40, 10), batch_indices(key, 0, 40, 10))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(strength=-0.1), "strength"),
        (dict(strength=float("inf")), "strength"),
        (dict(method="fgsm"), "method"),
        (dict(model="vit"), "model name"),
        (dict(steps=0), "steps"),
        (dict(batch_size=1000), "batch_size"),
        (dict(optimizer=OptimizerConfig(name="lamb")), "optimizer"),
    ],
)
def test_train_rejects_bad_configs_before_compiling(change, match):
    x, y = toy_task(64)
    cfg = TrainConfig(**{"model": "mlp:width=8", "steps": 5, "batch_size": 16, **change})
    with pytest.raises(ValueError, match=match):
        train(cfg, x, y, num_classes=2, progress=False)


def test_train_rejects_bad_arrays():
    x, y = toy_task(64)
    cfg = TrainConfig(model="mlp:width=8", steps=5, batch_size=16)
    with pytest.raises(ValueError, match="y must lie in"):
        train(cfg, x, y + 5, num_classes=2, progress=False)
    with pytest.raises(ValueError, match="rank 4"):
        train(cfg, x.reshape(64, -1), y, num_classes=2, progress=False)
    with pytest.raises(ValueError, match="floating"):
        train(cfg, (x * 255).astype(np.uint8), y, num_classes=2, progress=False)
    step = make_train_step(build_model("mlp:width=8", 2), make_objective("ce"), optax.adam(1e-3))
    with pytest.raises(ValueError, match="strength"):
        step(None, jnp.asarray(x), jnp.asarray(y), jax.random.key(0), -1.0)
