"""The Optax optimizer: damped Gauss-Newton / Hessian-free / natural-gradient steps."""

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int, PyTree

from ._batching import sum_over_shards
from ._cg import CGResult
from ._checks import (
    check_like,
    check_numbers,
    check_ordered,
    check_periods,
    check_positive,
    check_sizes,
    is_number,
)
from ._diagnostics import is_definite, step_diagnostics, warn_if
from ._jacobian import check_jac
from ._kfac import (
    MAX_DIM,
    KFACState,
    apply_kfac_inverse,
    check_weight_sharing,
    mean_eigenvalue,
    step_statistics,
    update_kfac_state,
    zero_state,
)
from ._losses import LossFn, resolve_loss
from ._operator import (
    CURVATURES,
    AxisName,
    Curvature,
    CurvatureOperator,
    curvature_operator,
    objective_value,
)
from ._partition import module_fn
from ._rescale import rescale_kfac_step
from ._solvers import SOLVER_CODES, SOLVERS, resolve_solver, solve_with
from ._step_control import (
    DAMPING_RULES,
    EXACT_SOLVERS,
    GRID_STEP_SIZES,
    LINE_SEARCHES,
    StepRejection,
    grid_line_search,
    levenberg_marquardt,
    quadratic_model,
    rejection_reason,
    resolve_line_search,
)
from ._tree import tree_all_finite, tree_dot, tree_where


class ScaleByGaussNewtonState(NamedTuple):
    """State of [`eqx_ggn.scale_by_gauss_newton`][]; every field is kept each step.

    - `count`: the number of `update` calls.
    - `damping`: the Tikhonov damping used in the last step (float32). With
      `adaptive_damping=True` (the default) it is the value the next step starts
      from.
    - `loss`: the objective at the last linearization point (float32).
    - `cg_iterations`, `cg_residual`, `cg_stop_reason`: CG's step count, relative
      residual and [`eqx_ggn.CGStop`][] in the last step. After an exact solve:
      0 iterations, the solve's relative residual, and `CONVERGED`. After a
      rescaled KFAC step: 0, NaN (`C` times the step is never formed) and
      `CONVERGED`.
    - `reduction_ratio`: `(L(θ - d) - L(θ)) / q(-d)` with adaptive damping, else NaN.
    - `accepted`: whether the last step was taken (rejected steps return zeros).
    - `solver`: which solver ran: 0 `"cg"`, 1 `"dense"`, 2 `"sample_space"` (what
      `"auto"` chose), 3 `"kfac"`; -1 before the first step.
    - `step_size`: the step size the line search chose (1 without one).
    - `rejection`: why the last step was rejected, a [`eqx_ggn.StepRejection`][]
      (0 when it was accepted).
    - `damping_growth`: the factor the damping grows by at the next rejection
      (Nielsen's rule: 2 after an accepted step, doubled by each rejection).
    - `accepted_damping`: the damping of the last accepted step (the initial
      damping before one): the warning compares the damping with it.
    - `grid_scale`: the line search's grid is `grid_scale * 2^-k`; with a fixed
      damping, a step rejected at every grid size shrinks it by `2^-16`, so that
      the next trial differs; an accepted step resets it.
    - `preconditioned`: whether the next CG solve uses the KFAC preconditioner
      (with `preconditioner="kfac"` it is used only while it needs fewer
      iterations than none; see `preconditioner`).
    - `reference_iterations`: plain CG's iterations at the last comparison with
      the KFAC preconditioner (the largest int32 before one; -1 when the next
      step compares again).
    - `comparisons_lost`: how many comparisons in a row KFAC lost (at most 3);
      after `k` of them only every `2^k`-th inverse refresh compares again, so a
      preconditioner that does not pay costs ever less.
    - `rejected_steps`: how many steps in a row were rejected (0 after an accepted
      one). A rejected step whose loss rose by no more than rounding (16 machine
      epsilons of `loss_scale`), as happens once the loss reaches its floating-point
      floor, does not count.
    - `loss_scale`: the largest objective value seen (float32).
    - `warned`: whether a [`eqx_ggn.GaussNewtonWarning`][] was emitted during the
      current run of rejected steps.
    - `solution`: the last accepted CG solution (with `warm_start`), else `None`.
    - `diagonal`: the running average of the curvature diagonal (with
      `preconditioner="jacobi"`), else `None`.
    - `momentum`: the momentum buffer (with a non-zero `momentum`), or the previous
      step (with `adaptive_momentum`), else `None`.
    - `kfac`: a [`eqx_ggn.KFACState`][] (with `solver="kfac"` or
      `preconditioner="kfac"`): the running KFAC factors and their
      eigendecompositions; else `None`.

    !!! example

        ```python
        import jax.numpy as jnp
        import optax
        import eqx_ggn

        opt = eqx_ggn.gauss_newton(1.0, loss_fn="mse", warm_start=True)
        state = opt.init({"w": jnp.zeros(3)})
        assert optax.tree.get(state, "damping").dtype == jnp.float32
        assert optax.tree.get(state, "solution")["w"].shape == (3,)
        assert optax.tree.get(state, "momentum") is None  # momentum is off
        ```
    """

    count: Int[Array, ""]
    damping: Float[Array, ""]
    loss: Float[Array, ""]
    cg_iterations: Int[Array, ""]
    cg_residual: Float[Array, ""]
    cg_stop_reason: Int[Array, ""]
    reduction_ratio: Float[Array, ""]
    accepted: Bool[Array, ""]
    solver: Int[Array, ""]
    step_size: Float[Array, ""]
    rejected_steps: Int[Array, ""]
    loss_scale: Float[Array, ""]
    warned: Bool[Array, ""]
    rejection: Int[Array, ""]
    damping_growth: Float[Array, ""]
    accepted_damping: Float[Array, ""]
    grid_scale: Float[Array, ""]
    preconditioned: Bool[Array, ""]
    reference_iterations: Int[Array, ""]
    comparisons_lost: Int[Array, ""]
    solution: PyTree | None
    diagonal: PyTree | None
    momentum: PyTree | None
    kfac: KFACState | None = None


class _Config(eqx.Module, strict=True):
    """Validated static configuration of the optimizer."""

    loss_fn: LossFn
    curvature: str
    solver: str
    line_search: str | None
    damping_rule: str
    relative_damping: bool
    adaptive_damping: bool
    warm_start: bool
    preconditioner: str | None
    weight_sharing: str
    kfac_max_dim: int
    kfac_rescale: bool
    heavy_ball: bool
    adaptive_momentum: bool
    vmap_over_data: bool
    num_microbatches: int
    relinearize: bool
    jac: str | None
    throw: bool
    warn: bool
    axis_name: AxisName | None

    def __check_init__(self):
        resolve_loss(self.loss_fn)  # raises for an unknown name
        check_jac(self.jac)
        if self.curvature not in CURVATURES:
            raise ValueError(
                f"Unknown curvature {self.curvature!r}; valid ones are "
                f"{list(CURVATURES)}."
            )
        if self.solver not in SOLVERS:
            raise ValueError(
                f"Unknown solver {self.solver!r}; valid ones are {list(SOLVERS)}."
            )
        if self.solver == "sample_space" and self.curvature == "hessian":
            raise ValueError(
                "solver='sample_space' has no form for curvature='hessian' (the "
                "Hessian is not a Gram matrix); use solver='dense' or solver='cg'."
            )
        if self.damping_rule not in DAMPING_RULES:
            raise ValueError(
                f"Unknown damping_rule {self.damping_rule!r}; valid ones are "
                f"{list(DAMPING_RULES)}."
            )
        if self.line_search not in LINE_SEARCHES:
            raise ValueError(
                f"Unknown line_search {self.line_search!r}; valid ones are "
                f"{list(LINE_SEARCHES)}."
            )
        if self.preconditioner not in (None, "jacobi", "kfac"):
            raise ValueError(
                f"Unknown preconditioner {self.preconditioner!r}; valid ones are "
                "[None, 'jacobi', 'kfac']."
            )
        check_weight_sharing(self.weight_sharing)
        if self.uses_kfac and (self.curvature == "hessian" or not self.vmap_over_data):
            raise ValueError(
                "KFAC (solver='kfac' or preconditioner='kfac') approximates the GGN "
                "or a Fisher of a model applied per sample; it needs curvature "
                f"'ggn', 'fisher' or 'empirical_fisher' (got {self.curvature!r}) "
                f"and vmap_over_data=True (got {self.vmap_over_data})."
            )
        if self.heavy_ball and self.adaptive_momentum:
            raise ValueError(
                "Set momentum or adaptive_momentum, not both: adaptive_momentum "
                "chooses the momentum coefficient itself."
            )
        if self.solver == "kfac" and self.preconditioner == "jacobi":
            raise ValueError(
                "solver='kfac' applies the KFAC inverse itself; use "
                "preconditioner=None (or 'kfac') with it, not 'jacobi'."
            )
        if self.adaptive_momentum and (self.solver != "kfac" or not self.kfac_rescale):
            raise ValueError(
                "adaptive_momentum rescales the KFAC step and needs solver='kfac' "
                f"and kfac_rescale=True, got solver={self.solver!r}, "
                f"kfac_rescale={self.kfac_rescale}."
            )
        max_dim = self.kfac_max_dim
        if not isinstance(max_dim, int) or isinstance(max_dim, bool) or max_dim < 1:
            raise ValueError(
                "kfac_max_dim sets array shapes and must be a positive Python int, "
                f"got {max_dim!r}; with optax.inject_hyperparams list "
                "'kfac_max_dim' in static_args."
            )
        value = self.num_microbatches
        if isinstance(value, jax.Array | np.ndarray):
            raise ValueError(
                "num_microbatches sets array shapes and must be a Python int, got "
                "an array; with optax.inject_hyperparams list 'num_microbatches' in "
                "static_args."
            )
        check_sizes(num_microbatches=value)

    @property
    def uses_kfac(self) -> bool:
        return self.solver == "kfac" or self.preconditioner == "kfac"


