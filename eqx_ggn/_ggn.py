"""laplax-compatible curvature-vector products.

These follow `laplax.curv.ggn` 0.0.2: the same names, signatures and scaling, i.e.
`factor * sum_i J_i^T H_i J_i v` with `factor = num_total_samples / num_curv_samples`
(1 by default: the curvature of the *sum* of the per-sample losses). With data fixed,
the model is linearized once, when the product is created.
"""

from collections.abc import Callable
from typing import Any

from jaxtyping import Array, Float, Int, PyTree

from ._checks import check_data
from ._jacobian import Jac
from ._losses import LossFn, check_target, create_loss_hessian_mv
from ._operator import curvature_operator


Params = PyTree[Float[Array, "..."]]
Data = dict[str, Any]


def _laplax_factor(
    data: Data, num_curv_samples: Int | None, num_total_samples: Int | None
) -> float:
    if num_curv_samples is None:
        num_curv_samples = check_data(data)
    if num_total_samples is None:
        num_total_samples = num_curv_samples
    return num_total_samples / num_curv_samples


def _ggn_mv_on(
    model_fn: Callable,
    params: Params,
    data: Data,
    loss_fn: LossFn | None,
    hessian_mv: Callable,
    factor: Float,
    vmap_over_data: bool,
    jac: Jac | None,
) -> Callable[[Params], Params]:
    # Only the loss Hessian is handed over, so no loss value or gradient is built.
    op = curvature_operator(
        model_fn,
        params,
        data,
        None,
        factor=factor,
        loss_hessian_mv=hessian_mv,
        vmap_over_data=vmap_over_data,
        jac=jac,
    )
    check_target(loss_fn, op.predictions, data["target"])
    return op.mv


def create_ggn_mv_without_data(
    model_fn: Callable,
    params: Params,
    loss_fn: LossFn | None,
    factor: Float,
    *,
    vmap_over_data: bool = True,
    loss_hessian_mv: Callable | None = None,
    jac: Jac | None = None,
) -> Callable[[Params, Data], Params]:
    r"""A GGN-vector product that takes the data at call time (laplax-compatible).

    Computes `factor * sum_i J_i^T H_i J_i v` on the batch given to each call, with
    `J_i` the Jacobian of `model_fn` at sample `i` and `H_i` the loss Hessian with
    respect to that sample's prediction. Each call linearizes the model once on its
    batch.

    **Arguments:**

    - `model_fn`: `model_fn(*, input, params)`.
    - `params`: the parameters at which the GGN is taken.
    - `loss_fn`: `"mse"` (sum of squared errors, Hessian `2*I`), `"cross_entropy"`
        (softmax over the last axis; one-hot or integer targets),
        `"binary_cross_entropy"` (sigmoid logits), `"none"` (identity Hessian) or a
        callable `loss(pred, target) -> scalar`.
    - `factor`: the scalar in front of the sum.
    - `vmap_over_data`: apply `model_fn` and the loss Hessian per sample (default),
        or to the whole batch at once.
    - `loss_hessian_mv`: `loss_hessian_mv(jv, *, pred, target)`; when given it is
        used instead of `loss_fn`'s Hessian, as in laplax.
    - `jac`: `"fwd"`, `"bwd"` (reverse mode only, for a model with a
        `jax.custom_vjp`) or `None` (default: picked per model); see
        [`eqx_ggn.curvature_operator`][]. Not in laplax, whose defaults are kept.

    **Returns:**

    A function `ggn_mv(vec, data)`, with `data = {"input": X, "target": Y}`, that
    returns a pytree like `params`.

    **Raises:**

    `ValueError` for an unknown `loss_fn` or if neither it nor `loss_hessian_mv` is
    given; at trace time, for mismatched batch sizes or target shapes, or a `vec`
    whose structure differs from `params`.

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_ggn

        def model_fn(input, params):
            return params["w"] @ input

        params = {"w": jnp.ones((2, 3))}
        data = {"input": jnp.ones((5, 3)), "target": jnp.zeros((5, 2))}
        ggn_mv = eqx_ggn.create_ggn_mv_without_data(model_fn, params, "mse", 1.0)
        gv = ggn_mv({"w": jnp.ones((2, 3))}, data)
        ```
    """
    hessian_mv = loss_hessian_mv or create_loss_hessian_mv(loss_fn)

    def ggn_mv(vec: Params, data: Data) -> Params:
        mv = _ggn_mv_on(
            model_fn, params, data, loss_fn, hessian_mv, factor, vmap_over_data, jac
        )
        return mv(vec)

    return ggn_mv


