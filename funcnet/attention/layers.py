"""Attention layers over the op of ``kernel.py``: ``MultiHeadAttention`` (self-attention) and
``CrossAttention`` (queries from ``x``, keys and values from a second input).

Contract, stated once:

* A layer projects with ``x @ W + B`` as ``Dense`` does (``AttentionParams``), so a
  ``torch.nn.MultiheadAttention`` maps onto it by transposing its weights. With
  ``num_kv_heads=K`` (grouped-query attention; ``K = 1``: multi-query) the key and value
  projections have ``K * head_dim`` columns and query head ``n`` reads key/value head
  ``n // (num_heads // K)``, as torch's ``enable_gqa`` and jax.nn.
* Padding reaches the op: ``apply(params, x, *, key=None, kv_lengths=None, mask=None)`` with the
  op's meanings (``kv_lengths: (batch,)``, key ``s`` visible when ``s < kv_lengths[b]``; ``mask``
  boolean, True = attend, broadcastable to ``(batch, heads, T, S)``). ``serial``, ``residual``
  and every combinator pass them on, and ``fit`` carries them with the data (``train_data=(x,
  y, {"kv_lengths": lengths})``). A result for a real position never depends on padding.
* ``dropout`` drops attention weights, inside the kernel, only in training mode
  (``funcnet.train_apply``, the switch ``Dropout`` uses, with its key); ``apply`` is inference.
* ``rope=base`` rotates queries and keys by their positions (``funcnet.rotary_embedding``, its
  pairing convention said there) before the scores; positions are ``0 .. T - 1``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from funcnet import _checks, initializers, ops
from funcnet.attention.kernel import DEFAULT_BLOCK_SIZE, dot_product_attention
from funcnet.embeddings import rotary_embedding
from funcnet.layers import (
    Layer,
    LayerSpec,
    check_input_shape,
    check_params,
    default_dtype,
    given_inputs,
    init_only,
    layer_spec,
    refuse_training_key,
    training_key,
)

__all__ = ["AttentionParams", "AttentionWeights", "CrossAttention", "KVCache", "MultiHeadAttention"]

_INPUTS = frozenset({"kv_lengths", "mask"})


class AttentionParams(NamedTuple):
    """Projections ``x @ W + B`` as in ``Dense``: ``W_q: (features, heads * head_dim)``, ``W_k,
    W_v: (kv_features, kv_heads * head_dim)``, ``W_o: (heads * head_dim, features)``, each ``B``
    of shape ``(1, n)``.

    From ``torch.nn.MultiheadAttention(D, heads, batch_first=True)`` (``head_dim = D // heads``):
    ``W_q = in_proj_weight[:D].T``, ``W_k = in_proj_weight[D:2 * D].T``, ``W_v =
    in_proj_weight[2 * D:].T``, ``B_q = in_proj_bias[None, :D]`` (and so on for ``B_k``,
    ``B_v``), ``W_o = out_proj.weight.T``, ``B_o = out_proj.bias[None]``. With ``kdim``/``vdim``
    other than ``D`` (cross-attention) torch keeps ``q_proj_weight``, ``k_proj_weight`` and
    ``v_proj_weight`` instead: ``W_q = q_proj_weight.T`` and so on.
    """

    W_q: jax.Array
    B_q: jax.Array
    W_k: jax.Array
    B_k: jax.Array
    W_v: jax.Array
    B_v: jax.Array
    W_o: jax.Array
    B_o: jax.Array


class KVCache(NamedTuple):
    """A self-attention layer's decoding cache: the keys and values of every position so far,
    ``(batch, max_length, kv_heads, head_dim)`` each (rotary positions already applied)."""

    k: jax.Array
    v: jax.Array


class AttentionWeights(NamedTuple):
    """``AttentionParams`` without biases (``use_bias=False``, nanoGPT's ``bias=False``): ``x @ W``."""

    W_q: jax.Array
    W_k: jax.Array
    W_v: jax.Array
    W_o: jax.Array


@layer_spec
class _Attention(LayerSpec):
    """What self- and cross-attention share: the heads, the projections, the call of the op."""

    num_heads: int
    head_dim: int | None
    num_kv_heads: int | None
    is_causal: bool
    rope: float | None
    dropout: float
    block_size: int
    use_bias: bool
    w_init: initializers.Initializer = init_only()
    b_init: initializers.Initializer = init_only()
    o_init: initializers.Initializer | None = init_only()
    dtype: Any = init_only()

    kind = "attention"

    @property
    def name(self) -> str:
        extra = "" if self.head_dim is None else f", head_dim={self.head_dim}"
        if self.num_kv_heads is not None:
            extra += f", num_kv_heads={self.num_kv_heads}"
        if self.is_causal:
            extra += ", is_causal=True"
        if self.rope is not None:
            extra += f", rope={self.rope}"
        if self.dropout:
            extra += f", dropout={self.dropout}"
        if not self.use_bias:
            extra += ", use_bias=False"
        return f"{self.kind}({self.num_heads}{extra})"

    @property
    def inputs(self) -> frozenset[str]:
        return _INPUTS

    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    def _head_dim(self, features: int) -> int:
        if self.head_dim is not None:
            return self.head_dim
        if features % self.num_heads:
            raise ValueError(
                f"{self.name}: num_heads {self.num_heads} must divide the features {features} "
                f"(or give head_dim), got {features} % {self.num_heads} = {features % self.num_heads}."
            )
        head_dim = features // self.num_heads
        if self.rope is not None and head_dim % 2:
            raise ValueError(
                f"{self.name}: rope rotates pairs of features, so head_dim must be even, got {head_dim} "
                f"({features} features / {self.num_heads} heads); give an even head_dim."
            )
        return head_dim

    def _params(self, key: jax.Array, features: int, kv_features: int) -> AttentionParams | AttentionWeights:
        head_dim = self._head_dim(features)
        inner, kv_inner = self.num_heads * head_dim, self.kv_heads() * head_dim
        shapes = [(features, inner), (1, inner), (kv_features, kv_inner), (1, kv_inner)]
        shapes += [(kv_features, kv_inner), (1, kv_inner), (inner, features), (1, features)]
        keys = jax.random.split(key, 8)
        inits = [self.w_init, self.b_init] * 3 + [self.o_init or self.w_init, self.b_init]
        params = [init(k, s, self.dtype) for init, k, s in zip(inits, keys, shapes, strict=True)]
        return AttentionParams(*params) if self.use_bias else AttentionWeights(*params[::2])

    def _check(self, params: Any, x: Any, what: str, context: Any) -> int:
        """The params must be this layer's for these inputs; returns head_dim."""
        if self.use_bias:
            check_params(self.name, params, AttentionParams, "AttentionParams(W_q, B_q, W_k, B_k, W_v, B_v, W_o, B_o)")
        else:
            check_params(self.name, params, AttentionWeights, "AttentionWeights(W_q, W_k, W_v, W_o) (use_bias=False)")
        for name, value in ((what, x), ("context", context)):
            _checks.floating(self.name, name, value)
            _checks.rank(self.name, name, value, 3, "(batch, time, features)")
        if context.shape[0] != x.shape[0]:
            raise ValueError(
                f"{self.name}: x and context must share the batch size, got x.shape={tuple(x.shape)}, "
                f"context.shape={tuple(context.shape)}."
            )
        features, kv_features = x.shape[-1], context.shape[-1]
        W_q = np.shape(params.W_q)
        if len(W_q) != 2 or W_q[0] != features:
            raise ValueError(
                f"{self.name}: x has {features} features but params.W_q expects shape (features, heads * head_dim), "
                f"got x.shape={tuple(x.shape)}, W_q.shape={W_q} (params from another network?)."
            )
        head_dim = self._head_dim(features)
        expected = {
            "W_q": (features, self.num_heads * head_dim),
            "W_k": (kv_features, self.kv_heads() * head_dim),
            "W_v": (kv_features, self.kv_heads() * head_dim),
        }
        for field, shape in expected.items():
            if np.shape(getattr(params, field)) != shape:
                raise ValueError(
                    f"{self.name}: params.{field} must have shape {shape} for inputs of {features} and "
                    f"{kv_features} features, got {np.shape(getattr(params, field))} (params from another network?)."
                )
        return head_dim

    def pair(self, x: Any) -> tuple[Any, Any]:
        """The queries' input and the keys' and values' (self-attention: both ``x``)."""
        return x, x

    def apply(
        self, params: Any, x: Any, *, key: jax.Array | None = None, kv_lengths: Any = None, mask: Any = None
    ) -> Any:
        return self.forward(params, x, key=key, kv_lengths=kv_lengths, mask=mask, training=False)

    def train_apply(
        self, params: Any, x: Any, *, key: jax.Array | None = None, row_mask: jax.Array | None = None, **inputs: Any
    ) -> tuple[Any, Any]:
        """Training mode: attention dropout on (the key draws it)."""
        del row_mask
        given = given_inputs(self.name, self.inputs, inputs)
        padding = {"kv_lengths": given.get("kv_lengths"), "mask": given.get("mask")}
        return self.forward(params, x, key=key, training=True, **padding), params

    def forward(
        self, params: Any, x: Any, *, key: jax.Array | None, kv_lengths: Any, mask: Any, training: bool
    ) -> jax.Array:
        """Inference (``training=False``) or training mode, after the checks."""
        x, context = self.pair(x)
        self._check(params, x, "x", context)
        return self.attend(
            params, x, context, key=key, kv_lengths=kv_lengths, mask=mask, is_causal=self.is_causal, training=training
        )

    def _project(self, params: Any, rows: jax.Array, field: str) -> jax.Array:
        """``rows @ W + B`` for one projection (``field``: ``_q``, ``_k``, ``_v``, ``_o``)."""
        out: jax.Array = ops.weight_multiply(rows, getattr(params, "W" + field))
        return ops.bias_add(out, getattr(params, "B" + field)) if self.use_bias else out

    def heads(self, params: Any, a: jax.Array, field: str, count: int) -> jax.Array:
        """``(batch, time, features)`` projected and split into ``count`` heads."""
        batch, time, features = a.shape
        projected = self._project(params, a.reshape(batch * time, features), field)
        return projected.reshape(batch, time, count, -1)

    def rotate(self, a: jax.Array, positions: Any) -> jax.Array:
        return a if self.rope is None else rotary_embedding(a, positions, base=self.rope)

    def output(self, params: Any, out: jax.Array) -> jax.Array:
        """The heads concatenated and projected back: ``(batch, time, features)``."""
        batch, time = out.shape[:2]
        y = self._project(params, out.reshape(batch * time, -1), "_o")
        return y.reshape(batch, time, y.shape[-1])

    def attend(
        self,
        params: Any,
        x: jax.Array,
        context: jax.Array,
        *,
        key: jax.Array | None,
        kv_lengths: Any,
        mask: Any,
        is_causal: bool,
        training: bool,
    ) -> jax.Array:
        q = self.rotate(self.heads(params, x, "_q", self.num_heads), np.arange(x.shape[1], dtype=np.int32))
        k = self.rotate(self.heads(params, context, "_k", self.kv_heads()), np.arange(context.shape[1], dtype=np.int32))
        v = self.heads(params, context, "_v", self.kv_heads())
        training = training and self.dropout > 0
        if training:
            training_key(self.name, key)
        elif self.dropout > 0:
            refuse_training_key(self.name, key)
        out = dot_product_attention(
            q,
            k,
            v,
            is_causal=is_causal,
            kv_lengths=kv_lengths,
            mask=mask,
            dropout_rate=self.dropout if training else 0.0,
            dropout_key=key if training else None,
            block_size=self.block_size,
        )
        return self.output(params, out)


@layer_spec
class _MultiHeadAttention(_Attention):
    kind = "MultiHeadAttention"

    def init(self, key: jax.Array, input_shape: Any) -> tuple[Any, Any]:
        shape = check_input_shape(self.name, input_shape, 3, "(batch, time, features)")
        return shape, self._params(key, shape[2], shape[2])

    def init_cache(self, params: Any, batch: int, max_length: int) -> KVCache:
        """Zeros for the keys and values of ``max_length`` positions: ``(batch, max_length, kv_heads, head_dim)``."""
        W_k = params.W_k
        shape = (batch, max_length, self.kv_heads(), np.shape(W_k)[-1] // self.kv_heads())
        return KVCache(jnp.zeros(shape, W_k.dtype), jnp.zeros(shape, W_k.dtype))

    def decode(self, params: Any, cache: Any, x: Any, *, offset: jax.Array, **inputs: Any) -> tuple[Any, KVCache]:
        """The new positions' keys and values written into the cache at ``offset[b]``, their queries
        attending to every cached key before them (causal from ``q_offset=offset``, rotary
        positions ``offset[b] + t``): what ``apply`` computes for them on the whole prefix."""
        if not self.is_causal:
            raise TypeError(
                f"{self.name}: decoding extends sequences one position at a time, which needs causal "
                "self-attention (is_causal=True); without it every position would see the future."
            )
        if any(value is not None for value in inputs.values()):
            raise TypeError(
                f"{self.name}: decoding reads each sequence's length from the cache's positions; pass no "
                "kv_lengths or mask (give generate/prefill the prompt lengths instead)."
            )
        if not isinstance(cache, KVCache):
            raise TypeError(f"{self.name}: cache must be a KVCache(k, v) from init_cache, got {type(cache).__name__}.")
        self._check(params, x, "x", x)
        time = x.shape[1]
        positions = offset[:, None] + jnp.arange(time, dtype=offset.dtype)[None, :]
        q = self.rotate(self.heads(params, x, "_q", self.num_heads), positions)
        k = self.rotate(self.heads(params, x, "_k", self.kv_heads()), positions)
        v = self.heads(params, x, "_v", self.kv_heads())
        write = jax.vmap(lambda c, new, at: lax.dynamic_update_slice_in_dim(c, new.astype(c.dtype), at, axis=0))
        cache = KVCache(write(cache.k, k, offset), write(cache.v, v, offset))
        out = dot_product_attention(
            q,
            cache.k,
            cache.v,
            is_causal=True,
            q_offset=offset,
            kv_lengths=offset + time,
            block_size=self.block_size,
        )
        return self.output(params, out), cache


@layer_spec
class _CrossAttention(_Attention):
    kind = "CrossAttention"

    def init(self, key: jax.Array, input_shape: Any) -> tuple[Any, Any]:
        if not (isinstance(input_shape, (tuple, list)) and len(input_shape) == 2):
            raise TypeError(
                f"{self.name}: input_shape must be a pair of shapes (x, context), e.g. from FanOut(2) and "
                f"parallel, got {input_shape!r}."
            )
        x_shape = check_input_shape(self.name, input_shape[0], 3, "(batch, T, features)")
        context_shape = check_input_shape(self.name, input_shape[1], 3, "(batch, S, context_features)")
        return x_shape, self._params(key, x_shape[2], context_shape[2])

    def pair(self, x: Any) -> tuple[Any, Any]:
        if not (isinstance(x, (tuple, list)) and len(x) == 2):
            raise TypeError(
                f"{self.name}: x must be a pair (x, context), queries from x and keys and values from "
                f"context, got {type(x).__name__}."
            )
        return x[0], x[1]


def _arguments(
    name: str,
    num_heads: int,
    head_dim: int | None,
    num_kv_heads: int | None,
    rope: float | None,
    dropout: float,
    block_size: int,
    use_bias: bool,
    w_init: initializers.Initializer,
    b_init: initializers.Initializer,
    o_init: initializers.Initializer | None,
) -> tuple[int, int | None, int | None, float | None, float, int]:
    """The constructors' shared checks, before anything is built."""
    num_heads = _checks.positive_int(name, "num_heads", num_heads)
    if head_dim is not None:
        head_dim = _checks.positive_int(name, "head_dim", head_dim)
    if num_kv_heads is not None:
        num_kv_heads = _checks.positive_int(name, "num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(
                f"{name}: num_kv_heads must divide num_heads ({num_heads}) so that each key/value head "
                f"serves a whole group of query heads, got {num_kv_heads}."
            )
    if rope is not None:
        if isinstance(rope, bool):
            raise TypeError(f"{name}: rope is the rotary base, a number such as 10000.0 (or None), got {rope!r}.")
        _checks.real_number(name, "rope", rope, low=0.0, low_open=True)
        rope = float(rope)
        if head_dim is not None and head_dim % 2:
            raise ValueError(f"{name}: rope rotates pairs of features, so head_dim must be even, got {head_dim}.")
    _checks.real_number(name, "dropout", dropout, low=0.0, high=1.0, high_open=True)
    block_size = _checks.positive_int(name, "block_size", block_size)
    if not isinstance(use_bias, (bool, np.bool_)):
        raise TypeError(f"{name}: use_bias must be a bool, got {type(use_bias).__name__} {use_bias!r}.")
    _checks.callable_(name, "w_init", w_init)
    _checks.callable_(name, "b_init", b_init)
    if o_init is not None:
        _checks.callable_(name, "o_init", o_init)
    return num_heads, head_dim, num_kv_heads, rope, float(dropout), block_size


def MultiHeadAttention(
    num_heads: int,
    head_dim: int | None = None,
    *,
    num_kv_heads: int | None = None,
    is_causal: bool = False,
    rope: float | None = None,
    dropout: float = 0.0,
    block_size: int = DEFAULT_BLOCK_SIZE,
    use_bias: bool = True,
    w_init: initializers.Initializer = initializers.glorot_normal,
    b_init: initializers.Initializer = initializers.zeros,
    o_init: initializers.Initializer | None = None,
    dtype: Any = None,
) -> Layer:
    """Self-attention on ``(batch, time, features)``, returning ``(batch, time, features)``.

    ``q, k, v = x W_q + B_q, x W_k + B_k, x W_v + B_v`` split into heads of ``head_dim``
    (``features // num_heads`` by default, which must then divide), then
    ``dot_product_attention`` per head, the heads concatenated and projected back, ``@ W_o +
    B_o``. Params ``AttentionParams`` (glorot weights, zero biases by default). ``apply(params, x,
    *, key=None, kv_lengths=None, mask=None)``: the module docstring's padding, dropout and rope.

    Args:
      num_heads: query heads.
      head_dim: features per head (default ``features // num_heads``).
      num_kv_heads: key/value heads, dividing ``num_heads`` (grouped-query attention; default
        ``num_heads``, ``1``: multi-query).
      is_causal: position ``t`` attends to positions ``<= t`` only.
      rope: the rotary base (e.g. ``10000.0``) to rotate queries and keys by their positions, or None.
      dropout: the rate at which attention weights are dropped in training (a ``key`` given).
      block_size: the kernel's tile (memory and speed, never the result).
      use_bias: with False, no biases (``AttentionWeights``), nanoGPT's ``bias=False``.
      w_init: the projections' weight initializer; default ``glorot_normal``.
      b_init: the projections' bias initializer; default ``zeros``.
      o_init: the output projection's weight initializer, if not ``w_init`` (GPT-2 scales it by
        ``1 / sqrt(2 * layers)``: ``fn.normal(0.02 / math.sqrt(2 * layers))``).
      dtype: the params' dtype (JAX's default float if None).

    Returns:
      A ``Layer`` from ``(batch, time, features)`` to the same shape; params ``AttentionParams``
      (``AttentionWeights`` with ``use_bias=False``).
    """
    name = f"MultiHeadAttention({num_heads})"
    if not isinstance(is_causal, (bool, np.bool_)):
        raise TypeError(f"{name}: is_causal must be a bool, got {type(is_causal).__name__} {is_causal!r}.")
    checked = _arguments(
        name, num_heads, head_dim, num_kv_heads, rope, dropout, block_size, use_bias, w_init, b_init, o_init
    )
    num_heads, head_dim, num_kv_heads, rope, dropout, block_size = checked
    return _MultiHeadAttention(
        num_heads,
        head_dim,
        num_kv_heads,
        bool(is_causal),
        rope,
        dropout,
        block_size,
        bool(use_bias),
        w_init,
        b_init,
        o_init,
        default_dtype(dtype),
    ).layer()


def CrossAttention(
    num_heads: int,
    head_dim: int | None = None,
    *,
    num_kv_heads: int | None = None,
    rope: float | None = None,
    dropout: float = 0.0,
    block_size: int = DEFAULT_BLOCK_SIZE,
    use_bias: bool = True,
    w_init: initializers.Initializer = initializers.glorot_normal,
    b_init: initializers.Initializer = initializers.zeros,
    o_init: initializers.Initializer | None = None,
    dtype: Any = None,
) -> Layer:
    """Cross-attention for encoder-decoder models: over a pair ``(x, context)`` (as ``FanOut`` and
    ``parallel`` produce), queries from ``x: (batch, T, features)``, keys and values from
    ``context: (batch, S, context_features)``; returns ``x``'s shape.

    ``kv_lengths``/``mask`` are the context's padding. Equals ``torch.nn.MultiheadAttention(
    features, num_heads, kdim=context_features, vdim=context_features, batch_first=True)(x,
    context, context)`` with the weights mapped as ``AttentionParams`` says. The arguments are
    ``MultiHeadAttention``'s (no ``is_causal``: the context is another sequence).

    Args:
      num_heads: query heads.
      head_dim: features per head (default ``features // num_heads``).
      num_kv_heads: key/value heads, dividing ``num_heads`` (default ``num_heads``).
      rope: the rotary base to rotate queries and keys by their positions, or None.
      dropout: the rate at which attention weights are dropped in training (a ``key`` given).
      block_size: the kernel's tile (memory and speed, never the result).
      use_bias: with False, no biases (``AttentionWeights``).
      w_init: the projections' weight initializer; default ``glorot_normal``.
      b_init: the projections' bias initializer; default ``zeros``.
      o_init: the output projection's weight initializer, if not ``w_init``.
      dtype: the params' dtype (JAX's default float if None).

    Returns:
      A ``Layer`` from the pair ``(x, context)`` (shapes: a pair of shapes) to ``x``'s shape;
      ``W_k``, ``W_v`` are ``(context_features, kv_heads * head_dim)``.
    """
    name = f"CrossAttention({num_heads})"
    checked = _arguments(
        name, num_heads, head_dim, num_kv_heads, rope, dropout, block_size, use_bias, w_init, b_init, o_init
    )
    num_heads, head_dim, num_kv_heads, rope, dropout, block_size = checked
    return _CrossAttention(
        num_heads,
        head_dim,
        num_kv_heads,
        False,
        rope,
        dropout,
        block_size,
        bool(use_bias),
        w_init,
        b_init,
        o_init,
        default_dtype(dtype),
    ).layer()
