"""dot_product_attention against a plain materialised-softmax reference (forward, jax.vjp,
finite differences), every mask combined with every block size; MultiHeadAttention,
PositionalEmbedding and gelu, the Transformer's parts."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcnet as fn
from funcnet import ops
from funcnet.attention import kernel as attention

KEY = jax.random.PRNGKey(0)
B, T, S, N, H, HV = 3, 7, 5, 2, 4, 3  # value_dim differs from head_dim on purpose
KV = np.array([5, 2, 0], np.int32)  # all keys, two keys, none (every query of row 2 sees nothing)
MASK = np.random.default_rng(1).random((B, 1, T, S)) > 0.3
MASK[1, 0, 3, :] = False  # and one query of row 1 sees nothing either


def visibility(T, S, *, is_causal=False, kv_lengths=None, mask=None, batch=B):
    visible = jnp.ones((batch, 1, T, S), bool)
    if is_causal:
        visible = (
            visible & (jnp.arange(S, dtype=jnp.int32)[None, :] <= jnp.arange(T, dtype=jnp.int32)[:, None])[None, None]
        )
    if kv_lengths is not None:
        visible = visible & (jnp.arange(S, dtype=jnp.int32).reshape(1, 1, 1, S) < kv_lengths.reshape(-1, 1, 1, 1))
    if mask is not None:
        visible = visible & mask
    return visible


def probabilities(q, k, *, scale=None, **masks):
    """The softmax over the visible keys, materialised: ``(batch, heads, T, S)``, zero rows
    where nothing is visible."""
    scale = 1 / float(np.sqrt(q.shape[-1])) if scale is None else scale
    visible = visibility(q.shape[1], k.shape[1], batch=q.shape[0], **masks)
    s = jnp.where(visible, jnp.einsum("btnh,bsnh->bnts", q, k) * scale, -jnp.inf)
    top = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isneginf(top), 0.0, top))
    total = jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.where(total > 0, total, 1.0)


def reference(q, k, v, **kwargs):
    return jnp.einsum("bnts,bsnh->btnh", probabilities(q, k, **kwargs), v)


def _inputs(dtype, t=T, s=S, seed=0):
    rng = np.random.default_rng(seed)
    shapes = ((B, t, N, H), (B, s, N, H), (B, s, N, HV))
    return tuple(rng.standard_normal(shape).astype(dtype) for shape in shapes)


def _check(dtype, block_size, is_causal, kv_lengths, mask, t=T, s=S):
    kv = None if kv_lengths is None else jnp.asarray(kv_lengths)
    m = None if mask is None else jnp.asarray(mask[:, :, :t, :s])
    fn.check_vjp(
        lambda q, k, v: fn.dot_product_attention(
            q, k, v, is_causal=is_causal, kv_lengths=kv, mask=m, block_size=block_size
        ),
        lambda q, k, v: reference(q, k, v, is_causal=is_causal, kv_lengths=kv, mask=m),
        *_inputs(dtype, t, s),
    )


@pytest.mark.parametrize(("dtype", "block_size"), [(np.float64, 1), (np.float64, 3), (np.float64, 9), (np.float32, 3)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_attention_matches_the_reference_with_padding_mask_and_causality(dtype, block_size, is_causal):
    """kv_lengths and mask together (block 3 leaves a remainder of both T=7 and S=5; 9 > both)."""
    _check(dtype, block_size, is_causal, KV, MASK)


def test_attention_with_more_keys_than_queries():
    _check(np.float64, 4, True, KV, MASK, t=4, s=5)
    _check(np.float64, 2, True, np.array([3, 4, 1], np.int32), None, t=3, s=4)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("block_size", [1, 3, 9])
@pytest.mark.parametrize(
    ("is_causal", "kv_lengths", "mask"), list(itertools.product([False, True], [None, KV], [None, MASK]))
)
def test_attention_matches_the_reference_in_every_combination(dtype, block_size, is_causal, kv_lengths, mask):
    _check(dtype, block_size, is_causal, kv_lengths, mask)


def test_attention_forward_matches_jax_nn_where_a_row_sees_something():
    q, k, v = _inputs(np.float32, s=T)
    v = jnp.concatenate([v, v[..., :1]], axis=-1)  # jax.nn wants value_dim == head_dim
    kv = jnp.asarray([7, 4, 6], jnp.int32)
    ours = fn.dot_product_attention(q, k, v, is_causal=True, kv_lengths=kv, block_size=3)
    with jax.numpy_dtype_promotion("standard"):  # jax.nn mixes int32 and int64 inside
        theirs = jax.nn.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=kv)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_a_query_that_sees_nothing_gives_zeros_and_zero_gradients():
    q, k, v = _inputs(np.float64)
    kv = jnp.asarray(KV)
    f = lambda q, k, v: fn.dot_product_attention(q, k, v, kv_lengths=kv, mask=jnp.asarray(MASK), block_size=2)
    out, vjp = jax.vjp(f, q, k, v)
    dq, dk, dv = vjp(jnp.ones_like(out))
    for a in (out, dq, dk, dv):
        assert np.all(np.isfinite(a))
    np.testing.assert_array_equal(out[2], 0.0)  # kv_lengths 0
    np.testing.assert_array_equal(out[1, 3], 0.0)  # the masked-out query
    np.testing.assert_array_equal(dq[2], 0.0)
    np.testing.assert_array_equal(dq[1, 3], 0.0)
    np.testing.assert_array_equal(dk[2], 0.0)
    np.testing.assert_array_equal(dk[1, 2:], 0.0)  # keys beyond kv_lengths get nothing either


def _dense_backward(mistake=None):
    """The module docstring's backward, with materialised P, optionally with a mistake."""

    def backward(is_causal, scale, block_size, residuals, g):
        del block_size
        q, k, v, kv_lengths, mask, out, _ = residuals
        p = probabilities(q, k, scale=scale, is_causal=is_causal, kv_lengths=kv_lengths, mask=mask)
        dv = jnp.einsum("bnts,btnh->bsnh", p, g)
        dp = jnp.einsum("btnh,bsnh->bnts", g, v)
        d = jnp.sum(g * out, axis=-1).transpose(0, 2, 1)[..., None]  # (batch, heads, T, 1)
        ds = p * dp if mistake == "no D" else p * (dp - d)
        dq = scale * jnp.einsum("bnts,bsnh->btnh", ds, k)
        dk = jnp.einsum("bnts,btnh->bsnh", ds, q) * (1.0 if mistake == "no scale in dK" else scale)
        zero = lambda a: np.zeros(a.shape, jax.dtypes.float0)
        return dq, dk, dv, zero(kv_lengths), zero(mask)

    op = jax.custom_vjp(attention._attention, nondiff_argnums=(5, 6, 7))
    op.defvjp(attention._attention_fwd, backward)
    kv, mask = jnp.asarray(KV), jnp.asarray(MASK)
    return (
        lambda q, k, v: op(q, k, v, kv, mask, True, 0.5, 3),
        lambda q, k, v: reference(q, k, v, is_causal=True, kv_lengths=kv, mask=mask),
    )


