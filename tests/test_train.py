"""fit and train_step against the book's NumPy trainer, a Python loop, and their own promises."""

import book_reference as book
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcnet as fn
from funcnet import train

KEY = jax.random.PRNGKey(0)


def _regression(rows=50, features=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, features))
    y = np.sin(x @ rng.standard_normal((features, 1))) + 0.1 * rng.standard_normal((rows, 1))
    return x, y


def _mlp(hidden=5, out=1, activation=fn.sigmoid):
    return fn.serial(fn.Dense(hidden, activation), fn.Dense(out, fn.linear))


def _book_net(params, loss, activations=(book.Sigmoid, book.Linear)):
    return book.NeuralNetwork(
        [book.Dense(np.asarray(p.W), np.asarray(p.B), act()) for p, act in zip(params, activations, strict=True)], loss
    )


def _assert_params_close(ours, book_net, rtol=1e-10):
    for p, layer in zip(ours, book_net.layers, strict=True):
        np.testing.assert_allclose(p.W, layer.params[0], rtol=rtol, atol=1e-12)
        np.testing.assert_allclose(p.B, layer.params[1], rtol=rtol, atol=1e-12)


def _order(key, rows):
    return lambda e: np.asarray(train.epoch_order(key, e, rows)[0])


@pytest.mark.parametrize("batch_size", [8, 10, 50])  # 50 rows: last batch of 2, none, one batch
def test_fit_equals_the_books_trainer_with_sgd(batch_size):
    x, y = _regression()
    net = _mlp()
    _, params = net.init(KEY, (-1, 4))
    result = fn.fit(net, fn.mean_squared_error, fn.sgd(0.05), params, (x, y), epochs=7, batch_size=batch_size, key=KEY)
    reference = book.Trainer(_book_net(params, book.MeanSquaredError()), book.SGD(0.05), _order(KEY, 50))
    reference.fit(x, y, None, None, epochs=7, batch_size=batch_size)
    _assert_params_close(result.params, reference.net)


def test_fit_equals_the_books_trainer_with_momentum_decay_and_cross_entropy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((45, 6))
    labels = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0).astype(np.int32)
    net = _mlp(hidden=7, out=3, activation=fn.tanh)
    _, params = net.init(KEY, (-1, 6))
    epochs, batches = 6, 3  # 45 rows in batches of 16: 16, 16, 13
    schedule = fn.linear_decay(0.1, 0.01, epochs - 1, every=batches)
    result = fn.fit(
        net,
        fn.softmax_cross_entropy,
        fn.momentum(schedule, 0.9),
        params,
        (x, labels),
        epochs=epochs,
        batch_size=16,
        key=KEY,
    )
    reference = book.Trainer(
        _book_net(params, book.SoftmaxCrossEntropy(), (book.Tanh, book.Linear)),
        book.SGDMomentum(0.1, final_lr=0.01, decay_type="linear", momentum=0.9),
        _order(KEY, 45),
    )
    reference.fit(x, np.eye(3)[labels], None, None, epochs=epochs, batch_size=16)
    _assert_params_close(result.params, reference.net)


def test_early_stop_restores_the_best_model_like_the_book():
    x, y = _regression()
    eval_x, eval_y = _regression(30, seed=5)
    eval_y = -eval_y  # learning the training targets makes the eval loss rise
    net = _mlp()
    _, params = net.init(KEY, (-1, 4))
    result = fn.fit(
        net,
        fn.mean_squared_error,
        fn.sgd(0.05),
        params,
        (x, y),
        (eval_x, eval_y),
        epochs=30,
        batch_size=8,
        eval_every=1,
        key=KEY,
    )
    reference = book.Trainer(_book_net(params, book.MeanSquaredError()), book.SGD(0.05), _order(KEY, 50))
    reference.fit(x, y, eval_x, eval_y, epochs=30, eval_every=1, batch_size=8)
    assert int(result.stopped_epoch) == reference.stopped_epoch < 30
    assert int(result.best_epoch) == reference.stopped_epoch - 1
    _assert_params_close(result.params, reference.net)
    # best_epoch reproduces params: the same key, that many epochs, no eval data
    again = fn.fit(
        net, fn.mean_squared_error, fn.sgd(0.05), params, (x, y), epochs=int(result.best_epoch), batch_size=8, key=KEY
    )
    jax.tree_util.tree_map(np.testing.assert_array_equal, again.params, result.params)


