"""Kronecker-factored curvature (KFAC) for Equinox models.

Each `eqx.nn.Linear`, `eqx.nn.Conv` (1-3d, `groups=1`) and `eqx.nn.Embedding` whose
weight is trained gets a block `A ⊗ G` (Martens and Grosse 2015): `A` the second
moment of the layer's input (a column of ones appended when the bias is trained:
the bias is folded in), `G` the second moment of the objective's output-space
curvature pulled back to the layer's output. Every other trained array gets the
exact diagonal of the curvature.

Layers are found without reading the jaxpr: each captured layer of the module is
swapped (a tree map) for a `_Tap` that calls the layer unchanged, then passes its
output through an identity with a custom VJP. The VJP's backward pass sees the
layer's input (saved in the forward pass) and the output cotangent, and returns
their statistics as the cotangent of a zero "probe" array held by the tap. So one
`jax.vjp` of the model with respect to the probes yields every layer's statistics,
under `vmap`, `filter_jit` or `lax.scan` alike: a layer used `R` times (positions
of a convolution, a sequence under `vmap`, the steps of a `scan`) accumulates `R`
terms, which is weight sharing.

Weight sharing follows Eschenhagen et al. (2023): `"expand"` treats the `R` uses
like extra samples, `A = mean_{n,r} a a^T`, `G = factor * sum_{n,r,k} g g^T`;
`"reduce"` first sums the uses, `A = mean_n â â^T` with `â` the mean input over
the uses, `G = factor * sum_{n,k} ĝ ĝ^T` with `ĝ` the summed output gradient.
Both equal plain KFAC when each layer is used once per sample.

Cost: the statistics need one forward and one backward pass (per column of the
loss Hessian's root for the exact GGN; one for the sampled Fisher). The Gram
matrices `sum a a^T`, `sum g g^T` are computed by `_gram`, whose batching rule
folds every mapped axis (the batch, a sequence under `vmap`) into the rows of one
`(B·R) x n` matrix product, so no per-use outer product is ever formed. A factor
larger than `max_dim` is kept as its diagonal.
"""

import os
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap
from jax.scipy.linalg import cho_factor, cho_solve
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from ._batching import vary_over_shards
from ._checks import check_data, check_numbers, check_positive
from ._conv import conv_patches, with_matmul_convs
from ._jacobian import check_jac
from ._losses import LossFn, loss_hessian_root, resolve_loss


WEIGHT_SHARING = ("expand", "reduce")
# Factors above this size are diagonal by default: a dense `d x d` factor costs
# `4 d^2` bytes and an eigendecomposition of order `d^3` (0.6 s at 2048, 4.4 s at
# 4096 on 2 CPU cores; see docs/kfac.md).
MAX_DIM = 2048


class KroneckerFactor(NamedTuple):
    """One layer's curvature block `A ⊗ G`, both at least float32.

    - `a`: `(n, n)`, the input second moment, with the bias folded in as the last
        row and column; for `eqx.nn.Embedding`, the diagonal `(num_embeddings,)`
        (the inputs are one-hot).
    - `g`: `(m, m)`, the output-gradient second moment, `m` the output features
        (channels for a convolution).

    A factor whose size is above `max_dim` (see [`eqx_ggn.kfac_factors`][]) is
    its diagonal, a vector, instead.

    In the flattened order of `weight` `(m, n)` (with the bias appended as a last
    column), the block is `kron(g, a)`; for an embedding's `weight` `(n, m)` it is
    `kron(diag(a), g)`.

    !!! example

        ```python
        import equinox as eqx
        import jax, jax.numpy as jnp
        import eqx_ggn

        linear = eqx.nn.Linear(3, 2, key=jax.random.key(0))
        x = jax.random.normal(jax.random.key(1), (5, 3))
        batch = {"input": x, "target": jnp.zeros((5, 2))}
        block = eqx_ggn.kfac_factors(linear, batch, "mse")
        assert isinstance(block, eqx_ggn.KroneckerFactor)
        # One Linear layer under mse: A ⊗ G is its GGN, in [weight | bias] order.
        ggn = jnp.kron(block.g, block.a)  # (2 * 4, 2 * 4)
        ```
    """

    a: Float[Array, "n n"] | Float[Array, " n"]
    g: Float[Array, "m m"] | Float[Array, " m"]


class KroneckerEigen(NamedTuple):
    """Eigendecompositions of one `KroneckerFactor`: `a = a_vectors diag(a_values)
    a_vectors^T` (`a_vectors` is `None` for a diagonal `a`), and likewise `g`."""

    a_values: Float[Array, " n"]
    a_vectors: Float[Array, "n n"] | None
    g_values: Float[Array, " m"]
    g_vectors: Float[Array, "m m"] | None


class KroneckerInverse(NamedTuple):
    """The damped inverses of one `KroneckerFactor`'s factors, `(A + π √λ I)^{-1}`
    and `(G + √λ / π I)^{-1}` (see [`eqx_ggn.kfac_inverse`][]); a diagonal factor's
    as a vector."""

    a: Float[Array, "n n"] | Float[Array, " n"]
    g: Float[Array, "m m"] | Float[Array, " m"]


