"""Run a sweep from a config file: ``python -m experiments.run_config configs/cifar10_noise.py``.

    python -m experiments.run_config configs/cifar10_noise.py --data-dir ~/tensorflow_datasets
    python -m experiments.run_config configs/cifar10_noise.py --smoke        # CPU, offline, < 1 min

A config file defines ``get_config(smoke: bool) -> SweepConfig`` (see configs/). ``--smoke``
runs the same code path with tiny sizes on the offline digits. Outputs are those of
``experiments.sweep_eps`` (results.csv, figure3.png, gradients_<method>.png, ...), in
``--out`` (default ``runs/<config name>`` or ``runs/<config name>_smoke``).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys


def load_config(path: str, smoke: bool):
    """Import the config file at `path` and return its ``get_config(smoke)``."""
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if root not in sys.path:  # configs import configs.common
        sys.path.insert(0, root)
    name = "pagjax_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path!r} defines no get_config(smoke)")
    return module.get_config(smoke=smoke)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", help="path of a config file, e.g. configs/cifar10_noise.py")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the offline digits: the same code path, on CPU")
    p.add_argument("--out", default=None, help="output folder (default runs/<config name>[_smoke])")
    p.add_argument("--data-dir", default=None, help="tensorflow-datasets data directory with the prepared data")
    p.add_argument("--download", action="store_true", help="download the data if not prepared (needs network)")
    p.add_argument("--strategy", default=None, help="override the sweep strategy: auto, vmap, loop, sharded")
    p.add_argument("--overwrite", action="store_true", help="replace results made with other settings")
    p.add_argument("--no-progress", action="store_true")
    from experiments.sweep_eps import (add_compile_cache_flags, add_cpu_devices_flag, run_and_report,
                                       start_compile_cache, start_cpu_devices)

    add_compile_cache_flags(p)
    add_cpu_devices_flag(p)
    args = p.parse_args(argv)

    try:
        config = load_config(args.config, args.smoke)
        changes = {"download": args.download}
        if args.data_dir is not None:
            changes["data_dir"] = args.data_dir
        if args.strategy is not None:
            changes["strategy"] = args.strategy
        config = dataclasses.replace(config, **changes)
        config.validate()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = os.path.splitext(os.path.basename(args.config))[0]
    out = args.out or os.path.join("runs", name + ("_smoke" if args.smoke else ""))
    start_compile_cache(args)
    start_cpu_devices(args, config)
    return run_and_report(config, out, overwrite=args.overwrite, progress=not (args.no_progress or args.smoke))


if __name__ == "__main__":
    sys.exit(main())
