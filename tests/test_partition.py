"""eqx_ggn.partition / as_model_fn: the semantics of eqx.partition."""

import equinox as eqx
import jax
import jax.numpy as jnp

import eqx_ggn


class Odd(eqx.Module):
    linear: eqx.nn.Linear
    counts: jax.Array
    nothing: None
    name: str
    fn: object
    frozen: jax.Array

    def __call__(self, x):
        return self.fn(self.linear(x) + self.frozen) * self.counts.sum()


def _odd():
    return Odd(
        linear=eqx.nn.Linear(3, 2, key=jax.random.key(0)),
        counts=jnp.arange(3),
        nothing=None,
        name="odd",
        fn=jnp.tanh,
        frozen=jnp.ones(2),
    )


def test_partition_is_eqx_partition():
    model = _odd()
    params, static = eqx_ggn.partition(model)
    ref_params, ref_static = eqx.partition(model, eqx.is_inexact_array)
    assert jax.tree.structure(params) == jax.tree.structure(ref_params)
    assert eqx.tree_equal(params, ref_params)
    assert eqx.tree_equal(static, ref_static)
    # Integer arrays, None, strings and functions pass through in `static`.
    assert params.counts is None and static.counts is model.counts
    assert static.name == "odd" and static.fn is jnp.tanh and static.nothing is None
    assert eqx.tree_equal(eqx.combine(params, static), model)


def test_filter_spec_freezes_arrays():
    model = _odd()
    spec = jax.tree.map(eqx.is_inexact_array, model)
    spec = eqx.tree_at(lambda m: m.frozen, spec, False)
    params, static = eqx_ggn.partition(model, spec)
    assert params.frozen is None and static.frozen is model.frozen
    assert [x.shape for x in jax.tree.leaves(params)] == [(2, 3), (2,)]


def test_as_model_fn_calls_the_combined_model():
    model = _odd()
    spec = eqx.tree_at(
        lambda m: m.frozen, jax.tree.map(eqx.is_inexact_array, model), False
    )
    params, static = eqx_ggn.partition(model, spec)
    model_fn = eqx_ggn.as_model_fn(static)
    x = jnp.array([1.0, -2.0, 0.5])
    assert jnp.array_equal(model_fn(input=x, params=params), model(x))
    # New parameter values flow through; the frozen array does not change.
    doubled = jax.tree.map(lambda p: 2 * p, params)
    expected = eqx.combine(doubled, static)(x)
    assert jnp.array_equal(model_fn(input=x, params=doubled), expected)
    grads = jax.grad(lambda p: model_fn(input=x, params=p).sum())(params)
    assert grads.frozen is None and grads.counts is None
