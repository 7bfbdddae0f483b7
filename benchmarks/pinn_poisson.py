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
- `helmholtz`: `-Δu - k²u = f` on the unit square with `k = 4`, `u = 0` on the
  boundary, `u = sin(πx) sin(4πy)`: a higher frequency in `y` than in `x`, an
  indefinite operator, and the interior and boundary residuals weighted so that
  each set counts equally in the mean (each scaled by `sqrt(N / (2 N_set))`), the
  weighting on which the former exact recipe stalled at its first step. Same
  points as `poisson`.

Every method gets the same wall-clock budget on the same machine, compilation
excluded; the relative L2 error of `u` on a 101x101 grid is printed at 1, 10, 30,
60 and 120 s, for each of `--seeds` network initializations, then the median and
the worst over them. eqx_ggn runs with no problem-specific tuning:

- `solver="sample_space"`, `"dense"` and `"cg"`: `gauss_newton(1.0,
  loss_fn="mse", solver=...)` with every other keyword at its default;
- `former recipe`: `solver="sample_space", damping=0.0, adaptive_damping=False,
  line_search="grid"`, the exact recipe recommended before Nielsen's damping rule;
- `tuned cg`: the settings of `examples/pinn_poisson.py` (damping 1e-2,
  min_damping 1e-12, 300 CG iterations, tolerance 1e-8, warm start).

somax 1.0 (`python-somax`): `egn_mse` (its row-space Cholesky) and `sgn_mse` (its
CG), each with its trust-region damping. optimistix: Levenberg-Marquardt, run in
chunks of 10 steps. optax: `lbfgs()` and `adam(1e-3)`.

Run: `python benchmarks/pinn_poisson.py --pde poisson` (every method, one seed,
120 s each), `--pde heat` or `--pde helmholtz`, `--budget 20` for a short run,
`--methods a,b` for a subset (name parts), `--seeds 5` for five initializations.
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
import numpy as np
import optimistix as optx


jax.config.update("jax_enable_x64", True)

import eqx_ggn  # noqa: E402


_path = pathlib.Path(__file__).parents[1] / "examples" / "pinn_poisson.py"
_spec = importlib.util.spec_from_file_location("pinn_example", _path)
pinn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pinn)


def grid_error_fn(exact):
    """`static -> relative_error(params)`: the relative L2 error of `u` against
    `exact(points)` on a 101x101 grid of the unit square."""

    def error_fn(static):
        g = jnp.linspace(0, 1, 101)
        xx, yy = jnp.meshgrid(g, g)
        grid = jnp.stack([xx.ravel(), yy.ravel()], 1)
        target = exact(grid)

        @jax.jit
        def relative_error(params):
            u = jax.vmap(eqx.combine(params, static))(grid)
            return jnp.linalg.norm(u - target) / jnp.linalg.norm(target)

        return relative_error

    return error_fn


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

    error_fn = grid_error_fn(lambda p: jnp.exp(-p[:, 1]) * jnp.sin(jnp.pi * p[:, 0]))

    return model, batch, make_model_fn, error_fn


def helmholtz_problem(key=0, wavenumber=4.0):
    """Helmholtz with a (1, 4) mode and balanced residual sets."""
    model, batch = pinn.make_problem(key)
    on_boundary = batch["input"][:, 2] > 0.5
    n, n_boundary = on_boundary.size, int(jnp.sum(on_boundary))
    interior_weight = (n / (2 * (n - n_boundary))) ** 0.5
    boundary_weight = (n / (2 * n_boundary)) ** 0.5

    def exact(xy):
        return jnp.sin(jnp.pi * xy[..., 0]) * jnp.sin(4 * jnp.pi * xy[..., 1])

    def make_model_fn(static, weight=1.0):
        def model_fn(input, params):  # noqa: A002
            u = eqx.combine(params, static)
            xy, boundary = input[:2], input[2]

            def second_derivative(e):
                return jax.jvp(lambda z: jax.jvp(u, (z,), (e,))[1], (xy,), (e,))[1]

            laplacian = second_derivative(jnp.array([1.0, 0.0])) + second_derivative(
                jnp.array([0.0, 1.0])
            )
            f = (17 * jnp.pi**2 - wavenumber**2) * exact(xy)
            residual = jnp.where(
                boundary > 0.5,
                weight * boundary_weight * u(xy),
                interior_weight * (-laplacian - wavenumber**2 * u(xy) - f),
            )
            return residual[None]

        return model_fn

    error_fn = grid_error_fn(exact)

    return model, batch, make_model_fn, error_fn


