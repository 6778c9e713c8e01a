"""Branching networks: residual, FanOut, parallel, FanInSum, FanInConcat, with stax's semantics."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcnet as fn

KEY = jax.random.PRNGKey(0)


def _net():
    """Dense -> residual(Dense, LayerNorm, Dense) -> FanOut(2) -> parallel(Dense, Dense) -> FanInConcat -> Dense."""
    return fn.serial(
        fn.Dense(6, fn.tanh),
        fn.residual(fn.Dense(6, fn.relu), fn.LayerNorm(), fn.Dense(6, fn.linear)),
        fn.FanOut(2),
        fn.parallel(fn.Dense(3, fn.tanh), fn.Dense(4, fn.sigmoid)),
        fn.FanInConcat(),
        fn.Dense(2, fn.linear),
    )


def _plain(params, x):
    dense = lambda p, x: x @ p.W + p.B
    first, (r1, norm, r2), _, (left, right), _, last = params
    x = jnp.tanh(dense(first, x))
    h = jax.nn.relu(dense(r1, x))
    mean, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    h = (h - mean) / jnp.sqrt(var + 1e-5) * norm.gamma[None] + norm.beta[None]
    x = x + dense(r2, h)
    x = jnp.concatenate([jnp.tanh(dense(left, x)), jax.nn.sigmoid(dense(right, x))], axis=-1)
    return dense(last, x)


def test_a_branching_network_equals_plain_jnp_forward_and_gradient():
    net = _net()
    _, params = net.init(KEY, (-1, 5))
    x = np.random.default_rng(0).standard_normal((7, 5))
    # compiled: op by op, the forward and gradient compiled a program per primitive (8 s)
    apply, plain = jax.jit(net.apply), jax.jit(_plain)
    np.testing.assert_allclose(apply(params, x), plain(params, x), rtol=1e-12, atol=1e-13)
    loss = lambda f: lambda p: jnp.sum(jnp.sin(f(p, x)))
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13),
        jax.jit(jax.grad(loss(net.apply)))(params),
        jax.jit(jax.grad(loss(_plain)))(params),
    )


LAYERS = {  # name -> (layer, input shape)
    "residual": (lambda: fn.residual(fn.Dense(4, fn.tanh), fn.Dropout(0.2), fn.Dense(4)), (-1, 4)),
    "fan-out": (lambda: fn.FanOut(3), (-1, 4)),
    "parallel": (lambda: fn.parallel(fn.Dense(2), fn.Dropout(0.5), fn.Conv2D(3, 2)), ((-1, 4), (-1, 5), (-1, 4, 4, 1))),
    "fan-in-sum": (lambda: fn.FanInSum(), ((-1, 3), (-1, 3), (-1, 3))),
    "fan-in-concat": (lambda: fn.FanInConcat(1), ((-1, 2, 3), (-1, 4, 3))),
    "inception": (
        lambda: fn.serial(fn.FanOut(2), fn.parallel(fn.Conv2D(2, 3), fn.AvgPool2D(1)), fn.FanInConcat()),
        (-1, 6, 6, 3),
    ),
}


def _concrete(shape):
    if isinstance(shape[0], tuple):
        return tuple(_concrete(s) for s in shape)
    return tuple(3 if d == -1 else d for d in shape)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("key", [None, KEY])
def test_shape_agreement(name, key):
    make, input_shape = LAYERS[name]
    layer = make()
    output_shape, params = layer.init(KEY, input_shape)
    concrete = _concrete(input_shape)
    x = tuple(jnp.ones(s) for s in concrete) if isinstance(concrete[0], tuple) else jnp.ones(concrete)
    run = lambda p, x: layer.apply(p, x) if key is None else fn.train_apply(layer)(p, x, key=key)[0]
    y = run(params, x)
    abstract = jax.eval_shape(run, params, x)
    shapes = lambda t: jax.tree_util.tree_map(jnp.shape, t)
    assert shapes(y) == shapes(abstract)
    assert jax.tree_util.tree_leaves(
        shapes(y), is_leaf=lambda s: isinstance(s, tuple) and all(isinstance(d, int) for d in s)
    ) == jax.tree_util.tree_leaves(
        _concrete(output_shape), is_leaf=lambda s: isinstance(s, tuple) and all(isinstance(d, int) for d in s)
    )
    assert make() == layer and hash(make()) == hash(layer)


def test_summary_shows_branches_by_path():
    text = fn.summary(_net(), (-1, 5))
    for row in [
        "1.0    Dense(6, relu)",
        "1.1    LayerNorm(eps=1e-05)",
        "2    FanOut(2)",
        "3.0    Dense(3, tanh)",
        "3.1    Dense(4, sigmoid)",
        "4    FanInConcat(-1)",
        "((-1, 6), (-1, 6))",
        "(-1, 7)",
    ]:
        assert row in text, row
    assert f"Total params: {36 + 42 + 12 + 42 + 21 + 28 + 16:,}" in text


def test_an_error_inside_a_branch_names_its_path():
    net = _net()
    other = fn.serial(
        fn.Dense(6, fn.tanh),
        fn.residual(fn.Dense(6, fn.relu), fn.LayerNorm(), fn.Dense(6, fn.linear)),
        fn.FanOut(2),
        fn.parallel(fn.Dense(3, fn.tanh), fn.Dense(5, fn.sigmoid)),
        fn.FanInConcat(),
        fn.Dense(2, fn.linear),
    )
    _, other_params = other.init(KEY, (-1, 5))
    with pytest.raises(ValueError, match=r"serial: layer 3.1 \(Dense\(4, sigmoid\)\): params.W must have 4 output"):
        net.apply(other_params, jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"serial: layer 1.1 \(Conv2D\(2, 3x3, linear\)\): input_shape must be 4-D"):
        fn.serial(fn.Dense(5), fn.residual(fn.Dense(5), fn.Conv2D(2, 3))).init(KEY, (-1, 3))


def test_each_branch_draws_its_own_dropout_mask():
    net = fn.serial(fn.FanOut(2), fn.parallel(fn.Dropout(0.5), fn.Dropout(0.5)))
    (left, right), _ = fn.train_apply(net)(net.init(KEY, (-1, 50))[1], jnp.ones((4, 50)), key=KEY)
    assert not np.array_equal(left, right)


BAD = [
    (
        lambda: fn.FanInSum().init(KEY, ((-1, 3),)),
        ValueError,
        "FanInSum\\(\\): a fan-in needs at least 2 inputs, got 1",
    ),
    (lambda: fn.FanInSum().apply((), (jnp.ones((2, 3)),)), ValueError, "a fan-in needs at least 2 inputs, got 1"),
    (lambda: fn.FanInSum().init(KEY, ((-1, 3), (-1, 4))), ValueError, "every input must have the same shape"),
    (lambda: fn.FanInConcat().init(KEY, ((-1, 3), (-1, 4, 2))), ValueError, "inputs must agree on every axis but -1"),
    (lambda: fn.FanInConcat(0).init(KEY, ((-1, 3), (-1, 3))), ValueError, "axis must name a non-batch axis"),
    (lambda: fn.FanInConcat(1.0), TypeError, "FanInConcat: axis must be an int"),
    (
        lambda: fn.parallel(fn.Dense(2), fn.Dense(3)).init(KEY, ((-1, 4), (-1, 4), (-1, 4))),
        ValueError,
        r"parallel: input_shape must hold one shape per layer \(2\), got 3",
    ),
    (
        lambda: fn.parallel(fn.Dense(2), fn.Dense(3)).init(KEY, (-1, 4)),
        TypeError,
        "parallel: input_shape must be a tuple of shapes",
    ),
    (lambda: fn.parallel(fn.Dense(2)).apply(((),), jnp.ones((2, 3))), TypeError, "parallel: x must be a tuple"),
    (
        lambda: fn.residual(fn.Dense(3)).init(KEY, (-1, 4)),
        ValueError,
        r"residual: its layers must keep the input's shape for x \+ f\(x\), but they turn \(-1, 4\) into \(-1, 3\)",
    ),
    (lambda: fn.residual(), ValueError, "residual: at least one layer is needed"),
    (lambda: fn.parallel(fn.Dense(2), "dense"), TypeError, "parallel: layer 1 must be a Layer"),
    (lambda: fn.FanOut(0), ValueError, "FanOut: count must be >= 1"),
]


@pytest.mark.parametrize("call,error,message", BAD)
def test_bad_input_gets_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def _lengths_layer():
    """A Layer of closures that takes ``kv_lengths``: zeroes the steps at or beyond each row's length."""

    def init(key, input_shape):
        del key
        return input_shape, ()

    def apply(params, x, *, key=None, kv_lengths=None):
        del params, key
        if kv_lengths is None:
            return x
        keep = jnp.arange(x.shape[1])[None, :] < kv_lengths[:, None]
        return jnp.where(keep[..., None], x, 0.0)

    return fn.Layer(init, apply)


