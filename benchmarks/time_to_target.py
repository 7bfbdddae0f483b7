"""Time to target, in the style of AlgoPerf: AdamW, Muon and eqx_ggn's second-order
optimizers on three mini-batch workloads with local data, the same wall-clock
budget each.

Workloads:
- `transformer`: a 2-layer character-level transformer (width 64, context 64,
  `(T, vocab)` logits) on the Python standard library's sources; validation
  loss (mean token cross-entropy).
- `cnn`: a two-convolution classifier on `sklearn.datasets.load_digits`;
  validation error.
- `autoencoder`: Martens' deep tanh autoencoder (#12) on the digits; validation
  mean squared error.

Every optimizer gets a tuning grid of 3 settings on seed 0. The target of a
workload is AdamW's validation value at half the budget, on seed 0, at the
learning rate with the lowest final value (ties broken by the mean over the
run's time). An optimizer's time to target is the training time (evaluations
excluded) of its first evaluation at or below it. As in AlgoPerf, each
optimizer's best setting, AdamW's included, is the one that reaches the target
first on seed 0 (ties, such as never, broken by the final value); it runs again
on seeds 1 and 2 (`--seeds`). Times are reported per seed, over AdamW's time on
the same seed, and as the median and the worst of those ratios; also the steps
to target over AdamW's (median), which a slow spell of the machine does not
move, steps per second and the step's XLA memory (arguments, outputs and
temporaries of the compiled step). The warmup-cosine schedules (AdamW's,
grafted_kfac's and the scheduled KFAC rows') run on the training time, not the
step count: each ends at the budget however the machine's speed changes
during a run (since session 32; before, they were sized by a step count timed
before the run).

    python benchmarks/time_to_target.py [--quick] [--workload NAME]
        [--optimizers PREFIXES] [--seeds N] [--costs] [--grafted-costs]
        [--warning] [--floors]
        [--knobs] [--quarter] [--generalization] [--large] [--shape W,D,H]
        [--adamw-lr LR] [--fit] [--mlps] [--curves] [--vit]

`--costs` times the pieces of a step on each workload, and whole steps, each
setting in turns with AdamW; `--grafted-costs` does the same for
`eqx_ggn.grafted_kfac` (KFAC's direction at Adam's step length, tuned over
AdamW's learning rates in the time-to-target runs) and Muon; `--warning` times
the default KFAC step in turns with the same step with `warn=False`; `--floors` runs
`kfac_damping_floor` over two decades; `--knobs` runs changes to the default KFAC
row (a damping floor, longer steps, faster factors, adaptive momentum);
`--quarter` measures how well a quarter of the batch estimates the curvature
term of KFAC's rescaling (what `kfac_rescale_tol` relies on);
`--generalization` compares AdamW's and the default KFAC's validation values
at the same fit to the training data (tuned settings from `--cache`, each of
`--seeds` seeds); `--large`
replaces the workloads by the transformer at width 512, 6 layers and 8 heads with
10 s runs (for a GPU); `--shape W,D,H` replaces them by a second CPU
transformer of width `W`, `D` layers and `H` heads, with the 30 s budget and the
workload's context, batch and corpus; `--adamw-lr` runs AdamW at one learning
rate instead of tuning it (on a copy of a cache, the other rows' tuning runs are
reused, and the target, their picks and the ratios are recomputed against that
AdamW). `--fit` times every workload to a target on its training data
instead (the validation metric of the training set, or of fixed training
batches for the transformer; the target AdamW's value there at half the
budget): the question an optimization benchmark asks, and the one Martens
(2010) and Martens and Grosse (2015) report for the deep autoencoder, whose
validation value the digits' 1,347 training images cap. `--mlps` replaces
the workloads by two problems outside them (`mlp_workloads`), with 10 s runs:
the recommended settings on problems they were not chosen on. `--curves`
replaces them by the autoencoder on 20,000 generated curve images (the CURVES
data of Martens' benchmark, made here at 8x8) and the CNN on 60,000 such
images in 10 classes (the chord's direction and the side the curve bends to),
with the digits' 12 s runs: too many images for the budget to overfit, so
their validation values measure how fast the training values fall. `--vit`
replaces them by a small vision transformer on those 10 classes
(`vit_workload`): a second transformer, on images, on which no setting was
chosen.
"""

import os


# KFAC's eigendecompositions call LAPACK, whose OpenBLAS threads compete with
# XLA's own on a small CPU: on 2 cores the transformer's eigendecompositions took
# 18.3 ms with OpenBLAS's default threads and 10.7 ms with one, and a step that
# refreshes them every time 3.65x an AdamW step against 2.34x (docs/benchmarks.md,
# session 16). Set before numpy and jax load OpenBLAS; an OPENBLAS_NUM_THREADS
# already set wins. AdamW and Muon make no LAPACK calls.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import dataclasses
import json
import math
import pathlib
import platform
import time
import warnings
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _problems import (
    AUTOENCODER_SIZES,
    Autoencoder,
    CharTransformer,
    PatchTransformer,
    curve_classes,
    curves,
    digits,
    python_text,
    text_batch,
)

import eqx_ggn


@dataclasses.dataclass
class Workload:
    name: str
    metric: str  # what the validation value is
    loss_fn: str
    factor: float  # the optimizer's objective factor: the training loss's mean
    budget: float  # seconds of training per run
    model: Callable  # key -> model
    batch: Callable  # key -> training batch
    validate: Callable  # model -> validation value (lower is better)
    train_loss: Callable  # (model, batch) -> mean training loss
    fit: Callable  # model -> the validation metric on training data
    # Evaluations over the budget: where the target is reached in a few percent
    # of it (the CNN), more of them, so that one evaluation's interval does not
    # decide a ratio.
    evaluations: int = 40


class CNN(eqx.Module):
    """Conv(1->16, 3x3) -> relu -> Conv(16->32, 3x3, stride 2) -> relu -> Linear."""

    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv1 = eqx.nn.Conv2d(1, 16, 3, padding=1, key=k1)
        self.conv2 = eqx.nn.Conv2d(16, 32, 3, stride=2, padding=1, key=k2)
        self.head = eqx.nn.Linear(32 * 4 * 4, 10, key=k3)

    def __call__(self, x):
        x = jax.nn.relu(self.conv1(x.reshape(1, 8, 8)))
        x = jax.nn.relu(self.conv2(x))
        return self.head(x.reshape(-1))