def poisson_problem(key=0):
    model, batch = pinn.make_problem(key)
    return model, batch, pinn.make_model_fn, pinn.relative_error_fn


PROBLEMS = {
    "poisson": poisson_problem,
    "heat": heat_problem,
    "helmholtz": helmholtz_problem,
}


def methods(model_fn, batch):
    """`{name: (step, init)}`; each `step` maps a carry to the next one."""
    import somax  # benchmark-only comparison (the `benchmarks` extra)

    x = batch["input"]

    def residuals(p, args=None):
        return jax.vmap(lambda xi: model_fn(input=xi, params=p))(x)[:, 0]

    out = {}
    for solver in ("sample_space", "dense", "cg"):
        opt = eqx_ggn.gauss_newton(1.0, loss_fn="mse", solver=solver)
        out[f'eqx_ggn solver="{solver}"'] = (
            pinn.gauss_newton_step(opt, model_fn, batch),
            opt.init,
        )
    former = eqx_ggn.gauss_newton(
        1.0,
        loss_fn="mse",
        solver="sample_space",
        damping=0.0,
        adaptive_damping=False,
        line_search="grid",
    )
    out['eqx_ggn solver="sample_space", former recipe'] = (
        pinn.gauss_newton_step(former, model_fn, batch),
        former.init,
    )
    cg_opt = pinn.gauss_newton_optimizer()
    out['eqx_ggn solver="cg", tuned'] = (
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
    parser.add_argument("--seeds", type=int, default=1, help="initializations")
    parser.add_argument("--boundary-weight", type=float, default=1.0)
    args = parser.parse_args()

    marks = [m for m in (1, 10, 30, 60, 120) if m < args.budget] + [args.budget]
    print(
        f"# {datetime.date.today()} | {platform.processor() or platform.machine()}"
        f" | {jax.devices()[0].device_kind} | jax {jax.__version__} | float64"
        f" | {args.pde} | boundary weight {args.boundary_weight:g}"
        f" | {args.seeds} seed(s)\n"
    )
    print("| method | seed | steps | " + " | ".join(f"{m:g} s" for m in marks) + " |")
    print("|---|---|---|" + "---|" * len(marks), flush=True)
    wanted = [w for w in args.methods.split(",") if w]
    results = {}
    for seed in range(args.seeds):
        model, batch, make_model_fn, make_error_fn = PROBLEMS[args.pde](seed)
        params, static = eqx_ggn.partition(model)
        model_fn = make_model_fn(static, args.boundary_weight)
        error_fn = make_error_fn(static)
        available = methods(model_fn, batch)
        # Names match exactly where one does, else as parts.
        chosen = [n for n in available if n in wanted] or [
            n for n in available if not wanted or any(w in n for w in wanted)
        ]
        for name, (step, init) in available.items():
            if name not in chosen:
                continue
            errors, steps, _ = run(
                step, (params, init(params)), args.budget, error_fn, marks
            )
            results.setdefault(name, []).append(errors)
            cells = " | ".join(f"{errors.get(m, float('nan')):.2e}" for m in marks)
            print(f"| {name} | {seed} | {steps} | {cells} |", flush=True)
    if args.seeds > 1:
        print(
            "\n| method | over seeds | " + " | ".join(f"{m:g} s" for m in marks) + " |"
        )
        print("|---|---|" + "---|" * len(marks))
        for name, runs in results.items():
            for label, reduce in (("median", np.median), ("worst", np.max)):
                cells = " | ".join(
                    f"{reduce([r.get(m, np.nan) for r in runs]):.2e}" for m in marks
                )
                print(f"| {name} | {label} of {len(runs)} | {cells} |")


if __name__ == "__main__":
    main()
