"""Benchmark: pagjax's training step per objective against the same step in PyTorch.

For each configuration (small CNN, CIFAR ResNet-18 at batch 32 and at batch 128) and each
objective (ce, gradnorm, smoothness, noise, pgd with k steps) it times, back to back in
one process on the same batch:

* **jax**: pagjax's own jitted, donated train step (`pagjax.training.make_train_step`,
  built exactly as `benchmarks.bench_step` builds it: SGD lr 1e-3, momentum 0.9, the
  method's benchmark strength);
* **torch**: the PyTorch transcription of the same network and objective
  (`benchmarks.torch_reference`), ``zero_grad / loss.backward() / SGD.step()``, on the
  same images (NHWC -> NCHW), the same width and k.

The two are interleaved as in `benchmarks.bench_engine`: every repeat times a block of steps
of each in turn, a figure is the median per-step time over repeats, and the **ratio**
jax / torch is the median over repeats of the ratio within a repeat (background load hits
both alike). A ratio below 1 means pagjax is faster.

Both sides get the same threads: ``torch.set_num_threads`` is set to the cores this process
may run on (XLA:CPU uses them all by default). On a GPU both run on it (PyTorch on
``cuda`` when jax's backend is a GPU and torch sees one), each with its defaults.

PyTorch is optional (the ``bench`` extra): without it the PyTorch column is skipped with a
message and the pagjax steps are still timed.

    python -m benchmarks.bench_vs_torch [--quick] [--rows cnn:128:32,resnet18:32:64,...]
        [--objectives ce,gradnorm,...] [--k K] [--repeats N] [--steps-per-repeat N]
        [--threads N] [--no-torch]
"""
from __future__ import annotations

import argparse
import os

import jax
import numpy as np

from benchmarks import bench_engine, bench_step, common
from pagjax.devices import available_cores

OBJECTIVES = ("ce", "gradnorm", "smoothness", "noise", "pgd")

# model:batch:width. The paper's CIFAR-10 ResNet-18 (width 64) at a small and the paper's
# batch, and the CNN at the step benchmark's sizes.
FULL_ROWS = ("cnn:128:32", "resnet18:32:64", "resnet18:128:64")
# A quarter of the ResNet's width (1/16 of its FLOPs): a few minutes on 2 CPU cores.
QUICK_ROWS = ("cnn:32:32", "resnet18:32:16", "resnet18:128:16")


def parse_row(text: str) -> dict:
    """``"resnet18:32:64"`` -> the step benchmark's configuration of that model, batch, width."""
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in ("cnn", "resnet18") or not all(p.isdigit() and int(p) > 0 for p in parts[1:]):
        raise ValueError(f"row {text!r} must look like MODEL:BATCH:WIDTH with MODEL cnn or resnet18")
    return dict(bench_step.FULL[parts[0]], model=parts[0], batch=int(parts[1]), width=int(parts[2]))


def torch_device(torch) -> str:
    """``cuda`` when jax runs on a GPU and torch sees one, else ``cpu``."""
    if jax.default_backend() == "gpu" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def jax_candidate(cfg: dict, objective: str, k: int):
    """(run, sync, n_params) of pagjax's step, and its batch (x, y) for the PyTorch side."""
    jitted, state, args = bench_step._step_setup(cfg["model"], cfg, objective, k)
    holder = [state, None]

    def run():
        holder[0], holder[1] = jitted(holder[0], *args)

    def sync():
        return float(jax.block_until_ready(holder[1]["loss"]))

    n = sum(int(a.size) for a in jax.tree.leaves(state.params))
    return (run, sync, n), state, args


def torch_candidate(torch, cfg: dict, objective: str, k: int, x, y, device: str):
    """(run, sync, n_params) of the PyTorch transcription's step on the same batch."""
    from benchmarks import torch_reference as tr

    torch.manual_seed(0)
    model = tr.build_model(cfg["model"], cfg["classes"], cfg["image"], cfg["width"]).to(device)
    xt = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous().to(device)
    yt = torch.from_numpy(np.array(y)).long().to(device)
    step = tr.make_step(model, objective, xt, yt, float(bench_step.STRENGTH[objective]), k)
    last = [None]

    def run():
        last[0] = step()

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()
        return float(last[0].detach())

    return run, sync, tr.n_params(model)