def test_the_docstrings_backward_is_right_and_check_vjp_catches_each_mistake():
    fn.check_vjp(*_dense_backward(), *_inputs(np.float64))  # the formulas, materialised, pass
    with pytest.raises(AssertionError, match=r"argument [01] disagree"):
        fn.check_vjp(*_dense_backward("no D"), *_inputs(np.float64))
    with pytest.raises(AssertionError, match="argument 1 disagree"):
        fn.check_vjp(*_dense_backward("no scale in dK"), *_inputs(np.float64))


def test_attention_under_jit_vmap_and_second_order():
    q, k, v = (a[:1, :3, :1, :2] for a in _inputs(np.float64))
    kv = jnp.asarray([2], jnp.int32)
    ours = lambda q: jnp.sum(jnp.sin(fn.dot_product_attention(q, k, v, is_causal=True, kv_lengths=kv, block_size=2)))
    theirs = lambda q: jnp.sum(jnp.sin(reference(q, k, v, is_causal=True, kv_lengths=kv)))
    second = jax.jit(jax.jacrev(jax.grad(ours)))(q)
    np.testing.assert_allclose(second, jax.jit(jax.hessian(theirs))(q), rtol=1e-8, atol=1e-10)
    qs = jnp.stack([q, 2 * q])
    batched = lambda f: jax.jit(jax.vmap(jax.grad(f)))(qs)
    np.testing.assert_allclose(batched(ours), batched(theirs), rtol=1e-10)


