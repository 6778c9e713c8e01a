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

``rotary_embedding(x, positions, *, base=10000.0)`` is rotary position embedding (RoPE, RoFormer)
on ``x: (batch, T, heads, head_dim)``, ``head_dim`` even, with ``positions`` of shape ``(T,)`` or
``(batch, T)`` (integer or float, traced or not: a decoding step passes its offset positions). It
uses the split-halves pairing of GPT-NeoX and of Hugging Face's LLaMA (``rotate_half``): for ``i <
head_dim / 2`` the pair ``(x[..., i], x[..., i + head_dim / 2])`` is rotated by the angle
``positions * base ** (-2 i / head_dim)``. Meta's original LLaMA and GPT-J checkpoints pair
neighbours ``(2i, 2i + 1)`` instead (interleaved); to use such a checkpoint, permute the columns
of ``W_q`` and ``W_k`` (and their biases, if any) within each head by ``perm = [0, 2, 4, ...,
head_dim - 2, 1, 3, ..., head_dim - 1]`` (column ``j`` of a head takes its old column
``perm[j]``): the rotated q and k are then the
interleaved ones permuted alike, so every attention score is unchanged (this is Hugging Face's
``convert_llama_weights_to_hf`` permutation). Hugging Face checkpoints already use halves. The
angles are computed in float32 at least (float16 and bfloat16 ``x`` are rotated in float32 and
cast back). The backward is the inverse rotation (by minus the angle) of the output gradient;
positions are not differentiable: integer positions get a ``float0`` cotangent and float
positions a zero one (``jax.grad`` with respect to them is 0).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from funcnet import _checks, initializers
from funcnet.layers import Layer, LayerSpec, check_input_shape, check_params, default_dtype, init_only, layer_spec

__all__ = [
    "Embedding",
    "EmbeddingParams",
    "PositionalEmbedding",
    "PositionalEmbeddingParams",
    "embedding",
    "rotary_embedding",
]


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
    """``W[ids]``: rows of ``W: (vocab, features)`` for integer ``ids`` of any shape.

    Args:
      ids: integer token ids in ``[0, vocab)``, any shape.
      W: ``(vocab, features)`` floating table.

    Returns:
      ``(*ids.shape, features)``; W's gradient is the output gradient scattered-added by id.
    """
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
    """Integer ids ``(batch, ...)`` to vectors ``(batch, ..., features)``; W drawn from N(0, 1) by default.

    Args:
      vocab_size: the number of ids.
      features: the vectors' size.
      w_init: the table's initializer; default ``standard_normal`` (torch's ``nn.Embedding``).
      dtype: parameter dtype; ``None`` is JAX's default float.

    Returns:
      A ``Layer``; params ``EmbeddingParams(W)``, ``W: (vocab_size, features)``.
    """
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

    def decode(self, params: Any, cache: Any, x: Any, *, offset: jax.Array, **inputs: Any) -> tuple[Any, Any]:
        """Decoding: ``x[b, t] + W[offset[b] + t]``, the positions the new entries hold."""
        del inputs
        self.apply(params, x)  # the checks
        positions = offset[:, None] + jnp.arange(x.shape[1], dtype=offset.dtype)[None, :]
        return x + jnp.take(params.W, positions, axis=0, mode="clip"), cache


_POSITIONS_INIT = initializers.normal(0.02)


def PositionalEmbedding(
    max_length: int, *, w_init: initializers.Initializer = _POSITIONS_INIT, dtype: Any = None
) -> Layer:
    """Learned positions: ``x + W[:T]`` on ``(batch, T, features)``, ``T <= max_length``; W from N(0, 0.02**2).

    Args:
      max_length: the longest sequence, T's bound.
      w_init: the table's initializer; default ``normal(0.02)`` (GPT-2's).
      dtype: parameter dtype; ``None`` is JAX's default float.

    Returns:
      A ``Layer`` keeping the input's shape; params ``PositionalEmbeddingParams(W)``,
      ``W: (max_length, features)``.
    """
    name = f"PositionalEmbedding({max_length})"
    _checks.positive_int(name, "max_length", max_length)
    _checks.callable_(name, "w_init", w_init)
    return _PositionalEmbedding(int(max_length), w_init, default_dtype(dtype)).layer()


# --- Rotary position embedding (RoPE) --------------------------------------------------------


