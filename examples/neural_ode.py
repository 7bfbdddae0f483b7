"""A neural ODE trained with Gauss-Newton, with diffrax's default adjoint.

The data are trajectories of the cubic spiral `dy/dt = A y^3` (elementwise cube,
`A = [[-0.1, 2], [-2, -0.1]]`), the classic neural-ODE toy problem, started from
random points of a ring. The model is `y0 -> y(t)` at 20 times, with an MLP vector
field solved by diffrax's Tsit5 with an adaptive step and diffrax's default
adjoint, `RecursiveCheckpointAdjoint`.

That adjoint is a `jax.custom_vjp`, which has no forward mode: `jax.linearize` of
the model cannot give `J v`. `eqx_ggn` sees this at trace time and linearizes in
reverse mode (`jac=None` picks `"bwd"`; `op.jac` says which). Its backward rule is
a while loop, which JAX cannot differentiate again, so `J v` is out of reach and
so is CG; the exact solvers need only VJPs (per-sample Jacobians by `jacrev`),
and `solver="auto"` picks one. Gauss-Newton runs next to `optax.adam` and
`optax.lbfgs` for the same wall-clock time.

Run: `python examples/neural_ode.py` (3 x 30 s on 2 CPU cores), `--budget
SECONDS` per optimizer, `--seed N` for another initialization and data set,
`--quick` for a smoke run.
"""

import argparse
import pathlib
import time

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import eqx_ggn


TIMES = jnp.linspace(0.0, 4.0, 20)
SPIRAL = jnp.array([[-0.1, 2.0], [-2.0, -0.1]])


def spiral_data(key, num=32):
    """`num` trajectories of the cubic spiral from random points of a ring."""
    k_angle, k_radius = jax.random.split(key)
    angle = jax.random.uniform(k_angle, (num,), maxval=2 * jnp.pi)
    radius = jax.random.uniform(k_radius, (num,), minval=0.6, maxval=1.2)
    y0 = radius[:, None] * jnp.stack([jnp.cos(angle), jnp.sin(angle)], axis=1)
    true = NeuralODE(lambda t, y, args: SPIRAL @ y**3, rtol=1e-7)
    return {"input": y0, "target": jax.vmap(true)(y0)}


class VectorField(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        return self.mlp(y)


class NeuralODE(eqx.Module):
    """`y0 -> y(TIMES)`, with diffrax's default adjoint unless told otherwise."""

    field: object
    rtol: float = eqx.field(static=True, default=1e-4)
    adjoint: diffrax.AbstractAdjoint = eqx.field(
        static=True, default=diffrax.RecursiveCheckpointAdjoint()
    )

    def __call__(self, y0):
        solution = diffrax.diffeqsolve(
            diffrax.ODETerm(self.field),
            diffrax.Tsit5(),
            TIMES[0],
            TIMES[-1],
            0.1,
            y0,
            saveat=diffrax.SaveAt(ts=TIMES),
            stepsize_controller=diffrax.PIDController(rtol=self.rtol, atol=1e-6),
            adjoint=self.adjoint,
            max_steps=1024,
            # A trial step into a stiff field returns inf (the loss rejects it)
            # instead of raising.
            throw=False,
        )
        return solution.ys


def make_model(key, width=16):
    mlp = eqx.nn.MLP(2, 2, width, 2, activation=jnp.tanh, key=key)
    last = mlp.layers[-1]  # a small initial field: trajectories start near y0
    mlp = eqx.tree_at(lambda m: m.layers[-1].weight, mlp, 0.1 * last.weight)
    return NeuralODE(VectorField(mlp))


def mse(model, data):
    pred = jax.vmap(model)(data["input"])
    return jnp.mean(jax.vmap(eqx_ggn.mse_loss)(pred, data["target"]))


def train(model, opt, data, budget, kind):
    """Full-batch steps for `budget` seconds after compiling; the loss history."""
    params = eqx.filter(model, eqx.is_inexact_array)
    state = opt.init(params)

    @eqx.filter_jit
    def step(model, state):
        params = eqx.filter(model, eqx.is_inexact_array)
        if kind == "gauss_newton":
            (loss, grads), op = eqx_ggn.value_and_grad(
                model=model, batch=data, loss_fn="mse", return_operator=True
            )
            extra = {"model": model, "batch": data, "operator": op}
        else:
            loss, grads = eqx.filter_value_and_grad(mse)(model, data)
            extra = {}
            if kind == "lbfgs":  # L-BFGS's line search evaluates the loss
                extra = {
                    "value": loss,
                    "grad": grads,
                    "value_fn": lambda p: mse(eqx.combine(p, model), data),
                }
        updates, state = opt.update(grads, state, params, **extra)
        return eqx.apply_updates(model, updates), state, loss

    jax.block_until_ready(step(model, state))  # compile
    history, elapsed = [(0.0, float(mse(model, data)))], 0.0
    while elapsed < budget:
        start = time.perf_counter()
        model, state, loss = step(model, state)
        jax.block_until_ready(loss)
        elapsed += time.perf_counter() - start
        history.append((elapsed, float(loss)))
    history.append((elapsed, float(mse(model, data))))
    return model, history


def optimizers():
    return {
        # Defaults: Levenberg-Marquardt damping; "auto" picks an exact solver.
        "gauss_newton (eqx_ggn)": (
            eqx_ggn.gauss_newton(1.0, loss_fn="mse", solver="auto"),
            "gauss_newton",
        ),
        "adam 1e-2 (optax)": (optax.adam(1e-2), "adam"),
        "lbfgs (optax)": (optax.lbfgs(), "lbfgs"),
    }


def run(seed, budget):
    """Every optimizer on one seed's data and initialization."""
    key_data, key_model = jax.random.split(jax.random.key(seed))
    data = spiral_data(key_data)
    model = make_model(key_model)
    (_, op) = eqx.filter_eval_shape(
        lambda m: eqx_ggn.value_and_grad(
            model=m, batch=data, loss_fn="mse", return_operator=True
        ),
        model,
    )
    print(f"seed {seed}: linearized with jac={op.jac!r}")
    return {
        name: train(model, opt, data, budget, kind)
        for name, (opt, kind) in optimizers().items()
    }, data


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=30.0, help="seconds each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    args = parser.parse_args()
    budget = 2.0 if args.quick else args.budget
    results, data = run(args.seed, budget)

    marks = [t for t in (1, 3, 10) if t < budget] + [budget]
    head = " | ".join(f"loss at {t:g} s" for t in marks)
    print(f"\n| optimizer | steps | {head} |")
    print("|---" * (len(marks) + 2) + "|")
    for name, (_, history) in results.items():
        cells = [min(v for t, v in history if t <= m) for m in marks]
        print(
            f"| {name} | {len(history) - 2} | "
            + " | ".join(f"{c:.2e}" for c in cells)
            + " |"
        )
    if args.quick:
        return

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, (_, history) in results.items():
        left.semilogy(*zip(*history, strict=True), label=name)
    left.set(title="training loss", xlabel="wall time (s)", ylabel="loss")
    left.legend()
    model = results["gauss_newton (eqx_ggn)"][0]
    pred = jax.vmap(model)(data["input"][:6])
    for i in range(6):
        (line,) = right.plot(*data["target"][i].T, "-", alpha=0.5)
        right.plot(*pred[i].T, ".", color=line.get_color())
    right.set(title="trajectories (lines) and Gauss-Newton's fit (dots)")
    right.set_aspect("equal")
    fig.tight_layout()
    path = pathlib.Path(__file__).with_name("neural_ode.png")
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
