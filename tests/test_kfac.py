"""KFAC: factors against dense float64 references, the damped inverse, the
optimizer's `solver="kfac"` / `preconditioner="kfac"`, and the state."""

import functools
import io

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import ConvNet, assert_rel_close, dense_curvatures, to_f64
from jax.flatten_util import ravel_pytree

import eqx_ggn
from eqx_ggn._kfac import (
    KFACState,
    _layer_matrix,
    eigendecompose,
    mean_eigenvalue,
    update_kfac_state,
)


# One compiled program per model and setting, instead of op-by-op dispatch.
kfac_factors = eqx.filter_jit(eqx_ggn.kfac_factors)


@eqx.filter_jit
def factors_and_inverse(model, batch, damping, vector):
    factors = eqx_ggn.kfac_factors(model, batch, "mse")
    return factors, eqx_ggn.kfac_inverse(factors, damping)(vector)


class Net(eqx.Module):
    """Linear -> LayerNorm -> tanh -> Linear -> tanh -> Linear, plus a free
    `scale` array: two kinds of diagonal block next to the Kronecker ones."""

    layers: tuple
    norm: eqx.nn.LayerNorm
    scale: jax.Array

    def __init__(self, key, sizes=(3, 5, 4, 2)):
        keys = jax.random.split(key, 3)
        self.layers = tuple(
            eqx.nn.Linear(a, b, key=k)
            for a, b, k in zip(sizes[:-1], sizes[1:], keys, strict=True)
        )
        self.norm = eqx.nn.LayerNorm(sizes[1])
        self.scale = jnp.linspace(0.5, 1.5, sizes[2])

    def __call__(self, x):
        h = jnp.tanh(self.norm(self.layers[0](x)))
        h = jnp.tanh(self.layers[1](h)) * self.scale
        return self.layers[2](h)


class Recurrent(eqx.Module):
    """One Linear cell reused over time by `lax.scan`, and an Embedding under
    `vmap`: weight sharing through a scan and through a vmap."""

    embed: eqx.nn.Embedding
    cell: eqx.nn.Linear
    head: eqx.nn.Linear

    def __init__(self, key, vocab=5, width=3):
        k1, k2, k3 = jax.random.split(key, 3)
        self.embed = eqx.nn.Embedding(vocab, width, key=k1)
        self.cell = eqx.nn.Linear(2 * width, width, key=k2)
        self.head = eqx.nn.Linear(width, 2, key=k3)

    def __call__(self, tokens, perturbation=None):
        inputs = jax.vmap(self.embed)(tokens)
        if perturbation is None:
            perturbation = jnp.zeros_like(inputs)

        def step(h, xs):
            x, e = xs
            h = jnp.tanh(self.cell(jnp.concatenate([h, x])) + e)
            return h, h

        _, hs = jax.lax.scan(step, jnp.zeros_like(inputs[0]), (inputs, perturbation))
        return self.head(hs[-1])


def _dense_ggn(model, batch, loss_fn):
    params, static = eqx.partition(model, eqx.is_inexact_array)
    n = jax.tree.leaves(batch["input"])[0].shape[0]
    model_fn = eqx_ggn.as_model_fn(static)
    dense = dense_curvatures(model_fn, params, batch, loss_fn, 1.0 / n)["ggn"]
    flat, unravel = ravel_pytree(params)
    return dense, unravel(jnp.arange(flat.size, dtype=flat.dtype))


def _kron_indices(index_layer):
    """Flat indices of a layer's parameters in the `kron(g, a)` order."""
    matrix, _ = _layer_matrix(index_layer)
    return np.asarray(matrix).astype(int).reshape(-1)


@pytest.mark.parametrize(
    ("loss_fn", "batch_size", "exact_layers"),
    [("mse", 6, [2]), ("cross_entropy", 1, [0, 1, 2])],
)
def test_blocks_equal_the_dense_ggn_where_kfac_is_exact(
    x64, loss_fn, batch_size, exact_layers
):
    """The last Linear under mse (output Hessian 2 I), and every layer at batch
    size 1, equal the dense GGN blocks; the diagonal blocks (LayerNorm, `scale`)
    equal the dense GGN's diagonal, at any batch size."""
    model = to_f64(Net(jax.random.key(0)))
    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (batch_size, 3))
    target = jax.random.randint(ky, (batch_size,), 0, 2)
    if loss_fn == "mse":
        target = jax.random.normal(ky, (batch_size, 2))
    batch = {"input": x, "target": target}
    factors = kfac_factors(model, batch, loss_fn)
    dense, index = _dense_ggn(model, batch, loss_fn)
    for i in exact_layers:
        rows = _kron_indices(index.layers[i])
        block = factors.layers[i]
        assert block.a.dtype == jnp.float64
        assert_rel_close(
            np.kron(block.g, block.a), np.asarray(dense)[np.ix_(rows, rows)], 1e-10
        )
    for diag, idx in [
        (factors.scale, index.scale),
        (factors.norm.weight, index.norm.weight),
        (factors.norm.bias, index.norm.bias),
    ]:
        idx = idx.astype(int)
        assert_rel_close(diag, jnp.diagonal(dense)[idx], 1e-10)


