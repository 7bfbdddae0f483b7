"""KFAC: CG iterations with and without preconditioning, time to accuracy against
tuned Adam, and kfac-jax side by side.

Two problems, both from the examples (scikit-learn digits, no download):

- the deep autoencoder 64-128-64-32-8-32-64-128-64 (tanh, binary cross-entropy on
  the pixel intensities, mini-batches of 512), as in `examples/autoencoder_hf.py`;
- the digits classifier, MLP 64-128-128-10 (tanh, cross-entropy, mini-batches of
  256), as in `examples/classification_digits.py`.

Part 1, CG iterations: at the initial parameters and after 40 and 200 steps of
plain Gauss-Newton training, CG on `(GGN + λ I) d = g` to relative residual 1e-3
(no progress test, at most 5,000 iterations), for λ = 1e-2, 1e-3, 1e-4: no
preconditioner, Jacobi with the exact GGN diagonal, and the damped KFAC inverse
(exact GGN factors of the same batch). The wall time is one jitted solve;
building the KFAC inverse (factors and eigendecompositions) is timed apart.

Part 2, time to accuracy, untuned settings: `solver="kfac"` (defaults: exact GGN
factors), with `curvature="fisher"` (sampled labels), with
`adaptive_momentum=True`, `preconditioner="kfac"` (CG, `cg_maxiter=50`) and plain
CG (Hessian-free as in the example), against Adam at learning rates 1e-3, 3e-3
and 1e-2 (the best one is the baseline). Equal wall-clock budgets, compilation
excluded. The table gives the best test metric reached by each time, and the
final training objective on the whole training set.

Part 3: kfac-jax's optimizer on a plain-JAX MLP, in a subprocess: its version and
its result or error.

Part 4: full batch, `solver="kfac"` with its defaults on the whole training set
of each problem, `kfac_damping_floor` 0, 0.01 and 0.1: the training objective
after 10, 25, 50 and 100 steps.

Part 5: full batch, `solver="kfac"` with its defaults but `kfac_every` 1 and 5
(the default since session 26), from four initializations of each model: the
training objective after 25 and 100 steps, the time per step, and the objective
`kfac_every=5` has reached when `kfac_every=1` has spent its first 25 steps' time.

Run: `python benchmarks/kfac.py` (about 20 minutes on 2 CPU cores), or `--budget`
to change the seconds per optimizer in part 2 (`--kfac-damping-floor 0` runs its
`solver="kfac"` rows without the floor; `--kfac-every N` sets `kfac_every` of the
`solver="kfac"` rows of parts 2 and 4).
"""

import argparse
import datetime
import platform
import subprocess
import sys
import textwrap
import time
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _problems import AUTOENCODER_SIZES, Autoencoder, digits

import eqx_ggn
from eqx_ggn._cg import cg
from eqx_ggn._kfac import apply_kfac_inverse, eigendecompose


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--budget", type=float, default=20.0, help="seconds per run")
parser.add_argument("--parts", default="12345", help="which parts to run")
parser.add_argument(
    "--kfac-damping-floor",
    type=float,
    default=0.1,
    help="kfac_damping_floor of part 2's solver='kfac' rows (0: off)",
)
parser.add_argument(
    "--kfac-every",
    type=int,
    default=None,
    help="kfac_every of the solver='kfac' rows of parts 2 and 4 (default: the "
    "optimizer's)",
)
args = parser.parse_args()
KFAC_EVERY = {} if args.kfac_every is None else {"kfac_every": args.kfac_every}
# Mini-batch noise rejects runs of steps near convergence; the count is in the state.
warnings.simplefilter("ignore", eqx_ggn.GaussNewtonWarning)

(train_images, train_labels), (test_images, test_labels) = digits()


# Each problem's model from a key; part 5 starts it from several.
MODELS = {
    "autoencoder": lambda key: Autoencoder(AUTOENCODER_SIZES, key),
    "digits": lambda key: eqx.nn.MLP(64, 10, 128, 2, activation=jnp.tanh, key=key),
}


PROBLEMS = {
    "autoencoder": dict(
        model=MODELS["autoencoder"](jax.random.key(0)),
        loss="binary_cross_entropy",
        train=(train_images, train_images),
        test=(test_images, test_images),
        batch_size=512,
    ),
    "digits": dict(
        model=MODELS["digits"](jax.random.key(0)),
        loss="cross_entropy",
        train=(train_images, train_labels),
        test=(test_images, test_labels),
        batch_size=256,
    ),
}


def objective(model, x, y, loss):
    fn = eqx_ggn.binary_cross_entropy_loss
    if loss == "cross_entropy":
        fn = eqx_ggn.cross_entropy_loss
    return jnp.mean(jax.vmap(fn)(jax.vmap(model)(x), y))


