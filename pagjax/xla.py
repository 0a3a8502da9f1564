"""XLA compile settings for programs that run once or a few times per process.

Building and sampling a known manifold or an epoch's batch order run a handful of times, so
most of their cost is XLA:CPU optimising them (LLVM): the linear manifold's construction
compiled in 9.7 s and ran in 1.2 ms; with `ONE_SHOT_OPTIONS` it compiled in 1.4 s and ran
in 1.6 ms. Training steps are the opposite (a gradient-norm step ran 2-3x slower
unoptimised), so they keep XLA's defaults.
"""
from __future__ import annotations

import functools

import jax

# XLA DebugOptions fields (every backend reads them): no backend optimisation passes, and
# none of LLVM's expensive ones. Numbers stay IEEE float32: only the compiler's effort changes.
ONE_SHOT_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit_one_shot(fun=None, **jit_kwargs):
    """`jax.jit` with `ONE_SHOT_OPTIONS`, for programs whose compile time dominates their
    run time; usable as ``@jit_one_shot`` or ``@jit_one_shot(static_argnums=...)``."""
    if fun is None:
        return functools.partial(jit_one_shot, **jit_kwargs)
    return jax.jit(fun, compiler_options=ONE_SHOT_OPTIONS, **jit_kwargs)
