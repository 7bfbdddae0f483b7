"""Run by tests/test_sharding.py in a subprocess with 4 forced CPU devices.

Runs the operator's product and gradient (also micro-batched), a full optimizer step
and the monitor on one device, on a batch sharded over the devices (parameters
replicated, plain `jit`), and written per device inside `jax.shard_map` with
`axis_name`, and prints the relative errors against one device as JSON.
"""

import functools
import json
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import eqx_ggn


REP, SPLIT = PartitionSpec(), PartitionSpec("data")
# shard_map's (in_specs, out_specs) of each program below.
SPECS = {
    "products": ((REP, SPLIT, REP), (REP, REP, REP, SPLIT)),
    "micro": ((REP, SPLIT, REP), (REP, SPLIT)),
    "step": ((REP, SPLIT), (REP, REP)),
    "dense_step": ((REP, SPLIT), (REP, REP)),
    "kfac_step": ((REP, SPLIT), (REP, REP)),
    "kfac_quarter_step": ((REP, SPLIT), (REP, REP)),
    "monitor": ((REP, SPLIT), (REP, REP)),
}


def rel(a, b):
    a, b = ravel_pytree(a)[0], ravel_pytree(b)[0]
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def programs(model_fn, static, axis_name=None, jac=None):
    """The computations under test; with `axis_name`, written per device; with
    `jac`, linearized in that mode."""
    mapped = {} if axis_name is None else {"axis_name": axis_name}
    mapped |= {} if jac is None else {"jac": jac}

    def loss(p, batch):
        logits = jax.vmap(lambda xi: model_fn(input=xi, params=p))(batch["input"])
        value = jax.vmap(eqx_ggn.cross_entropy_loss)(logits, batch["target"]).mean()
        # Per device, the global mean loss: its gradient is the global one.
        return value if axis_name is None else jax.lax.pmean(value, axis_name)

    def products(params, batch, v):
        op = eqx_ggn.curvature_operator(
            model_fn, params, batch, "cross_entropy", **mapped
        )
        return op.mv(v), op.grad, op.loss, op.predictions

    def micro(params, batch, v):
        op = eqx_ggn.curvature_operator(
            model_fn,
            params,
            batch,
            "cross_entropy",
            num_microbatches=4,
            relinearize=True,
            **mapped,
        )
        return op.mv(v), op.predictions

    opt = eqx_ggn.gauss_newton(
        1.0,
        loss_fn="cross_entropy",
        adaptive_damping=True,
        damping=1.0,
        cg_maxiter=20,
        **mapped,
    )

    def step(params, batch):
        grads = jax.grad(loss)(params, batch)
        updates, state = opt.update(
            grads, opt.init(params), params, model_fn=model_fn, batch=batch
        )
        return optax.apply_updates(params, updates), state[0].accepted

    dense = eqx_ggn.gauss_newton(
        1.0, loss_fn="cross_entropy", solver="dense", damping=1e-2, **mapped
    )

    def dense_step(params, batch):  # per-shard A^T A, one psum
        grads = jax.grad(loss)(params, batch)
        updates, state = dense.update(
            grads, dense.init(params), params, model_fn=model_fn, batch=batch
        )
        return optax.apply_updates(params, updates), state[0].accepted

    def kfac_program(**kwargs):
        kfac = eqx_ggn.gauss_newton(
            1.0, loss_fn="cross_entropy", solver="kfac", **mapped, **kwargs
        )

        def kfac_step(params, batch):  # per-shard factor sums, one psum each
            grads = jax.grad(loss)(params, batch)
            model = eqx.combine(params, static)
            updates, state = kfac.update(
                grads, kfac.init(params), params, model=model, batch=batch
            )
            return optax.apply_updates(params, updates), state[0].accepted

        return kfac_step

    monitor = eqx_ggn.CurvatureMonitor(
        loss_fn="cross_entropy", every=1, top_k=2, **mapped
    )

    def monitored(params, batch):
        metrics = monitor(0, params, model_fn=model_fn, batch=batch)
        return metrics["lambda_max"], metrics["trace"]

    return {
        "products": products,
        "micro": micro,
        "step": step,
        "dense_step": dense_step,
        "kfac_step": kfac_program(),
        # The rescaling's curvature from every fourth sample of each shard (the
        # same rows as every fourth of the batch), its spread summed over shards.
        "kfac_quarter_step": kfac_program(kfac_rescale_tol=float("inf")),
        "monitor": monitored,
    }


def run(fns, wrap, params, batch, v):
    args = {"products": (params, batch, v), "micro": (params, batch, v)}
    return {
        name: wrap(name, fn)(*args.get(name, (params, batch)))
        for name, fn in fns.items()
    }


