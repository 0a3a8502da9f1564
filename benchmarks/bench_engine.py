"""Benchmark: one training step of the real-image models, JAX against PyTorch, side by side.

Issue 13 asks for a conv-autoencoder step and a score-model step on CPU within 1.3x of
the same architecture's PyTorch step. This benchmark measures exactly that, in one process,
with the two engines interleaved (so background load hits both alike):

* **ae** -- the sweep's autoencoder: `pagjax.autoencoder.make_autoencoder` with
  ``arch="conv"``, features (32, 64), latent 128, on 28x28x1 (MNIST), batch 128, Adam, MSE,
  with each of its decoder's upsamplings (``upsample``: the transposed convolutions were
  the suspect) and one more, a layout variant, and the PyTorch transcription of each:

  ===========  ==================================================================
  upsample     each decoder stage (h, w, c) -> (2h, 2w, f)
  ===========  ==================================================================
  transpose    3x3 transposed convolution, stride 2, 'SAME' (pagjax's default)
  nearest      nearest-neighbour 2x resize, then a 3x3 convolution
  bilinear     bilinear 2x resize, then a 3x3 convolution
  subpixel     3x3 convolution to 4f channels at (h, w), then depth-to-space
               (defined here only)
  ===========  ==================================================================

  ``jax-nchw`` is the transpose architecture written directly with `lax` convolutions in
  NCHW / OIHW layout (PyTorch's), to see whether layout matters to XLA:CPU.
* **den** -- the score model: `pagjax.scores.DenoiserNet` with ``arch="conv"`` (the sweep's
  width 256, depth 3, class-conditional), with the EDM preconditioning and weighted loss
  of `pagjax.scores.train_denoiser`, against its PyTorch transcription (batch 32 by
  default, see `FULL`).
* **unet** -- the EDM score model the sweep trains on real images: `pagjax.score_model`'s
  U-Net (`make_step_fn` at the sweep's MNIST default: channels (16, 32), 1 block, embedding
  128, 10 classes + "no label", batch 64, 28x28x1) with its whole training step (log-normal
  sigma, label dropout, preconditioning, weighted loss, clipped Adam with its schedule,
  non-finite skip, EMA), run by the engine's own step program (`pagjax.engine`, as
  `train_loop` runs it) -- ``jax:unet`` one dispatch per step (the host loop, what CPU
  picks for conv nets), ``jax:unet-device`` the device loop (`lax.fori_loop`) -- against
  `benchmarks.torch_unet`, its PyTorch transcription (same layers and parameter count).

What is timed is one training step (forward, backward, Adam update): in JAX one jitted
function with the parameters and optimiser state donated, called in a Python loop; in
PyTorch ``zero_grad / loss.backward / opt.step``. The same fixed batch is used every step
(data loading is not measured). Every repeat times a block of steps of each candidate in
turn; a candidate's figure is the median per-step time over repeats, and its **ratio** is
the median over repeats of (its time / the PyTorch transpose step's time in the same
repeat), which cancels slow drifts of the machine's load.

XLA flags are read once per process, so ``--xla-flag-sets`` runs this benchmark again in a
child process per flag set (JAX transpose, and PyTorch again as the yardstick) and reports
the ratio each reaches.

PyTorch is optional (the ``bench`` extra): without it the PyTorch rows are skipped with a
message and ratios are reported against the JAX default instead.

    python -m benchmarks.bench_engine [--quick] [--models ae,den,unet] [--ae-variants ...]
        [--unet-variants host,device] [--batch B] [--den-batch B] [--unet-batch B]
        [--steps-per-repeat N] [--repeats N]
        [--xla-flag-sets "FLAGS;FLAGS"] [--torch-threads N]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial

from benchmarks import common

AE_VARIANTS = ("transpose", "nearest", "bilinear", "subpixel", "nchw")
BASELINE = "torch:transpose"

# The sweep's sizes, except the denoiser's batch: its width-256 convolutions at full
# resolution cost about 0.5 TFLOP per step at batch 32, tens of seconds on 2 CPU cores, and
# the ratio does not depend on the batch (--den-batch 128 for the sweep's own).
FULL = dict(image=(28, 28, 1), batch=128, latent=128, features=(32, 64),
            den_batch=32, den_width=256, den_depth=3, den_classes=11, steps_per_repeat=3,
            unet_batch=64, unet_channels=(16, 32), unet_blocks=1, unet_emb=128, unet_classes=10)
QUICK = dict(FULL, batch=32, den_batch=8, den_width=32, steps_per_repeat=2)
# CI's structural test: tiny sizes, where the time is XLA's compilations.
TINY = dict(image=(8, 8, 1), batch=4, latent=4, features=(4, 8), den_batch=2, den_width=8, den_depth=1,
            den_classes=3, steps_per_repeat=1, unet_batch=2, unet_channels=(4, 8), unet_blocks=1, unet_emb=8,
            unet_classes=3)
UNET_VARIANTS = ("host", "device")


def torch_or_none():
    """The torch module, or None (with a message) when it is not installed."""
    try:
        import torch
    except ImportError:
        print("torch not importable: PyTorch rows skipped (pip install 'pagjax[bench]' to compare)")
        return None
    return torch


# --------------------------------------------------------------------------- JAX models


def _jax_ae_variant(cfg: dict, upsample: str):
    """A flax autoencoder: pagjax's own for its `UPSAMPLES`, else the same with another decoder."""
    import flax.linen as nn

    from pagjax import autoencoder as ae_lib

    image, latent, features = tuple(cfg["image"]), cfg["latent"], tuple(cfg["features"])
    if upsample in ae_lib.UPSAMPLES:
        return ae_lib.make_autoencoder(image, latent, arch="conv", features=features, upsample=upsample)

    if upsample != "subpixel":
        raise ValueError(f"unknown autoencoder variant {upsample!r}")

    class Up(nn.Module):
        """Sub-pixel upsampling: (n, h, w, c) -> conv -> (n, h, w, 4f) -> (n, 2h, 2w, f)."""

        f: int

        @nn.compact
        def __call__(self, h):
            n, hh, ww, _ = h.shape
            h = nn.Conv(4 * self.f, (3, 3))(h).reshape(n, hh, ww, 2, 2, self.f)
            return h.transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * hh, 2 * ww, self.f)

    class Decoder(nn.Module):
        @nn.compact
        def __call__(self, z):
            hgt, wid, ch = image
            s = 2 ** len(features)
            h = nn.gelu(nn.Dense((hgt // s) * (wid // s) * features[-1])(z))
            h = h.reshape((z.shape[0], hgt // s, wid // s, features[-1]))
            for f in reversed(features):
                h = nn.gelu(Up(f)(h))
            return nn.Conv(ch, (3, 3))(h)

    class AE(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Decoder()(ae_lib.Encoder(latent, "conv", features=features)(x))

    return AE()


def _nchw_ae(cfg: dict):
    """(init, apply) of the transpose architecture in raw `lax`, NCHW activations, OIHW kernels."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    hgt, wid, ch = cfg["image"]
    latent, features = cfg["latent"], tuple(cfg["features"])
    s = 2 ** len(features)
    dn = ("NCHW", "OIHW", "NCHW")
    # flax's 'SAME' paddings: stride-2 conv of an even size pads (0, 1); the stride-2
    # transposed conv (a conv of the 2x-dilated input) pads (2, 1).

    def conv(x, w, b, stride=1, pad=((1, 1), (1, 1)), dil=(1, 1)):
        y = lax.conv_general_dilated(x, w, (stride, stride), pad, lhs_dilation=dil, dimension_numbers=dn)
        return y + b[None, :, None, None]

    def init(key):
        keys = iter(jax.random.split(key, 16))
        nrm = lambda shape, fan: jax.random.normal(next(keys), shape) / jnp.sqrt(fan)  # noqa: E731
        p = {"enc": [], "dec": []}
        c = ch
        for f in features:
            p["enc"].append((nrm((f, c, 3, 3), 9 * c), jnp.zeros(f)))
            c = f
        flat = (hgt // s) * (wid // s) * features[-1]
        p["enc_dense"] = (nrm((flat, latent), flat), jnp.zeros(latent))
        p["dec_dense"] = (nrm((latent, flat), latent), jnp.zeros(flat))
        c = features[-1]
        for f in reversed(features):
            p["dec"].append((nrm((f, c, 3, 3), 9 * c), jnp.zeros(f)))
            c = f
        p["out"] = (nrm((ch, c, 3, 3), 9 * c), jnp.zeros(ch))
        return p

    def apply(p, x):
        n = x.shape[0]
        h = x
        for w, b in p["enc"]:
            h = jax.nn.gelu(conv(h, w, b, 2, ((0, 1), (0, 1))))
        z = h.reshape(n, -1) @ p["enc_dense"][0] + p["enc_dense"][1]
        h = jax.nn.gelu(z @ p["dec_dense"][0] + p["dec_dense"][1])
        h = h.reshape(n, features[-1], hgt // s, wid // s)
        for w, b in p["dec"]:
            h = jax.nn.gelu(conv(h, w, b, 1, ((2, 1), (2, 1)), (2, 2)))
        return conv(h, *p["out"])

    return init, apply


def jax_ae_step(cfg: dict, variant: str):
    """(step(), loss()) closures of one donated, jitted Adam/MSE step of an AE variant."""
    import jax
    import jax.numpy as jnp
    import optax

    hgt, wid, ch = cfg["image"]
    x = jax.random.uniform(jax.random.key(1), (cfg["batch"], hgt, wid, ch))
    if variant == "nchw":
        init, apply = _nchw_ae(cfg)
        x = jnp.transpose(x, (0, 3, 1, 2))
        params = jax.jit(init)(jax.random.key(0))
    else:
        model = _jax_ae_variant(cfg, variant)
        params = jax.jit(model.init)(jax.random.key(0), x[:1])  # one compilation, not one per op
        apply = model.apply
    tx = optax.adam(1e-3)

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(p, o, xb):
        loss, g = jax.value_and_grad(lambda q: jnp.mean(jnp.square(apply(q, xb) - xb)))(p)
        upd, o = tx.update(g, o, p)
        return optax.apply_updates(p, upd), o, loss

    return _jax_runner(step, params, jax.jit(tx.init)(params), x)


def jax_den_step(cfg: dict):
    """(step(), loss()) of the conv denoiser's training step (loss as in train_denoiser)."""
    import jax
    import jax.numpy as jnp
    import optax

    from pagjax import scores

    hgt, wid, ch = cfg["image"]
    b, k = cfg["den_batch"], cfg["den_classes"]
    kx, ky, ks, kn = jax.random.split(jax.random.key(1), 4)
    x = jax.random.uniform(kx, (b, hgt, wid, ch))
    y = jax.random.randint(ky, (b,), 0, k)
    s = jnp.exp(jax.random.uniform(ks, (b,), minval=-2.0, maxval=0.0))
    noise = jax.random.normal(kn, x.shape)
    net = scores.DenoiserNet(image_shape=(hgt, wid, ch), width=cfg["den_width"], depth=cfg["den_depth"],
                             arch="conv", num_classes=k)
    params = jax.jit(net.init)(jax.random.key(0), x[:1], jnp.zeros((1,)), y[:1])["params"]
    mean, sd = jnp.mean(x, axis=0), 0.5
    tx = optax.adam(1e-3)

    def loss_fn(p):
        d = scores._denoise(net, sd, p, mean, x + s[:, None, None, None] * noise, s, y)
        w = (s**2 + sd**2) / (s * sd) ** 2
        return jnp.mean(w * jnp.mean(jnp.square(d - x), axis=(1, 2, 3)))

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(p, o, _):
        loss, g = jax.value_and_grad(loss_fn)(p)
        upd, o = tx.update(g, o, p)
        return optax.apply_updates(p, upd), o, loss

    return _jax_runner(step, params, jax.jit(tx.init)(params), None)


def unet_config(cfg: dict):
    """The `ScoreModelConfig` of the unet rows (the sweep's MNIST default at FULL sizes)."""
    from pagjax import score_model as sm

    return sm.ScoreModelConfig(arch="unet", channels=tuple(cfg["unet_channels"]), blocks=cfg["unet_blocks"],
                               emb_dim=cfg["unet_emb"], num_classes=cfg["unet_classes"], batch_size=cfg["unet_batch"])


def unet_data(cfg: dict):
    """A fixed batch (x0 in [0, 1], labels) as numpy arrays, shared by both engines."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.random((cfg["unet_batch"], *cfg["image"]), dtype=np.float32)
    return x, rng.integers(0, cfg["unet_classes"], cfg["unet_batch"]).astype(np.int32)


def jax_unet_step(cfg: dict, step_loop: str = "host"):
    """(run, sync, n_params) of the score model's `make_step_fn`, through the engine's program."""
    import jax
    import jax.numpy as jnp

    from pagjax import engine
    from pagjax import score_model as sm

    config = unet_config(cfg)
    x, y = (jnp.asarray(a) for a in unet_data(cfg))
    mean, sd = sm.data_statistics(x)
    step_fn, net, tx = sm.make_step_fn(config, tuple(cfg["image"]), mean, sd)
    y0 = jnp.zeros((1,), jnp.int32) if config.num_classes else None
    params = jax.jit(net.init)(jax.random.key(0), x[:1], jnp.zeros((1,)), y0)["params"]
    state = sm.TrainState(jnp.zeros((), jnp.int32), params, jax.tree.map(jnp.copy, params),
                          jax.jit(tx.init)(params), jax.random.key(2))
    # the engine's own jitted program: "host" one step per dispatch, "device" a fori_loop
    # (here of one step per call, so both are timed per step the same way)
    programs = engine._Programs(step_fn, x.shape[0], False, step_loop)
    perm = jnp.arange(x.shape[0])
    carry = [state, jnp.zeros((), bool), None]

    def run():
        carry[0], carry[1], m = programs.advance(carry[0], carry[1], (x, y), perm, 0, 1)
        carry[2] = m["loss"]
        return carry[2]

    def sync():
        return float(jax.block_until_ready(carry[2]))

    return run, sync, sum(int(a.size) for a in jax.tree.leaves(params))


def _jax_runner(step, params, opt_state, x):
    import jax

    n_params = sum(int(a.size) for a in jax.tree.leaves(params))
    state = [params, opt_state, None]

    def run():
        state[0], state[1], state[2] = step(state[0], state[1], x)
        return state[2]

    def sync():
        jax.block_until_ready(state[2])
        return float(state[2])

    return run, sync, n_params


# --------------------------------------------------------------------------- PyTorch transcriptions


def torch_ae_step(torch, cfg: dict, variant: str):
    """(step(), loss()) of the PyTorch transcription of an AE variant (NCHW, flax paddings)."""
    nn, F = torch.nn, torch.nn.functional
    hgt, wid, ch = cfg["image"]
    latent, features = cfg["latent"], tuple(cfg["features"])
    s = 2 ** len(features)

    class Up(nn.Module):
        def __init__(self, c, f):
            super().__init__()
            if variant == "transpose":
                # (h - 1) * 2 - 2 + 3 + 1 = 2h, as flax's stride-2 'SAME' transposed conv
                self.conv = nn.ConvTranspose2d(c, f, 3, stride=2, padding=1, output_padding=1)
            else:
                self.conv = nn.Conv2d(c, 4 * f if variant == "subpixel" else f, 3, padding=1)

        def forward(self, h):
            if variant == "transpose":
                return self.conv(h)
            if variant == "subpixel":
                return F.pixel_shuffle(self.conv(h), 2)
            mode = "nearest" if variant == "nearest" else "bilinear"
            return self.conv(F.interpolate(h, scale_factor=2, mode=mode))

    class AE(nn.Module):
        def __init__(self):
            super().__init__()
            chans = (ch,) + features
            self.enc = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2) for a, b in zip(chans[:-1], chans[1:]))
            flat = (hgt // s) * (wid // s) * features[-1]
            self.enc_dense, self.dec_dense = nn.Linear(flat, latent), nn.Linear(latent, flat)
            rev = (features[-1],) + tuple(reversed(features))
            self.dec = nn.ModuleList(Up(a, b) for a, b in zip(rev[:-1], rev[1:]))
            self.out = nn.Conv2d(features[0], ch, 3, padding=1)

        def forward(self, x):
            h = x
            for conv in self.enc:
                h = F.gelu(conv(F.pad(h, (0, 1, 0, 1))))  # flax 'SAME' at stride 2: pad (0, 1)
            h = F.gelu(self.dec_dense(self.enc_dense(h.flatten(1))))
            h = h.view(-1, features[-1], hgt // s, wid // s)
            for up in self.dec:
                h = F.gelu(up(h))
            return self.out(h)

    torch.manual_seed(0)
    model = AE()
    x = torch.rand(cfg["batch"], ch, hgt, wid)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return _torch_runner(model, opt, lambda: F.mse_loss(model(x), x))


def torch_den_step(torch, cfg: dict):
    """(step(), loss()) of the PyTorch transcription of the conv `DenoiserNet` and its loss."""
    import math

    nn, F = torch.nn, torch.nn.functional
    hgt, wid, ch = cfg["image"]
    w, depth, k, b = cfg["den_width"], cfg["den_depth"], cfg["den_classes"], cfg["den_batch"]
    groups = min(8, w)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb_in, self.label, self.emb_out = nn.Linear(64, w), nn.Embedding(k, w), nn.Linear(w, w)
            self.conv_in = nn.Conv2d(ch, w, 3, padding=1)
            self.film = nn.ModuleList(nn.Linear(w, 2 * w) for _ in range(depth))
            self.norm = nn.ModuleList(nn.GroupNorm(groups, w) for _ in range(depth))
            self.c1 = nn.ModuleList(nn.Conv2d(w, w, 3, padding=1) for _ in range(depth))
            self.c2 = nn.ModuleList(nn.Conv2d(w, w, 3, padding=1) for _ in range(depth))
            self.norm_out, self.conv_out = nn.GroupNorm(groups, w), nn.Conv2d(w, ch, 3, padding=1)
            nn.init.zeros_(self.conv_out.weight)
            freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), 32))
            self.register_buffer("freqs", freqs)

        def forward(self, x, c_noise, y):
            ang = c_noise[:, None] * self.freqs[None, :]
            emb = self.emb_in(torch.cat([ang.sin(), ang.cos()], 1)) + self.label(y)
            emb = F.silu(self.emb_out(F.silu(emb)))
            h = self.conv_in(x)
            for film, norm, c1, c2 in zip(self.film, self.norm, self.c1, self.c2):
                scale, shift = film(emb)[:, :, None, None].chunk(2, 1)
                z = norm(h) * (1 + scale) + shift
                h = h + c2(F.silu(c1(F.silu(z))))
            return self.conv_out(F.silu(self.norm_out(h)))

    torch.manual_seed(0)
    net = Net()
    x = torch.rand(b, ch, hgt, wid)
    y = torch.randint(0, k, (b,))
    s = torch.exp(torch.rand(b) * 2.0 - 2.0)
    noise = torch.randn_like(x)
    mean, sd = x.mean(0), 0.5
    sb = s[:, None, None, None]
    c_skip, c_out, c_in = sd**2 / (sb**2 + sd**2), sb * sd / (sb**2 + sd**2).sqrt(), 1 / (sb**2 + sd**2).sqrt()
    weight = (s**2 + sd**2) / (s * sd) ** 2

    def loss():
        xc = x + sb * noise - mean
        d = mean + c_skip * xc + c_out * net(c_in * xc, s.log() / 4, y)
        return (weight * (d - x).square().mean((1, 2, 3))).mean()

    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    return _torch_runner(net, opt, loss)


def torch_unet_step(torch, cfg: dict):
    """(run, sync, n_params) of `benchmarks.torch_unet`'s transcription of the score model's step."""
    from benchmarks import torch_unet

    config = unet_config(cfg)
    x, y = unet_data(cfg)
    x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(y).long()
    mean = x.mean(0)
    sd = max(float((x - mean).std(correction=0)), 1e-3)  # pagjax's data_statistics
    torch.manual_seed(0)
    net = torch_unet.UNet(tuple(cfg["image"]), config.channels, config.blocks, config.emb_dim, config.num_classes)
    step = torch_unet.make_train_step(net, config, mean, sd)
    last = [None]

    def run():
        last[0] = step(x, y)
        return last[0]

    return run, lambda: float(last[0].detach()), torch_unet.n_params(net)


def _torch_runner(model, opt, loss_fn):
    last = [None]

    def run():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        last[0] = loss
        return loss

    return run, lambda: float(last[0].detach()), sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- timing


def interleaved(candidates: dict, steps: int, repeats: int, baseline: str) -> dict:
    """Time every candidate's step in turn, `repeats` times; per-step medians and ratios.

    ``candidates`` maps a name to ``(run, sync, n_params)``. Each is warmed up (compiled) first.
    Ratios are per repeat against `baseline` timed in the same repeat, then the median.
    """
    compile_s = {}
    for name, (run, sync, _) in candidates.items():
        t0 = time.perf_counter()
        run()
        sync()
        run()  # the second call runs with donated buffers already in place
        sync()
        compile_s[name] = time.perf_counter() - t0
    times = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, (run, sync, _) in candidates.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                run()
            sync()
            times[name].append((time.perf_counter() - t0) / steps)
    out = {}
    for name, ts in times.items():
        row = {"name": name, "step_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
               "times_s": ts, "warmup_s": compile_s[name], "loss": candidates[name][1](),
               "params": candidates[name][2]}
        if baseline in times:
            row["ratio"] = statistics.median(t / b for t, b in zip(ts, times[baseline]))
        out[name] = row
    return out


def _child_flag_run(flags: str, cfg: dict, repeats: int, torch_threads: int | None) -> dict:
    """This benchmark's ae transpose (JAX and PyTorch) in a child process with XLA_FLAGS=flags."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "child.json")
        cmd = [sys.executable, "-m", "benchmarks.bench_engine", "--models", "ae", "--ae-variants", "transpose",
               "--json", path, "--repeats", str(repeats), "--sizes-json", json.dumps(cfg), "--no-torch-variants"]
        if torch_threads:
            cmd += ["--torch-threads", str(torch_threads)]
        env = dict(os.environ, XLA_FLAGS=flags)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            return {"flags": flags, "error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
        rows = json.load(open(path))["ae"]
    jax_row = rows["jax:transpose"]
    return {"flags": flags, "jax_step_s": jax_row["step_s"], "torch_step_s": rows.get(BASELINE, {}).get("step_s"),
            "ratio": jax_row.get("ratio")}


def run(models=("ae", "den"), ae_variants=AE_VARIANTS, *, quick: bool = False, sizes: dict | None = None,
        repeats: int = 5, steps_per_repeat: int | None = None, flag_sets=(), torch_variants: bool = True,
        torch_threads: int | None = None, use_torch: bool = True, unet_variants=("host",)) -> dict:
    """Run the engine benchmark; returns the JSON-ready result (see module docstring)."""
    cfg = dict(sizes or (QUICK if quick else FULL))
    steps = steps_per_repeat or cfg["steps_per_repeat"]
    torch = torch_or_none() if use_torch else None
    if torch is not None:  # by default as many threads as XLA:CPU uses: every core we may run on
        from pagjax.devices import available_cores

        torch.set_num_threads(torch_threads or available_cores())
    res = {"benchmark": "engine", "machine": common.machine_description(), "quick": quick, "sizes": cfg,
           "repeats": repeats, "steps_per_repeat": steps, "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "torch": None if torch is None else {"version": torch.__version__, "threads": torch.get_num_threads()}}
    if "ae" in models:
        cands = {f"jax:{v}": jax_ae_step(cfg, v) for v in ae_variants}
        if torch is not None:
            tv = [v for v in ae_variants if v != "nchw"] if torch_variants else ["transpose"]
            cands.update({f"torch:{v}": torch_ae_step(torch, cfg, v) for v in dict.fromkeys(["transpose", *tv])})
        base = BASELINE if torch is not None else f"jax:{ae_variants[0]}"
        res["ae"] = interleaved(cands, steps, repeats, base)
        res["ae_baseline"] = base
        if torch is not None:  # each variant against PyTorch running the same architecture
            for v in ae_variants:
                twin = res["ae"].get(f"torch:{v}")
                if twin:
                    ts = zip(res["ae"][f"jax:{v}"]["times_s"], twin["times_s"])
                    res["ae"][f"jax:{v}"]["ratio_same_arch"] = statistics.median(a / b for a, b in ts)
    if "den" in models:
        cands = {"jax:den": jax_den_step(cfg)}
        if torch is not None:
            cands["torch:den"] = torch_den_step(torch, cfg)
        res["den"] = interleaved(cands, steps, repeats, "torch:den" if torch is not None else "jax:den")
    if "unet" in models:
        for v in unet_variants:
            if v not in UNET_VARIANTS:
                raise ValueError(f"unknown unet variant {v!r} (choose from {UNET_VARIANTS})")
        cands = {("jax:unet" if v == "host" else f"jax:unet-{v}"): jax_unet_step(cfg, v) for v in unet_variants}
        if torch is not None:
            cands["torch:unet"] = torch_unet_step(torch, cfg)
        first = next(iter(cands))
        res["unet"] = interleaved(cands, steps, repeats, "torch:unet" if torch is not None else first)
    res["flag_sets"] = [_child_flag_run(f, cfg, repeats, torch_threads) for f in flag_sets]
    return res


def print_table(res: dict) -> None:
    """Print the step tables of a `run` result."""
    print(common.describe_machine_line(res["machine"]))
    t = res["torch"]
    print(f"torch: {t['version']} ({t['threads']} threads)" if t else "torch: not installed (rows skipped)")
    print(f"XLA_FLAGS={res['xla_flags']!r}; median over {res['repeats']} repeats of {res['steps_per_repeat']} "
          f"steps, engines interleaved")
    c = res["sizes"]
    headers = ["model", "engine:variant", "params", "step ms", "min ms", "max ms", "ratio", "vs same arch", "loss"]
    rows = []
    if "ae" in res:
        for name, r in res["ae"].items():
            rows.append([f"ae B{c['batch']}", name, r["params"], r["step_s"] * 1e3, r["min_s"] * 1e3, r["max_s"] * 1e3,
                         r.get("ratio"), r.get("ratio_same_arch"), r["loss"]])
    if "den" in res:
        for name, r in res["den"].items():
            rows.append([f"den B{c['den_batch']} w{c['den_width']}", name, r["params"], r["step_s"] * 1e3,
                         r["min_s"] * 1e3, r["max_s"] * 1e3, r.get("ratio"), None, r["loss"]])
    if "unet" in res:
        for name, r in res["unet"].items():
            rows.append([f"unet B{c['unet_batch']} {'/'.join(map(str, c['unet_channels']))}", name, r["params"],
                         r["step_s"] * 1e3, r["min_s"] * 1e3, r["max_s"] * 1e3, r.get("ratio"), None, r["loss"]])
    print(common.format_table(headers, rows))
    print(f"ratio = step time / {res.get('ae_baseline', BASELINE)} (ae), the PyTorch denoiser (den) or the "
          "PyTorch U-Net step (unet), median of per-repeat ratios")
    if res["flag_sets"]:
        print(common.format_table(["XLA_FLAGS (child process)", "jax ms", "torch ms", "ratio"],
                                  [[f["flags"] or "(none)", (f.get("jax_step_s") or 0) * 1e3 or None,
                                    (f.get("torch_step_s") or 0) * 1e3 or None, f.get("ratio", f.get("error"))]
                                   for f in res["flag_sets"]]))


def main(argv=None) -> dict:
    """CLI entry point: parse flags, run, print the table and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(ap, "engine")
    ap.add_argument("--models", default="ae,den", help="comma-separated: ae,den,unet")
    ap.add_argument("--unet-variants", default="host",
                    help="comma-separated JAX step loops: " + ",".join(UNET_VARIANTS))
    ap.add_argument("--unet-batch", type=int, default=None, help="score-model U-Net batch (default 64)")
    ap.add_argument("--ae-variants", default=",".join(AE_VARIANTS), help="comma-separated: " + ",".join(AE_VARIANTS))
    ap.add_argument("--batch", type=int, default=None, help="autoencoder batch (default 128; 32 with --quick)")
    ap.add_argument("--den-batch", type=int, default=None, help="denoiser batch (default 32; 8 with --quick)")
    ap.add_argument("--den-width", type=int, default=None, help="denoiser width (default 256; 32 with --quick)")
    ap.add_argument("--steps-per-repeat", type=int, default=None)
    ap.add_argument("--xla-flag-sets", default="", help="';'-separated XLA_FLAGS values, each run in a child process")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch.set_num_threads (default: the usable cores, as XLA)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows even if torch is installed")
    ap.add_argument("--no-torch-variants", action="store_true", help="PyTorch: the transpose architecture only")
    ap.add_argument("--sizes-json", default=None, help=argparse.SUPPRESS)  # the flag-set children's sizes
    args = ap.parse_args(argv)
    sizes = json.loads(args.sizes_json) if args.sizes_json else dict(QUICK if args.quick else FULL)
    for key, val in (("batch", args.batch), ("den_batch", args.den_batch), ("den_width", args.den_width),
                     ("unet_batch", args.unet_batch)):
        if val:
            sizes[key] = val
    flag_sets = [f.strip() for f in args.xla_flag_sets.split(";")] if args.xla_flag_sets else []
    return common.run_and_report(
        lambda: run(tuple(filter(None, args.models.split(","))), tuple(filter(None, args.ae_variants.split(","))),
                    quick=args.quick, sizes=sizes, repeats=args.repeats or (3 if args.quick else 5),
                    steps_per_repeat=args.steps_per_repeat, flag_sets=flag_sets,
                    torch_variants=not args.no_torch_variants, torch_threads=args.torch_threads,
                    use_torch=not args.no_torch, unet_variants=tuple(filter(None, args.unet_variants.split(",")))),
        print_table, args.json)


if __name__ == "__main__":
    main()
