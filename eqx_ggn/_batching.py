"""The batch axis: micro-batches and shards of a mapped axis.

The operator, the exact solvers and KFAC all split a batch into micro-batches
and sum over the devices of a mapped axis the same way; the helpers live here,
below all of them.
"""

from collections.abc import Hashable

import jax
from jaxtyping import PyTree


AxisName = Hashable | tuple[Hashable, ...]


def sum_over_shards(tree: PyTree, axis_name: AxisName | None) -> PyTree:
    """`lax.psum` over the mapped batch axis, or nothing outside a mapped axis."""
    return tree if axis_name is None else jax.lax.psum(tree, axis_name)


def vary_over_shards(tree: PyTree, axis_name: AxisName | None) -> PyTree:
    """Mark replicated arrays as varying over the mapped batch axis.

    Under `shard_map`'s type checks (`check_vma=True`), differentiating through a
    replicated input makes JAX insert its own `psum` of the cotangents. Casting the
    parameters and the product's vector to "varying" first keeps every shard's
    gradient and product local, so that the one explicit `psum` in this module is
    the only sum, with or without the checks. A `lax.scan` carry that starts as
    replicated zeros and accumulates shard-local sums needs the same cast.
    """
    if axis_name is None:
        return tree
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)

    def cast(x):
        aval = jax.typeof(x)
        varying = getattr(aval, "vma", None)  # its name in older jax
        if varying is None:
            varying = aval.manual_axis_type.varying
        missing = tuple(n for n in names if n not in varying)
        if not missing:
            return x
        if hasattr(jax.lax, "pcast"):
            return jax.lax.pcast(x, missing, to="varying")
        return jax.lax.pvary(x, missing)  # jax < 0.9

    return jax.tree.map(cast, tree)


def to_microbatches(tree: PyTree, n: int) -> PyTree:
    """Split every leaf's leading batch axis `B` into `(n, B // n)`, strided.

    Micro-batch `j` holds samples `j, j + n, j + 2n, ...`: a batch sharded in
    contiguous blocks over devices then gives every device an equal share of every
    micro-batch, and the split needs no communication.
    """
    return jax.tree.map(
        lambda x: x.reshape((x.shape[0] // n, n, *x.shape[1:])).swapaxes(0, 1), tree
    )


def from_microbatches(tree: PyTree) -> PyTree:
    """Undo `to_microbatches`: back to one batch axis, in the original order."""
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape((-1, *x.shape[2:])), tree)
