"""Hessian-free training of a deep autoencoder, in the spirit of Martens (2010).

A deep autoencoder 64-128-64-32-8-32-64-128-64 (tanh, sigmoid output) on the
scikit-learn 8x8 digits (shipped with scikit-learn: no download), trained to
reconstruct its input with binary cross-entropy on the pixel intensities. Deep,
narrow autoencoders are Martens' classic example of pathological curvature where
first-order methods crawl.

`eqx_ggn.gauss_newton` is Martens' Hessian-free recipe: the Gauss-Newton matrix
(positive semi-definite, unlike the Hessian) solved by CG on large mini-batches,
Levenberg-Marquardt damping, and CG warm-started from 0.95 times the previous
solution. Pass `--curvature hessian` for truncated Newton on the true Hessian
(CG then stops at negative curvature). It runs next to `optax.adam` under the
same wall-clock budget; the script prints a table of the test reconstruction
error against time and plots it with a few reconstructions.

Run: `python examples/autoencoder_hf.py` (2 x 40 s on 2 CPU cores), `--budget
SECONDS` for the time per optimizer, `--quick` for a smoke run.
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
parser.add_argument("--budget", type=float, default=40.0, help="seconds per optimizer")
parser.add_argument("--curvature", default="ggn", choices=["ggn", "hessian"])
parser.add_argument("--quick", action="store_true", help="a short smoke run")
args = parser.parse_args()
if args.quick:
    args.budget = 3.0
here = pathlib.Path(__file__).parent

# %% Data and model.
digits = load_digits()
order = np.random.default_rng(0).permutation(len(digits.target))
images = jnp.asarray(digits.data[order] / 16.0, jnp.float32)
train_x, test_x = images[:1347], images[1347:]
batch_size = 512


class Autoencoder(eqx.Module):
    layers: list

    def __init__(self, sizes, key):
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = [
            eqx.nn.Linear(a, b, key=k)
            for a, b, k in zip(sizes[:-1], sizes[1:], keys, strict=True)
        ]

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jnp.tanh(layer(x))
        return self.layers[-1](x)  # logits of the pixel intensities


model = Autoencoder([64, 128, 64, 32, 8, 32, 64, 128, 64], jax.random.key(0))


def objective(model, x):
    logits = jax.vmap(model)(x)
    return jnp.mean(jax.vmap(eqx_ggn.binary_cross_entropy_loss)(logits, x))


@eqx.filter_jit
def reconstruction_error(model, x):
    """Mean squared error of the reconstructed intensities, per image."""
    return jnp.mean(jnp.sum((jax.nn.sigmoid(jax.vmap(model)(x)) - x) ** 2, axis=-1))


# %% One training loop for both optimizers: only `update`'s keywords differ.
def train(model, opt, name, pass_model):
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, opt_state, x):
        loss, grads = eqx.filter_value_and_grad(objective)(model, x)
        params = eqx.filter(model, eqx.is_inexact_array)
        extra = {"model": model, "batch": {"input": x, "target": x}}
        updates, opt_state = opt.update(
            grads, opt_state, params, **(extra if pass_model else {})
        )
        return eqx.apply_updates(model, updates), opt_state, loss

    jax.block_until_ready(step(model, opt_state, train_x[:batch_size]))  # compile
    rng = np.random.default_rng(1)
    history, elapsed, steps = [], 0.0, 0
    bar = tqdm(desc=f"{name} ({args.budget:g} s)", unit="step")
    while elapsed < args.budget:
        idx = rng.choice(len(train_x), batch_size, replace=False)
        start = time.perf_counter()
        model, opt_state, loss = step(model, opt_state, train_x[idx])
        jax.block_until_ready(loss)
        elapsed += time.perf_counter() - start
        steps += 1
        bar.update()
        if steps % 5 == 0 or elapsed >= args.budget:
            error = float(reconstruction_error(model, test_x))
            history.append((elapsed, error))
            bar.set_postfix(test_error=f"{error:.3f}")
    bar.close()
    return model, steps, history


hessian_free = eqx_ggn.gauss_newton(
    learning_rate=1.0,
    loss_fn="binary_cross_entropy",
    curvature=args.curvature,
    adaptive_damping=True,
    damping=1.0,
    cg_maxiter=50,
    warm_start=True,
    warm_start_decay=0.95,
)
results = {
    f"Hessian-free, {args.curvature} (eqx_ggn)": train(
        model, hessian_free, "hessian-free", True
    ),
    "adam 1e-3 (optax)": train(model, optax.adam(1e-3), "adam", False),
}

# %% Results table: the best test reconstruction error reached by given times.
marks = [t for t in (1, 5, 10, 20) if t < args.budget] + [args.budget]
print(
    "\n| optimizer | steps | "
    + " | ".join(f"test error at {t:g} s" for t in marks)
    + " |"
)
print("|---" * (len(marks) + 2) + "|")
for name, (_, steps, history) in results.items():
    cells = [
        min((e for t, e in history if t <= m), default=float("nan")) for m in marks
    ]
    print(f"| {name} | {steps} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")

# %% Plots: error against time, and reconstructions of test digits.
fig = plt.figure(figsize=(11, 4))
ax = fig.add_subplot(1, 2, 1)
for name, (_, _, history) in results.items():
    ax.semilogy(*zip(*history, strict=True), label=name)
ax.set(
    title="test reconstruction error", xlabel="wall time (s)", ylabel="squared error"
)
ax.legend()
rows = [("input", test_x[:8])] + [
    (name.split(" (")[0], jax.nn.sigmoid(jax.vmap(m)(test_x[:8])))
    for name, (m, _, _) in results.items()
]
for r, (label, pictures) in enumerate(rows):
    for c in range(8):
        sub = fig.add_subplot(len(rows), 16, r * 16 + 9 + c)
        sub.imshow(np.asarray(pictures[c]).reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
        sub.set_xticks([])
        sub.set_yticks([])
        if c == 0:
            sub.set_ylabel(label, fontsize=7)
fig.tight_layout()
fig.savefig(here / "autoencoder_hf.png", dpi=120)
print(f"saved {here / 'autoencoder_hf.png'}")
