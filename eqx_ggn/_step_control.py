"""Step control for a solved direction: the Levenberg-Marquardt rule and a line
search.

Each rule is a plain function of arrays, so it can be read and tested alone; the
optimizer only wires them together.
"""

import enum
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PyTree

from ._tree import tree_dot


class StepRejection(enum.IntEnum):
    """Why a step was rejected, as recorded in the optimizer state's `rejection`.

    - `ACCEPTED` (0): the step was taken.
    - `LOSS_INCREASED` (1): the loss at the trial point rose above the loss at the
        linearization point.
    - `NON_FINITE` (2): the direction, the loss, the trial loss or the reduction
        ratio is NaN or Inf.
    - `NO_DESCENT` (3): the quadratic model predicts no decrease for the step (the
        direction is not one of descent, e.g. indefinite Hessian curvature), and
        the loss did not fall either.

    !!! example

        ```python
        import eqx_ggn

        assert eqx_ggn.StepRejection.ACCEPTED == 0
        assert eqx_ggn.StepRejection(1).name == "LOSS_INCREASED"
        ```
    """

    ACCEPTED = 0
    LOSS_INCREASED = 1
    NON_FINITE = 2
    NO_DESCENT = 3


DAMPING_RULES = ("nielsen", "threshold")


class LevenbergMarquardt(NamedTuple):
    """The outcome of `levenberg_marquardt`."""

    accepted: Bool[Array, ""]
    damping: Float[Array, ""]
    reduction_ratio: Float[Array, ""]
    growth: Float[Array, ""]
    rejection: Int[Array, ""]


def quadratic_model(
    grad: PyTree, direction: PyTree, curvature: Float[Array, ""]
) -> Float[Array, ""]:
    """`q(-d) = -g^T d + d^T C d / 2`: the predicted change of the loss for the step
    `-d`, from the gradient `g` and `curvature = d^T C d`."""
    return -tree_dot(grad, direction) + 0.5 * curvature


def rejection_reason(
    loss: Float[Array, ""], new_loss: Float[Array, ""], predicted: Float[Array, ""]
) -> Int[Array, ""]:
    """The [`StepRejection`][eqx_ggn.StepRejection] of a trial: a step is
    accepted when the trial loss is finite and did not rise."""
    non_finite = ~jnp.isfinite(new_loss) | ~jnp.isfinite(loss)
    non_finite |= ~jnp.isfinite(predicted)
    rose = new_loss > loss
    reason = jnp.where(
        rose,
        jnp.where(
            predicted >= 0, StepRejection.NO_DESCENT, StepRejection.LOSS_INCREASED
        ),
        StepRejection.ACCEPTED,
    )
    return jnp.where(non_finite, StepRejection.NON_FINITE, reason).astype(jnp.int32)