class KFACState(NamedTuple):
    """The KFAC part of the optimizer state.

    - `factors`: the running averages of the factors, a pytree like the trained
        parameters with a [`eqx_ggn.KroneckerFactor`][] in place of each captured
        layer and the curvature's diagonal in place of every other trained array.
    - `eigen`: their eigendecompositions at the last refresh (a `KroneckerEigen` per
        layer, a copy of the diagonal elsewhere).


    !!! example

        ```python
        import equinox as eqx
        import jax, optax
        import eqx_ggn

        mlp = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
        opt = eqx_ggn.gauss_newton(1.0, loss_fn="mse", solver="kfac")
        state = opt.init(eqx.filter(mlp, eqx.is_inexact_array))
        factors = optax.tree.get(state, "factors")
        assert factors.layers[0].a.shape == (3, 3)  # 2 inputs and the bias
        ```
    """

    factors: PyTree
    eigen: PyTree


def _is_layer(node: Any) -> bool:
    return isinstance(node, eqx.nn.Linear | eqx.nn.Conv | eqx.nn.Embedding)


def _captured(spec: Any) -> bool:
    """Whether the trained-parameter node `spec` gets a Kronecker block: a supported
    layer, its weight trained, unstacked, and for a convolution `groups=1`."""
    if not _is_layer(spec) or getattr(spec, "weight", None) is None:
        return False
    if isinstance(spec, eqx.nn.Conv):
        return spec.groups == 1 and spec.weight.ndim == spec.num_spatial_dims + 2
    return spec.weight.ndim == 2


def _has_bias(spec: Any) -> bool:
    return getattr(spec, "bias", None) is not None


def _map_blocks(
    on_layer: Callable, on_leaf: Callable, model: PyTree, trained: PyTree
) -> PyTree:
    """Map each captured layer of `model` by `on_layer(node, spec)` and every other
    trained leaf by `on_leaf(leaf)`; keep the rest. `trained` is the trained part
    (`eqx.filter(model, filter_spec)`); the traversal order is fixed, so lists
    built in one call line up with another's."""

    def visit(node, spec):
        if _captured(spec):
            return on_layer(node, spec)
        if _is_layer(node):
            return jax.tree.map(lambda x, s: x if s is None else on_leaf(x), node, spec)
        return node if spec is None else on_leaf(node)

    return jax.tree.map(visit, model, trained, is_leaf=_is_layer)


def _block_sizes(spec: Any) -> tuple[int, int]:
    """`(n, m)`: the sizes of `A` and `G` for a captured layer."""
    weight = spec.weight
    if isinstance(spec, eqx.nn.Embedding):
        return weight.shape[0], weight.shape[1]
    return int(np.prod(weight.shape[1:])) + _has_bias(spec), weight.shape[0]


def _stat_dtype(spec: Any) -> Any:
    return jnp.result_type(jnp.float32, spec.weight.dtype)


def _input_rows(layer: Any, x: Array, bias: bool, dtype: Any) -> Array:
    """`(R, n)`: the layer's input, one row per use of the weight (im2col patches
    for a convolution, a one-hot row for an embedding)."""
    if isinstance(layer, eqx.nn.Embedding):
        return jax.nn.one_hot(jnp.reshape(x, (1,)), layer.num_embeddings, dtype=dtype)
    if isinstance(layer, eqx.nn.Conv):
        # Slices, not `conv_general_dilated_patches` (a convolution): the factors
        # are computed inside a `lax.cond`, see `_conv.py`.
        patches = conv_patches(layer, x.astype(dtype))
        rows = patches.reshape(patches.shape[0] * patches.shape[1], -1).T
    else:
        rows = jnp.reshape(x, (1, -1)).astype(dtype)
    if bias:
        rows = jnp.concatenate([rows, jnp.ones((rows.shape[0], 1), dtype)], axis=1)
    return rows


def _output_rows(layer: Any, cotangent: Array, dtype: Any) -> Array:
    """`(R, m)`: the output cotangent, one row per use of the weight."""
    if isinstance(layer, eqx.nn.Conv):
        return cotangent.reshape(cotangent.shape[0], -1).T.astype(dtype)
    return jnp.reshape(cotangent, (1, -1)).astype(dtype)


class _Layout(NamedTuple):
    """How a captured layer's block is built: `expand` (per-use statistics) or
    reduce, and which factors are diagonal (an embedding's `A`; any factor above
    `max_dim`)."""

    expand: bool
    a_diagonal: bool
    g_diagonal: bool


def _layout(spec: Any, weight_sharing: str, max_dim: int) -> _Layout:
    n, m = _block_sizes(spec)
    embedding = isinstance(spec, eqx.nn.Embedding)
    # Embeddings always expand (their inputs are one-hot).
    expand = weight_sharing == "expand" or embedding
    return _Layout(expand, embedding or n > max_dim, m > max_dim)


def _fold_mapped_axis(function: Callable) -> Callable:
    """`function(rows, marker)`, a sum over the rows, with a batching rule that
    folds the mapped axis into the rows and returns the total unbatched: under the
    statistics' own `vmap`s (over samples, uses, or the columns of the loss
    Hessian's root) it stays one matrix product over all rows, and its cotangent
    is not summed again. `marker` is a zero scalar that depends on everything the
    caller is given: a `vmap` that maps it is the caller's own (over batches or
    keys), and is mapped as usual."""
    folded = custom_vmap(function)

    @folded.def_vmap
    def rule(axis_size, in_batched, rows, marker):
        rows_batched, marker_batched = in_batched
        if marker_batched:  # a caller's vmap: one result per element
            if not rows_batched:
                rows = jnp.broadcast_to(rows, (axis_size, *rows.shape))
            return jax.vmap(function)(rows, marker), True
        if rows_batched:
            rows = rows.reshape(-1, rows.shape[-1])
        return folded(rows, marker), False

    return folded


