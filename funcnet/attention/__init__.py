"""Attention: the op with its hand-derived FlashAttention backward (``kernel.py``) and the
layers built on it (``layers.py``)."""

from funcnet.attention.kernel import DEFAULT_BLOCK_SIZE, attention_dropout_mask, dot_product_attention
from funcnet.attention.layers import AttentionParams, AttentionWeights, CrossAttention, KVCache, MultiHeadAttention

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "AttentionParams",
    "AttentionWeights",
    "CrossAttention",
    "KVCache",
    "MultiHeadAttention",
    "attention_dropout_mask",
    "dot_product_attention",
]
