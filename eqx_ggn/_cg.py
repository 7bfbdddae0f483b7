"""Preconditioned conjugate gradient on pytrees, for damped curvature systems."""

import enum
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PyTree

from ._checks import check_numbers
from ._tree import tree_dot


class CGStop(enum.IntEnum):
    """Why [`eqx_ggn.cg`][] stopped (`CGResult.stop_reason` holds the value).

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_ggn

        indefinite = jnp.diag(jnp.array([1.0, -1.0]))
        result = eqx_ggn.cg(lambda v: indefinite @ v, jnp.ones(2))
        reason = eqx_ggn.CGStop(int(result.stop_reason))
        assert reason is eqx_ggn.CGStop.NEGATIVE_CURVATURE
        ```
    """

    CONVERGED = 0
    """`||b - A x|| <= tol * ||b||` (also at once for `b = 0`, with `x = 0`)."""
    MAX_STEPS = 1
    """`maxiter` iterations ran."""
    NO_PROGRESS = 2
    """Martens' (2010) relative-progress test on the quadratic fired."""
    NEGATIVE_CURVATURE = 3
    """A search direction with `p^T A p <= 0`: the last good iterate is returned."""
    BREAKDOWN = 4
    """A non-finite value appeared: the last finite iterate is returned."""


class CGResult(eqx.Module):
    """The output of [`eqx_ggn.cg`][].

    **Attributes:**

    - `value`: the solution, a pytree like `b` with `b`'s dtypes.
    - `num_steps`: the number of iterations (matrix-vector products with `A`).
    - `stop_reason`: a [`eqx_ggn.CGStop`][] value, as an int32 array.
    - `residual_norm`: `||b - A x|| / ||b||` of the returned iterate as tracked by
        the recurrence (0 when `b = 0`).

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_ggn

        a = jnp.array([[4.0, 1.0], [1.0, 3.0]])
        result = eqx_ggn.cg(lambda v: a @ v, jnp.array([1.0, 2.0]), tol=1e-6)
        assert result.stop_reason == eqx_ggn.CGStop.CONVERGED
        assert jnp.allclose(a @ result.value, jnp.array([1.0, 2.0]), atol=1e-5)
        print(int(result.num_steps), float(result.residual_norm))
        ```
    """

    value: PyTree[Array]
    num_steps: Int[Array, ""]
    stop_reason: Int[Array, ""]
    residual_norm: Float[Array, ""]


def _compute_dtype(tree: PyTree) -> jnp.dtype:
    # Accumulate in at least float32 (bf16/fp16 inputs are promoted).
    return jnp.result_type(jnp.float32, *jax.tree.leaves(tree))


# The longest look-back of the progress test; its history lives in a ring buffer of
# this length (+1), so a traced `maxiter` needs no array of its size.
_PROGRESS_WINDOW = 1024


def _axpy(alpha: Array, x: PyTree, y: PyTree) -> PyTree:
    return jax.tree.map(lambda u, v: alpha.astype(u.dtype) * u + v, x, y)


