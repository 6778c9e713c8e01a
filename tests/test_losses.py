"""Losses against plain jnp references, autodiff and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import funcnet as fn


def _data(batch, classes, dtype, seed=0):
    rng = np.random.default_rng(seed)
    logits = (3 * rng.standard_normal((batch, classes))).astype(dtype)
    labels = rng.integers(0, classes, batch).astype(np.int32)
    return logits, labels, np.eye(classes, dtype=dtype)[labels]


def mse_reference(p, t):
    return jnp.sum((p - t) ** 2) / p.shape[0]


def ce_reference(logits, target):
    return -jnp.sum(target * jax.nn.log_softmax(logits, axis=1)) / logits.shape[0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@settings(max_examples=settings().max_examples // 5)  # each compiles: 3 in CI, 60 with HYPOTHESIS_PROFILE=long
@given(batch=st.integers(1, 64), features=st.integers(1, 32))
def test_losses_match_reference_and_finite_differences(dtype, batch, features):
    logits, labels, one_hot = _data(batch, features, dtype)
    target = np.random.default_rng(1).standard_normal((batch, features)).astype(dtype)
    np.testing.assert_allclose(fn.mean_squared_error(logits, target), mse_reference(logits, target), rtol=1e-6)
    fn.check_vjp(fn.mean_squared_error, mse_reference, logits, target)
    np.testing.assert_allclose(fn.softmax_cross_entropy(logits, one_hot), ce_reference(logits, one_hot), rtol=1e-6)
    fn.check_vjp(fn.softmax_cross_entropy, ce_reference, logits, one_hot)
    # Integer labels: the same value and logits gradient, a float0 cotangent for the labels.
    np.testing.assert_allclose(fn.softmax_cross_entropy(logits, labels), ce_reference(logits, one_hot), rtol=1e-6)
    fn.check_vjp(
        fn.softmax_cross_entropy,
        lambda logits, t: ce_reference(logits, jax.nn.one_hot(t, features, dtype=logits.dtype)),
        logits,
        labels,
    )


def test_integer_labels_get_a_float0_cotangent():
    logits, labels, _ = _data(4, 3, np.float64)
    _, vjp = jax.vjp(fn.softmax_cross_entropy, logits, labels)
    _, label_grad = vjp(jnp.ones((), jnp.float64))
    assert label_grad.dtype == jax.dtypes.float0 and label_grad.shape == (4,)


def test_cross_entropy_hand_gradient_is_softmax_minus_target_over_rows():
    """The book's gradient and the categorical cross-entropy pair exactly."""
    logits, _, one_hot = _data(16, 10, np.float64)
    grad = jax.grad(fn.softmax_cross_entropy)(logits, one_hot)
    np.testing.assert_allclose(grad, (jax.nn.softmax(logits, axis=1) - one_hot) / 16, rtol=1e-12)
    np.testing.assert_allclose(grad, jax.grad(ce_reference)(logits, one_hot), rtol=1e-12)


def test_the_books_cross_entropy_forward_does_not_match_its_backward():
    """The book's forward is a binary-style sum; its autodiff gradient is not (p - t)/rows."""
    logits, _, one_hot = _data(16, 10, np.float64)

    def book_forward(logits, target, eps=1e-9):
        p = jnp.clip(jax.nn.softmax(logits, axis=1), eps, 1 - eps)
        return jnp.sum(-target * jnp.log(p) - (1 - target) * jnp.log(1 - p)) / logits.shape[0]

    book_hand_grad = (jax.nn.softmax(logits, axis=1) - one_hot) / 16
    assert np.max(np.abs(jax.grad(book_forward)(logits, one_hot) - book_hand_grad)) > 1e-3


def test_cross_entropy_is_stable_for_huge_logits():
    logits = jnp.array([[1e4, 0.0, -1e4], [-1e4, 1e4, 0.0]])
    loss, grad = jax.value_and_grad(fn.softmax_cross_entropy)(logits, jnp.array([0, 2]))
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(loss, 5e3, rtol=1e-12)  # row 0 is right; row 1 misses by 1e4; / 2 rows


def test_mse_target_gets_the_negated_gradient():
    p, t = np.ones((3, 2)), np.zeros((3, 2))
    gp, gt = jax.grad(fn.mean_squared_error, argnums=(0, 1))(p, t)
    np.testing.assert_allclose(gp, 2 * (p - t) / 3)
    np.testing.assert_allclose(gt, -gp)


def test_losses_under_jit_vmap_and_second_order():
    logits, _, one_hot = _data(6, 4, np.float64)
    for loss, target, ref in [
        (fn.softmax_cross_entropy, one_hot, ce_reference),
        (fn.mean_squared_error, one_hot, mse_reference),
    ]:
        np.testing.assert_allclose(jax.jit(jax.grad(loss))(logits, target), jax.grad(ref)(logits, target), rtol=1e-12)
        batched = jax.vmap(jax.grad(loss))(logits[:, None], target[:, None])
        np.testing.assert_allclose(
            batched[:, 0], jax.vmap(jax.grad(ref))(logits[:, None], target[:, None])[:, 0], rtol=1e-12
        )
        np.testing.assert_allclose(
            jax.jit(jax.jacrev(jax.grad(loss)))(logits, target),
            jax.jit(jax.hessian(ref))(logits, target),
            rtol=1e-9,
            atol=1e-14,
        )


