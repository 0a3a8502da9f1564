"""Damaged, missing and unwritable state: a table of scenarios, each with what it must say.

Nothing may be lost and nothing silently wrong: a damaged checkpoint is moved aside and the
previous good one (or a restart) is used, saying so; a bad points file is named and
re-measured; results without a readable settings record stop the run with a message; an
unwritable folder fails at once naming it. ``DAMAGED_CASES`` is the count the tests keep.
"""
import csv
import json
import os
import shutil
import stat
import time
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from pagjax import experiment, io
from pagjax.experiment import SettingsMismatchError, SweepConfig
from pagjax.measure import MeasureConfig

# "Before any work": an error must come before data is built or a model compiled, which
# takes several seconds; the bound is that guard, with room for a loaded machine, not a
# speed target.
BEFORE_ANY_WORK_S = 5.0

TREE = {"w": jnp.arange(64.0), "b": jnp.ones(3)}


def _saved(tmp_path, steps=(1, 2)):
    """A checkpoint folder with `steps` saved (each tree scaled by its step)."""
    folder = str(tmp_path / "ckpt")
    c = io.Checkpointer(folder)
    for s in steps:
        c.save(s, {"w": TREE["w"] * s, "b": TREE["b"]})
    c.close()
    return folder


def _data_files(step_dir):
    """The array files of a step (the ones a flipped bit would silently change)."""
    out = []
    for root, _, files in os.walk(step_dir):
        out += [os.path.join(root, f) for f in files if os.sep + "d" + os.sep in os.path.join(root, f)]
    assert out
    return sorted(out, key=os.path.getsize)


def _flip_byte(folder, step):
    path = _data_files(os.path.join(folder, str(step)))[-1]
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))


def _truncate(folder, step):
    path = _data_files(os.path.join(folder, str(step)))[-1]
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)


def _garbage_with_valid_digest(folder, step):
    """Garbage that passes the digest (as if damaged before it was written): orbax fails."""
    step_dir = os.path.join(folder, str(step))
    for root, _, files in os.walk(step_dir):
        for f in files:
            if f != "commit_success.txt":
                open(os.path.join(root, f), "wb").write(b"garbage")
    with open(os.path.join(folder, io.DIGEST_DIR, f"{step}.sha256"), "w") as f:
        f.write(io.tree_digest(step_dir))


def _no_digest(folder, step):
    """A save killed after orbax finished but before its digest was written."""
    os.remove(os.path.join(folder, io.DIGEST_DIR, f"{step}.sha256"))


def _both_flipped(folder, step):
    _flip_byte(folder, 1)
    _flip_byte(folder, 2)


# (id, damage(folder, latest step), step restored (None: restart), text of the warning)
CHECKPOINT_CASES = [
    ("flipped-byte", _flip_byte, 1, "do not match the digest"),
    ("truncated", _truncate, 1, "do not match the digest"),
    ("garbage-orbax-cannot-read", _garbage_with_valid_digest, 1, "orbax cannot read it"),
    ("interrupted-save-no-digest", _no_digest, 1, "no integrity digest"),
    ("every-checkpoint-damaged", _both_flipped, None, "restarting from step 0"),
]


