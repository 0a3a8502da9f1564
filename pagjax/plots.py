"""Figures: the paper's Figure-3 layout, grids of input-gradient maps and of images."""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import matplotlib
import matplotlib.patches
import numpy as np
# Figures are built with the object-oriented API (no pyplot) and rendered only by `savefig`,
# so importing this module never switches the user's backend: a notebook's inline plots
# keep working, and a machine without a display needs no setting.
from matplotlib.figure import Figure

from pagjax import io as io_lib

REGIME_COLOURS = {"weak": "#f4cccc", "bayes_aligned": "#d9ead3", "excessive": "#cfe2f3"}


def _plot_positions(strengths: np.ndarray) -> np.ndarray:
    """Strength 0 cannot sit on a log axis: draw it one decade below the smallest positive."""
    s = np.asarray(strengths, float)
    pos = s[s > 0]
    floor = pos.min() / 10 if pos.size else 1.0
    return np.where(s > 0, s, floor)


def _band(ax, x, values, label, colour):
    """Mean line and min-max band over seeds; values: (S, seeds) with NaN for diverged."""
    with warnings.catch_warnings():  # all-NaN rows (diverged points) are expected
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, lo, hi = np.nanmean(values, 1), np.nanmin(values, 1), np.nanmax(values, 1)
    ax.plot(x, mean, "o-", color=colour, label=label, ms=3)
    ax.fill_between(x, lo, hi, color=colour, alpha=0.2, lw=0)


def _shade(ax, x, labels):
    edges = np.sqrt(x[:-1] * x[1:]) if len(x) > 1 else np.array([])
    lefts = np.concatenate([[x[0] / 2], edges])
    rights = np.concatenate([edges, [x[-1] * 2]])
    for left, right, lab in zip(lefts, rights, labels):
        ax.axvspan(left, right, color=REGIME_COLOURS.get(lab, "white"), alpha=0.6, lw=0)


def figure3(curves: dict, path: str, *, strength_names: dict | None = None) -> None:
    """The paper's Figure-3 layout: one column per method.

    ``curves[method]`` holds ``strengths`` (S,), arrays (S, seeds) ``on_change``,
    ``off_change``, ``accuracy``, ``alignment`` and ``labels`` (S,) regime names.
    Top: on- and off-manifold change; bottom: accuracy and alignment, regimes shaded.
    """
    methods = list(curves)
    fig = Figure(figsize=(3.4 * len(methods), 5.6))
    axes = fig.subplots(2, len(methods), squeeze=False, sharex="col")
    for j, method in enumerate(methods):
        c = curves[method]
        x = _plot_positions(c["strengths"])
        top, bottom = axes[0, j], axes[1, j]
        for ax in (top, bottom):
            _shade(ax, x, c["labels"])
            ax.set_xscale("log")
            ax.grid(alpha=0.3)
        _band(top, x, c["on_change"], "on-manifold", "tab:green")
        _band(top, x, c["off_change"], "off-manifold", "tab:red")
        top.set_title(method)
        _band(bottom, x, c["accuracy"], "accuracy", "tab:blue")
        _band(bottom, x, c["alignment"], c.get("alignment_label", "alignment"), "tab:purple")
        bottom.set_ylim(0, 1.02)
        bottom.set_xlabel((strength_names or {}).get(method, "strength"))
        if j == 0:
            top.set_ylabel("softmax change (L1)")
            bottom.set_ylabel("accuracy / alignment")
            top.legend(fontsize=7)
            bottom.legend(fontsize=7, loc="lower left")
    patches = [matplotlib.patches.Patch(color=v, label=k) for k, v in REGIME_COLOURS.items()]
    fig.legend(handles=patches, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    _save(fig, path)


def _mosaic(images: np.ndarray, to_rgb, n_cols: int) -> np.ndarray:
    """One row of cells as one RGB image: ``to_rgb(image) -> (H, W, 3)`` in [0, 1] per
    cell, white gaps of max(1, H // 8) pixels between cells, white cells past the row's end."""
    h, w = images.shape[1:3]
    gap = max(1, h // 8)
    out = np.ones((h, n_cols * (w + gap) - gap, 3))
    for j, image in enumerate(images):
        out[:, j * (w + gap): j * (w + gap) + w] = to_rgb(np.asarray(image, float))
    return out


def _grid(rows: Sequence[np.ndarray], row_labels: Sequence[str], path: str, title: str, to_rgb, cell: float,
          margin: tuple[float, float]) -> None:
    """Rows of images (each (n, H, W, C)), one row label each; ``to_rgb(image)`` colours a
    cell. Figure size: `cell` inches per image plus `margin` (width, height) inches.

    Each row is one picture (`_mosaic`) on one axes: a grid of 7 x 8 separate axes took
    about 1 s to draw (0.25 s now), most of the default sweep's output time.
    """
    n_rows, n_cols = len(rows), max(r.shape[0] for r in rows)
    fig = Figure(figsize=(cell * n_cols + margin[0], cell * n_rows + margin[1]))
    axes = fig.subplots(n_rows, 1, squeeze=False)[:, 0]
    for ax, images, label in zip(axes, rows, row_labels):
        ax.imshow(_mosaic(np.asarray(images), to_rgb, n_cols), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
        ax.set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def gradient_map_rgb(m: np.ndarray) -> np.ndarray:
    """An input-gradient map (H, W, C) as RGB, scaled by its own max |value|: one channel on
    the red-blue map (red positive, blue negative, white zero), three channels around grey."""
    scale = np.max(np.abs(m)) or 1.0
    if m.shape[-1] == 1:
        return matplotlib.colormaps["RdBu_r"](0.5 + 0.5 * m[..., 0] / scale)[..., :3]
    return np.clip(0.5 + 0.5 * m / scale, 0, 1)


def gradient_grid(rows: Sequence[np.ndarray], row_labels: Sequence[str], path: str, *, title: str = "") -> None:
    """Rows of input-gradient maps (each (n, H, W, C)), each map scaled by its own max |value|."""
    _grid(rows, row_labels, path, title, gradient_map_rgb, cell=1.3, margin=(1.2, 0.0))


def image_grid(rows: Sequence[np.ndarray], row_labels: Sequence[str], path: str, *, title: str = "",
               value_range: tuple[float, float] | None = None) -> None:
    """Rows of images (each (n, H, W, C)) on one grey/colour scale for the whole figure:
    `value_range` (lo, hi), by default the 1st and 99th percentiles of all the pixels."""
    if value_range is None:
        value_range = tuple(np.percentile(np.concatenate([np.asarray(r, float).ravel() for r in rows]), [1, 99]))
    lo, hi = value_range

    def to_rgb(img):
        im = np.clip((img - lo) / max(hi - lo, 1e-12), 0, 1)
        return np.repeat(im, 3, axis=-1) if im.shape[-1] == 1 else im

    _grid(rows, row_labels, path, title, to_rgb, cell=1.1, margin=(1.6, 0.4))


def _save(fig, path):
    io_lib.atomic_write(path, lambda f: fig.savefig(f, dpi=110, format=path.rsplit(".", 1)[-1]), mode="wb")


def strength_label(value: float) -> str:
    """Short label of a strength for figure rows."""
    return "0" if value == 0 else f"{value:.3g}"


