"""Benchmark: training a strength sweep of K models with each batching strategy.

For K in {1, 4, 16} models (one method, strengths spread over a range, one seed each)
and each strategy of `pagjax.sweep.train_models` (``vmap``, ``loop``, and ``sharded``
when there are several devices), it runs the engine itself with a progress callback
and times every chunk of ``--steps`` steps. The first chunk (compilation) is dropped; the
figure is the median of the remaining ``--repeats`` chunks. It reports:

* **model-steps/s**: K x steps per chunk / chunk time;
* **scaling**: model-steps/s at K over model-steps/s of the same strategy at K = 1
  (K means perfect batching; 1 means K models cost K times one);
* **vs loop**: model-steps/s over the loop strategy's at the same K;
* which strategy `pagjax.sweep.choose_strategy` picks (``auto``) and which was fastest.

On a machine with one CPU device, ``--fake-devices N`` splits the host into N XLA CPU
devices (``jax_num_cpu_devices``) so the ``sharded`` path runs. **Fake devices share the
same cores**, but each runs its program on its own thread: on 2 cores, 12 MLPs sharded over
2 devices stepped 1.16x faster than vmapped on one (`pagjax.sweep.cpu_devices_for`).

    python -m benchmarks.bench_sweep [--quick] [--json PATH] [--models mlp,cnn] [--k 1,4,16]
        [--strategies vmap,loop,sharded] [--method noise] [--batch-size B] [--width W]
        [--steps N] [--repeats R] [--fake-devices N]
"""
from __future__ import annotations

import argparse
import statistics
import time

from benchmarks import common

# The sizes: the width-256 MLP of the real-image sweeps on 16x16x1 images (the default sweep's is
# width 128: benchmarks.bench_default_sweep times that sweep itself), and the small CNN on 32x32x3.
# The data size is the sweep's (n_train 8192 by default): the engine draws one permutation
# of all examples per epoch, so a benchmark on fewer examples would hide that cost.
FULL = {
    "mlp": dict(spec="mlp:width={width}", width=256, image=(16, 16, 1), batch=128, classes=4, steps=20, n=8192),
    "cnn": dict(spec="cnn:width={width}", width=32, image=(32, 32, 3), batch=128, classes=10, steps=10, n=8192),
}
QUICK = {
    "mlp": dict(FULL["mlp"], steps=10, n=1024),
    "cnn": dict(FULL["cnn"], width=8, batch=16, steps=2, n=256),
}


def time_sweep(model_name: str, cfg: dict, k: int, strategy: str, method: str, repeats: int) -> dict:
    """Model-steps per second of `train_models` for K models with one strategy."""
    import jax
    import numpy as np

    from pagjax import models as models_lib
    from pagjax import objectives as objectives_lib
    from pagjax import sweep, training

    model = models_lib.build_model(cfg["spec"].format(width=cfg["width"]), cfg["classes"])
    n = cfg["n"]
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(n,) + tuple(cfg["image"])).astype(np.float32)
    y = rng.integers(0, cfg["classes"], size=n).astype(np.int32)
    steps = cfg["steps"]
    total = steps * (repeats + 1)
    opt = training.make_optimizer(training.OptimizerConfig(learning_rate=1e-3), total)
    obj = objectives_lib.make_objective(method, pgd_steps=2)
    strengths = np.geomspace(1e-3, 1.0, k) if k > 1 else np.array([0.1])
    seen = []
    t0 = time.perf_counter()
    state = sweep.train_models(model, obj, opt, x, y, strengths, list(range(k)), steps=total,
                               batch_size=cfg["batch"], strategy=strategy, steps_per_call=steps,
                               on_progress=lambda p: seen.append((p.step, p.seconds)))
    jax.block_until_ready(state.train.params)
    wall = time.perf_counter() - t0
    done, secs = np.asarray(seen).T
    chunks = np.diff(np.concatenate([[0.0], secs]))
    # seconds per `steps` steps; chunks also end at epoch ends, so scale each by its length
    per_chunk = chunks / np.diff(np.concatenate([[0.0], done])) * steps
    timed = per_chunk[1:]  # the first chunk includes compilation
    med = float(statistics.median(timed))
    return {
        "model": model_name, "k": k, "strategy": strategy, "method": method, "batch": cfg["batch"],
        "width": cfg["width"], "steps_per_chunk": steps, "chunk_s": med,
        "chunk_min_s": float(np.min(timed)), "chunk_max_s": float(np.max(timed)),
        "first_chunk_s": float(chunks[0]), "wall_s": wall, "n_train": n, "repeats": len(timed),
        "model_steps_per_s": k * steps / med,
        "auto_choice": sweep.choose_strategy(model, k),
    }


