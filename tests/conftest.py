import os


# The tests compile hundreds of small XLA programs; on 2 CPU cores compiling, not
# running, dominates. Less backend optimisation and XLA:CPU's older fusion
# emitters compile an optimizer step 3 to 7x faster (benchmarks/compile.py); they
# change float32 rounding only, so tests that count CG iterations run in float64.
# Subprocesses (the sharded check, the README run) inherit these flags.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
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