def test_the_gradients_memory_grows_with_the_block_not_with_T_times_S():
    t, h = 512, 16
    q = jnp.ones((1, t, 1, h), jnp.float32)
    grad = lambda f: jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v)), argnums=(0, 1, 2)))
    ours = grad(lambda q, k, v: fn.dot_product_attention(q, k, v, is_causal=True, block_size=32))
    memory = ours.lower(q, q, q).compile().memory_analysis()
    if memory is None:
        pytest.skip("this backend reports no memory analysis")
    assert memory.temp_size_in_bytes < t * t * 4  # less than one T x S matrix of scores


BAD = [
    (lambda: fn.dot_product_attention(jnp.ones((2, 3, 2, 4)), jnp.ones((2, 5, 2, 3)), jnp.ones((2, 5, 2, 4))),
     ValueError, r"k must have q's head_dim 4 \(axis 3\)"),
    (lambda: fn.dot_product_attention(jnp.ones((2, 3, 2, 4)), jnp.ones((1, 5, 2, 4)), jnp.ones((1, 5, 2, 4))),
     ValueError, "must share the batch size"),
    (lambda: fn.dot_product_attention(jnp.ones((2, 3, 2, 4)), jnp.ones((2, 5, 2, 4)), jnp.ones((2, 4, 2, 4))),
     ValueError, r"v must have as many positions \(axis 1\) as k, 5"),
    (lambda: fn.dot_product_attention(jnp.ones((2, 3, 2, 4)), jnp.ones((2, 5, 3, 4)), jnp.ones((2, 5, 3, 4))),
     ValueError, "same number of heads"),
    (lambda: fn.dot_product_attention(*[jnp.ones((2, 3, 2, 4))] * 3, mask=jnp.ones((2, 3, 4), bool)),
     ValueError, r"mask must broadcast to \(batch, heads, T, S\) = \(2, 2, 3, 3\), got shape \(2, 3, 4\)"),
    (lambda: fn.dot_product_attention(*[jnp.ones((2, 3, 2, 4))] * 3, mask=jnp.ones((3, 3))),
     TypeError, "mask must be boolean"),
    (lambda: fn.dot_product_attention(*[jnp.ones((2, 3, 2, 4))] * 3, kv_lengths=jnp.ones((3,), jnp.int32)),
     ValueError, r"kv_lengths must have shape \(batch,\) = \(2,\), got \(3,\)"),
    (lambda: fn.dot_product_attention(*[jnp.ones((2, 3, 2, 4))] * 3, kv_lengths=jnp.asarray([1, 4], jnp.int32)),
     ValueError, r"kv_lengths must lie in \[0, S\] = \[0, 3\].*from 1 to 4"),
    (lambda: fn.dot_product_attention(*[jnp.ones((2, 3, 2, 4))] * 3, kv_lengths=jnp.ones(2)),
     TypeError, "kv_lengths must have an integer dtype"),
    (lambda: fn.dot_product_attention(*[jnp.ones((2, 3, 2, 4))] * 3, block_size=0),
     ValueError, "block_size must be >= 1, got 0"),
    (lambda: fn.dot_product_attention(*[jnp.ones((2, 3, 2, 4))] * 3, scale=float("nan")),
     ValueError, "scale must be finite"),
    (lambda: fn.dot_product_attention(jnp.ones((2, 3, 4)), jnp.ones((2, 3, 4)), jnp.ones((2, 3, 4))),
     ValueError, r"q must be 4-D \(batch, length, heads, head_dim\)"),
    (lambda: fn.dot_product_attention(jnp.ones((2, 3, 2, 4)), jnp.ones((2, 3, 2, 4), jnp.float32), jnp.ones((2, 3, 2, 4))),  # noqa: E501
     TypeError, "q and k must share a dtype"),
    (lambda: fn.MultiHeadAttention(3).init(KEY, (-1, 5, 8)),
     ValueError, r"num_heads 3 must divide the features 8"),
    (lambda: fn.MultiHeadAttention(0), ValueError, "num_heads must be >= 1"),
    (lambda: fn.MultiHeadAttention(2, is_causal=1), TypeError, "is_causal must be a bool"),
    (lambda: fn.PositionalEmbedding(4).init(KEY, (-1, 5, 8)),
     ValueError, "sequences must be at most max_length = 4 long, got 5"),
    (lambda: fn.PositionalEmbedding(0), ValueError, "max_length must be >= 1"),
    (lambda: fn.gelu(jnp.ones(3, jnp.int32)), TypeError, "gelu: x must have a floating dtype"),
]  # fmt: skip


