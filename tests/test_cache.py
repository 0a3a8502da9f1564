"""The settings-keyed disk cache (`pagjax.cache`) and the purpose keys (`pagjax.keys`)."""
import json
import os
import subprocess
import sys
import zlib

import jax
import numpy as np
import pytest

from pagjax import cache, keys


class Counter:
    """compute / save / load of an array in an .npy file (or a folder of them), counting calls."""

    def __init__(self, folder=False):
        self.computed = 0
        self.folder = folder

    def compute(self):
        self.computed += 1
        return np.arange(5.0) * self.computed

    def save(self, value, target):
        if self.folder:
            os.makedirs(target)
            np.save(os.path.join(target, "a.npy"), value)
            np.save(os.path.join(target, "b.npy"), -value)
        else:
            with open(target, "wb") as f:
                np.save(f, value)

    def load(self, path):
        return np.load(os.path.join(path, "a.npy") if self.folder else path)

    def run(self, path, settings, logs):
        return cache.cached(path, settings, self.compute, self.save, self.load, what="thing", log=logs.append)


@pytest.fixture(params=["file", "folder"])
def counter(request):
    return Counter(folder=request.param == "folder")


def test_same_settings_load_without_computing(tmp_path, counter):
    path, logs = str(tmp_path / "thing"), []
    first = counter.run(path, {"n": 5, "shape": (2, 3), "lr": np.float32(0.5)}, logs)
    # JSON-normalised: a list equals a tuple, a Python float the numpy one
    second = counter.run(path, {"shape": [2, 3], "n": 5, "lr": 0.5}, logs)
    assert counter.computed == 1 and logs == ["thing: loaded from cache"]
    np.testing.assert_array_equal(first, second)
    record = json.load(open(path + ".json"))
    assert record["settings"] == {"lr": 0.5, "n": 5, "shape": [2, 3]} and len(record["digest"]) == 64
    assert sorted(os.listdir(tmp_path)) == ["thing", "thing.json"]  # no staging folder left


def test_other_settings_recompute_and_replace(tmp_path, counter):
    path, logs = str(tmp_path / "thing"), []
    counter.run(path, {"n": 5}, logs)
    value = counter.run(path, {"n": 6}, logs)
    assert counter.computed == 2 and logs == []
    np.testing.assert_array_equal(value, np.arange(5.0) * 2)
    counter.run(path, {"n": 6}, logs)
    assert counter.computed == 2 and logs == ["thing: loaded from cache"]
    assert sorted(os.listdir(tmp_path)) == ["thing", "thing.json"]


def _flip_byte(path):
    if os.path.isdir(path):
        path = os.path.join(path, "b.npy")
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0x01
    open(path, "wb").write(bytes(data))


def _garbage_record(path):
    open(path + ".json", "w").write("{not json")


def _remove_entry(path):
    if os.path.isdir(path):
        import shutil

        shutil.rmtree(path)
    else:
        os.remove(path)


def _unloadable_with_valid_digest(path):
    """Files bad before the digest was written: only the load notices."""
    target = os.path.join(path, "a.npy") if os.path.isdir(path) else path
    open(target, "wb").write(b"garbage")
    record = json.load(open(path + ".json"))
    record["digest"] = cache.path_digest(path)
    json.dump(record, open(path + ".json", "w"))


DAMAGE = [
    ("flipped-byte", _flip_byte, "do not match the digest"),
    ("record-garbage", _garbage_record, "not valid JSON"),
    ("entry-missing", _remove_entry, "is missing"),
    ("unloadable", _unloadable_with_valid_digest, "cannot be loaded"),
]


@pytest.mark.parametrize("case", DAMAGE, ids=[c[0] for c in DAMAGE])
def test_a_damaged_entry_is_named_and_recomputed(tmp_path, counter, case):
    name, damage, why = case
    path, logs = str(tmp_path / "thing"), []
    counter.run(path, {"n": 5}, logs)
    damage(path)
    value = counter.run(path, {"n": 5}, logs)
    assert counter.computed == 2
    assert len(logs) == 1 and logs[0].startswith(f"thing: the cache at {path} is damaged") and why in logs[0]
    assert logs[0].endswith("computing it again")
    np.testing.assert_array_equal(value, np.arange(5.0) * 2)
    counter.run(path, {"n": 5}, logs)  # repaired: loaded again
    assert counter.computed == 2 and logs[-1] == "thing: loaded from cache"


