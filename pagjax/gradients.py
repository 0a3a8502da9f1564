"""Per-example input-gradients of a chosen scalar, in one backward pass.

Every measurement in pagjax (gradient on-manifold fraction, `grad_align`, generation)
differentiates one of these per-example scalars of the logits:

* ``"logit"``      f_y(x), the logit of the given class;
* ``"logprob"``    log softmax(f(x))_y, the log-probability of the given class;
* ``"loss"``       cross-entropy -log softmax(f(x))_y;
* ``"logit_sum"``  sum_k f_k(x), the official PAG code's alignment convention.

`apply_fn(params, x)` must treat examples independently (inference mode), so the
gradient of the *sum* of per-example scalars w.r.t. the batch is, row by row, the
per-example gradient: one backward pass for the whole batch.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from pagjax import validation

Array = jax.Array
ApplyFn = Callable[..., Array]

TARGETS = ("logit", "logprob", "loss", "logit_sum")
_NEEDS_LABELS = ("logit", "logprob", "loss")


def per_example_scalar(logits: Array, labels: Array | None, target: str) -> Array:
    """The chosen per-example scalar of `logits` (B, K): returns shape (B,)."""
    if target == "logit_sum":
        return jnp.sum(logits, axis=-1)
    picked = lambda v: jnp.take_along_axis(v, labels[:, None], axis=-1)[:, 0]  # noqa: E731
    if target == "logit":
        return picked(logits)
    logp = jax.nn.log_softmax(logits, axis=-1)
    if target == "logprob":
        return picked(logp)
    if target == "loss":
        return -picked(logp)
    raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")


def _check(x, labels, target):
    validation.check_choice("target", target, TARGETS)
    validation.check_images("x", x, ranks=(2, 3, 4), finite=True)
    if target in _NEEDS_LABELS:
        if labels is None:
            raise ValueError(f"labels are required for target {target!r}")
        validation.check_labels("labels", labels, batch=x.shape[0])


def value_and_input_gradients(
    apply_fn: ApplyFn, params, x: Array, labels: Array | None = None, *, target: str = "logprob"
) -> tuple[Array, Array]:
    """Per-example values (B,) and input-gradients (shape of `x`) of `target`.

    Args:
      apply_fn: ``apply_fn(params, x) -> logits`` of shape (B, K), inference mode.
      params: the model's parameters (any pytree).
      x: a batch of inputs, batch first (NHWC images or flat vectors).
      labels: int class per example; required except for ``target="logit_sum"``.
      target: one of ``"logit"``, ``"logprob"``, ``"loss"``, ``"logit_sum"``.

    Returns:
      ``(values, grads)``: the per-example scalars, shape (B,), and their gradients with
      respect to `x`, shape of `x`.
    """
    _check(x, labels, target)

    def total(inputs):
        logits = apply_fn(params, inputs)
        if target in _NEEDS_LABELS:  # the class count is known only now; out of range gathers give 0 gradients
            validation.check_labels("labels", labels, num_classes=logits.shape[-1])
        values = per_example_scalar(logits, labels, target)
        return jnp.sum(values), values

    (_, values), grads = jax.value_and_grad(total, has_aux=True)(x)
    return values, grads


def input_gradients(
    apply_fn: ApplyFn, params, x: Array, labels: Array | None = None, *, target: str = "logprob"
) -> Array:
    """Per-example input-gradients of `target`, in one backward pass for the whole batch.

    Args:
      apply_fn: ``apply_fn(params, x) -> logits`` of shape (B, K), inference mode (each
        example's logits must depend on that example only).
      params: the model's parameters (any pytree).
      x: a batch of inputs, batch first (NHWC images or flat vectors).
      labels: int class per example; required except for ``target="logit_sum"``.
      target: ``"logprob"`` (log p(y|x), the theory's quantity), ``"logit"``, ``"loss"``
        or ``"logit_sum"`` (the official code's alignment convention).

    Returns:
      the gradients, shape of `x`: row i is d target_i / d x_i. Use
      `value_and_input_gradients` to get the scalars too.
    """
    return value_and_input_gradients(apply_fn, params, x, labels, target=target)[1]
