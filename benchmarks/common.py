"""Shared benchmark helpers: timing, machine description, matmul peak, tables, JSON.

Conventions (shared with `benchmarks.bench_manifold`):

* every timing is taken **after compilation** (one warm-up call first), each call is
  ended with `jax.block_until_ready`, and the reported figure is the **median** of
  several repeats (the min and max are kept in the JSON, so noise is visible);
* every benchmark prints a plain-text table and writes a JSON file, by default
  ``benchmarks/results/<name>.json`` (git-ignored), atomically (temp file, then
  `os.replace`);
* every JSON file carries a ``machine`` block (`machine_description`) so figures from
  different machines are never confused.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pagjax import io as io_lib

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def time_fn(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> dict:
    """Median wall time of ``fn()`` after `warmup` un-timed calls (compilation).

    Each call's output is passed to `jax.block_until_ready`, so asynchronous dispatch
    does not hide work. Returns ``{"median_s", "min_s", "max_s", "repeats"}``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or `platform.processor()` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_description() -> dict:
    """CPU model, core count, load average, JAX version, backend and devices."""
    devices = jax.devices()
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15": load,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "device_count": len(devices),
        "device_kind": devices[0].device_kind,
        "devices": [str(d) for d in devices[:8]] + (["..."] if len(devices) > 8 else []),
    }


def describe_machine_line(m: dict) -> str:
    """One line for the top of a printed table."""
    load = m.get("load_average_1_5_15")
    load_s = f", load avg {load[0]:.2f}" if load else ""
    return (f"machine: {m['cpu_model']} ({m['cpu_count']} cores{load_s}); jax {m['jax_version']} "
            f"{m['backend']} x{m['device_count']} ({m['device_kind']})")


def matmul_peak(n: int = 1024, dtype=jnp.float32, repeats: int = 5) -> dict:
    """Measured matmul throughput: FLOP/s of an n x n @ n x n product (2 n^3 FLOPs).

    This is the "hardware limit" the training step is compared against: the best a
    dense, well-shaped kernel achieves on this backend in this process (not the data
    sheet peak). Ten chained products per call amortise the dispatch overhead.
    """
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (n, n), dtype) / np.sqrt(n)
    b = jax.random.normal(key_b, (n, n), dtype) / np.sqrt(n)
    chain = 10

    @jax.jit
    def f(a, b):
        def body(_, c):
            return c @ b
        return jax.lax.fori_loop(0, chain, body, a)

    t = time_fn(lambda: f(a, b), repeats=repeats)
    flops = 2.0 * n**3 * chain
    return {"n": n, "dtype": jnp.dtype(dtype).name, "flops_per_call": flops,
            "flop_per_s": flops / t["median_s"], "timing": t}


def compiled_cost(jitted, *args) -> tuple[Any, dict]:
    """Compile ``jitted`` for `args`; return (compiled, {"flops", "bytes_accessed", memory...}).

    FLOPs come from XLA's `cost_analysis` of the optimised HLO (None where the backend
    does not report them). Memory figures come from `memory_analysis` (argument, output,
    temporary and generated-code bytes); ``peak_estimate_bytes`` is their sum minus
    aliased (donated) bytes, the compiler's own estimate of a step's peak footprint.
    """
    compiled = jitted.lower(*args).compile()
    info: dict[str, Any] = {"flops": None, "bytes_accessed": None}
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0] if cost else {}
        if cost:
            info["flops"] = float(cost.get("flops", 0.0)) or None
            info["bytes_accessed"] = float(cost.get("bytes accessed", 0.0)) or None
    except Exception:  # noqa: BLE001 - not every backend implements it
        pass
    try:
        mem = compiled.memory_analysis()
        if mem is not None:
            fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                      "alias_size_in_bytes", "generated_code_size_in_bytes")
            m = {f: int(getattr(mem, f, 0) or 0) for f in fields}
            m["peak_estimate_bytes"] = (m["argument_size_in_bytes"] + m["output_size_in_bytes"]
                                        + m["temp_size_in_bytes"] - m["alias_size_in_bytes"])
            info["memory"] = m
    except Exception:  # noqa: BLE001
        pass
    return compiled, info


def device_peak_bytes() -> int | None:
    """Peak bytes in use on device 0 so far, where the backend reports it (GPU/TPU)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001
        return None
    if not stats:
        return None
    return stats.get("peak_bytes_in_use")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: floats to 4 significant digits, columns right-aligned."""
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            if not np.isfinite(v):
                return str(v)
            return f"{v:.4g}"
        return str(v)

    cells = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in cells:
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def default_json_path(name: str) -> str:
    """``benchmarks/results/<name>.json``."""
    return os.path.join(RESULTS_DIR, f"{name}.json")


def write_json(path: str, data: dict) -> str:
    """Write `data` as JSON atomically (`pagjax.io.write_json`); returns the absolute path."""
    path = os.path.abspath(path)
    io_lib.write_json(path, data)
    return path


def run_and_report(run: Callable[[], dict], print_table: Callable[[dict], None], json_path: str | None) -> dict:
    """Every benchmark's `main` epilogue: time ``run()``, print its table and the wall
    time, write the JSON (skipped for an empty `json_path`); returns the results."""
    t0 = time.perf_counter()
    res = run()
    res["wall_s"] = time.perf_counter() - t0
    print_table(res)
    print(f"wall {res['wall_s']:.1f} s")
    if json_path:
        print(f"wrote {write_json(json_path, res)}")
    return res


def add_common_args(ap, name: str) -> None:
    """``--quick``, ``--json PATH`` (``''`` disables) and ``--repeats``."""
    ap.add_argument("--quick", action="store_true", help="small sizes: under 2 min on 2 CPU cores")
    ap.add_argument("--json", default=default_json_path(name), help="output JSON ('' to skip)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (median reported)")


def setup_fake_devices(argv=None) -> int | None:
    """Apply ``--fake-devices N`` before JAX initialises its backend (CPU only).

    Must be called before any JAX operation. Fake CPU devices share the same cores:
    they exercise the sharded code path, and since each runs its program on its own thread,
    they can use the cores better than one device (`pagjax.sweep.cpu_devices_for`).
    """
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    n = None
    for i, a in enumerate(argv):
        if a == "--fake-devices" and i + 1 < len(argv):
            n = int(argv[i + 1])
        elif a.startswith("--fake-devices="):
            n = int(a.split("=", 1)[1])
    if n and n > 1:
        from pagjax import devices

        if not devices.split_cpu(n):
            raise RuntimeError("--fake-devices must take effect before the first JAX operation")
    return n
