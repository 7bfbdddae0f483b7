"""eqx_ggn inside laplax 0.0.2's own Laplace pipeline, against laplax's GGN.

A tanh MLP 2-16-16-2 regressed on 64 points in float64. For each of laplax's
curvature approximations (full, diagonal, Lanczos and LOBPCG of rank 10), the
posterior covariance (dense, through laplax's `cov_mv`) and the linearized
predictive variance on 8 inputs are computed twice: once on
`eqx_ggn.create_ggn_mv` and once on `laplax.curv.ggn.create_ggn_mv`. The table
gives the largest difference relative to the largest entry.

The second table runs `laplax.api.laplace` itself, which takes no GGN product as
an argument: it builds one with `laplax.api.create_ggn_mv_without_data`, so that
name is patched with eqx_ggn's function for the run.

Run: `python benchmarks/laplax_pipeline.py` (about 30 s on 2 CPU cores).
"""

import datetime
import platform
import unittest.mock

import equinox as eqx
import jax
import jax.numpy as jnp
import laplax.api
import laplax.curv.ggn as laplax_ggn
from jax.flatten_util import ravel_pytree
from laplax.curv import create_posterior_fn
from laplax.eval.pushforward import (
    lin_pred_mean,
    lin_pred_var,
    lin_setup,
    set_lin_pushforward,
)


jax.config.update("jax_enable_x64", True)

import eqx_ggn  # noqa: E402


APPROXIMATIONS = {
    "full": {},
    "diagonal": {},
    "lanczos": {"rank": 10, "key": jax.random.key(3)},
    "lobpcg": {"rank": 10, "key": jax.random.key(3)},
}
PRIOR = {"prior_prec": 0.5}


def problem():
    model = eqx.nn.MLP(2, 2, 16, 2, activation=jnp.tanh, key=jax.random.key(0))
    model = jax.tree.map(
        lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, model
    )
    x = jax.random.normal(jax.random.key(1), (64, 2), jnp.float64)
    data = {"input": x, "target": jnp.sin(x) + 0.1 * x**2}
    params, static = eqx_ggn.partition(model)
    return params, eqx_ggn.as_model_fn(static), data


def dense(posterior, params):
    flat, unflatten = ravel_pytree(params)
    cov_mv = posterior.cov_mv(posterior.state)
    return jax.vmap(lambda e: ravel_pytree(cov_mv(unflatten(e)))[0])(
        jnp.eye(flat.size, dtype=flat.dtype)
    )


def variances(model_fn, params, posterior_fn, inputs):
    predictive = set_lin_pushforward(
        model_fn,
        params,
        posterior_fn,
        PRIOR,
        pushforward_fns=[lin_setup, lin_pred_mean, lin_pred_var],
    )
    return jax.vmap(lambda x: predictive(x)["pred_var"])(inputs)


def relative(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def main():
    params, model_fn, data = problem()
    inputs = data["input"][:8]
    print(
        f"# {datetime.date.today()} | {platform.processor() or platform.machine()}"
        f" | jax {jax.__version__} | float64\n"
    )
    print("| approximation | covariance | predictive variance |")
    print("|---|---|---|")
    for name, kwargs in APPROXIMATIONS.items():
        results = []
        for create in (eqx_ggn.create_ggn_mv, laplax_ggn.create_ggn_mv):
            mv = create(model_fn, params, data, "mse")
            posterior_fn = create_posterior_fn(name, mv, layout=params, **kwargs)
            results.append(
                (
                    dense(posterior_fn(PRIOR), params),
                    variances(model_fn, params, posterior_fn, inputs),
                )
            )
        (cov, var), (ref_cov, ref_var) = results
        print(
            f"| {name} | {relative(cov, ref_cov):.1e} | {relative(var, ref_var):.1e} |"
        )

    print("\n`laplax.api.laplace(..., num_curv_samples=64, num_total_samples=256)`:\n")
    print("| approximation | covariance |")
    print("|---|---|")
    for name, kwargs in APPROXIMATIONS.items():
        covariances = []
        for create in (
            eqx_ggn.create_ggn_mv_without_data,
            laplax_ggn.create_ggn_mv_without_data,
        ):
            with unittest.mock.patch.object(
                laplax.api, "create_ggn_mv_without_data", create
            ):
                posterior_fn, _ = laplax.api.laplace(
                    model_fn,
                    params,
                    data,
                    loss_fn="mse",
                    curv_type=name,
                    num_curv_samples=64,
                    num_total_samples=256,
                    **kwargs,
                )
            covariances.append(dense(posterior_fn(PRIOR), params))
        print(f"| {name} | {relative(*covariances):.1e} |")


if __name__ == "__main__":
    main()
