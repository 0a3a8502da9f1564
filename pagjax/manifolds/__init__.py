"""Known-manifold datasets with exact Bayes-optimal posteriors, scores and tangent spaces.

* :class:`LinearManifold` - Gaussian mixtures on a smooth k-dim subspace (closed form).
* :class:`CurvedManifold` - rendered bent strokes on a curved 3-dim manifold (quadrature).
* :func:`build_manifold` - by name: 'linear', 'linear_default', 'linear_exact', ...
* :func:`make_dataset` - train/test arrays from any known manifold.
"""
from pagjax.manifolds.base import KnownManifold, KnownManifoldData, Samples, make_dataset
from pagjax.manifolds.curved import (CurvedManifold, default_curved_manifold,
                                     make_curved_manifold)
from pagjax.manifolds.linear import (LinearManifold, default_linear_manifold,
                                     make_linear_manifold, smooth_orthonormal_patterns)
from pagjax.manifolds.registry import build_manifold, manifold_names, register_manifold

__all__ = [
    "KnownManifold", "KnownManifoldData", "Samples", "make_dataset",
    "LinearManifold", "default_linear_manifold", "make_linear_manifold",
    "smooth_orthonormal_patterns", "CurvedManifold", "default_curved_manifold", "make_curved_manifold", "build_manifold", "manifold_names", "register_manifold",
]
