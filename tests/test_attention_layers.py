"""MultiHeadAttention and CrossAttention: padding that reaches them through the combinators (and
the invariance it buys), grouped-query heads, rope, dropout only in training, and torch's
``nn.MultiheadAttention`` as an oracle for cross-attention (skipped without torch)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcnet as fn
from funcnet.embeddings import rotary_embedding

KEY = jax.random.PRNGKey(0)
VOCAB, FEATURES, HEADS = 7, 8, 2


def _plain_attention(q, k, v, visible):
    """Materialised softmax attention with grouped heads repeated: ``(batch, T, heads, head_dim)``."""
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    s = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    p = jax.nn.softmax(jnp.where(visible, s, -1e30), axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", p, v)


def _heads(a, W, B, count):
    batch, time, features = a.shape
    return (a.reshape(batch * time, features) @ W + B).reshape(batch, time, count, -1)


def _network(attention_kwargs=None):
    """A one-block pre-norm Transformer over token ids, logits per position."""
    attention = fn.MultiHeadAttention(HEADS, block_size=3, **(attention_kwargs or {}))
    dense = lambda n, activation: fn.TimeDistributed(fn.Dense(n, activation, w_init=fn.glorot_normal, b_init=fn.zeros))
    return fn.serial(
        fn.Embedding(VOCAB, FEATURES, w_init=fn.normal(0.5)),
        fn.PositionalEmbedding(16),
        fn.residual(fn.LayerNorm(), attention),
        fn.residual(fn.LayerNorm(), dense(16, fn.gelu), dense(FEATURES, fn.linear)),
        fn.LayerNorm(),
        dense(VOCAB, fn.linear),
    )


LENGTHS = np.array([5, 2, 7], np.int32)


def _padded_batch(total, seed):
    """Token ids ``(3, total)`` whose real part is fixed and whose padding (positions >= LENGTHS)
    is random from ``seed``; targets padded with -1."""
    real = np.random.default_rng(0).integers(0, VOCAB, (3, 7))
    x = np.random.default_rng(seed).integers(0, VOCAB, (3, total))
    y = np.full((3, total), -1, np.int32)
    for b, n in enumerate(LENGTHS):
        x[b, :n] = real[b, :n]
        y[b, : n - 1] = real[b, 1:n]  # next-token targets within the real part
    return jnp.asarray(x, jnp.int32), jnp.asarray(y)


@pytest.fixture
def float32():
    """The test runs with JAX's default float32 (the suite turns x64 on)."""
    with jax.enable_x64(False):
        yield


def test_padding_changes_nothing_real_outputs_loss_metrics_and_every_gradient(float32):
    net = _network({"is_causal": False})  # non-causal: every real position could see the padding
    _, params = net.init(KEY, (-1, 16))
    loss = functools.partial(fn.softmax_cross_entropy, ignore_index=-1)
    accuracy = functools.partial(fn.accuracy, ignore_index=-1)

    def everything(x, y, use_lengths):
        inputs = {"kv_lengths": jnp.asarray(LENGTHS)} if use_lengths else {}
        out = net.apply(params, x, **inputs)
        value, grads = jax.value_and_grad(lambda p: loss(net.apply(p, x, **inputs), y))(params)
        real = [out[b, :n] for b, n in enumerate(LENGTHS)]
        return real, value, accuracy(out, y), grads

    assert params[0].W.dtype == jnp.float32
    runs = [everything(*_padded_batch(total, seed), True) for total, seed in ((7, 1), (7, 2), (12, 3))]
    largest = {"outputs": 0.0, "loss": 0.0, "accuracy": 0.0, "gradients": 0.0}
    for other in runs[1:]:
        diff = lambda a, b: max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(a, b, strict=True))
        largest["outputs"] = max(largest["outputs"], diff(runs[0][0], other[0]))
        largest["loss"] = max(largest["loss"], abs(float(runs[0][1] - other[1])))
        largest["accuracy"] = max(largest["accuracy"], abs(float(runs[0][2] - other[2])))
        leaves = lambda g: jax.tree_util.tree_leaves(g)
        largest["gradients"] = max(largest["gradients"], diff(leaves(runs[0][3]), leaves(other[3])))
    assert all(v <= 1e-6 for v in largest.values()), largest
    # The same comparison fails when the layer is not told where the padding is.
    blind = [everything(*_padded_batch(total, seed), False) for total, seed in ((7, 1), (7, 2))]
    moved = max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(blind[0][0], blind[1][0], strict=True))
    assert moved > 1e-2
    assert abs(float(blind[0][1] - blind[1][1])) > 1e-4