def _im2col(x, kernel, stride, padding):
    """Explicit patches, one row per output position, (channel, kh, kw) order."""
    x = np.pad(np.asarray(x), ((0, 0), (padding, padding), (padding, padding)))
    _, h, w = x.shape
    rows = []
    for i in range(0, h - kernel[0] + 1, stride[0]):
        for j in range(0, w - kernel[1] + 1, stride[1]):
            rows.append(x[:, i : i + kernel[0], j : j + kernel[1]].reshape(-1))
    return np.stack(rows)


@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
def test_conv_factors_equal_explicit_im2col(x64, weight_sharing):
    """Conv2d: A from explicit im2col patches (bias column appended), G from the
    output cotangents of the rest of the network, by the Eschenhagen et al.
    formula for `weight_sharing`."""
    model = to_f64(ConvNet(jax.random.key(0)))
    x = jax.random.normal(jax.random.key(1), (4, 2, 4, 5))
    batch = {"input": x, "target": jnp.zeros((4, 2))}
    factors = kfac_factors(model, batch, "mse", weight_sharing=weight_sharing).conv
    patches = np.stack([_im2col(xi, (2, 3), (1, 2), 1) for xi in x])  # (N, R, n)
    patches = np.concatenate([patches, np.ones((*patches.shape[:2], 1))], -1)
    z = jax.vmap(model.conv)(x)  # (N, 3, 5, 3)
    # Output cotangents: the rest of the network's pullback of S = sqrt(2) I.
    rest = lambda zi: model.head(jnp.tanh(zi).reshape(-1))
    cts = jax.vmap(
        lambda zi: jax.vmap(jax.vjp(rest, zi)[1])(np.sqrt(2) * jnp.eye(2))[0]
    )(z)  # (N, K, 3, 5, 3)
    g_rows = np.asarray(cts).reshape(4, 2, 3, -1).transpose(0, 1, 3, 2)  # (N,K,R,m)
    if weight_sharing == "expand":
        a = np.einsum("nri,nrj->ij", patches, patches) / (4 * patches.shape[1])
        g = np.einsum("nkri,nkrj->ij", g_rows, g_rows) / 4
    else:
        mean_patch = patches.mean(1)
        summed = g_rows.sum(2)
        a = mean_patch.T @ mean_patch / 4
        g = np.einsum("nki,nkj->ij", summed, summed) / 4
    assert_rel_close(factors.a, a, 1e-10)
    assert_rel_close(factors.g, g, 1e-10)


@pytest.mark.parametrize("dims", [1, 3])
def test_conv_as_the_last_layer_is_exact_under_mse(x64, dims):
    """Conv1d and Conv3d as the whole model under mse: every output position is
    its own output, so KFAC-expand equals the dense GGN block."""
    conv = to_f64(
        eqx.nn.Conv(
            dims,
            2,
            2,
            2,
            stride=2 if dims == 1 else 1,
            padding=1,
            key=jax.random.key(0),
        )
    )
    shape = (5,) if dims == 1 else (3, 2, 3)
    x = jax.random.normal(jax.random.key(1), (3, 2, *shape))
    out = jax.vmap(conv)(x).reshape(3, -1)
    batch = {"input": x, "target": jnp.zeros_like(out)}

    class Flat(eqx.Module):
        conv: eqx.nn.Conv

        def __call__(self, x):
            return self.conv(x).reshape(-1)

    flat = Flat(conv)
    block = kfac_factors(flat, batch, "mse").conv
    dense, index = _dense_ggn(flat, batch, "mse")
    rows = _kron_indices(index.conv)
    assert_rel_close(
        np.kron(block.g, block.a), np.asarray(dense)[np.ix_(rows, rows)], 1e-10
    )


