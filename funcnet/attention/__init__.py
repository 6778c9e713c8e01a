"""Attention: the op with its hand-derived FlashAttention backward (``kernel.py``) and the
layers built on it (``layers.py``)."""

from funcnet.attention.kernel import DEFAULT_BLOCK_SIZE, dot_product_attention
from funcnet.attention.layers import AttentionParams, MultiHeadAttention

__all__ = ["DEFAULT_BLOCK_SIZE", "AttentionParams", "MultiHeadAttention", "dot_product_attention"]
