"""Convolutions as matrix products over the kernel's offsets, for the products
eqx_ggn runs inside loops on a CPU.

XLA's CPU backend runs a convolution inside a `lax.while_loop` or a `lax.cond`
branch far slower than the same convolution outside one (jax-ml/jax#12868): its
fast kernels need a memory layout it does not assign inside a loop body. CG runs
every GGN product inside a loop and KFAC computes its factors inside a
`lax.cond`; on the time-to-target benchmark's CNN a CG step with `cg_maxiter=10`
took 284 ms with XLA's convolutions and takes 18.5 ms with these
(`docs/benchmarks.md`, session 18). Written as one matrix product of the
weight with the input's strided slices, one per kernel offset (im2col), a
convolution and all its derivatives are slices, pads and matrix products, which
run as fast inside a loop as outside it.
"""

import itertools
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree


def conv_patches(layer: eqx.nn.Conv, x: Array) -> Array:
    """The input's strided slices, one per kernel offset (im2col), as slices and
    pads only: no convolution, so they are as fast inside a loop or a `lax.cond`
    as outside one.

    **Arguments:**

    - `layer`: the convolution (its kernel size, stride, dilation and padding).
    - `x`: one input, `(in_channels, *spatial)`.

    **Returns:**

    `(in_channels, offsets, *new_spatial)`, the offsets in the kernel's row-major
    order: the layout of `jax.lax.conv_general_dilated_patches`'s features.
    """
    padding = layer.padding
    if layer.padding_mode != "ZEROS":
        x, padding = layer._nonzero_pad(x), "VALID"
    if isinstance(padding, str):
        window = [
            d * (k - 1) + 1
            for k, d in zip(layer.kernel_size, layer.dilation, strict=True)
        ]
        padding = jax.lax.padtype_to_pads(x.shape[1:], window, layer.stride, padding)
    x = jnp.pad(x, ((0, 0), *padding))
    out_shape = [
        (n - d * (k - 1) - 1) // s + 1
        for n, k, s, d in zip(
            x.shape[1:], layer.kernel_size, layer.stride, layer.dilation, strict=True
        )
    ]
    pieces = []
    for offset in itertools.product(*(range(k) for k in layer.kernel_size)):
        start = [i * d for i, d in zip(offset, layer.dilation, strict=True)]
        limit = [
            b + (n - 1) * s + 1
            for b, n, s in zip(start, out_shape, layer.stride, strict=True)
        ]
        pieces.append(
            jax.lax.slice(x, (0, *start), (x.shape[0], *limit), (1, *layer.stride))
        )
    return jnp.stack(pieces, axis=1)


def conv_as_matmuls(layer: eqx.nn.Conv, x: Array) -> Array:
    """`layer(x)` for an `eqx.nn.Conv` with `groups=1`: the same convolution as
    one matrix product of the weight `(out, in, offsets)` with the input's
    strided slices `(in, offsets, *new_spatial)` of `conv_patches`.

    **Arguments:**

    - `layer`: the convolution; `groups` must be 1.
    - `x`: one input, `(in_channels, *spatial)`.

    **Returns:**

    `(out_channels, *new_spatial)`, equal to `layer(x)` up to rounding.
    """
    weight = layer.weight.reshape(*layer.weight.shape[:2], -1)
    y = jnp.tensordot(weight, conv_patches(layer, x), axes=2)
    if layer.use_bias:
        y = y + layer.bias
    return y


class _MatmulConv(eqx.Module):
    """An `eqx.nn.Conv` evaluated by `conv_as_matmuls`."""

    layer: eqx.nn.Conv

    def __getattr__(self, name: str) -> Any:  # the layer's fields, e.g. `stride`
        return getattr(self.layer, name)

    def __call__(self, x: Array, *, key: Any = None) -> Array:
        del key
        return conv_as_matmuls(self.layer, x)


def with_matmul_convs(model: PyTree) -> PyTree:
    """`model` with each `eqx.nn.Conv` of `groups=1` evaluated by
    `conv_as_matmuls` when JAX's default backend is the CPU; unchanged elsewhere
    (the GPU's convolutions were not measured inside loops). A subclass with its
    own `__call__` (a weight-standardized convolution, say) computes something
    else and is kept."""
    if jax.default_backend() != "cpu":
        return model

    def swap(node: Any) -> Any:
        plain = type(node).__call__ is eqx.nn.Conv.__call__
        if isinstance(node, eqx.nn.Conv) and node.groups == 1 and plain:
            return _MatmulConv(node)
        return node

    return jax.tree.map(swap, model, is_leaf=lambda n: isinstance(n, eqx.nn.Conv))
