"""The four robust training objectives, as per-example losses.

An objective is a pure function

    objective(forward, params, x, y, key, strength) -> (per_example_loss (B,), aux)

where ``forward(params, x) -> (logits, model_state)`` is the model in training mode
(see `pagjax.models.Model.forward`). The caller reduces the per-example losses once
(usually a mean). ``aux`` holds per-example ``ce`` and ``penalty``, the ``logits`` of the
trained forward pass (for accuracy) and ``model_state`` (BatchNorm statistics, ``{}``
for stateless models). ``strength`` may be a traced scalar, so one compiled step serves a
whole sweep; strength 0 gives plain cross-entropy exactly.

The methods (registered in `pagjax.methods`, which holds everything else about them:
default grids, strength labels, unit conversions; `make_objective` looks them up there):

==============  ================================================  ==========
name            per-example objective                              strength
==============  ================================================  ==========
``ce``          CE(f(x), y)                                        ignored
``gradnorm``    CE + lam * ||grad_x CE(f(x), y)||^2                lam
``smoothness``  CE + lam * ||f(x) - f(x + n)||^2, n ~ N(0, t^2 I)  lam
``noise``       CE(f(x + n), y), n ~ N(0, s^2 I)                   s
``pgd``         CE(f(x + delta*), y), delta* = L2-PGD, radius eps  eps
==============  ================================================  ==========

Official conventions (``official=True``, docs/design.md §4), and how to convert:

* ``gradnorm``: the official code penalises ``c * 1e5 / B * ||grad_x mean_i CE_i||^2``.
  Since grad_x mean_i CE_i has rows g_i / B, that equals the batch mean of
  ``CE_i + (c * 1e5 / B^2) ||g_i||^2``: official constant c <=> textbook
  ``lam = c * 1e5 / B^2`` (about 6.1 c at B = 128). With ``official=True`` the strength
  is c.
* ``pgd``: the official ball bounds the L2 norm of the *whole batch* perturbation, starts
  from all-positive uniform noise rescaled to norm eps / 2 (`attacks.init_delta`), steps
  2 eps / steps and does not clip to [0, 1]. One image then moves by about
  eps / sqrt(B): official eps <=> textbook eps * sqrt(B).
* ``smoothness`` and ``noise`` are the same in both conventions.

Two reproduction switches (`ObjectiveOptions`, off by default) reproduce what the
official CIFAR-10 training script does beyond its stated objective, so that the training
of its released models can be repeated, or the stated objective chosen; a sweep records
both in its config.json:

* ``official_grad_accumulation`` (``pgd``): the official ``pgd_l2_``
  (utils/regularized_loss.py) calls ``loss.backward()`` at each of its T attack steps and
  zeroes only ``delta.grad``, so the parameter gradients of the attack's forwards add up
  with the training loss's: the update follows
  ``sum_{t<T} grad_params CE(x + delta_t) + grad_params CE(x + delta_T)``, with delta_t the
  attack's iterates (mean CE over the batch, each at a fixed delta_t). An independent check
  measured this 9.8-11 times the norm of the gradient of the stated objective
  CE(x + delta_T), cosine 0.98-0.99999. Every official PGD model on CIFAR-10 was trained
  this way (the official ImageNet script and MNIST notebook zero the gradients, so they
  follow the stated objective, the default here).
* ``official_bn_updates`` (``smoothness``, ``pgd``): the official code updates the
  BatchNorm running statistics on every training-mode forward: twice per step for
  smoothness (clean, then noisy) and T + 1 times for PGD (each attack iterate, then the
  final point). By default one update per step is kept (the clean forward's, the final
  point's). With the switch, each forward starts from the statistics the previous one
  left, and the last ones are returned. An independent check found the stem's running
  variance 10.6% (smoothness) and 35% (PGD, T = 3) apart after one step. (One difference
  remains: PyTorch averages the unbiased batch variance into the running variance, flax
  the biased one, a relative difference of 1 / (n - 1) for n values per channel.)

A forward that continues from given statistics is called ``forward(params, x, model_state)``;
`pagjax.training.make_update_fn` provides it (the two-argument form starts from the
step's statistics). Only ``official_bn_updates`` needs the three-argument form.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from pagjax import attacks, validation

Array = jax.Array
ForwardFn = Callable[..., tuple[Array, dict]]
Objective = Callable[..., tuple[Array, dict]]

OFFICIAL_GRADNORM_SCALE = 1e5  # the official code's constant


def cross_entropy(logits: Array, labels: Array) -> Array:
    """Per-example softmax cross-entropy (B,)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _aux(ce, penalty, logits, state):
    return {"ce": ce, "penalty": penalty, "logits": logits, "model_state": state}


def _forward(forward, params, inputs, model_state):
    """``forward(params, inputs)``, or continuing from `model_state` when it is given."""
    if model_state is None:
        return forward(params, inputs)
    return forward(params, inputs, model_state)


