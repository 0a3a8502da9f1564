"""Run every benchmark, each in its own process, and write their JSON files.

    python -m benchmarks.run_all [--quick] [--only step,sweep,manifold,engine] [--fake-devices N]

Each benchmark runs as ``python -m benchmarks.<name>`` in a fresh process (so
``--fake-devices`` only affects the sweep benchmark, and one benchmark's memory cannot
distort another's), prints its own table, and writes ``benchmarks/results/<name>.json``.
A summary ``benchmarks/results/run_all.json`` lists the wall time and exit status of each.
With ``--quick`` the whole set takes a few minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

from benchmarks import common

BENCHMARKS = ("step", "sweep", "default_sweep", "manifold", "engine")


def command(name: str, quick: bool, fake_devices: int | None) -> list[str]:
    """The command line that runs benchmark `name`."""
    cmd = [sys.executable, "-m", f"benchmarks.bench_{name}"]
    if quick:
        cmd.append("--quick")
    if name == "sweep" and fake_devices:
        cmd += ["--fake-devices", str(fake_devices)]
    return cmd


def main(argv=None) -> dict:
    """Run the selected benchmarks one after another; exit non-zero if any failed."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a few minutes on 2 CPU cores)")
    ap.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset of " + ",".join(BENCHMARKS))
    ap.add_argument("--fake-devices", type=int, default=None,
                    help="for the sweep benchmark on CPU: split the host into N devices (same cores)")
    ap.add_argument("--json", default=common.default_json_path("run_all"))
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        ap.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {BENCHMARKS}")
    summary = {"quick": args.quick, "runs": []}
    for name in names:
        cmd = command(name, args.quick, args.fake_devices)
        print(f"\n=== {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        summary["runs"].append({"benchmark": name, "command": cmd[1:], "returncode": rc,
                                "wall_s": time.perf_counter() - t0})
    print("\n" + common.format_table(["benchmark", "rc", "wall s"],
                                     [[r["benchmark"], r["returncode"], r["wall_s"]] for r in summary["runs"]]))
    if args.json:
        common.write_json(args.json, summary)
    if any(r["returncode"] for r in summary["runs"]):
        sys.exit(1)
    return summary


if __name__ == "__main__":
    main()
