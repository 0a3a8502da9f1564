"""A sweep's data: a built-in known manifold drawn from ``data_seed``, or real images."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np

from pagjax.keys import purpose_key
from pagjax.sweep_config import SweepConfig


@dataclasses.dataclass
class SweepData:
    """A sweep's images and labels; ``z_test`` (latent coordinates) and ``manifold`` only
    for a known manifold, None for real images."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    z_test: np.ndarray | None
    num_classes: int
    manifold: object | None


def load_data(config: SweepConfig, *, progress: bool = False, log: Callable[[str], None] | None = None) -> SweepData:
    """The sweep's dataset: a built-in known manifold generated from `data_seed`, or a real
    dataset (`pagjax.data`, at most n_train / n_test images chosen by `data_seed`).
    ``progress``: a bar while tfds images are read; ``log``: one line saying what was loaded."""
    t = time.perf_counter()
    if config.is_real:
        from pagjax import data as data_lib

        d = data_lib.load_splits(config.dataset, n_train=config.n_train, n_test=config.n_test, data_dir=config.data_dir,
                                 download=config.download, image_size=config.image_size, seed=config.data_seed,
                                 progress=progress)
        out = SweepData(d.x_train, d.y_train, d.x_test, d.y_test, None, d.num_classes, None)
    else:
        from pagjax.manifolds import build_manifold, make_dataset

        manifold = build_manifold(config.dataset, key=purpose_key(config.data_seed, "manifold"), **config.dataset_kwargs)
        d = make_dataset(manifold, purpose_key(config.data_seed, "samples"), config.n_train, config.n_test)
        out = SweepData(np.asarray(d.x_train), np.asarray(d.y_train), np.asarray(d.x_test), np.asarray(d.y_test),
                        np.asarray(d.z_test), manifold.num_classes, manifold)
    if log is not None:
        shape = "x".join(str(v) for v in out.x_train.shape[1:])
        log(f"data: {config.dataset}, {out.x_train.shape[0]} train + {out.x_test.shape[0]} test examples of "
            f"shape {shape}, loaded in {time.perf_counter() - t:.1f} s")
    return out