def test_damage_without_a_log_is_a_warning(tmp_path):
    c, path = Counter(), str(tmp_path / "thing")
    cache.cached(path, {}, c.compute, c.save, c.load)
    _flip_byte(path)
    with pytest.warns(RuntimeWarning, match="is damaged"):
        cache.cached(path, {}, c.compute, c.save, c.load)
    assert c.computed == 2


def test_a_crash_in_save_leaves_the_old_entry_usable(tmp_path, counter):
    path, logs = str(tmp_path / "thing"), []
    counter.run(path, {"n": 5}, logs)

    def half_then_crash(value, target):
        counter.save(value, target)  # a complete new entry written to the staging path...
        raise KeyboardInterrupt("killed during the save")  # ...then killed before the move

    with pytest.raises(KeyboardInterrupt):
        cache.cached(path, {"n": 6}, counter.compute, half_then_crash, counter.load)
    assert sorted(os.listdir(tmp_path)) == ["thing", "thing.json"]  # staging removed
    value = counter.run(path, {"n": 5}, logs)  # the old entry: loaded, not recomputed
    assert logs == ["thing: loaded from cache"] and counter.computed == 2
    np.testing.assert_array_equal(value, np.arange(5.0))


def test_a_killed_save_leaves_no_stale_hit(tmp_path):
    """A staging folder a hard kill left behind is cleared; an entry whose record is gone is
    computed again, never taken for the settings of the record it lost."""
    c, path = Counter(), str(tmp_path / "thing")
    cache.cached(path, {"n": 5}, c.compute, c.save, c.load)
    os.makedirs(tmp_path / ".tmp-thing-leftover")
    os.remove(path + ".json")
    logs = []
    cache.cached(path, {"n": 5}, c.compute, c.save, c.load, log=logs.append)
    assert c.computed == 2 and logs == []
    assert sorted(os.listdir(tmp_path)) == ["thing", "thing.json"]


def test_settings_must_be_json():
    with pytest.raises(ValueError, match="settings"):
        cache.canonical_settings({"f": object()})
    with pytest.raises(ValueError, match="dict"):
        cache.canonical_settings([1])


def test_settings_digest_and_differences_use_the_canonical_form():
    a = {"n": 5, "shape": (2, 3), "lr": np.float32(0.5)}
    b = {"lr": 0.5, "shape": [2, 3], "n": 5}
    assert cache.settings_digest(a) == cache.settings_digest(b) and len(cache.settings_digest(a)) == 64
    assert cache.differing_settings(a, b) == []
    assert cache.settings_digest({**a, "n": 6}) != cache.settings_digest(a)
    # a changed value, a name only one side has (even holding None), each named once, sorted
    assert cache.differing_settings({**a, "gone": None}, {**b, "n": 6, "new": 1}) == ["gone", "n", "new"]


def test_other_settings_miss_names_them_and_a_record_without_a_settings_dict_is_damaged(tmp_path, counter):
    path = str(tmp_path / "thing")
    counter.run(path, {"n": 5, "m": 1}, [])
    assert cache.check_entry(path, {"n": 6, "m": 1}) == ("miss", "other settings (differing: n)")
    record = json.load(open(path + ".json"))
    json.dump({**record, "settings": [5]}, open(path + ".json", "w"))
    state, why = cache.check_entry(path, {"n": 5, "m": 1})
    assert state == "damaged" and "holds no settings and digest" in why


