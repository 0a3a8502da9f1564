"""Batches larger than memory: a per-chunk function over the leading axis, one compilation.

`map_chunks` cuts a pytree of batch-first arrays into chunks of ``chunk_size`` examples,
pads the last chunk to full size (repeating its last example, so the padding is valid
input and every chunk has one shape: one compilation), applies the function to each chunk
and joins the results, padding dropped.

* Concrete inputs run as a host loop: only one chunk of an input that lives on the host
  (a NumPy array) is moved to the device at a time.
* Traced inputs (the caller's `jit`, `vmap` or `grad`) run as one `lax.map` over the
  chunks, so the memory bound holds inside the caller's program too.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pagjax import validation


def _pad_rows(a, size: int):
    """``a`` with its leading axis padded to ``size`` by repeating its last row (NumPy
    arrays stay NumPy: padding does not move them to the device)."""
    missing = size - a.shape[0]
    if missing == 0:
        return a
    xp = np if isinstance(a, np.ndarray) else jnp
    return xp.concatenate([a, xp.repeat(a[-1:], missing, axis=0)], axis=0)


def map_chunks(fn: Callable, xs, chunk_size: int | None):
    """``fn(xs)`` computed ``chunk_size`` examples at a time.

    Args:
      fn: ``fn(chunk) -> out``, a pytree of arrays whose leading axis is the chunk's
        examples; each example's output must depend on that example's inputs only (the
        rows of a padded chunk beyond the batch are dropped). Pass a jitted function (or
        one calling a jitted function) so that the host loop compiles it once.
      xs: a pytree of arrays (None leaves allowed), all with the same leading axis n.
      chunk_size: examples per chunk; None or >= n calls ``fn(xs)`` once.

    Returns:
      ``fn(xs)``'s pytree, each leaf with leading axis n.
    """
    leaves = jax.tree.leaves(xs)
    if not leaves:
        raise ValueError("map_chunks needs at least one array to cut into chunks")
    n = leaves[0].shape[0]
    if any(v.shape[0] != n for v in leaves):
        raise ValueError(f"map_chunks: the arrays' leading axes differ: {[v.shape[0] for v in leaves]}")
    if chunk_size is None or chunk_size >= n:
        return fn(xs)
    if validation._is_concrete(xs):
        parts = []
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            chunk = jax.tree.map(lambda a: _pad_rows(a[start:stop], chunk_size), xs)
            parts.append(jax.tree.map(lambda v: v[: stop - start], fn(chunk)))
        return jax.tree.map(lambda *vs: jnp.concatenate(vs), *parts)
    num = -(-n // chunk_size)
    blocks = jax.tree.map(
        lambda a: jnp.reshape(_pad_rows(jnp.asarray(a), num * chunk_size), (num, chunk_size, *a.shape[1:])), xs
    )
    out = jax.lax.map(fn, blocks)
    return jax.tree.map(lambda v: jnp.reshape(v, (num * chunk_size, *v.shape[2:]))[:n], out)
