"""Exact damped solves `(C + λ I) d = g`: dense (parameter space) and sample space.

Both build the factor `A` of the curvature, `C = A^T A`, from per-sample Jacobians:
row block `i` is `sqrt(factor) * S_i^T J_i`, with `J_i` sample `i`'s Jacobian
(one `vmap`ped reverse-mode pass per sample, forward mode when there are fewer
parameters than outputs and the model has forward mode) and `S_i S_i^T = H_i`
a square root of the loss Hessian in output space. For the empirical Fisher the
row is the per-sample gradient. The work is `O(N O P)` for `A`, never a
full-batch pass per sample.

- `"dense"`: `A^T A + λ I` (P x P), accumulated over micro-batches, then Cholesky.
- `"sample_space"`: `A A^T + λ I` ((N O) x (N O)), Cholesky, and the push-through
  identity `(A^T A + λ I)^{-1} A^T w = A^T (A A^T + λ I)^{-1} w`, with `w` the
  sample-space form of the objective's gradient.

A failed Cholesky (a singular matrix with `λ = 0`, or rounding) falls back to an
eigendecomposition with a truncated pseudo-inverse: a finite, minimum-norm step.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, PyTree

from ._batching import to_microbatches, vary_over_shards
from ._cg import CGResult, CGStop, cg
from ._losses import LossFn, loss_hessian_root


EXACT_SOLVERS = ("dense", "sample_space")
SOLVERS = ("cg", *EXACT_SOLVERS, "kfac", "auto")
SOLVER_CODES = {"cg": 0, "dense": 1, "sample_space": 2, "kfac": 3}
DEFAULT_MAX_MATRIX_BYTES = 2**30


class _Factor(NamedTuple):
    """The curvature's factor `C = a^T a` and the gradient `g = a^T w`."""

    a: Float[Array, "rows P"]
    w: Float[Array, " rows"]


def curvature_factor(
    model_fn: Callable,
    params: PyTree,
    inputs: PyTree,
    predictions: Array,
    target: PyTree,
    loss_grads: Array,
    loss_fn: LossFn,
    curvature: str,
    factor: Array,
    dtype: Any,
    jac: str = "fwd",
) -> _Factor:
    """The rows of `A` (and `w`) for a (micro-)batch, in `ravel_pytree` order;
    with `jac="bwd"` by reverse mode only."""
    flat, unravel = ravel_pytree(params)
    flat = flat.astype(dtype)

    def sample_rows(x, pred, y, r):
        # The loss Hessian's root at the linearization point: constant in `p`.
        pred, r = pred.astype(dtype), r.astype(dtype)
        if curvature == "empirical_fisher":  # S is the gradient, one column
            sqrt_t, u = (lambda v: jnp.sum(r * v)[None]), jnp.ones(1, dtype)
        else:
            sqrt_t, u = loss_hessian_root(loss_fn, pred, y, r)

        def f(p):
            out = jnp.asarray(model_fn(input=x, params=unravel(p)))
            return jnp.ravel(sqrt_t(out.astype(dtype)))

        rows = jnp.ravel(u).size
        forward = jac == "fwd" and flat.size < rows
        jacobian = jax.jacfwd(f) if forward else jax.jacrev(f)
        return jacobian(flat), jnp.ravel(u).astype(dtype)

    rows, w = jax.vmap(sample_rows)(inputs, predictions, target, loss_grads)
    root = jnp.sqrt(factor.astype(dtype))
    return _Factor(root * rows.reshape(-1, flat.size), root * w.reshape(-1))


def rounding_floor(matrix: Float[Array, "n n"]) -> Float[Array, ""]:
    """The Cholesky's rounding level `n * eps * max(diag)`: a smaller damping
    changes nothing a factorization can resolve."""
    n = matrix.shape[0]
    return n * jnp.finfo(matrix.dtype).eps * jnp.max(jnp.diagonal(matrix))