def compare(out, single, params):
    """Relative errors of one way of running against the single-device run."""

    def rows_per_device(x):
        return x.addressable_shards[0].data.shape[0]

    def taken(new_params):  # the step taken: a rejected step would be zero
        return jax.tree.map(jnp.subtract, new_params, params)

    return {
        "mv": rel(out["products"][0], single["products"][0]),
        "grad": rel(out["products"][1], single["products"][1]),
        "loss": rel(out["products"][2], single["products"][2]),
        # 16 of the 64 rows if the forward pass ran data-parallel, 64 if XLA had
        # gathered the batch onto every device.
        "prediction_rows_per_device": rows_per_device(out["products"][3]),
        "micro_mv": rel(out["micro"][0], single["products"][0]),
        "micro_predictions": rel(out["micro"][1], single["products"][3]),
        "micro_prediction_rows_per_device": rows_per_device(out["micro"][1]),
        "step": rel(taken(out["step"][0]), taken(single["step"][0])),
        "accepted": bool(out["step"][1]) and bool(single["step"][1]),
        "dense_step": rel(taken(out["dense_step"][0]), taken(single["dense_step"][0])),
        "dense_accepted": bool(out["dense_step"][1]) and bool(single["dense_step"][1]),
        "kfac_step": rel(taken(out["kfac_step"][0]), taken(single["kfac_step"][0])),
        "kfac_accepted": bool(out["kfac_step"][1]) and bool(single["kfac_step"][1]),
        "kfac_quarter_step": rel(
            taken(out["kfac_quarter_step"][0]), taken(single["kfac_quarter_step"][0])
        ),
        "lambda_max": rel(out["monitor"][0], single["monitor"][0]),
        "trace": rel(out["monitor"][1], single["monitor"][1]),
    }


def main():
    assert jax.device_count() == 4, jax.devices()
    mesh = Mesh(jax.devices(), ("data",))

    model = eqx.nn.MLP(5, 4, 32, 2, activation=jnp.tanh, key=jax.random.key(0))
    params, static = eqx_ggn.partition(model)
    model_fn = eqx_ggn.as_model_fn(static)
    x = jax.random.normal(jax.random.key(1), (64, 5))
    batch = {"input": x, "target": jax.random.randint(jax.random.key(2), (64,), 0, 4)}
    v = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size).reshape(p.shape)), params)

    sharded_batch = jax.device_put(batch, NamedSharding(mesh, SPLIT))
    sharded_params = jax.device_put(params, NamedSharding(mesh, REP))
    assert len(sharded_batch["input"].sharding.device_set) == 4

    def jitted(name, fn):
        return jax.jit(fn)

    @functools.cache  # the NaN check below reruns the compiled per-device step
    def shard_mapped(name, fn, check_vma=True):
        in_specs, out_specs = SPECS[name]
        return jax.jit(
            jax.shard_map(
                fn,
                mesh=mesh,
                in_specs=in_specs,
                out_specs=out_specs,
                check_vma=check_vma,
            )
        )

    plain = programs(model_fn, static)
    per_device = programs(model_fn, static, axis_name="data")
    single = run(plain, jitted, params, batch, v)
    sharded = run(plain, jitted, sharded_params, sharded_batch, v)
    mapped = run(per_device, shard_mapped, sharded_params, sharded_batch, v)

    # Micro-batches of a sharded batch stay sharded: no gather of the batch.
    micro = jitted("micro", plain["micro"])
    compiled = micro.lower(sharded_params, sharded_batch, v).compile()
    # Without shard_map's type checks JAX adds no psum of its own.
    unchecked = shard_mapped("products", per_device["products"], check_vma=False)(
        sharded_params, sharded_batch, v
    )
    # The same per-device code under `jax.pmap`.
    shards = jax.tree.map(lambda a: a.reshape(4, -1, *a.shape[1:]), batch)
    pmapped = jax.pmap(
        lambda b: per_device["products"](params, b, v), axis_name="data"
    )(shards)
    pmapped = jax.tree.map(lambda a: a[0], pmapped[:3])  # device 0's global values
    # Reverse mode only (jac="bwd"), per device.
    backward = programs(model_fn, static, axis_name="data", jac="bwd")
    backward = {k: backward[k] for k in ("products", "step", "dense_step")}
    backward = run(backward, shard_mapped, sharded_params, sharded_batch, v)
    # A NaN in one device's shard: every device rejects the step.
    bad = {**batch, "input": batch["input"].at[40, 0].set(jnp.nan)}
    bad = jax.device_put(bad, NamedSharding(mesh, SPLIT))
    after_bad, accepted_bad = shard_mapped("step", per_device["step"])(
        sharded_params, bad
    )

    result = {
        "devices": jax.device_count(),
        "input_shards": len(sharded_batch["input"].sharding.device_set),
        "micro_all_gathers": compiled.as_text().count("all-gather("),
        **compare(sharded, single, params),
        **{f"shard_map_{k}": val for k, val in compare(mapped, single, params).items()},
        "shard_map_unchecked_mv": rel(unchecked[0], single["products"][0]),
        "shard_map_unchecked_grad": rel(unchecked[1], single["products"][1]),
        "pmap_mv": rel(pmapped[0], single["products"][0]),
        "pmap_grad": rel(pmapped[1], single["products"][1]),
        "bwd_shard_map_mv": rel(backward["products"][0], single["products"][0]),
        "bwd_shard_map_grad": rel(backward["products"][1], single["products"][1]),
        **{
            f"bwd_shard_map_{name}": rel(
                jax.tree.map(jnp.subtract, backward[name][0], params),
                jax.tree.map(jnp.subtract, single[name][0], params),
            )
            for name in ("step", "dense_step")
        },
        "shard_map_nan_accepted": bool(accepted_bad),
        "shard_map_nan_params_unchanged": bool(
            jnp.array_equal(ravel_pytree(after_bad)[0], ravel_pytree(params)[0])
        ),
    }
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
