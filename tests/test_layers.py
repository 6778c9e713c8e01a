"""Layers: shape agreement, whole-network gradients against plain jnp, keys, dropout, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import funcnet as fn
from funcnet.layers import Activation, WeightParams

KEY = jax.random.PRNGKey(0)
ACTIVATIONS = {
    "sigmoid": (fn.sigmoid, jax.nn.sigmoid),
    "tanh": (fn.tanh, jnp.tanh),
    "relu": (fn.relu, jax.nn.relu),
    "linear": (fn.linear, lambda x: x),
}


def _run(layer, params, x, key):
    """Inference without a key, training mode (dropout) with one."""
    return layer.apply(params, x) if key is None else fn.train_apply(layer)(params, x, key=key)[0]


def _check_shape_agreement(layer, input_shape, key=None):
    """init's output_shape == apply(...).shape == jax.eval_shape(apply, ...) (stax's check)."""
    output_shape, params = layer.init(KEY, input_shape)
    concrete = tuple(4 if d == -1 else d for d in input_shape)
    x = jnp.ones(concrete)
    y = _run(layer, params, x, key)
    abstract = jax.eval_shape(lambda p, x: _run(layer, p, x, key), params, x)
    expected = tuple(4 if d == -1 else d for d in output_shape)
    assert y.shape == abstract.shape == expected


NETS = {
    "dense": lambda: fn.Dense(7),
    "dropout": lambda: fn.Dropout(0.3),
    "serial": lambda: fn.serial(fn.Dense(5, fn.tanh), fn.Dropout(0.5), fn.Dense(3, fn.linear)),
    "nested": lambda: fn.serial(fn.Dense(4), fn.serial(fn.Dense(6, fn.relu), fn.serial(fn.Dense(2)))),
    "no-bias": lambda: fn.serial(fn.Dense(5, fn.tanh, use_bias=False), Activation(fn.relu)),
    "activation": lambda: Activation(jnp.tanh),
}


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("input_shape", [(-1, 1), (1, 3), (8, 16), (-1, 33)])
@pytest.mark.parametrize("key", [None, jax.random.PRNGKey(1)])
def test_shape_agreement(name, input_shape, key):
    _check_shape_agreement(NETS[name](), input_shape, key)


def _plain_net(params, x, act):
    for W, B in params:
        x = act(x @ W + B)
    return x


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_network_gradient_equals_plain_jnp_and_finite_differences(activation, loss):
    act, plain_act = ACTIVATIONS[activation]
    net = fn.serial(fn.Dense(6, act), fn.Dense(5, act), fn.Dense(3, act))
    _, params = net.init(KEY, (-1, 4))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 4))
    if loss == "mse":
        y = rng.standard_normal((10, 3))
        loss_fn, plain_loss = fn.mean_squared_error, lambda p, t: jnp.sum((p - t) ** 2) / p.shape[0]
    else:
        y = np.eye(3)[rng.integers(0, 3, 10)]
        loss_fn = fn.softmax_cross_entropy
        plain_loss = lambda p, t: -jnp.sum(t * jax.nn.log_softmax(p, axis=1)) / p.shape[0]
    ours = jax.jit(jax.grad(lambda p: loss_fn(net.apply(p, x), y)))(params)
    plain = jax.jit(jax.grad(lambda p: plain_loss(_plain_net([(q.W, q.B) for q in p], x, plain_act), y)))(params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), ours, plain)
    # finite differences along random directions in the whole parameter tree
    flat, unravel = ravel_pytree(params)
    fn.check_vjp(
        lambda f: loss_fn(net.apply(unravel(f), x), y),
        lambda f: plain_loss(_plain_net([(q.W, q.B) for q in unravel(f)], x, plain_act), y),
        flat,
    )


def test_same_key_same_params_different_keys_differ():
    net = NETS["serial"]()
    a, b, c = (net.init(k, (-1, 4))[1] for k in (KEY, KEY, jax.random.PRNGKey(2)))
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    assert not np.allclose(a[0].W, c[0].W)


def test_initializers():
    w = fn.glorot_normal(KEY, (400, 600), jnp.float64)
    np.testing.assert_allclose(np.std(w), np.sqrt(2 / 1000), rtol=0.02)
    np.testing.assert_allclose(np.std(fn.standard_normal(KEY, (500, 500), jnp.float64)), 1.0, rtol=0.02)
    assert not np.any(fn.zeros(KEY, (3, 2)))
    conv = fn.glorot_normal(KEY, (5, 5, 8, 16), jnp.float64)  # HWIO: fans times the 25-pixel field
    np.testing.assert_allclose(np.std(conv), np.sqrt(2 / (25 * 24)), rtol=0.05)
    _, params = fn.Dense(3, w_init=fn.glorot_normal, b_init=fn.zeros).init(KEY, (-1, 2))
    assert not np.any(params.B)


def test_dropout_keep_rate_mean_and_identity_without_key():
    layer = fn.Dropout(0.3)
    x = jnp.ones((200, 500))
    y, _ = fn.train_apply(layer)((), x, key=jax.random.PRNGKey(3))
    kept = np.mean(np.asarray(y) != 0)
    np.testing.assert_allclose(kept, 0.7, atol=0.01)
    np.testing.assert_allclose(np.mean(y), 1.0, atol=0.02)  # 1/(1-rate) scaling keeps the mean
    np.testing.assert_array_equal(layer.apply((), x), x)
    np.testing.assert_array_equal(fn.train_apply(fn.Dropout(0.0))((), x, key=KEY)[0], x)


def test_one_train_eval_switch_apply_never_drops_and_refuses_a_key():
    """apply is inference for every layer; training mode is train_apply, with a key for dropout."""
    net = fn.serial(fn.Dense(4, fn.tanh), fn.Dropout(0.5), fn.Dense(2, fn.linear))
    _, params = net.init(KEY, (-1, 3))
    x = jnp.ones((8, 3))
    with pytest.raises(TypeError, match=r"apply is inference.*funcnet.train_apply\(net\)\(params, x, key=key\)"):
        net.apply(params, x, key=KEY)
    with pytest.raises(TypeError, match="training mode drops units at random and needs a key"):
        fn.train_apply(net)(params, x)
    y, same = fn.train_apply(net)(params, x, key=KEY)
    assert not np.allclose(y, net.apply(params, x))
    assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(same), jax.tree_util.tree_leaves(params), strict=True))


def test_dropout_backward_uses_the_same_mask():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((20, 30)))
    key = jax.random.PRNGKey(4)
    y, vjp = jax.vjp(lambda x: fn.train_apply(fn.Dropout(0.5))((), x, key=key)[0], x)
    (g,) = vjp(jnp.ones_like(y))
    np.testing.assert_array_equal(np.asarray(g) != 0, np.asarray(y) != 0)
    np.testing.assert_allclose(np.asarray(g)[np.asarray(y) != 0], 2.0)


def test_summary_lists_layers_shapes_and_total():
    net = fn.serial(fn.Dense(13), fn.Dropout(0.1), fn.serial(fn.Dense(1, fn.linear)))
    text = fn.summary(net, (-1, 10))
    assert "Dense(13, sigmoid)" in text and "(-1, 13)" in text and "143" in text
    assert "Dense(1, linear)" in text and "Total params: 157" in text
    _, params = net.init(KEY, (-1, 10))
    assert fn.param_count(params) == 157


def test_user_defined_layer_composes():
    def init(key, input_shape):
        return input_shape, ()

    def apply(params, x, *, key=None):
        del params, key
        return 2 * x

    net = fn.serial(fn.Dense(3), fn.Layer(init, apply))
    _check_shape_agreement(net, (-1, 2))
    assert "apply" not in fn.summary(net, (-1, 2)) and "init" in fn.summary(net, (-1, 2))


def test_a_layer_of_closures_taking_any_keyword_gets_the_inputs_a_combinator_is_given():
    """A closure layer whose apply takes ``**inputs`` takes any input (layer_inputs None): inside
    a combinator it must get every input given, in inference and in training mode."""

    def apply(params, x, *, key=None, **inputs):
        del params, key
        return x * inputs["kv_lengths"][:, None] if "kv_lengths" in inputs else x

    def init(key, input_shape):
        del key
        return input_shape, ()

    net = fn.serial(fn.Layer(init, apply), Activation(fn.linear))
    _, params = net.init(KEY, (-1, 3))
    x, lengths = jnp.ones((2, 3)), jnp.asarray([2.0, 3.0])
    want = np.asarray([[2.0] * 3, [3.0] * 3])
    np.testing.assert_array_equal(net.apply(params, x, kv_lengths=lengths), want)
    np.testing.assert_array_equal(fn.train_apply(net)(params, x, kv_lengths=lengths)[0], want)
    np.testing.assert_array_equal(net.apply(params, x), x)  # not given: not passed


BAD = [
    (
        lambda: fn.Dense(3).init(KEY, (5,)),
        ValueError,
        r"Dense\(3, sigmoid\): input_shape must be at least 2-D \(batch, ..., num_in\), got \(5,\)",
    ),
    (lambda: fn.Dense(0), ValueError, "neurons must be >= 1, got 0"),
    (lambda: fn.Dense(-2), ValueError, "neurons must be >= 1, got -2"),
    (lambda: fn.Dense(2.5), TypeError, "neurons must be an int"),
    (lambda: fn.Dense(3, activation="tanh"), TypeError, "activation must be a callable"),
    (lambda: fn.Dense(3, use_bias=0), TypeError, r"Dense\(3, sigmoid\): use_bias must be a bool, got int 0"),
    (lambda: Activation("relu"), TypeError, "Activation: fn must be a callable, got str"),
    (lambda: Activation(fn.relu).init(KEY, (-1, 0)), ValueError, r"Activation\(relu\): input_shape sizes must be"),
    (lambda: fn.Dropout(1.0), ValueError, r"Dropout: rate must be >= 0.0 and < 1.0, got 1.0"),
    (lambda: fn.Dropout(-0.1), ValueError, "rate must be >= 0.0"),
    (lambda: fn.serial(fn.Dense(2), "relu"), TypeError, "serial: layer 1 must be a Layer"),
    (lambda: fn.serial(), ValueError, "at least one layer"),
    (lambda: fn.Dense(3).init(KEY, [2, "a"]), TypeError, "input_shape must be a tuple of ints"),
]


@pytest.mark.parametrize("call,error,message", BAD)
def test_bad_construction_gets_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_apply_errors_name_the_layer_inside_serial():
    net = fn.serial(fn.Dense(4), fn.serial(fn.Dense(3), fn.Dense(2)))
    _, params = net.init(KEY, (-1, 5))
    with pytest.raises(
        ValueError, match=r"serial: layer 0 \(Dense\(4, sigmoid\)\): weight_multiply: x has 6 features but W expects 5"
    ):
        jax.jit(net.apply)(params, jnp.ones((2, 6)))
    other = fn.serial(fn.Dense(4), fn.serial(fn.Dense(3), fn.Dense(7)))
    _, other_params = other.init(KEY, (-1, 5))
    with pytest.raises(
        ValueError, match=r"serial: layer 1.1 \(Dense\(2, sigmoid\)\): params.W must have 2 output columns"
    ):
        net.apply(other_params, jnp.ones((2, 5)))
    with pytest.raises(TypeError, match="params must be a tuple with one entry per layer"):
        net.apply(params[:1], jnp.ones((2, 5)))
    with pytest.raises(TypeError, match=r"layer 0 \(Dense\(4, sigmoid\)\): params must be DenseParams"):
        net.apply(((1, 2), params[1]), jnp.ones((2, 5)))


def _every_layer():
    """One of every layer and combinator, nested, with its input shape."""
    head = fn.serial(fn.Dense(4, fn.relu), fn.Dense(2, fn.linear))
    return [
        (
            fn.serial(fn.LSTM(8), fn.TimeDistributed(fn.serial(fn.Dense(4, fn.relu), fn.Dense(2, fn.linear)))),
            (-1, 5, 3),
        ),
        (fn.serial(fn.RNN(3), fn.GRU(4), fn.TimeDistributed(fn.Dense(2, fn.linear))), (-1, 5, 3)),
        (fn.serial(fn.Embedding(10, 4), fn.LayerNorm(), fn.TimeDistributed(head)), (-1, 6)),
        (
            fn.serial(
                fn.Conv2D(3, 3, fn.relu),
                fn.MaxPool2D(2),
                fn.AvgPool2D(2, stride=1),
                fn.Flatten(),
                fn.Dropout(0.1),
                fn.FanOut(2),
                fn.parallel(fn.Dense(3, fn.tanh), fn.serial(fn.Dense(5), fn.Dense(3))),
                fn.FanInSum(),
                fn.residual(fn.Dense(3, fn.tanh), head, fn.Dense(3, fn.linear)),
                fn.FanOut(3),
                fn.parallel(head, head, fn.serial(head, fn.Dense(1))),
                fn.FanInConcat(),
            ),
            (-1, 8, 8, 2),
        ),
        (fn.serial(fn.serial(fn.serial(fn.Dense(3)))), (-1, 2)),
        (fn.Dense(3), (-1, 2)),
        (fn.Layer(lambda key, shape: (shape, (jnp.ones(3),)), lambda params, x, key=None: x), (-1, 2)),
    ]


@pytest.mark.parametrize("case", range(len(_every_layer())))
def test_summary_total_equals_param_count_for_every_layer_and_combinator(case):
    """A combinator inside TimeDistributed was counted twice (476 rows against 430 params)."""
    net, shape = _every_layer()[case]
    _, params = net.init(KEY, shape)
    text = fn.summary(net, shape)
    assert f"Total params: {fn.param_count(params):,}" in text, text
    assert fn.summary(net, shape) == text  # nothing left behind between calls


def test_summary_of_an_lstm_with_a_distributed_head_counts_430_params():
    net = fn.serial(fn.LSTM(8), fn.TimeDistributed(fn.serial(fn.Dense(4, fn.relu), fn.Dense(2, fn.linear))))
    text = fn.summary(net, (-1, 5, 3))
    assert "Total params: 430" in text and "1.0.1" in text and "Dense(2, linear)" in text


def test_init_only_fields_are_marked_per_field_never_by_name():
    """A user's spec whose ``dtype`` field its ``apply`` reads (a compute dtype, as in Flax) must not
    compare equal across dtypes: only fields declared ``init_only()`` leave ``apply``'s value."""
    import dataclasses

    from funcnet.layers import LayerSpec, init_only, layer_spec

    @layer_spec
    class _Cast(LayerSpec):
        dtype: object
        w_init: object = init_only()

        @property
        def name(self):
            return "Cast"

        def init(self, key, input_shape):
            return input_shape, ()

        def apply(self, params, x, *, key=None):
            return x.astype(self.dtype)

    half, full = _Cast(jnp.float16, None).layer(), _Cast(jnp.float32, None).layer()
    assert half.apply != full.apply and hash(half.apply) != hash(full.apply)
    assert _Cast(jnp.float16, 1).layer().apply == _Cast(jnp.float16, 2).layer().apply  # init-only differs
    marked = {f.name for f in dataclasses.fields(fn.Dense(3).init.owner) if f.metadata.get("funcnet.init_only")}
    assert marked == {"w_init", "b_init", "dtype"}
    assert fn.Dense(3, dtype=jnp.float16).apply == fn.Dense(3).apply  # Dense's apply reads its params' dtype


