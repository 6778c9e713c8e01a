"""embedding against W[ids] under autodiff and finite differences; repeated ids; Embedding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcnet as fn
from funcnet import embeddings as embedding_module

KEY = jax.random.PRNGKey(0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(6,), (3, 4), (2, 3, 2)])
def test_embedding_matches_indexing_and_finite_differences(shape, dtype):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 5, shape).astype(np.int32)
    W = rng.standard_normal((5, 3)).astype(dtype)
    np.testing.assert_array_equal(fn.embedding(ids, W), W[ids])
    fn.check_vjp(fn.embedding, lambda i, W: W[i], ids, W)


def test_repeated_ids_accumulate_and_ids_get_no_gradient():
    ids = jnp.array([[1, 1], [1, 3]], jnp.int32)
    W = jnp.zeros((4, 2))
    out, vjp = jax.vjp(fn.embedding, ids, W)
    ids_grad, W_grad = vjp(jnp.ones_like(out))
    np.testing.assert_array_equal(W_grad, [[0, 0], [3, 3], [0, 0], [1, 1]])
    assert ids_grad.dtype == jax.dtypes.float0


def test_check_vjp_catches_a_backward_that_overwrites_instead_of_adding():
    def overwrite(residuals, output_grad):
        ids, W = residuals
        grad = jnp.zeros(W.shape, output_grad.dtype).at[ids.reshape(-1)].set(output_grad.reshape(-1, W.shape[1]))
        return np.zeros(ids.shape, jax.dtypes.float0), grad

    wrong = jax.custom_vjp(embedding_module._embedding)
    wrong.defvjp(embedding_module._embedding_fwd, overwrite)
    ids = np.array([0, 2, 2, 1, 2], np.int32)
    with pytest.raises(AssertionError, match="argument 1 disagree"):
        fn.check_vjp(wrong, lambda i, W: W[i], ids, np.random.default_rng(1).standard_normal((3, 4)))


def test_out_of_range_ids_are_an_error_when_concrete_and_clamped_under_jit():
    W = jnp.arange(8.0).reshape(4, 2)
    with pytest.raises(
        ValueError,
        match=r"embedding: ids must lie in \[0, 4\) for a vocabulary of 4, got values "
        r"from -1 to 2",
    ):
        fn.embedding(jnp.array([0, 2, -1]), W)
    concrete = jnp.array([0, 3])  # closed over inside jit: still concrete, so still checked
    np.testing.assert_array_equal(jax.jit(lambda W: fn.embedding(concrete, W))(W), W[concrete])
    shifted = concrete + 1
    with pytest.raises(ValueError, match="ids must lie in"):
        jax.jit(lambda W: fn.embedding(shifted, W))(W)
    out, grad = jax.jit(jax.value_and_grad(lambda W, i: fn.embedding(i, W).sum()))(W, jnp.array([6, 0]))
    np.testing.assert_array_equal(out, W[3].sum() + W[0].sum())  # id 6 reads the last row ...
    np.testing.assert_array_equal(grad, [[1, 1], [0, 0], [0, 0], [1, 1]])  # ... and trains it


def test_embedding_layer_trains_on_integer_ids_with_fit():
    layer = fn.Embedding(10, 4)
    output_shape, params = layer.init(KEY, (-1, 5))
    ids = jnp.ones((3, 5), jnp.int32)
    assert output_shape == (-1, 5, 4) and layer.apply(params, ids).shape == (3, 5, 4)
    assert jax.eval_shape(layer.apply, params, ids).shape == (3, 5, 4)
    assert fn.Embedding(10, 4) == layer
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 10, (40, 5)).astype(np.int32)
    net = fn.serial(fn.Embedding(10, 4), fn.Flatten(), fn.Dense(2, fn.linear))
    _, params = net.init(KEY, (-1, 5))
    result = fn.fit(
        net,
        fn.softmax_cross_entropy,
        fn.sgd(0.5),
        params,
        (tokens, (tokens[:, 0] > 4).astype(np.int32)),
        epochs=20,
        batch_size=8,
        key=KEY,
    )
    assert float(result.history.train_loss[-1]) < 0.5 * float(result.history.train_loss[0])


BAD = [
    (lambda: fn.embedding(jnp.ones(3), jnp.ones((4, 2))), TypeError, "embedding: ids must have an integer dtype"),
    (lambda: fn.embedding(jnp.ones(3, jnp.int32), jnp.ones(4)), ValueError, r"embedding: W must be 2-D"),
    (lambda: fn.embedding([0, 1], jnp.ones((4, 2))), TypeError, "embedding: ids must be an array"),
    (lambda: fn.Embedding(0, 4), ValueError, r"Embedding\(0, 4\): vocab_size must be >= 1, got 0"),
    (lambda: fn.Embedding(3, 0), ValueError, r"Embedding\(3, 0\): features must be >= 1, got 0"),
]


@pytest.mark.parametrize("call,error,message", BAD)
def test_bad_input_gets_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()
