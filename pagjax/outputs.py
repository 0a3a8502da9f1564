"""A sweep's output folder: preparing it, and the state a resume reads back.

`prepare_output` creates the folder or checks that the run already there has the same
settings (``config.json``, compared as the cache compares them:
`pagjax.cache.differing_settings`), refusing with `SettingsMismatchError` otherwise. Finished
methods leave ``points/<method>.json`` (their rows) and ``points/<method>_gradients.npz``
(their gradient grids): `save_points` writes them and `load_points` reads them back,
checked against the settings, so that a rerun skips the method.
"""
from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable

import jax
import numpy as np

from pagjax import cache as cache_lib
from pagjax import io as io_lib
from pagjax import metrics as metrics_lib
from pagjax import results as results_lib
from pagjax.sweep_config import SweepConfig, method_points


class SettingsMismatchError(ValueError):
    """The output folder holds a run with different settings."""


def library_versions() -> dict:
    """The versions ``config.json`` records beside the settings, and the backend."""
    import flax
    import optax

    import pagjax

    return {"pagjax": pagjax.__version__, "jax": jax.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "numpy": np.__version__, "python": sys.version.split()[0],
            "backend": jax.default_backend(), "devices": jax.device_count()}


RESULT_FILES = ("results.csv", "regimes.json", "summary.json", "figure3.png")


def _results_present(out_dir: str) -> list[str]:
    """The results and state in `out_dir` that a settings record must vouch for."""
    found = [f for f in RESULT_FILES if os.path.exists(os.path.join(out_dir, f))]
    found += sorted(f for f in os.listdir(out_dir) if f.startswith("gradients_") and f.endswith(".png"))
    for sub in ("points", "checkpoints"):
        folder = os.path.join(out_dir, sub)
        if os.path.isdir(folder) and os.listdir(folder):
            found.append(sub + "/")
    return found


def _delete_results(out_dir: str) -> None:
    for sub in ("points", "checkpoints"):
        shutil.rmtree(os.path.join(out_dir, sub), ignore_errors=True)
    for f in _results_present(out_dir):  # old figures too: they must not sit beside new results
        if not f.endswith("/"):
            os.remove(os.path.join(out_dir, f))


def prepare_output(out_dir: str, config: SweepConfig, overwrite: bool) -> None:
    """Create `out_dir`, or check that an existing run there has the same settings.

    Raises `pagjax.io.OutputNotWritableError` when `out_dir` cannot be written, and
    `SettingsMismatchError` when it holds results made with other settings or results
    whose settings record (``config.json``) is missing or damaged; ``overwrite`` deletes
    those results instead. Leftover ``.tmp-*`` files of killed writes are removed.
    """
    io_lib.check_writable_dir(out_dir, "output folder")
    io_lib.remove_temp_files(out_dir)
    path = os.path.join(out_dir, "config.json")
    settings = config.settings()
    problem = None
    if os.path.exists(path):
        try:
            record = io_lib.read_json(path)
            if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
                raise io_lib.DamagedFileError(f"{os.path.abspath(path)} is damaged (no settings record)")
            old = record["settings"]
            diff = cache_lib.differing_settings(old, settings)
            if diff:
                problem = f"{out_dir} holds a sweep with different settings (differing: {', '.join(diff)})"
                if "strategy" in diff and isinstance(old.get("strategy"), dict):
                    # vmap, loop and sharded round differently, so a resume must keep the strategy
                    made = sorted(set(old["strategy"].values()))
                    problem += (f"; it was trained with --strategy {' / '.join(made)}, which rounds differently "
                                "from the one asked for: resume with that strategy")
        except (io_lib.DamagedFileError, OSError) as e:
            problem = f"{out_dir} holds results but its settings record is unreadable: {e}"
    else:
        # The settings check must not hinge on one file that can vanish: results without a
        # record could have been made with any settings.
        found = _results_present(out_dir)
        if found:
            problem = (f"{out_dir} holds results ({', '.join(found)}) but no settings record "
                       f"({os.path.abspath(path)} is missing), so they cannot be checked against these settings")
    if problem is not None:
        if not overwrite:
            raise SettingsMismatchError(
                f"{problem}. Use another output folder, or pass overwrite (--overwrite) to delete the old results.")
        _delete_results(out_dir)
    io_lib.write_json(path, {"settings": settings, "versions": library_versions()})


