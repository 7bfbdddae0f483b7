"""Quickstart: eqx_ggn.gauss_newton next to optax.adam on a small regression.

Fits an `eqx.nn.MLP` to a noisy 1-D function. `eqx_ggn.gauss_newton` is used exactly
like `optax.adam`, with `model=` and `batch=` passed to `update`: each step
linearizes the model once, solves the damped Gauss-Newton system by conjugate
gradient and adapts the damping with the Levenberg-Marquardt rule.

Run: `python examples/quickstart.py` (under 10 s on 2 CPU cores), or
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


# %% The same training loop for both optimizers: only `update`'s keywords differ.
def train(model, opt, steps, name, update_kwargs):
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, opt_state):
        loss, grads = eqx.filter_value_and_grad(objective)(model, data)
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, opt_state = opt.update(
            grads, opt_state, params, **update_kwargs(model)
        )
        return eqx.apply_updates(model, updates), opt_state, loss

    history, start = [], time.perf_counter()
    for _ in tqdm(range(steps), desc=name):
        model, opt_state, loss = step(model, opt_state)
        history.append((time.perf_counter() - start, float(loss)))
    return model, history


gauss_newton = eqx_ggn.gauss_newton(
    learning_rate=1.0,
    loss_fn="mse",
    adaptive_damping=True,
    damping=1.0,
    cg_maxiter=100,
    cg_tol=1e-8,
)
gn_model, gn_history = train(
    model,
    gauss_newton,
    args.steps,
    "gauss-newton",
    update_kwargs=lambda m: {"model": m, "batch": data},
)
adam_model, adam_history = train(
    model, optax.adam(3e-3), args.adam_steps, "adam", update_kwargs=lambda m: {}
)

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