def test_inputs_beyond_x_reach_the_layers_that_take_them_through_every_combinator():
    x = jnp.ones((2, 4, 3))
    lengths = jnp.array([1, 3])
    seen = _lengths_layer()
    nets = [
        fn.serial(fn.TimeDistributed(fn.Dense(3, fn.linear, w_init=lambda k, s, d: jnp.ones(s, d))), seen),
        fn.serial(fn.residual(seen), fn.serial(seen)),
        fn.serial(fn.FanOut(2), fn.parallel(seen, fn.named("plain", seen)), fn.FanInSum()),
    ]
    for net in nets:
        assert fn.layer_inputs(net) == frozenset({"kv_lengths"})
        _, params = net.init(KEY, (-1, 4, 3))
        y = net.apply(params, x, kv_lengths=lengths)
        assert float(jnp.abs(y[0, 1:]).max()) == 0.0 and float(jnp.abs(y[1, 3:]).max()) == 0.0
        assert float(jnp.abs(y[1, :3]).min()) > 0
        y_train, _ = fn.train_apply(net)(params, x, kv_lengths=lengths)
        assert jnp.array_equal(y, y_train)
        # Without the input the layer sees no padding: the test above can fail.
        assert float(jnp.abs(net.apply(params, x)[0, 1:]).max()) > 0


