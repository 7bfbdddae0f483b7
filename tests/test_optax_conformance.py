"""scale_by_gauss_newton / gauss_newton behave as Optax transformations should."""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest
from helpers import assert_rel_close

import eqx_ggn


def _problem(dtype=jnp.float32):
    mlp = eqx.nn.MLP(3, 2, 8, 1, activation=jnp.tanh, key=jax.random.key(0))
    mlp = jax.tree.map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, mlp)
    x = jax.random.normal(jax.random.key(1), (16, 3), dtype)
    batch = {"input": x, "target": jnp.sin(x[:, :2])}
    params, static = eqx_ggn.partition(mlp)
    return mlp, params, eqx_ggn.as_model_fn(static), batch


def _grads(model_fn, params, batch):
    def objective(p):
        pred = jax.vmap(lambda x: model_fn(input=x, params=p))(batch["input"])
        return jnp.mean(jnp.sum((pred - batch["target"]) ** 2, axis=-1))

    return jax.grad(objective)(params)


def _flat(tree):
    return jax.flatten_util.ravel_pytree(tree)[0]


FULL = {
    "loss_fn": "mse",
    "adaptive_damping": True,
    "warm_start": True,
    "preconditioner": "jacobi",
    "momentum": 0.5,
    "cg_maxiter": 10,
}


def test_unknown_extra_args_are_ignored():
    _, params, model_fn, batch = _problem()
    opt = eqx_ggn.gauss_newton(0.5, **FULL)
    state = opt.init(params)
    grads = _grads(model_fn, params, batch)
    # Compiled: the extra keywords must be ignored at trace time, too.
    update = jax.jit(
        lambda g, extra: opt.update(
            g, state, params, model_fn=model_fn, batch=batch, **extra
        )[0]
    )
    a, b = update(grads, {}), update(grads, {"value": 1.0, "key": 3})
    assert jnp.array_equal(_flat(a), _flat(b))


