"""Files: atomic writes, run records, and orbax checkpoints of pytrees.

Every results file is written to a temporary file in the same folder and moved into
place with `os.replace`, so a crash leaves either the old file or the new one, never a
torn one.
"""
from __future__ import annotations

import csv
import io as _io
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def atomic_write(path: str, write: Callable[[Any], None], mode: str = "w") -> None:
    """Write `path` atomically: `write(file)` fills a temp file that then replaces `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _to_jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def write_json(path: str, obj) -> None:
    atomic_write(path, lambda f: json.dump(_to_jsonable(obj), f, indent=2, sort_keys=True))


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def write_csv(path: str, rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Rows of dicts as CSV with a fixed column order; None/NaN become empty cells."""

    def cell(v):
        if v is None:
            return ""
        if isinstance(v, (float, np.floating)):
            return "" if not np.isfinite(v) else repr(float(v))
        if isinstance(v, (bool, np.bool_)):
            return str(bool(v)).lower()
        return v

    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({c: cell(r.get(c)) for c in columns})
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def save_npz(path: str, **arrays) -> None:
    atomic_write(path, lambda f: np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()}), mode="wb")


class CheckpointNotFoundError(FileNotFoundError, ValueError):
    """No saved object at a path (a missing file, and a bad `path` argument)."""


def save_checkpoint_dir(path: str, name: str, tree, config: dict) -> None:
    """Save an object as directory `path`: orbax arrays of `tree` in ``name/``, then its
    settings in ``config.json``, written last so that a directory with a config is whole.
    An existing checkpoint at `path` is overwritten."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, name), tree, force=True)
        ckptr.wait_until_finished()
    write_json(os.path.join(path, "config.json"), config)


def read_checkpoint_config(path: str, what: str) -> dict:
    """The ``config.json`` of a `save_checkpoint_dir` directory; `what` names the object
    in the `CheckpointNotFoundError` raised when there is none."""
    cfg_path = os.path.join(os.path.abspath(path), "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointNotFoundError(f"no {what} checkpoint at {os.path.abspath(path)!r} (missing config.json)")
    return read_json(cfg_path)


def restore_checkpoint_dir(path: str, name: str, like):
    """The arrays saved by `save_checkpoint_dir`, restored into the structure of `like`."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.join(os.path.abspath(path), name), like)


class Checkpointer:
    """Orbax checkpoints of one pytree under `directory`, keeping the latest `max_to_keep`.

    ``restore_latest(like)`` returns (step, tree) or None; `like` gives the structure,
    dtypes and shardings to restore into.
    """

    def __init__(self, directory: str, max_to_keep: int = 1):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def save(self, step: int, tree) -> None:
        self.manager.save(int(step), args=self._ocp.args.StandardSave(tree), force=True)
        self.manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_latest(self, like):
        step = self.manager.latest_step()
        if step is None:
            return None
        return step, self.manager.restore(step, args=self._ocp.args.StandardRestore(like))

    def close(self):
        self.manager.close()
