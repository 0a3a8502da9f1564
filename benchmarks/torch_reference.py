"""PyTorch transcriptions of pagjax's small CNN, CIFAR ResNet-18 and training objectives.

The yardstick of `benchmarks.bench_vs_torch`: the same networks and the same five
per-step objectives, written the way a PyTorch user writes them (NCHW, ``nn.Module``,
``loss.backward()``, ``torch.optim.SGD``), from the architectures in `pagjax.models` and the
loss formulas in `pagjax.objectives` (the textbook conventions, ``official=False``, which
the step benchmark trains with):

==============  ==================================================================
objective       what one step computes (mean over the batch)
==============  ==================================================================
``ce``          CE(f(x), y)
``gradnorm``    CE + lam ||grad_x CE||^2, by double backprop (``create_graph=True``),
                as PyTorch code usually does it (pagjax uses a forward-mode pass)
``smoothness``  CE + lam ||f(x) - f(x + n)||^2, n ~ N(0, 0.1^2 I)
``noise``       CE(f(x + n), y), n ~ N(0, s^2 I)
``pgd``         CE(f(x + delta), y), delta from k steps of per-example L2 PGD of radius
                eps: uniform start in the ball, normalised-gradient steps of 2 eps / k,
                projection onto the ball, no box (`pagjax.attacks`)
==============  ==================================================================

Every forward runs in training mode (batch statistics), as in pagjax; PyTorch then updates
the BatchNorm running statistics at every forward (the official code's behaviour), which
costs nothing measurable and does not change the loss.

`load_flax_variables` copies a pagjax model's variables into a transcription (kernels
HWIO -> OIHW; the CNN's first dense layer permuted from flax's (h, w, c) flattening to
PyTorch's (c, h, w)), so the tests can check that both compute the same loss and gradients.

PyTorch is optional (the ``bench`` extra): import this module only where torch is installed.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS: dict[str, Callable] = {
    "relu": F.relu,
    "softplus": F.softplus,
    "gelu": lambda h: F.gelu(h, approximate="tanh"),  # flax's gelu is the tanh approximation
    "swish": F.silu,
}


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """flax/XLA 'SAME' padding (low, high) of one spatial dimension: output ceil(size / stride)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SmallCNN(nn.Module):
    """`pagjax.models.SmallCNN`: `depth` stride-2 3x3 'SAME' convolutions, then two dense layers.

    'SAME' at stride 2 pads an even size by (0, 1), which no ``Conv2d(padding=...)`` does:
    the padding is an explicit ``F.pad`` (one small copy per layer) so the numbers match.
    """

    def __init__(self, num_classes: int, image: Sequence[int], width: int = 32, depth: int = 3, act: str = "relu"):
        super().__init__()
        hgt, wid, ch = image
        self.act = ACTIVATIONS[act]
        self.convs = nn.ModuleList()
        self.pads = []
        c = ch
        for i in range(depth):
            (ht, hb), (wl, wr) = same_padding(hgt, 3, 2), same_padding(wid, 3, 2)
            self.pads.append((wl, wr, ht, hb))
            self.convs.append(nn.Conv2d(c, width * 2**i, 3, stride=2))
            c, hgt, wid = width * 2**i, -(-hgt // 2), -(-wid // 2)
        self.flat_shape = (hgt, wid, c)
        self.fc = nn.Linear(hgt * wid * c, 4 * width)
        self.out = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        h = x
        for conv, pad in zip(self.convs, self.pads):
            h = self.act(conv(F.pad(h, pad)))
        return self.out(self.act(self.fc(h.flatten(1))))


def _bn(c: int) -> nn.BatchNorm2d:
    # flax BatchNorm(momentum=0.9) keeps 0.9 of the old running value: PyTorch's momentum 0.1
    return nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm, and a 1x1 projection shortcut where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int, act: Callable):
        super().__init__()
        self.act = act
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), _bn(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), _bn(c_out)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), _bn(c_out))

    def forward(self, x):
        h = self.act(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return self.act(h + (x if self.shortcut is None else self.shortcut(x)))


class ResNet18(nn.Module):
    """`pagjax.models.ResNet18`: CIFAR ResNet-18, 3x3 stem, no max-pool, global mean pool."""

    def __init__(self, num_classes: int, image: Sequence[int], width: int = 64,
                 stages: Sequence[int] = (2, 2, 2, 2), act: str = "relu"):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.stem, self.bn = nn.Conv2d(image[2], width, 3, padding=1, bias=False), _bn(width)
        blocks, c = [], width
        for i, n in enumerate(stages):
            for j in range(n):
                blocks.append(BasicBlock(c, width * 2**i, 2 if (i > 0 and j == 0) else 1, self.act))
                c = width * 2**i
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        h = self.blocks(self.act(self.bn(self.stem(x))))
        return self.fc(h.mean((2, 3)))


def build_model(name: str, num_classes: int, image: Sequence[int], width: int) -> nn.Module:
    """``cnn`` or ``resnet18`` at `width`, for NCHW images of NHWC shape `image`."""
    if name == "cnn":
        return SmallCNN(num_classes, image, width)
    if name == "resnet18":
        return ResNet18(num_classes, image, width)
    raise ValueError(f"no PyTorch transcription of model {name!r}; have cnn, resnet18")


# --------------------------------------------------------------------------- weights from pagjax


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32))


def _conv(module: nn.Conv2d, p: dict) -> None:
    module.weight.copy_(_t(p["kernel"]).permute(3, 2, 0, 1))  # HWIO -> OIHW
    if module.bias is not None:
        module.bias.copy_(_t(p["bias"]))