def _check_kl_clip(kl_clip: Any) -> None:
    if is_number(kl_clip) and not kl_clip > 0:
        raise ValueError(
            f"kl_clip must be positive, got {kl_clip} (0 would scale every step "
            "to zero); kl_clip=None turns the clipping off."
        )


def _check_rescale_tol(tol: Any, solver: str, kfac_rescale: bool) -> None:
    if is_number(tol) and tol > 0 and not (solver == "kfac" and kfac_rescale):
        raise ValueError(
            "kfac_rescale_tol sets where KFAC's rescaling takes its curvature and "
            f"needs solver='kfac' and kfac_rescale=True, got solver={solver!r}, "
            f"kfac_rescale={kfac_rescale}."
        )


def _check_maxiter(cg_maxiter: Any) -> None:
    if is_number(cg_maxiter):
        if not isinstance(cg_maxiter, int) or cg_maxiter < 1:
            raise ValueError(f"cg_maxiter must be a positive int, got {cg_maxiter!r}.")
    elif not (
        jnp.ndim(cg_maxiter) == 0
        and jnp.issubdtype(jnp.result_type(cg_maxiter), jnp.integer)
    ):
        raise ValueError(
            f"cg_maxiter must be a positive int or an integer scalar array, got "
            f"{cg_maxiter!r}."
        )


# In the order they are named: a damping that is NaN or Inf comes first, since
# the state reset to `init` then holds it too.
_NON_FINITE = (
    "the damping is NaN or Inf",
    "the optimizer state (damping, warm start, diagonal or momentum) holds NaN or "
    "Inf, e.g. from a corrupted checkpoint; it was reset",
    "the batch holds NaN or Inf",
    "the model's predictions hold NaN or Inf (the batch is finite)",
    "the loss is NaN or Inf (the batch and the predictions are finite)",
    "the incoming updates (the gradient) hold NaN or Inf",
    "CG returned a non-finite direction (check the damping and the curvature)",
)


def _raise_if_not_finite(
    result: PyTree,
    direction: PyTree,
    state_finite: Bool[Array, ""],
    damping: Float[Array, ""],
    batch: dict[str, Any],
    op: CurvatureOperator,
    updates: PyTree,
) -> PyTree:
    """`result` through an `eqx.branched_error_if` naming the first non-finite
    quantity of a step.

    The check rides on what the step returns, not on the direction: a direction
    known at compile time to be rejected (a damping that is a NaN constant) is
    dead code, and its check with it.
    With a mapped batch axis, a cause found on any shard counts on every shard.
    """
    floating = [x for x in jax.tree.leaves(batch) if eqx.is_inexact_array(x)]
    bad = jnp.stack(
        [
            ~jnp.isfinite(damping),
            ~state_finite,
            ~tree_all_finite(floating),
            ~tree_all_finite(op.predictions),
            ~jnp.isfinite(op.loss),
            ~tree_all_finite(updates),
            ~tree_all_finite(direction),
        ]
    )
    if op.axis_name is not None:
        bad = jax.lax.pmax(bad.astype(jnp.int32), op.axis_name).astype(bool)
    message = ["eqx_ggn.scale_by_gauss_newton (throw=True): " + m for m in _NON_FINITE]
    return eqx.branched_error_if(result, jnp.any(bad), jnp.argmax(bad), message)


def _reset_non_finite(
    state: ScaleByGaussNewtonState, fresh: ScaleByGaussNewtonState
) -> tuple[ScaleByGaussNewtonState, Bool[Array, ""]]:
    """Replace each non-finite buffer of `state` by its value in `fresh`."""
    names = (
        "damping",
        "damping_growth",
        "accepted_damping",
        "grid_scale",
        "solution",
        "diagonal",
        "momentum",
        "kfac",
    )
    finite = {name: tree_all_finite(getattr(state, name)) for name in names}
    state = state._replace(
        **{
            name: tree_where(finite[name], getattr(state, name), getattr(fresh, name))
            for name in names
        }
    )
    return state, jnp.all(jnp.stack(list(finite.values())))


def _jacobi_preconditioner(
    op: CurvatureOperator,
    diagonal: PyTree,
    count: Int[Array, ""],
    decay: float | Float[Array, ""],
    damping: Float[Array, ""],
) -> tuple[PyTree, Callable]:
    """Update the running Hutchinson estimate of the diagonal; return it and
    `r -> r / (max(diag, 0) + damping)`."""
    key = jax.random.fold_in(jax.random.key(0), count)
    leaves, treedef = jax.tree.flatten(diagonal)
    keys = jax.random.split(key, len(leaves))
    probe = jax.tree.unflatten(
        treedef,
        [
            jax.random.rademacher(k, x.shape, x.dtype)
            for k, x in zip(keys, leaves, strict=True)
        ],
    )
    estimate = jax.tree.map(jnp.multiply, probe, op.mv(probe))
    decay = jnp.asarray(decay, jnp.float32)  # one dtype, number or array
    diagonal = jax.tree.map(
        lambda old, new: (decay * old + (1 - decay) * new).astype(old.dtype),
        diagonal,
        estimate,
    )
    debias = 1 - decay ** (count + 1)

    def precondition(r):
        return jax.tree.map(
            lambda x, dg: x / (jnp.maximum(dg / debias, 0) + damping).astype(x.dtype),
            r,
            diagonal,
        )

    return diagonal, precondition


def _initial_state(
    config: _Config, params: PyTree, damping: Any
) -> ScaleByGaussNewtonState:
    """The state before the first step; a buffer only for each feature that is on."""

    def zeros():
        return jax.tree.map(jnp.zeros_like, params)

    return ScaleByGaussNewtonState(
        count=jnp.zeros([], jnp.int32),
        damping=jnp.asarray(damping, jnp.float32),
        loss=jnp.asarray(jnp.nan, jnp.float32),
        cg_iterations=jnp.zeros([], jnp.int32),
        cg_residual=jnp.asarray(jnp.nan, jnp.float32),
        cg_stop_reason=jnp.asarray(-1, jnp.int32),
        reduction_ratio=jnp.asarray(jnp.nan, jnp.float32),
        accepted=jnp.asarray(True),
        solver=jnp.asarray(-1, jnp.int32),
        step_size=jnp.asarray(jnp.nan, jnp.float32),
        rejected_steps=jnp.zeros([], jnp.int32),
        loss_scale=jnp.zeros([], jnp.float32),
        warned=jnp.asarray(False),
        rejection=jnp.asarray(StepRejection.ACCEPTED, jnp.int32),
        damping_growth=jnp.asarray(2.0, jnp.float32),
        accepted_damping=jnp.asarray(damping, jnp.float32),
        grid_scale=jnp.ones([], jnp.float32),
        preconditioned=jnp.asarray(False),  # KFAC must first win a comparison
        reference_iterations=jnp.asarray(jnp.iinfo(jnp.int32).max, jnp.int32),
        comparisons_lost=jnp.zeros([], jnp.int32),
        solution=zeros() if config.warm_start else None,
        diagonal=zeros() if config.preconditioner == "jacobi" else None,
        momentum=zeros() if config.heavy_ball or config.adaptive_momentum else None,
        kfac=zero_state(params, config.kfac_max_dim) if config.uses_kfac else None,
    )


