"""Step time and peak memory against batch size and width, and micro-batching.

Model: `eqx.nn.MLP(64 -> 10)` with 2 hidden layers of width W (tanh), cross-entropy,
float32. For each (W, batch) the script times, with the median of `--repeats` runs:

- `grad`: `jax.value_and_grad` of the batch-mean loss;
- `mvp`: build the operator (forward pass, linearization, gradient) and apply one
  GGN-vector product (what a user pays for one product at a new point); `mvp
  relin.` is the same with `relinearize=True`, which keeps no linearization between
  products and recomputes the forward pass inside the product instead;
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
from mvp import _median_time

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

    def mvp(params, data):
        op = eqx_ggn.curvature_operator(
            model_fn, params, data, "cross_entropy", **operator_kwargs
        )
        return op.mv(op.grad)

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

    return {"grad": grad, "mvp": mvp, "step": step}


def _peak_mib(fn, *args):
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    total = (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )
    return total / 2**20


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
    print(
        _row(
            [
                "width",
                "params",
                "batch",
                "grad ms",
                "mvp ms",
                "step ms",
                "grad MiB",
                "mvp MiB",
                "step MiB",
                "step50 MiB",
                "mvp relin. MiB",
                "mvp/grad mem",
                "mvp relin./grad mem",
            ]
        )
    )
    print(_row(["---"] * 13))
    for width in widths:
        for batch in batches:
            params, model_fn, data = _problem(width, batch)
            programs = _programs(model_fn)
            times = {
                name: 1e3
                * _median_time(jax.jit(fn), params, data, repeats=args.repeats)
                for name, fn in programs.items()
            }
            memory = {
                name: _peak_mib(fn, params, data) for name, fn in programs.items()
            }
            step = programs["step"]
            step50 = _peak_mib(lambda p, d, s=step: s(p, d, cg_steps=50), params, data)
            relinearized = _peak_mib(
                _programs(model_fn, relinearize=True)["mvp"], params, data
            )
            size = sum(x.size for x in jax.tree.leaves(params))
            print(
                _row(
                    [
                        width,
                        f"{size:,}",
                        batch,
                        f"{times['grad']:.2f}",
                        f"{times['mvp']:.2f}",
                        f"{times['step']:.2f}",
                        f"{memory['grad']:.1f}",
                        f"{memory['mvp']:.1f}",
                        f"{memory['step']:.1f}",
                        f"{step50:.1f}",
                        f"{relinearized:.1f}",
                        f"{memory['mvp'] / memory['grad']:.2f}",
                        f"{relinearized / memory['grad']:.2f}",
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
            seconds = _median_time(fn, params, data, repeats=args.repeats)
            cells.append(f"{1e3 * seconds:.1f}")
        for name in ("mvp", "step"):
            cells.append(f"{_peak_mib(programs[name], params, data):.1f}")
        print(_row(cells), flush=True)


if __name__ == "__main__":
    main()