def test_check_vjp_catches_a_wrong_loss_gradient():
    logits, _, one_hot = _data(5, 3, np.float64)

    @jax.custom_vjp
    def wrong_mse(p, t):
        return mse_reference(p, t)

    wrong_mse.defvjp(
        lambda p, t: (mse_reference(p, t), p - t), lambda d, g: (g * 2 * d, -g * 2 * d)
    )  # forgot to divide by rows
    with pytest.raises(AssertionError, match="argument 0 disagree"):
        fn.check_vjp(wrong_mse, mse_reference, logits, one_hot)


BAD = [
    (
        lambda: fn.mean_squared_error(jnp.ones((4, 1)), jnp.ones((4,))),
        ValueError,
        r"mean_squared_error: prediction and target must have the same shape.*\(4, 1\).*\(4,\)",
    ),
    (
        lambda: fn.mean_squared_error(jnp.ones((4, 1)), jnp.ones((4, 1), jnp.int32)),
        TypeError,
        "target must have a floating dtype, got int32",
    ),
    (
        lambda: fn.softmax_cross_entropy(jnp.ones((4, 3)), jnp.ones((4, 2))),
        ValueError,
        r"one-hot target must have the shape of logits, \(4, 3\), got \(4, 2\)",
    ),
    (
        lambda: fn.softmax_cross_entropy(jnp.ones((4, 3)), jnp.zeros((4, 1), jnp.int32)),
        ValueError,
        r"integer target must hold one class index per row of logits \(logits.shape=\(4, 3\)\), "
        r"shape \(4,\), got \(4, 1\)",
    ),
    (
        lambda: fn.softmax_cross_entropy(jnp.ones(3), jnp.zeros((1,), jnp.int32)),
        ValueError,
        "logits must be at least 2-D",
    ),
]


@pytest.mark.parametrize("call,error,message", BAD)
@pytest.mark.parametrize("jit", [False, True])
def test_bad_input_gets_a_clear_error(call, error, message, jit):
    with pytest.raises(error, match=message):
        jax.jit(call)() if jit else call()


def test_out_of_range_labels_are_caught_when_concrete():
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\) for the 3 classes of logits, got values from -1 to 2"):
        fn.softmax_cross_entropy(jnp.ones((3, 3)), jnp.array([0, 2, -1]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sequence_losses_average_over_every_position(dtype):
    """(batch, time, classes) logits: the mean over batch * time positions, three oracles."""
    rng = np.random.default_rng(2)
    logits = (2 * rng.standard_normal((3, 4, 5))).astype(dtype)
    labels = rng.integers(0, 5, (3, 4)).astype(np.int32)
    one_hot = np.eye(5, dtype=dtype)[labels]
    flat = lambda a: a.reshape(12, *a.shape[2:])
    np.testing.assert_allclose(
        fn.softmax_cross_entropy(logits, labels), fn.softmax_cross_entropy(flat(logits), flat(labels)), rtol=1e-6
    )
    sequence_ce = lambda logits, t: -jnp.sum(t * jax.nn.log_softmax(logits, axis=-1)) / 12
    fn.check_vjp(fn.softmax_cross_entropy, sequence_ce, logits, one_hot)
    fn.check_vjp(
        fn.softmax_cross_entropy,
        lambda logits, t: sequence_ce(logits, jax.nn.one_hot(t, 5, dtype=logits.dtype)),
        logits,
        labels,
    )
    target = rng.standard_normal((3, 4, 5)).astype(dtype)
    fn.check_vjp(fn.mean_squared_error, lambda p, t: jnp.sum((p - t) ** 2) / 12, logits, target)
    np.testing.assert_allclose(fn.accuracy(logits, labels), np.mean(logits.argmax(-1) == labels), rtol=1e-6)
    np.testing.assert_allclose(fn.accuracy(logits, one_hot), np.mean(logits.argmax(-1) == labels), rtol=1e-6)


def test_sequence_loss_shapes_are_checked():
    with pytest.raises(
        ValueError,
        match=r"integer target must hold one class index per row of logits "
        r"\(logits.shape=\(2, 3, 4\)\), shape \(2, 3\), got \(2, 4\)",
    ):
        fn.softmax_cross_entropy(jnp.ones((2, 3, 4)), jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"accuracy: target must have shape \(2, 3\) \(integer labels\)"):
        fn.accuracy(jnp.ones((2, 3, 4)), jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="prediction and target must have the same shape"):
        fn.mean_squared_error(jnp.ones((2, 3, 4)), jnp.ones((2, 3)))


def test_concrete_labels_closed_over_inside_jit_are_checked_not_traced():
    labels = jnp.array([0, 2, 1])  # a concrete jax array, captured by the jitted function
    loss = jax.jit(lambda logits: fn.softmax_cross_entropy(logits, labels))(jnp.ones((3, 3)))
    np.testing.assert_allclose(loss, np.log(3), rtol=1e-12)
    shifted = labels + 1
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        jax.jit(lambda logits: fn.softmax_cross_entropy(logits, shifted))(jnp.ones((3, 3)))
