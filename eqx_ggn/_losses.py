"""Per-sample losses, their Hessians in output space, and target checks.

Every built-in loss is a *sum* over all entries of one sample's prediction, so
applying it to a whole batch gives the sum over the batch (this is what makes
`vmap_over_data=False` consistent with `vmap_over_data=True`).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree


LossFn = str | Callable[[Any, Any], Float[Array, ""]]


def mse_loss(pred: Array, target: Array) -> Float[Array, ""]:
    """Sum of squared errors, `sum((pred - target)**2)`; its Hessian is `2*I`.

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_ggn

        assert eqx_ggn.mse_loss(jnp.array([1.0, 2.0]), jnp.array([0.0, 0.0])) == 5.0
        ```
    """
    return jnp.sum(jnp.square(pred - target))


def cross_entropy_loss(pred: Array, target: Array) -> Float[Array, ""]:
    """Softmax cross-entropy over the last axis, summed over all other axes.

    `pred` are **logits**, not probabilities: a model that ends in a softmax should
    drop it (or return `jnp.log(probs)`). `target` is either one-hot (or any
    probability vector) with the shape of `pred`, or integer class labels with
    shape `pred.shape[:-1]` (a Python int for a single sample works too).

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_ggn

        logits = jnp.array([2.0, 0.0, -1.0])
        by_label = eqx_ggn.cross_entropy_loss(logits, jnp.array(0))
        one_hot = eqx_ggn.cross_entropy_loss(logits, jnp.array([1.0, 0.0, 0.0]))
        assert jnp.allclose(by_label, one_hot)
        ```
    """
    pred, target = jnp.asarray(pred), jnp.asarray(target)
    if pred.ndim == 0:
        raise ValueError(
            "cross_entropy_loss takes logits with a class axis (shape (..., C)), got "
            "a scalar prediction; for one logit use binary_cross_entropy_loss."
        )
    log_probs = jax.nn.log_softmax(pred, axis=-1)
    if jnp.issubdtype(target.dtype, jnp.integer):
        picked = jnp.take_along_axis(log_probs, target[..., None], axis=-1)
        return -jnp.sum(picked)
    return -jnp.sum(target * log_probs)


def binary_cross_entropy_loss(pred: Array, target: Array) -> Float[Array, ""]:
    """Sigmoid binary cross-entropy on **logits**, summed over all entries.

    `pred` are logits, not probabilities: a model that ends in `jax.nn.sigmoid`
    should drop it (the loss applies the sigmoid itself), or return
    `jax.scipy.special.logit(probs)`.

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_ggn

        value = eqx_ggn.binary_cross_entropy_loss(jnp.array([0.0]), jnp.array([1.0]))
        assert jnp.allclose(value, jnp.log(2.0))
        ```
    """
    return jnp.sum(jax.nn.softplus(pred) - target * pred)


def identity_loss(pred: Array, target: Any) -> Float[Array, ""]:
    """`0.5 * sum(pred**2)`, the loss whose Hessian is the identity.

    The target is ignored, as in laplax's `"none"`. Use it when `model_fn` already
    returns residuals: the GGN is then `J^T J`.

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_ggn

        assert eqx_ggn.identity_loss(jnp.array([3.0, 4.0]), None) == 12.5
        ```
    """
    del target
    return 0.5 * jnp.sum(jnp.square(pred))


def _mse_hessian_mv(jv: Array, *, pred: Array, target: Any = None) -> Array:
    del pred, target
    return 2 * jv


def _cross_entropy_hessian_mv(jv: Array, *, pred: Array, target: Any = None) -> Array:
    # (diag(p) - p p^T) jv along the last axis: works for (C,), (T, C), (B, T, C).
    del target
    prob = jax.nn.softmax(pred, axis=-1)
    return prob * jv - prob * jnp.sum(prob * jv, axis=-1, keepdims=True)


def _binary_cross_entropy_hessian_mv(
    jv: Array, *, pred: Array, target: Any = None
) -> Array:
    del target
    prob = jax.nn.sigmoid(pred)
    return prob * (1 - prob) * jv


def _identity_hessian_mv(jv: Array, *, pred: Any = None, target: Any = None) -> Array:
    del pred, target
    return jv


_BUILTIN: dict[str, tuple[Callable, Callable]] = {
    "mse": (mse_loss, _mse_hessian_mv),
    "cross_entropy": (cross_entropy_loss, _cross_entropy_hessian_mv),
    "binary_cross_entropy": (
        binary_cross_entropy_loss,
        _binary_cross_entropy_hessian_mv,
    ),
    "none": (identity_loss, _identity_hessian_mv),
}

LOSS_NAMES: tuple[str, ...] = tuple(_BUILTIN)


def _custom_hessian_mv(loss: Callable) -> Callable:
    def hessian_mv(jv: PyTree, *, pred: PyTree, target: Any) -> PyTree:
        return jax.jvp(jax.grad(lambda p: loss(p, target)), (pred,), (jv,))[1]

    return hessian_mv


def loss_hessian_root(
    loss_fn: LossFn, pred: Array, target: Any, loss_grad: Array
) -> tuple[Callable[[Array], Array], Array]:
    """A square root of one sample's loss Hessian, for the exact solvers.

    Returns the linear map `v -> S^T v`, with `S S^T` the loss Hessian in output
    space (the matrices `_*_hessian_mv` above apply), and `u` with `S u = loss_grad`.
    """
    tiny = jnp.finfo(pred.dtype).tiny
    if loss_fn == "mse":
        root = jnp.sqrt(jnp.asarray(2, pred.dtype))
        return (lambda v: root * v), loss_grad / root
    if loss_fn == "none":
        return (lambda v: v), loss_grad
    if loss_fn == "binary_cross_entropy":
        p = jax.nn.sigmoid(pred)
        s = jnp.sqrt(p * (1 - p))
        return (lambda v: s * v), jnp.where(s > tiny, loss_grad / (s + tiny), 0)
    if loss_fn == "cross_entropy":
        # H = diag(p) - p p^T = S S^T with S = diag(√p) - p √p^T (rows sum to 1),
        # S^T v = √p v - √p (p·v); and S u = g for u = g / √p, since sum(g) = 0.
        p = jax.nn.softmax(pred, axis=-1)
        s = jnp.sqrt(p)

        def sqrt_t(v):
            return s * v - s * jnp.sum(p * v, axis=-1, keepdims=True)

        return sqrt_t, jnp.where(s > tiny, loss_grad / (s + tiny), 0)
    # A custom loss: its Hessian by autodiff, S = V sqrt(max(σ, 0)).
    flat_pred, unravel = jax.flatten_util.ravel_pytree(pred)
    hess = jax.hessian(lambda z: loss_fn(unravel(z), target))(flat_pred)
    sigma, vecs = jnp.linalg.eigh(hess)
    keep = sigma > sigma.shape[0] * jnp.finfo(sigma.dtype).eps * jnp.max(jnp.abs(sigma))
    root = jnp.where(keep, jnp.sqrt(jnp.where(keep, sigma, 1)), 0)
    flat_grad = jax.flatten_util.ravel_pytree(loss_grad)[0]
    u = jnp.where(keep, (vecs.T @ flat_grad) / jnp.where(keep, root, 1), 0)

    def sqrt_t_custom(v):
        return root * (vecs.T @ jax.flatten_util.ravel_pytree(v)[0])

    return sqrt_t_custom, u


def resolve_loss(loss_fn: LossFn | None) -> tuple[Callable | None, Callable | None]:
    """Map `loss_fn` to `(loss(pred, target), hessian_mv(jv, *, pred, target))`.

    `None` maps to `(None, None)`. Raises `ValueError` for an unknown name.
    """
    if loss_fn is None:
        return None, None
    if isinstance(loss_fn, str):
        if loss_fn not in _BUILTIN:
            raise ValueError(
                f"Unknown loss_fn {loss_fn!r}; valid names are {list(LOSS_NAMES)}, "
                "or pass a callable loss(pred, target) -> scalar."
            )
        return _BUILTIN[loss_fn]
    if callable(loss_fn):
        return loss_fn, _custom_hessian_mv(loss_fn)
    raise ValueError(
        f"loss_fn must be one of {list(LOSS_NAMES)} or a callable, got {loss_fn!r}."
    )


def create_loss_hessian_mv(loss_fn: LossFn) -> Callable:
    """The Hessian-vector product of a loss with respect to one sample's prediction.

    **Arguments:**

    - `loss_fn`: `"mse"`, `"cross_entropy"`, `"binary_cross_entropy"`, `"none"`, or
        a callable `loss(pred, target) -> scalar` (its Hessian-vector product is
        then computed by forward-over-reverse autodiff).

    **Returns:**

    A function `hessian_mv(jv, *, pred, target)` computing `∇²_pred loss · jv`.
    The built-in ones act along the last axis only, so they also accept batched or
    per-token predictions such as logits of shape `(T, C)`.

    **Raises:**

    `ValueError` if `loss_fn` is `None` or an unknown name.

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_ggn

        hmv = eqx_ggn.create_loss_hessian_mv("mse")
        assert jnp.allclose(hmv(jnp.ones(3), pred=jnp.zeros(3), target=None), 2.0)
        ```
    """
    if loss_fn is None:
        raise ValueError("loss_fn cannot be None.")
    return resolve_loss(loss_fn)[1]


def check_target(loss_fn: LossFn | None, pred: Any, target: Any) -> None:
    """Raise a `ValueError` at trace time if `target` does not fit `pred`.

    Only the built-in losses are checked (a custom callable defines its own rules).
    Shapes here are batched: `pred` and `target` both carry the leading batch axis.
    """
    if not isinstance(loss_fn, str) or loss_fn == "none":
        return
    if not (hasattr(pred, "shape") and hasattr(target, "shape")):
        raise ValueError(
            f"loss_fn={loss_fn!r} needs array predictions and targets, got "
            f"prediction {type(pred).__name__} and target {type(target).__name__}."
        )
    pred_shape, target_shape = tuple(pred.shape), tuple(target.shape)
    is_int = jnp.issubdtype(target.dtype, jnp.integer)
    if loss_fn == "cross_entropy" and (len(pred_shape) < 2 or pred_shape[-1] < 2):
        raise ValueError(
            f"loss_fn='cross_entropy' takes logits with a class axis of at least 2 "
            f"classes: per-sample predictions of shape (..., C), C >= 2, i.e. "
            f"batched (batch, ..., C). The model returns predictions of shape "
            f"{pred_shape} (batched). For one logit per sample use "
            "loss_fn='binary_cross_entropy'; for a scalar output add a class axis."
        )
    if pred_shape == target_shape:
        return
    if loss_fn == "cross_entropy" and is_int and target_shape == pred_shape[:-1]:
        return
    expected = f"{pred_shape}"
    if loss_fn == "cross_entropy":
        expected += f" (one-hot) or {pred_shape[:-1]} (integer labels)"
    raise ValueError(
        f"data['target'] has shape {target_shape} (dtype {target.dtype}), which does "
        f"not fit the predictions of shape {pred_shape} for loss_fn={loss_fn!r}: "
        f"expected {expected}."
    )
