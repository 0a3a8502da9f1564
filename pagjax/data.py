"""Real-image datasets: tfds loaders that never hang offline, and offline digits.

* ``digits``: scikit-learn's 1797 handwritten 8x8 digits (Alpaydin & Kaynak, UCI
  "Optical Recognition of Handwritten Digits", values 0..16), shipped with scikit-learn,
  so it works on every machine without network. Optionally upsampled (bilinear).
* ``mnist``, ``fashion_mnist``, ``cifar10``: read from prepared ``tensorflow-datasets``
  data (array_record format) with `tfds.data_source` (no TensorFlow needed), as NHWC
  float32 arrays in [0, 1].
* ``imagenet64``: ``imagenet_resized/64x64`` (1000 classes, 1.28M images), too large
  for memory: `stream_batches` reads it batch by batch, shuffled deterministically from
  a seed and resumable at any step, each batch optionally sharded over a device mesh.

Nothing is downloaded unless ``download=True``. Without prepared data the loaders raise
`DatasetUnavailableError` (a `ValueError`) within milliseconds, with the command that
prepares the data (``python -m pagjax.data download NAME --data-dir DIR`` on a machine
with network). `tfds.load` is never used: offline it retries for minutes, and it needs
TensorFlow.

Preparing (``download=True``, ``python -m pagjax.data download``) runs tfds's builders,
which do need TensorFlow: ``pip install "pagjax[prepare]"``. Before any network access or
long work, `check_can_download` makes sure that TensorFlow is installed and that the
dataset's server answers within a few seconds; otherwise it fails at once with one message,
instead of tfds failing on ``import tensorflow`` after the download or retrying for minutes.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Iterator, Sequence

import numpy as np

from pagjax import validation

OFFLINE_DATASETS = ("digits",)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How a dataset name maps to tfds: builder name, splits, example shape, classes."""

    tfds_name: str
    shape: tuple[int, int, int]
    num_classes: int
    train_split: str = "train"
    test_split: str = "test"
    streaming: bool = False  # too large to hold in memory: use `stream_batches`
    # Where tfds's builder fetches the raw files from (its URL constant): the one list of
    # hosts, asked whether they answer before downloading.
    download_url: str = ""