def _solve_spd(
    matrix: Float[Array, "n n"],
    damping: Float[Array, ""],
    rhs: Float[Array, "n k"],
    pseudo_inverse_below_floor: bool = False,
) -> Float[Array, "n k"]:
    """`(matrix + damping I)^{-1} rhs` by Cholesky, or by an eigendecomposition
    with a truncated pseudo-inverse when the factorization fails.

    A damping below the Cholesky's rounding level `n * eps * max(diag)` is raised
    to it. With `pseudo_inverse_below_floor` (a matrix singular by construction),
    such a damping takes the eigendecomposition instead, whose eigenvalues below
    `n * eps * max|σ|` are dropped: the minimum-norm solution, without amplifying
    rounding in the null space.
    """
    n = matrix.shape[0]
    floor = rounding_floor(matrix)
    shifted = matrix + jnp.maximum(damping, floor) * jnp.eye(n, dtype=matrix.dtype)
    chol = jnp.linalg.cholesky(shifted)
    solved = jax.scipy.linalg.cho_solve((chol, True), rhs)

    def by_eigh(operands):
        matrix, rhs, _ = operands
        sigma, vecs = jnp.linalg.eigh(matrix + damping * jnp.eye(n, dtype=matrix.dtype))
        cutoff = n * jnp.finfo(sigma.dtype).eps * jnp.max(jnp.abs(sigma))
        inverse = jnp.where(sigma > cutoff, 1 / jnp.where(sigma > cutoff, sigma, 1), 0)
        return vecs @ (inverse[:, None] * (rhs.T @ vecs).T)

    ok = jnp.all(jnp.isfinite(solved))  # a failed Cholesky leaves NaN in `solved`
    if pseudo_inverse_below_floor:
        ok &= damping >= floor
    return jax.lax.cond(ok, lambda ops: ops[2], by_eigh, (matrix, rhs, solved))


def _num_rows(s: Any) -> int:
    """Rows of `A`: samples times outputs (one per sample for the empirical Fisher)."""
    per_sample = 1 if s.curvature == "empirical_fisher" else s.predictions[0].size
    return s.predictions.shape[0] * per_sample


def _compute_dtype(params: PyTree) -> Any:
    return jnp.result_type(jnp.float32, *jax.tree.leaves(params))


def _factor_chunks(s: Any, dtype: Any) -> Callable[[Any], _Factor]:
    def chunk_factor(chunk):
        inputs, pred, target, loss_grads = chunk
        return curvature_factor(
            s.model_fn,
            s.params,
            inputs,
            pred,
            target,
            loss_grads,
            s.loss_fn,
            s.curvature,
            s.factor,
            dtype,
            s.jac,
        )

    return chunk_factor


class Solved(NamedTuple):
    """A solve's result, the damping below which an exact solve's factorization
    resolves nothing (0 for CG and KFAC), and `C d` for the solution `d` when the
    solve computed it (the exact solvers), else `None`."""

    result: CGResult
    damping_floor: Array
    curvature_solution: PyTree | None


def _result(value: PyTree, residual: Array) -> CGResult:
    return CGResult(
        value=value,
        num_steps=jnp.asarray(0, jnp.int32),
        stop_reason=jnp.asarray(CGStop.CONVERGED, jnp.int32),
        residual_norm=jnp.asarray(residual, jnp.float32),
    )


def _relative_residual(matrix_times_d, d, damping, rhs) -> Array:
    residual = matrix_times_d + damping * d - rhs
    return jnp.linalg.norm(residual) / jnp.maximum(jnp.linalg.norm(rhs), 1e-300)


