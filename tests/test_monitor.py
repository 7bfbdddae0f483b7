"""CurvatureMonitor inside jitted loops, and monitor_curvature."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import to_f64

import eqx_ggn


pytestmark = pytest.mark.usefixtures("x64")


def _setup():
    mlp = to_f64(eqx.nn.MLP(3, 3, 8, 1, activation=jnp.tanh, key=jax.random.key(0)))
    x = jax.random.normal(jax.random.key(1), (24, 3))
    batch = {"input": x, "target": jax.random.randint(jax.random.key(2), (24,), 0, 3)}
    return mlp, batch


def _loss(model, batch):
    logits = jax.vmap(model)(batch["input"])
    return jax.vmap(eqx_ggn.cross_entropy_loss)(logits, batch["target"]).mean()


def test_monitor_in_a_jitted_adam_loop():
    mlp, batch = _setup()
    log = []
    monitor = eqx_ggn.CurvatureMonitor(
        loss_fn="cross_entropy",
        every=5,
        sink=lambda step, metrics: log.append((step, metrics)),
        top_k=2,
        num_iters=60,
        num_samples=400,
    )
    opt = optax.adam(1e-2)
    state = opt.init(eqx.filter(mlp, eqx.is_inexact_array))

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def step(model, state, i):
        params = eqx.filter(model, eqx.is_inexact_array)
        metrics = monitor(i, params, model=model, batch=batch)
        grads = eqx.filter_grad(_loss)(model, batch)
        updates, state = opt.update(grads, state, params)
        return eqx.apply_updates(model, updates), state, metrics

    history, models = [], []
    for i in range(12):
        models.append(mlp)
        mlp, state, metrics = step(mlp, state, jnp.asarray(i))
        history.append(metrics)
    jax.effects_barrier()

    assert [s for s, _ in log] == [0, 5, 10]
    for step_index, values in log:
        assert all(type(v) is float for v in values.values())
        assert {"lambda_max", "trace", "lambda_max_over_trace", "loss", "eig_0"} <= set(
            values
        )
        assert values["lambda_max"] == float(history[step_index]["lambda_max"])
    for i, metrics in enumerate(history):
        computed = i % 5 == 0
        assert bool(jnp.isfinite(metrics["lambda_max"])) == computed
        assert int(metrics["step"]) == (i if computed else -1)

    # The values at step 5 against a dense GGN of the batch-mean objective there.
    @eqx.filter_jit  # one program, not one per operation
    def reference(model):
        params, static = eqx_ggn.partition(model)
        op = eqx_ggn.curvature_operator(
            eqx_ggn.as_model_fn(static), params, batch, "cross_entropy"
        )
        return op.as_matrix(), _loss(model, batch)

    dense, loss = map(np.asarray, reference(models[5]))
    eigs = np.linalg.eigh(dense)[0][::-1]
    m = history[5]
    np.testing.assert_allclose(m["top_eigenvalues"], eigs[:2], rtol=1e-5)
    assert abs(float(m["trace"]) - np.trace(dense)) <= 4 * float(m["trace_stderr"])
    np.testing.assert_allclose(m["loss"], loss, rtol=1e-6)
    np.testing.assert_allclose(
        m["lambda_max_over_trace"], m["lambda_max"] / m["trace"], rtol=1e-6
    )


def test_monitor_curvature_keeps_inner_updates_and_latest_metrics():
    mlp, batch = _setup()
    params, static = eqx_ggn.partition(mlp)
    model_fn = eqx_ggn.as_model_fn(static)
    inner = optax.adam(1e-2)
    monitor = eqx_ggn.CurvatureMonitor(loss_fn="cross_entropy", every=3, top_k=1)
    wrapped = eqx_ggn.monitor_curvature(inner, monitor)
    s_inner, s_wrapped = inner.init(params), wrapped.init(params)
    assert np.isnan(float(optax.tree.get(s_wrapped, "lambda_max")))

    @jax.jit
    def both(params, s_inner, s_wrapped):
        grads = jax.grad(lambda p: _loss(eqx.combine(p, static), batch))(params)
        u1, s_inner = inner.update(grads, s_inner, params)
        u2, s_wrapped = wrapped.update(
            grads, s_wrapped, params, model_fn=model_fn, batch=batch, unused=1
        )
        return u1, u2, s_inner, s_wrapped

    seen = []
    for _ in range(5):
        u1, u2, s_inner, s_wrapped = both(params, s_inner, s_wrapped)
        assert jax.tree.all(jax.tree.map(jnp.array_equal, u1, u2))  # bit-identical
        seen.append(
            (
                int(optax.tree.get(s_wrapped, "step")),
                float(optax.tree.get(s_wrapped, "lambda_max")),
            )
        )
        params = optax.apply_updates(params, u1)
    steps = [s for s, _ in seen]
    assert steps == [0, 0, 0, 3, 3]
    assert seen[1][1] == seen[0][1] and seen[4][1] == seen[3][1]
    assert seen[3][1] != seen[0][1]


def test_bad_monitor_configuration():
    with pytest.raises(ValueError, match="every"):
        eqx_ggn.CurvatureMonitor(loss_fn="mse", every=0)
    with pytest.raises(ValueError, match="Unknown curvature"):
        eqx_ggn.CurvatureMonitor(loss_fn="mse", curvature="kfac")
    with pytest.raises(ValueError, match="Unknown loss_fn"):
        eqx_ggn.CurvatureMonitor(loss_fn="hinge")
    monitor = eqx_ggn.CurvatureMonitor(loss_fn="mse")
    with pytest.raises(ValueError, match="batch="):
        monitor(0, {"w": jnp.ones(2)}, model_fn=lambda input, params: params["w"])  # noqa: A006
