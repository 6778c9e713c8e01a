"""funcnet: the book *Deep Learning from Scratch* as pure JAX functions over pytrees.

Public API (re-exports only; each module states its own contract).
"""

from funcnet.attention import AttentionParams, MultiHeadAttention, dot_product_attention
from funcnet.checkpoint import load, save
from funcnet.combinators import FanInConcat, FanInSum, FanOut, parallel, residual
from funcnet.conv import AvgPool2D, Conv2D, Conv2DParams, Flatten, MaxPool2D, avg_pool2d, conv2d, max_pool2d
from funcnet.embeddings import Embedding, EmbeddingParams, PositionalEmbedding, PositionalEmbeddingParams, embedding
from funcnet.gradcheck import check_vjp
from funcnet.initializers import glorot_normal, normal, standard_normal, zeros
from funcnet.layers import (
    Dense,
    DenseParams,
    Dropout,
    Layer,
    LayerSpec,
    layer_inputs,
    layer_spec,
    named,
    param_count,
    serial,
    summary,
    train_apply,
)
from funcnet.losses import mean_squared_error, softmax_cross_entropy
from funcnet.metrics import accuracy
from funcnet.normalization import (
    BatchNorm,
    BatchNormParams,
    BatchNormStats,
    LayerNorm,
    LayerNormParams,
    batch_norm,
    layer_norm,
)
from funcnet.ops import bias_add, dropout, gelu, linear, relu, sigmoid, tanh, weight_multiply
from funcnet.optimizers import (
    Optimizer,
    accumulate,
    adagrad,
    adam,
    adamw,
    constant,
    cosine_decay,
    exponential_decay,
    linear_decay,
    momentum,
    multi_optimizer,
    sgd,
    warmup_cosine_decay,
)
from funcnet.precision import DynamicLossScale, LossScaleState, mixed_precision
from funcnet.recurrent import GRU, LSTM, RNN, GRUParams, LSTMParams, RNNParams, TimeDistributed, gru, lstm, rnn
from funcnet.state import merge_state, split_state
from funcnet.train import FitCheckpoint, FitResult, History, fit, read_checkpoint, train_step

__version__ = "0.1.0"

__all__ = [
    "GRU",
    "LSTM",
    "RNN",
    "AttentionParams",
    "AvgPool2D",
    "BatchNorm",
    "BatchNormParams",
    "BatchNormStats",
    "Conv2D",
    "Conv2DParams",
    "Dense",
    "DenseParams",
    "Dropout",
    "DynamicLossScale",
    "Embedding",
    "EmbeddingParams",
    "FanInConcat",
    "FanInSum",
    "FanOut",
    "FitCheckpoint",
    "FitResult",
    "Flatten",
    "GRUParams",
    "History",
    "LSTMParams",
    "Layer",
    "LayerNorm",
    "LayerNormParams",
    "LayerSpec",
    "LossScaleState",
    "MaxPool2D",
    "MultiHeadAttention",
    "Optimizer",
    "PositionalEmbedding",
    "PositionalEmbeddingParams",
    "RNNParams",
    "TimeDistributed",
    "accumulate",
    "accuracy",
    "adagrad",
    "adam",
    "adamw",
    "avg_pool2d",
    "batch_norm",
    "bias_add",
    "check_vjp",
    "constant",
    "conv2d",
    "cosine_decay",
    "dot_product_attention",
    "dropout",
    "embedding",
    "exponential_decay",
    "fit",
    "gelu",
    "glorot_normal",
    "gru",
    "layer_norm",
    "layer_inputs",
    "layer_spec",
    "linear",
    "linear_decay",
    "load",
    "lstm",
    "max_pool2d",
    "mean_squared_error",
    "merge_state",
    "mixed_precision",
    "momentum",
    "multi_optimizer",
    "named",
    "normal",
    "parallel",
    "param_count",
    "read_checkpoint",
    "relu",
    "residual",
    "rnn",
    "save",
    "serial",
    "sgd",
    "sigmoid",
    "softmax_cross_entropy",
    "split_state",
    "standard_normal",
    "summary",
    "tanh",
    "train_apply",
    "train_step",
    "warmup_cosine_decay",
    "weight_multiply",
    "zeros",
]
