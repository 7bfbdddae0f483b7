"""The linearize-once curvature operator."""

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, PyTree

from ._batching import (
    AxisName,
    from_microbatches,
    sum_over_shards,
    to_microbatches,
    vary_over_shards,
)
from ._checks import (
    check_data,
    check_like,
    check_params,
    check_positive,
    check_sizes,
)
from ._jacobian import Jac, Jacobian, check_jac, linearize
from ._losses import LossFn, check_target, resolve_loss
from ._partition import module_fn, partition
from ._tree import tree_dot


Curvature = Literal["ggn", "fisher", "empirical_fisher", "hessian"]
CURVATURES: tuple[str, ...] = ("ggn", "fisher", "empirical_fisher", "hessian")


def forward(
    model_fn: Callable, params: PyTree, inputs: PyTree, vmap_over_data: bool
) -> PyTree:
    """Evaluate `model_fn` on a batch, per sample under `vmap` or all at once."""
    if vmap_over_data:
        return jax.vmap(lambda x: model_fn(input=x, params=params))(inputs)
    return model_fn(input=inputs, params=params)


def summed_loss(
    loss: Callable, pred: PyTree, target: PyTree, vmap_over_data: bool
) -> Float[Array, ""]:
    """`sum_i loss(pred_i, target_i)` over the batch."""
    if vmap_over_data:
        return jnp.sum(jax.vmap(loss)(pred, target))
    return loss(pred, target)


def objective_value(
    model_fn: Callable,
    params: PyTree,
    data: dict[str, Any],
    loss_fn: LossFn,
    factor: Float[Array, ""],
    vmap_over_data: bool = True,
    num_microbatches: int = 1,
    axis_name: AxisName | None = None,
) -> Float[Array, ""]:
    """The objective `factor * sum_i loss_i` alone: one forward pass.

    With `axis_name`, the sum runs over the batch shards of that mapped axis too.
    """
    loss = resolve_loss(loss_fn)[0]

    def chunk_value(chunk):
        pred = forward(model_fn, params, chunk["input"], vmap_over_data)
        return summed_loss(loss, pred, chunk["target"], vmap_over_data)

    if num_microbatches == 1:
        value = chunk_value(data)
    else:
        value = jnp.sum(
            jax.lax.map(chunk_value, to_microbatches(data, num_microbatches))
        )
    return jnp.asarray(factor, value.dtype) * sum_over_shards(value, axis_name)


def _scale(tree: PyTree, factor: Array) -> PyTree:
    return jax.tree.map(lambda x: x * factor.astype(x.dtype), tree)


def _per_sample_outer(loss_grads: PyTree, jv: PyTree) -> PyTree:
    # r_i (r_i^T jv_i) for every sample i: the empirical Fisher in output space.
    def dot(r, j):
        return jnp.sum((r * j).reshape(r.shape[0], -1), axis=1)

    s = sum(jax.tree.leaves(jax.tree.map(dot, loss_grads, jv)))
    return jax.tree.map(
        lambda r: r * s.reshape((-1,) + (1,) * (r.ndim - 1)), loss_grads
    )


class _Linearization(NamedTuple):
    value: Float[Array, ""] | None
    pred: PyTree
    grad: PyTree | None
    jacobian: Jacobian
    loss_grads: PyTree | None


def _value_and_grad(lin: _Linearization) -> tuple:
    return lin.value, lin.grad


