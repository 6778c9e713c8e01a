"""Every public function, driven with malformed arguments: it either works or says why.

For each (function, argument, bad value) drawn by hypothesis, the call must either succeed
or raise ValueError/TypeError whose message names the argument. Anything else (an XLA
error, an IndexError or AttributeError from deep inside, a bare assert) fails. The inputs
the user gave must come back unmodified. CI runs the short hypothesis profile; run
``HYPOTHESIS_PROFILE=long pytest tests/test_bad_input.py`` to explore more.
"""

from __future__ import annotations

import os
import tempfile

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import funcnet as fn

KEY = jax.random.PRNGKey(0)
F = np.float64
rng = np.random.default_rng(0)
X = rng.standard_normal((12, 3))
Y = rng.standard_normal((12, 2))
LABELS = rng.integers(0, 2, 12).astype(np.int32)
NET = fn.serial(fn.Dense(4, fn.tanh), fn.Dense(2, fn.linear))
PARAMS = NET.init(KEY, (-1, 3))[1]
SCRATCH = tempfile.mkdtemp(prefix="funcnet-bad-input-")  # one per process: test workers never share it
NAN = X.copy()
NAN[3, 1] = np.nan

# Malformed values, by kind. Each is tried in every argument slot it could be confused with.
BAD_ARRAYS = {
    "list": X.tolist(),
    "int array": np.arange(36, dtype=np.int32).reshape(12, 3),
    "bool array": np.ones((12, 3), bool),
    "1-D": np.ones(3),
    "3-D": np.ones((2, 12, 3)),
    "scalar": np.float64(1.0),
    "zero rows": np.ones((0, 3)),
    "empty": np.ones((0, 0)),
    "NaN": NAN,
    "Inf": np.full((12, 3), np.inf),
    "wrong width": np.ones((12, 5)),
    "wrong rows": np.ones((7, 3)),
    "float32": X.astype(np.float32),
    "None": None,
    "string": "x",
}
BAD_NUMBERS = {
    "zero": 0,
    "negative": -3,
    "negative float": -0.5,
    "nan": float("nan"),
    "inf": float("inf"),
    "huge": 10**4,
    "float for int": 2.5,
    "bool": True,
    "string": "3",
    "None": None,
    "array": np.ones(2),
}
BAD_TREES = {
    "tuple": (1, 2),
    "short": PARAMS[:1],
    "mixed dtypes": (fn.DenseParams(PARAMS[0].W.astype(np.float32), PARAMS[0].B), PARAMS[1]),
    "list of arrays": [np.ones((3, 4))],
    "None": None,
    "dict": {"W": np.ones((3, 4))},
}


SEQUENCES = rng.standard_normal((12, 4, 3))
RECURRENT = {cell: getattr(fn, cell)(2).init(KEY, (-1, 4, 3))[1] for cell in ("RNN", "LSTM", "GRU")}
BRANCHES = fn.serial(fn.FanOut(2), fn.parallel(fn.Dense(2), fn.Dense(3)), fn.FanInConcat())
BRANCH_PARAMS = BRANCHES.init(KEY, (-1, 3))[1]
HEADS = rng.standard_normal((2, 4, 2, 3))  # (batch, length, heads, head_dim)
ATTENTION = fn.MultiHeadAttention(2)
ATTENTION_PARAMS = ATTENTION.init(KEY, (-1, 4, 6))[1]
BN_NET = fn.serial(fn.BatchNorm(), fn.Dense(2, fn.linear))
BN_PARAMS = BN_NET.init(KEY, (-1, 3))[1]
ROPE_HEADS = rng.standard_normal((2, 4, 2, 6))  # (batch, T, heads, head_dim), head_dim even
PROBABILITIES = rng.uniform(size=(12, 2))
GQA = fn.MultiHeadAttention(4, num_kv_heads=2, is_causal=True, rope=10000.0)
GQA_PARAMS = GQA.init(KEY, (-1, 4, 8))[1]
CROSS = fn.CrossAttention(2)
CROSS_PARAMS = CROSS.init(KEY, ((-1, 4, 6), (-1, 5, 3)))[1]
CHAIN = fn.chain(fn.clip_by_global_norm(1.0), fn.sgd(0.1))


def _streamed_fit_call(train_x=X, train_y=Y, eval_x=X, eval_y=Y, stream_threshold=None):
    """fit streaming host data (stream=True), or with stream=None and a threshold."""
    return fn.fit(
        NET,
        fn.mean_squared_error,
        fn.sgd(0.1),
        PARAMS,
        (train_x, train_y),
        (eval_x, eval_y),
        epochs=2,
        batch_size=4,
        eval_every=1,
        eval_batch_size=5,
        key=KEY,
        stream=True if stream_threshold is None else None,
        stream_threshold=stream_threshold,
    )


