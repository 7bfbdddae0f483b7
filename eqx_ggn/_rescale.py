"""KFAC's rescaling: the step along the KFAC direction (and the previous step)
that minimizes the exact damped quadratic model (Martens and Grosse), with the
model's curvature term, on request, from a quarter of the batch when that
quarter pins it down (`kfac_rescale_tol`).

The term `dᵀ C d` needs one JVP of the model through the step's linearization.
Every fourth sample, linearized alone, needs its own forward pass but only a
quarter of the batch, and its per-sample spread says how far its estimate can
be from the batch's. A relative error `e` in the damped curvature
`dᵀ(C + λ I)d` scales the step by `1 / (1 + e)` of the model's best length and
gives up a fraction `(e / (1 + e))²` of its decrease: 4% at `e = 0.25`.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PyTree

from ._batching import sum_over_shards
from ._cg import CGResult, CGStop
from ._operator import CurvatureOperator
from ._step_control import quadratic_model_coefficients
from ._tree import tree_dot


STRIDE = 4  # every fourth sample: a quarter of the batch
# Fewer than this many samples in the quarter (a batch under 29) estimate no
# useful spread: the batch's form is used.
MIN_SAMPLES = 8


def _is_zero(tol: Any) -> bool:
    return isinstance(tol, int | float) and tol == 0


def rescale_form(
    op: CurvatureOperator,
    directions: list[PyTree],
    damping: Float[Array, ""],
    tol: Any,
) -> Float[Array, "k k"]:
    """`[d_iᵀ C d_j]` of the batch, or its estimate from every fourth sample.

    The estimate (the quarter's sum times the batch over the quarter) is taken
    when its standard error, from the quarter's per-sample spread, is at most
    `tol` times each damped diagonal entry `d_iᵀ(C + λ I)d_i`; otherwise the
    other three quarters are linearized as well and the form is the batch's.
    Neither branch uses the operator's stored linearization: a `lax.cond`
    branch that did would keep its residuals as the conditional's operands,
    which cost a transformer step more than the quarter saves. `tol=0`, fewer
    than `MIN_SAMPLES` samples in the quarter, micro-batches or `relinearize`
    (three quarters at once may not fit where the user's memory limit is) or
    an operator without `model_fn` and `loss_fn` take the batch's form from the
    stored linearization; a traced `tol` always takes the quarters. Inside
    `shard_map` each shard takes every fourth of its samples, and the counts
    and spreads are summed over the shards.
    """
    batch = jax.tree.leaves(op.predictions)[0].shape[0]  # this shard's
    quarter = np.arange(0, batch, STRIDE)
    shards = 1 if op.axis_name is None else jax.lax.psum(1, op.axis_name)
    if (
        _is_zero(tol)
        or shards * len(quarter) < MIN_SAMPLES
        or op.num_microbatches > 1
        or op.relinearize
        or op.model_fn is None
        or op.loss_fn is None
    ):
        return op.quadratic_form(directions)
    forms = op._sample_forms(directions, quarter)  # (m, k, k)
    diagonal = jnp.diagonal(forms, axis1=-2, axis2=-1)
    total, squares, count = sum_over_shards(
        (forms.sum(0), (diagonal**2).sum(0), jnp.asarray(len(quarter), forms.dtype)),
        op.axis_name,
    )
    scale = batch / len(quarter)
    estimate = scale * total
    mean = jnp.diagonal(total) / count
    variance = jnp.maximum(squares / count - mean**2, 0) * count / (count - 1)
    error = scale * jnp.sqrt(count * variance)  # of the estimated diagonal
    norms = jnp.stack([tree_dot(d, d) for d in directions])
    damped = jnp.diagonal(estimate) + damping * norms.astype(estimate.dtype)
    accurate = jnp.all(error <= tol * damped)
    rest = np.setdiff1d(np.arange(batch), quarter)

    def whole():  # the quarter's share and the other three quarters'
        others = op._sample_forms(directions, rest).sum(0)
        return total + sum_over_shards(others, op.axis_name)

    return jax.lax.cond(accurate, lambda: estimate, whole)


def rescale_kfac_step(
    op: CurvatureOperator,
    grad: PyTree,
    direction: PyTree,
    previous: PyTree | None,
    damping: Float[Array, ""],
    tol: Any,
) -> tuple[CGResult, Float[Array, ""]]:
    """Martens and Grosse's rescaling: the KFAC direction (and with adaptive
    momentum the previous step) scaled to minimize the damped quadratic model,
    from one (two) JVPs (no transposed pass), on a quarter of the batch when
    `rescale_form` finds it accurate to `tol`. Returns the step as a solve's
    result (residual NaN: `C` times the step is never formed) and `sᵀ C s` of
    the step `s`."""
    directions = [direction] if previous is None else [direction, previous]
    form = rescale_form(op, directions, damping, tol)
    c = quadratic_model_coefficients(grad, directions, form, damping)
    step = jax.tree.map(
        lambda *xs: sum(ci.astype(x.dtype) * x for ci, x in zip(c, xs, strict=True)),
        *directions,
    )
    result = CGResult(
        value=step,
        num_steps=jnp.asarray(0, jnp.int32),
        stop_reason=jnp.asarray(CGStop.CONVERGED, jnp.int32),
        residual_norm=jnp.asarray(jnp.nan, jnp.float32),
    )
    return result, c @ form.astype(c.dtype) @ c
