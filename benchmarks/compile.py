"""Compile time and step time of one `gauss_newton` step under XLA:CPU flags.

On a CPU, a small model's Gauss-Newton step compiles for seconds and runs for
milliseconds: in short runs and test suites, compiling dominates. This script
compiles the README's training step (the 2-32-32-3 classifier on 256 points,
cross-entropy) with each solver, under four `XLA_FLAGS` settings, each in a fresh
process (XLA reads its flags once):

- `default`: no flags;
- `opt0`: `--xla_backend_optimization_level=0` (less LLVM optimization);
- `old emitters`: `--xla_cpu_use_fusion_emitters=false` (XLA:CPU's older
  fusion code generator instead of the newer MLIR one);
- `both`: the two together, what `tests/conftest.py` sets.

Reported: the compile time of one jitted step (`lower(...).compile()`), the
median run time of one step after that, and the largest difference of the
updated parameters from the default flags' ones, relative to the largest
parameter (float32 rounding, from the changed fusion and instruction order).

Usage: `python benchmarks/compile.py`.
"""

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time


FLAGS = {
    "default": "",
    "opt0": "--xla_backend_optimization_level=0",
    "old emitters": "--xla_cpu_use_fusion_emitters=false",
    "both": "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false",
}
SOLVERS = ("cg", "dense", "sample_space", "kfac")


def measure() -> dict:
    """Compile and run one step per solver in this process; return the numbers."""
    import equinox as eqx
    import jax
    import numpy as np

    import eqx_ggn

    model = eqx.nn.MLP(2, 3, 32, 2, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (256, 2))
    y = (x[:, 0] > x[:, 1]).astype(int) + (x[:, 0] > 1)
    batch = {"input": x, "target": y}
    rows = {}
    for solver in SOLVERS:
        opt = eqx_ggn.gauss_newton(1.0, loss_fn="cross_entropy", solver=solver)
        state = opt.init(eqx.filter(model, eqx.is_inexact_array))

        def step(model, state, opt=opt):
            (_, grads), op = eqx_ggn.value_and_grad(
                model=model, batch=batch, loss_fn="cross_entropy", return_operator=True
            )
            params = eqx.filter(model, eqx.is_inexact_array)
            updates, state = opt.update(
                grads, state, params, model=model, batch=batch, operator=op
            )
            return eqx.apply_updates(model, updates), state

        lowered = eqx.filter_jit(step).lower(model, state)
        start = time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start
        out = compiled(model, state)
        jax.block_until_ready(out)
        times = []
        for _ in range(20):
            start = time.perf_counter()
            jax.block_until_ready(compiled(model, state))
            times.append(time.perf_counter() - start)
        leaves = jax.tree.leaves(eqx.filter(out[0], eqx.is_inexact_array))
        rows[solver] = {
            "compile_s": compile_s,
            "step_ms": 1e3 * statistics.median(times),
            "params": [np.asarray(leaf).tolist() for leaf in leaves],
        }
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(measure()))
        return
    import jax
    import numpy as np

    results = {}
    for name, flags in FLAGS.items():
        env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
        out = subprocess.run(
            [sys.executable, __file__, "--child"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    machine = platform.processor() or platform.machine()
    print(
        f"### CPU: {datetime.date.today()}, {machine}, "
        f"{os.cpu_count()} cores, jax {jax.__version__}\n"
    )
    print(
        "| solver | "
        + " | ".join(f"{n}: compile s / step ms / difference" for n in FLAGS)
        + " |"
    )
    print("|---|" + "---|" * len(FLAGS))
    for solver in SOLVERS:
        cells = []
        for name in FLAGS:
            row = results[name][solver]
            ref = results["default"][solver]["params"]
            diff = max(
                np.max(np.abs(np.asarray(a) - np.asarray(b)))
                for a, b in zip(row["params"], ref, strict=True)
            ) / max(np.max(np.abs(np.asarray(b))) for b in ref)
            cells.append(f"{row['compile_s']:.2f} / {row['step_ms']:.2f} / {diff:.0e}")
        print(f"| `{solver}` | " + " | ".join(cells) + " |")
    totals = {n: sum(r["compile_s"] for r in results[n].values()) for n in FLAGS}
    print(
        "| total compile s | " + " | ".join(f"{t:.2f}" for t in totals.values()) + " |"
    )


if __name__ == "__main__":
    main()
