"""Splitting an Equinox module into trainable parameters and everything else."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
from jaxtyping import PyTree

from ._conv import with_matmul_convs


def partition(
    model: PyTree, filter_spec: Any = eqx.is_inexact_array
) -> tuple[PyTree, PyTree]:
    """Split a model into the parameters to train and the rest.

    This is `eqx.partition` with the same semantics: leaves selected by
    `filter_spec` go into `params`, every other leaf (integer arrays, frozen arrays
    left out by the filter spec, `None`, Python values, functions) goes into
    `static`, and `eqx.combine(params, static)` gives the model back unchanged.

    **Arguments:**

    - `model`: an Equinox module, or any pytree.
    - `filter_spec`: a callable `leaf -> bool`, or a pytree prefix of bools/callables,
        exactly as for `eqx.partition`. Defaults to `eqx.is_inexact_array`: every
        floating-point array is trained.

    **Returns:**

    A tuple `(params, static)` of two pytrees with the structure of `model`.

    !!! example

        ```python
        import equinox as eqx
        import jax
        import eqx_ggn

        mlp = eqx.nn.MLP(2, 1, 8, 2, key=jax.random.key(0))
        params, static = eqx_ggn.partition(mlp)
        model_fn = eqx_ggn.as_model_fn(static)
        y = model_fn(input=jax.numpy.ones(2), params=params)
        ```
    """
    return eqx.partition(model, filter_spec)


def as_model_fn(static: PyTree) -> Callable[..., Any]:
    """Turn the static half of a partitioned model into a laplax-style `model_fn`.

    **Arguments:**

    - `static`: the second output of [`eqx_ggn.partition`][].

    **Returns:**

    A function `model_fn(*, input, params)` that returns
    `eqx.combine(params, static)(input)`: the model evaluated on one input (or on
    whatever the model's `__call__` accepts).

    !!! example

        ```python
        import equinox as eqx
        import jax
        import eqx_ggn

        linear = eqx.nn.Linear(3, 2, key=jax.random.key(0))
        params, static = eqx_ggn.partition(linear)
        model_fn = eqx_ggn.as_model_fn(static)
        assert model_fn(input=jax.numpy.ones(3), params=params).shape == (2,)
        ```
    """

    def model_fn(*, input: Any, params: PyTree) -> Any:  # noqa: A002
        return eqx.combine(params, static)(input)

    return model_fn


def module_fn(static: PyTree) -> Callable[..., Any]:
    """`as_model_fn(static)` for eqx_ggn's own programs, whose products run inside
    loops (CG's): on a CPU each convolution is evaluated as matrix products (see
    `_conv.py`), the same function up to rounding."""

    def model_fn(*, input: Any, params: PyTree) -> Any:  # noqa: A002
        return with_matmul_convs(eqx.combine(params, static))(input)

    return model_fn
