"""Test configuration: fake several CPU devices before JAX initialises its backend.

Multi-device code (sharded steps, sharded sweeps) is therefore exercised on every
run, on any laptop or CI machine.
"""
import os

# Must happen before the first JAX operation anywhere in the test session.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402

NUM_FAKE_DEVICES = 4
jax.config.update("jax_num_cpu_devices", NUM_FAKE_DEVICES)
