"""Losses against plain jnp references, autodiff and finite differences."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import funcnet as fn
from funcnet import losses
from funcnet.losses import sigmoid_binary_cross_entropy


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


# ignore_index: padded targets leave the loss (torch's cross_entropy(..., ignore_index=k) semantics)


def ce_ignore_reference(ignore_index):
    """Plain jnp: the mean over kept positions of -log_softmax at the label; 0 if none is kept."""

    def reference(logits, labels):
        keep = labels != ignore_index
        one_hot = jax.nn.one_hot(jnp.where(keep, labels, 0), logits.shape[-1], dtype=logits.dtype)
        picked = jnp.sum(one_hot * jax.nn.log_softmax(logits, axis=-1), axis=-1)
        count = jnp.maximum(jnp.sum(keep), 1).astype(logits.dtype)
        return -jnp.sum(jnp.where(keep, picked, jnp.zeros((), logits.dtype))) / count

    return reference


def _padded(shape, classes, dtype, ignore_index, ignored, seed=3):
    """Logits of ``shape + (classes,)`` and labels of ``shape`` with ``ignored`` positions padded:
    "some" (about a third, and a whole sequence or row), "none" or "all"."""
    rng = np.random.default_rng(seed)
    logits = (3 * rng.standard_normal((*shape, classes))).astype(dtype)
    labels = rng.integers(0, classes, shape).astype(np.int32)
    if ignored == "some":
        labels[rng.random(shape) < 0.35] = ignore_index
        labels[0] = ignore_index  # a whole row (sequence) of padding
        labels.flat[-1] = 1 if ignore_index != 1 else 2  # and at least one kept position
    elif ignored == "all":
        labels[...] = ignore_index
    return logits, labels


SHAPES = [(6,), (1,), (3, 5), (2, 1)]  # (batch,) or (batch, time), classes appended


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ignored", ["some", "none", "all"])
@pytest.mark.parametrize("ignore_index", [-100, -1, 0])
def test_ignore_index_matches_reference_and_finite_differences(dtype, shape, ignored, ignore_index):
    logits, labels = _padded(shape, 4, dtype, ignore_index, ignored if shape != (1,) or ignored != "some" else "all")
    loss = functools.partial(fn.softmax_cross_entropy, ignore_index=ignore_index)
    reference = ce_ignore_reference(ignore_index)
    np.testing.assert_allclose(
        loss(logits, labels), reference(logits, labels), rtol=1e-6 if dtype == np.float32 else 1e-12
    )
    fn.check_vjp(loss, reference, logits, labels)
    if ignored == "none" and ignore_index < 0:  # nothing to ignore: the plain loss, bit for bit
        np.testing.assert_array_equal(loss(logits, labels), fn.softmax_cross_entropy(logits, labels))


def test_ignore_index_gradient_is_softmax_minus_onehot_over_the_kept_count():
    logits, labels = _padded((4, 6), 5, np.float64, -1, "some")
    keep = labels != -1
    grad = jax.grad(fn.softmax_cross_entropy)(logits, labels, ignore_index=-1)
    one_hot = np.eye(5)[np.where(keep, labels, 0)]
    expected = (np.asarray(jax.nn.softmax(logits, axis=-1)) - one_hot) * keep[..., None] / keep.sum()
    np.testing.assert_allclose(grad, expected, rtol=1e-12, atol=1e-15)
    assert np.all(grad[~keep] == 0)


def test_all_ignored_gives_zero_and_a_zero_gradient_never_nan():
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 4)))
    labels = jnp.full((2, 3), -100, jnp.int32)
    value, grad = jax.value_and_grad(fn.softmax_cross_entropy)(logits, labels, ignore_index=-100)
    assert float(value) == 0.0 and not np.signbit(value)
    np.testing.assert_array_equal(grad, np.zeros((2, 3, 4)))


def test_ignore_index_equal_to_a_class_and_an_unrepresentable_one():
    """A padding class inside [0, classes) is dropped too; -1 with uint8 labels ignores nothing."""
    logits, labels = _padded((3, 4), 5, np.float64, 0, "some")
    kept = labels != 0
    np.testing.assert_allclose(
        fn.softmax_cross_entropy(logits, labels, ignore_index=0),
        fn.softmax_cross_entropy(logits[kept], labels[kept]),
        rtol=1e-12,
    )
    unsigned = labels.astype(np.uint8)
    np.testing.assert_array_equal(
        fn.softmax_cross_entropy(logits, unsigned, ignore_index=-1), fn.softmax_cross_entropy(logits, unsigned)
    )


@pytest.mark.parametrize("ignore_index", [-100, -1, 2])
@pytest.mark.parametrize("shape", [(4, 6), (5,)])
def test_ignore_index_against_torch(ignore_index, shape):
    """torch.nn.functional.cross_entropy(ignore_index=k, reduction='mean') as an independent oracle,
    float64: loss and logits gradient (torch wants the classes on axis 1)."""
    torch = pytest.importorskip("torch")
    logits, labels = _padded(shape, 5, np.float64, ignore_index, "some", seed=7)
    value, grad = jax.value_and_grad(fn.softmax_cross_entropy)(logits, labels, ignore_index=ignore_index)
    t_logits = torch.tensor(logits, requires_grad=True)
    t_value = torch.nn.functional.cross_entropy(
        torch.movedim(t_logits, -1, 1), torch.tensor(labels, dtype=torch.int64), ignore_index=ignore_index
    )
    t_value.backward()
    np.testing.assert_allclose(value, t_value.item(), rtol=1e-12)
    np.testing.assert_allclose(grad, t_logits.grad.numpy(), rtol=1e-10, atol=1e-15)


def test_all_ignored_is_where_funcnet_and_torch_differ():
    """torch's mean over no positions is 0/0 = NaN; funcnet's is 0 (documented)."""
    torch = pytest.importorskip("torch")
    logits = np.ones((2, 3, 4))
    t_value = torch.nn.functional.cross_entropy(
        torch.movedim(torch.tensor(logits), -1, 1), torch.full((2, 3), -1), ignore_index=-1
    )
    assert np.isnan(t_value.item())
    assert float(fn.softmax_cross_entropy(logits, np.full((2, 3), -1, np.int32), ignore_index=-1)) == 0.0


def _wrong_ignoring_loss(mistake):
    """The right forward with a backward that makes one of the mistakes someone would make."""
    reference = ce_ignore_reference(-1)

    @jax.custom_vjp
    def loss(logits, labels):
        return reference(logits, labels)

    def fwd(logits, labels):
        return reference(logits, labels), (logits, labels)

    def bwd(residuals, output_grad):
        logits, labels = residuals
        keep = labels != -1
        one_hot = jax.nn.one_hot(jnp.where(keep, labels, 0), logits.shape[-1], dtype=logits.dtype)
        diff = jax.nn.softmax(logits, axis=-1) - one_hot
        if mistake == "divides by every position":
            grad = jnp.where(keep[..., None], diff, 0) / labels.size
        elif mistake == "keeps the ignored rows":
            grad = diff / jnp.sum(keep).astype(logits.dtype)
        else:  # "unmasked one-hot": ignored rows get softmax alone (one_hot(-1) is a zero row)
            grad = jax.nn.softmax(logits, axis=-1) - jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
            grad = grad / jnp.sum(keep).astype(logits.dtype)
        return output_grad * grad, np.zeros(labels.shape, jax.dtypes.float0)

    loss.defvjp(fwd, bwd)
    return loss, reference


@pytest.mark.parametrize("mistake", ["divides by every position", "keeps the ignored rows", "unmasked one-hot"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_check_vjp_catches_a_wrong_ignoring_backward(mistake, dtype):
    logits, labels = _padded((3, 5), 4, dtype, -1, "some")
    wrong, reference = _wrong_ignoring_loss(mistake)
    with pytest.raises(AssertionError, match="argument 0 disagree"):
        fn.check_vjp(wrong, reference, logits, labels)
    fn.check_vjp(functools.partial(fn.softmax_cross_entropy, ignore_index=-1), reference, logits, labels)


def test_ignore_index_under_jit_vmap_and_second_order():
    logits, labels = _padded((4, 3), 5, np.float64, -1, "some")
    loss = functools.partial(fn.softmax_cross_entropy, ignore_index=-1)
    reference = ce_ignore_reference(-1)
    np.testing.assert_allclose(jax.jit(jax.grad(loss))(logits, labels), jax.grad(reference)(logits, labels), rtol=1e-12)
    static = jax.jit(fn.softmax_cross_entropy, static_argnames="ignore_index")
    np.testing.assert_allclose(static(logits, labels, ignore_index=-1), reference(logits, labels), rtol=1e-12)
    # fit's padded last batch: the loss of one row at a time under vmap; row 0 is all padding
    per_row = jax.vmap(lambda p, t: loss(p[None], t[None]))(logits, labels)
    np.testing.assert_allclose(
        per_row, [reference(p[None], t[None]) for p, t in zip(logits, labels, strict=True)], rtol=1e-12
    )
    assert float(per_row[0]) == 0.0
    grads = jax.vmap(jax.grad(lambda p, t: loss(p[None], t[None])))(logits, labels)
    np.testing.assert_array_equal(grads[0], np.zeros_like(grads[0]))
    np.testing.assert_allclose(
        jax.jit(jax.jacrev(jax.grad(loss)))(logits, labels),
        jax.hessian(reference)(logits, labels),
        rtol=1e-9,
        atol=1e-14,
    )


def test_two_equal_partials_give_the_same_loss_and_are_static():
    logits, labels = _padded((3, 4), 5, np.float64, -1, "some")
    first = functools.partial(fn.softmax_cross_entropy, ignore_index=-1)
    second = functools.partial(fn.softmax_cross_entropy, ignore_index=np.int64(-1))  # NumPy ints become ints
    np.testing.assert_array_equal(jax.jit(first)(logits, labels), jax.jit(second)(logits, labels))
    jaxpr = jax.make_jaxpr(first)(logits, labels)
    assert len(jaxpr.in_avals) == 2  # ignore_index is not an input of the program


def test_fit_with_ignore_index_compiles_once_and_keeps_padding_out_of_the_last_batch():
    """A padded last batch (7 rows, batches of 4) holding an ignored row: finite, and a second fit
    with the same partial compiles nothing. (fit's own label check refuses labels outside
    [0, classes), so a padding class inside it is used here.)"""
    rng = np.random.default_rng(0)
    net = fn.serial(fn.Dense(5, fn.linear))
    x = rng.standard_normal((7, 3))
    y = rng.integers(1, 5, 7).astype(np.int32)
    y[[3, 6]] = 0
    params = net.init(jax.random.PRNGKey(0), (-1, 3))[1]
    loss = functools.partial(fn.softmax_cross_entropy, ignore_index=0)
    run = lambda: fn.fit(net, loss, fn.sgd(0.1), params, (x, y), epochs=2, batch_size=4, key=jax.random.PRNGKey(1))
    first = run()
    assert np.all(np.isfinite(first.history.train_loss))
    compiled = []
    handler = logging.Handler()
    handler.emit = lambda record: (
        compiled.append(record.getMessage()) if record.getMessage().startswith("Compiling") else None
    )
    logging.getLogger("jax").addHandler(handler)
    jax.config.update("jax_log_compiles", True)
    try:
        second = run()
    finally:
        jax.config.update("jax_log_compiles", False)
        logging.getLogger("jax").removeHandler(handler)
    assert compiled == []
    np.testing.assert_array_equal(first.history.train_loss, second.history.train_loss)


IGNORE_BAD = [
    (
        lambda: fn.softmax_cross_entropy(jnp.ones((4, 3)), jnp.zeros(4, jnp.int32), ignore_index=1.0),
        TypeError,
        "softmax_cross_entropy: ignore_index must be an int or None, got float",
    ),
    (
        lambda: fn.softmax_cross_entropy(jnp.ones((4, 3)), jnp.zeros(4, jnp.int32), ignore_index=True),
        TypeError,
        "ignore_index must be an int or None, got bool",
    ),
    (
        lambda: fn.softmax_cross_entropy(jnp.ones((4, 3)), jnp.zeros((4, 3)), ignore_index=-1),
        TypeError,
        "ignore_index applies to integer class labels only, got a float64 target",
    ),
]


@pytest.mark.parametrize("call,error,message", IGNORE_BAD)
@pytest.mark.parametrize("jit", [False, True])
def test_bad_ignore_index_gets_a_clear_error(call, error, message, jit):
    with pytest.raises(error, match=message):
        jax.jit(call)() if jit else call()


def test_a_traced_ignore_index_is_refused_with_the_fix():
    with pytest.raises(TypeError, match=r"ignore_index must be an int or None, got .*Tracer.*functools.partial"):
        jax.jit(fn.softmax_cross_entropy)(jnp.ones((4, 3)), jnp.zeros(4, jnp.int32), ignore_index=-1)


def test_out_of_range_labels_other_than_ignore_index_are_still_caught():
    logits = jnp.ones((4, 3))
    np.testing.assert_allclose(
        fn.softmax_cross_entropy(logits, jnp.array([0, -100, 2, -100]), ignore_index=-100), np.log(3), rtol=1e-12
    )
    with pytest.raises(
        ValueError, match=r"must lie in \[0, 3\) .* or equal ignore_index=-1, got other values from 0 to 3"
    ):
        fn.softmax_cross_entropy(logits, jnp.array([0, -1, 3, 1]), ignore_index=-1)
    with pytest.raises(ValueError, match=r"or equal ignore_index=-100, got other values from -1 to 2"):
        fn.softmax_cross_entropy(logits, jnp.array([0, -1, 2, -100]), ignore_index=-100)
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\) for the 3 classes of logits, got values from -1"):
        fn.softmax_cross_entropy(logits, jnp.array([0, -1, 2, 1]))  # without ignore_index, -1 is out of range


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_ignore_index_in_low_precision_accumulates_in_float32(dtype):
    """check_vjp with its low-precision tolerances against the reference computed in float32 and
    cast back; and a float16 sum of 70,000 kept positions (past float16's 65,504) stays a mean."""
    logits, labels = _padded((4, 6), 5, np.float32, -1, "some")
    reference = ce_ignore_reference(-1)
    fn.check_vjp(
        functools.partial(fn.softmax_cross_entropy, ignore_index=-1),
        lambda p, t: reference(p.astype(jnp.float32), t).astype(dtype),
        jnp.asarray(logits, dtype),
        labels,
    )
    many = np.zeros((70_000, 2), np.int32)
    many[::2] = -1
    value = fn.softmax_cross_entropy(jnp.zeros((70_000, 2, 3), dtype), many, ignore_index=-1)
    assert value.dtype == dtype
    np.testing.assert_allclose(float(value), np.log(3), rtol=1e-2)


# --- sigmoid_binary_cross_entropy (torch's binary_cross_entropy_with_logits, reduction='mean')


def bce_reference(logits, target):
    """The textbook form, -(t log p + (1 - t) log(1 - p)), averaged over every element."""
    p = jax.nn.sigmoid(logits)
    return -jnp.mean(target * jnp.log(p) + (1 - target) * jnp.log1p(-p))


def _binary(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return (3 * rng.standard_normal(shape)).astype(dtype), rng.random(shape).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (6, 4), (2, 5, 3), (7,)])
def test_binary_cross_entropy_matches_the_reference_and_finite_differences(shape, dtype):
    logits, target = _binary(shape, dtype)
    np.testing.assert_allclose(
        sigmoid_binary_cross_entropy(logits, target), bce_reference(logits, target), rtol=1e-6, atol=1e-7
    )
    fn.check_vjp(sigmoid_binary_cross_entropy, bce_reference, logits, target)
    hard = np.round(target)  # 0/1 labels
    fn.check_vjp(sigmoid_binary_cross_entropy, bce_reference, logits, hard)