def mean_cross_entropy(logits, labels):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def transformer_workload(budget, width=64, depth=2, heads=4):
    train, valid = python_text()
    batch_size, context, vocab = 32, 64, 96
    valid_batches = [
        text_batch(valid, jax.random.key(1000 + i), batch_size, context)
        for i in range(8)
    ]

    def train_loss(model, batch):
        return mean_cross_entropy(jax.vmap(model)(batch["input"]), batch["target"])

    train_batches = [
        text_batch(train, jax.random.key(2000 + i), batch_size, context)
        for i in range(8)
    ]

    def mean_loss(batches):
        return eqx.filter_jit(
            lambda model: jnp.mean(jnp.stack([train_loss(model, b) for b in batches]))
        )

    return Workload(
        "transformer",
        "validation loss",
        "cross_entropy",
        1.0 / (batch_size * context),
        budget,
        lambda key: CharTransformer(vocab, width, depth, heads, context, key),
        lambda key: text_batch(train, key, batch_size, context),
        mean_loss(valid_batches),
        train_loss,
        mean_loss(train_batches),  # 8 fixed batches of the training text
    )


def random_batches(x, y, batch_size, replace=False):
    """`key -> batch`: `batch_size` samples of `(x, y)` drawn without replacement,
    or with it: without, each draw permutes all of `x`, which on 20,000 samples
    costs more than the autoencoder's step."""

    def draw(key):
        index = jax.random.choice(key, len(x), (batch_size,), replace=replace)
        return {"input": x[index], "target": y[index]}

    return draw


def fixed_batch_loss(train_loss, x, y):
    """`model -> train_loss(model, {"input": x, "target": y})`, compiled: a
    validation or training value on a fixed set."""
    batch = {"input": x, "target": y}
    return eqx.filter_jit(lambda model: train_loss(model, batch))


def cnn_workload(budget, data="digits"):
    """The CNN on the digits' 1,347 training images, or with `data="curves"` on
    60,000 generated curve images in 10 classes (`_problems.curve_classes`),
    too many for it to learn by heart within the budget."""
    if data == "curves":
        (x, y), (xv, yv) = curve_classes()
    elif data == "digits":
        (x, y), (xv, yv) = digits()
    else:
        raise ValueError(f"data must be 'digits' or 'curves', got {data!r}.")

    def train_loss(model, batch):
        return mean_cross_entropy(jax.vmap(model)(batch["input"]), batch["target"])

    def error(inputs, labels):
        return eqx.filter_jit(
            lambda model: jnp.mean(jnp.argmax(jax.vmap(model)(inputs), -1) != labels)
        )

    return Workload(
        "cnn" if data == "digits" else f"cnn on {data}",
        "validation error",
        "cross_entropy",
        1.0 / 128,
        budget,
        CNN,
        random_batches(x, y, 128, replace=data == "curves"),
        error(xv, yv),
        train_loss,
        error(x, y),
        # The digits' targets fall at 0.4 to 4 s of 12: evaluate every 0.06 s.
        evaluations=200 if data == "digits" else 40,
    )


def vit_workload(budget):
    """A problem outside the three, for `--vit`: the CNN's task on curves
    (60,000 generated images in 10 classes; validation error) with a small
    vision transformer instead: 16 patches of 2x2 pixels, width 64, 2 non-causal
    blocks of 4 heads, mean-pooled to a `Linear` head."""
    return dataclasses.replace(
        cnn_workload(budget, data="curves"),
        name="vit on curves",
        model=lambda key: PatchTransformer(8, 2, 64, 2, 4, 10, key),
    )


def summed_squared_error(model, batch):
    """The squared error summed over a sample's outputs, averaged over the batch."""
    out = jax.vmap(model)(batch["input"])
    return jnp.mean(jnp.sum((out - batch["target"]) ** 2, -1))


def autoencoder_workload(budget, data="digits"):
    """#12's deep autoencoder on the digits' 1,347 training images, or with
    `data="curves"` on 20,000 generated curve images (`_problems.curves`), too
    many for it to fit within the budget: its validation value falls as long as
    the training value does."""
    if data == "curves":
        x, xv = curves()
    elif data == "digits":
        (x, _), (xv, _) = digits()
    else:
        raise ValueError(f"data must be 'digits' or 'curves', got {data!r}.")
    return Workload(
        "autoencoder" if data == "digits" else f"autoencoder on {data}",
        "validation MSE (sum over pixels)",
        "mse",
        1.0 / 256,
        budget,
        lambda key: Autoencoder(AUTOENCODER_SIZES, key),
        random_batches(x, x, 256, replace=data == "curves"),
        fixed_batch_loss(summed_squared_error, xv, xv),
        summed_squared_error,
        fixed_batch_loss(summed_squared_error, x, x),
    )


