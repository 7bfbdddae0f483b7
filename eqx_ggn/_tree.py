"""Small pytree helpers shared by the solver and the optimizer."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree


def tree_dot(a: PyTree, b: PyTree) -> Array:
    """`sum_leaves <a, b>`, accumulated in at least float32 (real part)."""

    def dot(x, y):
        dtype = jnp.result_type(jnp.float32, x, y)
        return jnp.vdot(x.astype(dtype), y.astype(dtype)).real

    return sum(
        dot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def tree_where(cond: Array, a: PyTree, b: PyTree) -> PyTree:
    """Leafwise `jnp.where(cond, a, b)`."""
    return jax.tree.map(lambda x, y: jnp.where(cond, x, y), a, b)


def tree_all_finite(tree: PyTree) -> Array:
    """Whether every entry of every leaf is finite."""
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))
