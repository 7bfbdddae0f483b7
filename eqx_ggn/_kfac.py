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
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from ._batching import vary_over_shards
from ._losses import LossFn, loss_hessian_root, resolve_loss


WEIGHT_SHARING = ("expand", "reduce")


class KroneckerFactor(NamedTuple):
    """One layer's curvature block `A ⊗ G`, both at least float32.

    - `a`: `(n, n)`, the input second moment, with the bias folded in as the last
        row and column; for `eqx.nn.Embedding`, the diagonal `(num_embeddings,)`
        (the inputs are one-hot).
    - `g`: `(m, m)`, the output-gradient second moment, `m` the output features
        (channels for a convolution).

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
    g: Float[Array, "m m"]


class KroneckerEigen(NamedTuple):
    """Eigendecompositions of one `KroneckerFactor`: `a = a_vectors diag(a_values)
    a_vectors^T` (`a_vectors` is `None` for a diagonal `a`), and likewise `g`."""

    a_values: Float[Array, " n"]
    a_vectors: Float[Array, "n n"] | None
    g_values: Float[Array, " m"]
    g_vectors: Float[Array, "m m"]


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
        padding = layer.padding
        if layer.padding_mode != "ZEROS":
            x, padding = layer._nonzero_pad(x), "VALID"
        patches = jax.lax.conv_general_dilated_patches(
            x[None].astype(dtype),
            filter_shape=layer.kernel_size,
            window_strides=layer.stride,
            padding=padding,
            rhs_dilation=layer.dilation,
        )
        rows = patches.reshape(patches.shape[1], -1).T
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


class _Probe(NamedTuple):
    """Zero arrays whose cotangents are a layer's statistics.

    `a_outer`, `g_outer` (shared by the batch): `sum a a^T`, `sum g g^T` over the
    uses; `a_sum`, `g_sum`, `uses` (one per sample): `sum a`, `sum g`, `R`.
    """

    a_outer: Array
    g_outer: Array
    a_sum: Array
    g_sum: Array
    uses: Array


def _observe(layer: Any, bias: bool, x: Array, y: Array, probe: _Probe) -> Array:
    """`y`, unchanged; its VJP returns the layer's statistics as `probe`'s cotangent."""
    static = eqx.filter(layer, eqx.is_array, inverse=True)  # no arrays closed over
    dtype = probe.g_outer.dtype

    @jax.custom_vjp
    def observe(x, y, probe):
        return y

    def forward(x, y, probe):
        return y, x

    def backward(x, cotangent):
        a = _input_rows(static, x, bias, dtype)
        g = _output_rows(static, cotangent, dtype)
        diagonal = isinstance(static, eqx.nn.Embedding)
        # The use count depends on the input through a zero: under `vmap`, a
        # constant cotangent would not be summed over the mapped axis.
        stats = _Probe(
            a_outer=jnp.sum(a * a, 0) if diagonal else a.T @ a,
            g_outer=g.T @ g,
            a_sum=jnp.sum(a, 0),
            g_sum=jnp.sum(g, 0),
            uses=a.shape[0] + 0 * jnp.sum(a),
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
    bias: bool = eqx.field(static=True)

    def __getattr__(self, name):  # the layer's fields, e.g. `in_features`
        return getattr(self.layer, name)

    def __call__(self, x, *args, **kwargs):
        return _observe(
            self.layer, self.bias, x, self.layer(x, *args, **kwargs), self.probe
        )


def _zero_probe(spec: Any, num_samples: int) -> _Probe:
    n, m = _block_sizes(spec)
    dtype = _stat_dtype(spec)
    a_outer = (n,) if isinstance(spec, eqx.nn.Embedding) else (n, n)
    return _Probe(
        jnp.zeros(a_outer, dtype),
        jnp.zeros((m, m), dtype),
        jnp.zeros((num_samples, n), dtype),
        jnp.zeros((num_samples, m), dtype),
        jnp.zeros((num_samples,), dtype),
    )


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


def _expand_outer_products(
    pullback: Callable, cotangents: Array, shared: list, needed: Array
) -> tuple[list, list]:
    """The per-use outer products `sum a a^T` and `sum_k g g^T` of every layer when
    `needed` (some expanding layer is used more than once per sample), else
    zeros: one pass for `A`, then one per column `k` in sequence, which bounds
    memory. A layer used once per sample gets the same factors from its
    per-sample sums, for free."""
    zeros = ([a for a, _ in shared], [g for _, g in shared])

    def outer(_):
        a_outer = [a for a, _ in pullback(cotangents[0])[0]]

        def column(c):
            return [g for _, g in pullback(c)[0]]

        g_outer = [jnp.sum(g, 0) for g in jax.lax.map(column, cotangents)]
        return a_outer, g_outer

    return jax.lax.cond(needed, outer, lambda _: zeros, None)


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
    factor: float | Array | None = None,
    key: PRNGKeyArray | None = None,
    axis_name: Any = None,
) -> PyTree:
    """The KFAC factors of one batch, aligned with `trained` (see `kfac_factors`)."""
    check_weight_sharing(weight_sharing)
    inputs, target = batch["input"], batch["target"]
    num_samples = jax.tree.leaves(inputs)[0].shape[0]
    specs, others = [], []
    _map_blocks(
        lambda node, spec: specs.append(spec),
        lambda leaf: others.append(leaf),
        model,
        trained,
    )
    shared = [_zero_probe(s, num_samples) for s in specs]
    per_sample = [(p.a_sum, p.g_sum, p.uses) for p in shared]
    shared = [(p.a_outer, p.g_outer) for p in shared]
    batched = [jnp.broadcast_to(x, (num_samples, *x.shape)) for x in others]
    # Under shard_map each shard's statistics differ: the probes vary with it.
    shared, per_sample, batched = vary_over_shards(
        (shared, per_sample, batched), axis_name
    )

    def predict(shared, per_sample, batched):
        def one(x, sample_probes, sample_others):
            probes = iter(
                _Probe(*s, *p) for s, p in zip(shared, sample_probes, strict=True)
            )
            leaves = iter(sample_others)
            tapped = _map_blocks(
                lambda node, spec: _Tap(node, next(probes), _has_bias(spec)),
                lambda leaf: next(leaves),
                model,
                trained,
            )
            return tapped(x)

        return jax.vmap(one)(inputs, per_sample, batched)

    predictions, pullback = jax.vjp(predict, shared, per_sample, batched)
    cotangents = _sample_output_cotangents(loss_fn, curvature, predictions, target, key)
    # The per-sample sums (cheap: no outer products), one pass per column k.
    sample_ct, others_ct = jax.vmap(lambda c: pullback(c)[1:])(cotangents)
    if factor is None:
        factor = 1.0 / num_samples
    total = lambda x: x if axis_name is None else jax.lax.psum(x, axis_name)
    uses = [total(jnp.sum(u[0])) for _, _, u in sample_ct]

    def on_every_shard(flag):
        if axis_name is None:
            return flag
        return jax.lax.pmin(flag.astype(jnp.int32), axis_name).astype(bool)

    single = [  # every sample uses the layer once
        on_every_shard(jnp.all(ct[2][0] == 1)) for ct in sample_ct
    ]
    # Embeddings always expand (their inputs are one-hot).
    expands = [
        weight_sharing == "expand" or isinstance(spec, eqx.nn.Embedding)
        for spec in specs
    ]
    shared_use = [~once for once, e in zip(single, expands, strict=True) if e]
    needed = jnp.any(jnp.stack(shared_use)) if shared_use else jnp.asarray(False)
    a_outer, g_outer = _expand_outer_products(pullback, cotangents, shared, needed)

    blocks = []
    for spec, (a_sum, g_sum, count), outer_a, outer_g, once, used, expand in zip(
        specs, sample_ct, a_outer, g_outer, single, uses, expands, strict=True
    ):
        dtype = _stat_dtype(spec)
        scale = jnp.asarray(factor, dtype)
        a_sum, count = a_sum[0], count[0]  # the same for every k
        n = total(jnp.asarray(num_samples, dtype))
        mean_input = a_sum / jnp.maximum(count, 1)[:, None]
        if isinstance(spec, eqx.nn.Embedding):
            a = total(jnp.sum(jnp.square(mean_input), 0)) / n
        else:
            a = total(mean_input.T @ mean_input) / n
        g = scale * total(jnp.einsum("knm,knl->ml", g_sum, g_sum))
        if expand:
            # Used once per sample, expand equals the sums above; otherwise the
            # per-use outer products.
            a = jnp.where(once, a, total(outer_a) / jnp.maximum(used, 1))
            g = jnp.where(once, g, scale * total(outer_g))
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
    factor: float | Float[Array, ""] | None = None,
    key: PRNGKeyArray | None = None,
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
        column of a square root of the loss Hessian), `"fisher"` (Monte Carlo: one
        backward pass with a label sampled from the model per example; needs `key`;
        unbiased for the GGN of the built-in losses) or `"empirical_fisher"`.
    - `weight_sharing`: `"expand"` or `"reduce"` (Eschenhagen et al. 2023), for a
        layer used several times per sample (the positions of a convolution, a
        sequence, the steps of a scan). `"expand"` treats the uses as extra
        samples: right when each use has its own loss term (per-token or per-pixel
        outputs). `"reduce"` averages the inputs and sums the output gradients over
        the uses first: right when the uses are pooled before the loss, and
        cheaper. Embeddings always expand (their inputs are one-hot).
    - `factor`: the objective's factor; defaults to `1 / batch_size`.
    - `key`: a PRNG key, for `curvature="fisher"`.

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
    return _jitted_statistics(
        model,
        eqx.filter(model, filter_spec),
        batch,
        loss_fn,
        curvature=curvature,
        weight_sharing=weight_sharing,
        factor=factor,
        key=key,
    )


# One compiled program for callers outside `jit` (inlined under the caller's jit).
_jitted_statistics = eqx.filter_jit(curvature_statistics)


def _is_block(x: Any) -> bool:
    return isinstance(x, KroneckerFactor | KroneckerEigen)


def zero_factors(trained: PyTree) -> PyTree:
    """Zero factors shaped for the trained parameters (the optimizer's `init`)."""

    def zero_block(node, spec):
        n, m = _block_sizes(spec)
        dtype = _stat_dtype(spec)
        a = (n,) if isinstance(spec, eqx.nn.Embedding) else (n, n)
        return KroneckerFactor(jnp.zeros(a, dtype), jnp.zeros((m, m), dtype))

    def zero_diagonal(leaf):
        return jnp.zeros(leaf.shape, jnp.result_type(jnp.float32, leaf))

    return _map_blocks(zero_block, zero_diagonal, trained, trained)


def zero_state(trained: PyTree) -> KFACState:
    """Zero factors and their eigendecompositions (zero eigenvalues, identity
    eigenvectors, so no factorization is run), shaped for the trained parameters."""
    factors = zero_factors(trained)

    def eigen(block):
        if not isinstance(block, KroneckerFactor):
            return block
        n, m = block.a.shape[0], block.g.shape[0]
        a_vectors = None if block.a.ndim == 1 else jnp.eye(n, dtype=block.a.dtype)
        g_vectors = jnp.eye(m, dtype=block.g.dtype)
        a_values = jnp.zeros(n, block.a.dtype)
        return KroneckerEigen(
            a_values, a_vectors, jnp.zeros(m, block.g.dtype), g_vectors
        )

    return KFACState(factors, jax.tree.map(eigen, factors, is_leaf=_is_block))


def eigendecompose(factors: PyTree) -> PyTree:
    """The eigendecomposition of every block (the diagonals are kept as they are)."""

    def decompose(block):
        if not isinstance(block, KroneckerFactor):
            return block
        g_values, g_vectors = jnp.linalg.eigh(block.g)
        if block.a.ndim == 1:
            return KroneckerEigen(block.a, None, g_values, g_vectors)
        a_values, a_vectors = jnp.linalg.eigh(block.a)
        return KroneckerEigen(a_values, a_vectors, g_values, g_vectors)

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


def _split_damping(eigen: KroneckerEigen, damping: Array) -> tuple[Array, Array]:
    """Tikhonov damping `λ` split between the factors with Martens and Grosse's `π`:
    `A + π √λ I` and `G + √λ / π I`, `π = sqrt((tr A / n) / (tr G / m))`."""
    mean_a = jnp.mean(eigen.a_values)
    mean_g = jnp.mean(eigen.g_values)
    ratio = mean_a / mean_g
    pi = jnp.where((mean_a > 0) & (mean_g > 0) & jnp.isfinite(ratio), ratio, 1) ** 0.5
    root = jnp.sqrt(damping)
    return pi * root, root / pi


def _damped_inverse(values: Array, shift: Array) -> Array:
    """`1 / (max(values, 0) + shift)`, kept finite for a zero shift."""
    denominator = jnp.maximum(values, 0) + shift
    tiny = jnp.finfo(values.dtype).tiny
    return jnp.where(denominator > tiny, 1 / jnp.maximum(denominator, tiny), 0)


def apply_kfac_inverse(eigen: PyTree, vector: PyTree, damping: Array) -> PyTree:
    """`(A ⊗ G + damping)^{-1} vector`, per block, with the damping split by `π`
    (diagonal blocks: `vector / (d + damping)`), in the blocks' precision."""

    def apply(block, node):
        if not isinstance(block, KroneckerEigen):
            dtype = block.dtype
            scale = _damped_inverse(block, jnp.asarray(damping, dtype))
            return (node.astype(dtype) * scale).astype(node.dtype)
        dtype = block.g_values.dtype
        shift_a, shift_g = _split_damping(block, jnp.asarray(damping, dtype))
        matrix, back = _layer_matrix(node)
        out_dtype = matrix.dtype
        matrix = matrix.astype(dtype)
        inv_a = _damped_inverse(block.a_values, shift_a)
        inv_g = _damped_inverse(block.g_values, shift_g)
        rotated = block.g_vectors.T @ matrix
        if block.a_vectors is not None:
            rotated = rotated @ block.a_vectors
        rotated = rotated * inv_g[:, None] * inv_a[None, :]
        result = block.g_vectors @ rotated
        if block.a_vectors is not None:
            result = result @ block.a_vectors.T
        return back(result.astype(out_dtype))

    return jax.tree.map(apply, eigen, vector, is_leaf=_is_block)


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
    eigen = eigendecompose(factors)
    return lambda vector: apply_kfac_inverse(eigen, vector, damping)


def update_kfac_state(
    state: KFACState,
    statistics: PyTree,
    count: Array,
    decay: float | Array,
    inverse_every: int | Array,
) -> KFACState:
    """Fold one batch's factors into the running average (the first batch replaces
    the zeros) and refresh the eigendecompositions every `inverse_every` steps."""
    decay = jnp.where(count == 0, 0.0, jnp.asarray(decay, jnp.float32))
    factors = jax.tree.map(
        lambda old, new: (decay * old + (1 - decay) * new).astype(old.dtype),
        state.factors,
        statistics,
    )
    refresh = (count % jnp.maximum(jnp.asarray(inverse_every), 1)) == 0
    eigen = jax.lax.cond(refresh, eigendecompose, lambda _: state.eigen, factors)
    return KFACState(factors, eigen)
