"""The one training engine: batches, step loops, divergence, checkpoints, compilation."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagjax import engine
from pagjax import io as io_lib

N, B = 24, 4  # 6 batches per epoch


def _data():
    x = jnp.arange(N, dtype=jnp.float32)
    return x, x * 2.0


def _sum_step(state, batch):
    """A linear 'model' whose state records every example it saw (order-sensitive hash)."""
    step, total, trace = state
    x, y = batch
    trace = trace * 1.0001 + jnp.sum(x * (1 + jnp.arange(x.shape[0])))
    return (step + 1, total + jnp.sum(y), trace), {"loss": jnp.sum(x), "finite": jnp.isfinite(trace)}


def _init():
    return jnp.zeros((), jnp.int32), jnp.zeros(()), jnp.zeros(())


def test_batches_are_epoch_permutations_pure_in_key_and_step():
    key = jax.random.key(3)
    epoch = np.concatenate([np.asarray(engine.batch_indices(key, s, N, B)) for s in range(N // B)])
    assert sorted(epoch.tolist()) == list(range(N))
    nxt = np.concatenate([np.asarray(engine.batch_indices(key, s, N, B)) for s in range(N // B, 2 * N // B)])
    assert sorted(nxt.tolist()) == list(range(N)) and not np.array_equal(epoch, nxt)
    np.testing.assert_array_equal(engine.batch_indices(key, 7, N, B), engine.batch_indices(key, 7, N, B))


def test_the_loop_feeds_exactly_the_batches_of_batch_indices():
    key = jax.random.key(1)

    def step(state, batch):
        return state + 1, {"loss": jnp.float32(0), "finite": jnp.bool_(True), "first": batch[0]}

    for loop in ("device", "host"):
        res = engine.train_loop(lambda s, b: step(s, b), jnp.zeros((), jnp.int32), jnp.arange(N), key, steps=15,
                                batch_size=B, steps_per_call=1, step_loop=loop)
        seen = res.history["first"].tolist()
        expected = [int(engine.batch_indices(key, s, N, B)[0]) for s in range(15)]
        assert seen == expected, loop
        assert res.history["step"].tolist() == list(range(1, 16))


def test_device_and_host_loops_and_chunk_sizes_give_the_same_state():
    results = []
    for loop, per_call in [("device", 100), ("device", 5), ("host", 7)]:
        r = engine.train_loop(_sum_step, _init(), _data(), jax.random.key(0), steps=20, batch_size=B,
                              step_loop=loop, steps_per_call=per_call)
        results.append(r.state)
    for other in results[1:]:
        chex.assert_trees_all_close(results[0], other, rtol=1e-6)
    assert int(results[0][0]) == 20
    # every example of every epoch was seen once per epoch: 20 steps = 3 epochs + 2 batches
    assert float(results[0][1]) > 0


def test_chunks_end_on_epoch_ends_multiples_and_checkpoints():
    r = engine.train_loop(_sum_step, _init(), _data(), jax.random.key(0), steps=20, batch_size=B, steps_per_call=4)
    assert r.history["step"].tolist() == [4, 6, 8, 12, 16, 18, 20]


class _SaveRecorder:
    """A checkpointer that records the steps it was asked to save (nothing to restore)."""

    def __init__(self):
        self.saved = []

    def restore_latest(self, like):
        return None

    def save(self, step, tree):
        self.saved.append(step)


@pytest.mark.parametrize("policy, expected", [
    (dict(), [4, 6, 8, 12, 16, 18, 20]),  # neither: every chunk
    (dict(checkpoint_every=8), [8, 16, 20]),  # steps (chunks end at the checkpoints)
    (dict(checkpoint_seconds=1e-9), [4, 6, 8, 12, 16, 18, 20]),  # every chunk has taken that long
    (dict(checkpoint_seconds=1e9), [20]),  # never due: only the final state
    (dict(checkpoint_every=8, checkpoint_seconds=1e9), [8, 16, 20]),  # whichever comes first
])
def test_checkpoints_are_saved_by_steps_or_by_time(policy, expected):
    rec = _SaveRecorder()
    engine.train_loop(_sum_step, _init(), _data(), jax.random.key(0), steps=20, batch_size=B, steps_per_call=4,
                      checkpointer=rec, **policy)
    assert rec.saved == expected


def test_one_compilation_serves_every_chunk_length():
    def traces(steps, step_loop="device"):
        count = [0]

        def step(state, batch):
            count[0] += 1  # runs once per trace, never per step
            return _sum_step(state, batch)

        engine.train_loop(step, _init(), _data(), jax.random.key(0), steps=steps, batch_size=B, steps_per_call=4,
                          step_loop=step_loop)
        return count[0]

    # the first step's trace (metrics, loop choice) and the device loop's own
    assert traces(4) == 2
    assert traces(23) == 2  # chunks of 4, 2, 2, 4, 4, 2, 4, 1 steps: no retrace
    # a host loop runs the first trace's program: one trace for every step
    assert traces(23, step_loop="host") == 1
    assert traces(23, step_loop="auto") == 2  # no convolution: the device loop


def test_convolutions_choose_the_host_loop_on_cpu_only():
    kernel = jnp.ones((3, 3, 1, 2))

    def conv(x):
        return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    x = jnp.ones((1, 8, 8, 1))
    assert engine.uses_convolution(conv, x)
    assert engine.uses_convolution(jax.grad(lambda x: jnp.sum(jax.lax.fori_loop(0, 2, lambda i, h: h + conv(x), conv(x)))), x)
    assert not engine.uses_convolution(lambda x: jnp.tanh(x) @ jnp.ones((1, 3)), x)
    assert engine.choose_step_loop(True, backend="cpu") == "host"
    assert engine.choose_step_loop(True, backend="gpu") == "device"
    assert engine.choose_step_loop(False, backend="cpu") == "device"


def _blowup_step(state, batch):
    """Model k's loss becomes inf from step `state.limit` on; the update is then skipped."""
    step, value, limit = state
    bad = step >= limit
    loss = jnp.where(bad, jnp.inf, jnp.sum(batch))
    finite = jnp.isfinite(loss)
    new_value = engine.skip_nonfinite(value + 1.0, value, finite)
    return (step + 1, new_value, limit), {"loss": loss, "finite": finite}


