"""Where a PINN's error levels off: training loss, error and off-set residual.

Runs `gauss_newton(1.0, loss_fn="mse", solver="sample_space")` with every other
keyword at its default on one PDE of `benchmarks/pinn_poisson.py` and prints, at
10, 30, 60 and 90 s: the relative L2 error on the 101x101 grid, the training
loss (the mean squared residual on the collocation points), the mean squared
interior residual at 4,000 fresh uniform points (the same residual, off the
collocation set), and the damping. A training loss that keeps falling while the
fresh residual stays put means the network fits the points, not the PDE between
them: a limit of the collocation set, not of the optimizer.

Usage: `python benchmarks/pinn_plateau.py [--pde helmholtz] [--seed 0]`.
"""

import argparse
import importlib.util
import pathlib
import time

import jax
import jax.numpy as jnp


_spec = importlib.util.spec_from_file_location(
    "pinn_benchmark", pathlib.Path(__file__).with_name("pinn_poisson.py")
)
pinn_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pinn_benchmark)  # also turns on float64

import eqx_ggn  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pde", default="helmholtz", choices=["poisson", "helmholtz"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    problem = pinn_benchmark.PROBLEMS[args.pde]
    model, batch, make_model_fn, make_error_fn = problem(args.seed)
    params, static = eqx_ggn.partition(model)
    model_fn, error_fn = make_model_fn(static), make_error_fn(static)
    # Interior points (third input column 0: not on the boundary).
    xy = jax.random.uniform(jax.random.key(7), (4000, 2))
    fresh = jnp.concatenate([xy, jnp.zeros((4000, 1))], axis=1)

    def mean_squared_residual(p, inputs):
        r = jax.vmap(lambda x: model_fn(input=x, params=p))(inputs)
        return jnp.mean(r**2)

    train_loss = jax.jit(lambda p: mean_squared_residual(p, batch["input"]))
    fresh_loss = jax.jit(lambda p: mean_squared_residual(p, fresh))
    opt = eqx_ggn.gauss_newton(1.0, loss_fn="mse", solver="sample_space")
    step = jax.jit(pinn_benchmark.pinn.gauss_newton_step(opt, model_fn, batch))
    carry = jax.block_until_ready(step((params, opt.init(params))))  # compile
    print(f"# {args.pde}, seed {args.seed}, jax {jax.__version__}, float64")
    print(
        "| time (s) | steps | relative L2 | training loss | fresh residual | damping |"
    )
    print("|---|---|---|---|---|---|")
    marks, steps, start = [10, 30, 60, 90], 0, time.perf_counter()
    while marks:
        carry = jax.block_until_ready(step(carry))
        steps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= marks[0]:
            marks.pop(0)
            p, state = carry
            print(
                f"| {elapsed:.0f} | {steps} | {float(error_fn(p)):.2e} | "
                f"{float(train_loss(p)):.2e} | {float(fresh_loss(p)):.2e} | "
                f"{float(state[0].damping):.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