def test_multi_head_attention_with_grouped_heads_padding_and_mask_equals_the_plain_computation():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 6, 8)))
    mask = jnp.asarray(np.random.default_rng(3).random((3, 1, 6, 6)) > 0.2) | jnp.eye(6, dtype=bool)[None, None]
    for num_kv_heads in (None, 2, 1):
        layer = fn.MultiHeadAttention(4, 3, num_kv_heads=num_kv_heads, is_causal=True, block_size=4)
        _, p = layer.init(KEY, (-1, 6, 8))
        K = 4 if num_kv_heads is None else num_kv_heads
        assert p.W_q.shape == (8, 12) and p.W_k.shape == (8, 3 * K) and p.W_v.shape == (8, 3 * K)
        y = layer.apply(p, x, kv_lengths=jnp.asarray([6, 3, 1]), mask=mask)
        visible = (
            mask
            & jnp.tril(jnp.ones((6, 6), bool))[None, None]
            & (jnp.arange(6)[None, :] < jnp.asarray([6, 3, 1])[:, None])[:, None, None, :]
        )
        out = _plain_attention(
            _heads(x, p.W_q, p.B_q, 4), _heads(x, p.W_k, p.B_k, K), _heads(x, p.W_v, p.B_v, K), visible
        )
        np.testing.assert_allclose(y, (out.reshape(18, 12) @ p.W_o + p.B_o).reshape(3, 6, 8), rtol=1e-6, atol=1e-6)


def test_rope_rotates_queries_and_keys_by_position():
    layer = fn.MultiHeadAttention(2, rope=10000.0, block_size=4)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 5, 8)))
    _, p = layer.init(KEY, (-1, 5, 8))
    positions = jnp.arange(5)
    q = rotary_embedding(_heads(x, p.W_q, p.B_q, 2), positions)
    k = rotary_embedding(_heads(x, p.W_k, p.B_k, 2), positions)
    out = _plain_attention(q, k, _heads(x, p.W_v, p.B_v, 2), jnp.ones((1, 1, 5, 5), bool))
    expected = (out.reshape(10, 8) @ p.W_o + p.B_o).reshape(2, 5, 8)
    np.testing.assert_allclose(layer.apply(p, x), expected, rtol=1e-6, atol=1e-6)
    without = fn.MultiHeadAttention(2, block_size=4).apply(p, x)
    assert float(jnp.max(jnp.abs(without - expected))) > 1e-3  # rope changed something


def test_attention_dropout_only_in_training_and_through_the_kernel():
    layer = fn.MultiHeadAttention(2, dropout=0.5, block_size=4)
    plain = fn.MultiHeadAttention(2, block_size=4)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 5, 8)))
    _, p = layer.init(KEY, (-1, 5, 8))
    np.testing.assert_array_equal(layer.apply(p, x), plain.apply(p, x))  # inference: no dropout
    with pytest.raises(TypeError, match="apply is inference"):
        layer.apply(p, x, key=KEY)  # half a training mode is refused, naming train_apply
    with pytest.raises(TypeError, match="needs a key"):
        fn.train_apply(layer)(p, x)
    train = lambda p, key: fn.train_apply(layer)(p, x, key=key)[0]
    k1, k2 = jax.random.split(KEY)
    y1, y2 = train(p, k1), train(p, k2)
    assert float(jnp.max(jnp.abs(y1 - plain.apply(p, x)))) > 1e-3
    assert float(jnp.max(jnp.abs(y1 - y2))) > 1e-3
    np.testing.assert_array_equal(y1, train(p, k1))  # the key decides it
    y_net, _ = fn.train_apply(fn.serial(layer))((p,), x, key=k1)
    assert float(jnp.max(jnp.abs(y_net - plain.apply(p, x)))) > 1e-3
    # The kernel's own dropout: the layer's output is the op's with dropout_key = the key.
    heads = lambda W, B, n: (x.reshape(10, 8) @ W + B).reshape(2, 5, n, -1)
    out = fn.dot_product_attention(
        heads(p.W_q, p.B_q, 2), heads(p.W_k, p.B_k, 2), heads(p.W_v, p.B_v, 2),
        dropout_rate=0.5, dropout_key=k1, block_size=4,
    )  # fmt: skip
    np.testing.assert_allclose(y1, (out.reshape(10, 8) @ p.W_o + p.B_o).reshape(2, 5, 8), rtol=1e-6, atol=1e-7)
    grads = jax.grad(lambda p: jnp.sum(train(p, k1) ** 2))(p)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))