def _linearize(
    model_fn: Callable,
    params: PyTree,
    data: dict[str, Any],
    loss_fn: LossFn,
    curvature: str,
    factor: Float[Array, ""],
    vmap_over_data: bool,
    jac: Jac | None,
) -> _Linearization:
    """One forward pass, linearized in mode `jac`, on one (micro-)batch.

    `value` and `grad` are this batch's share, `factor * sum_i` over its samples.
    """
    loss = resolve_loss(loss_fn)[0]
    inputs, target = data["input"], data["target"]

    def predict(p):
        pred = forward(model_fn, p, inputs, vmap_over_data)
        check_target(loss_fn, pred, target)
        return pred

    if curvature == "hessian":

        def objective(p):
            pred = predict(p)
            value = summed_loss(loss, pred, target, vmap_over_data)
            return factor.astype(value.dtype) * value, pred

        def gradient(p):
            (value, pred), g = jax.value_and_grad(objective, has_aux=True)(p)
            return g, (value, pred)

        grad, jacobian, (value, pred) = linearize(
            gradient, params, jac, has_aux=True, symmetric=True
        )
        return _Linearization(value, pred, grad, jacobian, None)
    pred, jacobian = linearize(predict, params, jac)
    if loss is None:
        return _Linearization(None, pred, None, jacobian, None)
    value, loss_grads = jax.value_and_grad(
        lambda z: summed_loss(loss, z, target, vmap_over_data)
    )(pred)
    grad = jacobian.vjp(_scale(loss_grads, factor), params)
    return _Linearization(
        factor.astype(value.dtype) * value, pred, grad, jacobian, loss_grads
    )


