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


# --- rotary_embedding --------------------------------------------------------------------------


def _rope_loop(x, positions, base=10000.0):
    """The definition, one pair at a time, in float64 NumPy: (x[i], x[i + half]) rotated by
    positions * base ** (-2i / head_dim)."""
    x = np.asarray(x, np.float64)
    positions = np.broadcast_to(np.asarray(positions, np.float64), x.shape[:2])
    out, half = np.empty_like(x), x.shape[-1] // 2
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            for i in range(half):
                angle = positions[b, t] * base ** (-2 * i / x.shape[-1])
                c, s = np.cos(angle), np.sin(angle)
                a, d = x[b, t, :, i], x[b, t, :, i + half]
                out[b, t, :, i], out[b, t, :, i + half] = a * c - d * s, a * s + d * c
    return out


def _rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _rope_reference(x, positions, base=10000.0):
    """Hugging Face's LLaMA form in plain jnp: x * cos + rotate_half(x) * sin, cos and sin
    repeated over the two halves."""
    head_dim = x.shape[-1]
    inverse_frequency = jnp.asarray(base ** (-np.arange(0, head_dim, 2) / head_dim), x.dtype)
    angles = positions.astype(x.dtype)[..., None] * inverse_frequency.reshape((1,) * positions.ndim + (-1,))
    angles = jnp.concatenate([angles, angles], axis=-1)
    angles = angles[None, :, None, :] if positions.ndim == 1 else angles[:, :, None, :]
    return x * jnp.cos(angles) + _rotate_half(x) * jnp.sin(angles)


def _qk(seed, shape, dtype):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


ROPE_SHAPES = [((2, 5, 3, 8), (5,)), ((2, 5, 3, 8), (2, 5)), ((1, 1, 1, 2), (1,)), ((3, 4, 2, 6), (3, 4))]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,positions_shape", ROPE_SHAPES)
def test_rotary_embedding_matches_the_definition_rotate_half_and_finite_differences(shape, positions_shape, dtype):
    x = _qk(0, shape, dtype)
    positions = np.random.default_rng(1).integers(0, 50, positions_shape).astype(np.int32)
    out = embedding_module.rotary_embedding(x, positions)
    assert out.shape == x.shape and out.dtype == x.dtype
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out, _rope_loop(x, positions), **tolerance)
    np.testing.assert_allclose(out, _rope_reference(x, positions), **tolerance)
    fn.check_vjp(embedding_module.rotary_embedding, _rope_reference, x, positions)
    base = lambda x, p: embedding_module.rotary_embedding(x, p, base=500.0)
    fn.check_vjp(base, lambda x, p: _rope_reference(x, p, 500.0), x, positions)


def test_rotary_embedding_positions_get_no_gradient():
    x = _qk(0, (2, 3, 1, 4), np.float64)
    ids = jnp.arange(3)
    _, vjp = jax.vjp(embedding_module.rotary_embedding, x, ids)
    assert vjp(jnp.ones(x.shape))[1].dtype == jax.dtypes.float0
    floats = jnp.arange(3.0) + 0.5
    g = jax.grad(lambda p: jnp.sum(embedding_module.rotary_embedding(x, p) ** 3))(floats)
    np.testing.assert_array_equal(g, np.zeros(3))  # documented: positions are not differentiated
    np.testing.assert_allclose(embedding_module.rotary_embedding(x, floats), _rope_loop(x, floats), rtol=1e-12)


def test_check_vjp_catches_a_rotary_backward_that_rotates_by_plus_the_angle():
    def forward_again(base, positions, output_grad):  # the forward's rotation, not its inverse
        cos, sin = embedding_module._rotary_angles(positions, output_grad.shape[-1], base, output_grad.dtype)
        return embedding_module._rotate(output_grad, cos, sin), np.zeros(positions.shape, jax.dtypes.float0)

    wrong = jax.custom_vjp(embedding_module._rotary_embedding, nondiff_argnums=(2,))
    wrong.defvjp(embedding_module._rotary_embedding_fwd, forward_again)
    x, positions = _qk(0, (2, 4, 2, 6), np.float64), np.arange(4, dtype=np.int32)
    with pytest.raises(AssertionError, match="argument 0 disagree"):
        fn.check_vjp(lambda x, p: wrong(x, p, 10000.0), _rope_reference, x, positions)


def test_rotary_scores_depend_only_on_the_relative_position():
    """<rope(q, m), rope(k, n)> is a function of m - n: shifting both positions changes nothing."""
    q, k = _qk(2, (1, 1, 1, 16), np.float64), _qk(3, (1, 1, 1, 16), np.float64)

    def score(m, n):
        rq = embedding_module.rotary_embedding(q, jnp.asarray([m]))
        rk = embedding_module.rotary_embedding(k, jnp.asarray([n]))
        return float(jnp.sum(rq * rk))

    for m, n in [(0, 0), (5, 2), (2, 5), (100, 37)]:
        for shift in (1, 17, 1000):
            assert score(m + shift, n + shift) == pytest.approx(score(m, n), rel=1e-9, abs=1e-9)
    assert score(5, 2) != pytest.approx(score(2, 5), rel=1e-3)  # but it does see the offset
    assert score(0, 0) == pytest.approx(float(jnp.sum(q * k)), rel=1e-12)  # position 0 is the identity


