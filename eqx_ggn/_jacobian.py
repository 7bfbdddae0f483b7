"""The model's Jacobian at one point, linearized once in forward or reverse mode.

- `"fwd"`: `jax.linearize`. `J v` is the linear map, `Jᵀ u` its transpose.
- `"bwd"`: `jax.vjp`, for models with a `jax.custom_vjp` (a custom backward rule
  has no forward mode). `Jᵀ u` is the pullback; `J v` is the pullback's own VJP
  (`u ↦ Jᵀ u` is linear, so `J v` is the gradient of `u ↦ ⟨Jᵀ u, v⟩`), which
  differentiates the backward rule once more. Both are linearized here, once, so
  a product replays stored residuals and never the forward pass.

`jac=None` takes `"fwd"` unless the linearized map holds a `custom_vjp` rule, which
JAX can only transpose, and `"bwd"` then: decided from the map's jaxpr at trace
time, with no compile.
"""

from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PyTree


Jac = Literal["fwd", "bwd"]
JAC_MODES = (None, "fwd", "bwd")

_WAY_OUT = (
    "The exact solvers (solver='dense', 'sample_space' or 'auto') need only the "
    "backward rule and work on such a model with jac='bwd'. For diffrax: "
    "adjoint=diffrax.DirectAdjoint() supports both modes and every solver; the "
    "default RecursiveCheckpointAdjoint() and BacksolveAdjoint() support reverse "
    "mode only, with a backward rule (a while loop) that cannot be differentiated "
    "again, so they take the exact solvers."
)


def check_jac(jac: Any) -> None:
    """A `ValueError` for a `jac` other than `None`, `"fwd"` or `"bwd"`."""
    if jac not in JAC_MODES:
        raise ValueError(f"Unknown jac {jac!r}; valid ones are {list(JAC_MODES)}.")


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _no_forward(reason: str | None) -> ValueError:
    return ValueError(
        "This product needs J v, and with jac='bwd' J v is the VJP of the model's "
        "VJP, which differentiates the model's backward rule once more; that "
        f"fails here ({reason}). {_WAY_OUT}"
    )


class Jacobian(eqx.Module):
    """`J v` and `Jᵀ u` of a function at the point it was linearized at.

    `forward` maps `v ↦ J v` (in `"bwd"` mode a VJP, returning a 1-tuple; `None`
    when the backward rule cannot be differentiated, with the reason in
    `forward_error`); `backward` maps `u ↦ (Jᵀ u,)` (`None` in `"fwd"` mode, where
    it is the transpose of `forward`).
    """

    forward: Callable | None
    backward: Callable | None
    mode: str = eqx.field(static=True)
    forward_error: str | None = eqx.field(static=True, default=None)
    symmetric: bool = eqx.field(static=True, default=False)

    def jvp(self, vector: PyTree) -> PyTree:
        """`J v`. A `ValueError` at trace time when reverse mode cannot give it."""
        if self.symmetric:  # J v = Jᵀ v (a Hessian): the pullback alone
            return self.backward(vector)[0]
        if self.mode == "fwd":
            return self.forward(vector)
        if self.forward is None:
            raise _no_forward(self.forward_error)
        try:  # the transpose of the backward rule's linearization, traced here
            return self.forward((vector,))[0]
        except Exception as error:
            raise _no_forward(_first_line(error)) from error

    def vjp(self, cotangent: PyTree, like: PyTree) -> PyTree:
        """`Jᵀ u`, a pytree like `like` (the point's structure)."""
        if self.backward is None:
            return jax.linear_transpose(self.forward, like)(cotangent)[0]
        return self.backward(cotangent)[0]


def _transpose_only(jaxpr: Any) -> bool:
    """Whether a linearized jaxpr holds a `custom_vjp`'s rule (`custom_lin`),
    which JAX can transpose but not evaluate: no `J v` in forward mode."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "custom_lin":
            return True
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                if hasattr(sub, "eqns") and _transpose_only(sub):
                    return True
    return False


def linearize(
    function: Callable,
    primal: PyTree,
    jac: Jac | None,
    has_aux: bool = False,
    symmetric: bool = False,
) -> tuple[Any, Jacobian] | tuple[Any, Jacobian, Any]:
    """`function(primal)` and its `Jacobian` at `primal`, in the mode `jac`
    (`None`: forward mode if the function supports it, else reverse mode).

    `symmetric`: the Jacobian is symmetric (`function` is a gradient, its Jacobian
    the Hessian), so reverse mode takes `J v = Jᵀ v` from one pullback.
    """
    check_jac(jac)
    if jac != "bwd":
        out, linear_fn, *aux = jax.linearize(function, primal, has_aux=has_aux)
        if not _transpose_only(jax.make_jaxpr(linear_fn)(primal).jaxpr):
            return (out, Jacobian(linear_fn, None, "fwd"), *aux)
        if jac == "fwd":
            raise ValueError(
                "jac='fwd' needs forward-mode autodiff of the model, and the model "
                "calls a jax.custom_vjp (diffrax's default adjoint, a fused kernel, "
                "a custom gradient), which has no JVP: JAX fails with 'can't apply "
                "forward-mode autodiff (jvp) to a custom_vjp function'. Pass "
                "jac='bwd', or jac=None to pick the mode automatically."
            )
    out, vjp_fn, *aux = jax.vjp(function, primal, has_aux=has_aux)
    if symmetric:
        return (out, Jacobian(None, vjp_fn, "bwd", symmetric=True), *aux)
    try:
        zeros = jax.tree.map(jnp.zeros_like, out)
        _, dual = jax.vjp(vjp_fn, zeros)
        jacobian = Jacobian(dual, vjp_fn, "bwd")
    except Exception as error:  # the backward rule has no derivative
        jacobian = Jacobian(None, vjp_fn, "bwd", _first_line(error))
    return (out, jacobian, *aux)
