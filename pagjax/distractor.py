"""The signal/distractor experiment (docs/theory.md §5): where do robust models look?

Each image is a two-slot canvas (two halves stacked vertically): a digit (the *signal*,
which alone determines the label) in one half and a *distractor* (a rendered letter,
unrelated to the label) in the other, the digit's half chosen at random. Gaussian noise
of level s added to the signal half only, or to the distractor half only, changes the
model's softmax output by some amount; the ratio signal/distractor of the two changes is
about 1 for a standard model, which reacts to both halves, and clearly above 1 for a
robust model, which ignores the task-irrelevant half (Srinivas, Bordt & Lakkaraju,
NeurIPS 2023, the distractor figure).

The distractor half is a known task-irrelevant ("off-manifold" for the class-relevant
structure) subspace, so the input-gradient's *signal fraction* ||g_signal|| / ||g|| is the
analogue of the on-manifold fraction: 1/sqrt(2) for a gradient spread evenly, 1 for one
entirely on the digit.

Letters are drawn from small hand-made 5x7 bitmaps in this module (no font files).
Everything is a pure function of explicit seeds / PRNG keys and batched arrays.
"""
from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from pagjax import numerics, validation
from pagjax.static import Static

Array = jax.Array

# 5 columns x 7 rows, '#' = ink. Hand-drawn for this module.
_LETTERS = {
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "B": ("####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."),
    "C": (".####", "#....", "#....", "#....", "#....", "#....", ".####"),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "F": ("#####", "#....", "#....", "####.", "#....", "#....", "#...."),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "K": ("#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"),
    "M": ("#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"),
    "N": ("#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#", "#...#"),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
    "T": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
    "X": ("#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"),
    "Y": ("#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."),
    "Z": ("#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"),
}
LETTERS = tuple(_LETTERS)


def letter_bitmaps() -> np.ndarray:
    """The letters as a (L, 7, 5) float32 array of 0/1 (order of `LETTERS`)."""
    return np.asarray([[[c == "#" for c in row] for row in _LETTERS[k]] for k in LETTERS], np.float32)