def test_init_with_a_concrete_key_inside_a_users_trace_runs_as_written():
    """A concrete key closed over by a user's jit or vmap: init traces into the user's program
    (JAX refuses compiler options on a nested program) and draws the same params."""
    net = fn.serial(fn.Dense(5, fn.tanh), fn.Dense(3, fn.linear))
    key = jax.random.PRNGKey(3)
    _, params = net.init(key, (-1, 4))
    first_w = lambda _: net.init(key, (-1, 4))[1][1].W
    np.testing.assert_allclose(jax.jit(first_w)(0.0), params[1].W, rtol=1e-12)
    np.testing.assert_allclose(jax.vmap(first_w)(jnp.zeros(2))[1], params[1].W, rtol=1e-12)


@pytest.mark.parametrize("partitionable", [True, False])
def test_a_combinators_host_split_is_jax_random_split_bit_for_bit(partitionable):
    """A concrete raw key's children come from NumPy's threefry (``funcnet/_host_split.py``):
    the very words of ``jax.random.split``, under either threefry setting, placed like the key."""
    from funcnet import layers

    with jax.threefry_partitionable(partitionable):
        key = jax.random.PRNGKey(2**31 - 1)
        for count in (1, 2, 3, 8):
            key = jax.random.split(key)[1]
            children = layers.child_keys(key, count)
            np.testing.assert_array_equal(np.stack(children), jax.random.split(key, count))
            assert all(not child.committed for child in children)
        committed = jax.device_put(key, jax.devices()[0])
        assert all(child.committed for child in layers.child_keys(committed, 2))


