"""A curvature monitor for jitted training loops, and its Optax wrapper."""

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int, PyTree

from ._checks import check_sizes
from ._estimators import hutchinson_trace, top_eigenvalues
from ._jacobian import Jac, check_jac
from ._losses import LossFn, resolve_loss
from ._operator import CURVATURES, AxisName, Curvature, curvature_operator
from ._partition import module_fn


class CurvatureMetrics(NamedTuple):
    """What [`eqx_ggn.CurvatureMonitor`][] reports (float32 scalars, `top_k` array).

    - `lambda_max`: the largest eigenvalue (the sharpness; compare with `2/lr`).
    - `top_eigenvalues`: the `top_k` largest eigenvalues, descending.
    - `trace`, `trace_stderr`: Hutchinson's trace estimate and its standard error.
    - `lambda_max_over_trace`: `lambda_max / trace`.
    - `loss`: the objective at the monitored point.
    - `step`: the step these values were computed at (-1 before the first).

    !!! example

        ```python
        import eqx_ggn

        metrics = eqx_ggn.CurvatureMonitor(loss_fn="mse", top_k=2).empty()
        assert int(metrics.step) == -1 and metrics.top_eigenvalues.shape == (2,)
        ```
    """

    lambda_max: Float[Array, ""]
    top_eigenvalues: Float[Array, " k"]
    trace: Float[Array, ""]
    trace_stderr: Float[Array, ""]
    lambda_max_over_trace: Float[Array, ""]
    loss: Float[Array, ""]
    step: Int[Array, ""]