def test_fit_equals_a_python_loop_over_train_step():
    x, y = _regression(48)
    net = fn.serial(fn.Dense(6, fn.tanh), fn.Dropout(0.3), fn.Dense(1, fn.linear))
    _, params = net.init(KEY, (-1, 4))
    optimizer = fn.adam(0.01)
    result = fn.fit(net, fn.mean_squared_error, optimizer, params, (x, y), epochs=3, batch_size=12, key=KEY)
    step = jax.jit(fn.train_step(net, fn.mean_squared_error, optimizer))
    p, state = params, optimizer.init(params)
    for e in range(3):
        order, dropout_key = train.epoch_order(KEY, e, 48)
        for b in range(4):
            index = order[b * 12 : (b + 1) * 12]
            p, state, _ = step(p, state, x[index], y[index], jax.random.fold_in(dropout_key, b))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), result.params, p)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), result.opt_state, state)


def _eval_run(patience=0, min_delta=0.0, epochs=40):
    x, y = _regression()
    eval_x, eval_y = _regression(30, seed=5)
    net = _mlp()
    _, params = net.init(KEY, (-1, 4))
    return fn.fit(
        net,
        fn.mean_squared_error,
        fn.sgd(0.3),
        params,
        (x, y),
        (eval_x, -eval_y),
        epochs=epochs,
        batch_size=10,
        eval_every=2,
        patience=patience,
        min_delta=min_delta,
        key=KEY,
    )


def test_patience_and_min_delta():
    strict, patient = _eval_run(patience=0), _eval_run(patience=2)
    for r in (strict, patient):
        evals = np.asarray(r.history.eval_loss)
        ran = ~np.isnan(evals)
        best = int(np.argmin(np.where(ran, evals, np.inf)))
        assert int(r.best_epoch) == int(r.history.eval_epoch[best])
    # patience 0 stops at the first evaluation that does not improve; patience 2 at the third in a row
    assert int(patient.stopped_epoch) == int(strict.stopped_epoch) + 4
    assert np.isnan(np.asarray(strict.history.train_loss)[int(strict.stopped_epoch) :]).all()
    # a huge min_delta: only the first evaluation counts as an improvement
    picky = _eval_run(patience=0, min_delta=1e6)
    assert int(picky.best_epoch) == 2 and int(picky.stopped_epoch) == 4


def test_prefix_property_and_resume():
    x, y = _regression()
    net = _mlp()
    _, params = net.init(KEY, (-1, 4))
    run = lambda **kw: fn.fit(
        net, fn.mean_squared_error, fn.momentum(0.05), params, (x, y), batch_size=8, key=KEY, **kw
    )
    long, short = run(epochs=12), run(epochs=5)
    np.testing.assert_array_equal(long.history.train_loss[:5], short.history.train_loss)
    resumed = fn.fit(
        net,
        fn.mean_squared_error,
        fn.momentum(0.05),
        short.params,
        (x, y),
        batch_size=8,
        key=KEY,
        epochs=12,
        start_epoch=5,
        opt_state=short.opt_state,
    )
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), resumed.params, long.params)
    np.testing.assert_allclose(resumed.history.train_loss, long.history.train_loss[5:], rtol=1e-12)


def test_fit_compiles_once_for_new_data_of_the_same_shapes():
    x, y = _regression()
    net = _mlp()
    _, params = net.init(KEY, (-1, 4))
    optimizer = fn.sgd(0.01)
    fn.fit(net, fn.mean_squared_error, optimizer, params, (x, y), epochs=2, batch_size=8, key=KEY)
    size = train.program.segment._cache_size()
    x2, y2 = _regression(seed=3)
    fn.fit(net, fn.mean_squared_error, optimizer, params, (x2, y2), epochs=2, batch_size=8, key=jax.random.PRNGKey(9))
    assert train.program.segment._cache_size() == size


