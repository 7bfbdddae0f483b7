"""Frozen layers and stateful models (BatchNorm, dropout) with eqx_ggn.

Part 1, **fine-tuning the last layer**: an MLP pre-trained on one function is
adapted to another by training only its last `Linear` layer, chosen with a filter
spec. With the body frozen the model is linear in the trained parameters and the
loss is quadratic, so an undamped Gauss-Newton step is the least-squares solution
up to CG's accuracy (the tanh features are badly conditioned, and float32 CG needs
a few steps to get close); Adam does not get near it in thousands of steps.

Part 2, **BatchNorm and dropout**: a classifier with `eqx.nn.BatchNorm` (batch
statistics, held in an `eqx.nn.State`) and `eqx.nn.Dropout` on the scikit-learn
digits. The rule: `model_fn` is a pure function of `(input, params)` for one step.
The step's dropout key and BatchNorm state are bound into it, so all CG products
of the step see the same linearization; the state update comes from the user's
own loss pass and is threaded to the next step.

Run: `python examples/frozen_and_stateful.py` (under a minute on 2 CPU cores), or
`--quick` for a smoke run.
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
parser.add_argument("--steps", type=int, default=150, help="steps of part 2")
parser.add_argument("--quick", action="store_true", help="a short smoke run")
args = parser.parse_args()
pretrain_steps, adam_steps = (300, 300) if args.quick else (2000, 3000)
if args.quick:
    args.steps = 15
here = pathlib.Path(__file__).parent
rows = []


def fit(step, state, steps, name):
    """Run `state = step(*state)` `steps` times; record (time, loss)."""
    history, start = [], time.perf_counter()
    for _ in tqdm(range(steps), desc=name):
        *state, loss = step(*state)
        history.append((time.perf_counter() - start, float(loss)))
    return state, history


# %% Part 1: pre-train on sin(2x), then fine-tune the last layer on a new target.
x = jnp.linspace(-3, 3, 200)[:, None]
old_target, new_target = jnp.sin(2 * x), jnp.sin(2 * x) + 0.5 * jnp.cos(3 * x)
mlp = eqx.nn.MLP(1, 1, 64, 2, activation=jnp.tanh, key=jax.random.key(0))


def mse(model, y):
    return jnp.mean(jax.vmap(eqx_ggn.mse_loss)(jax.vmap(model)(x), y))


adam = optax.adam(3e-3)


@eqx.filter_jit
def pretrain_step(model, opt_state):
    loss, grads = eqx.filter_value_and_grad(mse)(model, old_target)
    updates, opt_state = adam.update(grads, opt_state)
    return eqx.apply_updates(model, updates), opt_state, loss


(mlp, _), _ = fit(
    pretrain_step,
    (mlp, adam.init(eqx.filter(mlp, eqx.is_array))),
    pretrain_steps,
    "pretrain",
)

# Only the last layer is trained: a filter spec that is True on it alone.
filter_spec = jax.tree.map(lambda _: False, mlp)
filter_spec = eqx.tree_at(
    lambda m: (m.layers[-1].weight, m.layers[-1].bias), filter_spec, (True, True)
)
params, static = eqx_ggn.partition(mlp, filter_spec)
model_fn = eqx_ggn.as_model_fn(static)
data = {"input": x, "target": new_target}


def head_loss(params):
    return mse(eqx.combine(params, static), new_target)


def finetune(opt, steps, name, extra):
    @eqx.filter_jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(head_loss)(params)
        updates, opt_state = opt.update(grads, opt_state, params, **extra)
        return optax.apply_updates(params, updates), opt_state, loss

    (params_out, _), history = fit(step, (params, opt.init(params)), steps, name)
    rows.append(
        ("1: last layer", name, steps, float(head_loss(params_out)), history[-1][0])
    )
    return history


gauss_newton = eqx_ggn.gauss_newton(
    1.0, loss_fn="mse", damping=0.0, cg_maxiter=200, cg_tol=1e-10
)
finetune_histories = {
    "gauss-newton (eqx_ggn)": finetune(
        gauss_newton, 4, "gauss-newton", {"model_fn": model_fn, "batch": data}
    ),
    "adam 3e-3 (optax)": finetune(optax.adam(3e-3), adam_steps, "adam", {}),
}
# The exact optimum of the head: least squares on the frozen features.
features = jax.vmap(
    lambda xi: jax.nn.tanh(mlp.layers[1](jax.nn.tanh(mlp.layers[0](xi))))
)(x)
design = jnp.concatenate([features, jnp.ones((len(x), 1))], axis=1)
coef, *_ = jnp.linalg.lstsq(design, new_target)
optimum = float(jnp.mean((design @ coef - new_target) ** 2))


# %% Part 2: a classifier with BatchNorm and dropout on the digits.
class Net(eqx.Module):
    first: eqx.nn.Linear
    norm: eqx.nn.BatchNorm
    dropout: eqx.nn.Dropout
    last: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.first = eqx.nn.Linear(64, 64, key=k1)
        self.norm = eqx.nn.BatchNorm(64, axis_name="batch", momentum=0.9, mode="batch")
        self.dropout = eqx.nn.Dropout(0.1)
        self.last = eqx.nn.Linear(64, 10, key=k2)

    def __call__(self, x, state, key, inference=None):
        h, state = self.norm(jnp.tanh(self.first(x)), state, inference=inference)
        h = self.dropout(h, key=key, inference=inference)
        return self.last(h), state


digits = load_digits()
order = np.random.default_rng(0).permutation(len(digits.target))
images = jnp.asarray(digits.data[order] / 16.0, jnp.float32)
labels = jnp.asarray(digits.target[order])
train_x, train_y, test_x, test_y = (
    images[:1347],
    labels[:1347],
    images[1347:],
    labels[1347:],
)
net, bn_state = eqx.nn.make_with_state(Net)(jax.random.key(1))
net_params, net_static = eqx_ggn.partition(net)


def batched(params, state, x, key):
    """The network on a batch: BatchNorm needs the batch axis named 'batch'."""
    model = eqx.combine(params, net_static)
    keys = jax.random.split(key, x.shape[0])
    return jax.vmap(model, axis_name="batch", in_axes=(0, None, 0), out_axes=(0, None))(
        x, state, keys
    )


def step_model_fn(state, key):
    """The rule: bind this step's BatchNorm state and dropout key, drop the update."""

    def model_fn(input, params):  # noqa: A002
        return batched(params, state, input, key)[0]

    return model_fn