def plain_ce(forward, params, x, y, key, strength=0.0):
    """CE(f(x), y); `key` and `strength` are ignored."""
    del key, strength
    logits, state = forward(params, x)
    ce = cross_entropy(logits, y)
    return ce, _aux(ce, jnp.zeros_like(ce), logits, state)


def input_gradient_penalty(forward, params, x, y) -> tuple[Array, Array, Array, dict]:
    """Per-example CE, ||grad_x CE||^2, logits and state; the penalty is differentiable in params.

    ``jax.grad`` of the summed CE w.r.t. the batch gives every example's own gradient
    g_i (examples are independent unless the model couples them, e.g. BatchNorm in
    training mode, where the official code has the same cross-example terms).

    The parameter gradient of the penalty, 2 (dg_i/dparams)^T g_i, is computed
    reverse-over-forward instead of by differentiating the backward pass (double
    backprop): with g held fixed, ``t = d/dx CE(x)[g]`` is one forward-mode (JVP) pass,
    and grad_params t_i = (dg_i/dparams)^T g_i by the symmetry of mixed partials. The
    returned penalty is ``stop_gradient(||g||^2) + 2 (t - stop_gradient(t))``: its value
    is exactly ||g_i||^2 and its parameter gradient is exactly the double-backprop one
    (for coupled examples, e.g. train-mode BatchNorm, exactly so for the uniform batch
    mean a training step takes). The pass count is the same (about 3x a plain step), but
    every operation is a first-order one: differentiating the backward pass of a strided
    convolution produced XLA convolutions that ran 15x slower on CPU
    (``python -m benchmarks.bench_step``: CNN gradnorm step 13x a plain step, now ~3x).
    """

    def summed_ce(inputs):
        logits, _ = forward(params, inputs)
        return jnp.sum(cross_entropy(logits, y))

    g = jax.lax.stop_gradient(jax.grad(summed_ce)(x))
    penalty = jnp.sum(jnp.square(g.reshape((g.shape[0], -1))), axis=-1)

    def ce_and_aux(inputs):
        logits, state = forward(params, inputs)
        return cross_entropy(logits, y), (logits, state)

    (ce, (logits, state)), (t, _) = jax.jvp(ce_and_aux, (x,), (g,))
    penalty = penalty + 2.0 * (t - jax.lax.stop_gradient(t))
    return ce, penalty, logits, state


def gradnorm(forward, params, x, y, key, strength, *, official: bool = False):
    """CE + lam ||grad_x CE||^2 (double backprop). See the module docstring for `official`."""
    del key
    ce, penalty, logits, state = input_gradient_penalty(forward, params, x, y)
    lam = official_gradnorm_lambda(strength, x.shape[0]) if official else strength
    return ce + lam * penalty, _aux(ce, penalty, logits, state)


def official_gradnorm_lambda(c, batch_size: int):
    """Textbook per-example lam equivalent to the official constant c: c * 1e5 / B^2."""
    return c * OFFICIAL_GRADNORM_SCALE / batch_size**2


def smoothness(forward, params, x, y, key, strength, *, noise_std: float = 0.1, official_bn_updates: bool = False):
    """CE + lam ||f(x) - f(x + n)||^2 on the logits, n ~ N(0, noise_std^2 I) on the input.

    Both forwards run in training mode. ``official_bn_updates``: the noisy forward starts
    from the clean forward's BatchNorm statistics and its own are returned (two updates per
    step, as in the official code); otherwise the clean forward's are returned.
    """
    logits, state = forward(params, x)
    noisy = x + noise_std * jax.random.normal(key, x.shape, x.dtype)
    noisy_logits, noisy_state = _forward(forward, params, noisy, state if official_bn_updates else None)
    ce = cross_entropy(logits, y)
    penalty = jnp.sum(jnp.square(logits - noisy_logits), axis=-1)
    return ce + strength * penalty, _aux(ce, penalty, logits, noisy_state if official_bn_updates else state)


def noise_augmentation(forward, params, x, y, key, strength):
    """CE(f(x + n), y), n ~ N(0, s^2 I): randomized-smoothing training at level s."""
    logits, state = forward(params, x + strength * jax.random.normal(key, x.shape, x.dtype))
    ce = cross_entropy(logits, y)
    return ce, _aux(ce, jnp.zeros_like(ce), logits, state)