def test_an_input_no_layer_takes_is_a_type_error_naming_it():
    net = fn.serial(fn.TimeDistributed(fn.Dense(3, fn.linear)), _lengths_layer())
    _, params = net.init(KEY, (-1, 4, 3))
    with pytest.raises(TypeError, match=r"no layer inside takes mask=.*kv_lengths.*row_mask="):
        net.apply(params, jnp.ones((2, 4, 3)), mask=jnp.ones((2, 1, 4, 4), bool))
    with pytest.raises(TypeError, match="no layer inside takes kv_length="):
        fn.train_apply(net)(params, jnp.ones((2, 4, 3)), kv_length=jnp.array([1, 2]))
    plain = fn.serial(fn.Dense(3, fn.linear))
    _, params = plain.init(KEY, (-1, 3))
    assert fn.layer_inputs(plain) == frozenset()
    with pytest.raises(TypeError, match="inputs its layers take: none"):
        plain.apply(params, jnp.ones((2, 3)), kv_lengths=jnp.array([1, 2]))
    plain.apply(params, jnp.ones((2, 3)), kv_lengths=None)  # None: not given


# --- remat ----------------------------------------------------------------------------------

from funcnet.combinators import remat, tied  # noqa: E402
from funcnet.layers import spec_of  # noqa: E402

_close = lambda a, b: jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12), a, b
)


def _block(d=8, heads=2):
    """A GPT block: attention and an MLP, each residual after a LayerNorm, with dropout."""
    return fn.serial(
        fn.residual(fn.LayerNorm(), fn.MultiHeadAttention(heads, is_causal=True)),
        fn.residual(fn.LayerNorm(), fn.Dense(2 * d, fn.gelu), fn.Dropout(0.3), fn.Dense(d, fn.linear)),
    )


def _gpt(wrap, vocab=11, d=8, blocks=2):
    return fn.serial(
        fn.Embedding(vocab, d),
        fn.PositionalEmbedding(16),
        *[wrap(_block(d)) for _ in range(blocks)],
        fn.LayerNorm(),
        fn.Dense(vocab, fn.linear),
    )


