from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class ScaleByGraftingState(NamedTuple):
    """The states of `scale_by_grafting`'s two transformations."""

    direction: Any
    magnitude: Any


def scale_by_grafting(
    direction: optax.GradientTransformation,
    magnitude: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
    """Layer-wise grafting: each leaf of `direction`'s update, rescaled to the norm
    of `magnitude`'s update of the same leaf.

    Both transformations see the same incoming updates. One gives each parameter
    array its direction (e.g. a curvature-preconditioned gradient), the other its
    step length (e.g. Adam's). This is how distributed Shampoo sets its step
    (Agarwal et al. 2020, "Disentangling adaptive gradient methods from learning
    rates"): it leaves the direction's scale, which a curvature estimate on a
    mini-batch gets wrong by orders of magnitude, out of the step, so the
    learning rate means what it means for `magnitude`. A leaf whose direction is
    zero takes `magnitude`'s update unchanged.

    **Arguments:**

    - `direction`: gives each leaf's direction; it gets the keyword arguments
        of `update` (e.g. `model=`, `batch=` for [`eqx_ggn.scale_by_kfac`][]).
    - `magnitude`: gives each leaf's norm; extra keywords are not passed to it.

    **Returns:**

    An `optax.GradientTransformationExtraArgs` whose state is a
    `ScaleByGraftingState(direction, magnitude)`.

    !!! example

        ```python
        import jax.numpy as jnp
        import optax
        import eqx_ggn

        # SGD's direction with Adam's per-leaf step length.
        tx = eqx_ggn.scale_by_grafting(optax.identity(), optax.scale_by_adam())
        params = {"w": jnp.ones(3), "b": jnp.zeros(2)}
        grads = {"w": jnp.array([3.0, 0.0, 4.0]), "b": jnp.array([1.0, 0.0])}
        updates, _ = tx.update(grads, tx.init(params), params)
        adam_tx = optax.scale_by_adam()
        adam, _ = adam_tx.update(grads, adam_tx.init(params))
        assert jnp.allclose(jnp.linalg.norm(updates["w"]), jnp.linalg.norm(adam["w"]))
        assert jnp.allclose(updates["w"] / jnp.linalg.norm(updates["w"]),
                            grads["w"] / 5.0)
        ```
    """
    for name, tx in (("direction", direction), ("magnitude", magnitude)):
        if not isinstance(tx, optax.GradientTransformation):
            raise ValueError(
                f"scale_by_grafting's {name} must be an optax.GradientTransformation "
                f"(e.g. optax.scale_by_adam()), got {type(tx).__name__}."
            )
    direction = optax.with_extra_args_support(direction)

    def init(params):
        return ScaleByGraftingState(direction.init(params), magnitude.init(params))

    def update(updates, state, params=None, **extra_args):
        directed, direction_state = direction.update(
            updates, state.direction, params, **extra_args
        )
        sized, magnitude_state = magnitude.update(updates, state.magnitude, params)

        def graft(d, m):
            norm = jnp.linalg.norm(d)
            scale = jnp.linalg.norm(m) / jnp.where(norm > 0, norm, 1)
            return jnp.where(norm > 0, d * scale.astype(d.dtype), m)

        grafted = jax.tree.map(graft, directed, sized)
        return grafted, ScaleByGraftingState(direction_state, magnitude_state)

    return optax.GradientTransformationExtraArgs(init, update)