def test_binary_cross_entropy_hand_gradient_is_sigmoid_minus_target_over_elements():
    logits, target = _binary((4, 3), np.float64)
    d_logits, d_target = jax.grad(sigmoid_binary_cross_entropy, argnums=(0, 1))(logits, target)
    np.testing.assert_allclose(d_logits, (jax.nn.sigmoid(logits) - target) / 12, rtol=1e-12)
    np.testing.assert_allclose(d_target, -logits / 12, rtol=1e-12)


@pytest.mark.parametrize("shape", [(5, 3), (2, 4, 3), (6,)])
def test_binary_cross_entropy_against_torch(shape):
    """torch.nn.functional.binary_cross_entropy_with_logits (reduction='mean') in float64: the
    loss, and the gradients of the logits and of the targets."""
    torch = pytest.importorskip("torch")
    logits, target = _binary(shape, np.float64, seed=3)
    logits.flat[:2] = 1000.0, -1000.0  # both stable: torch's form is the same
    t_logits, t_target = torch.tensor(logits, requires_grad=True), torch.tensor(target, requires_grad=True)
    t_value = torch.nn.functional.binary_cross_entropy_with_logits(t_logits, t_target)
    t_value.backward()
    value, (d_logits, d_target) = jax.value_and_grad(sigmoid_binary_cross_entropy, argnums=(0, 1))(logits, target)
    np.testing.assert_allclose(value, t_value.item(), rtol=1e-12)
    np.testing.assert_allclose(d_logits, t_logits.grad.numpy(), rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(d_target, t_target.grad.numpy(), rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, jnp.bfloat16, jnp.float16])