class CurvatureOperator(eqx.Module):
    r"""A curvature matrix of the objective, linearized once at one point.

    Build it with [`eqx_ggn.curvature_operator`][]. The **objective** is

    $$\mathcal{L}(\theta) = \text{factor} \cdot \sum_i \ell(f(x_i, \theta), y_i),$$

    with `factor = 1/batch_size` by default (the batch mean). `loss`, `grad` and
    every product belong to that same objective.

    The operator is a pytree: the linearization's residuals, the predictions and the
    gradient are its array leaves, so `jax.jit`/`eqx.filter_jit` trace them instead
    of baking them into the program as constants, and `jax.vmap` maps over vectors.

    **Attributes:**

    - `loss`: the objective's value at the linearization point (`None` if only a
        `loss_hessian_mv` was given).
    - `predictions`: the model's outputs on the batch, with a leading batch axis.
    - `grad`: the objective's gradient, a pytree like `params` (`None` as `loss`).
    - `factor`: the scalar in front of the sum.
    - `curvature`: `"ggn"`, `"fisher"`, `"empirical_fisher"` or `"hessian"`.
    - `jac`: how the model was linearized, `"fwd"` (`jax.linearize`) or `"bwd"`
        (`jax.vjp`, for models with a `jax.custom_vjp`); see
        [`eqx_ggn.curvature_operator`][].

    **Methods:**

    - `mv(vector)` (also `op(vector)`): the curvature times a pytree like `params`.
    - `as_matrix()`: the dense `P x P` matrix, in `ravel_pytree(params)` order.
    - `solve(vector, damping, *, solver="dense")`: the exact damped solve
        `(C + damping I)^{-1} vector`, dense or in sample space.

    The GGN product uses only `J v`, the loss Hessian in output space and `Jᵀ u`,
    from the stored linearization; no forward pass is repeated.

    !!! example

        ```python
        import equinox as eqx
        import jax
        import jax.numpy as jnp
        import eqx_ggn

        mlp = eqx.nn.MLP(2, 1, 8, 1, key=jax.random.key(0))
        x = jnp.linspace(-1, 1, 32).reshape(16, 2)
        data = {"input": x, "target": x[:, :1]}
        op = eqx_ggn.curvature_operator(model=mlp, data=data, loss_fn="mse")
        gv = op.mv(op.grad)  # a pytree like the parameters
        dense = op.as_matrix()  # (P, P), small models only
        ```
    """

    loss: Float[Array, ""] | None
    predictions: PyTree
    grad: PyTree | None
    factor: Float[Array, ""]
    jacobian: Jacobian | None
    target: PyTree
    loss_grads: PyTree | None
    params: PyTree | None
    inputs: PyTree | None
    curvature: str = eqx.field(static=True)
    vmap_over_data: bool = eqx.field(static=True)
    loss_hessian_mv: Callable | None = eqx.field(static=True)
    params_struct: Any = eqx.field(static=True)
    num_microbatches: int = eqx.field(static=True, default=1)
    model_fn: Callable | None = eqx.field(static=True, default=None)
    loss_fn: LossFn | None = eqx.field(static=True, default=None)
    axis_name: AxisName | None = eqx.field(static=True, default=None)
    relinearize: bool = eqx.field(static=True, default=False)
    jac: str = eqx.field(static=True, default="fwd")

    def _params_template(self) -> PyTree:
        treedef, leaves = self.params_struct
        return jax.tree.unflatten(treedef, leaves)

    def mv(self, vector: PyTree) -> PyTree:
        """The curvature times `vector`, a pytree with the structure of `params`.

        **Arguments:**

        - `vector`: a pytree with the structure and leaf shapes of `params`; its
            leaves are cast to the parameters' dtypes.

        **Returns:**

        A pytree like `params`.
        """
        vector = self._cast("vector", vector)
        # Sum the micro-batches' products in at least float32.
        zeros = jax.tree.map(
            lambda v: jnp.zeros(v.shape, jnp.result_type(jnp.float32, v.dtype)), vector
        )
        total = self._summed(lambda *chunk: self._product(*chunk, vector), zeros)
        return jax.tree.map(lambda t, v: t.astype(v.dtype), total, vector)

    def quadratic_form(self, vectors: list[PyTree]) -> Float[Array, "k k"]:
        """The matrix `[v_iᵀ C v_j]` of a few vectors, from `J v_i` alone.

        One JVP per vector and no transposed pass: a quadratic model `gᵀs + sᵀCs/2`
        costs about half a product this way (for `curvature="hessian"`, `H v_j`
        is the JVP of the gradient, and the form is `v_iᵀ (H v_j)`).

        **Arguments:**

        - `vectors`: a list of pytrees like `params`.

        **Returns:**

        A symmetric `(k, k)` array, `k = len(vectors)`, in at least float32.

        !!! example

            ```python
            import equinox as eqx
            import jax, jax.numpy as jnp
            import eqx_ggn

            net = eqx.nn.Linear(3, 4, key=jax.random.key(0))
            x = jax.random.normal(jax.random.key(1), (8, 3))
            data = {"input": x, "target": jnp.arange(8) % 4}
            op = eqx_ggn.curvature_operator(
                model=net, data=data, loss_fn="cross_entropy"
            )
            form = op.quadratic_form([op.grad])  # (1, 1): gᵀ C g
            g = jax.flatten_util.ravel_pytree(op.grad)[0]
            assert jnp.allclose(form[0, 0], g @ op.as_matrix() @ g, rtol=1e-4)
            ```
        """
        vectors = [self._cast("vectors", vector) for vector in vectors]
        dtype = jnp.result_type(jnp.float32, *jax.tree.leaves(vectors))
        zeros = jnp.zeros((len(vectors),) * 2, dtype)
        return self._summed(lambda *chunk: self._form(*chunk, vectors), zeros)

    def _cast(self, name: str, vector: PyTree) -> PyTree:
        """`vector` checked against `params`, in their dtypes, varying over the
        shards."""
        template = self._params_template()
        check_like(name, vector, template, "params")
        vector = jax.tree.map(lambda v, t: jnp.asarray(v, t.dtype), vector, template)
        return vary_over_shards(vector, self.axis_name)

    def _summed(self, part: Callable, zeros: PyTree) -> PyTree:
        """`part(jacobian, pred, target, loss_grads)` summed over the micro-batches
        (accumulated in `zeros`' dtypes; with `relinearize`, one more forward pass
        per micro-batch) and over the shards."""
        if self.num_microbatches == 1 and not self.relinearize:
            out = part(self.jacobian, self.predictions, self.target, self.loss_grads)
            return sum_over_shards(out, self.axis_name)
        chunks = to_microbatches(
            (self.predictions, self.target, self.loss_grads, self.inputs),
            self.num_microbatches,
        )

        def accumulate(total, xs):
            jacobian, (pred, target, loss_grads, inputs) = xs
            if jacobian is None:  # relinearize
                jacobian = _linearize(
                    self.model_fn,
                    self.params,
                    {"input": inputs, "target": target},
                    self.loss_fn,
                    self.curvature,
                    self.factor,
                    self.vmap_over_data,
                    self.jac,
                ).jacobian
            out = part(jacobian, pred, target, loss_grads)
            return jax.tree.map(lambda t, x: t + x.astype(t.dtype), total, out), None

        zeros = vary_over_shards(zeros, self.axis_name)
        total, _ = jax.lax.scan(accumulate, zeros, (self.jacobian, chunks))
        return sum_over_shards(total, self.axis_name)

    def _output_hessian(
        self, jv: PyTree, pred: PyTree, target: PyTree, loss_grads: PyTree | None
    ) -> PyTree:
        """The loss Hessian (or the empirical Fisher) in output space times `J v`,
        with the objective's factor."""
        if self.curvature == "empirical_fisher":
            hjv = _per_sample_outer(loss_grads, jv)
        elif self.vmap_over_data:
            hjv = jax.vmap(lambda j, p, t: self.loss_hessian_mv(j, pred=p, target=t))(
                jv, pred, target
            )
        else:
            hjv = self.loss_hessian_mv(jv, pred=pred, target=target)
        return _scale(hjv, self.factor)

    def _form(
        self,
        jacobian: Jacobian,
        pred: PyTree,
        target: PyTree,
        loss_grads: PyTree | None,
        vectors: list[PyTree],
        dot: Callable = tree_dot,
    ) -> Float[Array, "*m k k"]:
        """`[dot(J v_i, H J v_j)]`, symmetrized; `dot=jax.vmap(tree_dot)` keeps
        the samples apart (`(m, k, k)`; not for the Hessian)."""
        if self.curvature == "hessian":
            left, right = vectors, [jacobian.jvp(v) for v in vectors]
        else:
            left = [jacobian.jvp(v) for v in vectors]
            right = [self._output_hessian(j, pred, target, loss_grads) for j in left]
        form = jnp.stack([jnp.stack([dot(u, w) for w in right], -1) for u in left], -2)
        return (form + jnp.swapaxes(form, -1, -2)) / 2

    def _sample_forms(
        self, vectors: list[PyTree], index: np.ndarray
    ) -> Float[Array, "m k k"]:
        """Each of the samples `index`'s share of `quadratic_form(vectors)` (of
        this shard's batch, with the objective's factor), from a fresh
        linearization of those samples alone: it costs their forward pass and
        JVPs, and never touches the stored linearization. Needs
        `vmap_over_data`, `model_fn` and `loss_fn`; not for the Hessian."""
        data = jax.tree.map(
            lambda x: x[index], {"input": self.inputs, "target": self.target}
        )
        lin = _linearize(
            self.model_fn,
            self.params,
            data,
            self.loss_fn,
            self.curvature,
            self.factor,
            self.vmap_over_data,
            self.jac,
        )
        vectors = [self._cast("vectors", vector) for vector in vectors]
        return self._form(
            lin.jacobian,
            lin.pred,
            data["target"],
            lin.loss_grads,
            vectors,
            dot=jax.vmap(tree_dot),
        )

    def _product(
        self,
        jacobian: Jacobian,
        pred: PyTree,
        target: PyTree,
        loss_grads: PyTree | None,
        vector: PyTree,
    ) -> PyTree:
        if self.curvature == "hessian":
            return jacobian.jvp(vector)
        hjv = self._output_hessian(jacobian.jvp(vector), pred, target, loss_grads)
        return jacobian.vjp(hjv, vector)

    def __call__(self, vector: PyTree) -> PyTree:
        """Same as `mv`, so the operator can stand wherever a `mv` callable does."""
        return self.mv(vector)

    def solve(
        self,
        vector: PyTree,
        damping: float | Float[Array, ""],
        *,
        solver: str = "dense",
        cg_maxiter: int = 100,
        cg_tol: float = 1e-10,
    ) -> PyTree:
        r"""Solve `(C + damping * I) d = vector` exactly (or by CG).

        **Arguments:**

        - `vector`: the right-hand side, a pytree like `params`.
        - `damping`: `λ >= 0`. With `λ = 0` and a singular `C`, the exact solvers
            return the minimum-norm solution (a truncated pseudo-inverse).
        - `solver`: `"dense"` (the `P x P` matrix, Cholesky), `"sample_space"`
            (the `(N O) x (N O)` kernel and the push-through identity; not for
            `curvature="hessian"`), `"auto"` (the cheaper of the two that fits 1
            GiB, else CG) or `"cg"` (matrix-free, `cg_maxiter`, `cg_tol`). See
            "Choosing a solver" in the docs for the cost of each.

        **Returns:**

        `d`, a pytree like `params`, in their dtypes; the factorization runs in
        at least float32.

        !!! example

            ```python
            import equinox as eqx
            import jax
            import jax.numpy as jnp
            import eqx_ggn

            mlp = eqx.nn.MLP(2, 1, 8, 1, key=jax.random.key(0))
            x = jnp.linspace(-1, 1, 16).reshape(8, 2)
            data = {"input": x, "target": x[:, :1]}
            op = eqx_ggn.curvature_operator(model=mlp, data=data, loss_fn="mse")
            d = op.solve(op.grad, 1e-3, solver="sample_space")  # 8 x 8 kernel
            dense = op.as_matrix() + 1e-3 * jnp.eye(33)
            flat = jax.flatten_util.ravel_pytree
            expected = jnp.linalg.solve(dense, flat(op.grad)[0])
            assert jnp.allclose(flat(d)[0], expected, rtol=1e-3, atol=1e-5)
            ```
        """
        from ._solvers import solve_with

        template = self._params_template()
        check_like("vector", vector, template, "params")
        return solve_with(solver, self, vector, damping, cg_maxiter, cg_tol)[0].value

    def as_matrix(self) -> Float[Array, "P P"]:
        """The dense curvature matrix in `jax.flatten_util.ravel_pytree` order.

        Costs `P` products and `P**2` memory: for small problems only.
        """
        zeros = jax.tree.map(
            lambda t: jnp.zeros(t.shape, t.dtype), self._params_template()
        )
        flat, unravel = ravel_pytree(zeros)
        basis = jnp.eye(flat.size, dtype=flat.dtype)
        columns = jax.vmap(lambda e: ravel_pytree(self.mv(unravel(e)))[0])(basis)
        return columns.T