TFDS_DATASETS = {
    "mnist": DatasetSpec("mnist", (28, 28, 1), 10,
                         download_url="https://storage.googleapis.com/cvdf-datasets/mnist/"),
    "fashion_mnist": DatasetSpec("fashion_mnist", (28, 28, 1), 10,
                                 download_url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"),
    "cifar10": DatasetSpec("cifar10", (32, 32, 3), 10,
                           download_url="https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"),
    "imagenet64": DatasetSpec("imagenet_resized/64x64", (64, 64, 3), 1000, test_split="validation", streaming=True,
                              download_url="http://www.image-net.org/data/downsample/"),
}
# What preparing needs beyond the base install, and the command that installs it.
PREPARE_MODULES = ("tensorflow",)
PREPARE_INSTALL = 'pip install "pagjax[prepare]"'
REACH_TIMEOUT_S = 3.0  # a server that has not answered by then is taken as unreachable
DIGITS_CLASSES = 10
DIGITS_TEST = 297  # 1797 = 1500 train + 297 test


class DatasetUnavailableError(ValueError):
    """The dataset is not prepared locally, and downloading was not asked for or cannot start."""


@dataclasses.dataclass
class ImageData:
    """Train and test images (NHWC float32 in [0, 1]) with int32 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str


def dataset_names() -> tuple[str, ...]:
    """Every real-image dataset name accepted by `load_splits` and the sweep."""
    return OFFLINE_DATASETS + tuple(TFDS_DATASETS)


def is_real_dataset(name: str) -> bool:
    """Whether `name` is a real-image dataset (as opposed to a built-in known manifold)."""
    return name in dataset_names()


def num_classes_of(name: str) -> int:
    """Number of classes of a real dataset."""
    validation.check_choice("dataset", name, dataset_names())
    return DIGITS_CLASSES if name == "digits" else TFDS_DATASETS[name].num_classes


# --------------------------------------------------------------------------- helpers


def _check_image_size(image_size) -> None:
    if image_size is not None:
        validation.check_positive_int("image_size", image_size)


def resize_images(x: np.ndarray, image_size: int | None) -> np.ndarray:
    """Bilinear resize of NHWC images to image_size x image_size (None: unchanged), clipped to [0, 1]."""
    _check_image_size(image_size)
    x = np.asarray(x, np.float32)
    if image_size is None or x.shape[1:3] == (image_size, image_size):
        return x
    import jax
    import jax.numpy as jnp

    out = jax.image.resize(jnp.asarray(x), (x.shape[0], image_size, image_size, x.shape[3]), "linear")
    return np.clip(np.asarray(out), 0.0, 1.0)


def _subset(n_total: int, n: int | None, seed: int, salt: int) -> np.ndarray:
    """Deterministic random subset (sorted indices) of size min(n, n_total)."""
    if n is None or n >= n_total:
        return np.arange(n_total)
    perm = np.random.default_rng([seed, salt]).permutation(n_total)
    return np.sort(perm[:n])


# --------------------------------------------------------------------------- offline digits


def digits(*, image_size: int | None = None, seed: int = 0, n_test: int = DIGITS_TEST) -> ImageData:
    """scikit-learn's 8x8 handwritten digits as NHWC float32 in [0, 1], always available.

    The 1797 images are split deterministically (a permutation from `seed`) into
    1797 - n_test training and n_test test images; ``image_size`` upsamples bilinearly
    (e.g. 16 or 28).
    """
    _check_image_size(image_size)
    validation.check_positive_int("n_test", n_test)
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (np.asarray(d.images, np.float32) / 16.0)[..., None]
    y = np.asarray(d.target, np.int32)
    if n_test >= x.shape[0]:
        raise ValueError(f"n_test must be below the {x.shape[0]} digits, got {n_test}")
    perm = np.random.default_rng(seed).permutation(x.shape[0])
    test, train = perm[:n_test], perm[n_test:]
    x = resize_images(x, image_size)
    return ImageData(x[train], y[train], x[test], y[test], DIGITS_CLASSES, "digits")


# --------------------------------------------------------------------------- tfds


def _how_to_get(name: str, data_dir: str | None, *, offer_download: bool = True) -> str:
    d = data_dir or "~/tensorflow_datasets"
    spec = TFDS_DATASETS[name]
    now = ", or pass download=True (--download) to download now" if offer_download else ""
    return (f"On a machine with network run `{PREPARE_INSTALL}` and `python -m pagjax.data download {name} "
            f"--data-dir {d}` (or `tfds build {spec.tfds_name} --data_dir {d} --file_format array_record`), "
            f"copy {d} here and pass data_dir (--data-dir){now}. "
            f"The offline dataset 'digits' always works.")


def missing_prepare_modules() -> list[str]:
    """The modules that preparing needs (`PREPARE_MODULES`) and that are not installed.

    Only looks them up (`importlib.util.find_spec`): importing TensorFlow takes seconds.
    """
    return [m for m in PREPARE_MODULES if importlib.util.find_spec(m) is None]


def reach_error(url: str, timeout: float) -> str | None:
    """Why `url`'s server gives no HTTP answer within `timeout` seconds; None if it answers.

    One HEAD request without retries, made with `requests` as tfds's downloader makes its
    requests (same proxy and certificate settings); any HTTP status counts as an answer. A
    bare TCP connect would not do: intercepting networks and proxies accept every connection
    and then fail the download, which tfds retries for minutes. The request runs in a daemon
    thread joined with the timeout, because the name lookup ignores socket timeouts.
    """
    import requests  # a tensorflow-datasets dependency

    outcome = []

    def attempt():
        try:
            requests.head(url, timeout=timeout, allow_redirects=False)
            outcome.append(None)
        except requests.RequestException as err:
            # requests wraps urllib3's error; its cause (e.g. NameResolutionError) says more
            cause = getattr(err.args[0], "reason", None) if err.args else None
            outcome.append(type(cause or err).__name__)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def check_can_download(name: str, *, data_dir: str | None = None, timeout: float | None = None) -> None:
    """Raise `DatasetUnavailableError` unless downloading and preparing `name` can start.

    Checked in this order, before any download: the modules that tfds's builders need are
    installed (a lookup, no import, no network), then the dataset's server answers within
    `timeout` seconds (default `REACH_TIMEOUT_S`; `reach_error`). Costs a fraction of a
    second online, at most `timeout` offline.
    """
    validation.check_choice("dataset", name, tuple(TFDS_DATASETS))
    timeout = REACH_TIMEOUT_S if timeout is None else timeout
    missing = missing_prepare_modules()
    if missing:
        raise DatasetUnavailableError(
            f"downloading {name!r} needs {', '.join(missing)} (tfds's builders read the raw files with it), "
            f"which is not installed: run `{PREPARE_INSTALL}` first. Reading prepared data does not need it.")
    url = TFDS_DATASETS[name].download_url
    error = reach_error(url, timeout)
    if error is not None:
        raise DatasetUnavailableError(
            f"cannot download {name!r}: {url} is not reachable ({error}; waited at most {timeout:g} s). "
            f"{_how_to_get(name, data_dir, offer_download=False)}")


def _builder(name: str, data_dir: str | None):
    import tensorflow_datasets as tfds

    return tfds.builder(TFDS_DATASETS[name].tfds_name, data_dir=data_dir)


def check_available(name: str, *, data_dir: str | None = None, download: bool = False) -> None:
    """Raise `DatasetUnavailableError` (fast) unless `name` can be read.

    ``digits`` is always available. A tfds dataset must be prepared under `data_dir`
    (default: tfds's, ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``), or ``download``
    be True and downloading able to start (`check_can_download`: TensorFlow installed,
    server answering within a few seconds). Without ``download`` nothing touches the network.
    """
    validation.check_choice("dataset", name, dataset_names())
    if name in OFFLINE_DATASETS:
        return
    local_dir = None if data_dir is None else os.path.expanduser(data_dir)
    exists = local_dir is None or os.path.isdir(local_dir)
    if download:
        # Already prepared data need neither TensorFlow nor network, even with download=True.
        if not (exists and _prepared_in(name, local_dir)[0]):
            check_can_download(name, data_dir=data_dir)
        return
    if not exists:
        raise DatasetUnavailableError(f"data_dir {data_dir!r} does not exist. {_how_to_get(name, data_dir)}")
    prepared, folder = _prepared_in(name, local_dir)
    if not prepared:
        raise DatasetUnavailableError(
            f"dataset {name!r} ({TFDS_DATASETS[name].tfds_name}) is not prepared in {folder}. "
            f"{_how_to_get(name, data_dir)}")


class _DropMissingInfoWarning(logging.Filter):
    """Drops tfds's "Variant folder ... has no dataset_info.json" warning: merely looking for
    unprepared data logs it, and it would stand before the one message saying what to do."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Variant folder")


def _prepared_in(name: str, data_dir: str | None) -> tuple[bool, str]:
    """Whether `name` is prepared under `data_dir` (local files only), and the folder it would be in."""
    absl_logger = logging.getLogger("absl")  # tfds logs through absl, whose logger this is
    drop = _DropMissingInfoWarning()
    absl_logger.addFilter(drop)
    try:
        builder = _builder(name, data_dir)
        return builder.is_prepared(), str(builder.data_dir)
    finally:
        absl_logger.removeFilter(drop)


def open_source(name: str, split: str, *, data_dir: str | None = None, download: bool = False):
    """A random-access source (``len``, ``source[i] -> {'image', 'label'}``) of a tfds split.

    Checks availability first (`check_available`), so it never waits on the network
    unless ``download`` is True, and then only once the download can start.
    """
    check_available(name, data_dir=data_dir, download=download)
    return _tfds_source(name, split, data_dir, download)


def _tfds_source(name, split, data_dir, download):
    # Callers run `check_available` first: with download=True that is `check_can_download`.
    import tensorflow_datasets as tfds

    spec = TFDS_DATASETS[name]
    try:
        if download:
            builder = tfds.builder(spec.tfds_name, data_dir=data_dir, file_format="array_record")
            builder.download_and_prepare()
        return tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir, download=False)
    except NotImplementedError as err:  # prepared as tfrecord: not readable without TensorFlow
        raise DatasetUnavailableError(
            f"dataset {name!r} is prepared in a format other than array_record ({err}). Rebuild it with "
            f"`tfds build {spec.tfds_name} --file_format array_record`. {_how_to_get(name, data_dir)}") from None


