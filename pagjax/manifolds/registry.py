"""Known manifolds by name: ``build_manifold(name, **kwargs)``."""
from __future__ import annotations

from collections.abc import Callable

from pagjax.manifolds.base import KnownManifold
from pagjax.manifolds.curved import default_curved_manifold, make_curved_manifold
from pagjax.manifolds.linear import default_linear_manifold, make_linear_manifold


def _linear_exact(key=0, **overrides) -> KnownManifold:
    """The default sweep geometry with data exactly on the subspace (normal_offset = 0)."""
    params = dict(normal_offset=0.0, normal_noise=0.0)
    params.update(overrides)
    return default_linear_manifold(key, **params)


_BUILDERS: dict[str, Callable[..., KnownManifold]] = {
    "linear": make_linear_manifold,             # all parameters explicit (defaults: exact case)
    "linear_default": default_linear_manifold,  # the project's default sweep data
    "linear_exact": _linear_exact,              # default geometry, exactly on the subspace
    "curved": make_curved_manifold,             # bent strokes, all parameters explicit
    "curved_default": default_curved_manifold,  # same defaults, preset name
}


def register_manifold(name: str, builder: Callable[..., KnownManifold]) -> None:
    """Add a named builder (used by the curved manifold module)."""
    _BUILDERS[name] = builder


def manifold_names() -> list[str]:
    """All names accepted by :func:`build_manifold`."""
    return sorted(_BUILDERS)


def build_manifold(name: str, **kwargs) -> KnownManifold:
    """Build a known manifold by name; ``kwargs`` go to its builder (``key`` = seed or PRNG key).

    Names: 'linear', 'linear_default', 'linear_exact', 'curved', 'curved_default'.
    Unknown names raise ValueError listing the choices.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown manifold {name!r}; expected one of {manifold_names()}")
    return _BUILDERS[name](**kwargs)