def mlp_workloads(budget):
    """Two problems outside the three, for `--mlps`: an MLP classifier on
    `sklearn.datasets.make_classification` (40 features, 8 classes; validation
    loss) and a deep tanh MLP regression of two smooth functions of 10 inputs
    (validation MSE), 5,000 training and 1,000 validation samples each."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        6000,
        40,
        n_informative=20,
        n_classes=8,
        n_clusters_per_class=2,
        random_state=0,
    )
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y)
    rng = np.random.default_rng(1)
    w = rng.normal(size=(10, 3)) / 3
    u = rng.uniform(-2, 2, size=(6000, 10)).astype(np.float32)
    t = np.stack(
        [np.sin(u @ w[:, 0]) * np.cos(u @ w[:, 1]), np.tanh(u @ w[:, 2]) ** 2], 1
    )
    u, t = jnp.asarray(u), jnp.asarray(t, jnp.float32)

    def classification_loss(model, batch):
        return mean_cross_entropy(jax.vmap(model)(batch["input"]), batch["target"])

    def workload(name, metric, loss_fn, train_loss, inputs, targets, model):
        train, valid = slice(None, 5000), slice(5000, None)
        return Workload(
            name,
            metric,
            loss_fn,
            1.0 / 128,
            budget,
            model,
            random_batches(inputs[train], targets[train], 128),
            fixed_batch_loss(train_loss, inputs[valid], targets[valid]),
            train_loss,
            fixed_batch_loss(train_loss, inputs[train], targets[train]),
        )

    return [
        workload(
            "mlp classification",
            "validation loss",
            "cross_entropy",
            classification_loss,
            x,
            y,
            lambda key: eqx.nn.MLP(40, 8, 128, 3, key=key),
        ),
        workload(
            "mlp regression",
            "validation MSE",
            "mse",
            summed_squared_error,
            u,
            t,
            lambda key: eqx.nn.MLP(10, 2, 64, 4, activation=jnp.tanh, key=key),
        ),
    ]


# Each optimizer: (label, setting name, three values, factory). A factory takes
# the value and returns `(optax transformation, curvature)`, the curvature `None`
# for a first-order one.
def warmup_cosine_fraction(progress, warmup=0.05):
    """Optax's warmup-cosine schedule from 0 to 1 and back to 0, on the budget's
    fraction `progress` (the training time over the budget) instead of a step
    count: linear warmup over the first `warmup` of the budget, then cosine
    decay to 0 at its end."""
    scale = 1_000_000  # optax's schedules count steps: one per millionth
    count = jnp.clip(progress, 0.0, 1.0) * scale
    # With warmup 0 this is optax.cosine_decay_schedule(1.0, scale) exactly.
    return optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup * scale, scale)(count)


def warmup_cosine(lr, warmup=0.05):
    """`lr` times `warmup_cosine_fraction` of the training time spent, read from
    `update`'s keyword `progress` (which `run` passes at every step), as the last
    link of a chain whose own learning rate is 1: the schedule ends with the
    budget however fast the steps run. Sized by a step count timed before the
    run instead (sessions 25 to 31), a machine that sped up during a run ended
    the schedules at 77% to 90% of the budget (2026-12-06)."""

    def update(updates, state, params=None, *, progress, **extra_args):
        del params, extra_args
        scale = lr * warmup_cosine_fraction(progress, warmup)
        return jax.tree.map(lambda u: (scale * u).astype(u.dtype), updates), state

    return optax.GradientTransformationExtraArgs(
        lambda params: optax.EmptyState(), update
    )


def scheduled(opt, lr, curvature=None, warmup=0.05):
    """`(opt, curvature)` with `opt` (at learning rate 1) followed by
    `warmup_cosine(lr, warmup)`."""
    return optax.chain(opt, warmup_cosine(lr, warmup)), curvature


def adamw(lr):
    return scheduled(optax.adamw(1.0, weight_decay=1e-4), lr)


def muon(lr):
    return optax.contrib.muon(lr), None


def gn(workload, warmup_cosine_lr=None, warmup=0.05, **kwargs):
    """`eqx_ggn.gauss_newton` on the workload's loss; with `warmup_cosine_lr`,
    at learning rate 1 followed by `warmup_cosine(warmup_cosine_lr, warmup)`."""
    learning_rate = kwargs.pop("learning_rate", 1.0)
    opt = eqx_ggn.gauss_newton(
        learning_rate, loss_fn=workload.loss_fn, factor=workload.factor, **kwargs
    )
    curvature = kwargs.get("curvature", "ggn")
    if warmup_cosine_lr is None:
        return opt, curvature
    return scheduled(opt, warmup_cosine_lr, curvature, warmup)


def kfac_cosine(workload, **kwargs):
    """Fisher-factor KFAC with a cosine learning rate from 1 over the budget (no
    warmup)."""
    return gn(
        workload,
        warmup_cosine_lr=1.0,
        warmup=0.0,
        solver="kfac",
        curvature="fisher",
        **kwargs,
    )


def grafted_kfac(workload, lr, **kwargs):
    """`eqx_ggn.grafted_kfac` (at its defaults but `kwargs`), with AdamW's
    warmup-cosine schedule."""
    return scheduled(eqx_ggn.grafted_kfac(1.0, workload.loss_fn, **kwargs), lr)


# AdamW's tuning grid; `--adamw-lr` replaces it by one value.
ADAMW_LRS = (1e-3, 3e-3, 1e-2)


def optimizers(workload):
    fixed = dict(solver="kfac", adaptive_damping=False, kfac_rescale=False)
    fisher = dict(solver="kfac", curvature="fisher")
    return [
        ("AdamW (warmup-cosine)", "lr", ADAMW_LRS, adamw),
        ("Muon", "lr", (3e-3, 1e-2, 3e-2), muon),
        (
            # KFAC's direction with Adam's step length; no linearization.
            "KFAC grafted to Adam (defaults)",
            "lr",
            (1e-3, 3e-3, 1e-2),  # AdamW's grid
            lambda v: grafted_kfac(workload, v),
        ),
        (
            # Fresher factors and inverses, at a higher step cost.
            "KFAC grafted to Adam (kfac_every=5)",
            "lr",
            (1e-3, 3e-3, 1e-2),
            lambda v: grafted_kfac(workload, v, kfac_every=5, kfac_inverse_every=5),
        ),
        (
            "KFAC Fisher, LM (defaults)",
            "kfac_every",
            (1, 5, 20),
            lambda v: gn(workload, kfac_every=v, **fisher),
        ),
        (
            # The defaults without the warning's host callback, which moves every
            # call of the compiled step to JAX's slower Python dispatch path.
            "KFAC Fisher, LM (warn=False)",
            "kfac_every",
            (1, 5, 20),
            lambda v: gn(workload, kfac_every=v, warn=False, **fisher),
        ),
        (
            # The rescaling's curvature term from a quarter of the batch when
            # the quarter's spread pins it to 25%; else the batch's, from a
            # fresh forward pass of the other three quarters.
            "KFAC Fisher, LM (kfac_rescale_tol=0.25)",
            "kfac_every",
            (1, 5, 20),
            lambda v: gn(workload, kfac_every=v, kfac_rescale_tol=0.25, **fisher),
        ),
        (
            "KFAC Fisher, LM + cosine lr",
            "kfac_every",
            (1, 5, 20),
            lambda v: kfac_cosine(workload, kfac_every=v),
        ),
        (
            # Both of the above: AdamW's annealing and the quarter's form.
            "KFAC Fisher, LM (kfac_rescale_tol=0.25) + cosine lr",
            "kfac_every",
            (1, 5, 20),
            lambda v: kfac_cosine(workload, kfac_every=v, kfac_rescale_tol=0.25),
        ),
        (
            "KFAC Fisher, LM + adaptive momentum",
            "kfac_every",
            (1, 5, 20),
            lambda v: gn(workload, kfac_every=v, adaptive_momentum=True, **fisher),
        ),
        (
            "KFAC Fisher, fixed lr (damping 0.1)",
            "lr",
            (0.03, 0.1, 0.3),
            lambda v: gn(
                workload,
                learning_rate=v,
                curvature="fisher",
                damping=0.1,
                kfac_every=5,
                **fixed,
            ),
        ),
        (
            "KFAC Fisher, warmup-cosine lr, momentum 0.9 (damping 0.01)",
            "lr",
            (0.01, 0.03, 0.1),
            lambda v: gn(
                workload,
                warmup_cosine_lr=v,
                curvature="fisher",
                damping=0.01,
                momentum=0.9,
                kfac_every=5,
                **fixed,
            ),
        ),
        (
            "KFAC Fisher, KL-clipped (warmup-cosine lr, momentum 0.9)",
            "lr",
            (0.1, 0.3, 1.0),
            lambda v: gn(
                workload,
                warmup_cosine_lr=v,
                curvature="fisher",
                damping=1e-3,
                kl_clip=1e-2,
                momentum=0.9,
                kfac_every=5,
                **fixed,
            ),
        ),
        (
            "KFAC GGN, LM (defaults)",
            "kfac_every",
            (1, 5, 20),
            lambda v: gn(workload, solver="kfac", kfac_every=v),
        ),
        (
            "CG + KFAC (Fisher) preconditioner",
            "cg_maxiter",
            (2, 10, 50),
            lambda v: gn(
                workload,
                cg_maxiter=v,
                preconditioner="kfac",
                curvature="fisher",  # CG's matrix: the GGN; KFAC's: sampled
                kfac_every=5,
            ),
        ),
        (
            "CG (Hessian-free)",
            "cg_maxiter",
            (2, 10, 50),
            lambda v: gn(workload, cg_maxiter=v),
        ),
    ]


def make_step(workload, opt, curvature):
    """The jitted training step `step(model, state, key, progress)`: `progress`,
    the training time over the budget, reaches `warmup_cosine`'s schedules (the
    other transformations ignore it), and may be left out without them."""

    @eqx.filter_jit
    def step(model, state, key, progress=None):
        batch = workload.batch(key)
        params = eqx.filter(model, eqx.is_inexact_array)
        if curvature is not None:
            (loss, grads), op = eqx_ggn.value_and_grad(
                model=model,
                batch=batch,
                loss_fn=workload.loss_fn,
                curvature=curvature,
                factor=workload.factor,
                return_operator=True,
            )
            updates, state = opt.update(
                grads,
                state,
                params,
                model=model,
                batch=batch,
                operator=op,
                progress=progress,
            )
        else:
            # First-order chains ignore `model` and `batch`; grafted KFAC needs them.
            loss, grads = eqx.filter_value_and_grad(workload.train_loss)(model, batch)
            updates, state = opt.update(
                grads, state, params, model=model, batch=batch, progress=progress
            )
        return eqx.apply_updates(model, updates), state, loss

    return step


def step_memory(step, *args):
    """Bytes of the step compiled for `args`: arguments, outputs and
    temporaries."""
    compiled = step.lower(*args).compile()
    m = compiled.compiled.memory_analysis()
    if m is None:  # not every backend reports it
        return float("nan")
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes


def run(workload, factory, value, seed, count_accepted=False, fit=False):
    """Train for the budget; returns the evaluation curve and rates, with
    `count_accepted` the fraction of accepted steps and the final damping (a
    device-side sum per step: slightly slower steps), and with `fit` the
    metric on training data at each evaluation (`fit_curve`)."""
    model = workload.model(jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 100), 1_000_000))
    opt, curvature = factory(value)
    step = make_step(workload, opt, curvature)
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    jax.block_until_ready(step(model, state, next(keys), np.float32(0))[2])
    curve = [(0.0, float(workload.validate(model)))]
    fit_curve = [float(workload.fit(model))] if fit else None
    counts = [0]  # the steps taken at each evaluation of `curve`
    elapsed, steps, chunk, accepted, rate = 0.0, 0, 1, 0, math.inf
    while elapsed < workload.budget:
        start = time.perf_counter()
        for i in range(chunk):
            # The schedules' clock: the time measured at the chunk's start, plus
            # the steps since then at the rate so far.
            progress = min((elapsed + i / rate) / workload.budget, 1.0)
            model, state, loss = step(model, state, next(keys), np.float32(progress))
            if count_accepted:  # a device-side sum, no host sync
                accepted = accepted + optax.tree.get(state, "accepted")
        jax.block_until_ready(loss)
        elapsed += time.perf_counter() - start
        steps += chunk
        value_now = float(workload.validate(model))
        curve.append((elapsed, value_now if math.isfinite(value_now) else math.inf))
        if fit:
            fit_curve.append(float(workload.fit(model)))
        counts.append(steps)
        rate = steps / elapsed
        chunk = max(1, int(rate * workload.budget / workload.evaluations))
    # After the timed steps: on the CPU, `memory_analysis` of a step that holds a
    # host callback (the warning's) made the later calls of the same compiled
    # step up to 1.35x faster (2026-12-05, jax 0.10.2), a speed a user's plain
    # `jit` does not get; measured before the run, it flattered KFAC's steps/s.
    memory = step_memory(step, model, state, next(keys), np.float32(1))
    jax.clear_caches()  # hundreds of runs: free their compiled programs
    print(f"    run {value} seed {seed}: final {curve[-1][1]:.4g}", flush=True)
    result = {
        "curve": curve,
        "steps": counts,
        "steps_per_s": steps / elapsed,
        "memory": memory,
        "final": curve[-1][1],
    }
    if fit:
        result["fit_curve"] = fit_curve
    if count_accepted:  # the Levenberg-Marquardt rule's record
        result["accepted"] = float(accepted) / steps
        result["damping"] = float(optax.tree.get(state, "damping"))
    return result


def value_at(curve, t):
    """The last validation value at or before training time `t`."""
    return [v for s, v in curve if s <= t][-1]


def final_score(result):
    """What sets AdamW's reference run, whose value at half the budget is the
    target: the final value, ties broken by the validation value's mean over the
    run's time (each evaluation held until the next), which is lower the sooner
    a setting gets low. A validation error on 450 samples ties often: on the CNN
    all three of AdamW's learning rates ended at the same error (2026-12-05)."""
    times, values = zip(*result["curve"], strict=True)
    held = np.diff(times)
    return result["final"], float(np.dot(values[:-1], held) / np.sum(held))


