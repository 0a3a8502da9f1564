"""PyTorch transcription of pagjax's EDM score model: the U-Net and its training step.

The yardstick of `benchmarks.bench_engine`'s ``unet`` rows, written from the definitions in
`pagjax.score_model` the way a PyTorch user writes them (NCHW, ``nn.Module``,
``loss.backward()``, ``torch.optim.Adam``):

* `UNet` is `pagjax.score_model.UNet` layer for layer: the sinusoidal noise embedding,
  dense + class embedding (``num_classes + 1``, the last "no label") + SiLU MLP, a 3x3 input
  conv, per level ``blocks`` residual blocks (GroupNorm-SiLU-conv, FiLM, GroupNorm-SiLU-conv,
  1x1 skip conv where the width changes) and a stride-2 3x3 conv between levels, a middle
  block, then per level back up a nearest resize + 3x3 conv, the skip concatenated, and
  ``blocks`` residual blocks; GroupNorm-SiLU and a 3x3 output conv. GroupNorm groups and
  epsilon (1e-6), zero-initialised last convs and flax's 'SAME' paddings are flax's.
* `make_train_step` is `pagjax.score_model.make_step_fn`: ln sigma ~ N(p_mean, p_std^2),
  label dropout to the "no label" class, EDM preconditioning around the data mean, loss
  weight (sigma^2 + sigma_d^2) / (sigma sigma_d)^2, Adam with warm-up + cosine decay and
  global-norm clipping, a non-finite step skipped, then the EMA of the weights.

`load_flax_params` copies a pagjax U-Net's parameters in, so a test can check that both
compute the same function. PyTorch is optional (the ``bench`` extra): import this module
only where torch is installed.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

GN_EPS = 1e-6  # flax's GroupNorm epsilon (PyTorch's default is 1e-5)


def groups(c: int) -> int:
    """pagjax's GroupNorm groups: the largest divisor of c that is at most 8."""
    g = min(8, c)
    while c % g:
        g -= 1
    return g


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """flax 'SAME' padding (low, high) of one dimension: output ceil(size / stride)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups(c), c, eps=GN_EPS)


def _zero_conv(cin: int, cout: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, 3, padding=1)
    nn.init.zeros_(conv.weight)  # flax kernel_init=zeros (the bias starts at zero in both)
    nn.init.zeros_(conv.bias)
    return conv


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, FiLM by the embedding, GroupNorm-SiLU-conv, plus the skip."""

    def __init__(self, cin: int, features: int, emb_dim: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, features, 3, padding=1)
        self.film, self.norm2 = nn.Linear(emb_dim, 2 * features), _norm(features)
        self.conv2 = _zero_conv(features, features)
        self.skip = nn.Conv2d(cin, features, 1) if cin != features else None
        # flax's auto-names, in the order the flax block creates its layers (for the loader)
        self.flax_names = {"Conv_0": self.conv1, "GroupNorm_0": self.norm1, "Dense_0": self.film,
                           "GroupNorm_1": self.norm2, "Conv_1": self.conv2}
        if self.skip is not None:
            self.flax_names["Conv_2"] = self.skip

    def forward(self, h, emb):
        z = self.conv1(F.silu(self.norm1(h)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, 1)
        z = self.norm2(z) * (1 + scale) + shift
        z = self.conv2(F.silu(z))
        return (h if self.skip is None else self.skip(h)) + z


class UNet(nn.Module):
    """F(x_in, c_noise, y) for (B, C, H, W) images: `pagjax.score_model.UNet` in PyTorch."""

    def __init__(self, image_shape, channels=(32, 64), blocks: int = 1, emb_dim: int = 128, num_classes: int = 0):
        super().__init__()
        hgt, wid, cin = image_shape
        self.emb_dim, self.blocks, self.channels = emb_dim, blocks, tuple(channels)
        half = emb_dim // 2
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(1000.0), half)))
        names = {}  # flax name -> module, filled in the order flax creates the layers
        count = {}

        def add(kind, module):
            names[f"{kind}_{count.get(kind, 0)}"] = module
            count[kind] = count.get(kind, 0) + 1
            return module

        self.emb_in = add("Dense", nn.Linear(2 * half, emb_dim))
        self.label = add("Embed", nn.Embedding(num_classes + 1, emb_dim)) if num_classes else None
        self.emb_out = add("Dense", nn.Linear(emb_dim, emb_dim))
        self.conv_in = add("Conv", nn.Conv2d(cin, channels[0], 3, padding=1))
        self.down, self.down_pads, sizes = nn.ModuleList(), [], [(hgt, wid)]
        c = channels[0]
        for i, f in enumerate(channels):
            for _ in range(blocks):
                self.down.append(add("ResBlock", ResBlock(c, f, emb_dim)))
                c = f
            if i + 1 < len(channels):
                h_, w_ = sizes[-1]
                ph, pw = same_padding(h_, 3, 2), same_padding(w_, 3, 2)
                self.down_pads.append((pw[0], pw[1], ph[0], ph[1]))  # F.pad order: last dim first
                self.down.append(add("Conv", nn.Conv2d(f, channels[i + 1], 3, stride=2)))
                sizes.append((-(-h_ // 2), -(-w_ // 2)))
                c = channels[i + 1]
        self.sizes = sizes  # the resolution of each level
        self.mid = add("ResBlock", ResBlock(c, c, emb_dim))
        self.up = nn.ModuleList()
        for i in reversed(range(len(channels))):
            if i + 1 < len(channels):  # a lower level below: resize + conv to this level's width
                self.up.append(add("Conv", nn.Conv2d(c, channels[i], 3, padding=1)))
                c = channels[i]
            c += channels[i]  # the skip, concatenated
            for _ in range(blocks):
                self.up.append(add("ResBlock", ResBlock(c, channels[i], emb_dim)))
                c = channels[i]
        self.norm_out = add("GroupNorm", _norm(c))
        self.conv_out = add("Conv", _zero_conv(c, cin))
        self.flax_names = names

    def forward(self, x, c_noise, y=None):
        ang = c_noise[:, None] * self.freqs[None, :]
        emb = self.emb_in(torch.cat([ang.sin(), ang.cos()], 1))
        if self.label is not None:
            emb = emb + self.label(y)
        emb = F.silu(self.emb_out(F.silu(emb)))
        h = self.conv_in(x)
        skips, mods, pads = [], iter(self.down), iter(self.down_pads)
        for i in range(len(self.channels)):
            for _ in range(self.blocks):
                h = next(mods)(h, emb)
            skips.append(h)
            if i + 1 < len(self.channels):
                h = next(mods)(F.pad(h, next(pads)))  # flax 'SAME' at stride 2: (0, 1) on even sizes
        h = self.mid(h, emb)
        mods = iter(self.up)
        for i in reversed(range(len(self.channels))):
            skip = skips[i]
            if h.shape[2:] != skip.shape[2:]:
                # jax.image.resize "nearest" samples at pixel centres: PyTorch's "nearest-exact"
                h = next(mods)(F.interpolate(h, size=skip.shape[2:], mode="nearest-exact"))
            h = torch.cat([h, skip], 1)
            for _ in range(self.blocks):
                h = next(mods)(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))


def n_params(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def load_flax_params(net: UNet, params) -> UNet:
    """Copy a pagjax `UNet`'s parameters into ``net`` (kernels HWIO -> OIHW, dense (in, out) -> (out, in))."""

    def copy(module, p):
        if isinstance(module, ResBlock):
            for name, sub in module.flax_names.items():
                copy(sub, p[name])
            return
        t = {k: torch.from_numpy(np.array(v)) for k, v in p.items()}
        if isinstance(module, nn.Conv2d):
            module.weight.copy_(t["kernel"].permute(3, 2, 0, 1))
            module.bias.copy_(t["bias"])
        elif isinstance(module, nn.Linear):
            module.weight.copy_(t["kernel"].T)
            module.bias.copy_(t["bias"])
        elif isinstance(module, nn.Embedding):
            module.weight.copy_(t["embedding"])
        else:  # GroupNorm
            module.weight.copy_(t["scale"])
            module.bias.copy_(t["bias"])

    if set(net.flax_names) != set(params):
        raise ValueError(f"layer names differ: {sorted(net.flax_names)} vs {sorted(params)}")
    for name, module in net.flax_names.items():
        copy(module, params[name])
    return net


def warmup_cosine(step: int, peak: float, warmup: int, total: int, end: float) -> float:
    """optax.warmup_cosine_decay_schedule(0, peak, warmup, total, end) at ``step``."""
    if step < warmup:
        return peak * step / warmup
    frac = min((step - warmup) / max(total - warmup, 1), 1.0)
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * frac))


def make_train_step(net: UNet, config, mean, sigma_data: float):
    """``step(x0, y) -> loss``: one training step of `pagjax.score_model.make_step_fn`.

    ``config`` is a `pagjax.score_model.ScoreModelConfig` (only its numbers are read);
    ``mean`` the per-pixel data mean (C, H, W). The EMA weights are ``step.ema``.
    """
    params = [p for p in net.parameters()]
    opt = torch.optim.Adam(params, lr=0.0)
    ema = [p.detach().clone() for p in params]
    warm = min(config.warmup_steps, max(config.steps - 1, 0))
    total = max(config.steps, warm + 1)
    sd = float(sigma_data)
    t = [0, 0]  # steps taken (the EMA's warm-up) and updates applied (the schedule's, as optax counts)

    def step(x0, y):
        n = x0.shape[0]
        sigma = torch.exp(config.p_mean + config.p_std * torch.randn(n))
        noise = torch.randn_like(x0)
        if config.num_classes:  # label dropout to the learned "no label" class
            y = torch.where(torch.rand(n) < config.label_dropout, config.num_classes, y)
        s = sigma[:, None, None, None]
        c_skip, c_out, c_in = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), 1 / (s**2 + sd**2).sqrt()
        xc = x0 + s * noise - mean
        d = mean + c_skip * xc + c_out * net(c_in * xc, sigma.log() / 4, y if config.num_classes else None)
        weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
        loss = (weight * (d - x0).square().mean((1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = nn.utils.clip_grad_norm_(params, config.grad_clip)
        if torch.isfinite(loss) and torch.isfinite(norm):  # a non-finite step leaves the weights
            for g in opt.param_groups:
                g["lr"] = warmup_cosine(t[1], config.learning_rate, max(warm, 1), total, 0.05 * config.learning_rate)
            opt.step()
            decay = min(config.ema_decay, (1.0 + t[0]) / (10.0 + t[0]))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)
            t[1] += 1
        t[0] += 1
        return loss

    step.ema = ema
    return step