@pytest.mark.parametrize("case", CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_damaged_checkpoint_is_moved_aside_and_the_previous_good_one_used(case, tmp_path):
    name, damage, expected_step, message = case
    folder = _saved(tmp_path)
    damage(folder, 2)
    c = io.Checkpointer(folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored = c.restore_latest(TREE)
    c.close()
    text = " | ".join(str(w.message) for w in caught)
    assert message in text
    assert os.path.join(folder, "2") in text  # the damaged checkpoint is named by path
    if expected_step is None:
        assert restored is None
    else:
        step, tree = restored
        assert step == expected_step
        np.testing.assert_array_equal(tree["w"], TREE["w"] * expected_step)  # the right numbers, not near ones
    moved = [d for d in os.listdir(folder) if d.startswith("damaged-2-")]
    assert len(moved) == 1 and not os.path.exists(os.path.join(folder, "2"))


def test_good_checkpoints_restore_exactly_without_warnings(tmp_path):
    folder = _saved(tmp_path, steps=(1, 2, 3))
    c = io.Checkpointer(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step, tree = c.restore_latest(TREE)
        assert c.restore_latest(TREE)[0] == 3  # a restore does not disturb the digest
    c.close()
    assert step == 3
    np.testing.assert_array_equal(tree["w"], TREE["w"] * 3)
    assert sorted(os.listdir(os.path.join(folder, io.DIGEST_DIR))) == ["2.sha256", "3.sha256"]  # pruned with orbax


def test_checkpoint_folder_that_becomes_unwritable_fails_at_once_naming_it(tmp_path):
    folder = str(tmp_path / "ckpt")
    c = io.Checkpointer(folder)
    c.save(1, TREE)
    shutil.rmtree(folder)
    open(folder, "w").close()  # the folder is now a file: nothing can be written there
    t = time.perf_counter()
    with pytest.raises(OSError, match=folder):
        c.save(2, TREE)
    assert time.perf_counter() - t < BEFORE_ANY_WORK_S


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_checkpoint_folder_fails_at_once_naming_it(tmp_path):
    folder = str(tmp_path / "ckpt")
    c = io.Checkpointer(folder)
    os.chmod(folder, 0o555)
    try:
        with pytest.raises(OSError, match="not writable"):
            c.save(1, TREE)
    finally:
        os.chmod(folder, 0o755)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_written_files_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        io.write_json(str(tmp_path / "a.json"), {"x": 1})
        io.save_npz(str(tmp_path / "a.npz"), a=np.zeros(2))
    finally:
        os.umask(old)
    for f in ("a.json", "a.npz"):
        assert stat.S_IMODE(os.stat(tmp_path / f).st_mode) == mode


# ---------------------------------------------------------------- sweep folder state

TINY = SweepConfig(methods=("noise",), strengths={"noise": (0.0, 0.5)}, seeds=(0,), n_train=256, n_test=64,
                   model="mlp:width=16", steps=4, batch_size=32, steps_per_call=2, checkpoint_every=2,
                   measure=MeasureConfig(num_eval=16, num_directions=1, lpips=False, grid_images=3))


def _fake_run(out):
    """An output folder as a finished run leaves it, without training anything."""
    experiment.prepare_output(out, TINY, overwrite=False)
    for f in ("results.csv", "figure3.png", "gradients_noise.png"):
        open(os.path.join(out, f), "w").write("old")
    os.makedirs(os.path.join(out, "points"), exist_ok=True)
    open(os.path.join(out, "points", "noise.json"), "w").write("[]")


def _write(rel, text):
    def damage(out):
        open(os.path.join(out, rel), "w").write(text)
    return damage


def _delete_config(out):
    os.remove(os.path.join(out, "config.json"))


def _set_strategy(strategy):
    def damage(out):
        path = os.path.join(out, "config.json")
        record = json.load(open(path))
        record["settings"]["strategy"] = {"noise": strategy}
        open(path, "w").write(json.dumps(record))
    return damage


# (id, damage(out), text of the SettingsMismatchError)
SETTINGS_CASES = [
    ("config-deleted", _delete_config, "no settings record"),
    ("config-garbage", _write("config.json", "{not json"), "config.json is damaged (not valid JSON"),
    ("config-binary", _write("config.json", "PK\x03\x04\x00garbage"), "config.json is damaged"),
    ("config-list", _write("config.json", "[]"), "config.json is damaged (no settings record)"),
    ("config-no-settings", _write("config.json", '{"versions": {}}'), "config.json is damaged (no settings record)"),
    ("strategy-changed", _set_strategy("some-other-strategy"), "differing: strategy"),
]


@pytest.mark.parametrize("case", SETTINGS_CASES, ids=[c[0] for c in SETTINGS_CASES])
def test_results_without_a_readable_matching_settings_record_are_refused(case, tmp_path):
    name, damage, message = case
    out = str(tmp_path)
    _fake_run(out)
    damage(out)
    with pytest.raises(SettingsMismatchError, match="--overwrite") as e:
        experiment.prepare_output(out, TINY, overwrite=False)
    assert message in str(e.value)
    assert open(os.path.join(out, "results.csv")).read() == "old"  # nothing deleted without overwrite
    experiment.prepare_output(out, TINY, overwrite=True)  # overwrite: old results and figures go
    assert sorted(os.listdir(out)) == ["config.json"]
    assert json.load(open(os.path.join(out, "config.json")))["settings"] == TINY.settings()


def _edit_settings(edit):
    def damage(out):
        path = os.path.join(out, "config.json")
        record = json.load(open(path))
        edit(record["settings"])
        open(path, "w").write(json.dumps(record))
    return damage


# (id, edit of the recorded settings, the differing fields the refusal must name)
OTHER_SETTINGS_CASES = [
    ("value-changed", lambda s: s.update(n_train=999), "differing: n_train)"),
    ("field-missing", lambda s: s.pop("steps"), "differing: steps)"),
    ("field-extra", lambda s: s.update(retired_option=None), "differing: retired_option)"),
    ("two-fields", lambda s: s.update(n_train=999, n_test=1), "differing: n_test, n_train)"),
]


@pytest.mark.parametrize("case", OTHER_SETTINGS_CASES, ids=[c[0] for c in OTHER_SETTINGS_CASES])
def test_results_with_other_settings_are_refused_naming_what_differs(case, tmp_path):
    name, edit, message = case
    out = str(tmp_path)
    _fake_run(out)
    _edit_settings(edit)(out)
    with pytest.raises(SettingsMismatchError, match="different settings") as e:
        experiment.prepare_output(out, TINY, overwrite=False)
    assert message in str(e.value)
    assert open(os.path.join(out, "results.csv")).read() == "old"


def test_the_same_settings_resume_however_their_record_spells_the_numbers(tmp_path):
    out = str(tmp_path)
    _fake_run(out)
    # JSON keeps 0.0 as 0.0, but a record written by hand may hold 0: the same setting
    _edit_settings(lambda s: s["strengths"].update(noise=[0, 0.5]))(out)
    experiment.prepare_output(out, TINY, overwrite=False)
    assert open(os.path.join(out, "results.csv")).read() == "old"  # resumed, nothing deleted


def test_the_resolved_strategy_is_a_setting():
    assert TINY.settings()["strategy"] == TINY.resolved_strategies()
    assert "auto" not in TINY.settings()["strategy"].values()
    loop = SweepConfig(**{**TINY.__dict__, "strategy": "loop"})
    assert loop.settings()["strategy"] == {"noise": "loop"} and loop.settings() != TINY.settings()


def test_leftover_temp_files_are_removed(tmp_path):
    out = str(tmp_path)
    experiment.prepare_output(out, TINY, overwrite=False)
    os.makedirs(os.path.join(out, "points"))
    for rel in (".tmp-abc-results.csv", "points/.tmp-xyz-noise.json"):
        open(os.path.join(out, rel), "w").write("partial")
    experiment.prepare_output(out, TINY, overwrite=False)
    assert not [f for _, _, fs in os.walk(out) for f in fs if f.startswith(".tmp-")]


@pytest.mark.parametrize("target, message", [("file", "exists and is not a folder"), ("proc", "is not writable")])
def test_unwritable_output_folder_is_refused_before_any_work(tmp_path, target, message):
    out = str(tmp_path / "afile") if target == "file" else "/proc/pagjax-out"
    if target == "file":
        open(out, "w").write("x")
    with pytest.raises(io.OutputNotWritableError, match=message) as e:
        experiment.prepare_output(out, TINY, overwrite=False)
    assert out in str(e.value)


def _rows(**change):
    rows = [{"method": "noise", "strength": s, "seed": 0, "diverged": False, "accuracy": 0.9, "on_change": 0.1,
             "off_change": 0.2} for s in (0.0, 0.5)]
    for r in rows:
        r.update(change)
    return json.dumps(rows)


class _Data:
    x_test = np.zeros((64, 4, 4, 1), np.float32)


def _points(json_text, grads=np.zeros((2, 3, 4, 4, 1), np.float32), grads_bytes=None):
    def make(folder):
        open(os.path.join(folder, "noise.json"), "w").write(json_text)
        if grads_bytes is not None:
            open(os.path.join(folder, "noise_gradients.npz"), "wb").write(grads_bytes)
        elif grads is not None:
            np.savez(os.path.join(folder, "noise_gradients.npz"), grads=grads)
    return make


# (id, make(points folder), exception, text)
POINTS_CASES = [
    ("points-empty-list", _points("[]"), io.DamagedFileError, "noise.json is damaged (holds 0 rows"),
    ("points-garbage", _points("[{]"), io.DamagedFileError, "noise.json is damaged (not valid JSON"),
    ("points-not-a-list", _points('{"a": 1}'), io.DamagedFileError, "noise.json is damaged (not a list of rows)"),
    ("points-wrong-strengths", _points(_rows(strength=0.3)), io.DamagedFileError, "expected one per (strength, seed)"),
    ("points-other-method", _points(_rows(method="pgd")), io.DamagedFileError, "expected one per (strength, seed)"),
    ("points-no-strength", _points('[{"seed": 0}, {"seed": 0}]'), io.DamagedFileError, "lacks a numeric strength"),
    ("points-null-accuracy", _points(_rows(accuracy=None)), io.DamagedFileError, "has no finite accuracy"),
    ("points-grads-garbage", _points(_rows(), grads_bytes=b"garbage"), io.DamagedFileError, "noise_gradients.npz is damaged"),
    ("points-grads-truncated", _points(_rows(), grads_bytes=b"PK\x03\x04" + b"\x00" * 20), io.DamagedFileError,
     "noise_gradients.npz is damaged"),
    ("points-grads-wrong-shape", _points(_rows(), grads=np.zeros((1, 3, 4, 4, 1))), io.DamagedFileError,
     "noise_gradients.npz is damaged (shape"),
    ("points-grads-missing", _points(_rows(), grads=None), FileNotFoundError, "noise_gradients.npz is missing"),
]


@pytest.mark.parametrize("case", POINTS_CASES, ids=[c[0] for c in POINTS_CASES])
def test_bad_points_files_are_named(case, tmp_path):
    name, make, error, message = case
    make(str(tmp_path))
    t = time.perf_counter()
    with pytest.raises(error) as e:
        experiment.load_points(TINY, "noise", str(tmp_path / "noise.json"), str(tmp_path / "noise_gradients.npz"), _Data)
    assert message in str(e.value)
    assert time.perf_counter() - t < BEFORE_ANY_WORK_S


def test_a_damaged_sweep_folder_is_repaired_with_the_same_numbers(tmp_path):
    """End to end: emptied points are named and re-measured; the damaged final checkpoint
    is moved aside and training resumes from the one before; results.csv is unchanged."""
    out = str(tmp_path)
    # vmap, not auto's sharding over the faked devices: the same repair, fewer compilations
    config = SweepConfig(**{**TINY.__dict__, "strategy": "vmap"})
    experiment.run_sweep(config, out, progress=False, log=lambda s: None)
    original = open(os.path.join(out, "results.csv")).read()
    open(os.path.join(out, "points", "noise.json"), "w").write("[]")
    _flip_byte(os.path.join(out, "checkpoints", "noise"), 4)
    logs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        experiment.run_sweep(config, out, progress=False, log=logs.append)
    assert any("noise.json is damaged" in line and "measuring it again" in line for line in logs)
    assert any("checkpoints/noise/4 is damaged" in str(w.message) for w in caught)
    rows = list(csv.DictReader(open(os.path.join(out, "results.csv"))))
    assert [(r["method"], r["strength"]) for r in rows] == [("noise", "0.0"), ("noise", "0.5")]
    assert open(os.path.join(out, "results.csv")).read() == original  # resumed from step 2: bit-identical


# (id, error raised mid-run, exit status, text of the one-line message)
MIDRUN_CASES = [
    ("disk-full", OSError(28, "No space left on device", "/runs/x/results.csv"), 1,
     "cannot write /runs/x/results.csv: No space left on device"),
    ("checkpoint-folder-unwritable", io.OutputNotWritableError("checkpoint folder /runs/x/checkpoints/noise is not "
                                                               "writable: Operation not permitted"), 1,
     "checkpoint folder /runs/x/checkpoints/noise is not writable"),
    ("checkpoint-write-failed", io.CheckpointWriteError("cannot write a checkpoint to /runs/x/checkpoints/noise"), 1,
     "cannot write a checkpoint to /runs/x/checkpoints/noise"),
]


@pytest.mark.parametrize("case", MIDRUN_CASES, ids=[c[0] for c in MIDRUN_CASES])
def test_write_failures_mid_run_end_with_one_line_naming_the_path(case, monkeypatch, capsys):
    from experiments import sweep_eps

    name, error, status, message = case

    def failing_run(*args, **kwargs):
        raise error

    monkeypatch.setattr(experiment, "run_sweep", failing_run)
    assert sweep_eps.run_and_report(TINY, "/runs/x", overwrite=False, progress=False) == status
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


DAMAGED_CASES = (len(CHECKPOINT_CASES) + len(SETTINGS_CASES) + len(POINTS_CASES) + len(MIDRUN_CASES)
                 + 3 + 2 + 1)  # + umask, + unwritable output folders, + the end-to-end repair


def test_the_table_counts_its_cases():
    """The count is kept: dropping a case fails here (adding one updates the number)."""
    assert DAMAGED_CASES == 31
