"""Figure grids: each cell shows its own map on the stated colour scale, in place."""
import matplotlib
import numpy as np
from PIL import Image

from pagjax import plots


def test_gradient_map_colours_red_positive_blue_negative_white_zero():
    m = np.array([[2.0, -2.0, 0.0, 1.0]]).reshape(1, 4, 1)
    rgb = plots.gradient_map_rgb(m)
    cmap = matplotlib.colormaps["RdBu_r"]
    # scaled by the map's own max |value| = 2: +1 -> top of the map, -1 -> bottom, 0 -> middle
    np.testing.assert_allclose(rgb[0], [cmap(1.0)[:3], cmap(0.0)[:3], cmap(0.5)[:3], cmap(0.75)[:3]])
    assert rgb[0, 0, 0] > rgb[0, 0, 2] and rgb[0, 1, 2] > rgb[0, 1, 0]  # red, then blue
    np.testing.assert_allclose(rgb[0, 2], [0.97, 0.97, 0.97], atol=0.03)  # near white
    # three channels: around grey, each scaled by the same max |value|
    np.testing.assert_allclose(plots.gradient_map_rgb(np.array([[[4.0, -2.0, 0.0]]])), [[[1.0, 0.25, 0.5]]])
    # an all-zero map is mid-scale, not a division by zero
    np.testing.assert_allclose(plots.gradient_map_rgb(np.zeros((2, 2, 1))), np.broadcast_to(cmap(0.5)[:3], (2, 2, 3)))


def test_mosaic_puts_each_cell_in_place_with_white_gaps():
    images = np.arange(3 * 8 * 5 * 1, dtype=float).reshape(3, 8, 5, 1)
    grey = lambda im: np.repeat(im / 1000.0, 3, axis=-1)  # noqa: E731
    out = plots._mosaic(images, grey, n_cols=4)
    gap = 1  # max(1, 8 // 8)
    assert out.shape == (8, 4 * 5 + 3 * gap, 3)
    for j in range(3):
        np.testing.assert_array_equal(out[:, j * 6: j * 6 + 5], grey(images[j]))
        np.testing.assert_array_equal(out[:, j * 6 + 5], 1.0)  # the gap after each cell
    np.testing.assert_array_equal(out[:, 18:], 1.0)  # the fourth cell is missing: white


def test_grids_write_pictures_of_the_stated_size(tmp_path):
    rng = np.random.default_rng(0)
    rows = [rng.normal(size=(8, 16, 16, 1)) for _ in range(3)] + [rng.normal(size=(2, 16, 16, 1))]
    plots.gradient_grid(rows, ["0", "0.1", "1", "Bayes"], str(tmp_path / "g.png"), title="noise")
    plots.image_grid([rng.uniform(size=(4, 32, 32, 3))], ["x"], str(tmp_path / "i.png"))
    w, h = Image.open(tmp_path / "g.png").size
    assert (w, h) == (round((1.3 * 8 + 1.2) * 110), round(1.3 * 4 * 110))  # cell inches x dpi
    assert Image.open(tmp_path / "i.png").size == (round((1.1 * 4 + 1.6) * 110), round((1.1 + 0.4) * 110))
