"""Benchmark: the cost of one training step per objective and model, against the ideal.

For each model (MLP, small CNN, ResNet-18) and objective (plain CE, gradient-norm,
smoothness, noise augmentation, PGD with k steps) it compiles the project's own jitted,
donated train step (`pagjax.training.make_train_step`) and reports, after compilation,
the median of several repeats of:

* **time** of one step and its **ratio** to the plain-CE step of the same model;
* the **ideal ratio** from counting passes, in forward-equivalents F, with the usual
  rule that a reverse pass through a graph costs about twice that graph's forward:

  ===============  =========================================================  =======
  objective        passes                                                      ideal
  ===============  =========================================================  =======
  ce               forward F + backward 2F = 3F                                1
  gradnorm         grad_x graph (F + 2F = 3F), then its reverse (2 x 3F): 9F   3
  smoothness       two forwards (2F) + backward through both (4F) = 6F         2
  noise            one forward + backward = 3F (the noise is free)             1
  pgd (k steps)    k x (F + 2F for grad_x) + 3F for the final step             k + 1
  ===============  =========================================================  =======

  (each method's count is in its `pagjax.methods` entry; every registered method is run);
* the **FLOP ratio**: XLA's own FLOP count of the compiled step over the plain step's
  (a ratio above the ideal means the compiled program does more work than the passes
  need; a time ratio above the FLOP ratio means the extra work runs less efficiently);
* **achieved FLOP/s** (XLA's FLOP count / time) and its fraction of the **matmul peak**
  measured in the same run (`benchmarks.common.matmul_peak`);
* **peak memory**: XLA's compile-time estimate (arguments + outputs + temporaries -
  donated) and, where the backend reports it (GPU/TPU), the device's peak bytes in use.

XLA's cost analysis counts a while-loop body once, whatever its trip count; where PGD's
attack loop is a while loop it is therefore corrected: flops(k) = flops(0) + k * (flops(1)
- flops(0)). On CPU the attack is unrolled and every step is already counted.

    python -m benchmarks.bench_step [--quick] [--json PATH] [--models mlp,cnn,resnet18]
        [--objectives ce,gradnorm,...] [--batch-size B] [--width W] [--k K] [--repeats N]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from pagjax import methods
from pagjax import models as models_lib
from pagjax import objectives as objectives_lib
from pagjax import training

# the strength each registered method trains at here (pagjax.methods)
STRENGTH = methods.View(lambda m: m.bench_strength)

# Realistic sizes: the project's default sweep (MLP on 16x16x1 known-manifold images) and
# the paper's CIFAR-10 setting for the conv nets.
FULL = {
    "mlp": dict(spec="mlp:width={width}", width=256, image=(16, 16, 1), batch=128, classes=4),
    "cnn": dict(spec="cnn:width={width}", width=32, image=(32, 32, 3), batch=128, classes=10),
    "resnet18": dict(spec="resnet18:width={width}", width=64, image=(32, 32, 3), batch=128, classes=10),
}
QUICK = {
    "mlp": dict(FULL["mlp"]),
    "cnn": dict(FULL["cnn"], batch=32),
    "resnet18": dict(FULL["resnet18"], width=8, batch=8),
}


def ideal_ratio(objective: str, k: int) -> float:
    """Pass-count ideal cost of a step of `objective`, relative to a plain CE step.

    See the module docstring for the counting (forward F, reverse pass 2x its graph); each
    method's count is in its registry entry (`pagjax.methods.Method.ideal_ratio`).
    """
    return float(methods.get(objective, argument="objective").ideal_ratio(k))


def __getattr__(name):
    # the objective list is the registry's, read at each access
    if name == "OBJECTIVES":
        return methods.names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _step_setup(model_name: str, cfg: dict, objective: str, k: int):
    """(jitted step, state, args) for one model/objective at the configured sizes."""
    model = models_lib.build_model(cfg["spec"].format(width=cfg["width"]), cfg["classes"])
    kx, ky, kinit = jax.random.split(jax.random.key(0), 3)
    x = jax.random.uniform(kx, (cfg["batch"],) + tuple(cfg["image"]), jnp.float32)
    y = jax.random.randint(ky, (cfg["batch"],), 0, cfg["classes"])
    opt = training.make_optimizer(training.OptimizerConfig(name="sgd", learning_rate=1e-3), 1000)
    obj = objectives_lib.make_objective(objective, pgd_steps=k)
    state = training.create_train_state(model, opt, kinit, x)
    jitted = training.make_train_step(model, obj, opt).jitted
    return jitted, state, (x, y, jax.random.key(1), jnp.float32(STRENGTH[objective]))


def _flat(setup):
    jitted, state, args = setup
    return (jitted, state, *args)


def measure_step(model_name: str, cfg: dict, objective: str, k: int, repeats: int) -> dict:
    """Compile, cost-analyse and time one train step; returns a result row (a dict)."""
    jitted, state, args = _step_setup(model_name, cfg, objective, k)
    t0 = time.perf_counter()
    compiled, cost = common.compiled_cost(jitted, state, *args)
    compile_s = time.perf_counter() - t0
    flops = cost["flops"]
    looped = methods.get(objective).inner_steps  # PGD: an attack loop of k steps
    if looped and flops is not None and k >= 2:
        # A while-loop body is counted once by XLA. If the attack loop is a while loop
        # (flops(k) == flops(1)), correct: flops(k) = flops(0) + k * (flops(1) - flops(0)).
        # On CPU the attack is unrolled (pagjax.attacks) and XLA already counts every step.
        f0, f1 = (common.compiled_cost(*_flat(_step_setup(model_name, cfg, objective, kk)))[1]["flops"]
                  for kk in (0, 1))
        if f0 is not None and f1 is not None and abs(flops - f1) <= 1e-3 * f1:
            flops = f0 + k * (f1 - f0)
    holder = [state]

    def run():
        holder[0], metrics = compiled(holder[0], *args)
        return metrics["loss"]

    timing = common.time_fn(run, repeats=repeats)
    loss = float(run())
    row = {
        "model": model_name,
        "objective": objective,
        "k": k if looped else None,
        "batch": cfg["batch"],
        "width": cfg["width"],
        "image": list(cfg["image"]),
        "step_s": timing["median_s"],
        "timing": timing,
        "compile_s": compile_s,
        "flops": flops,
        "flops_xla_raw": cost["flops"],
        "bytes_accessed": cost["bytes_accessed"],
        "memory": cost.get("memory"),
        "peak_memory_bytes": (cost.get("memory") or {}).get("peak_estimate_bytes"),
        "device_peak_bytes": common.device_peak_bytes(),
        "ideal_ratio": ideal_ratio(objective, k),
        "loss_finite": bool(np.isfinite(loss)),
    }
    row["flop_per_s"] = flops / row["step_s"] if flops else None
    return row


def run(model_names=("mlp", "cnn", "resnet18"), objectives=None, *, quick: bool = False, k: int = 10,
        batch_size: int | None = None, width: int | None = None, repeats: int = 5, peak_n: int = 1024,
        sizes: dict | None = None) -> dict:
    """Run the step benchmark; returns the JSON-ready result (see module docstring).

    `objectives` defaults to every registered method. `sizes` overrides the per-model
    configuration (tests use tiny ones); `batch_size` and `width` override every model's
    batch and width.
    """
    objectives = methods.names() if objectives is None else tuple(objectives)
    for o in objectives:  # an unknown name fails before anything is compiled
        methods.get(o, argument="objectives")
    base = sizes or (QUICK if quick else FULL)
    peak = common.matmul_peak(peak_n, repeats=repeats)
    rows = []
    for name in model_names:
        cfg = dict(base[name])
        if batch_size:
            cfg["batch"] = batch_size
        if width:
            cfg["width"] = width
        plain = None
        for objective in objectives:
            row = measure_step(name, cfg, objective, k, repeats)
            if objective == "ce":
                plain = row
            rows.append(row)
        if plain is None:  # ratios need the plain step
            plain = measure_step(name, cfg, "ce", k, repeats)
        for row in rows:
            if row["model"] != name:
                continue
            row["ratio"] = row["step_s"] / plain["step_s"]
            row["flop_ratio"] = row["flops"] / plain["flops"] if row["flops"] and plain["flops"] else None
            row["ratio_over_ideal"] = row["ratio"] / row["ideal_ratio"]
            row["fraction_of_peak"] = row["flop_per_s"] / peak["flop_per_s"] if row["flop_per_s"] else None
    return {
        "benchmark": "step",
        "machine": common.machine_description(),
        "quick": quick,
        "k": k,
        "repeats": repeats,
        "matmul_peak": peak,
        "pass_counting": {o: methods.get(o).pass_count for o in objectives},
        "rows": rows,
    }


def print_table(res: dict) -> None:
    """Print the step table of a `run` result."""
    print(common.describe_machine_line(res["machine"]))
    p = res["matmul_peak"]
    print(f"matmul peak ({p['n']}x{p['n']} {p['dtype']}): {p['flop_per_s'] / 1e9:.1f} GFLOP/s; "
          f"timings: median of {res['repeats']} after compilation")
    headers = ["model", "objective", "batch", "step ms", "ratio", "ideal", "flop ratio",
               "GFLOP/step", "GFLOP/s", "% peak", "peak MB"]
    rows = []
    for r in res["rows"]:
        obj = f"{r['objective']} k={r['k']}" if r["k"] is not None else r["objective"]
        rows.append([
            r["model"], obj, r["batch"], r["step_s"] * 1e3, r.get("ratio"), r["ideal_ratio"], r.get("flop_ratio"),
            r["flops"] / 1e9 if r["flops"] else None, r["flop_per_s"] / 1e9 if r["flop_per_s"] else None,
            100 * r["fraction_of_peak"] if r.get("fraction_of_peak") else None,
            (r["peak_memory_bytes"] or 0) / 2**20 if r["peak_memory_bytes"] is not None else None,
        ])
    print(common.format_table(headers, rows))
    print("ideal = pass count in forward-equivalents F (reverse pass = 2x its graph): "
          + "; ".join(f"{k}: {v}" for k, v in res["pass_counting"].items()))
    print("flop ratio = XLA FLOPs of the step / plain step (PGD loop corrected for trip count); "
          "peak MB = XLA estimate (args + outputs + temps - donated)")


def main(argv=None) -> dict:
    """CLI entry point: parse flags, run, print the table and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(ap, "step")
    ap.add_argument("--models", default="mlp,cnn,resnet18", help="comma-separated: mlp,cnn,resnet18")
    ap.add_argument("--objectives", default=",".join(methods.names()),
                    help="comma-separated registered methods: " + ", ".join(methods.names()))
    ap.add_argument("--batch-size", type=int, default=None, help="batch of every model (default per model)")
    ap.add_argument("--width", type=int, default=None, help="width of every model (default per model)")
    ap.add_argument("--k", type=int, default=None, help="PGD steps (default 10; 3 with --quick)")
    ap.add_argument("--peak-n", type=int, default=None, help="matmul size for the peak (default 1024; 2048 full)")
    args = ap.parse_args(argv)
    return common.run_and_report(
        lambda: run(tuple(filter(None, args.models.split(","))), tuple(filter(None, args.objectives.split(","))),
                    quick=args.quick, k=args.k or (3 if args.quick else 10), batch_size=args.batch_size,
                    width=args.width, repeats=args.repeats or (3 if args.quick else 5),
                    peak_n=args.peak_n or (1024 if args.quick else 2048)),
        print_table, args.json)


if __name__ == "__main__":
    main()
