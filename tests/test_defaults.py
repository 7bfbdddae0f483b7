"""Safe by default: the defaults converge, and a failing run warns the user."""

import re
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqx_ggn


class _GRUClassifier(eqx.Module):
    """A small RNN: a GRU over the sequence, then a linear head on the last state."""

    cell: eqx.nn.GRUCell
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.cell = eqx.nn.GRUCell(2, 8, key=k1)
        self.head = eqx.nn.Linear(8, 3, key=k2)

    def __call__(self, xs):
        def scan_fn(h, x):
            return self.cell(x, h), None

        h, _ = jax.lax.scan(scan_fn, jnp.zeros(8), xs)
        return self.head(h)


def _classification(kind, n=64):
    kx, km = jax.random.split(jax.random.key(0))
    if kind == "rnn":
        x = jax.random.normal(kx, (n, 6, 2))
        s = jnp.sum(x, axis=1)
        model = _GRUClassifier(km)
    else:
        x = jax.random.normal(kx, (n, 2))
        s = x
        model = eqx.nn.MLP(2, 3, 16, 2, key=km)
    y = (s[:, 0] > 0).astype(int) + (s[:, 0] * s[:, 1] > 0)
    return model, {"input": x, "target": y}


def _step(opt, loss_fn, user_loss=None):
    """One jitted step; the gradient is the package's own unless `user_loss`."""

    @eqx.filter_jit
    def step(model, state, batch):
        params = eqx.filter(model, eqx.is_inexact_array)
        if user_loss is None:
            (_, grads), op = eqx_ggn.value_and_grad(
                model=model, batch=batch, loss_fn=loss_fn, return_operator=True
            )
        else:
            grads, op = eqx.filter_grad(user_loss)(model, batch), None
        updates, state = opt.update(
            grads, state, params, model=model, batch=batch, operator=op
        )
        return eqx.apply_updates(model, updates), state

    return step


@pytest.mark.parametrize("kind", ["mlp", "rnn"])
def test_defaults_never_increase_the_objective(kind):
    model, batch = _classification(kind)
    opt = eqx_ggn.gauss_newton(1.0, loss_fn="cross_entropy")  # all else default
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    step = _step(opt, "cross_entropy")
    losses, accepted = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("error", eqx_ggn.GaussNewtonWarning)
        for _ in range(25):
            model, state = step(model, state, batch)
            jax.effects_barrier()
            losses.append(float(state[0].loss))
            accepted.append(bool(state[0].accepted))
    params = jax.flatten_util.ravel_pytree(eqx.filter(model, eqx.is_inexact_array))[0]
    assert np.all(np.isfinite(params))
    # state.loss is the objective where step k was linearized: after an accepted
    # step it is the new point's value, which must not be above the old one.
    rounding = 8 * np.finfo(np.float32).eps * losses[0]
    for k in range(1, len(losses)):
        if accepted[k - 1]:
            assert losses[k] <= losses[k - 1] + rounding, (k, losses)
    assert losses[-1] < 0.5 * losses[0], losses


def _sigmoid_bce(model, batch):
    p = jax.vmap(model)(batch["input"])
    y = batch["target"]
    return -jnp.mean(y * jnp.log(p) + (1 - y) * jnp.log(1 - p))


def _sum_times_100(model, batch):
    logits = jax.vmap(model)(batch["input"])
    return 100 * jnp.sum(jax.vmap(eqx_ggn.cross_entropy_loss)(logits, batch["target"]))


@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        ("sigmoid_output", "look like probabilities"),
        ("sum_times_100", "incoming gradient differs"),
        ("labels_out_of_range", r"labels lie outside \[0, number of classes\)"),
        ("healthy", None),
    ],
)
def test_warning(case, pattern):
    model, batch = _classification("mlp")
    loss_fn, user_loss = "cross_entropy", None
    if case == "sigmoid_output":  # read "(sigmoid logits)" as "sigmoid outputs"
        model = eqx.nn.MLP(
            2, 1, 16, 2, final_activation=jax.nn.sigmoid, key=jax.random.key(3)
        )
        batch = {**batch, "target": (batch["target"][:, None] > 0).astype(float)}
        loss_fn, user_loss = "binary_cross_entropy", _sigmoid_bce
    elif case == "sum_times_100":
        user_loss = _sum_times_100
    elif case == "labels_out_of_range":
        batch = {**batch, "target": batch["target"].at[5].set(5)}
    opt = eqx_ggn.gauss_newton(1.0, loss_fn=loss_fn)
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    step = _step(opt, loss_fn, user_loss)
    steps = 20 if pattern else 200
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            model, state = step(model, state, batch)
            jax.effects_barrier()
            if caught:
                break
    ours = [w for w in caught if issubclass(w.category, eqx_ggn.GaussNewtonWarning)]
    if pattern is None:
        assert not ours, str(ours[0].message)
        assert float(state[0].loss) < 1e-3  # the run did train
    else:
        assert len(ours) == 1 and issubclass(ours[0].category, UserWarning)
        assert re.search(pattern, str(ours[0].message)), str(ours[0].message)