def solve_dense(s: Any, rhs: PyTree, damping: Array) -> Solved:
    """`(C + λ I) d = rhs` with `C` materialized in parameter space (P x P), for
    a `CurvatureOperator` `s` (its Hessian from `P` products)."""
    dtype = _compute_dtype(s.params)
    flat_rhs, unravel = ravel_pytree(rhs)
    out_dtype = flat_rhs.dtype
    flat_rhs = flat_rhs.astype(dtype)
    p = flat_rhs.size
    # With fewer rows in A than parameters, A^T A is singular by construction.
    singular = s.curvature != "hessian" and (
        s.axis_name is not None or _num_rows(s) < p
    )
    if s.curvature == "hessian":
        matrix = s.as_matrix().astype(dtype)
    else:
        data = (s.inputs, s.predictions, s.target, s.loss_grads)
        chunk_factor = _factor_chunks(s, dtype)
        if s.num_microbatches == 1:
            a = chunk_factor(data).a
            matrix = a.T @ a
        else:

            def accumulate(total, chunk):
                a = chunk_factor(chunk).a
                return total + a.T @ a, None

            zeros = vary_over_shards(jnp.zeros((p, p), dtype), s.axis_name)
            matrix, _ = jax.lax.scan(
                accumulate, zeros, to_microbatches(data, s.num_microbatches)
            )
        if s.axis_name is not None:
            matrix = jax.lax.psum(matrix, s.axis_name)
    lam = jnp.asarray(damping, dtype)
    d = _solve_spd(matrix, lam, flat_rhs[:, None], pseudo_inverse_below_floor=singular)
    d = d[:, 0]
    cd = matrix @ d
    residual = _relative_residual(cd, d, lam, flat_rhs)
    return Solved(
        _result(unravel(d.astype(out_dtype)), residual),
        rounding_floor(matrix),
        unravel(cd.astype(out_dtype)),
    )


def solve_sample_space(s: Any, rhs: PyTree, damping: Array) -> Solved:
    """`(C + λ I) d = rhs` through the (N O) x (N O) kernel `A A^T` (whose nonzero
    spectrum is `C`'s, so its rounding level is the floor).

    With `rhs = g + δ`, `g = A^T w` the objective's gradient: for `λ > 0`,
    `d = A^T (K + λ)^{-1} (w - A δ / λ) + δ / λ` (Woodbury for `δ`), and for
    `λ = 0` the minimum-norm `d = A^T K^+ (w + K^+ A δ)`.
    """
    if s.curvature == "hessian":
        raise ValueError(
            "solver='sample_space' has no form for curvature='hessian' (the "
            "Hessian is not a Gram matrix); use solver='dense' or solver='cg'."
        )
    if s.axis_name is not None:
        raise ValueError(
            "solver='sample_space' needs the whole kernel on every device and is "
            "not supported with axis_name; use solver='dense' (one psum of the "
            "P x P matrix per step) or solver='cg'."
        )
    dtype = _compute_dtype(s.params)
    flat_rhs, unravel = ravel_pytree(rhs)
    out_dtype = flat_rhs.dtype
    flat_rhs = flat_rhs.astype(dtype)
    data = (s.inputs, s.predictions, s.target, s.loss_grads)
    chunk_factor = _factor_chunks(s, dtype)
    if s.num_microbatches == 1:
        a, w = chunk_factor(data)
    else:
        a, w = jax.lax.map(chunk_factor, to_microbatches(data, s.num_microbatches))
        a, w = a.reshape(-1, a.shape[-1]), w.reshape(-1)
    kernel = a @ a.T
    lam = jnp.asarray(damping, dtype)
    delta = flat_rhs - ravel_pytree(s.grad)[0].astype(dtype)
    # With more rows than parameters, A A^T is singular by construction.
    singular = a.shape[0] > a.shape[1]
    solved = _solve_spd(kernel, lam, jnp.stack([w, a @ delta], axis=1), singular)
    y, z = solved[:, 0], solved[:, 1]
    positive = lam > 0
    safe = jnp.where(positive, lam, 1)

    def min_norm(_):
        return y + _solve_spd(kernel, lam, z[:, None], singular)[:, 0]

    coefficients = jax.lax.cond(positive, lambda _: y - z / safe, min_norm, None)
    d = coefficients @ a + jnp.where(positive, delta / safe, 0)
    cd = (a @ d) @ a
    residual = _relative_residual(cd, d, lam, flat_rhs)
    return Solved(
        _result(unravel(d.astype(out_dtype)), residual),
        rounding_floor(kernel),
        unravel(cd.astype(out_dtype)),
    )


