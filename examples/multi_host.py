"""Multi-host data parallelism: one `gauss_newton` step across processes.

The same program runs in every process (JAX's multi-controller SPMD model). Each
process loads only its own slice of the batch, `jax.make_array_from_process_local_data`
assembles the global, batch-sharded array, the parameters are replicated, and
the jitted training step is plain `jax.jit`: XLA inserts the cross-process sums of
the gradient, of every GGN-vector product inside CG and of the CG inner products.

Run it on one machine, as N CPU processes talking over localhost:

    python examples/multi_host.py --processes 2

(the launcher starts the N workers; each one calls `jax.distributed.initialize`).
On a cluster, start one worker per host yourself, e.g. under SLURM, where
`jax.distributed.initialize()` needs no arguments:

    srun python examples/multi_host.py --worker

Each worker prints the loss after every step. Worker 0 finally repeats the same steps
on the whole batch in one process and prints the largest difference in the
parameters: multi-process training gives the single-process result.
"""

# %%
import argparse
import os
import subprocess
import sys


def launch(processes: int, steps: int, port: int) -> None:
    """Start `processes` local CPU workers and wait for them."""
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                f"--processes={processes}",
                f"--process-id={i}",
                f"--steps={steps}",
                f"--port={port}",
            ],
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )
        for i in range(processes)
    ]
    codes = [w.wait(timeout=600) for w in workers]
    if any(codes):
        raise SystemExit(f"a worker failed: exit codes {codes}")


# %%
def worker(args: argparse.Namespace) -> None:
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    import eqx_ggn

    if args.process_id is None:  # a cluster launcher sets everything
        jax.distributed.initialize()
    else:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"localhost:{args.port}",
            num_processes=args.processes,
            process_id=args.process_id,
        )
    rank, size = jax.process_index(), jax.process_count()

    # The whole data set is generated identically everywhere here; a real job
    # would read only rows [rank * local, (rank + 1) * local) from disk.
    global_batch = 256
    local = global_batch // size
    x = np.asarray(
        jax.random.uniform(jax.random.key(1), (global_batch, 2), minval=-2, maxval=2)
    )
    y = np.sin(x[:, :1]) * np.cos(x[:, 1:])
    mine = slice(rank * local, (rank + 1) * local)

    mesh = Mesh(jax.devices(), ("data",))  # every device of every process
    data_sharding = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    batch = {
        "input": jax.make_array_from_process_local_data(data_sharding, x[mine]),
        "target": jax.make_array_from_process_local_data(data_sharding, y[mine]),
    }

    model = eqx.nn.MLP(2, 1, 32, 2, activation=jnp.tanh, key=jax.random.key(0))
    params, static = eqx_ggn.partition(model)
    model_fn = eqx_ggn.as_model_fn(static)
    opt = eqx_ggn.gauss_newton(
        1.0, loss_fn="mse", adaptive_damping=True, damping=1e-1, cg_maxiter=30
    )

    def loss(params, batch):
        pred = jax.vmap(lambda xi: model_fn(input=xi, params=params))(batch["input"])
        return jnp.mean(jnp.sum((pred - batch["target"]) ** 2, axis=-1))

    @jax.jit
    def step(params, state, batch):
        value, grads = jax.value_and_grad(loss)(params, batch)
        updates, state = opt.update(
            grads, state, params, model_fn=model_fn, batch=batch
        )
        return optax.apply_updates(params, updates), state, value

    def train(params, batch, steps):
        state = opt.init(params)
        losses = []
        for _ in range(steps):
            params, state, value = step(params, state, batch)
            losses.append(float(value))
        return params, losses

    sharded_params = jax.device_put(params, replicated)
    one_step, _ = train(sharded_params, batch, 1)
    trained, losses = train(sharded_params, batch, args.steps)
    print(
        f"[process {rank}/{size}] {len(jax.local_devices())} local of "
        f"{jax.device_count()} devices; loss per step: "
        + " ".join(f"{v:.2e}" for v in losses),
        flush=True,
    )
    if rank == 0:
        # The reference: the same steps on the whole batch, on this process only.
        local_device = jax.local_devices()[0]
        whole = jax.device_put({"input": x, "target": y}, local_device)
        local_params = jax.device_put(params, local_device)

        def relative_difference(sharded, steps):
            reference, _ = train(local_params, whole, steps)
            # Replicated outputs are fully addressable from every process.
            a = np.concatenate([np.ravel(v) for v in jax.tree.leaves(sharded)])
            b = np.concatenate([np.ravel(v) for v in jax.tree.leaves(reference)])
            return np.linalg.norm(a - b) / np.linalg.norm(b)

        first = relative_difference(one_step, 1)
        last = relative_difference(trained, args.steps)
        print(
            "\n| processes | steps | final loss | relative parameter difference "
            "to 1 process after step 1 | after the last step |"
        )
        print("|---|---|---|---|---|")
        print(
            f"| {size} | {args.steps} | {losses[-1]:.3e} | {first:.1e} | {last:.1e} |",
            flush=True,
        )
    jax.distributed.shutdown()


# %%
if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--port", type=int, default=12355)
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="3 steps")
    args = parser.parse_args()
    if args.quick:
        args.steps = 3
    if args.worker:
        worker(args)
    else:
        launch(args.processes, args.steps, args.port)
