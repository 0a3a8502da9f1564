# `pagjax.grad_align` is both a module and the function users call.
#
# Why: `import pagjax.grad_align` needs a submodule of that name, and `pagjax.grad_align(...)`
# and `from pagjax import grad_align; grad_align(...)` need a callable. A package attribute
# cannot be two objects: importing a submodule always sets the parent's attribute to the
# submodule, so re-exporting the *function* under the same name would be replaced by the
# module as soon as anyone ran `import pagjax.grad_align`, and what `from pagjax import
# grad_align` gives would depend on import order.
#
# So this module is the one object behind every spelling: its class is a ModuleType subclass
# whose `__call__` forwards to `pagjax.alignment.grad_align`, and `pagjax/__init__.py` imports
# it eagerly, so `pagjax.grad_align` is this callable module from the first import on, in any
# order. The implementation stays in `pagjax.alignment`; `__wrapped__` lets
# `inspect.signature` and `inspect.unwrap` see the real function, and the module docstring
# is the function's, so `help(pagjax.grad_align)` documents the call.
# (A module object cannot be pickled; pass `pagjax.alignment.grad_align` where a picklable
# function is needed, e.g. to another process.)
import sys
import types

from pagjax.alignment import AlignmentResult, grad_align

__all__ = ["AlignmentResult", "grad_align"]


class _CallableModule(types.ModuleType):
    """A module that calls `pagjax.alignment.grad_align` when called."""

    def __call__(self, *args, **kwargs):
        return grad_align(*args, **kwargs)


__doc__ = grad_align.__doc__
__wrapped__ = grad_align
sys.modules[__name__].__class__ = _CallableModule