def test_cross_attention_over_a_pair_with_context_padding():
    x = jnp.asarray(np.random.default_rng(6).standard_normal((2, 4, 8)))
    context = jnp.asarray(np.random.default_rng(7).standard_normal((2, 6, 5)))
    layer = fn.CrossAttention(2, num_kv_heads=1, block_size=4)
    shape, p = layer.init(KEY, ((-1, 4, 8), (-1, 6, 5)))
    assert tuple(shape) == (-1, 4, 8) and p.W_k.shape == (5, 4) and p.W_q.shape == (8, 8)
    lengths = jnp.asarray([6, 2])
    y = layer.apply(p, (x, context), kv_lengths=lengths)
    visible = (jnp.arange(6)[None, :] < lengths[:, None])[:, None, None, :]
    out = _plain_attention(
        _heads(x, p.W_q, p.B_q, 2), _heads(context, p.W_k, p.B_k, 1), _heads(context, p.W_v, p.B_v, 1), visible
    )
    np.testing.assert_allclose(y, (out.reshape(8, 8) @ p.W_o + p.B_o).reshape(2, 4, 8), rtol=1e-6, atol=1e-6)
    # In a network: the decoder's x and the encoder's context, padding passed through parallel.
    net = fn.serial(
        fn.parallel(fn.TimeDistributed(fn.Dense(8, fn.linear)), fn.TimeDistributed(fn.Dense(5, fn.tanh))), layer
    )
    _, params = net.init(KEY, ((-1, 4, 8), (-1, 6, 5)))
    changed = context.at[1, 2:].set(100.0)  # row 1's padding
    np.testing.assert_allclose(
        net.apply(params, (x, context), kv_lengths=lengths), net.apply(params, (x, changed), kv_lengths=lengths)
    )


