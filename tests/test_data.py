"""Real-image datasets: offline digits, tfds loaders (a real prepared tfds dataset shipped
under tests/data, and mock data; no network), fast failure without prepared data, the checks
before downloading, deterministic streaming and sharding, augmentation."""
import http.server
import importlib.util
import pathlib
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from pagjax import data, devices


def test_digits_are_nhwc_unit_range_and_deterministic():
    a, b = data.digits(seed=3), data.digits(seed=3)
    assert a.x_train.shape == (1500, 8, 8, 1) and a.x_test.shape == (297, 8, 8, 1)
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int32
    assert 0.0 == a.x_train.min() and a.x_train.max() == 1.0
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert set(np.unique(a.y_train)) == set(range(10))
    up = data.digits(seed=3, image_size=16)
    assert up.x_train.shape == (1500, 16, 16, 1) and 0 <= up.x_train.min() and up.x_train.max() <= 1
    # upsampling keeps the image: downsampling it again is close to the original
    back = data.resize_images(up.x_test, 8)
    assert np.corrcoef(back.ravel(), a.x_test.ravel())[0, 1] > 0.9
    assert not np.array_equal(data.digits(seed=4).y_test, a.y_test)


def test_missing_tfds_data_fails_fast_with_instructions(tmp_path):
    for name in ("mnist", "cifar10", "imagenet64"):
        t = time.perf_counter()
        with pytest.raises(data.DatasetUnavailableError, match=r"python -m pagjax.data download") as err:
            data.load_splits(name, data_dir=str(tmp_path), n_train=10, n_test=10)
        assert time.perf_counter() - t < 5.0
        assert isinstance(err.value, ValueError) and str(tmp_path) in str(err.value)
    with pytest.raises(data.DatasetUnavailableError, match="does not exist"):
        data.check_available("mnist", data_dir=str(tmp_path / "nope"))
    data.check_available("digits", data_dir=str(tmp_path / "nope"))  # always available


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="dataset"):
        data.load_dataset("svhn")
    with pytest.raises(ValueError, match="image_size"):
        data.digits(image_size=0)
    with pytest.raises(ValueError, match="max_examples"):
        data.load_dataset("digits", max_examples=-1)
    with pytest.raises(ValueError, match="max_examples"):  # too large for memory without a subset
        data.load_dataset("imagenet64", data_dir="/nonexistent")


def test_tfds_loader_with_mock_data(monkeypatch):
    # mock_data fakes tfds.data_source; prepared-data check is bypassed (mock data are never "prepared").
    monkeypatch.setattr(data, "check_available", lambda *a, **k: None)
    with tfds.testing.mock_data(num_examples=12):
        d = data.load_splits("mnist", n_train=8, n_test=5, seed=1)
        assert d.x_train.shape == (8, 28, 28, 1) and d.x_test.shape == (5, 28, 28, 1)
        assert d.x_train.dtype == np.float32 and 0 <= d.x_train.min() and d.x_train.max() <= 1
        assert d.num_classes == 10 and d.y_train.dtype == np.int32 and d.y_train.max() < 10
        again = data.load_splits("mnist", n_train=8, n_test=5, seed=1)
        np.testing.assert_array_equal(d.x_train, again.x_train)
        x, y = data.load_dataset("cifar10", split="test", max_examples=4, image_size=16)
        assert x.shape == (4, 16, 16, 3) and y.shape == (4,)
        x, _ = data.load_dataset("imagenet64", split="test", max_examples=3)
        assert x.shape == (3, 64, 64, 3)


# --------------------------------------------------------------------------- a real tfds dataset on disk

TESTS_DATA = pathlib.Path(__file__).parent / "data"
# written by tfds's own mnist, fashion_mnist and cifar10 builders (make_tiny_tfds.py)
TINY_TFDS_DIR = str(TESTS_DATA / "tfds")