def test_scan_and_vmap_weight_sharing_expand(x64):
    """A Linear cell reused by `lax.scan` and an Embedding under `vmap`, inside
    `eqx.filter_jit`: the expand factors equal explicit per-step sums."""
    model = to_f64(Recurrent(jax.random.key(0)))
    tokens = jax.random.randint(jax.random.key(1), (3, 4), 0, 5)
    batch = {"input": tokens, "target": jnp.zeros((3, 2))}
    factors = kfac_factors(model, batch, "mse")

    def cell_inputs(seq):
        inputs, h, rows = jax.vmap(model.embed)(seq), jnp.zeros(3), []
        for x in inputs:
            rows.append(jnp.concatenate([h, x, jnp.ones(1)]))
            h = jnp.tanh(model.cell(jnp.concatenate([h, x])))
        return jnp.stack(rows)

    rows = jnp.stack([cell_inputs(seq) for seq in tokens])  # (N, T, n)
    # Output gradients per step: the gradient of a zero perturbation per step.
    cts = jax.vmap(
        lambda seq: jax.vmap(jax.vjp(lambda e: model(seq, e), jnp.zeros((4, 3)))[1])(
            np.sqrt(2) * jnp.eye(2)
        )[0]
    )(tokens)  # (N, K, T, m)
    assert_rel_close(factors.cell.a, jnp.einsum("nti,ntj->ij", rows, rows) / 12, 1e-10)
    assert_rel_close(factors.cell.g, jnp.einsum("nkti,nktj->ij", cts, cts) / 3, 1e-10)
    counts = np.bincount(np.asarray(tokens).reshape(-1), minlength=5)
    assert_rel_close(factors.embed.a, counts / 12, 1e-10)


def test_inverse_equals_solve_on_the_dense_kronecker_matrix(x64):
    """`kfac_inverse` on Linear, Conv2d (reflect padding), Embedding and diagonal
    blocks equals `jnp.linalg.solve` with `(A + π√λ I) ⊗ (G + √λ/π I)`."""
    damping, seen = 0.3, set()
    models = [
        (Net(jax.random.key(0)), jax.random.normal(jax.random.key(1), (5, 3))),
        (
            ConvNet(jax.random.key(2), padding_mode="REFLECT"),
            jax.random.normal(jax.random.key(3), (3, 2, 4, 5)),
        ),
        (
            Recurrent(jax.random.key(4)),
            jax.random.randint(jax.random.key(5), (3, 4), 0, 5),
        ),
    ]
    for model, x in models:
        model = to_f64(model)
        batch = {"input": x, "target": jnp.zeros((x.shape[0], 2))}
        params = eqx.filter(model, eqx.is_inexact_array)
        flat, unravel = ravel_pytree(params)
        vector = unravel(jax.random.normal(jax.random.key(6), flat.shape))
        factors, out = factors_and_inverse(model, batch, damping, vector)

        def check(b, v, o, kinds=seen):
            if not isinstance(b, eqx_ggn.KroneckerFactor):
                assert_rel_close(o, np.asarray(v) / (np.asarray(b) + damping), 1e-10)
                kinds.add("diagonal")
                return
            # The dense reference in NumPy (float64).
            a = np.diag(b.a) if b.a.ndim == 1 else np.asarray(b.a)
            g = np.asarray(b.g)
            n, m = a.shape[0], g.shape[0]
            pi = np.sqrt((np.trace(a) / n) / (np.trace(g) / m))
            a_d = a + pi * np.sqrt(damping) * np.eye(n)
            g_d = g + np.sqrt(damping) / pi * np.eye(m)
            if isinstance(v, eqx.nn.Embedding):  # weight (n, m): kron(A, G)
                rhs = np.asarray(v.weight).reshape(-1)
                ref = np.linalg.solve(np.kron(a_d, g_d), rhs)
                assert_rel_close(np.asarray(o.weight).reshape(-1), ref, 1e-10)
            else:  # [weight | bias] (m, n): kron(G, A)
                rhs = np.asarray(_layer_matrix(v)[0]).reshape(-1)
                ref = np.linalg.solve(np.kron(g_d, a_d), rhs)
                out = np.asarray(_layer_matrix(o)[0]).reshape(-1)
                assert_rel_close(out, ref, 1e-10)
            kinds.add(type(v).__name__)

        jax.tree.map(
            check,
            factors,
            vector,
            out,
            is_leaf=lambda b: isinstance(b, eqx_ggn.KroneckerFactor),
        )
        # tr(KFAC) / P from the dense blocks: the scale of the optimizer's floor.
        is_factor = lambda b: isinstance(b, eqx_ggn.KroneckerFactor)
        trace = lambda f: np.sum(f) if f.ndim == 1 else np.trace(f)  # a diagonal A
        traces = [
            trace(np.asarray(b.a)) * trace(np.asarray(b.g))
            if is_factor(b)
            else np.sum(np.asarray(b))
            for b in jax.tree.leaves(factors, is_leaf=is_factor)
        ]
        assert_rel_close(
            mean_eigenvalue(eigendecompose(factors)), sum(traces) / flat.size, 1e-12
        )
    assert {"diagonal", "Linear", "Conv2d", "Embedding"} <= seen


