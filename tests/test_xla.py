"""One-shot compile options change the compiler's effort, not the numbers; the persistent
compile cache serves the next process."""
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np

from pagjax import engine, xla
from pagjax.xla import ONE_SHOT_OPTIONS, jit_one_shot


def _orthonormal_normals(key, d, k):
    g = jax.random.normal(key, (d, k))
    q, _ = jnp.linalg.qr(g)
    return q, jnp.sort(jax.random.uniform(key, (d,)))


def test_one_shot_programs_compute_what_the_default_ones_do():
    one_shot = jit_one_shot(_orthonormal_normals, static_argnums=(1, 2))
    default = jax.jit(_orthonormal_normals, static_argnums=(1, 2))
    q, s = one_shot(jax.random.key(3), 64, 5)
    chex.assert_trees_all_close((q, s), default(jax.random.key(3), 64, 5), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(q.T @ q, np.eye(5), atol=1e-5)  # and it is right, not just equal
    assert bool(jnp.all(jnp.diff(s) >= 0))


def test_options_reach_the_compiler():
    f = jit_one_shot(lambda x: jnp.sin(x) * 2.0)
    # an option XLA does not know is refused at compile time: the options are passed on
    bad = jax.jit(lambda x: x + 1.0, compiler_options={"xla_no_such_option_for_pagjax": True})
    try:
        bad(jnp.ones(3))
        refused = False
    except Exception:  # noqa: BLE001 - XLA's error type differs between versions
        refused = True
    assert refused and set(ONE_SHOT_OPTIONS) <= {"xla_backend_optimization_level", "xla_llvm_disable_expensive_passes"}
    np.testing.assert_allclose(f(jnp.ones(3)), 2.0 * np.sin(1.0), rtol=1e-6)


def test_epoch_orders_compile_once_per_example_count():
    before = engine._stacked_epoch_permutations._cache_size()
    keys = jax.random.split(jax.random.key(0), 3)
    for epoch in range(3):  # another epoch and other keys reuse the program
        perms = engine._stacked_epoch_permutations(keys, epoch, 40)
        assert all(sorted(np.asarray(p).tolist()) == list(range(40)) for p in perms)
    engine._stacked_epoch_permutations(jax.random.split(jax.random.key(1), 3), 0, 40)
    assert engine._stacked_epoch_permutations._cache_size() == before + 1


_CACHED_RUN = """
import sys, jax, jax.numpy as jnp
from jax import monitoring
from pagjax import xla
hits = []
monitoring.register_event_listener(lambda event, **kw: hits.append(event) if event.endswith("cache_hits") else None)
assert xla.use_compile_cache(sys.argv[2]) is None and jax.config.jax_compilation_cache_dir is None  # cannot be made
assert xla.use_compile_cache(sys.argv[1], min_compile_seconds=0.0) == sys.argv[1]
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(axis=0) * 3.0)
print(float(f(jnp.arange(12.0).reshape(3, 4) / 10).sum()), len(hits))
"""


def test_compile_cache_keeps_programs_for_the_next_process(tmp_path):
    import subprocess
    import sys

    folder = str(tmp_path / "xla")
    (tmp_path / "a_file").write_text("")
    cannot = str(tmp_path / "a_file" / "xla")  # under a file: no folder can be made there
    env = {k: v for k, v in os.environ.items() if k != "PAGJAX_COMPILE_CACHE"}
    runs = [subprocess.run([sys.executable, "-c", _CACHED_RUN, folder, cannot], capture_output=True, text=True, env=env,
                           check=True).stdout.split() for _ in range(2)]
    assert os.listdir(folder)  # the first process wrote its program
    (value1, hits1), (value2, hits2) = runs
    assert value1 == value2 and int(hits1) == 0 and int(hits2) >= 1  # the second loaded it: same numbers


def test_compile_cache_folder_and_the_callers_own_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("PAGJAX_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert xla.default_compile_cache_dir() == str(tmp_path / "xdg" / "pagjax" / "xla")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert xla.default_compile_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "pagjax", "xla")
    monkeypatch.setenv("PAGJAX_COMPILE_CACHE", str(tmp_path / "mine"))
    assert xla.default_compile_cache_dir() == str(tmp_path / "mine")
    # a cache the caller configured is kept, and nothing is created
    # (tests/conftest.py clears the setting after the test)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "theirs"))
    assert xla.use_compile_cache(str(tmp_path / "other")) == str(tmp_path / "theirs")
    assert not (tmp_path / "other").exists()
