"""dot_product_attention against a plain materialised-softmax reference (forward, jax.vjp,
finite differences), every mask combined with every block size; MultiHeadAttention,
PositionalEmbedding and gelu, the Transformer's parts."""

import itertools
import re

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


def visibility(T, S, *, is_causal=False, kv_lengths=None, mask=None, q_offset=0, batch=B):
    visible = jnp.ones((batch, 1, T, S), bool)
    if is_causal:
        offset = jnp.asarray(q_offset, jnp.int32).reshape(-1, 1, 1, 1)
        t, s = jnp.arange(T, dtype=jnp.int32).reshape(1, 1, T, 1), jnp.arange(S, dtype=jnp.int32).reshape(1, 1, 1, S)
        visible = visible & (s <= t + offset)
    if kv_lengths is not None:
        visible = visible & (jnp.arange(S, dtype=jnp.int32).reshape(1, 1, 1, S) < kv_lengths.reshape(-1, 1, 1, 1))
    if mask is not None:
        visible = visible & mask
    return visible


def _repeat(k, heads):
    """Grouped-query attention, materialised: each kv head repeated for its group of query heads."""
    return jnp.repeat(k, heads // k.shape[2], axis=2)


def probabilities(q, k, *, scale=None, **masks):
    """The softmax over the visible keys, materialised: ``(batch, heads, T, S)``, zero rows
    where nothing is visible."""
    scale = 1 / float(np.sqrt(q.shape[-1])) if scale is None else scale
    visible = visibility(q.shape[1], k.shape[1], batch=q.shape[0], **masks)
    s = jnp.where(visible, jnp.einsum("btnh,bsnh->bnts", q, _repeat(k, q.shape[2])) * scale, -jnp.inf)
    top = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isneginf(top), 0.0, top))
    total = jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.where(total > 0, total, 1.0)


def reference(q, k, v, *, keep=None, rate=0.0, **kwargs):
    """softmax, then (with dropout) the kernel's keep-mask ``keep: (batch, heads, T, S)`` and
    ``1 / (1 - rate)``, then ``@ v``."""
    p = probabilities(q, k, **kwargs)
    if keep is not None:
        p = jnp.where(keep, p, 0.0) / (1.0 - rate)
    return jnp.einsum("bnts,bsnh->btnh", p, _repeat(v, q.shape[2]))


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


def _dense_backward(mistake=None, *, kv_heads=N, rate=0.0, inputs=None):
    """The module docstring's backward, with materialised P (grouped-query heads repeated, the
    dropout mask whole), optionally with a mistake. Returns (op, reference, *inputs)."""
    q, k, v = _inputs(np.float64) if inputs is None else inputs
    k, v = k[:, :, :kv_heads], v[:, :, :kv_heads]
    dropout_key = jax.random.key(7)
    keep = attention.attention_dropout_mask(dropout_key, (B, q.shape[2], T, S), rate, block_size=3) if rate else None

    def backward(config, residuals, g):
        q, k, v, extras, out, _ = residuals
        heads, group = q.shape[2], q.shape[2] // k.shape[2]
        p = probabilities(
            q, k, scale=config.scale, is_causal=config.is_causal, kv_lengths=extras.kv_lengths, mask=extras.mask
        )
        w = p if keep is None else jnp.where(keep, p, 0.0) / (1.0 - rate)
        dv = jnp.einsum("bnts,btnh->bsnh", p if mistake == "no mask in dV" else w, g)  # per query head
        dp = jnp.einsum("btnh,bsnh->bnts", g, _repeat(v, heads))
        if keep is not None:
            dp = jnp.where(keep, dp, 0.0) / (1.0 - rate)
        d = jnp.sum(g * out, axis=-1).transpose(0, 2, 1)[..., None]  # (batch, heads, T, 1)
        ds = p * dp if mistake == "no D" else p * (dp - d)
        dq = config.scale * jnp.einsum("bnts,bsnh->btnh", ds, _repeat(k, heads))
        dk = jnp.einsum("bnts,btnh->bsnh", ds, q) * (1.0 if mistake == "no scale in dK" else config.scale)
        grouped = lambda x: x.reshape(*x.shape[:2], -1, group, x.shape[-1])
        first = mistake == "first head of the group"
        dk = grouped(dk)[:, :, :, 0] if first else jnp.sum(grouped(dk), axis=3)  # a group's kv head: the sum
        dv = grouped(dv)[:, :, :, 0] if first else jnp.sum(grouped(dv), axis=3)
        return dq, dk, dv, jax.tree.map(attention._no_grad, extras)

    op = jax.custom_vjp(attention._attention, nondiff_argnums=(4,))
    op.defvjp(attention._attention_fwd, backward)
    kv, mask = jnp.asarray(KV), jnp.asarray(MASK)
    extras = attention._Extras(
        kv, mask, None, jax.random.key_data(dropout_key) if rate else None, jnp.asarray(rate) if rate else None
    )
    config = attention._Config(True, 0.5, 3, 0, bool(rate), "threefry2x32" if rate else None)
    return (
        lambda q, k, v: op(q, k, v, extras, config),
        lambda q, k, v: reference(q, k, v, scale=0.5, is_causal=True, kv_lengths=kv, mask=mask, keep=keep, rate=rate),
        q,
        k,
        v,
    )


