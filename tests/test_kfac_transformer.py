"""KFAC on a small transformer: expand-mode factors of every captured layer
(Embedding, MultiheadAttention's projections, the MLP, the head) against explicit
per-token sums from a hand-written reference forward pass, in GGN and Fisher
modes; diagonal factors above `max_dim`; the memory guard; one backward pass;
and the optimizer's `kfac_every`, `kfac_max_dim` and `kfac_rescale`."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_rel_close

import eqx_ggn
import eqx_ggn._kfac as kfac_module


VOCAB, WIDTH, CONTEXT, HEADS = 7, 8, 5, 2


class Tiny(eqx.Module):
    """Token Embedding + a free position array, pre-LayerNorm causal
    MultiheadAttention, a GELU MLP and a Linear head: `(T,)` ids -> `(T, V)`."""

    tokens: eqx.nn.Embedding
    positions: jax.Array
    norm: eqx.nn.LayerNorm
    attention: eqx.nn.MultiheadAttention
    up: eqx.nn.Linear
    down: eqx.nn.Linear
    head: eqx.nn.Linear

    def __init__(self, key):
        k = jax.random.split(key, 6)
        self.tokens = eqx.nn.Embedding(VOCAB, WIDTH, key=k[0])
        self.positions = 0.1 * jax.random.normal(k[1], (CONTEXT, WIDTH))
        self.norm = eqx.nn.LayerNorm(WIDTH)
        self.attention = eqx.nn.MultiheadAttention(HEADS, WIDTH, key=k[2])
        self.up = eqx.nn.Linear(WIDTH, 2 * WIDTH, key=k[3])
        self.down = eqx.nn.Linear(2 * WIDTH, WIDTH, key=k[4])
        self.head = eqx.nn.Linear(WIDTH, VOCAB, key=k[5])

    def __call__(self, ids):
        x = jax.vmap(self.tokens)(ids) + self.positions
        h = jax.vmap(self.norm)(x)
        mask = jnp.tril(jnp.ones((CONTEXT, CONTEXT), bool))
        x = x + self.attention(h, h, h, mask=mask)
        x = x + jax.vmap(self.down)(jax.nn.gelu(jax.vmap(self.up)(x)))
        return jax.vmap(self.head)(x)


LAYERS = ("tokens", "query", "key", "value", "output", "up", "down", "head")


def reference(model, ids, deltas):
    """The same network with every weight applied to the whole `(T, d)` sequence
    by hand and an offset `deltas[name]` `(T, m)` added to each layer's output.
    Returns the logits and each layer's per-use input rows (a column of ones
    for a bias; one-hot ids for the embedding)."""
    att = model.attention
    ones = jnp.ones((CONTEXT, 1), jnp.float64)
    rows = {"tokens": jax.nn.one_hot(ids, VOCAB, dtype=jnp.float64)}
    x = model.tokens.weight[ids] + deltas["tokens"] + model.positions
    h = jax.vmap(model.norm)(x)
    for name, proj in (
        ("query", att.query_proj),
        ("key", att.key_proj),
        ("value", att.value_proj),
    ):
        rows[name] = h  # MultiheadAttention's projections have no bias
        rows[name + "_out"] = h @ proj.weight.T + deltas[name]
    heads = lambda y: y.reshape(CONTEXT, HEADS, -1)
    q, k, v = (heads(rows[n + "_out"]) for n in ("query", "key", "value"))
    logits = jnp.einsum("shd,thd->hst", q, k) / jnp.sqrt(q.shape[-1])
    mask = jnp.tril(jnp.ones((CONTEXT, CONTEXT), bool))
    weights = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
    attended = jnp.einsum("hst,thd->shd", weights, v).reshape(CONTEXT, -1)
    rows["output"] = attended
    x = x + attended @ att.output_proj.weight.T + deltas["output"]
    rows["up"] = jnp.concatenate([x, ones], 1)
    u = jax.nn.gelu(x @ model.up.weight.T + model.up.bias + deltas["up"])
    rows["down"] = jnp.concatenate([u, ones], 1)
    x = x + u @ model.down.weight.T + model.down.bias + deltas["down"]
    rows["head"] = jnp.concatenate([x, ones], 1)
    out = x @ model.head.weight.T + model.head.bias + deltas["head"]
    return out, {n: rows[n] for n in LAYERS}


def output_sizes(model):
    att = model.attention
    return {
        "tokens": WIDTH,
        "query": att.query_proj.out_features,
        "key": att.key_proj.out_features,
        "value": att.value_proj.out_features,
        "output": WIDTH,
        "up": 2 * WIDTH,
        "down": WIDTH,
        "head": VOCAB,
    }


def blocks(factors):
    att = factors.attention
    return {
        "tokens": factors.tokens,
        "query": att.query_proj,
        "key": att.key_proj,
        "value": att.value_proj,
        "output": att.output_proj,
        "up": factors.up,
        "down": factors.down,
        "head": factors.head,
    }


def problem(num_samples=3, dtype=jnp.float64):
    model = jax.tree.map(
        lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x,
        Tiny(jax.random.key(0)),
    )
    ids = jax.random.randint(jax.random.key(1), (num_samples, CONTEXT), 0, VOCAB)
    target = jax.random.randint(jax.random.key(2), (num_samples, CONTEXT), 0, VOCAB)
    return model, {"input": ids, "target": target}


@eqx.filter_jit
def reference_factors(model, batch, cotangents):
    """`A = mean over samples and uses of a a^T`, `G = (1/N) sum over samples,
    uses and pulled-back vectors of g g^T`, from explicit per-token rows;
    `cotangents(logits)` maps the model's `(N, T, V)` logits to the `(N, K, T, V)`
    vectors pulled back. Also the reference network's logits."""
    sizes = output_sizes(model)
    vectors = cotangents(jax.vmap(model)(batch["input"]))

    def per_sample(ids, sample_vectors):
        zeros = {n: jnp.zeros((CONTEXT, m)) for n, m in sizes.items()}
        logits, pullback, rows = jax.vjp(
            functools.partial(reference, model, ids), zeros, has_aux=True
        )
        per_use = jax.vmap(lambda v: pullback(v)[0])(sample_vectors)  # (K, T, m)
        a = {n: rows[n].T @ rows[n] for n in LAYERS}
        g = {n: jnp.einsum("ktm,ktl->ml", per_use[n], per_use[n]) for n in LAYERS}
        return logits, a, g

    logits, a, g = jax.vmap(per_sample)(batch["input"], vectors)
    num = batch["input"].shape[0]
    uses = num * CONTEXT
    factors = {n: (a[n].sum(0) / uses, g[n].sum(0) / num) for n in LAYERS}
    return factors, logits


