"""Model zoo: a name string -> a pure (init, apply) pair.

Every model maps NHWC images in [0, 1] (no mean/std normalisation, as in the paper's
official code) to logits. A `Model` exposes

* ``init(key, sample_input) -> variables``   a dict ``{"params": ...}`` plus
  ``{"batch_stats": ...}`` for models with BatchNorm;
* ``apply(variables, x) -> logits``          inference mode, pure; examples are
  independent, so per-example input-gradients come from one backward pass;
* ``forward(variables, x) -> (logits, state)`` training mode: BatchNorm normalises with
  the batch's statistics and the updated running statistics come back in ``state``
  (``{}`` for stateless models). Nothing is mutated.

Names (for configs and the CLI): ``mlp``, ``cnn``, ``resnet18``, optionally with options
after a colon, e.g. ``mlp:width=256,depth=3,act=softplus`` or ``resnet18:act=softplus``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pagjax import validation

Array = jax.Array
Variables = dict[str, Any]

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": nn.relu,
    "softplus": nn.softplus,  # smooth: second derivatives (double backprop) are non-zero
    "gelu": nn.gelu,
    "swish": nn.swish,
}


class MLP(nn.Module):
    """Fully connected ReLU (or smooth) network on flattened images."""

    num_classes: int
    width: int = 512
    depth: int = 2
    act: str = "relu"

    @nn.compact
    def __call__(self, x, train: bool = False):
        act = ACTIVATIONS[self.act]
        h = x.reshape((x.shape[0], -1))
        for _ in range(self.depth):
            h = act(nn.Dense(self.width)(h))
        return nn.Dense(self.num_classes)(h)


class SmallCNN(nn.Module):
    """Small fast CNN: strided 3x3 convolutions (no pooling), then a dense head.

    Stride-2 convolutions were about 4x faster than conv + pooling on CPU
    (measured on this project's machines).
    """

    num_classes: int
    width: int = 32
    depth: int = 3
    act: str = "relu"

    @nn.compact
    def __call__(self, x, train: bool = False):
        act = ACTIVATIONS[self.act]
        h = x
        for i in range(self.depth):
            h = act(nn.Conv(self.width * 2**i, (3, 3), strides=(2, 2), padding="SAME")(h))
        h = h.reshape((h.shape[0], -1))
        h = act(nn.Dense(4 * self.width)(h))
        return nn.Dense(self.num_classes)(h)


class BasicBlock(nn.Module):
    features: int
    strides: int
    act: Callable[[Array], Array]

    @nn.compact
    def __call__(self, x, train: bool):
        norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)  # noqa: E731
        h = nn.Conv(self.features, (3, 3), strides=self.strides, padding=1, use_bias=False)(x)
        h = self.act(norm()(h))
        h = nn.Conv(self.features, (3, 3), strides=1, padding=1, use_bias=False)(h)
        h = norm()(h)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), strides=self.strides, use_bias=False)(x)
            x = norm()(x)
        return self.act(h + x)


class ResNet18(nn.Module):
    """CIFAR ResNet-18 (3x3 stem, no max-pool), as in the paper's official code."""

    num_classes: int
    width: int = 64
    stages: Sequence[int] = (2, 2, 2, 2)
    act: str = "relu"

    @nn.compact
    def __call__(self, x, train: bool = False):
        act = ACTIVATIONS[self.act]
        h = nn.Conv(self.width, (3, 3), padding=1, use_bias=False)(x)
        h = act(nn.BatchNorm(use_running_average=not train, momentum=0.9)(h))
        for i, blocks in enumerate(self.stages):
            for j in range(blocks):
                strides = 2 if (i > 0 and j == 0) else 1
                h = BasicBlock(self.width * 2**i, strides, act)(h, train)
        h = jnp.mean(h, axis=(1, 2))
        return nn.Dense(self.num_classes)(h)


_MODULES = {"mlp": MLP, "cnn": SmallCNN, "resnet18": ResNet18}
MODEL_NAMES = tuple(_MODULES)


@dataclasses.dataclass(frozen=True)
class Model:
    """A Flax module seen as pure functions (see the module docstring).

    Attributes:
      name: the name it was built from, e.g. ``"mlp:width=256"``.
      module: the Flax module.
      num_classes: number of output logits.
    """

    name: str
    module: nn.Module
    num_classes: int

    @property
    def has_state(self) -> bool:
        return isinstance(self.module, ResNet18)

    def init(self, key: Array, sample_input: Array) -> Variables:
        validation.check_images("sample_input", sample_input, ranks=(4,))
        return dict(init_variables(self.module, key, sample_input, train=False))

    def apply(self, variables: Variables, x: Array) -> Array:
        return self.module.apply(variables, x, train=False)

    def forward(self, variables: Variables, x: Array) -> tuple[Array, Variables]:
        if not self.has_state:
            return self.module.apply(variables, x, train=True), {}
        logits, updates = self.module.apply(variables, x, train=True, mutable=["batch_stats"])
        return logits, dict(updates)


def _init(module, key, *inputs, train=None):
    return module.init(key, *inputs, **({} if train is None else {"train": train}))


# Initialisation runs once, and XLA:CPU's full optimisation of its many random draws costs
# more than it saves (jax 0.10.2, 2 cores): ResNet-18 (width 64) compiled in 6.4 s and ran in
# 0.12 s, unoptimised 2.3 s and 0.85 s; the score model's U-Net 4.0 s and 1.7 s (0.04 s to run).
# Other backends keep their default: unmeasured there.
_QUICK_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_init_quick = jax.jit(_init, static_argnums=0, static_argnames="train", compiler_options=_QUICK_COMPILE)
_init_default = jax.jit(_init, static_argnums=0, static_argnames="train")


def init_variables(module: nn.Module, key: Array, *inputs, train: bool | None = None) -> Variables:
    """``module.init(key, *inputs[, train=train])``, compiled once per network (modules
    compare by configuration) and input shapes: every network the project builds (the
    classifiers, the denoisers, the score model) is initialised through it.

    Eager initialisation compiled every initializer's operations one by one, several times
    slower on CPU. On CPU the program is compiled without backend optimisation (see
    `_QUICK_COMPILE`); the values may differ from an eager ``module.init`` in the last bit.
    """
    if not validation._is_concrete((key, inputs)):  # inside the caller's jit: part of that program
        return _init(module, key, *inputs, train=train)
    program = _init_quick if jax.default_backend() == "cpu" else _init_default
    return program(module, key, *inputs, train=train)


def _parse_options(text: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        if "=" not in item:
            raise ValueError(f"model option {item!r} must look like key=value")
        key, value = item.split("=", 1)
        options[key.strip()] = int(value) if value.strip().isdigit() else value.strip()
    return options


def build_model(name: str, num_classes: int, **overrides) -> Model:
    """Build a model from a name such as ``"cnn"`` or ``"mlp:width=256,act=softplus"``.

    Args:
      name: ``mlp``, ``cnn`` or ``resnet18`` (the paper's CIFAR ResNet-18), optionally
        followed by ``:key=value,...`` options of that network (width, depth, act, ...).
      num_classes: number of output logits.
      **overrides: the same options as keyword arguments; they win over the name's.

    Returns:
      a `Model` with pure ``init(key, x)``, ``apply(variables, x) -> logits`` (inference)
      and ``forward(variables, x) -> (logits, state)`` (training mode). Inputs are NHWC
      images in [0, 1].

    Raises:
      ValueError: for an unknown name, option or activation.
    """
    base, _, opts = name.partition(":")
    validation.check_choice("model name", base, MODEL_NAMES)
    validation.check_positive_int("num_classes", num_classes)
    options = {**_parse_options(opts), **overrides}
    module_cls = _MODULES[base]
    fields = {f.name for f in dataclasses.fields(module_cls)} - {"parent", "name", "num_classes"}
    unknown = set(options) - fields
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for model {base!r}; expected {sorted(fields)}")
    if "act" in options:
        validation.check_choice("activation", options["act"], ACTIVATIONS)
    model = Model(name=name, module=module_cls(num_classes=num_classes, **options), num_classes=num_classes)
    return _INTERNED.setdefault(model, model)


# Equal models are one object: `model.apply` is then the same function for every build, so
# a jitted function taking it as a static argument compiles once (a sweep measures each
# method's models with a model built for that method; bound methods of equal but distinct
# objects compare unequal, which recompiled every measurement program once per method).
_INTERNED: dict = {}
