"""Benchmark: the default sweep (``python -m experiments.sweep_eps``) phase by phase.

Runs `pagjax.experiment.run_sweep` with the CLI's default settings (or ``--quick``: one seed,
two strengths per method, 100 steps) into a temporary folder and reports, in one run:

* the wall time of each phase: data, eval set, each method's training and measurement,
  the outputs, and the total (the target: 60 s on 2 CPU cores);
* per method, the training phase against the engine's own steady rate in the same run:
  ``steady`` is the seconds per step of the chunks after the first (the first holds the
  compilation), ``ideal`` = steps x steady, and ``train / ideal`` is what compilation,
  checkpoints and progress add (the target: at most 1.2).

    python -m benchmarks.bench_default_sweep [--quick] [--json PATH]
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import tempfile
import time

from benchmarks import common


def _timed(timings: dict, name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        timings.setdefault(name, []).append(time.perf_counter() - t)
        return out
    return wrapper


def run(quick: bool = False, config=None) -> dict:
    """Run the default sweep once (or `config`, a `SweepConfig`), timing its phases (see the
    module docstring)."""
    import numpy as np

    from experiments import sweep_eps
    from pagjax import experiment

    config = config or sweep_eps.config_from_args(sweep_eps.parse_args([]))
    if quick:
        config = dataclasses.replace(config, seeds=(0,), steps=100,
                                     strengths={m: v[::5] for m, v in config.strengths.items()})
    timings: dict = {}
    chunks: dict = {}
    originals = {n: getattr(experiment, n) for n in ("load_data", "make_eval_set", "measure_method", "write_outputs")}
    train_method = experiment.train_method

    def train_with_chunk_times(cfg, method, data, out_dir, progress=None, log=None):
        seen = chunks.setdefault(method, [])

        def on_progress(p):
            seen.append((p.step, p.seconds))
            if progress is not None:
                progress(p)
        t = time.perf_counter()
        state = train_method(cfg, method, data, out_dir, progress=on_progress, log=log)
        timings.setdefault("train " + method, []).append(time.perf_counter() - t)
        return state

    try:
        for name, fn in originals.items():
            setattr(experiment, name, _timed(timings, name, fn))
        experiment.train_method = train_with_chunk_times
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            experiment.run_sweep(config, out, progress=False, log=lambda s: None)
            total = time.perf_counter() - t0
    finally:
        for name, fn in originals.items():
            setattr(experiment, name, fn)
        experiment.train_method = train_method

    methods = []
    for i, method in enumerate(config.methods):
        steps, secs = np.asarray(chunks[method], float).T
        per_step = np.diff(secs[1:]) / np.diff(steps[1:]) if len(steps) > 2 else np.asarray([np.nan])
        steady = float(statistics.median(per_step))
        train = timings["train " + method][0]
        ideal = steady * config.steps
        methods.append({"method": method, "models": len(config.strengths[method]) * len(config.seeds),
                        "train_s": train, "steady_ms_per_step": steady * 1e3, "ideal_s": ideal,
                        "train_over_ideal": train / ideal, "first_chunk_s": float(secs[0]),
                        "measure_s": timings["measure_method"][i]})
    phases = {"data": timings["load_data"][0], "eval set": timings["make_eval_set"][0],
              "train": sum(m["train_s"] for m in methods), "measure": sum(timings["measure_method"]),
              "outputs": sum(timings["write_outputs"])}
    phases["other"] = total - sum(phases.values())
    return {"benchmark": "default_sweep", "machine": common.machine_description(), "quick": quick,
            "steps": config.steps, "model": config.model, "total_s": total, "phases": phases, "methods": methods}


def print_table(res: dict) -> None:
    print(common.describe_machine_line(res["machine"]))
    print(f"default sweep{' (quick)' if res['quick'] else ''}: {res['model']}, {res['steps']} steps; "
          f"total {res['total_s']:.1f} s (target 60 s)")
    print(common.format_table(["phase", "s"], [[k, v] for k, v in res["phases"].items()]))
    print(common.format_table(
        ["method", "models", "train s", "steady ms/step", "ideal s", "train/ideal", "first chunk s", "measure s"],
        [[m["method"], m["models"], m["train_s"], m["steady_ms_per_step"], m["ideal_s"], m["train_over_ideal"],
          m["first_chunk_s"], m["measure_s"]] for m in res["methods"]]))


def main(argv=None) -> dict:
    """CLI entry point: parse flags, run, print the tables and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(ap, "default_sweep")
    args = ap.parse_args(argv)
    from experiments import sweep_eps

    # the command's CPU devices, before the first JAX operation (what `python -m
    # experiments.sweep_eps` does; XLA_FLAGS or an earlier JAX start take precedence)
    cli = sweep_eps.parse_args([])
    sweep_eps.start_cpu_devices(cli, sweep_eps.config_from_args(cli))
    return common.run_and_report(lambda: run(args.quick), print_table, args.json)


if __name__ == "__main__":
    main()