def test_fisher_factors_match_the_ggn_in_expectation():
    """Sampled-label factors, averaged over 400 keys, lie within 5 standard errors
    of the exact GGN factors in every entry (A does not depend on the labels)."""
    model = Net(jax.random.key(0))
    kx, ky = jax.random.split(jax.random.key(1))
    batch = {
        "input": jax.random.normal(kx, (8, 3)),
        "target": jax.random.randint(ky, (8,), 0, 2),
    }
    exact = kfac_factors(model, batch, "cross_entropy")
    keys = jax.random.split(jax.random.key(2), 400)
    sampled = eqx.filter_jit(
        jax.vmap(
            lambda k: eqx_ggn.kfac_factors(
                model, batch, "cross_entropy", curvature="fisher", key=k
            )
        )
    )(keys)

    @jax.jit  # one program for every entry's z-score
    def z_scores(exact, sampled):
        def z_score(e, s):
            mean, sem = jnp.mean(s, 0), jnp.std(s, 0) / np.sqrt(len(keys))
            deterministic = sem <= 1e-6 * (jnp.abs(e) + 1e-6)
            exact_when_deterministic = jnp.all(
                ~deterministic | (jnp.abs(mean - e) <= 1e-5 * jnp.abs(e) + 1e-7)
            )
            z = jnp.where(
                deterministic, 0, jnp.abs(mean - e) / jnp.where(deterministic, 1, sem)
            )
            return exact_when_deterministic, jnp.max(z)

        return jax.tree.map(z_score, exact, sampled)

    results = jax.tree.leaves(z_scores(exact, sampled))
    assert all(bool(ok) for ok in results[0::2])
    worst = max(float(z) for z in results[1::2])
    assert worst < 5, worst


def test_factors_under_jit_vmap_equal_the_unbatched_ones(x64):
    """Factors under `jit(vmap)` over keys and over batches, with the model and
    the batch closed over, equal the unbatched ones (jaxlib < 0.8.2 constant-folds
    such a vmapped gather wrongly, jax-ml/jax#33479: the reason for the floor)."""
    model = to_f64(Net(jax.random.key(0)))
    kx, ky, kk = jax.random.split(jax.random.key(1), 3)
    batches = {
        "input": jax.random.normal(kx, (2, 8, 3), jnp.float64),
        "target": jax.random.randint(ky, (2, 8), 0, 2),
    }
    first = jax.tree.map(lambda x: x[0], batches)
    keys = jax.random.split(kk, 2)
    curvatures = ("ggn", "fisher", "empirical_fisher")

    def factors(batch, key):
        return [
            eqx_ggn.kfac_factors(model, batch, "cross_entropy", curvature=c, key=key)
            for c in curvatures
        ]

    over_keys = jax.jit(jax.vmap(lambda k: factors(first, k)))(keys)
    over_batches = jax.jit(jax.vmap(lambda b: factors(b, keys[0])))(batches)
    for i in range(2):
        row = lambda tree, i=i: jax.tree.map(lambda x: x[i], tree)
        batch_i = jax.tree.map(lambda x, i=i: x[i], batches)
        for batched, reference in (
            (row(over_keys), factors(first, keys[i])),
            (row(over_batches), factors(batch_i, keys[0])),
        ):
            for b, r in zip(
                jax.tree.leaves(batched), jax.tree.leaves(reference), strict=True
            ):
                np.testing.assert_allclose(b, r, rtol=1e-10, atol=1e-12)


def _least_squares(x64_key=0):
    kx, kw = jax.random.split(jax.random.key(x64_key))
    x = jax.random.normal(kx, (30, 4), jnp.float64)
    y = x @ jax.random.normal(kw, (4, 2), jnp.float64) + 0.1
    y = y + 0.3 * jnp.sin(3 * x[:, :2])  # residuals a linear model cannot fit
    model = to_f64(eqx.nn.Linear(4, 2, key=jax.random.key(1)))
    return model, {"input": x, "target": y}


def _step(opt, model, batch, state, loss_fn="mse", spec=eqx.is_inexact_array):
    params = eqx.filter(model, spec)
    grads = eqx_ggn.value_and_grad(eqx_ggn.as_model_fn(model), params, batch, loss_fn)[
        1
    ]
    updates, state = opt.update(grads, state, params, model=model, batch=batch)
    return eqx.apply_updates(model, updates), state


