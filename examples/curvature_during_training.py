"""Watch the curvature while Adam trains a digits classifier.

Trains an MLP on scikit-learn's 8x8 digits (shipped with scikit-learn, no download)
with `optax.adam`, and every few steps a `eqx_ggn.CurvatureMonitor` inside the jitted
step measures the GGN of the batch-mean cross-entropy: its largest eigenvalues
(Lanczos), its trace (Hutchinson) and, at the end, its spectral density (stochastic
Lanczos quadrature). Saves `curvature_during_training.png` (λ_max against step with
the `2/lr` line, and the trace) and `curvature_spectrum.png` next to this script.

Run: `python examples/curvature_during_training.py` or with `--steps 30` (quick).
"""

# %%
import argparse
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from sklearn.datasets import load_digits
from tqdm import tqdm

import eqx_ggn


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=400)
parser.add_argument("--every", type=int, default=20)
parser.add_argument("--learning-rate", type=float, default=3e-3)
parser.add_argument("--quick", action="store_true", help="same as --steps 30")
args = parser.parse_args()
if args.quick:
    args.steps = 30
here = pathlib.Path(__file__).parent

# %% Data and model.
digits = load_digits()
x = jnp.asarray(digits.data / 16.0, jnp.float32)
y = jnp.asarray(digits.target)
batch = {"input": x[:1024], "target": y[:1024]}
model = eqx.nn.MLP(64, 10, 64, 2, activation=jax.nn.relu, key=jax.random.key(0))


def loss(model, batch):
    logits = jax.vmap(model)(batch["input"])
    return jax.vmap(eqx_ggn.cross_entropy_loss)(logits, batch["target"]).mean()


# %% The monitor: a host-side sink collects (step, dict of floats).
history = []
monitor = eqx_ggn.CurvatureMonitor(
    loss_fn="cross_entropy",
    every=args.every,
    sink=lambda step, metrics: history.append((step, metrics)),
    top_k=3,
    num_iters=20,
    num_samples=10,
)
opt = optax.adam(args.learning_rate)
opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))


@eqx.filter_jit
def step(model, opt_state, i):
    params = eqx.filter(model, eqx.is_inexact_array)
    monitor(i, params, model=model, batch=batch)
    value, grads = eqx.filter_value_and_grad(loss)(model, batch)
    updates, opt_state = opt.update(grads, opt_state, params)
    return eqx.apply_updates(model, updates), opt_state, value


for i in tqdm(range(args.steps), desc="adam"):
    model, opt_state, value = step(model, opt_state, jnp.asarray(i))
jax.effects_barrier()

# %% Results table.
print("\n| step | loss | λ_max | trace | λ_max / trace | 2 / lr |")
print("|---|---|---|---|---|---|")
for s, m in history:
    print(
        f"| {s} | {m['loss']:.4f} | {m['lambda_max']:.3f} | {m['trace']:.2f} "
        f"| {m['lambda_max_over_trace']:.3f} | {2 / args.learning_rate:.0f} |"
    )

# %% Plots.
eqx_ggn.plot_curvature_history(
    history,
    learning_rate=args.learning_rate,
    path=here / "curvature_during_training.png",
)
params, static = eqx_ggn.partition(model)
op = eqx_ggn.curvature_operator(
    eqx_ggn.as_model_fn(static), params, batch, "cross_entropy"
)
grid, density = eqx_ggn.spectral_density(
    op, params, key=jax.random.key(1), num_iters=40, num_samples=8
)
eqx_ggn.plot_spectral_density(
    grid, density, path=here / "curvature_spectrum.png", title="GGN spectrum at the end"
)
print(f"saved {here / 'curvature_during_training.png'} and curvature_spectrum.png")
