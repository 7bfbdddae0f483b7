"""Every curvature product against a dense float64 reference."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from helpers import (
    as_dense,
    assert_rel_close,
    dense_curvatures,
    log_cosh_loss,
    make_problem,
    operator_matrix,
    to_f64,
)
from jax.flatten_util import ravel_pytree

import eqx_ggn


pytestmark = pytest.mark.usefixtures("x64")

# (problem kind, loss_fn): multi-output regression, classification with one-hot and
# integer targets, (T, C) per-token logits, and a custom callable loss.
CASES = [
    ("regression", "mse"),
    ("regression", "none"),
    ("regression", log_cosh_loss),
    ("probabilities", "binary_cross_entropy"),
    ("onehot", "cross_entropy"),
    ("labels", "cross_entropy"),
    ("tokens_onehot", "cross_entropy"),
    ("tokens_labels", "cross_entropy"),
]
IDS = [f"{k}-{getattr(f, '__name__', f)}" for k, f in CASES]


@pytest.mark.parametrize(("kind", "loss_fn"), CASES, ids=IDS)
def test_operator_matches_dense(kind, loss_fn):
    model, data = make_problem(kind)
    params, static = eqx_ggn.partition(model)
    model_fn = eqx_ggn.as_model_fn(static)
    batch = data["input"].shape[0]
    ref = dense_curvatures(model_fn, params, data, loss_fn, 1.0 / batch)
    flat, unravel = ravel_pytree(params)
    v = jax.random.normal(jax.random.key(1), flat.shape)

    @eqx.filter_jit
    def products(params, data, v):
        out = {}
        for curvature in ("ggn", "fisher", "empirical_fisher", "hessian"):
            op = eqx_ggn.curvature_operator(
                model_fn, params, data, loss_fn, curvature=curvature
            )
            form = op.quadratic_form([unravel(v), op.grad])
            out[curvature] = (op.as_matrix(), op.grad, op.loss, op.mv(unravel(v)), form)
        return out

    results = products(params, data, v).items()
    for curvature, (matrix, grad, loss, mv, form) in results:
        assert_rel_close(matrix, ref[curvature])
        assert_rel_close(ravel_pytree(grad)[0], ref["grad"])
        assert_rel_close(loss, ref["loss"])
        # The same product without `as_matrix`, on a random vector.
        assert_rel_close(ravel_pytree(mv)[0], ref[curvature] @ v)
        # `[v_iᵀ C v_j]` from JVPs alone.
        vectors = jnp.stack([v, ref["grad"]])
        assert_rel_close(form, vectors @ ref[curvature] @ vectors.T)


@pytest.mark.parametrize(("kind", "loss_fn"), CASES, ids=IDS)
def test_seed_functions_match_dense(kind, loss_fn):
    """Every laplax-style product as a dense matrix, at `num_total_samples` equal
    to the batch (factor 1, the default's value) and at 1000: one compiled
    program, the sample count traced."""
    model, data = make_problem(kind)
    params, static = eqx_ggn.partition(model)
    model_fn = eqx_ggn.as_model_fn(static)
    batch = data["input"].shape[0]
    ref = dense_curvatures(model_fn, params, data, loss_fn, 1.0)

    @eqx.filter_jit
    def matrices(params, data, num_total_samples):
        factor = num_total_samples / batch
        without = eqx_ggn.create_ggn_mv_without_data(model_fn, params, loss_fn, factor)
        kwargs = {"num_total_samples": num_total_samples}
        mvs = {
            "ggn": eqx_ggn.create_ggn_mv(model_fn, params, data, loss_fn, **kwargs),
            "fisher": eqx_ggn.create_fisher_mv(
                model_fn, params, data, loss_fn, **kwargs
            ),
            "empirical_fisher": eqx_ggn.create_empirical_fisher_mv(
                model_fn, params, data, loss_fn, **kwargs
            ),
            "hessian": eqx_ggn.create_hessian_mv(
                model_fn, params, data, loss_fn, **kwargs
            ),
            "without_data": lambda v: without(v, data),
        }
        return {name: as_dense(mv, params) for name, mv in mvs.items()}

    for num_total_samples in (batch, 1000):
        factor = num_total_samples / batch  # every curvature is linear in it
        got = matrices(params, data, jnp.asarray(float(num_total_samples)))
        for name in ("ggn", "fisher", "empirical_fisher", "hessian"):
            assert_rel_close(got[name], factor * ref[name])
        assert_rel_close(got["without_data"], factor * ref["ggn"])


def test_num_curv_samples_scaling():
    model, data = make_problem("onehot")
    params, static = eqx_ggn.partition(model)
    model_fn = eqx_ggn.as_model_fn(static)
    ref = dense_curvatures(model_fn, params, data, "cross_entropy", 50 / 10)
    ggn_mv = eqx_ggn.create_ggn_mv(
        model_fn,
        params,
        data,
        "cross_entropy",
        num_curv_samples=10,
        num_total_samples=50,
    )
    assert_rel_close(as_dense(ggn_mv, params), ref["ggn"])


@pytest.mark.parametrize(
    ("kind", "loss_fn"),
    [
        ("regression", "mse"),
        ("probabilities", "binary_cross_entropy"),
        ("tokens_labels", "cross_entropy"),
        ("regression", log_cosh_loss),
    ],
)
def test_vmap_over_data_false(kind, loss_fn):
    # The model is applied to the whole batch at once; built-in losses are sums, so
    # applying them to the batch equals summing the per-sample losses.
    model, data = make_problem(kind)
    params, static = eqx_ggn.partition(model)
    per_sample_fn = eqx_ggn.as_model_fn(static)

    def batch_model_fn(input, params):  # noqa: A002
        return jax.vmap(lambda x: per_sample_fn(input=x, params=params))(input)

    @eqx.filter_jit  # one program for the three matrices
    def matrices(params, data):
        ggn_mv = eqx_ggn.create_ggn_mv(
            batch_model_fn, params, data, loss_fn, vmap_over_data=False
        )
        out = {"ggn": as_dense(ggn_mv, params)}
        for curvature in ("empirical_fisher", "hessian"):
            op = eqx_ggn.curvature_operator(
                batch_model_fn,
                params,
                data,
                loss_fn,
                curvature=curvature,
                factor=1.0,
                vmap_over_data=False,
            )
            out[curvature] = op.as_matrix()
            out[f"{curvature}_grad"] = ravel_pytree(op.grad)[0]
        return out

    ref = dense_curvatures(per_sample_fn, params, data, loss_fn, 1.0)
    out = matrices(params, data)
    assert_rel_close(out["ggn"], ref["ggn"])
    for curvature in ("empirical_fisher", "hessian"):
        assert_rel_close(out[curvature], ref[curvature])
        assert_rel_close(out[f"{curvature}_grad"], ref["grad"])


def test_custom_loss_hessian_mv_replaces_the_loss():
    model, data = make_problem("regression")
    params, static = eqx_ggn.partition(model)
    model_fn = eqx_ggn.as_model_fn(static)
    ref = dense_curvatures(model_fn, params, data, "mse", 1.0)

    def twice(jv, *, pred, target):
        del pred, target
        return 2.0 * jv

    ggn_mv = eqx_ggn.create_ggn_mv(model_fn, params, data, loss_hessian_mv=twice)
    assert_rel_close(as_dense(ggn_mv, params), ref["ggn"])
    op = eqx_ggn.curvature_operator(model_fn, params, data, loss_hessian_mv=twice)
    assert op.loss is None and op.grad is None
    assert_rel_close(operator_matrix(op), ref["ggn"] / data["input"].shape[0])


def test_linear_model_mse_ggn_is_hessian():
    key = jax.random.key(3)
    params = {
        "w": jax.random.normal(key, (3, 4), jnp.float64),
        "b": jnp.ones(3, jnp.float64),
    }

    def model_fn(input, params):  # noqa: A002
        return params["w"] @ input + params["b"]

    x = jax.random.normal(jax.random.key(4), (8, 4))
    data = {"input": x, "target": jax.random.normal(jax.random.key(5), (8, 3))}
    flat, unravel = ravel_pytree(params)

    def objective(fp):
        pred = jax.vmap(lambda xi: model_fn(xi, unravel(fp)))(x)
        return jnp.mean(jnp.sum((pred - data["target"]) ** 2, axis=-1))

    exact = jax.hessian(objective)(flat)
    ggn = operator_matrix(eqx_ggn.curvature_operator(model_fn, params, data, "mse"))
    assert_rel_close(ggn, exact, tol=1e-12)


def test_frozen_layers_stay_out_of_params():
    model, data = make_problem("onehot")
    # Train the last layer only.
    spec = jax.tree.map(lambda _: False, model)
    spec = eqx.tree_at(
        lambda m: (m.layers[-1].weight, m.layers[-1].bias), spec, (True, True)
    )
    params, static = eqx_ggn.partition(model, spec)
    assert len(jax.tree.leaves(params)) == 2
    assert params.layers[0].weight is None
    assert static.layers[0].weight is model.layers[0].weight
    model_fn = eqx_ggn.as_model_fn(static)
    ref = dense_curvatures(model_fn, params, data, "cross_entropy", 1 / 6)
    op = eqx_ggn.curvature_operator(model_fn, params, data, "cross_entropy")
    n_last = model.layers[-1].weight.size + model.layers[-1].bias.size
    matrix = operator_matrix(op)
    assert matrix.shape == (n_last, n_last)
    assert_rel_close(matrix, ref["ggn"])
    assert_rel_close(ravel_pytree(op.grad)[0], ref["grad"])
    assert op.grad.layers[0].weight is None


def test_model_keyword_equals_model_fn_and_params():
    model, data = make_problem("labels")
    params, static = eqx_ggn.partition(model)
    a = eqx_ggn.curvature_operator(model=model, data=data, loss_fn="cross_entropy")
    b = eqx_ggn.curvature_operator(
        eqx_ggn.as_model_fn(static), params, data, "cross_entropy"
    )
    assert_rel_close(operator_matrix(a), operator_matrix(b), tol=1e-14)
    assert jax.tree.structure(a.grad) == jax.tree.structure(params)


def test_cross_entropy_hessian_per_token():
    # The loss Hessian along the last axis of (T, C) logits, against jax.hessian.
    logits = jax.random.normal(jax.random.key(0), (3, 4), jnp.float64)
    jv = jax.random.normal(jax.random.key(1), (3, 4), jnp.float64)
    hmv = eqx_ggn.create_loss_hessian_mv("cross_entropy")
    labels = jnp.array([0, 3, 1])
    dense = jax.hessian(eqx_ggn.cross_entropy_loss)(logits, labels).reshape(12, 12)
    assert_rel_close(hmv(jv, pred=logits, target=labels).ravel(), dense @ jv.ravel())


class _Convs(eqx.Module):
    """Conv1d, Conv2d and Conv3d branches with string, asymmetric and reflect
    padding, strides, dilation and no bias; and a grouped convolution, which is
    left as it is."""

    c1: eqx.nn.Conv
    c2: eqx.nn.Conv
    c3: eqx.nn.Conv
    grouped: eqx.nn.Conv
    head: eqx.nn.Linear

    def __init__(self, key):
        k = jax.random.split(key, 5)
        self.c1 = eqx.nn.Conv1d(2, 3, 3, stride=2, padding="SAME", key=k[0])
        self.c2 = eqx.nn.Conv2d(
            2, 2, (2, 3), padding=((1, 0), (2, 1)), dilation=(2, 1), key=k[1]
        )
        self.c3 = eqx.nn.Conv3d(
            2, 2, 2, padding=1, padding_mode="REFLECT", use_bias=False, key=k[2]
        )
        self.grouped = eqx.nn.Conv1d(2, 2, 2, groups=2, key=k[3])
        self.head = eqx.nn.Linear(212, 2, key=k[4])

    def __call__(self, x):  # x: (2, 4, 5)
        parts = [
            self.c1(x.reshape(2, 20)),
            self.c2(x),
            self.c3(x.reshape(2, 2, 2, 5)),
            self.grouped(x.reshape(2, 20)),
        ]
        return self.head(jnp.tanh(jnp.concatenate([p.reshape(-1) for p in parts])))


def test_convolutions_as_matmuls_match_the_convolutions():
    """On a CPU, eqx_ggn's own programs evaluate `eqx.nn.Conv` as matrix products
    over the kernel's offsets (fast inside CG's loop): each layer equals its
    convolution, and the operator built from `model=` equals the dense GGN and
    gradient of the unchanged model."""
    from eqx_ggn._conv import (
        _MatmulConv,
        conv_as_matmuls,
        conv_patches,
        with_matmul_convs,
    )

    model = to_f64(_Convs(jax.random.key(0)))
    kx, ky = jax.random.split(jax.random.key(1))
    data = {
        "input": jax.random.normal(kx, (5, 2, 4, 5)),
        "target": jax.random.normal(ky, (5, 2)),
    }
    x = data["input"][0]
    inputs = [x.reshape(2, 20), x, x.reshape(2, 2, 2, 5)]
    for layer, xi in zip([model.c1, model.c2, model.c3], inputs, strict=True):
        assert_rel_close(conv_as_matmuls(layer, xi), layer(xi), 1e-12)
        # KFAC's im2col rows: the features of XLA's patches (a convolution).
        ours = conv_patches(layer, xi)
        padding = layer.padding
        if layer.padding_mode != "ZEROS":
            xi, padding = layer._nonzero_pad(xi), "VALID"
        patches = jax.lax.conv_general_dilated_patches(
            xi[None], layer.kernel_size, layer.stride, padding, None, layer.dilation
        )[0]
        assert_rel_close(ours.reshape(patches.shape), patches, 1e-14)
    swapped = with_matmul_convs(model)
    assert isinstance(swapped.c2, _MatmulConv) == (jax.default_backend() == "cpu")
    assert isinstance(swapped.grouped, eqx.nn.Conv)  # groups=2: unchanged

    class Standardized(eqx.nn.Conv1d):  # its own __call__: kept as it is
        def __call__(self, x, *, key=None):
            return 2 * super().__call__(x)

    own = Standardized(2, 2, 2, key=jax.random.key(2))
    assert with_matmul_convs(own) is own
    params, static = eqx_ggn.partition(model)
    ref = dense_curvatures(eqx_ggn.as_model_fn(static), params, data, "mse", 0.2)
    op = eqx_ggn.curvature_operator(model=model, data=data, loss_fn="mse")
    assert_rel_close(operator_matrix(op), ref["ggn"], 1e-10)
    assert_rel_close(ravel_pytree(op.grad)[0], ref["grad"], 1e-10)