def _tokens(shape, vocab=11, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape))


def test_remat_gives_its_layers_outputs_and_gradients_under_jit_and_vmap():
    plain, rematted = _gpt(lambda b: b, blocks=1), _gpt(remat, blocks=1)
    _, params = plain.init(KEY, (-1, 6))
    assert jax.tree_util.tree_structure(rematted.init(KEY, (-1, 6))[1]) == jax.tree_util.tree_structure(params)
    x, y, lengths = _tokens((3, 6)), _tokens((3, 6), seed=1), jnp.array([6, 2, 4])

    def loss(net):
        def f(params, x, y, key, lengths):
            if key is None:  # inference
                return fn.softmax_cross_entropy(net.apply(params, x, kv_lengths=lengths), y), params
            logits, new = fn.train_apply(net)(params, x, key=key, kv_lengths=lengths)
            return fn.softmax_cross_entropy(logits, y), new

        return f

    for key in [None, KEY]:  # inference, and training mode with dropout (the same masks recomputed)
        args = (params, x, y, key, lengths)
        (value, new), grads = jax.jit(jax.value_and_grad(loss(plain), has_aux=True))(*args)
        (value_r, new_r), grads_r = jax.jit(jax.value_and_grad(loss(rematted), has_aux=True))(*args)
        _close((value, new, grads), (value_r, new_r, grads_r))
    apply = lambda net: jax.jit(lambda p, x, lengths: net.apply(p, x, kv_lengths=lengths))
    _close(apply(plain)(params, x, lengths), apply(rematted)(params, x, lengths))
    # vmap: per-example gradients (a batch of one each), as an ensemble or DP-SGD would take them
    per_example = lambda net: jax.jit(
        jax.vmap(jax.grad(lambda p, x, y: loss(net)(p, x[None], y[None], KEY, None)[0]), in_axes=(None, 0, 0))
    )
    _close(per_example(plain)(params, x, y), per_example(rematted)(params, x, y))


def test_remat_keeps_the_state_a_stateful_layer_updates_in_training_mode():
    inner = fn.serial(fn.Dense(5, fn.tanh), fn.BatchNorm(), fn.Dense(3, fn.linear))
    plain, rematted = fn.serial(inner, fn.Dense(2, fn.linear)), fn.serial(remat(inner), fn.Dense(2, fn.linear))
    _, params = plain.init(KEY, (-1, 4))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 4)))
    row_mask = jnp.array([True, True, False, True, True, False])

    def loss(net):
        def f(params):
            y, new = fn.train_apply(net)(params, x, row_mask=row_mask)
            return jnp.sum(jnp.sin(y)), new

        return jax.jit(jax.value_and_grad(f, has_aux=True))

    (value, new), grads = loss(plain)(params)
    (value_r, new_r), grads_r = loss(rematted)(params)
    _close((value, new, grads), (value_r, new_r, grads_r))
    assert not np.allclose(new[0][1].stats.mean, params[0][1].stats.mean)  # the state did move


@pytest.mark.slow  # the gradients' equality is the jit/vmap test's; this adds fit around it
def test_remat_inside_fit_equals_the_fit_without_it():
    plain, rematted = _gpt(lambda b: b), _gpt(remat)
    _, params = plain.init(KEY, (-1, 6))
    x, y, lengths = _tokens((10, 6)), _tokens((10, 6), seed=1), jnp.asarray(np.random.default_rng(2).integers(1, 7, 10))
    run = lambda net: fn.fit(
        net,
        fn.softmax_cross_entropy,
        fn.adam(1e-2),
        params,
        (x, y, {"kv_lengths": lengths}),
        epochs=3,
        batch_size=4,
        key=KEY,
    )
    ours, theirs = run(rematted), run(plain)
    _close(ours.params, theirs.params)
    _close(ours.history.train_loss, theirs.history.train_loss)


