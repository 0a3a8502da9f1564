"""Test configuration: fake several CPU devices before JAX initialises its backend, and
compile cheaply.

Multi-device code (sharded steps, sharded sweeps) is therefore exercised on every
run, on any laptop or CI machine.

Most of the suite's time is XLA compiling small programs. LLVM's expensive passes are
switched off and XLA:CPU's older fusion emitters are used (LLVM IR directly instead of
through MLIR: 40% less compile time on the tests' MLP, CNN and ResNet steps, measured with
jaxlib 0.10.2). The tests' models are tiny, so run time barely changes while compile time
drops; the few tests that train for long ask for full optimisation (the `optimized` marker,
`tests.helpers.optimized_compilation`). Numbers stay float32 IEEE arithmetic; only the
compiler's effort changes.

The test processes keep no persistent compilation cache: one shared by the xdist workers
served 1173 of 7148 compilations in a whole run but saved 2.6 s of compiling, while reading,
keying and writing the entries cost about 6 ms a compilation (about 45 s of test time;
docs/testing.md). The command lines' own cache (`pagjax.xla.use_compile_cache`) is pointed
at this run's temporary folder, never the user's ~/.cache.
"""
import os
import shutil
import tempfile

# Must happen before the first JAX operation anywhere in the test session.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402
import jaxlib  # noqa: E402
import pytest  # noqa: E402

# XLA reads XLA_FLAGS when the backend starts (the first JAX operation) and aborts on a flag
# it does not know, so the flag is added only for the jaxlib it was measured with.
_FAST_COMPILE_FLAG = "--xla_cpu_use_fusion_emitters=false"
if jaxlib.__version__.startswith("0.10.") and "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE_FLAG}".strip()

NUM_FAKE_DEVICES = 4
jax.config.update("jax_num_cpu_devices", NUM_FAKE_DEVICES)

# One folder per run for the command lines' compile cache (subprocesses and in-process
# `main` calls): the controller makes it; xdist workers inherit its environment.
if "PAGJAX_TEST_COMPILE_CACHE" not in os.environ:
    os.environ["PAGJAX_TEST_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="pagjax-test-compile-cache-")
COMPILE_CACHE_DIR = os.environ["PAGJAX_TEST_COMPILE_CACHE"]
os.environ["PAGJAX_COMPILE_CACHE"] = COMPILE_CACHE_DIR
# and none in the test processes, even after an in-process `main` has configured one
jax.config.update("jax_enable_compilation_cache", False)
jax.config.update("jax_disable_most_optimizations", True)
# Start the backend now, so that nothing a test runs (the command lines split the CPU into
# devices before their first JAX operation) changes the device count under the other tests.
assert jax.device_count() == NUM_FAKE_DEVICES


@pytest.fixture(autouse=True)
def _no_leftover_compile_cache():
    """An in-process command line configures its compile cache folder; the next test starts
    without one, as every test process does."""
    yield
    if jax.config.jax_compilation_cache_dir is not None:
        jax.config.update("jax_compilation_cache_dir", None)


@pytest.fixture(autouse=True)
def _compilation_effort(request):
    """Tests marked `optimized` spend their time running programs, not compiling them: they
    compile with XLA's full optimisation (`tests.helpers.optimized_compilation`)."""
    if request.node.get_closest_marker("optimized") is None:
        yield
        return
    from tests.helpers import optimized_compilation

    with optimized_compilation():
        yield


def pytest_sessionfinish(session, exitstatus):
    if not hasattr(session.config, "workerinput"):  # the controller (or a plain run) made it
        shutil.rmtree(COMPILE_CACHE_DIR, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    # The slow tests first: xdist (`--dist loadfile`, pyproject.toml) hands out files in the
    # order their first test appears, so the files with slow tests start first and the
    # workers finish together instead of one of them starting a minute-long file at the end.
    # The sort is stable: the rest keep their order.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