def test_binary_cross_entropy_is_finite_for_huge_logits(dtype):
    """At |z| = 1000, exp(z) overflows and sigmoid rounds to 0 or 1 (log(0) = -inf in the textbook
    form); the stable form gives the exact loss and gradient, no inf, no NaN."""
    logits = jnp.asarray([[1000.0, -1000.0], [1000.0, -1000.0]], dtype)
    target = jnp.asarray([[1.0, 0.0], [0.0, 1.0]], dtype)
    value, (d_logits, d_target) = jax.value_and_grad(sigmoid_binary_cross_entropy, argnums=(0, 1))(logits, target)
    assert value.dtype == dtype and d_logits.dtype == d_target.dtype == dtype
    np.testing.assert_allclose(float(value), 500.0, rtol=1e-2)  # two right (0), two wrong by 1000; / 4
    np.testing.assert_allclose(np.asarray(d_logits, np.float64), [[0, 0], [0.25, -0.25]], atol=1e-6)
    np.testing.assert_allclose(np.asarray(d_target, np.float64), [[-250, 250], [-250, 250]], rtol=1e-2)
    assert not np.isfinite(float(bce_reference(logits.astype(jnp.float32), target.astype(jnp.float32))))


def _bce_without_the_mean(residuals, output_grad):
    """The mistake: the per-element gradient, not divided by the element count."""
    logits, target = residuals
    return output_grad * (jax.nn.sigmoid(logits) - target), -output_grad * logits


