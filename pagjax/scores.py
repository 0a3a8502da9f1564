"""Score sources for perceptual alignment: exact (known manifolds) and learned (denoisers).

A *score* at noise level s is grad_x log p_s(x), the gradient of the log-density of the
data convolved with N(0, s^2 I) (unconditional), or grad_x log p_s(x|y) (class-
conditional). On known-manifold datasets it is available in closed form, together with
the Bayes-optimal gradient grad_x log p_s(y|x) = grad log p_s(x|y) - grad log p_s(x).
For real images it is learned:

* a denoiser D(x, s[, y]) is trained by denoising score matching (Vincent 2011; Song &
  Ermon 2019): minimise E ||D(x0 + s n, s) - x0||^2 over data x0, noise n ~ N(0, I) and
  noise levels s. One network serves every noise level; it uses the input/output
  preconditioning and loss weighting of Karras et al. 2022 ("Elucidating the Design Space
  of Diffusion-Based Generative Models", Table 1): D = c_skip x + c_out F(c_in x, c_noise).
* its minimiser is the posterior mean E[x0 | x], and Tweedie's formula turns it into the
  score: grad_x log p_s(x) = (E[x0 | x] - x) / s^2 ~ (D(x, s) - x) / s^2.

`ScoreSource` wraps either kind behind one call ``source(x, y, noise_level=s) -> maps``;
`compute_scores` evaluates one on a dataset once per (dataset, source, noise level) and
keeps the maps in an explicit `ScoreCache` (memory, optionally an on-disk npz directory).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from pagjax import chunks, engine, models
from pagjax import io as io_lib
from pagjax import validation
from pagjax.static import Static

Array = jax.Array

EXACT_KINDS = ("score", "class_score", "bayes_gradient")


# --------------------------------------------------------------------------- fingerprints


def fingerprint(obj) -> str:
    """A stable hex digest of arrays, numbers, strings, containers and dataclasses.

    Raises `TypeError` for objects without a stable content (functions, arbitrary
    instances): give those an explicit name instead.
    """
    h = hashlib.sha256()

    def feed(o):
        if isinstance(o, (jax.Array, np.ndarray, np.generic)):
            a = np.asarray(o)
            h.update(f"arr{a.dtype}{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
        elif o is None or isinstance(o, (bool, int, float, str)):
            h.update(f"{type(o).__name__}:{o!r};".encode())
        elif isinstance(o, (list, tuple)):
            h.update(f"seq{len(o)}[".encode())
            for v in o:
                feed(v)
            h.update(b"]")
        elif isinstance(o, dict):
            h.update(f"map{len(o)}{{".encode())
            for k in sorted(o, key=str):
                feed(str(k))
                feed(o[k])
            h.update(b"}")
        elif dataclasses.is_dataclass(o) and not isinstance(o, type):
            h.update(f"dc:{type(o).__qualname__}(".encode())
            for f in dataclasses.fields(o):
                feed(f.name)
                feed(getattr(o, f.name))
            h.update(b")")
        else:
            raise TypeError(f"no stable fingerprint for {type(o).__name__}")

    feed(obj)
    return h.hexdigest()[:32]


# --------------------------------------------------------------------------- score sources


@struct.dataclass
class ScoreSource:
    """A map x -> score maps at a noise level: ``source(x, y, noise_level=s)``.

    Attributes:
      fn: ``fn(params, x, y, s) -> maps`` (pure; `x`'s shape).
      params: arrays the function needs (a pytree, passed through `jit`), or None.
      needs_labels: True for class-conditional sources (`y` required).
      kind: "score", "class_score", "bayes_gradient" (exact) or "learned".
      name: a stable identifier used as the cache key (content fingerprint by default).
    """

    fn: Callable = struct.field(pytree_node=False)
    params: Any = None
    needs_labels: bool = struct.field(pytree_node=False, default=False)
    kind: str = struct.field(pytree_node=False, default="score")
    name: str = struct.field(pytree_node=False, default="")

    def __call__(self, x: Array, y: Array | None = None, *, noise_level) -> Array:
        """Score maps (shape of `x`) at `noise_level` (class-conditional sources use `y`)."""
        if self.needs_labels and y is None:
            raise ValueError(f"score source {self.name!r} ({self.kind}) needs labels y")
        return self.fn(self.params, x, y, noise_level)


def _exact_score(m, x, y, s):
    return m.score(x, s)


def _exact_class_score(m, x, y, s):
    return m.class_score(x, y, s)


def _exact_bayes_gradient(m, x, y, s):
    return m.bayes_gradient(x, y, s)


_EXACT_FNS = {"score": _exact_score, "class_score": _exact_class_score, "bayes_gradient": _exact_bayes_gradient}


def _closed_exact(manifold, kind, params, x, y, s):
    """For manifolds that are not pytrees of arrays: bound to the object (`Static`), no params."""
    return _EXACT_FNS[kind](manifold, x, y, s)


def _is_array_pytree(obj) -> bool:
    leaves, treedef = jax.tree.flatten(obj)
    if treedef.num_nodes == 1 and treedef.num_leaves == 1:  # obj is itself a leaf
        return False
    return all(isinstance(v, (jax.Array, np.ndarray, np.generic, float, int)) for v in leaves)


def exact_score(manifold, kind: str = "score", *, name: str | None = None) -> ScoreSource:
    """Exact score source of a known manifold (`pagjax.manifolds.KnownManifold` or alike).

    Args:
      manifold: an object with ``score(x, s)``, ``class_score(x, y, s)`` and
        ``bayes_gradient(x, y, s)`` (only the one `kind` needs). A manifold that is a
        pytree of arrays (like `pagjax.manifolds`' dataclasses) is passed through
        `jit` as an argument, so one compilation serves every manifold of a type.
      kind: ``"score"`` grad log p_s(x); ``"class_score"`` grad log p_s(x|y);
        ``"bayes_gradient"`` grad log p_s(y|x), the gradient a Bayes-optimal
        noise-trained classifier has (what the theory predicts).
      name: stable identifier for caching; default: a fingerprint of the manifold's
        contents (its pytree leaves or dataclass fields). Objects without one are
        cached in memory only.
    """
    validation.check_choice("kind", kind, EXACT_KINDS)
    if not callable(getattr(manifold, kind, None)):
        raise ValueError(f"manifold {type(manifold).__name__} has no method {kind}(...)")
    if name is None:
        try:
            if _is_array_pytree(manifold):
                leaves, treedef = jax.tree.flatten(manifold)
                fp = fingerprint([str(treedef), [np.asarray(v) for v in leaves]])
            else:
                fp = fingerprint(manifold)
            name = f"exact-{kind}-{type(manifold).__name__}-{fp}"
        except TypeError:
            name = ""  # unnamed: in-memory caching only
    if _is_array_pytree(manifold):
        fn, params = _EXACT_FNS[kind], manifold
    else:
        fn, params = Static(_closed_exact, manifold, kind), None
    return ScoreSource(fn=fn, params=params, needs_labels=kind != "score", kind=kind, name=name)


# --------------------------------------------------------------------------- denoiser network


def _noise_embedding(c_noise: Array, dim: int) -> Array:
    """Sinusoidal (Fourier) features of the scalar noise conditioning, (B,) -> (B, dim)."""
    half = dim // 2
    freqs = jnp.exp(jnp.linspace(0.0, math.log(1000.0), half))
    ang = c_noise[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=-1)


class DenoiserNet(nn.Module):
    """F(x_in, c_noise[, y]) of the preconditioned denoiser (see `Denoiser`).

    ``arch="mlp"``: flattened input, residual MLP blocks with FiLM conditioning plus a
    full-rank linear path (d x d parameters: for small images / known manifolds). ``arch="conv"``: 3x3 convolution residual blocks
    with FiLM conditioning (translation-equivariant, for real images).
    """

    image_shape: tuple
    width: int = 256
    depth: int = 3
    arch: str = "mlp"
    num_classes: int = 0  # > 0: class-conditional

    @nn.compact
    def __call__(self, x, c_noise, y=None):
        """Apply F to (B, H, W, C) inputs with (B,) noise conditioning and labels."""
        b = x.shape[0]
        emb = _noise_embedding(c_noise, 64)
        emb = nn.Dense(self.width)(emb)
        if self.num_classes:
            emb = emb + nn.Embed(self.num_classes, self.width)(y)
        emb = nn.silu(nn.Dense(self.width)(nn.silu(emb)))
        if self.arch == "mlp":
            h = nn.Dense(self.width)(jnp.reshape(x, (b, -1)))
            for _ in range(self.depth):
                film = nn.Dense(2 * self.width)(emb)
                scale, shift = jnp.split(film, 2, axis=-1)
                z = nn.LayerNorm()(h) * (1 + scale) + shift
                h = h + nn.Dense(self.width)(nn.silu(nn.Dense(self.width)(nn.silu(z))))
            d = int(np.prod(self.image_shape))
            out = nn.Dense(d, kernel_init=nn.initializers.zeros)(nn.silu(nn.LayerNorm()(h)))
            # A full-rank linear path, modulated by the noise level: the optimal denoiser of
            # data near a subspace is close to a noise-dependent projection, which a
            # bottleneck of width < d cannot represent.
            gate = nn.Dense(1)(emb)
            lin = nn.Dense(d, use_bias=False, kernel_init=nn.initializers.zeros)(jnp.reshape(x, (b, -1)))
            out = out + (1.0 + gate) * lin
            return jnp.reshape(out, (b, *self.image_shape))
        h = nn.Conv(self.width, (3, 3))(x)
        for _ in range(self.depth):
            film = nn.Dense(2 * self.width)(emb)[:, None, None, :]
            scale, shift = jnp.split(film, 2, axis=-1)
            z = nn.GroupNorm(num_groups=min(8, self.width))(h) * (1 + scale) + shift
            h = h + nn.Conv(self.width, (3, 3))(nn.silu(nn.Conv(self.width, (3, 3))(nn.silu(z))))
        return nn.Conv(self.image_shape[-1], (3, 3), kernel_init=nn.initializers.zeros)(
            nn.silu(nn.GroupNorm(num_groups=min(8, self.width))(h))
        )


@struct.dataclass
class Denoiser:
    """A trained denoiser D(x, s[, y]) = mean + c_skip (x - mean) + c_out F(c_in (x - mean), ln(s)/4, y).

    Attributes:
      params: the network's parameters.
      mean: per-pixel data mean (H, W, C) subtracted before the network.
      image_shape, width, depth, arch, num_classes: the network's configuration.
      sigma_data: the data's standard deviation around `mean` (EDM's sigma_data).
    """

    params: Any
    mean: Array
    image_shape: tuple = struct.field(pytree_node=False)
    width: int = struct.field(pytree_node=False, default=256)
    depth: int = struct.field(pytree_node=False, default=3)
    arch: str = struct.field(pytree_node=False, default="mlp")
    num_classes: int = struct.field(pytree_node=False, default=0)
    sigma_data: float = struct.field(pytree_node=False, default=0.5)

    @property
    def conditional(self) -> bool:
        """Whether D takes class labels."""
        return self.num_classes > 0

    def net(self) -> DenoiserNet:
        """The flax module F."""
        return DenoiserNet(
            image_shape=tuple(self.image_shape),
            width=self.width,
            depth=self.depth,
            arch=self.arch,
            num_classes=self.num_classes,
        )

    def config(self) -> dict:
        """JSON-serialisable configuration (everything except the arrays)."""
        return {
            "image_shape": list(self.image_shape),
            "width": self.width,
            "depth": self.depth,
            "arch": self.arch,
            "num_classes": self.num_classes,
            "sigma_data": self.sigma_data,
        }

    def __call__(self, x: Array, noise_level, y: Array | None = None) -> Array:
        """Denoised estimate E[x0 | x] of a noisy batch `x` at noise level(s) s."""
        return _denoise_jit(self.net(), self.sigma_data, self.params, self.mean, x, noise_level, y)


def _denoise(net, sigma_data, params, mean, x, s, y):
    s = jnp.broadcast_to(jnp.asarray(s, x.dtype), (x.shape[0],))
    sb = s[:, None, None, None] if x.ndim == 4 else s[:, None]
    sd2 = sigma_data**2
    c_skip = sd2 / (sb**2 + sd2)
    c_out = sb * sigma_data / jnp.sqrt(sb**2 + sd2)
    c_in = 1.0 / jnp.sqrt(sb**2 + sd2)
    xc = x - mean
    f = net.apply({"params": params}, c_in * xc, jnp.log(s) / 4.0, y)
    return mean + c_skip * xc + c_out * f


# One program per network configuration and input shape (modules compare by value): eager
# evaluation compiled every operation separately, several times slower on CPU.
_denoise_jit = jax.jit(_denoise, static_argnums=0)


def _tweedie_score(config: tuple, params, x, y, s):
    """(D(x, s) - x) / s^2 of the denoiser with configuration `config` (sorted items of
    `Denoiser.config`): bound to it by `Static`, one compilation serves every denoiser of
    one configuration."""
    cfg = dict(config)
    net = DenoiserNet(
        image_shape=tuple(cfg["image_shape"]),
        width=cfg["width"],
        depth=cfg["depth"],
        arch=cfg["arch"],
        num_classes=cfg["num_classes"],
    )
    d = _denoise(net, cfg["sigma_data"], params["params"], params["mean"], x, s, y)
    s = jnp.asarray(s, x.dtype)
    return (d - x) / jnp.square(s)


def learned_score(denoiser: Denoiser, *, name: str | None = None) -> ScoreSource:
    """Score source from a denoiser by Tweedie's formula: (D(x, s[, y]) - x) / s^2.

    A class-conditional denoiser gives grad log p_s(x|y) (needs labels), an
    unconditional one grad log p_s(x). The default `name` fingerprints the parameters.
    """
    cfg = denoiser.config()
    key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()))
    if name is None:
        name = "learned-" + fingerprint([cfg, denoiser.params, denoiser.mean])
    return ScoreSource(
        fn=Static(_tweedie_score, key),
        params={"params": denoiser.params, "mean": denoiser.mean},
        needs_labels=denoiser.conditional,
        kind="learned",
        name=name,
    )


def train_denoiser(
    x_train: Array,
    y_train: Array | None = None,
    *,
    noise_levels,
    steps: int,
    key: Array,
    conditional: bool = False,
    num_classes: int | None = None,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    width: int = 256,
    depth: int = 3,
    arch: str = "mlp",
    noise_sampling: str = "discrete",
    checkpointer=None,
    checkpoint_every: int | None = None,
    checkpoint_seconds: float | None = None,
    progress: str | None = None,
) -> Denoiser:
    """Train a noise-level-conditioned denoiser by denoising score matching.

    Minimises E_{x0, s, n} w(s) ||D(x0 + s n, s[, y]) - x0||^2 with EDM's weight
    w(s) = (s^2 + sigma_data^2) / (s sigma_data)^2 (Karras et al. 2022), Adam with a
    cosine-decayed learning rate, trained by the one engine (`pagjax.engine.train_loop`:
    shuffled epochs, checkpoints and resume, progress).

    Args:
      x_train: (N, H, W, C) float images (any range; the per-pixel mean is removed).
      y_train: (N,) int labels; required when `conditional`.
      noise_levels: the noise levels s to train for (a float or a sequence).
      steps: optimisation steps.
      key: PRNG key (initialisation, batches, noise).
      conditional: train D(x, s, y) (class-conditional score) instead of D(x, s).
      num_classes: number of classes (default: max(y_train) + 1).
      batch_size, learning_rate, width, depth, arch: optimisation / network settings
        (``arch`` "mlp" or "conv", see `DenoiserNet`).
      noise_sampling: ``"discrete"`` draws each example's s uniformly from
        `noise_levels`; ``"log_uniform"`` draws log s uniformly in [min, max].
      checkpointer, checkpoint_every, checkpoint_seconds: a `pagjax.io.Checkpointer` to resume
        from and save to, every so many steps or seconds (`pagjax.engine.train_loop`).
      progress: a progress-bar title, or None for none.

    Returns:
      a `Denoiser`; turn it into a score with `learned_score`, save with `save_denoiser`.
    """
    validation.check_images("x_train", x_train, ranks=(4,))
    validation.check_positive_int("steps", steps)
    validation.check_positive_int("batch_size", batch_size)
    validation.check_positive("learning_rate", learning_rate)
    validation.check_choice("arch", arch, ("mlp", "conv"))
    validation.check_choice("noise_sampling", noise_sampling, ("discrete", "log_uniform"))
    levels = np.atleast_1d(np.asarray(noise_levels, np.float32))
    if levels.size == 0 or not np.all(np.isfinite(levels)) or np.any(levels <= 0):
        raise ValueError(f"noise_levels must be finite numbers > 0, got {noise_levels!r}")
    n = x_train.shape[0]
    if conditional:
        if y_train is None:
            raise ValueError("y_train is required when conditional=True")
        validation.check_labels("y_train", y_train, batch=n)
        k = int(num_classes) if num_classes is not None else int(np.max(np.asarray(y_train))) + 1
        validation.check_labels("y_train", y_train, num_classes=k)
    else:
        k = 0
    x_train = jnp.asarray(x_train, jnp.float32)
    y_arr = jnp.asarray(y_train, jnp.int32) if conditional else jnp.zeros((n,), jnp.int32)
    mean = jnp.mean(x_train, axis=0)
    sigma_data = float(jnp.maximum(jnp.std(x_train - mean), 1e-3))
    den = Denoiser(
        params=None,
        mean=mean,
        image_shape=tuple(x_train.shape[1:]),
        width=width,
        depth=depth,
        arch=arch,
        num_classes=k,
        sigma_data=sigma_data,
    )
    net = den.net()
    k_init, k_loop, k_data = jax.random.split(key, 3)
    bs = min(batch_size, n)
    y0 = y_arr[:1] if conditional else None
    params = models.init_variables(net, k_init, x_train[:1], jnp.zeros((1,), jnp.float32), y0)["params"]
    sched = optax.cosine_decay_schedule(learning_rate, steps, alpha=0.05)
    opt = optax.adam(sched)
    lv = jnp.asarray(levels)
    sd2 = sigma_data**2

    def loss_fn(p, xb, yb, s, noise):
        xn = xb + s[:, None, None, None] * noise
        d = _denoise(net, sigma_data, p, mean, xn, s, yb if conditional else None)
        w = (s**2 + sd2) / (s * sigma_data) ** 2
        return jnp.mean(w * jnp.mean(jnp.square(d - xb), axis=(1, 2, 3)))

    def step_fn(state, batch):
        step, p, o = state
        xb, yb = batch
        k_s, k_n = jax.random.split(jax.random.fold_in(k_loop, step))
        if noise_sampling == "discrete":
            s = lv[jax.random.randint(k_s, (bs,), 0, lv.shape[0])]
        else:
            lo, hi = jnp.log(jnp.min(lv)), jnp.log(jnp.max(lv))
            s = jnp.exp(jax.random.uniform(k_s, (bs,), minval=lo, maxval=hi))
        noise = jax.random.normal(k_n, xb.shape)
        loss, g = jax.value_and_grad(loss_fn)(p, xb, yb, s, noise)
        upd, o_new = opt.update(g, o, p)
        finite = jnp.isfinite(loss) & engine.all_finite(g)
        _, p, o = engine.skip_nonfinite((step, optax.apply_updates(p, upd), o_new), state, finite)
        return (step + 1, p, o), {"loss": loss, "finite": finite}

    result = engine.train_loop(step_fn, (jnp.zeros((), jnp.int32), params, opt.init(params)), (x_train, y_arr),
                               k_data, steps=steps, batch_size=bs, checkpointer=checkpointer,
                               checkpoint_every=checkpoint_every,
                               checkpoint_seconds=checkpoint_seconds, progress=progress)
    return den.replace(params=result.state[1])


def denoising_mse(denoiser_or_fn, x0: Array, y: Array | None, noise_level, key: Array) -> Array:
    """Mean squared error per pixel of a denoiser on x0 + s n (n ~ N(0, I), from `key`).

    `denoiser_or_fn` is a `Denoiser` or any ``fn(x_noisy, s, y) -> x0_hat`` (e.g. an
    exact posterior mean, for the Bayes-optimal floor).
    """
    xn = x0 + noise_level * jax.random.normal(key, x0.shape, x0.dtype)
    d = denoiser_or_fn(xn, noise_level, y)
    return jnp.mean(jnp.square(d - x0))


# --------------------------------------------------------------------------- orbax checkpoints


def save_denoiser(path: str, denoiser: Denoiser) -> None:
    """Save a denoiser to directory `path` (orbax arrays + ``config.json``), overwriting."""
    io_lib.save_checkpoint_dir(path, "arrays", {"params": denoiser.params, "mean": denoiser.mean},
                               denoiser.config())


def load_denoiser(path: str) -> Denoiser:
    """Load a denoiser saved by `save_denoiser` (reusable across every evaluated model)."""
    cfg = io_lib.read_checkpoint_config(path, "denoiser")
    den = Denoiser(params=None, mean=None, **{**cfg, "image_shape": tuple(cfg["image_shape"])})
    net = den.net()
    shape = (1, *den.image_shape)
    y0 = jnp.zeros((1,), jnp.int32) if den.conditional else None
    abstract = jax.eval_shape(
        lambda: {
            "params": net.init(jax.random.key(0), jnp.zeros(shape), jnp.zeros((1,)), y0)["params"],
            "mean": jnp.zeros(den.image_shape, jnp.float32),
        }
    )
    arrays = io_lib.restore_checkpoint_dir(path, "arrays", abstract)
    return den.replace(params=arrays["params"], mean=arrays["mean"])


# --------------------------------------------------------------------------- cache


class ScoreCache:
    """Score maps computed once per (dataset, score source, noise level).

    Passed explicitly (no global state). In memory, keyed by a fingerprint of the
    dataset contents (or a caller-given ``dataset_id``), the source's name (for an unnamed
    source: its function's identity and its parameters' contents) and s;
    with ``directory`` also written to ``<directory>/<key>.npz`` atomically (temporary
    file + `os.replace`) and read back by later processes.

    Attributes:
      hits, misses: counters (how many lookups were served / computed).
    """

    def __init__(self, directory: str | None = None):
        """Create an empty cache, optionally backed by `directory` (created if needed)."""
        self.directory = directory
        self._mem: dict[str, np.ndarray] = {}
        self._unnamed_fns: dict[int, Callable] = {}
        self.hits = 0
        self.misses = 0
        if directory is not None:
            os.makedirs(directory, exist_ok=True)

    def __len__(self) -> int:
        return len(self._mem)

    def key(self, source: ScoreSource, x, y, noise_level, dataset_id: str | None = None) -> tuple[str, bool]:
        """(cache key, whether it is stable across processes) for these inputs."""
        data = dataset_id if dataset_id is not None else fingerprint([np.asarray(x), None if y is None else np.asarray(y)])
        stable = bool(source.name)
        if stable:
            name = source.name
        else:
            # In memory only: the function by identity (kept alive here, so that its id cannot
            # be reused by another one) and the parameters by content, so that two networks
            # sharing one function never share maps.
            self._unnamed_fns.setdefault(id(source.fn), source.fn)
            leaves, treedef = jax.tree.flatten(source.params)
            name = ["unnamed", id(source.fn), str(treedef), [np.asarray(v) for v in leaves]]
        return fingerprint([name, data, float(noise_level)]), stable

    def get(self, key: str) -> np.ndarray | None:
        """The cached maps for `key`, from memory or disk, or None (also for a damaged file,
    with a warning naming it)."""
        if key in self._mem:
            return self._mem[key]
        if self.directory is not None:
            p = os.path.join(self.directory, key + ".npz")
            if os.path.isfile(p):
                try:
                    arr = io_lib.load_npz(p, "maps")
                except io_lib.DamagedFileError as e:  # computed again, never trusted
                    warnings.warn(f"{e}; computing the score maps again", RuntimeWarning, stacklevel=2)
                    return None
                self._mem[key] = arr
                return arr
        return None

    def put(self, key: str, maps, persist: bool = True) -> None:
        """Store maps under `key` (and on disk if the cache has a directory)."""
        arr = np.asarray(maps)
        self._mem[key] = arr
        if self.directory is not None and persist:
            io_lib.save_npz(os.path.join(self.directory, key + ".npz"), maps=arr)


def _source_maps(fn, params, x, y, s):
    return fn(params, x, y, s)


# fn is a `Static` of the source's fn: its params are traced, so sources that differ only
# in their arrays (two denoisers of one configuration) share one compilation
_source_maps_jit = jax.jit(_source_maps, static_argnums=0)


def compute_scores(
    source: ScoreSource,
    x,
    y=None,
    *,
    noise_level,
    cache: ScoreCache | None = None,
    chunk_size: int | None = None,
    dataset_id: str | None = None,
) -> Array:
    """Score maps of `source` at `noise_level` for a dataset `x` (labels `y` if needed).

    Evaluated in jitted chunks of `chunk_size` examples (all at once by default; a NumPy
    `x` reaches the device one chunk at a time). With a `cache`, the maps are computed once
    per (dataset, source, noise level): later calls, e.g. for every model of a sweep, return
    the stored maps. Without one it is pure and works under the caller's `jit` (chunks then
    run through `lax.map`).
    """
    if not isinstance(source, ScoreSource):
        raise ValueError(f"source must be a ScoreSource, got {type(source).__name__}")
    validation.check_images("x", x, ranks=(2, 3, 4))
    validation.check_positive("noise_level", noise_level)
    if source.needs_labels:
        if y is None:
            raise ValueError(f"labels y are required for the class-conditional source {source.name!r}")
        validation.check_labels("y", y, batch=x.shape[0])
    if chunk_size is not None:
        validation.check_positive_int("chunk_size", chunk_size)
    key = stable = None
    if cache is not None:
        if not validation._is_concrete((x, y, noise_level)):
            raise ValueError("cache= needs concrete inputs (call compute_scores outside jit)")
        key, stable = cache.key(source, x, y if source.needs_labels else None, noise_level, dataset_id)
        hit = cache.get(key)
        if hit is not None:
            if hit.shape != tuple(x.shape):
                raise ValueError(f"cached maps have shape {hit.shape}, expected {tuple(x.shape)}")
            cache.hits += 1
            return jnp.asarray(hit)
        cache.misses += 1
    s = jnp.asarray(noise_level, jnp.float32)
    yy = y if source.needs_labels else None
    run = functools.partial(_source_maps_jit, Static(source.fn), source.params)
    maps = chunks.map_chunks(lambda xs: run(*xs, s), (x, yy), chunk_size)
    if cache is not None:
        cache.put(key, maps, persist=stable)
    return maps
