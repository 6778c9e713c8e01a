"""layer_norm against a plain jnp reference (forward, jax.vjp, finite differences); LayerNorm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcnet as fn
from funcnet import normalization
from funcnet.normalization import LayerNormScaleParams, RMSNorm, RMSNormParams, rms_norm

KEY = jax.random.PRNGKey(0)


def reference(x, gamma, beta, eps=1e-5):
    shape = (1,) * (x.ndim - 1) + gamma.shape
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean((x - mean) ** 2, axis=-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * gamma.reshape(shape) + beta.reshape(shape)


def _args(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return (3 * rng.standard_normal(shape) + 1).astype(dtype), *(
        rng.standard_normal(shape[-1:]).astype(dtype) for _ in range(2)
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(5, 6), (2, 3, 4), (7,)])
def test_layer_norm_matches_the_reference_and_finite_differences(shape, dtype):
    args = _args(shape, dtype)
    np.testing.assert_allclose(fn.layer_norm(*args), reference(*args), rtol=1e-5, atol=1e-6)
    fn.check_vjp(lambda x, g, b: fn.layer_norm(x, g, b), reference, *args)


def test_check_vjp_catches_a_backward_that_forgets_the_means_gradient():
    def forgetful(eps, residuals, output_grad):
        x_hat, inverse, gamma = residuals
        d_hat = output_grad * normalization._features(x_hat, gamma)
        dx = (d_hat - x_hat * jnp.mean(d_hat * x_hat, axis=-1, keepdims=True)) * inverse  # no - mean(d_hat)
        right = normalization._layer_norm_bwd(eps, residuals, output_grad)
        return (dx, *right[1:])

    wrong = jax.custom_vjp(normalization._layer_norm, nondiff_argnums=(3,))
    wrong.defvjp(normalization._layer_norm_fwd, forgetful)
    with pytest.raises(AssertionError, match="argument 0 disagree"):
        fn.check_vjp(lambda x, g, b: wrong(x, g, b, 1e-5), reference, *_args((4, 5), np.float64))


def test_layer_norm_layer_shapes_values_and_second_order():
    layer = fn.LayerNorm()
    for shape in [(-1, 6), (2, 5, 5, 3)]:
        output_shape, params = layer.init(KEY, shape)
        x = jnp.ones(tuple(4 if d == -1 else d for d in shape))
        assert layer.apply(params, x).shape == jax.eval_shape(layer.apply, params, x).shape == x.shape
        assert output_shape == shape
    np.testing.assert_array_equal(params.gamma, np.ones(3))
    np.testing.assert_array_equal(params.beta, np.zeros(3))
    assert fn.LayerNorm(1e-6) == fn.LayerNorm(1e-6) != fn.LayerNorm()
    x, g, b = _args((3, 4), np.float64)
    scalar = lambda f: lambda x: jnp.sum(jnp.sin(f(x, g, b)))
    np.testing.assert_allclose(
        jax.jit(jax.jacrev(jax.grad(scalar(fn.layer_norm))))(x),
        jax.jit(jax.hessian(scalar(reference)))(x),
        rtol=1e-8,
        atol=1e-10,
    )


BAD = [
    (
        lambda: fn.layer_norm(jnp.ones((2, 4)), jnp.ones(3), jnp.zeros(4)),
        ValueError,
        r"layer_norm: gamma must have shape \(features,\) = \(4,\) for x.shape=\(2, 4\), got \(3,\)",
    ),
    (
        lambda: fn.layer_norm(jnp.ones((2, 4)), jnp.ones(4), jnp.zeros(4), eps=0.0),
        ValueError,
        "layer_norm: eps must be > 0.0",
    ),
    (
        lambda: fn.layer_norm(jnp.ones((2, 4), jnp.int32), jnp.ones(4), jnp.zeros(4)),
        TypeError,
        "layer_norm: x must have a floating dtype",
    ),
    (
        lambda: fn.layer_norm(jnp.ones((2, 4), jnp.float32), jnp.ones(4), jnp.zeros(4)),
        TypeError,
        "layer_norm: x and gamma must share a dtype",
    ),
    (lambda: fn.LayerNorm().init(KEY, (5,)), ValueError, r"LayerNorm\(eps=1e-05\): input_shape must be at least 2-D"),
    (lambda: fn.LayerNorm(-1.0), ValueError, "LayerNorm: eps must be > 0.0"),
]


@pytest.mark.parametrize("call,error,message", BAD)
def test_bad_input_gets_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


# --- batch_norm / BatchNorm -------------------------------------------------------------------


def bn_reference(x, gamma, beta, mask, eps=1e-5):
    """Batch norm in plain jnp: statistics over every axis but the last, over the rows in mask."""
    lead = tuple(range(x.ndim - 1))
    w = mask.astype(x.dtype).reshape(mask.shape + (1,) * (x.ndim - 1))
    n = jnp.sum(w) * int(np.prod(x.shape[1:-1]))
    mean = jnp.sum(x * w, axis=lead) / n
    var = jnp.sum(w * (x - mean.reshape((1,) * (x.ndim - 1) + mean.shape)) ** 2, axis=lead) / n
    shape = (1,) * (x.ndim - 1) + gamma.shape
    y = (x - mean.reshape(shape)) / jnp.sqrt(var.reshape(shape) + eps) * gamma.reshape(shape) + beta.reshape(shape)
    return y, mean, var


def _bn_args(shape, dtype, masked, seed=0):
    x, gamma, beta = _args(shape, dtype, seed)
    mask = np.ones(shape[0], bool)
    if masked:
        mask[-1] = mask[1] = False
    return x, gamma, beta, mask


BN_SHAPES = [(6, 3), (5, 4, 3), (4, 3, 3, 2), (3, 2)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape", BN_SHAPES)
def test_batch_norm_matches_the_reference_and_finite_differences(shape, masked, dtype):
    if masked and shape[0] * np.prod(shape[1:-1]) < 6:
        pytest.skip("too few rows to mask two")
    args = _bn_args(shape, dtype, masked)
    ours = fn.batch_norm(*args[:3], mask=jnp.asarray(args[3]))
    for a, b in zip(ours, bn_reference(*args), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # every output's cotangent counts: y, and the statistics the layer averages
    fn.check_vjp(lambda x, g, b, m: fn.batch_norm(x, g, b, mask=m), bn_reference, *args)


def _without_the_variance_term(eps, residuals, cotangents):
    """The mistake: dx = gamma s / n (n g - sum(g)), forgetting x̂ sum(g x̂) (the variance's path)."""
    x_hat, inverse, gamma, weights, n, _ = residuals
    g = cotangents[0]
    f = lambda v: normalization._features(x_hat, v)
    sum_g = jnp.sum(g, axis=normalization._leading(x_hat))
    dx = f(gamma * inverse) * (g - weights * f(sum_g) / n)
    right = normalization._batch_norm_bwd(eps, residuals, (g, jnp.zeros_like(sum_g), jnp.zeros_like(sum_g)))
    return (dx, *right[1:])


def test_check_vjp_catches_a_backward_without_the_xhat_sum_term():
    wrong = jax.custom_vjp(normalization._batch_norm, nondiff_argnums=(4,))
    wrong.defvjp(normalization._batch_norm_fwd, _without_the_variance_term)
    args = _bn_args((6, 3), np.float64, masked=False)
    only_y = lambda f: lambda x, g, b, m: f(x, g, b, m)[0]
    right = lambda x, g, b, m: fn.batch_norm(x, g, b, mask=m)
    fn.check_vjp(only_y(right), only_y(bn_reference), *args)  # the right one passes the same check
    with pytest.raises(AssertionError, match="argument 0 disagree"):
        fn.check_vjp(only_y(lambda x, g, b, m: wrong(x, g, b, m, 1e-5)), only_y(bn_reference), *args)


def test_batch_norm_second_order_jit_and_vmap():
    x, g, b, m = _bn_args((5, 3), np.float64, masked=True)
    scalar = lambda f: lambda x: jnp.sum(jnp.sin(f(x, g, b, m)[0]))
    ours = lambda x, g, b, m: fn.batch_norm(x, g, b, mask=m)
    np.testing.assert_allclose(
        jax.jit(jax.jacrev(jax.grad(scalar(ours))))(x),
        jax.jit(jax.hessian(scalar(bn_reference)))(x),
        rtol=1e-8,
        atol=1e-10,
    )
    xs = np.stack([x, 2 * x + 1])
    batched = jax.jit(jax.vmap(lambda x: ours(x, g, b, m)))(xs)
    for i in range(2):
        for a, r in zip(batched, bn_reference(xs[i], g, b, m), strict=True):
            np.testing.assert_allclose(a[i], r, rtol=1e-10, atol=1e-12)


def test_bfloat16_statistics_accumulate_in_float32():
    x = (jnp.arange(64.0).reshape(32, 2) / 7 + 300).astype(jnp.bfloat16)
    y, mean, var = fn.batch_norm(x, jnp.ones(2, jnp.bfloat16), jnp.zeros(2, jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and mean.dtype == var.dtype == jnp.float32
    wide = np.asarray(x, np.float64)
    np.testing.assert_allclose(mean, wide.mean(0), rtol=1e-6)
    np.testing.assert_allclose(var, wide.var(0), rtol=1e-4)


def test_batch_norm_layer_shapes_init_and_equality():
    layer = fn.BatchNorm()
    for shape in [(-1, 6), (-1, 5, 6), (2, 5, 5, 6)]:
        output_shape, params = layer.init(KEY, shape)
        concrete = tuple(4 if d == -1 else d for d in shape)
        x = jnp.asarray(np.random.default_rng(1).standard_normal(concrete))
        assert output_shape == shape
        assert layer.apply(params, x).shape == jax.eval_shape(layer.apply, params, x).shape == x.shape
        y, new = fn.train_apply(layer)(params, x)
        assert y.shape == x.shape and jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(params)
    assert isinstance(params, fn.BatchNormParams) and isinstance(params.stats, fn.BatchNormStats)
    for value, expected in zip(params, (np.ones(6), np.zeros(6)), strict=False):
        np.testing.assert_array_equal(value, expected)
    np.testing.assert_array_equal(params.stats.mean, np.zeros(6))
    np.testing.assert_array_equal(params.stats.var, np.ones(6))
    assert fn.BatchNorm(0.8) == fn.BatchNorm(0.8) != fn.BatchNorm()
    assert hash(fn.BatchNorm(0.8, 1e-3)) == hash(fn.BatchNorm(0.8, 1e-3))
    assert fn.train_apply(fn.BatchNorm()) == fn.train_apply(fn.BatchNorm())


def test_training_updates_running_statistics_by_hand_and_apply_uses_them():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((7, 2, 3)) * 2 + 1  # a sequence: statistics over batch and time
    layer = fn.BatchNorm(momentum=0.8)
    _, params = layer.init(KEY, (-1, 2, 3))
    params = jax.tree_util.tree_map(lambda a: a.astype(np.float64), params)
    mask = np.array([True] * 5 + [False] * 2)
    y, new = fn.train_apply(layer)(params, x, row_mask=jnp.asarray(mask))
    rows = x[mask].reshape(-1, 3)
    np.testing.assert_allclose(new.stats.mean, 0.2 * rows.mean(0), rtol=1e-12)
    np.testing.assert_allclose(new.stats.var, 0.8 + 0.2 * rows.var(0, ddof=1), rtol=1e-12)
    np.testing.assert_allclose(y, (x - rows.mean(0)) / np.sqrt(rows.var(0) + 1e-5), rtol=1e-10)
    np.testing.assert_array_equal(new.gamma, params.gamma)
    inference = layer.apply(new, x)
    np.testing.assert_allclose(
        inference, (x - np.asarray(new.stats.mean)) / np.sqrt(np.asarray(new.stats.var) + 1e-5), rtol=1e-12
    )
    # the statistics get no gradient through training mode
    grads = jax.grad(lambda p: jnp.sum(fn.train_apply(layer)(p, x)[1].stats.var))(params)
    np.testing.assert_array_equal(grads.stats.var, 0.0)


BN_BAD = [
    (lambda: fn.BatchNorm(momentum=1.0), ValueError, r"BatchNorm: momentum must be >= 0.0 and < 1.0, got 1.0"),
    (lambda: fn.BatchNorm(momentum=-0.1), ValueError, "BatchNorm: momentum must be >= 0.0 and < 1.0"),
    (lambda: fn.BatchNorm(eps=0.0), ValueError, "BatchNorm: eps must be > 0.0, got 0.0"),
    (lambda: fn.BatchNorm(momentum="high"), TypeError, "BatchNorm: momentum must be a real number"),
    (
        lambda: fn.train_apply(fn.BatchNorm())(fn.BatchNorm().init(KEY, (-1, 3))[1], jnp.ones((1, 3))),
        ValueError,
        r"batch_norm: batch statistics need at least 2 values per channel, got 1 .*torch refuses it too",
    ),
    (
        lambda: fn.batch_norm(jnp.ones((4, 3)), jnp.ones(3), jnp.zeros(3), mask=jnp.array([1, 0, 0, 0])),
        TypeError,
        r"batch_norm: mask must be a bool array of shape \(batch,\) = \(4,\), got int\d+ \(4,\)",
    ),
    (
        lambda: fn.batch_norm(jnp.ones((4, 3)), jnp.ones(3), jnp.zeros(3), mask=jnp.arange(4) < 1),
        ValueError,
        "batch_norm: batch statistics need at least 2 values per channel, got 1",
    ),
    (
        lambda: fn.batch_norm(jnp.ones((4,)), jnp.ones(4), jnp.zeros(4)),
        ValueError,
        r"batch_norm: x must be at least 2-D \(batch, ..., channels\)",
    ),
    (
        lambda: fn.BatchNorm().apply(fn.BatchNorm().init(KEY, (-1, 3))[1], jnp.ones((2, 4))),
        ValueError,
        r"BatchNorm\(momentum=0.9, eps=1e-05\): x must be \(batch, ..., channels\) with the 3 channels",
    ),
    (
        lambda: fn.BatchNorm().apply(fn.LayerNorm().init(KEY, (-1, 3))[1], jnp.ones((2, 3))),
        TypeError,
        r"params must be BatchNormParams\(gamma, beta, stats\), got LayerNormParams",
    ),
    (lambda: fn.train_apply(fn.BatchNorm().init), TypeError, "train_apply: layer must be a Layer"),
]


@pytest.mark.parametrize("call,error,message", BN_BAD)
def test_batch_norm_bad_input_gets_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


# --- rms_norm / RMSNorm -----------------------------------------------------------------------


def rms_reference(x, gamma, eps=1e-6):
    shape = (1,) * (x.ndim - 1) + gamma.shape
    return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * gamma.reshape(shape)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(5, 6), (2, 3, 4), (7,), (1, 1)])
def test_rms_norm_matches_the_reference_and_finite_differences(shape, dtype):
    x, gamma, _ = _args(shape, dtype)
    np.testing.assert_allclose(rms_norm(x, gamma), rms_reference(x, gamma), rtol=1e-5, atol=1e-6)
    fn.check_vjp(rms_norm, rms_reference, x, gamma)
    fn.check_vjp(lambda x, g: rms_norm(x, g, eps=0.5), lambda x, g: rms_reference(x, g, 0.5), x, gamma)


def test_rms_norm_hand_gradient_is_the_docstrings_formula():
    x, gamma, _ = _args((4, 5), np.float64)
    g = np.random.default_rng(9).standard_normal((4, 5))
    _, vjp = jax.vjp(rms_norm, x, gamma)
    dx, dgamma = vjp(g)
    r = 1 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    x_hat = x * r
    d_hat = g * gamma
    np.testing.assert_allclose(dx, r * (d_hat - x_hat * np.mean(d_hat * x_hat, axis=-1, keepdims=True)), rtol=1e-12)
    np.testing.assert_allclose(dgamma, np.sum(g * x_hat, axis=0), rtol=1e-12)


@pytest.mark.parametrize("shape", [(4, 6), (2, 3, 5)])
@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_rms_norm_against_torch(shape, eps):
    """torch.nn.RMSNorm(features, eps=eps) in float64: the output, and the gradients of x and
    of the weight for a random output gradient."""
    torch = pytest.importorskip("torch")
    x, gamma, _ = _args(shape, np.float64, seed=2)
    g = np.random.default_rng(5).standard_normal(shape)
    module = torch.nn.RMSNorm(shape[-1], eps=eps, dtype=torch.float64)
    with torch.no_grad():
        module.weight.copy_(torch.tensor(gamma))
    t_x = torch.tensor(x, requires_grad=True)
    t_y = module(t_x)
    t_y.backward(torch.tensor(g))
    y, vjp = jax.vjp(lambda x, gamma: rms_norm(x, gamma, eps=eps), x, gamma)
    dx, dgamma = vjp(g)
    np.testing.assert_allclose(y, t_y.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dx, t_x.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dgamma, module.weight.grad.numpy(), rtol=1e-10, atol=1e-12)


def _rms_without_the_mean_term(eps, residuals, output_grad):
    """The mistake: dx = r g gamma, as if r did not depend on x (no - x̂ mean(dx̂ x̂))."""
    x_hat, inverse, gamma = residuals
    right = normalization._rms_norm_bwd(eps, residuals, output_grad)
    return inverse * output_grad * normalization._features(x_hat, gamma), right[1]


def _rms_perturbed_gamma(eps, residuals, output_grad):
    """The other argument wrong by 0.1%: dgamma scaled by 1.001."""
    dx, dgamma = normalization._rms_norm_bwd(eps, residuals, output_grad)
    return dx, dgamma * 1.001


@pytest.mark.parametrize(
    "mistake,argument", [(_rms_without_the_mean_term, 0), (_rms_perturbed_gamma, 1)], ids=["mean", "gamma"]
)
def test_check_vjp_catches_a_wrong_rms_norm_backward(mistake, argument):
    wrong = jax.custom_vjp(normalization._rms_norm, nondiff_argnums=(2,))
    wrong.defvjp(normalization._rms_norm_fwd, mistake)
    args = _args((4, 5), np.float64)[:2]
    fn.check_vjp(rms_norm, rms_reference, *args)  # the right one passes the same check
    with pytest.raises(AssertionError, match=f"argument {argument} disagree"):
        fn.check_vjp(lambda x, g: wrong(x, g, 1e-6), rms_reference, *args)


def test_rms_norm_under_jit_vmap_and_second_order():
    x, g, _ = _args((3, 4), np.float64)
    for argnum in (0, 1):
        scalar = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
        np.testing.assert_allclose(
            jax.jit(jax.jacrev(jax.grad(scalar(rms_norm), argnum), argnum))(x, g),
            jax.jit(jax.hessian(scalar(rms_reference), argnum))(x, g),
            rtol=1e-8,
            atol=1e-10,
        )
    xs = np.stack([x, 2 * x - 1])
    np.testing.assert_allclose(
        jax.jit(jax.vmap(jax.grad(lambda x: jnp.sum(jnp.sin(rms_norm(x, g))))))(xs),
        jax.vmap(jax.grad(lambda x: jnp.sum(jnp.sin(rms_reference(x, g)))))(xs),
        rtol=1e-10,
        atol=1e-12,
    )


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_rms_norm_mean_square_accumulates_in_float32(dtype):
    """float16's 300**2 * 4 overflows: the mean square would be inf and every output 0."""
    x = jnp.asarray([[300.0, -300.0, 100.0, -100.0]], dtype)
    y = rms_norm(x, jnp.ones((4,), dtype))
    assert y.dtype == dtype
    np.testing.assert_allclose(np.asarray(y, np.float32)[0], [300, -300, 100, -100] / np.sqrt(50_000), rtol=1e-2)
    grads = jax.grad(lambda x: jnp.sum(rms_norm(x, jnp.ones((4,), dtype)) * jnp.arange(4)[None].astype(dtype)))(x)
    assert grads.dtype == dtype and np.all(np.isfinite(np.asarray(grads, np.float32)))


def test_rms_norm_layer_shapes_values_and_equality():
    layer = RMSNorm()
    for shape in [(-1, 6), (2, 5, 5, 3), (1, 1)]:
        output_shape, params = layer.init(KEY, shape)
        x = jnp.asarray(np.random.default_rng(0).standard_normal(tuple(4 if d == -1 else d for d in shape)))
        y = layer.apply(params, x)
        assert y.shape == jax.eval_shape(layer.apply, params, x).shape == x.shape
        assert output_shape == shape
        np.testing.assert_allclose(y, rms_reference(x, params.gamma), rtol=1e-12)
    assert isinstance(params, RMSNormParams) and params.gamma.shape == (1,)
    np.testing.assert_array_equal(layer.init(KEY, (-1, 3))[1].gamma, np.ones(3))
    assert RMSNorm(1e-5) == RMSNorm(1e-5) != RMSNorm() and hash(RMSNorm(1e-5)) == hash(RMSNorm(1e-5))
    assert RMSNorm(dtype=jnp.float16).apply == RMSNorm().apply  # dtype is init-only
    assert "RMSNorm(eps=1e-06)" in fn.summary(fn.serial(fn.Dense(3), RMSNorm()), (-1, 2))


# --- LayerNorm(use_bias=False) ----------------------------------------------------------------


def test_layer_norm_without_bias_has_no_beta_and_is_layer_norm_with_zero_beta():
    layer = fn.LayerNorm(use_bias=False)
    shape, params = layer.init(KEY, (-1, 5, 4))
    assert shape == (-1, 5, 4) and isinstance(params, LayerNormScaleParams) and params._fields == ("gamma",)
    assert fn.param_count(params) == 4
    _, with_bias = fn.LayerNorm().init(KEY, (-1, 5, 4))
    assert isinstance(with_bias, fn.LayerNormParams) and with_bias._fields == ("gamma", "beta")  # unchanged
    x, gamma, _ = _args((3, 5, 4), np.float64)
    params = LayerNormScaleParams(jnp.asarray(gamma))
    y = layer.apply(params, x)
    assert y.shape == jax.eval_shape(layer.apply, params, x).shape == x.shape
    np.testing.assert_allclose(y, reference(x, gamma, np.zeros(4)), rtol=1e-12)
    grads = jax.grad(lambda p: jnp.sum(jnp.sin(layer.apply(p, x))))(params)
    expected = jax.grad(lambda g: jnp.sum(jnp.sin(reference(x, g, jnp.zeros(4)))))(params.gamma)
    assert isinstance(grads, LayerNormScaleParams)
    np.testing.assert_allclose(grads.gamma, expected, rtol=1e-10)
    assert layer == fn.LayerNorm(use_bias=False) != fn.LayerNorm()
    assert layer.apply != fn.LayerNorm().apply  # apply reads use_bias: different programs
    assert "LayerNorm(eps=1e-05, use_bias=False)" in fn.summary(fn.serial(layer), (-1, 4))


def test_layer_norm_without_bias_against_torch():
    """torch.nn.LayerNorm(features, bias=False) in float64: output and every gradient."""
    torch = pytest.importorskip("torch")
    x, gamma, _ = _args((3, 2, 6), np.float64, seed=4)
    g = np.random.default_rng(6).standard_normal(x.shape)
    module = torch.nn.LayerNorm(6, eps=1e-5, bias=False, dtype=torch.float64)
    assert module.bias is None
    with torch.no_grad():
        module.weight.copy_(torch.tensor(gamma))
    t_x = torch.tensor(x, requires_grad=True)
    t_y = module(t_x)
    t_y.backward(torch.tensor(g))
    layer = fn.LayerNorm(use_bias=False)
    y, vjp = jax.vjp(layer.apply, LayerNormScaleParams(jnp.asarray(gamma)), x)
    dparams, dx = vjp(g)
    np.testing.assert_allclose(y, t_y.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dx, t_x.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dparams.gamma, module.weight.grad.numpy(), rtol=1e-10, atol=1e-12)


RMS_BAD = [
    (
        lambda: rms_norm(jnp.ones((2, 4)), jnp.ones(3)),
        ValueError,
        r"rms_norm: gamma must have shape \(features,\) = \(4,\) for x.shape=\(2, 4\), got \(3,\)",
    ),
    (lambda: rms_norm(jnp.ones((2, 4)), jnp.ones(4), eps=0.0), ValueError, "rms_norm: eps must be > 0.0, got 0.0"),
    (lambda: rms_norm(jnp.ones((2, 4), jnp.int32), jnp.ones(4)), TypeError, "rms_norm: x must have a floating dtype"),
    (
        lambda: rms_norm(jnp.ones((2, 4), jnp.float32), jnp.ones(4)),
        TypeError,
        "rms_norm: x and gamma must share a dtype, got float32 and float64",
    ),
    (lambda: rms_norm(jnp.ones((2, 0)), jnp.ones(0)), ValueError, "rms_norm: x must have a non-empty last axis"),
    (lambda: rms_norm([[1.0, 2.0]], jnp.ones(2)), TypeError, "rms_norm: x must be an array"),
    (lambda: RMSNorm().init(KEY, (5,)), ValueError, r"RMSNorm\(eps=1e-06\): input_shape must be at least 2-D"),
    (lambda: RMSNorm(0.0), ValueError, "RMSNorm: eps must be > 0.0"),
    (
        lambda: RMSNorm().apply(fn.LayerNorm().init(KEY, (-1, 3))[1], jnp.ones((2, 3))),
        TypeError,
        r"RMSNorm\(eps=1e-06\): params must be RMSNormParams\(gamma\), got LayerNormParams",
    ),
    (
        lambda: fn.LayerNorm(use_bias=False).apply(fn.LayerNorm().init(KEY, (-1, 3))[1], jnp.ones((2, 3))),
        TypeError,
        r"LayerNorm\(eps=1e-05, use_bias=False\): params must be LayerNormScaleParams\(gamma\), got LayerNormParams",
    ),
    (
        lambda: fn.LayerNorm().apply(fn.LayerNorm(use_bias=False).init(KEY, (-1, 3))[1], jnp.ones((2, 3))),
        TypeError,
        r"LayerNorm\(eps=1e-05\): params must be LayerNormParams\(gamma, beta\), got LayerNormScaleParams",
    ),
    (lambda: fn.LayerNorm(use_bias=1), TypeError, "LayerNorm: use_bias must be a bool, got int 1"),
]


@pytest.mark.parametrize("call,error,message", RMS_BAD)
@pytest.mark.parametrize("jit", [False, True])
def test_rms_norm_bad_input_gets_a_clear_error(call, error, message, jit):
    with pytest.raises(error, match=message):
        jax.jit(call)() if jit else call()


# --- issue "Nothing silently wrong, round 4" ---------------------------------------------------


def test_low_precision_batch_norm_keeps_its_running_statistics_in_float32():
    """bfloat16 running statistics stalled: 0.1 * (batch - running) rounds away below bfloat16's
    resolution, leaving the running mean 1.6% low. They are kept in float32 and converge."""
    layer = fn.BatchNorm(momentum=0.9, dtype=jnp.bfloat16)
    _, params = layer.init(KEY, (-1, 2))
    assert params.gamma.dtype == jnp.bfloat16
    assert params.stats.mean.dtype == params.stats.var.dtype == jnp.float32
    x = jnp.asarray(np.random.default_rng(0).normal(10.0, 1.0, size=(64, 2)), jnp.bfloat16)

    def update(params, _):
        return fn.train_apply(layer)(params, x)[1], None

    params, _ = jax.lax.scan(update, params, None, length=300)
    rows = np.asarray(x, np.float64)
    np.testing.assert_allclose(params.stats.mean, rows.mean(0), rtol=1e-3)
    np.testing.assert_allclose(params.stats.var, rows.var(0, ddof=1), rtol=1e-3)


@pytest.mark.parametrize("shape", [(6, 3), (6, 2, 3)])
def test_nan_in_a_masked_row_stays_out_of_the_outputs_statistics_and_gradients(shape):
    """A masked row (fit's padded last batch) holding NaN was multiplied by 0, not excluded: every
    output, both statistics and every gradient were NaN. Now the real rows' results equal those
    of the batch without that row."""
    x, gamma, beta = _args(shape, np.float64)
    x[-1] = np.nan
    mask = np.ones(shape[0], bool)
    mask[-1] = False
    cotangent = np.random.default_rng(1).standard_normal(shape)
    cotangent[-1] = 0.0  # fit's loss leaves masked rows out: their cotangent is zero

    def loss(x, gamma, beta, mask):
        y, mean, var = fn.batch_norm(x, gamma, beta, mask=mask)
        return jnp.sum(y[: shape[0] - 1] * cotangent[:-1]) + jnp.sum(mean) + 2 * jnp.sum(var)

    masked = fn.batch_norm(jnp.asarray(x), gamma, beta, mask=jnp.asarray(mask))
    clean = fn.batch_norm(jnp.asarray(x[:-1]), gamma, beta)
    np.testing.assert_allclose(masked[0][:-1], clean[0], rtol=1e-12)
    for a, b in zip(masked[1:], clean[1:], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    grads = jax.grad(loss, argnums=(0, 1, 2))(jnp.asarray(x), gamma, beta, jnp.asarray(mask))
    without = jax.grad(loss, argnums=(0, 1, 2))(jnp.asarray(x[:-1]), gamma, beta, jnp.ones(shape[0] - 1, bool))
    np.testing.assert_allclose(grads[0][:-1], without[0], rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(grads[0][-1], 0.0)
    for a, b in zip(grads[1:], without[1:], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    # the layer: its output's real rows and its running statistics
    layer = fn.BatchNorm(momentum=0.8)
    params = jax.tree_util.tree_map(lambda a: a.astype(np.float64), layer.init(KEY, (-1, *shape[1:]))[1])
    y, new = fn.train_apply(layer)(params, jnp.asarray(x), row_mask=jnp.asarray(mask))
    y_clean, new_clean = fn.train_apply(layer)(params, jnp.asarray(x[:-1]))
    np.testing.assert_allclose(y[:-1], y_clean, rtol=1e-12)
    for a, b in zip(new.stats, new_clean.stats, strict=True):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=1e-12)