def _bce_per_row_mean(residuals, output_grad):
    """The mistake: divided by the rows (softmax_cross_entropy's positions), not by every element."""
    logits, target = residuals
    rows = logits.shape[0]
    return output_grad * (jax.nn.sigmoid(logits) - target) / rows, -output_grad * logits / rows


def _bce_target_sign(residuals, output_grad):
    """The mistake: the target's gradient with the wrong sign (+z/n)."""
    d_logits, d_target = losses._bce_bwd(residuals, output_grad)
    return d_logits, -d_target


@pytest.mark.parametrize(
    "mistake,argument",
    [(_bce_without_the_mean, 0), (_bce_per_row_mean, 0), (_bce_target_sign, 1)],
    ids=["no-mean", "per-row", "target-sign"],
)
def test_check_vjp_catches_a_wrong_binary_cross_entropy_backward(mistake, argument):
    wrong = jax.custom_vjp(losses._sigmoid_binary_cross_entropy)
    wrong.defvjp(losses._bce_fwd, mistake)
    args = _binary((5, 3), np.float64)
    fn.check_vjp(sigmoid_binary_cross_entropy, bce_reference, *args)  # the right one passes
    with pytest.raises(AssertionError, match=f"argument {argument} disagree"):
        fn.check_vjp(wrong, bce_reference, *args)