def test_running_factors_average_uniformly_then_decay(x64):
    """The `k`-th fold has the weight `1 - min(1 - 1/k, decay)`: the mean of the
    batches so far while `1 - 1/k < decay`, then the exponential average; with
    `every=3` statistics are drawn (and folded) only on every third step."""
    decay, every = 0.75, 3
    batches = jnp.arange(1.0, 31.0) ** 2  # the statistics of the k-th fold

    @jax.jit
    def run(batches):
        def step(state, count):
            statistics = lambda: jnp.full(2, batches[count // every])
            state = update_kfac_state(state, statistics, count, decay, every, 1)
            return state, state.factors[0]

        start = KFACState(jnp.zeros(2), jnp.zeros(2))
        return jax.lax.scan(step, start, jnp.arange(every * len(batches)))[1]

    expected, mean = [], 0.0
    for k, value in enumerate(batches.tolist(), start=1):
        weight = 1 - min(1 - 1 / k, decay)
        mean = (1 - weight) * mean + weight * value
        expected += [mean] * every
    running = run(batches)
    np.testing.assert_allclose(running, expected, rtol=1e-12)
    # Uniform while 1 - 1/k <= decay (k <= 4): the plain mean of the first four.
    np.testing.assert_allclose(running[every * 4 - 1], jnp.mean(batches[:4]))


@pytest.mark.parametrize("adaptive_momentum", [False, True])
def test_kfac_step_solves_linear_least_squares(x64, adaptive_momentum):
    """A single Linear layer under mse: KFAC is the exact GGN (G = 2 I), so one
    undamped, rescaled KFAC step lands on `lstsq`."""
    model, batch = _least_squares()
    opt = eqx_ggn.gauss_newton(
        1.0,
        loss_fn="mse",
        solver="kfac",
        damping=0.0,
        adaptive_damping=False,
        adaptive_momentum=adaptive_momentum,
    )
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    model, state = eqx.filter_jit(_step)(opt, model, batch, state)
    design = jnp.concatenate([batch["input"], jnp.ones((30, 1))], axis=1)
    solution = jnp.linalg.lstsq(design, batch["target"])[0]
    assert_rel_close(
        jnp.concatenate([model.weight.T, model.bias[None]]), solution, 1e-10
    )
    inner = state[0]
    # A rescaled KFAC step never forms `C d`: no residual to report.
    assert int(inner.solver) == 3 and np.isnan(float(inner.cg_residual))


def test_kfac_rescaling_uses_a_quarter_of_the_batch_when_it_is_accurate(x64):
    """With a fixed damping the rescaled step is `c d`, `c = gᵀd / (dᵀ C d + λ
    dᵀd)`: the curvature term from every fourth sample (times `N / m`) when its
    standard error is within `kfac_rescale_tol` of the damped term, else from
    the batch; against dense per-sample GGNs of softmax cross-entropy."""
    model = to_f64(Net(jax.random.key(5)))
    x = jax.random.normal(jax.random.key(6), (42, 3), jnp.float64)
    batch = {"input": x, "target": (x[:, 0] > 0).astype(jnp.int32)}
    params, static = eqx.partition(model, eqx.is_inexact_array)
    grads = eqx_ggn.value_and_grad(
        eqx_ggn.as_model_fn(model), params, batch, "cross_entropy"
    )[1]

    @eqx.filter_jit
    def update(tol, rescale):
        opt = eqx_ggn.scale_by_gauss_newton(
            "cross_entropy",
            solver="kfac",
            damping=0.1,
            adaptive_damping=False,
            kfac_rescale=rescale,
            kfac_rescale_tol=tol,
        )
        out = opt.update(grads, opt.init(params), params, model=model, batch=batch)
        return ravel_pytree(out[0])[0]

    direction = update(0.0, False)
    flat, unravel = ravel_pytree(params)
    logits = lambda p, xi: eqx.combine(unravel(p), static)(xi)
    jvp = lambda xi: jax.jvp(lambda p: logits(p, xi), (flat,), (direction,))[1]
    jd = jax.vmap(jvp)(x)
    prob = jax.nn.softmax(jax.vmap(lambda xi: logits(flat, xi))(x))
    terms = (jnp.sum(prob * jd**2, 1) - jnp.sum(prob * jd, 1) ** 2) / 42  # per sample
    quarter = terms[::4]  # 11 samples
    estimate = quarter.sum() * 42 / 11
    g, damping_term = ravel_pytree(grads)[0] @ direction, 0.1 * direction @ direction
    whole = terms.sum()  # tol=0: the stored linearization; 1e-12: fresh quarters
    # A tolerance between: decided by the quarter's spread.
    error = 42 / 11 * jnp.sqrt(11 * jnp.var(quarter, ddof=1))
    accurate = error <= 0.25 * (estimate + damping_term)
    # Positive tolerances traced (one program, the quarters' path); 0 static.
    cases = [(jnp.inf, estimate), (1e-12, whole), (0, whole)]
    cases.append((0.25, estimate if accurate else whole))
    for tol, curvature in cases:
        expected = g / (curvature + damping_term) * direction
        tol = jnp.asarray(tol, jnp.float64) if tol else 0
        assert_rel_close(update(tol, True), expected, 1e-10)
    assert not np.isclose(estimate, terms.sum(), rtol=1e-3)  # the two differ


def test_kfac_damping_floor_is_a_fraction_of_the_mean_eigenvalue(x64):
    """Under adaptive damping the KFAC direction is solved with `max(λ,
    kfac_damping_floor * tr(KFAC) / P)`: the step is parallel to the dense KFAC
    solve at the floor, not at `λ`."""
    model = to_f64(Net(jax.random.key(3)))
    x = jax.random.normal(jax.random.key(4), (16, 3), jnp.float64)
    batch = {"input": x, "target": jnp.sin(x[:, :2])}
    params = eqx.filter(model, eqx.is_inexact_array)
    grads = eqx_ggn.value_and_grad(eqx_ggn.as_model_fn(model), params, batch, "mse")[1]
    opt = eqx_ggn.gauss_newton(
        1.0, loss_fn="mse", solver="kfac", damping=1e-9, kfac_damping_floor=0.5
    )
    new, state = eqx.filter_jit(_step)(opt, model, batch, opt.init(params))
    assert bool(state[0].accepted)
    flat = lambda tree: ravel_pytree(eqx.filter(tree, eqx.is_inexact_array))[0]
    step = flat(new) - flat(model)
    # The optimizer's factors are these times the objective's factor: the same
    # direction, since the floor scales with them.
    factors = kfac_factors(model, batch, "mse")
    floor = 0.5 * mean_eigenvalue(eigendecompose(factors))

    def cosine(damping):
        d = flat(eqx_ggn.kfac_inverse(factors, damping)(grads))
        return jnp.abs(d @ step) / jnp.linalg.norm(d) / jnp.linalg.norm(step)

    assert_rel_close(cosine(floor), 1.0, 1e-10)
    assert cosine(1e-9) < 0.99


def test_kfac_preconditioned_cg_reaches_the_unpreconditioned_solution(x64):
    """At a fixed damping, CG preconditioned by KFAC converges to the same step as
    plain CG and as the dense damped solve."""
    model = to_f64(Net(jax.random.key(3)))
    kx, ky = jax.random.split(jax.random.key(4))
    batch = {
        "input": jax.random.normal(kx, (12, 3)),
        "target": jax.random.randint(ky, (12,), 0, 2),
    }
    params = eqx.filter(model, eqx.is_inexact_array)
    grads = eqx_ggn.value_and_grad(model=model, batch=batch, loss_fn="cross_entropy")[1]

    @eqx.filter_jit
    def steps(params, grads):
        out = {}
        for name in ["none", "kfac"]:
            opt = eqx_ggn.scale_by_gauss_newton(
                "cross_entropy",
                damping=2.0**-10,  # exact in float32, as CG keeps it
                adaptive_damping=False,
                preconditioner=None if name == "none" else name,
                cg_maxiter=400,
                cg_tol=1e-12,
                cg_progress_tol=0.0,
            )
            out[name] = opt.update(
                grads, opt.init(params), params, model=model, batch=batch
            )
        op = eqx_ggn.curvature_operator(
            model=model, data=batch, loss_fn="cross_entropy"
        )
        return out, op.solve(grads, 2.0**-10, solver="dense")

    out, dense = steps(params, grads)
    for name, (update, state) in out.items():
        assert_rel_close(update, dense, 1e-8)
        assert int(state.cg_stop_reason) == int(eqx_ggn.CGStop.CONVERGED), name
    # Iteration counts are measured in benchmarks/kfac.py: on a curvature of
    # rank 12, as here, plain CG needs ~13 steps and no preconditioner helps.


class Stateful(eqx.Module):
    """Linear -> BatchNorm (running statistics) -> dropout (a key bound for the
    step) -> tanh -> Linear, with the BatchNorm state held as a field."""

    first: eqx.nn.Linear
    norm: eqx.nn.BatchNorm
    dropout: eqx.nn.Dropout
    last: eqx.nn.Linear
    state: eqx.nn.State
    key: jax.Array

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.first = eqx.nn.Linear(3, 6, key=k1)
        self.norm = eqx.nn.BatchNorm(6, "batch", inference=True, mode="batch")
        self.dropout = eqx.nn.Dropout(0.3)
        self.last = eqx.nn.Linear(6, 2, key=k2)
        self.state = eqx.nn.State(self.norm)
        self.key = k3

    def __call__(self, x):
        h, _ = self.norm(self.first(x), self.state)
        return self.last(jnp.tanh(self.dropout(h, key=self.key)))


def test_frozen_stateful_and_bfloat16_models_in_the_optimizer():
    """A frozen first layer gets no block and stays put; BatchNorm's scale and
    shift get diagonal blocks; dropout and BatchNorm are fixed for the step; the
    state is readable with `optax.tree.get`, serialises, and with bf16 params
    the factors stay float32; one trace per setting."""
    model = Stateful(jax.random.key(0))
    spec = jax.tree.map(eqx.is_inexact_array, model)
    spec = eqx.tree_at(lambda m: (m.first, m.state), spec, replace=(False, False))
    # Targets from a teacher that differs in the trained layer only: reachable.
    kx, ky = jax.random.split(jax.random.key(1))
    teacher = eqx.tree_at(lambda m: m.last, model, eqx.nn.Linear(6, 2, key=ky))
    x = jax.random.normal(kx, (16, 3))
    batch = {"input": x, "target": jax.vmap(teacher)(x)}
    opt = optax.inject_hyperparams(eqx_ggn.gauss_newton)(
        learning_rate=1.0, loss_fn="mse", solver="kfac", kfac_inverse_every=2
    )

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=2)  # float32 and bfloat16
    def step(model, state):
        return _step(opt, model, batch, state, spec=spec)

    @eqx.filter_jit
    def mean_squared_error(model):
        pred = jax.vmap(model)(batch["input"])
        return jnp.mean(jnp.sum((pred.astype(jnp.float32) - batch["target"]) ** 2, 1))

    def loss(model):
        return float(mean_squared_error(model))

    for dtype in [jnp.float32, jnp.bfloat16]:
        m = jax.tree.map(
            lambda x, d=dtype: x.astype(d) if eqx.is_inexact_array(x) else x, model
        )
        state = opt.init(eqx.filter(m, spec))
        first = loss(m)
        for _ in range(8):
            new, state = step(m, state)
            assert new.first.weight is not None
            assert jnp.array_equal(new.first.weight, m.first.weight)  # frozen
            m = new
        assert loss(m) < 0.1 * first, (dtype, first, loss(m))
        factors = optax.tree.get(state, "factors")
        assert factors.first.weight is None and not jax.tree.leaves(factors.state)
        assert isinstance(factors.last, eqx_ggn.KroneckerFactor)
        assert (
            factors.norm.weight.shape == (6,)
            and factors.norm.weight.dtype == jnp.float32
        )
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(factors))
        assert m.last.weight.dtype == dtype
        buffer = io.BytesIO()
        eqx.tree_serialise_leaves(buffer, state)
        buffer.seek(0)
        restored = eqx.tree_deserialise_leaves(buffer, state)
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
            assert jnp.array_equal(a, b, equal_nan=True)  # cg_residual: NaN


