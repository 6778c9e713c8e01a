"""Building blocks as values: partition/combine (``funcnet/_values.py``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcnet as fn
from funcnet._values import combine, partition


def scaled_mse(scale, prediction, target):
    return scale * fn.mean_squared_error(prediction, target)


def test_partition_and_combine_round_trip_a_pytree_callable():
    loss = jax.tree_util.Partial(scaled_mse, 0.5)
    data, static = partition((fn.Dense(3).apply, loss, fn.sgd(0.1)))
    assert 0.5 in data and 0.1 in data
    hash(static)
    _, rebuilt, _ = combine(data, static)
    x = jnp.ones((4, 2))
    np.testing.assert_allclose(rebuilt(x, 0 * x), loss(x, 0 * x))


def test_combine_checks_its_arity():
    data, static = partition((fn.sgd(0.1), jax.tree_util.Partial(scaled_mse, 0.5)))
    places = len(data)
    with pytest.raises(
        ValueError, match=rf"combine: data must hold one number per place of the static part \({places}\), got 1"
    ):
        combine(data[:1], static)
    with pytest.raises(ValueError, match=rf"\({places}\), got {places + 1}"):
        combine([*data, 1.0], static)


def test_a_partial_loss_trains_in_fit_and_its_number_is_traced():
    """``combine([], static)`` met the Partial's number and raised a bare StopIteration."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 3)))
    y = jnp.sum(x, axis=1, keepdims=True)
    net = fn.Dense(1, fn.linear)
    _, params = net.init(jax.random.PRNGKey(0), (-1, 3))
    run = lambda loss, lr: (
        fn.fit(
            net, loss, fn.sgd(lr), params, (x, y), epochs=3, batch_size=4, key=jax.random.PRNGKey(1)
        ).history.train_loss
    )
    plain = run(fn.mean_squared_error, 0.05)
    np.testing.assert_allclose(run(jax.tree_util.Partial(scaled_mse, 1.0), 0.05), plain, rtol=1e-6)
    # half the loss, twice the learning rate: the same steps, half the losses
    np.testing.assert_allclose(run(jax.tree_util.Partial(scaled_mse, 0.5), 0.1), 0.5 * plain, rtol=1e-6)
