"""Cost of one step of each solver, against N at fixed P and against P at fixed N.

The model is the Poisson PINN's residual (`benchmarks/pinn_poisson.py`: a tanh MLP
with two hidden layers, the Laplacian forward-over-forward, O = 1 output), float64.
Each row times one jitted `gauss_newton` step (defaults, Levenberg-Marquardt on)
with `solver="dense"`, `"sample_space"` and `"cg"` (exactly 50 CG iterations), and
the per-sample Jacobian (the factor `A`, `N O x P`) alone, which must grow
linearly in N. somax's `egn_mse` step (it builds its kernel with one full-batch
VJP per row) is timed for comparison up to N = 1024.

Run: `python benchmarks/solvers.py` (about 5 minutes on 2 CPU cores).
"""

import datetime
import platform
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


jax.config.update("jax_enable_x64", True)

import eqx_ggn  # noqa: E402
from eqx_ggn._solvers import curvature_factor  # noqa: E402


def problem(n, width):
    """`n` collocation points in the unit square and the Poisson residual."""
    model = eqx.nn.MLP(
        2, "scalar", width, 2, activation=jnp.tanh, key=jax.random.key(0)
    )
    model = jax.tree.map(
        lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, model
    )
    xy = jax.random.uniform(jax.random.key(1), (n, 2))
    params, static = eqx_ggn.partition(model)

    def model_fn(input, params):  # noqa: A002
        u = eqx.combine(params, static)

        def second(e):
            return jax.jvp(lambda z: jax.jvp(u, (z,), (e,))[1], (input,), (e,))[1]

        lap = second(jnp.array([1.0, 0.0])) + second(jnp.array([0.0, 1.0]))
        f = 2 * jnp.pi**2 * jnp.sin(jnp.pi * input[0]) * jnp.sin(jnp.pi * input[1])
        return (-lap - f)[None]

    batch = {"input": xy, "target": jnp.zeros((n, 1))}
    return model_fn, params, batch


def median_ms(fn, *args, repeats=5):
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def step_ms(model_fn, params, batch, **kwargs):
    opt = eqx_ggn.gauss_newton(1.0, loss_fn="mse", **kwargs)

    @jax.jit
    def step(params, state):
        (_, grads), op = eqx_ggn.value_and_grad(
            model_fn, params, batch, "mse", return_operator=True
        )
        return opt.update(
            grads, state, params, model_fn=model_fn, batch=batch, operator=op
        )

    return median_ms(step, params, opt.init(params))


def jacobian_ms(model_fn, params, batch):
    @jax.jit
    def factor(params):
        op = eqx_ggn.curvature_operator(model_fn, params, batch, "mse")
        return curvature_factor(
            model_fn,
            params,
            batch["input"],
            op.predictions,
            batch["target"],
            op.loss_grads,
            "mse",
            "ggn",
            op.factor,
            jnp.float64,
        ).a

    return median_ms(factor, params)


def somax_ms(model_fn, params, batch):
    import somax

    x = batch["input"]

    def predict(p, xs):
        return jax.vmap(lambda xi: model_fn(input=xi, params=p))(xs)[:, 0]

    method = somax.egn_mse(predict_fn=predict, lam_policy="trust_region")
    somax_batch = {"x": x, "y": jnp.zeros(x.shape[0])}
    step = jax.jit(lambda p, s: method.step(p, somax_batch, s, jax.random.key(0))[:2])
    return median_ms(step, params, method.init(params), repeats=2)


def row(n, width, with_somax):
    model_fn, params, batch = problem(n, width)
    p = sum(x.size for x in jax.tree.leaves(params))
    cells = [
        jacobian_ms(model_fn, params, batch),
        step_ms(model_fn, params, batch, solver="dense"),
        step_ms(model_fn, params, batch, solver="sample_space"),
        step_ms(
            model_fn,
            params,
            batch,
            solver="cg",
            cg_maxiter=50,
            cg_tol=0.0,
            cg_progress_tol=0.0,
        ),
        somax_ms(model_fn, params, batch) if with_somax else float("nan"),
    ]
    text = " | ".join("—" if np.isnan(c) else f"{c:.0f}" for c in cells)
    print(f"| {n} | {p} | {text} |", flush=True)


def main():
    print(
        f"# {datetime.date.today()} | {platform.processor() or platform.machine()}"
        f" | {jax.devices()[0].device_kind} | jax {jax.__version__} | float64\n"
    )
    header = (
        "| N | P | Jacobian A (ms) | dense step | sample_space step | cg step (50 it)"
    )
    print(header + " | somax egn_mse step |")
    print("|---|---|---|---|---|---|---|")
    for n in (256, 512, 1024, 2048, 4096):
        row(n, 32, with_somax=n <= 1024)
    for width in (16, 48, 64):
        row(1024, width, with_somax=False)


if __name__ == "__main__":
    main()