_gram = _fold_mapped_axis(lambda rows, marker: rows.T @ rows + marker)  # sum x x^T
_square_sum = _fold_mapped_axis(lambda rows, marker: jnp.sum(rows * rows, 0) + marker)


def _marker(*trees: Any) -> Array:
    """A zero scalar that depends on every array in `trees` (see
    `_fold_mapped_axis`); zero also for non-finite values."""
    zero = jnp.zeros((), jnp.float32)
    for leaf in jax.tree.leaves(trees):
        if not eqx.is_array(leaf):
            continue
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        # `leaf == leaf`, not `isfinite` (a constant for integers).
        zero = zero + 0 * jnp.sum(leaf == leaf).astype(jnp.float32)
    return zero


class _Probe(NamedTuple):
    """Zero arrays whose cotangents are a layer's statistics (`None` where the
    layout needs none).

    `a_outer`, `g_outer` (expand; shared by the batch): `sum a a^T`, `sum g g^T`
    over all uses, or their diagonals; `a_sum`, `g_sum` (reduce; one per sample):
    `sum a`, `sum g` over the uses; `uses` (one per sample): `R`; `marker`
    (shared): the zero scalar of `_marker`.
    """

    a_outer: Array | None
    g_outer: Array | None
    a_sum: Array | None
    g_sum: Array | None
    uses: Array
    marker: Array


def _observe(
    layer: Any, layout: _Layout, bias: bool, x: Array, y: Array, probe: _Probe
) -> Array:
    """`y`, unchanged; its VJP returns the layer's statistics as `probe`'s cotangent."""
    static = eqx.filter(layer, eqx.is_array, inverse=True)  # no arrays closed over
    dtype = probe.uses.dtype

    @jax.custom_vjp
    def observe(x, y, probe):
        return y

    def forward(x, y, probe):
        return y, (x, probe.marker)

    def backward(residuals, cotangent):
        x, marker = residuals
        a = _input_rows(static, x, bias, dtype)
        g = _output_rows(static, cotangent, dtype)
        marker = marker.astype(dtype)

        def outer(rows, diagonal):
            return (_square_sum if diagonal else _gram)(rows, marker)

        expand = layout.expand
        # The use count depends on the input through a zero: under `vmap`, a
        # constant cotangent would not be summed over the mapped axis.
        stats = _Probe(
            a_outer=outer(a, layout.a_diagonal) if expand else None,
            g_outer=outer(g, layout.g_diagonal) if expand else None,
            a_sum=None if expand else jnp.sum(a, 0),
            g_sum=None if expand else jnp.sum(g, 0),
            uses=a.shape[0] + 0 * jnp.sum(a),
            marker=jnp.zeros_like(marker),
        )
        if jnp.issubdtype(x.dtype, jnp.inexact):
            x_cotangent = jnp.zeros_like(x)
        else:
            x_cotangent = np.zeros(x.shape, jax.dtypes.float0)
        return x_cotangent, cotangent, stats

    observe.defvjp(forward, backward)
    return observe(x, y, probe)


class _Tap(eqx.Module):
    """A captured layer: calls it unchanged and observes its input and output."""

    layer: Any
    probe: _Probe
    layout: _Layout = eqx.field(static=True)
    bias: bool = eqx.field(static=True)

    def __getattr__(self, name):  # the layer's fields, e.g. `in_features`
        return getattr(self.layer, name)

    def __call__(self, x, *args, **kwargs):
        # Computed under a `lax.cond` (`kfac_every`): see `_conv.py`.
        y = with_matmul_convs(self.layer)(x, *args, **kwargs)
        return _observe(self.layer, self.layout, self.bias, x, y, self.probe)


def _zero_probe(spec: Any, layout: _Layout, num_samples: int, marker: Array) -> _Probe:
    n, m = _block_sizes(spec)
    dtype = _stat_dtype(spec)
    marker = marker.astype(dtype)
    # Zeros that depend on the marker: mapped by a caller's `vmap`, so their
    # cotangents stay one per element of the caller's map.
    zeros = lambda *shape: jnp.zeros(shape, dtype) + marker
    if layout.expand:
        a = zeros(n) if layout.a_diagonal else zeros(n, n)
        g = zeros(m) if layout.g_diagonal else zeros(m, m)
        return _Probe(a, g, None, None, zeros(num_samples), marker)
    sums = zeros(num_samples, n), zeros(num_samples, m)
    return _Probe(None, None, *sums, zeros(num_samples), marker)