def _dense(module: nn.Linear, p: dict) -> None:
    module.weight.copy_(_t(p["kernel"]).T)
    module.bias.copy_(_t(p["bias"]))


def _norm(module: nn.BatchNorm2d, p: dict, s: dict) -> None:
    module.weight.copy_(_t(p["scale"]))
    module.bias.copy_(_t(p["bias"]))
    module.running_mean.copy_(_t(s["mean"]))
    module.running_var.copy_(_t(s["var"]))


@torch.no_grad()
def load_flax_variables(model: nn.Module, variables: dict) -> nn.Module:
    """Copy a pagjax model's variables (``{"params": ..., "batch_stats": ...}``) into `model`."""
    p = variables["params"]
    if isinstance(model, SmallCNN):
        for i, conv in enumerate(model.convs):
            _conv(conv, p[f"Conv_{i}"])
        hgt, wid, c = model.flat_shape
        k = _t(p["Dense_0"]["kernel"])  # rows in flax's (h, w, c) order -> PyTorch's (c, h, w)
        model.fc.weight.copy_(k.reshape(hgt, wid, c, -1).permute(3, 2, 0, 1).reshape(k.shape[1], -1))
        model.fc.bias.copy_(_t(p["Dense_0"]["bias"]))
        _dense(model.out, p["Dense_1"])
        return model
    if isinstance(model, ResNet18):
        s = variables["batch_stats"]
        _conv(model.stem, p["Conv_0"])
        _norm(model.bn, p["BatchNorm_0"], s["BatchNorm_0"])
        for i, block in enumerate(model.blocks):
            bp, bs = p[f"BasicBlock_{i}"], s[f"BasicBlock_{i}"]
            _conv(block.conv1, bp["Conv_0"])
            _norm(block.bn1, bp["BatchNorm_0"], bs["BatchNorm_0"])
            _conv(block.conv2, bp["Conv_1"])
            _norm(block.bn2, bp["BatchNorm_1"], bs["BatchNorm_1"])
            if block.shortcut is not None:
                _conv(block.shortcut[0], bp["Conv_2"])
                _norm(block.shortcut[1], bp["BatchNorm_2"], bs["BatchNorm_2"])
        _dense(model.fc, p["Dense_0"])
        return model
    raise TypeError(f"cannot load flax variables into {type(model).__name__}")


# --------------------------------------------------------------------------- objectives


def _per_example_norm(v: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1, 1) L2 norms of the examples of an NCHW batch."""
    return v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))


def ce_loss(model, x, y, strength, *, k=10):
    del strength, k
    return F.cross_entropy(model(x), y)


def gradnorm_loss(model, x, y, lam, *, k=10):
    del k
    x = x.detach().requires_grad_(True)
    ce = F.cross_entropy(model(x), y, reduction="none")
    (g,) = torch.autograd.grad(ce.sum(), x, create_graph=True)  # row i is example i's own gradient
    return (ce + lam * g.square().flatten(1).sum(1)).mean()


def smoothness_loss(model, x, y, lam, *, k=10, noise_std=0.1):
    del k
    logits = model(x)
    noisy = model(x + noise_std * torch.randn_like(x))
    return (F.cross_entropy(logits, y, reduction="none") + lam * (logits - noisy).square().sum(1)).mean()


def noise_loss(model, x, y, s, *, k=10):
    del k
    return F.cross_entropy(model(x + s * torch.randn_like(x)), y)


def l2_pgd(model, x, y, eps: float, k: int) -> torch.Tensor:
    """Per-example L2 PGD: uniform start in the ball, k normalised-gradient steps of 2 eps / k."""
    direction = torch.randn_like(x)
    radius = eps * torch.rand(x.shape[0], device=x.device) ** (1.0 / x[0].numel())
    delta = direction / _per_example_norm(direction) * radius.view(-1, 1, 1, 1)
    step = 2.0 * eps / max(k, 1)
    for _ in range(k):
        delta.requires_grad_(True)
        # only the input gradient is asked for: autograd skips the weights' gradients
        (g,) = torch.autograd.grad(F.cross_entropy(model(x + delta), y, reduction="sum"), delta)
        n = _per_example_norm(g)
        delta = delta.detach() + step * torch.where(n > 0, g / n.clamp_min(1e-30), torch.zeros_like(g))
        delta = delta * torch.clamp(eps / _per_example_norm(delta).clamp_min(1e-12), max=1.0)
    return delta.detach()


def pgd_loss(model, x, y, eps, *, k=10):
    return F.cross_entropy(model(x + l2_pgd(model, x, y, eps, k)), y)


OBJECTIVES: dict[str, Callable] = {
    "ce": ce_loss,
    "gradnorm": gradnorm_loss,
    "smoothness": smoothness_loss,
    "noise": noise_loss,
    "pgd": pgd_loss,
}


def objective(name: str) -> Callable:
    """``loss(model, x, y, strength, *, k) -> scalar`` of objective `name`."""
    if name not in OBJECTIVES:
        raise ValueError(f"no PyTorch transcription of objective {name!r}; have {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def make_step(model: nn.Module, name: str, x, y, strength: float, k: int, *, lr: float = 1e-3,
              momentum: float = 0.9) -> Callable[[], torch.Tensor]:
    """``step() -> loss``: one training step (zero_grad, loss, backward, SGD with momentum),
    as `benchmarks.bench_step` trains pagjax (optax SGD, lr 1e-3, momentum 0.9)."""
    loss_fn = objective(name)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, x, y, strength, k=k)
        loss.backward()
        opt.step()
        return loss

    return step


def n_params(model: nn.Module) -> int:
    """Trainable parameters (BatchNorm running statistics excluded, as in pagjax's ``params``)."""
    return sum(p.numel() for p in model.parameters())