def create_ggn_mv(
    model_fn: Callable,
    params: Params,
    data: Data,
    loss_fn: LossFn | None = None,
    *,
    num_curv_samples: Int | None = None,
    num_total_samples: Int | None = None,
    vmap_over_data: bool = True,
    loss_hessian_mv: Callable | None = None,
    jac: Jac | None = None,
) -> Callable[[Params], Params]:
    r"""A GGN-vector product on fixed data (laplax-compatible).

    Computes `factor * sum_i J_i^T H_i J_i v` with
    `factor = num_total_samples / num_curv_samples`. With the defaults that factor is
    1, i.e. the GGN of the *sum* of the per-sample losses, exactly as in laplax
    0.0.2; use [`eqx_ggn.curvature_operator`][] for the batch-mean objective.

    The model is linearized once, here; each call of the returned function costs
    one `J v`, a loss-Hessian product and one `Jᵀ u`.

    **Arguments:**

    - `model_fn`: `model_fn(*, input, params)`.
    - `params`: the parameters at which the GGN is taken.
    - `data`: `{"input": X, "target": Y}` with a leading batch axis.
    - `loss_fn`: as in [`eqx_ggn.create_ggn_mv_without_data`][].
    - `num_curv_samples`: the number of samples behind the curvature; defaults to
        the batch size.
    - `num_total_samples`: the size of the whole data set; defaults to
        `num_curv_samples`.
    - `vmap_over_data`: apply `model_fn` per sample (default) or to the whole batch.
    - `loss_hessian_mv`: `loss_hessian_mv(jv, *, pred, target)`, instead of `loss_fn`.
    - `jac`: `"fwd"`, `"bwd"` or `None` (default), as in
        [`eqx_ggn.create_ggn_mv_without_data`][].

    **Returns:**

    A function `ggn_mv(vec) -> pytree like params`.

    **Raises:**

    `ValueError` if both or neither of `loss_fn` and `loss_hessian_mv` are given, for
    an unknown `loss_fn`, and for data, targets or vectors that do not fit.

    !!! example

        ```python
        import equinox as eqx
        import jax, jax.numpy as jnp
        import eqx_ggn

        mlp = eqx.nn.MLP(4, 3, 8, 1, key=jax.random.key(0))
        params, static = eqx_ggn.partition(mlp)
        data = {"input": jnp.ones((10, 4)), "target": jnp.zeros(10, dtype=int)}
        ggn_mv = eqx_ggn.create_ggn_mv(
            eqx_ggn.as_model_fn(static), params, data, "cross_entropy"
        )
        gv = ggn_mv(params)
        ```
    """
    if loss_fn is None and loss_hessian_mv is None:
        raise ValueError("Either loss_fn or loss_hessian_mv must be provided.")
    if loss_fn is not None and loss_hessian_mv is not None:
        raise ValueError("Only one of loss_fn or loss_hessian_mv must be provided.")
    factor = _laplax_factor(data, num_curv_samples, num_total_samples)
    hessian_mv = loss_hessian_mv or create_loss_hessian_mv(loss_fn)
    return _ggn_mv_on(
        model_fn, params, data, loss_fn, hessian_mv, factor, vmap_over_data, jac
    )