def choose_solver(
    solver: str,
    curvature: str,
    num_samples: int,
    num_outputs: int,
    num_params: int,
    itemsize: int,
    num_microbatches: int,
    axis_name: Any,
    max_matrix_bytes: int | None,
) -> str:
    """Resolve `"auto"`: the cheaper exact solve whose matrices fit, else `"cg"`."""
    if solver != "auto":
        return solver
    limit = DEFAULT_MAX_MATRIX_BYTES if max_matrix_bytes is None else max_matrix_bytes
    rows = num_samples * (1 if curvature == "empirical_fisher" else num_outputs)
    p = num_params
    candidates = {
        "dense": (
            (p * p + rows // num_microbatches * p) * itemsize,
            rows * p * p + p**3 / 3,
        ),
    }
    if curvature != "hessian" and axis_name is None:
        candidates["sample_space"] = (
            (rows * rows + rows * p) * itemsize,
            rows * rows * p + rows**3 / 3,
        )
    fitting = {k: cost for k, (memory, cost) in candidates.items() if memory <= limit}
    return min(fitting, key=fitting.get) if fitting else "cg"


def resolve_solver(solver: str, op: Any, max_matrix_bytes: int | None = None) -> str:
    """Check `solver` against the operator and resolve `"auto"`."""
    if solver not in SOLVERS:
        raise ValueError(f"Unknown solver {solver!r}; valid ones are {list(SOLVERS)}.")
    if solver in ("cg", "kfac"):
        return solver
    if op.loss_fn is None:
        raise ValueError(
            f"solver={solver!r} needs the operator's loss_fn (an operator built "
            "from loss_hessian_mv alone supports solver='cg' only)."
        )
    if not op.vmap_over_data:
        raise ValueError(
            f"solver={solver!r} builds per-sample Jacobians and needs "
            "vmap_over_data=True; use solver='cg' for a model_fn that takes the "
            "whole batch."
        )
    if not hasattr(op.predictions, "shape"):
        raise ValueError(
            f"solver={solver!r} needs array predictions, got "
            f"{type(op.predictions).__name__}; use solver='cg'."
        )
    leaves = jax.tree.leaves(op.params)
    return choose_solver(
        solver,
        op.curvature,
        op.predictions.shape[0],
        int(op.predictions[0].size),
        sum(x.size for x in leaves),
        jnp.dtype(_compute_dtype(op.params)).itemsize,
        op.num_microbatches,
        op.axis_name,
        max_matrix_bytes,
    )


def solve_with(
    solver: str,
    op: Any,
    rhs: PyTree,
    damping: float | Array,
    cg_maxiter: int | Array = 100,
    cg_tol: float | Array = 1e-10,
    *,
    x0: PyTree | None = None,
    preconditioner: Callable | None = None,
    progress_tol: float | Array = 0.0,
    max_matrix_bytes: int | None = None,
) -> Solved:
    """`(C + damping I)^{-1} rhs` with the named solver, for a `CurvatureOperator`."""
    solver = resolve_solver(solver, op, max_matrix_bytes)
    if solver == "kfac":
        if preconditioner is None:
            raise ValueError(
                "solver='kfac' applies a KFAC inverse, which the operator does not "
                "hold: pass it as preconditioner= (see eqx_ggn.kfac_inverse), or use "
                "solver='kfac' in eqx_ggn.scale_by_gauss_newton."
            )
        zero = jnp.zeros([], jnp.float32)
        return Solved(_result(preconditioner(rhs), jnp.nan), zero, None)
    if solver == "cg":
        lam = jnp.asarray(damping, jnp.float32)

        def damped_mv(v):
            return jax.tree.map(lambda cv, x: cv + lam.astype(x.dtype) * x, op.mv(v), v)

        result = cg(
            damped_mv,
            rhs,
            x0,
            tol=cg_tol,
            maxiter=cg_maxiter,
            preconditioner=preconditioner,
            progress_tol=progress_tol,
        )
        return Solved(result, jnp.zeros([], jnp.float32), None)
    exact = solve_dense if solver == "dense" else solve_sample_space
    return exact(op, rhs, damping)