def _sample_output_cotangents(
    loss_fn: LossFn,
    curvature: str,
    predictions: Array,
    target: Any,
    key: PRNGKeyArray | None,
) -> Array:
    """`(K, N, *output)`: the vectors to pull back through the network per sample.

    `"ggn"`: the `K` columns of a square root `S` of the loss Hessian, `S S^T = H`.
    `"fisher"`: one gradient of the loss at a label sampled from the model's
    predictive distribution (`E[g g^T] = H` for the built-in losses).
    `"empirical_fisher"`: the gradient at the true label.
    """
    loss = resolve_loss(loss_fn)[0]
    if curvature == "empirical_fisher":
        return jax.vmap(jax.grad(loss))(predictions, target)[None]
    if curvature == "fisher":
        if key is None:
            raise ValueError(
                "curvature='fisher' samples one label per example and needs key=."
            )
        if not isinstance(loss_fn, str):
            raise ValueError(
                "curvature='fisher' samples labels from the loss's distribution and "
                "supports the built-in losses only; use curvature='ggn' for a "
                "callable loss_fn."
            )
        noise = jax.random.normal(key, predictions.shape, predictions.dtype)
        if loss_fn == "mse":  # a Gaussian with covariance I/2: H = 2 I
            return (jnp.sqrt(2.0).astype(predictions.dtype) * noise)[None]
        if loss_fn == "none":  # covariance I
            return noise[None]
        if loss_fn == "binary_cross_entropy":
            p = jax.nn.sigmoid(predictions)
            label = jax.random.bernoulli(key, p).astype(p.dtype)
            return (p - label)[None]
        p = jax.nn.softmax(predictions, axis=-1)
        label = jax.random.categorical(key, predictions, axis=-1)
        return (p - jax.nn.one_hot(label, p.shape[-1], dtype=p.dtype))[None]
    if curvature != "ggn":
        raise ValueError(
            f"KFAC approximates curvature='ggn', 'fisher' or 'empirical_fisher', got "
            f"{curvature!r}."
        )

    def columns(pred, y):
        sqrt_t, _ = loss_hessian_root(loss_fn, pred, y, jnp.zeros_like(pred))
        basis = jnp.eye(pred.size, dtype=pred.dtype).reshape(pred.size, *pred.shape)
        root = jax.vmap(sqrt_t)(basis)  # (O, K): row i is S^T e_i
        return root.T.reshape(-1, *pred.shape)

    return jnp.swapaxes(jax.vmap(columns)(predictions, target), 0, 1)


def _memory_limit() -> int:
    """Half the memory of the default device (the host's RAM on CPU)."""
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return stats["bytes_limit"] // 2
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def _jaxpr_bytes(jaxpr: Any) -> int:
    """The bytes of every value a jaxpr computes, its sub-jaxprs included."""
    total = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            aval = var.aval
            if hasattr(aval, "shape") and hasattr(aval, "dtype"):
                total += int(np.prod(aval.shape)) * np.dtype(aval.dtype).itemsize
        for value in eqn.params.values():
            for sub in value if isinstance(value, list | tuple) else [value]:
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                if hasattr(sub, "eqns"):
                    total += _jaxpr_bytes(sub)
    return total


def _check_ggn_columns(predict: Callable, args: tuple, predictions: Array) -> None:
    """Before any allocation: the exact GGN pulls back one column of the loss
    Hessian's root per output of a sample, all at once. Raise if that needs more
    than half the device's memory."""
    columns = int(np.prod(predictions.shape[1:]))
    if columns <= 1:
        return
    needed = columns * _jaxpr_bytes(jax.make_jaxpr(predict)(*args).jaxpr)
    limit = _memory_limit()
    if needed > limit:
        raise ValueError(
            f"curvature='ggn' KFAC factors pull back one column of the loss "
            f"Hessian's square root per output, {columns} for outputs of shape "
            f"{predictions.shape[1:]} per sample, all at once: about "
            f"{needed / 2**30:.1f} GiB, over half this device's memory "
            f"({limit / 2**30:.1f} GiB). Use curvature='fisher' (one label sampled "
            "per output: one backward pass, unbiased for the GGN), or a smaller "
            "batch."
        )


def check_weight_sharing(weight_sharing: str) -> None:
    if weight_sharing not in WEIGHT_SHARING:
        raise ValueError(
            f"Unknown weight_sharing {weight_sharing!r}; valid ones are "
            f"{list(WEIGHT_SHARING)}."
        )