def tuning_score(result, target):
    """What tuning minimises: the time to `target`, as in AlgoPerf, whose score is
    the time to target of a workload's fastest tuning trial; ties (never) broken
    by `final_score`. Until session 25 tuning minimised `final_score` alone, and
    on the CNN, whose target falls in the budget's first tenth, one validation
    error at the end moved grafted KFAC's pick between learning rates that reach
    the target 1.5x apart (2026-12-05)."""
    return time_to(result["curve"], target), *final_score(result)


def time_to(curve, target):
    """The first `t` of `curve`'s `(t, value)` pairs with `value <= target`."""
    for t, v in curve:
        if v <= target:
            return t
    return math.inf


def steps_to(result, target):
    """The steps taken by the first evaluation at or below `target`."""
    values = [v for _, v in result["curve"]]
    return time_to(zip(result["steps"], values, strict=True), target)


def ratios_to_adam(values, adam_values):
    """Each seed's value (a time or a step count to target) over AdamW's on the
    same seed, over the seeds on which AdamW reached the target ("never" is
    infinite)."""
    return [v / a for v, a in zip(values, adam_values, strict=True) if a < math.inf]


def ratio_cell(ratio):
    return "never" if math.isinf(ratio) else f"{ratio:.2f}x"


def benchmark(workload, print_row, cache, only=None, seeds=3):
    """Every optimizer's tuning runs on seed 0 and its best setting's runs on
    seeds 1 to `seeds - 1` (or those of the optimizers whose labels start with one
    of the prefixes `only`, and AdamW's, which come first and set the target);
    runs already in `cache` (a JSON file, so that an interrupted run resumes) are
    not run again. Returns the results and the target."""
    stored = json.loads(cache.read_text()) if cache.exists() else {}
    results, target = {}, None
    for label, name, values, factory in optimizers(workload):
        if only and not label.startswith(("AdamW", *only)):
            continue
        key = f"{workload.name}/{label}"
        if "GGN" in label and workload.name.startswith("transformer"):
            # (T, vocab) logits: the exact GGN's one pullback per output raises
            # the documented ValueError before allocating; record its message.
            try:
                run(workload, factory, values[0], 0)
            except ValueError as error:
                results[label] = {"error": str(error).split(":")[0]}
            continue
        entry = stored.setdefault(key, {"name": name, "tuned": []})
        done = [v for v, _ in entry["tuned"]]
        for v in values:
            if v not in done:
                entry["tuned"].append([v, run(workload, factory, v, 0)])
                cache.write_text(json.dumps(stored))
        tuned = {v: r for v, r in entry["tuned"] if v in values}
        if target is None:  # AdamW's reference run sets the target
            reference = min(tuned, key=lambda v: final_score(tuned[v]))
            target = value_at(tuned[reference]["curve"], workload.budget / 2)
        best = min(tuned, key=lambda v: tuning_score(tuned[v], target))
        if entry.get("best") != best:
            entry["best"], entry["seeds"] = best, [tuned[best]]
        for seed in range(len(entry["seeds"]), seeds):
            entry["seeds"].append(run(workload, factory, best, seed))
            cache.write_text(json.dumps(stored))
        results[label] = {
            **entry,
            "seeds": entry["seeds"][:seeds],
            "grid": [
                (v, r["final"], time_to(r["curve"], target)) for v, r in tuned.items()
            ],
        }
        print_row(label, results[label])
    return results, target


