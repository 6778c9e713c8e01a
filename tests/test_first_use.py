"""What a first-time user meets (issue 25): labels, results, stopping, continuing, own layers,
sampling, defaults. Each test pins down a promise the README or ``help()`` makes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcnet as fn

KEY = jax.random.PRNGKey(0)


def _classes(rows=60, features=4, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, features))
    y = np.argmax(x[:, :classes], axis=1).astype(np.int32)
    return x, y


def _classifier(classes=3):
    return fn.serial(fn.Dense(8, fn.tanh), fn.Dense(classes, fn.linear))


# 1. Out-of-range integer labels are refused before anything trains.


@pytest.mark.parametrize("shift", [1, -1, 3])
def test_fit_refuses_training_labels_out_of_range(shift):
    x, y = _classes()
    net = _classifier()
    _, params = net.init(KEY, (-1, 4))
    with pytest.raises(ValueError, match=r"train_data y .*class labels from .* to .*\[0, 3\)"):
        fn.fit(net, fn.softmax_cross_entropy, fn.sgd(0.1), params, (x, y + shift), epochs=2, key=KEY)


def test_fit_refuses_eval_labels_out_of_range_and_names_eval_data():
    x, y = _classes()
    net = _classifier()
    _, params = net.init(KEY, (-1, 4))
    with pytest.raises(ValueError, match=r"eval_data y .*from 5 to 7"):
        fn.fit(
            net,
            fn.softmax_cross_entropy,
            fn.sgd(0.1),
            params,
            (x[:40], y[:40]),
            (x[40:], np.full(20, 5, np.int32) + y[40:] % 3),
            epochs=2,
            eval_every=1,
            key=KEY,
            metrics={"accuracy": fn.accuracy},
        )


def test_fit_refuses_labels_for_a_wrapped_loss_and_a_sequence_target():
    """The check follows the class-index convention, not one loss: a lambda around the loss and
    (batch, time) labels for (batch, time, classes) outputs are checked too."""
    x, y = _classes()
    net = _classifier()
    _, params = net.init(KEY, (-1, 4))
    loss = lambda p, t: 2.0 * fn.softmax_cross_entropy(p, t)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        fn.fit(net, loss, fn.sgd(0.1), params, (x, y + 1), epochs=1, key=KEY)
    seq = fn.serial(fn.LSTM(4), fn.TimeDistributed(fn.Dense(3, fn.linear)))
    _, p = seq.init(KEY, (-1, 5, 2))
    xs = np.zeros((6, 5, 2))
    ys = np.full((6, 5), 3, np.int32)
    with pytest.raises(ValueError, match=r"from 3 to 3"):
        fn.fit(seq, fn.softmax_cross_entropy, fn.sgd(0.1), p, (xs, ys), epochs=1, batch_size=3, key=KEY)


def test_fit_refuses_bad_labels_under_vmap_over_keys():
    x, y = _classes()
    net = _classifier()
    _, params = net.init(KEY, (-1, 4))
    run = lambda key: fn.fit(net, fn.softmax_cross_entropy, fn.sgd(0.1), params, (x, y - 1), epochs=1, key=key)
    with pytest.raises(ValueError, match=r"from -1 to 1"):
        jax.vmap(run)(jax.random.split(KEY, 2))


def test_accuracy_refuses_out_of_range_labels():
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((5, 3)), jnp.float32)
    labels = jnp.asarray([0, 1, 2, 1, 0], jnp.int32)
    assert 0.0 <= float(fn.accuracy(logits, labels)) <= 1.0
    with pytest.raises(ValueError, match=r"accuracy: integer target must lie in \[0, 3\).*from 3 to 5"):
        fn.accuracy(logits, labels + 3)
    with pytest.raises(ValueError, match=r"from -1 to 1"):
        fn.accuracy(logits, labels - 1)
