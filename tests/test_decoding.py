"""Generation with a KV cache: at every step the cached logits equal ``net.apply`` on the whole
prefix (learned and rotary positions, grouped-query heads, prompts of different lengths), and
``generate`` runs the loop as one program, compiled once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcnet as fn

KEY = jax.random.PRNGKey(0)
VOCAB, D = 13, 16


def _gpt(*, rope=None, num_kv_heads=None, learned=True, blocks=2):
    attention = lambda: fn.MultiHeadAttention(4, is_causal=True, rope=rope, num_kv_heads=num_kv_heads, block_size=4)
    block = lambda: [
        fn.residual(fn.LayerNorm(), attention()),
        fn.residual(fn.LayerNorm(), fn.Dense(2 * D, fn.gelu), fn.Dense(D, fn.linear)),
    ]
    layers = [fn.Embedding(VOCAB, D, w_init=fn.normal(0.5))]
    if learned:
        layers.append(fn.PositionalEmbedding(32, w_init=fn.normal(0.5)))
    for _ in range(blocks):
        layers += block()
    return fn.serial(*layers, fn.LayerNorm(), fn.Dense(VOCAB, fn.linear))


@pytest.fixture
def float32():
    with jax.enable_x64(False):
        yield


@pytest.mark.parametrize(
    "options",
    [{}, {"rope": 10000.0, "num_kv_heads": 2, "learned": False}, {"rope": 500.0, "num_kv_heads": 1}],
    ids=["learned", "rope-gqa", "rope-mqa-learned"],
)
def test_every_step_equals_a_full_recomputation_of_the_prefix(float32, options):
    net = _gpt(**options)
    _, params = net.init(KEY, (-1, 8))
    rng = np.random.default_rng(1)
    prompt = jnp.asarray(rng.integers(0, VOCAB, (3, 5)), jnp.int32)
    lengths = jnp.asarray([5, 2, 4], jnp.int32)  # rows 1 and 2 are right-padded
    cache = fn.init_cache(net, params, 3, 12)
    logits, cache = jax.jit(fn.prefill, static_argnums=0)(net, params, cache, prompt, lengths=lengths)
    step = jax.jit(fn.decode_step, static_argnums=0)
    sequences = [list(np.asarray(prompt[b, : int(lengths[b])])) for b in range(3)]
    # The prefix recomputed in one compiled shape: padded on the right to the cache's 12 positions,
    # which a causal network's logits at the prefix's positions do not see (a test of
    # test_attention.py checks the causal layer's outputs do not depend on the future).
    apply = jax.jit(lambda tokens: net.apply(params, tokens))
    full = lambda seq: apply(jnp.asarray([seq + [0] * (12 - len(seq))], jnp.int32))[0, : len(seq)]
    worst = 0.0
    for b in range(3):  # the prompt's logits at its real positions
        worst = max(worst, float(jnp.max(jnp.abs(logits[b, : int(lengths[b])] - full(sequences[b])))))
    last = jnp.stack([logits[b, int(lengths[b]) - 1] for b in range(3)])
    for _ in range(6):
        token = jnp.argmax(last, axis=-1).astype(jnp.int32)
        for b in range(3):
            sequences[b].append(int(token[b]))
        last, cache = step(net, params, cache, token)
        for b in range(3):
            worst = max(worst, float(jnp.max(jnp.abs(last[b] - full(sequences[b])[-1]))))
    assert worst <= 1e-5, worst
    np.testing.assert_array_equal(cache.position, lengths + 6)


def test_the_cache_test_fails_when_the_offset_is_ignored(float32, monkeypatch):
    """The comparison above can fail: a decode that forgets where the sequence is (positions from 0)."""
    from funcnet.embeddings import _PositionalEmbedding

    original = _PositionalEmbedding.decode
    monkeypatch.setattr(
        _PositionalEmbedding,
        "decode",
        lambda self, p, c, x, *, offset, **kw: original(self, p, c, x, offset=0 * offset),
    )
    net = _gpt()
    _, params = net.init(KEY, (-1, 8))
    prompt = jnp.asarray([[1, 2, 3, 4]], jnp.int32)
    cache = fn.init_cache(net, params, 1, 8)
    _, cache = fn.prefill(net, params, cache, prompt)
    logits, _ = fn.decode_step(net, params, cache, jnp.asarray([5], jnp.int32))
    expected = net.apply(params, jnp.asarray([[1, 2, 3, 4, 5]], jnp.int32))[0, -1]
    assert float(jnp.max(jnp.abs(logits[0] - expected))) > 1e-3


def test_generate_greedy_equals_the_argmax_loop_and_compiles_once(float32):
    net = _gpt(rope=10000.0, num_kv_heads=2, learned=False)
    _, params = net.init(KEY, (-1, 8))
    prompt = jnp.asarray([[1, 2, 3, 0], [4, 5, 0, 0]], jnp.int32)
    lengths = jnp.asarray([3, 2], jnp.int32)
    out = fn.generate(net, params, prompt, 5, key=KEY, top_k=1, prompt_lengths=lengths)
    assert out.shape == (2, 9)
    apply = jax.jit(lambda tokens: net.apply(params, tokens))  # one shape: right-padded prefixes (causal)
    for b in range(2):
        seq = [int(t) for t in prompt[b, : int(lengths[b])]]
        for _ in range(5):
            logits = apply(jnp.asarray([seq + [0] * (9 - len(seq))], jnp.int32))[0, len(seq) - 1]
            seq.append(int(jnp.argmax(logits)))
        np.testing.assert_array_equal(out[b, : len(seq)], seq)
    # Sampling: reproducible from the key, different for another; numbers do not recompile.
    a = fn.generate(net, params, prompt, 5, key=KEY, temperature=0.8, top_k=5, top_p=0.9, prompt_lengths=lengths)
    b = fn.generate(net, params, prompt, 5, key=KEY, temperature=0.8, top_k=5, top_p=0.9, prompt_lengths=lengths)
    np.testing.assert_array_equal(a, b)
    before = fn.decoding._generate._cache_size()
    fn.generate(net, params, prompt, 5, key=jax.random.PRNGKey(3), temperature=1.3, top_k=3, prompt_lengths=lengths)
    fn.generate(_gpt(rope=10000.0, num_kv_heads=2, learned=False), params, prompt, 5, key=KEY, top_p=0.5)
    assert fn.decoding._generate._cache_size() == before


def test_top_k_and_top_p_keep_the_right_tokens():
    from funcnet.decoding import _filtered

    logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    one = jnp.asarray(1.0)
    kept = lambda k, p: np.asarray(_filtered(logits, one, jnp.asarray(k), jnp.asarray(p))[0] > -1e30)
    np.testing.assert_array_equal(kept(2, 1.0), [1, 1, 0, 0, 0])
    np.testing.assert_array_equal(kept(5, 0.6), [1, 1, 0, 0, 0])  # 0.5 < 0.6: the second is needed
    np.testing.assert_array_equal(kept(5, 0.45), [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(kept(5, 0.01), [1, 0, 0, 0, 0])  # the most likely always stays
    np.testing.assert_array_equal(kept(5, 1.0), [1, 1, 1, 1, 1])


def test_top_p_stops_at_the_token_whose_mass_reaches_it_exactly():
    """The nucleus is the smallest set whose probability reaches top_p: a token whose higher-
    ranked tokens already hold exactly top_p is out (torch/HF: cumulative mass > top_p removed)."""
    from funcnet.decoding import _filtered

    logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    probabilities = jax.nn.softmax(-jnp.sort(-logits, axis=-1), axis=-1)[0]
    before = jnp.cumsum(probabilities) - probabilities  # as the filter computes it, bit for bit
    one, five = jnp.asarray(1.0), jnp.asarray(5)
    kept = lambda p: np.asarray(_filtered(logits, one, five, jnp.asarray(p))[0] > -1e30)
    np.testing.assert_array_equal(kept(before[1]), [1, 0, 0, 0, 0])  # the first reaches it alone
    np.testing.assert_array_equal(kept(before[2]), [1, 1, 0, 0, 0])
    np.testing.assert_array_equal(kept(before[3]), [1, 1, 1, 0, 0])


def test_bad_input_is_named():
    net = _gpt()
    _, params = net.init(KEY, (-1, 8))
    prompt = jnp.asarray([[1, 2, 3]], jnp.int32)
    with pytest.raises(ValueError, match="top_k must be an int in"):
        fn.generate(net, params, prompt, 2, key=KEY, top_k=VOCAB + 1)
    with pytest.raises(ValueError, match="top_p must be a number in"):
        fn.generate(net, params, prompt, 2, key=KEY, top_p=0.0)
    with pytest.raises(ValueError, match="greedy decoding pass top_k=1"):
        fn.generate(net, params, prompt, 2, key=KEY, temperature=0.0)
    with pytest.raises(ValueError, match="max_length = 32"):
        fn.generate(net, params, prompt, 40, key=KEY)
    with pytest.raises(ValueError, match="prompt_lengths must lie in"):
        fn.generate(net, params, prompt, 2, key=KEY, prompt_lengths=jnp.asarray([4]))
    cache = fn.init_cache(net, params, 1, 4)
    with pytest.raises(ValueError, match="do not fit the cache's max_length 4"):
        fn.prefill(net, params, cache, jnp.ones((1, 5), jnp.int32))
    with pytest.raises(ValueError, match=r"tokens must have shape \(batch,\)"):
        fn.decode_step(net, params, cache, jnp.ones((2,), jnp.int32))
    blind = fn.serial(fn.Embedding(VOCAB, D), fn.MultiHeadAttention(2), fn.Dense(VOCAB, fn.linear))
    _, p = blind.init(KEY, (-1, 4))
    with pytest.raises(TypeError, match="is_causal=True"):
        fn.prefill(blind, p, fn.init_cache(blind, p, 1, 4), prompt)
    rnn = fn.serial(fn.Embedding(VOCAB, D), fn.RNN(8), fn.Dense(VOCAB, fn.linear))
    _, p = rnn.init(KEY, (-1, 4))
    with pytest.raises(TypeError, match="recurrent layer"):
        fn.prefill(rnn, p, fn.init_cache(rnn, p, 1, 4), prompt)