def test_missing_arguments_say_what_to_pass():
    _, params, model_fn, batch = _problem()
    opt = eqx_ggn.gauss_newton(1.0, loss_fn="mse")
    state = opt.init(params)
    grads = _grads(model_fn, params, batch)
    with pytest.raises(ValueError, match=r"batch=\{'input': X, 'target': Y\}"):
        opt.update(grads, state, params, model_fn=model_fn)
    with pytest.raises(ValueError, match=r"pass model_fn=.*model="):
        opt.update(grads, state, params, batch=batch)
    with pytest.raises(ValueError, match="needs the current params"):
        opt.update(grads, state, model_fn=model_fn, batch=batch)
    with pytest.raises(ValueError, match=r"updates.*structure"):
        opt.update({"w": 1.0}, state, params, model_fn=model_fn, batch=batch)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"loss_fn": "l1"}, "Unknown loss_fn 'l1'"),
        ({"curvature": "kfac"}, r"Unknown curvature 'kfac'.*'hessian'"),
        ({"preconditioner": "ilu"}, "Unknown preconditioner 'ilu'"),
        ({"cg_maxiter": 0}, "cg_maxiter"),
        ({"cg_maxiter": jnp.asarray(5.0)}, "cg_maxiter must be a positive int or"),
        (
            {"num_microbatches": jnp.asarray(2)},
            "list 'num_microbatches' in static_args",
        ),
        ({"damping": -1.0}, "damping"),
        ({"momentum": 1.5}, "momentum"),
    ],
)
def test_bad_configuration(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        eqx_ggn.scale_by_gauss_newton(**{"loss_fn": "mse", **kwargs})


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_state_and_update_dtypes_are_stable(dtype):
    _, params, model_fn, batch = _problem(dtype)
    opt = eqx_ggn.gauss_newton(1.0, **FULL)
    state = opt.init(params)
    grads = _grads(model_fn, params, batch)
    update = jax.jit(
        lambda g, s, p: opt.update(g, s, p, model_fn=model_fn, batch=batch)
    )
    updates, new_state = update(grads, state, params)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert jax.tree.map(lambda x: x.dtype, new_state) == jax.tree.map(
        lambda x: x.dtype, state
    )
    assert all(u.dtype == dtype for u in jax.tree.leaves(updates))
    assert all(
        jnp.all(jnp.isfinite(u.astype(jnp.float32))) for u in jax.tree.leaves(updates)
    )
    # The state survives lax.cond: both branches give the same structure and dtypes.
    in_cond = jax.jit(  # one program for both branches taken
        lambda flag, s: jax.lax.cond(
            flag, lambda s: update(grads, s, params)[1], lambda s: s, s
        )
    )
    for flag in (True, False):
        out = in_cond(flag, state)
        assert jax.tree.structure(out) == jax.tree.structure(state)


def test_multisteps_and_chains(x64):
    _, params, model_fn, batch = _problem(jnp.float64)
    # optax.MultiSteps accumulates in float32: use gradients it holds exactly.
    grads = jax.tree.map(
        lambda g: g.astype(jnp.float32).astype(g.dtype), _grads(model_fn, params, batch)
    )
    kw = {"model_fn": model_fn, "batch": batch}

    exact = {
        "loss_fn": "mse",
        "damping": 0.1,
        "cg_maxiter": 200,
        "cg_tol": 1e-13,
        "cg_progress_tol": 0.0,
    }
    multi = optax.MultiSteps(eqx_ggn.gauss_newton(1.0, **exact), every_k_schedule=2)
    state = multi.init(params)
    update = jax.jit(lambda g, s: multi.update(g, s, params, **kw))  # one program
    u1, state = update(grads, state)
    u2, state = update(grads, state)
    assert float(jnp.sum(jnp.abs(_flat(u1)))) == 0.0
    single = eqx_ggn.gauss_newton(1.0, **exact)
    expected, _ = jax.jit(
        lambda g: single.update(g, single.init(params), params, **kw)
    )(grads)
    assert_rel_close(_flat(u2), _flat(expected), tol=1e-9)

    for chained in (
        optax.chain(
            optax.clip_by_global_norm(1.0),
            eqx_ggn.scale_by_gauss_newton("mse"),
            optax.add_decayed_weights(1e-4),
            optax.scale_by_learning_rate(1.0),
        ),
        optax.chain(
            optax.add_decayed_weights(1e-4),
            eqx_ggn.scale_by_gauss_newton("mse"),
            optax.clip_by_global_norm(1.0),
            optax.scale_by_learning_rate(optax.linear_schedule(1.0, 0.1, 10)),
        ),
    ):
        state = chained.init(params)
        updates, state = jax.jit(
            lambda g, s, opt=chained: opt.update(g, s, params, **kw)
        )(grads, state)
        assert jnp.all(jnp.isfinite(_flat(updates)))
        assert float(jnp.sum(jnp.abs(_flat(updates)))) > 0
        assert int(optax.tree.get(state, "cg_iterations")) >= 1


def test_equinox_model_keyword_and_frozen_layers():
    mlp, _, _, batch = _problem()
    spec = jax.tree.map(lambda _: False, mlp)
    spec = eqx.tree_at(
        lambda m: (m.layers[-1].weight, m.layers[-1].bias), spec, (True, True)
    )
    params, _ = eqx_ggn.partition(mlp, spec)
    opt = eqx_ggn.gauss_newton(1.0, loss_fn="mse")
    state = opt.init(params)

    @eqx.filter_jit
    def step(mlp, state):
        params, static = eqx_ggn.partition(mlp, spec)
        grads = _grads(eqx_ggn.as_model_fn(static), params, batch)
        updates, state = opt.update(grads, state, params, model=mlp, batch=batch)
        return eqx.apply_updates(mlp, updates), state

    new, state = step(mlp, state)
    assert jnp.array_equal(new.layers[0].weight, mlp.layers[0].weight)
    assert not jnp.array_equal(new.layers[-1].weight, mlp.layers[-1].weight)


@pytest.mark.parametrize("adaptive", [False, True])
def test_one_linearization_per_step(adaptive):
    _, params, model_fn, batch = _problem()
    calls = []

    def counting_model_fn(input, params):  # noqa: A002
        calls.append(1)
        return model_fn(input=input, params=params)

    opt = eqx_ggn.gauss_newton(
        1.0, loss_fn="mse", adaptive_damping=adaptive, cg_maxiter=30
    )
    state = opt.init(params)
    grads = _grads(model_fn, params, batch)
    jax.make_jaxpr(
        lambda g, s, p: opt.update(g, s, p, model_fn=counting_model_fn, batch=batch)
    )(grads, state, params)
    # One forward pass, linearized; with adaptive damping one more for L(θ - d).
    # The CG loop's products add none.
    assert len(calls) == (2 if adaptive else 1)


def test_no_recompilation_across_steps():
    _, params, model_fn, batch = _problem()
    opt = eqx_ggn.gauss_newton(1.0, **FULL)

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def step(params, state, batch):
        grads = _grads(model_fn, params, batch)
        updates, state = opt.update(
            grads, state, params, model_fn=model_fn, batch=batch
        )
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    for i in range(3):
        shifted = {**batch, "input": batch["input"] + 0.1 * i}
        params, state = step(params, state, shifted)
    assert int(optax.tree.get(state, "count")) == 3
