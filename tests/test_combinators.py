"""Branching networks: residual, FanOut, parallel, FanInSum, FanInConcat, with stax's semantics."""

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
    y = layer.apply(params, x, key=key)
    abstract = jax.eval_shape(lambda p, x: layer.apply(p, x, key=key), params, x)
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
    left, right = net.apply(net.init(KEY, (-1, 50))[1], jnp.ones((4, 50)), key=KEY)
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
