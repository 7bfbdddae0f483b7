"""Dense float64 references and small test problems."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from eqx_ggn._losses import resolve_loss


def log_cosh_loss(pred, target):
    """A custom, non-quadratic loss for one sample."""
    return jnp.sum(jnp.log(jnp.cosh(pred - target)))


def to_f64(tree):
    return jax.tree.map(
        lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, tree
    )


class TokenModel(eqx.Module):
    """Maps (T, d) tokens to (T, C) logits, mixing tokens so Jacobians are dense."""

    embed: eqx.nn.Linear
    mix: jax.Array
    head: eqx.nn.Linear

    def __init__(self, d, c, t, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.embed = eqx.nn.Linear(d, 5, key=k1)
        self.mix = jax.random.normal(k2, (t, t)) / t
        self.head = eqx.nn.Linear(5, c, key=k3)

    def __call__(self, x):
        h = jnp.tanh(jax.vmap(self.embed)(x))
        h = h + self.mix @ h
        return jax.vmap(self.head)(h)


class ConvNet(eqx.Module):
    """Conv2d (padding and stride) -> tanh -> flatten -> Linear."""

    conv: eqx.nn.Conv2d
    head: eqx.nn.Linear

    def __init__(self, key, padding_mode="ZEROS"):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(
            2, 3, (2, 3), stride=(1, 2), padding=1, padding_mode=padding_mode, key=k1
        )
        self.head = eqx.nn.Linear(3 * 5 * 3, 2, key=k2)

    def __call__(self, x):  # x: (2, 4, 5)
        return self.head(jnp.tanh(self.conv(x)).reshape(-1))


def linear_problem(key=0, n=40, d=5, k=3):
    """A linear least-squares problem: `model_fn`, zero `params`, and a batch."""
    kx, kw, ky = jax.random.split(jax.random.key(key), 3)
    x = jax.random.normal(kx, (n, d))
    y = x @ jax.random.normal(kw, (d, k)) + 0.3 * jax.random.normal(ky, (n, k))
    params = {"w": jnp.zeros((d, k)), "b": jnp.zeros(k)}

    def model_fn(input, params):  # noqa: A002
        return input @ params["w"] + params["b"]

    return model_fn, params, {"input": x, "target": y}


def make_problem(kind, key=0, batch=6):
    """An Equinox model (float64) and a batch for one test case.

    kind: "regression" (2 outputs, float targets), "probabilities" (targets in
    [0, 1]), "onehot", "labels", "tokens_onehot", "tokens_labels".
    """
    kx, ky, km = jax.random.split(jax.random.key(key), 3)
    if kind.startswith("tokens"):
        t, d, c = 3, 2, 4
        model = TokenModel(d, c, t, km)
        x = jax.random.normal(kx, (batch, t, d))
        labels = jax.random.randint(ky, (batch, t), 0, c)
    else:
        out = 2 if kind in ("regression", "probabilities") else 3
        model = eqx.nn.MLP(3, out, 5, 2, activation=jnp.tanh, key=km)
        x = jax.random.normal(kx, (batch, 3))
        labels = jax.random.randint(ky, (batch,), 0, out)
    if kind == "regression":
        y = jax.random.normal(ky, (batch, 2))
    elif kind == "probabilities":
        y = jax.random.uniform(ky, (batch, 2))
    elif kind.endswith("onehot"):
        y = jax.nn.one_hot(labels, 4 if kind.startswith("tokens") else 3)
    else:
        y = labels
    return to_f64(model), {"input": x, "target": to_f64(y)}


@eqx.filter_jit
def dense_curvatures(model_fn, params, data, loss_fn, factor, reverse=False):
    """Dense GGN, empirical Fisher, Hessian and gradient of factor * sum_i loss_i;
    with `reverse`, from reverse-mode derivatives only (`jacrev`, and the Hessian
    as `jacrev` of the gradient), for models with a `jax.custom_vjp`."""
    loss = resolve_loss(loss_fn)[0]
    flat, unravel = ravel_pytree(params)
    x, y = data["input"], data["target"]

    def predict(fp):
        return jax.vmap(lambda xi: model_fn(input=xi, params=unravel(fp)))(x)

    def objective(fp):
        return factor * jnp.sum(jax.vmap(loss)(predict(fp), y))

    pred = predict(flat)
    batch = pred.shape[0]
    jacobian = jax.jacrev if reverse else jax.jacfwd
    jac = jacobian(predict)(flat).reshape(batch, -1, flat.size)
    loss_hess = jax.vmap(jax.hessian(loss))(pred, y).reshape(batch, jac.shape[1], -1)
    ggn = factor * jnp.einsum("bip,bij,bjq->pq", jac, loss_hess, jac)
    per_sample = jax.vmap(
        jax.grad(lambda fp, xi, yi: loss(model_fn(input=xi, params=unravel(fp)), yi)),
        in_axes=(None, 0, 0),
    )(flat, x, y)
    emp_fisher = factor * per_sample.T @ per_sample
    hessian = jax.jacrev(jax.grad(objective))(flat) if reverse else None
    hessian = jax.hessian(objective)(flat) if hessian is None else hessian
    return {
        "ggn": ggn,
        "fisher": ggn,
        "empirical_fisher": emp_fisher,
        "hessian": hessian,
        "grad": jax.grad(objective)(flat),
        "loss": objective(flat),
    }


@eqx.filter_jit
def operator_matrix(op):
    """`op.as_matrix()` as one compiled program (run eagerly, each of its
    operations compiles on its own)."""
    return op.as_matrix()


@eqx.filter_jit
def as_dense(mv, params):
    """The matrix of a pytree -> pytree linear map, column by column."""
    flat, unravel = ravel_pytree(params)
    basis = jnp.eye(flat.size, dtype=flat.dtype)
    return jax.vmap(lambda e: ravel_pytree(mv(unravel(e)))[0])(basis).T


def _as_array(tree):
    if isinstance(tree, jax.Array | np.ndarray | float):
        return np.asarray(tree)
    return np.asarray(ravel_pytree(eqx.filter(tree, eqx.is_inexact_array))[0])


def assert_rel_close(actual, expected, tol=1e-8):
    """Relative 2-norm error `<= tol`, for arrays or pytrees of arrays."""
    actual, expected = _as_array(actual), _as_array(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(np.linalg.norm(expected), 1e-300)
    err = np.linalg.norm(actual - expected) / scale
    assert err <= tol, f"relative error {err:.3e} > {tol:.1e}"
    np.testing.assert_allclose(
        actual, expected, rtol=tol, atol=tol * np.abs(expected).max()
    )