def render_letters(letter_ids: np.ndarray, size: tuple[int, int], seed: int) -> np.ndarray:
    """Render letters into (N, H, W, 1) float images in [0, 1].

    Each bitmap is scaled by the largest integer factor that fits (nearest neighbour),
    placed at a random offset, and given a random ink intensity in [0.6, 1]; `seed`
    fixes all of it.
    """
    h, w = size
    if h < 7 or w < 5:
        raise ValueError(f"size must be at least (7, 5) to draw a letter, got {size}")
    bitmaps = letter_bitmaps()
    f = max(1, min((h - 1) // 7, (w - 1) // 5)) if min(h, w) >= 12 else 1
    big = np.repeat(np.repeat(bitmaps, f, 1), f, 2)  # (L, 7f, 5f)
    bh, bw = big.shape[1:]
    rng = np.random.default_rng(seed)
    n = len(letter_ids)
    oy = rng.integers(0, h - bh + 1, n)
    ox = rng.integers(0, w - bw + 1, n)
    ink = rng.uniform(0.6, 1.0, n).astype(np.float32)
    out = np.zeros((n, h, w, 1), np.float32)
    for i in range(n):
        out[i, oy[i]:oy[i] + bh, ox[i]:ox[i] + bw, 0] = ink[i] * big[letter_ids[i]]
    return out


@dataclasses.dataclass
class DistractorData:
    """Two-slot canvases (N, 2H, W, C), labels (N,) from the digit, the digit's slot (N,) in {0, 1}."""

    x: np.ndarray
    y: np.ndarray
    signal_slot: np.ndarray


def make_distractor_dataset(digits: np.ndarray, labels: np.ndarray, seed: int) -> DistractorData:
    """Stack each digit (N, H, W, C) with a random letter, the digit's half chosen at random.

    Slot 0 is the top half, slot 1 the bottom half; the label is the digit's only.
    """
    validation.check_images("digits", digits)
    validation.check_labels("labels", labels, batch=digits.shape[0])
    n, h, w, c = digits.shape
    rng = np.random.default_rng(seed)
    slot = rng.integers(0, 2, n).astype(np.int32)
    letters = render_letters(rng.integers(0, len(LETTERS), n), (h, w), seed + 1)
    letters = np.repeat(letters, c, axis=-1)
    digits = np.asarray(digits, np.float32)
    top = np.where(slot[:, None, None, None] == 0, digits, letters)
    bottom = np.where(slot[:, None, None, None] == 0, letters, digits)
    return DistractorData(np.concatenate([top, bottom], axis=1), np.asarray(labels, np.int32), slot)


def half_masks(signal_slot: Array, shape: tuple[int, ...]) -> tuple[Array, Array]:
    """0/1 masks (N, 2H, W, C) of the signal half and of the distractor half."""
    n, hh, w, c = shape
    if hh % 2:
        raise ValueError(f"canvas height must be even (two slots), got shape {shape}")
    rows = jnp.arange(hh) >= hh // 2  # True in the bottom half
    sig = (rows[None, :] == (jnp.asarray(signal_slot)[:, None] == 1)).astype(jnp.float32)
    sig = jnp.broadcast_to(sig[:, :, None, None], (n, hh, w, c))
    return sig, 1.0 - sig


@partial(jax.jit, static_argnums=(0, 6))  # apply_fn is a `Static`
def _changes(apply_fn, variables, x, signal_slot, levels, key, num_draws):
    sig, dis = half_masks(signal_slot, x.shape)
    p0 = jax.nn.softmax(apply_fn(variables, x))

    def at_level(args):
        s, k = args

        def draw(kd):
            noise = s * jax.random.normal(kd, x.shape, x.dtype)  # the same draw for both halves' masks
            ps = jax.nn.softmax(apply_fn(variables, x + sig * noise))
            pd = jax.nn.softmax(apply_fn(variables, x + dis * noise))
            return jnp.sum(jnp.abs(ps - p0), -1), jnp.sum(jnp.abs(pd - p0), -1)

        cs, cd = jax.lax.map(draw, jax.random.split(k, num_draws))
        return jnp.mean(cs, 0), jnp.mean(cd, 0)

    return jax.lax.map(at_level, (levels, jax.random.split(key, levels.shape[0])))


def noise_sensitivity(apply_fn, variables, x, signal_slot, noise_levels, key, *, num_draws: int = 2) -> dict:
    """Softmax change (L1, in [0, 2]) under Gaussian noise on the signal half only and on the
    distractor half only, for every noise level.

    Returns a dict of arrays: ``levels`` (S,), per-image ``signal``/``distractor`` (S, N),
    their image means ``signal_change``/``distractor_change`` (S,) and ``ratio`` (S,) =
    signal_change / distractor_change (0/0 -> 0, never NaN).
    """
    validation.check_images("x", x)
    levels = np.atleast_1d(np.asarray(noise_levels, np.float32))
    if levels.size == 0 or np.any(~np.isfinite(levels)) or np.any(levels <= 0):
        raise ValueError(f"noise_levels must be finite numbers > 0, got {noise_levels!r}")
    validation.check_positive_int("num_draws", num_draws)
    if np.asarray(signal_slot).shape != (x.shape[0],):
        raise ValueError(f"signal_slot must have shape ({x.shape[0]},), got {np.asarray(signal_slot).shape}")
    cs, cd = _changes(Static(apply_fn), variables, jnp.asarray(x), jnp.asarray(signal_slot), jnp.asarray(levels),
                      key, num_draws)
    ms, md = jnp.mean(cs, 1), jnp.mean(cd, 1)
    return {"levels": levels, "signal": np.asarray(cs), "distractor": np.asarray(cd),
            "signal_change": np.asarray(ms), "distractor_change": np.asarray(md),
            "ratio": np.asarray(numerics.safe_ratio(ms, md))}


def gradient_signal_fraction(grads: Array, signal_slot: Array) -> Array:
    """||g on the signal half|| / ||g|| per example (a zero gradient gives 0); 1/sqrt(2) for
    a gradient spread evenly over both halves."""
    validation.check_images("grads", grads)
    sig, _ = half_masks(signal_slot, grads.shape)
    flat = lambda a: a.reshape(a.shape[0], -1)  # noqa: E731
    return numerics.safe_ratio(numerics.safe_norm(flat(grads * sig), axis=-1), numerics.safe_norm(flat(grads), axis=-1))
