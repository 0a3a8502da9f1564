import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import linear_apply, linear_forward, linear_params, random_batch
from pagjax import objectives
from pagjax.models import build_model
from pagjax.objectives import cross_entropy, make_objective
from pagjax.training import OptimizerConfig, create_train_state, make_optimizer, make_update_fn

KEY = jax.random.key(0)


def _setup(seed=0, batch=8):
    x, y = random_batch(seed, batch)
    return x, y, linear_params(jax.random.key(seed), 16, 3)


def closed_form_penalty(params, x, y):
    """||grad_x CE||^2 = ||W^T (p - e_y)||^2 for a linear softmax model."""
    W, xf = params["W"], x.reshape((x.shape[0], -1))
    r = jax.nn.softmax(xf @ W.T + params["b"]) - jax.nn.one_hot(y, W.shape[0])
    return jnp.sum(jnp.square(r @ W), axis=-1)


def closed_form_penalty_param_grad(params, x, y):
    """d/dW and d/db of sum_i ||W^T r_i||^2 derived by hand (J = diag(p) - p p^T)."""
    W, b, xf = params["W"], params["b"], x.reshape((x.shape[0], -1))
    p = jax.nn.softmax(xf @ W.T + b)
    r = p - jax.nn.one_hot(y, W.shape[0])
    g = r @ W  # (B, d)
    Wg = g @ W.T  # (B, K)
    JWg = p * Wg - p * jnp.sum(p * Wg, axis=-1, keepdims=True)
    dW = 2 * (r.T @ g) + 2 * (JWg.T @ xf)
    db = 2 * jnp.sum(JWg, axis=0)
    return {"W": dW, "b": db}


def test_gradnorm_penalty_matches_closed_form():
    x, y, params = _setup()
    loss, aux = make_objective("gradnorm")(linear_forward, params, x, y, KEY, 0.3)
    np.testing.assert_allclose(aux["penalty"], closed_form_penalty(params, x, y), rtol=1e-5)
    np.testing.assert_allclose(loss, aux["ce"] + 0.3 * closed_form_penalty(params, x, y), rtol=1e-5)