def _read(source, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images and labels of `indices` from a random-access source."""
    indices = [int(i) for i in indices]
    getitems = getattr(source, "__getitems__", None)
    examples = None
    if getitems is not None:
        try:  # batched read (array_record); tfds's mock source lacks a working one
            examples = list(getitems(indices))
        except TypeError:
            examples = None
    if examples is None:
        examples = [source[i] for i in indices]
    images = [np.asarray(e["image"]) for e in examples]
    labels = np.asarray([int(e.get("label", -1)) for e in examples], np.int32)
    return images, labels


def _to_float(images: list, shape: tuple[int, int, int], image_size: int | None) -> np.ndarray:
    """Stack uint8 images as float32 [0, 1]; images of another size (e.g. mock data) are resized."""
    size = image_size or shape[0]
    out = []
    for im in images:
        im = np.asarray(im, np.float32) / 255.0
        if im.ndim == 2:
            im = im[..., None]
        out.append(resize_images(im[None], size)[0] if im.shape[:2] != (size, size) else im)
    return np.stack(out).astype(np.float32) if out else np.zeros((0, size, size, shape[2]), np.float32)


READ_CHUNK = 1024  # images decoded per read: a progress bar moves every chunk, memory stays small


def load_dataset(name: str, *, split: str = "train", data_dir: str | None = None, download: bool = False,
                 image_size: int | None = None, max_examples: int | None = None, seed: int = 0,
                 source=None, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One split of a real dataset as (images NHWC float32 in [0, 1], labels int32).

    Args:
      name: one of `dataset_names()` (``imagenet64`` only with `max_examples`; use
        `stream_batches` for the whole of it).
      split: ``"train"`` or ``"test"`` (mapped to the dataset's own split names), or a
        tfds split string such as ``"train[:10%]"``.
      data_dir: tfds data directory holding the prepared data (default: tfds's).
      download: download and prepare the data if missing (needs network).
      image_size: resize to image_size x image_size (bilinear); None keeps the size.
      max_examples: read a deterministic random subset (from `seed`) of this size.
      source: a random-access source to read instead of tfds (tests, custom data).
      progress: show a tqdm bar over the images read (decoding 50000 CIFAR-10 PNGs takes
        a while on a laptop).

    Raises:
      DatasetUnavailableError: the data are not prepared and ``download`` is False.
    """
    validation.check_choice("dataset", name, dataset_names())
    _check_image_size(image_size)
    if max_examples is not None:
        validation.check_positive_int("max_examples", max_examples)
    if name == "digits":
        validation.check_choice("split", split, ("train", "test"))
        d = digits(image_size=image_size, seed=seed)
        x, y = (d.x_train, d.y_train) if split == "train" else (d.x_test, d.y_test)
        idx = _subset(x.shape[0], max_examples, seed, 1)
        return x[idx], y[idx]
    spec = TFDS_DATASETS[name]
    tfds_split = {"train": spec.train_split, "test": spec.test_split}.get(split, split)
    if source is None:
        if spec.streaming and max_examples is None:
            raise ValueError(f"dataset {name!r} does not fit in memory: pass max_examples, or use stream_batches")
        source = open_source(name, tfds_split, data_dir=data_dir, download=download)
    idx = _subset(len(source), max_examples, seed, 1 if split == "train" else 2)
    if not progress:
        images, labels = _read(source, idx)
        return _to_float(images, spec.shape, image_size), labels
    from tqdm.auto import tqdm

    xs, ys = [], []
    with tqdm(total=len(idx), desc=f"loading {name} {split}", unit="image") as bar:
        for start in range(0, len(idx), READ_CHUNK):
            images, labels = _read(source, idx[start:start + READ_CHUNK])
            xs.append(_to_float(images, spec.shape, image_size))
            ys.append(labels)
            bar.update(len(labels))
    if not xs:
        return _to_float([], spec.shape, image_size), np.zeros((0,), np.int32)
    return np.concatenate(xs), np.concatenate(ys)


def load_splits(name: str, *, n_train: int | None = None, n_test: int | None = None, data_dir: str | None = None,
                download: bool = False, image_size: int | None = None, seed: int = 0,
                progress: bool = False) -> ImageData:
    """Train and test splits of a real dataset (each at most n_train / n_test images);
    ``progress`` shows a bar per split while tfds images are read."""
    check_available(name, data_dir=data_dir, download=download)
    kw = dict(data_dir=data_dir, download=download, image_size=image_size, seed=seed, progress=progress)
    x_tr, y_tr = load_dataset(name, split="train", max_examples=n_train, **kw)
    x_te, y_te = load_dataset(name, split="test", max_examples=n_test, **kw)
    return ImageData(x_tr, y_tr, x_te, y_te, num_classes_of(name), name)


# --------------------------------------------------------------------------- streaming


class ArraySource:
    """A random-access source over in-memory arrays (uint8 or float images, labels)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        """Wrap `images` (N, H, W, C) and `labels` (N,)."""
        if len(images) != len(labels):
            raise ValueError(f"images and labels must have equal length, got {len(images)} and {len(labels)}")
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i]}


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of `epoch`: a permutation that depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batch_indices_at(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Indices of global batch `step` (remainder of each epoch dropped): pure in (seed, step)."""
    per_epoch = num_examples // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} exceeds the {num_examples} examples")
    epoch, offset = divmod(step, per_epoch)
    return epoch_order(num_examples, seed, epoch)[offset * batch_size:(offset + 1) * batch_size]


def stream_batches(name: str, *, batch_size: int, seed: int = 0, split: str = "train", data_dir: str | None = None,
                   download: bool = False, image_size: int | None = None, start_step: int = 0,
                   num_steps: int | None = None, mesh=None, source=None) -> Iterator[tuple]:
    """Yield (images, labels) batches of a real dataset, shuffled deterministically.

    Batch ``step`` holds the examples `batch_indices_at(n, batch_size, seed, step)`:
    each epoch is a fresh permutation from (seed, epoch), so a run resumed at
    ``start_step`` sees exactly the batches an uninterrupted one would. With a `mesh`
    (`pagjax.devices.make_mesh`) every batch is placed with its leading axis split over
    the mesh's devices (``batch_size`` must be divisible by their number); on several
    hosts each process reads only its own rows and the global array is assembled with
    `jax.make_array_from_process_local_data`. Without a mesh, numpy arrays are yielded.
    """
    validation.check_positive_int("batch_size", batch_size)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    if num_steps is not None:
        validation.check_positive_int("num_steps", num_steps)
    _check_image_size(image_size)
    if mesh is not None and batch_size % mesh.size:
        raise ValueError(f"batch_size {batch_size} must be divisible by the {mesh.size} devices of the mesh")
    if source is None:
        if name == "digits":
            d = digits(image_size=image_size, seed=seed)
            x, y = (d.x_train, d.y_train) if split == "train" else (d.x_test, d.y_test)
            source = ArraySource(np.round(x * 255).astype(np.uint8), y)
        else:
            validation.check_choice("dataset", name, dataset_names())
            spec = TFDS_DATASETS[name]
            source = open_source(name, {"train": spec.train_split, "test": spec.test_split}.get(split, split),
                                 data_dir=data_dir, download=download)
    shape = TFDS_DATASETS[name].shape if name in TFDS_DATASETS else (8, 8, 1)
    n = len(source)
    step = start_step
    while num_steps is None or step < start_step + num_steps:
        idx = batch_indices_at(n, batch_size, seed, step)
        if mesh is not None:
            import jax

            pc, pi = jax.process_count(), jax.process_index()
            if pc > 1:  # each host reads its contiguous share of the global batch
                per = batch_size // pc
                local = idx[pi * per:(pi + 1) * per]
                images, labels = _read(source, local)
                xb = _to_float(images, shape, image_size)
                from jax.sharding import NamedSharding, PartitionSpec as P

                sh = NamedSharding(mesh, P(mesh.axis_names[0]))
                yield (jax.make_array_from_process_local_data(sh, xb),
                       jax.make_array_from_process_local_data(sh, labels))
                step += 1
                continue
        images, labels = _read(source, idx)
        xb = _to_float(images, shape, image_size)
        if mesh is not None:
            from pagjax import devices

            xb, labels = devices.shard_leading(mesh, (xb, labels))
        yield xb, labels
        step += 1


# --------------------------------------------------------------------------- augmentation

AUGMENTATIONS = ("none", "crop_flip")


def random_crop_flip(key, x, pad: int = 4):
    """The paper's CIFAR-10 augmentation as a pure function of (key, batch).

    Each image of the NHWC batch `x` is zero-padded by `pad` pixels on every side,
    cropped back to its size at a uniformly random offset, and mirrored left-right with
    probability 1/2 (torchvision's ``RandomCrop(32, padding=4)`` and
    ``RandomHorizontalFlip()``, as in the official training code). Works under `jit`.
    """
    import jax
    import jax.numpy as jnp

    n, h, w, c = x.shape
    k_off, k_flip = jax.random.split(key)
    offsets = jax.random.randint(k_off, (n, 2), 0, 2 * pad + 1)
    flips = jax.random.bernoulli(k_flip, 0.5, (n,))
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def one(img, off, flip):
        crop = jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))
        return jnp.where(flip, crop[:, ::-1, :], crop)

    return jax.vmap(one)(padded, offsets, flips)


