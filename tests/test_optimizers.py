"""Optimizers as pure tree updates: the book's rules, clipping, values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcnet as fn

PARAMS = {"W": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "B": jnp.array([[0.1, 0.2]])}
GRADS = {"W": jnp.array([[5.0, -0.5], [-7.0, 1.0]]), "B": jnp.array([[2.5, -3.0]])}


def test_clip_value_clips_each_entry_like_the_books_rnn_optimizer():
    new, _ = fn.sgd(0.1, clip_value=2.0).update(GRADS, fn.sgd(0.1).init(PARAMS), PARAMS)
    clipped = jax.tree_util.tree_map(lambda g: np.clip(g, -2, 2), GRADS)
    jax.tree_util.tree_map(lambda n, p, g: np.testing.assert_allclose(n, p - 0.1 * g, rtol=1e-12), new, PARAMS, clipped)


def test_clipping_order_value_then_norm_then_decay():
    optimizer = fn.sgd(1.0, clip_value=2.0, clip_norm=1.0, weight_decay=0.5)
    new, _ = optimizer.update(GRADS, optimizer.init(PARAMS), PARAMS)
    clipped = jax.tree_util.tree_map(lambda g: np.clip(g, -2, 2), GRADS)
    norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree_util.tree_leaves(clipped)))
    expected = jax.tree_util.tree_map(lambda p, g: p - (g / norm + 0.5 * p), PARAMS, clipped)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), new, expected)


def test_the_books_adagrad():
    optimizer = fn.adagrad(0.01, eps=1e-7)
    state = optimizer.init(PARAMS)
    params, sums = PARAMS, jax.tree_util.tree_map(np.zeros_like, PARAMS)
    for _ in range(3):
        params_new, state = optimizer.update(GRADS, state, params)
        sums = jax.tree_util.tree_map(lambda s, g: s + 1e-7 + g**2, sums, GRADS)
        params = jax.tree_util.tree_map(lambda p, s, g: p - 0.01 / np.sqrt(s) * g, params, sums, GRADS)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), params_new, params)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_bad_clip_value(value):
    with pytest.raises(ValueError, match="sgd: clip_value must be"):
        fn.sgd(0.1, clip_value=value)


def test_normal_initializer_is_a_value():
    key = jax.random.PRNGKey(0)
    w = fn.normal(0.01)(key, (300, 300), jnp.float64)
    np.testing.assert_allclose(np.std(w), 0.01, rtol=0.02)
    assert fn.normal(0.01) == fn.normal(0.01) and fn.normal(0.01) != fn.normal(0.02)
    with pytest.raises(ValueError, match=r"normal: stddev must be > 0\.0"):
        fn.normal(0.0)