def check_blocks(factors, expected):
    seen = blocks(factors)
    for name in LAYERS:
        a, g = expected[name]
        block = seen[name]
        assert isinstance(block, eqx_ggn.KroneckerFactor), name
        if name == "tokens":  # one-hot inputs: the diagonal A
            assert block.a.shape == (VOCAB,)
            np.testing.assert_allclose(np.diag(a), block.a, rtol=1e-10, atol=0)
        else:
            assert_rel_close(block.a, a, 1e-10)
        assert_rel_close(block.g, g, 1e-10)


def test_expand_factors_equal_explicit_per_token_sums(x64):
    """GGN (the loss Hessian's root: `J^T H J` per token) and sampled Fisher
    (the labels drawn as the library draws them, from the same key), every
    captured layer of MultiheadAttention included; then `max_dim` makes the
    factors above it diagonal, equal to the dense factors' diagonals."""
    model, batch = problem()

    @jax.vmap
    def ggn_vectors(logits):
        # Columns of a root of the per-token softmax Hessian diag(p) - p p^T.
        p = jax.nn.softmax(logits, -1)
        sqrt = jnp.sqrt(p)
        root = jax.vmap(jnp.diag)(sqrt) - p[:, :, None] * sqrt[:, None, :]
        # (T, V, V): root root^T = diag(p) - p p^T per token
        basis = jnp.zeros((CONTEXT, VOCAB, CONTEXT, VOCAB))
        basis = basis.at[jnp.arange(CONTEXT), :, jnp.arange(CONTEXT), :].set(
            jnp.swapaxes(root, 1, 2)
        )
        return basis.reshape(CONTEXT * VOCAB, CONTEXT, VOCAB)

    factors = eqx_ggn.kfac_factors(model, batch, "cross_entropy")
    expected, logits = reference_factors(model, batch, ggn_vectors)
    assert_rel_close(logits, jax.vmap(model)(batch["input"]), 1e-12)  # same network
    check_blocks(factors, expected)

    key = jax.random.key(3)

    def fisher_vectors(logits):
        labels = jax.random.categorical(key, logits, axis=-1)
        return (jax.nn.softmax(logits, -1) - jax.nn.one_hot(labels, VOCAB))[:, None]

    fisher = eqx_ggn.kfac_factors(
        model, batch, "cross_entropy", curvature="fisher", key=key
    )
    check_blocks(fisher, reference_factors(model, batch, fisher_vectors)[0])

    # max_dim: dense factors of size 9 (up, head's A) and 16 (up's G, down's A)
    # become diagonal; smaller ones stay dense.
    small = eqx_ggn.kfac_factors(model, batch, "cross_entropy", max_dim=8)
    for name, dense in blocks(factors).items():
        block = blocks(small)[name]
        for big, kept in ((dense.a, block.a), (dense.g, block.g)):
            if big.ndim == 2 and big.shape[0] > 8:
                assert kept.shape == big.shape[:1], name
                assert_rel_close(kept, jnp.diag(big), 1e-12)
            else:
                assert kept.shape == big.shape, name
                assert_rel_close(kept, big, 1e-12)