def test_vmap_over_keys_and_learning_rates_equals_separate_fits():
    x, y = _regression()
    net = _mlp()
    _, params = net.init(KEY, (-1, 4))
    keys = jax.random.split(KEY, 4)
    rates = jnp.array([0.01, 0.03, 0.1, 0.3])

    def one(key, lr):
        return fn.fit(
            net,
            fn.mean_squared_error,
            fn.sgd(lr),
            params,
            (x, y),
            (x[:20], y[:20]),
            epochs=6,
            eval_every=2,
            batch_size=8,
            key=key,
        )

    ensemble = jax.jit(jax.vmap(one))(keys, rates)
    for i in range(4):
        single = fn.fit(
            net,
            fn.mean_squared_error,
            fn.sgd(float(rates[i])),
            params,
            (x, y),
            (x[:20], y[:20]),
            epochs=6,
            eval_every=2,
            batch_size=8,
            key=keys[i],
        )
        member = jax.tree_util.tree_map(lambda a, i=i: a[i], ensemble)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10), member, single)


def test_divergence_keeps_the_last_finite_params():
    x, y = _regression()
    net = _mlp(activation=fn.relu)
    _, params = net.init(KEY, (-1, 4))
    result = fn.fit(net, fn.mean_squared_error, fn.sgd(50.0), params, (x, 1e3 * y), epochs=20, batch_size=5, key=KEY)
    assert bool(result.diverged)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(result.params))
    stopped = int(result.stopped_epoch)
    assert int(result.best_epoch) == stopped - 1
    assert not np.isfinite(result.history.train_loss[stopped - 1])


def test_drop_last_uses_only_full_batches():
    x, y = _regression()
    net = _mlp()
    _, params = net.init(KEY, (-1, 4))
    result = fn.fit(
        net, fn.mean_squared_error, fn.sgd(0.05), params, (x, y), epochs=1, batch_size=8, drop_last=True, key=KEY
    )
    order = _order(KEY, 50)(0)[:48]
    reference = book.Trainer(_book_net(params, book.MeanSquaredError()), book.SGD(0.05), lambda e: order)
    reference.fit(x, y, None, None, epochs=1, batch_size=8)
    _assert_params_close(result.params, reference.net)


def test_progress_bar_runs(capsys):
    x, y = _regression()
    net = _mlp()
    _, params = net.init(KEY, (-1, 4))
    fn.fit(net, fn.mean_squared_error, fn.sgd(0.05), params, (x, y), epochs=3, batch_size=8, key=KEY, progress=True)
    assert "3/3" in capsys.readouterr().err


def _bad_fit(**override):
    x, y = _regression()
    net = _mlp()
    _, params = net.init(KEY, (-1, 4))
    args = dict(
        net=net, loss=fn.mean_squared_error, optimizer=fn.sgd(0.1), params=params, train_data=(x, y), epochs=2, key=KEY
    )
    args.update(override)
    return fn.fit(**args)


X, Y = _regression()
BAD = [
    (dict(train_data=(X, Y[:-1])), ValueError, "fit: train_data x has 50 rows but y has 49"),
    (
        dict(train_data=(X[:, :3], Y)),
        ValueError,
        "fit: train_data does not fit the network and loss: .*x has 3 features but W expects 4",
    ),
    (
        dict(train_data=(X.astype(np.int32), Y)),
        TypeError,
        "train_data does not fit the network.*x must have a floating dtype",
    ),
    (dict(train_data=(X.astype(bool), Y)), TypeError, "train_data x must have a floating or integer dtype"),
    (dict(train_data=(np.where(np.arange(50)[:, None] == 7, np.nan, X), Y)), ValueError, r"x must be finite.*row 7"),
    (dict(train_data=(X, Y[:, 0])), ValueError, "prediction and target must have the same shape"),
    (dict(train_data=(X.tolist(), Y)), TypeError, "train_data x must be an array"),
    (dict(train_data=X), TypeError, "train_data must be a pair"),
    (dict(epochs=0), ValueError, "fit: epochs must be >= 1, got 0"),
    (dict(batch_size=64), ValueError, "batch_size must be <= the 50 training rows, got 64"),
    (dict(batch_size=2.0), TypeError, "batch_size must be an int"),
    (dict(eval_every=0), ValueError, "eval_every must be >= 1"),
    (dict(patience=-1), ValueError, "patience must be >= 0"),
    (dict(min_delta=-1.0), ValueError, "min_delta must be >= 0.0"),
    (dict(eval_data=(X, Y), eval_every=5), ValueError, r"eval_every \(5\) leaves no evaluation in epochs 1..2"),
    (dict(eval_data=(X[:, :2], Y)), ValueError, "eval_data does not fit the network"),
    (dict(key=0), TypeError, "key must be a jax.random key"),
    (dict(optimizer=lambda g: g), TypeError, "optimizer must be an Optimizer"),
    (dict(start_epoch=2), ValueError, r"start_epoch must be < epochs \(2\), got 2"),
    (dict(opt_state=fn.momentum(0.1).init(_mlp().init(KEY, (-1, 4))[1])), TypeError, "opt_state does not belong"),
    (dict(shuffle="yes"), TypeError, "shuffle must be a bool"),
]