def test_the_docstrings_backward_is_right_and_check_vjp_catches_each_mistake():
    fn.check_vjp(*_dense_backward())  # the formulas, materialised, pass
    with pytest.raises(AssertionError, match=r"argument [01] disagree"):
        fn.check_vjp(*_dense_backward("no D"))
    with pytest.raises(AssertionError, match="argument 1 disagree"):
        fn.check_vjp(*_dense_backward("no scale in dK"))


def test_check_vjp_catches_a_grouped_query_backward_that_does_not_sum_the_group():
    fn.check_vjp(*_dense_backward(kv_heads=1))  # multi-query: the formulas with the group's sums pass
    with pytest.raises(AssertionError, match=r"argument [12] disagree"):
        fn.check_vjp(*_dense_backward("first head of the group", kv_heads=1))


def test_check_vjp_catches_a_dropout_backward_without_the_mask_in_dV():
    fn.check_vjp(*_dense_backward(rate=0.4))  # W = P Z / (1 - rate), dP = dW Z / (1 - rate): pass
    with pytest.raises(AssertionError, match="argument 2 disagree"):
        fn.check_vjp(*_dense_backward("no mask in dV", rate=0.4))


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
     ValueError, r"kv_heads = 3 \(axis 2\) must divide q's heads = 2"),
    (lambda: fn.dot_product_attention(jnp.ones((2, 3, 4, 4)), jnp.ones((2, 5, 2, 4)), jnp.ones((2, 5, 1, 4))),
     ValueError, r"k and v must have the same number of heads \(axis 2\)"),
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


# --- grouped-query heads, dropout, q_offset (the kernel's additions) ------------------------

NQ = 4  # query heads of the grouped-query tests: kv heads 1, 2 and 4 divide it
HEAD_MASK = np.random.default_rng(6).random((B, NQ, T, S)) > 0.4  # a mask per query head


def _gqa_inputs(dtype, kv_heads, t=T, s=S, seed=0):
    rng = np.random.default_rng(seed)
    shapes = ((B, t, NQ, H), (B, s, kv_heads, H), (B, s, kv_heads, HV))
    return tuple(rng.standard_normal(shape).astype(dtype) for shape in shapes)


_GQA_CASES = [(3, True, "kv+mask"), (9, False, "head mask"), (2, True, "none")]