def test_training_checkpointer_is_keyed_by_settings_and_removed_once_finished(tmp_path):
    root, logs = str(tmp_path), []
    tree = {"w": np.arange(3.0)}
    with pytest.raises(KeyboardInterrupt):  # a kill mid-training leaves the checkpoints
        with cache.training_checkpointer(root, "the model", {"steps": 4, "lr": 0.1}, 4, logs.append) as ckpt:
            ckpt.save(2, tree)
            raise KeyboardInterrupt
    folder = cache.training_folder(root, "the model", {"lr": 0.1, "steps": 4})
    assert os.path.basename(folder) == "the_model-" + cache.settings_digest({"steps": 4, "lr": 0.1})
    assert os.listdir(os.path.join(root, "training")) == [os.path.basename(folder)]
    with cache.training_checkpointer(root, "the model", {"steps": 4, "lr": 0.2}, 4, logs.append) as ckpt:
        assert ckpt.directory != folder and ckpt.latest_step() is None  # other settings: afresh
    assert logs == [] and os.listdir(os.path.join(root, "training")) == [os.path.basename(folder)]
    with cache.training_checkpointer(root, "the model", {"lr": 0.1, "steps": 4}, 4, logs.append) as ckpt:
        assert ckpt.directory == folder and ckpt.latest_step() == 2
    assert logs == ["the model: resuming from the checkpoint at step 2 of 4"]
    assert not os.path.exists(folder)  # finished: removed


# --------------------------------------------------------------------------- purpose keys


def _data(key):
    return np.asarray(jax.random.key_data(key)).tolist()


def test_distinct_purposes_give_distinct_keys_and_the_same_purpose_the_same_key():
    names = ("autoencoder", "denoiser", "score model", "noise classifier", "measurement directions")
    got = [_data(keys.purpose_key(0, n)) for n in names]
    assert len({tuple(g) for g in got}) == len(names)
    assert _data(keys.purpose_key(0, "autoencoder")) == _data(keys.purpose_key(0, "autoencoder"))
    assert _data(keys.purpose_key(np.int64(0), "autoencoder")) == _data(keys.purpose_key(jax.random.key(0), "autoencoder"))
    assert _data(keys.purpose_key(1, "autoencoder")) != _data(keys.purpose_key(0, "autoencoder"))
    with pytest.raises(ValueError, match="purpose"):
        keys.purpose_key(0, "")


def test_purpose_keys_are_fold_in_of_the_crc32_and_stable_across_processes():
    # computed independently: zlib.crc32(b"autoencoder") in any process and Python version
    assert keys.purpose_id("autoencoder") == 4055997864 == zlib.crc32(b"autoencoder")
    expected = _data(jax.random.fold_in(jax.random.key(7), 4055997864))
    assert _data(keys.purpose_key(7, "autoencoder")) == expected
    code = ("import jax, numpy as np; from pagjax import keys; "
            "print(np.asarray(jax.random.key_data(keys.purpose_key(7, 'autoencoder'))).tolist())")
    env = {**os.environ, "PYTHONHASHSEED": "123", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == expected


def test_a_damaged_score_cache_file_is_a_miss(tmp_path):
    from pagjax import scores

    scores.ScoreCache(directory=str(tmp_path)).put("k", np.ones(3))
    open(tmp_path / "k.npz", "wb").write(b"garbage")
    with pytest.warns(RuntimeWarning, match="k.npz is damaged"):
        assert scores.ScoreCache(directory=str(tmp_path)).get("k") is None


def _scaled(params, x, y, s):
    return params["w"] * x / s


def test_unnamed_score_sources_are_told_apart_by_their_parameters():
    # Two unnamed sources sharing one function but not their parameters (two trained
    # networks, say) must not share cached maps; equal parameters may.
    from pagjax import scores

    x = np.linspace(0.0, 1.0, 2 * 4 * 4).reshape(2, 4, 4, 1).astype(np.float32)
    cache = scores.ScoreCache()
    one = scores.ScoreSource(fn=_scaled, params={"w": np.float32(1.0)})
    two = scores.ScoreSource(fn=_scaled, params={"w": np.float32(2.0)})
    np.testing.assert_allclose(scores.compute_scores(one, x, noise_level=0.5, cache=cache), 2 * x, rtol=1e-6)
    np.testing.assert_allclose(scores.compute_scores(two, x, noise_level=0.5, cache=cache), 4 * x, rtol=1e-6)
    again = scores.ScoreSource(fn=_scaled, params={"w": np.float32(2.0)})
    np.testing.assert_allclose(scores.compute_scores(again, x, noise_level=0.5, cache=cache), 4 * x, rtol=1e-6)
    assert (cache.misses, cache.hits) == (2, 1)
    # an unnamed source stays in memory: nothing of it is written to a cache's folder
    assert cache.key(one, x, None, 0.5)[1] is False