def test_init_compiles_once_per_layer_and_matches_op_by_op_init():
    """A layer's init is one compiled program per (layer, input shape), reused by an equal layer
    in any network (a combinator runs its children's), whose params are those of the same init
    run op by op (bit for bit at the default XLA flags; the tests' op-by-op programs compile at
    another LLVM level, so here up to the last bit)."""
    from funcnet import layers

    build = lambda: fn.serial(fn.Dense(5, fn.tanh), fn.Dense(3, fn.linear, w_init=fn.normal(0.5)))
    key = jax.random.PRNGKey(7)
    shape, params = build().init(key, (-1, 4))
    before = layers._init_program.cache_info()
    again_shape, again = build().init(jax.random.PRNGKey(8), (-1, 4))
    after = layers._init_program.cache_info()
    assert (after.hits, after.misses) == (before.hits + 2, before.misses)
    fn.serial(fn.Dense(5, fn.tanh), fn.Dense(7, fn.linear)).init(key, (-1, 4))  # the first layer is known
    other = layers._init_program.cache_info()
    assert (other.hits, other.misses) == (after.hits + 1, after.misses + 1)
    assert again_shape == shape == (-1, 3)
    with jax.disable_jit():
        eager_shape, eager = build().init(key, (-1, 4))
    assert eager_shape == shape
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(eager), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=0)
    assert not np.array_equal(np.asarray(params[1].W), np.asarray(again[1].W))  # the key is an input