def levenberg_marquardt(
    damping: Float[Array, ""],
    loss: Float[Array, ""],
    new_loss: Float[Array, ""],
    predicted: Float[Array, ""],
    growth: Float[Array, ""] | float = 2.0,
    *,
    rule: str = "nielsen",
    line_searched: bool = False,
    lower_threshold: float | Float[Array, ""] = 0.25,
    upper_threshold: float | Float[Array, ""] = 0.75,
    damping_decrease: float | Float[Array, ""] = 2 / 3,
    damping_increase: float | Float[Array, ""] = 3 / 2,
    min_damping: float | Float[Array, ""] = 1e-8,
    max_damping: float | Float[Array, ""] = 1e8,
) -> LevenbergMarquardt:
    """Accept or reject a step by its reduction ratio, and adapt the damping.

    `rho = (new_loss - loss) / predicted`, with `predicted` the quadratic model's
    change. A step is accepted when the trial loss is finite and did not rise.

    - `rule="nielsen"` (Nielsen 1999; Madsen, Nielsen and Tingleff 2004): an
        accepted step multiplies the damping by `max(1/3, 1 - (2 rho - 1)^3)` and
        resets the growth factor `growth` to 2; a rejected one multiplies the
        damping by `growth` and doubles `growth`. A run of `k` rejections thus
        grows the damping by `2^(k (k + 1) / 2)`: 8x after two, 1024x after four.
    - `rule="threshold"`: accepted with `rho < lower_threshold` multiplies the
        damping by `damping_increase`, with `rho > upper_threshold` by
        `damping_decrease`; a rejection by `damping_increase` (`growth` unused).
    - `line_searched=True` (the step's length was chosen by a line search, which
        already guards it): under Nielsen's rule an accepted step shrinks the
        damping by the largest factor, 1/3, whatever `rho`; the damping then only
        regularizes the direction, and falls to `min_damping` (the rounding
        level, for exact solvers) while the line search keeps finding decreases.

    The result is clipped to `[min_damping, max_damping]`.

    **Arguments:**

    - `damping`: the damping the step was solved with.
    - `loss`, `new_loss`: the objective before and after the step.
    - `predicted`: the quadratic model's change, `q(-d)` (negative for a descent).
    - `growth`: Nielsen's factor for the next rejection (2 after an acceptance).
    - `rule`, `line_searched` and the rule's constants, as keywords.

    **Returns:**

    A `LevenbergMarquardt(accepted, damping, reduction_ratio, growth, rejection)`:
    float32 scalars, a bool and the int32
    [`StepRejection`][eqx_ggn.StepRejection].
    """
    # float32 throughout, whether the constants are Python numbers or (injected)
    # arrays of another dtype: both give the same damping to the last bit.
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    damping, growth = f32(damping), f32(growth)
    rho = ((new_loss - loss) / predicted).astype(jnp.float32)
    rejection = rejection_reason(loss, new_loss, predicted)
    rejection = jnp.where(
        (rejection == StepRejection.ACCEPTED) & ~jnp.isfinite(rho),
        StepRejection.NON_FINITE,
        rejection,
    ).astype(jnp.int32)
    accepted = rejection == StepRejection.ACCEPTED
    if rule == "nielsen":
        shrink = jnp.maximum(1 / 3, 1 - (2 * jnp.clip(rho, 0, 1) - 1) ** 3)
        if line_searched:
            shrink = jnp.asarray(1 / 3, jnp.float32)
        new = jnp.where(accepted, damping * shrink, damping * growth)
        growth = jnp.where(accepted, 2.0, 2 * growth)
    else:
        increase = f32(damping_increase)
        grown = jnp.where(rho < f32(lower_threshold), damping * increase, damping)
        adapted = jnp.where(
            rho > f32(upper_threshold), damping * f32(damping_decrease), grown
        )
        new = jnp.where(accepted, adapted, damping * increase)
    new = jnp.clip(new, f32(min_damping), f32(max_damping)).astype(jnp.float32)
    # Past max_damping a doubling growth factor means nothing: keep it finite.
    growth = jnp.minimum(growth, 2.0**64).astype(jnp.float32)
    return LevenbergMarquardt(accepted, new, rho, growth, rejection)


LINE_SEARCHES = ("auto", None, "grid")
EXACT_SOLVERS = ("dense", "sample_space")


def resolve_line_search(line_search: str | None, solver: str) -> str | None:
    """`"auto"`: the grid for the exact solvers, none for CG and KFAC."""
    if line_search != "auto":
        return line_search
    return "grid" if solver in EXACT_SOLVERS else None


# ENGD's grid (Müller & Zeinhofer 2023): step sizes 1, 1/2, 1/4, ..., 2^-15.
GRID_STEP_SIZES = tuple(0.5**k for k in range(16))


def grid_line_search(
    objective: Callable[[Float[Array, ""]], Float[Array, ""]],
    step_sizes: tuple[float, ...] = GRID_STEP_SIZES,
    scale: float | Float[Array, ""] = 1.0,
    total: Callable[[Float[Array, " k"]], Float[Array, " k"]] | None = None,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """The step size on a grid that minimizes `objective`, all evaluated at once.

    **Arguments:**

    - `objective`: `alpha -> L(θ - alpha d)`; it is `vmap`ped over the grid, so
        every trial point is one batched forward pass.
    - `step_sizes`: the grid, by default `2^-k` for `k = 0, ..., 15`.
    - `scale`: multiplies the grid (the optimizer shrinks it after a step that
        no grid point could make, so that the next trial differs).
    - `total`: applied to the vector of losses before the choice (the optimizer
        sums the shards' losses here, outside the `vmap`).

    **Returns:**

    `(step_size, loss)`: the best step size and its loss. Non-finite losses never
    win; if every one is non-finite, the loss is `inf`.
    """
    sizes = jnp.asarray(scale, jnp.float32) * jnp.asarray(step_sizes, jnp.float32)
    values = jax.vmap(objective)(sizes)
    if total is not None:
        values = total(values)
    values = jnp.where(jnp.isfinite(values), values, jnp.inf)
    best = jnp.argmin(values)
    return sizes[best], values[best]


def quadratic_model_coefficients(
    grad: PyTree,
    directions: list[PyTree],
    curvature_form: Float[Array, "k k"],
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
    - `curvature_form`: the matrix `d_i^T C d_j` (see
        `CurvatureOperator.quadratic_form`).
    - `damping`: `λ`.

    **Returns:**

    The coefficients, float32 or wider.
    """
    gram = jnp.stack(
        [jnp.stack([tree_dot(u, w) for w in directions]) for u in directions]
    )
    rhs = jnp.stack([tree_dot(grad, d) for d in directions])
    gram = curvature_form.astype(rhs.dtype) + damping * gram
    gram = (gram + gram.T) / 2
    return jnp.linalg.pinv(gram, hermitian=True) @ rhs
