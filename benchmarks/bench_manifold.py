"""Benchmark: tangent-space construction and on/off-manifold measurement, batched vs naive.

Setting (the paper's CIFAR-10 measurement, docs/theory.md §5): 32x32x3 images (d = 3072),
a convolutional decoder with a 128-d latent, a small CNN classifier, eps in
{1.44, 2.64, 4.83, 8.86}, one Gaussian direction per image.

* **naive** (the official code's structure, written as reasonable JAX): one image at a
  time; the decoder Jacobian is built row by row, one backward pass (VJP) per output
  pixel (3072 per image); the orthonormalisation is recomputed for every image in every
  measurement; each perturbed image goes through the model alone. Every piece is a jitted
  function, so the baseline pays dispatch per call but no op-by-op Python overhead.
* **batched** (pagjax): `learned_tangent_basis` builds the Jacobians of a whole batch
  with 128 forward-mode JVPs, orthonormalised once (cached and reused for every model);
  `manifold_directions` draws the tangent/normal directions once per data set;
  `on_off_manifold_change` / `on_off_change` measure the whole batch at every eps in one
  call.

Both use the same orthonormalisation method (``--method``) and the same random
directions, and the benchmark checks that they agree (tangent spaces by principal angle,
measurements by value). Timings are taken after compilation (median of several repeats)
and reported per image.

    python -m benchmarks.bench_manifold [--quick] [--json PATH]
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from pagjax import autoencoder as ae_lib
from pagjax import geometry, models, numerics
from pagjax.robustness import manifold_directions, on_off_change, on_off_manifold_change

EPS = (1.44, 2.64, 4.83, 8.86)
CIFAR = dict(image_shape=(32, 32, 3), latent=128, features=(32, 64), classifier="cnn")


# --------------------------------------------------------------------------- naive baseline


def make_naive(ae, classifier_apply, classifier_vars, method: str, eps=EPS):
    """One-image-at-a-time, one-pixel-at-a-time implementation of the same computation.

    Returns ``(jacobian(x1), orthonormalize(jac), measure(x1, jac, noise))`` for one image
    ``x1`` (1, ...) and one Gaussian draw ``noise`` (d,): the tangent space is
    ``orthonormalize(jacobian(x1))``; ``measure`` returns the L1 changes
    ``[on@eps0, off@eps0, on@eps1, ...]``.
    """
    model, params = ae.model, ae.params
    d = int(np.prod(model.image_shape))

    encode1 = jax.jit(lambda x1: model.apply(params, x1, method=ae_lib.Autoencoder.encode))

    def decode_flat(z1):
        return model.apply(params, z1, method=ae_lib.Autoencoder.decode).reshape(-1)

    # one backward pass for one output pixel: row i of the Jacobian
    pull_row = jax.jit(lambda vjp_fn, i: vjp_fn(jax.nn.one_hot(i, d, dtype=jnp.float32))[0][0])
    ortho1 = jax.jit(lambda jac: geometry.orthonormalize(jac[None], method=method).basis[0])

    def naive_jacobian(x1):
        z1 = encode1(x1)
        _, vjp_fn = jax.vjp(decode_flat, z1)
        return jnp.stack([pull_row(vjp_fn, i) for i in range(d)])  # (d, latent)

    @jax.jit
    def split_direction(basis, noise):
        t = basis @ (basis.T @ noise)
        o = noise - t
        return t / numerics.safe_norm(t), o / numerics.safe_norm(o)

    probs1 = jax.jit(lambda x1: jax.nn.softmax(classifier_apply(classifier_vars, x1), axis=-1))

    @jax.jit
    def change1(x1, p0, u, e):  # one perturbed image through the model
        return jnp.sum(jnp.abs(probs1(x1 + e * u.reshape(x1.shape)) - p0))

    def naive_measure(x1, jac, noise):
        basis = ortho1(jac)  # recomputed per image and per model, as in the official code
        t, o = split_direction(basis, noise)
        p0 = probs1(x1)
        return jnp.stack([change1(x1, p0, u, e) for e in eps for u in (t, o)])

    return naive_jacobian, ortho1, naive_measure


# --------------------------------------------------------------------------- main


def run(*, method: str = "cholesky", batch: int = 64, naive_images: int = 3, repeats: int = 5,
        direction_chunk: int | None = None, example_chunk: int | None = None, models_per_sweep: int = 120,
        image_shape=CIFAR["image_shape"], latent: int = CIFAR["latent"], features=CIFAR["features"],
        classifier: str = CIFAR["classifier"], eps=EPS) -> dict:
    """Time both implementations; returns a JSON-able dict (see `main` for the table)."""
    image_shape = tuple(image_shape)
    k_ae, k_cnn, k_x, k_dir = jax.random.split(jax.random.PRNGKey(0), 4)
    ae_model = ae_lib.make_autoencoder(image_shape, latent, arch="conv", features=tuple(features))
    x = jax.random.uniform(k_x, (batch,) + image_shape)
    ae = ae_lib.TrainedAutoencoder(ae_model, jax.jit(ae_model.init)(k_ae, x[:1]), jnp.zeros((0,)))
    net = models.build_model(classifier, 10)
    net_vars = jax.jit(net.init)(k_cnn, x[:1])
    time_s = lambda fn: common.time_fn(fn, repeats=repeats)["median_s"]  # noqa: E731

    # ---- batched
    chunks = dict(direction_chunk=direction_chunk, example_chunk=example_chunk)
    t_tan = time_s(lambda: ae_lib.learned_tangent_basis(ae, x, method=method, **chunks).basis)
    basis = ae_lib.learned_tangent_basis(ae, x, method=method, **chunks)
    t_dirs = time_s(lambda: manifold_directions(k_dir, basis, batch).tangent)
    t_meas = time_s(lambda: on_off_manifold_change(net.apply, net_vars, x, basis, eps, k_dir).on_l1)
    dirs = manifold_directions(k_dir, basis, batch)
    t_reuse = time_s(lambda: on_off_change(net.apply, net_vars, x, dirs, eps).on_l1)

    # ---- naive, on the first `naive_images` images, with the batched run's Gaussian draws
    naive_jacobian, naive_ortho, naive_measure = make_naive(ae, net.apply, net_vars, method, eps)
    noise = jax.random.normal(k_dir, (batch, 1, basis.basis.shape[1]))[:, 0]  # as `manifold_directions`
    x1 = x[:1]
    jax.block_until_ready(naive_measure(x1, naive_jacobian(x1), noise[0]))  # compile every piece
    nt, nm, naive_changes = [], [], []
    for i in range(naive_images):
        xi = x[i:i + 1]
        t0 = time.perf_counter()
        jac_i = jax.block_until_ready(naive_jacobian(xi))
        naive_basis = jax.block_until_ready(naive_ortho(jac_i))  # tangent space = both steps
        nt.append(time.perf_counter() - t0)
        if i == 0:
            angle = float(jnp.max(geometry.principal_angles(naive_basis, basis.basis[0])))
        for _ in range(4 * repeats):  # a few ms each, with a long tail: more samples
            t0 = time.perf_counter()
            out = jax.block_until_ready(naive_measure(xi, jac_i, noise[i]))
            nm.append(time.perf_counter() - t0)
        naive_changes.append(np.asarray(out))
    naive_tan, naive_meas = statistics.median(nt), statistics.median(nm)

    # ---- the two implementations compute the same thing
    batched = on_off_manifold_change(net.apply, net_vars, x, basis, eps, k_dir)
    ref = np.stack([np.asarray(batched.on_l1[:naive_images]), np.asarray(batched.off_l1[:naive_images])], -1)
    measure_diff = float(np.max(np.abs(np.stack(naive_changes) - ref.reshape(naive_images, -1))))

    m = models_per_sweep
    rows = {
        "tangent_space": (t_tan, naive_tan),
        "on_off_measure": (t_meas, naive_meas),
        "on_off_measure_reused_directions": (t_reuse, naive_meas),
        "both": (t_tan + t_meas, naive_tan + naive_meas),
        # a sweep measures many models on the same images: the tangent space and the
        # directions are built once; the naive code re-orthonormalises for every image and model
        f"sweep_{m}_models": (t_tan + t_dirs + m * t_reuse, naive_tan + m * naive_meas),
    }
    return {
        "machine": common.machine_description(),
        "method": method,
        "direction_chunk": direction_chunk,
        "example_chunk": example_chunk,
        "models_per_sweep": m,
        "batch": batch,
        "naive_images": naive_images,
        "repeats": repeats,
        "image_shape": list(image_shape),
        "latent_dim": latent,
        "classifier": classifier,
        "eps": list(eps),
        "seconds_per_image": {
            "batched_tangent": t_tan / batch, "batched_directions": t_dirs / batch,
            "batched_measure": t_meas / batch, "batched_measure_reused_directions": t_reuse / batch,
            "naive_tangent": naive_tan, "naive_measure": naive_meas,
        },
        "naive_spread_s": {"tangent_min_max": [min(nt), max(nt)], "measure_min_max": [min(nm), max(nm)]},
        "max_principal_angle_naive_vs_batched": angle,
        "max_abs_measure_diff_naive_vs_batched": measure_diff,
        "batched_mean_l1_change": {"on": np.asarray(batched.mean_on_l1).tolist(),
                                   "off": np.asarray(batched.mean_off_l1).tolist()},
        "results": {
            name: {"batched_images_per_s": batch / b, "naive_images_per_s": 1.0 / n, "speedup": (n * batch) / b}
            for name, (b, n) in rows.items()
        },
    }


def main(argv=None) -> dict:
    """Run the benchmark, print a table, write JSON (see module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(ap, "manifold")
    ap.add_argument("--method", default="cholesky", choices=list(geometry.ORTHO_METHODS))
    ap.add_argument("--direction-chunk", type=int, default=None,
                    help="JVP directions per pass (default: 8 on CPU, where small cache-sized chunks were fastest; "
                         "all on accelerators)")
    ap.add_argument("--example-chunk", type=int, default=None,
                    help="images per JVP pass (default: 1 on CPU, all on accelerators)")
    ap.add_argument("--models", type=int, default=120,
                    help="models per sweep for the sweep row (paper: 4 methods x 30 strengths)")
    ap.add_argument("--batch", type=int, default=None, help="images per batched call (default 64; 16 with --quick)")
    ap.add_argument("--naive-images", type=int, default=None, help="images the naive version runs on (3; 1)")
    args = ap.parse_args(argv)
    batch = args.batch or (16 if args.quick else 64)
    naive_images = args.naive_images or (1 if args.quick else 3)
    repeats = args.repeats or (3 if args.quick else 5)
    for name, v in (("--batch", batch), ("--naive-images", naive_images), ("--models", args.models)):
        if v < 1:
            ap.error(f"{name} must be >= 1, got {v}")
    if naive_images > batch:
        ap.error(f"--naive-images ({naive_images}) must not exceed --batch ({batch})")

    on_cpu = jax.default_backend() == "cpu"
    dchunk = args.direction_chunk or (8 if on_cpu else None)
    echunk = args.example_chunk or (1 if on_cpu else None)
    def run_with_flags():
        res = run(method=args.method, batch=batch, naive_images=naive_images, repeats=repeats,
                  direction_chunk=dchunk, example_chunk=echunk, models_per_sweep=args.models)
        res["quick"] = args.quick
        return res

    return common.run_and_report(run_with_flags, print_table, args.json)


def print_table(res: dict) -> None:
    """The machine, the settings, the speed-up table and the agreement check."""
    print(common.describe_machine_line(res["machine"]))
    print(f"manifold benchmark: {'x'.join(map(str, res['image_shape']))}, latent {res['latent_dim']}, "
          f"{res['classifier']} classifier, method {res['method']}, batch {res['batch']}, "
          f"naive on {res['naive_images']} image(s), median of {res['repeats']}")
    print(common.format_table(
        ["stage", "batched img/s", "naive img/s", "speed-up"],
        [[k, r["batched_images_per_s"], r["naive_images_per_s"], f"{r['speedup']:.1f}x"]
         for k, r in res["results"].items()]))
    print(f"naive vs batched: max principal angle {res['max_principal_angle_naive_vs_batched']:.1e} rad, "
          f"max |L1 change difference| {res['max_abs_measure_diff_naive_vs_batched']:.1e}")

if __name__ == "__main__":
    main()
