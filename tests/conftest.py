import os


# The tests compile hundreds of small XLA programs; on 2 CPU cores compiling, not
# running, dominates. Less backend optimisation changes no result the tests check.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
).strip()

import jax
import pytest


@pytest.fixture
def x64():
    """Run one test with 64-bit floats, restoring the previous setting afterwards."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)
