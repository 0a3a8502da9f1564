"""XLA compile settings for programs that run once or a few times per process.

Building and sampling a known manifold or an epoch's batch order run a handful of times, so
most of their cost is XLA:CPU optimising them (LLVM): the linear manifold's construction
compiled in 9.7 s and ran in 1.2 ms; with `ONE_SHOT_OPTIONS` it compiled in 1.4 s and ran
in 1.6 ms. Training steps are the opposite (a gradient-norm step ran 2-3x slower
unoptimised), so they keep XLA's defaults; what a rerun can save on them is the compile
itself, through JAX's persistent compilation cache (`use_compile_cache`).
"""
from __future__ import annotations

import functools
import os

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


def default_compile_cache_dir() -> str:
    """Where the command-line tools keep compiled programs: ``$PAGJAX_COMPILE_CACHE``, else
    ``$XDG_CACHE_HOME/pagjax/xla``, else ``~/.cache/pagjax/xla``."""
    if os.environ.get("PAGJAX_COMPILE_CACHE"):
        return os.environ["PAGJAX_COMPILE_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pagjax", "xla")


def use_compile_cache(path: str, *, min_compile_seconds: float = 0.05) -> str | None:
    """Keep compiled programs in folder `path` (JAX's persistent compilation cache), so that
    a rerun of the same job loads its training and measurement programs instead of compiling
    them again (the default sweep on 2 CPU cores: 70-80 s, then 55 s the second time).

    Programs that compiled in under `min_compile_seconds` are not kept: the default sweep's
    rerun took 55 s keeping 38 programs at 0.05 s, 52-58 s keeping all 124, 65 s keeping the
    14 over 0.3 s. XLA keys each entry on the program, the compile options, the jax/jaxlib
    versions and the device, so a stale entry is never used; deleting the folder is always
    safe. A cache the caller has already configured is left as it is.

    Call it before the first compilation. Returns the folder in use, or None when `path`
    cannot be created (then nothing is cached and nothing else changes).
    """
    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return configured
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    return path
