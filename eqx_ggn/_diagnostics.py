"""Diagnostics that reach the user without `throw`: one warning per problem.

The optimizer computes a few scalars on the device every step (cheap reductions,
no host round trip) and calls the host only when a warning is due, from inside a
`lax.cond`.
"""

import functools
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, PyTree

from ._losses import LossFn
from ._tree import tree_all_finite, tree_dot


class GaussNewtonWarning(UserWarning):
    """Warned by [`eqx_ggn.scale_by_gauss_newton`][] when its steps keep failing.

    It fires once per run of rejected steps: on the first one when a definite
    cause such as an out-of-range label is seen; when the run stalls (`warn_after`
    rejections in a row that grew the damping 1e4-fold since the last accepted
    step, which normal Levenberg-Marquardt recovery never does); and when the
    damping reaches `max_damping`. The message lists only the causes it measured,
    with their numbers, or the damping's history when no other cause is found.
    Filter it like any warning, or pass `warn=False` to the optimizer.

    !!! example

        ```python
        import warnings
        import eqx_ggn

        warnings.simplefilter("error", eqx_ggn.GaussNewtonWarning)  # fail loudly
        warnings.simplefilter("default", eqx_ggn.GaussNewtonWarning)  # back again
        ```
    """


class StepDiagnostics(NamedTuple):
    """Scalars about one step, all computed on the device."""

    gradient_mismatch: Float[Array, ""]
    probabilities: Bool[Array, ""]
    labels_out_of_range: Bool[Array, ""]
    batch_non_finite: Bool[Array, ""]


def _looks_like_probabilities(loss_fn: LossFn, pred: PyTree) -> Bool[Array, ""]:
    """Predictions that are probabilities given to a logits loss."""
    if loss_fn not in ("binary_cross_entropy", "cross_entropy") or not hasattr(
        pred, "shape"
    ):
        return jnp.asarray(False)
    inside = jnp.all((pred >= 0) & (pred <= 1))
    if loss_fn == "binary_cross_entropy":
        return inside
    return inside & jnp.all(jnp.abs(jnp.sum(pred, axis=-1) - 1) < 1e-3)


def _labels_out_of_range(loss_fn: LossFn, pred: PyTree, target: PyTree) -> Any:
    if loss_fn != "cross_entropy" or not hasattr(target, "dtype"):
        return jnp.asarray(False)
    if not jnp.issubdtype(target.dtype, jnp.integer):
        return jnp.asarray(False)
    return jnp.any((target < 0) | (target >= pred.shape[-1]))