def _tiny_written(name):
    """What make_tiny_tfds.py wrote for `name`: {image bytes: label} per split (tfds shuffles the order)."""
    spec = importlib.util.spec_from_file_location("make_tiny_tfds", TESTS_DATA / "make_tiny_tfds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    x_train, y_train, x_test, y_test = module.tiny_dataset(name)
    as_dict = lambda x, y: {im.tobytes(): int(label) for im, label in zip(x, y)}  # noqa: E731
    return as_dict(x_train, y_train), as_dict(x_test, y_test)


def _as_written(x, y):
    """Read float images back to the uint8 bytes they were written from, with their labels
    (grey images were written without their channel axis)."""
    u8 = np.round(x * 255).astype(np.uint8)
    if u8.shape[-1] == 1:
        u8 = u8[..., 0]
    return {im.tobytes(): int(label) for im, label in zip(u8, y)}


def test_real_prepared_tfds_mnist_reads_exactly_what_was_written(monkeypatch):
    train, test = _tiny_written("mnist")
    data.check_available("mnist", data_dir=TINY_TFDS_DIR)
    d = data.load_splits("mnist", data_dir=TINY_TFDS_DIR)
    assert d.x_train.shape == (20, 28, 28, 1) and d.x_test.shape == (10, 28, 28, 1)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int32 and d.num_classes == 10
    assert d.x_train.min() == 0.0 and d.x_train.max() == 1.0 and d.x_test.max() == 1.0
    # every image read back, pixel for pixel, with the label written with it
    assert _as_written(d.x_train, d.y_train) == train
    assert _as_written(d.x_test, d.y_test) == test
    # subsets and resizing go through the same reader
    x, y = data.load_dataset("mnist", split="test", data_dir=TINY_TFDS_DIR, max_examples=4, image_size=14, seed=2)
    assert x.shape == (4, 14, 14, 1) and y.shape == (4,) and 0 <= x.min() and x.max() <= 1
    # one streamed epoch holds each training image once, labels attached
    batches = list(data.stream_batches("mnist", batch_size=5, seed=3, data_dir=TINY_TFDS_DIR, num_steps=4))
    xs, ys = np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
    assert xs.shape == (20, 28, 28, 1) and _as_written(xs, ys) == train
    # prepared data need neither TensorFlow nor network, even with download=True
    monkeypatch.setattr(data, "check_can_download", lambda *a, **k: pytest.fail("checked for a download"))
    assert data.load_splits("mnist", data_dir=TINY_TFDS_DIR, n_train=3, n_test=2, download=True).x_train.shape[0] == 3
    assert data.main(["check", "mnist", "--data-dir", TINY_TFDS_DIR]) == 0
    with pytest.raises(data.DatasetUnavailableError, match="not prepared"):  # only the three small ones are there
        data.check_available("imagenet64", data_dir=TINY_TFDS_DIR)


@pytest.mark.parametrize("name, shape", [("fashion_mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_real_prepared_tfds_fashion_mnist_and_cifar10_read_exactly_what_was_written(name, shape, monkeypatch, capsys):
    train, test = _tiny_written(name)
    assert data.main(["check", name, "--data-dir", TINY_TFDS_DIR]) == 0
    d = data.load_splits(name, data_dir=TINY_TFDS_DIR)
    assert d.x_train.shape == (20, *shape) and d.x_test.shape == (10, *shape)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int32 and d.num_classes == 10
    assert d.x_train.min() == 0.0 and d.x_train.max() == 1.0
    # every image read back, pixel for pixel (CIFAR-10's channel-major records as HWC), with its label
    assert _as_written(d.x_train, d.y_train) == train
    assert _as_written(d.x_test, d.y_test) == test
    assert not set(train) & set(_tiny_written("mnist")[0])  # each dataset its own images
    batches = list(data.stream_batches(name, batch_size=4, seed=1, data_dir=TINY_TFDS_DIR, num_steps=5))
    xs, ys = np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
    assert xs.shape == (20, *shape) and _as_written(xs, ys) == train
    # with a progress bar the images are read chunk by chunk: the same arrays
    monkeypatch.setattr(data, "READ_CHUNK", 3)
    x, y = data.load_dataset(name, split="test", data_dir=TINY_TFDS_DIR, max_examples=8, seed=4, progress=True)
    x0, y0 = data.load_dataset(name, split="test", data_dir=TINY_TFDS_DIR, max_examples=8, seed=4)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(y, y0)
    err = capsys.readouterr().err
    assert f"loading {name} test: 100%" in err and "8/8" in err


# --------------------------------------------------------------------------- checks before downloading


@pytest.fixture
def no_download(monkeypatch):
    """Record every reachability check (answered: unreachable) and fail if a download starts."""
    asked = []
    monkeypatch.setattr(data, "reach_error", lambda url, timeout: asked.append(url) or "ConnectionError")
    monkeypatch.setattr(data, "_tfds_source", lambda *a, **k: pytest.fail("a download started"))
    return asked


def test_download_without_tensorflow_names_the_extra_before_any_network(tmp_path, no_download, monkeypatch, capsys):
    monkeypatch.setattr(data, "PREPARE_MODULES", ("pagjax_no_such_module",))  # looked up for real
    msg = r'pagjax_no_such_module.*pip install "pagjax\[prepare\]"'
    with pytest.raises(data.DatasetUnavailableError, match=msg):
        data.load_splits("mnist", data_dir=str(tmp_path), n_train=2, n_test=2, download=True)
    with pytest.raises(data.DatasetUnavailableError, match=msg):
        data.check_available("cifar10", data_dir=str(tmp_path / "new"), download=True)
    assert data.main(["download", "mnist", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert 'pip install "pagjax[prepare]"' in err and len(err.strip().splitlines()) == 1
    assert no_download == []  # the network was not even asked


def test_download_with_unreachable_server_fails_with_one_message(tmp_path, no_download, monkeypatch, capsys):
    monkeypatch.setattr(data, "missing_prepare_modules", lambda: [])  # as if TensorFlow were installed
    for name in data.TFDS_DATASETS:
        with pytest.raises(data.DatasetUnavailableError, match=r"is not reachable .*`python -m pagjax.data download"):
            data.check_available(name, data_dir=str(tmp_path), download=True)
    assert no_download == [spec.download_url for spec in data.TFDS_DATASETS.values()]
    assert data.main(["download", "mnist", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "https://storage.googleapis.com/cvdf-datasets/mnist/ is not reachable (ConnectionError" in err
    assert len(err.strip().splitlines()) == 1


def test_unresponsive_server_is_given_up_after_the_timeout(tmp_path, monkeypatch, capsys):
    # A request (or name lookup) that never returns: only the timeout ends the wait.
    import requests

    release = threading.Event()

    def hang(*args, **kwargs):
        release.wait(60)
        raise requests.ConnectionError("released")

    monkeypatch.setattr(requests, "head", hang)
    monkeypatch.setattr(data, "missing_prepare_modules", lambda: [])
    monkeypatch.setattr(data, "_tfds_source", lambda *a, **k: pytest.fail("a download started"))
    try:
        t = time.perf_counter()
        assert data.main(["download", "mnist", "--data-dir", str(tmp_path)]) == 1  # default timeout
        assert time.perf_counter() - t < 5.0
        assert f"no answer within {data.REACH_TIMEOUT_S:g} s" in capsys.readouterr().err
    finally:
        release.set()


def test_reach_error_asks_the_server_through_the_configured_proxy(monkeypatch):
    for var in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)

    class Quiet(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802 (http.server's naming)
            self.send_response(404)  # any HTTP answer means the server is there
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        assert data.reach_error(f"http://127.0.0.1:{port}/cvdf-datasets/mnist/", 2.0) is None
    finally:
        server.shutdown()
        server.server_close()
    t = time.perf_counter()
    assert data.reach_error(f"http://127.0.0.1:{port}/", 2.0) is not None  # closed now: refused at once
    # with a proxy set, the request goes to it (as tfds's would): here a closed local port
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{port}")
    assert "Proxy" in data.reach_error("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz", 2.0)
    assert time.perf_counter() - t < 2.0
    monkeypatch.setattr(data, "PREPARE_MODULES", ("numpy", "pagjax_no_such_module"))
    assert data.missing_prepare_modules() == ["pagjax_no_such_module"]


def test_sweep_download_fails_fast_without_tensorflow(tmp_path, no_download, monkeypatch, capsys):
    from experiments import sweep_eps

    monkeypatch.setattr(data, "PREPARE_MODULES", ("pagjax_no_such_module",))
    t = time.perf_counter()
    rc = sweep_eps.main(["--dataset", "mnist", "--download", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    assert rc == 2 and time.perf_counter() - t < 5
    assert 'pip install "pagjax[prepare]"' in capsys.readouterr().err and no_download == []


def _fake_source(n=20):
    imgs = (np.arange(n)[:, None, None, None] * np.ones((1, 8, 8, 1))).astype(np.uint8)
    return data.ArraySource(imgs, np.arange(n, dtype=np.int32))


def test_streaming_is_deterministic_resumable_and_covers_each_epoch():
    src = _fake_source(20)
    kw = dict(batch_size=5, seed=7, source=src)
    full = list(data.stream_batches("digits", num_steps=8, **kw))
    resumed = list(data.stream_batches("digits", start_step=3, num_steps=5, **kw))
    for (xa, ya), (xb, yb) in zip(full[3:], resumed):
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa, xb)
    epoch0 = np.concatenate([y for _, y in full[:4]])
    assert sorted(epoch0.tolist()) == list(range(20))  # one epoch = each example once
    epoch1 = np.concatenate([y for _, y in full[4:8]])
    assert not np.array_equal(epoch0, epoch1)  # reshuffled each epoch
    # labels stay attached to their images (image value = index)
    xb, yb = full[0]
    np.testing.assert_allclose(xb[:, 0, 0, 0] * 255, yb, atol=1e-3)
    other = list(data.stream_batches("digits", batch_size=5, seed=8, source=src, num_steps=1))
    assert not np.array_equal(other[0][1], full[0][1])


def test_streaming_shards_batches_over_devices():
    mesh = devices.make_mesh("batch", jax.devices())
    n_dev = mesh.size
    src = _fake_source(32)
    (xb, yb), = list(data.stream_batches("digits", batch_size=4 * n_dev, seed=0, source=src, num_steps=1, mesh=mesh))
    assert isinstance(xb, jax.Array) and len(xb.sharding.device_set) == n_dev
    assert xb.addressable_shards[0].data.shape[0] == 4
    ref = next(data.stream_batches("digits", batch_size=4 * n_dev, seed=0, source=src, num_steps=1))
    np.testing.assert_array_equal(np.asarray(yb), ref[1])
    if n_dev > 1:
        with pytest.raises(ValueError, match="divisible"):
            next(data.stream_batches("digits", batch_size=4 * n_dev + 1, source=src, mesh=mesh))


def test_crop_flip_augmentation_is_a_pure_function_of_key_and_batch():
    x = jax.random.uniform(jax.random.key(0), (6, 8, 8, 3))
    a = jax.jit(data.random_crop_flip)(jax.random.key(1), x)
    b = data.random_crop_flip(jax.random.key(1), x)
    np.testing.assert_allclose(a, b)
    assert a.shape == x.shape and not np.allclose(a, x)
    # pad 0 leaves only flips: each image equals itself or its mirror
    f = data.random_crop_flip(jax.random.key(2), x, pad=0)
    for i in range(6):
        assert np.allclose(f[i], x[i]) or np.allclose(f[i], x[i, :, ::-1])
    # "none" leaves an objective untouched
    obj = lambda *args: args  # noqa: E731
    assert data.with_augmentation(obj, "none") is obj
    with pytest.raises(ValueError, match="augment"):
        data.with_augmentation(obj, "rotate")