class CurvatureMonitor(eqx.Module):
    r"""Curvature statistics of the objective, every `every` steps, inside `jit`.

    Call it inside a jitted training step:
    `metrics = monitor(step, params, model_fn=..., batch=...)` (or `model=` for an
    Equinox module). When `step % every == 0` it linearizes the model once on the
    batch (the curvature of the package's objective: by default the batch mean, the
    optimizer's convention, so `lambda_max` compares directly with
    `2 / learning_rate`), runs Lanczos for the top eigenvalues and Hutchinson for the
    trace, and, if a `sink` is set, sends the step and a dict of Python floats to the
    host. The work sits under `lax.cond`: other steps cost nothing, and **return NaN**
    for every value (with `step = -1`). [`eqx_ggn.monitor_curvature`][] keeps the
    latest values instead.

    **Arguments:**

    - `loss_fn`: as in [`eqx_ggn.curvature_operator`][].
    - `every`: compute on steps `0, every, 2 * every, ...`.
    - `sink`: `sink(step: int, metrics: dict[str, float])`, called on the host after
        each computation (e.g. `print`, a list's `append`, a CSV writer, a logger).
        Top eigenvalues arrive as `eig_0`, `eig_1`, ... It is a
        `jax.debug.callback` (an effect, so that it runs even when the returned
        metrics are unused), and a compiled program with an effect never takes
        JAX's C++ dispatch path: inside a jitted training step every call of
        the step goes through Python, at a price per array in its arguments and
        outputs, whether the monitor computes on that step or not.
        With short steps, call the monitor from a jitted function of its own
        every `every` steps instead.
    - `curvature`: `"ggn"` (default), `"fisher"`, `"empirical_fisher"`, `"hessian"`.
    - `top_k`: how many top eigenvalues.
    - `num_iters`: Lanczos steps.
    - `num_samples`: Hutchinson probes.
    - `seed`: the probes' PRNG seed (folded with the step).
    - `factor`: the objective's factor; defaults to `1/batch_size`.
    - `axis_name`: inside `jax.shard_map` (or `pmap`), the mapped axis that splits
        the batch over devices (see [`eqx_ggn.curvature_operator`][]): the metrics
        are then those of the global batch, equal on every device. A `sink` is
        called from every device.
    - `jac`: `"fwd"`, `"bwd"` (reverse mode only, for a model with a
        `jax.custom_vjp`) or `None` (default: picked per model); see
        [`eqx_ggn.curvature_operator`][]. Lanczos and Hutchinson need `J v`.

    !!! example

        ```python
        import equinox as eqx
        import jax, jax.numpy as jnp, optax
        import eqx_ggn

        model = eqx.nn.MLP(2, 2, 8, 1, key=jax.random.key(0))
        x = jax.random.normal(jax.random.key(1), (32, 2))
        batch = {"input": x, "target": (x[:, 0] > 0).astype(int)}
        log = []
        monitor = eqx_ggn.CurvatureMonitor(
            loss_fn="cross_entropy", every=2, sink=lambda s, m: log.append((s, m))
        )

        @eqx.filter_jit
        def step(model, i):
            return monitor(i, eqx.filter(model, eqx.is_inexact_array), model=model,
                           batch=batch)

        for i in range(4):  # an array step: an int would compile once per value
            metrics = step(model, jnp.asarray(i))
        jax.effects_barrier()
        assert [s for s, _ in log] == [0, 2]
        ```
    """

    loss_fn: LossFn = eqx.field(static=True)
    every: int = eqx.field(static=True, default=10)
    sink: Callable[[int, dict[str, float]], Any] | None = eqx.field(
        static=True, default=None
    )
    curvature: Curvature = eqx.field(static=True, default="ggn")
    top_k: int = eqx.field(static=True, default=3)
    num_iters: int = eqx.field(static=True, default=20)
    num_samples: int = eqx.field(static=True, default=10)
    seed: int = eqx.field(static=True, default=0)
    factor: float | None = eqx.field(static=True, default=None)
    axis_name: AxisName | None = eqx.field(static=True, default=None)
    jac: Jac | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        resolve_loss(self.loss_fn)
        check_jac(self.jac)
        if self.curvature not in CURVATURES:
            raise ValueError(
                f"Unknown curvature {self.curvature!r}; valid ones are "
                f"{list(CURVATURES)}."
            )
        check_sizes(
            every=self.every,
            top_k=self.top_k,
            num_iters=self.num_iters,
            num_samples=self.num_samples,
        )
        if self.top_k > self.num_iters:
            raise ValueError(
                f"top_k={self.top_k} needs num_iters >= top_k, got {self.num_iters}."
            )

    def empty(self) -> CurvatureMetrics:
        """The metrics before any computation: NaN everywhere, `step = -1`."""
        nan = jnp.asarray(jnp.nan, jnp.float32)
        return CurvatureMetrics(
            lambda_max=nan,
            top_eigenvalues=jnp.full(self.top_k, jnp.nan, jnp.float32),
            trace=nan,
            trace_stderr=nan,
            lambda_max_over_trace=nan,
            loss=nan,
            step=jnp.asarray(-1, jnp.int32),
        )

    def compute(
        self, step: Int[Array, ""], params: PyTree, model_fn: Callable, batch: Any
    ) -> CurvatureMetrics:
        """The metrics now, unconditionally (no `every`, no `sink`)."""
        op = curvature_operator(
            model_fn,
            params,
            batch,
            self.loss_fn,
            curvature=self.curvature,
            factor=self.factor,
            axis_name=self.axis_name,
            jac=self.jac,
        )
        key = jax.random.fold_in(jax.random.key(self.seed), step)
        k_lanczos, k_trace = jax.random.split(key)
        # Only the eigenvalues are used: XLA drops the eigenvector assembly.
        eigs, _ = top_eigenvalues(
            op.mv, params, self.top_k, key=k_lanczos, num_iters=self.num_iters
        )
        trace, stderr = hutchinson_trace(
            op.mv, params, key=k_trace, num_samples=self.num_samples
        )
        f32 = lambda x: jnp.asarray(x, jnp.float32)
        return CurvatureMetrics(
            lambda_max=f32(eigs[0]),
            top_eigenvalues=f32(eigs),
            trace=f32(trace),
            trace_stderr=f32(stderr),
            lambda_max_over_trace=f32(eigs[0] / trace),
            loss=f32(op.loss),
            step=jnp.asarray(step, jnp.int32),
        )

    def _send(self, metrics: CurvatureMetrics) -> None:
        def to_host(m):
            values = {
                name: float(value)
                for name, value in m._asdict().items()
                if name not in ("top_eigenvalues", "step")
            }
            values.update(
                {f"eig_{i}": float(v) for i, v in enumerate(m.top_eigenvalues)}
            )
            self.sink(int(m.step), values)

        jax.debug.callback(to_host, metrics)

    def __call__(
        self,
        step: int | Int[Array, ""],
        params: PyTree,
        *,
        model_fn: Callable | None = None,
        model: eqx.Module | None = None,
        batch: dict[str, Any] | None = None,
    ) -> dict[str, Array]:
        """The metrics as a dict of arrays (NaN on steps that compute nothing)."""
        if batch is None:
            raise ValueError("CurvatureMonitor needs batch={'input': X, 'target': Y}.")
        if model_fn is None:
            if model is None:
                raise ValueError("CurvatureMonitor needs model_fn=... or model=....")
            model_fn = module_fn(model)
        step = jnp.asarray(step, jnp.int32)

        def compute(_):
            metrics = self.compute(step, params, model_fn, batch)
            if self.sink is not None:
                self._send(metrics)
            return metrics

        metrics = jax.lax.cond(
            step % self.every == 0, compute, lambda _: self.empty(), None
        )
        return metrics._asdict()


