"""What the safe defaults cost, and how `cg_maxiter` and the initial damping matter.

Two problems, full batch, float32, every setting left at its default unless named:

- `moons`: an MLP 2-64-64-3 on 1024 generated points of three interleaved spirals;
- `digits`: an MLP 64-64-10 on scikit-learn's 8x8 digits (1797 images).

Part 1 times one jitted step with the default Levenberg-Marquardt rule against
`adaptive_damping=False` (the same CG work): the price of the extra forward pass
and product. Part 2 trains for a fixed wall-clock budget with `cg_maxiter` in
{5, 10, 20, 50, 100} (damping 1) and with the initial damping in {1e-3, 1e-1, 1,
10} (cg_maxiter 50) and prints the final loss. Output goes into
`docs/benchmarks.md`.

Run: `python benchmarks/defaults.py` (about 3 minutes), `--budget S` per run.
"""

import argparse
import datetime
import platform
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits

import eqx_ggn


def problems():
    key = jax.random.key(0)
    n = 1024
    t = jax.random.uniform(key, (n,)) * 3 * jnp.pi
    label = jnp.arange(n) % 3
    angle = t + 2 * jnp.pi * label / 3
    noise = 0.1 * jax.random.normal(jax.random.key(1), (n, 2))
    x = jnp.stack([t * jnp.cos(angle), t * jnp.sin(angle)], 1) / 5 + noise
    moons = (eqx.nn.MLP(2, 3, 64, 2, key=jax.random.key(2)), x, label)
    digits = load_digits()
    xd = jnp.asarray(digits.data / 16.0, jnp.float32)
    yd = jnp.asarray(digits.target)
    digit_model = eqx.nn.MLP(64, 10, 64, 1, key=jax.random.key(3))
    return {"moons": moons, "digits": (digit_model, xd, yd)}


def make_step(opt):
    @eqx.filter_jit
    def step(model, state, batch):
        (value, grads), op = eqx_ggn.value_and_grad(
            model=model, batch=batch, loss_fn="cross_entropy", return_operator=True
        )
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, state = opt.update(
            grads, state, params, model=model, batch=batch, operator=op
        )
        return eqx.apply_updates(model, updates), state, value

    return step


def time_per_step(model, batch, repeats=20, **kwargs):
    opt = eqx_ggn.gauss_newton(1.0, loss_fn="cross_entropy", **kwargs)
    step = make_step(opt)
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    jax.block_until_ready(step(model, state, batch))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(model, state, batch))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def train(model, batch, budget, **kwargs):
    opt = eqx_ggn.gauss_newton(1.0, loss_fn="cross_entropy", **kwargs)
    step = make_step(opt)
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    jax.block_until_ready(step(model, state, batch))  # compile outside the budget
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < budget:
        model, state, value = step(model, state, batch)
        jax.block_until_ready(value)
        steps += 1
    rejected = int(state[0].rejected_steps)
    return float(value), steps, rejected


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=5.0, help="seconds per run")
    args = parser.parse_args()
    print(
        f"# {datetime.date.today()} | {platform.processor() or platform.machine()}"
        f" | {jax.devices()[0].device_kind} | jax {jax.__version__} | float32"
    )
    data = problems()
    print("\n| problem | fixed damping (ms/step) ", end="")
    print("| Levenberg-Marquardt (ms/step)", end="")
    print(" | ratio |")
    print("|---|---|---|---|")
    for name, (model, x, y) in data.items():
        batch = {"input": x, "target": y}
        fixed = time_per_step(model, batch, adaptive_damping=False)
        adaptive = time_per_step(model, batch)
        print(f"| {name} | {fixed:.1f} | {adaptive:.1f} | {adaptive / fixed:.2f} |")

    print(f"\nFinal loss after {args.budget:g} s (steps, rejected at the end):\n")
    print("| setting | " + " | ".join(data) + " |")
    print("|---|" + "---|" * len(data))
    settings = [{"cg_maxiter": m} for m in (5, 10, 20, 50, 100)]
    settings += [{"damping": d} for d in (1e-3, 1e-1, 10.0)]
    settings += [{"adaptive_damping": False, "damping": 1e-3}]
    for kwargs in settings:
        cells = []
        for model, x, y in data.values():
            loss, steps, rejected = train(
                model, {"input": x, "target": y}, args.budget, **kwargs
            )
            cells.append(f"{loss:.2e} ({steps}, {rejected})")
        label = ", ".join(f"{k}={v:g}" for k, v in kwargs.items())
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
