"""Low precision (float16, bfloat16): what accumulates does so in at least float32.

Each test is one of issue #23's failures, tried in both low-precision dtypes; each fails on the
code before the fix (``benchmarks/precision_table.py`` prints them side by side).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcnet as fn
from funcnet import embeddings, ops
from funcnet.losses import sigmoid_binary_cross_entropy
from funcnet.normalization import rms_norm

LOW = [jnp.float16, jnp.bfloat16]
KEY = jax.random.PRNGKey(0)


def _regression(dtype, rows=4096, scale=10.0):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(rows, 8)), dtype)
    y = jnp.asarray(scale * rng.normal(size=(rows, 1)), dtype)
    return x, y


def _net(dtype):
    return fn.serial(fn.Dense(16, fn.tanh, dtype=dtype), fn.Dense(1, fn.linear, dtype=dtype))


@pytest.mark.parametrize("dtype", LOW)
def test_a_low_precision_fit_does_not_report_an_overflowed_loss_total_as_divergence(dtype):
    """A loss near 100 over 4,096 rows: the epoch's total (~4e5) overflows float16 (max 65,504)."""
    x, y = _regression(dtype)
    net = _net(dtype)
    _, params = net.init(KEY, (-1, 8))
    out = fn.fit(
        net,
        fn.mean_squared_error,
        fn.sgd(0.01),
        params,
        (x, y),
        (x, y),
        epochs=1,
        eval_every=1,
        batch_size=32,
        key=KEY,
        metrics={"accuracy": lambda p, t: fn.mean_squared_error(p, t)},
        eval_batch_size=4096,
    )
    assert not bool(out.diverged)
    assert out.history.train_loss.dtype == jnp.float32
    assert 50 < float(out.history.train_loss[0]) < 200
    assert 50 < float(out.history.eval_loss[0]) < 200
    assert 50 < float(out.history.eval_metrics["accuracy"][0]) < 200
    assert out.params[0].W.dtype == dtype  # the params keep their dtype


@pytest.mark.parametrize("dtype", LOW)
def test_a_masked_last_batch_averages_row_losses_in_float32(dtype):
    """batch_size 4,000 of 4,001 rows: the masked mean sums 4,000 row losses near 100."""
    x, y = _regression(dtype, rows=4001)
    net = _net(dtype)
    _, params = net.init(KEY, (-1, 8))
    out = fn.fit(net, fn.mean_squared_error, fn.sgd(0.001), params, (x, y), epochs=1, batch_size=4000, key=KEY)
    assert not bool(out.diverged)
    assert 50 < float(out.history.train_loss[0]) < 200


@pytest.mark.parametrize("dtype", LOW)
def test_losses_of_large_batches_are_their_mean_not_an_overflowed_total(dtype):
    x, y = _regression(dtype, rows=4096, scale=30.0)
    loss = fn.mean_squared_error(x[:, :1], y)
    assert loss.dtype == dtype and np.isfinite(float(loss))
    expected = float(jnp.mean((x[:, :1].astype(jnp.float32) - y.astype(jnp.float32)) ** 2))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-2)
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(70_000, 3)) * 20, dtype)
    labels = jnp.zeros((70_000,), jnp.int32)
    ce = fn.softmax_cross_entropy(logits, labels)
    expected = float(-jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32))[:, 0]))
    assert ce.dtype == dtype
    np.testing.assert_allclose(float(ce), expected, rtol=2e-2)
    assert float(fn.accuracy(logits, labels)) == pytest.approx(float(jnp.mean(jnp.argmax(logits, -1) == 0)), abs=1e-2)


