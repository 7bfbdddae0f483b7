"""eqx_ggn.cg against jnp.linalg.solve, and its stop reasons."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_rel_close

import eqx_ggn
from eqx_ggn import CGStop


pytestmark = pytest.mark.usefixtures("x64")


def _spd(n, cond, key):
    q, _ = jnp.linalg.qr(jax.random.normal(key, (n, n)))
    eig = jnp.logspace(0, np.log10(cond), n)
    return (q * eig) @ q.T


@pytest.mark.parametrize("cond", [10.0, 1e4, 1e8])
def test_matches_solve_on_spd(cond):
    a = _spd(40, cond, jax.random.key(0))
    b = jax.random.normal(jax.random.key(1), (40,)).at[::3].set(0.0)
    solve = jax.jit(
        lambda b: eqx_ggn.cg(
            lambda v: a @ v, b, tol=1e-13, maxiter=2000, progress_tol=0.0
        )
    )
    result = solve(b)
    exact = jnp.linalg.solve(a, b)
    assert result.stop_reason == CGStop.CONVERGED
    assert result.residual_norm <= 1e-13
    # The recursively updated residual drifts from the true one by about
    # eps * cond (the residual gap of CG in floating point).
    true_residual = jnp.linalg.norm(a @ result.value - b) / jnp.linalg.norm(b)
    assert true_residual <= 1e-12 + 10 * cond * jnp.finfo(jnp.float64).eps
    # The forward error is at most cond times the residual.
    assert_rel_close(result.value, exact, tol=max(1e-10, cond * 1e-12))


def test_pytree_with_mixed_shapes_and_zero_rhs_entries():
    a = _spd(2 * 3 + 4 + 1, 100.0, jax.random.key(2))
    b = {"m": jnp.zeros((2, 3)).at[0, 1].set(1.0), "v": jnp.arange(4.0), "s": 0.0}
    b = jax.tree.map(jnp.asarray, b)
    flat, unravel = jax.flatten_util.ravel_pytree(b)

    def mv(v):
        return unravel(a @ jax.flatten_util.ravel_pytree(v)[0])

    result = eqx_ggn.cg(mv, b, tol=1e-13, maxiter=100, progress_tol=0.0)
    assert result.stop_reason == CGStop.CONVERGED
    got = jax.flatten_util.ravel_pytree(result.value)[0]
    assert_rel_close(got, jnp.linalg.solve(a, flat), tol=1e-10)
    assert jax.tree.structure(result.value) == jax.tree.structure(b)


def test_zero_rhs_is_converged_without_nan():
    a = _spd(5, 10.0, jax.random.key(3))
    result = eqx_ggn.cg(lambda v: a @ v, jnp.zeros(5), x0=jnp.ones(5), maxiter=10)
    assert result.stop_reason == CGStop.CONVERGED
    assert int(result.num_steps) == 0
    assert jnp.array_equal(result.value, jnp.zeros(5))
    assert result.residual_norm == 0


def test_negative_curvature_returns_last_good_iterate():
    d = jnp.array([3.0, 2.0, 1.0, -1.0, -2.0])
    b = jnp.ones(5)
    result = eqx_ggn.cg(lambda v: d * v, b, maxiter=20)
    assert result.stop_reason == CGStop.NEGATIVE_CURVATURE
    # The first step is along b with alpha = b.b / b.A.b = 5 / 3; the second
    # direction has negative curvature, so the first iterate comes back.
    assert_rel_close(result.value, 5 / 3 * b, tol=1e-14)
    # Negative curvature at once: the steepest-descent direction b.
    first = eqx_ggn.cg(lambda v: -v, b, maxiter=20)
    assert first.stop_reason == CGStop.NEGATIVE_CURVATURE
    assert_rel_close(first.value, b, tol=0)


def test_breakdown_is_finite():
    result = eqx_ggn.cg(lambda v: v * jnp.nan, jnp.ones(3), maxiter=5)
    assert result.stop_reason == CGStop.BREAKDOWN
    assert jnp.all(jnp.isfinite(result.value))


def test_max_steps_and_progress_test():
    a = _spd(60, 1e6, jax.random.key(4))
    b = jax.random.normal(jax.random.key(5), (60,))
    capped = eqx_ggn.cg(lambda v: a @ v, b, tol=1e-14, maxiter=7, progress_tol=0.0)
    assert capped.stop_reason == CGStop.MAX_STEPS and int(capped.num_steps) == 7
    stalled = eqx_ggn.cg(lambda v: a @ v, b, tol=1e-14, maxiter=500, progress_tol=0.05)
    assert stalled.stop_reason == CGStop.NO_PROGRESS
    assert 10 < int(stalled.num_steps) < 500


def test_jacobi_preconditioner_helps_a_badly_scaled_system():
    scale = jnp.logspace(0, 4, 30)
    a = _spd(30, 5.0, jax.random.key(6)) * jnp.sqrt(scale)[:, None] * jnp.sqrt(scale)
    b = jax.random.normal(jax.random.key(7), (30,))
    kwargs = {"tol": 1e-10, "maxiter": 500, "progress_tol": 0.0}
    plain = eqx_ggn.cg(lambda v: a @ v, b, **kwargs)
    jacobi = eqx_ggn.cg(
        lambda v: a @ v, b, preconditioner=lambda r: r / jnp.diag(a), **kwargs
    )
    assert jacobi.stop_reason == CGStop.CONVERGED
    assert int(jacobi.num_steps) < int(plain.num_steps)
    assert_rel_close(jacobi.value, jnp.linalg.solve(a, b), tol=1e-7)


def test_bfloat16_accumulates_in_float32():
    a = _spd(8, 10.0, jax.random.key(8)).astype(jnp.float32)
    b = jax.random.normal(jax.random.key(9), (8,)).astype(jnp.bfloat16)
    seen = []

    def mv(v):
        seen.append(v.dtype)
        return (a @ v.astype(jnp.float32)).astype(jnp.bfloat16)

    result = eqx_ggn.cg(mv, b, tol=1e-2, maxiter=50)
    assert result.value.dtype == jnp.bfloat16
    assert seen and all(d == jnp.float32 for d in seen)
    exact = jnp.linalg.solve(a, b.astype(jnp.float32))
    assert jnp.linalg.norm(
        result.value.astype(jnp.float32) - exact
    ) < 0.05 * jnp.linalg.norm(exact)


def test_vmap_over_right_hand_sides():
    a = _spd(6, 10.0, jax.random.key(10))
    bs = jax.random.normal(jax.random.key(11), (4, 6))
    solve = jax.vmap(
        lambda b: eqx_ggn.cg(lambda v: a @ v, b, tol=1e-13, maxiter=50).value
    )
    assert_rel_close(solve(bs), jnp.linalg.solve(a, bs.T).T, tol=1e-10)


def test_bad_maxiter_and_tol():
    with pytest.raises(ValueError, match="maxiter"):
        eqx_ggn.cg(lambda v: v, jnp.ones(2), maxiter=2.5)
    with pytest.raises(ValueError, match=r"tol must lie in \[0, inf\], got -1\.0"):
        eqx_ggn.cg(lambda v: v, jnp.ones(2), tol=-1.0)