@eqx.filter_jit
def test_metric(model, x, y, loss):
    """Autoencoder: squared reconstruction error per image; digits: test loss."""
    logits = jax.vmap(model)(x)
    if loss == "binary_cross_entropy":
        return jnp.mean(jnp.sum((jax.nn.sigmoid(logits) - x) ** 2, axis=-1))
    return objective(model, x, y, loss)


@eqx.filter_jit
def test_accuracy(model, x, y):
    return jnp.mean(jnp.argmax(jax.vmap(model)(x), axis=-1) == y)


def make_step(opt, loss, second_order):
    @eqx.filter_jit
    def step(model, opt_state, x, y):
        value, grads = eqx.filter_value_and_grad(objective)(model, x, y, loss)
        params = eqx.filter(model, eqx.is_inexact_array)
        extra = {}
        if second_order:
            extra = {"model": model, "batch": {"input": x, "target": y}}
        updates, opt_state = opt.update(grads, opt_state, params, **extra)
        return eqx.apply_updates(model, updates), opt_state, value

    return step


def train(problem, opt, second_order, budget=None, steps=None, seed=1):
    """Run on random mini-batches for `budget` seconds (compilation excluded) or
    `steps` steps; return the model, steps, and (time, test metric) history."""
    p = PROBLEMS[problem]
    model, loss, (tx, ty) = p["model"], p["loss"], p["train"]
    step = make_step(opt, loss, second_order)
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    bs = p["batch_size"]
    jax.block_until_ready(step(model, state, tx[:bs], ty[:bs]))  # compile
    rng = np.random.default_rng(seed)
    elapsed, count, history = 0.0, 0, []
    while (budget is None or elapsed < budget) and (steps is None or count < steps):
        idx = rng.choice(len(tx), bs, replace=False)
        start = time.perf_counter()
        model, state, value = step(model, state, tx[idx], ty[idx])
        jax.block_until_ready(value)
        elapsed += time.perf_counter() - start
        count += 1
        if budget is not None and (count % 5 == 0 or elapsed >= budget):
            history.append((elapsed, float(test_metric(model, *p["test"], loss))))
    return model, count, history, state


def header():
    print(f"\n{datetime.date.today()}, {platform.processor() or platform.machine()}")
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}\n")


def part_cg():
    print("\n## Part 1: CG iterations to relative residual 1e-3\n")
    print(
        "| problem | point | λ | none: its | Jacobi: its | KFAC: its | none / KFAC | "
        "none: ms | Jacobi: ms | KFAC: ms | KFAC build: ms |"
    )
    print("|---" * 11 + "|")
    for problem, p in PROBLEMS.items():
        loss = p["loss"]
        gn = eqx_ggn.gauss_newton(1.0, loss_fn=loss, cg_maxiter=50, warm_start=True)
        points = {"init": p["model"]}
        for n in (40, 200):
            points[f"{n} GN steps"] = train(problem, gn, True, steps=n)[0]
        bs = p["batch_size"]
        batch = {"input": p["train"][0][:bs], "target": p["train"][1][:bs]}

        @eqx.filter_jit
        def build(model, batch, loss=loss):
            op = eqx_ggn.curvature_operator(model=model, data=batch, loss_fn=loss)
            params, static = eqx.partition(model, eqx.is_inexact_array)
            diagonal = eqx_ggn.exact_diagonal(
                eqx_ggn.as_model_fn(static), params, batch, loss
            )
            return op, diagonal

        @eqx.filter_jit
        def kfac_eigen(model, batch, loss=loss):
            return eigendecompose(eqx_ggn.kfac_factors(model, batch, loss))

        @eqx.filter_jit
        def solve(op, diagonal, eigen, lam, kind):
            def mv(v):
                return jax.tree.map(lambda a, b: a + lam * b, op.mv(v), v)

            precondition = None
            if kind == "jacobi":
                precondition = lambda r: jax.tree.map(
                    lambda x, d: x / (d + lam), r, diagonal
                )
            elif kind == "kfac":
                precondition = lambda r: apply_kfac_inverse(eigen, r, lam)
            result = cg(
                mv,
                op.grad,
                tol=1e-3,
                maxiter=5000,
                preconditioner=precondition,
                progress_tol=0.0,
            )
            return result.num_steps, result.residual_norm

        for point, model in points.items():
            op, diagonal = build(model, batch)
            jax.block_until_ready(kfac_eigen(model, batch))
            start = time.perf_counter()
            eigen = jax.block_until_ready(kfac_eigen(model, batch))
            build_ms = 1e3 * (time.perf_counter() - start)
            for lam in (1e-2, 1e-3, 1e-4):
                its, ms = {}, {}
                for kind in ("none", "jacobi", "kfac"):
                    args_ = (op, diagonal, eigen, jnp.float32(lam), kind)
                    jax.block_until_ready(solve(*args_))
                    start = time.perf_counter()
                    steps_, _ = jax.block_until_ready(solve(*args_))
                    ms[kind] = 1e3 * (time.perf_counter() - start)
                    its[kind] = int(steps_)
                print(
                    f"| {problem} | {point} | {lam:g} | {its['none']} | "
                    f"{its['jacobi']} | {its['kfac']} | "
                    f"{its['none'] / its['kfac']:.1f}x | {ms['none']:.1f} | "
                    f"{ms['jacobi']:.1f} | {ms['kfac']:.1f} | {build_ms:.1f} |",
                    flush=True,
                )


