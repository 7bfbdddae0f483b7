"""Exact solvers against dense float64 references; step control; solver choice."""

import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_rel_close, linear_problem, log_cosh_loss, make_problem
from jax.flatten_util import ravel_pytree

import eqx_ggn
from eqx_ggn._step_control import grid_line_search


pytestmark = pytest.mark.usefixtures("x64")


@eqx.filter_jit
def _solves(model, data, loss_fn, curvature, num_microbatches, lam):
    """Dense reference and both exact solvers, for the gradient and for a vector
    off the Jacobian's row space."""
    op = eqx_ggn.curvature_operator(
        model=model,
        data=data,
        loss_fn=loss_fn,
        curvature=curvature,
        num_microbatches=num_microbatches,
    )
    flat, unravel = ravel_pytree(op.grad)
    other = flat + 0.1 * jnp.sin(jnp.arange(flat.size))
    matrix = op.as_matrix() + lam * jnp.eye(flat.size)
    out = {}
    for name, rhs in (("grad", flat), ("other", other)):
        out[name, "reference"] = jnp.linalg.solve(matrix, rhs)
        for solver in ("dense", "sample_space"):
            out[name, solver] = ravel_pytree(
                op.solve(unravel(rhs), lam, solver=solver)
            )[0]
    return out


@pytest.mark.parametrize(
    ("kind", "loss_fn"),
    [
        ("regression", "mse"),
        ("labels", "cross_entropy"),
        ("tokens_onehot", "cross_entropy"),
        ("probabilities", "binary_cross_entropy"),
        ("regression", log_cosh_loss),
    ],
)
def test_exact_solvers_equal_the_dense_damped_solve(kind, loss_fn):
    # batch 4: N*O < P (the kernel is smaller); batch 24 in 3 micro-batches: N*O > P.
    curvatures = ["ggn", "empirical_fisher"] if loss_fn == "mse" else ["ggn"]
    for (batch, microbatches), curvature in itertools.product(
        [(4, 1), (24, 3)], curvatures
    ):
        model, data = make_problem(kind, batch=batch)
        out = _solves(model, data, loss_fn, curvature, microbatches, 1e-3)
        for (rhs, solver), value in out.items():
            if solver != "reference":
                assert_rel_close(value, out[rhs, "reference"], tol=1e-10)


def test_zero_damping_on_a_rank_deficient_kernel_is_minimum_norm():
    # A linear model on 3 samples x 2 outputs < P = 18: C is singular. With λ = 0
    # both solvers give the minimum-norm solution pinv(C) g, never NaN. A
    # duplicated sample makes the sample-space kernel itself singular too.
    model_fn, params, data = linear_problem(n=3, d=8, k=2)
    twice = jax.tree.map(lambda x: jnp.concatenate([x, x[:1]]), data)

    @jax.jit
    def steps(batch):
        op = eqx_ggn.curvature_operator(model_fn, params, batch, "mse")
        pinv = jnp.linalg.pinv(op.as_matrix(), hermitian=True)
        solves = [op.solve(op.grad, 0.0, solver=s) for s in ("dense", "sample_space")]
        return pinv @ ravel_pytree(op.grad)[0], [ravel_pytree(d)[0] for d in solves]

    for batch in (data, twice):
        expected, solves = steps(batch)
        for step in solves:
            assert jnp.all(jnp.isfinite(step))
            assert_rel_close(step, expected, tol=1e-10)


@pytest.mark.parametrize("solver", ["dense", "sample_space"])
def test_one_exact_step_solves_linear_least_squares(solver):
    model_fn, params, batch = linear_problem()
    opt = eqx_ggn.gauss_newton(
        1.0, loss_fn="mse", solver=solver, damping=0.0, adaptive_damping=False
    )

    @jax.jit  # one program, not one per operation
    def step(params):
        _, grads = eqx_ggn.value_and_grad(model_fn, params, batch, "mse")
        return opt.update(
            grads, opt.init(params), params, model_fn=model_fn, batch=batch
        )

    updates, state = step(params)
    new = optax.apply_updates(params, updates)
    design = jnp.concatenate([batch["input"], jnp.ones((40, 1))], axis=1)
    exact = jnp.linalg.lstsq(design, batch["target"])[0]
    assert_rel_close(new["w"], exact[:-1], tol=1e-10)
    assert_rel_close(new["b"], exact[-1], tol=1e-10)
    assert int(state[0].solver) == {"dense": 1, "sample_space": 2}[solver]
    assert float(state[0].cg_residual) < 1e-12