def test_binary_cross_entropy_under_jit_vmap_and_second_order():
    logits, target = _binary((4, 3), np.float64)
    loss = sigmoid_binary_cross_entropy
    np.testing.assert_allclose(
        jax.jit(jax.grad(loss))(logits, target), jax.grad(bce_reference)(logits, target), rtol=1e-12
    )
    batched = jax.jit(jax.vmap(jax.grad(loss)))(logits[:, None], target[:, None])
    np.testing.assert_allclose(batched, jax.vmap(jax.grad(bce_reference))(logits[:, None], target[:, None]), rtol=1e-12)
    for argnum in (0, 1):
        np.testing.assert_allclose(
            jax.jit(jax.jacrev(jax.grad(loss, argnum), argnum))(logits, target),
            jax.jit(jax.hessian(bce_reference, argnum))(logits, target),
            rtol=1e-9,
            atol=1e-14,
        )


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_binary_cross_entropy_of_a_large_batch_is_its_mean_in_float32(dtype):
    """70,000 elements of loss near 10: the total (~7e5) overflows float16 (max 65,504)."""
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(70_000, 1)) * 20, dtype)
    target = jnp.asarray(rng.random((70_000, 1)) < 0.5, dtype)
    value = sigmoid_binary_cross_entropy(logits, target)
    z, t = np.asarray(logits, np.float64), np.asarray(target, np.float64)
    expected = np.mean(np.logaddexp(0, z) - z * t)  # log(1 + e^z) - z t, in float64 on the host
    assert value.dtype == dtype
    np.testing.assert_allclose(float(value), expected, rtol=2e-2)