def run(rows=FULL_ROWS, objectives=OBJECTIVES, *, quick: bool = False, k: int = 10, repeats: int = 5,
        steps_per_repeat: int = 2, threads: int | None = None, use_torch: bool = True) -> dict:
    """Time pagjax against PyTorch for every row and objective; the JSON-ready result."""
    configs = [parse_row(r) if isinstance(r, str) else dict(r) for r in rows]
    for o in objectives:
        if o not in OBJECTIVES:
            raise ValueError(f"objective {o!r} has no PyTorch transcription; choose from {OBJECTIVES}")
    torch = bench_engine.torch_or_none() if use_torch else None
    threads = threads or available_cores()
    device = None
    if torch is not None:
        torch.set_num_threads(threads)
        device = torch_device(torch)
    res = {"benchmark": "vs_torch", "machine": common.machine_description(), "quick": quick, "k": k,
           "repeats": repeats, "steps_per_repeat": steps_per_repeat, "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "torch": None if torch is None else {"version": torch.__version__, "threads": torch.get_num_threads(),
                                                "device": device},
           "rows": []}
    for cfg in configs:
        for objective in objectives:
            cand, _, (x, y, *_) = jax_candidate(cfg, objective, k)
            cands = {"jax": cand}
            if torch is not None:
                cands["torch"] = torch_candidate(torch, cfg, objective, k, x, y, device)
            timed = bench_engine.interleaved(cands, steps_per_repeat, repeats, "torch" if torch else "jax")
            j, t = timed["jax"], timed.get("torch")
            res["rows"].append({
                "model": cfg["model"], "batch": cfg["batch"], "width": cfg["width"], "image": list(cfg["image"]),
                "objective": objective, "k": k if objective == "pgd" else None,
                "jax_s": j["step_s"], "jax_min_s": j["min_s"], "jax_max_s": j["max_s"], "jax_times_s": j["times_s"],
                "jax_loss": j["loss"], "jax_params": j["params"], "jax_warmup_s": j["warmup_s"],
                "torch_s": t and t["step_s"], "torch_min_s": t and t["min_s"], "torch_max_s": t and t["max_s"],
                "torch_times_s": t and t["times_s"], "torch_loss": t and t["loss"], "torch_params": t and t["params"],
                "ratio": j["ratio"] if t else None,  # median over repeats of jax / torch
            })
    return res


def print_table(res: dict) -> None:
    """Print the side-by-side table of a `run` result."""
    print(common.describe_machine_line(res["machine"]))
    t = res["torch"]
    print(f"torch: {t['version']} on {t['device']} ({t['threads']} threads)" if t
          else "torch: not installed (PyTorch column skipped)")
    print(f"XLA_FLAGS={res['xla_flags']!r}; median over {res['repeats']} repeats of {res['steps_per_repeat']} "
          f"steps, the engines interleaved; pgd k={res['k']}")
    headers = ["model", "batch", "width", "objective", "jax ms", "torch ms", "jax/torch", "params"]
    rows = []
    for r in res["rows"]:
        ms = lambda v: None if v is None else v * 1e3  # noqa: E731
        rows.append([r["model"], r["batch"], r["width"], r["objective"], ms(r["jax_s"]), ms(r["torch_s"]),
                     r["ratio"], r["jax_params"]])
    print(common.format_table(headers, rows))
    print("jax/torch = median over repeats of (pagjax step / PyTorch step) in the same repeat; below 1: pagjax faster")


def main(argv=None) -> dict:
    """CLI entry point: parse flags, run, print the table and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(ap, "vs_torch")
    ap.add_argument("--rows", default=None,
                    help="comma-separated MODEL:BATCH:WIDTH (default " + ",".join(FULL_ROWS) + "; with --quick "
                         + ",".join(QUICK_ROWS) + ")")
    ap.add_argument("--objectives", default=",".join(OBJECTIVES), help="comma-separated: " + ",".join(OBJECTIVES))
    ap.add_argument("--k", type=int, default=None, help="PGD steps (default 10; 3 with --quick)")
    ap.add_argument("--steps-per-repeat", type=int, default=None, help="steps per timed block (default 2; 1 quick)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: the usable cores)")
    ap.add_argument("--no-torch", action="store_true", help="time pagjax only, even if torch is installed")
    args = ap.parse_args(argv)
    rows = args.rows.split(",") if args.rows else (QUICK_ROWS if args.quick else FULL_ROWS)
    try:
        rows = [parse_row(r) for r in rows if r]
    except ValueError as e:
        ap.error(str(e))
    return common.run_and_report(
        lambda: run(rows, tuple(filter(None, args.objectives.split(","))), quick=args.quick,
                    k=args.k if args.k is not None else (3 if args.quick else 10),
                    repeats=args.repeats or (3 if args.quick else 5),
                    steps_per_repeat=args.steps_per_repeat or (1 if args.quick else 2), threads=args.threads,
                    use_torch=not args.no_torch),
        print_table, args.json)


if __name__ == "__main__":
    main()
