"""The operator as a pytree: under jit, filter_jit and vmap, traced, not baked in."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_rel_close, dense_curvatures, make_problem
from jax.flatten_util import ravel_pytree

import eqx_ggn


pytestmark = pytest.mark.usefixtures("x64")


@pytest.fixture
def problem():
    model, data = make_problem("labels")
    params, static = eqx_ggn.partition(model)
    model_fn = eqx_ggn.as_model_fn(static)
    op = eqx_ggn.curvature_operator(model_fn, params, data, "cross_entropy")
    vecs = jax.random.normal(jax.random.key(7), (3, ravel_pytree(params)[0].size))
    unravel = ravel_pytree(params)[1]
    return model_fn, params, data, op, [unravel(v) for v in vecs]


def _flat(tree):
    return ravel_pytree(tree)[0]


@pytest.mark.parametrize("transform", ["jit", "filter_jit"])
def test_mv_under_jit(problem, transform):
    _, _, _, op, vecs = problem
    wrap = jax.jit if transform == "jit" else eqx.filter_jit
    jitted = wrap(lambda op, v: op.mv(v))
    for v in vecs:
        assert_rel_close(_flat(jitted(op, v)), _flat(op.mv(v)), tol=1e-13)
    # The operator's fields come back out of jit unchanged.
    again = wrap(lambda op: op)(op)
    assert_rel_close(_flat(again.grad), _flat(op.grad), tol=0)


def test_mv_under_vmap(problem):
    _, _, _, op, vecs = problem
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *vecs)
    batched = jax.vmap(op.mv)(stacked)
    for i, v in enumerate(vecs):
        row = jax.tree.map(lambda x, i=i: x[i], batched)
        assert_rel_close(_flat(row), _flat(op.mv(v)), tol=1e-13)
    # `op` itself is callable, so it stands in for an `mv` function.
    assert_rel_close(_flat(op(vecs[0])), _flat(op.mv(vecs[0])), tol=0)


def test_built_inside_filter_jit_does_not_recompile(problem):
    model_fn, params, data, _, vecs = problem

    @eqx.debug.assert_max_traces(max_traces=1)
    def step(params, data, v):
        op = eqx_ggn.curvature_operator(model_fn, params, data, "cross_entropy")
        return op.loss, op.grad, op.mv(v)

    step = eqx.filter_jit(step)
    for scale in (1.0, 0.5, -2.0):
        new_params = jax.tree.map(lambda x, s=scale: s * x, params)
        new_data = {**data, "input": scale * data["input"]}
        loss, grad, gv = step(new_params, new_data, vecs[0])
        ref = dense_curvatures(model_fn, new_params, new_data, "cross_entropy", 1 / 6)
        assert_rel_close(loss, ref["loss"])
        assert_rel_close(_flat(grad), ref["grad"])
        assert_rel_close(_flat(gv), ref["ggn"] @ _flat(vecs[0]))


def test_arrays_are_traced_not_constants(problem):
    _, _, _, op, vecs = problem
    closed = jax.make_jaxpr(lambda op, v: op.mv(v))(op, vecs[0])
    # Every residual of the linearization is an input of the program...
    n_inputs = len(jax.tree.leaves((op, vecs[0])))
    assert len(closed.jaxpr.invars) == n_inputs
    # ...and nothing bigger than a scalar is baked in as a constant.
    assert all(np.size(c) <= 1 for c in closed.consts)
    # The residuals hold the batch: 6 samples of hidden activations.
    residual_sizes = [x.size for x in jax.tree.leaves(op.jacobian)]
    assert residual_sizes and max(residual_sizes) >= 6 * 5


def test_operator_reports_predictions(problem):
    model_fn, params, data, op, _ = problem
    expected = jax.vmap(lambda x: model_fn(input=x, params=params))(data["input"])
    assert_rel_close(op.predictions, expected, tol=1e-14)
    assert op.curvature == "ggn"
    assert float(op.factor) == pytest.approx(1 / 6)


def test_factor_sets_the_objective(problem):
    model_fn, params, data, op, vecs = problem
    summed = eqx_ggn.curvature_operator(
        model_fn, params, data, "cross_entropy", factor=1.0
    )
    assert_rel_close(summed.loss, 6 * op.loss, tol=1e-14)
    assert_rel_close(_flat(summed.grad), 6 * _flat(op.grad), tol=1e-13)
    assert_rel_close(_flat(summed.mv(vecs[0])), 6 * _flat(op.mv(vecs[0])), tol=1e-13)


def test_vector_dtype_is_cast_to_params(problem):
    _, _, _, op, vecs = problem
    v32 = jax.tree.map(lambda x: x.astype(jnp.float32), vecs[0])
    out = op.mv(v32)
    assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(out))
    assert_rel_close(_flat(out), _flat(op.mv(v32)), tol=0)


def test_float32_operator_keeps_float32():
    model, data = make_problem("regression")
    model = jax.tree.map(
        lambda x: x.astype(jnp.float32) if eqx.is_inexact_array(x) else x, model
    )
    data = jax.tree.map(lambda x: x.astype(jnp.float32), data)
    op = eqx_ggn.curvature_operator(model=model, data=data, loss_fn="mse")
    gv = op.mv(op.grad)
    assert op.loss.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((op.grad, gv)))
