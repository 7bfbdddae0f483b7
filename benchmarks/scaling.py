"""Step time and peak memory against batch size and width, and micro-batching.

Model: `eqx.nn.MLP(64 -> 10)` with 2 hidden layers of width W (tanh), cross-entropy,
float32. For each (W, batch) the script times, with the median of `--repeats` runs:

- `grad`: `jax.value_and_grad` of the batch-mean loss;
- `mvp`: one GGN-vector product at a new point, `(params, data, v) -> G v`: the
  operator's forward pass and linearization plus one product (its gradient is
  unused and compiled away); `jvp+vjp` is the same product written without
  eqx_ggn (`jax.jvp`, the loss Hessian, `jax.vjp`: two forward passes), as a
  reference for what any product formulation costs;
- `grad+mvp`: build the operator, take its gradient and apply one product to it:
  what a step holds during its first CG iteration;
- `step`: one `eqx_ggn.gauss_newton` step with exactly 10 CG iterations
  (`cg_tol=0`, `cg_progress_tol=0`), including the user's gradient.

Memory is XLA's compiled memory analysis of the same jitted program
(`jit(f).lower(...).compile().memory_analysis()`): arguments + outputs + temporaries
(minus aliased buffers), i.e. the peak a device has to hold for that call. It is
exact and deterministic, unlike a sampled process RSS. `step50` repeats the step
with 50 CG iterations, so a memory that grew with the iteration count would show.

The micro-batching table splits the largest batch into `n` micro-batches, keeping
each linearization (`keep`) or recomputing it per product (`relinearize`).

Usage: `python benchmarks/scaling.py` (CPU sizes) or `--all` (adds width 4096 and
batch 16384, for a GPU).
"""

import argparse
import datetime
import platform

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from mvp import _median_time, peak_mib

import eqx_ggn


def _problem(width, batch, key=0):
    kx, ky, km = jax.random.split(jax.random.key(key), 3)
    model = eqx.nn.MLP(64, 10, width, 2, activation=jnp.tanh, key=km)
    params, static = eqx_ggn.partition(model)
    data = {
        "input": jax.random.normal(kx, (batch, 64)),
        "target": jax.random.randint(ky, (batch,), 0, 10),
    }
    return params, eqx_ggn.as_model_fn(static), data


def _programs(model_fn, cg_steps=10, **operator_kwargs):
    def objective(params, data):
        logits = jax.vmap(lambda x: model_fn(input=x, params=params))(data["input"])
        losses = jax.vmap(eqx_ggn.cross_entropy_loss)(logits, data["target"])
        return jnp.mean(losses)

    def grad(params, data):
        return jax.value_and_grad(objective)(params, data)

    def operator(params, data):
        return eqx_ggn.curvature_operator(
            model_fn, params, data, "cross_entropy", **operator_kwargs
        )

    def mvp(params, data, vector):
        return operator(params, data).mv(vector)

    def reference_mvp(params, data, vector):
        # The textbook product without eqx_ggn: jvp, loss Hessian, vjp (two passes).
        def predict(p):
            return jax.vmap(lambda x: model_fn(input=x, params=p))(data["input"])

        def mean_loss(logits):
            return jnp.mean(
                jax.vmap(eqx_ggn.cross_entropy_loss)(logits, data["target"])
            )

        logits, jv = jax.jvp(predict, (params,), (vector,))
        hjv = jax.jvp(jax.grad(mean_loss), (logits,), (jv,))[1]
        return jax.vjp(predict, params)[1](hjv)[0]

    def grad_mvp(params, data):
        op = operator(params, data)
        return op.loss, op.grad, op.mv(op.grad)

    def step(params, data, cg_steps=cg_steps):
        opt = eqx_ggn.gauss_newton(
            1.0,
            loss_fn="cross_entropy",
            cg_maxiter=cg_steps,
            cg_tol=0.0,
            cg_progress_tol=0.0,
            **operator_kwargs,
        )
        grads = jax.grad(objective)(params, data)
        updates, state = opt.update(
            grads, opt.init(params), params, model_fn=model_fn, batch=data
        )
        return optax.apply_updates(params, updates), state[0].cg_iterations

    return {
        "grad": grad,
        "mvp": mvp,
        "jvp+vjp": reference_mvp,
        "grad+mvp": grad_mvp,
        "step": step,
    }


def _arguments(name, params, data):
    return (params, data, params) if name in ("mvp", "jvp+vjp") else (params, data)


def _row(cells):
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--all", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    widths = [128, 512, 2048] + ([4096] if args.all else [])
    batches = [256, 1024] + ([4096, 16384] if args.all else [])
    device = jax.devices()[0]
    machine = f"{device.device_kind} ({platform.processor() or ''})"
    print(f"# {datetime.date.today()}, {machine}, jax {jax.__version__}, float32\n")
    columns = ["grad", "mvp", "jvp+vjp", "grad+mvp", "step"]
    print(
        _row(
            ["width", "params", "batch"]
            + [f"{c} ms" for c in ("grad", "mvp", "step")]
            + [f"{c} MiB" for c in columns]
            + ["step50 MiB", "mvp/grad mem", "jvp+vjp/grad mem", "(grad+mvp)/grad mem"]
        )
    )
    print(_row(["---"] * 15))
    for width in widths:
        for batch in batches:
            params, model_fn, data = _problem(width, batch)
            programs = _programs(model_fn)
            times = {
                name: 1e3
                * _median_time(
                    jax.jit(programs[name]),
                    *_arguments(name, params, data),
                    repeats=args.repeats,
                )
                for name in ("grad", "mvp", "step")
            }
            memory = {
                name: peak_mib(programs[name], *_arguments(name, params, data))
                for name in columns
            }
            step = programs["step"]
            step50 = peak_mib(lambda p, d, s=step: s(p, d, cg_steps=50), params, data)
            size = sum(x.size for x in jax.tree.leaves(params))
            print(
                _row(
                    [width, f"{size:,}", batch]
                    + [f"{times[c]:.2f}" for c in ("grad", "mvp", "step")]
                    + [f"{memory[c]:.1f}" for c in columns]
                    + [
                        f"{step50:.1f}",
                        f"{memory['mvp'] / memory['grad']:.2f}",
                        f"{memory['jvp+vjp'] / memory['grad']:.2f}",
                        f"{memory['grad+mvp'] / memory['grad']:.2f}",
                    ]
                ),
                flush=True,
            )

    width, batch = (2048, 16384) if args.all else (512, 4096)
    params, model_fn, data = _problem(width, batch)
    print(f"\n## Micro-batching: width {width}, batch {batch}\n")
    print(_row(["n", "mode", "mvp ms", "step ms", "mvp MiB", "step MiB"]))
    print(_row(["---"] * 6))
    for n, relinearize in [(1, False), (4, False), (4, True), (16, True)]:
        programs = _programs(model_fn, num_microbatches=n, relinearize=relinearize)
        cells = [n, "relinearize" if relinearize else "keep"]
        for name in ("mvp", "step"):
            fn = jax.jit(programs[name])
            arguments = _arguments(name, params, data)
            seconds = _median_time(fn, *arguments, repeats=args.repeats)
            cells.append(f"{1e3 * seconds:.1f}")
        for name in ("mvp", "step"):
            arguments = _arguments(name, params, data)
            cells.append(f"{peak_mib(programs[name], *arguments):.1f}")
        print(_row(cells), flush=True)


if __name__ == "__main__":
    main()
