"""Epoch orders: permutations, a function of (key, epoch) alone, and statistically uniform.

Uniformity is checked with chi-square tests, which must also catch a weak shuffle: the same
Feistel network with one round instead of eight fails them.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funcnet.train import shuffle
from funcnet.train.distributed import shard_orders
from funcnet.train.shuffle import epoch_order, permutation

KEY = jax.random.PRNGKey(0)


@pytest.mark.parametrize("rows", [1, 2, 3, 33, 100, 1797, 2048, 2049])
def test_every_order_is_a_permutation(rows):
    orders = jax.jit(jax.vmap(lambda e: epoch_order(KEY, e, rows)[0]))(jnp.arange(3))
    assert orders.dtype == jnp.int32 and orders.shape == (3, rows)
    for order in np.asarray(orders):
        np.testing.assert_array_equal(np.sort(order), np.arange(rows))


def test_the_order_is_a_function_of_key_and_epoch_alone():
    order = jax.jit(epoch_order, static_argnums=(2, 3))
    a, key_a = epoch_order(KEY, 3, 50)  # eager and compiled agree
    b, key_b = order(KEY, 3, 50)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(key_a, key_b)
    batched, _ = jax.jit(jax.vmap(lambda e: epoch_order(KEY, e, 50)))(jnp.arange(5))
    np.testing.assert_array_equal(batched[3], a)
    assert not np.array_equal(order(KEY, 4, 50)[0], a)
    assert not np.array_equal(order(jax.random.PRNGKey(1), 3, 50)[0], a)
    np.testing.assert_array_equal(order(KEY, 3, 50, False)[0], np.arange(50))
    typed = jax.random.key(0)  # new-style keys work the same way
    np.testing.assert_array_equal(np.sort(np.asarray(order(typed, 3, 50)[0])), np.arange(50))


@pytest.mark.parametrize("rows", [1, 5, 254, 1200, 2046])
def test_the_sort_and_nonzero_keep_the_same_values_in_the_same_order(monkeypatch, rows):
    keys = jax.random.split(KEY, 4)
    orders = lambda: np.asarray(jax.vmap(lambda k: permutation(k, rows, 7))(keys))
    sorted_ = orders()  # domains up to 2,048 gather the kept values with one sort
    monkeypatch.setattr(shuffle, "_SORT_BITS", 0)
    np.testing.assert_array_equal(sorted_, orders())


def _orders(rows, draws):
    keys = jax.random.split(jax.random.PRNGKey(12345), draws)
    return np.asarray(jax.jit(jax.vmap(lambda k: permutation(k, rows)))(keys))


def _z(counts, expected):
    """The chi-square statistic as a z-score: (chi2 - df) / sqrt(2 df), about N(0, 1) when uniform."""
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    df = counts.size - 1
    return (chi2 - df) / math.sqrt(2 * df)


def _every_ordering_z(rows, draws):
    index = {p: i for i, p in enumerate(itertools.permutations(range(rows)))}
    counts = np.bincount([index[tuple(o)] for o in _orders(rows, draws).tolist()], minlength=len(index))
    return _z(counts, draws / len(index))


def _positions_z(rows, draws):
    """Where each row lands: a rows x rows table of (row, position) counts."""
    positions = np.argsort(_orders(rows, draws), axis=1)
    counts = np.stack([np.bincount(positions[:, r], minlength=rows) for r in range(rows)])
    return _z(counts.ravel(), draws / rows)


def _neighbours_z(rows, draws):
    """How often row i comes before row i + 1: each a Binomial(draws, 1/2)."""
    positions = np.argsort(_orders(rows, draws), axis=1)
    before = np.sum(positions[:, :-1] < positions[:, 1:], axis=0)
    chi2 = float(np.sum((before - draws / 2) ** 2 / (draws / 4)))
    return (chi2 - (rows - 1)) / math.sqrt(2 * (rows - 1))


@pytest.mark.parametrize("rows,draws", [(4, 4_800), (5, 12_000), (6, 36_000)])
def test_every_ordering_is_equally_likely(rows, draws):
    assert abs(_every_ordering_z(rows, draws)) < 5


# 100: unequal halves; 254 and 256: a domain of rows + 2 and the next power of two
@pytest.mark.parametrize("rows", [37, 100, 254, 256])
def test_each_row_lands_anywhere_equally_often(rows):
    assert abs(_positions_z(rows, 3_000)) < 5


def test_each_row_precedes_the_next_half_the_time():
    assert abs(_neighbours_z(1797, 2_000)) < 5


def test_the_chi_square_tests_catch_a_weak_shuffle(monkeypatch):
    monkeypatch.setattr(shuffle, "_ROUNDS", 1)
    assert _every_ordering_z(5, 12_000) > 20
    assert _positions_z(100, 3_000) > 20
    rotation = lambda key, rows: jnp.roll(jnp.arange(rows), jax.random.randint(key, (), 0, rows))
    monkeypatch.setattr(shuffle, "permutation", rotation)  # rows land anywhere, neighbours stay in order
    monkeypatch.setitem(globals(), "permutation", rotation)
    assert _neighbours_z(1797, 2_000) > 20


def _shard_orders_by_loop(key, epoch, rows, shards):
    """The orders as ``distributed.shard_orders`` computed them before it was vectorised: one
    permutation per shard, unrolled in Python (22 s to compile at 256 shards)."""
    return jnp.stack([permutation(key, rows // shards, epoch, s) for s in range(shards)])


@pytest.mark.parametrize("rows, shards", [(40, 4), (3000, 3), (9001, 2), (640, 64)])
def test_each_shards_order_equals_the_loop_over_shards(rows, shards):
    """Sort (domains up to 2,048) and nonzero (above) alike, eager and under jit with a traced epoch."""
    for epoch in (0, 5):
        orders, dropout = shard_orders(KEY, epoch, rows, shards)
        np.testing.assert_array_equal(orders, _shard_orders_by_loop(KEY, epoch, rows, shards))
        np.testing.assert_array_equal(dropout, shuffle.dropout_key(KEY, epoch))
    traced = jax.jit(lambda e: shard_orders(KEY, e, rows, shards)[0])(jnp.int32(3))
    np.testing.assert_array_equal(traced, _shard_orders_by_loop(KEY, 3, rows, shards))


def test_the_shard_orders_program_does_not_grow_with_the_shards():
    """One vectorised permutation, not one per shard: the traced program has as many operations
    for 256 shards as for 2 (unrolled, compiling it took 22 s at 256 shards)."""
    size = lambda shards: len(jax.make_jaxpr(lambda k: shard_orders(k, 1, 40 * shards, shards))(KEY).jaxpr.eqns)
    assert size(256) == size(2), (size(2), size(256))
