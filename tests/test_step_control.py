"""Step control: no stall for any option combination, fast recovery of the
damping, the recorded rejection causes, and a warning only for a real stall."""

import itertools
import re
import warnings

import jax
import jax.numpy as jnp
import pytest

import eqx_ggn
from eqx_ggn._step_control import levenberg_marquardt


# One residual `w^2 - 1` at `w = 1e-6`: the Gauss-Newton curvature `8 w^2` is tiny
# and the undamped step `-(w^2 - 1) / (2 w)` about 5e5 long. Even 2^-15 of it
# overshoots: the loss 1 rises at every size of ENGD's grid.
BATCH = {"input": jnp.ones((1, 1)), "target": jnp.zeros((1, 1))}


def model_fn(input, params):  # noqa: A002
    return params["w"] ** 2 * input - 1


def _objective(params):
    return jnp.mean((model_fn(BATCH["input"], params) - BATCH["target"]) ** 2)


def _run(opt, params, steps):
    """`steps` jitted updates of `scale_by_gauss_newton` (whose updates keep the
    gradient's sign: the step is `params - updates`) in one `lax.scan`: the losses
    and the states."""

    @jax.jit
    def run(params):
        def body(carry, _):
            params, state = carry
            grads = jax.grad(_objective)(params)
            updates, state = opt.update(
                grads, state, params, model_fn=model_fn, batch=BATCH
            )
            params = jax.tree.map(jnp.subtract, params, updates)
            return (params, state), (_objective(params), state)

        return jax.lax.scan(body, (params, opt.init(params)), None, length=steps)[1]

    return run(params)


COMBINATIONS = list(
    itertools.product([True, False], [None, "grid"], ["cg", "dense", "sample_space"])
)


def test_the_full_step_fails_at_every_grid_size(x64):
    """The problem is what it claims: no grid size lowers the loss at step 0."""
    params = {"w": jnp.array([1e-6])}
    opt = eqx_ggn.scale_by_gauss_newton(
        "mse", solver="dense", damping=0.0, adaptive_damping=False, line_search=None
    )
    grads = jax.grad(_objective)(params)
    d, _ = opt.update(grads, opt.init(params), params, model_fn=model_fn, batch=BATCH)
    sizes = 0.5 ** jnp.arange(16.0)
    trial = jax.vmap(lambda a: _objective({"w": params["w"] - a * d["w"]}))(sizes)
    assert bool(jnp.all(trial > _objective(params)))


@pytest.mark.parametrize(("adaptive", "line_search", "solver"), COMBINATIONS)
def test_no_stall_for_any_combination(x64, adaptive, line_search, solver):
    """From `damping=0`, where the first trial fails, every combination that
    checks its steps (adaptive damping or a line search) lowers the loss within
    16 steps, because every rejection changes the next trial; the one that
    checks nothing takes its steps."""
    params = {"w": jnp.array([1e-6])}
    opt = eqx_ggn.scale_by_gauss_newton(
        "mse",
        solver=solver,
        damping=0.0,
        adaptive_damping=adaptive,
        line_search=line_search,
        warn=False,
    )
    losses, states = _run(opt, params, 16)
    start = float(_objective(params))
    if not adaptive and line_search is None:
        assert bool(jnp.all(states.accepted))  # nothing to reject: no stall
        return
    assert not bool(states.accepted[0])  # the first trial fails ...
    assert int(states.rejection[0]) == eqx_ggn.StepRejection.LOSS_INCREASED
    assert float(losses[-1]) < start  # ... and the run still descends
    # From the rounding level (about 1e-27 here) Nielsen's growth, 2^(k(k+1)/2)
    # after k rejections, reaches a damping of 1e-5 in 12.
    first = int(jnp.argmax(states.accepted))
    assert first <= 13, first
    if not adaptive:  # the grid moved down by 2^-16 per rejection
        assert float(states.grid_scale[0]) == 2.0**-16
        assert float(states.grid_scale[first]) == 1.0


def test_nielsen_recovers_in_two_rejections():
    """From a damping 7x below the smallest that gives a decrease, Nielsen's rule
    is accepted after two rejections (x2, then x4); the threshold rule after five
    (1.5^5 = 7.6)."""

    def outcome(damping, rejected):  # accepted iff damping >= 1
        return levenberg_marquardt(
            damping,
            jnp.asarray(1.0),
            jnp.where(damping >= 1, 0.5, 2.0),
            jnp.asarray(-0.6),
            rejected,
            rule=rule,
        )

    for rule, expected in (("nielsen", 2), ("threshold", 5)):
        damping, growth, rejections = jnp.asarray(1 / 7), jnp.asarray(2.0), 0
        while True:
            lm = outcome(damping, growth)
            if bool(lm.accepted):
                break
            rejections += 1
            assert int(lm.rejection) == eqx_ggn.StepRejection.LOSS_INCREASED
            damping, growth = lm.damping, lm.growth
        assert rejections == expected, (rule, rejections)
        assert float(lm.reduction_ratio) == pytest.approx(0.5 / 0.6, rel=1e-6)