def test_warn_false_is_silent():
    model, batch = _classification("mlp")
    batch = {**batch, "target": batch["target"].at[5].set(5)}
    opt = eqx_ggn.gauss_newton(1.0, loss_fn="cross_entropy", warn=False)
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    step = _step(opt, "cross_entropy")  # compiled once
    with warnings.catch_warnings():
        warnings.simplefilter("error", eqx_ggn.GaussNewtonWarning)
        for _ in range(3):
            model, state = step(model, state, batch)
            jax.effects_barrier()
    assert int(state[0].rejected_steps) == 3


def test_one_forward_pass_for_the_gradient_and_the_linearization():
    model, batch = _classification("mlp", n=8)
    calls = []

    class Counting(eqx.Module):
        inner: eqx.nn.MLP

        def __call__(self, x):
            calls.append(1)
            return self.inner(x)

    model = Counting(model)
    opt = eqx_ggn.gauss_newton(1.0, loss_fn="cross_entropy")
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    shared = _step(opt, "cross_entropy")
    eqx.filter_make_jaxpr(shared)(model, state, batch)
    # One linearized forward pass gives the gradient and the curvature; the
    # Levenberg-Marquardt rule needs one more at θ - d. Nothing else.
    assert len(calls) == 2
    calls.clear()

    def by_hand(m, b):
        logits = jax.vmap(m)(b["input"])
        return jax.vmap(eqx_ggn.cross_entropy_loss)(logits, b["target"]).mean()

    separate = _step(opt, "cross_entropy", by_hand)
    eqx.filter_make_jaxpr(separate)(model, state, batch)
    assert len(calls) == 3  # what value_and_grad + operator= saves


def test_inject_hyperparams_needs_no_static_args(x64):
    model, batch = _classification("mlp", n=16)
    model = jax.tree.map(
        lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, model
    )
    params = eqx.filter(model, eqx.is_inexact_array)
    # min_damping keeps the solves well conditioned: the two programs fuse
    # differently, and a smaller damping would amplify that rounding past 1e-12.
    kwargs = {
        "loss_fn": "cross_entropy",
        "warm_start": True,
        "momentum": 0.5,
        "min_damping": 0.2,
    }
    plain = eqx_ggn.gauss_newton(0.7, **kwargs)
    injected = optax.inject_hyperparams(eqx_ggn.gauss_newton)(0.7, **kwargs)
    s1, s2 = plain.init(params), injected.init(params)
    m1 = m2 = model
    plain_step, injected_step = (
        _step(plain, "cross_entropy"),
        _step(injected, "cross_entropy"),
    )
    for _ in range(3):
        m1, s1 = plain_step(m1, s1, batch)
        m2, s2 = injected_step(m2, s2, batch)
        a, b = (
            jax.flatten_util.ravel_pytree(eqx.filter(m, eqx.is_inexact_array))[0]
            for m in (m1, m2)
        )
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14)
    # The inner damping, read from the inner state (the hyperparameter is the start).
    assert float(optax.tree.get(s2.inner_state, "damping")) == float(s1[0].damping)
    assert isinstance(s2.hyperparams["cg_maxiter"], jax.Array)

    # No buffer for a feature that is off.
    off = optax.inject_hyperparams(eqx_ggn.gauss_newton)(1.0, loss_fn="mse")
    assert optax.tree.get(off.init(params), "momentum") is None

    # Schedules take effect: CG runs exactly `cg_maxiter` steps, damping is fixed.
    scheduled = optax.inject_hyperparams(eqx_ggn.gauss_newton)(
        learning_rate=1.0,
        loss_fn="cross_entropy",
        adaptive_damping=False,
        cg_maxiter=lambda count: 2 + count,
        damping=lambda count: 10.0 ** (-count),
        cg_tol=0.0,
        cg_progress_tol=0.0,
    )
    state, m = scheduled.init(params), model
    scheduled_step = _step(scheduled, "cross_entropy")
    for k in range(3):
        m, state = scheduled_step(m, state, batch)
        inner = state.inner_state[0]
        assert int(inner.cg_iterations) == 2 + k
        assert float(inner.damping) == pytest.approx(10.0 ** (-k), rel=1e-6)
