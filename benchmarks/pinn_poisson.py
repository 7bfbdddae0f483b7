"""2-D Poisson PINN: eqx_ggn's Gauss-Newton against Adam, L-BFGS and optimistix LM.

`-Δu = f` on the unit square with `u = 0` on the boundary and the solution
`u = sin(πx) sin(πy)`. A tanh MLP 2-32-32-1 in float64, 30x30 interior and 4x31
boundary collocation points. `model_fn` returns the PDE residual at interior points
and `u` at boundary points, and the loss is `"mse"` against zero targets: the
objective is the mean squared residual. Every method gets the same wall-clock budget
on the same machine; the relative L2 error of `u` on a 101x101 grid is printed
against wall time.

Run: `python benchmarks/pinn_poisson.py` (4 x 120 s by default), or
`python benchmarks/pinn_poisson.py --budget 20` for a short run.
"""

import argparse
import datetime
import platform
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import optimistix as optx


jax.config.update("jax_enable_x64", True)

import eqx_ggn  # noqa: E402


def make_problem(key=0):
    model = eqx.nn.MLP(2, "scalar", 32, 2, activation=jnp.tanh, key=jax.random.key(key))
    model = jax.tree.map(
        lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, model
    )
    g = jnp.linspace(0, 1, 32)[1:-1]  # 30 interior coordinates
    xx, yy = jnp.meshgrid(g, g)
    interior = jnp.stack([xx.ravel(), yy.ravel(), jnp.zeros(900)], axis=1)
    t = jnp.linspace(0, 1, 32)[:-1]  # 31 points per side, corners once
    sides = [
        jnp.stack([t, jnp.zeros(31)], 1),
        jnp.stack([jnp.ones(31), t], 1),
        jnp.stack([1 - t, jnp.ones(31)], 1),
        jnp.stack([jnp.zeros(31), 1 - t], 1),
    ]
    boundary = jnp.concatenate([jnp.concatenate(sides), jnp.ones((124, 1))], axis=1)
    points = jnp.concatenate([interior, boundary])
    batch = {"input": points, "target": jnp.zeros((points.shape[0], 1))}
    return model, batch


def source(xy):
    return 2 * jnp.pi**2 * jnp.sin(jnp.pi * xy[0]) * jnp.sin(jnp.pi * xy[1])


def make_model_fn(static):
    def model_fn(input, params):  # noqa: A002
        u = eqx.combine(params, static)
        xy, on_boundary = input[:2], input[2]

        def second_derivative(e):  # forward over forward: d²u/de² at xy
            return jax.jvp(lambda z: jax.jvp(u, (z,), (e,))[1], (xy,), (e,))[1]

        laplacian = second_derivative(jnp.array([1.0, 0.0])) + second_derivative(
            jnp.array([0.0, 1.0])
        )
        residual = jnp.where(on_boundary > 0.5, u(xy), -laplacian - source(xy))
        return residual[None]

    return model_fn


def relative_error_fn(static):
    g = jnp.linspace(0, 1, 101)
    xx, yy = jnp.meshgrid(g, g)
    grid = jnp.stack([xx.ravel(), yy.ravel()], axis=1)
    exact = jnp.sin(jnp.pi * grid[:, 0]) * jnp.sin(jnp.pi * grid[:, 1])

    @jax.jit
    def relative_error(params):
        u = jax.vmap(eqx.combine(params, static))(grid)
        return jnp.linalg.norm(u - exact) / jnp.linalg.norm(exact)

    return relative_error


def run(name, step, carry, get_params, budget, error_fn, every=2.0):
    """Step until the wall-clock budget is spent, logging (time, steps, error)."""
    step = jax.jit(step)
    jax.block_until_ready(step(carry))  # compile outside the budget
    log, steps, start, next_log = [], 0, time.perf_counter(), 0.0
    while True:
        carry = jax.block_until_ready(step(carry))
        steps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= next_log or elapsed >= budget:
            log.append((elapsed, steps, float(error_fn(get_params(carry)))))
            next_log = elapsed + every
        if elapsed >= budget:
            break
    print(f"{name}: {steps} steps, relative L2 error {log[-1][2]:.3e}", flush=True)
    return log


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=120.0, help="seconds each")
    parser.add_argument(
        "--methods", default="eqx_ggn,adam,lbfgs,optimistix", help="comma separated"
    )
    args = parser.parse_args()

    model, batch = make_problem()
    params, static = eqx_ggn.partition(model)
    model_fn = make_model_fn(static)
    error_fn = relative_error_fn(static)
    x = batch["input"]

    def residuals(p, args=None):
        return jax.vmap(lambda xi: model_fn(input=xi, params=p))(x)[:, 0]

    def objective(p):
        return jnp.mean(residuals(p) ** 2)

    logs = {}
    methods = args.methods.split(",")

    if "eqx_ggn" in methods:
        # The best of the settings tried on this machine (see docs/benchmarks.md).
        opt = eqx_ggn.gauss_newton(
            1.0,
            loss_fn="mse",
            adaptive_damping=True,
            damping=1e-2,
            min_damping=1e-12,
            cg_maxiter=300,
            cg_tol=1e-8,
            warm_start=True,
        )

        def gn_step(carry):
            p, state = carry
            grads = jax.grad(objective)(p)
            updates, state = opt.update(grads, state, p, model_fn=model_fn, batch=batch)
            return optax.apply_updates(p, updates), state

        logs["eqx_ggn.gauss_newton"] = run(
            "eqx_ggn.gauss_newton",
            gn_step,
            (params, opt.init(params)),
            lambda c: c[0],
            args.budget,
            error_fn,
        )

    if "adam" in methods:
        adam = optax.adam(1e-3)

        def adam_step(carry):
            p, state = carry
            updates, state = adam.update(jax.grad(objective)(p), state, p)
            return optax.apply_updates(p, updates), state

        logs["optax.adam(1e-3)"] = run(
            "optax.adam(1e-3)",
            adam_step,
            (params, adam.init(params)),
            lambda c: c[0],
            args.budget,
            error_fn,
        )

    if "lbfgs" in methods:
        lbfgs = optax.lbfgs()
        value_and_grad = optax.value_and_grad_from_state(objective)

        def lbfgs_step(carry):
            p, state = carry
            value, grads = value_and_grad(p, state=state)
            updates, state = lbfgs.update(
                grads, state, p, value=value, grad=grads, value_fn=objective
            )
            return optax.apply_updates(p, updates), state

        logs["optax.lbfgs()"] = run(
            "optax.lbfgs()",
            lbfgs_step,
            (params, lbfgs.init(params)),
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

        log = run(
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
    )
    marks = [b for b in (10, 30, 60, 90, 120) if b <= args.budget] or [args.budget]
    print(
        "| method | steps | "
        + " | ".join(f"error at {b:g} s" for b in marks)
        + " | best error |"
    )
    print("|---|---|" + "---|" * len(marks) + "---|")
    for name, log in logs.items():
        # The last entry is logged just after the budget ran out: count it at it.
        timed = [(min(t, args.budget), e) for t, _, e in log]
        at = [min((e for t, e in timed if t <= b), default=float("nan")) for b in marks]
        print(
            f"| {name} | {log[-1][1]} | "
            + " | ".join(f"{e:.2e}" for e in at)
            + f" | {min(e for _, _, e in log):.2e} |"
        )
    return logs


if __name__ == "__main__":
    main()
