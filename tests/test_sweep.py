import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import NUM_FAKE_DEVICES
from helpers import toy_task
from pagjax import models, objectives, sweep, training


MODEL = models.build_model("mlp:width=16", 2)
OPT_CFG = training.OptimizerConfig(learning_rate=1e-2)


def _train(strategy, strengths, seeds, method="noise", steps=30, **kw):
    x, y = toy_task()
    opt = training.make_optimizer(OPT_CFG, steps)
    obj = objectives.make_objective(method, pgd_steps=2)
    return sweep.train_models(MODEL, obj, opt, x, y, strengths, seeds, steps=steps, batch_size=32,
                              strategy=strategy, steps_per_call=kw.pop("steps_per_call", 10), **kw)


def test_every_strategy_trains_each_model_as_train_would_alone():
    strengths, seeds = [0.0, 0.1, 0.3], [0, 1, 2]
    x, y = toy_task()
    results = {s: _train(s, strengths, seeds) for s in ("vmap", "loop", "sharded")}
    for i, (strength, seed) in enumerate(zip(strengths, seeds)):
        alone = training.train(
            training.TrainConfig(model="mlp:width=16", method="noise", strength=strength, steps=30, batch_size=32,
                                 seed=seed, optimizer=OPT_CFG), x, y, num_classes=2, progress=False)
        for strategy, state in results.items():
            chex.assert_trees_all_close(sweep.model_variables(state, i), alone.variables, rtol=2e-4, atol=2e-5,
                                        custom_message=f"{strategy} model {i}")


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_host_and_device_step_loops_train_the_same_models(strategy):
    device = _train(strategy, [0.0, 0.3], [0, 1], steps=20, step_loop="device")
    host = _train(strategy, [0.0, 0.3], [0, 1], steps=20, step_loop="host")
    chex.assert_trees_all_close(device.train.params, host.train.params, rtol=2e-5, atol=2e-6)
    assert np.asarray(host.train.step).tolist() == [20, 20]


def test_conv_nets_on_cpu_loop_steps_on_the_host():
    assert sweep.choose_step_loop(models.build_model("cnn", 2), backend="cpu") == "host"
    assert sweep.choose_step_loop(MODEL, backend="cpu") == "device"
    assert sweep.choose_step_loop(models.build_model("resnet18", 2), backend="gpu") == "device"


def test_sharded_strategy_spreads_models_over_all_devices():
    state = _train("sharded", [0.0, 0.1, 0.2, 0.3, 0.4], [0, 1, 2, 3, 4], steps=10)
    assert len(jax.devices()) == NUM_FAKE_DEVICES
    assert np.asarray(state.train.step).tolist() == [10] * 5  # padding removed


def test_a_diverging_model_is_flagged_and_does_not_poison_the_others():
    state = _train("vmap", [0.1, 1e38], [0, 0], steps=20)
    assert np.asarray(state.diverged).tolist() == [False, True]
    ok = sweep.model_variables(state, 0)
    assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(ok))
    alone = _train("vmap", [0.1], [0], steps=20)
    chex.assert_trees_all_close(ok, sweep.model_variables(alone, 0), rtol=1e-5, atol=1e-6)


def test_a_killed_run_resumes_from_its_checkpoint_exactly(tmp_path):
    from pagjax import io as io_lib

    full = _train("vmap", [0.0, 0.2], [3, 4], steps=40)
    # A "killed" run: 20 of 40 steps, checkpointed every 10 steps, on disk.
    ckpt = io_lib.Checkpointer(str(tmp_path / "ckpt"))
    with pytest.raises(_Killed):
        _train("vmap", [0.0, 0.2], [3, 4], steps=40, checkpointer=ckpt, checkpoint_every=10,
               on_progress=lambda p: _stop_at(p, 20))
    ckpt.close()
    ckpt = io_lib.Checkpointer(str(tmp_path / "ckpt"))
    assert ckpt.latest_step() == 20
    seen = []
    resumed = _train("vmap", [0.0, 0.2], [3, 4], steps=40, checkpointer=ckpt, checkpoint_every=10,
                     on_progress=seen.append)
    ckpt.close()
    assert seen[0].step > 20 and seen[-1].step == 40  # the restored 20 steps are not redone
    chex.assert_trees_all_close(resumed.train.params, full.train.params, rtol=1e-5, atol=1e-6)