@pytest.mark.parametrize("override,error,message", BAD)
def test_bad_input_is_rejected_before_compiling(override, error, message):
    size = train.program.segment._cache_size()
    with pytest.raises(error, match=message):
        _bad_fit(**override)
    assert train.program.segment._cache_size() == size


def test_bad_optimizer_hyperparameters():
    for call, message in [
        (lambda: fn.sgd(0.0), "learning_rate must be > 0.0"),
        (lambda: fn.sgd(float("nan")), "learning_rate must be finite"),
        (lambda: fn.momentum(0.1, 1.5), "momentum must be >= 0.0 and < 1.0"),
        (lambda: fn.adam(b2=1.0), "b2 must be"),
        (lambda: fn.sgd(0.1, clip_norm=0.0), "clip_norm must be > 0.0"),
        (lambda: fn.linear_decay(0.1, 0.01, 0), "steps must be >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            call()


def _counter_fit(min_delta, mode):
    """A network whose eval loss falls by exactly 0.25 per epoch: the prediction is its one param
    ``c``, the loss is the prediction's mean, so sgd(0.25) lowers ``c`` by 0.25 an epoch (one batch)."""
    net = fn.Layer(
        lambda key, shape: ((*shape[:1], 1), {"c": jnp.asarray(10.0)}),
        lambda params, x, key=None: jnp.zeros((x.shape[0], 1)) + params["c"],
    )
    x, y = jnp.zeros((4, 1)), jnp.zeros((4, 1))
    metrics = {"gain": lambda prediction, target: -jnp.mean(prediction)}
    return fn.fit(
        net,
        lambda prediction, target: jnp.mean(prediction),
        fn.sgd(0.25),
        {"c": jnp.asarray(10.0)},
        (x, y),
        (x, y),
        epochs=6,
        batch_size=4,
        eval_every=1,
        patience=0,
        min_delta=min_delta,
        key=KEY,
        metrics=metrics,
        monitor="loss" if mode == "min" else "gain",
        mode=mode,
    )


@pytest.mark.parametrize("mode", ["min", "max"])
def test_min_delta_at_its_boundary(mode):
    """Each evaluation improves by exactly 0.25: that is not more than min_delta=0.25 (stop at the
    second evaluation), and is more than 0.2499 (never stop). Ignoring min_delta trains all epochs."""
    np.testing.assert_array_equal(_counter_fit(0.0, mode).history.eval_loss, [9.75, 9.5, 9.25, 9.0, 8.75, 8.5])
    at = _counter_fit(0.25, mode)
    assert int(at.stopped_epoch) == 2 and int(at.best_epoch) == 1
    below = _counter_fit(0.2499, mode)
    assert int(below.stopped_epoch) == 6 and int(below.best_epoch) == 6


def test_fit_donates_only_its_own_copies_of_the_state():
    """``segment`` donates the state it replaces; the caller's params and opt_state (device arrays
    that a jitted function could hand back as the same buffers) must survive the fit."""
    net = fn.serial(fn.Dense(4, fn.tanh), fn.Dense(1, fn.linear))
    params = jax.device_put(net.init(KEY, (-1, 3))[1])
    optimizer = fn.adam(0.01)
    opt_state = jax.device_put(optimizer.init(params))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 3)))
    y = jnp.sum(x, axis=1, keepdims=True)
    for eval_data in (None, (x, y)):
        out = fn.fit(
            net,
            fn.mean_squared_error,
            optimizer,
            params,
            (x, y),
            eval_data,
            epochs=2,
            eval_every=1,
            batch_size=4,
            key=KEY,
            opt_state=opt_state,
        )
        assert not any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves((params, opt_state)))
        assert float(jnp.sum(params[0].W)) == float(jnp.sum(params[0].W))  # still readable
        assert not bool(out.diverged)