@pytest.mark.parametrize("solver", ["dense", "sample_space"])
def test_logistic_regression_converges_quadratically(solver):
    kx, kw = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (60, 4))
    logits = x @ jax.random.normal(kw, (4,))
    y = (jax.random.uniform(jax.random.key(2), (60,)) < jax.nn.sigmoid(logits)) * 1.0
    batch = {"input": x, "target": y[:, None]}

    def model_fn(input, params):  # noqa: A002
        return input @ params["w"] + params["b"]

    params = {"w": jnp.zeros((4, 1)), "b": jnp.zeros(1)}
    opt = eqx_ggn.gauss_newton(
        1.0,
        loss_fn="binary_cross_entropy",
        solver=solver,
        damping=0.0,
        adaptive_damping=False,
        line_search=None,  # the plain Newton step
    )
    state, norms = opt.init(params), []
    step = jax.jit(lambda p, s, g: opt.update(g, s, p, model_fn=model_fn, batch=batch))
    for _ in range(10):
        _, grads = eqx_ggn.value_and_grad(
            model_fn, params, batch, "binary_cross_entropy"
        )
        norms.append(
            float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads))))
        )
        if norms[-1] < 1e-12:
            break
        updates, state = step(params, state, grads)
        params = optax.apply_updates(params, updates)
    assert norms[-1] < 1e-12, norms
    close = [(a, b) for a, b in itertools.pairwise(norms) if 1e-8 < a < 1e-2]
    assert close and all(b <= 10 * a**2 for a, b in close), norms


def test_grid_line_search_backs_off_when_the_full_step_rises():
    # L(θ - α d) = (α - 0.3)^2: the full step raises the loss above L(θ) = 0.09.
    step_size, value = grid_line_search(lambda a: (a - 0.3) ** 2)
    assert float(step_size) == 0.25 and float(value) == pytest.approx(0.0025)
    # Non-finite trial losses never win.
    step_size, _ = grid_line_search(lambda a: jnp.where(a > 0.6, jnp.nan, -a))
    assert float(step_size) == 0.5


def _overshooting_problem():
    # One parameter, residual t^2 - 1 from t = 0.1: the undamped GN step lands at
    # t = 5.05, where the loss is far larger than at the start.
    def model_fn(input, params):  # noqa: A002
        del input
        return params["t"] ** 2

    batch = {"input": jnp.zeros((1, 1)), "target": jnp.ones((1, 1))}
    return model_fn, {"t": jnp.full((1,), 0.1)}, batch


@pytest.mark.parametrize("rule", ["line_search", "levenberg_marquardt"])
def test_step_control_when_the_full_step_raises_the_loss(rule):
    model_fn, params, batch = _overshooting_problem()
    kwargs = {"line_search": "grid", "adaptive_damping": False}
    if rule == "levenberg_marquardt":  # the rule alone, without the grid
        kwargs = {"adaptive_damping": True, "line_search": None}
    opt = eqx_ggn.gauss_newton(
        1.0, loss_fn="mse", solver="dense", damping=0.0, **kwargs
    )

    @jax.jit  # one program, not one per operation
    def losses_and_step(params):
        loss, grads = eqx_ggn.value_and_grad(model_fn, params, batch, "mse")
        matrix = eqx_ggn.curvature_operator(model_fn, params, batch, "mse").as_matrix()
        full = {"t": params["t"] - jnp.linalg.solve(matrix, grads["t"])}
        updates, state = opt.update(
            grads, opt.init(params), params, model_fn=model_fn, batch=batch
        )
        new = optax.apply_updates(params, updates)
        value = lambda p: eqx_ggn.value_and_grad(model_fn, p, batch, "mse")[0]
        return loss, value(full), value(new), state[0]

    loss, full_loss, new_loss, inner = losses_and_step(params)
    assert full_loss > loss
    if rule == "line_search":  # a shorter step along the same direction
        assert bool(inner.accepted) and float(inner.step_size) < 1
        assert new_loss < loss
    else:  # rejected: no update, more damping
        assert not bool(inner.accepted)
        assert float(new_loss) == float(loss)
        assert float(inner.damping) > 0


def test_frozen_part_and_low_precision_params():
    # model= with a frozen first layer; bf16 params: solve in float32, update in
    # the param dtype, equal to the float32 dense solve to bf16 rounding.
    model, data = make_problem("labels", batch=8)
    spec = jax.tree.map(lambda _: False, model)
    spec = eqx.tree_at(
        lambda m: (m.layers[-1].weight, m.layers[-1].bias), spec, (True, True)
    )
    params, static = eqx_ggn.partition(model, spec)
    model_fn = eqx_ggn.as_model_fn(static)

    @jax.jit
    def reference(params):
        op = eqx_ggn.curvature_operator(model_fn, params, data, "cross_entropy")
        flat = ravel_pytree(op.grad)[0]
        step = jnp.linalg.solve(op.as_matrix() + 0.1 * jnp.eye(flat.size), flat)
        return op, step

    op, expected = reference(params)
    for solver in ("dense", "sample_space"):
        opt = eqx_ggn.scale_by_gauss_newton(
            "cross_entropy", solver=solver, damping=0.1, adaptive_damping=False
        )
        updates, _ = eqx.filter_jit(opt.update)(
            op.grad, opt.init(params), params, model=model, batch=data
        )
        assert_rel_close(ravel_pytree(updates)[0], expected, tol=1e-10)

    low = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    data32 = jax.tree.map(
        lambda x: x.astype(jnp.float32) if eqx.is_inexact_array(x) else x, data
    )
    grads = jax.tree.map(lambda g: g.astype(jnp.bfloat16), op.grad)
    for solver in ("dense", "sample_space"):
        opt = eqx_ggn.scale_by_gauss_newton(
            "cross_entropy", solver=solver, damping=0.1, adaptive_damping=False
        )
        updates, _ = eqx.filter_jit(opt.update)(
            grads, opt.init(low), low, model_fn=model_fn, batch=data32
        )
        assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
        got = np.asarray(ravel_pytree(updates)[0], np.float64)
        assert np.linalg.norm(got - expected) <= 0.05 * np.linalg.norm(expected)


