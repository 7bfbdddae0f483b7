"""Trace-time checks that turn bad input into a clear `ValueError`."""

from typing import Any

import equinox as eqx
import jax
from jaxtyping import PyTree


def check_data(data: Any, name: str = "data") -> int:
    """Check `data = {"input": X, "target": Y}` and return its batch size.

    Every leaf of `X` and `Y` must carry the same leading batch axis.
    """
    if not isinstance(data, dict) or "input" not in data or "target" not in data:
        keys = list(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(
            f"{name} must be a dict with keys 'input' and 'target' (each with a "
            f"leading batch axis), got {keys}."
        )
    sizes = []
    for key in ("input", "target"):
        leaves = jax.tree_util.tree_leaves_with_path(data[key])
        for path, leaf in leaves:
            shape = getattr(leaf, "shape", None)
            where = f"{name}[{key!r}]{jax.tree_util.keystr(path)}"
            if shape is None or len(shape) == 0:
                raise ValueError(
                    f"{where} must be an array with a leading batch axis, got "
                    f"{type(leaf).__name__} with shape {shape}."
                )
            sizes.append((where, tuple(shape)))
    if not sizes:
        raise ValueError(f"{name}['input'] holds no arrays.")
    first_where, first_shape = sizes[0]
    for where, shape in sizes[1:]:
        if shape[0] != first_shape[0]:
            raise ValueError(
                f"Batch axes differ: {first_where} has shape {first_shape} (batch "
                f"{first_shape[0]}) but {where} has shape {shape} (batch {shape[0]})."
            )
    return first_shape[0]


def is_number(x: Any) -> bool:
    """A Python `int` or `float` (not a `bool`, not an array): a value fixed when
    the optimizer is built, which a check can read."""
    return isinstance(x, int | float) and not isinstance(x, bool)


def check_numbers(**values: tuple[Any, float, float]) -> None:
    """`name=(value, low, high)`: each Python number must lie in `[low, high]`;
    arrays (e.g. from `optax.inject_hyperparams`) are not checked."""
    for name, (value, low, high) in values.items():
        if is_number(value) and not low <= value <= high:
            raise ValueError(f"{name} must lie in [{low}, {high}], got {value}.")


def check_positive(**values: Any) -> None:
    """Each Python number must be above 0."""
    for name, value in values.items():
        if is_number(value) and not value > 0:
            raise ValueError(f"{name} must be positive, got {value}.")


def check_ordered(**values: Any) -> None:
    """Two settings, named low then high: when both are Python numbers, the first
    must not exceed the second."""
    (low_name, low), (high_name, high) = values.items()
    if is_number(low) and is_number(high) and low > high:
        raise ValueError(f"{low_name} ({low}) must not exceed {high_name} ({high}).")


def check_sizes(**values: Any) -> None:
    """Each must be a Python `int` of at least 1: a size or a loop length fixed
    at trace time, so an array is refused too."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")


def check_periods(**values: Any) -> None:
    """Each Python number must be a positive `int` (a period in steps); an array
    (from `optax.inject_hyperparams`) is not checked."""
    check_sizes(**{name: v for name, v in values.items() if is_number(v)})


def check_params(params: PyTree) -> None:
    """Every leaf of `params` must be a floating-point (or complex) array."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    if not leaves:
        raise ValueError("params holds no arrays to differentiate.")
    for path, leaf in leaves:
        if not eqx.is_inexact_array(leaf):
            dtype = getattr(leaf, "dtype", type(leaf).__name__)
            raise ValueError(
                f"params{jax.tree_util.keystr(path)} has dtype {dtype}; only "
                "floating-point arrays can be parameters. Split the model with "
                "eqx_ggn.partition(model) so that integer arrays and other "
                "non-floating leaves stay in `static`."
            )


def check_like(name: str, tree: PyTree, reference: PyTree, ref_name: str) -> None:
    """`tree` must have the pytree structure and leaf shapes of `reference`."""
    tdef, rdef = jax.tree.structure(tree), jax.tree.structure(reference)
    if tdef != rdef:
        raise ValueError(
            f"{name} has pytree structure {tdef}, but {ref_name} has structure {rdef}."
        )
    for (path, leaf), ref in zip(
        jax.tree_util.tree_leaves_with_path(tree),
        jax.tree.leaves(reference),
        strict=True,
    ):
        if jax.numpy.shape(leaf) != jax.numpy.shape(ref):
            raise ValueError(
                f"{name}{jax.tree_util.keystr(path)} has shape {jax.numpy.shape(leaf)}"
                f", but {ref_name}{jax.tree_util.keystr(path)} has shape "
                f"{jax.numpy.shape(ref)}."
            )