def test_kfac_errors(x64):
    model, batch = _least_squares()
    params = eqx.filter(model, eqx.is_inexact_array)
    opt = eqx_ggn.scale_by_gauss_newton("mse", solver="kfac")
    with pytest.raises(ValueError, match="model=module"):
        opt.update(
            params,
            opt.init(params),
            params,
            model_fn=eqx_ggn.as_model_fn(model),
            batch=batch,
        )
    with pytest.raises(ValueError, match="curvature 'ggn', 'fisher'"):
        eqx_ggn.scale_by_gauss_newton("mse", solver="kfac", curvature="hessian")
    with pytest.raises(ValueError, match="not 'jacobi'"):
        eqx_ggn.scale_by_gauss_newton("mse", solver="kfac", preconditioner="jacobi")
    with pytest.raises(ValueError, match="adaptive_momentum"):
        eqx_ggn.scale_by_gauss_newton("mse", adaptive_momentum=True)
    with pytest.raises(ValueError, match="weight_sharing"):
        eqx_ggn.scale_by_gauss_newton("mse", preconditioner="kfac", weight_sharing="x")
    with pytest.raises(ValueError, match="needs key="):
        eqx_ggn.kfac_factors(model, batch, "mse", curvature="fisher")
    with pytest.raises(ValueError, match="built-in losses"):
        eqx_ggn.kfac_factors(
            model,
            batch,
            lambda p, t: jnp.sum(p),
            curvature="fisher",
            key=jax.random.key(0),
        )
    op = eqx_ggn.curvature_operator(model=model, data=batch, loss_fn="mse")
    with pytest.raises(ValueError, match="kfac_inverse"):
        op.solve(params, 1.0, solver="kfac")