# --- Dense over the last axis, Dense(use_bias=False), Activation ------------------------------


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("input_shape", [(-1, 3), (2, 5, 3), (-1, 4, 2, 3), (1, 1, 3)])
def test_dense_over_the_last_axis_of_any_rank(input_shape, use_bias):
    layer = fn.Dense(4, fn.tanh, use_bias=use_bias)
    _check_shape_agreement(layer, input_shape)
    output_shape, params = layer.init(KEY, input_shape)
    assert output_shape == (*input_shape[:-1], 4)
    x = jnp.asarray(np.random.default_rng(0).standard_normal(tuple(4 if d == -1 else d for d in input_shape)))
    product = x @ params.W
    expected = jnp.tanh(product + params.B.reshape((1,) * (x.ndim - 2) + (1, 4)) if use_bias else product)
    np.testing.assert_allclose(layer.apply(params, x), expected, rtol=1e-12)
    # the same params on the rows, one by one: every leading index is a row
    rows = layer.apply(params, x.reshape(-1, 3))
    np.testing.assert_allclose(layer.apply(params, x).reshape(-1, 4), rows, rtol=1e-12)


def test_dense_on_a_sequence_equals_time_distributed_dense_values_and_gradients():
    dense = fn.Dense(5, fn.tanh, w_init=fn.glorot_normal)
    distributed = fn.TimeDistributed(dense)
    shape, params = dense.init(KEY, (-1, 6, 3))
    assert shape == distributed.init(KEY, (-1, 6, 3))[0] == (-1, 6, 5)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, distributed.init(KEY, (-1, 6, 3))[1])
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 6, 3)))
    np.testing.assert_allclose(dense.apply(params, x), distributed.apply(params, x), rtol=1e-12)
    loss = lambda layer: lambda p, x: jnp.sum(jnp.sin(layer.apply(p, x)))
    ours, theirs = (jax.grad(loss(layer), argnums=(0, 1))(params, x) for layer in (dense, distributed))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), ours, theirs)
    plain = lambda p, x: jnp.sum(jnp.sin(jnp.tanh(x @ p.W + p.B[None])))
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), ours, jax.grad(plain, argnums=(0, 1))(params, x)
    )
    with pytest.raises(ValueError, match=r"Dense\(5, tanh\): x has 4 features but W expects 3 \(x.shape=\(2, 6, 4\)"):
        dense.apply(params, jnp.ones((2, 6, 4)))