def test_auto_picks_the_cheaper_exact_solver_that_fits():
    model_fn, params, batch = linear_problem()  # N*O = 120 rows, P = 18
    small = jax.tree.map(lambda x: x[:3], batch)  # N*O = 9 < P = 18

    @eqx.filter_jit  # one program per call, not one per operation
    def chosen(batch, **kwargs):
        _, grads = eqx_ggn.value_and_grad(model_fn, params, batch, "mse")
        opt = eqx_ggn.scale_by_gauss_newton(
            "mse", solver="auto", adaptive_damping=False, **kwargs
        )
        _, state = opt.update(
            grads, opt.init(params), params, model_fn=model_fn, batch=batch
        )
        return state.solver

    assert int(chosen(batch)) == 1  # P << N*O: dense
    assert int(chosen(batch, max_matrix_bytes=100)) == 0  # nothing fits: CG
    assert int(chosen(small)) == 2  # sample space


def test_solver_errors():
    with pytest.raises(ValueError, match=r"Unknown solver 'qr'"):
        eqx_ggn.scale_by_gauss_newton("mse", solver="qr")
    with pytest.raises(ValueError, match=r"no form for curvature='hessian'.*'dense'"):
        eqx_ggn.scale_by_gauss_newton("mse", solver="sample_space", curvature="hessian")
    with pytest.raises(ValueError, match=r"Unknown line_search 'wolfe'"):
        eqx_ggn.scale_by_gauss_newton("mse", line_search="wolfe")
    model_fn, params, batch = linear_problem()
    op = eqx_ggn.curvature_operator(
        model_fn, params, batch, "mse", vmap_over_data=False
    )
    with pytest.raises(ValueError, match="vmap_over_data=True"):
        op.solve(op.grad, 1.0, solver="dense")
    # An operator of another objective than the optimizer's.
    (_, grads), op = eqx_ggn.value_and_grad(
        model_fn, params, batch, "mse", curvature="hessian", return_operator=True
    )
    opt = eqx_ggn.scale_by_gauss_newton("mse")
    with pytest.raises(ValueError, match=r"curvature='hessian'.*curvature='ggn'"):
        opt.update(
            grads, opt.init(params), params, model_fn=model_fn, batch=batch, operator=op
        )


@pytest.mark.parametrize("solver", ["dense", "sample_space"])
def test_non_finite_batch_is_rejected_by_exact_solvers(solver):
    model_fn, params, batch = linear_problem(n=6)
    bad = {**batch, "target": batch["target"].at[2, 1].set(jnp.nan)}
    opt = eqx_ggn.gauss_newton(1.0, loss_fn="mse", solver=solver, warn=False)
    _, grads = eqx_ggn.value_and_grad(model_fn, params, bad, "mse")
    updates, state = jax.jit(
        lambda g, s: opt.update(g, s, params, model_fn=model_fn, batch=bad)
    )(grads, opt.init(params))
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
    assert not bool(state[0].accepted)


def test_relative_damping_and_cg_through_the_operator():
    # relative_damping solves with λ * L(θ); op.solve(solver="cg") and "auto" give
    # the same damped solve as the dense reference.
    model, data = make_problem("regression", batch=5)
    params, static = eqx_ggn.partition(model)
    model_fn = eqx_ggn.as_model_fn(static)

    @jax.jit
    def run(params):
        op = eqx_ggn.curvature_operator(model_fn, params, data, "mse")
        flat = ravel_pytree(op.grad)[0]
        matrix = op.as_matrix()

        def reference(lam):
            return jnp.linalg.solve(matrix + lam * jnp.eye(flat.size), flat)

        opt = eqx_ggn.scale_by_gauss_newton(
            "mse",
            solver="dense",
            damping=0.5,
            relative_damping=True,
            adaptive_damping=False,
        )
        step, _ = opt.update(
            op.grad, opt.init(params), params, model_fn=model_fn, batch=data
        )
        by_operator = [
            ravel_pytree(op.solve(op.grad, 0.1, solver=s, cg_maxiter=200))[0]
            for s in ("cg", "auto")
        ]
        return (
            ravel_pytree(step)[0],
            reference(0.5 * op.loss),
            by_operator,
            reference(0.1),
        )

    step, expected, by_operator, expected_fixed = run(params)
    assert_rel_close(step, expected, tol=1e-10)
    for solved in by_operator:
        assert_rel_close(solved, expected_fixed, tol=1e-8)
