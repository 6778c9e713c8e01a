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
        lambda logits=Y, target=LABELS: fn.softmax_cross_entropy(logits, target),
        {"logits": "arrays", "target": "arrays"},
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
    "Dropout": (lambda rate=0.5, x=X: fn.Dropout(rate).apply((), x, key=KEY), {"rate": "numbers", "x": "arrays"}),
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
        lambda prediction=Y, target=LABELS: fn.accuracy(prediction, target),
        {"prediction": "arrays", "target": "arrays"},
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
    "gelu": (lambda x=X: fn.gelu(x), {"x": "arrays"}),
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