def test_gradnorm_parameter_gradient_matches_hand_derivation_and_finite_differences():
    x, y, params = _setup(1)
    obj = make_objective("gradnorm")
    penalty_sum = lambda p: jnp.sum(obj(linear_forward, p, x, y, KEY, 1.0)[1]["penalty"])  # noqa: E731
    got = jax.grad(penalty_sum)(params)
    want = closed_form_penalty_param_grad(params, x, y)
    np.testing.assert_allclose(got["W"], want["W"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["b"], want["b"], rtol=1e-4, atol=1e-5)
    # central finite differences on a few weights, in float64 for accuracy
    with jax.enable_x64():
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        x64 = jnp.asarray(x, jnp.float64)
        f = lambda p: float(jnp.sum(closed_form_penalty(p, x64, y)))  # noqa: E731
        for idx in [(0, 0), (1, 5), (2, 15)]:
            h = 1e-6
            up = {"W": p64["W"].at[idx].add(h), "b": p64["b"]}
            dn = {"W": p64["W"].at[idx].add(-h), "b": p64["b"]}
            np.testing.assert_allclose(got["W"][idx], (f(up) - f(dn)) / (2 * h), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("name", ["ce", "gradnorm", "smoothness", "noise", "pgd"])
@pytest.mark.parametrize("official", [False, True])
def test_strength_zero_is_plain_cross_entropy_exactly(name, official):
    x, y, params = _setup(2)
    loss, aux = make_objective(name, official=official)(linear_forward, params, x, y, KEY, 0.0)
    np.testing.assert_array_equal(loss, cross_entropy(linear_apply(params, x), y))
    assert np.all(np.isfinite(jax.grad(lambda p: jnp.mean(make_objective(name)(linear_forward, p, x, y, KEY, 0.0)[0]))(params)["W"]))


def test_official_gradnorm_equals_the_official_formula_and_conversion():
    x, y, params = _setup(3, batch=16)
    B, c = x.shape[0], 2e-3
    # The official code: mean CE + c * 1e5 / B * ||grad_x mean_i CE_i||^2 (whole batch).
    mean_ce = lambda inputs: jnp.mean(cross_entropy(linear_apply(params, inputs), y))  # noqa: E731
    official = mean_ce(x) + c * 1e5 / B * jnp.sum(jnp.square(jax.grad(mean_ce)(x)))
    ours, _ = make_objective("gradnorm", official=True)(linear_forward, params, x, y, KEY, c)
    np.testing.assert_allclose(jnp.mean(ours), official, rtol=1e-5)
    lam = objectives.official_gradnorm_lambda(c, B)
    np.testing.assert_allclose(lam, c * 1e5 / B**2)
    textbook, _ = make_objective("gradnorm")(linear_forward, params, x, y, KEY, lam)
    np.testing.assert_allclose(ours, textbook, rtol=1e-6)


def test_official_pgd_uses_a_whole_batch_ball():
    x, y, params = _setup(4, batch=16)
    eps = 1.0
    seen = {}

    def spy_forward(p, inputs):
        seen.setdefault("inputs", []).append(inputs)
        return linear_forward(p, inputs)

    make_objective("pgd", official=True, pgd_steps=3)(spy_forward, params, x, y, KEY, eps)
    delta = seen["inputs"][-1] - x
    assert np.linalg.norm(np.asarray(delta)) <= eps * (1 + 1e-5)  # whole batch in the ball
    assert np.linalg.norm(np.asarray(delta)) > 0.5 * eps  # and it moved
    per_image = np.linalg.norm(np.asarray(delta).reshape(16, -1), axis=1)
    assert per_image.max() < eps  # so no image reaches the textbook per-image radius


def test_noise_objective_perturbs_with_the_requested_scale():
    x, y, params = _setup(5, batch=256)
    seen = {}

    def spy_forward(p, inputs):
        seen["inputs"] = inputs
        return linear_forward(p, inputs)

    make_objective("noise")(spy_forward, params, x, y, KEY, 0.3)
    np.testing.assert_allclose(np.std(np.asarray(seen["inputs"] - x)), 0.3, rtol=0.05)


def test_smoothness_penalty_is_logit_distance_under_input_noise():
    x, y, params = _setup(6, batch=4)
    loss, aux = make_objective("smoothness", smoothness_noise_std=0.2)(linear_forward, params, x, y, KEY, 0.5)
    n = 0.2 * jax.random.normal(KEY, x.shape)
    want = jnp.sum(jnp.square(linear_apply(params, x) - linear_apply(params, x + n)), -1)
    np.testing.assert_allclose(aux["penalty"], want, rtol=1e-5)
    np.testing.assert_allclose(loss, aux["ce"] + 0.5 * want, rtol=1e-5)


def test_gradnorm_is_nan_free_at_a_zero_input_gradient():
    x, y, _ = _setup(7)
    zero = {"W": jnp.zeros((3, 16)), "b": jnp.zeros(3)}
    for name in ["gradnorm", "pgd"]:
        grads = jax.grad(lambda p: jnp.mean(make_objective(name)(linear_forward, p, x, y, KEY, 1.0)[0]))(zero)
        assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize(
    "args, match",
    [(("adversarial",), "objective"), (("pgd",), "pgd_steps"), (("smoothness",), "smoothness_noise_std")],
)
def test_bad_objective_arguments(args, match):
    kwargs = {"pgd": dict(pgd_steps=-2), "smoothness": dict(smoothness_noise_std=0.0)}.get(args[0], {})
    with pytest.raises(ValueError, match=match):
        make_objective(*args, **kwargs)


# ----------------------------------------------------------------- the official code, transcribed
def official_pgd_l2(x, y, params, eps, num_iter, u):
    """The official ``pgd_l2_`` (utils/regularized_loss.py, class PGDAdversarialLoss), line by
    line in float64 numpy, for the linear softmax model of `helpers`. ``u`` is the draw of
    ``torch.rand_like(X)``. Returns every iterate delta_0 .. delta_T (the attack returns the
    last); ``loss.backward()`` differentiates ``nn.CrossEntropyLoss()``, the batch mean."""
    W, b = np.asarray(params["W"], np.float64), np.asarray(params["b"], np.float64)
    X = np.asarray(x, np.float64)
    n = X.shape[0]
    onehot = np.eye(W.shape[0])[np.asarray(y)]

    def grad_mean_ce_wrt_input(inputs):
        z = inputs.reshape(n, -1) @ W.T + b
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return ((p - onehot) @ W / n).reshape(inputs.shape)

    # delta = torch.rand_like(X); norm = ||delta.flatten()||; delta = epsilon * delta / norm / 2
    delta = np.asarray(u, np.float64)
    norm = np.linalg.norm(delta.ravel())
    delta = eps * delta / norm / 2
    iterates = [delta]
    alpha = 2 * eps / num_iter  # fixed step size of 2 * epsilon / num_iter
    for _ in range(num_iter):
        step = grad_mean_ce_wrt_input(X + delta)  # loss.backward(); step = delta.grad
        step = alpha * step / np.linalg.norm(step.ravel())
        delta = delta + step
        norm = np.linalg.norm(delta.ravel())
        if norm > eps:  # project on the epsilon ball around X if necessary
            delta = eps * delta / norm
        iterates.append(delta)  # delta.grad.zero_(): the next step's gradient is fresh
    return iterates


def mean_ce_param_grad(params, x, y):
    """Closed-form gradient of the batch-mean CE of the linear model: ((P - Y)^T X / B, mean(P - Y))."""
    W, b = np.asarray(params["W"], np.float64), np.asarray(params["b"], np.float64)
    xf = np.asarray(x, np.float64).reshape(x.shape[0], -1)
    z = xf @ W.T + b
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    r = p - np.eye(W.shape[0])[np.asarray(y)]
    return {"W": r.T @ xf / x.shape[0], "b": r.mean(0)}


def _spy(log):
    def forward(p, inputs, model_state=None):
        log.append(inputs)
        return linear_forward(p, inputs)

    return forward


@pytest.mark.parametrize("eps", [0.5, 10.0, 1000.0])
def test_official_pgd_starts_from_positive_noise_at_half_the_radius(eps):
    """With 0 steps the attack returns its start: U[0, 1) over the whole batch, rescaled to
    norm eps / 2. At eps = 1000 > ||U|| (about 4.6 here) a projection would not rescale."""
    x, y, params = _setup(8, batch=16)
    seen = []
    make_objective("pgd", official=True, pgd_steps=0)(_spy(seen), params, x, y, KEY, eps)
    start = np.asarray(seen[-1] - x, np.float64)
    assert np.all(start >= 0)
    np.testing.assert_allclose(np.linalg.norm(start), eps / 2, rtol=1e-5)
    u = np.asarray(jax.random.uniform(KEY, x.shape, x.dtype), np.float64)
    np.testing.assert_allclose(start, eps * u / np.linalg.norm(u) / 2, rtol=1e-5, atol=1e-6 * eps)


@pytest.mark.parametrize("eps", [0.3, 3.0, 1000.0])
def test_official_pgd_matches_a_transcription_of_the_official_attack(eps):
    with jax.enable_x64(True):
        x, y, params = _setup(9, batch=16)
        x = x.astype(jnp.float64)
        params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
        seen = []
        make_objective("pgd", official=True, pgd_steps=4)(_spy(seen), params, x, y, KEY, eps)
        ours = np.asarray(seen[-1] - x)  # the final forward's input is x + delta_T
        u = jax.random.uniform(KEY, x.shape, x.dtype)  # the same draw as the objective's start
        official = official_pgd_l2(x, y, params, eps, 4, u)
        np.testing.assert_allclose(ours, official[-1], rtol=1e-10, atol=1e-12 * eps)
        assert np.linalg.norm(official[-1] - official[0]) > 0.1 * eps  # the attack moved


def test_official_grad_accumulation_sums_the_gradients_of_every_iterate():
    """The official update is sum_{t<T} grad CE(x + delta_t) + grad CE(x + delta_T)."""
    with jax.enable_x64(True):
        x, y, params = _setup(10, batch=16)
        x = x.astype(jnp.float64)
        params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
        eps, steps = 2.0, 3
        iterates = official_pgd_l2(x, y, params, eps, steps, jax.random.uniform(KEY, x.shape, x.dtype))
        per_iterate = [mean_ce_param_grad(params, x + d, y) for d in iterates]
        want = {k: sum(g[k] for g in per_iterate) for k in ("W", "b")}
        final_only = per_iterate[-1]

        def loss_and_grad(**switch):
            obj = make_objective("pgd", official=True, pgd_steps=steps, **switch)
            f = lambda p: jnp.mean(obj(linear_forward, p, x, y, KEY, eps)[0])  # noqa: E731
            return jax.value_and_grad(f)(params)

        loss, got = loss_and_grad(official_grad_accumulation=True)
        for k in ("W", "b"):
            np.testing.assert_allclose(got[k], want[k], rtol=1e-10, atol=1e-12)
        # the loss value stays CE at the final point, and the default follows it alone
        plain_loss, plain = loss_and_grad()
        assert float(loss) == pytest.approx(float(plain_loss), rel=1e-14)  # same value up to float64 rounding
        np.testing.assert_allclose(float(loss), np.mean(cross_entropy(linear_apply(params, x + iterates[-1]), y)),
                                   rtol=1e-12)
        for k in ("W", "b"):
            np.testing.assert_allclose(plain[k], final_only[k], rtol=1e-10, atol=1e-12)
        assert np.linalg.norm(got["W"]) > 2 * np.linalg.norm(plain["W"])


def _counting_forward(base=0):
    """A forward whose 'statistics' count the training-mode forwards they went through."""

    def forward(p, inputs, model_state=None):
        count = (base if model_state is None else model_state["count"]) + 1
        return linear_apply(p, inputs), {"count": count}

    return forward


@pytest.mark.parametrize("name, steps, chained", [("pgd", 3, 4), ("pgd", 0, 1), ("smoothness", 3, 2),
                                                   ("gradnorm", 3, 1), ("noise", 3, 1), ("ce", 3, 1)])
@pytest.mark.parametrize("official", [False, True])
def test_official_bn_updates_chain_every_training_forward(name, steps, chained, official):
    """The official code updates BatchNorm statistics on every training forward: T + 1 for
    PGD (every iterate, then the final point), 2 for smoothness; by default one is kept."""
    x, y, params = _setup(11, batch=8)
    for switch, want in [(False, 1), (True, chained)]:
        obj = make_objective(name, official=official, pgd_steps=steps, official_bn_updates=switch)
        _, aux = obj(_counting_forward(), params, x, y, KEY, 0.5)
        assert int(aux["model_state"]["count"]) == want, (switch, aux["model_state"])


def _stem_moments(params, x):
    """Batch mean and (biased) variance of the ResNet stem's convolution, per channel."""
    h = jax.lax.conv_general_dilated(x, params["Conv_0"]["kernel"], (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.mean(h, (0, 1, 2)), jnp.var(h, (0, 1, 2))


def test_official_bn_updates_through_the_train_step_match_the_running_average_formula():
    """Smoothness with the switch, on a ResNet in a real train step (the engine's
    three-argument forward): the stem's running mean and variance after one step are
    m^2 * initial + (1 - m) (m * clean batch + noisy batch), flax momentum m = 0.9. (The
    default, one update, is m * initial + (1 - m) * clean batch: see the counting test.)"""
    model = build_model("resnet18:width=4", 3, stages=(1,))
    x, y = random_batch(12, 8, shape=(8, 8, 3))
    key, noise_std, m = jax.random.key(3), 0.5, 0.9
    noisy = x + noise_std * jax.random.normal(jax.random.fold_in(key, 0), x.shape)  # step 0's key
    optimizer = make_optimizer(OptimizerConfig(), 10)
    state = create_train_state(model, optimizer, jax.random.key(0), x)
    before = jax.tree.map(jnp.copy, state.model_state["batch_stats"]["BatchNorm_0"])
    (mc, vc), (mn, vn) = _stem_moments(state.params, x), _stem_moments(state.params, noisy)
    obj = make_objective("smoothness", smoothness_noise_std=noise_std, official_bn_updates=True)
    new, _ = jax.jit(make_update_fn(model, obj, optimizer))(state, x, y, key, jnp.float32(0.1))
    after = new.model_state["batch_stats"]["BatchNorm_0"]
    np.testing.assert_allclose(after["mean"], m * m * before["mean"] + (1 - m) * (m * mc + mn), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(after["var"], m * m * before["var"] + (1 - m) * (m * vc + vn), rtol=1e-4, atol=1e-6)
    one_update = m * before["var"] + (1 - m) * vc
    assert float(jnp.max(jnp.abs(after["var"] - one_update) / one_update)) > 0.01  # the two really differ


def test_gradnorm_parameter_gradient_equals_naive_double_backprop_with_batchnorm():
    """The docstring's claim: the forward-mode trick in `input_gradient_penalty` gives exactly
    the double-backprop parameter gradient of the batch-mean penalty, also when train-mode
    BatchNorm couples the examples (a smooth ResNet, one residual block to keep the compile
    short, float64)."""
    with jax.enable_x64(True):
        model = build_model("resnet18:width=4,act=softplus", 3, stages=(1,))
        x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3), jnp.float64)
        y = jnp.array([0, 1, 2, 1])
        variables = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.key(1), x))
        forward = lambda p, inputs: model.forward({**variables, "params": p}, inputs)  # noqa: E731

        def trick(p):
            return jnp.mean(objectives.input_gradient_penalty(forward, p, x, y)[1])

        def naive(p):  # nested jax.grad: differentiate the input-gradient itself
            g = jax.grad(lambda inputs: jnp.sum(cross_entropy(forward(p, inputs)[0], y)))(x)
            return jnp.mean(jnp.sum(jnp.square(g.reshape(4, -1)), -1))

        (v1, g1), (v2, g2) = jax.jit(lambda p: (jax.value_and_grad(trick)(p), jax.value_and_grad(naive)(p)))(
            variables["params"])
        np.testing.assert_allclose(v1, v2, rtol=1e-12)
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12 * float(jnp.max(jnp.abs(b))))
        assert max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(g2)) > 1e-3  # not trivially 0


