"""Property-based tests: the GGN is symmetric PSD; CG solves SPD systems in n steps."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import to_f64
from hypothesis import HealthCheck, given, settings, strategies as st
from jax.flatten_util import ravel_pytree

import eqx_ggn


pytestmark = pytest.mark.usefixtures("x64")
SETTINGS = settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@eqx.filter_jit
def _two_products(width, depth, batch, outputs, loss_fn, seed):
    """A random MLP, batch, `u` and `v`, and `G u`, `G v`: one compiled program per
    example (built inside it, so no eager op compiles per shape)."""
    keys = jax.random.split(jax.random.key(seed), 5)
    if loss_fn == "cross_entropy":
        outputs = max(outputs, 2)  # logits need at least two classes
        target = jax.random.randint(keys[2], (batch,), 0, outputs)
    else:
        target = jax.random.uniform(keys[2], (batch, outputs))
    mlp = to_f64(eqx.nn.MLP(3, outputs, width, depth, activation=jnp.tanh, key=keys[0]))
    data = {"input": 2 * jax.random.normal(keys[1], (batch, 3)), "target": target}
    op = eqx_ggn.curvature_operator(model=mlp, data=data, loss_fn=loss_fn)
    flat, unravel = ravel_pytree(op.grad)
    u = jax.random.normal(keys[3], flat.shape)
    v = jax.random.normal(keys[4], flat.shape)
    gu, gv = ravel_pytree(op.mv(unravel(u)))[0], ravel_pytree(op.mv(unravel(v)))[0]
    return u, v, gu, gv


@SETTINGS
@given(
    width=st.integers(1, 6),
    depth=st.integers(0, 2),
    batch=st.integers(1, 5),
    outputs=st.integers(1, 3),
    loss_fn=st.sampled_from(["mse", "cross_entropy", "binary_cross_entropy"]),
    seed=st.integers(0, 2**16),
)
def test_ggn_is_symmetric_positive_semidefinite(
    width, depth, batch, outputs, loss_fn, seed
):
    u, v, gu, gv = map(
        np.asarray, _two_products(width, depth, batch, outputs, loss_fn, seed)
    )
    scale = np.linalg.norm(gu) * np.linalg.norm(v) + 1e-300
    assert abs(float(v @ gu - u @ gv)) <= 1e-12 * scale
    for w, gw in ((u, gu), (v, gv)):
        assert float(w @ gw) >= -1e-12 * (np.linalg.norm(gw) * np.linalg.norm(w))


@jax.jit
def _cg(a, b, maxiter):
    return eqx_ggn.cg(lambda v: a @ v, b, tol=1e-10, maxiter=maxiter, progress_tol=0.0)


@SETTINGS
@given(
    n=st.integers(1, 30),
    # In float64, CG ends in n steps while the spectrum is narrow enough that the
    # Krylov basis stays orthogonal; at condition 1e3 and n = 30 finite-precision CG
    # (this one and the textbook loop alike) needs about 50 steps.
    log_cond=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_cg_solves_spd_systems_within_n_steps(n, log_cond, seed):
    # The system in NumPy: one compiled program per n (CG's), no eager op compiles.
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = (q * np.logspace(0, log_cond, n)) @ q.T
    b = rng.standard_normal(n)
    result = _cg(a, b, n)
    assert int(result.stop_reason) == int(eqx_ggn.CGStop.CONVERGED), result
    assert int(result.num_steps) <= n
    residual = np.linalg.norm(a @ np.asarray(result.value) - b) / np.linalg.norm(b)
    assert residual <= 1e-9
