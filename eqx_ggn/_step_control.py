"""Step control for a solved direction: the Levenberg-Marquardt rule and a line
search.

Each rule is a plain function of arrays, so it can be read and tested alone; the
optimizer only wires them together.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PyTree

from ._tree import tree_dot


class LevenbergMarquardt(NamedTuple):
    """The outcome of `levenberg_marquardt`."""

    accepted: Bool[Array, ""]
    damping: Float[Array, ""]
    reduction_ratio: Float[Array, ""]


def quadratic_model(
    grad: PyTree, direction: PyTree, curvature_direction: PyTree
) -> Float[Array, ""]:
    """`q(-d) = -g^T d + d^T C d / 2`: the predicted change of the loss for the step
    `-d`, from the gradient `g` and the product `C d`."""
    return -tree_dot(grad, direction) + 0.5 * tree_dot(direction, curvature_direction)


def levenberg_marquardt(
    damping: Float[Array, ""],
    loss: Float[Array, ""],
    new_loss: Float[Array, ""],
    predicted: Float[Array, ""],
    *,
    lower_threshold: float | Float[Array, ""] = 0.25,
    upper_threshold: float | Float[Array, ""] = 0.75,
    damping_decrease: float | Float[Array, ""] = 2 / 3,
    damping_increase: float | Float[Array, ""] = 3 / 2,
    min_damping: float | Float[Array, ""] = 1e-8,
    max_damping: float | Float[Array, ""] = 1e8,
) -> LevenbergMarquardt:
    """Accept or reject a step by its reduction ratio, and adapt the damping.

    `rho = (new_loss - loss) / predicted`, with `predicted` the quadratic model's
    change. A step is accepted when `rho` is finite and the loss did not rise.
    Accepted: `rho < lower_threshold` multiplies the damping by `damping_increase`,
    `rho > upper_threshold` by `damping_decrease`. Rejected: the damping grows by
    `damping_increase`. The result is clipped to `[min_damping, max_damping]`.

    **Arguments:**

    - `damping`: the damping the step was solved with.
    - `loss`, `new_loss`: the objective before and after the step.
    - `predicted`: the quadratic model's change, `q(-d)` (negative for a descent).
    - the rule's constants, as keywords.

    **Returns:**

    A `LevenbergMarquardt(accepted, damping, reduction_ratio)`, all float32 or bool.
    """
    # float32 throughout, whether the constants are Python numbers or (injected)
    # arrays of another dtype: both give the same damping to the last bit.
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    damping = f32(damping)
    lower_threshold, upper_threshold = f32(lower_threshold), f32(upper_threshold)
    damping_decrease, damping_increase = f32(damping_decrease), f32(damping_increase)
    min_damping, max_damping = f32(min_damping), f32(max_damping)
    rho = ((new_loss - loss) / predicted).astype(jnp.float32)
    accepted = jnp.isfinite(rho) & (new_loss <= loss)
    grown = jnp.where(rho < lower_threshold, damping * damping_increase, damping)
    adapted = jnp.where(rho > upper_threshold, damping * damping_decrease, grown)
    new = jnp.where(accepted, adapted, damping * damping_increase)
    new = jnp.clip(new, min_damping, max_damping).astype(jnp.float32)
    return LevenbergMarquardt(accepted, new, rho)


LINE_SEARCHES = (None, "grid")
# ENGD's grid (Müller & Zeinhofer 2023): step sizes 1, 1/2, 1/4, ..., 2^-15.
GRID_STEP_SIZES = tuple(0.5**k for k in range(16))


def grid_line_search(
    objective: Callable[[Float[Array, ""]], Float[Array, ""]],
    step_sizes: tuple[float, ...] = GRID_STEP_SIZES,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """The step size on a grid that minimizes `objective`, all evaluated at once.

    **Arguments:**

    - `objective`: `alpha -> L(θ - alpha d)`; it is `vmap`ped over the grid, so
        every trial point is one batched forward pass.
    - `step_sizes`: the grid, by default `2^-k` for `k = 0, ..., 15`.

    **Returns:**

    `(step_size, loss)`: the best step size and its loss. Non-finite losses never
    win; if every one is non-finite, the loss is `inf`.
    """
    sizes = jnp.asarray(step_sizes, jnp.float32)
    values = jax.vmap(objective)(sizes)
    values = jnp.where(jnp.isfinite(values), values, jnp.inf)
    best = jnp.argmin(values)
    return sizes[best], values[best]


def quadratic_model_coefficients(
    grad: PyTree,
    directions: list[PyTree],
    curvature_directions: list[PyTree],
    damping: Float[Array, ""],
) -> Float[Array, " k"]:
    """The coefficients `c` that minimize the damped quadratic model along a few
    directions (Martens and Grosse's step-size and momentum rescaling).

    The step is `-sum_i c_i d_i`, and `c` minimizes
    `q(-s) = -g^T s + s^T (C + λ I) s / 2`: `M c = b` with `M_ij = d_i^T (C + λ I) d_j`
    and `b_i = g^T d_i`, solved by a pseudo-inverse (a zero direction, such as
    the previous step at the first step, gets a zero coefficient).

    **Arguments:**

    - `grad`: the gradient `g`.
    - `directions`: one or two directions `d_i` (e.g. the KFAC step and the
        previous step).
    - `curvature_directions`: the products `C d_i`.
    - `damping`: `λ`.

    **Returns:**

    The coefficients, float32 or wider.
    """
    k = len(directions)
    gram = jnp.stack(
        [
            jnp.stack(
                [
                    tree_dot(directions[i], curvature_directions[j])
                    + damping * tree_dot(directions[i], directions[j])
                    for j in range(k)
                ]
            )
            for i in range(k)
        ]
    )
    rhs = jnp.stack([tree_dot(grad, d) for d in directions])
    gram = (gram + gram.T) / 2
    return jnp.linalg.pinv(gram, hermitian=True) @ rhs
