"""Device meshes for data-parallel steps and sharded sweeps.

`jax.make_mesh` defaults to Explicit axes in this JAX; we build meshes with Auto axes so
that jitted code written for one device runs unchanged on a mesh (GSPMD inserts the
collectives), with inputs placed by `NamedSharding`.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def available_cores() -> int:
    """Cores this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks (macOS)
        return os.cpu_count() or 1


def split_cpu(num_devices: int) -> bool:
    """Make XLA's CPU backend ``num_devices`` devices (``jax_num_cpu_devices``).

    Only possible before JAX's backends start (the first JAX operation): returns whether it
    was applied; after that the devices stay as they are. XLA:CPU runs each device's
    program on its own thread, so a sharded program uses the cores side by side (see
    `pagjax.sweep.cpu_devices_for`).
    """
    if not isinstance(num_devices, int) or num_devices < 1:
        raise ValueError(f"num_devices must be a positive integer, got {num_devices!r}")
    try:
        jax.config.update("jax_num_cpu_devices", num_devices)
    except RuntimeError:  # the backends have started: the caller's devices stay
        return False
    return True


def make_mesh(axis_name: str = "batch", devices=None) -> Mesh:
    """A 1-D mesh over `devices` (default: all local devices) with an Auto axis."""
    devices = list(devices if devices is not None else jax.local_devices())
    return Mesh(np.array(devices), (axis_name,), axis_types=(jax.sharding.AxisType.Auto,))


def shard_leading(mesh: Mesh, tree, axis_name: str | None = None):
    """Place every array of `tree` with its leading axis split over the mesh axis.

    The leading axis must be divisible by the number of devices.
    """
    axis_name = axis_name or mesh.axis_names[0]
    n = mesh.shape[axis_name]

    def place(a):
        if a.shape[0] % n:
            raise ValueError(f"leading axis {a.shape[0]} is not divisible by the {n} devices of mesh axis {axis_name!r}")
        spec = P(axis_name, *([None] * (a.ndim - 1)))
        return jax.device_put(a, NamedSharding(mesh, spec))

    return jax.tree.map(place, tree)


def replicate(mesh: Mesh, tree):
    """Place every array of `tree` fully replicated on the mesh."""
    return jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P())), tree)