def cg(
    mv: Callable[[PyTree], PyTree],
    b: PyTree[Array],
    x0: PyTree[Array] | None = None,
    *,
    tol: float | Float[Array, ""] = 1e-5,
    maxiter: int | Int[Array, ""] = 100,
    preconditioner: Callable[[PyTree], PyTree] | None = None,
    progress_tol: float | Float[Array, ""] = 5e-4,
) -> CGResult:
    r"""Solve `A x = b` by preconditioned conjugate gradient, for `A` symmetric.

    Runs in one `lax.while_loop` with a fixed-shape state, on pytrees of any
    structure and dtype; the recurrences accumulate in at least float32 (bfloat16 and
    float16 inputs are promoted, float64 stays float64), and the solution comes back
    in `b`'s dtypes. It stops at the first of:

    - **convergence**, `||r||_2 <= tol * ||b||_2` (the division is never taken, so a
      zero right-hand side, or zero entries in it, cannot give a NaN or a false
      'converged'; `b = 0` returns `x = 0` at once);
    - **`maxiter`** iterations;
    - **no progress** (Martens, 2010): with `phi(x) = x^T A x / 2 - b^T x` and
      `k = min(max(10, 0.1 i), 1024)`, stop at step `i > k` if `phi_i < 0` and
      `(phi_i - phi_{i-k}) / phi_i < k * progress_tol` (`progress_tol=0` disables);
    - **negative curvature**, `p^T A p <= 0`: the last good iterate is returned, as in
      truncated Newton; if this happens on the first step, the preconditioned
      steepest-descent direction `x0 + M r0` is returned instead;
    - **breakdown**, a non-finite value: the last finite iterate is returned.

    **Arguments:**

    - `mv`: `v -> A v` on pytrees like `b`.
    - `b`: the right-hand side.
    - `x0`: the starting point (zeros by default).
    - `tol`: the relative residual tolerance.
    - `maxiter`: the maximum number of iterations: a Python int, or an integer
        array (e.g. a scheduled hyperparameter) that may be traced.
    - `preconditioner`: `r -> M^{-1} r`, symmetric positive definite, or `None`.
    - `progress_tol`: the `epsilon` of Martens' relative-progress test.

    **Returns:**

    A [`eqx_ggn.CGResult`][] with the solution, the number of steps, the stop reason
    and the relative residual.

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_ggn

        a = jnp.array([[4.0, 1.0], [1.0, 3.0]])
        b = {"u": jnp.array([1.0, 2.0])}
        result = eqx_ggn.cg(lambda v: {"u": a @ v["u"]}, b, tol=1e-6, maxiter=10)
        assert result.stop_reason == eqx_ggn.CGStop.CONVERGED
        assert jnp.allclose(a @ result.value["u"], b["u"], atol=1e-5)
        ```
    """
    static_maxiter = isinstance(maxiter, int) and not isinstance(maxiter, bool)
    if static_maxiter and maxiter < 0:
        raise ValueError(f"maxiter must be non-negative, got {maxiter!r}.")
    check_numbers(
        tol=(tol, 0, float("inf")), progress_tol=(progress_tol, 0, float("inf"))
    )
    if not static_maxiter and not (
        jnp.ndim(maxiter) == 0 and jnp.issubdtype(jnp.result_type(maxiter), jnp.integer)
    ):
        raise ValueError(
            f"maxiter must be an int or an integer scalar array, got {maxiter!r}."
        )
    window = min(maxiter, _PROGRESS_WINDOW) if static_maxiter else _PROGRESS_WINDOW
    dtype = _compute_dtype(b)
    out_dtypes = jax.tree.map(lambda x: x.dtype, b)
    b = jax.tree.map(lambda x: x.astype(dtype), b)
    start_at_zero = x0 is None
    if start_at_zero:
        x0 = jax.tree.map(jnp.zeros_like, b)
    else:
        x0 = jax.tree.map(lambda x: jnp.asarray(x, dtype), x0)
    precond = (lambda r: r) if preconditioner is None else preconditioner

    def apply_a(v):
        return jax.tree.map(lambda y: jnp.asarray(y, dtype), mv(v))

    def apply_m(v):
        return jax.tree.map(lambda y: jnp.asarray(y, dtype), precond(v))

    tol = jnp.asarray(tol, dtype)
    progress_tol = jnp.asarray(progress_tol, dtype)
    b_norm = jnp.sqrt(tree_dot(b, b))
    threshold = tol * b_norm
    r0 = b if start_at_zero else jax.tree.map(jnp.subtract, b, apply_a(x0))
    z0 = apply_m(r0)
    rz0 = tree_dot(r0, z0)
    phis = jnp.zeros(window + 1, dtype)  # phi_i at index i mod (window + 1)
    phis = phis.at[0].set(-0.5 * tree_dot(x0, jax.tree.map(jnp.add, b, r0)))
    r0_norm = jnp.sqrt(tree_dot(r0, r0))
    zero_rhs = b_norm == 0
    first_stop = jnp.where(
        zero_rhs | (r0_norm <= threshold),
        CGStop.CONVERGED,
        jnp.where(maxiter == 0, CGStop.MAX_STEPS, -1),
    )
    x0 = jax.tree.map(lambda x: jnp.where(zero_rhs, 0, x).astype(dtype), x0)
    init = (
        x0,
        r0,
        z0,
        z0,
        rz0,
        r0_norm,
        jnp.asarray(0, jnp.int32),
        first_stop.astype(jnp.int32),
        phis,
    )

    def cond(state):
        return state[7] < 0

    def body(state):
        x, r, z, p, rz, _, i, _, phis = state
        ap = apply_a(p)
        pap = tree_dot(p, ap)
        curvature_ok = pap > 0
        alpha = jnp.where(curvature_ok, rz / jnp.where(curvature_ok, pap, 1), 0)
        x_new = _axpy(alpha, p, x)
        r_new = _axpy(-alpha, ap, r)
        z_new = apply_m(r_new)
        rz_new = tree_dot(r_new, z_new)
        beta = rz_new / jnp.where(rz == 0, 1, rz)
        p_new = _axpy(beta, p, z_new)
        r_norm = jnp.sqrt(tree_dot(r_new, r_new))
        i_new = i + 1
        phi = -0.5 * tree_dot(x_new, jax.tree.map(jnp.add, b, r_new))
        phis = phis.at[i_new % (window + 1)].set(phi)
        k = jnp.clip(jnp.ceil(0.1 * i_new).astype(i_new.dtype), 10, _PROGRESS_WINDOW)
        phi_k = phis[jnp.maximum(i_new - k, 0) % (window + 1)]
        stalled = (
            (progress_tol > 0)
            & (i_new > k)
            & (phi < 0)
            & ((phi - phi_k) / phi < k * progress_tol)
        )
        finite = jnp.isfinite(pap) & jnp.isfinite(r_norm) & jnp.isfinite(phi)
        stop = jnp.select(
            [
                ~jnp.isfinite(pap),
                ~curvature_ok,
                ~finite,
                r_norm <= threshold,
                stalled,
                i_new >= maxiter,
            ],
            [
                CGStop.BREAKDOWN,
                CGStop.NEGATIVE_CURVATURE,
                CGStop.BREAKDOWN,
                CGStop.CONVERGED,
                CGStop.NO_PROGRESS,
                CGStop.MAX_STEPS,
            ],
            -1,
        ).astype(jnp.int32)
        keep_old = ~curvature_ok | ~finite
        # Negative curvature on the very first step: the steepest-descent direction.
        descent = (i == 0) & jnp.isfinite(pap) & ~curvature_ok
        x_out = jax.tree.map(
            lambda old, new, fallback: jnp.where(
                keep_old, jnp.where(descent, old + fallback, old), new
            ),
            x,
            x_new,
            z,
        )
        r_out = jax.tree.map(lambda old, new: jnp.where(keep_old, old, new), r, r_new)
        r_norm_out = jnp.where(keep_old, jnp.sqrt(tree_dot(r, r)), r_norm)
        return (x_out, r_out, z_new, p_new, rz_new, r_norm_out, i_new, stop, phis)

    x, _, _, _, _, r_norm, steps, stop, _ = jax.lax.while_loop(cond, body, init)
    rel = jnp.where(zero_rhs, 0, r_norm / jnp.where(zero_rhs, 1, b_norm))
    value = jax.tree.map(lambda v, d: v.astype(d), x, out_dtypes)
    return CGResult(value=value, num_steps=steps, stop_reason=stop, residual_norm=rel)
