"""Reverse mode only (`jac="bwd"`): models with a `jax.custom_vjp`, against dense
reverse-mode float64 references; `"bwd"` against `"fwd"` on plain models; the
automatic choice; the errors; and a diffrax neural ODE with its default adjoint."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from helpers import ConvNet, assert_rel_close, dense_curvatures, make_problem, to_f64
from jax.flatten_util import ravel_pytree

import eqx_ggn


@jax.custom_vjp
def custom_tanh(x):
    return jnp.tanh(x)


def _tanh_fwd(x):
    y = jnp.tanh(x)
    return y, y


def _tanh_bwd(y, g):
    return (g * (1 - y**2),)


custom_tanh.defvjp(_tanh_fwd, _tanh_bwd)


@jax.custom_vjp
def looped_tanh(x):
    return jnp.tanh(x)


def _looped_bwd(y, g):  # a while loop: its backward rule has no reverse mode
    def body(carry):
        i, total = carry
        return i + 1, total + g * (1 - y**2)

    return (jax.lax.while_loop(lambda c: c[0] < 1, body, (0, jnp.zeros_like(g)))[1],)


looped_tanh.defvjp(_tanh_fwd, _looped_bwd)


def with_activation(model, activation):
    return eqx.tree_at(lambda m: m.activation, model, activation)


def flat(tree):
    return ravel_pytree(tree)[0]


@eqx.filter_jit
def reverse_mode_results(model, data, loss_fn, damping):
    """Everything a custom-VJP model supports, as dense float64 arrays, and the
    mode each operator picked."""
    ops = {
        c: eqx_ggn.curvature_operator(
            model=model, data=data, loss_fn=loss_fn, curvature=c
        )
        for c in ("ggn", "fisher", "empirical_fisher", "hessian")
    }
    # Reverse-over-reverse; jac=None takes forward-over-reverse for the Hessian,
    # as the gradient's backward rule has a JVP.
    ops["hessian_bwd"] = eqx_ggn.curvature_operator(
        model=model, data=data, loss_fn=loss_fn, curvature="hessian", jac="bwd"
    )
    # Micro-batches, each linearized again per product.
    ops["relinearized"] = eqx_ggn.curvature_operator(
        model=model, data=data, loss_fn=loss_fn, num_microbatches=2, relinearize=True
    )
    params, static = eqx_ggn.partition(model)
    laplax_mv = eqx_ggn.create_ggn_mv(
        eqx_ggn.as_model_fn(static), params, data, loss_fn
    )
    _, unravel = ravel_pytree(params)
    op = ops["ggn"]
    out = {c: o.as_matrix() for c, o in ops.items()}
    out["laplax_ggn"] = jax.vmap(lambda e: flat(laplax_mv(unravel(e))))(
        jnp.eye(flat(params).size)
    ).T
    out["grad"], out["loss"] = flat(op.grad), op.loss
    for solver in ("dense", "sample_space"):
        out[solver] = flat(op.solve(op.grad, damping, solver=solver))
    return out, {c: o.jac for c, o in ops.items()}


@pytest.mark.parametrize(
    "loss_fn, kind",
    [
        ("mse", "regression"),
        ("cross_entropy", "labels"),
        ("binary_cross_entropy", "probabilities"),
    ],
)
def test_custom_vjp_model_matches_reverse_mode_references(x64, loss_fn, kind):
    """GGN, Fisher, empirical Fisher and Hessian products, `create_ggn_mv`, the
    gradient and both exact solvers of a model with a custom-VJP activation,
    against `jacrev`-built dense matrices (no forward mode anywhere)."""
    model, data = make_problem(kind, key=3)
    model = with_activation(model, custom_tanh)
    params, static = eqx_ggn.partition(model)
    model_fn = eqx_ggn.as_model_fn(static)
    batch = data["input"].shape[0]
    ref = dense_curvatures(model_fn, params, data, loss_fn, 1.0 / batch, reverse=True)
    damping = 1e-3
    out, modes = reverse_mode_results(model, data, loss_fn, damping)
    assert modes == {
        "ggn": "bwd",
        "fisher": "bwd",
        "empirical_fisher": "bwd",
        "hessian": "fwd",
        "hessian_bwd": "bwd",
        "relinearized": "bwd",
    }
    for curvature in ("ggn", "fisher", "empirical_fisher", "hessian"):
        assert_rel_close(out[curvature], ref[curvature], 1e-10)
    assert_rel_close(out["hessian_bwd"], ref["hessian"], 1e-10)
    assert_rel_close(out["relinearized"], ref["ggn"], 1e-10)
    assert_rel_close(out["laplax_ggn"], batch * ref["ggn"], 1e-10)
    assert_rel_close(out["grad"], ref["grad"], 1e-10)
    assert_rel_close(out["loss"], ref["loss"], 1e-12)
    eye = jnp.eye(ref["ggn"].shape[0])
    expected = jnp.linalg.solve(ref["ggn"] + damping * eye, ref["grad"])
    for solver in ("dense", "sample_space"):
        assert_rel_close(out[solver], expected, 1e-10)


SOLVERS = ("cg", "dense", "sample_space", "kfac")


@eqx.filter_jit
def steps_in_both_modes(model, data, loss_fn, micros):
    """One `gauss_newton` step per solver: full-batch in both modes, and in reverse
    mode at each further micro-batch count."""
    params = eqx.filter(model, eqx.is_inexact_array)
    _, grads = eqx_ggn.value_and_grad(model=model, batch=data, loss_fn=loss_fn)
    out = {}
    configs = [(1, "fwd"), (1, "bwd")] + [(m, "bwd") for m in micros if m != 1]
    for solver in SOLVERS:
        for micro, jac in configs:
            opt = eqx_ggn.gauss_newton(
                1.0,
                loss_fn=loss_fn,
                solver=solver,
                jac=jac,
                num_microbatches=micro,
                cg_tol=1e-12,
                warn=False,
            )
            updates, state = opt.update(
                grads, opt.init(params), params, model=model, batch=data
            )
            out[solver, micro, jac] = (flat(updates), state[0].damping)
    return out


@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_bwd_step_equals_fwd_step_for_every_solver(x64, net):
    """`jac="bwd"` on a plain model takes the step `jac="fwd"` takes, to rounding:
    CG, dense, sample-space and KFAC, full-batch and, in reverse mode, also in
    micro-batches (MLP; forward-mode micro-batching equals the full batch in
    tests/test_microbatch.py)."""
    if net == "mlp":
        model, data = make_problem("labels", key=1)
        loss_fn = "cross_entropy"
    else:
        kx, ky = jax.random.split(jax.random.key(4))
        model = to_f64(ConvNet(jax.random.key(5)))
        data = to_f64(
            {
                "input": jax.random.normal(kx, (6, 2, 4, 5)),
                "target": jax.random.normal(ky, (6, 2)),
            }
        )
        loss_fn = "mse"
    # Micro-batching (a scan over stored linearizations) once, on the MLP.
    micros = (1, 2) if net == "mlp" else (1,)
    out = steps_in_both_modes(model, data, loss_fn, micros)
    for solver in SOLVERS:
        fwd, fwd_damping = out[solver, 1, "fwd"]
        assert jnp.linalg.norm(fwd) > 0, solver
        for micro in micros:
            bwd, bwd_damping = out[solver, micro, "bwd"]
            assert_rel_close(bwd, fwd, 1e-10)
            assert_rel_close(bwd_damping, fwd_damping, 1e-10)


def test_jac_none_picks_the_mode_at_trace_time_with_one_compile():
    """`jac=None` gives `"fwd"` for a plain model and `"bwd"` for a custom VJP,
    recorded on the operator, and the jitted function traces once per model; in
    bfloat16 (mixed precision) too."""
    model, data = make_problem("regression", key=2)
    custom = with_activation(model, custom_tanh)
    low = jax.tree.map(
        lambda x: x.astype(jnp.bfloat16) if eqx.is_inexact_array(x) else x, custom
    )

    def operator(model):
        return eqx_ggn.curvature_operator(model=model, data=data, loss_fn="mse")

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=3)  # one per model
    def product(model):
        op = operator(model)
        return op.mv(op.grad)

    for _ in range(2):
        plain_gv, custom_gv, low_gv = product(model), product(custom), product(low)
    modes = [eqx.filter_eval_shape(operator, m).jac for m in (model, custom, low)]
    assert modes == ["fwd", "bwd", "bwd"]
    assert_rel_close(custom_gv, plain_gv, 1e-5)  # the same function, float32
    assert {x.dtype for x in jax.tree.leaves(low_gv)} == {jnp.dtype(jnp.bfloat16)}
    low_gv = jax.tree.map(lambda x: x.astype(jnp.float32), low_gv)
    assert_rel_close(low_gv, plain_gv, 5e-2)  # bfloat16 rounding


@eqx.filter_jit
def exact_steps_without_jv(model, data):
    """The dense solve and a sample-space optimizer step (Levenberg-Marquardt
    included), and the GGN and gradient from `jacrev`: under mse the GGN of the
    mean is 2/N J^T J and the gradient 2/N J^T (f - y)."""
    op = eqx_ggn.curvature_operator(model=model, data=data, loss_fn="mse")
    params = eqx.filter(model, eqx.is_inexact_array)
    opt = eqx_ggn.gauss_newton(
        1.0, loss_fn="mse", solver="sample_space", damping=1.0, line_search=None
    )
    updates, state = opt.update(
        op.grad, opt.init(params), params, model=model, batch=data
    )
    flat_params, unravel = ravel_pytree(params)
    predict = lambda p: jax.vmap(eqx.combine(unravel(p), model))(data["input"])
    jac = jax.jacrev(predict)(flat_params).reshape(-1, flat_params.size)
    residual = (predict(flat_params) - data["target"]).reshape(-1)
    n = data["input"].shape[0]
    ggn, grad = 2 / n * jac.T @ jac, 2 / n * jac.T @ residual
    return {
        "dense": flat(op.solve(op.grad, 1e-3, solver="dense")),
        "step": flat(updates),
        "accepted": state[0].accepted,
        "ggn": ggn,
        "grad": grad,
    }


def test_errors_name_the_mode_and_the_way_out(x64):
    """`jac="fwd"` on a custom VJP, and `J v` through a backward rule that cannot
    be differentiated, raise a `ValueError` at trace time; the exact solvers need
    only the VJP and still solve exactly."""
    model, data = make_problem("regression", key=2)
    custom = with_activation(model, custom_tanh)
    looped = with_activation(model, looped_tanh)

    def operator(model, jac=None):
        return eqx_ggn.curvature_operator(
            model=model, data=data, loss_fn="mse", jac=jac
        )

    with pytest.raises(ValueError, match="Unknown jac 'sideways'"):
        eqx.filter_eval_shape(operator, model, "sideways")
    with pytest.raises(ValueError, match=r"jac='fwd' needs forward-mode.*jac='bwd'"):
        eqx.filter_eval_shape(operator, custom, "fwd")
    assert eqx.filter_eval_shape(operator, looped).jac == "bwd"
    with pytest.raises(ValueError, match=r"backward rule once more.*while_loop"):
        eqx.filter_eval_shape(lambda m: (op := operator(m)).mv(op.grad), looped)
    opt = eqx_ggn.gauss_newton(1.0, loss_fn="mse", solver="cg")
    params = eqx.filter(looped, eqx.is_inexact_array)
    with pytest.raises(ValueError, match="solver='dense', 'sample_space' or 'auto'"):
        eqx.filter_eval_shape(
            lambda m: opt.update(params, opt.init(params), params, model=m, batch=data),
            looped,
        )
    # The exact solvers and the Levenberg-Marquardt rule use no J v.
    out = exact_steps_without_jv(looped, data)
    eye = jnp.eye(out["grad"].size)
    expected = jnp.linalg.solve(out["ggn"] + 1e-3 * eye, out["grad"])
    assert_rel_close(out["dense"], expected, 1e-10)
    assert bool(out["accepted"])
    assert_rel_close(
        out["step"], -jnp.linalg.solve(out["ggn"] + eye, out["grad"]), 1e-10
    )


class VectorField(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        return self.mlp(y)


class NeuralODE(eqx.Module):
    """`y0 -> y(t)` at 4 times: diffrax's Heun method, 8 steps (a small program)."""

    field: VectorField
    adjoint: diffrax.AbstractAdjoint = eqx.field(static=True)

    def __call__(self, y0):
        ts = jnp.linspace(0.0, 1.0, 4)
        solution = diffrax.diffeqsolve(
            diffrax.ODETerm(self.field),
            diffrax.Heun(),
            0.0,
            1.0,
            0.125,
            y0,
            saveat=diffrax.SaveAt(ts=ts),
            adjoint=self.adjoint,
            max_steps=8,
        )
        return solution.ys