def _cg_iterations(model, batch, loss_fn, preconditioner, steps=8, refreshes=None):
    """Per-step CG iterations, KFAC choices and comparisons KFAC lost in a row,
    over `steps` Gauss-Newton steps; with a list `refreshes`, whether each step
    changed KFAC's eigendecompositions is appended to it."""
    opt = eqx_ggn.gauss_newton(
        1.0,
        loss_fn=loss_fn,
        damping=1e-3,
        min_damping=1e-3,
        cg_tol=1e-6,
        cg_maxiter=400,
        kfac_inverse_every=4,
        preconditioner=preconditioner,
        warn=False,
    )
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    step = eqx.filter_jit(lambda m, s: _step(opt, m, batch, s, loss_fn))
    its, used, lost = [], [], []
    for _ in range(steps):
        before = state[0].kfac
        model, state = step(model, state)
        if refreshes is not None:
            pairs = zip(
                jax.tree.leaves(before.eigen),
                jax.tree.leaves(state[0].kfac.eigen),
                strict=True,
            )
            refreshes.append(any(not np.array_equal(a, b) for a, b in pairs))
        its.append(int(state[0].cg_iterations))
        used.append(bool(state[0].preconditioned))
        lost.append(int(state[0].comparisons_lost))
    return np.array(its), used, lost


