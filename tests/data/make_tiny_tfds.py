"""Make tests/data/tfds: tiny MNIST, Fashion-MNIST and CIFAR-10 (20 train + 10 test images
each) in tfds's real on-disk layout.

The files are written by tensorflow-datasets' own ``mnist``, ``fashion_mnist`` and ``cifar10``
builders, exactly as ``tfds build NAME --file_format array_record`` writes them
(``NAME/VERSION/`` with ``dataset_info.json``, ``features.json`` and one array_record shard per
split), so the tests read them through the same code that reads users' prepared data. The
builders normally download the datasets' raw files; here their download manager is handed raw
files written from `tiny_dataset` instead, in the same formats, so no network is needed:

* mnist, fashion_mnist: four IDX files (magic, big-endian dimensions, uint8 bytes); the
  builders read a fixed number of examples from them, set to ours while they run;
* cifar10: the ``cifar-10-batches-bin/`` folder of the binary release: five train batch files
  and one test batch file of records (one label byte, then 3072 pixel bytes, channel-major),
  and ``batches.meta.txt`` with the class names.

Preparing needs TensorFlow (``pip install "pagjax[prepare]"``). From the repository root, after
removing the old folder of each dataset made (tfds leaves prepared data as they are):

    python tests/data/make_tiny_tfds.py tests/data/tfds [NAME ...]   # default: all three

The committed files were made with tensorflow-datasets 4.9.10 and tensorflow-cpu 2.21.0.
`tiny_dataset` only needs numpy: the tests import it to know what the files must hold.
"""
from __future__ import annotations

import os
import shutil
import struct
import sys
import tempfile

import numpy as np

N_TRAIN, N_TEST = 20, 10
NAMES = ("mnist", "fashion_mnist", "cifar10")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _image(name: str, i: int) -> np.ndarray:
    """Image number i of `name` (uint8, 28x28 or 32x32x3): ramps whose slope grows with i, so
    every image differs and compresses to a few hundred bytes as PNG; pixel (0, 0) is 0 and
    the last one 255, so every image covers the full 0..255 range. Each dataset has its own
    ramp, so reading one dataset's files for another's fails the tests."""
    if name == "cifar10":
        rows, cols, chans = np.mgrid[:32, :32, :3]
        # channel c slopes by (i + 1) down the rows and (c + 1) across: colours differ
        img = (rows * (i + 1) + cols * (chans + 1)) % 256
        img[-1, -1] = 255
        return img.astype(np.uint8)
    rows, cols = np.mgrid[:28, :28]
    if name == "mnist":  # the diagonal ramp the first committed files were made with
        img = ((rows + cols) * (i + 1)) % 256
    else:  # fashion_mnist: rows only, one slope per image
        img = (rows * (i + 1)) % 256
    img[-1, -1] = 255
    return img.astype(np.uint8)


def tiny_dataset(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test) of `name`: uint8 images (N, 28, 28) or (N, 32, 32, 3)
    and uint8 labels. Train labels are i % 10 (each class twice), test labels (3 i) % 10 (each
    class once)."""
    if name not in NAMES:
        raise ValueError(f"name must be one of {NAMES}, got {name!r}")
    x_train = np.stack([_image(name, i) for i in range(N_TRAIN)])
    x_test = np.stack([_image(name, N_TRAIN + i) for i in range(N_TEST)])
    y_train = (np.arange(N_TRAIN) % 10).astype(np.uint8)
    y_test = ((3 * np.arange(N_TEST)) % 10).astype(np.uint8)
    return x_train, y_train, x_test, y_test


def tiny_mnist():
    """`tiny_dataset("mnist")`."""
    return tiny_dataset("mnist")


def write_idx(path: str, array: np.ndarray) -> str:
    """Write a uint8 array in MNIST's IDX format: magic 0x0000 08 ndim, big-endian dims, bytes."""
    array = np.ascontiguousarray(array, np.uint8)
    with open(path, "wb") as f:
        f.write(struct.pack(">I", 0x0800 | array.ndim))
        f.write(struct.pack(">" + "I" * array.ndim, *array.shape))
        f.write(array.tobytes())
    return path


