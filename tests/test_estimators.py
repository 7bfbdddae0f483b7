"""Estimators against a dense float64 GGN and numpy.linalg.eigh."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_rel_close, make_problem, operator_matrix, to_f64
from jax.flatten_util import ravel_pytree

import eqx_ggn


pytestmark = pytest.mark.usefixtures("x64")


@pytest.fixture(scope="module")
def problem():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    mlp = to_f64(eqx.nn.MLP(4, 3, 12, 2, activation=jnp.tanh, key=jax.random.key(0)))
    x = jax.random.normal(jax.random.key(1), (32, 4))
    data = {"input": x, "target": jax.random.randint(jax.random.key(2), (32,), 0, 3)}
    params, static = eqx_ggn.partition(mlp)
    model_fn = eqx_ggn.as_model_fn(static)
    op = eqx_ggn.curvature_operator(model_fn, params, data, "cross_entropy")
    dense = np.asarray(operator_matrix(op))
    jax.config.update("jax_enable_x64", previous)
    return model_fn, params, data, op, dense


def test_top_eigenvalues(problem):
    _, params, _, op, dense = problem
    assert dense.shape[0] > 200  # a few hundred parameters
    exact = np.linalg.eigh(dense)[0][::-1]
    vals, vecs = jax.jit(
        lambda op: eqx_ggn.top_eigenvalues(
            op, params, 3, key=jax.random.key(3), num_iters=80
        )
    )(op)
    assert_rel_close(vals, exact[:3], tol=1e-6)
    for i in range(3):
        v = jax.tree.map(lambda x, i=i: x[i], vecs)
        flat = ravel_pytree(v)[0]
        residual = np.linalg.norm(dense @ flat - vals[i] * flat)
        assert abs(np.linalg.norm(flat) - 1) < 1e-10
        assert residual < 1e-6 * exact[0]


def test_hutchinson_trace_within_three_standard_errors(problem):
    _, params, _, op, dense = problem
    est, err = eqx_ggn.hutchinson_trace(
        op, params, key=jax.random.key(4), num_samples=2000, batch_size=500
    )
    exact = np.trace(dense)
    assert 0 < float(err) < 0.1 * exact
    assert abs(float(est) - exact) <= 3 * float(err)


def test_hutchinson_diagonal_is_unbiased(problem):
    _, params, _, op, dense = problem
    n = 2000
    est = ravel_pytree(
        eqx_ggn.hutchinson_diagonal(op, params, key=jax.random.key(5), num_samples=n)
    )[0]
    # E||est - diag||^2 = sum_{i != j} C_ij^2 / n for Rademacher probes.
    off = dense - np.diag(np.diag(dense))
    expected_err = np.sqrt(np.sum(off**2) / n)
    assert np.linalg.norm(est - np.diag(dense)) <= 2 * expected_err


@pytest.mark.parametrize(
    ("kind", "loss_fn"),
    [
        ("regression", "mse"),
        ("labels", "cross_entropy"),
        ("tokens_labels", "cross_entropy"),
    ],
)
def test_exact_diagonal(kind, loss_fn):
    model, data = make_problem(kind)
    params, static = eqx_ggn.partition(model)
    model_fn = eqx_ggn.as_model_fn(static)
    dense = eqx.filter_jit(
        lambda p: eqx_ggn.curvature_operator(model_fn, p, data, loss_fn).as_matrix()
    )(params)
    exact_diagonal = eqx.filter_jit(eqx_ggn.exact_diagonal)
    diag = exact_diagonal(model_fn, params, data, loss_fn)
    assert jax.tree.structure(diag) == jax.tree.structure(params)
    assert_rel_close(ravel_pytree(diag)[0], jnp.diag(dense), tol=1e-10)
    doubled = exact_diagonal(model_fn, params, data, loss_fn, factor=2.0)
    assert_rel_close(
        ravel_pytree(doubled)[0], 2.0 * data["input"].shape[0] * jnp.diag(dense), 1e-10
    )


def test_spectral_density(problem):
    _, params, _, op, dense = problem
    size = dense.shape[0]
    grid, density = eqx_ggn.spectral_density(
        op, params, key=jax.random.key(6), num_iters=40, num_samples=100
    )
    assert grid.shape == density.shape == (512,)
    assert jnp.all(density >= 0)
    assert float(jnp.trapezoid(density, grid)) == pytest.approx(1.0, abs=1e-6)
    mean = float(jnp.trapezoid(grid * density, grid))
    # The density's mean is the average of z^T C z / P over the same probes: compare
    # with trace / P within three standard errors of that average.
    _, err = eqx_ggn.hutchinson_trace(
        op, params, key=jax.random.key(7), num_samples=100
    )
    assert abs(mean - np.trace(dense) / size) <= 3 * float(err) / size


def test_bad_sizes(problem):
    _, params, _, op, _ = problem
    with pytest.raises(ValueError, match="k must be"):
        eqx_ggn.top_eigenvalues(op, params, 0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="num_samples"):
        eqx_ggn.hutchinson_trace(op, params, key=jax.random.key(0), num_samples=0)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        eqx_ggn.hutchinson_diagonal(op, params, key=key, batch_size=0)
    with pytest.raises(ValueError, match="num_points must be a positive int, got 0"):
        eqx_ggn.spectral_density(op, params, key=key, num_points=0)
    with pytest.raises(ValueError, match="sigma must be positive"):
        eqx_ggn.spectral_density(op, params, key=key, sigma=-1.0)