def test_dense_without_bias_has_weights_only_and_works_with_param_count_optimizers_and_checkpoints(tmp_path):
    layer = fn.Dense(3, fn.linear, use_bias=False)
    _, params = layer.init(KEY, (-1, 4))
    assert isinstance(params, WeightParams) and params._fields == ("W",) and params.W.shape == (4, 3)
    assert fn.param_count(params) == 12
    _, with_bias = fn.Dense(3, fn.linear).init(KEY, (-1, 4))
    assert isinstance(with_bias, fn.DenseParams)  # use_bias=True keeps the book's params
    np.testing.assert_array_equal(params.W, with_bias.W)  # the same key draws the same W
    x = jnp.asarray(np.random.default_rng(2).standard_normal((5, 4)))
    np.testing.assert_allclose(layer.apply(params, x), x @ params.W, rtol=1e-12)
    net = fn.serial(layer, fn.Dense(2, fn.linear, use_bias=False))
    _, net_params = net.init(KEY, (-1, 4))
    assert "Total params: 18" in fn.summary(net, (-1, 4)) and "Dense(3, linear, use_bias=False)" in fn.summary(
        net, (-1, 4)
    )
    y = jnp.ones((5, 2))
    optimizer = fn.adam(0.01)
    step = fn.train_step(net, fn.mean_squared_error, optimizer)
    state = optimizer.init(net_params)
    new, state, _ = step(net_params, state, x, y, KEY)
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(net_params)
    assert not np.allclose(new[0].W, net_params[0].W)
    fn.save(tmp_path / "p.safetensors", new)
    loaded = fn.load(tmp_path / "p.safetensors", net_params)
    assert isinstance(loaded[1], WeightParams)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, new)
    assert fn.Dense(3, use_bias=False) == fn.Dense(3, use_bias=False) != fn.Dense(3)
    assert fn.Dense(3, use_bias=False).apply != fn.Dense(3).apply  # apply reads use_bias
    with pytest.raises(TypeError, match=r"params must be WeightParams\(W\) \(use_bias=False\), got DenseParams"):
        layer.apply(with_bias, x)
    with pytest.raises(TypeError, match=r"Dense\(3, linear\): params must be DenseParams\(W, B\), got WeightParams"):
        fn.Dense(3, fn.linear).apply(params, x)