def _fit_call(
    train_x=X,
    train_y=Y,
    eval_x=X,
    eval_y=Y,
    params=PARAMS,
    epochs=2,
    batch_size=4,
    eval_every=1,
    patience=0,
    min_delta=0.0,
    eval_batch_size=5,
    checkpoint_every=1,
    shards=None,
    ema_decay=None,
):
    return fn.fit(
        NET,
        fn.mean_squared_error,
        fn.sgd(0.1),
        params,
        (train_x, train_y),
        (eval_x, eval_y),
        epochs=epochs,
        batch_size=batch_size,
        eval_every=eval_every,
        patience=patience,
        min_delta=min_delta,
        eval_batch_size=eval_batch_size,
        checkpoint_every=checkpoint_every,
        shards=shards,
        ema_decay=ema_decay,
        key=KEY,
    )


# function name -> (call with keyword overrides, {argument: name of the bad-value pool})
CALLS = {
    "weight_multiply": (lambda x=X, W=np.ones((3, 2)): fn.weight_multiply(x, W), {"x": "arrays", "W": "arrays"}),
    "bias_add": (lambda x=X, B=np.ones((1, 3)): fn.bias_add(x, B), {"x": "arrays", "B": "arrays"}),
    "sigmoid": (lambda x=X: fn.sigmoid(x), {"x": "arrays"}),
    "tanh": (lambda x=X: fn.tanh(x), {"x": "arrays"}),
    "relu": (lambda x=X: fn.relu(x), {"x": "arrays"}),
    "linear": (lambda x=X: fn.linear(x), {"x": "arrays"}),
    "dropout": (lambda x=X, mask=np.ones((12, 3)): fn.dropout(x, mask), {"x": "arrays", "mask": "arrays"}),
    "mean_squared_error": (
        lambda prediction=Y, target=Y: fn.mean_squared_error(prediction, target),
        {"prediction": "arrays", "target": "arrays"},
    ),
    "softmax_cross_entropy": (
        lambda logits=Y, target=LABELS, ignore_index=None: fn.softmax_cross_entropy(
            logits, target, ignore_index=ignore_index
        ),
        {"logits": "arrays", "target": "arrays", "ignore_index": "numbers"},
    ),
    "conv2d": (
        lambda x=np.ones((2, 5, 5, 3)), W=np.ones((3, 3, 3, 2)), stride=1, padding="SAME": fn.conv2d(
            x, W, stride=stride, padding=padding
        ),
        {"x": "arrays", "W": "arrays", "stride": "numbers", "padding": "numbers"},
    ),
    "max_pool2d": (
        lambda x=np.ones((2, 4, 4, 3)), window=2, stride=None: fn.max_pool2d(x, window, stride),
        {"x": "arrays", "window": "numbers", "stride": "numbers"},
    ),
    "Dense": (
        lambda neurons=4, input_shape=(-1, 3): fn.Dense(neurons).init(KEY, input_shape),
        {"neurons": "numbers", "input_shape": "trees"},
    ),
    "Dense.apply": (lambda params=PARAMS[0], x=X: fn.Dense(4).apply(params, x), {"params": "trees", "x": "arrays"}),
    "Dropout": (
        lambda rate=0.5, x=X: fn.train_apply(fn.Dropout(rate))((), x, key=KEY),
        {"rate": "numbers", "x": "arrays"},
    ),
    "Conv2D": (
        lambda out_channels=2, kernel_size=3, input_shape=(-1, 5, 5, 1): fn.Conv2D(out_channels, kernel_size).init(
            KEY, input_shape
        ),
        {"out_channels": "numbers", "kernel_size": "numbers", "input_shape": "trees"},
    ),
    "serial.apply": (lambda params=PARAMS, x=X: NET.apply(params, x), {"params": "trees", "x": "arrays"}),
    "summary": (lambda input_shape=(-1, 3): fn.summary(NET, input_shape), {"input_shape": "trees"}),
    "param_count": (lambda params=PARAMS: fn.param_count(params), {"params": "trees"}),
    "sgd": (
        lambda learning_rate=0.1, weight_decay=0.0, clip_norm=None: fn.sgd(
            learning_rate, weight_decay=weight_decay, clip_norm=clip_norm
        ),
        {"learning_rate": "numbers", "weight_decay": "numbers", "clip_norm": "numbers"},
    ),
    "momentum": (
        lambda learning_rate=0.1, momentum=0.9: fn.momentum(learning_rate, momentum),
        {"learning_rate": "numbers", "momentum": "numbers"},
    ),
    "adagrad": (
        lambda learning_rate=0.1, eps=1e-7: fn.adagrad(learning_rate, eps),
        {"learning_rate": "numbers", "eps": "numbers"},
    ),
    "adam": (
        lambda learning_rate=0.1, b1=0.9, b2=0.999, eps=1e-8: fn.adam(learning_rate, b1, b2, eps),
        {"learning_rate": "numbers", "b1": "numbers", "b2": "numbers", "eps": "numbers"},
    ),
    "adamw": (
        lambda learning_rate=0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4: fn.adamw(
            learning_rate, b1, b2, eps, weight_decay
        ),
        {"learning_rate": "numbers", "b1": "numbers", "b2": "numbers", "eps": "numbers", "weight_decay": "numbers"},
    ),
    "cosine_decay": (
        lambda initial=0.1, steps=10, final=0.0: fn.cosine_decay(initial, steps, final),
        {"initial": "numbers", "steps": "numbers", "final": "numbers"},
    ),
    "warmup_cosine_decay": (
        lambda initial=0.0, peak=0.1, warmup_steps=2, decay_steps=10, final=0.0: fn.warmup_cosine_decay(
            initial, peak, warmup_steps, decay_steps, final
        ),
        {
            "initial": "numbers",
            "peak": "numbers",
            "warmup_steps": "numbers",
            "decay_steps": "numbers",
            "final": "numbers",
        },
    ),
    "accumulate": (
        lambda optimizer=fn.sgd(0.1), steps=2: fn.accumulate(optimizer, steps).init(PARAMS),
        {"optimizer": "trees", "steps": "numbers"},
    ),
    "multi_optimizer": (
        lambda labels=jax.tree_util.tree_map(lambda _: "a", PARAMS): fn.multi_optimizer(
            {"a": fn.sgd(0.1), "b": None}, labels
        ).init(PARAMS),
        {"labels": "trees"},
    ),
    "linear_decay": (
        lambda initial=0.1, final=0.01, steps=10: fn.linear_decay(initial, final, steps),
        {"initial": "numbers", "final": "numbers", "steps": "numbers"},
    ),
    "exponential_decay": (
        lambda initial=0.1, final=0.01, steps=10: fn.exponential_decay(initial, final, steps),
        {"initial": "numbers", "final": "numbers", "steps": "numbers"},
    ),
    "optimizer.update": (
        lambda grads=PARAMS: fn.sgd(0.1).update(grads, fn.sgd(0.1).init(PARAMS), PARAMS),
        {"grads": "trees"},
    ),
    "train_step": (
        lambda x=X, y=Y: fn.train_step(NET, fn.mean_squared_error, fn.sgd(0.1))(
            PARAMS, fn.sgd(0.1).init(PARAMS), x, y, None
        ),
        {"x": "arrays", "y": "arrays"},
    ),
    "fit": (
        _fit_call,
        {
            "train_x": "arrays",
            "train_y": "arrays",
            "eval_x": "arrays",
            "eval_y": "arrays",
            "params": "trees",
            "epochs": "numbers",
            "batch_size": "numbers",
            "eval_every": "numbers",
            "patience": "numbers",
            "min_delta": "numbers",
            "eval_batch_size": "numbers",
            "checkpoint_every": "numbers",
            "shards": "numbers",
            "ema_decay": "numbers",
        },
    ),
    "fit(stream=True)": (
        _streamed_fit_call,
        {
            "train_x": "arrays",
            "train_y": "arrays",
            "eval_x": "arrays",
            "eval_y": "arrays",
            "stream_threshold": "numbers",
        },
    ),
    "save": (lambda tree=PARAMS: fn.save(os.path.join(SCRATCH, "tree.safetensors"), tree), {"tree": "trees"}),
    "load": (lambda like=PARAMS: fn.load(_saved(), like), {"like": "trees"}),
    "check_vjp": (lambda x=X: fn.check_vjp(fn.sigmoid, jax.nn.sigmoid, x), {"x": "arrays"}),
    "rnn": (lambda x=SEQUENCES, h0=None: fn.rnn(x, RECURRENT["RNN"], h0), {"x": "arrays", "h0": "arrays"}),
    "lstm": (lambda x=SEQUENCES, c0=None: fn.lstm(x, RECURRENT["LSTM"], None, c0), {"x": "arrays", "c0": "arrays"}),
    "gru": (lambda x=SEQUENCES, params=RECURRENT["GRU"]: fn.gru(x, params), {"x": "arrays", "params": "trees"}),
    "LSTM": (
        lambda hidden=3, input_shape=(-1, 4, 3): fn.LSTM(hidden).init(KEY, input_shape),
        {"hidden": "numbers", "input_shape": "trees"},
    ),
    "layer_norm": (
        lambda x=X, gamma=np.ones(3), beta=np.zeros(3): fn.layer_norm(x, gamma, beta),
        {"x": "arrays", "gamma": "arrays", "beta": "arrays"},
    ),
    "LayerNorm": (
        lambda eps=1e-5, input_shape=(-1, 3): fn.LayerNorm(eps).init(KEY, input_shape),
        {"eps": "numbers", "input_shape": "trees"},
    ),
    "embedding": (lambda ids=LABELS, W=np.ones((2, 3)): fn.embedding(ids, W), {"ids": "arrays", "W": "arrays"}),
    "Embedding": (
        lambda vocab_size=4, features=2: fn.Embedding(vocab_size, features),
        {"vocab_size": "numbers", "features": "numbers"},
    ),
    "avg_pool2d": (
        lambda x=np.ones((2, 4, 4, 3)), window=2, stride=None: fn.avg_pool2d(x, window, stride),
        {"x": "arrays", "window": "numbers", "stride": "numbers"},
    ),
    "accuracy": (
        lambda prediction=Y, target=LABELS, ignore_index=None: fn.accuracy(
            prediction, target, ignore_index=ignore_index
        ),
        {"prediction": "arrays", "target": "arrays", "ignore_index": "numbers"},
    ),
    "combinators.apply": (lambda x=X: BRANCHES.apply(BRANCH_PARAMS, x), {"x": "trees"}),
    "FanInConcat": (lambda axis=-1: fn.FanInConcat(axis).init(KEY, ((-1, 3), (-1, 2))), {"axis": "numbers"}),
    "dot_product_attention": (
        lambda q=HEADS, k=HEADS, v=HEADS, kv_lengths=None, mask=None, scale=None, block_size=2: (
            fn.dot_product_attention(q, k, v, kv_lengths=kv_lengths, mask=mask, scale=scale, block_size=block_size)
        ),
        {
            "q": "arrays",
            "k": "arrays",
            "v": "arrays",
            "kv_lengths": "arrays",
            "mask": "arrays",
            "scale": "numbers",
            "block_size": "numbers",
        },
    ),
    "MultiHeadAttention": (
        lambda num_heads=2, input_shape=(-1, 4, 6): fn.MultiHeadAttention(num_heads).init(KEY, input_shape),
        {"num_heads": "numbers", "input_shape": "trees"},
    ),
    "MultiHeadAttention.apply": (
        lambda params=ATTENTION_PARAMS, x=np.ones((12, 4, 6)): ATTENTION.apply(params, x),
        {"params": "trees", "x": "arrays"},
    ),
    "PositionalEmbedding": (
        lambda max_length=4, input_shape=(-1, 4, 6): fn.PositionalEmbedding(max_length).init(KEY, input_shape),
        {"max_length": "numbers", "input_shape": "trees"},
    ),
    "gelu": (
        lambda x=X, approximate=False: fn.gelu(x, approximate=approximate),
        {"x": "arrays", "approximate": "numbers"},
    ),
    "mixed_precision": (
        lambda layer=NET, compute_dtype=np.dtype("float16"): fn.mixed_precision(layer, compute_dtype).init(
            KEY, (-1, 3)
        ),
        {"layer": "numbers", "compute_dtype": "numbers"},
    ),
    "DynamicLossScale": (
        lambda initial=2.0**15, period=2000, factor=2.0, min_scale=1.0: fn.DynamicLossScale(
            initial, period, factor, min_scale
        ),
        {"initial": "numbers", "period": "numbers", "factor": "numbers", "min_scale": "numbers"},
    ),
    "batch_norm": (
        lambda x=X, gamma=np.ones(3), beta=np.zeros(3), eps=1e-5: fn.batch_norm(x, gamma, beta, eps=eps),
        {"x": "arrays", "gamma": "arrays", "beta": "arrays", "eps": "numbers"},
    ),
    "BatchNorm": (
        lambda momentum=0.9, eps=1e-5, input_shape=(-1, 3): fn.BatchNorm(momentum, eps).init(KEY, input_shape),
        {"momentum": "numbers", "eps": "numbers", "input_shape": "trees"},
    ),
    "train_apply": (
        lambda params=BN_PARAMS, x=X: fn.train_apply(BN_NET)(params, x),
        {"params": "trees", "x": "arrays"},
    ),
    "merge_state": (
        lambda trainable=fn.split_state(BN_PARAMS)[0]: fn.merge_state(trainable, fn.split_state(BN_PARAMS)[1]),
        {"trainable": "trees"},
    ),
    "rotary_embedding": (
        lambda x=ROPE_HEADS, positions=np.arange(4), base=10000.0: fn.rotary_embedding(x, positions, base=base),
        {"x": "arrays", "positions": "trees", "base": "numbers"},
    ),
    "gelu_tanh": (lambda x=X: fn.gelu_tanh(x), {"x": "arrays"}),
    "rms_norm": (
        lambda x=X, gamma=np.ones(3), eps=1e-6: fn.rms_norm(x, gamma, eps=eps),
        {"x": "arrays", "gamma": "arrays", "eps": "numbers"},
    ),
    "RMSNorm": (
        lambda eps=1e-6, input_shape=(-1, 3): fn.RMSNorm(eps).init(KEY, input_shape),
        {"eps": "numbers", "input_shape": "trees"},
    ),
    "sigmoid_binary_cross_entropy": (
        lambda logits=Y, target=PROBABILITIES: fn.sigmoid_binary_cross_entropy(logits, target),
        {"logits": "arrays", "target": "arrays"},
    ),
    "dot_product_attention(causal, dropout)": (
        lambda is_causal=True, q_offset=1, dropout_rate=0.1, dropout_key=KEY: fn.dot_product_attention(
            HEADS,
            HEADS[:, :, :1],  # one kv head for two query heads: grouped-query
            HEADS[:, :, :1],
            is_causal=is_causal,
            q_offset=q_offset,
            dropout_rate=dropout_rate,
            dropout_key=dropout_key,
            block_size=2,
        ),
        {"is_causal": "numbers", "q_offset": "trees", "dropout_rate": "numbers", "dropout_key": "trees"},
    ),
    "MultiHeadAttention(num_kv_heads, rope)": (
        lambda num_kv_heads=2, rope=10000.0, dropout=0.1, is_causal=True, input_shape=(-1, 4, 8): fn.MultiHeadAttention(
            4, num_kv_heads=num_kv_heads, rope=rope, dropout=dropout, is_causal=is_causal
        ).init(KEY, input_shape),
        {
            "num_kv_heads": "numbers",
            "rope": "numbers",
            "dropout": "numbers",
            "is_causal": "numbers",
            "input_shape": "trees",
        },
    ),
    "MultiHeadAttention(num_kv_heads, rope).apply": (
        lambda params=GQA_PARAMS, x=np.ones((2, 4, 8)), kv_lengths=None, mask=None: GQA.apply(
            params, x, kv_lengths=kv_lengths, mask=mask
        ),
        {"params": "trees", "x": "arrays", "kv_lengths": "arrays", "mask": "arrays"},
    ),
    "CrossAttention": (
        lambda num_heads=2, input_shape=((-1, 4, 6), (-1, 5, 3)): fn.CrossAttention(num_heads).init(KEY, input_shape),
        {"num_heads": "numbers", "input_shape": "trees"},
    ),
    "CrossAttention.apply": (
        lambda params=CROSS_PARAMS, x=np.ones((2, 4, 6)), context=np.ones((2, 5, 3)): CROSS.apply(params, (x, context)),
        {"params": "trees", "x": "arrays", "context": "arrays"},
    ),
    "clip_by_global_norm": (lambda max_norm=1.0: fn.clip_by_global_norm(max_norm), {"max_norm": "numbers"}),
    "chain": (
        lambda transform=fn.clip_by_global_norm(1.0), last=fn.sgd(0.1): fn.chain(transform, last).init(PARAMS),
        {"transform": "trees", "last": "trees"},
    ),
    "chain.update": (lambda grads=PARAMS: CHAIN.update(grads, CHAIN.init(PARAMS), PARAMS), {"grads": "trees"}),
}
POOLS = {
    "arrays": BAD_ARRAYS,
    "numbers": BAD_NUMBERS,
    "trees": {**BAD_TREES, **{f"array {k}": v for k, v in BAD_ARRAYS.items()}},
}
# The words a message may use for each argument: its name or its role where the error is
# found (train_step's y is the loss's target; a params tree's bad leaf is its W or B).
NAMES = {
    "train_x": ("train_data",),
    "train_y": ("train_data",),
    "eval_x": ("eval_data",),
    "eval_y": ("eval_data",),
    "tree": ("leaf",),
    "like": ("like", "leaf"),
    "y": ("y", "target"),
    "params": ("params", "W", "B"),
    "x": ("x", "argument 0", "no floating argument"),
    "transform": ("GradientTransform",),  # chain's arguments are positional: named by their role
    "last": ("the last argument",),
}
CASES = [
    (function, argument, kind)
    for function, (_, arguments) in CALLS.items()
    for argument, pool in arguments.items()
    for kind in POOLS[pool]
]


