"""Run by tests/test_sharding.py in a subprocess with 4 forced CPU devices.

Compares the operator's product and gradient (also micro-batched), a full optimizer
step and the monitor's metrics on a batch sharded over the devices (parameters
replicated, plain `jit`) against the same computations on one device, and prints the
relative errors as JSON.
"""

import json
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import eqx_ggn


def rel(a, b):
    a, b = ravel_pytree(a)[0], ravel_pytree(b)[0]
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def main():
    assert jax.device_count() == 4, jax.devices()
    mesh = Mesh(jax.devices(), ("data",))
    data_sharding = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())

    model = eqx.nn.MLP(5, 4, 32, 2, activation=jnp.tanh, key=jax.random.key(0))
    params, static = eqx_ggn.partition(model)
    model_fn = eqx_ggn.as_model_fn(static)
    x = jax.random.normal(jax.random.key(1), (64, 5))
    batch = {"input": x, "target": jax.random.randint(jax.random.key(2), (64,), 0, 4)}
    v = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size).reshape(p.shape)), params)

    sharded_batch = jax.device_put(batch, data_sharding)
    sharded_params = jax.device_put(params, replicated)
    assert len(sharded_batch["input"].sharding.device_set) == 4

    @jax.jit
    def products(params, batch, v):
        op = eqx_ggn.curvature_operator(model_fn, params, batch, "cross_entropy")
        return op.mv(v), op.grad, op.loss, op.predictions

    def micro(params, batch, v):
        op = eqx_ggn.curvature_operator(
            model_fn,
            params,
            batch,
            "cross_entropy",
            num_microbatches=4,
            relinearize=True,
        )
        return op.mv(v), op.predictions

    micro_sharded = jax.jit(micro).lower(sharded_params, sharded_batch, v).compile()

    def loss(p, batch):
        logits = jax.vmap(lambda xi: model_fn(input=xi, params=p))(batch["input"])
        return jax.vmap(eqx_ggn.cross_entropy_loss)(logits, batch["target"]).mean()

    opt = eqx_ggn.gauss_newton(
        1.0, loss_fn="cross_entropy", adaptive_damping=True, damping=1.0, cg_maxiter=20
    )

    @jax.jit
    def step(params, state, batch):
        grads = jax.grad(loss)(params, batch)
        updates, state = opt.update(
            grads, state, params, model_fn=model_fn, batch=batch
        )
        return optax.apply_updates(params, updates), state

    monitor = eqx_ggn.CurvatureMonitor(loss_fn="cross_entropy", every=1, top_k=2)
    monitored = jax.jit(lambda p, b: monitor(0, p, model_fn=model_fn, batch=b))

    single = products(params, batch, v)
    sharded = products(sharded_params, sharded_batch, v)
    new_single, state_single = step(params, opt.init(params), batch)
    new_sharded, state_sharded = step(
        sharded_params, opt.init(sharded_params), sharded_batch
    )
    # Compare the steps taken, not the parameters (a rejected step would be zero).
    step_single = jax.tree.map(jnp.subtract, new_single, params)
    step_sharded = jax.tree.map(jnp.subtract, new_sharded, params)
    mv_micro, pred_micro = micro_sharded(sharded_params, sharded_batch, v)
    m_single = monitored(params, batch)
    m_sharded = monitored(sharded_params, sharded_batch)
    result = {
        "devices": jax.device_count(),
        "input_shards": len(sharded_batch["input"].sharding.device_set),
        # Rows of the predictions each device holds: 16 if the forward pass ran
        # data-parallel, 64 if XLA had gathered the batch onto every device.
        "prediction_rows_per_device": sharded[3].addressable_shards[0].data.shape[0],
        "mv": rel(sharded[0], single[0]),
        "grad": rel(sharded[1], single[1]),
        "loss": rel(sharded[2], single[2]),
        "step": rel(step_sharded, step_single),
        # Micro-batches of a sharded batch stay sharded: no gather of the batch.
        "micro_mv": rel(mv_micro, single[0]),
        "micro_predictions": rel(pred_micro, single[3]),
        "micro_all_gathers": micro_sharded.as_text().count("all-gather("),
        "micro_prediction_rows_per_device": pred_micro.addressable_shards[0].data.shape[
            0
        ],
        "accepted": bool(state_single[0].accepted) and bool(state_sharded[0].accepted),
        "lambda_max": rel(m_sharded["lambda_max"], m_single["lambda_max"]),
        "trace": rel(m_sharded["trace"], m_single["trace"]),
    }
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