def curvature_operator(
    model_fn: Callable | None = None,
    params: PyTree | None = None,
    data: dict[str, Any] | None = None,
    loss_fn: LossFn | None = None,
    *,
    model: eqx.Module | None = None,
    curvature: Curvature = "ggn",
    factor: float | Float[Array, ""] | None = None,
    loss_hessian_mv: Callable | None = None,
    vmap_over_data: bool = True,
    num_microbatches: int = 1,
    relinearize: bool = False,
    axis_name: AxisName | None = None,
    jac: Jac | None = None,
) -> CurvatureOperator:
    r"""Run the forward pass and linearize it once, and return the operator.

    The objective is `factor * sum_i loss(model_fn(input=x_i, params), y_i)`, with
    `factor = 1/batch_size` by default (the batch mean), and:

    - `"ggn"`: `factor * sum_i J_i^T H_i J_i`, with `H_i` the loss Hessian with
      respect to sample `i`'s prediction;
    - `"fisher"`: the same matrix. For the built-in losses (Gaussian, categorical,
      Bernoulli likelihoods in their natural parameters) the Fisher equals the GGN;
      the name is there for natural-gradient code;
    - `"empirical_fisher"`: `factor * sum_i g_i g_i^T`, with `g_i` the gradient of
      sample `i`'s loss;
    - `"hessian"`: the full Hessian of the objective, including the second-order
      model term that the GGN drops (it linearizes the gradient instead of the
      model).

    **Arguments:**

    - `model_fn`: `model_fn(*, input, params)` evaluated on one sample (or the whole
        batch when `vmap_over_data=False`). See [`eqx_ggn.as_model_fn`][].
    - `params`: the parameters, a pytree of floating-point arrays.
    - `data`: `{"input": X, "target": Y}`, each with a leading batch axis.
    - `loss_fn`: `"mse"`, `"cross_entropy"`, `"binary_cross_entropy"`, `"none"`, or
        a callable `loss(pred, target) -> scalar` for one sample.
    - `model`: an Equinox module, instead of `model_fn` and `params`; it is split
        with [`eqx_ggn.partition`][] (all floating-point arrays are trained), and
        `grad`/products are then pytrees like that `params`. On a CPU its
        `eqx.nn.Conv` layers (`groups=1`) are evaluated as matrix products with
        the input's strided slices, the same function up to rounding: XLA runs
        convolutions inside a loop, such as CG's, far slower than outside one
        (see "Choosing a solver" in the docs).
    - `curvature`: which matrix, see above.
    - `factor`: the scalar in front of the sum; defaults to `1/batch_size`.
    - `loss_hessian_mv`: `loss_hessian_mv(jv, *, pred, target)` to replace the loss
        Hessian (GGN and Fisher only). Without `loss_fn`, `loss` and `grad` are `None`.
    - `vmap_over_data`: evaluate `model_fn` per sample under `jax.vmap` (default)
        or on the whole batch at once.
    - `num_microbatches`: split the batch into this many equal micro-batches
        (it must divide the batch size); micro-batch `j` takes samples `j, j + n,
        j + 2n, ...`, so a batch sharded over devices stays evenly sharded. The
        forward pass, the gradient and every product then run micro-batch by
        micro-batch in a `lax.scan` and are summed, so only one micro-batch's
        intermediate values are live at a time.
    - `relinearize`: with `False` (default) the linearization of every micro-batch
        is kept: the residuals of the whole batch stay in memory (as without
        micro-batching) and a product costs one JVP and one VJP. With `True` only the
        predictions are kept and each product re-runs the forward pass of each
        micro-batch: memory of one micro-batch's residuals, at the cost of one more
        forward pass per product.
    - `axis_name`: inside `jax.shard_map` (or `pmap`), the name of the mapped axis
        that splits the batch over devices. `data` is then this device's shard;
        the loss, the gradient and every product are summed over the shards with
        one `lax.psum` each, so every device holds the global values, and
        `factor` defaults to `1/global_batch_size`. `predictions` stay local.
        Under plain `jit` with a sharded batch, leave it `None`: XLA inserts the
        sums itself.
    - `jac`: how the model is linearized. `"fwd"`: `jax.linearize`, a product
        is one JVP and one VJP. `"bwd"`: reverse mode only, for models with a
        `jax.custom_vjp` (diffrax's default adjoint, fused kernels, custom
        gradients), which have no JVP. `Jᵀ u` is the model's VJP and `J v` the
        VJP of that VJP, so the backward rule must be differentiable once more
        for products and CG; the exact solvers need only the VJP. `None`
        (default): `"fwd"` when the model's JVP can be traced, else `"bwd"`,
        decided at trace time (no extra compile). The choice is `op.jac`.

    **Returns:**

    A [`eqx_ggn.CurvatureOperator`][].

    **Raises:**

    `ValueError` (at trace time) for an unknown `loss_fn`, `curvature` or `jac`,
    `jac="fwd"` on a model without forward mode, non-floating parameters, input
    and target batches of different sizes, a target that does not fit the
    predictions, or a `num_microbatches` that does not divide the batch.

    !!! example

        ```python
        import equinox as eqx
        import jax
        import jax.numpy as jnp
        import eqx_ggn

        mlp = eqx.nn.MLP(2, 1, 16, 2, key=jax.random.key(0))
        x = jnp.linspace(-1, 1, 64).reshape(32, 2)
        data = {"input": x, "target": jnp.sin(x[:, :1])}

        @eqx.filter_jit
        def gauss_newton_direction(mlp, data):
            op = eqx_ggn.curvature_operator(model=mlp, data=data, loss_fn="mse")
            ggn = op.as_matrix()
            flat_grad, unravel = jax.flatten_util.ravel_pytree(op.grad)
            step = jnp.linalg.solve(ggn + 1e-3 * jnp.eye(len(flat_grad)), flat_grad)
            return op.loss, unravel(step)

        loss, direction = gauss_newton_direction(mlp, data)
        ```
    """
    if model is not None:
        if model_fn is not None or params is not None:
            raise ValueError(
                "Pass either `model` or `model_fn` and `params`, not both."
            )
        params, static = partition(model)
        model_fn = module_fn(static)
    if model_fn is None or params is None:
        raise ValueError(
            "curvature_operator needs `model_fn` and `params`, or an Equinox `model=`."
        )
    if curvature not in CURVATURES:
        raise ValueError(
            f"Unknown curvature {curvature!r}; valid ones are {list(CURVATURES)}."
        )
    check_jac(jac)
    batch_size = check_data(data)
    check_params(params)
    hessian_mv = resolve_loss(loss_fn)[1]
    if loss_hessian_mv is not None:
        if curvature in ("empirical_fisher", "hessian"):
            raise ValueError(
                "loss_hessian_mv applies to curvature 'ggn' or 'fisher', not "
                f"{curvature!r}."
            )
        hessian_mv = loss_hessian_mv
    if hessian_mv is None:
        raise ValueError("Pass a loss_fn (or, for the GGN, a loss_hessian_mv).")

    check_sizes(num_microbatches=num_microbatches)
    if batch_size % num_microbatches:
        raise ValueError(
            f"num_microbatches={num_microbatches} does not divide the batch size "
            f"{batch_size} of data['input']."
        )

    dtype = jnp.result_type(*jax.tree.leaves(params))
    params = vary_over_shards(params, axis_name)
    check_positive(factor=factor)
    if factor is None:
        shards = 1 if axis_name is None else jax.lax.psum(1, axis_name)
        factor = 1.0 / (batch_size * shards)
    factor = jnp.asarray(factor, dtype=dtype)

    modes = []  # the mode `jac=None` resolves to, recorded while tracing

    def linearize(chunk):
        lin = _linearize(
            model_fn, params, chunk, loss_fn, curvature, factor, vmap_over_data, jac
        )
        modes.append(lin.jacobian.mode)
        return lin

    if num_microbatches == 1 and not relinearize:
        lin = linearize(data)
        value, pred, grad = lin.value, lin.pred, lin.grad
        jacobian, loss_grads = lin.jacobian, lin.loss_grads
    else:
        chunks = to_microbatches(data, num_microbatches)

        def accumulate(total, chunk):
            lin = linearize(chunk)
            total = jax.tree.map(
                lambda t, x: t + x.astype(t.dtype), total, _value_and_grad(lin)
            )
            kept = None if relinearize else lin.jacobian
            return total, (lin.pred, lin.loss_grads, kept)

        # The loss and gradient are summed over micro-batches in at least float32.
        first = jax.tree.map(lambda x: x[0], chunks)
        shapes = jax.eval_shape(lambda c: _value_and_grad(linearize(c)), first)
        zeros = jax.tree.map(
            lambda x: jnp.zeros(x.shape, jnp.result_type(jnp.float32, x.dtype)),
            shapes,
        )
        zeros = vary_over_shards(zeros, axis_name)
        totals, (pred, loss_grads, jacobian) = jax.lax.scan(accumulate, zeros, chunks)
        value, grad = jax.tree.map(lambda t, x: t.astype(x.dtype), totals, shapes)
        pred, loss_grads = from_microbatches((pred, loss_grads))
    value, grad = sum_over_shards((value, grad), axis_name)
    mode = modes[-1]

    leaves, treedef = jax.tree.flatten(params)
    params_struct = (
        treedef,
        tuple(jax.ShapeDtypeStruct(jnp.shape(x), x.dtype) for x in leaves),
    )
    return CurvatureOperator(
        loss=value,
        predictions=pred,
        grad=grad,
        factor=factor,
        jacobian=jacobian,
        target=data["target"],
        loss_grads=loss_grads,
        params=params,
        inputs=data["input"],
        curvature=curvature,
        vmap_over_data=vmap_over_data,
        loss_hessian_mv=hessian_mv,
        params_struct=params_struct,
        num_microbatches=num_microbatches,
        model_fn=model_fn,
        relinearize=relinearize,
        loss_fn=loss_fn,
        axis_name=axis_name,
        jac=mode,
    )


