"""A 2-D Poisson PINN trained to high accuracy with Gauss-Newton steps.

`-Δu = f` on the unit square with `u = 0` on the boundary and the solution
`u = sin(πx) sin(πy)`: a tanh MLP 2-32-32-1 in float64, 30x30 interior and 4x31
boundary collocation points. `model_fn` returns the plain physics residuals,
`-Δu - f` at interior points (the Laplacian forward-over-forward) and `u` at
boundary points, and the loss is `"mse"` against zero targets.
`eqx_ggn.gauss_newton` with an exact sample-space solve (the recommended setting
for exact solvers: every other keyword at its default, nothing tuned to this PDE)
and with CG are
compared with `optax.adam` and `optax.lbfgs` under the same wall-clock budget each;
the script prints the relative L2 error of `u` on a 101x101 grid against time,
plots it, and plots the error field of each.

Run: `python examples/pinn_poisson.py` (3 x 30 s on 2 CPU cores), `--budget
SECONDS` for the time per optimizer, `--quick` for a smoke run.
`benchmarks/pinn_poisson.py` runs the same problem for 120 s each, with optimistix.
"""

# %%
import argparse
import pathlib
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from tqdm import tqdm


jax.config.update("jax_enable_x64", True)

import eqx_ggn  # noqa: E402


# %% The problem: collocation points, the residual model_fn and the error metric.
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


def make_model_fn(static, boundary_weight=1.0):
    """The residuals: `-Δu - f` inside, `boundary_weight * u` on the boundary.

    Plain residuals by default (weight 1). The interior residual is on the scale
    of `f` (up to 2π² ≈ 20), the boundary one on the scale of `u`: a CG-based
    optimizer needs a weight to balance them, an exact solve does not.
    """

    def model_fn(input, params):  # noqa: A002
        u = eqx.combine(params, static)
        xy, on_boundary = input[:2], input[2]

        def second_derivative(e):  # forward over forward: d²u/de² at xy
            return jax.jvp(lambda z: jax.jvp(u, (z,), (e,))[1], (xy,), (e,))[1]

        laplacian = second_derivative(jnp.array([1.0, 0.0])) + second_derivative(
            jnp.array([0.0, 1.0])
        )
        residual = jnp.where(
            on_boundary > 0.5, boundary_weight * u(xy), -laplacian - source(xy)
        )
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
    bar = tqdm(desc=f"{name} ({budget:g} s)", unit="step")
    while True:
        carry = jax.block_until_ready(step(carry))
        steps += 1
        bar.update()
        elapsed = time.perf_counter() - start
        if elapsed >= next_log or elapsed >= budget:
            log.append((elapsed, steps, float(error_fn(get_params(carry)))))
            bar.set_postfix(error=f"{log[-1][2]:.2e}")
            next_log = elapsed + every
        if elapsed >= budget:
            break
    bar.close()
    return log, get_params(carry)


def exact_optimizer(solver="sample_space"):
    """eqx_ggn's recommended setting for exact solvers: the solver, and every
    other keyword at its default.

    The Levenberg-Marquardt rule (Nielsen's update) with the grid line search:
    the damping falls to the factorization's rounding level while steps succeed
    (ENGD-like steps) and grows fast where they fail.
    """
    return eqx_ggn.gauss_newton(1.0, loss_fn="mse", solver=solver)


def gauss_newton_optimizer():
    """eqx_ggn with CG: the best settings found on this problem with a boundary
    weight of 100 (see docs/benchmarks.md)."""
    return eqx_ggn.gauss_newton(
        1.0,
        loss_fn="mse",
        adaptive_damping=True,
        damping=1e-2,
        min_damping=1e-12,
        cg_maxiter=300,
        cg_tol=1e-8,
        warm_start=True,
    )


def gauss_newton_step(opt, model_fn, batch):
    """One eqx_ggn step on carry = (params, state): the loss's gradient and the
    curvature from one linearization."""

    def step(carry):
        p, state = carry
        (_, grads), op = eqx_ggn.value_and_grad(
            model_fn, p, batch, "mse", return_operator=True
        )
        updates, state = opt.update(
            grads, state, p, model_fn=model_fn, batch=batch, operator=op
        )
        return optax.apply_updates(p, updates), state

    return step