def test_kfac_preconditioner_is_used_only_while_it_pays(x64):
    """Where KFAC preconditioning costs more iterations than none (a classifier
    at initialization), the comparisons keep plain CG, and each lost one halves
    how often they come: of the refresh steps 0, 4 and 8, only 0 and 8 compare.
    The steps in between cost what plain CG costs, a comparison at most twice
    that. Where it pays (one Linear layer under mse, whose GGN KFAC nearly is),
    it stays on and needs fewer iterations."""
    kx, km = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (256, 2))
    y = jnp.argmax(jnp.sin(3 * x @ jnp.ones((2, 3)) * jnp.arange(1, 4)), 1)
    mlp = eqx.nn.MLP(2, 3, 8, 2, activation=jnp.tanh, key=km)
    batch = {"input": x, "target": y}
    plain, _, _ = _cg_iterations(mlp, batch, "cross_entropy", None, steps=12)
    refreshes = []
    kfac, used, lost = _cg_iterations(
        mlp, batch, "cross_entropy", "kfac", steps=12, refreshes=refreshes
    )
    assert not any(used), used  # KFAC lost at both comparisons
    assert lost == [1] * 8 + [2] * 4, lost
    compared = np.array([0, 8])
    # The inverse is refreshed only for the comparisons, not on step 4.
    assert np.flatnonzero(refreshes).tolist() == compared.tolist(), refreshes
    others = np.setdiff1d(np.arange(12), compared)
    np.testing.assert_array_equal(kfac[others], plain[others])  # plain CG's path
    assert np.all(kfac[compared] > plain[compared])  # both runs counted
    assert np.all(kfac[compared] <= 2 * plain[compared])
    # The whole overhead: one capped KFAC run per comparison.
    assert kfac.sum() <= plain.sum() + plain[compared].sum(), (kfac, plain)

    kx, kw = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (64, 6)) * jnp.array([1, 3, 10, 30, 100, 300.0])
    linear = eqx.nn.Linear(6, 3, key=kw)
    batch = {"input": x, "target": jnp.sin(x[:, :3])}
    plain, _, _ = _cg_iterations(linear, batch, "mse", None, steps=4)
    kfac, used, lost = _cg_iterations(linear, batch, "mse", "kfac", steps=4)
    assert all(used), used
    assert lost == [0] * 4, lost
    assert kfac[1:].sum() < plain[1:].sum(), (kfac, plain)


def test_kfac_comparison_prefers_the_converged_solve(x64):
    """A comparison on a dense 4x4 system, plain CG first: the quadratic handed
    in is rigged to prefer the preconditioned iterate. When plain CG converges
    and the preconditioned run, capped at plain's iterations, does not, plain
    wins anyway; when both stop at the cap, the quadratic decides."""
    from types import SimpleNamespace

    from eqx_ggn._optimizer import _adaptive_kfac_cg

    key_b, key_v = jax.random.split(jax.random.key(0))
    v = jax.random.normal(key_v, (4, 4))
    a = jnp.eye(4) + 1e-3 * v @ v.T  # plain CG: one iteration to ~1e-3
    b = jax.random.normal(key_b, (4,))
    scales = jnp.array([1.0, 10.0, 100.0, 1000.0])  # a poor preconditioner

    def precondition(r):
        return scales * r

    state = SimpleNamespace(
        count=jnp.asarray(0, jnp.int32),
        preconditioned=jnp.asarray(False),
        reference_iterations=jnp.asarray(2**31 - 1, jnp.int32),
        comparisons_lost=jnp.asarray(0, jnp.int32),
    )

    @functools.partial(jax.jit, static_argnums=(0, 1))  # one program per case
    def compare(tol, maxiter):
        def solve(m, cap=maxiter):
            return eqx_ggn.cg(
                lambda x: a @ x, b, tol=tol, maxiter=cap, preconditioner=m
            )

        plain = solve(None)
        capped = solve(precondition, plain.num_steps)
        towards = capped.value - plain.value  # q(capped) < q(plain)

        def quadratic(d):
            return -(d @ towards)

        out = _adaptive_kfac_cg(solve, quadratic, precondition, state, tol, 10)
        return plain, capped, out

    for tol, maxiter, expect_switch in ((1e-2, 4, False), (1e-12, 2, True)):
        plain, capped, (result, use, reference, lost) = compare(tol, maxiter)
        assert (plain.residual_norm <= tol) != expect_switch
        assert capped.residual_norm > tol
        winner = capped if expect_switch else plain
        np.testing.assert_allclose(result.value, winner.value, rtol=1e-12)
        assert int(result.num_steps) == 2 * int(plain.num_steps)
        assert bool(use) == expect_switch
        assert int(lost) == (0 if expect_switch else 1)
        assert int(reference) == int(plain.num_steps)