@pytest.mark.parametrize(
    ("dtype", "kv_heads", "block_size", "is_causal", "masks"),
    [(np.float64, kv_heads, *case) for kv_heads in (1, 2, 4) for case in _GQA_CASES]
    + [(np.float32, 1, *case) for case in _GQA_CASES]
    + [pytest.param(np.float32, kv_heads, *case, marks=pytest.mark.slow) for kv_heads in (2, 4) for case in _GQA_CASES],
)
def test_grouped_query_attention_matches_repeated_keys_and_values(dtype, kv_heads, block_size, is_causal, masks):
    """kv_heads 1 (multi-query), 2 (groups of 2), 4 (plain); with padding, a broadcast mask or a
    mask per query head, causal or not; block 3 and 2 leave remainders of T=7 and S=5."""
    options = {"is_causal": is_causal}
    if masks == "kv+mask":
        options.update(kv_lengths=jnp.asarray(KV), mask=jnp.asarray(MASK))
    elif masks == "head mask":
        options.update(mask=jnp.asarray(HEAD_MASK))
    fn.check_vjp(
        lambda q, k, v: fn.dot_product_attention(q, k, v, block_size=block_size, **options),
        lambda q, k, v: reference(q, k, v, **options),
        *_gqa_inputs(dtype, kv_heads),
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("block_size", "kv_heads", "rate"), [(3, 2, 0.3), (9, 4, 0.5), (2, 1, 0.1)])
def test_dropout_matches_the_reference_with_the_kernels_mask(dtype, block_size, kv_heads, rate):
    """out = (softmax * Z / (1 - rate)) @ v with Z = attention_dropout_mask(...), combined with
    padding, a mask, causality and grouped-query heads."""
    key = jax.random.key(3)
    keep = attention.attention_dropout_mask(key, (B, NQ, T, S), rate, block_size=block_size)
    masks = {"is_causal": True, "kv_lengths": jnp.asarray(KV), "mask": jnp.asarray(MASK)}
    fn.check_vjp(
        lambda q, k, v: fn.dot_product_attention(
            q, k, v, dropout_rate=rate, dropout_key=key, block_size=block_size, **masks
        ),
        lambda q, k, v: reference(q, k, v, keep=keep, rate=rate, **masks),
        *_gqa_inputs(dtype, kv_heads),
    )


def test_the_dropout_mask_keeps_1_minus_rate_depends_on_the_block_and_takes_either_key():
    shape = (2, 3, 40, 50)
    keep = attention.attention_dropout_mask(jax.random.key(0), shape, 0.25, block_size=16)
    assert keep.shape == shape and keep.dtype == jnp.bool_
    assert abs(float(jnp.mean(keep)) - 0.75) < 0.01  # 12000 draws: 4 standard deviations
    again = attention.attention_dropout_mask(jax.random.key(0), shape, 0.25, block_size=16)
    np.testing.assert_array_equal(keep, again)
    other_block = attention.attention_dropout_mask(jax.random.key(0), shape, 0.25, block_size=32)
    assert np.mean(np.asarray(keep) != np.asarray(other_block)) > 0.2
    raw = attention.attention_dropout_mask(jax.random.PRNGKey(0), shape, 0.25, block_size=16)
    np.testing.assert_array_equal(keep, raw)  # a raw key is the same threefry key
    # The kernel uses that mask: with v = identity rows, out = P Z / (1 - rate) itself.
    q, k, _ = _gqa_inputs(np.float64, 4)
    v = jnp.broadcast_to(jnp.eye(S)[None, :, None, :], (B, S, 4, S))
    key = jax.random.PRNGKey(5)
    out = fn.dot_product_attention(q, k, v, dropout_rate=0.5, dropout_key=key, block_size=3)
    keep = attention.attention_dropout_mask(key, (B, NQ, T, S), 0.5, block_size=3)
    p = probabilities(q, k)
    np.testing.assert_allclose(out.transpose(0, 2, 1, 3), jnp.where(keep, p, 0.0) * 2.0, rtol=1e-12, atol=1e-14)


