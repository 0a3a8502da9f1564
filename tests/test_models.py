import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagjax.gradients import input_gradients
from pagjax.models import MODEL_NAMES, build_model

SMALL = {"mlp": "mlp:width=16", "cnn": "cnn:width=4", "resnet18": "resnet18:width=4"}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_models_map_nhwc_images_to_logits(name):
    model = build_model(SMALL[name], num_classes=5)
    x = jax.random.uniform(jax.random.key(0), (3, 16, 16, 3))
    variables = model.init(jax.random.key(1), x)
    logits = model.apply(variables, x)
    assert logits.shape == (3, 5)
    assert np.all(np.isfinite(logits))
    train_logits, state = model.forward(variables, x)
    assert train_logits.shape == (3, 5)
    assert set(state) == ({"batch_stats"} if model.has_state else set())


def test_resnet_forward_returns_updated_running_stats_without_mutation():
    model = build_model("resnet18:width=4", num_classes=2)
    x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3))
    variables = model.init(jax.random.key(1), x)
    before = jax.tree.map(np.asarray, variables["batch_stats"])
    _, state = model.forward(variables, x)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(), state["batch_stats"], before))
    assert max(moved) > 0  # the running statistics were updated ...
    unchanged = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(), variables["batch_stats"], before))
    assert max(unchanged) == 0  # ... in a new pytree, the input untouched


@pytest.mark.slow
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_inference_mode_treats_examples_independently(name):
    """Row i of the batched input-gradient equals the gradient of example i alone."""
    model = build_model(SMALL[name], num_classes=3)
    x = jax.random.uniform(jax.random.key(2), (4, 8, 8, 1))
    y = jnp.array([0, 1, 2, 0], jnp.int32)
    variables = model.init(jax.random.key(3), x)
    batched = input_gradients(model.apply, variables, x, y, target="logprob")
    for i in range(4):
        single = input_gradients(model.apply, variables, x[i : i + 1], y[i : i + 1], target="logprob")
        np.testing.assert_allclose(batched[i], single[0], rtol=1e-4, atol=1e-6)


def test_smooth_activation_option_is_used():
    x = jax.random.uniform(jax.random.key(0), (2, 4, 4, 1))
    relu, soft = build_model("mlp:width=8", 2), build_model("mlp:width=8,act=softplus", 2)
    v = relu.init(jax.random.key(0), x)
    assert not np.allclose(relu.apply(v, x), soft.apply(v, x))


@pytest.mark.parametrize(
    "name, match",
    [("vgg", "model name"), ("mlp:depth", "key=value"), ("mlp:colour=3", "unknown option"), ("mlp:act=tanh2", "activation")],
)
def test_bad_model_names_raise(name, match):
    with pytest.raises(ValueError, match=match):
        build_model(name, num_classes=2)


def test_bad_sample_input_raises():
    with pytest.raises(ValueError, match="sample_input"):
        build_model("mlp", 2).init(jax.random.key(0), jnp.zeros((4, 4)))


def test_equal_builds_share_compiled_programs():
    # a sweep builds its model once per method; its measurements jit with `apply` static
    traces = []

    @functools.partial(jax.jit, static_argnums=0)
    def logits(apply_fn, variables, x):
        traces.append(apply_fn)  # runs once per trace
        return apply_fn(variables, x)

    x = jnp.zeros((2, 4, 4, 1))
    a, b = build_model("mlp:width=8", 3), build_model("mlp:width=8", 3)
    variables = a.init(jax.random.key(0), x)
    chex.assert_trees_all_equal(logits(a.apply, variables, x), logits(b.apply, variables, x))
    assert len(traces) == 1
    wider = build_model("mlp:width=16", 3)
    logits(wider.apply, wider.init(jax.random.key(0), x), x)
    assert len(traces) == 2


def test_init_variables_draws_what_module_init_draws_and_compiles_once_per_network():
    from pagjax import models

    model = build_model("mlp:width=16", num_classes=3)
    x = jnp.zeros((1, 8, 8, 3))
    with jax.disable_jit():  # flax's own initialisation, operation by operation
        eager = model.module.init(jax.random.key(5), x, train=False)
    program = models._init_quick if jax.default_backend() == "cpu" else models._init_default
    before = program._cache_size()
    compiled = models.init_variables(model.module, jax.random.key(5), x, train=False)
    assert jax.tree.structure(compiled) == jax.tree.structure(eager)
    # the same random draws: equal up to float32 rounding of the unoptimised program
    chex.assert_trees_all_close(compiled, eager, rtol=1e-6, atol=1e-7)
    other_key = models.init_variables(model.module, jax.random.key(6), x, train=False)
    assert not any(np.allclose(a, b) for a, b in zip(jax.tree.leaves(compiled["params"]), jax.tree.leaves(other_key["params"]))
                   if np.ptp(a) > 0)
    # an equal network (modules compare by configuration) reuses the compiled program
    models.init_variables(build_model("mlp:width=16", num_classes=3).module, jax.random.key(7), x, train=False)
    assert program._cache_size() == before + 1
    # under the caller's jit it is part of the caller's program (compiler options are top-level only)
    inside = jax.jit(lambda k: models.init_variables(model.module, k, x, train=False))(jax.random.key(5))
    chex.assert_trees_all_close(inside, eager, rtol=1e-6, atol=1e-7)