@pytest.mark.parametrize("models", ["vmap", "loop", "sharded"])
def test_nonfinite_steps_are_skipped_and_flagged_per_model(models):
    k = 3
    state = (jnp.zeros((k,), jnp.int32), jnp.zeros((k,)), jnp.asarray([100, 5, 9], jnp.int32))
    keys = jax.random.split(jax.random.key(0), k)
    r = engine.train_loop(_blowup_step, state, jnp.arange(N, dtype=jnp.float32), keys, steps=12, batch_size=B,
                          models=models, steps_per_call=4)
    assert r.nonfinite.tolist() == [False, True, True]
    np.testing.assert_allclose(r.state[1], [12, 5, 9])  # updates stopped at the first bad step
    assert r.first_nonfinite.tolist() == [-1, 6, 12]  # the end of the chunk where it happened
    assert np.asarray(r.state[0]).tolist() == [12, 12, 12]


def test_stop_when_every_model_diverged():
    state = (jnp.zeros((), jnp.int32), jnp.zeros(()), jnp.asarray(2, jnp.int32))
    r = engine.train_loop(_blowup_step, state, jnp.arange(N, dtype=jnp.float32), jax.random.key(0), steps=100,
                          batch_size=B, steps_per_call=4, stop_when_all_nonfinite=True)
    assert bool(r.nonfinite) and int(r.state[0]) == 4


class _Killed(Exception):
    pass


def test_a_killed_loop_resumes_from_disk_exactly(tmp_path):
    full = engine.train_loop(_sum_step, _init(), _data(), jax.random.key(5), steps=30, batch_size=B).state

    def kill_at(p):
        if p.step >= 12:  # after the chunk ending at 12; the last checkpoint was at 10
            raise _Killed

    ckpt = io_lib.Checkpointer(str(tmp_path))
    with pytest.raises(_Killed):
        engine.train_loop(_sum_step, _init(), _data(), jax.random.key(5), steps=30, batch_size=B,
                          checkpointer=ckpt, checkpoint_every=5, progress=kill_at)
    ckpt.close()
    ckpt = io_lib.Checkpointer(str(tmp_path))
    assert ckpt.latest_step() == 10  # at most one interval lost
    seen = []
    resumed = engine.train_loop(_sum_step, _init(), _data(), jax.random.key(5), steps=30, batch_size=B,
                                checkpointer=ckpt, checkpoint_every=5, progress=seen.append)
    ckpt.close()
    assert resumed.start_step == 10 and seen[0].step > 10
    chex.assert_trees_all_close(resumed.state, full, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=0), "steps"),
        (dict(batch_size=N + 1), "batch_size"),
        (dict(step_loop="gpu"), "step_loop"),
        (dict(models="pmap"), "models"),
        (dict(checkpoint_every=0), "checkpoint_every"),
        (dict(checkpoint_seconds=-1.0), "checkpoint_seconds"),
    ],
)
def test_bad_arguments_fail_before_any_work(kwargs, match):
    args = dict(steps=5, batch_size=B)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        engine.train_loop(_sum_step, _init(), _data(), jax.random.key(0), **args)


def test_metrics_must_report_loss_and_finite():
    with pytest.raises(ValueError, match="finite"):
        engine.train_loop(lambda s, b: (s, {"loss": jnp.sum(b[0])}), _init(), _data(), jax.random.key(0), steps=2,
                          batch_size=B)