def test_memory_guard_and_one_backward_pass(monkeypatch):
    """The exact GGN of `(T, V)` outputs raises the documented ValueError at trace
    time (no allocation: under `jax.eval_shape`) when over the limit; the
    statistics trace each captured layer's backward rule once, whatever the
    number of pulled-back columns (35 here) and uses (5 per sample)."""
    model, batch = problem(dtype=jnp.float32)
    monkeypatch.setattr(kfac_module, "_memory_limit", lambda: 2**10)
    with pytest.raises(ValueError, match=r"35 for outputs of shape \(5, 7\)") as info:
        jax.eval_shape(lambda: eqx_ggn.kfac_factors(model, batch, "cross_entropy"))
    assert "curvature='fisher'" in str(info.value)
    assert "GiB" in str(info.value)
    monkeypatch.undo()

    traced = []
    rows = kfac_module._input_rows

    def counting(layer, *args):
        traced.append(type(layer).__name__)
        return rows(layer, *args)

    monkeypatch.setattr(kfac_module, "_input_rows", counting)
    trained = eqx.filter(model, eqx.is_inexact_array)
    statistics = kfac_module.curvature_statistics  # not jitted: traced afresh
    jax.eval_shape(lambda: statistics(model, trained, batch, "cross_entropy"))
    assert sorted(traced) == sorted(["Embedding"] + ["Linear"] * 7)


def test_optimizer_kfac_every_max_dim_and_rescale(x64):
    """`kfac_every=3`: the factors change on steps 0 and 3 only; `kfac_max_dim`
    sets which factors are diagonal; `kfac_rescale=False` with a fixed damping
    steps by exactly `-lr (KFAC + λ)^{-1} g`."""
    model, batch = problem()
    params = eqx.filter(model, eqx.is_inexact_array)
    loss_fn = "cross_entropy"
    opt = eqx_ggn.gauss_newton(
        0.5,
        loss_fn=loss_fn,
        solver="kfac",
        adaptive_damping=False,
        damping=0.1,
        kfac_rescale=False,
        kfac_every=3,
        kfac_inverse_every=1,
        kfac_max_dim=8,
    )
    state = opt.init(params)

    @eqx.filter_jit
    def step(model, state):
        _, grads = eqx_ggn.value_and_grad(model=model, batch=batch, loss_fn=loss_fn)
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, state = opt.update(grads, state, params, model=model, batch=batch)
        return eqx.apply_updates(model, updates), state, grads, updates

    history = []
    for _ in range(4):
        new_model, state, grads, updates = step(model, state)
        history.append((model, grads, updates, optax.tree.get(state, "factors")))
        model = new_model
    leaves = lambda t: jax.tree.leaves(t)
    same = lambda s, t: all(
        np.array_equal(x, y) for x, y in zip(leaves(s), leaves(t), strict=True)
    )
    factors = [h[3] for h in history]
    assert same(factors[0], factors[1]) and same(factors[1], factors[2])
    assert not same(factors[2], factors[3])
    # The first step's factors are that batch's factors, diagonal above 8.
    first = eqx_ggn.kfac_factors(history[0][0], batch, loss_fn, max_dim=8)
    for x, y in zip(leaves(first), leaves(factors[0]), strict=True):
        assert_rel_close(y, x, 1e-12)
    assert factors[0].head.a.shape == (WIDTH + 1,)
    assert factors[0].head.g.shape == (VOCAB, VOCAB)
    # A step on the refreshed inverse is the plain damped KFAC direction (both
    # compiled: eager and compiled eigendecompositions differ by rounding).
    inverse = eqx.filter_jit(lambda f, g: eqx_ggn.kfac_inverse(f, 0.1)(g))
    for k in (1, 3):
        _, grads, updates, current = history[k]
        expected = inverse(current, grads)
        for u, e in zip(leaves(updates), leaves(expected), strict=True):
            assert_rel_close(u, -0.5 * e, 1e-10)