def _saved():
    path = os.path.join(SCRATCH, "like.safetensors")
    fn.save(path, PARAMS)
    return path


def _snapshot(value):
    return jax.tree_util.tree_map(lambda a: np.array(a, copy=True) if isinstance(a, np.ndarray) else a, value)


def test_the_suite_covers_many_distinct_cases():
    assert len(CASES) > 400


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.sampled_from(CASES), jit=st.booleans())
def test_malformed_argument_works_or_is_named(case, jit):
    function, argument, kind = case
    call, arguments = CALLS[function]
    value = POOLS[arguments[argument]][kind]
    before = _snapshot(value)
    names = NAMES.get(argument, (argument,))
    run = (
        (lambda: jax.jit(lambda: call(**{argument: value}))())
        if jit and function in JITTABLE
        else (lambda: call(**{argument: value}))
    )
    try:
        run()
    except (ValueError, TypeError) as error:
        message = str(error)
        assert any(n in message for n in names), (
            f"{function}({argument}={kind}): message names none of {names}: {message}"
        )
        assert type(error).__module__ == "builtins"
    # the user's value is untouched
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_array_equal(a, b) if isinstance(a, np.ndarray) else None, value, before
    )


# The newer arguments, each with the message it must raise, whole (or its fragments, in order,
# where a part depends on how the call was traced). The arrays are the outer jit's arguments, so
# there they arrive traced: a check that needs their values cannot fire, and the message must
# still be the same. (name, call, arrays, error, message or tuple of fragments)
_Q, _KV, _GQA = np.ones((2, 3, 4, 8)), np.ones((2, 5, 2, 8)), np.ones((2, 5, 3, 8))
_TORCH_QKV = (np.ones((2, 4, 3, 8)), np.ones((2, 4, 5, 8)), np.ones((2, 4, 5, 8)))  # (batch, heads, T, head_dim)
_NO_KEY = "needs a dropout_key (e.g. jax.random.key(0)); pass dropout_rate=0.0 for no dropout."
MESSAGES = [
    (
        "rotary_embedding odd head_dim",
        lambda x, p: fn.rotary_embedding(x, p),
        (np.ones((2, 3, 1, 5)), np.arange(3)),
        ValueError,
        "rotary_embedding: x's head_dim (its last axis) must be even, since rope rotates pairs of features, "
        "got head_dim 5 (x.shape=(2, 3, 1, 5)).",
    ),
    (
        "rotary_embedding positions shape",
        lambda x, p: fn.rotary_embedding(x, p),
        (np.ones((2, 3, 1, 4)), np.arange(4)),
        ValueError,
        "rotary_embedding: positions must have shape (T,) = (3,) or (batch, T) = (2, 3) for x.shape=(2, 3, 1, 4), "
        "got (4,).",
    ),
    (
        "rotary_embedding positions (T, batch)",
        lambda x, p: fn.rotary_embedding(x, p),
        (np.ones((2, 3, 1, 4)), np.zeros((3, 2), np.int32)),
        ValueError,
        "rotary_embedding: positions must have shape (T,) = (3,) or (batch, T) = (2, 3) for x.shape=(2, 3, 1, 4), "
        "got (3, 2).",
    ),
    (
        "rotary_embedding integer x",
        lambda x, p: fn.rotary_embedding(x, p),
        (np.ones((2, 3, 1, 4), np.int32), np.arange(3)),
        TypeError,
        "rotary_embedding: x must have a floating dtype, got int32. Cast it first, e.g. x.astype(jnp.float32).",
    ),
    (
        "gelu approximate=1",
        lambda x: fn.gelu(x, approximate=1),
        (X,),
        TypeError,
        "gelu: approximate must be a Python bool (fixed when traced: False for the exact erf form, True for the "
        "tanh form), got int 1.",
    ),
    (
        "gelu_tanh integer x",
        fn.gelu_tanh,
        (LABELS,),
        TypeError,
        "gelu_tanh: x must have a floating dtype, got int32. Cast it first, e.g. x.astype(jnp.float32).",
    ),
    (
        "rms_norm gamma shape",
        fn.rms_norm,
        (X, np.ones(4)),
        ValueError,
        "rms_norm: gamma must have shape (features,) = (3,) for x.shape=(12, 3), got (4,).",
    ),
    (
        "rms_norm gamma dtype",
        fn.rms_norm,
        (X, np.ones(3, np.float32)),
        TypeError,
        "rms_norm: x and gamma must share a dtype, got float64 and float32. Cast one of them, e.g. "
        "x.astype(gamma.dtype).",
    ),
    (
        "rms_norm eps=0",
        lambda x, g: fn.rms_norm(x, g, eps=0.0),
        (X, np.ones(3)),
        ValueError,
        "rms_norm: eps must be > 0.0, got 0.0.",
    ),
    (
        "rms_norm eps<0",
        lambda x, g: fn.rms_norm(x, g, eps=-1e-6),
        (X, np.ones(3)),
        ValueError,
        "rms_norm: eps must be > 0.0, got -1e-06.",
    ),
    (
        "sigmoid_binary_cross_entropy shapes",
        fn.sigmoid_binary_cross_entropy,
        (Y, np.ones((12, 3))),
        ValueError,
        "sigmoid_binary_cross_entropy: logits and target must have the same shape with a row axis first, got "
        "logits.shape=(12, 2), target.shape=(12, 3).",
    ),
    (
        "sigmoid_binary_cross_entropy integer target",
        fn.sigmoid_binary_cross_entropy,
        (Y, np.ones((12, 2), np.int32)),
        TypeError,
        "sigmoid_binary_cross_entropy: target must have a floating dtype (probabilities in [0, 1]), got int32. "
        "Cast the labels first, e.g. target.astype(logits.dtype).",
    ),
    (
        "softmax_cross_entropy ignore_index=1.5",
        lambda z, t: fn.softmax_cross_entropy(z, t, ignore_index=1.5),
        (Y, LABELS),
        TypeError,
        "softmax_cross_entropy: ignore_index must be an int or None, got float.",
    ),
    (
        "softmax_cross_entropy ignore_index with one-hot rows",
        lambda z, t: fn.softmax_cross_entropy(z, t, ignore_index=-1),
        (Y, np.eye(2)[LABELS]),
        TypeError,
        "softmax_cross_entropy: ignore_index applies to integer class labels only, got a float64 target "
        "(one-hot rows). Pass integer labels, or drop ignore_index.",
    ),
    (
        "accuracy ignore_index=1.5",
        lambda z, t: fn.accuracy(z, t, ignore_index=1.5),
        (Y, LABELS),
        TypeError,
        "accuracy: ignore_index must be an int or None, got float.",
    ),
    (
        "accuracy ignore_index with one-hot rows",
        lambda z, t: fn.accuracy(z, t, ignore_index=0),
        (Y, np.eye(2)[LABELS]),
        TypeError,
        "accuracy: ignore_index applies to integer class labels only, got a float64 target (one-hot rows). "
        "Pass integer labels, or drop ignore_index.",
    ),
    (
        "attention kv heads not dividing",
        fn.dot_product_attention,
        (_Q, _GQA, _GQA),
        ValueError,
        "dot_product_attention: k and v's kv_heads = 3 (axis 2) must divide q's heads = 4 (grouped-query "
        "attention: query head n uses kv head n // (heads // kv_heads)), got q.shape=(2, 3, 4, 8), "
        "k.shape=(2, 5, 3, 8), v.shape=(2, 5, 3, 8).",
    ),
    (
        "attention torch layout",
        fn.dot_product_attention,
        _TORCH_QKV,
        ValueError,
        "dot_product_attention: k and v's kv_heads = 5 (axis 2) must divide q's heads = 3 (grouped-query "
        "attention: query head n uses kv head n // (heads // kv_heads)), got q.shape=(2, 4, 3, 8), "
        "k.shape=(2, 4, 5, 8), v.shape=(2, 4, 5, 8). q/k/v look like (batch, heads, T, head_dim), torch's "
        "layout; funcnet takes jax.nn's (batch, T, heads, head_dim): transpose with x.transpose(0, 2, 1, 3).",
    ),
    (
        "attention dropout_rate 1.0",
        lambda q, k, v: fn.dot_product_attention(q, k, v, dropout_rate=1.0, dropout_key=KEY),
        (_Q, _KV, _KV),
        ValueError,
        "dot_product_attention: dropout_rate must be >= 0.0 and < 1.0, got 1.0.",
    ),
    (
        "attention dropout without a key",
        lambda q, k, v: fn.dot_product_attention(q, k, v, dropout_rate=0.1),
        (_Q, _KV, _KV),
        ValueError,
        f"dot_product_attention: dropout_rate 0.1 {_NO_KEY}",
    ),
    (
        "attention array dropout_rate without a key",  # traced: its value is unknown, so it needs a key
        lambda q, k, v, r: fn.dot_product_attention(q, k, v, dropout_rate=r),
        (_Q, _KV, _KV, np.float64(0.1)),
        ValueError,
        ("dot_product_attention: dropout_rate ", _NO_KEY),
    ),
    (
        "attention q_offset shape",
        lambda q, k, v, o: fn.dot_product_attention(q, k, v, is_causal=True, q_offset=o),
        (_Q, _KV, _KV, np.zeros(3, np.int32)),
        ValueError,
        "dot_product_attention: q_offset must be an int or have shape () or (batch,) = (2,), got shape (3,).",
    ),
    (
        "attention float mask",
        lambda q, k, v, m: fn.dot_product_attention(q, k, v, mask=m),
        (_Q, _KV, _KV, np.eye(3, 5)),
        TypeError,
        (  # eager, a hint follows: which of the two this mask looks like
            "dot_product_attention: mask must be boolean (True = attend), got float64. An additive float mask "
            "(0 = attend, -inf = blocked, as torch's float attn_mask) converts with mask == 0; a multiplicative one "
            "(1 = attend, 0 = blocked) with mask != 0.",
        ),
    ),
    (
        "clip_by_global_norm(0.0)",
        lambda: fn.clip_by_global_norm(0.0),
        (),
        ValueError,
        "clip_by_global_norm: max_norm must be > 0.0, got 0.0.",
    ),
    (
        "chain()",
        lambda: fn.chain(),
        (),
        TypeError,
        "chain: give the gradient transforms and then an Optimizer, got nothing.",
    ),
    (
        "chain(optimizer, optimizer)",
        lambda: fn.chain(fn.sgd(0.1), fn.sgd(0.1)),
        (),
        TypeError,
        "chain: every argument before the last must be a GradientTransform, e.g. clip_by_global_norm(1.0), got "
        "Optimizer at position 0.",
    ),
    (
        "chain(transform)",
        lambda: fn.chain(fn.clip_by_global_norm(1.0)),
        (),
        TypeError,
        "chain: the last argument must be an Optimizer(init, update), e.g. funcnet.adam(1e-3), got GradientTransform.",
    ),
    (
        "chain's update, grads of another structure",
        lambda *grads: CHAIN.update(grads, CHAIN.init(PARAMS), PARAMS),
        PARAMS[:1],
        TypeError,
        ("chain: grads must have the structure of params, got PyTreeDef(",),
    ),
    (
        "MultiHeadAttention(4, num_kv_heads=3)",
        lambda: fn.MultiHeadAttention(4, num_kv_heads=3),
        (),
        ValueError,
        "MultiHeadAttention(4): num_kv_heads must divide num_heads (4) so that each key/value head serves a whole "
        "group of query heads, got 3.",
    ),
    (
        "MultiHeadAttention rope with an odd head_dim",
        lambda: fn.MultiHeadAttention(2, rope=10000.0).init(KEY, (-1, 4, 6)),
        (),
        ValueError,
        "MultiHeadAttention(2, rope=10000.0): rope rotates pairs of features, so head_dim must be even, got 3 "
        "(6 features / 2 heads); give an even head_dim.",
    ),
    (
        "CrossAttention input_shape not a pair",
        lambda: fn.CrossAttention(2).init(KEY, (-1, 4, 6)),
        (),
        TypeError,
        "CrossAttention(2): input_shape must be a pair of shapes (x, context), e.g. from FanOut(2) and parallel, "
        "got (-1, 4, 6).",
    ),
    (
        "CrossAttention context shape",
        lambda: fn.CrossAttention(2).init(KEY, ((-1, 4, 6), (-1, 5))),
        (),
        ValueError,
        "CrossAttention(2): input_shape must be 3-D (batch, S, context_features), got (-1, 5).",
    ),
    (
        "CrossAttention.apply x not a pair",
        lambda x: CROSS.apply(CROSS_PARAMS, x),
        (np.ones((2, 4, 6)),),
        TypeError,
        (
            "CrossAttention(2): x must be a pair (x, context), queries from x and keys and values from context, "
            "got ",  # the type of the array or of its tracer
        ),
    ),
    (
        "CrossAttention.apply batch sizes",
        lambda x, context: CROSS.apply(CROSS_PARAMS, (x, context)),
        (np.ones((2, 4, 6)), np.ones((3, 5, 3))),
        ValueError,
        "CrossAttention(2): x and context must share the batch size, got x.shape=(2, 4, 6), context.shape=(3, 5, 3).",
    ),
]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(
    ("call", "arrays", "error", "message"), [case[1:] for case in MESSAGES], ids=[case[0] for case in MESSAGES]
)
def test_newer_arguments_raise_their_exact_messages(call, arrays, error, message, jit):
    before = _snapshot(arrays)
    with pytest.raises(error) as raised:
        jax.jit(call)(*arrays) if jit else call(*arrays)
    assert type(raised.value) is error
    text = raised.value.args[0]  # str(error) would add the note of JAX's traceback filtering
    if isinstance(message, str):
        assert text == message
    else:  # fragments, in order: the text starts with the first
        assert text.startswith(message[0]), text
        position = 0
        for fragment in message:
            assert fragment in text[position:], f"{fragment!r} not in {text!r}"
            position = text.index(fragment, position) + len(fragment)
    jax.tree_util.tree_map(np.testing.assert_array_equal, arrays, before)


