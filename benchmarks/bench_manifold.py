"""Benchmark: tangent-space construction and on/off-manifold measurement, batched vs naive.

Setting (the paper's CIFAR-10 measurement, PAPER.md section 3): 32x32x3 images (d = 3072),
a convolutional decoder with a 128-d latent, a small CNN classifier, eps in
{1.44, 2.64, 4.83, 8.86}, one Gaussian direction per image.

* **naive** (the official code's structure): one image at a time; the decoder Jacobian is
  built row by row, one backward pass (VJP) per output pixel (3072 per image); the
  orthonormalisation is recomputed for every image in every measurement; the
  perturbed images go through the model one at a time.
* **batched** (pagjax): `learned_tangent_basis` builds the Jacobians of a whole batch
  with 128 forward-mode JVPs (vmapped), orthonormalised once (cached and reused for every
  model); `on_off_manifold_change` measures the whole batch at every eps in one call.

Both use the same orthonormalisation method (``--method``). Timings are taken after
compilation, as the median of several repeats, and reported per image.

    python -m benchmarks.bench_manifold [--quick] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from pagjax import autoencoder as ae_lib
from pagjax import geometry, models, numerics
from pagjax.robustness import on_off_manifold_change

EPS = (1.44, 2.64, 4.83, 8.86)
IMAGE_SHAPE = (32, 32, 3)
LATENT = 128


def _median_time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --------------------------------------------------------------------------- naive baseline


def make_naive(ae, classifier_apply, classifier_vars, method):
    """One-image-at-a-time, one-pixel-at-a-time implementation of the same computation."""
    model, params = ae.model, ae.params
    d = 1
    for s in IMAGE_SHAPE:
        d *= s

    encode1 = jax.jit(lambda x1: model.apply(params, x1, method=ae_lib.Autoencoder.encode))

    def decode_flat(z1):
        return model.apply(params, z1, method=ae_lib.Autoencoder.decode).reshape(-1)

    # one backward pass for one output pixel: row i of the Jacobian
    pull_row = jax.jit(lambda vjp_fn, i: vjp_fn(jax.nn.one_hot(i, d, dtype=jnp.float32))[0][0])
    ortho1 = jax.jit(lambda jac: geometry.orthonormalize(jac[None], method=method).basis[0])
    logits1 = jax.jit(classifier_apply)

    def naive_jacobian(x1):
        z1 = encode1(x1)
        _, vjp_fn = jax.vjp(decode_flat, z1)
        rows = [pull_row(vjp_fn, i) for i in range(d)]
        return jnp.stack(rows)  # (d, latent)

    def naive_tangent(x1):
        return ortho1(naive_jacobian(x1))

    @jax.jit
    def split_direction(basis, key):
        n = jax.random.normal(key, (d,))
        t = basis @ (basis.T @ n)
        o = n - t
        return t / numerics.safe_norm(t), o / numerics.safe_norm(o)

    def naive_measure(x1, jac, key):
        basis = ortho1(jac)  # recomputed per image and per model, as in the official code
        t, o = split_direction(basis, key)
        p0 = jax.nn.softmax(logits1(classifier_vars, x1))
        out = []
        for e in EPS:
            for u in (t, o):
                p = jax.nn.softmax(logits1(classifier_vars, x1 + e * u.reshape(x1.shape)))
                out.append(jnp.sum(jnp.abs(p - p0)))
        return jnp.stack(out)

    return naive_jacobian, naive_tangent, naive_measure


# --------------------------------------------------------------------------- main


def run(quick: bool, method: str, batch: int, naive_images: int, repeats: int,
        direction_chunk: int | None, example_chunk: int | None, models_per_sweep: int) -> dict:
    key = jax.random.PRNGKey(0)
    k_ae, k_cnn, k_x, k_dir = jax.random.split(key, 4)
    ae_model = ae_lib.make_autoencoder(IMAGE_SHAPE, LATENT, arch="conv", features=(32, 64))
    x = jax.random.uniform(k_x, (batch,) + IMAGE_SHAPE)
    ae = ae_lib.TrainedAutoencoder(ae_model, jax.jit(ae_model.init)(k_ae, x[:1]), jnp.zeros((0,)))
    cnn = models.build_model("cnn", 10)
    cnn_vars = jax.jit(cnn.init)(k_cnn, x[:1])

    # ---- batched
    chunks = dict(direction_chunk=direction_chunk, example_chunk=example_chunk)
    t_tan = _median_time(lambda: ae_lib.learned_tangent_basis(ae, x, method=method, **chunks).basis, repeats)
    basis = ae_lib.learned_tangent_basis(ae, x, method=method, **chunks)
    t_meas = _median_time(
        lambda: on_off_manifold_change(cnn.apply, cnn_vars, x, basis, EPS, k_dir).on_l1, repeats)

    # ---- naive
    naive_jacobian, naive_tangent, naive_measure = make_naive(ae, cnn.apply, cnn_vars, method)
    x1 = x[:1]
    jax.block_until_ready(naive_tangent(x1))  # compile
    jac = naive_jacobian(x1)
    jax.block_until_ready(naive_measure(x1, jac, k_dir))
    nt, nm = [], []
    for i in range(naive_images):
        xi = x[i:i + 1]
        t0 = time.perf_counter()
        jax.block_until_ready(naive_tangent(xi))
        nt.append(time.perf_counter() - t0)
        jac_i = naive_jacobian(xi)
        jax.block_until_ready(jac_i)
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            jax.block_until_ready(naive_measure(xi, jac_i, jax.random.fold_in(k_dir, i)))
            nm.append(time.perf_counter() - t0)
    naive_tan = statistics.median(nt)
    naive_meas = statistics.median(nm)

    # correctness check: the naive and batched tangent spaces agree
    naive_basis = naive_tangent(x1)
    angle = float(jnp.max(geometry.principal_angles(naive_basis, basis.basis[0])))

    rows = {
        "tangent_space": (batch / t_tan, 1.0 / naive_tan),
        "on_off_measure": (batch / t_meas, 1.0 / naive_meas),
        "both": (batch / (t_tan + t_meas), 1.0 / (naive_tan + naive_meas)),
        # a sweep measures many models on the same images: the tangent space is built once;
        # the naive code re-orthonormalises it for every image and model
        f"sweep_{models_per_sweep}_models": (
            batch / (t_tan + models_per_sweep * t_meas),
            1.0 / (naive_tan + models_per_sweep * naive_meas),
        ),
    }
    return {
        "device": str(jax.devices()[0]),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "quick": quick,
        "method": method,
        "direction_chunk": direction_chunk,
        "example_chunk": example_chunk,
        "models_per_sweep": models_per_sweep,
        "seconds": {"batched_tangent_per_image": t_tan / batch, "batched_measure_per_image": t_meas / batch,
                    "naive_tangent_per_image": naive_tan, "naive_measure_per_image": naive_meas},
        "batch": batch,
        "naive_images": naive_images,
        "repeats": repeats,
        "image_shape": list(IMAGE_SHAPE),
        "latent_dim": LATENT,
        "eps": list(EPS),
        "max_principal_angle_naive_vs_batched": angle,
        "results": {
            name: {"batched_images_per_s": b, "naive_images_per_s": n, "speedup": b / n}
            for name, (b, n) in rows.items()
        },
    }


def main(argv=None) -> dict:
    """Run the benchmark, print a table, write JSON (see module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: < 2 min on 2 CPU cores")
    ap.add_argument("--json", default="benchmarks/results/manifold.json")
    ap.add_argument("--method", default="cholesky", choices=list(geometry.ORTHO_METHODS))
    ap.add_argument("--direction-chunk", type=int, default=None,
                    help="JVP directions per pass (default: 8 on CPU, where small cache-sized chunks were fastest; all on accelerators)")
    ap.add_argument("--example-chunk", type=int, default=None,
                    help="images per JVP pass (default: 1 on CPU, all on accelerators)")
    ap.add_argument("--models", type=int, default=120,
                    help="models per sweep for the sweep row (paper: 4 methods x 30 strengths)")
    ap.add_argument("--batch", type=int, default=None, help="images per batched call")
    ap.add_argument("--naive-images", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args(argv)
    batch = args.batch or (16 if args.quick else 64)
    naive_images = args.naive_images or (1 if args.quick else 3)
    repeats = args.repeats or (3 if args.quick else 5)

    t0 = time.perf_counter()
    on_cpu = jax.default_backend() == "cpu"
    dchunk = args.direction_chunk or (8 if on_cpu else None)
    echunk = args.example_chunk or (1 if on_cpu else None)
    res = run(args.quick, args.method, batch, naive_images, repeats, dchunk, echunk, args.models)
    res["wall_s"] = time.perf_counter() - t0

    print(f"manifold benchmark: {res['device']}, 32x32x3, latent {LATENT}, method {args.method}, "
          f"batch {batch}, naive on {naive_images} image(s), median of {repeats}")
    print(f"{'stage':<20}{'batched img/s':>16}{'naive img/s':>14}{'speed-up':>11}")
    for name, r in res["results"].items():
        print(f"{name:<20}{r['batched_images_per_s']:>16.2f}{r['naive_images_per_s']:>14.3f}"
              f"{r['speedup']:>10.1f}x")
    print(f"max principal angle naive vs batched tangent space: "
          f"{res['max_principal_angle_naive_vs_batched']:.2e} rad; wall {res['wall_s']:.1f} s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=2)
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")
    return res


if __name__ == "__main__":
    main()