def load_points(config: SweepConfig, method: str, point_file: str, grid_file: str, data) -> tuple[list[dict], np.ndarray]:
    """A finished method's rows and gradient grids, checked against the settings.

    ``data``: the sweep's data (`pagjax.sweep_data.SweepData`; only ``x_test``'s shape is read).
    Raises `pagjax.io.DamagedFileError` naming the file when it is unreadable or does not
    hold exactly one row per (strength, seed) of `method` (e.g. ``[]``) or grids of the
    expected shape; `FileNotFoundError` when one of the pair is missing.
    """
    for f in (point_file, grid_file):
        if not os.path.exists(f):
            raise FileNotFoundError(f"{f} is missing")
    rows = io_lib.read_json(point_file)
    strengths, seeds = method_points(config, method)
    want = list(zip(strengths, seeds))

    def bad(why):
        return io_lib.DamagedFileError(f"{os.path.abspath(point_file)} is damaged ({why})")

    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise bad("not a list of rows")
    try:
        got = [(float(r["strength"]), int(r["seed"])) for r in rows]
    except (KeyError, TypeError, ValueError):
        raise bad("a row lacks a numeric strength or seed") from None
    if got != want or any(r.get("method") != method or not isinstance(r.get("diverged"), bool) for r in rows):
        raise bad(f"holds {len(rows)} rows, expected one per (strength, seed) of {method}: {len(want)}")
    known = set(results_lib.ID_COLUMNS + results_lib.STATUS_COLUMNS) | set(metrics_lib.columns(config.measure))
    for r in rows:
        unknown = sorted(set(r) - known)
        if unknown:  # measured by a metric no longer registered: measure again rather than drop it
            raise bad(f"row {method} strength {r['strength']:g} seed {r['seed']} has columns no registered "
                      f"metric writes: {unknown}")
    # metrics registered since these rows were measured: empty (not measured), never made up
    rows = [{**dict.fromkeys(metrics_lib.columns(config.measure)), **r} for r in rows]
    for r in rows:
        for key in ("accuracy", "on_change", "off_change"):
            v = r.get(key)
            if not r["diverged"] and not (isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)):
                raise bad(f"row {method} strength {r['strength']:g} seed {r['seed']} has no finite {key}")
    grids = io_lib.load_npz(grid_file, "grads")
    shape = (len(want), "grid", *data.x_test.shape[1:])
    if grids.ndim != len(shape) or grids.shape[0] != len(want) or grids.shape[2:] != data.x_test.shape[1:]:
        raise io_lib.DamagedFileError(f"{os.path.abspath(grid_file)} is damaged (shape {grids.shape}, expected {shape})")
    return rows, grids


def points_files(out_dir: str, method: str) -> tuple[str, str]:
    """(rows file, gradient-grids file) of a finished method in `out_dir`."""
    return (os.path.join(out_dir, "points", f"{method}.json"),
            os.path.join(out_dir, "points", f"{method}_gradients.npz"))


def save_points(out_dir: str, method: str, rows: list[dict], grids: np.ndarray) -> None:
    """Write a finished method's rows and grids; the rows go last: they mark it finished."""
    point_file, grid_file = points_files(out_dir, method)
    io_lib.save_npz(grid_file, grads=grids)
    io_lib.write_json(point_file, rows)


def finished_points(config: SweepConfig, method: str, out_dir: str, data,
                    log: Callable[[str], None]) -> tuple[list[dict], np.ndarray] | None:
    """A finished method's rows and grids from ``points/``, or None when it is to be measured:
    not finished, or its files are damaged (then named in `log` and removed)."""
    point_file, grid_file = points_files(out_dir, method)
    if not (os.path.exists(point_file) or os.path.exists(grid_file)):
        return None
    try:
        found = load_points(config, method, point_file, grid_file, data)
    except (io_lib.DamagedFileError, FileNotFoundError) as e:
        log(f"{method}: {e}; measuring it again")
        for f in (point_file, grid_file):
            if os.path.exists(f):
                os.remove(f)
        return None
    log(f"{method}: already finished, skipped")
    return found
