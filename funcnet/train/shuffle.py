"""Epoch orders: a keyed pseudo-random permutation of the rows, without sorting random keys.

Contract, stated once: ``epoch_order(key, epoch, rows)`` returns epoch ``epoch``'s row order
and dropout key, a function of ``(key, epoch)`` alone, so a short run is a prefix of a long one
and a resumed run equals an uninterrupted one. The dropout key is
``jax.random.split(jax.random.fold_in(key, epoch))[1]``; the order's round keys are hashed from
the key's bits and the epoch (``round_keys``) with integer arithmetic alone, because every
threefry call (``fold_in``, ``split``, ``bits``) inlines its own loop of twenty rounds, and
compiling those three was a quarter of a small network's first ``fit`` on a CPU.

How: ``jax.random.permutation`` sorts random keys (twice, for a few thousand rows), and a sort
is slow on XLA's CPU backend: it cost more than a third of a book-sized epoch. Instead the
order comes from a Feistel network over ``bits``-bit integers, a bijection of ``[0, 2**bits)``
computed elementwise: ``_ROUNDS`` rounds, each keyed by 32 bits, mixing one half into the other
with an integer hash (the "lowbias32" finaliser); halves are unequal when ``bits`` is odd, and
each round is still invertible. The bijection is restricted to ``[0, rows)`` by keeping, in
order, its values below ``rows``, instead of the usual cycle-walking loop: the subsequence of a
uniform permutation of a larger set is a uniform permutation of the subset. Two details make
that hold here. A Feistel round is an even permutation, so the network reaches only even
permutations of its domain; the induced order of a subset is still uniform when at least two
elements lie outside it (a swap of those two fixes the parity), so the domain has at least
``rows + 2`` elements. And a tiny domain mixes poorly, so it has at least ``2**_MIN_BITS``. The
domain is under ``4 * rows`` elements for any ``rows`` above 64, so the cost is a few
elementwise passes over it.

How the kept values are gathered depends on the domain. Up to 2,048 elements, one sort of
32-bit words ``position << bits | value`` (the dropped ones sorted last): one kernel, which XLA
compiles in a third of the time of ``jnp.nonzero``'s cumulative sums and scatter, and which
runs as fast for 1,200 rows (for 1,797, 10-25% slower: about 15 us an epoch). Above that,
``jnp.nonzero``: the sort ran 1.7-1.9x slower for 5,000-60,000 rows (and a cumulative sum with
a scatter, 2-4x slower in the loop over epochs). Both give the same order.

``tests/test_shuffle.py`` checks uniformity with chi-square tests: over every ordering of 4,
5 and 6 rows, where each of 37, 100, 254 and 256 rows lands, and how often each of 1,797
rows precedes the next; the same tests catch the network cut to one round. Another test there
catches round keys hashed from the key alone (the same order every epoch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["dropout_key", "epoch_order", "permutation", "round_keys"]

_ROUNDS = 8
_MIN_BITS = 8
_SORT_BITS = 11  # up to this domain size (2,048) the kept values come from one sort, above from nonzero


def _mix(x: jax.Array) -> jax.Array:
    """A 32-bit integer hash with full avalanche (Wellons' "lowbias32")."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def round_keys(key: jax.Array, *salt: int | jax.Array) -> jax.Array:
    """``_ROUNDS`` 32-bit round keys hashed from ``key``'s bits and the integers ``salt`` (an
    epoch, a shard): a chain of ``_mix`` over the words, no threefry."""
    words = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    h = jnp.uint32(0x243F6A88)
    for word in (*jnp.ravel(words).astype(jnp.uint32), *(jnp.asarray(v).astype(jnp.uint32) for v in salt)):
        h = _mix(h ^ word) + jnp.uint32(0x9E3779B9)
    return _mix(h ^ jnp.arange(1, _ROUNDS + 1, dtype=jnp.uint32) * jnp.uint32(0x85EBCA6B))


def permutation(key: jax.Array, rows: int, *salt: int | jax.Array) -> jax.Array:
    """A pseudo-random permutation of ``range(rows)`` (int32), keyed by ``key`` and ``salt``."""
    keys = round_keys(key, *salt)
    bits = max(_MIN_BITS, (rows + 1).bit_length())
    x = jnp.arange(2**bits, dtype=jnp.uint32)
    left, right = bits // 2, bits - bits // 2  # x = L << right | R
    for r in range(_ROUNDS):
        high, low = x >> right, x & jnp.uint32((1 << right) - 1)
        x = (low << left) | (high ^ (_mix(low ^ keys[r]) & jnp.uint32((1 << left) - 1)))
        left, right = right, left
    if bits <= _SORT_BITS:  # one sort of (position, value) packed into 32 bits: the kept values in order
        packed = jnp.where(x < rows, jnp.arange(2**bits, dtype=jnp.uint32) << bits | x, jnp.uint32(2**32 - 1))
        order: jax.Array = (jnp.sort(packed)[:rows] & jnp.uint32(2**bits - 1)).astype(jnp.int32)
        return order
    kept = jnp.nonzero(x < rows, size=rows)[0]
    return x[kept].astype(jnp.int32)


def epoch_order(key: jax.Array, epoch: int | jax.Array, rows: int, shuffle: bool = True) -> tuple[jax.Array, jax.Array]:
    """Epoch ``epoch``'s row order and dropout key: a function of ``(key, epoch)`` alone.

    Public so that an outside loop (or the book's NumPy trainer in the tests) can replay
    exactly the batches ``fit`` sees.
    """
    order = permutation(key, rows, epoch) if shuffle else jnp.arange(rows, dtype=jnp.int32)
    return order, dropout_key(key, epoch)


def dropout_key(key: jax.Array, epoch: int | jax.Array) -> jax.Array:
    """Epoch ``epoch``'s dropout key (batch ``b`` folds in ``b``)."""
    return jax.random.split(jax.random.fold_in(key, epoch))[1]
