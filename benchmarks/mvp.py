"""GGN-vector product versus gradient cost, eqx_ggn against laplax 0.0.2.

Each timed function runs 10 steps of a `lax.fori_loop` inside one `jax.jit`; the
reported number is the median wall time of one run divided by 10 (one step).

- `grad`: the gradient of the batch-mean loss, at a point that moves every step (so
  XLA cannot hoist the forward pass out of the loop).
- `eqx_ggn mvp`: `CurvatureOperator.mv`, the operator linearized beforehand and
  passed into the jitted loop as a pytree (`linearize` reports that one-off cost).
- `laplax mvp`: `laplax.curv.ggn.create_ggn_mv(...)` built inside the jitted loop,
  as laplax users write it.
- `bwd mvp`: the same product with `jac="bwd"` (reverse mode only, for models
  with a `jax.custom_vjp`): `J v` as the VJP of the VJP.
- Peak memory (MiB, XLA's `memory_analysis` of one compiled call: arguments,
  outputs and temporaries) of the gradient, and of linearizing plus one product
  in each mode, at a new point.

Usage: `python benchmarks/mvp.py` (an MLP, and a small CNN on a batch of 32) or
`python benchmarks/mvp.py --all` (adds the CNN on a batch of 256 and the
59M-parameter MLP in float32 and bfloat16; meant for a GPU).
"""

import argparse
import datetime
import platform
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
from laplax.curv.ggn import create_ggn_mv as laplax_create_ggn_mv

import eqx_ggn


def _median_time(fn, *args, repeats):
    jax.block_until_ready(fn(*args))  # compile
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_mib(fn, *args):
    """Peak memory of one compiled call of `jax.jit(fn)`, in MiB (XLA's
    `memory_analysis`: arguments, outputs and temporaries, less aliasing)."""
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    total = (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )
    return total / 2**20


class SmallCNN(eqx.Module):
    layers: list

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.layers = [
            eqx.nn.Conv2d(3, 32, 3, padding=1, key=k1),
            jax.nn.relu,
            eqx.nn.MaxPool2d(2, 2),
            eqx.nn.Conv2d(32, 64, 3, padding=1, key=k2),
            jax.nn.relu,
            eqx.nn.MaxPool2d(2, 2),
            jnp.ravel,
            eqx.nn.Linear(64 * 8 * 8, 10, key=k3),
        ]

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def make_case(name, key, dtype):
    kx, ky, km = jax.random.split(key, 3)
    if name == "mlp784":
        model = eqx.nn.MLP(784, 10, 512, 4, activation=jax.nn.relu, key=km)
        batch, in_shape, classes = 256, (784,), 10
    elif name == "mlp59m":
        model = eqx.nn.MLP(1024, 1000, 4096, 4, activation=jax.nn.relu, key=km)
        batch, in_shape, classes = 1024, (1024,), 1000
    elif name in ("cnn", "cnn32"):  # cnn32: a batch of 32, for a CPU
        model = SmallCNN(km)
        batch, in_shape, classes = 256 if name == "cnn" else 32, (3, 32, 32), 10
    else:
        raise ValueError(name)
    model = jax.tree.map(
        lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, model
    )
    x = jax.random.normal(kx, (batch, *in_shape), dtype)
    y = jax.nn.one_hot(
        jax.random.randint(ky, (batch,), 0, classes), classes, dtype=dtype
    )
    return model, {"input": x, "target": y}, batch