def value_and_grad(
    model_fn: Callable | None = None,
    params: PyTree | None = None,
    batch: dict[str, Any] | None = None,
    loss_fn: LossFn | None = None,
    *,
    model: eqx.Module | None = None,
    curvature: Curvature = "ggn",
    factor: float | Float[Array, ""] | None = None,
    vmap_over_data: bool = True,
    num_microbatches: int = 1,
    relinearize: bool = False,
    axis_name: AxisName | None = None,
    jac: Jac | None = None,
    return_operator: bool = False,
) -> Any:
    r"""The value and gradient of exactly the package's objective, written once.

    The objective is `factor * sum_i loss_fn(model(x_i), y_i)`, by default the batch
    mean: the one [`eqx_ggn.scale_by_gauss_newton`][] solves with. The forward pass
    is linearized once (this is [`eqx_ggn.curvature_operator`][]), so with
    `return_operator=True` the same linearization gives the optimizer its
    curvature: pass it on as `update(..., operator=op)` and the step runs the
    model's forward pass no more often than the linearization needs.

    **Arguments:**

    - `model_fn`, `params`: `model_fn(*, input, params)` and its parameters; or
        `model=` an Equinox module (all floating-point arrays are trained).
    - `batch`: `{"input": X, "target": Y}`.
    - `loss_fn`: `"mse"`, `"cross_entropy"`, `"binary_cross_entropy"`, `"none"`, or
        a callable `loss(pred, target) -> scalar` for one sample.
    - `curvature`, `factor`, `vmap_over_data`, `num_microbatches`, `relinearize`,
        `axis_name`, `jac`: as for [`eqx_ggn.curvature_operator`][]; `curvature` matters
        only for the returned operator.
    - `return_operator`: also return the [`eqx_ggn.CurvatureOperator`][].

    **Returns:**

    `(value, grad)`, with `grad` a pytree like `params` (for `model=`, like
    `eqx.filter(model, eqx.is_inexact_array)`); with `return_operator=True`,
    `((value, grad), operator)`.

    !!! example

        ```python
        import equinox as eqx
        import jax
        import jax.numpy as jnp
        import eqx_ggn

        mlp = eqx.nn.MLP(2, 3, 8, 1, key=jax.random.key(0))
        x = jax.random.normal(jax.random.key(1), (16, 2))
        batch = {"input": x, "target": (x[:, 0] > 0).astype(int)}
        value, grads = eqx_ggn.value_and_grad(
            model=mlp, batch=batch, loss_fn="cross_entropy"
        )

        def by_hand(m):  # the same objective, written by hand
            logits = jax.vmap(m)(x)
            return jax.vmap(eqx_ggn.cross_entropy_loss)(logits, batch["target"]).mean()

        assert jnp.allclose(value, by_hand(mlp))
        ```
    """
    op = curvature_operator(
        model_fn,
        params,
        batch,
        loss_fn,
        model=model,
        curvature=curvature,
        factor=factor,
        vmap_over_data=vmap_over_data,
        num_microbatches=num_microbatches,
        relinearize=relinearize,
        axis_name=axis_name,
        jac=jac,
    )
    if op.loss is None:
        raise ValueError("value_and_grad needs a loss_fn.")
    if return_operator:
        return (op.loss, op.grad), op
    return op.loss, op.grad