def with_augmentation(objective, augment: str = "crop_flip", pad: int = 4):
    """Wrap an objective ``(forward, params, x, y, key, strength)`` so that every training
    batch is augmented first (inside the jitted train step; the step key is split into an
    augmentation key and the objective's own key). ``augment="none"`` returns `objective`
    unchanged, so training without augmentation is bit-for-bit the same as before."""
    validation.check_choice("augment", augment, AUGMENTATIONS)
    if augment == "none":
        return objective
    import jax

    def augmented(forward, params, x, y, key, strength):
        k_aug, k_obj = jax.random.split(key)
        return objective(forward, params, random_crop_flip(k_aug, x, pad), y, k_obj, strength)

    return augmented


# --------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    """``python -m pagjax.data download NAME --data-dir DIR``: prepare a tfds dataset (needs network)."""
    p = argparse.ArgumentParser(description="Prepare real-image datasets for pagjax (array_record, no TensorFlow needed to read).")
    sub = p.add_subparsers(dest="cmd", required=True)
    dl = sub.add_parser("download", help=f"download and prepare a tfds dataset (needs network and `{PREPARE_INSTALL}`)")
    dl.add_argument("name", choices=list(TFDS_DATASETS))
    dl.add_argument("--data-dir", default=None, help="tfds data directory (default: tfds's)")
    chk = sub.add_parser("check", help="say whether a dataset is prepared (no network)")
    chk.add_argument("name", choices=list(dataset_names()))
    chk.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)
    if args.cmd == "download":
        try:  # fails in seconds, with one message, when TensorFlow or the network is missing
            check_available(args.name, data_dir=args.data_dir, download=True)
        except DatasetUnavailableError as e:
            print(e, file=sys.stderr)
            return 1
        _tfds_source(args.name, TFDS_DATASETS[args.name].test_split, args.data_dir, True)
        print(f"{args.name}: prepared in {_builder(args.name, args.data_dir).data_dir}")
        return 0
    try:
        check_available(args.name, data_dir=args.data_dir)
    except DatasetUnavailableError as e:
        print(f"{args.name}: not available: {e}", file=sys.stderr)
        return 1
    print(f"{args.name}: available")
    return 0


if __name__ == "__main__":
    sys.exit(main())
