from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Int, PyTree

from ._checks import check_like, check_numbers, check_periods
from ._grafting import scale_by_grafting
from ._kfac import (
    MAX_DIM,
    KroneckerFactor,
    KroneckerInverse,
    apply_damped_inverses,
    check_weight_sharing,
    damped_inverses,
    fold_factors,
    is_due,
    step_statistics,
    zero_factors,
)
from ._losses import LossFn, resolve_loss


class ScaleByKFACState(NamedTuple):
    """The step count, KFAC's running factors (a `KroneckerFactor` per captured
    layer, the curvature's diagonal elsewhere) and their damped inverses at the
    last refresh."""

    count: Int[Array, ""]
    factors: PyTree
    inverses: PyTree


def scale_by_kfac(
    loss_fn: LossFn = "cross_entropy",
    *,
    curvature: str = "fisher",
    relative_damping: float = 0.1,
    kfac_decay: float = 0.95,
    kfac_every: int = 20,
    kfac_inverse_every: int = 20,
    kfac_max_dim: int | None = None,
    weight_sharing: str = "expand",
) -> optax.GradientTransformationExtraArgs:
    """Precondition the updates with KFAC's damped inverse, and nothing else: no
    linearization, no step-size rule, no rejection.

    Every `kfac_every` steps one batch's factors (see [`eqx_ggn.kfac_factors`][];
    `curvature="fisher"` samples labels, one backward pass) join a running
    average. The update is `(KFAC + λ)^{-1} u` for the incoming `u`, with `λ =
    relative_damping * tr(KFAC) / P`, the mean eigenvalue of the approximation
    over its `P` entries: scale-free, so multiplying the loss by a constant
    changes nothing. Its scale is the curvature's, which on a mini-batch is
    seldom the right step: [`eqx_ggn.grafted_kfac`][] takes the step length from
    Adam instead.

    Since `λ` follows the factors, each layer's damped inverse `(A + π √λ I)^{-1}
    ⊗ (G + √λ / π I)^{-1}` (the split of [`eqx_ggn.kfac_inverse`][]) is formed
    once per refresh, every `kfac_inverse_every` steps, from one Cholesky
    factorization per factor and no eigendecomposition. A step then costs two
    matrix products per layer. Where a Cholesky fails (a singular factor at
    `relative_damping=0`, such as a layer with more inputs than the batch has
    rows) that layer's update is zero, and `grafted_kfac` takes Adam's update
    for it instead.

    **Arguments:**

    - `loss_fn`: the loss whose curvature KFAC approximates, as in
        [`eqx_ggn.gauss_newton`][].
    - `curvature`: `"fisher"` (sampled labels, one backward pass) or `"ggn"`
        (exact factors).
    - `relative_damping`: `λ` as a fraction of KFAC's mean eigenvalue.
    - `kfac_decay`, `kfac_every`, `kfac_inverse_every`, `kfac_max_dim` (`None`:
        2048), `weight_sharing`: as in [`eqx_ggn.scale_by_gauss_newton`][].

    **Returns:**

    An `optax.GradientTransformationExtraArgs` with a `ScaleByKFACState`.
    `update(updates, state, params, *, model, batch)`: `model` the Equinox
    module whose layers KFAC finds, `batch = {"input": X, "target": Y}`.

    !!! example

        ```python
        import equinox as eqx
        import jax, jax.numpy as jnp
        import eqx_ggn

        k1, k2 = jax.random.split(jax.random.key(0))
        net = eqx.nn.Linear(3, 2, key=k1)
        x = jax.random.normal(k2, (32, 3))
        batch = {"input": x, "target": (x[:, 0] > 0).astype(jnp.int32)}
        params = eqx.filter(net, eqx.is_inexact_array)
        grads = eqx.filter_grad(lambda m: eqx_ggn.cross_entropy_loss(
            jax.vmap(m)(x), batch["target"]))(net)
        tx = eqx_ggn.scale_by_kfac("cross_entropy")
        step, state = tx.update(grads, tx.init(params), params, model=net,
                                batch=batch)
        flat = lambda t: jax.flatten_util.ravel_pytree(t)[0]
        assert flat(step) @ flat(grads) > 0  # a descent direction
        ```
    """
    resolve_loss(loss_fn)  # raises for an unknown name
    check_weight_sharing(weight_sharing)
    check_periods(kfac_every=kfac_every, kfac_inverse_every=kfac_inverse_every)
    check_numbers(
        relative_damping=(relative_damping, 0, float("inf")),
        kfac_decay=(kfac_decay, 0, 1),
    )
    if curvature not in ("fisher", "ggn"):
        raise ValueError(f"curvature must be 'fisher' or 'ggn', got {curvature!r}.")
    if kfac_max_dim is None:  # a default of None stays static under inject_hyperparams
        kfac_max_dim = MAX_DIM
    if not isinstance(kfac_max_dim, int) or kfac_max_dim < 1:
        raise ValueError(
            f"kfac_max_dim sets array shapes and must be a positive Python int, "
            f"got {kfac_max_dim!r}; under optax.inject_hyperparams, name "
            f"'kfac_max_dim' in static_args."
        )

    def init(params):
        factors = zero_factors(params, kfac_max_dim)
        inverses = jax.tree.map(
            lambda b: KroneckerInverse(*b) if isinstance(b, KroneckerFactor) else b,
            factors,
            is_leaf=lambda b: isinstance(b, KroneckerFactor),
        )
        return ScaleByKFACState(jnp.zeros([], jnp.int32), factors, inverses)

    def update(updates, state, params=None, *, model=None, batch=None, **extra_args):
        del extra_args
        if params is None or model is None or batch is None:
            raise ValueError(
                "scale_by_kfac needs update(updates, state, params, model=module, "
                "batch={'input': X, 'target': Y}): KFAC finds the layers of an "
                "Equinox module and draws its factors from the batch."
            )
        check_like("updates", updates, params, "params")
        statistics = step_statistics(
            model,
            params,
            batch,
            loss_fn,
            state.count,
            curvature=curvature,
            weight_sharing=weight_sharing,
            max_dim=kfac_max_dim,
        )
        factors = fold_factors(
            state.factors, statistics, state.count, kfac_decay, kfac_every
        )
        inverses = jax.lax.cond(
            is_due(state.count, kfac_inverse_every),
            lambda f: damped_inverses(f, relative_damping),
            lambda _: state.inverses,
            factors,
        )
        preconditioned = apply_damped_inverses(inverses, updates)
        return preconditioned, ScaleByKFACState(state.count + 1, factors, inverses)

    return optax.GradientTransformationExtraArgs(init, update)