def step_diagnostics(
    loss_fn: LossFn,
    predictions: PyTree,
    grad: PyTree,
    updates: PyTree,
    batch: dict[str, Any],
    axis_name: Any = None,
) -> StepDiagnostics:
    """What the warning reports: measured on this step's batch and gradients.

    `gradient_mismatch` is `||updates - grad|| / ||grad||`, the incoming gradient
    against the operator's gradient of the package's objective.
    """
    diff = jax.tree.map(lambda u, g: u.astype(g.dtype) - g, updates, grad)
    mismatch = jnp.sqrt(tree_dot(diff, diff) / jnp.maximum(tree_dot(grad, grad), 1e-30))
    floating = [
        x for x in jax.tree.leaves(batch) if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    flags = jnp.stack(
        [
            _looks_like_probabilities(loss_fn, predictions),
            _labels_out_of_range(loss_fn, predictions, batch["target"]),
            ~tree_all_finite(floating),
        ]
    )
    if axis_name is not None:  # one verdict over all shards
        flags = jax.lax.pmax(flags.astype(jnp.int32), axis_name).astype(bool)
        flags = flags.at[0].set(
            jax.lax.pmin(flags[0].astype(jnp.int32), axis_name).astype(bool)
        )
    return StepDiagnostics(mismatch.astype(jnp.float32), flags[0], flags[1], flags[2])


def is_definite(diagnostics: StepDiagnostics) -> Bool[Array, ""]:
    """A cause that is certainly wrong, worth a warning on the first rejection: the
    Levenberg-Marquardt rule checks the package's objective, so an incoming
    gradient 10% away from its gradient is one; so are predictions that all look
    like probabilities under a logits loss, seen on a rejected step."""
    return (
        diagnostics.labels_out_of_range
        | diagnostics.batch_non_finite
        | diagnostics.probabilities
        | (diagnostics.gradient_mismatch > 0.1)
    )


def _message(
    rejected: int,
    damping: float,
    accepted_damping: float,
    max_damping: float,
    loss_fn: str,
    mismatch: float,
    probabilities: bool,
    labels: bool,
    non_finite: bool,
) -> str:
    if rejected > 0:
        head = f"{rejected} consecutive step(s) rejected"
    else:
        head = f"the damping reached max_damping={max_damping:.3g}"
    causes = []
    if probabilities:
        causes.append(
            f"the predictions all look like probabilities, but loss_fn={loss_fn!r} "
            "takes logits: drop the final sigmoid/softmax from the model"
        )
    if mismatch > 0.1:
        causes.append(
            f"the incoming gradient differs from the gradient of the package's "
            f"objective by {100 * mismatch:.3g}% (relative): compute it with "
            "eqx_ggn.value_and_grad, or check that your loss is the batch mean of "
            f"loss_fn={loss_fn!r} (a transform earlier in the chain also changes it)"
        )
    if labels:
        causes.append("integer labels lie outside [0, number of classes)")
    if non_finite:
        causes.append("the batch holds NaN or Inf")
    if causes:
        return (
            "eqx_ggn.scale_by_gauss_newton: "
            + head
            + f" (damping now {damping:.3g}). Measured causes:\n- "
            + "\n- ".join(causes)
            + "\n(pass warn=False to silence, or throw=True to stop at non-finite "
            "values)"
        )
    return (
        "eqx_ggn.scale_by_gauss_newton: "
        + head
        + f": the damping grew from {accepted_damping:.3g} (the last accepted step) "
        f"to {damping:.3g} without an accepted step. Checked and fine: the batch "
        "is finite, the incoming gradient matches the package's objective "
        f"({100 * mismatch:.2g}% apart) and the targets fit loss_fn={loss_fn!r}. "
        "The quadratic model does not predict the loss near this point: a noisy "
        "mini-batch (use a larger one), a learning rate other than 1 (the rule "
        "checks the whole step), or a model whose output is not smooth in its "
        "parameters.\n(pass warn=False to silence)"
    )


def _warn_on_host(loss_fn: str, due: Any, max_damping: Any, *values: Any) -> Any:
    if not due:  # under `vmap` the `lax.cond` is a select that always calls
        return np.bool_(False)
    rejected, damping, accepted_damping, *flags = (x.item() for x in values)
    mismatch, probs, labels, non_finite = flags
    message = _message(
        int(rejected),
        float(damping),
        float(accepted_damping),
        float(max_damping),
        loss_fn,
        float(mismatch),
        bool(probs),
        bool(labels),
        bool(non_finite),
    )
    warnings.warn(message, GaussNewtonWarning, stacklevel=2)
    return np.bool_(True)


def warn_if(
    due: Bool[Array, ""],
    loss_fn: LossFn,
    max_damping: Any,
    rejected: Array,
    damping: Array,
    accepted_damping: Array,
    diagnostics: StepDiagnostics,
) -> Bool[Array, ""]:
    """Emit one [`GaussNewtonWarning`][eqx_ggn.GaussNewtonWarning] when `due`;
    return whether it was emitted (`due`).

    The host is called only on that step: the callback sits in a `lax.cond`. It
    is a `jax.pure_callback` whose result the caller keeps in the optimizer's
    state, so it is not dropped: a `jax.debug.callback` is an effect, and a
    compiled program with an effect loses JAX's C++ dispatch path on every call,
    healthy steps included (`benchmarks/time_to_target.py --warning`: the
    default KFAC step cost 1.13x to 1.58x `warn=False`'s with it, 1.06x to
    1.15x without it, on a CPU).
    """
    name = loss_fn if isinstance(loss_fn, str) else getattr(loss_fn, "__name__", "?")
    values = (rejected, damping, accepted_damping, *diagnostics)

    def emit(due, max_damping, values):
        return jax.pure_callback(
            functools.partial(_warn_on_host, name),
            jax.ShapeDtypeStruct((), jnp.bool_),
            due,
            max_damping,
            *values,
            vmap_method="sequential",
        )

    return jax.lax.cond(
        due,
        emit,
        lambda *_: jnp.asarray(False),
        due,
        jnp.asarray(max_damping, jnp.float32),
        values,
    )