def test_a_zero_dropout_rate_runs_no_dropout_code_and_a_traced_rate_does():
    q, k, v = _inputs(np.float32)
    key = jax.random.key(0)
    program = lambda rate: str(
        jax.make_jaxpr(lambda q: fn.dot_product_attention(q, k, v, dropout_rate=rate, dropout_key=key))(q)
    )
    assert "random_fold_in" not in program(0.0) and "shift_right" not in program(0.0)  # no seed, no hash
    assert "random_fold_in" in program(0.1) and "shift_right" in program(0.1)
    eager = fn.dot_product_attention(q, k, v, dropout_rate=0.2, dropout_key=key, block_size=3)
    traced = jax.jit(lambda rate: fn.dot_product_attention(q, k, v, dropout_rate=rate, dropout_key=key, block_size=3))(
        jnp.float32(0.2)
    )
    np.testing.assert_allclose(traced, eager, rtol=1e-6, atol=1e-7)
    no_key = fn.dot_product_attention(q, k, v, dropout_rate=0.0)  # rate 0: no key needed
    np.testing.assert_allclose(no_key, reference(q, k, v), rtol=1e-5, atol=1e-6)


_OFFSET_CASES = [(3, 7, 4, 2), (3, 7, 4, 9), (5, 5, 2, 3), (1, 6, 5, 4), (4, 7, np.array([3, 0, 6], np.int32), 3)]


@pytest.mark.parametrize(
    ("dtype", "t", "s", "q_offset", "block_size"),
    [(np.float64, *case) for case in _OFFSET_CASES]
    + [(np.float32, *case) for case in _OFFSET_CASES[::4]]
    + [pytest.param(np.float32, *case, marks=pytest.mark.slow) for case in _OFFSET_CASES[1:4]],
)
def test_q_offset_aligns_causal_attention_for_caches(dtype, t, s, q_offset, block_size):
    """q_offset = S - T (lower-right), a smaller one, a single query against a cache (S - 1),
    and one offset per batch row; with padding and a mask, block sizes leaving remainders."""
    offset = jnp.asarray(q_offset) if isinstance(q_offset, np.ndarray) else q_offset
    mask = jnp.asarray(np.random.default_rng(7).random((B, 1, t, s)) > 0.2)
    kv = jnp.asarray([s, 2, s - 1], jnp.int32)
    masks = {"is_causal": True, "kv_lengths": kv, "mask": mask, "q_offset": offset}
    fn.check_vjp(
        lambda q, k, v: fn.dot_product_attention(q, k, v, block_size=block_size, **masks),
        lambda q, k, v: reference(q, k, v, **masks),
        *_inputs(dtype, t, s),
    )