def optimizer_steps(model_fn, batch):
    """`{name: (step, init)}` for eqx_ggn, Adam and L-BFGS; carry = (params, state)."""

    def objective(p):
        pred = jax.vmap(lambda xi: model_fn(input=xi, params=p))(batch["input"])
        return jnp.mean(pred**2)

    exact, gn = exact_optimizer(), gauss_newton_optimizer()
    adam, lbfgs = optax.adam(1e-3), optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def adam_step(carry):
        p, state = carry
        updates, state = adam.update(jax.grad(objective)(p), state, p)
        return optax.apply_updates(p, updates), state

    def lbfgs_step(carry):
        p, state = carry
        value, grads = value_and_grad(p, state=state)
        updates, state = lbfgs.update(
            grads, state, p, value=value, grad=grads, value_fn=objective
        )
        return optax.apply_updates(p, updates), state

    return {
        'eqx_ggn solver="sample_space"': (
            gauss_newton_step(exact, model_fn, batch),
            exact.init,
        ),
        'eqx_ggn solver="cg"': (gauss_newton_step(gn, model_fn, batch), gn.init),
        "optax.adam(1e-3)": (adam_step, adam.init),
        "optax.lbfgs()": (lbfgs_step, lbfgs.init),
    }


def print_table(logs, budget):
    """Markdown table: the best error reached by given wall times."""
    marks = [b for b in (1, 10, 30, 60, 90, 120) if b < budget] + [budget]
    print(
        "\n| method | steps | " + " | ".join(f"error at {b:g} s" for b in marks) + " |"
    )
    print("|---|---|" + "---|" * len(marks))
    for name, log in logs.items():
        # The last entry is logged just after the budget ran out: count it at it.
        timed = [(min(t, budget), e) for t, _, e in log]
        at = [min((e for t, e in timed if t <= b), default=float("nan")) for b in marks]
        print(f"| {name} | {log[-1][1]} | " + " | ".join(f"{e:.2e}" for e in at) + " |")


# %% Train each optimizer for the same wall-clock budget, then tabulate and plot.
def main():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=30.0, help="seconds each")
    parser.add_argument("--boundary-weight", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    args = parser.parse_args()
    if args.quick:
        args.budget = 2.0
    here = pathlib.Path(__file__).parent

    model, batch = make_problem()
    params, static = eqx_ggn.partition(model)
    model_fn = make_model_fn(static, args.boundary_weight)
    error_fn = relative_error_fn(static)
    logs, fitted = {}, {}
    for name, (step, init) in optimizer_steps(model_fn, batch).items():
        carry = (params, init(params))
        logs[name], fitted[name] = run(
            name, step, carry, lambda c: c[0], args.budget, error_fn, every=0.5
        )
    print_table(logs, args.budget)

    g = jnp.linspace(0, 1, 101)
    xx, yy = jnp.meshgrid(g, g)
    exact = jnp.sin(jnp.pi * xx) * jnp.sin(jnp.pi * yy)
    fig, axes = plt.subplots(1, 1 + len(fitted), figsize=(4.2 * (1 + len(fitted)), 3.8))
    for name, log in logs.items():
        axes[0].semilogy([t for t, _, _ in log], [e for _, _, e in log], label=name)
    axes[0].set(title="relative L2 error", xlabel="wall time (s)")
    axes[0].legend()
    for ax, (name, p) in zip(axes[1:], fitted.items(), strict=True):
        u = jax.vmap(eqx.combine(p, static))(jnp.stack([xx.ravel(), yy.ravel()], 1))
        error = jnp.abs(u.reshape(xx.shape) - exact)
        image = ax.pcolormesh(xx, yy, error, shading="auto", cmap="viridis")
        fig.colorbar(image, ax=ax, format="%.0e")
        ax.set(title=f"|u - u*|: {name}", xlabel="x", ylabel="y", aspect="equal")
    fig.tight_layout()
    fig.savefig(here / "pinn_poisson.png", dpi=110)
    print(f"saved {here / 'pinn_poisson.png'}")


if __name__ == "__main__":
    main()
