"""Callables as static `jax.jit` arguments: the one way pagjax makes them hashable.

A public function that takes a callable (a model's ``apply_fn``, a score function) stays a
pure function of arrays, so a caller may `jit`, `vmap` or differentiate it. To be fast
when called eagerly, it still runs its work through a module-level jitted function, with
the callable as a static argument. `jit` needs static arguments to be hashable, and its
cache then compiles once per equal callable: `Static` gives every callable that property.
"""
from __future__ import annotations

from collections.abc import Callable


class _ByIdentity:
    """Key part of an unhashable object: equal only to itself. It holds the object, so
    its ``id`` cannot be reused while a `jit` cache entry keyed by it is alive."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __hash__(self):
        return id(self.obj)

    def __eq__(self, other):
        return isinstance(other, _ByIdentity) and other.obj is self.obj


def _key_part(obj):
    try:
        hash(obj)
    except TypeError:
        return _ByIdentity(obj)
    return obj


class Static:
    """``fn`` with leading arguments ``bound``, hashable so it can be a static `jit` argument.

    ``Static(fn, *bound)(*args, **kwargs)`` calls ``fn(*bound, *args, **kwargs)``. Two
    `Static` are equal when their ``fn`` and ``bound`` are: each part by value when it is
    hashable, by identity otherwise. So the same ``apply_fn`` object, or a module-level
    function bound to equal configurations (e.g. two denoisers of one architecture), reuses
    one compiled function, while the arrays that differ between calls (parameters) stay
    ordinary, traced arguments.
    """

    __slots__ = ("fn", "bound", "_key")

    def __init__(self, fn: Callable, *bound):
        self.fn = fn
        self.bound = bound
        self._key = (_key_part(fn),) + tuple(_key_part(b) for b in bound)

    def __call__(self, *args, **kwargs):
        return self.fn(*self.bound, *args, **kwargs)

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, Static) and other._key == self._key

    def __repr__(self):
        name = getattr(self.fn, "__qualname__", type(self.fn).__name__)
        return f"Static({name}{''.join(', ' + repr(b) for b in self.bound)})"