def _rotary_angles(positions: jax.Array, head_dim: int, base: float, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """cos and sin of ``positions * base ** (-2i / head_dim)``, shaped to broadcast against
    ``(batch, T, heads, head_dim // 2)``: ``(1 or batch, T, 1, head_dim // 2)``, in ``dtype``."""
    inverse_frequency = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # exact on the host
    inverse_frequency = inverse_frequency.reshape((1,) * positions.ndim + (-1,))  # same rank, no promotion
    angles = positions.astype(dtype)[..., None] * jnp.asarray(inverse_frequency, dtype)
    angles = angles[None, :, None, :] if positions.ndim == 1 else angles[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate each pair ``(x[..., i], x[..., i + half])`` by the angle whose cos and sin are given."""
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    return jnp.concatenate([first * cos - second * sin, first * sin + second * cos], axis=-1)


def _rotary_embedding(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    wide = _checks.wide(x.dtype)
    cos, sin = _rotary_angles(positions, x.shape[-1], base, wide)
    return _rotate(x.astype(wide), cos, sin).astype(x.dtype)


def _rotary_embedding_fwd(x: jax.Array, positions: jax.Array, base: float) -> tuple[jax.Array, jax.Array]:
    return _rotary_embedding(x, positions, base), positions  # the angles are recomputed, not stored


def _rotary_embedding_bwd(base: float, positions: jax.Array, output_grad: jax.Array) -> tuple[jax.Array, Any]:
    # A rotation is orthogonal: its transpose, the rotation by minus the angle, carries the
    # gradient back. Positions are not differentiable.
    wide = _checks.wide(output_grad.dtype)
    cos, sin = _rotary_angles(positions, output_grad.shape[-1], base, wide)
    input_grad = _rotate(output_grad.astype(wide), cos, -sin).astype(output_grad.dtype)
    if jnp.issubdtype(positions.dtype, jnp.integer):
        return input_grad, np.zeros(positions.shape, dtype=jax.dtypes.float0)
    return input_grad, jnp.zeros_like(positions)


_rotary_embedding_vjp = jax.custom_vjp(_rotary_embedding, nondiff_argnums=(2,))
_rotary_embedding_vjp.defvjp(_rotary_embedding_fwd, _rotary_embedding_bwd)


def rotary_embedding(x: jax.Array, positions: jax.Array | np.ndarray, *, base: float = 10000.0) -> jax.Array:
    """Rotary position embedding (split-halves pairing; see the module docstring).

    Args:
      x: queries or keys, ``(batch, T, heads, head_dim)``, floating, ``head_dim`` even.
      positions: each step's position, ``(T,)`` (shared by the batch) or ``(batch, T)``; an
        integer or float array, possibly traced (a decoding offset). Not differentiated.
      base: the frequency base, a Python number > 0 (10000 in RoFormer and LLaMA).

    Returns:
      ``x`` with each pair ``(x[..., i], x[..., i + head_dim // 2])`` rotated by
      ``positions * base ** (-2 i / head_dim)``, in ``x``'s shape and dtype.
    """
    fn = "rotary_embedding"
    _checks.floating(fn, "x", x)
    _checks.rank(fn, "x", x, 4, "(batch, T, heads, head_dim)")
    if x.shape[-1] % 2:
        raise ValueError(
            f"{fn}: x's head_dim (its last axis) must be even, since rope rotates pairs of features, "
            f"got head_dim {x.shape[-1]} (x.shape={tuple(x.shape)})."
        )
    _checks.array(fn, "positions", positions)
    if not (jnp.issubdtype(positions.dtype, jnp.integer) or jnp.issubdtype(positions.dtype, jnp.floating)):
        raise TypeError(f"{fn}: positions must have an integer or floating dtype, got {positions.dtype}.")
    batch, steps = x.shape[0], x.shape[1]
    if tuple(positions.shape) not in ((steps,), (batch, steps)):
        raise ValueError(
            f"{fn}: positions must have shape (T,) = ({steps},) or (batch, T) = ({batch}, {steps}) for "
            f"x.shape={tuple(x.shape)}, got {tuple(positions.shape)}."
        )
    if isinstance(base, bool) or not isinstance(base, numbers.Real):
        raise TypeError(f"{fn}: base must be a Python number (fixed when traced), got {type(base).__name__} {base!r}.")
    if not (math.isfinite(base) and base > 0):
        raise ValueError(f"{fn}: base must be a finite number > 0, got {base}.")
    if jnp.issubdtype(positions.dtype, jnp.floating):
        positions = lax.stop_gradient(positions)  # documented: positions are not differentiable
    return _rotary_embedding_vjp(x, positions, float(base))
