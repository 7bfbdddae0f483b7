"""PINNs to high accuracy: eqx_ggn's solvers against somax, optimistix, L-BFGS, Adam.

Two PDEs, each with a tanh MLP 2-32-32-1 in float64 and about 1,000 collocation
points, the loss `"mse"` against zero targets (the mean squared residual, the same
objective for every method), and plain residuals by default (every residual
weighted 1, `--boundary-weight` scales the boundary ones):

- `poisson`: `-Δu = f` on the unit square, `u = 0` on the boundary,
  `u = sin(πx) sin(πy)`; 30x30 interior and 4x31 boundary points (the problem of
  `examples/pinn_poisson.py`).
- `heat`: `u_t = u_xx / π²` on `(x, t) ∈ (0, 1) x (0, 1]`, `u(0, t) = u(1, t) = 0`,
  `u(x, 0) = sin(πx)`, `u = exp(-t) sin(πx)`; 30x30 interior, 2x31 boundary and 31
  initial points. Parabolic, with a first-order time derivative and an initial
  condition: not a variant of the first.

Every method gets the same wall-clock budget on the same machine, compilation
excluded; the relative L2 error of `u` on a 101x101 grid is printed at 1, 10, 30,
60 and 120 s. eqx_ggn runs with the recommended settings of each solver and no
problem-specific tuning:

- `solver="sample_space"` and `solver="dense"`: the recommended settings for
  exact solvers, `gauss_newton(1.0, loss_fn="mse", solver=..., damping=0.0,
  adaptive_damping=False, line_search="grid")`;
- `solver="sample_space"` with the optimizer's defaults (Levenberg-Marquardt);
- `solver="cg"`: the settings of `examples/pinn_poisson.py` (damping 1e-2,
  min_damping 1e-12, 300 CG iterations, tolerance 1e-8, warm start).

somax 1.0 (`python-somax`): `egn_mse` (its row-space Cholesky) and `sgn_mse` (its
CG), each with its trust-region damping. optimistix: Levenberg-Marquardt, run in
chunks of 10 steps. optax: `lbfgs()` and `adam(1e-3)`.

Run: `python benchmarks/pinn_poisson.py --pde poisson` (9 x 120 s), `--pde heat`,
`--budget 20` for a short run, `--methods a,b` for a subset.
"""

import argparse
import datetime
import importlib.util
import pathlib
import platform
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx


jax.config.update("jax_enable_x64", True)

import eqx_ggn  # noqa: E402


_path = pathlib.Path(__file__).parents[1] / "examples" / "pinn_poisson.py"
_spec = importlib.util.spec_from_file_location("pinn_example", _path)
pinn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pinn)


def heat_problem(key=0):
    """The heat equation: the model, the collocation batch, `model_fn` and error."""
    model = eqx.nn.MLP(2, "scalar", 32, 2, activation=jnp.tanh, key=jax.random.key(key))
    model = jax.tree.map(
        lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, model
    )
    g = jnp.linspace(0, 1, 32)[1:-1]
    xx, tt = jnp.meshgrid(g, jnp.linspace(0, 1, 31)[1:])
    interior = jnp.stack([xx.ravel(), tt.ravel(), jnp.zeros(xx.size)], 1)
    t = jnp.linspace(0, 1, 31)
    walls = jnp.concatenate(
        [jnp.stack([jnp.zeros(31), t], 1), jnp.stack([jnp.ones(31), t], 1)]
    )
    walls = jnp.concatenate([walls, jnp.ones((62, 1))], 1)
    x0 = jnp.linspace(0, 1, 33)[1:-1]
    initial = jnp.stack([x0, jnp.zeros(31), 2 * jnp.ones(31)], 1)
    points = jnp.concatenate([interior, walls, initial])
    batch = {"input": points, "target": jnp.zeros((points.shape[0], 1))}

    def make_model_fn(static, boundary_weight=1.0):
        def model_fn(input, params):  # noqa: A002
            u = eqx.combine(params, static)
            xt, kind = input[:2], input[2]
            u_t = jax.jvp(u, (xt,), (jnp.array([0.0, 1.0]),))[1]

            def u_x(z):
                return jax.jvp(u, (z,), (jnp.array([1.0, 0.0]),))[1]

            u_xx = jax.jvp(u_x, (xt,), (jnp.array([1.0, 0.0]),))[1]
            residual = jnp.select(
                [kind < 0.5, kind < 1.5],
                [u_t - u_xx / jnp.pi**2, boundary_weight * u(xt)],
                boundary_weight * (u(xt) - jnp.sin(jnp.pi * xt[0])),
            )
            return residual[None]

        return model_fn

    def error_fn(static):
        gx = jnp.linspace(0, 1, 101)
        xx, tt = jnp.meshgrid(gx, gx)
        grid = jnp.stack([xx.ravel(), tt.ravel()], 1)
        exact = jnp.exp(-grid[:, 1]) * jnp.sin(jnp.pi * grid[:, 0])

        @jax.jit
        def relative_error(params):
            u = jax.vmap(eqx.combine(params, static))(grid)
            return jnp.linalg.norm(u - exact) / jnp.linalg.norm(exact)

        return relative_error

    return model, batch, make_model_fn, error_fn