def write_cifar_batch(path: str, images: np.ndarray, labels: np.ndarray) -> str:
    """Write CIFAR-10's binary batch format: per image one label byte, then the 32x32 red,
    green and blue planes (channel-major, 3072 bytes)."""
    with open(path, "wb") as f:
        for img, label in zip(images, labels):
            f.write(bytes([int(label)]))
            f.write(np.ascontiguousarray(np.asarray(img, np.uint8).transpose(2, 0, 1)).tobytes())
    return path


def _raw_idx(raw: str, name: str) -> dict:
    """The IDX files, by the keys tfds's mnist builders ask their download manager for."""
    x_train, y_train, x_test, y_test = tiny_dataset(name)
    return {
        "train_data": write_idx(os.path.join(raw, "train-images"), x_train),
        "train_labels": write_idx(os.path.join(raw, "train-labels"), y_train),
        "test_data": write_idx(os.path.join(raw, "test-images"), x_test),
        "test_labels": write_idx(os.path.join(raw, "test-labels"), y_test),
    }


def _raw_cifar10(raw: str) -> str:
    """The extracted binary release: the folder tfds's cifar10 builder gets from its download."""
    x_train, y_train, x_test, y_test = tiny_dataset("cifar10")
    folder = os.path.join(raw, "cifar-10-batches-bin")
    os.makedirs(folder)
    for b, part in enumerate(np.array_split(np.arange(N_TRAIN), 5)):  # five train batches, as released
        write_cifar_batch(os.path.join(folder, f"data_batch_{b + 1}.bin"), x_train[part], y_train[part])
    write_cifar_batch(os.path.join(folder, "test_batch.bin"), x_test, y_test)
    with open(os.path.join(folder, "batches.meta.txt"), "w") as f:
        f.write("\n".join(CIFAR10_CLASSES) + "\n")
    return raw


def make(name: str, data_dir: str) -> None:
    """Prepare tiny `name` under `data_dir` with tfds's own builder (needs TensorFlow)."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download import download_manager
    from tensorflow_datasets.image_classification import mnist as mnist_module

    raw = tempfile.mkdtemp(prefix=f"tiny_{name}_raw_")
    if name == "cifar10":
        folder = _raw_cifar10(raw)
        fake = lambda self, url: folder  # noqa: E731  (one URL: the release archive)
    else:
        files = _raw_idx(raw, name)
        fake = lambda self, urls: {k: files[k] for k in urls}  # noqa: E731
    cls = download_manager.DownloadManager
    saved = cls.download_and_extract, cls.download, mnist_module._TRAIN_EXAMPLES, mnist_module._TEST_EXAMPLES
    cls.download_and_extract = cls.download = fake
    # The mnist builders read this many examples from each IDX file (the full sizes).
    mnist_module._TRAIN_EXAMPLES, mnist_module._TEST_EXAMPLES = N_TRAIN, N_TEST
    try:
        builder = tfds.builder(name, data_dir=os.path.abspath(data_dir), file_format="array_record")
        builder.download_and_prepare()
    finally:
        (cls.download_and_extract, cls.download, mnist_module._TRAIN_EXAMPLES,
         mnist_module._TEST_EXAMPLES) = saved
        shutil.rmtree(raw, ignore_errors=True)
    # tfds leaves empty downloads/ folders behind: nothing the readers need.
    downloads = os.path.join(data_dir, "downloads")
    if not any(files for _, _, files in os.walk(downloads)):
        shutil.rmtree(downloads, ignore_errors=True)
    print("prepared", builder.data_dir, {k: v.num_examples for k, v in builder.info.splits.items()})


def main(argv: list[str]) -> None:
    if not argv or any(n not in NAMES for n in argv[1:]):
        sys.exit(f"usage: python tests/data/make_tiny_tfds.py DATA_DIR [{' '.join(NAMES)}]")
    for name in argv[1:] or NAMES:
        make(name, argv[0])


if __name__ == "__main__":
    main(sys.argv[1:])