def test_cross_attention_matches_torch_outputs_and_every_gradient():
    torch = pytest.importorskip("torch")
    D, C, heads, T, S = 8, 6, 2, 4, 5
    torch.manual_seed(3)
    mha = torch.nn.MultiheadAttention(D, heads, kdim=C, vdim=C, batch_first=True).double()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    rng = np.random.default_rng(8)
    x, context, g = rng.standard_normal((3, T, D)), rng.standard_normal((3, S, C)), rng.standard_normal((3, T, D))
    lengths = np.array([5, 2, 4])
    xt, ct = torch.tensor(x, requires_grad=True), torch.tensor(context, requires_grad=True)
    padding = torch.tensor(np.arange(S)[None, :] >= lengths[:, None])  # torch: True = padding
    out, _ = mha(xt, ct, ct, key_padding_mask=padding, need_weights=False)
    (out * torch.tensor(g)).sum().backward()
    b = mha.in_proj_bias.detach().numpy()
    t = lambda w: jnp.asarray(w.detach().numpy().T)
    params = fn.AttentionParams(
        t(mha.q_proj_weight), jnp.asarray(b[None, :D]), t(mha.k_proj_weight), jnp.asarray(b[None, D : 2 * D]),
        t(mha.v_proj_weight), jnp.asarray(b[None, 2 * D :]), t(mha.out_proj.weight),
        jnp.asarray(mha.out_proj.bias.detach().numpy()[None]),
    )  # fmt: skip
    layer = fn.CrossAttention(heads, block_size=2)
    apply = lambda p, x, c: layer.apply(p, (x, c), kv_lengths=jnp.asarray(lengths))
    ours, vjp = jax.vjp(apply, params, jnp.asarray(x), jnp.asarray(context))
    dp, dx, dc = vjp(jnp.asarray(g))
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), b.detach().numpy(), rtol=1e-10, atol=1e-12)
    close(ours, out)
    close(dx, xt.grad)
    close(dc, ct.grad)
    for name, weight in (("W_q", mha.q_proj_weight), ("W_k", mha.k_proj_weight), ("W_v", mha.v_proj_weight)):
        close(getattr(dp, name), weight.grad.T)
    bias = mha.in_proj_bias.grad
    close(jnp.concatenate([dp.B_q[0], dp.B_k[0], dp.B_v[0]]), bias)
    close(dp.W_o, mha.out_proj.weight.grad.T)
    close(dp.B_o[0], mha.out_proj.bias.grad)


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: fn.MultiHeadAttention(4, num_kv_heads=3), ValueError, "num_kv_heads must divide num_heads"),
        (lambda: fn.MultiHeadAttention(4, dropout=1.0), ValueError, "dropout"),
        (lambda: fn.MultiHeadAttention(4, dropout=-0.1), ValueError, "dropout"),
        (lambda: fn.MultiHeadAttention(2, 3, rope=10000.0), ValueError, "head_dim must be even"),
        (lambda: fn.MultiHeadAttention(2, rope=True), TypeError, "rotary base"),
        (lambda: fn.CrossAttention(2, num_kv_heads=0), ValueError, "num_kv_heads"),
    ],
)
def test_bad_constructor_arguments_are_named(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_bad_inputs_are_named_before_anything_compiles():
    layer = fn.MultiHeadAttention(2, rope=10000.0)
    with pytest.raises(ValueError, match="head_dim must be even"):
        layer.init(KEY, (-1, 5, 6))  # 6 features / 2 heads = 3
    layer = fn.MultiHeadAttention(2)
    _, p = layer.init(KEY, (-1, 5, 8))
    x = jnp.ones((3, 5, 8))
    with pytest.raises(ValueError, match=r"kv_lengths must have shape \(batch,\) = \(3,\)"):
        layer.apply(p, x, kv_lengths=jnp.array([1, 2]))
    with pytest.raises(TypeError, match="mask must be boolean"):
        fn.serial(layer).apply((p,), x, mask=jnp.zeros((3, 1, 5, 5)))
    with pytest.raises(TypeError, match=r"pair of shapes \(x, context\)"):
        fn.CrossAttention(2).init(KEY, (-1, 5, 8))
    _, cp = fn.CrossAttention(2).init(KEY, ((-1, 5, 8), (-1, 4, 8)))
    with pytest.raises(ValueError, match="share the batch size"):
        fn.CrossAttention(2).apply(cp, (x, jnp.ones((2, 4, 8))))


def test_use_bias_false_and_a_separate_output_initializer():
    scaled = lambda key, shape, dtype: 1e-3 * jax.random.normal(key, shape, dtype)
    layer = fn.MultiHeadAttention(2, use_bias=False, o_init=scaled)
    _, p = layer.init(KEY, (-1, 5, 8))
    assert isinstance(p, fn.AttentionWeights) and fn.param_count(p) == 4 * 64
    assert float(jnp.std(p.W_o)) < 1e-2 < float(jnp.std(p.W_q))
    x = jnp.asarray(np.random.default_rng(9).standard_normal((2, 5, 8)))
    biased = fn.MultiHeadAttention(2)
    zeros = lambda a: jnp.zeros_like(a)
    with_zero_biases = fn.AttentionParams(
        p.W_q, zeros(p.W_q[:1]), p.W_k, zeros(p.W_k[:1]), p.W_v, zeros(p.W_v[:1]), p.W_o, zeros(p.W_o[:1])
    )
    np.testing.assert_allclose(layer.apply(p, x), biased.apply(with_zero_biases, x), rtol=1e-6, atol=1e-7)
    assert layer.apply == fn.MultiHeadAttention(2, use_bias=False).apply  # o_init is init-only
    with pytest.raises(TypeError, match="AttentionWeights"):
        layer.apply(with_zero_biases, x)


def test_fit_on_padded_sequences_does_not_depend_on_the_padding(float32):
    """fit carries kv_lengths with the data and the loss leaves padded targets out: the padding's
    content and amount change neither the trained params nor the losses and metrics."""
    net = _network({"is_causal": False})
    _, params = net.init(KEY, (-1, 16))
    assert params[0].W.dtype == jnp.float32
    loss = functools.partial(fn.softmax_cross_entropy, ignore_index=-1)
    metrics = {"accuracy": functools.partial(fn.accuracy, ignore_index=-1)}

    def train(total, seed, inputs=True):
        x, y = _padded_batch(total, seed)
        data = (x, y, {"kv_lengths": jnp.asarray(LENGTHS)}) if inputs else (x, y)
        return fn.fit(
            net, loss, fn.adam(1e-2), params, data, data, epochs=4, batch_size=2, eval_every=2,
            patience=None, key=KEY, metrics=metrics,
        )  # fmt: skip

    base, other, longer = train(7, 1), train(7, 2), train(11, 3)
    for result in (other, longer):
        for a, b in zip(jax.tree_util.tree_leaves(base.params), jax.tree_util.tree_leaves(result.params), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)
        np.testing.assert_allclose(base.history.train_loss, result.history.train_loss, atol=1e-6)
        np.testing.assert_allclose(base.history.eval_loss, result.history.eval_loss, atol=1e-6)
        np.testing.assert_allclose(
            base.history.eval_metrics["accuracy"], result.history.eval_metrics["accuracy"], atol=1e-6
        )
    blind = train(7, 1, inputs=False), train(7, 2, inputs=False)
    assert float(jnp.max(jnp.abs(blind[0].history.train_loss - blind[1].history.train_loss))) > 1e-4