def pgd_training(
    forward,
    params,
    x,
    y,
    key,
    strength,
    *,
    num_steps: int = 10,
    official: bool = False,
    box: tuple[float, float] | None = None,
    official_grad_accumulation: bool = False,
    official_bn_updates: bool = False,
):
    """CE(f(x + delta*), y) with delta* from L2 PGD of radius eps = strength.

    Textbook: per-example ball, uniform start in the ball, optional box. Official:
    whole-batch ball, all-positive uniform start at norm eps / 2, no box. The attack's
    forwards run in training mode (as the official code's do). For the two reproduction
    switches see the module docstring: with ``official_grad_accumulation`` the returned
    loss has the value CE(x + delta_T) and the parameter gradient of the official update,
    for a caller that reduces the per-example losses by their mean (a sum scales both
    parts alike, by B).
    """
    if official:
        kw = dict(ball="whole_batch", start="positive_uniform", box=None)
    else:
        kw = dict(ball="per_example", start="uniform_ball", box=box)
    if not (official_grad_accumulation or official_bn_updates):
        loss_fn = lambda inputs: cross_entropy(forward(params, inputs)[0], y)  # noqa: E731
        delta = attacks.l2_pgd(loss_fn, x, key, eps=strength, num_steps=num_steps, **kw)
        logits, state = forward(params, x + delta)
        ce = cross_entropy(logits, y)
        return ce, _aux(ce, jnp.zeros_like(ce), logits, state)

    # The attack does not move the parameters: its gradients are taken at fixed values.
    frozen = jax.lax.stop_gradient(params)

    def ascent(delta, carry):
        state, acc = carry

        def mean_ce(p, d):
            logits, new_state = _forward(forward, p, x + d, state)
            return jnp.mean(cross_entropy(logits, y)), new_state

        if official_grad_accumulation:
            # one backward pass gives the attack direction and this iterate's parameter
            # gradient, as the official loss.backward() does
            (g_params, g_delta), new_state = jax.grad(mean_ce, argnums=(0, 1), has_aux=True)(frozen, delta)
            acc = jax.tree.map(jnp.add, acc, g_params)
        else:
            g_delta, new_state = jax.grad(mean_ce, argnums=1, has_aux=True)(frozen, delta)
        return g_delta, (new_state if official_bn_updates else None, acc)

    acc0 = jax.tree.map(jnp.zeros_like, frozen) if official_grad_accumulation else None
    delta, (state, acc) = attacks.l2_pgd_carry(ascent, x, key, (None, acc0), eps=strength, num_steps=num_steps, **kw)
    logits, state = _forward(forward, params, x + delta, state)
    ce = cross_entropy(logits, y)
    loss = (ce + with_gradient(params, acc)) if official_grad_accumulation else ce
    return loss, _aux(ce, jnp.zeros_like(ce), logits, state)


def with_gradient(params, grads) -> Array:
    """A scalar whose value is exactly 0 and whose gradient w.r.t. `params` is `grads`.

    ``<params, sg(grads)> - sg(<params, sg(grads)>)``: adding it to a loss adds gradients
    collected elsewhere (here, along the attack) to the loss's own parameter gradient,
    without a second forward pass and without changing the loss's value.
    """
    grads = jax.lax.stop_gradient(grads)
    dot = sum(jnp.vdot(p, g) for p, g in zip(jax.tree.leaves(params), jax.tree.leaves(grads)))
    return dot - jax.lax.stop_gradient(dot)


@dataclasses.dataclass(frozen=True)
class ObjectiveOptions:
    """Method-specific settings (each ignored by the methods it does not concern).

    ``official_grad_accumulation`` (pgd) and ``official_bn_updates`` (smoothness, pgd)
    are the reproduction switches of the module docstring.
    """

    official: bool = False
    pgd_steps: int = 10
    pgd_box: tuple[float, float] | None = None
    smoothness_noise_std: float = 0.1
    official_grad_accumulation: bool = False
    official_bn_updates: bool = False


def make_objective(name: str, options: ObjectiveOptions | None = None, **kwargs) -> Objective:
    """Objective of the registered method `name` (`pagjax.methods`: ``ce``, ``gradnorm``,
    ``smoothness``, ``noise``, ``pgd`` and any registered since).

    Args:
      name: the method (one of `METHODS`).
      options: an `ObjectiveOptions`; keyword arguments override its fields (or build one).
      **kwargs: `ObjectiveOptions` fields (``official``, ``pgd_steps``, ...).

    Returns:
      a pure ``objective(forward, params, x, y, key, strength) -> (per_example_loss, aux)``.
    """
    from pagjax import methods  # methods imports this module for the loss functions

    method = methods.get(name, argument="make_objective name")
    opts = options or ObjectiveOptions(**kwargs)
    if options is not None and kwargs:
        opts = dataclasses.replace(options, **kwargs)
    # every option is checked whatever the method, so that a bad setting fails the same way
    # for every method of a sweep
    if isinstance(opts.pgd_steps, bool) or not isinstance(opts.pgd_steps, int) or opts.pgd_steps < 0:
        raise ValueError(f"pgd_steps must be an integer >= 0, got {opts.pgd_steps!r}")
    validation.check_positive("smoothness_noise_std", opts.smoothness_noise_std)
    for flag in ("official_grad_accumulation", "official_bn_updates"):
        if getattr(opts, flag) not in (True, False):
            raise ValueError(f"{flag} must be True or False, got {getattr(opts, flag)!r}")
    return method.objective(opts)


def __getattr__(name):
    # METHODS is read from the registry at each access (a tuple here would miss methods
    # registered after this module was imported)
    if name == "METHODS":
        from pagjax import methods

        return methods.names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
