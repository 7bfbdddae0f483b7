"""Micro-batching: the same numbers as the full batch, with less memory."""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest
from helpers import assert_rel_close, to_f64
from jax.flatten_util import ravel_pytree

import eqx_ggn


def _problem(loss_fn, batch=24):
    mlp = to_f64(eqx.nn.MLP(3, 2, 8, 2, activation=jnp.tanh, key=jax.random.key(0)))
    x = jax.random.normal(jax.random.key(1), (batch, 3), jnp.float64)
    labels = loss_fn == "cross_entropy"
    target = jnp.arange(batch) % 2 if labels else jnp.sin(x[:, :2])
    return mlp, {"input": x, "target": target}


@pytest.mark.parametrize("curvature", ["ggn", "empirical_fisher", "hessian"])
@pytest.mark.parametrize("loss_fn", ["mse", "cross_entropy"])
def test_microbatched_operator_equals_full_batch(x64, loss_fn, curvature):
    mlp, data = _problem(loss_fn)

    @eqx.filter_jit
    def everything(mlp, data):
        out = []
        for n, relinearize in [(1, False), (3, False), (4, True), (1, True)]:
            op = eqx_ggn.curvature_operator(
                model=mlp,
                data=data,
                loss_fn=loss_fn,
                curvature=curvature,
                num_microbatches=n,
                relinearize=relinearize,
            )
            form = op.quadratic_form([op.grad, jax.tree.map(jnp.cos, op.grad)])
            out.append((op.loss, op.grad, op.predictions, op.as_matrix(), form))
        return out

    (loss, grad, pred, matrix, form), *others = everything(mlp, data)
    vectors = [ravel_pytree(grad)[0], jnp.cos(ravel_pytree(grad)[0])]
    vectors = jnp.stack(vectors)
    assert_rel_close(form, vectors @ matrix @ vectors.T, 1e-12)
    for other_loss, other_grad, other_pred, other_matrix, other_form in others:
        assert_rel_close(other_loss, loss, 1e-12)
        assert_rel_close(other_grad, grad, 1e-12)
        assert_rel_close(other_pred, pred, 1e-12)
        assert_rel_close(other_matrix, matrix, 1e-12)
        assert_rel_close(other_form, form, 1e-12)


def test_microbatches_must_divide_the_batch(x64):
    mlp, data = _problem("mse", batch=10)
    with pytest.raises(ValueError, match=r"num_microbatches=4 does not divide .* 10"):
        eqx_ggn.curvature_operator(
            model=mlp, data=data, loss_fn="mse", num_microbatches=4
        )
    with pytest.raises(ValueError, match="num_microbatches must be a positive int"):
        eqx_ggn.scale_by_gauss_newton("mse", num_microbatches=0)


def test_microbatched_optimizer_step_equals_full_batch(x64):
    mlp, batch = _problem("mse")
    params, static = eqx_ggn.partition(mlp)
    model_fn = eqx_ggn.as_model_fn(static)
    common = {
        "loss_fn": "mse",
        "adaptive_damping": True,
        "damping": 1.0,
        "cg_maxiter": 20,
    }

    @jax.jit
    def steps(params):
        grads = jax.grad(
            lambda p: eqx_ggn.curvature_operator(model_fn, p, batch, "mse").loss
        )(params)
        out = []
        for n, relinearize in [(1, False), (4, False), (6, True)]:
            opt = eqx_ggn.gauss_newton(
                1.0, num_microbatches=n, relinearize=relinearize, **common
            )
            out.append(
                opt.update(
                    grads, opt.init(params), params, model_fn=model_fn, batch=batch
                )
            )
        return out

    (updates, state), *others = steps(params)
    for other_updates, other_state in others:
        assert_rel_close(other_updates, updates, 1e-10)
        assert_rel_close(other_state[0].loss, state[0].loss, 1e-6)
        assert_rel_close(other_state[0].damping, state[0].damping, 1e-6)
        assert int(other_state[0].cg_iterations) == int(state[0].cg_iterations)
    assert bool(state[0].accepted)
    new = optax.apply_updates(params, updates)
    assert jnp.all(jnp.isfinite(jax.flatten_util.ravel_pytree(new)[0]))


def test_relinearizing_microbatches_lowers_peak_memory():
    # XLA's compiled memory analysis of "linearize + 5 products" on a wide MLP: the
    # temporaries of the full batch against 8 re-linearized micro-batches.
    mlp = eqx.nn.MLP(16, 4, 128, 2, key=jax.random.key(0))
    params, static = eqx_ggn.partition(mlp)
    model_fn = eqx_ggn.as_model_fn(static)
    data = {"input": jnp.ones((512, 16)), "target": jnp.zeros((512, 4))}

    def temp_bytes(n, relinearize):
        def products(params, data):
            op = eqx_ggn.curvature_operator(
                model_fn,
                params,
                data,
                "mse",
                num_microbatches=n,
                relinearize=relinearize,
            )
            return jax.lax.fori_loop(0, 5, lambda i, v: op.mv(v), op.grad)

        compiled = jax.jit(products).lower(params, data).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    full, relinearized = temp_bytes(1, False), temp_bytes(8, True)
    assert relinearized < 0.5 * full, (relinearized, full)
