"""conv2d and max_pool2d against lax under autodiff and finite differences; conv layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import funcnet as fn
from funcnet import conv

KEY = jax.random.PRNGKey(0)
GRID = [  # (height, width, kernel, stride, padding, in_channels, out_channels)
    (8, 8, 3, 1, "SAME", 1, 4),
    (8, 7, 3, 2, "SAME", 3, 2),
    (9, 9, 4, 2, "VALID", 2, 3),
    (7, 8, 2, 3, "VALID", 1, 1),
    (5, 5, 5, 1, "SAME", 2, 5),
    (6, 6, 1, 1, "VALID", 4, 2),
    (10, 6, (3, 2), (2, 1), "SAME", 3, 3),
]


def _conv_reference(stride, padding):
    stride = stride if isinstance(stride, tuple) else (stride, stride)
    return lambda x, W: lax.conv_general_dilated(x, W, stride, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


# CI checks each configuration in one precision, alternating; `pytest -m slow` adds the other.
@pytest.mark.parametrize(
    "h,w,k,s,padding,cin,cout,dtype",
    [
        pytest.param(*config, dtype, marks=() if (index + (dtype == np.float64)) % 2 else pytest.mark.slow)
        for index, config in enumerate(GRID)
        for dtype in (np.float32, np.float64)
    ],
)
def test_conv2d_matches_lax_and_finite_differences(h, w, k, s, padding, cin, cout, dtype):
    rng = np.random.default_rng(0)
    kh, kw = k if isinstance(k, tuple) else (k, k)
    x, W = rng.standard_normal((2, h, w, cin)).astype(dtype), rng.standard_normal((kh, kw, cin, cout)).astype(dtype)
    fn.check_vjp(lambda x, W: fn.conv2d(x, W, stride=s, padding=padding), _conv_reference(s, padding), x, W)


@pytest.mark.parametrize("window,stride", [(2, 2), (2, 1), (3, 2), ((2, 3), (1, 2))])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_max_pool2d_matches_lax_and_finite_differences(window, stride, dtype):
    x = np.random.default_rng(1).standard_normal((2, 7, 8, 3)).astype(dtype)
    wh, ww = window if isinstance(window, tuple) else (window, window)
    sh, sw = stride if isinstance(stride, tuple) else (stride, stride)
    reference = lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (1, wh, ww, 1), (1, sh, sw, 1), "VALID")
    fn.check_vjp(lambda x: fn.max_pool2d(x, window, stride), reference, x)


def _avg_reference(window, stride):
    wh, ww = window if isinstance(window, tuple) else (window, window)
    sh, sw = stride if isinstance(stride, tuple) else (stride, stride)
    return lambda x: lax.reduce_window(x, 0.0, lax.add, (1, wh, ww, 1), (1, sh, sw, 1), "VALID") / (wh * ww)


# (3, 2) on 7x8 leaves a row and a column no window covers: their gradient is zero
@pytest.mark.parametrize("window,stride", [(2, 2), (2, 1), (3, 2), ((2, 3), (1, 2))])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_avg_pool2d_matches_lax_and_finite_differences(window, stride, dtype):
    x = np.random.default_rng(1).standard_normal((2, 7, 8, 3)).astype(dtype)
    fn.check_vjp(lambda x: fn.avg_pool2d(x, window, stride), _avg_reference(window, stride), x)


def test_check_vjp_catches_an_avg_pool_backward_that_does_not_share():
    def whole(window, stride, residuals, g):  # each pixel gets the window's whole gradient
        return tuple(k * window[0] * window[1] for k in conv._avg_pool_bwd(window, stride, residuals, g))

    wrong = jax.custom_vjp(conv._avg_pool, nondiff_argnums=(1, 2))
    wrong.defvjp(conv._avg_pool_fwd, whole)
    x = np.random.default_rng(2).standard_normal((1, 6, 6, 2))
    with pytest.raises(AssertionError, match="argument 0 disagree"):
        fn.check_vjp(lambda x: wrong(x, (2, 2), (2, 2)), _avg_reference(2, 2), x)


def test_max_pool_ties_go_to_the_first_maximum():
    x = jnp.ones((1, 2, 2, 1))
    g = jax.grad(lambda x: fn.max_pool2d(x, 2).sum())(x)
    np.testing.assert_array_equal(g[0, :, :, 0], [[1.0, 0.0], [0.0, 0.0]])


def test_check_vjp_catches_a_conv_backward_without_the_flip():
    x, W = (
        np.random.default_rng(2).standard_normal((1, 6, 6, 2)),
        np.random.default_rng(3).standard_normal((3, 3, 2, 2)),
    )

    def bwd(stride, padding, residuals, g):
        _, W = residuals
        right = conv._conv2d_bwd(stride, padding, residuals, g)
        unflipped = lax.conv_general_dilated(
            g, W.transpose(0, 1, 3, 2), (1, 1), [(1, 1), (1, 1)], dimension_numbers=conv._DIMENSIONS
        )
        return unflipped, right[1]

    wrong = jax.custom_vjp(conv._conv2d, nondiff_argnums=(2, 3))
    wrong.defvjp(conv._conv2d_fwd, bwd)
    with pytest.raises(AssertionError, match="argument 0 disagree"):
        fn.check_vjp(lambda x, W: wrong(x, W, (1, 1), "SAME"), _conv_reference(1, "SAME"), x, W)


def test_conv_second_order_and_vmap():
    x, W = (
        np.random.default_rng(4).standard_normal((2, 5, 5, 2)),
        np.random.default_rng(5).standard_normal((3, 3, 2, 2)),
    )
    f = lambda W: jnp.sum(jnp.sin(fn.conv2d(x, W, stride=2)))
    f_ref = lambda W: jnp.sum(jnp.sin(_conv_reference(2, "SAME")(x, W)))
    np.testing.assert_allclose(
        jax.jit(jax.jacrev(jax.grad(f)))(W), jax.jit(jax.hessian(f_ref))(W), rtol=1e-9, atol=1e-12
    )
    batched = jax.jit(jax.vmap(jax.grad(f)))(jnp.stack([W, 2 * W]))
    np.testing.assert_allclose(batched[1], jax.grad(f_ref)(2 * W), rtol=1e-10)


CNNS = {
    "conv-same": lambda: fn.Conv2D(4, 3, fn.tanh),
    "conv-valid-stride": lambda: fn.Conv2D(3, (3, 2), fn.relu, stride=2, padding="VALID"),
    "pool": lambda: fn.MaxPool2D(2),
    "flatten": lambda: fn.Flatten(),
    "avg-pool": lambda: fn.AvgPool2D(3, 2),
    "book-cnn": lambda: fn.serial(
        fn.Conv2D(16, 5, fn.tanh, w_init=fn.glorot_normal),
        fn.Dropout(0.2),
        fn.MaxPool2D(2),
        fn.Flatten(),
        fn.Dense(10, fn.linear),
    ),
}


@pytest.mark.parametrize("name", CNNS)
@pytest.mark.parametrize("input_shape", [(-1, 8, 8, 1), (3, 9, 7, 2)])
def test_conv_layers_shape_agreement(name, input_shape):
    layer = CNNS[name]()
    output_shape, params = layer.init(KEY, input_shape)
    x = jnp.ones(tuple(4 if d == -1 else d for d in input_shape))
    for key in (None, KEY):
        run = lambda p, x, key=key: layer.apply(p, x) if key is None else fn.train_apply(layer)(p, x, key=key)[0]
        y = run(params, x)
        abstract = jax.eval_shape(run, params, x)
        assert y.shape == abstract.shape == tuple(4 if d == -1 else d for d in output_shape)
    assert "Total params" in fn.summary(layer, input_shape)


def test_conv_layer_gradient_matches_plain_lax():
    layer = fn.serial(fn.Conv2D(3, 3, fn.tanh), fn.MaxPool2D(2), fn.Flatten(), fn.Dense(2, fn.linear))
    _, params = layer.init(KEY, (-1, 6, 6, 2))
    x = np.random.default_rng(6).standard_normal((4, 6, 6, 2))

    def plain(params, x):
        (W, B), _, _, dense = params
        h = jnp.tanh(_conv_reference(1, "SAME")(x, W) + B.reshape(1, 1, 1, -1))
        h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID").reshape(4, -1)
        return jnp.sum((h @ dense.W + dense.B) ** 2)

    ours = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2)))(params)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13), ours, jax.jit(jax.grad(plain))(params, x)
    )


BAD = [
    (lambda: fn.conv2d(jnp.ones((8, 8, 1)), jnp.ones((3, 3, 1, 2))), ValueError, "x must be 4-D NHWC"),
    (
        lambda: fn.conv2d(jnp.ones((1, 8, 8, 2)), jnp.ones((3, 3, 1, 2))),
        ValueError,
        r"conv2d: x has 2 channels but W expects 1",
    ),
    (
        lambda: fn.conv2d(jnp.ones((1, 4, 4, 1)), jnp.ones((5, 5, 1, 2)), padding="VALID"),
        ValueError,
        "a 5x5 kernel does not fit a 4x4 image",
    ),
    (
        lambda: fn.conv2d(jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 2)), padding="same"),
        ValueError,
        'padding must be "SAME" or "VALID"',
    ),
    (lambda: fn.conv2d(jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 2)), stride=0), ValueError, "stride must be >= 1"),
    (lambda: fn.max_pool2d(jnp.ones((1, 2, 2, 1)), 3), ValueError, "a 3x3 window does not fit a 2x2 image"),
    (lambda: fn.avg_pool2d(jnp.ones((1, 2, 2, 1)), 3), ValueError, "avg_pool2d: a 3x3 window does not fit a 2x2 image"),
    (lambda: fn.avg_pool2d(jnp.ones((2, 2, 1)), 2), ValueError, "avg_pool2d: x must be 4-D NHWC"),
    (lambda: fn.AvgPool2D(0), ValueError, "AvgPool2D: window must be >= 1"),
    (lambda: fn.Conv2D(4, 3).init(KEY, (-1, 8, 8)), ValueError, "input_shape must be 4-D NHWC"),
    (
        lambda: fn.Conv2D(4, 9, padding="VALID").init(KEY, (-1, 8, 8, 1)),
        ValueError,
        r"kernel_size \(9, 9\) does not fit",
    ),
    (lambda: fn.Conv2D(4, 9).init(KEY, (-1, 8, 8, 1)), ValueError, "does not fit a 8x8 image"),
    (lambda: fn.Conv2D(0, 3), ValueError, "out_channels must be >= 1"),
]


@pytest.mark.parametrize("call,error,message", BAD)
def test_bad_input_gets_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()
