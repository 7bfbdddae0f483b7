"""Neural ODE (diffrax, default adjoint): Gauss-Newton against Adam and L-BFGS at
equal wall time, over several seeds (data set and initialization).

The problem, the model and the optimizers are those of `examples/neural_ode.py`
(imported from it): the cubic spiral, an MLP vector field, diffrax's Tsit5 with
`RecursiveCheckpointAdjoint`, `gauss_newton(1.0, loss_fn="mse", solver="auto")`
with every other keyword at its default (reverse mode, picked by `jac=None`),
`optax.adam(1e-2)` and `optax.lbfgs()`, full batch. Prints the training loss at
each time mark per seed, then the median and the worst over the seeds.

Usage: `python benchmarks/neural_ode.py --seeds 3 --budget 30`.
"""

import argparse
import datetime
import importlib.util
import pathlib
import platform
import statistics

import jax


spec = importlib.util.spec_from_file_location(
    "neural_ode",
    pathlib.Path(__file__).resolve().parents[1] / "examples" / "neural_ode.py",
)
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", type=float, default=30.0)
    args = parser.parse_args()
    marks = [t for t in (1, 3, 10) if t < args.budget] + [args.budget]
    device = jax.devices()[0]
    print(
        f"# {datetime.date.today()} | {device.platform}: {device.device_kind} | "
        f"{platform.processor() or platform.machine()} | jax {jax.__version__}"
    )
    table = {}
    for seed in range(args.seeds):
        results, _ = example.run(seed, args.budget)
        for name, (_, history) in results.items():
            cells = [min(v for t, v in history if t <= m) for m in marks]
            table.setdefault(name, []).append((len(history) - 2, cells))
    head = " | ".join(f"loss at {m:g} s" for m in marks)
    print(f"\n| optimizer | seed | steps | {head} |")
    print("|---" * (len(marks) + 3) + "|")
    for name, rows in table.items():
        for seed, (steps, cells) in enumerate(rows):
            print(
                f"| {name} | {seed} | {steps} | "
                + " | ".join(f"{c:.2e}" for c in cells)
                + " |"
            )
    print(f"\n| optimizer | median {head} | worst {head} |")
    print("|---" * (2 * len(marks) + 1) + "|")
    for name, rows in table.items():
        columns = list(zip(*(cells for _, cells in rows), strict=True))
        median = [statistics.median(c) for c in columns]
        worst = [max(c) for c in columns]
        print(f"| {name} | " + " | ".join(f"{c:.2e}" for c in median + worst) + " |")


if __name__ == "__main__":
    main()