def create_fisher_mv(
    model_fn: Callable,
    params: Params,
    data: Data,
    loss_fn: LossFn | None = None,
    *,
    num_curv_samples: Int | None = None,
    num_total_samples: Int | None = None,
    vmap_over_data: bool = True,
    loss_hessian_mv: Callable | None = None,
    jac: Jac | None = None,
) -> Callable[[Params], Params]:
    r"""The Fisher-vector product: an alias of [`eqx_ggn.create_ggn_mv`][].

    For the built-in losses the loss is a negative log-likelihood of an exponential
    family in its natural parameters (`"mse"`: a Gaussian with covariance `I/2`,
    `"cross_entropy"`: categorical on logits, `"binary_cross_entropy"`: Bernoulli on
    logits), so the Fisher information `E_{y~p(y|f)}[J^T ∇ℓ ∇ℓ^T J]` equals the GGN
    `J^T H J` exactly. The natural gradient is therefore the GGN step. Same arguments,
    scaling and return value as `create_ggn_mv`.

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_ggn

        def model_fn(input, params):
            return params["w"] @ input

        params = {"w": jnp.ones((3, 2))}
        data = {"input": jnp.ones((4, 2)), "target": jnp.zeros(4, dtype=int)}
        fisher_mv = eqx_ggn.create_fisher_mv(model_fn, params, data, "cross_entropy")
        fv = fisher_mv(params)
        ```
    """
    return create_ggn_mv(
        model_fn,
        params,
        data,
        loss_fn,
        num_curv_samples=num_curv_samples,
        num_total_samples=num_total_samples,
        vmap_over_data=vmap_over_data,
        loss_hessian_mv=loss_hessian_mv,
        jac=jac,
    )


def create_empirical_fisher_mv(
    model_fn: Callable,
    params: Params,
    data: Data,
    loss_fn: LossFn,
    *,
    num_curv_samples: Int | None = None,
    num_total_samples: Int | None = None,
    vmap_over_data: bool = True,
    jac: Jac | None = None,
) -> Callable[[Params], Params]:
    r"""The empirical-Fisher-vector product `factor * sum_i g_i g_i^T v`.

    `g_i` is the gradient of sample `i`'s loss. It is computed without forming any
    `g_i`: `g_i^T v = r_i^T (J_i v)` with `r_i = ∇_pred ℓ_i`, then one transposed
    JVP. Scaling as in [`eqx_ggn.create_ggn_mv`][]
    (`factor = num_total_samples / num_curv_samples`).

    **Arguments:** as `create_ggn_mv`; `loss_fn` is required.

    **Returns:**

    A function `ef_mv(vec) -> pytree like params`.

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_ggn

        def model_fn(input, params):
            return params["w"] @ input

        params = {"w": jnp.ones((2, 2))}
        data = {"input": jnp.eye(2), "target": jnp.zeros((2, 2))}
        ef_mv = eqx_ggn.create_empirical_fisher_mv(model_fn, params, data, "mse")
        efv = ef_mv(params)
        ```
    """
    return curvature_operator(
        model_fn,
        params,
        data,
        loss_fn,
        curvature="empirical_fisher",
        factor=_laplax_factor(data, num_curv_samples, num_total_samples),
        vmap_over_data=vmap_over_data,
        jac=jac,
    ).mv


def create_hessian_mv(
    model_fn: Callable,
    params: Params,
    data: Data,
    loss_fn: LossFn,
    *,
    num_curv_samples: Int | None = None,
    num_total_samples: Int | None = None,
    vmap_over_data: bool = True,
    jac: Jac | None = None,
) -> Callable[[Params], Params]:
    r"""The Hessian-vector product of `factor * sum_i loss_i`, model curvature included.

    Unlike the GGN this keeps the second-order term `sum_i sum_k (∂ℓ_i/∂f_k) ∇²f_k`.
    The gradient is linearized once (forward-over-reverse; with `jac="bwd"`
    reverse-over-reverse, one pullback of the gradient, as the Hessian is
    symmetric), so each product costs one linear pass. Scaling as in
    [`eqx_ggn.create_ggn_mv`][].

    **Arguments:** as `create_ggn_mv`; `loss_fn` is required.

    **Returns:**

    A function `hessian_mv(vec) -> pytree like params`.

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_ggn

        def model_fn(input, params):
            return jnp.tanh(params["w"] @ input)

        params = {"w": jnp.ones((2, 2))}
        data = {"input": jnp.eye(2), "target": jnp.zeros((2, 2))}
        h_mv = eqx_ggn.create_hessian_mv(model_fn, params, data, "mse")
        hv = h_mv(params)
        ```
    """
    return curvature_operator(
        model_fn,
        params,
        data,
        loss_fn,
        curvature="hessian",
        factor=_laplax_factor(data, num_curv_samples, num_total_samples),
        vmap_over_data=vmap_over_data,
        jac=jac,
    ).mv
