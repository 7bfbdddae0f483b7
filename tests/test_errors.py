"""Bad input gets a clear ValueError at trace time."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from helpers import make_problem

import eqx_ggn


pytestmark = pytest.mark.usefixtures("x64")


@pytest.fixture
def problem():
    model, data = make_problem("regression")
    params, static = eqx_ggn.partition(model)
    return eqx_ggn.as_model_fn(static), params, data


def test_loss_fn_and_loss_hessian_mv_rules(problem):
    model_fn, params, data = problem
    with pytest.raises(ValueError, match="Either loss_fn or loss_hessian_mv"):
        eqx_ggn.create_ggn_mv(model_fn, params, data)
    with pytest.raises(ValueError, match="Only one of loss_fn or loss_hessian_mv"):
        eqx_ggn.create_ggn_mv(
            model_fn, params, data, "mse", loss_hessian_mv=lambda jv, **kw: jv
        )
    with pytest.raises(ValueError, match=r"Unknown loss_fn 'msee'.*'mse'.*'none'"):
        eqx_ggn.create_ggn_mv(model_fn, params, data, "msee")
    with pytest.raises(ValueError, match="Unknown loss_fn"):
        eqx_ggn.create_ggn_mv_without_data(model_fn, params, "hinge", 1.0)
    with pytest.raises(ValueError, match="loss_fn cannot be None"):
        eqx_ggn.create_ggn_mv_without_data(model_fn, params, None, 1.0)
    with pytest.raises(ValueError, match=r"Unknown curvature 'gnn'.*'ggn'"):
        eqx_ggn.curvature_operator(model_fn, params, data, "mse", curvature="gnn")


@pytest.mark.parametrize("under_jit", [False, True])
def test_batch_axes_must_agree(problem, under_jit):
    model_fn, params, data = problem
    bad = {"input": data["input"], "target": data["target"][:4]}

    def build(params, data):
        return eqx_ggn.create_ggn_mv(model_fn, params, data, "mse")(params)

    call = eqx.filter_jit(build) if under_jit else build
    with pytest.raises(ValueError, match=r"\(6, 3\).*\(4, 2\)"):
        call(params, bad)


def test_data_must_be_input_target_dict(problem):
    model_fn, params, data = problem
    with pytest.raises(ValueError, match="keys 'input' and 'target'"):
        eqx_ggn.curvature_operator(model_fn, params, {"x": data["input"]}, "mse")


@pytest.mark.parametrize(
    ("kind", "loss_fn", "target", "pattern"),
    [
        ("regression", "mse", jnp.zeros((6, 3)), r"\(6, 3\).*\(6, 2\)"),
        ("regression", "binary_cross_entropy", jnp.zeros((6,)), r"\(6,\).*\(6, 2\)"),
        ("labels", "cross_entropy", jnp.zeros((6, 2), int), r"\(6, 2\).*\(6, 3\)"),
        ("labels", "cross_entropy", jnp.zeros((6,)), r"\(6,\).*integer labels"),
    ],
)
@pytest.mark.parametrize("under_jit", [False, True])
def test_target_must_fit_prediction(kind, loss_fn, target, pattern, under_jit):
    model, data = make_problem(kind)
    bad = {"input": data["input"], "target": target}

    def build(model, data):
        return eqx_ggn.curvature_operator(model=model, data=data, loss_fn=loss_fn)

    call = eqx.filter_jit(build) if under_jit else build
    with pytest.raises(ValueError, match=pattern):
        call(model, bad)
    params, static = eqx_ggn.partition(model)
    with pytest.raises(ValueError, match=pattern):
        eqx_ggn.create_ggn_mv(eqx_ggn.as_model_fn(static), params, bad, loss_fn)


@pytest.mark.parametrize("under_jit", [False, True])
def test_vector_must_match_params(problem, under_jit):
    model_fn, params, data = problem
    op = eqx_ggn.curvature_operator(model_fn, params, data, "mse")
    ggn_mv = eqx_ggn.create_ggn_mv(model_fn, params, data, "mse")
    without = eqx_ggn.create_ggn_mv_without_data(model_fn, params, "mse", 1.0)
    wrap = eqx.filter_jit if under_jit else (lambda f: f)

    wrong_structure = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="vector has pytree structure"):
        wrap(op.mv)(wrong_structure)
    wrong_shape = eqx.tree_at(lambda p: p.layers[0].weight, params, jnp.ones((5, 4)))
    with pytest.raises(ValueError, match=r"weight has shape \(5, 4\).*\(5, 3\)"):
        wrap(ggn_mv)(wrong_shape)
    with pytest.raises(ValueError, match=r"weight has shape \(5, 4\).*\(5, 3\)"):
        wrap(without)(wrong_shape, data)


def test_params_must_be_floating():
    def model_fn(input, params):  # noqa: A002
        return params["w"] @ input

    data = {"input": jnp.ones((2, 3)), "target": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match=r"params\['w'\] has dtype int"):
        eqx_ggn.curvature_operator(model_fn, {"w": jnp.ones((2, 3), int)}, data, "mse")
    with pytest.raises(ValueError, match=r"params\['w'\] has dtype int"):
        eqx_ggn.create_ggn_mv(model_fn, {"w": jnp.ones((2, 3), int)}, data, "mse")


def test_model_and_model_fn_are_exclusive(problem):
    model_fn, params, data = problem
    model, _ = make_problem("regression")
    with pytest.raises(ValueError, match="either `model` or `model_fn`"):
        eqx_ggn.curvature_operator(model_fn, params, data, "mse", model=model)
    with pytest.raises(ValueError, match="needs `model_fn` and `params`"):
        eqx_ggn.curvature_operator(data=data, loss_fn="mse")


def test_curvature_needs_a_loss_value(problem):
    model_fn, params, data = problem

    def hmv(jv, **kwargs):
        return jv

    with pytest.raises(ValueError, match="Pass a loss_fn"):
        eqx_ggn.curvature_operator(model_fn, params, data, curvature="hessian")
    with pytest.raises(ValueError, match="applies to curvature 'ggn' or 'fisher'"):
        eqx_ggn.curvature_operator(
            model_fn, params, data, "mse", curvature="hessian", loss_hessian_mv=hmv
        )


@pytest.mark.parametrize(
    ("loss_fn", "target", "pattern"),
    [
        ("cross_entropy", jnp.zeros((6,), int), r"loss_fn='cross_entropy'.*\(6,\)"),
        ("mse", jnp.zeros((6, 1)), r"\(6, 1\).*\(6,\) for loss_fn='mse'"),
        (
            "binary_cross_entropy",
            jnp.zeros((6, 1)),
            r"\(6, 1\).*\(6,\) for loss_fn='binary_cross_entropy'",
        ),
    ],
)
def test_scalar_output_is_named(loss_fn, target, pattern):
    # A model with a scalar output: the prediction shape and the loss are named.
    model = eqx.nn.MLP(3, "scalar", 4, 1, key=jax.random.key(0))
    data = {"input": jnp.ones((6, 3)), "target": target}
    with pytest.raises(ValueError, match=pattern):
        eqx_ggn.value_and_grad(model=model, batch=data, loss_fn=loss_fn)


def test_loss_functions_take_python_labels():
    logits = jnp.array([2.0, 0.0, -1.0])
    expected = -jax.nn.log_softmax(logits)[1]
    assert jnp.allclose(eqx_ggn.cross_entropy_loss(logits, 1), expected)
    with pytest.raises(ValueError, match="class axis"):
        eqx_ggn.cross_entropy_loss(jnp.array(1.0), 0)


def test_optimizer_errors_name_the_fix():
    """`model=` given the filtered parameters, and an operator of another
    curvature: ValueErrors that say what to pass instead; an unknown
    damping_rule, and `kfac_rescale_tol` without KFAC's rescaling, are named at
    construction."""
    model, data = make_problem("labels")
    params = eqx.filter(model, eqx.is_inexact_array)
    grads = jax.tree.map(jnp.zeros_like, params)
    opt = eqx_ggn.gauss_newton(1.0, loss_fn="cross_entropy", warn=False)
    state = opt.init(params)
    with pytest.raises(ValueError, match="whole module as model="):
        opt.update(grads, state, params, model=params, batch=data)
    op = eqx_ggn.curvature_operator(
        model=model, data=data, loss_fn="cross_entropy", curvature="fisher"
    )
    with pytest.raises(ValueError, match=r"value_and_grad\(\.\.\., curvature='ggn'"):
        opt.update(grads, state, params, model=model, batch=data, operator=op)
    with pytest.raises(ValueError, match="Unknown damping_rule 'more'"):
        eqx_ggn.gauss_newton(1.0, damping_rule="more")
    for kl_clip in (0.0, -1.0):
        with pytest.raises(ValueError, match="kl_clip must be positive"):
            eqx_ggn.gauss_newton(1.0, kl_clip=kl_clip)
    with pytest.raises(ValueError, match=r"kfac_damping_floor must lie in \[0,"):
        eqx_ggn.gauss_newton(1.0, solver="kfac", kfac_damping_floor=-0.1)
    with pytest.raises(
        ValueError, match=r"kfac_every must be a positive int, got 2\.5"
    ):
        eqx_ggn.gauss_newton(1.0, solver="kfac", kfac_every=2.5)
    with pytest.raises(ValueError, match=r"kfac_rescale_tol .* needs solver='kfac'"):
        eqx_ggn.gauss_newton(1.0, kfac_rescale_tol=0.25)  # CG has no rescaling
    # Settings that contradict each other or flip the objective's sign.
    bad = [
        (
            r"lower_threshold \(0\.9\) must not exceed upper_threshold \(0\.1\)",
            dict(lower_threshold=0.9, upper_threshold=0.1),
        ),
        (
            r"min_damping \(10\.0\) must not exceed max_damping \(1\.0\)",
            dict(min_damping=10.0, max_damping=1.0),
        ),
        (r"factor must be positive, got -1\.0", dict(factor=-1.0)),
        (r"cg_progress_tol must lie in \[0, inf\]", dict(cg_progress_tol=-1.0)),
        (r"max_matrix_bytes must lie in \[1, inf\]", dict(max_matrix_bytes=0)),
    ]
    for message, kwargs in bad:
        with pytest.raises(ValueError, match=message):
            eqx_ggn.gauss_newton(1.0, **kwargs)
    with pytest.raises(ValueError, match=r"factor must be positive, got 0\.0"):
        eqx_ggn.curvature_operator(model=model, data=data, loss_fn="mse", factor=0.0)
