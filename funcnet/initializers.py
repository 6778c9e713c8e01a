"""Weight initializers (book: ``Dense(weight_init="standard" | "glorot")``).

An initializer is any ``(key, shape, dtype) -> array``. Fans are read from the shape: for
a dense ``(num_in, num_out)`` matrix they are its two sizes; for a convolution kernel
``(height, width, in_channels, out_channels)`` (HWIO) they are multiplied by the receptive
field ``height * width``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from funcnet import _checks

__all__ = ["Initializer", "glorot_normal", "normal", "standard_normal", "zeros"]

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def _fans(shape: Sequence[int]) -> tuple[int, int]:
    if len(shape) < 2:
        raise ValueError(f"glorot_normal: shape must have at least 2 dimensions (fan_in, fan_out), got {tuple(shape)}.")
    receptive = int(np.prod(shape[:-2]))
    return shape[-2] * receptive, shape[-1] * receptive


def standard_normal(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """N(0, 1): the book's default for W and B.

    Args:
      key: a PRNG key.
      shape: the array's shape.
      dtype: a floating dtype; default ``float32``.

    Returns:
      An array of ``shape`` and ``dtype`` drawn from N(0, 1).
    """
    return jax.random.normal(key, tuple(shape), dtype)


@dataclasses.dataclass(frozen=True)
class _Normal:
    stddev: float

    def __call__(self, key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.normal(key, tuple(shape), dtype) * jnp.asarray(self.stddev, dtype)

    def __repr__(self) -> str:
        return f"normal({self.stddev!r})"


def normal(stddev: float) -> Initializer:
    """N(0, stddev**2): the book's ``weight_scale`` (chapter 6 draws every weight from N(0, 0.01)).

    A value, like the layers: ``normal(0.01) == normal(0.01)``.

    Args:
      stddev: the standard deviation, > 0.

    Returns:
      An initializer ``(key, shape, dtype=float32) -> array`` drawing from N(0, stddev**2).
    """
    _checks.real_number("normal", "stddev", stddev, low=0.0, low_open=True)
    return _Normal(float(stddev))


def glorot_normal(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """N(0, 2 / (fan_in + fan_out)): the book's chapter-4 "glorot" initialization.

    Args:
      key: a PRNG key.
      shape: at least 2-D: ``(fan_in, fan_out)``, or a kernel ``(..., in, out)`` whose fans are
        multiplied by the receptive field (the product of the leading sizes).
      dtype: a floating dtype; default ``float32``.

    Returns:
      An array of ``shape`` and ``dtype``.
    """
    fan_in, fan_out = _fans(shape)
    return jax.random.normal(key, tuple(shape), dtype) * jnp.sqrt(jnp.asarray(2.0 / (fan_in + fan_out), dtype))


def zeros(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """All zeros (a common choice for B).

    Args:
      key: unused (an initializer's signature).
      shape: the array's shape.
      dtype: default ``float32``.

    Returns:
      Zeros of ``shape`` and ``dtype``.
    """
    del key
    return jnp.zeros(tuple(shape), dtype)