class _CGOptions(NamedTuple):
    """CG's keywords of `scale_by_gauss_newton`."""

    maxiter: Any
    tol: Any
    progress_tol: Any
    warm_start_decay: Any


class _PreconditionerOptions(NamedTuple):
    """The Jacobi and KFAC keywords of `scale_by_gauss_newton`."""

    diagonal_decay: Any
    kfac_decay: Any
    kfac_every: Any
    kfac_inverse_every: Any
    kfac_damping_floor: Any


def _preconditioner(
    config: _Config,
    state: ScaleByGaussNewtonState,
    op: CurvatureOperator,
    model: eqx.Module | None,
    params: PyTree,
    batch: dict[str, Any],
    damping: Float[Array, ""],
    options: _PreconditionerOptions,
) -> tuple[PyTree, KFACState | None, Callable | None]:
    """The updated Jacobi or KFAC buffers, and the damped inverse they give.

    KFAC: every `kfac_every` steps this batch's factors (at the step's key, for
    the sampled Fisher) join the running average, whose eigendecompositions
    refresh every `kfac_inverse_every` steps (as CG's preconditioner, only on
    those that use them).
    """
    if config.preconditioner == "jacobi":
        diagonal, precondition = _jacobi_preconditioner(
            op, state.diagonal, state.count, options.diagonal_decay, damping
        )
        return diagonal, state.kfac, precondition
    if not config.uses_kfac:
        return state.diagonal, state.kfac, None
    if model is None:
        raise ValueError(
            "KFAC (solver='kfac' or preconditioner='kfac') finds the layers of an "
            "Equinox module: pass update(..., model=module), not model_fn alone."
        )
    statistics = step_statistics(
        model,
        params,
        batch,
        config.loss_fn,
        state.count,
        curvature=config.curvature,
        weight_sharing=config.weight_sharing,
        max_dim=config.kfac_max_dim,
        factor=op.factor,
        axis_name=config.axis_name,
    )
    # As CG's preconditioner, KFAC's inverse is used only while it is on and on
    # the steps that compare: no eigendecomposition on the others.
    used = True
    if config.solver != "kfac":
        used = state.preconditioned | _comparison_due(state, options.kfac_inverse_every)
    kfac = update_kfac_state(
        state.kfac,
        statistics,
        state.count,
        options.kfac_decay,
        options.kfac_every,
        options.kfac_inverse_every,
        refresh=used,
    )
    if config.solver == "kfac" and config.adaptive_damping:
        floor = options.kfac_damping_floor * mean_eigenvalue(kfac.eigen)
        damping = jnp.maximum(damping, floor.astype(damping.dtype))
    return state.diagonal, kfac, lambda r: apply_kfac_inverse(kfac.eigen, r, damping)


class _Solve(NamedTuple):
    """A step's solve: the result, `dᵀ C d` when it is known (exact solvers,
    KFAC's rescaling) else `None`, the KFAC preconditioner's choice for the next
    step, plain CG's reference iterations and the comparisons KFAC lost in a row
    (see `_adaptive_kfac_cg`), and the exact solve's rounding level (0 for CG and
    KFAC)."""

    result: CGResult
    curvature_norm: Float[Array, ""] | None
    preconditioned: Bool[Array, ""]
    reference_iterations: Int[Array, ""]
    comparisons_lost: Int[Array, ""]
    damping_floor: Float[Array, ""]


def _solve(
    config: _Config,
    solver: str,
    op: CurvatureOperator,
    rhs: PyTree,
    damping: Float[Array, ""],
    state: ScaleByGaussNewtonState,
    preconditioner: Callable | None,
    options: _CGOptions,
    inverse_every: Any,
    kl_clip: Any = None,
    rescale_tol: Any = 0,
) -> _Solve:
    """`(C + λ I)^{-1} rhs` by the named solver (CG warm-started when asked), for
    KFAC the step rescaled by the quadratic model, and with `kl_clip` shortened
    to `dᵀ(C + λ I)d <= kl_clip` (see `_clip_step`)."""
    x0 = None
    if config.warm_start:
        x0 = jax.tree.map(lambda s: options.warm_start_decay * s, state.solution)

    def solve(precondition, maxiter=options.maxiter):
        return solve_with(
            solver,
            op,
            rhs,
            damping,
            maxiter,
            options.tol,
            x0=x0,
            preconditioner=precondition,
            progress_tol=options.progress_tol,
        )

    zero = jnp.zeros([], jnp.float32)
    if solver == "cg" and config.preconditioner == "kfac":

        def quadratic(d):  # d^T (C + λ I) d / 2 - rhs^T d
            damped = op.quadratic_form([d])[0, 0] + damping * tree_dot(d, d)
            return 0.5 * damped - tree_dot(rhs, d)

        result, use, reference, lost = _adaptive_kfac_cg(
            lambda *a: solve(*a)[0],
            quadratic,
            preconditioner,
            state,
            options.tol,
            inverse_every,
        )
        return _clip_step(
            _Solve(result, None, use, reference, lost, zero), rhs, kl_clip
        )
    used = jnp.asarray(preconditioner is not None and config.uses_kfac)
    result, floor, curvature_direction = solve(preconditioner)
    curvature_norm = None
    if curvature_direction is not None:
        curvature_norm = tree_dot(result.value, curvature_direction)
    if solver == "kfac" and config.kfac_rescale:
        previous = state.momentum if config.adaptive_momentum else None
        result, curvature_norm = rescale_kfac_step(
            op, rhs, result.value, previous, damping, rescale_tol
        )
    floor = jnp.asarray(floor, jnp.float32)
    solved = _Solve(
        result,
        curvature_norm,
        used,
        state.reference_iterations,
        state.comparisons_lost,
        floor,
    )
    return _clip_step(solved, rhs, kl_clip)


def _clip_step(solved: _Solve, rhs: PyTree, kl_clip: Any) -> _Solve:
    """The step `d` scaled by `min(1, sqrt(kl_clip / gᵀd))`, and `dᵀ C d` with it.

    For `d = (C + λ I)^{-1} g` (and for CG's iterates from zero) `gᵀd = dᵀ(C + λ
    I)d`, so the clipped step has `dᵀ(C + λ I)d <= kl_clip`: a trust region in
    the damped curvature's norm, the KL clipping of Ba, Grosse and Martens (2017)
    under the Fisher, without the learning rate (applied after this
    transformation). `kl_clip=None`: the step as it is."""
    if kl_clip is None:
        return solved
    value = solved.result.value
    size = tree_dot(rhs, value)
    limit = jnp.asarray(kl_clip, size.dtype)
    scale = jnp.where(size > limit, jnp.sqrt(limit / jnp.where(size > 0, size, 1)), 1)
    shrink = lambda tree: jax.tree.map(lambda x: (scale * x).astype(x.dtype), tree)
    result = eqx.tree_at(lambda r: r.value, solved.result, shrink(value))
    curvature_norm = solved.curvature_norm
    if curvature_norm is not None:
        curvature_norm = scale**2 * curvature_norm
    return solved._replace(result=result, curvature_norm=curvature_norm)


# A preconditioned solve over this many times plain CG's reference iterations
# triggers a new comparison.
_STALE = 1.25
# After k comparisons lost in a row, only every 2^k-th inverse refresh compares
# (k at most this: every 8th, 80 steps with the default `kfac_inverse_every`).
_MAX_BACKOFF = 3