def curvature_statistics(
    model: PyTree,
    trained: PyTree,
    batch: dict[str, Any],
    loss_fn: LossFn,
    *,
    curvature: str = "ggn",
    weight_sharing: str = "expand",
    max_dim: int = MAX_DIM,
    factor: float | Array | None = None,
    key: PRNGKeyArray | None = None,
    axis_name: Any = None,
) -> PyTree:
    """The KFAC factors of one batch, aligned with `trained` (see `kfac_factors`):
    one forward pass and one backward pass per pulled-back column."""
    check_weight_sharing(weight_sharing)
    num_samples = check_data(batch, "batch")
    inputs, target = batch["input"], batch["target"]
    specs, others = [], []
    _map_blocks(
        lambda node, spec: specs.append(spec),
        lambda leaf: others.append(leaf),
        model,
        trained,
    )
    layouts = [_layout(s, weight_sharing, max_dim) for s in specs]
    # Batched exactly when the caller maps this function (over batches, keys or
    # models): `_gram` then keeps one result per element of the caller's map.
    marker = _marker(inputs, target, trained, key)
    probes = [
        _zero_probe(spec, layout, num_samples, marker)
        for spec, layout in zip(specs, layouts, strict=True)
    ]
    # The per-sample parts are mapped over the batch, the rest is shared by it.
    per_sample = [(p.a_sum, p.g_sum, p.uses) for p in probes]
    shared = [(p.a_outer, p.g_outer, p.marker) for p in probes]
    batched = [jnp.broadcast_to(x, (num_samples, *x.shape)) for x in others]
    # Under shard_map each shard's statistics differ: the probes vary with it.
    shared, per_sample, batched = vary_over_shards(
        (shared, per_sample, batched), axis_name
    )

    def predict(shared, per_sample, batched):
        def one(x, sample_probes, sample_others):
            probes = iter(
                _Probe(a, g, *p, marker)
                for (a, g, marker), p in zip(shared, sample_probes, strict=True)
            )
            layout = iter(layouts)
            leaves = iter(sample_others)
            tapped = _map_blocks(
                lambda node, spec: _Tap(
                    node, next(probes), next(layout), _has_bias(spec)
                ),
                lambda leaf: next(leaves),
                model,
                trained,
            )
            return tapped(x)

        return jax.vmap(one)(inputs, per_sample, batched)

    args = (shared, per_sample, batched)
    predictions, pullback = jax.vjp(predict, *args)
    if curvature == "ggn":
        _check_ggn_columns(predict, args, predictions)
    cotangents = _sample_output_cotangents(loss_fn, curvature, predictions, target, key)
    # One backward pass per column k. The Gram matrices come back summed over k
    # (and over the batch and the uses) by `_gram`'s batching rule, so are the
    # same in every row k; the per-sample sums and the other leaves do not.
    shared_ct, sample_ct, others_ct = jax.vmap(pullback)(cotangents)
    if factor is None:
        factor = 1.0 / num_samples
    total = lambda x: x if axis_name is None else jax.lax.psum(x, axis_name)
    n = total(jnp.asarray(num_samples))

    blocks = []
    for spec, layout, (a_outer, g_outer, _), (a_sum, g_sum, count) in zip(
        specs, layouts, shared_ct, sample_ct, strict=True
    ):
        dtype = _stat_dtype(spec)
        scale = jnp.asarray(factor, dtype)
        count = count[0]  # the same for every k
        if layout.expand:
            uses = total(jnp.sum(count))
            a = total(a_outer[0]) / jnp.maximum(uses, 1).astype(dtype)
            g = scale * total(g_outer[0])
        else:
            mean = a_sum[0] / jnp.maximum(count, 1)[:, None]
            if layout.a_diagonal:
                a = total(jnp.sum(jnp.square(mean), 0))
            else:
                a = total(mean.T @ mean)
            a = a / n.astype(dtype)
            if layout.g_diagonal:
                g = scale * total(jnp.sum(jnp.square(g_sum), (0, 1)))
            else:
                g = scale * total(jnp.einsum("knm,knl->ml", g_sum, g_sum))
        blocks.append(KroneckerFactor(a, g))

    def diagonal(ct):
        ct = ct.astype(jnp.result_type(jnp.float32, ct))
        return jnp.asarray(factor, ct.dtype) * total(jnp.sum(jnp.square(ct), (0, 1)))

    diagonals = [diagonal(ct) for ct in others_ct]
    blocks, diagonals = iter(blocks), iter(diagonals)
    return _map_blocks(
        lambda node, spec: next(blocks), lambda leaf: next(diagonals), trained, trained
    )


def kfac_factors(
    model: PyTree,
    batch: dict[str, Any],
    loss_fn: LossFn = "mse",
    *,
    filter_spec: Any = eqx.is_inexact_array,
    curvature: str = "ggn",
    weight_sharing: str = "expand",
    max_dim: int = MAX_DIM,
    factor: float | Float[Array, ""] | None = None,
    key: PRNGKeyArray | None = None,
    jac: str | None = None,
) -> PyTree:
    r"""Kronecker-factored (KFAC) blocks of the curvature of an Equinox model.

    The objective is the package's `factor * sum_i loss_fn(model(x_i), y_i)` (by
    default the batch mean). Each `eqx.nn.Linear`, `eqx.nn.Conv1d/2d/3d` (with
    `groups=1`) and `eqx.nn.Embedding` whose weight is trained gets a block `A ⊗ G`
    (a [`eqx_ggn.KroneckerFactor`][]): `A` the second moment of the layer's input
    with the bias folded in, `G` that of the output-space curvature pulled back to
    the layer's output. Every other trained array (LayerNorm scales, a grouped
    convolution, custom parameters) gets the **exact** diagonal of the curvature;
    arrays left out by `filter_spec` get nothing. The layers are found by swapping
    them for tapping wrappers, so any model that calls them works, also under
    `jax.vmap`, `eqx.filter_jit` and `jax.lax.scan`.

    **Arguments:**

    - `model`: an Equinox module, called on one input.
    - `batch`: `{"input": X, "target": Y}` with a leading batch axis.
    - `loss_fn`: `"mse"`, `"cross_entropy"`, `"binary_cross_entropy"`, `"none"`, or
        a callable `loss(pred, target) -> scalar` for one sample.
    - `filter_spec`: which arrays are trained, as for [`eqx_ggn.partition`][].
    - `curvature`: `"ggn"` (exact output-space curvature: one backward pass per
        column of a square root of the loss Hessian, i.e. per output of a sample,
        all at once; raises a `ValueError` before allocating when that needs over
        half the device's memory, e.g. per-token logits of shape `(T, vocab)`),
        `"fisher"` (Monte Carlo: one backward pass with a label sampled from the
        model per output; needs `key`; unbiased for the GGN of the built-in
        losses) or `"empirical_fisher"` (one backward pass at the true labels).
    - `weight_sharing`: `"expand"` or `"reduce"` (Eschenhagen et al. 2023), for a
        layer used several times per sample (the positions of a convolution, a
        sequence, the steps of a scan). `"expand"` treats the uses as extra
        samples: right when each use has its own loss term (per-token or per-pixel
        outputs). `"reduce"` averages the inputs and sums the output gradients over
        the uses first: right when the uses are pooled before the loss, and
        cheaper. Embeddings always expand (their inputs are one-hot). Either way
        the statistics cost one backward pass and one `(B·R) x d` Gram matrix per
        factor, whatever `R`.
    - `max_dim`: a factor larger than this is kept as its diagonal (a vector),
        e.g. `G` of a large vocabulary head: a dense `d x d` factor costs `4 d^2`
        bytes and an eigendecomposition of order `d^3`.
    - `factor`: the objective's factor; defaults to `1 / batch_size`.
    - `key`: a PRNG key, for `curvature="fisher"`.
    - `jac`: `None`, `"fwd"` or `"bwd"`, as elsewhere in the package. The
        statistics come from VJPs alone in every mode, so a model with a
        `jax.custom_vjp` works whatever `jac` says; it is checked and accepted so
        that one setting can be passed everywhere.

    **Returns:**

    A pytree like `eqx.filter(model, filter_spec)`, with a `KroneckerFactor` in place
    of each captured layer and a diagonal (an array shaped like the parameter) in
    place of every other trained array. Factors are float32 or wider, whatever the
    parameters' dtype.

    !!! example

        ```python
        import equinox as eqx
        import jax, jax.numpy as jnp
        import eqx_ggn

        mlp = eqx.nn.MLP(3, 2, 8, 1, key=jax.random.key(0))
        x = jax.random.normal(jax.random.key(1), (32, 3))
        batch = {"input": x, "target": jnp.zeros((32, 2))}
        factors = eqx_ggn.kfac_factors(mlp, batch, "mse")
        last = factors.layers[-1]  # the block of the last Linear layer
        assert last.a.shape == (9, 9) and last.g.shape == (2, 2)
        # Under mse the output Hessian is 2 I: G is exact, 2 I.
        assert jnp.allclose(last.g, 2 * jnp.eye(2))
        ```
    """
    check_jac(jac)
    check_positive(factor=factor)
    return _jitted_statistics(
        model,
        eqx.filter(model, filter_spec),
        batch,
        loss_fn,
        curvature=curvature,
        weight_sharing=weight_sharing,
        max_dim=max_dim,
        factor=factor,
        key=key,
    )