def test_diffrax_default_adjoint_step_and_training(x64):
    """A neural ODE with diffrax's default adjoint (a custom VJP) takes the step
    `DirectAdjoint` (both modes) takes, and trains: loss below 0.01x in 5 steps."""
    mlp = to_f64(eqx.nn.MLP(2, 2, 8, 1, activation=jnp.tanh, key=jax.random.key(0)))
    default = NeuralODE(VectorField(mlp), diffrax.RecursiveCheckpointAdjoint())
    direct = NeuralODE(VectorField(mlp), diffrax.DirectAdjoint())
    y0 = jax.random.normal(jax.random.key(1), (8, 2))
    # Targets from the damped rotation dy/dt = [[-0.1, 1], [-1, -0.1]] y, in
    # closed form: reachable, and not the initial network.
    t = jnp.linspace(0.0, 1.0, 4)[:, None, None]
    c, s = jnp.cos(t), jnp.sin(t)
    flow = jnp.exp(-0.1 * t) * jnp.concatenate(
        [jnp.concatenate([c, s], 2), jnp.concatenate([-s, c], 2)], 1
    )
    target = jnp.einsum("tij,nj->nti", flow, y0)
    data = {"input": y0, "target": target}
    opt = eqx_ggn.gauss_newton(1.0, loss_fn="mse", solver="auto")
    params = eqx.filter(default, eqx.is_inexact_array)

    @eqx.filter_jit
    def step(model, state):
        (loss, grads), op = eqx_ggn.value_and_grad(
            model=model, batch=data, loss_fn="mse", return_operator=True
        )
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, state = opt.update(
            grads, state, params, model=model, batch=data, operator=op
        )
        return eqx.apply_updates(model, updates), state, loss, op.jac

    _, _, _, direct_mode = step(direct, opt.init(params))
    moved_default, _, _, default_mode = step(default, opt.init(params))
    moved_direct, _, _, _ = step(direct, opt.init(params))
    assert (default_mode, direct_mode) == ("bwd", "fwd")
    steps = [
        flat(eqx.filter(m, eqx.is_inexact_array)) - flat(params)
        for m in (moved_default, moved_direct)
    ]
    assert jnp.linalg.norm(steps[1]) > 0
    assert_rel_close(steps[0], steps[1], 1e-8)

    model, state = default, opt.init(params)
    losses = []
    for _ in range(6):
        model, state, loss, _ = step(model, state)
        losses.append(float(loss))
    assert losses[-1] < 0.01 * losses[0], losses