def train_net(opt, name, use_model_fn):
    def loss_and_state(params, state, x, y, key):
        logits, new_state = batched(params, state, x, key)
        return jnp.mean(jax.vmap(eqx_ggn.cross_entropy_loss)(logits, y)), new_state

    @eqx.filter_jit
    def step(params, opt_state, state, key):
        key, sub = jax.random.split(key)
        idx = jax.random.choice(sub, len(train_y), (256,), replace=False)
        x, y = train_x[idx], train_y[idx]
        (loss, new_state), grads = jax.value_and_grad(loss_and_state, has_aux=True)(
            params, state, x, y, sub
        )
        extra = {}
        if use_model_fn:  # the same state and key as the loss pass above
            extra = {
                "model_fn": step_model_fn(state, sub),
                "batch": {"input": x, "target": y},
            }
        updates, opt_state = opt.update(grads, opt_state, params, **extra)
        return optax.apply_updates(params, updates), opt_state, new_state, key, loss

    init = (net_params, opt.init(net_params), bn_state, jax.random.key(2))
    steps = args.steps if use_model_fn else 10 * args.steps
    (params, _, state, _), history = fit(step, init, steps, name)
    model = eqx.nn.inference_mode(eqx.combine(params, net_static))
    logits, _ = jax.vmap(
        model, axis_name="batch", in_axes=(0, None, None), out_axes=(0, None)
    )(test_x, state, None)
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == test_y))
    rows.append(
        (
            "2: BatchNorm + dropout",
            name,
            steps,
            history[-1][1],
            history[-1][0],
            accuracy,
        )
    )
    return history


net_histories = {
    "gauss-newton (eqx_ggn)": train_net(
        eqx_ggn.gauss_newton(
            1.0,
            loss_fn="cross_entropy",
            adaptive_damping=True,
            damping=1.0,
            cg_maxiter=10,
            vmap_over_data=False,  # BatchNorm couples the samples of a batch
        ),
        "gauss-newton",
        True,
    ),
    "adam 1e-3 (optax)": train_net(optax.adam(1e-3), "adam", False),
}

# %% Results table and plots.
print(f"\nPart 1: least-squares optimum of the last layer: {optimum:.4e}")
print("\n| part | optimizer | steps | final loss | wall time (s) | test accuracy |")
print("|---|---|---|---|---|---|")
for part, name, steps, loss, seconds, *acc in rows:
    accuracy = f"{acc[0]:.3f}" if acc else "-"
    print(f"| {part} | {name} | {steps} | {loss:.4e} | {seconds:.2f} | {accuracy} |")

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
for name, history in finetune_histories.items():
    ax1.semilogy(
        *zip(*history, strict=True),
        marker="o" if len(history) < 5 else None,
        label=name,
    )
ax1.axhline(optimum, c="k", ls=":", label="least-squares optimum")
ax1.set(
    title="1: fine-tuning the last layer",
    xlabel="wall time (s)",
    ylabel="mean squared error",
)
ax1.legend()
for name, history in net_histories.items():
    ax2.semilogy(*zip(*history, strict=True), label=name)
ax2.set(
    title="2: BatchNorm + dropout (mini-batch loss)",
    xlabel="wall time (s)",
    ylabel="cross-entropy",
)
ax2.legend()
fig.tight_layout()
fig.savefig(here / "frozen_and_stateful.png", dpi=120)
print(f"saved {here / 'frozen_and_stateful.png'}")