# functions that trace under an outer jit (fit, save, load and check_vjp run on the host)
JITTABLE = {
    "weight_multiply",
    "bias_add",
    "sigmoid",
    "tanh",
    "relu",
    "linear",
    "dropout",
    "mean_squared_error",
    "softmax_cross_entropy",
    "conv2d",
    "max_pool2d",
    "Dense.apply",
    "serial.apply",
    "train_step",
    "rnn",
    "lstm",
    "gru",
    "layer_norm",
    "embedding",
    "avg_pool2d",
    "dot_product_attention",
    "MultiHeadAttention.apply",
    "gelu",
    "accuracy",
    "combinators.apply",
    "batch_norm",
    "train_apply",
    "rotary_embedding",
    "gelu_tanh",
    "rms_norm",
    "sigmoid_binary_cross_entropy",
    "dot_product_attention(causal, dropout)",
    "MultiHeadAttention(num_kv_heads, rope).apply",
    "CrossAttention.apply",
    "chain.update",
}


def test_fit_never_returns_nan_params_when_a_finite_best_existed():
    net = fn.serial(fn.Dense(8, fn.relu), fn.Dense(2, fn.linear))  # unbounded: it can blow up
    params = net.init(KEY, (-1, 3))[1]
    result = fn.fit(
        net,
        fn.mean_squared_error,
        fn.sgd(50.0),
        params,
        (X, 1e3 * Y),
        (X, Y),
        epochs=20,
        batch_size=4,
        eval_every=1,
        key=KEY,
    )
    assert bool(result.diverged)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(result.params))


def test_fit_and_ops_do_not_modify_user_arrays():
    x, y = X.copy(), Y.copy()
    params = jax.tree_util.tree_map(np.array, PARAMS)
    before = jax.tree_util.tree_map(np.copy, params)
    fn.fit(NET, fn.mean_squared_error, fn.adam(0.1), params, (x, y), epochs=2, batch_size=4, key=KEY)
    np.testing.assert_array_equal(x, X)
    np.testing.assert_array_equal(y, Y)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, before)
