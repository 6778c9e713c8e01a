"""funcnet: the book *Deep Learning from Scratch* as pure JAX functions over pytrees.

Public API (re-exports only; each module states its own contract).
"""

from funcnet.checkpoint import load, save
from funcnet.combinators import FanInConcat, FanInSum, FanOut, parallel, residual
from funcnet.conv import AvgPool2D, Conv2D, Conv2DParams, Flatten, MaxPool2D, avg_pool2d, conv2d, max_pool2d
from funcnet.embeddings import Embedding, EmbeddingParams, embedding
from funcnet.gradcheck import check_vjp
from funcnet.initializers import glorot_normal, normal, standard_normal, zeros
from funcnet.layers import Dense, DenseParams, Dropout, Layer, param_count, serial, summary
from funcnet.losses import mean_squared_error, softmax_cross_entropy
from funcnet.metrics import accuracy
from funcnet.normalization import LayerNorm, LayerNormParams, layer_norm
from funcnet.recurrent import (GRU, LSTM, RNN, GRUParams, LSTMParams, RNNParams, TimeDistributed, gru, lstm,
                               rnn)
from funcnet.optimizers import (Optimizer, adagrad, adam, constant, exponential_decay, linear_decay,
                                 momentum, sgd)
from funcnet.train import FitResult, History, fit, train_step
from funcnet.ops import bias_add, dropout, linear, relu, sigmoid, tanh, weight_multiply

__version__ = "0.1.0"

__all__ = [
    "accuracy", "load", "save", "Conv2D", "Conv2DParams", "Flatten", "MaxPool2D", "conv2d", "max_pool2d",
    "AvgPool2D", "avg_pool2d", "FanInConcat", "FanInSum", "FanOut", "parallel", "residual",
    "Embedding", "EmbeddingParams", "embedding", "LayerNorm", "LayerNormParams", "layer_norm",
    "FitResult", "History", "Optimizer", "adagrad", "adam", "constant", "exponential_decay",
    "fit", "linear_decay", "momentum", "sgd", "train_step",
    "Dense", "DenseParams", "Dropout", "Layer", "glorot_normal", "param_count", "serial",
    "standard_normal", "normal", "summary", "zeros",
    "RNN", "LSTM", "GRU", "RNNParams", "LSTMParams", "GRUParams", "TimeDistributed", "rnn", "lstm", "gru",
    "bias_add", "check_vjp", "dropout", "linear", "mean_squared_error", "relu", "sigmoid",
    "softmax_cross_entropy", "tanh", "weight_multiply",
]