class _Killed(Exception):
    pass


def _stop_at(progress, step):
    if progress.step >= step:
        raise _Killed


def test_progress_reports_every_chunk():
    seen = []
    _train("loop", [0.0], [0], steps=25, on_progress=seen.append)
    per_epoch = len(toy_task()[0]) // 32  # chunks end at multiples of 10 steps and at epoch ends
    expected = sorted({*range(10, 25, 10), *range(per_epoch, 25, per_epoch), 25})
    assert [p.step for p in seen] == expected
    assert seen[-1].metrics["loss"].shape == (1,) and np.isfinite(seen[-1].metrics["loss"]).all()


def test_choose_strategy_per_backend():
    cnn = models.build_model("cnn", 2)
    assert sweep.choose_strategy(MODEL, 8, backend="cpu", num_devices=1) == "vmap"
    assert sweep.choose_strategy(cnn, 8, backend="cpu", num_devices=1) == "loop"
    assert sweep.choose_strategy(cnn, 8, backend="gpu", num_devices=1) == "vmap"
    assert sweep.choose_strategy(cnn, 8, backend="tpu", num_devices=8) == "sharded"
    assert sweep.choose_strategy(cnn, 1, backend="cpu", num_devices=8) == "loop"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(strategy="pmap"), "strategy"),
        (dict(strengths=[0.1, -1.0]), "strengths"),
        (dict(seeds=[0]), "equal length"),
        (dict(steps=0), "steps"),
    ],
)
def test_bad_sweep_arguments_raise_before_training(kwargs, match):
    args = dict(strategy="vmap", strengths=[0.1, 0.2], seeds=[0, 1], steps=5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        _train(args.pop("strategy"), args.pop("strengths"), args.pop("seeds"), steps=args.pop("steps"))


def test_cpu_devices_divide_every_methods_models_up_to_one_per_core():
    assert sweep.cpu_devices_for([12, 12, 12, 12], cores=2) == 2  # the default sweep on 2 cores
    assert sweep.cpu_devices_for([12], cores=16) == 12  # no padded models: 16 would pad 12 to 16
    assert sweep.cpu_devices_for([6, 9], cores=8) == 3
    assert sweep.cpu_devices_for([7], cores=4) == 1  # a prime count: one device, nothing padded
    assert sweep.cpu_devices_for([12], cores=1) == 1
    for bad in ([], [0]):
        with pytest.raises(ValueError, match="models_per_method"):
            sweep.cpu_devices_for(bad, cores=2)
    with pytest.raises(ValueError, match="cores"):
        sweep.cpu_devices_for([4], cores=0)


def test_the_command_line_splits_the_cpu_for_mlp_sweeps_only(monkeypatch):
    from experiments import sweep_eps
    from pagjax import devices

    asked = []
    monkeypatch.setattr(devices, "split_cpu", lambda n: asked.append(n) or True)
    monkeypatch.setattr(devices, "available_cores", lambda: 4)

    def start(*argv):
        args = sweep_eps.parse_args(["--methods", "noise,pgd", "--strengths", "0,1,2", "--seeds", "0,1", *argv])
        sweep_eps.start_cpu_devices(args, sweep_eps.config_from_args(args))

    start()  # 6 MLPs per method on 4 cores: 3 devices of 2 models
    start("--model", "cnn")  # conv nets: unmeasured, one device
    start("--strategy", "vmap")  # no sharding asked for
    start("--model", "cnn", "--cpu-devices", "2")  # asked for
    assert asked == [3, 2]
    # once JAX has started (here: the conftest's fake devices) the devices stay, and the call says so
    monkeypatch.undo()
    assert jax.device_count() == NUM_FAKE_DEVICES
    assert devices.split_cpu(2) is False and jax.device_count() == NUM_FAKE_DEVICES
    with pytest.raises(ValueError, match="num_devices"):
        devices.split_cpu(0)


def test_split_cpu_before_jax_starts_makes_that_many_devices():
    import subprocess
    import sys

    code = ("from pagjax import devices; import jax; assert devices.split_cpu(3); "
            "print(jax.device_count(), jax.default_backend())")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["3", "cpu"]