def bench(name, dtype, repeats, steps=10):
    model, data, batch = make_case(name, jax.random.key(0), dtype)
    params, static = eqx_ggn.partition(model)
    model_fn = eqx_ggn.as_model_fn(static)
    n_params = sum(x.size for x in jax.tree.leaves(params))

    def objective(p):
        pred = jax.vmap(lambda x: model_fn(input=x, params=p))(data["input"])
        return jnp.mean(jax.vmap(eqx_ggn.cross_entropy_loss)(pred, data["target"]))

    def tiny(tree, a):
        return jax.tree.map(lambda x, y: x + jnp.asarray(1e-4, x.dtype) * y, tree, a)

    @jax.jit
    def grad_loop(p):
        zeros = jax.tree.map(jnp.zeros_like, p)
        return jax.lax.fori_loop(
            0, steps, lambda i, g: jax.grad(objective)(tiny(p, g)), zeros
        )

    @eqx.filter_jit
    def linearize(p, jac="fwd"):
        return eqx_ggn.curvature_operator(model_fn, p, data, "cross_entropy", jac=jac)

    @eqx.filter_jit
    def ours_loop(op, v0):
        return jax.lax.fori_loop(0, steps, lambda i, v: tiny(v0, op.mv(v)), v0)

    @jax.jit
    def laplax_loop(p, v0):
        mv = laplax_create_ggn_mv(
            model_fn, p, data, "cross_entropy", num_total_samples=1
        )  # the same factor as ours: 1/batch, so the iterates match
        return jax.lax.fori_loop(0, steps, lambda i, v: tiny(v0, mv(v)), v0)

    v0 = jax.tree.map(jnp.ones_like, params)
    op = linearize(params)
    t_grad = _median_time(grad_loop, params, repeats=repeats) / steps
    t_lin = _median_time(linearize, params, repeats=repeats)
    t_ours = _median_time(ours_loop, op, v0, repeats=repeats) / steps
    t_lap = _median_time(laplax_loop, params, v0, repeats=repeats) / steps
    t_bwd = _median_time(ours_loop, linearize(params, "bwd"), v0, repeats=repeats)

    def product_at(jac):
        def product(p, v):
            op = eqx_ggn.curvature_operator(model_fn, p, data, "cross_entropy", jac=jac)
            return op.mv(v)

        return product

    memory = {
        "grad_mib": peak_mib(jax.grad(objective), params),
        "fwd_mib": peak_mib(product_at("fwd"), params, v0),
        "bwd_mib": peak_mib(product_at("bwd"), params, v0),
    }
    return {
        "case": name,
        "dtype": jnp.dtype(dtype).name,
        "params": n_params,
        "batch": batch,
        "grad_ms": 1e3 * t_grad,
        "linearize_ms": 1e3 * t_lin,
        "ours_ms": 1e3 * t_ours,
        "laplax_ms": 1e3 * t_lap,
        "bwd_ms": 1e3 * t_bwd / steps,
        **memory,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="all cases (for a GPU)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--case", help="only this case: mlp784, cnn32, cnn, mlp59m")
    args = parser.parse_args()
    cases = [("mlp784", jnp.float32), ("cnn32", jnp.float32)]
    if args.all:
        cases += [
            ("cnn", jnp.float32),
            ("mlp59m", jnp.float32),
            ("mlp59m", jnp.bfloat16),
        ]
    if args.case is not None:
        cases = [c for c in cases if c[0] == args.case] or [(args.case, jnp.float32)]
    device = jax.devices()[0]
    print(
        f"# {datetime.date.today()} | {device.platform}: {device.device_kind} | "
        f"{platform.processor() or platform.machine()} | jax {jax.__version__}"
    )
    print(
        "| case | dtype | params | batch | grad ms | linearize ms | eqx_ggn MVP ms "
        "| laplax MVP ms | eqx_ggn MVP / grad | laplax MVP / grad | laplax / eqx_ggn "
        "| bwd MVP ms | bwd / fwd MVP | grad MiB | fwd lin+MVP MiB | bwd lin+MVP MiB |"
    )
    print("|---" * 16 + "|")
    for name, dtype in cases:
        r = bench(name, dtype, args.repeats)
        print(
            f"| {r['case']} | {r['dtype']} | {r['params']:,} | {r['batch']} "
            f"| {r['grad_ms']:.3f} | {r['linearize_ms']:.3f} | {r['ours_ms']:.3f} "
            f"| {r['laplax_ms']:.3f} | {r['ours_ms'] / r['grad_ms']:.2f} "
            f"| {r['laplax_ms'] / r['grad_ms']:.2f} "
            f"| {r['laplax_ms'] / r['ours_ms']:.2f} "
            f"| {r['bwd_ms']:.3f} | {r['bwd_ms'] / r['ours_ms']:.2f} "
            f"| {r['grad_mib']:.1f} | {r['fwd_mib']:.1f} | {r['bwd_mib']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