@pytest.mark.parametrize("dtype", LOW)
def test_layer_norm_statistics_are_computed_in_float32(dtype):
    """float16's 300**2 overflows: the variance was inf and every output 0."""
    x = jnp.asarray([[300.0, -300.0, 100.0, -100.0]], dtype)
    y = fn.layer_norm(x, jnp.ones((4,), dtype), jnp.zeros((4,), dtype))
    assert y.dtype == dtype
    expected = np.array([300, -300, 100, -100]) / np.sqrt(50_000)
    np.testing.assert_allclose(np.asarray(y, np.float32)[0], expected, rtol=1e-2)
    weights = jnp.arange(4)[None].astype(dtype)
    ones, zeros = jnp.ones((4,), dtype), jnp.zeros((4,), dtype)
    grads = jax.grad(lambda x: jnp.sum(fn.layer_norm(x, ones, zeros) * weights))(x)
    assert np.all(np.isfinite(np.asarray(grads, np.float32))) and float(jnp.max(jnp.abs(grads))) > 0


def _wide_reference(f):
    """``f`` computed in float32 and its result cast back: what a low-precision op should equal."""

    def reference(*args):
        dtype = args[0].dtype
        wide = [a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a for a in args]
        return f(*wide).astype(dtype)

    return reference


def _layer_norm_reference(x, gamma, beta):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean((x - mean) ** 2, axis=-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + 1e-5) * gamma[None] + beta[None]


def _rotary_reference(x, positions):
    """Rotary embedding (split halves) as Hugging Face writes it: x cos + rotate_half(x) sin."""
    half = x.shape[-1] // 2
    angles = positions.astype(x.dtype)[:, None] * jnp.asarray(10000.0 ** (-np.arange(half)[None] / half), x.dtype)
    angles = jnp.concatenate([angles, angles], axis=-1)[None, :, None, :]
    return x * jnp.cos(angles) + jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1) * jnp.sin(angles)


def _attention_reference(q, k, v, q_offset=None):
    """Softmax attention written out: kv head n // (heads // kv_heads) for query head n, and with
    ``q_offset`` ((batch,) or an int) causal, query t seeing keys s <= t + q_offset."""
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    if q_offset is not None:
        T, S = q.shape[1], k.shape[1]
        offset = jnp.reshape(jnp.asarray(q_offset, jnp.int32), (-1, 1, 1, 1))
        seen = (
            jnp.arange(S, dtype=jnp.int32)[None, None, None]
            <= jnp.arange(T, dtype=jnp.int32)[None, None, :, None] + offset
        )
        scores = jnp.where(seen, scores, -jnp.inf)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)