def test_nielsen_damping_update_is_the_published_rule():
    """Accepted: `λ * max(1/3, 1 - (2 rho - 1)^3)` and the growth back to 2;
    rejected: `λ * growth` and the growth doubled; NaN: rejected as non-finite."""
    for rho in (0.1, 0.5, 0.9, 1.5):
        lm = levenberg_marquardt(
            jnp.asarray(1.0), jnp.asarray(1.0), 1.0 - rho, jnp.asarray(-1.0), 8.0
        )
        factor = max(1 / 3, 1 - (2 * min(rho, 1.0) - 1) ** 3)
        assert float(lm.damping) == pytest.approx(factor, rel=1e-6)
        assert float(lm.growth) == 2 and bool(lm.accepted)
    lm = levenberg_marquardt(
        jnp.asarray(1.0), jnp.asarray(1.0), 1.5, jnp.asarray(-1.0), 8.0
    )
    assert (float(lm.damping), float(lm.growth)) == (8.0, 16.0)
    lm = levenberg_marquardt(
        jnp.asarray(1.0), jnp.asarray(1.0), jnp.nan, jnp.asarray(-1.0), 2.0
    )
    assert not bool(lm.accepted)
    assert int(lm.rejection) == eqx_ggn.StepRejection.NON_FINITE


def test_a_real_stall_warns_with_the_damping_history(x64):
    """A model whose output jumps (a sawtooth of its parameter, invisible to the
    derivatives): every step is rejected until the damping has grown by 1e10;
    after `warn_after` (8) rejections, one warning, naming no cause it did not
    measure."""

    def jumpy(input, params):  # noqa: A002
        w = params["w"]
        return (w + 3 * (jnp.floor(1e6 * w) - 1e6 * w) / 1e6) * input - 1

    def objective(params):
        return jnp.mean(jumpy(BATCH["input"], params) ** 2)

    opt = eqx_ggn.scale_by_gauss_newton("mse", damping=1e-3)
    params = {"w": jnp.array([0.5e-6])}
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        updates, state = opt.update(
            jax.grad(objective)(params), state, params, model_fn=jumpy, batch=BATCH
        )
        return jax.tree.map(jnp.subtract, params, updates), state

    def warnings_of(step, params, state):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(10):
                params, state = step(params, state)
                jax.block_until_ready(state)
        return [
            str(w.message)
            for w in caught
            if issubclass(w.category, eqx_ggn.GaussNewtonWarning)
        ]

    # No effect in the program: the host callback sits behind a `lax.cond` and
    # the step keeps JAX's C++ dispatch path (a `jax.debug.callback` loses it).
    assert jax.make_jaxpr(step)(params, state).effects == set()
    ours = warnings_of(step, params, state)
    assert len(ours) == 1, ours
    assert re.search(r"8 consecutive step\(s\) rejected", ours[0]), ours[0]
    assert "damping grew from 0.001" in ours[0], ours[0]
    assert "Likely causes" not in ours[0] and "Measured causes" not in ours[0]
    # Under `vmap` the cond becomes a select and the host is called every step;
    # it warns once per stalled problem all the same.
    stacked = jax.tree.map(lambda x: jnp.stack([x, x]), (params, state))
    assert len(warnings_of(jax.jit(jax.vmap(step)), *stacked)) == 2


def test_relative_damping_floor_is_the_rounding_level_over_the_loss(x64):
    """The exact solvers' damping floor is their factorization's rounding level,
    a bound on the damping they solve with. Under `relative_damping` that is
    `λ L(θ)`, so `λ`'s floor is the level divided by the loss: from a damping far
    below it, one accepted step leaves `λ L(θ_0)` at the plain run's floor."""
    key_x, key_y = jax.random.split(jax.random.key(0))
    batch = {
        "input": jax.random.normal(key_x, (8, 3)),
        "target": 10 * jax.random.normal(key_y, (8,)),  # L(θ_0) about 100
    }
    params = {"w": jnp.zeros(3)}

    def linear(input, params):  # noqa: A002
        return input @ params["w"]

    def one_step(solver, relative):
        opt = eqx_ggn.scale_by_gauss_newton(
            "mse", solver=solver, damping=1e-30, relative_damping=relative
        )
        (loss, grads), op = eqx_ggn.value_and_grad(
            linear, params, batch, "mse", return_operator=True
        )
        _, state = opt.update(
            grads, opt.init(params), params, model_fn=linear, batch=batch, operator=op
        )
        return loss, state

    for solver in ("dense", "sample_space"):
        loss, plain = jax.jit(one_step, static_argnums=(0, 1))(solver, False)
        _, relative = jax.jit(one_step, static_argnums=(0, 1))(solver, True)
        assert bool(plain.accepted) and bool(relative.accepted)
        assert float(loss) > 10
        assert 1e-20 < float(plain.damping) < 1e-10  # the floor, not 1e-30 / 3
        assert float(relative.damping) * float(loss) == pytest.approx(
            float(plain.damping), rel=1e-6
        )