@pytest.mark.parametrize(("call", "error", "message"), BAD)
def test_bad_input_is_named_before_anything_compiles(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_kv_lengths_are_checked_under_jit_only_for_their_shape():
    q = jnp.ones((2, 3, 2, 4))
    f = jax.jit(lambda kv: fn.dot_product_attention(q, q, q, kv_lengths=kv))
    assert np.all(np.isfinite(f(jnp.asarray([9, 2], jnp.int32))))  # 9 means all 3 keys
    with pytest.raises(ValueError, match="kv_lengths must have shape"):
        f(jnp.ones((1,), jnp.int32))


# --- the layers ----------------------------------------------------------------------------


def _shape_agreement(layer, input_shape, x):
    output_shape, params = layer.init(KEY, input_shape)
    y = layer.apply(params, x)
    assert y.shape == jax.eval_shape(layer.apply, params, x).shape
    assert tuple(d if d != -1 else x.shape[0] for d in output_shape) == y.shape
    return params, y


def test_multi_head_attention_shapes_values_and_the_plain_computation():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 5, 8)))
    for layer in (fn.MultiHeadAttention(2), fn.MultiHeadAttention(4, 3, is_causal=True)):
        for shape in ((-1, 5, 8), (2, 5, 8)):
            params, y = _shape_agreement(layer, shape, x)
    assert params.W_q.shape == (8, 12) and params.B_q.shape == (1, 12) and params.W_o.shape == (12, 8)
    assert fn.MultiHeadAttention(2) == fn.MultiHeadAttention(2) != fn.MultiHeadAttention(2, is_causal=True)
    assert hash(fn.MultiHeadAttention(2, is_causal=True)) == hash(fn.MultiHeadAttention(2, is_causal=True))
    p = params
    heads = lambda W, b: (x.reshape(10, 8) @ W + b).reshape(2, 5, 4, 3)
    out = reference(heads(p.W_q, p.B_q), heads(p.W_k, p.B_k), heads(p.W_v, p.B_v), is_causal=True)
    np.testing.assert_allclose(y, (out.reshape(10, 12) @ p.W_o + p.B_o).reshape(2, 5, 8), rtol=1e-5, atol=1e-5)


def test_causal_attention_output_does_not_depend_on_the_future():
    layer = fn.MultiHeadAttention(2, is_causal=True, block_size=2)
    _, params = layer.init(KEY, (-1, 6, 4))
    x = jnp.asarray(np.random.default_rng(3).standard_normal((1, 6, 4)))
    jacobian = jax.jit(jax.jacrev(lambda x: layer.apply(params, x)))(x)[0, :, :, 0]  # (t, features, t', features)
    future = np.triu(np.ones((6, 6), bool), 1)
    assert np.all(np.asarray(jacobian).transpose(0, 2, 1, 3)[future] == 0)
    assert np.all(np.any(np.asarray(jacobian).transpose(0, 2, 1, 3)[~future] != 0, axis=(-1, -2)))