def _cases(dtype):
    rng = np.random.default_rng(0)
    a = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
    away = lambda *shape: jnp.asarray(np.where(rng.random(shape) < 0.5, -1, 1) * (0.2 + rng.random(shape)), dtype)
    return {
        "weight_multiply": (fn.weight_multiply, lambda x, W: x @ W, (a(4, 3), a(3, 2))),
        "bias_add": (fn.bias_add, lambda x, B: x + B, (a(4, 3), a(1, 3))),
        "sigmoid": (fn.sigmoid, jax.nn.sigmoid, (a(4, 3),)),
        "tanh": (fn.tanh, jnp.tanh, (a(4, 3),)),
        "relu": (fn.relu, jax.nn.relu, (away(4, 3),)),
        "gelu": (ops.gelu, lambda x: jax.nn.gelu(x, approximate=False), (a(4, 3) * 2,)),
        "gelu_tanh": (ops.gelu_tanh, lambda x: jax.nn.gelu(x, approximate=True), (a(4, 3) * 2,)),
        "rotary_embedding": (
            embeddings.rotary_embedding,
            lambda x, p: _rotary_reference(x, p),
            (a(2, 5, 2, 6), jnp.asarray([0, 1, 7, 300, 4000], jnp.int32)),
        ),
        "dot_product_attention (grouped-query)": (
            lambda q, k, v: fn.dot_product_attention(q, k, v, block_size=3),  # tiles with remainders
            _attention_reference,
            (a(2, 5, 4, 8), a(2, 7, 2, 8), a(2, 7, 2, 8)),
        ),
        "dot_product_attention (causal, q_offset per row)": (
            lambda q, k, v, o: fn.dot_product_attention(q, k, v, is_causal=True, q_offset=o, block_size=2),
            _attention_reference,
            (a(2, 3, 2, 8), a(2, 6, 1, 8), a(2, 6, 1, 8), jnp.asarray([3, 1], jnp.int32)),  # one kv head
        ),
        "dot_product_attention (causal, q_offset=S-T)": (
            lambda q, k, v: fn.dot_product_attention(q, k, v, is_causal=True, q_offset=3, block_size=2),
            lambda q, k, v: _attention_reference(q, k, v, q_offset=3),
            (a(2, 3, 4, 8), a(2, 6, 2, 8), a(2, 6, 2, 8)),
        ),
        "layer_norm": (fn.layer_norm, _layer_norm_reference, (a(4, 6) * 3, a(6), a(6))),
        "rms_norm": (
            rms_norm,
            lambda x, g: x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * g[None],
            (a(4, 6) * 3 + 1, a(6)),
        ),
        "mean_squared_error": (
            fn.mean_squared_error,
            lambda p, t: jnp.sum((p - t) ** 2) / p.shape[0],
            (a(8, 3), a(8, 3)),
        ),
        "softmax_cross_entropy": (
            fn.softmax_cross_entropy,
            lambda z, t: -jnp.sum(t * jax.nn.log_softmax(z)) / z.shape[0],
            (a(8, 3), jax.nn.one_hot(jnp.arange(8) % 3, 3, dtype=dtype)),
        ),
        "sigmoid_binary_cross_entropy": (
            sigmoid_binary_cross_entropy,
            lambda z, t: jnp.mean(jnp.logaddexp(0, z) - z * t),
            (a(8, 3) * 3, jnp.asarray(rng.random((8, 3)), dtype)),
        ),
    }


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("name", list(_cases(jnp.float32)))
def test_check_vjp_in_low_precision_with_its_default_tolerances(name, dtype):
    """The claim of ``check_vjp``'s low-precision tolerances (float16 1e-2, bfloat16 2e-2): every op
    and loss passes against its float32 reference cast back, and finite differences in float64."""
    op, reference, args = _cases(dtype)[name]
    fn.check_vjp(op, _wide_reference(reference), *args)


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_check_vjp_still_catches_a_wrong_backward(dtype):
    from funcnet import normalization

    def forgetful(eps, residuals, output_grad):
        x_hat, inverse, gamma = residuals
        g = output_grad.astype(jnp.float32) * gamma.astype(jnp.float32)[None]
        dx = (g - x_hat.astype(jnp.float32) * jnp.mean(g * x_hat.astype(jnp.float32), -1, keepdims=True)) * inverse
        return dx.astype(x_hat.dtype), jnp.sum(output_grad * x_hat, 0), jnp.sum(output_grad, 0)  # no - mean(g)

    wrong = jax.custom_vjp(normalization._layer_norm, nondiff_argnums=(3,))
    wrong.defvjp(normalization._layer_norm_fwd, forgetful)
    _, _, args = _cases(dtype)["layer_norm"]
    args = (args[0] + 2, *args[1:])  # a mean far from 0, so forgetting its gradient matters
    with pytest.raises(AssertionError, match="disagree"):
        fn.check_vjp(lambda x, g, b: wrong(x, g, b, 1e-5), _wide_reference(_layer_norm_reference), *args)


# --- Mixed precision and loss scaling ---------------------------------------------------------


def _digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = (digits.data / 16).astype(np.float32), digits.target.astype(np.int32)
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def _digits_net():
    init = dict(w_init=fn.glorot_normal, b_init=fn.zeros, dtype=jnp.float32)
    return fn.serial(fn.Dense(64, fn.tanh, **init), fn.Dense(10, fn.linear, **init))


