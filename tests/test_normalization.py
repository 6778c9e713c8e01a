"""layer_norm against a plain jnp reference (forward, jax.vjp, finite differences); LayerNorm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcnet as fn
from funcnet import normalization

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
        jax.jacrev(jax.grad(scalar(fn.layer_norm)))(x), jax.hessian(scalar(reference))(x), rtol=1e-8, atol=1e-10
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