def test_remat_saves_gradient_memory():
    """The point of remat: the compiled gradient keeps one input per block, not its activations
    (a plain jax.checkpoint kept them all on XLA's CPU backend). Sizes as in bench_remat.py, smaller;
    six blocks, so that what remat keeps (the recomputation's own temporaries, one block's worth)
    is small beside what it saves (0.36x here, 0.21x for bench_remat.py's 8 blocks)."""
    d, T, vocab = 32, 64, 32
    x = _tokens((4, T), vocab)

    def temp(wrap):
        net = fn.serial(
            fn.Embedding(vocab, d, dtype=np.float32),
            *[wrap(_block(d)) for _ in range(6)],
            fn.Dense(vocab, fn.linear, dtype=np.float32),
        )
        params = jax.tree_util.tree_map(lambda a: a.astype(np.float32), net.init(KEY, (-1, T))[1])
        loss = lambda p: fn.softmax_cross_entropy(net.apply(p, x), x)
        return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

    assert temp(remat) <= 0.5 * temp(lambda b: b)


def test_remat_is_a_value_listed_by_summary_and_decodes_as_its_layer():
    assert remat(_block()) == remat(_block()) and hash(remat(_block())) == hash(remat(_block()))
    assert remat(fn.Dense(3)) != remat(fn.Dense(4)) and remat(fn.Dense(3)) != fn.Dense(3)
    assert fn.layer_inputs(remat(_block())) == fn.layer_inputs(_block()) == frozenset({"kv_lengths", "mask"})
    assert fn.layer_inputs(remat(fn.Dense(3))) == frozenset()
    text = fn.summary(fn.serial(fn.Dense(8), remat(_block())), (-1, 5, 3))
    for row in ["1.0.0.0", "MultiHeadAttention(2", "1.0.1.1", "Dense(16, gelu)", "1.0.1.3", "Dense(8, linear)"]:
        assert row in text, row
    _, params = _block().init(KEY, (-1, 5, 8))
    assert f"Total params: {32 + fn.param_count(params):,}" in text
    # decoding passes through: the caches and the steps are the block's own
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 8)))
    plain, rematted = spec_of(_block()), spec_of(remat(_block()))
    offset = jnp.array([0, 0])
    cache, cache_r = plain.init_cache(params, 2, 8), rematted.init_cache(params, 2, 8)
    _close(cache, cache_r)
    _close(plain.decode(params, cache, x, offset=offset), rematted.decode(params, cache_r, x, offset=offset))


def test_remat_bad_input():
    with pytest.raises(TypeError, match="remat: layer 0 must be a Layer"):
        remat("block")
    with pytest.raises(ValueError, match=r"remat: layer 0.1 \(Conv2D\(2, 3x3, linear\)\): input_shape must be 4-D"):
        remat(fn.serial(fn.Dense(3), fn.Conv2D(2, 3))).init(KEY, (-1, 4))
    net = remat(fn.Dense(3))
    _, params = net.init(KEY, (-1, 4))
    with pytest.raises(TypeError, match=r"remat\(Dense\(3, sigmoid\)\): no layer inside takes kv_lengths="):
        net.apply(params, jnp.ones((2, 4)), kv_lengths=jnp.array([1, 2]))
    with pytest.raises(ValueError, match=r"remat: layer 0 \(Dense\(3, sigmoid\)\): weight_multiply: x has 5 features"):
        jax.jit(net.apply)(params, jnp.ones((2, 5)))


# --- tied -----------------------------------------------------------------------------------


def _untied_head(vocab, d):
    """``h @ W2.T`` with ``W2: (vocab, d)`` of its own, in plain jnp: the untied network's head."""

    def init(key, input_shape):
        return (*input_shape[:-1], vocab), fn.EmbeddingParams(jax.random.normal(key, (vocab, d)))

    def apply(params, h, *, key=None):
        del key
        return h @ params.W.T

    return fn.Layer(init, apply)


def _body(d=8):
    return (fn.PositionalEmbedding(16), _block(d), fn.LayerNorm())


