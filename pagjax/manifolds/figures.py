"""Overview figure of known manifolds: samples per class and Bayes-optimal gradients.

Uses matplotlib's Agg backend (no display needed).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pagjax.manifolds.base import KnownManifold
from pagjax.numerics import per_example_norm


def _one_per_class(manifold: KnownManifold, key, per_class: int):
    """Draw samples until every class has ``per_class`` examples; returns (x, y) sorted by class."""
    data = manifold.sample(key, 64 * manifold.num_classes * per_class)
    y = np.asarray(data.y)
    idx = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(manifold.num_classes)])
    return data.x[idx], data.y[idx], data.z[idx]


def _show(ax, img, cmap, vmin, vmax):
    ax.imshow(np.asarray(img)[..., 0] if img.shape[-1] == 1 else np.asarray(img),
              cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_manifold_overview(manifolds: KnownManifold | Mapping[str, KnownManifold], key, path: str,
                           noise_levels: Sequence[float] = (0.0, 0.1, 0.5), samples_per_class: int = 2):
    """Draw, for each manifold: a row of clean samples (``samples_per_class`` per class), then for
    every noise level s a row with, per class, a noisy input x = x0 + s n and the Bayes-optimal
    gradient grad_x log p_s(y|x) of its true class (red/blue = increase/decrease, each map scaled
    by its own max |value|; the title gives its on-manifold fraction ||P g|| / ||g||).

    ``manifolds`` is one manifold or a mapping name -> manifold. Writes a PNG to ``path`` and
    returns the path.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if isinstance(manifolds, KnownManifold):
        manifolds = {type(manifolds).__name__: manifolds}
    noise_levels = [float(s) for s in noise_levels]
    cols = max(2 * m.num_classes for m in manifolds.values())
    cols = max(cols, max(samples_per_class * m.num_classes for m in manifolds.values()))
    rows = sum(1 + len(noise_levels) for _ in manifolds)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.45 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    row = 0
    for name, m in manifolds.items():
        key, k_samples, k_noise = jax.random.split(key, 3)
        x, y, z = _one_per_class(m, k_samples, samples_per_class)
        lo, hi = float(jnp.percentile(x, 1)), float(jnp.percentile(x, 99))
        for i in range(x.shape[0]):
            ax = axes[row, i]
            ax.axis("on")
            _show(ax, x[i], "gray", lo, hi)
            ax.set_title(f"y={int(y[i])}", fontsize=7)
        axes[row, 0].set_ylabel(f"{name}\nsamples", fontsize=7)
        row += 1
        first = np.arange(0, x.shape[0], samples_per_class)
        x1, y1, z1 = x[first], y[first], z[first]
        basis = m.tangent_basis(z1)
        noise = jax.random.normal(k_noise, x1.shape, x1.dtype)
        for s in noise_levels:
            xs = x1 + s * noise
            g = m.bayes_gradient(xs, y1, s)
            gf = g.reshape(g.shape[0], -1)
            frac = per_example_norm(jnp.einsum("nd,ndk->nk", gf, basis)) / jnp.maximum(per_example_norm(gf), 1e-30)
            for c in range(x1.shape[0]):
                ax_x, ax_g = axes[row, 2 * c], axes[row, 2 * c + 1]
                ax_x.axis("on")
                ax_g.axis("on")
                _show(ax_x, xs[c], "gray", lo, hi)
                ax_x.set_title(f"x, s={s:g}", fontsize=7)
                scale = float(jnp.max(jnp.abs(g[c]))) or 1.0
                _show(ax_g, g[c] / scale, "bwr", -1.0, 1.0)
                ax_g.set_title(f"grad, on={float(frac[c]):.2f}", fontsize=7)
            axes[row, 0].set_ylabel(f"s = {s:g}", fontsize=7)
            row += 1
    fig.suptitle("Known manifolds: samples per class; noisy inputs and Bayes-optimal "
                 "gradients grad log p_s(y|x)", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