def part_time_to_accuracy():
    print(f"\n## Part 2: time to accuracy, {args.budget:g} s per run\n")
    for problem, p in PROBLEMS.items():
        loss = p["loss"]
        kfac = dict(
            solver="kfac", kfac_damping_floor=args.kfac_damping_floor, **KFAC_EVERY
        )
        runs = {f"adam {lr:g}": (optax.adam(lr), False) for lr in (1e-3, 3e-3, 1e-2)}
        runs['solver="kfac"'] = (eqx_ggn.gauss_newton(1.0, loss_fn=loss, **kfac), True)
        runs['solver="kfac", curvature="fisher"'] = (
            eqx_ggn.gauss_newton(1.0, loss_fn=loss, curvature="fisher", **kfac),
            True,
        )
        runs['solver="kfac", adaptive_momentum'] = (
            eqx_ggn.gauss_newton(1.0, loss_fn=loss, adaptive_momentum=True, **kfac),
            True,
        )
        runs['preconditioner="kfac" (CG)'] = (
            eqx_ggn.gauss_newton(
                1.0, loss_fn=loss, preconditioner="kfac", cg_maxiter=50
            ),
            True,
        )
        runs["plain CG (Hessian-free)"] = (
            eqx_ggn.gauss_newton(1.0, loss_fn=loss, cg_maxiter=50, warm_start=True),
            True,
        )
        metric = "test error" if problem == "autoencoder" else "test loss"
        marks = [m for m in (1, 2, 5, 10) if m < args.budget] + [args.budget]
        print(f"\n### {problem} ({metric}, lower is better)\n")
        extra = " | train loss" + (" | test acc." if problem == "digits" else "")
        print(
            "| optimizer | steps | ms/step | "
            + " | ".join(f"at {m:g} s" for m in marks)
            + extra
            + " |"
        )
        print("|---" * (len(marks) + 4 + (problem == "digits")) + "|")
        for name, (opt, second_order) in runs.items():
            model, steps, history, _ = train(problem, opt, second_order, args.budget)
            cells = [
                min((e for t, e in history if t <= m), default=float("nan"))
                for m in marks
            ]
            per_step = 1e3 * history[-1][0] / steps
            acc = f" | {float(objective(model, *p['train'], loss)):.4f}"
            if problem == "digits":
                acc += f" | {float(test_accuracy(model, *p['test'])):.3f}"
            print(
                f"| {name} | {steps} | {per_step:.1f} | "
                + " | ".join(f"{c:.4f}" for c in cells)
                + acc
                + " |",
                flush=True,
            )


KFAC_JAX_SCRIPT = textwrap.dedent(
    """
    import time
    import jax, jax.numpy as jnp, numpy as np
    from sklearn.datasets import load_digits
    import kfac_jax

    print("kfac-jax", kfac_jax.__version__, "on jax", jax.__version__)
    d = load_digits()
    x = jnp.asarray(d.data / 16.0, jnp.float32)[:256]
    y = jnp.asarray(d.target)[:256]

    def init(key, sizes=(64, 128, 128, 10)):
        keys = jax.random.split(key, len(sizes) - 1)
        return [
            {"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
            for k, a, b in zip(keys, sizes[:-1], sizes[1:])
        ]

    def model(params, x):
        for layer in params[:-1]:
            x = jnp.tanh(x @ layer["w"] + layer["b"])
        return x @ params[-1]["w"] + params[-1]["b"]

    def loss_fn(params, batch):
        x, y = batch
        logits = model(params, x)
        kfac_jax.register_softmax_cross_entropy_loss(logits, y)
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], 1))

    opt = kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(loss_fn),
        l2_reg=0.0,
        use_adaptive_learning_rate=True,
        use_adaptive_momentum=True,
        use_adaptive_damping=True,
        initial_damping=1.0,
        multi_device=False,
        num_burnin_steps=0,
    )
    params, rng = init(jax.random.key(0)), jax.random.key(1)
    state = opt.init(params, rng, (x, y))
    print("init: ok (layers found by graph matching)")
    for i in range(20):
        params, state, stats = opt.step(
            params, state, rng, batch=(x, y), global_step_int=i
        )
    print("20 steps: loss", float(stats["loss"]))
    """
)


