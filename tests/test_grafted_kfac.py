"""`scale_by_grafting`, `scale_by_kfac` and `grafted_kfac` against dense float64
references: explicit per-leaf norms, `jnp.linalg.solve` on each damped Kronecker
block, and `lstsq` for convergence."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_rel_close, to_f64

import eqx_ggn
from eqx_ggn._kfac import (
    _shifted_inverse,
    apply_damped_inverses,
    damped_inverses,
    eigendecompose,
    mean_eigenvalue,
)


def _problem(n=24):
    kx, km = jax.random.split(jax.random.key(3))
    x = jax.random.normal(kx, (n, 3), jnp.float64)
    target = (x[:, 0] > 0).astype(jnp.int32) + (x[:, 1] > 0).astype(jnp.int32)
    net = to_f64(eqx.nn.MLP(3, 3, 5, 2, activation=jnp.tanh, key=km))
    return net, {"input": x, "target": target}


def _grads(net, batch):
    loss = lambda m: eqx_ggn.cross_entropy_loss(
        jax.vmap(m)(batch["input"]), batch["target"]
    )
    return eqx.filter_grad(loss)(net)


def _dense_kfac_inverse(factors, layers, vector_layers, relative_damping):
    """`(A ⊗ G + λ)^{-1}` on each `[W | b]` by two dense solves, `λ` relative to
    `tr(KFAC) / P` and split by Martens and Grosse's `π`."""
    blocks = [factors.layers[i] for i in range(len(layers))]
    trace = sum(jnp.trace(b.a) * jnp.trace(b.g) for b in blocks)
    size = sum(b.a.shape[0] * b.g.shape[0] for b in blocks)
    damping = relative_damping * trace / size
    out = []
    for block, v in zip(blocks, vector_layers, strict=True):
        n, m = block.a.shape[0], block.g.shape[0]
        pi = jnp.sqrt((jnp.trace(block.a) / n) / (jnp.trace(block.g) / m))
        a = block.a + pi * jnp.sqrt(damping) * jnp.eye(n)
        g = block.g + jnp.sqrt(damping) / pi * jnp.eye(m)
        matrix = jnp.concatenate([v.weight, v.bias[:, None]], axis=1)
        x = jnp.linalg.solve(g, matrix) @ jnp.linalg.inv(a)
        out.append((x[:, :-1], x[:, -1]))
    return out


def _layer_leaves(tree):
    return [(layer.weight, layer.bias) for layer in tree.layers]


def test_grafting_gives_each_leaf_the_magnitudes_norm(x64):
    """Each leaf: `direction`'s unit vector times `magnitude`'s norm; a zero
    direction takes `magnitude`'s update; keywords reach `direction` only; the
    state keeps its structure and dtypes over steps."""

    def scale_by_keyword():
        def update(updates, state, params=None, *, scale):
            return jax.tree.map(lambda u: scale * u**3, updates), state

        return optax.GradientTransformationExtraArgs(lambda p: (), update)

    tx = eqx_ggn.scale_by_grafting(scale_by_keyword(), optax.scale_by_adam())
    params = {"w": jnp.ones(4), "b": jnp.ones(2)}
    state = tx.init(params)
    adam = optax.scale_by_adam()
    adam_state = adam.init(params)

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def step(grads, state):
        return tx.update(grads, state, params, scale=-2.0)

    for k in range(3):
        grads = {
            "w": jax.random.normal(jax.random.key(k), (4,), jnp.float64),
            "b": jnp.zeros(2),
        }
        updates, new_state = step(grads, state)
        expected, adam_state = adam.update(grads, adam_state)
        cube = -2.0 * grads["w"] ** 3
        assert_rel_close(
            updates["w"],
            cube / jnp.linalg.norm(cube) * jnp.linalg.norm(expected["w"]),
            1e-14,
        )
        assert_rel_close(updates["b"], expected["b"], 1e-14)  # zero direction
        assert jax.tree.structure(new_state) == jax.tree.structure(state)
        assert [x.dtype for x in jax.tree.leaves(new_state)] == [
            x.dtype for x in jax.tree.leaves(state)
        ]
        state = new_state


