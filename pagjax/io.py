"""Files: atomic writes, run records, and orbax checkpoints of pytrees.

Every results file is written to a temporary file in the same folder and moved into
place with `os.replace`, so a crash leaves either the old file or the new one, never a
torn one (a kill may leave a hidden ``.tmp-*`` file: `remove_temp_files` clears them).
Files are created with the permissions the umask allows, as `open` would.

Files read back are checked: a damaged one raises `DamagedFileError` naming it. Training
checkpoints (`Checkpointer`) carry a SHA-256 digest of their files, written after each
save and verified before a restore; a damaged checkpoint is moved aside and the previous
good one (or none: a restart) is used, with a warning naming the path.
"""
from __future__ import annotations

import csv
import hashlib
import io as _io
import json
import os
import shutil
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


TEMP_PREFIX = ".tmp-"


class DamagedFileError(ValueError):
    """A file read back is unreadable or does not hold what it should; names the file."""


class OutputNotWritableError(OSError):
    """An output folder cannot be created or written; names the folder."""


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)  # elsewhere: set and restore (briefly racy with other threads)
    os.umask(old)
    return old


def check_writable_dir(path: str, what: str = "output folder") -> str:
    """Create `path` if needed and prove it writable by writing a probe file.

    Raises `OutputNotWritableError` (one line naming the path) for a path that is a file,
    empty, read-only, full or otherwise unwritable, before any work is done there.
    """
    if not isinstance(path, str) or not path.strip():
        raise OutputNotWritableError(f"{what} must be a folder path, got {path!r}")
    full = os.path.abspath(path)
    if os.path.exists(full) and not os.path.isdir(full):
        raise OutputNotWritableError(f"{what} {full} exists and is not a folder")
    try:
        os.makedirs(full, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=full, prefix=TEMP_PREFIX, suffix="probe")
        try:
            os.write(fd, b"probe")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as e:
        raise OutputNotWritableError(f"{what} {full} is not writable: {e.strerror or e}") from None
    return full


def remove_temp_files(root: str) -> list[str]:
    """Delete the ``.tmp-*`` files that killed atomic writes left under `root`."""
    removed = []
    for folder, _, files in os.walk(root):
        for name in files:
            if name.startswith(TEMP_PREFIX):
                try:
                    os.remove(os.path.join(folder, name))
                    removed.append(os.path.join(folder, name))
                except OSError:
                    pass
    return removed


def atomic_write(path: str, write: Callable[[Any], None], mode: str = "w") -> None:
    """Write `path` atomically: `write(file)` fills a temp file that then replaces `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX, suffix=os.path.basename(path))
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; honour the umask like open()
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
    """The JSON in `path`; `DamagedFileError` naming the file if it is not valid JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedFileError(f"{os.path.abspath(path)} is damaged (not valid JSON: {e})") from None