def _adaptive_kfac_cg(
    solve: Callable,
    quadratic: Callable,
    preconditioner: Callable,
    state: ScaleByGaussNewtonState,
    tol: Any,
    inverse_every: Any,
) -> tuple[CGResult, Bool[Array, ""], Int[Array, ""], Int[Array, ""]]:
    """CG with the KFAC preconditioner only while it pays.

    A comparison step runs CG with the current choice, then with the other one
    capped at the first one's iterations: the better solve is this step's, and
    its choice is kept. Better is converged to `tol` in fewer iterations, or
    converged where the other is not, or, between two solves that both stopped
    at the cap, the lower damped quadratic model `quadratic` (the quantity
    truncated CG minimizes).
    Plain CG's iterations there are the reference (its cap, a lower bound, when
    it was capped and lost). Comparisons run on the steps that refresh the KFAC
    inverse, and on the step after a preconditioned solve that needed over
    `_STALE` times the reference (a stale inverse, or a changed problem). A
    comparison costs at most twice the current choice's solve (plain CG's at
    the first step, where every run starts). After `k` comparisons lost in a
    row (`k <= _MAX_BACKOFF`), only every `2^k`-th refresh compares: a
    preconditioner that never pays then costs one extra capped solve per
    `2^k * inverse_every` steps. Returns the result, the choice for the next
    step, the reference (-1: compare next) and the comparisons lost in a row.
    """
    tol = jnp.asarray(tol, jnp.float32)

    def chosen(use):
        return jax.lax.cond(use, lambda: solve(preconditioner), lambda: solve(None))

    def converged(result):
        return result.residual_norm <= tol

    def compare(use):
        first = chosen(use)
        cap = jnp.maximum(first.num_steps, 1)
        other = jax.lax.cond(
            use, lambda: solve(None, cap), lambda: solve(preconditioner, cap)
        )
        q_other, q_first = quadratic(other.value), quadratic(first.value)
        # Fewer iterations between two converged solves; converged beats not
        # converged within the same cap; the quadratic decides only between two
        # solves that both stopped at the cap.
        switch = jnp.select(
            [converged(other) & converged(first), converged(other) | converged(first)],
            [other.num_steps < first.num_steps, converged(other)],
            q_other < q_first,
        )
        best = jax.tree.map(lambda o, f: jnp.where(switch, o, f), other, first)
        total = (first.num_steps + other.num_steps).astype(best.num_steps.dtype)
        plain = jax.tree.map(lambda o, f: jnp.where(use, o, f), other, first)
        reference = jnp.where(converged(plain), plain.num_steps, cap)
        best = eqx.tree_at(lambda r: r.num_steps, best, total)
        kfac_next = use ^ switch
        lost = jnp.where(
            kfac_next, 0, jnp.minimum(state.comparisons_lost + 1, _MAX_BACKOFF)
        )
        return best, kfac_next, reference.astype(jnp.int32), lost.astype(jnp.int32)

    def keep(use):
        result = chosen(use)
        limit = _STALE * state.reference_iterations.astype(jnp.float32)
        stale = use & (result.num_steps > limit)
        reference = jnp.where(stale, -1, state.reference_iterations)
        return result, use, reference, state.comparisons_lost

    return jax.lax.cond(
        _comparison_due(state, inverse_every), compare, keep, state.preconditioned
    )


