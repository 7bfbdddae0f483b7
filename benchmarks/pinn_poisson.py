"""2-D Poisson PINN: eqx_ggn's Gauss-Newton against Adam, L-BFGS and optimistix LM.

`-Δu = f` on the unit square with `u = 0` on the boundary and the solution
`u = sin(πx) sin(πy)`. A tanh MLP 2-32-32-1 in float64, 30x30 interior and 4x31
boundary collocation points. `model_fn` returns the PDE residual at interior points
and `w * u` at boundary points (`--boundary-weight`, w = 100 by default, 1 for the
plain residuals), and the loss is `"mse"` against zero targets: the objective is
the mean squared residual, the same for every method. Every method gets the same
wall-clock budget on the same machine; the relative L2 error of `u` on a 101x101
grid is printed against wall time.

The problem, eqx_ggn's settings and the Adam and L-BFGS steps live in
`examples/pinn_poisson.py`; this script adds optimistix and the longer budget.

Run: `python benchmarks/pinn_poisson.py` (4 x 120 s by default), or
`python benchmarks/pinn_poisson.py --budget 20` for a short run.
"""

import argparse
import datetime
import importlib.util
import pathlib
import platform

import jax
import optimistix as optx


jax.config.update("jax_enable_x64", True)

import eqx_ggn  # noqa: E402


_path = pathlib.Path(__file__).parents[1] / "examples" / "pinn_poisson.py"
_spec = importlib.util.spec_from_file_location("pinn_example", _path)
pinn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pinn)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=120.0, help="seconds each")
    parser.add_argument(
        "--methods", default="eqx_ggn,adam,lbfgs,optimistix", help="comma separated"
    )
    parser.add_argument(
        "--boundary-weight", type=float, default=100.0, help="1: unweighted residuals"
    )
    args = parser.parse_args()

    model, batch = pinn.make_problem()
    params, static = eqx_ggn.partition(model)
    model_fn = pinn.make_model_fn(static, args.boundary_weight)
    error_fn = pinn.relative_error_fn(static)
    x = batch["input"]

    def residuals(p, args=None):
        return jax.vmap(lambda xi: model_fn(input=xi, params=p))(x)[:, 0]

    logs = {}
    methods = args.methods.split(",")
    names = {"eqx_ggn": "eqx_ggn.gauss_newton", "adam": "optax.adam(1e-3)"}
    names["lbfgs"] = "optax.lbfgs()"
    steps = pinn.optimizer_steps(model_fn, batch)
    for method, name in names.items():
        if method in methods:
            step, init = steps[name]
            logs[name], _ = pinn.run(
                name,
                step,
                (params, init(params)),
                lambda c: c[0],
                args.budget,
                error_fn,
            )

    if "optimistix" in methods:
        solver = optx.LevenbergMarquardt(rtol=1e-12, atol=1e-12)
        chunk = 10

        def lm_chunk(p):
            # optimistix has no step-at-a-time API that keeps its damping between
            # calls; run it in chunks of 10 steps, each restarting from the last
            # point (so its trust region restarts every 10 steps).
            sol = optx.least_squares(residuals, solver, p, max_steps=chunk, throw=False)
            return sol.value

        log, _ = pinn.run(
            f"optimistix.LevenbergMarquardt (chunks of {chunk})",
            lm_chunk,
            params,
            lambda c: c,
            args.budget,
            error_fn,
        )
        logs["optimistix.LevenbergMarquardt"] = [(t, n * chunk, e) for t, n, e in log]

    print(
        f"\n# {datetime.date.today()} | {platform.processor() or platform.machine()}"
        f" | {jax.devices()[0].device_kind} | jax {jax.__version__} | float64"
        f" | boundary weight {args.boundary_weight:g}"
    )
    pinn.print_table(logs, args.budget)
    return logs


if __name__ == "__main__":
    main()