def write_csv(path: str, rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Rows of dicts as CSV with a fixed column order; None/NaN become empty cells.

    Every row must hold exactly `columns` (None for an empty cell): a key that is not a
    column, or a column a row lacks, raises `ValueError` naming it, so a value is never
    dropped silently and an empty cell always means "not measured".
    """
    columns = list(columns)
    if len(set(columns)) != len(columns):
        raise ValueError(f"columns repeat: {sorted({c for c in columns if columns.count(c) > 1})}")
    wanted = set(columns)
    for i, r in enumerate(rows):
        unknown = [k for k in r if k not in wanted]
        if unknown:
            raise ValueError(f"{path}: row {i} has values for unknown columns {unknown} (columns: {columns})")
        missing = [c for c in columns if c not in r]
        if missing:
            raise ValueError(f"{path}: row {i} lacks columns {missing} (pass None for an empty cell)")

    def cell(v):
        if v is None:
            return ""
        if isinstance(v, (float, np.floating)):
            return "" if not np.isfinite(v) else repr(float(v))
        if isinstance(v, (bool, np.bool_)):
            return str(bool(v)).lower()
        return v

    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns)
    w.writeheader()
    for r in rows:
        w.writerow({c: cell(r[c]) for c in columns})
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def save_npz(path: str, **arrays) -> None:
    atomic_write(path, lambda f: np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()}), mode="wb")


def load_npz(path: str, key: str) -> np.ndarray:
    """Array `key` of an .npz file; `DamagedFileError` naming the file if it is unreadable."""
    try:
        with np.load(path) as z:
            return z[key]
    except (zipfile.BadZipFile, ValueError, KeyError, EOFError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DamagedFileError(f"{os.path.abspath(path)} is damaged ({type(e).__name__}: {e})") from None


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


def placed_like(restored, like):
    """`restored` placed as `like` asks: arrays where `like` holds an uncommitted array or
    only a shape come back uncommitted, like freshly computed ones.

    orbax restores arrays committed to a device, and jit compiles a separate program (a
    separate compile-cache entry) for committed inputs: without this, a resumed run or a
    cached model compiled again every program that a fresh run had compiled. Committed
    leaves of `like` (e.g. sharded over a mesh) keep orbax's placement.
    """
    import jax
    import jax.numpy as jnp

    def place(r, l):
        if not isinstance(r, jax.Array) or not r.committed or getattr(l, "committed", False):
            return r
        if getattr(l, "sharding", None) is not None and not isinstance(l, jax.Array):
            return r  # a shape that names its placement
        if jax.dtypes.issubdtype(r.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(np.asarray(jax.random.key_data(r)), impl=jax.random.key_impl(r))
        return jnp.asarray(np.asarray(r))

    return jax.tree.map(place, restored, like)


def restore_checkpoint_dir(path: str, name: str, like):
    """The arrays saved by `save_checkpoint_dir`, restored into the structure of `like`
    (placed as `placed_like` says)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        return placed_like(ckptr.restore(os.path.join(os.path.abspath(path), name), like), like)


DIGEST_DIR = "digests"  # inside the checkpoint folder; orbax ignores names that are not steps


def tree_digest(folder: str) -> str:
    """SHA-256 over every file under `folder`: relative paths and contents, in sorted order."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, folder).encode() + b"\0")
            with open(full, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            h.update(b"\0")
    return h.hexdigest()


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; names the folder."""


class Checkpointer:
    """Orbax checkpoints of one pytree under `directory`, keeping the latest `max_to_keep`.

    ``restore_latest(like)`` returns (step, tree) or None; `like` gives the structure,
    dtypes and shardings to restore into.

    Integrity: after each save, a SHA-256 digest of the step's files goes to
    ``digests/<step>.sha256``. ``restore_latest`` verifies it first; a step whose digest
    is missing (a save interrupted by a kill), differs (a damaged file) or that orbax
    cannot read is moved aside to ``damaged-<step>-<time>`` with a warning naming both
    paths, and the previous good step is tried; with none left it returns None (the
    caller restarts from step 0, which the warning says). Two steps are kept by default
    so that a damaged latest one still leaves a good one.
    """

    def __init__(self, directory: str, max_to_keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = os.path.abspath(directory)
        self.max_to_keep = max_to_keep
        check_writable_dir(self.directory, "checkpoint folder")
        self.manager = self._open()

    def _open(self):
        return self._ocp.CheckpointManager(
            self.directory, options=self._ocp.CheckpointManagerOptions(max_to_keep=self.max_to_keep, create=True))

    def _digest_path(self, step: int) -> str:
        return os.path.join(self.directory, DIGEST_DIR, f"{int(step)}.sha256")

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(int(step)))

    def save(self, step: int, tree) -> None:
        # Prove the folder writable first: orbax, denied mid-run, waits minutes in its
        # background threads before failing with a long traceback.
        check_writable_dir(self.directory, "checkpoint folder")
        try:
            self.manager.save(int(step), args=self._ocp.args.StandardSave(tree), force=True)
            self.manager.wait_until_finished()
            step_dir = self._step_dir(step)
            if not os.path.isdir(step_dir):
                raise CheckpointWriteError(f"checkpoint of step {step} was not written to {step_dir}")
            write_text = tree_digest(step_dir)
            atomic_write(self._digest_path(step), lambda f: f.write(write_text + "\n"))
        except CheckpointWriteError:
            raise
        except OSError as e:
            raise CheckpointWriteError(f"cannot write a checkpoint to {self.directory}: {e.strerror or e}") from None
        kept = {int(s) for s in self.manager.all_steps()}
        folder = os.path.join(self.directory, DIGEST_DIR)
        for name in os.listdir(folder):  # digests of steps orbax has deleted
            stem = name.split(".")[0]
            if stem.isdigit() and int(stem) not in kept:
                try:
                    os.remove(os.path.join(folder, name))
                except OSError:
                    pass

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _set_aside(self, step: int, why: str) -> None:
        src = self._step_dir(step)
        dst = base = os.path.join(self.directory, f"damaged-{int(step)}-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while os.path.exists(dst):
            dst, n = f"{base}-{n}", n + 1
        try:
            if os.path.exists(src):
                shutil.move(src, dst)
            if os.path.exists(self._digest_path(step)):
                os.remove(self._digest_path(step))
        except OSError as e:
            raise CheckpointWriteError(f"checkpoint {src} is damaged ({why}) and cannot be moved aside: {e}") from None
        warnings.warn(f"checkpoint {src} is damaged ({why}); moved it to {dst}", RuntimeWarning, stacklevel=3)
        self.manager.close()
        self.manager = self._open()  # forget the moved step

    def _verify(self, step: int) -> str | None:
        """Why step `step` fails its integrity check, or None when it passes."""
        try:
            with open(self._digest_path(step)) as f:
                expected = f.read().strip()
        except OSError:
            return "no integrity digest: its save was interrupted or it predates digests"
        try:
            actual = tree_digest(self._step_dir(step))
        except OSError as e:
            return f"unreadable: {e}"
        return None if actual == expected else "its files do not match the digest written after the save"

    def restore_latest(self, like):
        tried = False
        while True:
            steps = sorted(int(s) for s in self.manager.all_steps())
            if not steps:
                if tried:
                    warnings.warn(f"no good checkpoint left in {self.directory}; restarting from step 0",
                                  RuntimeWarning, stacklevel=2)
                return None
            step, tried = steps[-1], True
            why = self._verify(step)
            if why is None:
                try:
                    return step, placed_like(self.manager.restore(step, args=self._ocp.args.StandardRestore(like)),
                                             like)
                except Exception as e:  # orbax raises many kinds for truncated or garbage files
                    # The digest matched, so either the files were bad before it was written or
                    # they hold another structure; moved aside (not deleted), both are kept.
                    first = str(e).splitlines()[0] if str(e) else ""
                    why = (f"orbax cannot read it: {type(e).__name__}: {first[:200]}; damaged before its digest "
                           "was written, or saved from another model")
            self._set_aside(step, why)

    def close(self):
        self.manager.close()


def log_resume(ckpt: Checkpointer, what: str, total: int, log: Callable[[str], None] | None) -> None:
    """Say that a training resumes, and where, before its (possibly long) compilation; a
    checkpoint that then fails its check is set aside with its own warning."""
    step = ckpt.latest_step()
    if log is not None and step:
        log(f"{what}: resuming from the checkpoint at step {step} of {total}")