# One compiled program for callers outside `jit` (inlined under the caller's jit).
_jitted_statistics = eqx.filter_jit(curvature_statistics)


def _is_block(x: Any) -> bool:
    return isinstance(x, KroneckerFactor | KroneckerEigen | KroneckerInverse)


def zero_factors(trained: PyTree, max_dim: int = MAX_DIM) -> PyTree:
    """Zero factors shaped for the trained parameters (the optimizer's `init`)."""

    def zero_block(node, spec):
        n, m = _block_sizes(spec)
        dtype = _stat_dtype(spec)
        layout = _layout(spec, "expand", max_dim)
        a = (n,) if layout.a_diagonal else (n, n)
        g = (m,) if layout.g_diagonal else (m, m)
        return KroneckerFactor(jnp.zeros(a, dtype), jnp.zeros(g, dtype))

    def zero_diagonal(leaf):
        return jnp.zeros(leaf.shape, jnp.result_type(jnp.float32, leaf))

    return _map_blocks(zero_block, zero_diagonal, trained, trained)


def _eigen(factor: Array) -> tuple[Array, Array | None]:
    """`(values, vectors)` of a dense factor; `(factor, None)` for a diagonal."""
    if factor.ndim == 1:
        return factor, None
    return jnp.linalg.eigh(factor)


def zero_state(trained: PyTree, max_dim: int = MAX_DIM) -> KFACState:
    """Zero factors and their eigendecompositions (zero eigenvalues, identity
    eigenvectors, so no factorization is run), shaped for the trained parameters."""
    factors = zero_factors(trained, max_dim)

    def identity(factor):
        if factor.ndim == 1:
            return factor, None
        return jnp.zeros(factor.shape[0], factor.dtype), jnp.eye(
            factor.shape[0], dtype=factor.dtype
        )

    def eigen(block):
        if not isinstance(block, KroneckerFactor):
            return block
        return KroneckerEigen(*identity(block.a), *identity(block.g))

    return KFACState(factors, jax.tree.map(eigen, factors, is_leaf=_is_block))


def eigendecompose(factors: PyTree) -> PyTree:
    """The eigendecomposition of every block (the diagonals are kept as they are)."""

    def decompose(block):
        if not isinstance(block, KroneckerFactor):
            return block
        return KroneckerEigen(*_eigen(block.a), *_eigen(block.g))

    return jax.tree.map(decompose, factors, is_leaf=_is_block)


def _layer_matrix(node: Any) -> tuple[Array, Callable[[Array], Any]]:
    """A captured layer's parameters (or gradients) as one `(m, n)` matrix, the bias
    appended as a last column (`(m, n)` = `weight.T` for an embedding), and the map
    back."""
    weight = node.weight
    if isinstance(node, eqx.nn.Embedding):
        return weight.T, lambda matrix: eqx.tree_at(
            lambda layer: layer.weight, node, matrix.T
        )
    m = weight.shape[0]
    matrix = weight.reshape(m, -1)
    if not _has_bias(node):
        return matrix, lambda mat: eqx.tree_at(
            lambda layer: layer.weight, node, mat.reshape(weight.shape)
        )
    bias = node.bias
    matrix = jnp.concatenate([matrix, bias.reshape(m, 1).astype(matrix.dtype)], axis=1)

    def back(mat):
        return eqx.tree_at(
            lambda layer: (layer.weight, layer.bias),
            node,
            (mat[:, :-1].reshape(weight.shape), mat[:, -1].reshape(bias.shape)),
        )

    return matrix, back


def _split_damping(mean_a: Array, mean_g: Array, damping: Array) -> tuple[Array, Array]:
    """Tikhonov damping `λ` split between the factors with Martens and Grosse's `π`:
    `A + π √λ I` and `G + √λ / π I`, `π = sqrt(mean_a / mean_g)` from the factors'
    mean eigenvalues `tr A / n` and `tr G / m`."""
    ratio = mean_a / mean_g
    pi = jnp.where((mean_a > 0) & (mean_g > 0) & jnp.isfinite(ratio), ratio, 1) ** 0.5
    root = jnp.sqrt(damping)
    return pi * root, root / pi