def poisson_problem(key=0):
    model, batch = pinn.make_problem(key)
    return model, batch, pinn.make_model_fn, pinn.relative_error_fn


PROBLEMS = {"poisson": poisson_problem, "heat": heat_problem}


def methods(model_fn, batch):
    """`{name: (step, init)}`; each `step` maps a carry to the next one."""
    import somax  # benchmark-only comparison (the `benchmarks` extra)

    x = batch["input"]

    def residuals(p, args=None):
        return jax.vmap(lambda xi: model_fn(input=xi, params=p))(x)[:, 0]

    out = {}
    for solver in ("sample_space", "dense"):
        opt = pinn.exact_optimizer(solver)
        out[f'eqx_ggn solver="{solver}"'] = (
            pinn.gauss_newton_step(opt, model_fn, batch),
            opt.init,
        )
    lm = eqx_ggn.gauss_newton(1.0, loss_fn="mse", solver="sample_space")
    out['eqx_ggn solver="sample_space", LM defaults'] = (
        pinn.gauss_newton_step(lm, model_fn, batch),
        lm.init,
    )
    cg_opt = pinn.gauss_newton_optimizer()
    out['eqx_ggn solver="cg"'] = (
        pinn.gauss_newton_step(cg_opt, model_fn, batch),
        cg_opt.init,
    )

    somax_batch = {"x": x, "y": jnp.zeros(x.shape[0])}
    for name in ("egn_mse", "sgn_mse"):
        method = getattr(somax, name)(
            predict_fn=lambda p, xs: residuals(p), lam_policy="trust_region"
        )

        def somax_step(carry, method=method):
            p, state = carry
            p, state, _ = method.step(p, somax_batch, state, jax.random.key(0))
            return p, state

        out[f"somax.{name}"] = (somax_step, method.init)

    solver = optx.LevenbergMarquardt(rtol=1e-12, atol=1e-12)

    def lm_step(carry):
        # optimistix has no step-at-a-time API that keeps its damping between
        # calls: 10 steps per call, each call restarting its trust region.
        p, _ = carry
        sol = optx.least_squares(residuals, solver, p, max_steps=10, throw=False)
        return sol.value, None

    out["optimistix.LevenbergMarquardt (x10)"] = (lm_step, lambda p: None)
    steps = pinn.optimizer_steps(model_fn, batch)
    out["optax.lbfgs()"] = steps["optax.lbfgs()"]
    out["optax.adam(1e-3)"] = steps["optax.adam(1e-3)"]
    return out


def run(step, carry, budget, error_fn, marks=(1, 10, 30, 60, 120)):
    """Step until `budget` seconds; the error at each mark and the step count."""
    step = jax.jit(step)
    carry = jax.block_until_ready(step(carry))  # compile outside the budget
    errors, steps, start = {}, 0, time.perf_counter()
    while True:
        carry = jax.block_until_ready(step(carry))
        steps += 1
        elapsed = time.perf_counter() - start
        for mark in marks:
            if mark not in errors and (elapsed >= mark or elapsed >= budget):
                errors[mark] = float(error_fn(carry[0]))
        if elapsed >= budget:
            return errors, steps, carry


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pde", default="poisson", choices=list(PROBLEMS))
    parser.add_argument("--budget", type=float, default=120.0, help="seconds each")
    parser.add_argument("--methods", default="", help="comma-separated name parts")
    parser.add_argument("--boundary-weight", type=float, default=1.0)
    args = parser.parse_args()

    model, batch, make_model_fn, make_error_fn = PROBLEMS[args.pde]()
    params, static = eqx_ggn.partition(model)
    model_fn = make_model_fn(static, args.boundary_weight)
    error_fn = make_error_fn(static)
    marks = [m for m in (1, 10, 30, 60, 120) if m < args.budget] + [args.budget]
    print(
        f"# {datetime.date.today()} | {platform.processor() or platform.machine()}"
        f" | {jax.devices()[0].device_kind} | jax {jax.__version__} | float64"
        f" | {args.pde} | boundary weight {args.boundary_weight:g}\n"
    )
    print("| method | steps | " + " | ".join(f"{m:g} s" for m in marks) + " |")
    print("|---|---|" + "---|" * len(marks), flush=True)
    wanted = [w for w in args.methods.split(",") if w]
    for name, (step, init) in methods(model_fn, batch).items():
        if wanted and not any(w in name for w in wanted):
            continue
        errors, steps, _ = run(
            step, (params, init(params)), args.budget, error_fn, marks
        )
        cells = " | ".join(f"{errors.get(m, float('nan')):.2e}" for m in marks)
        print(f"| {name} | {steps} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
