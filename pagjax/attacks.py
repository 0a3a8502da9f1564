"""L2 projected gradient descent assembled from small parts.

An attack is (initialisation, step, projection), each a pure function, looped with
`lax.fori_loop`. Two geometries of the L2 ball:

* ``per_example`` (textbook, default): every example has its own ball ||delta_i|| <= eps.
* ``whole_batch`` (the official PAG code): the L2 norm of the whole batch's perturbation
  is at most eps, so one image typically moves by about eps / sqrt(B).

Norms are safe: a zero gradient or a zero perturbation never produces NaN or inf, and
eps = 0 returns exactly zero.

Reference: Madry et al., "Towards Deep Learning Models Resistant to Adversarial
Attacks" (2018), L2 PGD with normalised-gradient steps.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from pagjax import validation
from pagjax.numerics import per_example_norm, safe_norm

Array = jax.Array
LossFn = Callable[[Array], Array]  # perturbed inputs (B, ...) -> per-example losses (B,)
AscentFn = Callable[[Array, Any], tuple[Array, Any]]  # (delta, carry) -> (direction, carry)

BALLS = ("per_example", "whole_batch")
STARTS = ("uniform_ball", "positive_uniform", "zero")


def _bcast(v: Array, x: Array) -> Array:
    """Per-example scalars (B,) -> broadcastable against x (B, 1, 1, ...)."""
    return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim))


def _norms(delta: Array, ball: str) -> Array:
    if ball == "per_example":
        return _bcast(per_example_norm(delta), delta)
    return safe_norm(delta)


def project_l2_ball(delta: Array, eps, ball: str = "per_example") -> Array:
    """Project `delta` onto the L2 ball of radius `eps` (per example or whole batch).

    Idempotent; leaves points inside the ball untouched; eps = 0 gives exactly 0.
    """
    norms = _norms(delta, ball)
    scale = jnp.minimum(1.0, eps / jnp.maximum(norms, 1e-12))
    return delta * scale


def project_box(x: Array, delta: Array, box: tuple[float, float] | None) -> Array:
    """Keep x + delta inside [low, high] (no-op for box=None)."""
    if box is None:
        return delta
    low, high = box
    return jnp.clip(x + delta, low, high) - x


def init_delta(key: Array, x: Array, eps, start: str = "uniform_ball", ball: str = "per_example") -> Array:
    """Random start of the attack.

    * ``uniform_ball``: uniform in the ball (Gaussian direction, radius eps * u^(1/n),
      n the dimension of the ball);
    * ``positive_uniform``: the official code's start. U[0, 1) noise in every coordinate,
      *rescaled* (not projected) to L2 norm exactly eps / 2, over the whole batch for
      ``ball="whole_batch"`` (each example for ``"per_example"``). The official
      ``pgd_l2_`` (utils/regularized_loss.py) draws ``delta = rand_like(X)`` and sets
      ``delta = epsilon * delta / norm / 2`` with ``norm`` the Frobenius norm of the whole
      batch's delta. So every entry is >= 0 and the start lies half-way to the sphere,
      whatever eps is: a projection onto the ball would start at eps instead, and would not
      rescale at all for eps above ||U|| (about sqrt(n / 3), 362 for a CIFAR-10 batch of
      128), where the start would then be plain U[0, 1) noise;
    * ``zero``: no random start.
    """
    if start == "zero":
        return jnp.zeros_like(x)
    if start == "positive_uniform":
        u = jax.random.uniform(key, x.shape, x.dtype)
        return 0.5 * eps * u / jnp.maximum(_norms(u, ball), 1e-30)
    k_dir, k_rad = jax.random.split(key)
    direction = jax.random.normal(k_dir, x.shape, x.dtype)
    if ball == "per_example":
        dim = x[0].size
        u = jax.random.uniform(k_rad, (x.shape[0],), x.dtype)
        radius = _bcast(eps * u ** (1.0 / dim), x)
    else:
        radius = eps * jax.random.uniform(k_rad, (), x.dtype) ** (1.0 / x.size)
    return direction / _norms(direction, ball) * radius


def normalized_gradient_step(delta: Array, grad: Array, step_size, ball: str = "per_example") -> Array:
    """Ascent step of length `step_size` along the L2-normalised gradient (0 at a zero gradient)."""
    norms = _norms(grad, ball)
    direction = jnp.where(norms > 0, grad / jnp.maximum(norms, 1e-30), 0.0)
    return delta + step_size * direction


def l2_pgd(
    loss_fn: LossFn,
    x: Array,
    key: Array,
    *,
    eps,
    num_steps: int = 10,
    step_size=None,
    ball: str = "per_example",
    start: str = "uniform_ball",
    box: tuple[float, float] | None = None,
    unroll: bool | int | None = None,
) -> Array:
    """L2 PGD maximising ``sum(loss_fn(x + delta))``; returns the perturbation delta.

    Args:
      loss_fn: perturbed inputs -> per-example losses (B,).
      x: clean inputs (B, ...).
      key: PRNG key for the random start.
      eps: ball radius (>= 0; may be a traced scalar so a sweep can vmap over it).
      num_steps: number of ascent steps (>= 0).
      step_size: defaults to 2 * eps / num_steps (the official choice).
      ball: ``"per_example"`` or ``"whole_batch"`` (see module docstring).
      start: ``"uniform_ball"``, ``"positive_uniform"`` or ``"zero"`` (see `init_delta`).
      box: optional (low, high) bounds on x + delta, e.g. (0., 1.).
      unroll: `lax.fori_loop` unrolling (same result). Default: fully unrolled on CPU,
        where a conv net's forward/backward inside a while loop ran several times slower
        than unrolled (benchmarks/bench_step.py), and not unrolled elsewhere.

    The result is wrapped in `stop_gradient`: training differentiates the loss at the
    attack point, not through the attack (Danskin's theorem).
    """
    grad_fn = jax.grad(lambda d: jnp.sum(loss_fn(x + d)))
    delta, _ = l2_pgd_carry(lambda d, carry: (grad_fn(d), carry), x, key, None, eps=eps, num_steps=num_steps,
                            step_size=step_size, ball=ball, start=start, box=box, unroll=unroll)
    return delta


def l2_pgd_carry(
    ascent: AscentFn,
    x: Array,
    key: Array,
    carry: Any,
    *,
    eps,
    num_steps: int = 10,
    step_size=None,
    ball: str = "per_example",
    start: str = "uniform_ball",
    box: tuple[float, float] | None = None,
    unroll: bool | int | None = None,
) -> tuple[Array, Any]:
    """L2 PGD along the directions of ``ascent``, threading a value through the steps.

    ``ascent(delta, carry) -> (direction, carry)`` gives the ascent direction at x + delta
    (usually the gradient of a loss; only its normalised direction is used) and the
    carry for the next step. `l2_pgd` is this with the gradient of ``sum(loss_fn)`` and no
    carry; a training objective uses the carry for what it collects along the attack
    (BatchNorm statistics of every forward, parameter gradients at every iterate). The
    first step runs outside the loop, so the carry may change structure on it (e.g. from
    ``None`` to the first forward's statistics). Returns ``(delta, carry)``, both wrapped
    in `stop_gradient`. Other arguments as for `l2_pgd`.
    """
    validation.check_choice("ball", ball, BALLS)
    validation.check_choice("start", start, STARTS)
    validation.check_strength("eps", eps)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps must be an integer >= 0, got {num_steps!r}")
    if step_size is None:
        step_size = 2.0 * eps / max(num_steps, 1)
    else:
        validation.check_strength("step_size", step_size)

    def body(_, state):
        delta, carry = state
        direction, carry = ascent(delta, carry)
        delta = normalized_gradient_step(delta, direction, step_size, ball)
        return project_box(x, project_l2_ball(delta, eps, ball), box), carry

    state = (project_box(x, init_delta(key, x, eps, start, ball), box), carry)
    if num_steps > 0:
        state = body(0, state)
    if unroll is None:
        unroll = jax.default_backend() == "cpu"
    if num_steps > 1:
        state = jax.lax.fori_loop(1, num_steps, body, state, unroll=unroll)
    return jax.lax.stop_gradient(state)