def part_kfac_jax():
    print("\n## Part 3: kfac-jax on a plain-JAX MLP (digits, 64-128-128-10)\n")
    out = subprocess.run(
        [sys.executable, "-c", KFAC_JAX_SCRIPT],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    lines = out.stdout.strip().splitlines()
    errors = [line for line in out.stderr.strip().splitlines() if line.strip()]
    for line in lines:
        print(f"- {line}")
    if out.returncode != 0:
        messages = [e for e in errors if "Error" in e.split(":")[0]]
        last = messages[-1] if messages else (errors[-1] if errors else "?")
        files = [e.strip() for e in errors if e.strip().startswith("File")]
        where = files[-1] if files else ""
        print(f"- failed: `{last}`")
        if where:
            print(f"- at: `{where}`")


def full_batch_run(problem, model, opt, num_steps):
    """`num_steps` full-batch steps of `opt` from `model`: the training objective
    and the seconds spent (compilation excluded) after each step."""
    p = PROBLEMS[problem]
    loss, (x, y) = p["loss"], p["train"]
    step = make_step(opt, loss, True)
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    jax.block_until_ready(step(model, state, x, y))  # compile
    values, times, elapsed = [], [], 0.0
    for _ in range(num_steps):
        start = time.perf_counter()
        model, state, _ = step(model, state, x, y)
        jax.block_until_ready(model)
        elapsed += time.perf_counter() - start
        values.append(float(objective(model, x, y, loss)))
        times.append(elapsed)
    return np.array(values), np.array(times)


def part_full_batch(steps=(10, 25, 50, 100)):
    """`solver="kfac"` (defaults) on the whole training set, the damping floor
    off, at 0.01 and at 0.1: the training objective after each number of steps."""
    print("\n## Part 4: full batch, the damping floor on and off\n")
    print(
        "| problem | kfac_damping_floor | "
        + " | ".join(f"after {k} steps" for k in steps)
        + " | ms/step |"
    )
    print("|---" * (len(steps) + 3) + "|")
    for problem, p in PROBLEMS.items():
        for floor in (0.0, 0.01, 0.1):
            opt = eqx_ggn.gauss_newton(
                1.0,
                loss_fn=p["loss"],
                solver="kfac",
                kfac_damping_floor=floor,
                **KFAC_EVERY,
            )
            values, times = full_batch_run(problem, p["model"], opt, steps[-1])
            cells = " | ".join(f"{values[k - 1]:.5g}" for k in steps)
            ms = 1e3 * times[-1] / steps[-1]
            print(f"| {problem} | {floor:g} | {cells} | {ms:.1f} |", flush=True)


def part_kfac_every(seeds=4, num_steps=100):
    """Full batch, `solver="kfac"` at its defaults with `kfac_every` 1 and 5, from
    `seeds` initializations: the objective after 25 and 100 steps, and where
    `kfac_every=5` is when `kfac_every=1` has spent its 25 steps' time."""
    print(
        "\n## Part 5: full batch, `kfac_every` 1 and 5 over initializations\n\n"
        "| problem | seed | kfac_every=1: after 25, 100 steps | ms/step | "
        "kfac_every=5: after 25, 100 steps | ms/step | kfac_every=5 at "
        "kfac_every=1's 25-step time |\n|---|---|---|---|---|---|---|"
    )
    for problem, p in PROBLEMS.items():
        for seed in range(seeds):
            runs = {}
            for every in (1, 5):
                opt = eqx_ggn.gauss_newton(
                    1.0, loss_fn=p["loss"], solver="kfac", kfac_every=every
                )
                model = MODELS[problem](jax.random.key(seed))
                runs[every] = full_batch_run(problem, model, opt, num_steps)
            (v1, t1), (v5, t5) = runs[1], runs[5]
            reached = np.searchsorted(t5, t1[24], side="right")
            at_time = f"{v5[reached - 1]:.4g}" if reached else "(no step yet)"
            print(
                f"| {problem} | {seed} | {v1[24]:.4g}, {v1[-1]:.4g} | "
                f"{1e3 * t1[-1] / num_steps:.1f} | {v5[24]:.4g}, {v5[-1]:.4g} | "
                f"{1e3 * t5[-1] / num_steps:.1f} | {at_time} |",
                flush=True,
            )


header()
if "1" in args.parts:
    part_cg()
if "2" in args.parts:
    part_time_to_accuracy()
if "3" in args.parts:
    part_kfac_jax()
if "4" in args.parts:
    part_full_batch()
if "5" in args.parts:
    part_kfac_every()