BCE_BAD = [
    (
        lambda: sigmoid_binary_cross_entropy(jnp.ones((4, 2)), jnp.ones((4, 1))),
        ValueError,
        r"sigmoid_binary_cross_entropy: logits and target must have the same shape .*\(4, 2\).*\(4, 1\)",
    ),
    (
        lambda: sigmoid_binary_cross_entropy(jnp.ones((4,)), jnp.ones((4,), jnp.int32)),
        TypeError,
        r"target must have a floating dtype \(probabilities in \[0, 1\]\), got int32. Cast the labels",
    ),
    (
        lambda: sigmoid_binary_cross_entropy(jnp.ones((4,), jnp.int32), jnp.ones((4,))),
        TypeError,
        "sigmoid_binary_cross_entropy: logits must have a floating dtype",
    ),
    (
        lambda: sigmoid_binary_cross_entropy(jnp.ones((4,), jnp.float32), jnp.ones((4,))),
        TypeError,
        "logits and target must share a dtype, got float32 and float64",
    ),
    (
        lambda: sigmoid_binary_cross_entropy(jnp.ones(()), jnp.ones(())),
        ValueError,
        "must have the same shape with a row axis first",
    ),
    (lambda: sigmoid_binary_cross_entropy(jnp.ones((0, 3)), jnp.ones((0, 3))), ValueError, "must not be empty"),
    (lambda: sigmoid_binary_cross_entropy(jnp.ones(2), [1.0, 0.0]), TypeError, "target must be an array"),
]


@pytest.mark.parametrize("call,error,message", BCE_BAD)
@pytest.mark.parametrize("jit", [False, True])
def test_binary_cross_entropy_bad_input_gets_a_clear_error(call, error, message, jit):
    with pytest.raises(error, match=message):
        jax.jit(call)() if jit else call()