def _damped_inverse(values: Array, shift: Array) -> Array:
    """`1 / (max(values, 0) + shift)`, kept finite for a zero shift."""
    denominator = jnp.maximum(values, 0) + shift
    tiny = jnp.finfo(values.dtype).tiny
    return jnp.where(denominator > tiny, 1 / jnp.maximum(denominator, tiny), 0)


def _trace(factor: Array) -> Array:
    """`tr` of a dense factor, or the sum of a diagonal one's positive entries."""
    if factor.ndim == 1:
        return jnp.sum(jnp.maximum(factor, 0))
    return jnp.maximum(jnp.trace(factor), 0)


def mean_eigenvalue(blocks: PyTree) -> Array:
    """`tr(KFAC) / P`: the mean eigenvalue of the KFAC approximation over all `P`
    trained entries (`tr(A ⊗ G) = tr A tr G` per block; negative eigenvalues,
    from rounding, count as zero), in the blocks' precision. `blocks`: the
    eigendecompositions, or the factors themselves (their traces)."""
    total, count = 0.0, 0
    for block in jax.tree.leaves(blocks, is_leaf=_is_block):
        if isinstance(block, KroneckerEigen):
            a, g = jnp.maximum(block.a_values, 0), jnp.maximum(block.g_values, 0)
            total += jnp.sum(a) * jnp.sum(g)
            count += a.size * g.size
        elif isinstance(block, KroneckerFactor):
            total += _trace(block.a) * _trace(block.g)
            count += block.a.shape[0] * block.g.shape[0]
        else:
            total += jnp.sum(jnp.maximum(block, 0))
            count += block.size
    return jnp.asarray(total) / max(count, 1)


def apply_kfac_inverse(eigen: PyTree, vector: PyTree, damping: Array) -> PyTree:
    """`(A ⊗ G + damping)^{-1} vector`, per block, with the damping split by `π`
    (diagonal blocks: `vector / (d + damping)`), in the blocks' precision."""

    def apply(block, node):
        if not isinstance(block, KroneckerEigen):
            dtype = block.dtype
            scale = _damped_inverse(block, jnp.asarray(damping, dtype))
            return (node.astype(dtype) * scale).astype(node.dtype)
        dtype = block.g_values.dtype
        shift_a, shift_g = _split_damping(
            jnp.mean(block.a_values),
            jnp.mean(block.g_values),
            jnp.asarray(damping, dtype),
        )
        matrix, back = _layer_matrix(node)
        out_dtype = matrix.dtype
        matrix = matrix.astype(dtype)
        inv_a = _damped_inverse(block.a_values, shift_a)
        inv_g = _damped_inverse(block.g_values, shift_g)
        rotated = matrix
        if block.g_vectors is not None:
            rotated = block.g_vectors.T @ rotated
        if block.a_vectors is not None:
            rotated = rotated @ block.a_vectors
        result = rotated * inv_g[:, None] * inv_a[None, :]
        if block.g_vectors is not None:
            result = block.g_vectors @ result
        if block.a_vectors is not None:
            result = result @ block.a_vectors.T
        return back(result.astype(out_dtype))

    return jax.tree.map(apply, eigen, vector, is_leaf=_is_block)


def _shifted_inverse(factor: Array, shift: Array) -> Array:
    """`(factor + shift I)^{-1}`: of a dense factor from its Cholesky factor
    (cheaper than an eigendecomposition), of a diagonal one by
    `_damped_inverse`. Where the Cholesky fails on a finite factor (a singular
    one at a zero shift) it is zero, so the layer's direction is zero
    (`grafted_kfac` then takes Adam's update for it); a non-finite factor
    stays non-finite. A `select`, not a `lax.cond` fallback: such a branch
    inside the refresh cost a small CNN's step a millisecond on a CPU."""
    if factor.ndim == 1:
        return _damped_inverse(factor, shift)
    eye = jnp.eye(factor.shape[0], dtype=factor.dtype)
    inverse = cho_solve(cho_factor(factor + shift * eye, lower=True), eye)
    failed = ~jnp.all(jnp.isfinite(inverse)) & jnp.all(jnp.isfinite(factor))
    return jnp.where(failed, 0, (inverse + inverse.T) / 2)


def damped_inverses(factors: PyTree, relative_damping: Array | float) -> PyTree:
    """Each block's `KroneckerInverse` at `λ = relative_damping * tr(KFAC) / P`
    (diagonal blocks: `1 / (d + λ)`), for `apply_damped_inverses`: a fixed
    damping needs no eigendecomposition, and the product then takes two matrix
    products per layer instead of four."""
    damping = relative_damping * mean_eigenvalue(factors)

    def invert(block):
        if not isinstance(block, KroneckerFactor):
            return _damped_inverse(block, damping.astype(block.dtype))
        mean_a = _trace(block.a) / block.a.shape[0]
        mean_g = _trace(block.g) / block.g.shape[0]
        shift_a, shift_g = _split_damping(mean_a, mean_g, damping.astype(mean_a.dtype))
        return KroneckerInverse(
            _shifted_inverse(block.a, shift_a), _shifted_inverse(block.g, shift_g)
        )

    return jax.tree.map(invert, factors, is_leaf=_is_block)