def report(workload, results, target):
    adam = results["AdamW (warmup-cosine)"]
    adam_rate = np.mean([r["steps_per_s"] for r in adam["seeds"]])
    adam_times = [time_to(r["curve"], target) for r in adam["seeds"]]
    adam_steps = [steps_to(r, target) for r in adam["seeds"]]
    seeds = ", ".join(str(i) for i in range(len(adam["seeds"])))
    print(
        f"\n### {workload.name}: {workload.metric}, budget {workload.budget:.0f} s, "
        f"target {target:.4g} (AdamW seed 0 at {workload.budget / 2:.0f} s)\n"
    )
    print(
        "| optimizer | best setting | grid (final, seed 0; time to target, s) | "
        f"steps/s | step time / AdamW's | step memory (MB) | final (seeds {seeds}) "
        "| time to target (s) | / AdamW's on the same seed | median, worst | "
        "steps to target / AdamW's (median) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda t: "never" if math.isinf(t) else f"{t:.1f}"
    for label, r in results.items():
        if "error" in r:
            print(f"| {label} | ValueError: {r['error']} | | | | | | | | | |")
            continue
        rate = np.mean([s["steps_per_s"] for s in r["seeds"]])
        times = [time_to(s["curve"], target) for s in r["seeds"]]
        ratio = [ratio_text(t, a) for t, a in zip(times, adam_times, strict=True)]
        ratios = ratios_to_adam(times, adam_times)
        summary = ", ".join(
            ratio_cell(x) for x in ((np.median(ratios), max(ratios)) if ratios else ())
        )
        step_ratios = ratios_to_adam(
            [steps_to(s, target) for s in r["seeds"]], adam_steps
        )
        steps = ratio_cell(np.median(step_ratios)) if step_ratios else ""
        grid = ", ".join(f"{v:g}: {f:.3g} ({fmt(t)})" for v, f, t in r["grid"])
        finals = ", ".join(f"{s['final']:.4g}" for s in r["seeds"])
        print(
            f"| {label} | {r['name']}={r['best']:g} | {grid} | {rate:.1f} | "
            f"{adam_rate / rate:.2f}x | {r['seeds'][0]['memory'] / 1e6:.0f} | "
            f"{finals} | {', '.join(fmt(t) for t in times)} | "
            f"{', '.join(ratio)} | {summary} | {steps} |"
        )


def ratio_text(time, adam_time):
    """A time to target over AdamW's on the same seed."""
    if math.isinf(time):
        return "never"
    if math.isinf(adam_time):
        return "(AdamW never)"
    return ratio_cell(time / adam_time)


def best_of_three(work):
    """The fastest of three timed calls of `work()`, which returns what to wait
    for. Callers warm up first: the first calls after a compile run slower."""
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(work())
        best = min(best, time.perf_counter() - start)
    return best


def mean_time(function, *args, repeats=10):
    for _ in range(3):  # the compile and two warm-up calls
        jax.block_until_ready(function(*args))
    return best_of_three(lambda: [function(*args) for _ in range(repeats)]) / repeats


def step_timer(workload, model, opt, curvature, warm_up=20, count=40):
    """A function that times `count` steps and returns the time per step
    (every refresh period included), after `warm_up` steps: the first calls
    after a compile run slower."""
    step = make_step(workload, opt, curvature)
    keys = iter(jax.random.split(jax.random.key(3), 10_000))
    carry = [model, opt.init(eqx.filter(model, eqx.is_inexact_array))]

    def steps(n):
        for _ in range(n):
            carry[0], carry[1], loss = step(*carry, next(keys))
        return loss

    jax.block_until_ready(steps(warm_up))

    def timed():
        start = time.perf_counter()
        jax.block_until_ready(steps(count))
        return (time.perf_counter() - start) / count

    return timed


def warning_price(workload, rounds=9):
    """The default KFAC step with the warning against the same with
    `warn=False`, taking turns `rounds` times: the median of the paired
    ratios."""
    model = workload.model(jax.random.key(0))
    fisher = dict(solver="kfac", curvature="fisher", kfac_every=5)
    warned = step_timer(workload, model, *gn(workload, **fisher))
    silent = step_timer(workload, model, *gn(workload, warn=False, **fisher))
    pairs = [(warned(), silent()) for _ in range(rounds)]
    ratios = [w / s for w, s in pairs]
    print(
        f"| {workload.name} | {1e3 * np.median([w for w, _ in pairs]):.2f} "
        f"| {1e3 * np.median([s for _, s in pairs]):.2f} | {np.median(ratios):.3f} "
        f"| {min(ratios):.3f}, {max(ratios):.3f} |",
        flush=True,
    )


def quarter_errors(workload, steps):
    """How well every fourth sample estimates the rescaling's curvature term
    `dᵀ C d` along the default KFAC step `d` (what `kfac_rescale_tol` tests):
    over `steps` steps of seed 0, the quarter's estimated relative standard
    error and its actual error against the batch's form, both over
    `dᵀ(C + λ I)d`; 10th, 50th and 90th percentiles over the accepted steps."""
    model = workload.model(jax.random.key(0))
    opt, curvature = gn(workload, solver="kfac", curvature="fisher", kfac_every=5)
    step = make_step(workload, opt, curvature)
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def errors(model, new_model, state, key):
        batch = workload.batch(key)  # the step's batch: `make_step` draws it so
        d = jax.tree.map(
            jnp.subtract,
            eqx.filter(new_model, eqx.is_inexact_array),
            eqx.filter(model, eqx.is_inexact_array),
        )
        op = eqx_ggn.curvature_operator(
            model=model,
            data=batch,
            loss_fn=workload.loss_fn,
            curvature=curvature,
            factor=workload.factor,
        )
        n = len(batch["input"])
        terms = op._sample_forms([d], np.arange(0, n, 4))[:, 0, 0]
        m = terms.shape[0]
        norm = sum(jnp.vdot(x, x) for x in jax.tree.leaves(d))
        damping = optax.tree.get(state, "damping") * norm
        whole = op.quadratic_form([d])[0, 0] + damping
        estimated = n / m * jnp.sqrt(m * jnp.var(terms, ddof=1))
        estimate = n / m * terms.sum() + damping
        return estimated / estimate, jnp.abs(estimate - whole) / whole

    rows = []
    for key in jax.random.split(jax.random.key(100), steps):
        new_model, new_state, _ = step(model, state, key)
        if bool(optax.tree.get(new_state, "accepted")):
            rows.append([float(e) for e in errors(model, new_model, state, key)])
        model, state = new_model, new_state
    low_mid_high = np.percentile(np.asarray(rows), [10, 50, 90], axis=0).T
    cells = [", ".join(f"{v:.2f}" for v in row) for row in low_mid_high]
    print(f"| {workload.name} | {len(rows)} of {steps} | {cells[0]} | {cells[1]} |")


def generalization(workload, cache, seeds=1):
    """Validation against the fit to the training data, for AdamW and the default
    KFAC row at their tuned settings in `cache` (the time-to-target run's), on
    seeds 0 to `seeds - 1`, with the metric on training data recorded at every
    evaluation: per seed, the lowest validation value of each, and each one's
    validation value where its training value first falls to `T`, the higher
    of the two training values at those lowest points (a fit both reach)."""
    stored = json.loads(cache.read_text())
    labels = ("AdamW (warmup-cosine)", "KFAC Fisher, LM (defaults)")
    print(
        f"\n#### {workload.name}: {workload.metric}\n\n"
        "| seed | T | optimizer | setting | lowest validation value (at s) | "
        "training value there | final training value | validation where "
        "training first <= T (at s) |\n|---|---|---|---|---|---|---|---|"
    )
    for seed in range(seeds):
        runs = {}
        for label, name, _, factory in optimizers(workload):
            if label in labels:
                best = stored[f"{workload.name}/{label}"]["best"]
                result = run(workload, factory, best, seed, fit=True)
                runs[label] = (f"{name}={best:g}", result)
        lowest = {
            label: int(np.argmin([v for _, v in r["curve"]]))
            for label, (_, r) in runs.items()
        }
        level = max(r["fit_curve"][lowest[label]] for label, (_, r) in runs.items())
        for label, (setting, r) in runs.items():
            i = lowest[label]
            t, v = r["curve"][i]
            j = next(k for k, f in enumerate(r["fit_curve"]) if f <= level)
            print(
                f"| {seed} | {level:.4g} | {label} | {setting} | {v:.4g} ({t:.1f}) | "
                f"{r['fit_curve'][i]:.4g} | {r['fit_curve'][-1]:.4g} | "
                f"{r['curve'][j][1]:.4g} ({r['curve'][j][0]:.1f}) |",
                flush=True,
            )


def costs(workload):
    """What each KFAC setting costs on a workload: the pieces, and whole steps
    against AdamW's."""
    model = workload.model(jax.random.key(0))
    batch = workload.batch(jax.random.key(1))
    key = jax.random.key(2)
    loss_fn = workload.loss_fn
    grad = eqx.filter_jit(eqx.filter_value_and_grad(workload.train_loss))
    rows = [("gradient (eqx.filter_value_and_grad)", mean_time(grad, model, batch))]

    def operator(m, b):
        return eqx_ggn.value_and_grad(
            model=m,
            batch=b,
            loss_fn=loss_fn,
            curvature="fisher",
            factor=workload.factor,
            return_operator=True,
        )

    def with_product(m, b):
        (_, g), op = operator(m, b)
        return op.mv(g)

    def with_form(m, b):
        (_, g), op = operator(m, b)
        return op.quadratic_form([g])

    # The step's linearization alone, then with what each use of it adds.
    pieces = {
        "linearization and gradient (eqx_ggn.value_and_grad, return_operator)": (
            lambda m, b: operator(m, b)[0]
        ),
        "  + one GGN product (op.mv: a JVP and a transposed JVP)": with_product,
        "  + one quadratic form (op.quadratic_form: a JVP)": with_form,
        "the loss at a trial point (a forward pass)": workload.train_loss,
    }
    for name, function in pieces.items():
        rows.append((name, mean_time(eqx.filter_jit(function), model, batch)))
    for sharing in ("expand", "reduce"):
        factors = eqx.filter_jit(
            lambda m, b, k, s=sharing: eqx_ggn.kfac_factors(
                m, b, loss_fn, curvature="fisher", key=k, weight_sharing=s
            )
        )
        rows.append(
            (
                f"kfac_factors(curvature='fisher', weight_sharing='{sharing}')",
                mean_time(factors, model, batch, key),
            )
        )
    fisher = eqx_ggn.kfac_factors(model, batch, loss_fn, curvature="fisher", key=key)
    decompose = jax.jit(eqx_ggn._kfac.eigendecompose)
    rows.append(("eigendecompositions of every factor", mean_time(decompose, fisher)))
    print(f"\n### {workload.name}: the pieces\n")
    print("| piece | time (ms) |\n|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {1e3 * seconds:.1f} |")

    settings = [
        dict(kfac_every=1),
        dict(kfac_every=5),
        dict(kfac_every=5, warn=False),
        dict(kfac_every=5, kfac_rescale_tol=0.25),
        dict(kfac_every=5, kfac_rescale_tol=float("inf")),
        dict(kfac_every=20),
        dict(kfac_every=5, kfac_inverse_every=1),
        dict(kfac_every=5, adaptive_momentum=True),
        dict(kfac_every=1, adaptive_damping=False, kfac_rescale=False, damping=0.1),
        dict(kfac_every=5, adaptive_damping=False, kfac_rescale=False, damping=0.1),
    ]
    settings = [dict(solver="kfac", curvature="fisher", **s) for s in settings]
    settings += [
        dict(cg_maxiter=10),
        dict(cg_maxiter=10, preconditioner="kfac", kfac_every=5, curvature="fisher"),
    ]
    paired_steps(
        workload,
        model,
        "eqx_ggn.gauss_newton setting",
        [
            (", ".join(f"{k}={v!r}" for k, v in kwargs.items()), gn(workload, **kwargs))
            for kwargs in settings
        ],
    )


def paired_steps(workload, model, column, settings, rounds=5, count=40):
    """Each `(name, (optimizer, curvature))` of `settings` timed in turns with
    AdamW, `rounds` times `count` steps: a slow spell of the shared machine then
    slows both sides of a pair. Session 17 timed AdamW once per table, and its
    step read 26.6 ms in one table and 47.9 ms in the next, ten minutes later,
    moving every ratio by 1.8x."""
    adam = step_timer(workload, model, optax.adamw(3e-3), None, count=count)
    adam_times = []
    print(f"\n### {workload.name}: step time against AdamW's, {rounds} paired runs\n")
    print(
        f"| {column} | step (ms, median) | / AdamW's (median "
        "of the pairs) | lowest, highest |\n|---|---|---|---|"
    )
    for name, (opt, curvature) in settings:
        setting = step_timer(workload, model, opt, curvature, count=count)
        pairs = [(adam(), setting()) for _ in range(rounds)]
        adam_times += [a for a, _ in pairs]
        ratios = [s / a for a, s in pairs]
        print(
            f"| {name} | {1e3 * np.median([s for _, s in pairs]):.1f} "
            f"| {np.median(ratios):.2f}x | {min(ratios):.2f}x, {max(ratios):.2f}x |",
            flush=True,
        )
    low, middle, high = np.percentile(1e3 * np.asarray(adam_times), [0, 50, 100])
    print(
        f"\nAdamW's step over the {len(adam_times)} runs: median {middle:.1f} ms, "
        f"lowest {low:.1f}, highest {high:.1f}."
    )


def grafted_costs(workload):
    """`eqx_ggn.grafted_kfac`'s step at three factor periods, and Muon's, each
    against AdamW's."""
    model = workload.model(jax.random.key(0))
    settings = [
        (
            f"grafted_kfac(kfac_every={k}, kfac_inverse_every={k})",
            (
                eqx_ggn.grafted_kfac(
                    3e-3, workload.loss_fn, kfac_every=k, kfac_inverse_every=k
                ),
                None,
            ),
        )
        for k in (1, 5, 20)
    ]
    settings.append(("optax.contrib.muon", muon(3e-3)))
    paired_steps(workload, model, "optimizer", settings)


def large_costs(workload, only=None):
    """For the width-512 transformer (`--large`), whose steps take seconds on a
    CPU: the default steps of `grafted_kfac`, the Levenberg-Marquardt KFAC and
    Muon against AdamW's, twice over 20 steps after 20 warm-up steps, so that
    each window holds one refresh of `grafted_kfac`'s factors and inverses, and
    four factor folds and two eigendecompositions of the Levenberg-Marquardt
    KFAC's. The MLP's down-projection has 2,048 inputs and a bias, an `A` of
    2,049 above the default `kfac_max_dim`, so diagonal; a second
    `grafted_kfac` row keeps it dense. `only`: prefixes of the rows to run."""
    model = workload.model(jax.random.key(0))
    settings = [
        (
            "grafted_kfac (defaults)",
            (eqx_ggn.grafted_kfac(3e-3, workload.loss_fn), None),
        ),
        (
            "grafted_kfac(kfac_max_dim=2049)",
            (eqx_ggn.grafted_kfac(3e-3, workload.loss_fn, kfac_max_dim=2049), None),
        ),
        (
            'gauss_newton(solver="kfac", curvature="fisher") (defaults)',
            gn(workload, solver="kfac", curvature="fisher"),
        ),
        ("optax.contrib.muon", muon(3e-3)),
    ]
    settings = [(n, s) for n, s in settings if not only or n.startswith(tuple(only))]
    paired_steps(workload, model, "optimizer", settings, rounds=2, count=20)


def sweep(workload, column, settings, factory, count_accepted=False):
    """One row per setting (`column` names it) and seed 0 and 1: steps/s, with
    `count_accepted` the accepted fraction and the final damping, and the
    validation value at fractions of the budget. `factory(setting)`."""
    fractions = (0.1, 0.2, 0.4, 0.5, 0.75, 1.0)
    print(f"\n### {workload.name}: {workload.metric}, budget {workload.budget:.0f} s\n")
    marks = " | ".join(f"at {f * workload.budget:.0f} s" for f in fractions)
    rule = "accepted | final λ | " if count_accepted else ""
    print(f"| {column} | seed | steps/s | {rule}{marks} |")
    print("|---|---|---|" + "---|" * (len(fractions) + 2 * count_accepted))
    for name, setting in settings:
        for seed in (0, 1):
            r = run(workload, factory, setting, seed, count_accepted=count_accepted)
            values = " | ".join(
                f"{value_at(r['curve'], f * workload.budget):.4g}" for f in fractions
            )
            rule = ""
            if count_accepted:
                rule = f"{r['accepted']:.1%} | {r['damping']:.2g} | "
            print(
                f"| {name} | {seed} | {r['steps_per_s']:.1f} | {rule}{values} |",
                flush=True,
            )


def floors(workload):
    """`kfac_damping_floor` over two decades on the cosine-lr KFAC row's settings
    (Fisher factors, `kfac_every=5`)."""

    def factory(floor):
        return kfac_cosine(workload, kfac_every=5, kfac_damping_floor=floor)

    settings = [(f"{floor:g}", floor) for floor in (0.0, 0.01, 0.1, 1.0)]
    sweep(workload, "kfac_damping_floor", settings, factory, count_accepted=True)


# Changes to the default KFAC row (Fisher factors, `kfac_every=5`): a floor
# under the Levenberg-Marquardt damping (the rescaling's quadratic model keeps
# it), longer steps, faster-moving factors, and adaptive momentum.
KNOBS = [
    {},
    dict(min_damping=1e-3),
    dict(min_damping=1e-2),
    dict(min_damping=1e-1),
    dict(learning_rate=1.5),
    dict(learning_rate=2.0),
    dict(kfac_decay=0.8),
    dict(adaptive_momentum=True),
]


def knobs(workload):
    """The default KFAC row's settings against the changes in `KNOBS`, with the
    Levenberg-Marquardt rule's accepted fraction and final damping."""

    def factory(knob):
        return gn(workload, solver="kfac", curvature="fisher", kfac_every=5, **knob)

    settings = [
        (", ".join(f"{k}={v!r}" for k, v in knob.items()) or "(defaults)", knob)
        for knob in KNOBS
    ]
    sweep(workload, "change", settings, factory, count_accepted=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workload", default=None)
    parser.add_argument("--costs", action="store_true", help="the cost tables only")
    parser.add_argument(
        "--grafted-costs",
        action="store_true",
        help="grafted_kfac's and Muon's steps against AdamW's only (with --large "
        "the Levenberg-Marquardt KFAC's too, over 20-step windows)",
    )
    parser.add_argument(
        "--warning",
        action="store_true",
        help="the default KFAC step with the warning against warn=False only",
    )
    parser.add_argument(
        "--floors", action="store_true", help="the kfac_damping_floor grid only"
    )
    parser.add_argument(
        "--quarter",
        action="store_true",
        help="how well a quarter of the batch estimates KFAC's rescaling only",
    )
    parser.add_argument(
        "--knobs", action="store_true", help="changes to the default KFAC row only"
    )
    parser.add_argument(
        "--generalization",
        action="store_true",
        help="validation against training fit, AdamW and default KFAC (needs --cache)",
    )
    parser.add_argument(
        "--large",
        action="store_true",
        help="the transformer at width 512, 6 layers, 8 heads (for a GPU), 10 s runs",
    )
    parser.add_argument(
        "--shape",
        default=None,
        help="WIDTH,DEPTH,HEADS: a second transformer instead of the workloads",
    )
    parser.add_argument(
        "--mlps",
        action="store_true",
        help="two MLP workloads (classification, regression) instead, 10 s runs",
    )
    parser.add_argument(
        "--curves",
        action="store_true",
        help="the autoencoder and the CNN on generated curve images instead, 12 s runs",
    )
    parser.add_argument(
        "--vit",
        action="store_true",
        help="a vision transformer on the curve classes instead, 12 s runs",
    )
    parser.add_argument(
        "--fit",
        action="store_true",
        help="targets and curves on the training data instead of the validation set",
    )
    parser.add_argument(
        "--adamw-lr",
        type=float,
        default=None,
        help="AdamW's learning rate, not tuned (a cache without AdamW's rows)",
    )
    parser.add_argument("--cache", default="time_to_target.json")
    parser.add_argument(
        "--seeds", type=int, default=3, help="seeds of each best setting (seed 0 tunes)"
    )
    parser.add_argument(
        "--optimizers",
        default=None,
        help="label prefixes to run, separated by semicolons (AdamW always runs)",
    )
    args = parser.parse_args()
    if args.adamw_lr is not None:
        global ADAMW_LRS
        ADAMW_LRS = (args.adamw_lr,)
    # GaussNewtonWarning: counted per run instead of printed.
    warnings.simplefilter("ignore", eqx_ggn.GaussNewtonWarning)
    scale = 0.1 if args.quick else 1.0
    workloads = [
        transformer_workload(30 * scale),
        cnn_workload(12 * scale),
        autoencoder_workload(12 * scale),
    ]
    if args.large:
        workloads = [transformer_workload(10 * scale, width=512, depth=6, heads=8)]
    if args.shape:
        width, depth, heads = (int(n) for n in args.shape.split(","))
        workloads = [
            dataclasses.replace(
                transformer_workload(30 * scale, width, depth, heads),
                name=f"transformer {width}x{depth}x{heads}",
            )
        ]
    if args.mlps:
        workloads = mlp_workloads(10 * scale)
    if args.curves:
        workloads = [
            autoencoder_workload(12 * scale, data="curves"),
            cnn_workload(12 * scale, data="curves"),
        ]
    if args.vit:
        workloads = [vit_workload(12 * scale)]
    if args.fit:
        workloads = [
            dataclasses.replace(
                w, metric=w.metric.replace("validation", "training"), validate=w.fit
            )
            for w in workloads
        ]
    # The time-to-target runs' cache, one file per workload set.
    suffix = ("-quick" if args.quick else "") + ("-large" if args.large else "")
    suffix += "-fit" if args.fit else ""
    suffix += "-mlps" if args.mlps else ""
    suffix += "-curves" if args.curves else ""
    suffix += "-vit" if args.vit else ""
    suffix += f"-{args.shape.replace(',', 'x')}" if args.shape else ""
    cache = pathlib.Path(args.cache + suffix)
    print(
        f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), jax "
        f"{jax.__version__}"
    )

    def print_row(label, r):
        print(
            f"  {label}: best {r['name']}={r['best']:g}, grid (final, time to "
            f"target) { {v: (round(f, 4), round(t, 2)) for v, f, t in r['grid']} }",
            flush=True,
        )

    if args.warning:
        print(
            "\n| workload | default step (ms) | warn=False (ms) | default / warn=False "
            "(median of the pairs) | lowest, highest |\n|---|---|---|---|---|"
        )
    if args.quarter:
        print(
            "\n| workload | accepted steps | estimated error (10th, 50th, 90th "
            "percentile) | actual error |\n|---|---|---|---|"
        )
    for workload in workloads:
        if args.workload and workload.name != args.workload:
            continue
        if args.quarter:
            quarter_errors(workload, 150 if workload.name == "transformer" else 300)
            continue
        if args.warning:
            warning_price(workload)
            continue
        if args.costs:
            costs(workload)
            continue
        only = args.optimizers.split(";") if args.optimizers else None
        if args.grafted_costs and args.large:
            large_costs(workload, only)
            continue
        if args.grafted_costs:
            grafted_costs(workload)
            continue
        if args.floors:
            floors(workload)
            continue
        if args.knobs:
            knobs(workload)
            continue
        if args.generalization:
            generalization(workload, cache, args.seeds)
            continue
        results, target = benchmark(workload, print_row, cache, only, args.seeds)
        report(workload, results, target)


if __name__ == "__main__":
    main()