def mean_ce(params, x, y):
    """Batch-mean CE of the linear model, in float64 numpy."""
    W, b = np.asarray(params["W"], np.float64), np.asarray(params["b"], np.float64)
    z = np.asarray(x, np.float64).reshape(x.shape[0], -1) @ W.T + b
    z = z - z.max(-1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(-1)) - z[np.arange(len(y)), np.asarray(y)]))


@pytest.mark.parametrize("name", ["ce", "smoothness", "noise", "pgd"])
def test_values_and_parameter_gradients_match_closed_forms(name):
    """Linear model, batch-mean loss. ce: CE(x); smoothness: the penalty is ||W n||^2 (the
    logit difference is -W n, b cancels), gradient grad CE(x) + lam * 2/B sum_i (W n_i) n_i^T;
    noise: CE at x + s n; pgd (Danskin): CE and its gradient at the attack point x + delta*."""
    x, y, params = _setup(13, batch=8)
    strength = 0.3
    obj = make_objective(name, pgd_steps=3)
    seen = []
    obj(_spy(seen), params, x, y, KEY, strength)  # eagerly: the inputs of the last forward
    loss, got = jax.value_and_grad(lambda p: jnp.mean(obj(linear_forward, p, x, y, KEY, strength)[0]))(params)
    point = x if name in ("ce", "smoothness") else seen[-1]
    want_loss, want = mean_ce(params, point, y), mean_ce_param_grad(params, point, y)
    if name == "smoothness":
        n = np.asarray(0.1 * jax.random.normal(KEY, x.shape), np.float64).reshape(8, -1)
        wn = n @ np.asarray(params["W"], np.float64).T  # (B, K): minus the logit difference
        want_loss += strength * np.mean(np.sum(wn**2, -1))
        want["W"] = want["W"] + strength * 2 * wn.T @ n / 8
    if name == "noise":
        np.testing.assert_allclose(seen[-1], x + strength * jax.random.normal(KEY, x.shape), rtol=1e-6)
    if name == "pgd":
        assert 0.1 < float(jnp.min(jnp.linalg.norm((seen[-1] - x).reshape(8, -1), axis=1))) <= strength * (1 + 1e-5)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    for k in ("W", "b"):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-6)
