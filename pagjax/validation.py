"""Early, explicit argument checks.

Each check raises `ValueError` naming the argument and what was expected, and runs in
Python on concrete values *before* anything is traced or compiled. Traced values
(inside `jit`/`vmap`) are skipped: they are checked by the caller that made them.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import jax
import numpy as np


def _is_concrete(tree) -> bool:
    """Whether no leaf of `tree` (a value or a pytree of them) is a tracer."""
    return not any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves(tree))


def check_strength(name: str, value) -> None:
    """A robustness strength must be finite and >= 0 (scalar or array of them)."""
    if not _is_concrete(value):
        return
    arr = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if np.any(arr < 0):
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_positive(name: str, value) -> None:
    if not _is_concrete(value):
        return
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_images(name: str, x, *, ranks: Sequence[int] = (4,), finite: bool = False) -> None:
    """Images must be a floating array of one of the given ranks (NHWC is rank 4) and,
    with ``finite=True``, hold no NaN/inf (for inputs; off by default because computed
    maps, such as a saturated model's gradients, may be non-finite and are handled later)."""
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None or dtype is None:
        raise ValueError(f"{name} must be an array, got {type(x).__name__}")
    if len(shape) not in ranks:
        raise ValueError(
            f"{name} must have rank {' or '.join(map(str, ranks))} (batch first, NHWC for images), "
            f"got shape {tuple(shape)}"
        )
    if not np.issubdtype(np.dtype(dtype), np.floating):
        raise ValueError(f"{name} must have a floating dtype (e.g. float32), got {dtype}")
    if finite:
        check_finite(name, x)


def check_finite(name: str, x) -> None:
    """A concrete array must hold no NaN or inf: they would train or measure silently
    into NaN (or, through skipped updates, into an untrained model)."""
    if not _is_concrete(x):
        return
    if isinstance(x, np.ndarray):
        finite = bool(np.isfinite(x).all())
    else:  # reduce on the device (no copy of a large array to the host), eagerly even under a trace
        with jax.ensure_compile_time_eval():
            finite = bool(jax.numpy.isfinite(x).all())
    if not finite:
        raise ValueError(f"{name} must be finite, but it holds NaN or inf values")


def check_labels(name: str, y, num_classes: int | None = None, batch: int | None = None) -> None:
    """Labels must be a rank-1 integer array with values in [0, num_classes)."""
    shape = getattr(y, "shape", None)
    dtype = getattr(y, "dtype", None)
    if shape is None or len(shape) != 1:
        raise ValueError(f"{name} must be a rank-1 array of class indices, got shape {shape}")
    if not np.issubdtype(np.dtype(dtype), np.integer):
        raise ValueError(f"{name} must have an integer dtype (e.g. int32), got {dtype}")
    if batch is not None and shape[0] != batch:
        raise ValueError(f"{name} must have {batch} entries (one per example), got {shape[0]}")
    if num_classes is not None and num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 for the labels {name} (one class has nothing to classify), "
                         f"got {num_classes}")
    if num_classes is not None and _is_concrete(y) and shape[0] > 0:
        arr = np.asarray(y)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"{name} must lie in [0, {num_classes}), got values in [{lo}, {hi}]"
            )


def check_choice(name: str, value, choices: Iterable[str]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {sorted(choices)}")