def test_a_static_q_offset_still_skips_the_pairs_it_hides_and_an_array_one_matches_it():
    q = jnp.ones((1, 8, 1, 4))
    k = jnp.ones((1, 16, 1, 4))
    config = lambda offset: attention._Config(True, 1.0, 4, offset, False, None)
    none = attention._Extras(None, None, None, None, None)
    assert len(attention._plan(q, k, config(0), none).pairs) == 3  # blocks (0,0), (1,0), (1,1)
    assert len(attention._plan(q, k, config(8), none).pairs) == 3 + 2 * 2
    assert len(attention._plan(q, k, config(None), none).pairs) == 2 * 4  # an array: every pair, cond-skipped
    q, k, v = _inputs(np.float64, 4, 9)
    static = fn.dot_product_attention(q, k, v, is_causal=True, q_offset=5, block_size=2)
    array = fn.dot_product_attention(q, k, v, is_causal=True, q_offset=jnp.full((B,), 5, jnp.int32), block_size=2)
    scalar = jax.jit(lambda o: fn.dot_product_attention(q, k, v, is_causal=True, q_offset=o, block_size=2))(
        jnp.int32(5)
    )
    np.testing.assert_allclose(array, static, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(scalar, static, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(static, reference(q, k, v, is_causal=True, q_offset=5), rtol=1e-12, atol=1e-13)


def _scan_lengths(f, *args):
    """The lengths of the ``lax.scan``s in ``f``'s program: the pairs of blocks each pass walks."""
    return [int(n) for n in re.findall(r"length=(\d+)", str(jax.make_jaxpr(f)(*args)))]


def test_causal_attention_visits_only_the_pairs_of_blocks_a_causal_mask_leaves_visible():
    # A test of the pairs visited, not of time: 8 x 8 blocks of 2, the causal plan walks the 36
    # pairs on or below the diagonal, not all 64 (skipping disabled costs ~1.7x, and no value).
    q, k = jnp.ones((1, 16, 1, 4)), jnp.ones((1, 16, 1, 4))
    config = lambda causal, offset: attention._Config(causal, 1.0, 2, offset, False, None)
    none = attention._Extras(None, None, None, None, None)
    causal = attention._plan(q, k, config(True, 0), none)
    assert (causal.nq, causal.nk) == (8, 8)
    assert sorted(causal.pairs) == [(i, j) for i in range(8) for j in range(i + 1)] and len(causal.pairs) == 36
    assert len(attention._plan(q, k, config(False, 0), none).pairs) == 64  # no mask: every pair
    # A static q_offset of 3 keys: block i's last query 2i+1 sees keys <= 2i+4, so blocks j <= i+2.
    shifted = attention._plan(q, k, config(True, 3), none).pairs
    assert sorted(shifted) == [(i, j) for i in range(8) for j in range(min(i + 3, 8))]
    assert len(shifted) == 3 + 4 + 5 + 6 + 7 + 8 + 8 + 8 == 49
    # T not a multiple of the block: the last query block's padding reaches no further key block.
    assert len(attention._plan(jnp.ones((1, 15, 1, 4)), k, config(True, 0), none).pairs) == 36
    # The pairs planned are the pairs walked, forward and backward.
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 16, 1, 4)), jnp.float32)
    attend = lambda q, **kw: fn.dot_product_attention(q, x, x, block_size=2, **kw)
    assert _scan_lengths(lambda q: attend(q, is_causal=True), x) == [36]
    assert _scan_lengths(lambda q: attend(q, is_causal=True, q_offset=3), x) == [49]
    assert _scan_lengths(lambda q: attend(q), x) == [64]
    grad = jax.grad(lambda q: jnp.sum(attend(q, is_causal=True)))
    assert _scan_lengths(grad, x) == [36, 36]  # the forward's and the backward's


def test_padding_and_masks_skip_hidden_tiles_with_a_cond():
    q, k, v = _inputs(np.float32)
    program = lambda **kw: str(jax.make_jaxpr(lambda q: fn.dot_product_attention(q, k, v, block_size=2, **kw))(q))
    assert "cond" in program(kv_lengths=jnp.asarray(KV)) and "cond" in program(mask=jnp.asarray(MASK))
    assert "cond" not in program() and "cond" not in program(is_causal=True)  # nothing to skip at run time


def test_an_array_q_offset_skips_hidden_tiles_with_a_cond():
    # An array q_offset (decoding's) cannot prune pairs when planning, so each visited pair is
    # cond-skipped where the causal mask hides it: every pair planned, and a cond in the program.
    q, k, v = _inputs(np.float32)
    offsets = jnp.full((B,), 2, jnp.int32)
    program = lambda **kw: str(jax.make_jaxpr(lambda q: fn.dot_product_attention(q, k, v, block_size=2, **kw))(q))
    assert "cond" in program(is_causal=True, q_offset=offsets)
    assert "cond" in program(is_causal=True, q_offset=jnp.int32(2))  # a () array is an array too
    assert "cond" not in program(is_causal=True, q_offset=2)  # static: pruned when planning instead
    config = attention._Config(True, 1.0, 2, None, False, None)
    plan = attention._plan(q, k, config, attention._Extras(None, None, offsets, None, None))
    assert plan.skip and len(plan.pairs) == plan.nq * plan.nk