def test_rotary_interleaved_checkpoints_convert_by_permuting_each_heads_columns():
    """The docstring's recipe: the interleaved rope of x, permuted by [0, 2, ..., 1, 3, ...], is the
    split-halves rope of the permuted x, so permuting W_q's and W_k's columns per head converts."""
    x, head_dim = _qk(4, (2, 3, 2, 8), np.float64), 8
    positions = np.array([0, 3, 9])
    angles = positions[:, None] * 10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)
    cos, sin = np.cos(angles)[None, :, None, :], np.sin(angles)[None, :, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    interleaved = np.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1).reshape(x.shape)
    perm = np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])
    halves = embedding_module.rotary_embedding(x[..., perm], positions)
    np.testing.assert_allclose(halves, interleaved[..., perm], rtol=1e-12, atol=1e-12)


def test_rotary_embedding_under_jit_vmap_with_traced_offsets_and_second_order():
    x = _qk(5, (2, 3, 2, 4), np.float64)
    shifted = jax.jit(lambda x, offset: embedding_module.rotary_embedding(x, jnp.arange(3) + offset))
    np.testing.assert_allclose(shifted(x, 7), _rope_loop(x, np.arange(3) + 7), rtol=1e-12, atol=1e-12)
    stacked = jnp.stack([x, 2 * x])
    offsets = jnp.asarray([0, 4])
    batched = jax.vmap(lambda x, o: embedding_module.rotary_embedding(x, jnp.arange(3) + o))(stacked, offsets)
    for i in range(2):
        np.testing.assert_allclose(batched[i], _rope_loop(stacked[i], np.arange(3) + int(offsets[i])), rtol=1e-12)
    loss = lambda f: lambda x: jnp.sum(jnp.sin(f(x, jnp.arange(3))))
    grad = jax.jit(jax.grad(loss(embedding_module.rotary_embedding)))(x)
    np.testing.assert_allclose(grad, jax.grad(loss(_rope_reference))(x), rtol=1e-12, atol=1e-14)
    h = jax.jacrev(jax.grad(loss(embedding_module.rotary_embedding)))(x)
    np.testing.assert_allclose(h, jax.jacrev(jax.grad(loss(_rope_reference)))(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_rotary_embedding_in_low_precision_rotates_in_float32(dtype):
    x = jnp.asarray(_qk(6, (2, 4, 2, 8), np.float32), dtype)
    positions = jnp.asarray([0, 1000, 20000, 65000], jnp.int32)
    out = embedding_module.rotary_embedding(x, positions)
    assert out.dtype == dtype
    expected = _rope_reference(x.astype(jnp.float32), positions).astype(dtype)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expected, np.float32))


ROPE_BAD = [
    (lambda: embedding_module.rotary_embedding(jnp.ones((2, 3, 1, 5)), jnp.arange(3)), ValueError,
     r"rotary_embedding: x's head_dim \(its last axis\) must be even, since rope rotates pairs of features, got "
     r"head_dim 5"),
    (lambda: embedding_module.rotary_embedding(jnp.ones((2, 3, 8)), jnp.arange(3)), ValueError,
     r"rotary_embedding: x must be 4-D \(batch, T, heads, head_dim\), got shape \(2, 3, 8\)"),
    (lambda: embedding_module.rotary_embedding(jnp.ones((2, 3, 1, 4)), jnp.arange(4)), ValueError,
     r"rotary_embedding: positions must have shape \(T,\) = \(3,\) or \(batch, T\) = \(2, 3\) for "
     r"x.shape=\(2, 3, 1, 4\), got \(4,\)"),
    (lambda: embedding_module.rotary_embedding(jnp.ones((2, 3, 1, 4)), jnp.zeros((3, 2), jnp.int32)), ValueError,
     r"positions must have shape .* got \(3, 2\)"),
    (lambda: embedding_module.rotary_embedding(jnp.ones((2, 3, 1, 4), jnp.int32), jnp.arange(3)), TypeError,
     "rotary_embedding: x must have a floating dtype, got int32"),
    (lambda: embedding_module.rotary_embedding(jnp.ones((2, 3, 1, 4)), jnp.ones(3, bool)), TypeError,
     "rotary_embedding: positions must have an integer or floating dtype, got bool"),
    (lambda: embedding_module.rotary_embedding(jnp.ones((2, 3, 1, 4)), [0, 1, 2]), TypeError,
     "rotary_embedding: positions must be an array"),
    (lambda: embedding_module.rotary_embedding(jnp.ones((2, 3, 1, 4)), jnp.arange(3), base=0.0), ValueError,
     r"rotary_embedding: base must be a finite number > 0, got 0.0"),
    (lambda: embedding_module.rotary_embedding(jnp.ones((2, 3, 1, 4)), jnp.arange(3), base=jnp.asarray(10.0)),
     TypeError, "rotary_embedding: base must be a Python number"),
]  # fmt: skip


@pytest.mark.parametrize("call,error,message", ROPE_BAD)
@pytest.mark.parametrize("jit", [False, True])
def test_rotary_embedding_bad_input_gets_a_clear_error(call, error, message, jit):
    with pytest.raises(error, match=message):
        jax.jit(call)() if jit else call()
