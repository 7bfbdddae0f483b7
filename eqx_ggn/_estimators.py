"""Matrix-free estimators of a curvature matrix: Lanczos, Hutchinson, SLQ, diagonals."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from ._checks import check_data, check_params, check_positive, check_sizes
from ._losses import LossFn, check_target, resolve_loss
from ._operator import forward


def _flat_mv(mv: Callable, params: PyTree) -> tuple[Callable, Callable, int, Any]:
    """`mv` on flat vectors in at least float32, plus `unravel`, `P` and the dtype."""
    flat, unravel = ravel_pytree(params)
    dtype = jnp.result_type(jnp.float32, flat.dtype)

    def flat_mv(v):
        return ravel_pytree(mv(unravel(v.astype(flat.dtype))))[0].astype(dtype)

    return flat_mv, unravel, flat.size, dtype


def _lanczos(flat_mv: Callable, v0: Array, num_iters: int) -> tuple[Array, Array]:
    """`num_iters` Lanczos steps from `v0` with full reorthogonalisation.

    Returns the tridiagonal matrix `T` (m x m) and the basis `Q` (m x P). After the
    three-term recurrence, each new vector is orthogonalised against the whole basis
    by classical Gram-Schmidt, and a second time only when that pass removed most of
    it (the Daniel-Gragg-Kaufman-Stewart test). Rows of the basis not yet filled are
    zero, so a pass costs two matrix-vector products with the basis and no copies.
    """
    m = num_iters
    v0 = v0 / jnp.linalg.norm(v0)
    basis = jnp.zeros((m + 1, v0.shape[0]), v0.dtype).at[0].set(v0)

    def body(i, carry):
        basis, alphas, betas = carry

        def orthogonalise(w):
            return w - basis.T @ (basis @ w)

        q = basis[i]
        previous = jnp.where(i > 0, betas[jnp.maximum(i - 1, 0)], 0)
        w = flat_mv(q)
        alpha = jnp.vdot(q, w)
        w = w - alpha * q - previous * basis[jnp.maximum(i - 1, 0)]
        once = orthogonalise(w)
        norm_once = jnp.linalg.norm(once)
        w = jax.lax.cond(
            norm_once < 0.7071 * jnp.linalg.norm(w), orthogonalise, lambda x: x, once
        )
        beta = jnp.linalg.norm(w)
        safe = beta > jnp.finfo(w.dtype).eps * jnp.maximum(1.0, jnp.abs(alpha))
        nxt = jnp.where(safe, w / jnp.where(safe, beta, 1), 0)
        basis = basis.at[i + 1].set(nxt)
        return basis, alphas.at[i].set(alpha), betas.at[i].set(jnp.where(safe, beta, 0))

    alphas = jnp.zeros(m, v0.dtype)
    betas = jnp.zeros(m, v0.dtype)
    basis, alphas, betas = jax.lax.fori_loop(0, m, body, (basis, alphas, betas))
    tri = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
    return tri, basis[:m]


def _check_batch_size(batch_size: int | None) -> None:
    if batch_size is not None:  # None: every probe at once
        check_sizes(batch_size=batch_size)


def top_eigenvalues(
    mv: Callable[[PyTree], PyTree],
    params: PyTree,
    k: int,
    *,
    key: PRNGKeyArray,
    num_iters: int = 50,
) -> tuple[Float[Array, " k"], PyTree]:
    r"""The `k` largest eigenvalues of a symmetric matrix, and their eigenvectors.

    Lanczos with full reorthogonalisation, `num_iters` products with `mv`, in at
    least float32 (float64 when x64 is on and `params` are float64). With
    `num_iters >= P` the result is exact up to rounding; the top of the spectrum
    typically converges in far fewer steps.

    **Arguments:**

    - `mv`: `v -> C v` on pytrees like `params`, e.g. a
        [`eqx_ggn.CurvatureOperator`][] or the output of [`eqx_ggn.create_ggn_mv`][].
    - `params`: a pytree giving the structure, shapes and dtypes of vectors.
    - `k`: how many eigenvalues (at most `num_iters`).
    - `key`: a PRNG key for the starting vector.
    - `num_iters`: Lanczos steps, capped at the number of parameters.

    **Returns:**

    `(eigenvalues, eigenvectors)`: the eigenvalues in descending order, shape
    `(k,)`, and the unit eigenvectors as a pytree like `params` with a leading axis
    of size `k`.

    !!! example

        ```python
        import jax, jax.numpy as jnp
        import eqx_ggn

        a = jnp.diag(jnp.arange(1.0, 11.0))
        vals, vecs = eqx_ggn.top_eigenvalues(
            lambda v: a @ v, jnp.zeros(10), 2, key=jax.random.key(0), num_iters=10
        )
        assert jnp.allclose(vals, jnp.array([10.0, 9.0]), rtol=1e-4)
        ```
    """
    flat_mv, unravel, size, dtype = _flat_mv(mv, params)
    check_sizes(num_iters=num_iters)
    m = min(num_iters, size)
    if not isinstance(k, int) or not 1 <= k <= m:
        raise ValueError(f"k must be an int in [1, {m}], got {k!r}.")
    v0 = _rademacher(key, 1, size, dtype)[0]
    tri, basis = _lanczos(flat_mv, v0, m)
    evals, evecs = jnp.linalg.eigh(tri)
    order = jnp.argsort(evals)[::-1][:k]
    ritz = (basis.T @ evecs[:, order]).T  # (k, P)
    ritz = ritz / jnp.linalg.norm(ritz, axis=1, keepdims=True)
    vectors = jax.vmap(unravel)(ritz.astype(ravel_pytree(params)[0].dtype))
    return evals[order], vectors


def _rademacher(key: PRNGKeyArray, num: int, size: int, dtype: Any) -> Array:
    """`num` Rademacher vectors of length `size`, 32 signs per random 32-bit word."""
    words = jax.random.bits(key, (num, -(-size // 32)), jnp.uint32)
    bits = (words[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    return (2 * bits.reshape(num, -1)[:, :size].astype(dtype) - 1).astype(dtype)


def hutchinson_trace(
    mv: Callable[[PyTree], PyTree],
    params: PyTree,
    *,
    key: PRNGKeyArray,
    num_samples: int = 100,
    batch_size: int | None = None,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    r"""Hutchinson's stochastic trace estimate with Rademacher probes.

    `trace(C) ≈ mean_s z_s^T C z_s` over `num_samples` probes `z_s ∈ {±1}^P`.

    **Arguments:**

    - `mv`: `v -> C v` on pytrees like `params`.
    - `params`: the structure of vectors.
    - `key`: a PRNG key.
    - `num_samples`: the number of probes (that many products with `mv`).
    - `batch_size`: how many probes go through `mv` at once under `vmap`
        (default: all; lower it to save memory).

    **Returns:**

    `(estimate, standard_error)`, the standard error being the sample standard
    deviation of `z^T C z` over `sqrt(num_samples)`.

    !!! example

        ```python
        import jax, jax.numpy as jnp
        import eqx_ggn

        a = jnp.diag(jnp.arange(1.0, 5.0))
        est, err = eqx_ggn.hutchinson_trace(
            lambda v: a @ v, jnp.zeros(4), key=jax.random.key(0), num_samples=50
        )
        assert jnp.allclose(est, 10.0)  # exact for a diagonal matrix
        ```
    """
    flat_mv, _, size, dtype = _flat_mv(mv, params)
    check_sizes(num_samples=num_samples)
    _check_batch_size(batch_size)
    probes = _rademacher(key, num_samples, size, dtype)
    quad = jax.lax.map(lambda z: jnp.vdot(z, flat_mv(z)), probes, batch_size=batch_size)
    stderr = jnp.std(quad, ddof=1) / jnp.sqrt(num_samples) if num_samples > 1 else 0.0
    return jnp.mean(quad), jnp.asarray(stderr, dtype)


def hutchinson_diagonal(
    mv: Callable[[PyTree], PyTree],
    params: PyTree,
    *,
    key: PRNGKeyArray,
    num_samples: int = 100,
    batch_size: int | None = None,
) -> PyTree:
    r"""A stochastic estimate of `diag(C)`: `mean_s z_s ⊙ C z_s`, Rademacher `z_s`.

    **Arguments:** as [`eqx_ggn.hutchinson_trace`][].

    **Returns:**

    A pytree like `params`.

    !!! example

        ```python
        import jax, jax.numpy as jnp
        import eqx_ggn

        a = jnp.diag(jnp.arange(1.0, 5.0))
        d = eqx_ggn.hutchinson_diagonal(
            lambda v: a @ v, jnp.zeros(4), key=jax.random.key(0), num_samples=10
        )
        assert jnp.allclose(d, jnp.arange(1.0, 5.0))  # exact for a diagonal matrix
        ```
    """
    flat_mv, unravel, size, dtype = _flat_mv(mv, params)
    check_sizes(num_samples=num_samples)
    _check_batch_size(batch_size)
    probes = _rademacher(key, num_samples, size, dtype)
    prods = jax.lax.map(lambda z: z * flat_mv(z), probes, batch_size=batch_size)
    return unravel(jnp.mean(prods, axis=0).astype(ravel_pytree(params)[0].dtype))


def exact_diagonal(
    model_fn: Callable,
    params: PyTree,
    data: dict[str, Any],
    loss_fn: LossFn,
    *,
    factor: float | Float[Array, ""] | None = None,
) -> PyTree:
    r"""The exact diagonal of the GGN, from per-sample Jacobians.

    `diag(G)_p = factor * sum_i sum_{a,b} J_i[a,p] H_i[a,b] J_i[b,p]`, with `J_i`
    the Jacobian of sample `i`'s prediction (computed by reverse mode, one pass per
    output entry) and `H_i` the loss Hessian in output space.

    **Cost:** `B * O` reverse passes (`B` samples, `O` outputs per sample) and
    `B * O * P` memory for the Jacobians, against `P` products for a diagonal read
    off the matrix: use it when `B * O` is much smaller than `P`.

    **Arguments:**

    - `model_fn`, `params`, `data`, `loss_fn`: as in [`eqx_ggn.curvature_operator`][]
        (`model_fn` is applied per sample).
    - `factor`: the objective's factor; defaults to `1/batch_size` (the batch mean),
        the package's convention.

    **Returns:**

    A pytree like `params`.

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_ggn

        def model_fn(input, params):
            return params["w"] @ input

        data = {"input": jnp.eye(3), "target": jnp.zeros((3, 2))}
        diag = eqx_ggn.exact_diagonal(model_fn, {"w": jnp.ones((2, 3))}, data, "mse")
        assert jnp.allclose(diag["w"], 2.0 / 3)
        ```
    """
    batch_size = check_data(data)
    check_params(params)
    _, hessian_mv = resolve_loss(loss_fn)
    check_positive(factor=factor)
    factor = 1.0 / batch_size if factor is None else factor
    x, y = data["input"], data["target"]
    pred = forward(model_fn, params, x, True)
    check_target(loss_fn, pred, y)

    def per_sample(xi, pi, yi):
        jac = jax.jacrev(lambda p: model_fn(input=xi, params=p))(params)
        out_ndim = jnp.ndim(pi)

        def column_diag(j):
            # j: (*out, *leaf). Apply H along the output axes, column by column.
            cols = j.reshape((*pi.shape, -1))
            hj = jax.vmap(
                lambda c: hessian_mv(c, pred=pi, target=yi), in_axes=-1, out_axes=-1
            )(cols)
            return jnp.sum(cols * hj, axis=tuple(range(out_ndim))).reshape(
                j.shape[out_ndim:]
            )

        return jax.tree.map(column_diag, jac)

    per = jax.vmap(per_sample)(x, pred, y)
    return jax.tree.map(lambda d: (factor * jnp.sum(d, axis=0)).astype(d.dtype), per)


def spectral_density(
    mv: Callable[[PyTree], PyTree],
    params: PyTree,
    *,
    key: PRNGKeyArray,
    num_iters: int = 30,
    num_samples: int = 10,
    num_points: int = 512,
    sigma: float | None = None,
) -> tuple[Float[Array, " n"], Float[Array, " n"]]:
    r"""Stochastic Lanczos quadrature estimate of the spectral density.

    For each of `num_samples` normalised Rademacher probes, `num_iters` Lanczos steps
    give nodes `θ_j` (eigenvalues of the tridiagonal `T`) and weights `τ_j` (squared
    first components of its eigenvectors); the density is the average of
    `sum_j τ_j N(x; θ_j, sigma²)`. It integrates to 1, and its mean is the average of
    `z^T C z / P`, an unbiased estimate of `trace(C) / P`.

    **Arguments:**

    - `mv`, `params`, `key`: as in [`eqx_ggn.top_eigenvalues`][].
    - `num_iters`: Lanczos steps per probe.
    - `num_samples`: probes.
    - `num_points`: grid size.
    - `sigma`: the Gaussian kernel width; defaults to 1% of the node range.

    **Returns:**

    `(grid, density)`, both of shape `(num_points,)`; the grid extends 5 `sigma`
    beyond the extreme nodes.

    !!! example

        ```python
        import jax, jax.numpy as jnp
        import eqx_ggn

        a = jnp.diag(jnp.linspace(0.0, 1.0, 20))
        grid, density = eqx_ggn.spectral_density(
            lambda v: a @ v, jnp.zeros(20), key=jax.random.key(0)
        )
        assert jnp.allclose(jnp.trapezoid(density, grid), 1.0, atol=1e-3)
        ```
    """
    flat_mv, _, size, dtype = _flat_mv(mv, params)
    check_sizes(num_iters=num_iters, num_samples=num_samples, num_points=num_points)
    m = min(num_iters, size)
    check_positive(sigma=sigma)  # None: 1% of the nodes' range
    probes = _rademacher(key, num_samples, size, dtype)

    def quadrature(z):
        tri, _ = _lanczos(flat_mv, z, m)
        nodes, vecs = jnp.linalg.eigh(tri)
        return nodes, vecs[0] ** 2

    nodes, weights = jax.lax.map(quadrature, probes)
    lo, hi = jnp.min(nodes), jnp.max(nodes)
    width = jnp.maximum(hi - lo, jnp.finfo(dtype).eps * jnp.maximum(1.0, jnp.abs(hi)))
    sigma = jnp.asarray(0.01 * width if sigma is None else sigma, dtype)
    grid = jnp.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points)
    kernel = jnp.exp(-0.5 * ((grid[:, None] - nodes.ravel()[None]) / sigma) ** 2)
    kernel = kernel / (sigma * jnp.sqrt(2 * jnp.pi))
    density = kernel @ weights.ravel() / num_samples
    return grid, density