def run(model_names=("mlp", "cnn"), ks=(1, 4, 16), strategies=("vmap", "loop", "sharded"), *, method="noise",
        quick=False, batch_size=None, width=None, steps=None, repeats=3, sizes=None) -> dict:
    """Run the sweep benchmark; returns the JSON-ready result (see module docstring)."""
    import jax

    base = sizes or (QUICK if quick else FULL)
    fake = jax.default_backend() == "cpu" and jax.device_count() > 1
    skipped = []
    rows = []
    for name in model_names:
        cfg = dict(base[name])
        for key, val in (("batch", batch_size), ("width", width), ("steps", steps)):
            if val:
                cfg[key] = val
        for k in ks:
            for strategy in strategies:
                if strategy == "sharded" and jax.device_count() == 1:
                    skipped.append(f"{name} K={k} sharded (1 device; use --fake-devices N on CPU)")
                    continue
                rows.append(time_sweep(name, cfg, k, strategy, method, repeats))
    by = {(r["model"], r["k"], r["strategy"]): r for r in rows}
    for r in rows:
        one = by.get((r["model"], 1, r["strategy"]))
        loop = by.get((r["model"], r["k"], "loop"))
        r["scaling_vs_k1"] = r["model_steps_per_s"] / one["model_steps_per_s"] if one else None
        r["vs_loop"] = r["model_steps_per_s"] / loop["model_steps_per_s"] if loop else None
        same = [o for o in rows if o["model"] == r["model"] and o["k"] == r["k"]]
        r["fastest"] = max(same, key=lambda o: o["model_steps_per_s"])["strategy"]
    return {
        "benchmark": "sweep",
        "machine": common.machine_description(),
        "fake_cpu_devices": jax.device_count() if fake else None,
        "note": ("fake CPU devices share the same cores, each running its program on its own thread: "
                 "'sharded' uses them side by side, where one device may not") if fake else None,
        "quick": quick,
        "method": method,
        "skipped": skipped,
        "rows": rows,
    }


def print_table(res: dict) -> None:
    """Print the sweep table of a `run` result."""
    print(common.describe_machine_line(res["machine"]))
    if res["note"]:
        print(f"NOTE: {res['fake_cpu_devices']} fake CPU devices; {res['note']}")
    print(f"method {res['method']}; time per chunk: median over chunks after the first (compilation)")
    headers = ["model", "K", "strategy", "batch", "chunk ms", "steps", "model-steps/s", "x K=1", "vs loop",
               "fastest", "auto"]
    rows = [[r["model"], r["k"], r["strategy"], r["batch"], r["chunk_s"] * 1e3, r["steps_per_chunk"],
             r["model_steps_per_s"], r["scaling_vs_k1"], r["vs_loop"], r["fastest"], r["auto_choice"]]
            for r in res["rows"]]
    print(common.format_table(headers, rows))
    for s in res["skipped"]:
        print(f"skipped: {s}")


def main(argv=None) -> dict:
    """CLI entry point: parse flags, run, print the table and write JSON."""
    common.setup_fake_devices(argv)  # before any JAX operation
    from pagjax import methods

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(ap, "sweep")
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--k", default="1,4,16", help="comma-separated sweep sizes K")
    ap.add_argument("--strategies", default="vmap,loop,sharded")
    ap.add_argument("--method", default="noise", help="one registered method: " + ", ".join(methods.names()))
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="steps per timed chunk")
    ap.add_argument("--fake-devices", type=int, default=None,
                    help="split the CPU into N XLA devices (they share the same cores)")
    args = ap.parse_args(argv)
    return common.run_and_report(
        lambda: run(tuple(filter(None, args.models.split(","))), tuple(int(v) for v in args.k.split(",")),
                    tuple(filter(None, args.strategies.split(","))), method=args.method, quick=args.quick,
                    batch_size=args.batch_size, width=args.width, steps=args.steps,
                    repeats=args.repeats or (2 if args.quick else 3)),
        print_table, args.json)


if __name__ == "__main__":
    main()
