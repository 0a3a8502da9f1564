"""Signal/distractor data and measurements on hand-built models with known answers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagjax import distractor


def _data(n=40):
    rng = np.random.default_rng(0)
    digits = rng.uniform(size=(n, 8, 8, 1)).astype(np.float32)
    labels = rng.integers(0, 10, n).astype(np.int32)
    return digits, labels, distractor.make_distractor_dataset(digits, labels, seed=3)


def test_canvas_puts_the_digit_in_its_slot_and_a_letter_in_the_other():
    digits, labels, d = _data()
    assert d.x.shape == (40, 16, 8, 1) and set(np.unique(d.signal_slot)) == {0, 1}
    np.testing.assert_array_equal(d.y, labels)
    for i in range(40):
        top, bottom = d.x[i, :8], d.x[i, 8:]
        sig, dis = (top, bottom) if d.signal_slot[i] == 0 else (bottom, top)
        np.testing.assert_array_equal(sig, digits[i])
        assert 0.6 * 10 <= dis.sum() and dis.max() <= 1.0  # a letter has at least 10 ink pixels
    again = distractor.make_distractor_dataset(digits, labels, seed=3)
    np.testing.assert_array_equal(again.x, d.x)
    big = distractor.render_letters(np.arange(len(distractor.LETTERS)), (28, 28), seed=0)
    assert big.shape == (14, 28, 28, 1) and (big > 0).sum(axis=(1, 2, 3)).min() >= 9 * 10
    assert len({b.tobytes() for b in (big > 0)}) == 14  # distinct letters


def test_model_reading_only_the_signal_half_has_infinite_ratio_and_full_fraction():
    _, _, d = _data()
    sig, _ = distractor.half_masks(d.signal_slot, d.x.shape)
    w = jax.random.normal(jax.random.key(0), (128, 10))

    def signal_only(v, x):  # sees the signal half only (per-example mask via the closure of the batch)
        return (x * sig[: x.shape[0]]).reshape(x.shape[0], -1) @ v

    out = distractor.noise_sensitivity(signal_only, w, d.x, d.signal_slot, [0.1, 1.0], jax.random.key(1))
    assert np.all(out["distractor_change"] < 1e-6) and np.all(out["signal_change"] > 1e-2)
    assert np.all(out["ratio"] > 1e3)
    assert np.all(np.isfinite(out["ratio"]))  # 0 denominators never give NaN

    def both(v, x):
        return x.reshape(x.shape[0], -1) @ v

    out2 = distractor.noise_sensitivity(both, w, d.x, d.signal_slot, [0.1, 1.0], jax.random.key(1), num_draws=8)
    # a linear model with iid weights reacts to both halves alike: ratio near 1
    assert np.all(np.abs(np.log(out2["ratio"])) < 0.25)
    g_sig = jnp.asarray(sig) * 1.0
    np.testing.assert_allclose(distractor.gradient_signal_fraction(g_sig, d.signal_slot), 1.0, atol=1e-6)
    even = distractor.gradient_signal_fraction(jnp.ones_like(g_sig), d.signal_slot)
    np.testing.assert_allclose(even, 1 / np.sqrt(2), atol=1e-6)
    assert float(distractor.gradient_signal_fraction(jnp.zeros_like(g_sig), d.signal_slot)[0]) == 0.0


def test_bad_input():
    _, _, d = _data(4)
    with pytest.raises(ValueError, match="noise_levels"):
        distractor.noise_sensitivity(lambda v, x: x, None, d.x, d.signal_slot, [0.0], jax.random.key(0))
    with pytest.raises(ValueError, match="signal_slot"):
        distractor.noise_sensitivity(lambda v, x: x, None, d.x, d.signal_slot[:2], [1.0], jax.random.key(0))
    with pytest.raises(ValueError, match="size"):
        distractor.render_letters(np.zeros(2, int), (5, 5), seed=0)


@pytest.mark.slow
def test_distractor_command_runs_end_to_end(tmp_path):
    from experiments import distractor as cmd

    args = cmd.parse_args(["--out", str(tmp_path), "--steps", "250", "--n-train", "3000", "--n-test", "128",
                           "--model", "mlp:width=64", "--levels", "0.1,3,3", "--draws", "1", "--no-progress",
                           "--pgd-eps", "1", "--pgd-steps", "3"])
    summary = cmd.run(args, log=lambda s: None)
    for f in ("results.csv", "summary.json", "ratio.png", "examples.png"):
        assert (tmp_path / f).stat().st_size > 0
    by = {m["method"]: m for m in summary["models"]}
    assert by["ce"]["accuracy"] > 0.5
    # robust training moves the gradient onto the digit and makes the model care less about the letter
    assert by["pgd"]["gradient_signal_fraction"] > by["ce"]["gradient_signal_fraction"]
    assert by["pgd"]["mean_ratio"] > by["ce"]["mean_ratio"]
