"""The benchmark scripts run at tiny sizes and return well-formed results (no timing thresholds)."""
import json
import math
import os

import numpy as np
import pytest

from benchmarks import bench_engine, bench_manifold, bench_step, bench_sweep, common, run_all

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