def test_the_tied_gradient_is_the_sum_of_the_embeddings_and_the_heads():
    vocab, d = 11, 8
    net = tied(fn.Embedding(vocab, d), *_body(d))
    untied = fn.serial(fn.Embedding(vocab, d), *_body(d), _untied_head(vocab, d))
    _, params = net.init(KEY, (-1, 6))
    untied_params = (*params, params[0])  # the head's W2: a copy of W
    x, y, lengths = _tokens((3, 6), vocab), _tokens((3, 6), vocab, seed=1), jnp.array([6, 3, 5])

    def loss(net):
        def f(params, key):
            if key is None:  # inference
                return fn.softmax_cross_entropy(net.apply(params, x, kv_lengths=lengths), y)
            logits, _ = fn.train_apply(net)(params, x, key=key, kv_lengths=lengths)
            return fn.softmax_cross_entropy(logits, y)

        return jax.jit(jax.value_and_grad(f))

    for key in [None, KEY]:
        value, grads = loss(net)(params, key)
        value_u, grads_u = loss(untied)(untied_params, key)
        _close(value, value_u)
        _close(grads[1:], grads_u[1:-1])
        embedding_share, head_share = grads_u[0].W, grads_u[-1].W
        _close(grads[0].W, embedding_share + head_share)
        # each share matters, so a tied W missing either would fail the line above
        for share in (embedding_share, head_share):
            assert float(jnp.abs(share).max()) > 1e-2 * float(jnp.abs(grads[0].W).max())
    _close(jax.jit(net.apply)(params, x), jax.jit(untied.apply)(untied_params, x))


def test_tied_threads_state_inputs_and_decoding_like_serial():
    vocab, d = 13, 8
    net = tied(fn.Embedding(vocab, d), fn.MultiHeadAttention(2, is_causal=True, rope=10000.0), fn.LayerNorm())
    output_shape, params = net.init(KEY, (-1, 7))
    assert output_shape == (-1, 7, vocab)
    x = _tokens((2, 7), vocab)
    assert fn.layer_inputs(net) == frozenset({"kv_lengths", "mask"})
    full = net.apply(params, x)
    assert full.shape == (2, 7, vocab)
    # decoding: a prefill of 3 positions, then one at a time, each equal to the full recomputation
    spec = spec_of(net)
    decode = jax.jit(lambda params, cache, x, offset: spec.decode(params, cache, x, offset=offset))
    cache = spec.init_cache(params, 2, 7)
    logits, cache = decode(params, cache, x[:, :3], jnp.array([0, 0]))
    steps = [logits]
    for t in range(3, 7):
        logits, cache = decode(params, cache, x[:, t : t + 1], jnp.array([t, t]))
        steps.append(logits)
    _close(jnp.concatenate(steps, axis=1), full)
    # a stateful layer in the body: its state comes back in its entry
    stateful = tied(fn.Embedding(vocab, d), fn.BatchNorm())
    _, params = stateful.init(KEY, (-1, 7))
    _, new = fn.train_apply(stateful)(params, x)
    assert not np.allclose(new[1].stats.mean, params[1].stats.mean)


def test_tied_is_a_value_and_summary_counts_W_once():
    make = lambda: tied(fn.Embedding(11, 8), *_body())
    assert make() == make() and hash(make()) == hash(make())
    assert make() != tied(fn.Embedding(12, 8), *_body())
    assert make() != fn.serial(fn.Embedding(11, 8), *_body())
    net = make()
    _, params = net.init(KEY, (-1, 6))
    text = fn.summary(net, (-1, 6))
    assert text.count("Embedding(11, 8)") == 1 and "(own)" not in text
    assert f"Total params: {fn.param_count(params):,}" in text
    _, untied_params = fn.serial(fn.Embedding(11, 8), *_body(), fn.Dense(11, fn.linear, use_bias=False)).init(
        KEY, (-1, 6)
    )
    assert fn.param_count(untied_params) - fn.param_count(params) == 11 * 8
    assert re.search(r"^0 +Embedding\(11, 8\) +\(-1, 6, 8\) +88$", text, re.M)