class MonitorCurvatureState(NamedTuple):
    """State of [`eqx_ggn.monitor_curvature`][]: inner state and latest metrics.

    !!! example

        ```python
        import jax.numpy as jnp
        import optax
        import eqx_ggn

        def model_fn(input, params):
            return input @ params["w"].T

        params = {"w": jnp.ones((2, 3))}
        batch = {"input": jnp.ones((8, 3)), "target": jnp.zeros((8, 2))}
        monitor = eqx_ggn.CurvatureMonitor(loss_fn="mse", every=1, top_k=1)
        opt = eqx_ggn.monitor_curvature(optax.sgd(0.1), monitor)
        state = opt.init(params)
        kw = {"model_fn": model_fn, "batch": batch}
        updates, state = opt.update(params, state, params, **kw)
        assert int(state.count) == 1 and int(state.metrics.step) == 0
        sharpness = optax.tree.get(state, "lambda_max")
        ```
    """

    inner_state: optax.OptState
    metrics: CurvatureMetrics
    count: Int[Array, ""]


def monitor_curvature(
    inner: optax.GradientTransformation, monitor: CurvatureMonitor
) -> optax.GradientTransformationExtraArgs:
    """Run `inner` unchanged and keep the latest curvature metrics in the state.

    `update(updates, state, params, *, model_fn=None, model=None, batch=None,
    **extra_args)` passes everything to `inner` (its updates come back bit for bit),
    then calls `monitor(count, params, ...)` on the current parameters. The latest
    computed values stay in the state until the next computation:
    `optax.tree.get(state, "lambda_max")`.

    **Arguments:**

    - `inner`: any Optax transformation, e.g. `optax.adam(1e-3)`.
    - `monitor`: a [`eqx_ggn.CurvatureMonitor`][].

    **Returns:**

    An `optax.GradientTransformationExtraArgs` with a
    [`eqx_ggn.MonitorCurvatureState`][].

    !!! example

        ```python
        import jax, jax.numpy as jnp, optax
        import eqx_ggn

        def model_fn(input, params):
            return jnp.tanh(params["w"] @ input)

        params = {"w": jnp.ones((2, 3))}
        batch = {"input": jnp.ones((8, 3)), "target": jnp.zeros((8, 2))}
        opt = eqx_ggn.monitor_curvature(
            optax.sgd(0.1), eqx_ggn.CurvatureMonitor(loss_fn="mse", every=1, top_k=1)
        )
        state = opt.init(params)
        kw = {"model_fn": model_fn, "batch": batch}
        updates, state = opt.update(params, state, params, **kw)
        lam = optax.tree.get(state, "lambda_max")
        ```
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return MonitorCurvatureState(
            inner_state=inner.init(params),
            metrics=monitor.empty(),
            count=jnp.zeros([], jnp.int32),
        )

    def update_fn(updates, state, params=None, **extra_args):
        new_updates, inner_state = inner.update(
            updates, state.inner_state, params, **extra_args
        )
        if params is None:
            raise ValueError("monitor_curvature needs params in update().")
        metrics = CurvatureMetrics(
            **monitor(
                state.count,
                params,
                model_fn=extra_args.get("model_fn"),
                model=extra_args.get("model"),
                batch=extra_args.get("batch"),
            )
        )
        computed = metrics.step >= 0
        metrics = jax.tree.map(
            lambda new, old: jnp.where(computed, new, old), metrics, state.metrics
        )
        return new_updates, MonitorCurvatureState(
            inner_state=inner_state, metrics=metrics, count=state.count + 1
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
