"""Digits classification: natural-gradient (GGN) steps on mini-batches against Adam.

The 8x8 scikit-learn digits (1,797 images, shipped with scikit-learn: no download),
an MLP 64-128-128-10 with cross-entropy, mini-batches of 256. `eqx_ggn.gauss_newton`
with `curvature="fisher"` takes natural-gradient steps: for cross-entropy the Fisher
is the GGN. Each step linearizes the model once on its mini-batch, runs at most 10
CG iterations and adapts the damping with the Levenberg-Marquardt rule on the
same mini-batch. Both optimizers get the same wall-clock budget; the script
prints a table and plots test accuracy and training loss against wall time.

Run: `python examples/classification_digits.py` (about 25 s on 2 CPU cores),
`--budget SECONDS` to change the time per optimizer, `--quick` for a smoke run.
"""

# %%
import argparse
import pathlib
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np


matplotlib.use("Agg")
import matplotlib.pyplot as plt
import optax
from sklearn.datasets import load_digits
from tqdm import tqdm

import eqx_ggn


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--budget", type=float, default=10.0, help="seconds per optimizer")
parser.add_argument("--steps", type=int, default=None, help="a step cap")
parser.add_argument("--quick", action="store_true", help="a short smoke run")
args = parser.parse_args()
if args.quick:
    args.budget, args.steps = 3.0, 30
here = pathlib.Path(__file__).parent

# %% Data: a fixed 75/25 split, pixels scaled to [0, 1].
digits = load_digits()
images, labels = digits.data.astype(np.float32) / 16.0, digits.target
order = np.random.default_rng(0).permutation(len(labels))
split = int(0.75 * len(labels))
train_x, train_y = (
    jnp.asarray(images[order[:split]]),
    jnp.asarray(labels[order[:split]]),
)
test_x, test_y = jnp.asarray(images[order[split:]]), jnp.asarray(labels[order[split:]])
batch_size = 256
model = eqx.nn.MLP(64, 10, 128, 2, activation=jnp.tanh, key=jax.random.key(0))


def objective(model, x, y):
    logits = jax.vmap(model)(x)
    return jnp.mean(jax.vmap(eqx_ggn.cross_entropy_loss)(logits, y))


@eqx.filter_jit
def accuracy(model, x, y):
    return jnp.mean(jnp.argmax(jax.vmap(model)(x), axis=-1) == y)


# %% One training loop for both optimizers: only `update`'s keywords differ.
def train(model, opt, name, pass_model):
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, opt_state, x, y):
        loss, grads = eqx.filter_value_and_grad(objective)(model, x, y)
        params = eqx.filter(model, eqx.is_inexact_array)
        extra = {"model": model, "batch": {"input": x, "target": y}}
        updates, opt_state = opt.update(
            grads, opt_state, params, **(extra if pass_model else {})
        )
        return eqx.apply_updates(model, updates), opt_state, loss

    # Compile outside the timed budget.
    jax.block_until_ready(
        step(model, opt_state, train_x[:batch_size], train_y[:batch_size])
    )
    rng = np.random.default_rng(1)
    history, elapsed, steps = [], 0.0, 0
    bar = tqdm(desc=f"{name} ({args.budget:g} s)", unit="step")
    while elapsed < args.budget and (args.steps is None or steps < args.steps):
        idx = rng.choice(len(train_y), batch_size, replace=False)
        start = time.perf_counter()
        model, opt_state, loss = step(model, opt_state, train_x[idx], train_y[idx])
        jax.block_until_ready(loss)
        elapsed += time.perf_counter() - start
        steps += 1
        bar.update()
        if steps % 5 == 0:
            acc = float(accuracy(model, test_x, test_y))
            history.append((elapsed, float(loss), acc))
            bar.set_postfix(loss=f"{float(loss):.3f}", test_acc=f"{acc:.3f}")
    bar.close()
    return model, steps, history


natural_gradient = eqx_ggn.gauss_newton(
    learning_rate=1.0,
    loss_fn="cross_entropy",
    curvature="fisher",
    adaptive_damping=True,
    damping=1.0,
    min_damping=1e-2,
    cg_maxiter=10,
)
results = {
    "natural gradient (eqx_ggn)": train(
        model, natural_gradient, "natural-gradient", True
    ),
    "adam 1e-3 (optax)": train(model, optax.adam(1e-3), "adam", False),
}

# %% Results table: test accuracy reached by given wall times.
marks = [t for t in (0.1, 0.25, 0.5, 1, 2, 5) if t < args.budget] + [args.budget]
print(
    "\n| optimizer | steps | "
    + " | ".join(f"test acc. at {t:g} s" for t in marks)
    + " | final train loss |"
)
print("|---" * (len(marks) + 3) + "|")
for name, (fitted, steps, history) in results.items():
    cells = []
    for mark in marks:
        reached = [acc for t, _, acc in history if t <= mark]
        cells.append(f"{max(reached):.3f}" if reached else "-")
    loss = float(objective(fitted, train_x, train_y))
    print(f"| {name} | {steps} | " + " | ".join(cells) + f" | {loss:.2e} |")

# %% Plots: test accuracy and mini-batch loss against wall time.
fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
for name, (_, _, history) in results.items():
    t, loss, acc = zip(*history, strict=True)
    ax_acc.plot(t, acc, label=name)
    ax_loss.semilogy(t, loss, label=name)
ax_acc.set(title="test accuracy", xlabel="wall time (s)", ylim=(0.8, 1.0))
ax_loss.set(title="mini-batch loss", xlabel="wall time (s)", ylabel="cross-entropy")
ax_acc.legend()
fig.tight_layout()
fig.savefig(here / "classification_digits.png", dpi=120)
print(f"saved {here / 'classification_digits.png'}")