def apply_damped_inverses(inverses: PyTree, vector: PyTree) -> PyTree:
    """`G_inv M A_inv` on each captured layer's `(m, n)` matrix `M` (a diagonal
    inverse scales instead), `vector * inverse` elsewhere, in the inverses'
    precision."""

    def apply(inverse, node):
        if not isinstance(inverse, KroneckerInverse):
            return (node.astype(inverse.dtype) * inverse).astype(node.dtype)
        matrix, back = _layer_matrix(node)
        out_dtype = matrix.dtype
        matrix = matrix.astype(inverse.g.dtype)
        if inverse.g.ndim == 2:
            matrix = inverse.g @ matrix
        else:
            matrix = inverse.g[:, None] * matrix
        if inverse.a.ndim == 2:
            matrix = matrix @ inverse.a
        else:
            matrix = matrix * inverse.a[None, :]
        return back(matrix.astype(out_dtype))

    return jax.tree.map(apply, inverses, vector, is_leaf=_is_block)


def kfac_inverse(factors: PyTree, damping: float | Float[Array, ""]) -> Callable:
    r"""The damped KFAC inverse as a function of a pytree like the parameters.

    Each block `A ⊗ G` of [`eqx_ggn.kfac_factors`][] is damped as `(A + π √λ I) ⊗
    (G + √λ / π I)`, with Martens and Grosse's `π = sqrt((tr A / n) / (tr G / m))`
    splitting the Tikhonov damping `λ` between the factors; a diagonal block as
    `d + λ`. The inverse comes from one eigendecomposition per factor.

    **Arguments:**

    - `factors`: the output of `kfac_factors`.
    - `damping`: `λ >= 0`.

    **Returns:**

    A function `vector -> (KFAC + λ)^{-1} vector` on pytrees like the trained
    parameters (e.g. a gradient from `eqx.filter_grad`).

    !!! example

        ```python
        import equinox as eqx
        import jax, jax.numpy as jnp
        import eqx_ggn

        k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
        net = eqx.nn.Sequential(
            [eqx.nn.Linear(3, 8, key=k1), eqx.nn.Lambda(jnp.tanh),
             eqx.nn.Linear(8, 2, key=k2)]
        )
        x = jax.random.normal(k3, (32, 3))
        batch = {"input": x, "target": jnp.zeros((32, 2))}
        factors = eqx_ggn.kfac_factors(net, batch, "mse")
        grad = eqx.filter_grad(
            lambda m: jnp.mean(jnp.sum(jax.vmap(m)(x) ** 2, axis=1))
        )(net)
        step = eqx_ggn.kfac_inverse(factors, 1e-3)(grad)  # like the gradient
        flat = lambda t: jax.flatten_util.ravel_pytree(
            eqx.filter(t, eqx.is_inexact_array)
        )[0]
        assert flat(step) @ flat(grad) > 0  # a descent direction
        ```
    """
    check_numbers(damping=(damping, 0, float("inf")))
    eigen = eigendecompose(factors)
    return lambda vector: apply_kfac_inverse(eigen, vector, damping)


def step_statistics(
    model: PyTree,
    trained: PyTree,
    batch: dict[str, Any],
    loss_fn: LossFn,
    count: Array,
    **kwargs: Any,
) -> Callable[[], PyTree]:
    """The factors of an optimizer's step, as the thunk `update_kfac_state` calls
    only on the steps that fold them: `curvature_statistics` of `model` with
    `trained` swapped in, the sampled Fisher's key folded from the step `count`.
    `kwargs` go to `curvature_statistics`."""
    key = jax.random.fold_in(jax.random.key(0), count)
    return lambda: curvature_statistics(
        eqx.combine(trained, model), trained, batch, loss_fn, key=key, **kwargs
    )


def update_kfac_state(
    state: KFACState,
    statistics: Callable[[], PyTree],
    count: Array,
    decay: float | Array,
    every: int | Array,
    inverse_every: int | Array,
    refresh: bool | Array = True,
) -> KFACState:
    """Every `every` steps, fold one batch's factors (`statistics()`, run only
    then) into the running average; every `inverse_every` steps where `refresh`
    holds (the step uses the inverse), refresh the eigendecompositions.

    The `k`-th fold averages with weight `1 - min(decay, 1 - 1/k)` (Martens and
    Grosse 2015): the first batch replaces the zeros, the first `1 / (1 -
    decay)` folds are averaged uniformly, and only then does the exponential
    decay take over, so no early batch outweighs the later ones."""
    factors = fold_factors(state.factors, statistics, count, decay, every)
    eigen = jax.lax.cond(
        is_due(count, inverse_every) & refresh,
        eigendecompose,
        lambda _: state.eigen,
        factors,
    )
    return KFACState(factors, eigen)


def is_due(count: Array, period: int | Array) -> Array:
    """Whether step `count` is one of every `period`-th (`0, period, ...`)."""
    return (count % jnp.maximum(jnp.asarray(period), 1)) == 0


def fold_factors(
    factors: PyTree,
    statistics: Callable[[], PyTree],
    count: Array,
    decay: float | Array,
    every: int | Array,
) -> PyTree:
    """The running factors with one batch's (`statistics()`, run only then)
    folded in every `every` steps, as `update_kfac_state` describes."""
    folds = count // jnp.maximum(jnp.asarray(every), 1) + 1  # this fold's number
    decay = jnp.minimum(jnp.asarray(decay, jnp.float32), 1 - 1 / folds)

    def fold(factors):
        return jax.tree.map(
            lambda old, new: (decay * old + (1 - decay) * new).astype(old.dtype),
            factors,
            statistics(),
        )

    return jax.lax.cond(is_due(count, every), fold, lambda f: f, factors)