def test_activation_is_a_value_without_params():
    from funcnet import ops

    for f, plain in [(fn.relu, jax.nn.relu), (fn.sigmoid, jax.nn.sigmoid), (fn.tanh, jnp.tanh), (ops.gelu, None)]:
        layer = Activation(f)
        shape, params = layer.init(KEY, (-1, 3, 2))
        assert shape == (-1, 3, 2) and params == ()
        x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 3, 2)))
        np.testing.assert_array_equal(layer.apply((), x), f(x))
        if plain is not None:
            np.testing.assert_allclose(layer.apply((), x), plain(x), rtol=1e-12)
    assert Activation(fn.relu) == Activation(fn.relu) != Activation(fn.tanh)
    assert hash(Activation(fn.relu)) == hash(Activation(fn.relu))
    assert Activation(fn.relu).apply == Activation(fn.relu).apply
    assert repr(Activation(fn.relu).init.owner) == "Activation(relu)"
    conv = fn.serial(fn.Conv2D(4, 3), fn.BatchNorm(), Activation(fn.relu), fn.Flatten(), fn.Dense(2, fn.linear))
    _check_shape_agreement(conv, (-1, 6, 6, 2))
    text = fn.summary(conv, (-1, 6, 6, 2))
    assert "Activation(relu)" in text
    with pytest.raises(TypeError, match=r"Activation\(relu\): params must be \(\), got tuple"):
        Activation(fn.relu).apply((jnp.ones(2),), jnp.ones((2, 2)))


