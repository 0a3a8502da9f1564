"""PRNG keys for named purposes, each derived from one root by `jax.random.fold_in`.

A run has one root seed per kind of randomness (a model's ``seed``, the ``data_seed``,
the learned geometry's ``seed``); each use of it gets its own key,
``purpose_key(root, "autoencoder")``, so that adding a purpose never shifts the keys of the
others (as integer offsets such as ``seed + 1`` do, colliding with the next seed's keys).

The purpose name is turned into a number by CRC-32 of its UTF-8 bytes, stable across
processes and Python versions (Python's own ``hash`` of a string is salted per process).
"""
from __future__ import annotations

import zlib

import jax
import numpy as np

Array = jax.Array


def purpose_id(purpose: str) -> int:
    """The stable 32-bit number of a purpose name: the CRC-32 of its UTF-8 bytes."""
    if not isinstance(purpose, str) or not purpose:
        raise ValueError(f"purpose must be a non-empty string, got {purpose!r}")
    return zlib.crc32(purpose.encode("utf-8"))


def root_key(seed_or_key) -> Array:
    """A PRNG key from an integer seed; a key is returned as it is."""
    if isinstance(seed_or_key, bool):
        raise ValueError(f"a root seed must be an integer or a PRNG key, got {seed_or_key!r}")
    if isinstance(seed_or_key, (int, np.integer)):
        return jax.random.key(int(seed_or_key))
    return seed_or_key


def purpose_key(root, purpose: str) -> Array:
    """The key of `purpose` under `root` (an integer seed or a PRNG key).

    The same root and purpose give the same key in every process; distinct purposes give
    independent keys.
    """
    return jax.random.fold_in(root_key(root), purpose_id(purpose))
