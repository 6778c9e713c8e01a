"""Attention layers: ``MultiHeadAttention`` over the op of ``kernel.py``.

Contract, stated once: a layer projects with ``x @ W + B`` as ``Dense`` does, so a
``torch.nn.MultiheadAttention`` maps onto it by transposing its weights (``AttentionParams``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from funcnet import _checks, initializers, ops
from funcnet.attention.kernel import DEFAULT_BLOCK_SIZE, dot_product_attention
from funcnet.layers import Layer, LayerSpec, check_input_shape, check_params, default_dtype, layer_spec

__all__ = ["AttentionParams", "MultiHeadAttention"]


class AttentionParams(NamedTuple):
    """Projections ``x @ W + B`` as in ``Dense``: ``W_q, W_k, W_v: (features, heads * head_dim)``,
    ``W_o: (heads * head_dim, features)``, each ``B`` of shape ``(1, n)``.

    From ``torch.nn.MultiheadAttention(D, heads, batch_first=True)`` (``head_dim = D // heads``):
    ``W_q = in_proj_weight[:D].T``, ``W_k = in_proj_weight[D:2 * D].T``, ``W_v =
    in_proj_weight[2 * D:].T``, ``B_q = in_proj_bias[None, :D]`` (and so on for ``B_k``,
    ``B_v``), ``W_o = out_proj.weight.T``, ``B_o = out_proj.bias[None]``.
    """

    W_q: jax.Array
    B_q: jax.Array
    W_k: jax.Array
    B_k: jax.Array
    W_v: jax.Array
    B_v: jax.Array
    W_o: jax.Array
    B_o: jax.Array


@layer_spec
class _MultiHeadAttention(LayerSpec):
    num_heads: int
    head_dim: int | None
    is_causal: bool
    block_size: int
    w_init: initializers.Initializer
    b_init: initializers.Initializer
    dtype: Any

    @property
    def name(self) -> str:
        extra = "" if self.head_dim is None else f", head_dim={self.head_dim}"
        return f"MultiHeadAttention({self.num_heads}{extra}{', is_causal=True' if self.is_causal else ''})"

    def _head_dim(self, features: int) -> int:
        if self.head_dim is not None:
            return self.head_dim
        if features % self.num_heads:
            raise ValueError(
                f"{self.name}: num_heads {self.num_heads} must divide the features {features} "
                f"(or give head_dim), got {features} % {self.num_heads} = {features % self.num_heads}."
            )
        return features // self.num_heads

    def init(self, key: jax.Array, input_shape: Any) -> tuple[Any, Any]:
        shape = check_input_shape(self.name, input_shape, 3, "(batch, time, features)")
        features = shape[2]
        inner = self.num_heads * self._head_dim(features)
        keys = jax.random.split(key, 8)
        shapes = [(features, inner), (1, inner)] * 3 + [(inner, features), (1, features)]
        params = [(self.w_init if n % 2 == 0 else self.b_init)(keys[n], s, self.dtype) for n, s in enumerate(shapes)]
        return shape, AttentionParams(*params)

    def apply(self, params: Any, x: Any, *, key: jax.Array | None = None) -> Any:
        del key  # deterministic
        check_params(self.name, params, AttentionParams, "AttentionParams(W_q, B_q, W_k, B_k, W_v, B_v, W_o, B_o)")
        _checks.floating(self.name, "x", x)
        _checks.rank(self.name, "x", x, 3, "(batch, time, features)")
        batch, time, features = x.shape
        if np.ndim(params.W_q) != 2 or np.shape(params.W_q)[0] != features:
            raise ValueError(
                f"{self.name}: x has {features} features but params.W_q expects shape (features, heads * head_dim), "
                f"got x.shape={tuple(x.shape)}, W_q.shape={np.shape(params.W_q)} (params from another network?)."
            )
        inner = np.shape(params.W_q)[-1]
        head_dim = self._head_dim(features)
        if inner != self.num_heads * head_dim:
            raise ValueError(
                f"{self.name}: params.W_q must have num_heads * head_dim = {self.num_heads * head_dim} "
                f"columns, got shape {np.shape(params.W_q)} (params from another network?)."
            )
        rows = x.reshape(batch * time, features)

        def heads(W: jax.Array, B: jax.Array) -> jax.Array:
            projected: jax.Array = ops.bias_add(ops.weight_multiply(rows, W), B)
            return projected.reshape(batch, time, self.num_heads, head_dim)

        out = dot_product_attention(
            heads(params.W_q, params.B_q),
            heads(params.W_k, params.B_k),
            heads(params.W_v, params.B_v),
            is_causal=self.is_causal,
            block_size=self.block_size,
        )
        y = ops.bias_add(ops.weight_multiply(out.reshape(batch * time, inner), params.W_o), params.B_o)
        return y.reshape(batch, time, y.shape[-1])


def MultiHeadAttention(
    num_heads: int,
    head_dim: int | None = None,
    *,
    is_causal: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
    w_init: initializers.Initializer = initializers.glorot_normal,
    b_init: initializers.Initializer = initializers.zeros,
    dtype: Any = None,
) -> Layer:
    """Self-attention on ``(batch, time, features)``, returning ``(batch, time, features)``.

    ``q, k, v = x W_q + B_q, x W_k + B_k, x W_v + B_v`` split into ``num_heads`` heads of
    ``head_dim`` (``features // num_heads`` by default, which must then divide), then
    ``dot_product_attention`` per head (causal if asked), the heads concatenated and projected
    back, ``@ W_o + B_o``. Params ``AttentionParams`` (glorot weights, zero biases by default);
    a ``torch.nn.MultiheadAttention`` maps onto them as that class's docstring says.
    """
    name = f"MultiHeadAttention({num_heads})"
    _checks.positive_int(name, "num_heads", num_heads)
    if head_dim is not None:
        _checks.positive_int(name, "head_dim", head_dim)
    if not isinstance(is_causal, (bool, np.bool_)):
        raise TypeError(f"{name}: is_causal must be a bool, got {type(is_causal).__name__} {is_causal!r}.")
    _checks.positive_int(name, "block_size", block_size)
    _checks.callable_(name, "w_init", w_init)
    _checks.callable_(name, "b_init", b_init)
    return _MultiHeadAttention(
        int(num_heads),
        None if head_dim is None else int(head_dim),
        bool(is_causal),
        int(block_size),
        w_init,
        b_init,
        default_dtype(dtype),
    ).layer()