def _comparison_due(
    state: ScaleByGaussNewtonState, inverse_every: Any
) -> Bool[Array, ""]:
    """Whether `_adaptive_kfac_cg` compares on this step: on the inverse's
    refresh steps, of which only every `2^k`-th after `k` lost comparisons, and
    after a stale preconditioned solve."""
    every = jnp.maximum(jnp.asarray(inverse_every), 1)
    backoff = jnp.left_shift(1, state.comparisons_lost)
    due = (state.count % every == 0) & ((state.count // every) % backoff == 0)
    return due | (state.reference_iterations < 0)


def _operator_for_step(
    config: _Config,
    operator: CurvatureOperator | None,
    model_fn: Callable,
    params: PyTree,
    batch: dict[str, Any],
    factor: Any,
) -> CurvatureOperator:
    """The caller's operator after checking it fits, or a new linearization."""
    if operator is None:
        return curvature_operator(
            model_fn,
            params,
            batch,
            config.loss_fn,
            curvature=config.curvature,
            factor=factor,
            vmap_over_data=config.vmap_over_data,
            num_microbatches=config.num_microbatches,
            relinearize=config.relinearize,
            axis_name=config.axis_name,
            jac=config.jac,
        )
    if not isinstance(operator, CurvatureOperator):
        raise ValueError(
            f"operator must be an eqx_ggn.CurvatureOperator, got {type(operator)}."
        )
    names = ("curvature", "loss_fn") + (() if config.jac is None else ("jac",))
    for name in names:
        if getattr(operator, name) != getattr(config, name):
            raise ValueError(
                f"The operator passed to update() has {name}="
                f"{getattr(operator, name)!r}, but the optimizer has {name}="
                f"{getattr(config, name)!r}: build it with the optimizer's, e.g. "
                f"eqx_ggn.value_and_grad(..., {name}={getattr(config, name)!r}, "
                "return_operator=True), or leave operator= out."
            )
    check_like("operator.grad", operator.grad, params, "params")
    return operator


class _Control(NamedTuple):
    """The verdict on one step: its size, whether it is taken, the next damping
    and line-search scale, and why it was rejected."""

    step_size: Float[Array, ""]
    accepted: Bool[Array, ""]
    damping: Float[Array, ""]
    growth: Float[Array, ""]
    reduction_ratio: Float[Array, ""]
    rejection: Int[Array, ""]
    grid_scale: Float[Array, ""]
    failed: Bool[Array, ""]


def _control_step(
    config: _Config,
    solver: str,
    lm_constants: dict[str, Any],
    model_fn: Callable,
    params: PyTree,
    batch: dict[str, Any],
    op: CurvatureOperator,
    direction: PyTree,
    damping: Float[Array, ""],
    state: ScaleByGaussNewtonState,
    finite: Bool[Array, ""],
    loss_scale: Float[Array, ""],
    solved: _Solve,
) -> _Control:
    """Step size, acceptance and next damping for the step `-d`.

    Without adaptive damping or a line search the step is taken whole when finite.
    Otherwise the loss is evaluated at `θ - α d`, for `α = 1` or on the line
    search's grid, and the Levenberg-Marquardt rule (or, with a fixed damping, a
    plain decrease test) decides. Every rejection changes the next trial: the
    damping grows, or with a fixed damping the grid shrinks by `2^-16`. `failed`
    marks a rejection that is more than rounding: the loss rose by over 16
    machine epsilons of `loss_scale`.
    """
    one = jnp.asarray(1.0, jnp.float32)
    nan = jnp.asarray(jnp.nan, jnp.float32)
    line_search = resolve_line_search(config.line_search, solver)
    if not config.adaptive_damping and line_search is None:
        rejection = jnp.where(finite, StepRejection.ACCEPTED, StepRejection.NON_FINITE)
        return _Control(
            one,
            finite,
            damping,
            state.damping_growth,
            nan,
            rejection.astype(jnp.int32),
            state.grid_scale,
            ~finite,
        )

    def loss_at(alpha, axis_name=config.axis_name):
        trial = jax.tree.map(
            lambda p, d: p - alpha.astype(d.dtype) * d, params, direction
        )
        return objective_value(
            model_fn,
            trial,
            batch,
            config.loss_fn,
            op.factor,
            config.vmap_over_data,
            config.num_microbatches,
            axis_name,
        )

    grid_scale = state.grid_scale if not config.adaptive_damping else one
    if line_search == "grid":
        # Each shard's grid of losses, then one sum over the shards: a `psum`
        # under the grid's `vmap` fails inside `shard_map` on jax 0.8.2.
        step_size, new_loss = grid_line_search(
            lambda alpha: loss_at(alpha, None),
            scale=grid_scale,
            total=lambda values: sum_over_shards(values, config.axis_name),
        )
    else:
        step_size, new_loss = one, loss_at(one)
    new_loss = jnp.where(finite, new_loss, jnp.nan)  # rejects the step
    scaled = jax.tree.map(lambda x: step_size.astype(x.dtype) * x, direction)
    if config.adaptive_damping:
        curvature = solved.curvature_norm  # dᵀ C d, when the solve knows it
        if curvature is None:
            curvature = op.quadratic_form([direction])[0, 0]
        predicted = quadratic_model(op.grad, scaled, step_size**2 * curvature)
        constants = dict(lm_constants)
        if constants["min_damping"] is None:
            # CG and KFAC: 1e-8; exact solves: their factorization's rounding
            # level, below which a smaller damping changes nothing. It bounds
            # the solved damping, λ L(θ) under `relative_damping`: λ's floor is
            # then the level over the loss.
            floor = solved.damping_floor
            if config.relative_damping:
                loss = jnp.abs(op.loss).astype(floor.dtype)
                floor = floor / jnp.maximum(loss, jnp.finfo(floor.dtype).tiny)
            exact = solver in EXACT_SOLVERS
            constants["min_damping"] = floor if exact else 1e-8
        lm = levenberg_marquardt(
            damping,
            op.loss,
            new_loss,
            predicted,
            state.damping_growth,
            rule=config.damping_rule,
            line_searched=line_search is not None,
            **constants,
        )
        accepted, new_damping, rho, growth, rejection = lm
    else:
        # Only the sign matters here: the first-order change, with no product.
        predicted = -tree_dot(op.grad, scaled)
        rejection = rejection_reason(op.loss, new_loss, predicted)
        accepted = rejection == StepRejection.ACCEPTED
        new_damping, rho, growth = damping, nan, state.damping_growth
        # A grid that found no decrease moves below its smallest size.
        shrunk = grid_scale * min(GRID_STEP_SIZES) / 2
        grid_scale = jnp.where(accepted, one, shrunk).astype(jnp.float32)
    eps = jnp.finfo(jnp.result_type(op.loss)).eps
    failed = ~accepted & ~(new_loss - op.loss <= 16 * eps * loss_scale)
    return _Control(
        step_size, accepted, new_damping, growth, rho, rejection, grid_scale, failed
    )


def _model_fn_for_step(
    params: PyTree | None,
    batch: dict[str, Any] | None,
    model_fn: Callable | None,
    model: eqx.Module | None,
) -> Callable:
    """Check `update`'s arguments and return the `model_fn` to linearize."""
    if params is None:
        raise ValueError(
            "scale_by_gauss_newton needs the current params: call "
            "update(updates, state, params, model_fn=..., batch=...)."
        )
    if batch is None:
        raise ValueError(
            "scale_by_gauss_newton needs the batch: call update(updates, state, "
            "params, model_fn=..., batch={'input': X, 'target': Y})."
        )
    if model_fn is None and model is None:
        raise ValueError(
            "scale_by_gauss_newton needs the model: pass model_fn=... "
            "(model_fn(input=, params=)) or, for an Equinox module, model=... "
            "to update()."
        )
    if model_fn is not None:
        return model_fn
    # With `model=`, the `params` take precedence over its leaves.
    call_module = module_fn(model)

    def checked_model_fn(*, input: Any, params: PyTree) -> Any:  # noqa: A002
        try:
            return call_module(input=input, params=params)
        except TypeError as error:
            if "'NoneType' object is not callable" not in str(error):
                raise
            raise ValueError(
                "update(..., model=...) got a module with None where it has "
                "functions (its activations, say): probably the filtered "
                "parameters, e.g. eqx.filter(model, eqx.is_inexact_array). Pass "
                "the whole module as model= and the filtered arrays as params."
            ) from error

    return checked_model_fn


# A run of rejections is a stall, worth a warning, once it has grown the damping
# by this factor since the last accepted step.
STALL_GROWTH = 1e4


def _warn_on_failures(
    config: _Config,
    op: CurvatureOperator,
    updates: PyTree,
    batch: dict[str, Any],
    state: ScaleByGaussNewtonState,
    control: _Control,
    rejected_steps: Int[Array, ""],
    warn_after: Any,
    max_damping: Any,
) -> Bool[Array, ""]:
    """Emit a `GaussNewtonWarning` when due; return the updated `warned` flag.

    Due on the first failed step when a definite cause is seen; when the run
    stalls: `warn_after` failed steps in a row that, with adaptive damping, grew
    the damping by `STALL_GROWTH` since the last accepted step (the short runs of
    rejections of normal Levenberg-Marquardt recovery do not); or when the
    damping first reaches `max_damping`. At most once per run of failed steps.
    """
    diagnostics = step_diagnostics(
        config.loss_fn, op.predictions, op.grad, updates, batch, op.axis_name
    )
    failed = control.failed
    stalled = rejected_steps >= warn_after
    if config.adaptive_damping:
        stalled &= control.damping >= STALL_GROWTH * state.accepted_damping
        stalled |= (control.damping >= max_damping) & (state.damping < max_damping)
    due = (stalled | ((rejected_steps == 1) & is_definite(diagnostics))) & failed
    due &= ~state.warned
    emitted = warn_if(
        due,
        config.loss_fn,
        max_damping,
        rejected_steps,
        control.damping,
        state.accepted_damping,
        diagnostics,
    )
    return (state.warned | emitted) & failed


def _buffers(
    config: _Config,
    state: ScaleByGaussNewtonState,
    direction: PyTree,
    accepted: Bool[Array, ""],
    momentum: Any,
) -> tuple[PyTree, PyTree | None, PyTree | None]:
    """The step (with momentum) and the momentum and warm-start buffers, which
    keep their last values on a rejected step."""
    step, buffer, solution = direction, state.momentum, state.solution
    if momentum is not None:
        buffer = tree_where(
            accepted,
            jax.tree.map(
                lambda m, d: (momentum * m + d).astype(m.dtype), buffer, direction
            ),
            buffer,
        )
        step = buffer
    if config.adaptive_momentum:  # the previous step, for the next rescaling
        buffer = tree_where(accepted, direction, buffer)
    if config.warm_start:
        solution = tree_where(accepted, direction, solution)
    return step, buffer, solution


def _is_finite_step(
    direction: PyTree,
    updates: PyTree,
    op: CurvatureOperator,
    damping: Float[Array, ""],
) -> Bool[Array, ""]:
    """Whether the step's inputs and its solved direction are finite."""
    return (
        tree_all_finite(direction)
        & tree_all_finite(updates)
        & jnp.isfinite(op.loss)
        & jnp.isfinite(damping)
    )


def _next_state(
    state: ScaleByGaussNewtonState,
    op: CurvatureOperator,
    solved: _Solve,
    control: _Control,
    solver_code: int,
    damping: Float[Array, ""],
    rejected_steps: Int[Array, ""],
    warned: Bool[Array, ""],
    loss_scale: Float[Array, ""],
    buffers: tuple[PyTree, PyTree, PyTree, KFACState | None],
) -> ScaleByGaussNewtonState:
    """The state after a step, every field in its fixed dtype."""
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    result = solved.result
    solution, diagonal, momentum, kfac = buffers
    return ScaleByGaussNewtonState(
        count=state.count + 1,
        damping=f32(control.damping),
        loss=f32(op.loss),
        cg_iterations=jnp.asarray(result.num_steps, jnp.int32),
        cg_residual=f32(result.residual_norm),
        cg_stop_reason=jnp.asarray(result.stop_reason, jnp.int32),
        reduction_ratio=control.reduction_ratio,
        accepted=jnp.asarray(control.accepted),
        solver=jnp.asarray(solver_code, jnp.int32),
        step_size=f32(control.step_size),
        rejected_steps=rejected_steps.astype(jnp.int32),
        loss_scale=f32(jnp.nan_to_num(loss_scale)),
        warned=jnp.asarray(warned),
        rejection=jnp.asarray(control.rejection, jnp.int32),
        damping_growth=f32(control.growth),
        accepted_damping=f32(
            jnp.where(control.accepted, damping, state.accepted_damping)
        ),
        grid_scale=f32(control.grid_scale),
        preconditioned=jnp.asarray(solved.preconditioned),
        reference_iterations=solved.reference_iterations,
        comparisons_lost=solved.comparisons_lost,
        solution=solution,
        diagonal=diagonal,
        momentum=momentum,
        kfac=kfac,
    )


def scale_by_gauss_newton(
    loss_fn: LossFn = "mse",
    *,
    curvature: Curvature = "ggn",
    solver: str = "cg",
    line_search: str | None = "auto",
    max_matrix_bytes: int | None = None,
    damping: float = 1.0,
    damping_rule: str = "nielsen",
    relative_damping: bool = False,
    adaptive_damping: bool = True,
    lower_threshold: float = 0.25,
    upper_threshold: float = 0.75,
    damping_decrease: float = 2 / 3,
    damping_increase: float = 3 / 2,
    min_damping: float | None = None,
    max_damping: float = 1e8,
    cg_maxiter: int = 50,
    cg_tol: float = 1e-5,
    cg_progress_tol: float = 5e-4,
    warm_start: bool = False,
    warm_start_decay: float = 0.95,
    preconditioner: str | None = None,
    diagonal_decay: float = 0.95,
    kfac_decay: float = 0.95,
    kfac_every: int = 5,
    kfac_inverse_every: int = 10,
    kfac_max_dim: int | None = None,
    kfac_rescale: bool = True,
    kfac_rescale_tol: float = 0.0,
    kfac_damping_floor: float = 0.1,
    kl_clip: float | None = None,
    weight_sharing: str = "expand",
    momentum: float | None = None,
    adaptive_momentum: bool = False,
    factor: float | None = None,
    vmap_over_data: bool = True,
    num_microbatches: int | None = None,
    relinearize: bool = False,
    jac: str | None = None,
    throw: bool = False,
    warn: bool = True,
    warn_after: int = 8,
    axis_name: AxisName | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Precondition the gradient with a damped curvature matrix (CG or exact).

    Given the incoming updates `g` (the gradient of the package's objective
    `factor * sum_i loss_i`, by default the batch mean; see
    [`eqx_ggn.value_and_grad`][]), `update` linearizes the model once on `batch`,
    solves `(C + damping * I) d = g` (matrix-free with [`eqx_ggn.cg`][] by
    default, or exactly, see `solver`) and returns `d`. The sign is kept, as in
    `optax.scale_by_adam`: follow with `optax.scale_by_learning_rate`, or use
    [`eqx_ggn.gauss_newton`][].

    **Safe by default:** the Levenberg-Marquardt rule (`adaptive_damping=True`,
    starting from `damping=1`, Nielsen's update) evaluates the loss at `θ - d`
    and rejects any step that raises it, at the price of one more forward pass
    and one Jacobian-vector product per step (`dᵀ C d` for the quadratic model,
    from `J d` alone; the exact solvers and KFAC's rescaling already have it);
    every rejection changes the next trial, so no
    run repeats a rejected step. The exact solvers add the grid line search and
    let the damping fall to their rounding level (`line_search="auto"`,
    `min_damping=None`): `solver="sample_space"` (or `"auto"`) with every other
    keyword at its default is the recommended setting for full-batch least
    squares with fewer residuals than parameters, such as PINNs (measured on
    three PDEs in `docs/benchmarks.md`). Opt out with `adaptive_damping=False`
    for a fixed damping.

    `update(updates, state, params, *, model_fn=None, model=None, batch=None,
    operator=None, **extra_args)`: `batch = {"input": X, "target": Y}`, and
    `model_fn(input=, params=)` or, for an Equinox user, `model=` the module itself
    (frozen arrays and other non-trained leaves are taken from it). `operator=` a
    [`eqx_ggn.CurvatureOperator`][] of this step (from
    `eqx_ggn.value_and_grad(..., return_operator=True)`) is used instead of
    linearizing again. Other keyword arguments are ignored. Model state (dropout
    keys, BatchNorm statistics) must be fixed inside `model_fn` for the step: every
    CG product then sees the same linearization.

    **Arguments:**

    - `loss_fn`: `"mse"`, `"cross_entropy"`, `"binary_cross_entropy"`, `"none"` or a
        callable `loss(pred, target) -> scalar` for one sample. Cross-entropy losses
        take **logits**, not probabilities.
    - `curvature`: `"ggn"` (Gauss-Newton; Levenberg-Marquardt with
        `adaptive_damping`), `"fisher"` (the **natural gradient**: for the built-in
        losses, and as `J^T H J` for a callable one, the same matrix as the GGN;
        KFAC samples its labels), `"empirical_fisher"` (`factor * sum_i g_i g_i^T`)
        or `"hessian"` (Hessian-free: CG stops at non-positive curvature and
        returns the last good iterate).
    - `solver`: how `(C + λ I) d = g` is solved: `"cg"` (default, matrix-free),
        `"dense"` (the `P x P` matrix from per-sample Jacobians, Cholesky),
        `"sample_space"` (the `(N O) x (N O)` kernel and the push-through
        identity; GGN, Fisher and empirical Fisher), `"kfac"` (the damped KFAC
        inverse, rescaled by the exact quadratic model: one Jacobian-vector
        product, two with `adaptive_momentum`, or a quarter of one, see
        `kfac_rescale_tol`; needs `model=`) or `"auto"` (the
        cheaper exact solve that fits `max_matrix_bytes`, 1 GiB by default,
        else CG). Exact solves run in at least float32 and never return NaN for
        a singular system. See "Choosing a solver" and "KFAC" in the docs.
    - `line_search`: `"auto"` (default: `"grid"` for the exact solvers, `None`
        for CG and KFAC), `None` or `"grid"`: evaluate the loss at `θ - α d` for
        `α = 2^-k`, `k = 0..15`, in one batched forward pass (ENGD's grid) and
        take the best; `state.step_size` records `α`. With `adaptive_damping` a
        step is accepted when the chosen one lowers the loss, and then the
        damping shrinks by 1/3 (the line search already guards the length; the
        damping only regularizes the direction), down to `min_damping`: for the
        exact solvers, ENGD-like undamped steps near a solution, and Nielsen's
        growth wherever such steps fail. With a fixed damping, a step that no
        grid size makes lower is rejected and the next grid is `2^-16` times
        smaller (`state.grid_scale`), until one does.
    - `max_matrix_bytes`: the memory limit of `solver="auto"`, in bytes.
    - `damping`: the (initial) Tikhonov damping `λ`.
    - `relative_damping`: solve with `λ * L(θ)` instead of `λ` (Fan and Yuan's
        Levenberg-Marquardt variant `μ ||F||^2`); `state.damping` holds `λ`.
    - `damping_rule`: how the Levenberg-Marquardt rule moves `λ`. `"nielsen"`
        (default; Nielsen 1999, as in Madsen, Nielsen and Tingleff's LM notes): an
        accepted step multiplies `λ` by `max(1/3, 1 - (2 rho - 1)^3)`, a rejected
        one by a growth factor that starts at 2 and doubles with each rejection in
        a row (8x after two, 1024x after four), so a run recovers from a too-small
        `λ` in one or two rejections. `"threshold"`: the earlier rule, below.
    - `adaptive_damping`: the Levenberg-Marquardt rule. After the solve, one more
        forward pass gives the reduction ratio `rho = (L(θ - d) - L(θ)) / q(-d)`,
        `q(s) = ∇L^T s + s^T C s / 2`, on the same batch (`d` taken as the whole
        step, i.e. learning rate 1). A non-finite trial or a loss increase rejects
        the step (zero updates; `state.rejection` says why) and `λ` grows. With
        `damping_rule="threshold"`, `rho < lower_threshold` multiplies `λ` by
        `damping_increase`, `rho > upper_threshold` by `damping_decrease`, and a
        rejection by `damping_increase`. `λ` is clipped to `[min_damping,
        max_damping]`; exact solvers also raise it to their factorization's
        rounding level. With it, `damping` is only the starting value; schedule
        `min_damping` to steer it. With `adaptive_damping=False` every rejection
        still changes the next trial: the line search's grid shrinks.
    - `lower_threshold`, `upper_threshold`, `damping_decrease`, `damping_increase`:
        the constants of `damping_rule="threshold"`; `min_damping`, `max_damping`:
        the damping's range under either rule. `min_damping=None` (default) is
        1e-8 for CG and KFAC and, for the exact solvers, their factorization's
        rounding level (`n * eps * max(diag)` of the matrix they factor), below
        which a smaller damping would change nothing.
    - `cg_maxiter`, `cg_tol`, `cg_progress_tol`: CG's iteration cap, relative
        residual tolerance and Martens' progress tolerance (see [`eqx_ggn.cg`][]).
        `cg_maxiter` may be a traced integer (e.g. scheduled).
    - `warm_start`: start CG from `warm_start_decay` times the previous solution
        (Martens 2010 uses 0.95).
    - `preconditioner`: `None`, `"jacobi"` (divide by a running average, decay
        `diagonal_decay`, of a one-sample Hutchinson estimate of the curvature's
        diagonal, clipped at 0, plus `λ`; one more product per step) or `"kfac"`
        (the damped KFAC inverse; needs `model=`). The KFAC preconditioner is used
        only while it pays: on each step that refreshes its inverse (every
        `kfac_inverse_every` steps), CG also runs with the other choice, capped
        at the first one's iterations, and the better choice is kept: converged
        in fewer iterations, or converged where the other did not, or, when both
        stopped at the cap, the lower damped quadratic model; between refreshes, a
        preconditioned solve that needs over 1.25 times the iterations plain CG
        needed at the comparison (a stale inverse) makes the next step compare
        again. After `k` comparisons lost in a row (at most 3), only every
        `2^k`-th refresh compares, so a preconditioner that never pays costs one
        extra capped solve per 80 steps at the defaults, and its inverse is
        refreshed only for those comparisons (its factors still every
        `kfac_every` steps).
        `state.preconditioned` records the choice, `state.comparisons_lost` the
        losses in a row, and `state.cg_iterations` counts both runs on a
        comparison step.
    - `kfac_decay`, `kfac_every`, `kfac_inverse_every`, `weight_sharing`,
        `kfac_max_dim`: KFAC's factors are a running average of
        [`eqx_ggn.kfac_factors`][] (with the step's `curvature`; `"fisher"`
        samples labels), computed every `kfac_every` steps (one forward and one
        backward pass each time; `1` makes a full-batch step a little better
        per step, at up to 3.5x its cost), uniform over its first `1 / (1 - kfac_decay)`
        updates and exponential with this decay after them (Martens and
        Grosse's weight `1 - min(1 - 1/k, kfac_decay)` for the `k`-th update);
        their eigendecompositions are refreshed every `kfac_inverse_every`
        steps; `weight_sharing` (`"expand"` or `"reduce"`) treats layers used
        several times per sample; a factor larger than `kfac_max_dim` (`None`:
        2048) is kept diagonal. It sets shapes: under `optax.inject_hyperparams`,
        a given `kfac_max_dim` belongs in `static_args`. What each costs on a
        transformer is in the docs' KFAC page.
    - `kfac_rescale`: with `solver="kfac"`, scale the KFAC direction to minimize
        the exact damped quadratic model (Martens and Grosse; one
        Jacobian-vector product per step, no transposed pass). `False` takes
        the damped KFAC direction as it is: with `adaptive_damping=False` this
        is the cheapest step (no curvature product, no trial loss) but needs a
        tuned learning rate and damping; in `docs/benchmarks.md` ("Time to
        target") it loses to the default.
    - `kfac_rescale_tol`: `0` (default) takes the rescaling's curvature term
        `dᵀ C d` from the whole batch, through the step's linearization. A
        positive value takes it from every fourth sample alone (a fresh forward
        pass and JVP of that quarter) when its standard error, from the
        quarter's per-sample spread, is at most this fraction of
        `dᵀ(C + λ I)d`, and else linearizes the other three quarters too (the
        batch's form, at the price of one more forward pass than the
        default). A relative error `e` gives up a fraction `(e / (1 + e))²`
        of the model's decrease along the direction: about 4% at 0.25. It
        pays where each sample averages many loss terms (a sequence model's
        tokens) and costs where a few samples carry the curvature (a
        classifier near convergence): measured in the docs' KFAC page. It
        applies to batches of 29 samples or more, without micro-batches or
        `relinearize`. The choice is a `lax.cond`: under `jax.vmap` over
        several runs' states it becomes a select, and every step pays for both
        ways.
    - `kfac_damping_floor`: with `solver="kfac"` and `adaptive_damping`, the KFAC
        inverse is damped with at least this fraction of the KFAC approximation's
        mean eigenvalue `tr(KFAC) / P`, however low the Levenberg-Marquardt `λ`
        falls (the rescaling's quadratic model keeps `λ`). On mini-batches the
        rule judges a step on the batch it was fitted to, accepts nearly every
        step and drives `λ` to `min_damping`; the direction would then follow
        the running factors' smallest, noisiest eigenvalues. Like Martens and
        Grosse's separate factor damping, the floor keeps it to directions the
        factors resolve, and it is scale-free: multiplying the loss by a
        constant changes nothing. `0` turns it off. Measured over two decades
        on five mini-batch and two full-batch problems in `docs/benchmarks.md`.
    - `kl_clip`: a trust region for every solver: the solution `d` (before the
        learning rate) is scaled by `min(1, sqrt(kl_clip / gᵀd))`, so that
        `dᵀ(C + λ I)d <= kl_clip`. Under `curvature="fisher"` with the mean loss,
        `dᵀC d / 2 <= gᵀd / 2` is the second-order KL divergence a full step moves
        the model's predictions by (Ba, Grosse and Martens 2017; kfac-pytorch's
        `kl_clip` also counts the learning rate). With `warm_start`, CG's `gᵀd`
        only approximates `dᵀ(C + λ I)d`. It bounds the step where a fixed
        damping alone would not (`kfac_rescale=False, adaptive_damping=False`);
        `None` (default): off; otherwise a positive number.
    - `momentum`: heavy-ball momentum on the solutions, `m = momentum * m + d`;
        `None` (default) keeps no buffer.
    - `adaptive_momentum`: with `solver="kfac"`, add the previous step with the
        coefficient that minimizes the quadratic model (Martens and Grosse).
    - `factor`: the objective's factor; defaults to `1/batch_size` (the batch mean).
    - `vmap_over_data`: apply `model_fn` per sample (default) or to the whole batch.
    - `num_microbatches`, `relinearize`: accumulate the gradient, the loss and every
        product over equal micro-batches in a `lax.scan`, keeping each micro-batch's
        linearization or recomputing it per product; see
        [`eqx_ggn.curvature_operator`][] for the memory and time each costs. `None`
        means 1. It sets array shapes: under `optax.inject_hyperparams`, a given
        `num_microbatches` belongs in `static_args`.
    - `jac`: `"fwd"` (`jax.linearize`), `"bwd"` (reverse mode only, for models
        with a `jax.custom_vjp` such as diffrax's default adjoint) or `None`
        (default: forward mode unless the model has no JVP), as for
        [`eqx_ggn.curvature_operator`][]. Every solver runs in both modes; CG,
        KFAC's rescaling and the Jacobi preconditioner need `J v`, which in
        `"bwd"` mode differentiates the model's backward rule once more, while
        `"dense"`, `"sample_space"` and `"auto"` need only the VJP.
    - `throw`: a debugging switch. A step that meets non-finite values (NaN/Inf
        in the optimizer state, the damping, the batch, the predictions, the loss,
        the incoming updates or CG's direction) raises an `eqx.error_if` runtime
        error naming the first cause, instead of returning zero updates.
    - `warn`, `warn_after`: emit one [`eqx_ggn.GaussNewtonWarning`][] (a
        `UserWarning`) when the run stalls, i.e. after `warn_after` rejected steps
        in a row that (with adaptive damping) also grew the damping by 1e4 since
        the last accepted step; on the first rejection with a definite cause
        (labels out of range, a non-finite batch, an incoming gradient 10% away
        from the objective's, probabilities given to a logits loss); or when the
        damping reaches `max_damping`. Under Nielsen's rule 8 rejections in a row
        grow the damping 2^36-fold (7e10): healthy runs measured in
        `docs/benchmarks.md` needed at most 7, on noisy mini-batches, and at
        most 4 on full batches. It names the causes it measured. The host is
        called only then, through a `jax.pure_callback` whose result is the
        state's `warned` flag: the compiled step holds no effect and keeps
        JAX's C++ dispatch path (a `jax.debug.callback` would lose it,
        jax-ml/jax#39289). Its presence still costs a short step on a CPU a
        little (`docs/kfac.md`); `warn=False` removes it, and
        `state.rejected_steps` still counts the failed steps in a row. A
        program that drops the new state drops the warning with it.
    - `axis_name`: inside `jax.shard_map` (or `pmap`), the mapped axis that splits
        the batch over devices; see [`eqx_ggn.curvature_operator`][]. The loss,
        the gradient and every product are then summed over the shards, so every
        device takes the same step. The incoming `updates` must already be the
        global gradient, e.g. `jax.grad(lambda p: lax.pmean(loss(p, batch),
        axis_name))(params)`. Under plain `jit` with a sharded batch, leave it
        `None`.

    Bad input never reaches the parameters: with `throw=False` a non-finite
    direction, loss, damping or reduction ratio rejects the step (zero updates,
    `accepted=False`, and with `adaptive_damping` the damping grows). A state
    buffer (damping, warm start, diagonal, momentum) that holds NaN or Inf, e.g.
    from a corrupted checkpoint, is reset to its `init` value before the step.

    **Returns:**

    An `optax.GradientTransformationExtraArgs` whose state is a
    [`eqx_ggn.ScaleByGaussNewtonState`][].

    !!! example

        ```python
        import jax, jax.numpy as jnp, optax
        import eqx_ggn

        def model_fn(input, params):
            return jnp.tanh(input @ params["w"])

        params = {"w": jnp.zeros((3, 2))}
        x = jax.random.normal(jax.random.key(0), (16, 3))
        batch = {"input": x, "target": jnp.tanh(x @ jnp.ones((3, 2)))}
        opt = optax.chain(
            eqx_ggn.scale_by_gauss_newton("mse", cg_maxiter=6),
            optax.scale_by_learning_rate(1.0),
        )
        state = opt.init(params)
        losses = []
        for _ in range(10):
            loss, grads = eqx_ggn.value_and_grad(model_fn, params, batch, "mse")
            updates, state = opt.update(
                grads, state, params, model_fn=model_fn, batch=batch
            )
            params = optax.apply_updates(params, updates)
            losses.append(float(loss))
        assert losses[-1] < 1e-2 * losses[0]
        ```
    """
    config = _Config(
        loss_fn=loss_fn,
        curvature=curvature,
        solver=solver,
        line_search=line_search,
        damping_rule=damping_rule,
        relative_damping=relative_damping,
        adaptive_damping=adaptive_damping,
        warm_start=warm_start,
        preconditioner=preconditioner,
        weight_sharing=weight_sharing,
        kfac_max_dim=MAX_DIM if kfac_max_dim is None else kfac_max_dim,
        kfac_rescale=kfac_rescale,
        heavy_ball=momentum is not None and not (is_number(momentum) and momentum == 0),
        adaptive_momentum=adaptive_momentum,
        vmap_over_data=vmap_over_data,
        num_microbatches=1 if num_microbatches is None else num_microbatches,
        relinearize=relinearize,
        jac=jac,
        throw=throw,
        warn=warn,
        axis_name=axis_name,
    )
    _check_maxiter(cg_maxiter)
    check_periods(kfac_every=kfac_every, kfac_inverse_every=kfac_inverse_every)
    check_numbers(
        damping=(damping, 0, float("inf")),
        min_damping=(min_damping, 0, float("inf")),  # None: by solver
        max_damping=(max_damping, 0, float("inf")),
        cg_tol=(cg_tol, 0, float("inf")),
        momentum=(momentum, 0, 1),
        warm_start_decay=(warm_start_decay, 0, 1),
        diagonal_decay=(diagonal_decay, 0, 1),
        kfac_decay=(kfac_decay, 0, 1),
        kfac_damping_floor=(kfac_damping_floor, 0, float("inf")),
        kfac_rescale_tol=(kfac_rescale_tol, 0, float("inf")),
        damping_decrease=(damping_decrease, 0, 1),
        damping_increase=(damping_increase, 1, float("inf")),
        warn_after=(warn_after, 1, float("inf")),
        lower_threshold=(lower_threshold, 0, 1),
        upper_threshold=(upper_threshold, 0, 1),
        cg_progress_tol=(cg_progress_tol, 0, float("inf")),
        max_matrix_bytes=(max_matrix_bytes, 1, float("inf")),
    )
    check_ordered(lower_threshold=lower_threshold, upper_threshold=upper_threshold)
    check_ordered(min_damping=min_damping, max_damping=max_damping)
    check_positive(factor=factor)
    _check_kl_clip(kl_clip)
    _check_rescale_tol(kfac_rescale_tol, solver, kfac_rescale)
    cg_options = _CGOptions(cg_maxiter, cg_tol, cg_progress_tol, warm_start_decay)
    preconditioner_options = _PreconditionerOptions(
        diagonal_decay, kfac_decay, kfac_every, kfac_inverse_every, kfac_damping_floor
    )
    lm_constants = {
        "lower_threshold": lower_threshold,
        "upper_threshold": upper_threshold,
        "damping_decrease": damping_decrease,
        "damping_increase": damping_increase,
        "min_damping": min_damping,
        "max_damping": max_damping,
    }

    def init_fn(params: PyTree) -> ScaleByGaussNewtonState:
        return _initial_state(config, params, damping)

    def update_fn(
        updates: PyTree,
        state: ScaleByGaussNewtonState,
        params: PyTree | None = None,
        *,
        model_fn: Callable | None = None,
        model: eqx.Module | None = None,
        batch: dict[str, Any] | None = None,
        operator: CurvatureOperator | None = None,
        **extra_args: Any,
    ) -> tuple[PyTree, ScaleByGaussNewtonState]:
        del extra_args
        model_fn = _model_fn_for_step(params, batch, model_fn, model)
        check_like("updates", updates, params, "params")
        state, state_finite = _reset_non_finite(state, init_fn(params))
        op = _operator_for_step(config, operator, model_fn, params, batch, factor)
        # A fixed damping keeps its own precision (float64 under x64) for the solve.
        lam = state.damping if config.adaptive_damping else jnp.asarray(damping)
        # The damping the system is solved with: λ, or λ times the loss.
        solve_lam = lam * op.loss if config.relative_damping else lam
        solver_name = resolve_solver(config.solver, op, max_matrix_bytes)
        diagonal, kfac, precond = _preconditioner(
            config, state, op, model, params, batch, solve_lam, preconditioner_options
        )
        solved = _solve(
            config,
            solver_name,
            op,
            updates,
            solve_lam,
            state,
            precond,
            cg_options,
            kfac_inverse_every,
            kl_clip,
            kfac_rescale_tol,
        )
        direction = solved.result.value
        finite = _is_finite_step(direction, updates, op, solve_lam)
        loss_scale = jnp.maximum(state.loss_scale, jnp.abs(op.loss))
        control = _control_step(
            config,
            solver_name,
            lm_constants,
            model_fn,
            params,
            batch,
            op,
            direction,
            lam,
            state,
            finite,
            loss_scale,
            solved,
        )
        direction = jax.tree.map(
            lambda d: (control.step_size * d).astype(d.dtype), direction
        )
        rejected_steps = jnp.where(control.failed, state.rejected_steps + 1, 0)
        warned = state.warned
        if config.warn:
            warned = _warn_on_failures(
                config,
                op,
                updates,
                batch,
                state,
                control,
                rejected_steps,
                warn_after,
                max_damping,
            )
        step, momentum_buffer, solution = _buffers(
            config,
            state,
            direction,
            control.accepted,
            momentum if config.heavy_ball else None,
        )
        new_state = _next_state(
            state,
            op,
            solved,
            control,
            SOLVER_CODES[solver_name],
            lam,
            rejected_steps,
            warned,
            loss_scale,
            (solution, diagonal, momentum_buffer, kfac),
        )
        zeros = jax.tree.map(jnp.zeros_like, step)
        step = tree_where(control.accepted, step, zeros)
        if config.throw:
            step = _raise_if_not_finite(
                step, solved.result.value, state_finite, solve_lam, batch, op, updates
            )
        return step, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def gauss_newton(
    learning_rate: optax.ScalarOrSchedule, **kwargs: Any
) -> optax.GradientTransformationExtraArgs:
    r"""Damped Gauss-Newton, natural-gradient or Hessian-free training for Optax.

    `optax.chain(scale_by_gauss_newton(**kwargs),
    optax.scale_by_learning_rate(learning_rate))`: a drop-in for `optax.adam` with
    the extra keyword arguments `model_fn=` (or `model=`) and `batch=` on `update`.

    **Arguments:**

    - `learning_rate`: a number or an Optax schedule. 1.0 is the full (damped)
        Gauss-Newton step, the one the Levenberg-Marquardt rule checks; a smaller
        one shortens an accepted step (see "Damping and CG" in the docs).
    - `**kwargs`: every keyword argument of [`eqx_ggn.scale_by_gauss_newton`][]
        (`loss_fn`, `curvature`, `damping`, `adaptive_damping`, `cg_maxiter`, ...).

    **Returns:**

    An `optax.GradientTransformationExtraArgs`.

    !!! example

        ```python
        import equinox as eqx
        import jax, jax.numpy as jnp, optax
        import eqx_ggn

        model = eqx.nn.MLP(2, 3, 16, 1, key=jax.random.key(0))
        x = jax.random.normal(jax.random.key(1), (64, 2))
        batch = {"input": x, "target": (x[:, 0] > 0).astype(int)}
        opt = eqx_ggn.gauss_newton(learning_rate=1.0, loss_fn="cross_entropy")
        state = opt.init(eqx.filter(model, eqx.is_inexact_array))

        @eqx.filter_jit
        def step(model, state):
            (loss, grads), op = eqx_ggn.value_and_grad(
                model=model, batch=batch, loss_fn="cross_entropy",
                return_operator=True,
            )
            params = eqx.filter(model, eqx.is_inexact_array)
            updates, state = opt.update(
                grads, state, params, model=model, batch=batch, operator=op
            )
            return eqx.apply_updates(model, updates), state, loss

        losses = []
        for _ in range(10):
            model, state, loss = step(model, state)
            losses.append(float(loss))
        assert losses[-1] < 0.2 * losses[0]
        ```
    """
    return optax.chain(
        scale_by_gauss_newton(**kwargs), optax.scale_by_learning_rate(learning_rate)
    )


# Expose scale_by_gauss_newton's keywords in gauss_newton's signature, so that
# `optax.inject_hyperparams(gauss_newton, static_args=...)` sees them.
gauss_newton.__signature__ = inspect.Signature(
    [inspect.signature(gauss_newton).parameters["learning_rate"]]
    + [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for p in inspect.signature(scale_by_gauss_newton).parameters.values()
    ],
    return_annotation=optax.GradientTransformationExtraArgs,
)
