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
    mapped = _shard_mapped(mesh, model_fn, loss, sharded_params, sharded_batch, v)
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
        # The same inside `jax.shard_map`, with `axis_name="data"` and psums.
        "shard_map_mv": rel(mapped["products"][0], single[0]),
        "shard_map_grad": rel(mapped["products"][1], single[1]),
        "shard_map_loss": rel(mapped["products"][2], single[2]),
        "shard_map_micro_mv": rel(mapped["micro"], single[0]),
        "shard_map_nan_params_unchanged": bool(
            jnp.array_equal(
                ravel_pytree(mapped["nan_shard"][0])[0], ravel_pytree(params)[0]
            )
        ),
        "shard_map_nan_accepted": mapped["nan_shard"][1],
        "pmap_mv": rel(mapped["pmap"][0], single[0]),
        "pmap_grad": rel(mapped["pmap"][1], single[1]),
        "shard_map_unchecked_mv": rel(mapped["unchecked"][0], single[0]),
        "shard_map_unchecked_grad": rel(mapped["unchecked"][1], single[1]),
        "shard_map_step": rel(
            jax.tree.map(jnp.subtract, mapped["step"][0], params), step_single
        ),
        "shard_map_accepted": bool(mapped["step"][1][0].accepted),
        "shard_map_lambda_max": rel(
            mapped["monitor"]["lambda_max"], m_single["lambda_max"]
        ),
        "shard_map_trace": rel(mapped["monitor"]["trace"], m_single["trace"]),
    }
    json.dump(result, sys.stdout)


def _shard_mapped(mesh, model_fn, loss, params, batch, v):
    """Products, a step and the monitor inside `jax.shard_map` over axis "data",
    and the products under `jax.pmap`."""
    rep, split = PartitionSpec(), PartitionSpec("data")

    def mapped(fn, in_specs, check_vma=True):
        return jax.jit(
            jax.shard_map(
                fn, mesh=mesh, in_specs=in_specs, out_specs=rep, check_vma=check_vma
            )
        )

    def products(params, batch, v):
        op = eqx_ggn.curvature_operator(
            model_fn, params, batch, "cross_entropy", axis_name="data"
        )
        return op.mv(v), op.grad, op.loss

    def micro(params, batch, v):
        op = eqx_ggn.curvature_operator(
            model_fn,
            params,
            batch,
            "cross_entropy",
            num_microbatches=2,
            relinearize=True,
            axis_name="data",
        )
        return op.mv(v)

    opt = eqx_ggn.gauss_newton(
        1.0,
        loss_fn="cross_entropy",
        adaptive_damping=True,
        damping=1.0,
        cg_maxiter=20,
        axis_name="data",
    )

    def step(params, state, batch):
        # The global mean loss; its gradient is the global one on every device.
        grads = jax.grad(lambda p: jax.lax.pmean(loss(p, batch), "data"))(params)
        updates, state = opt.update(
            grads, state, params, model_fn=model_fn, batch=batch
        )
        return optax.apply_updates(params, updates), state

    monitor = eqx_ggn.CurvatureMonitor(
        loss_fn="cross_entropy", every=1, top_k=2, axis_name="data"
    )
    shards = jax.tree.map(lambda a: a.reshape(4, -1, *a.shape[1:]), batch)
    pmapped = jax.pmap(lambda b: products(params, b, v), axis_name="data")(shards)
    # A NaN in one device's shard: every device rejects the step.
    bad = {**batch, "input": batch["input"].at[40, 0].set(jnp.nan)}
    bad = jax.device_put(bad, jax.sharding.NamedSharding(mesh, split))
    step_bad = jax.jit(
        jax.shard_map(step, mesh=mesh, in_specs=(rep, rep, split), out_specs=(rep, rep))
    )
    after_bad, state_bad = step_bad(params, opt.init(params), bad)
    return {
        "nan_shard": (after_bad, bool(state_bad[0].accepted)),
        "pmap": jax.tree.map(lambda a: a[0], pmapped),
        "products": mapped(products, (rep, split, rep))(params, batch, v),
        # Without shard_map's type checks JAX adds no psum of its own.
        "unchecked": mapped(products, (rep, split, rep), False)(params, batch, v),
        "micro": mapped(micro, (rep, split, rep))(params, batch, v),
        "step": mapped(step, (rep, rep, split))(params, opt.init(params), batch),
        "monitor": mapped(
            lambda p, b: monitor(0, p, model_fn=model_fn, batch=b), (rep, split)
        )(params, batch),
    }


if __name__ == "__main__":
    main()