def _digits_accuracy(net, loss, optimizer, epochs, **kw):
    train, test = _digits()
    _, params = net.init(jax.random.PRNGKey(0), (-1, 64))
    out = fn.fit(
        net,
        loss,
        optimizer,
        params,
        train,
        test,
        epochs=epochs,
        eval_every=epochs,
        batch_size=32,
        key=jax.random.PRNGKey(1),
        metrics={"accuracy": fn.accuracy},
        **kw,
    )
    assert not bool(out.diverged)
    return float(out.history.eval_metrics["accuracy"][-1]), out


def test_mixed_precision_is_a_value_with_float32_master_params_and_outputs():
    net = _digits_net()
    assert fn.mixed_precision(net, jnp.bfloat16) == fn.mixed_precision(_digits_net(), "bfloat16")
    assert fn.mixed_precision(net, jnp.bfloat16) != fn.mixed_precision(net, jnp.float16)
    layer = fn.mixed_precision(fn.serial(fn.Dense(4, dtype=jnp.float16), fn.Dense(2, fn.linear)), jnp.bfloat16)
    shape, params = layer.init(KEY, (-1, 3))
    assert shape == (-1, 2) and {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype("float32")}
    x = jnp.ones((5, 3), jnp.float32)
    y = layer.apply(params, x)
    assert y.dtype == jnp.float32 and y.shape == jax.eval_shape(layer.apply, params, x).shape == (5, 2)
    inner = fn.serial(fn.Dense(4), fn.Dense(2, fn.linear))
    low = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
    np.testing.assert_array_equal(y, inner.apply(low, x.astype(jnp.bfloat16)).astype(jnp.float32))
    grads = jax.grad(lambda p: jnp.sum(layer.apply(p, x)))(params)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(grads)} == {jnp.dtype("float32")}
    assert "Total params: 26" in fn.summary(layer, (-1, 3))
    with pytest.raises(ValueError, match="mixed_precision: compute_dtype must be bfloat16 or float16, got"):
        fn.mixed_precision(net, jnp.float32)
    with pytest.raises(TypeError, match="mixed_precision: layer must be a Layer"):
        fn.mixed_precision("net", jnp.bfloat16)


def test_a_bfloat16_network_on_the_digits_is_within_one_point_of_float32():
    full, _ = _digits_accuracy(_digits_net(), fn.softmax_cross_entropy, fn.momentum(0.05, 0.9), 10)
    half, out = _digits_accuracy(
        fn.mixed_precision(_digits_net(), jnp.bfloat16), fn.softmax_cross_entropy, fn.momentum(0.05, 0.9), 10
    )
    assert full > 0.85 and abs(full - half) <= 0.01, (full, half)
    assert out.params[0].W.dtype == jnp.float32


def weighted_cross_entropy(prediction, target):
    """A loss a million times smaller (an auxiliary loss, or a mean over many positions): its
    gradients, ~1e-9, are below float16's smallest number (6e-8)."""
    return 1e-6 * fn.softmax_cross_entropy(prediction, target)


@pytest.mark.slow  # three fits of the digits
def test_float16_fails_without_loss_scaling_and_trains_with_it():
    optimizer = fn.momentum(0.05e6, 0.9)  # the learning rate scaled up by the million
    full, _ = _digits_accuracy(_digits_net(), weighted_cross_entropy, optimizer, 10)
    half = fn.mixed_precision(_digits_net(), jnp.float16)
    unscaled, _ = _digits_accuracy(half, weighted_cross_entropy, optimizer, 10)
    scaled, _ = _digits_accuracy(half, weighted_cross_entropy, optimizer, 10, loss_scale=fn.DynamicLossScale())
    assert full > 0.85 and unscaled < 0.6 and abs(scaled - full) <= 0.01, (full, unscaled, scaled)


