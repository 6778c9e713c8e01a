"""``jax.random.split`` of a concrete threefry key, computed on the host with NumPy.

Contract, stated once: ``split(words, count)`` returns the ``(count, 2)`` uint32 words that
``jax.random.split`` gives for the raw threefry2x32 key ``words`` (shape ``(2,)``, uint32) under
the current ``jax_threefry_partitionable`` setting, bit for bit (``tests/test_layers.py`` checks
both settings). Threefry-2x32 is integer arithmetic alone (20 rounds of add, rotate and xor on
uint32 words, wrapping), so NumPy reproduces it exactly. Why: a combinator's ``init`` splits its
key once per call, and on a fresh process compiling that split was a program of its own (about
0.15 s of a small network's first ``init`` on a CPU); the children's keys now reach the device
with ``jax.device_put``, which compiles nothing.
"""

from __future__ import annotations

import jax
import numpy as np

__all__ = ["split"]

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(k1: np.uint32, k2: np.uint32, x0: np.ndarray, x1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """JAX's ``threefry2x32_p`` (Salmon et al.'s Threefry-2x32, 20 rounds) on uint32 arrays."""
    ks = (k1, k2, np.uint32(k1 ^ k2 ^ np.uint32(0x1BD11BDA)))
    x = [x0 + ks[0], x1 + ks[1]]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x[0] = x[0] + x[1]
            x[1] = (x[1] << np.uint32(r)) | (x[1] >> np.uint32(32 - r))
            x[1] = x[0] ^ x[1]
        x[0] = x[0] + ks[(i + 1) % 3]
        x[1] = x[1] + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x[0], x[1]


def split(words: np.ndarray, count: int) -> np.ndarray:
    """``jax.random.split`` of the raw threefry key ``words``: ``(count, 2)`` uint32."""
    k1, k2 = (np.uint32(w) for w in words)
    with np.errstate(over="ignore"):
        if jax.config.jax_threefry_partitionable:  # type: ignore[attr-defined]
            high, low = np.zeros(count, np.uint32), np.arange(count, dtype=np.uint32)
            return np.stack(_threefry2x32(k1, k2, high, low), axis=1)
        counts = np.arange(2 * count, dtype=np.uint32)
        bits = np.concatenate(_threefry2x32(k1, k2, counts[:count], counts[count:]))
        return bits.reshape(count, 2)