def test_the_new_paths_under_jit_vmap_and_second_order():
    q, k, v = (a[:1, :3, :, :2] for a in _gqa_inputs(np.float64, 1))  # 4 query heads share 1 kv head
    kv, key = jnp.asarray([2], jnp.int32), jax.random.key(1)
    keep = attention.attention_dropout_mask(key, (1, NQ, 3, 3), 0.3, block_size=2)
    masks = lambda offset: {"is_causal": True, "kv_lengths": kv, "q_offset": offset}
    one = jnp.asarray([1], jnp.int32)  # an array q_offset: per element visibility, cond-skipped tiles
    ours = lambda q, offset=one: jnp.sum(jnp.sin(fn.dot_product_attention(
        q, k, v, dropout_rate=0.3, dropout_key=key, block_size=2, **masks(offset))))  # fmt: skip
    theirs = lambda q, offset=1: jnp.sum(jnp.sin(reference(q, k, v, keep=keep, rate=0.3, **masks(offset))))
    second = jax.jit(jax.jacrev(jax.grad(ours)))(q)
    np.testing.assert_allclose(second, jax.jit(jax.hessian(theirs))(q), rtol=1e-8, atol=1e-10)
    qs = jnp.stack([q, 2 * q])
    batched = lambda f: jax.jit(jax.vmap(jax.grad(f)))(qs)
    np.testing.assert_allclose(batched(ours), batched(theirs), rtol=1e-10)
    # vmap over a traced q_offset: each offset's own causal alignment.
    offsets = jnp.asarray([0, 1, 2], jnp.int32)
    grads = jax.jit(jax.vmap(lambda o: jax.grad(ours)(q, o.reshape(1))))(offsets)
    for o, g in zip([0, 1, 2], grads, strict=True):
        np.testing.assert_allclose(g, jax.grad(theirs)(q, o), rtol=1e-10, atol=1e-12)


def test_no_inf_and_no_nan_is_ever_computed():
    """Hidden scores are finite, so jax.debug_infs and debug_nans pass a call and its gradient
    with rows that see nothing, padding, a mask, causality, grouped heads and dropout."""
    q, k, v = _gqa_inputs(np.float32, 2)
    f = lambda q, k, v: fn.dot_product_attention(
        q, k, v, is_causal=True, kv_lengths=jnp.asarray(KV), mask=jnp.asarray(MASK), q_offset=jnp.asarray([0, 1, 2]),
        dropout_rate=0.2, dropout_key=jax.random.key(0), block_size=3,
    )  # fmt: skip
    loss = lambda q, k, v: jnp.sum(f(q, k, v) ** 2)
    with jax.debug_infs(True), jax.debug_nans(True):
        jax.block_until_ready(f(q, k, v))
        jax.block_until_ready(jax.grad(loss, argnums=(0, 1, 2))(q, k, v))
        jax.block_until_ready(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))
        plain = lambda q: jnp.sum(fn.dot_product_attention(q, k, v, block_size=2) ** 2)
        jax.block_until_ready(jax.grad(plain)(q))


def _bf16_error():
    """The largest error of bf16 attention over S=2048 keys of nearly equal scores against
    float32: the row's sums of 2048 weights near 1 and of 2048 values near 0.6, added one
    block of 16 keys at a time, are far off in bf16 (8 bits) but not in float32."""
    rng = np.random.default_rng(8)
    q = jnp.asarray(0.01 * rng.standard_normal((1, 16, 2, 8)), jnp.float32)
    k = jnp.asarray(0.01 * rng.standard_normal((1, 2048, 2, 8)), jnp.float32)
    v = jnp.asarray(0.6 + 0.1 * rng.standard_normal((1, 2048, 2, 8)), jnp.float32)
    exact = reference(q, k, v)
    low = jax.jit(lambda q, k, v: fn.dot_product_attention(q, k, v, block_size=16))(
        *(a.astype(jnp.bfloat16) for a in (q, k, v))
    )
    return float(jnp.max(jnp.abs(low.astype(jnp.float32) - exact)))