def test_dynamic_loss_scale_skips_and_halves_on_a_non_finite_gradient_and_grows_after_its_period():
    scaling = fn.DynamicLossScale(initial=8.0, period=3)
    state = scaling.init()
    grads, finite = scaling.unscale(state, {"w": jnp.asarray([8.0, 16.0], jnp.float16)})
    np.testing.assert_array_equal(grads["w"], [1.0, 2.0])
    assert grads["w"].dtype == jnp.float32 and bool(finite)  # unscaled in float32, for the optimizer
    assert not bool(scaling.unscale(state, {"w": jnp.asarray([jnp.inf, 1.0], jnp.float16)})[1])
    states = [state]
    for ok in [True, True, True, False, False, True]:
        states.append(scaling.adjust(states[-1], jnp.asarray(ok)))
    assert [float(s.scale) for s in states] == [8, 8, 8, 16, 8, 4, 4]
    assert [int(s.counter) for s in states] == [0, 1, 2, 0, 0, 0, 1]
    floor = fn.DynamicLossScale(initial=2.0, min_scale=1.0)
    assert float(floor.adjust(floor.adjust(floor.init(), jnp.asarray(False)), jnp.asarray(False)).scale) == 1.0


def test_fit_skips_the_steps_a_too_large_scale_overflows_and_trains_on():
    """A scale of 2**40 overflows float16 gradients: those steps are skipped and the scale halved
    until it fits, and the run trains (never reported diverged)."""
    half = fn.mixed_precision(_digits_net(), jnp.float16)
    accuracy, _ = _digits_accuracy(
        half,
        fn.softmax_cross_entropy,
        fn.momentum(0.05, 0.9),
        5,
        loss_scale=fn.DynamicLossScale(initial=2.0**40, max_scale=2.0**40),
    )
    assert accuracy > 0.85


# --- issue "Nothing silently wrong, round 4" ---------------------------------------------------


def test_dynamic_loss_scale_never_grows_past_its_max_scale():
    """Growing without a cap reached inf after 113 doublings; from then on every step was skipped
    (inf / 2 is inf), the loss froze, and nothing was reported."""
    scaling = fn.DynamicLossScale(period=1)
    state = scaling.init()
    for _ in range(200):
        state = scaling.adjust(state, jnp.asarray(True))
    assert float(state.scale) == 2.0**24
    capped = fn.DynamicLossScale(initial=4.0, period=1, max_scale=16.0)
    state = capped.init()
    scales = []
    for ok in [True, True, True, False, True]:
        state = capped.adjust(state, jnp.asarray(ok))
        scales.append(float(state.scale))
    assert scales == [8, 16, 16, 8, 16]
    with pytest.raises(ValueError, match="DynamicLossScale: initial must be between min_scale"):
        fn.DynamicLossScale(initial=2.0**30)


def _small_regression(dtype, rows=64):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 4))
    return jnp.asarray(x, dtype), jnp.asarray(x @ rng.normal(size=(4, 1)), dtype)


def nan_gradient_loss(prediction, target):
    """A finite loss whose gradient is NaN at every point (0 * the derivative of sqrt at 0)."""
    return fn.mean_squared_error(prediction, target) + 0 * jnp.mean(jnp.sqrt(0 * prediction))