TIED_BAD = [
    (lambda: tied(fn.Dense(8), fn.LayerNorm()), TypeError, r"tied: the first layer must be an Embedding.*Dense\(8"),
    (lambda: tied(fn.named("wte", fn.Embedding(5, 4))), TypeError, "must be an Embedding.*got wte"),
    (lambda: tied(), TypeError, "missing 1 required positional argument"),
    (lambda: tied(fn.Embedding(5, 4), "body"), TypeError, "tied: layer 1 must be a Layer"),
    (
        lambda: tied(fn.Embedding(5, 4), fn.Dense(6)).init(KEY, (-1, 3)),
        ValueError,
        r"tied\(Embedding\(5, 4\), 1 layers\): the layers' output must have 4 features, the features of "
        r"Embedding\(5, 4\) whose W.T is the output head, but Dense\(6, sigmoid\) gives shape \(-1, 3, 6\)",
    ),
    (
        lambda: tied(fn.Embedding(5, 4)).apply(tied(fn.Embedding(6, 4)).init(KEY, (-1, 3))[1], jnp.zeros((1, 3), int)),
        ValueError,
        r"tied: layer 0 \(Embedding\(5, 4\)\): params.W must have shape \(5, 4\)",
    ),
]


@pytest.mark.parametrize("call,error,message", TIED_BAD)
def test_tied_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_tied_equals_a_torch_model_with_nanogpts_tie():
    torch = pytest.importorskip("torch")
    vocab, d, T = 11, 8, 6

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = torch.nn.Embedding(vocab, d)
            self.fc = torch.nn.Linear(d, d)
            self.ln = torch.nn.LayerNorm(d)
            self.lm_head = torch.nn.Linear(d, vocab, bias=False)
            self.lm_head.weight = self.wte.weight  # nanoGPT's weight tying

        def forward(self, ids):
            return self.lm_head(self.ln(torch.tanh(self.fc(self.wte(ids)))))

    net = tied(fn.Embedding(vocab, d), fn.Dense(d, fn.tanh), fn.LayerNorm())
    _, params = net.init(KEY, (-1, T))
    torch.manual_seed(0)
    model = Tiny().double()
    with torch.no_grad():
        model.wte.weight.copy_(torch.tensor(np.asarray(params[0].W)))
        model.fc.weight.copy_(torch.tensor(np.asarray(params[1].W).T))
        model.fc.bias.copy_(torch.tensor(np.asarray(params[1].B)[0]))
        model.ln.weight.copy_(torch.tensor(np.asarray(params[2].gamma)))
        model.ln.bias.copy_(torch.tensor(np.asarray(params[2].beta)))
    x, y = _tokens((3, T), vocab), _tokens((3, T), vocab, seed=1)
    logits_t = model(torch.tensor(np.asarray(x)))
    torch.nn.functional.cross_entropy(logits_t.reshape(-1, vocab), torch.tensor(np.asarray(y)).reshape(-1)).backward()
    logits = net.apply(params, x)
    grads = jax.grad(lambda p: fn.softmax_cross_entropy(net.apply(p, x), y))(params)
    check = lambda ours, theirs: np.testing.assert_allclose(
        np.asarray(ours), theirs.detach().numpy(), rtol=1e-10, atol=1e-12
    )
    check(logits, logits_t)
    check(grads[0].W, model.wte.weight.grad)  # both uses' sum, in one tensor
    check(grads[1].W, model.fc.weight.grad.T)


def test_remat_second_order_equals_its_layers():
    net = fn.serial(fn.Dense(3, fn.tanh), fn.LayerNorm(), fn.Dense(2, fn.linear))
    _, params = net.init(KEY, (-1, 4))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4)))
    hessian = lambda net: jax.jit(jax.jacrev(jax.grad(lambda p: jnp.sum(jnp.sin(net.apply(p, x))))))(params)
    _close(hessian(remat(net)), hessian(net))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_remat_passes_a_nan_or_inf_cotangent_back_as_its_layer_does(bad):
    # The recompute hides behind a cond on the cotangent that must be true for every float: a
    # NaN or inf cotangent must reach the gradients as it does without remat, not become all NaN.
    layer = fn.Dense(3, fn.linear)
    _, params = layer.init(KEY, (-1, 4))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4)))
    cotangent = jnp.ones((2, 3)).at[0, 0].set(bad)
    grads = lambda net: jax.vjp(lambda p, x: net.apply(p, x), params, x)[1](cotangent)
    want, got = grads(layer), grads(remat(layer))
    assert np.isfinite(np.asarray(want[1][1])).all()  # the second row's input gradient: untouched
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