BF16_TOLERANCE = 1e-2  # float32 sums: 1.7e-3 (the output's bf16 rounding); bf16 sums: 4.7e-2


def test_bf16_attention_accumulates_in_float32(monkeypatch):
    assert _bf16_error() < BF16_TOLERANCE
    # The same check fails with the sums kept in bf16: it can tell.
    monkeypatch.setattr(attention, "_accumulator", lambda dtype: jnp.dtype(dtype))
    assert _bf16_error() > BF16_TOLERANCE


def _torch_sdpa(torch, q, k, v, **kwargs):
    """torch's SDPA on our layout (transposed in and out) in float64, and its gradients for
    the cotangent g."""
    tq, tk, tv = (torch.tensor(np.asarray(a).transpose(0, 2, 1, 3), requires_grad=True) for a in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, **kwargs)
    g = np.random.default_rng(9).standard_normal(out.shape)
    out.backward(torch.tensor(g))
    grads = [a.grad.numpy().transpose(0, 2, 1, 3) for a in (tq, tk, tv)]
    return out.detach().numpy().transpose(0, 2, 1, 3), grads, jnp.asarray(g.transpose(0, 2, 1, 3))


def _ours_with_grads(f, q, k, v, g):
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(g)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_query_attention_matches_torch_enable_gqa(kv_heads):
    torch = pytest.importorskip("torch")
    q, k, v = _gqa_inputs(np.float64, kv_heads, t=6, s=9)
    v = np.concatenate([v, v[..., :1]], axis=-1)  # torch wants value_dim == head_dim
    theirs, their_grads, g = _torch_sdpa(torch, q, k, v, is_causal=True, enable_gqa=True)
    f = lambda q, k, v: fn.dot_product_attention(q, k, v, is_causal=True, block_size=4)
    ours, our_grads = _ours_with_grads(f, q, k, v, g)
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)
    for a, b in zip(our_grads, their_grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_q_offset_s_minus_t_matches_torch_causal_lower_right():
    torch = pytest.importorskip("torch")
    from torch.nn.attention.bias import causal_lower_right

    q, k, v = _inputs(np.float64, 4, 9)
    v = np.concatenate([v, v[..., :1]], axis=-1)
    theirs, their_grads, g = _torch_sdpa(torch, q, k, v, attn_mask=causal_lower_right(4, 9))
    f = lambda q, k, v: fn.dot_product_attention(q, k, v, is_causal=True, q_offset=9 - 4, block_size=3)
    ours, our_grads = _ours_with_grads(f, q, k, v, g)
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)
    for a, b in zip(our_grads, their_grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


_q = jnp.ones((2, 3, 4, 8))
_kv = jnp.ones((2, 5, 2, 8))
_TORCH = r"look like \(batch, heads, T, head_dim\), torch's layout.*x\.transpose\(0, 2, 1, 3\)"
NEW_BAD = [
    (lambda: fn.dot_product_attention(_q, jnp.ones((2, 5, 3, 8)), jnp.ones((2, 5, 3, 8))),
     ValueError, r"kv_heads = 3 \(axis 2\) must divide q's heads = 4"),
    (lambda: fn.dot_product_attention(jnp.ones((2, 4, 6, 8)), jnp.ones((2, 2, 5, 8)), jnp.ones((2, 2, 5, 8))),
     ValueError, "kv_heads = 5.*" + _TORCH),  # torch's (batch, heads, T, head_dim) with GQA: an error
    # torch's self-attention shapes read as (batch, T, heads, head_dim) are valid; its (T, S) mask is not
    (lambda: fn.dot_product_attention(*[jnp.ones((2, 4, 6, 8))] * 3, mask=jnp.ones((6, 6), bool)),
     ValueError, r"mask must broadcast to \(batch, heads, T, S\) = \(2, 6, 4, 4\).*" + _TORCH),
    (lambda: fn.dot_product_attention(_q, _kv, _kv, dropout_rate=1.0, dropout_key=KEY),
     ValueError, "dropout_rate must be >= 0.0 and < 1.0, got 1.0"),
    (lambda: fn.dot_product_attention(_q, _kv, _kv, dropout_rate=-0.1, dropout_key=KEY),
     ValueError, "dropout_rate must be >= 0.0 and < 1.0, got -0.1"),
    (lambda: fn.dot_product_attention(_q, _kv, _kv, dropout_rate=0.1),
     ValueError, "dropout_rate 0.1 needs a dropout_key"),
    (lambda: fn.dot_product_attention(_q, _kv, _kv, dropout_rate=0.1, dropout_key=jnp.ones(2)),
     TypeError, r"dropout_key must be a PRNG key \(jax.random.key\(0\) or jax.random.PRNGKey\(0\)\), got float"),
    (lambda: fn.dot_product_attention(_q, _kv, _kv, is_causal=True, q_offset=-1),
     ValueError, r"q_offset \(the number of keys before query 0\) must be >= 0, got -1"),
    (lambda: fn.dot_product_attention(_q, _kv, _kv, is_causal=True, q_offset=np.asarray([0, -2])),
     ValueError, "q_offset .* must be >= 0, got -2"),
    (lambda: fn.dot_product_attention(_q, _kv, _kv, is_causal=True, q_offset=jnp.zeros((3,), jnp.int32)),
     ValueError, r"q_offset must be an int or have shape \(\) or \(batch,\) = \(2,\), got shape \(3,\)"),
    (lambda: fn.dot_product_attention(_q, _kv, _kv, is_causal=True, q_offset=jnp.zeros((2,))),
     TypeError, "q_offset must have an integer dtype, got float"),
    (lambda: fn.dot_product_attention(_q, _kv, _kv, is_causal=True, q_offset=2.0),
     TypeError, "q_offset must be an int or an integer array"),
    (lambda: fn.dot_product_attention(_q, _kv, _kv, is_causal=True, q_offset=True),
     TypeError, "q_offset must be an int or an integer array, got bool"),
    (lambda: fn.dot_product_attention(_q, _kv, _kv, mask=np.where(np.eye(3, 5) > 0, 0.0, -np.inf)),
     TypeError, r"mask == 0.*mask != 0.*holds negative values: an additive mask, so mask == 0"),
    (lambda: fn.dot_product_attention(_q, _kv, _kv, mask=np.eye(3, 5)),
     TypeError, r"additive float mask.*converts with mask == 0; a multiplicative one.*with mask != 0.*only 0 and 1"),
    (lambda: attention.attention_dropout_mask(KEY, (2, 3, 4), 0.1),
     ValueError, r"shape must be \(batch, heads, T, S\)"),
    (lambda: attention.attention_dropout_mask(KEY, (2, 3, 4, 5), 1.5),
     ValueError, "dropout_rate must be >= 0.0 and < 1.0"),
]  # fmt: skip


@pytest.mark.parametrize(("call", "error", "message"), NEW_BAD)
def test_bad_new_arguments_are_named_before_anything_compiles(call, error, message):
    with pytest.raises(error, match=message):
        call()
    with pytest.raises(error, match=message):  # and inside a jit (values closed over stay concrete)
        jax.jit(lambda: call())()


def test_a_traced_q_offset_and_dropout_rate_are_checked_only_for_their_kind():
    f = jax.jit(lambda o, r: fn.dot_product_attention(
        _q, _kv, _kv, is_causal=True, q_offset=o, dropout_rate=r, dropout_key=KEY))  # fmt: skip
    assert np.all(np.isfinite(f(jnp.asarray([1, 2], jnp.int32), jnp.float32(0.1))))
    with pytest.raises(ValueError, match="q_offset must be an int or have shape"):
        f(jnp.zeros((3,), jnp.int32), jnp.float32(0.1))


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