def test_a_run_whose_every_step_is_skipped_is_reported_diverged():
    """Gradients non-finite even at min_scale: no scale can help; the run never trains, and it
    used to end with diverged=False and a frozen, finite loss."""
    x, y = _small_regression(jnp.float32)
    net = fn.mixed_precision(fn.Dense(1, fn.linear), jnp.float16)
    _, params = net.init(KEY, (-1, 4))
    out = fn.fit(
        net,
        nan_gradient_loss,
        fn.sgd(0.01),
        params,
        (x, y),
        epochs=5,
        batch_size=16,
        key=KEY,
        loss_scale=fn.DynamicLossScale(initial=4.0),
    )
    assert bool(out.diverged)
    assert int(out.stopped_epoch) < 5
    for a, b in zip(jax.tree_util.tree_leaves(out.params), jax.tree_util.tree_leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_skipped_step_keeps_params_optimizer_state_and_layer_state():
    """A step whose gradients are not finite changes nothing but the scale."""
    x, y = _small_regression(jnp.float16)
    net = fn.serial(
        fn.Dense(4, fn.tanh, dtype=jnp.float16),
        fn.BatchNorm(dtype=jnp.float16),
        fn.Dense(1, fn.linear, dtype=jnp.float16),
    )
    _, params = net.init(KEY, (-1, 4))
    optimizer = fn.momentum(0.01)
    out = fn.fit(
        net,
        nan_gradient_loss,
        optimizer,
        params,
        (x, y),
        epochs=1,
        batch_size=64,  # one step
        key=KEY,
        loss_scale=fn.DynamicLossScale(initial=2.0**10),  # above min_scale: skipped, not diverged
    )
    assert not bool(out.diverged)
    for a, b in zip(jax.tree_util.tree_leaves(out.params), jax.tree_util.tree_leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    expected = optimizer.init(fn.split_state(params)[0])
    for a, b in zip(jax.tree_util.tree_leaves(out.opt_state), jax.tree_util.tree_leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)


def test_unscaled_gradients_of_float16_params_stay_in_float32():
    """Unscaled gradients were rounded back to float16, where one below 6e-8 is 0."""
    scaling = fn.DynamicLossScale()
    grads, finite = scaling.unscale(scaling.init(), {"w": jnp.asarray([2.0**-12, 1.0], jnp.float16)})
    assert bool(finite) and grads["w"].dtype == jnp.float32
    np.testing.assert_array_equal(grads["w"], [2.0**-27, 2.0**-15])


def test_float16_params_train_on_gradients_below_float16s_smallest_number():
    """float16 params, a loss 2**-30 times smaller and a learning rate 2**30 times larger: the
    unscaled gradients (~1e-9) reach the optimizer in float32 and the params move."""
    x, y = _small_regression(jnp.float16)
    net = fn.Dense(1, fn.linear, w_init=fn.zeros, b_init=fn.zeros, dtype=jnp.float16)
    _, params = net.init(KEY, (-1, 4))
    # in float32 (2**-30 is 0 in float16); the backward hands float16 gradients ~1e-5 to the params
    tiny = lambda p, t: fn.mean_squared_error(p.astype(jnp.float32), t.astype(jnp.float32)) * 2.0**-30
    out = fn.fit(
        net,
        tiny,
        fn.sgd(0.05 * 2.0**30),
        params,
        (x, y),
        epochs=3,
        batch_size=16,
        key=KEY,
        loss_scale=fn.DynamicLossScale(),
    )
    assert not bool(out.diverged)
    assert float(jnp.max(jnp.abs(out.params.W.astype(jnp.float32)))) > 0.1


def test_mixed_precision_training_mode_updates_layer_state():
    """mixed_precision's training mode returns the inner layer's updated running statistics."""
    net = fn.mixed_precision(fn.serial(fn.Dense(3, fn.tanh), fn.BatchNorm(momentum=0.5)), jnp.bfloat16)
    _, params = net.init(KEY, (-1, 4))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4)), jnp.float32)
    _, new = fn.train_apply(net)(params, x)
    assert new[1].stats.mean.dtype == jnp.float32
    hidden = np.asarray(
        fn.Dense(3, fn.tanh).apply(
            jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params[0]), x.astype(jnp.bfloat16)
        ),
        np.float64,
    )
    np.testing.assert_allclose(new[1].stats.mean, 0.5 * hidden.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new[1].stats.var, 0.5 + 0.5 * hidden.var(0, ddof=1), rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(new[0]), jax.tree_util.tree_leaves(params[0]), strict=True):
        np.testing.assert_array_equal(a, b)  # the trainable master params stay
    out = fn.fit(net, fn.mean_squared_error, fn.sgd(0.01), params, (x, x[:, :3]), epochs=2, batch_size=4, key=KEY)
    assert not np.allclose(out.params[1].stats.mean, 0.0)
