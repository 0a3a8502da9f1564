"""Make tests/data/tfds: a tiny MNIST (20 train + 10 test images) in tfds's real on-disk layout.

The files are written by tensorflow-datasets' own ``mnist`` builder, exactly as
``tfds build mnist --file_format array_record`` writes them (``mnist/3.0.1/`` with
``dataset_info.json``, ``features.json`` and one array_record shard per split), so the tests
read them through the same code that reads users' prepared data. The builder normally
downloads MNIST's four IDX files and reads 60000 + 10000 examples from them; here its
download manager is handed IDX files written from `tiny_mnist` instead and its example counts
are set to theirs, so no network is needed.

Preparing needs TensorFlow (``pip install "pagjax[prepare]"``). From the repository root, after
removing the old tests/data/tfds (tfds leaves prepared data as they are):

    python tests/data/make_tiny_mnist.py tests/data/tfds

The committed files were made with tensorflow-datasets 4.9.10 and tensorflow-cpu 2.21.0.
`tiny_mnist` only needs numpy: the tests import it to know what the files must hold.
"""
from __future__ import annotations

import os
import shutil
import struct
import sys
import tempfile

import numpy as np

N_TRAIN, N_TEST = 20, 10


def _image(i: int) -> np.ndarray:
    """Image number i (28x28 uint8): a diagonal ramp whose slope is i + 1, so every image
    differs (pixel (0, 1) is i + 1) and compresses to a few hundred bytes as PNG; the bright
    corner pixel puts 255 in every image, so the full 0..255 range is covered."""
    rows, cols = np.mgrid[:28, :28]
    img = ((rows + cols) * (i + 1)) % 256
    img[-1, -1] = 255
    return img.astype(np.uint8)


def tiny_mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): uint8 images (N, 28, 28) and uint8 labels.

    Train labels are i % 10 (each class twice); test labels (3 i) % 10 (each class once).
    """
    x_train = np.stack([_image(i) for i in range(N_TRAIN)])
    x_test = np.stack([_image(N_TRAIN + i) for i in range(N_TEST)])
    y_train = (np.arange(N_TRAIN) % 10).astype(np.uint8)
    y_test = ((3 * np.arange(N_TEST)) % 10).astype(np.uint8)
    return x_train, y_train, x_test, y_test


def write_idx(path: str, array: np.ndarray) -> str:
    """Write a uint8 array in MNIST's IDX format: magic 0x0000 08 ndim, big-endian dims, bytes."""
    array = np.ascontiguousarray(array, np.uint8)
    with open(path, "wb") as f:
        f.write(struct.pack(">I", 0x0800 | array.ndim))
        f.write(struct.pack(">" + "I" * array.ndim, *array.shape))
        f.write(array.tobytes())
    return path


def main(data_dir: str) -> None:
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download import download_manager
    from tensorflow_datasets.image_classification import mnist as mnist_builder

    x_train, y_train, x_test, y_test = tiny_mnist()
    raw = tempfile.mkdtemp(prefix="tiny_mnist_idx_")
    # The keys tfds's mnist builder asks its download manager for.
    files = {
        "train_data": write_idx(os.path.join(raw, "train-images"), x_train),
        "train_labels": write_idx(os.path.join(raw, "train-labels"), y_train),
        "test_data": write_idx(os.path.join(raw, "test-images"), x_test),
        "test_labels": write_idx(os.path.join(raw, "test-labels"), y_test),
    }
    cls = download_manager.DownloadManager
    saved = cls.download_and_extract, cls.download, mnist_builder._TRAIN_EXAMPLES, mnist_builder._TEST_EXAMPLES
    cls.download_and_extract = cls.download = lambda self, urls: {k: files[k] for k in urls}
    # The builder reads this many examples from each IDX file (MNIST's full sizes).
    mnist_builder._TRAIN_EXAMPLES, mnist_builder._TEST_EXAMPLES = len(x_train), len(x_test)
    try:
        builder = tfds.builder("mnist", data_dir=os.path.abspath(data_dir), file_format="array_record")
        builder.download_and_prepare()
    finally:
        (cls.download_and_extract, cls.download, mnist_builder._TRAIN_EXAMPLES,
         mnist_builder._TEST_EXAMPLES) = saved
        shutil.rmtree(raw, ignore_errors=True)
    # tfds leaves empty downloads/ folders behind: nothing the readers need.
    downloads = os.path.join(data_dir, "downloads")
    if not any(files for _, _, files in os.walk(downloads)):
        shutil.rmtree(downloads, ignore_errors=True)
    print("prepared", builder.data_dir, {k: v.num_examples for k, v in builder.info.splits.items()})


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/data/make_tiny_mnist.py DATA_DIR")
    main(sys.argv[1])
