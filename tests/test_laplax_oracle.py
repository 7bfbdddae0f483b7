"""laplax 0.0.2 as an oracle for the seed functions, where laplax works."""

import jax
import pytest
from helpers import as_dense, assert_rel_close, log_cosh_loss, make_problem
from laplax.curv import ggn as laplax_ggn

import eqx_ggn


pytestmark = pytest.mark.usefixtures("x64")

CASES = [
    ("regression", "mse"),
    ("regression", "none"),
    ("regression", log_cosh_loss),
    ("probabilities", "binary_cross_entropy"),
    ("onehot", "cross_entropy"),
    ("labels", "cross_entropy"),
]


@pytest.mark.parametrize(("kind", "loss_fn"), CASES)
@pytest.mark.parametrize("num_total_samples", [None, 100])
def test_create_ggn_mv_matches_laplax(kind, loss_fn, num_total_samples):
    model, data = make_problem(kind)
    params, static = eqx_ggn.partition(model)
    model_fn = eqx_ggn.as_model_fn(static)
    kwargs = {"num_total_samples": num_total_samples}
    ours = eqx_ggn.create_ggn_mv(model_fn, params, data, loss_fn, **kwargs)
    theirs = laplax_ggn.create_ggn_mv(model_fn, params, data, loss_fn, **kwargs)
    assert_rel_close(as_dense(ours, params), as_dense(theirs, params), tol=1e-12)


@pytest.mark.parametrize(("kind", "loss_fn"), CASES[:2] + CASES[4:5])
def test_without_data_matches_laplax(kind, loss_fn):
    model, data = make_problem(kind)
    params, static = eqx_ggn.partition(model)
    model_fn = eqx_ggn.as_model_fn(static)
    ours = eqx_ggn.create_ggn_mv_without_data(model_fn, params, loss_fn, 0.25)
    theirs = laplax_ggn.create_ggn_mv_without_data(model_fn, params, loss_fn, 0.25)
    assert_rel_close(
        as_dense(lambda v: ours(v, data), params),
        as_dense(lambda v: theirs(v, data), params),
        tol=1e-12,
    )


def test_vmap_over_data_false_and_custom_hessian_match_laplax():
    model, data = make_problem("regression")
    params, static = eqx_ggn.partition(model)
    per_sample = eqx_ggn.as_model_fn(static)

    def model_fn(input, params):  # noqa: A002
        return jax.vmap(lambda x: per_sample(input=x, params=params))(input)

    def hmv(jv, pred, target):
        del target
        return 3.0 * jv + pred * 0.0

    for kwargs in ({"loss_fn": "mse"}, {"loss_hessian_mv": hmv}):
        ours = eqx_ggn.create_ggn_mv(
            model_fn, params, data, vmap_over_data=False, **kwargs
        )
        theirs = laplax_ggn.create_ggn_mv(
            model_fn, params, data, vmap_over_data=False, **kwargs
        )
        assert_rel_close(as_dense(ours, params), as_dense(theirs, params), tol=1e-12)


def test_same_signatures_as_laplax():
    import inspect

    for name in ("create_ggn_mv", "create_ggn_mv_without_data"):
        ours = dict(inspect.signature(getattr(eqx_ggn, name)).parameters)
        theirs = inspect.signature(getattr(laplax_ggn, name)).parameters
        # One addition, last and keyword-only, whose default changes nothing.
        jac = ours.pop("jac")
        assert (jac.kind, jac.default) == (inspect.Parameter.KEYWORD_ONLY, None)
        assert list(ours) == list(theirs)
        for p, q in zip(ours.values(), theirs.values(), strict=True):
            assert (p.kind, p.default) == (q.kind, q.default), p.name


def test_laplax_posterior_on_our_ggn_matches_laplax_own():
    """laplax 0.0.2's own pipeline (full covariance, then the linearized
    predictive variance) on eqx_ggn's `create_ggn_mv` equals it on laplax's."""
    from jax.flatten_util import ravel_pytree
    from laplax.curv import create_posterior_fn
    from laplax.eval.pushforward import (
        lin_pred_mean,
        lin_pred_var,
        lin_setup,
        set_lin_pushforward,
    )

    model, data = make_problem("regression")
    params, static = eqx_ggn.partition(model)
    model_fn = eqx_ggn.as_model_fn(static)
    flat, unflatten = ravel_pytree(params)
    prior = {"prior_prec": 0.5}

    def pipeline(create_ggn_mv):
        mv = create_ggn_mv(model_fn, params, data, "mse", num_total_samples=40)
        posterior_fn = create_posterior_fn("full", mv, layout=params)
        posterior = posterior_fn(prior)
        cov_mv = posterior.cov_mv(posterior.state)
        covariance = jax.vmap(lambda e: ravel_pytree(cov_mv(unflatten(e)))[0])(
            jax.numpy.eye(flat.size, dtype=flat.dtype)
        )
        predictive = set_lin_pushforward(
            model_fn,
            params,
            posterior_fn,
            prior,
            pushforward_fns=[lin_setup, lin_pred_mean, lin_pred_var],
        )
        variance = jax.vmap(lambda x: predictive(x)["pred_var"])(data["input"][:4])
        return covariance, variance

    (ours_cov, ours_var), (laplax_cov, laplax_var) = (
        pipeline(eqx_ggn.create_ggn_mv),
        pipeline(laplax_ggn.create_ggn_mv),
    )
    assert_rel_close(ours_cov, laplax_cov, tol=1e-12)
    assert_rel_close(ours_var, laplax_var, tol=1e-12)
    assert jax.numpy.all(ours_var > 0)