@pytest.mark.parametrize("curvature", ["ggn", "fisher"])
def test_scale_by_kfac_applies_the_damped_kronecker_inverse(x64, curvature):
    """Step 0 (and step 1, on step 0's factors with `kfac_every=2`) equals the
    dense damped solve on `kfac_factors` of the batch (the Fisher's at the
    step's key); the factors fold only on the due steps."""
    net, batch = _problem()
    params = eqx.filter(net, eqx.is_inexact_array)
    tx = eqx_ggn.scale_by_kfac(
        "cross_entropy", curvature=curvature, kfac_every=2, kfac_inverse_every=2
    )
    update = eqx.filter_jit(eqx.debug.assert_max_traces(tx.update, max_traces=1))
    factors = eqx_ggn.kfac_factors(
        net,
        batch,
        "cross_entropy",
        curvature=curvature,
        key=jax.random.fold_in(jax.random.key(0), 0),
    )
    state = tx.init(params)
    for _ in range(2):
        grads = _grads(net, batch)
        step, state = update(grads, state, params, model=net, batch=batch)
        expected = _dense_kfac_inverse(factors, net.layers, grads.layers, 0.1)
        assert_rel_close(_layer_leaves(step), expected, 1e-10)
        net = eqx.apply_updates(net, jax.tree.map(lambda s: -0.1 * s, step))
        params = eqx.filter(net, eqx.is_inexact_array)
    assert int(state.count) == 2
    assert_rel_close(state.factors.layers[0].a, factors.layers[0].a, 1e-12)


def test_damped_inverses_equal_the_eigendecompositions(x64):
    """`scale_by_kfac`'s Cholesky inverses, applied, equal `kfac_inverse` (from
    the eigendecompositions) at `λ = 0.1 tr(KFAC) / P` on every kind of block:
    dense factors, a factor kept diagonal by `max_dim`, an embedding's diagonal
    `A` (zero for tokens not in the batch) and a LayerNorm's diagonal. Where
    the Cholesky fails on a finite factor (singular, at zero shift) the
    inverse is zero; a NaN factor gives a NaN inverse."""
    keys = jax.random.split(jax.random.key(7), 4)
    net = to_f64(
        eqx.nn.Sequential(
            [
                eqx.nn.Embedding(6, 4, key=keys[0]),
                eqx.nn.Linear(4, 7, key=keys[1]),
                eqx.nn.Lambda(jnp.tanh),
                eqx.nn.LayerNorm(7),
                eqx.nn.Linear(7, 3, key=keys[2]),
            ]
        )
    )
    tokens = jnp.array([0, 1, 2, 4, 1, 0, 2, 4, 4, 1])
    batch = {"input": tokens, "target": tokens % 3}
    factors = eqx_ggn.kfac_factors(net, batch, "cross_entropy", max_dim=6)
    assert factors.layers[1].g.ndim == 1 and factors.layers[4].a.ndim == 1
    assert factors.layers[1].a.ndim == 2 and factors.layers[4].g.ndim == 2
    params = eqx.filter(net, eqx.is_inexact_array)
    vector = jax.tree.map(
        lambda p: jax.random.normal(keys[3], p.shape, p.dtype), params
    )
    damping = 0.1 * mean_eigenvalue(eigendecompose(factors))
    expected = eqx_ggn.kfac_inverse(factors, damping)(vector)
    found = apply_damped_inverses(damped_inverses(factors, 0.1), vector)
    assert_rel_close(jax.tree.leaves(found), jax.tree.leaves(expected), 1e-10)

    b = jax.random.normal(keys[0], (3, 5), jnp.float64)
    singular = jnp.zeros((5, 5)).at[:3, :3].set(b @ b.T)  # rank 3
    shifted = jnp.linalg.inv(singular + 0.5 * jnp.eye(5))
    assert_rel_close(_shifted_inverse(singular, 0.5), shifted, 1e-12)
    assert jnp.all(_shifted_inverse(singular, 0.0) == 0)  # the Cholesky fails
    assert jnp.all(jnp.isnan(_shifted_inverse(singular.at[0, 0].set(jnp.nan), 0.5)))


@pytest.mark.parametrize("inject", [False, True])
def test_grafted_kfac_is_kfac_momentum_at_adams_length(x64, inject):
    """Two steps of `grafted_kfac` (also under `optax.inject_hyperparams`, with
    no `static_args`) against the composition done by hand: Nesterov momentum,
    the dense damped KFAC solve, each leaf rescaled to Adam's norm, times
    `-learning_rate`."""
    net, batch = _problem()
    lr = 0.05
    alias = eqx_ggn.grafted_kfac
    if inject:
        alias = optax.inject_hyperparams(alias)
    opt = alias(learning_rate=lr, loss_fn="cross_entropy", curvature="ggn")
    state = opt.init(eqx.filter(net, eqx.is_inexact_array))
    adam = optax.scale_by_adam(b1=0.9, nesterov=True)
    adam_state = adam.init(eqx.filter(net, eqx.is_inexact_array))
    factors = eqx_ggn.kfac_factors(net, batch, "cross_entropy", curvature="ggn")
    trace = None
    for _ in range(2):
        grads = _grads(net, batch)
        params = eqx.filter(net, eqx.is_inexact_array)
        updates, state = opt.update(grads, state, params, model=net, batch=batch)
        trace = (
            grads
            if trace is None
            else jax.tree.map(lambda g, t: g + 0.9 * t, grads, trace)
        )
        momentum = jax.tree.map(lambda g, t: g + 0.9 * t, grads, trace)
        sized, adam_state = adam.update(grads, adam_state)
        directions = _dense_kfac_inverse(factors, net.layers, momentum.layers, 0.1)
        expected = [
            tuple(
                -lr * d * jnp.linalg.norm(s) / jnp.linalg.norm(d)
                for d, s in zip(direction, size, strict=True)
            )
            for direction, size in zip(directions, _layer_leaves(sized), strict=True)
        ]
        assert_rel_close(_layer_leaves(updates), expected, 1e-10)
        net = eqx.apply_updates(net, updates)


