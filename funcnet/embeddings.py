"""Embeddings: the ``embedding`` lookup op with a hand-derived backward, and ``Embedding``.

Contract, stated once: ``embedding(ids, W)`` looks up row ``ids[...]`` of ``W: (vocab,
features)`` for integer ``ids`` of any shape, giving ``ids.shape + (features,)``. Its backward
scatter-adds the output gradient into the rows of ``W`` that were read, so an id that appears
several times accumulates every one of its gradients; ``ids`` get no gradient (``float0``).

Out-of-range ids are a ``ValueError`` when the ids are concrete. Under ``jit``/``vmap`` they
cannot be inspected; they are then clamped to ``[0, vocab - 1]`` (as JAX's gathers clamp),
forward and backward alike, so an id of ``vocab + 3`` reads and trains the last row.

``PositionalEmbedding(max_length)`` adds a learned vector per position: ``x + W[:T]`` for ``x:
(batch, T, features)`` and ``W: (max_length, features)``. A sequence longer than ``max_length``
is an error (at ``init`` and at ``apply``). Its gradient is the sum over the batch of the output
gradient, a slice and an add: JAX's own, as for the combinators' plumbing.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from funcnet import _checks, initializers
from funcnet.layers import Layer, LayerSpec, check_input_shape, check_params, default_dtype, init_only, layer_spec

__all__ = ["Embedding", "EmbeddingParams", "PositionalEmbedding", "PositionalEmbeddingParams", "embedding"]


def _embedding(ids: jax.Array, W: jax.Array) -> jax.Array:
    return jnp.take(W, ids, axis=0, mode="clip")


def _embedding_fwd(ids: jax.Array, W: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _embedding(ids, W), (ids, W)


def _embedding_bwd(residuals: tuple[jax.Array, jax.Array], output_grad: jax.Array) -> tuple[Any, jax.Array]:
    ids, W = residuals
    rows = jnp.clip(ids, 0, W.shape[0] - 1).reshape(-1)
    param_grad = jnp.zeros(W.shape, output_grad.dtype).at[rows].add(output_grad.reshape(-1, W.shape[1]))
    return np.zeros(ids.shape, dtype=jax.dtypes.float0), param_grad


_embedding_vjp = jax.custom_vjp(_embedding)
_embedding_vjp.defvjp(_embedding_fwd, _embedding_bwd)


def embedding(ids: jax.Array, W: jax.Array) -> jax.Array:
    """``W[ids]``: rows of ``W: (vocab, features)`` for integer ``ids`` of any shape."""
    fn = "embedding"
    _checks.array(fn, "ids", ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(
            f"{fn}: ids must have an integer dtype (token ids), got {ids.dtype}. Cast them, e.g. ids.astype(jnp.int32)."
        )
    _checks.floating(fn, "W", W)
    _checks.rank(fn, "W", W, 2, "(vocab, features)")
    if W.shape[0] == 0:
        raise ValueError(f"{fn}: W must have at least one row, got shape {tuple(W.shape)}.")
    if _checks.is_concrete(ids) and ids.size:
        low, high = _checks.value_range(ids)
        if low < 0 or high >= W.shape[0]:
            raise ValueError(
                f"{fn}: ids must lie in [0, {W.shape[0]}) for a vocabulary of {W.shape[0]}, got "
                f"values from {low} to {high}."
            )
    return _embedding_vjp(ids, W)


class EmbeddingParams(NamedTuple):
    """``W: (vocab_size, features)``."""

    W: jax.Array


@layer_spec
class _Embedding(LayerSpec):
    vocab_size: int
    features: int
    w_init: initializers.Initializer = init_only()
    dtype: Any = init_only()

    @property
    def name(self) -> str:
        return f"Embedding({self.vocab_size}, {self.features})"

    def init(self, key: jax.Array, input_shape: Any) -> tuple[Any, Any]:
        shape = check_input_shape(self.name, input_shape, None, "(batch, ...) of ids")
        return (*shape, self.features), EmbeddingParams(self.w_init(key, (self.vocab_size, self.features), self.dtype))

    def apply(self, params: Any, x: Any, *, key: jax.Array | None = None) -> Any:
        del key
        check_params(self.name, params, EmbeddingParams, "EmbeddingParams(W)")
        if np.shape(params.W) != (self.vocab_size, self.features):
            raise ValueError(
                f"{self.name}: params.W must have shape {(self.vocab_size, self.features)}, got "
                f"{np.shape(params.W)} (params from another network?)."
            )
        return embedding(x, params.W)


def Embedding(
    vocab_size: int,
    features: int,
    *,
    w_init: initializers.Initializer = initializers.standard_normal,
    dtype: Any = None,
) -> Layer:
    """Integer ids ``(batch, ...)`` to vectors ``(batch, ..., features)``; W drawn from N(0, 1) by default."""
    name = f"Embedding({vocab_size}, {features})"
    _checks.positive_int(name, "vocab_size", vocab_size)
    _checks.positive_int(name, "features", features)
    _checks.callable_(name, "w_init", w_init)
    return _Embedding(int(vocab_size), int(features), w_init, default_dtype(dtype)).layer()


class PositionalEmbeddingParams(NamedTuple):
    """``W: (max_length, features)``, one learned vector per position."""

    W: jax.Array


@layer_spec
class _PositionalEmbedding(LayerSpec):
    max_length: int
    w_init: initializers.Initializer
    dtype: Any

    @property
    def name(self) -> str:
        return f"PositionalEmbedding({self.max_length})"

    def _length(self, length: int) -> None:
        if length > self.max_length:
            raise ValueError(
                f"{self.name}: sequences must be at most max_length = {self.max_length} long, got {length} "
                f"positions. Build it with a larger max_length."
            )

    def init(self, key: jax.Array, input_shape: Any) -> tuple[Any, Any]:
        shape = check_input_shape(self.name, input_shape, 3, "(batch, time, features)")
        self._length(shape[1])
        return shape, PositionalEmbeddingParams(self.w_init(key, (self.max_length, shape[2]), self.dtype))

    def apply(self, params: Any, x: Any, *, key: jax.Array | None = None) -> Any:
        del key
        check_params(self.name, params, PositionalEmbeddingParams, "PositionalEmbeddingParams(W)")
        _checks.floating(self.name, "x", x)
        _checks.rank(self.name, "x", x, 3, "(batch, time, features)")
        self._length(x.shape[1])
        if np.shape(params.W) != (self.max_length, x.shape[2]):
            raise ValueError(
                f"{self.name}: params.W must have shape (max_length, features) = {(self.max_length, x.shape[2])} "
                f"for x.shape={tuple(x.shape)}, got {np.shape(params.W)} (params from another network?)."
            )
        _checks.same_dtype(self.name, ("x", "params.W"), x, params.W)
        return x + params.W[None, : x.shape[1]]


_POSITIONS_INIT = initializers.normal(0.02)


def PositionalEmbedding(
    max_length: int, *, w_init: initializers.Initializer = _POSITIONS_INIT, dtype: Any = None
) -> Layer:
    """Learned positions: ``x + W[:T]`` on ``(batch, T, features)``, ``T <= max_length``; W from N(0, 0.02**2)."""
    name = f"PositionalEmbedding({max_length})"
    _checks.positive_int(name, "max_length", max_length)
    _checks.callable_(name, "w_init", w_init)
    return _PositionalEmbedding(int(max_length), w_init, default_dtype(dtype)).layer()
