"""Results computed once and kept on disk, keyed by the settings that made them.

`cached(path, settings, compute, save, load)` is the one cache of the project (the learned
autoencoder, tangent basis, denoiser and score model of a sweep use it). An entry is the
thing itself at `path` (a file or a folder, written by `save`) and a record beside it,
``path + ".json"``, holding the settings and a SHA-256 digest of what `save` wrote.

* Same settings (compared as JSON, so tuples and lists, numpy and Python numbers agree)
  and a matching digest: `load(path)` is returned and nothing is computed.
* Other settings, or no entry: `compute()` runs and its result replaces the entry.
* A damaged entry (an unreadable record, missing files, a digest that does not match, or a
  `load` that fails) is never used: it is named in a log line (a warning without `log`)
  and computed again.

Writes are atomic: `save` writes into a hidden staging folder beside `path`, and only a
finished save is moved into place, so a crash during `save` leaves the old entry usable.
The record goes last; a crash between the move and the record leaves an entry without a
record, which is computed again.

Settings are compared one way everywhere (`differing_settings`, on `canonical_settings`)
and named by one digest (`settings_digest`). `training_checkpointer` gives the checkpoints
of a training that a `compute` runs, in ``<root>/training/<what>-<settings digest>``: a
killed training resumes there, and one with other settings gets another folder, so it
starts afresh and never reads the old run's checkpoints.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from typing import TypeVar

import numpy as np

from pagjax import io as io_lib

T = TypeVar("T")

RECORD_SUFFIX = ".json"
TRAINING_DIR = "training"


def canonical_settings(settings: dict) -> dict:
    """`settings` as JSON reads it back (tuples become lists, numpy scalars numbers): the
    form stored and compared. Raises `ValueError` when it is not a JSON-serialisable dict."""
    if not isinstance(settings, dict):
        raise ValueError(f"settings must be a dict, got {type(settings).__name__}")

    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray) and o.size <= 64:  # small arrays only: settings, not data
            return o.tolist()
        raise TypeError(type(o).__name__)

    try:
        return json.loads(json.dumps(settings, sort_keys=True, default=default))
    except (TypeError, ValueError) as err:
        raise ValueError(f"settings must be JSON-serialisable (numbers, strings, lists, dicts): {err}") from None


def settings_digest(settings: dict) -> str:
    """SHA-256 of `settings` in canonical form (keys sorted): the same settings, written as
    tuples or lists, numpy or Python numbers, give the same digest."""
    text = json.dumps(canonical_settings(settings), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


_ABSENT = object()


def differing_settings(recorded: dict, settings: dict) -> list[str]:
    """The top-level names (sorted) whose values differ between two settings dicts compared
    in canonical form, a name present in only one of them included; empty when they agree."""
    a, b = canonical_settings(recorded), canonical_settings(settings)
    return sorted(k for k in set(a) | set(b) if a.get(k, _ABSENT) != b.get(k, _ABSENT))


def path_digest(path: str) -> str:
    """SHA-256 of a file's bytes, or of a folder's relative paths and contents."""
    if os.path.isdir(path):
        return io_lib.tree_digest(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def record_path(path: str) -> str:
    """Where the record (settings and digest) of the entry at `path` is kept."""
    return path + RECORD_SUFFIX


def check_entry(path: str, settings: dict) -> tuple[str, str]:
    """(state, why) of the entry at `path` for `settings` (canonical): state ``"hit"``
    (usable), ``"miss"`` (none, or made with other settings) or ``"damaged"``."""
    rec_path = record_path(path)
    if not os.path.exists(rec_path):
        return "miss", "no record" if os.path.exists(path) else "no entry"
    try:
        record = io_lib.read_json(rec_path)
    except (io_lib.DamagedFileError, OSError) as e:
        return "damaged", str(e)
    if not isinstance(record, dict) or not isinstance(record.get("digest"), str) \
            or not isinstance(record.get("settings"), dict):
        return "damaged", f"{os.path.abspath(rec_path)} holds no settings and digest"
    differ = differing_settings(record["settings"], settings)
    if differ:
        return "miss", f"other settings (differing: {', '.join(differ)})"
    if not os.path.exists(path):
        return "damaged", f"{os.path.abspath(path)} is missing"
    try:
        digest = path_digest(path)
    except OSError as e:
        return "damaged", f"unreadable: {e}"
    if digest != record["digest"]:
        return "damaged", "its files do not match the digest written after the save"
    return "hit", ""


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def _staging_prefix(path: str) -> str:
    return f"{io_lib.TEMP_PREFIX}{os.path.basename(path)}-"


def store(path: str, settings: dict, value: T, save: Callable[[T, str], None],
          describe: Callable[[T], dict] | None = None) -> None:
    """Write `value` as the entry at `path` for `settings` (canonical), atomically."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):  # staging folders that killed saves left behind
        if name.startswith(_staging_prefix(path)):
            _remove(os.path.join(folder, name))
    staging = tempfile.mkdtemp(dir=folder, prefix=_staging_prefix(path))
    try:
        new = os.path.join(staging, os.path.basename(path))
        save(value, new)
        if not os.path.exists(new):
            raise FileNotFoundError(f"save wrote nothing at {new}")
        digest = path_digest(new)
        # From here the old entry goes: without its record it is a miss, never a stale hit.
        if os.path.exists(record_path(path)):
            os.remove(record_path(path))
        if os.path.isdir(new) or os.path.isdir(path):  # a folder cannot replace another in one step
            if os.path.lexists(path):
                os.replace(path, os.path.join(staging, "old"))
            os.replace(new, path)
        else:
            os.replace(new, path)
        record = {"settings": settings, "digest": digest, **(describe(value) if describe else {})}
        io_lib.write_json(record_path(path), record)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def cached(path: str, settings: dict, compute: Callable[[], T], save: Callable[[T, str], None],
           load: Callable[[str], T], *, what: str | None = None, log: Callable[[str], None] | None = None,
           describe: Callable[[T], dict] | None = None) -> T:
    """The value cached at `path` for `settings`, or `compute()` stored there (module docstring).

    Args:
      path: the entry's file or folder; its record is ``path + ".json"``.
      settings: a JSON-serialisable dict of everything that determines the value.
      compute: ``compute() -> value``, called only when the entry is missing, made with
        other settings, or damaged.
      save: ``save(value, target)`` writes the value at `target` (a file or a folder).
      load: ``load(path) -> value`` reads it back.
      what: the value's name in log lines (default: the file name).
      log: where "loaded from cache" and damage lines go; without it damage is a
        `RuntimeWarning` (never silent) and a load says nothing.
      describe: ``describe(value) -> dict`` of extra fields for the record (shapes, ranks).

    Returns:
      The loaded or computed value.
    """
    canon = canonical_settings(settings)
    what = what or os.path.basename(path)
    state, why = check_entry(path, canon)
    if state == "hit":
        try:
            value = load(path)
        except Exception as e:  # the digest matched, so the files were bad before it was written
            state, why = "damaged", f"cannot be loaded: {type(e).__name__}: {str(e)[:200]}"
        else:
            if log is not None:
                log(f"{what}: loaded from cache")
            return value
    if state == "damaged":
        message = f"{what}: the cache at {os.path.abspath(path)} is damaged ({why}); computing it again"
        if log is not None:
            log(message)
        else:
            warnings.warn(message, RuntimeWarning, stacklevel=2)
    value = compute()
    store(path, canon, value, save, describe)
    return value


def training_folder(root: str, what: str, settings: dict) -> str:
    """The checkpoint folder of `what`'s training with `settings`:
    ``<root>/training/<what, spaces as underscores>-<settings_digest>``."""
    return os.path.join(root, TRAINING_DIR, f"{what.replace(' ', '_')}-{settings_digest(settings)}")


@contextlib.contextmanager
def training_checkpointer(root: str, what: str, settings: dict, steps: int,
                          log: Callable[[str], None] | None = None):
    """A `pagjax.io.Checkpointer` for `what`'s training with `settings` (everything that
    shapes the training), in `training_folder`: a killed run resumes from it (said in `log`
    before the compilation, out of `steps` in all), a run with other settings gets another
    folder and starts afresh. The folder is removed once the ``with`` body finished; a body
    that raises (a kill, Ctrl-C) leaves it for the next run."""
    path = training_folder(root, what, settings)
    ckpt = io_lib.Checkpointer(path)
    io_lib.log_resume(ckpt, what, steps, log)
    try:
        yield ckpt
    finally:
        ckpt.close()
    shutil.rmtree(path, ignore_errors=True)  # reached only when the body finished