def test_grafted_kfac_converges_to_least_squares(x64):
    """Full-batch linear least squares under a cosine learning rate: the
    parameters reach `lstsq`'s solution."""
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (40, 4), jnp.float64)
    y = x @ jax.random.normal(kw, (4, 2), jnp.float64) + 0.1 * jnp.sin(3 * x[:, :2])
    batch = {"input": x, "target": y}
    model = to_f64(eqx.nn.Linear(4, 2, key=jax.random.key(1)))
    steps = 1500
    opt = eqx_ggn.grafted_kfac(
        optax.cosine_decay_schedule(0.05, steps), "mse", kfac_every=1
    )
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def body(carry, _):
        params, state = carry
        m = eqx.combine(params, static)
        grads = eqx.filter_grad(
            lambda m: jnp.mean(jnp.sum((jax.vmap(m)(x) - y) ** 2, axis=1))
        )(m)
        updates, state = opt.update(grads, state, params, model=m, batch=batch)
        return (eqx.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(body, (params, opt.init(params)), None, steps)
    design = jnp.concatenate([x, jnp.ones((40, 1))], axis=1)
    solution = jnp.linalg.lstsq(design, y)[0]
    found = jnp.concatenate([params.weight.T, params.bias[None]])
    np.testing.assert_allclose(found, solution, rtol=0, atol=1e-12)


def test_scale_by_kfac_rejects_bad_input(x64):
    net, batch = _problem()
    params = eqx.filter(net, eqx.is_inexact_array)
    tx = eqx_ggn.scale_by_kfac("cross_entropy")
    with pytest.raises(ValueError, match="model=module"):
        tx.update(params, tx.init(params), params, batch=batch)
    with pytest.raises(ValueError, match="curvature"):
        eqx_ggn.scale_by_kfac(curvature="hessian")
    with pytest.raises(ValueError, match="kfac_max_dim"):
        eqx_ggn.scale_by_kfac(kfac_max_dim=2.5)
    # A batch without targets, or with another batch size, is named before any
    # factor is drawn; so is the same batch given to kfac_factors.
    with pytest.raises(ValueError, match=r"keys 'input' and 'target'.*got \['input'\]"):
        tx.update(
            params, tx.init(params), params, model=net, batch={"input": batch["input"]}
        )
    short = {"input": batch["input"], "target": batch["target"][:3]}
    with pytest.raises(ValueError, match=r"Batch axes differ: .* \(batch 3\)"):
        tx.update(params, tx.init(params), params, model=net, batch=short)
    with pytest.raises(ValueError, match=r"Batch axes differ"):
        eqx_ggn.kfac_factors(net, short, "cross_entropy")
    with pytest.raises(ValueError, match=r"updates has pytree structure"):
        tx.update({"w": jnp.ones(2)}, tx.init(params), params, model=net, batch=batch)
    # Numbers out of range are named when the optimizer is built.
    bad = [
        (r"kfac_every must be a positive int, got 0", dict(kfac_every=0)),
        (r"kfac_inverse_every .* int, got 2\.5", dict(kfac_inverse_every=2.5)),
        (r"kfac_decay must lie in \[0, 1\], got 1\.5", dict(kfac_decay=1.5)),
        (r"relative_damping .* \[0, inf\], got -1\.0", dict(relative_damping=-1.0)),
        (r"momentum must lie in \[0, 1\], got 1\.5", dict(momentum=1.5)),
        (r"eps must lie in \[0, inf\], got -1\.0", dict(eps=-1.0)),
        (r"Unknown loss_fn 'crossentropy'", dict(loss_fn="crossentropy")),
    ]
    for message, kwargs in bad:
        with pytest.raises(ValueError, match=message):
            eqx_ggn.grafted_kfac(1e-2, **kwargs)
    with pytest.raises(ValueError, match=r"damping must lie in \[0, inf\], got -1"):
        eqx_ggn.kfac_inverse(eqx_ggn.kfac_factors(net, batch, "cross_entropy"), -1.0)
    with pytest.raises(ValueError, match=r"magnitude must be an optax\.Gradient"):
        eqx_ggn.scale_by_grafting(optax.identity(), 1.0)
