"""Quickstart: Gauss-Newton with eqx_ggn's curvature operator next to Adam.

Fits an `eqx.nn.MLP` to a noisy 1-D function. Each Gauss-Newton step linearizes the
model once (`eqx_ggn.curvature_operator`), takes the loss, gradient and GGN of the
batch-mean objective from that one linearization, and solves the damped system
`(G + damping * I) d = grad` (densely here: the model is small), with the
Levenberg-Marquardt rule for the damping. Adam runs on the same data and objective.

Run: `python examples/quickstart.py` (about 15 s on 2 CPU cores), or
`python examples/quickstart.py --quick` for a smoke run.
"""

# %%
import argparse
import pathlib
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt
import optax
from jax.flatten_util import ravel_pytree
from tqdm import tqdm

import eqx_ggn


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=40, help="Gauss-Newton steps")
parser.add_argument("--adam-steps", type=int, default=4000)
parser.add_argument("--quick", action="store_true", help="a short smoke run")
args = parser.parse_args()
if args.quick:
    args.steps, args.adam_steps = 8, 300
here = pathlib.Path(__file__).parent

# %% Data: 256 noisy samples of a smooth 1-D function, made here.
key_data, key_noise, key_model = jax.random.split(jax.random.key(0), 3)
x = jnp.sort(jax.random.uniform(key_data, (256, 1), minval=-3, maxval=3), axis=0)
y = jnp.sin(2 * x) + 0.3 * x + 0.05 * jax.random.normal(key_noise, x.shape)
data = {"input": x, "target": y}
model = eqx.nn.MLP(1, 1, 32, 2, activation=jnp.tanh, key=key_model)


def objective(model, data):
    """The package's objective: the batch mean of the per-sample squared errors."""
    pred = jax.vmap(model)(data["input"])
    return jnp.mean(jax.vmap(eqx_ggn.mse_loss)(pred, data["target"]))


# %% Gauss-Newton / Levenberg-Marquardt with the linearize-once operator.
@eqx.filter_jit
def gauss_newton_step(model, damping, data):
    params, static = eqx_ggn.partition(model)
    op = eqx_ggn.curvature_operator(model=model, data=data, loss_fn="mse")
    ggn = op.as_matrix()
    flat_grad, unravel = ravel_pytree(op.grad)
    step = jnp.linalg.solve(ggn + damping * jnp.eye(len(flat_grad)), -flat_grad)
    trial = jax.tree.map(jnp.add, params, unravel(step))
    predicted = flat_grad @ step + 0.5 * step @ (ggn @ step)  # quadratic model
    rho = (objective(eqx.combine(trial, static), data) - op.loss) / predicted
    accept = rho > 0  # a NaN rho is rejected too
    params = jax.tree.map(lambda new, old: jnp.where(accept, new, old), trial, params)
    model = eqx.combine(params, static)
    damping = jnp.where(
        rho > 0.75, damping / 3, jnp.where(rho < 0.25, damping * 2, damping)
    )
    return model, jnp.clip(damping, 1e-9, 1e6), op.loss


def run_gauss_newton(model, steps):
    damping, history, start = jnp.asarray(1.0), [], time.perf_counter()
    for _ in tqdm(range(steps), desc="gauss-newton"):
        model, damping, loss = gauss_newton_step(model, damping, data)
        history.append((time.perf_counter() - start, float(loss)))
    return model, history


# %% Adam on the same objective.
def run_adam(model, steps, learning_rate=3e-3):
    opt = optax.adam(learning_rate)
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, state):
        loss, grads = eqx.filter_value_and_grad(objective)(model, data)
        updates, state = opt.update(grads, state, model)
        return eqx.apply_updates(model, updates), state, loss

    history, start = [], time.perf_counter()
    for _ in tqdm(range(steps), desc="adam"):
        model, state, loss = step(model, state)
        history.append((time.perf_counter() - start, float(loss)))
    return model, history


gn_model, gn_history = run_gauss_newton(model, args.steps)
adam_model, adam_history = run_adam(model, args.adam_steps)

# %% Results table.
rows = [
    ("gauss-newton (eqx_ggn)", args.steps, gn_model, gn_history),
    ("adam (optax)", args.adam_steps, adam_model, adam_history),
]
print("\n| optimizer | steps | final loss | wall time (s) |\n|---|---|---|---|")
for name, steps, fitted, history in rows:
    loss = float(objective(fitted, data))
    print(f"| {name} | {steps} | {loss:.3e} | {history[-1][0]:.2f} |")

# %% Plots: the fits and the loss against wall time.
fig, (ax_fit, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
grid = jnp.linspace(-3, 3, 400)[:, None]
ax_fit.scatter(x[:, 0], y[:, 0], s=6, c="0.6", label="data")
for name, _, fitted, _ in rows:
    ax_fit.plot(grid[:, 0], jax.vmap(fitted)(grid)[:, 0], label=name)
ax_fit.set(title="fit", xlabel="x", ylabel="y")
ax_fit.legend()
for name, _, _, history in rows:
    ax_loss.semilogy(*zip(*history, strict=True), label=name)
ax_loss.set(title="training loss", xlabel="wall time (s)", ylabel="mean squared error")
ax_loss.legend()
fig.tight_layout()
fig.savefig(here / "quickstart.png", dpi=120)
print(f"saved {here / 'quickstart.png'}")