# --- summary counts every parameter, a combinator's own included -------------------------------


def _scaled_block():
    """A combinator with children that also owns a parameter: ``scale * serial(layers)(x)``."""
    import dataclasses

    from funcnet.layers import LayerSpec, check_layers, child_keys, init_child, layer_spec

    @layer_spec
    class _ScaledBlock(LayerSpec):
        layers: tuple

        @property
        def name(self):
            return "ScaledBlock"

        @property
        def children(self):
            return self.layers

        def init(self, key, input_shape):
            keys = child_keys(key, len(self.layers) + 1)
            inner = []
            for i, (layer, k) in enumerate(zip(self.layers, keys[1:], strict=True)):
                input_shape, p = init_child("ScaledBlock", i, layer, k, input_shape)
                inner.append(p)
            return input_shape, (jnp.ones(input_shape[-1:]), tuple(inner))

        def apply(self, params, x, *, key=None):
            scale, inner = params
            for layer, p in zip(self.layers, inner, strict=True):
                x = layer.apply(p, x)
            return x * scale[None]

    assert dataclasses.is_dataclass(_ScaledBlock)
    return lambda *layers: _ScaledBlock(check_layers("ScaledBlock", layers)).layer()


def test_summary_counts_the_parameters_a_combinator_owns_besides_its_layers():
    block = _scaled_block()
    net = fn.serial(fn.Dense(6), block(fn.Dense(4, fn.tanh), block(fn.Dense(3), fn.BatchNorm())), fn.Dense(2))
    _, params = net.init(KEY, (-1, 5))
    _check_shape_agreement(net, (-1, 5))
    text = fn.summary(net, (-1, 5))
    count = fn.param_count(params)
    assert count == 36 + 3 + (28 + 3 + (15 + 6)) + 8  # each block owns a scale of 3
    assert f"Total params: {count:,}" in text, text
    assert f"State (not trained): {fn.param_count(params, state=True):,}" in text
    lines = text.splitlines()
    own = [line for line in lines if "(own)" in line]
    assert len(own) == 2, text
    assert own[0].split()[:2] == ["1", "ScaledBlock"] and own[0].split()[-2:] == ["3", "0"]
    assert own[1].split()[:2] == ["1.1", "ScaledBlock"] and own[1].split()[-2:] == ["3", "0"]
    # the own row leads its block's rows
    assert lines.index(own[0]) + 1 == next(i for i, line in enumerate(lines) if line.startswith("1.0 "))
    # a combinator owning nothing beyond its layers gets no such row
    assert "(own)" not in fn.summary(fn.serial(fn.Dense(3), fn.serial(fn.Dense(2))), (-1, 4))
    # at the top too
    top = block(fn.Dense(3), fn.Dense(2))
    _, top_params = top.init(KEY, (-1, 4))
    assert f"Total params: {fn.param_count(top_params):,}" in fn.summary(top, (-1, 4))
    assert "ScaledBlock (own)" in fn.summary(top, (-1, 4))
