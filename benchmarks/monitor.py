"""Cost of one CurvatureMonitor evaluation against one Adam training step.

The MLP 784-512-512-512-512-10 of `benchmarks/mvp.py` (cross-entropy, batch 256,
float32). The monitor runs with k=1, 20 Lanczos iterations and 10 Hutchinson probes:
30 GGN-vector products on one linearization. The script prints the measured times
and the prediction `linearize + 30 x MVP`, so any hidden re-linearisation per
product would show as a gap.

Usage: `python benchmarks/monitor.py`
"""

import datetime
import platform

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from mvp import _median_time, make_case

import eqx_ggn


def main():
    model, data, _ = make_case("mlp784", jax.random.key(0), jnp.float32)
    params, static = eqx_ggn.partition(model)
    model_fn = eqx_ggn.as_model_fn(static)
    opt = optax.adam(1e-3)
    opt_state = opt.init(params)
    monitor = eqx_ggn.CurvatureMonitor(
        loss_fn="cross_entropy", every=1, top_k=1, num_iters=20, num_samples=10
    )

    def objective(p):
        pred = jax.vmap(lambda x: model_fn(input=x, params=p))(data["input"])
        return jnp.mean(jax.vmap(eqx_ggn.cross_entropy_loss)(pred, data["target"]))

    @jax.jit
    def train_step(p, s):
        updates, s = opt.update(jax.grad(objective)(p), s, p)
        return optax.apply_updates(p, updates), s

    @jax.jit
    def monitor_step(p, i):
        return monitor(i, p, model_fn=model_fn, batch=data)

    @eqx.filter_jit
    def linearize(p):
        return eqx_ggn.curvature_operator(model_fn, p, data, "cross_entropy")

    @eqx.filter_jit
    def mvps(op, v):
        return jax.lax.fori_loop(0, 10, lambda i, v: op.mv(v), v)

    @eqx.filter_jit
    def lanczos_only(op, p):
        return eqx_ggn.top_eigenvalues(op, p, 1, key=jax.random.key(0), num_iters=20)

    @eqx.filter_jit
    def hutchinson_only(op, p):
        return eqx_ggn.hutchinson_trace(op, p, key=jax.random.key(0), num_samples=10)

    t_train = _median_time(train_step, params, opt_state, repeats=20)
    t_monitor = _median_time(monitor_step, params, jnp.asarray(0), repeats=20)
    t_lin = _median_time(linearize, params, repeats=20)
    op = linearize(params)
    v = jax.tree.map(jnp.ones_like, params)
    t_mvp = _median_time(mvps, op, v, repeats=20) / 10
    t_lanczos = _median_time(lanczos_only, op, params, repeats=20)
    t_hutchinson = _median_time(hutchinson_only, op, params, repeats=20)
    predicted = t_lin + 30 * t_mvp
    device = jax.devices()[0]
    print(
        f"# {datetime.date.today()} | {device.platform}: {device.device_kind} | "
        f"{platform.processor() or platform.machine()} | jax {jax.__version__}"
    )
    print(
        "| train step ms | monitor ms | monitor / step | linearize ms | MVP ms "
        "| linearize + 30 MVP ms | monitor / prediction |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {1e3 * t_train:.2f} | {1e3 * t_monitor:.2f} | {t_monitor / t_train:.1f} "
        f"| {1e3 * t_lin:.2f} | {1e3 * t_mvp:.2f} | {1e3 * predicted:.2f} "
        f"| {t_monitor / predicted:.2f} |"
    )
    print(
        f"\nOn a prebuilt operator: 20 Lanczos steps {1e3 * t_lanczos:.1f} ms "
        f"({t_lanczos / t_mvp:.1f} MVPs), 10 Hutchinson probes "
        f"{1e3 * t_hutchinson:.1f} ms ({t_hutchinson / t_mvp:.1f} MVPs)."
    )


if __name__ == "__main__":
    main()