def test_positional_embedding_adds_learned_positions():
    layer = fn.PositionalEmbedding(8)
    x = jnp.ones((3, 5, 4))
    params, y = _shape_agreement(layer, (-1, 5, 4), x)
    assert params.W.shape == (8, 4)
    np.testing.assert_allclose(y, x + params.W[None, :5])
    grad = jax.grad(lambda p: jnp.sum(layer.apply(p, x) * jnp.arange(5.0)[None, :, None]))(params)
    np.testing.assert_allclose(grad.W[:5], 3 * jnp.broadcast_to(jnp.arange(5.0)[:, None], (5, 4)))
    np.testing.assert_array_equal(grad.W[5:], 0.0)
    assert fn.PositionalEmbedding(8) == fn.PositionalEmbedding(8) != fn.PositionalEmbedding(9)
    with pytest.raises(ValueError, match="at most max_length = 8"):
        layer.apply(params, jnp.ones((1, 9, 4)))


def _transformer(vocab, features, heads, length):
    block = lambda: (
        fn.residual(fn.LayerNorm(), fn.MultiHeadAttention(heads, is_causal=True, block_size=4)),
        fn.residual(
            fn.LayerNorm(),
            fn.TimeDistributed(fn.Dense(2 * features, fn.gelu, w_init=fn.glorot_normal, b_init=fn.zeros)),
            fn.TimeDistributed(fn.Dense(features, fn.linear, w_init=fn.glorot_normal, b_init=fn.zeros)),
        ),
    )
    return fn.serial(
        fn.Embedding(vocab, features, w_init=fn.normal(0.1)),
        fn.PositionalEmbedding(length),
        *block(),
        fn.LayerNorm(),
        fn.TimeDistributed(fn.Dense(vocab, fn.linear)),
    )


def test_a_small_transformer_in_serial_residual_summary_and_fit():
    vocab, length = 5, 8
    net = _transformer(vocab, 8, 2, length)
    assert net == _transformer(vocab, 8, 2, length)
    table = fn.summary(net, (-1, length))
    assert "MultiHeadAttention(2, is_causal=True)" in table and "PositionalEmbedding(8)" in table
    assert "288" in table  # 4 * (8 * 8 + 8) attention params
    # Learn to copy the previous token: only attention can see it.
    ids = np.random.default_rng(4).integers(0, vocab, (64, length + 1)).astype(np.int32)
    x, y = ids[:, 1:], ids[:, :-1]
    _, params = net.init(KEY, (-1, length))
    result = fn.fit(net, fn.softmax_cross_entropy, fn.adam(1e-2), params, (x, y[:, :]), epochs=30, batch_size=16,
                    key=KEY)  # fmt: skip
    losses = np.asarray(result.history.train_loss)
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0]


# --- gelu (ops.py) -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_matches_jax_nn_and_finite_differences(dtype):
    x = (3 * np.random.default_rng(5).standard_normal((4, 7))).astype(dtype)
    fn.check_vjp(fn.gelu, lambda x: jax.nn.gelu(x, approximate=False), x)


def test_check_vjp_catches_a_gelu_backward_without_the_density_term():
    wrong = jax.custom_vjp(ops._gelu)
    wrong.defvjp(ops._gelu_fwd, lambda x, g: (g * 0.5 * (1 + jax.lax.erf(x / np.sqrt(2.0))),))
    with pytest.raises(AssertionError, match="argument 0 disagree"):
        fn.check_vjp(wrong, lambda x: jax.nn.gelu(x, approximate=False), np.linspace(-3, 3, 12).reshape(3, 4))


def test_gelu_as_a_dense_activation():
    layer = fn.Dense(3, fn.gelu)
    assert layer == fn.Dense(3, fn.gelu) and "gelu" in fn.summary(layer, (-1, 2))
    _, params = layer.init(KEY, (-1, 2))
    assert layer.apply(params, jnp.ones((4, 2))).shape == (4, 3)