def grafted_kfac(
    learning_rate: optax.ScalarOrSchedule,
    loss_fn: LossFn = "cross_entropy",
    *,
    momentum: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    curvature: str = "fisher",
    relative_damping: float = 0.1,
    kfac_decay: float = 0.95,
    kfac_every: int = 20,
    kfac_inverse_every: int = 20,
    kfac_max_dim: int | None = None,
    weight_sharing: str = "expand",
) -> optax.GradientTransformationExtraArgs:
    """KFAC for mini-batch training: KFAC's direction with Adam's step length.

    Per parameter array, the update is KFAC's preconditioned Nesterov momentum
    ([`eqx_ggn.scale_by_kfac`][] after `optax.trace(momentum, nesterov=True)`),
    rescaled to the norm of Adam's update of the same array
    ([`eqx_ggn.scale_by_grafting`][]), times `-learning_rate`. There is no
    linearization, line search or rejected step: a step costs a gradient, two
    matrix products per layer with its damped inverse factors, Adam's update,
    and every `kfac_every` steps one more forward and backward pass for the
    factors (plus their inverses, by Cholesky, every `kfac_inverse_every`
    steps).

    Because Adam sets the step length, the learning rate is Adam's: tune it
    over the grid you would use for `optax.adamw`. A run of few steps (a large
    model on a small budget) gains from fresher factors, `kfac_every=5,
    kfac_inverse_every=5`, at a higher step cost; see the KFAC page's "When to
    pick which". For full-batch least squares, where the exact curvature pays,
    use [`eqx_ggn.gauss_newton`][] instead.

    **Arguments:**

    - `learning_rate`: a number or an Optax schedule (e.g. warmup-cosine).
    - `loss_fn`: `"cross_entropy"`, `"mse"`, ... as in
        [`eqx_ggn.gauss_newton`][]; the Fisher samples labels from it.
    - `momentum`: the Nesterov momentum of the direction and Adam's `b1`.
    - `b2`, `eps`: Adam's.
    - `curvature`, `relative_damping`, `kfac_decay`, `kfac_every`,
        `kfac_inverse_every`, `kfac_max_dim`, `weight_sharing`: as in
        [`eqx_ggn.scale_by_kfac`][].

    **Returns:**

    An `optax.GradientTransformationExtraArgs` (an `optax.chain`). Call
    `update(grads, state, params, model=module, batch=batch)`.

    !!! example

        ```python
        import equinox as eqx
        import jax, jax.numpy as jnp
        import eqx_ggn

        k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
        net = eqx.nn.MLP(2, 3, 32, 2, key=k1)
        x = jax.random.normal(k2, (512, 2))
        y = (x[:, 0] > 0).astype(jnp.int32) + (x[:, 1] > 0).astype(jnp.int32)
        opt = eqx_ggn.grafted_kfac(3e-3, "cross_entropy")
        state = opt.init(eqx.filter(net, eqx.is_inexact_array))

        @eqx.filter_jit
        def step(net, state, key):
            i = jax.random.choice(key, 512, (64,), replace=False)
            batch = {"input": x[i], "target": y[i]}
            loss, grads = eqx.filter_value_and_grad(
                lambda m: eqx_ggn.cross_entropy_loss(jax.vmap(m)(x[i]), y[i])
            )(net)
            params = eqx.filter(net, eqx.is_inexact_array)
            updates, state = opt.update(grads, state, params, model=net, batch=batch)
            return eqx.apply_updates(net, updates), state, loss

        for key in jax.random.split(k3, 300):
            net, state, loss = step(net, state, key)
        accuracy = jnp.mean(jnp.argmax(jax.vmap(net)(x), axis=1) == y)
        assert accuracy > 0.95, accuracy
        ```
    """
    check_numbers(momentum=(momentum, 0, 1), b2=(b2, 0, 1), eps=(eps, 0, float("inf")))
    kfac = scale_by_kfac(
        loss_fn,
        curvature=curvature,
        relative_damping=relative_damping,
        kfac_decay=kfac_decay,
        kfac_every=kfac_every,
        kfac_inverse_every=kfac_inverse_every,
        kfac_max_dim=kfac_max_dim,
        weight_sharing=weight_sharing,
    )
    return optax.chain(
        scale_by_grafting(
            optax.chain(optax.trace(momentum, nesterov=True), kfac),
            optax.scale_by_adam(b1=momentum, b2=b2, eps=eps, nesterov=True),
        ),
        optax.scale_by_learning_rate(learning_rate),
    )
