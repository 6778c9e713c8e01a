"""Layer state (funcnet/state.py, train_apply in layers.py): BatchNorm's running statistics
through the combinators, split_state/merge_state, and through fit and train_step (weight decay,
masked last batches, early stopping, checkpoints and resume, vmap ensembles)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcnet as fn
from funcnet.train import checkpointing

KEY = jax.random.PRNGKey(0)
rng = np.random.default_rng(0)


def _leaves_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def _branchy():
    return fn.serial(
        fn.Dense(4, fn.relu),
        fn.BatchNorm(),
        fn.residual(fn.BatchNorm(0.5), fn.Dense(4, fn.tanh)),
        fn.FanOut(2),
        fn.parallel(fn.BatchNorm(), fn.Dense(4, fn.linear)),
        fn.FanInConcat(),
        fn.Dense(3, fn.linear),
    )


def _stats(params):
    return [node for node in jax.tree_util.tree_leaves(params, is_leaf=fn.state.is_state) if fn.state.is_state(node)]


def test_combinators_thread_the_state_and_leave_trained_params_alone():
    net = _branchy()
    _, params = net.init(KEY, (-1, 3))
    x = jnp.asarray(rng.standard_normal((9, 3)))
    y, new = fn.train_apply(net)(params, x)
    assert y.shape == (9, 3) and len(_stats(new)) == 3
    for old, updated in zip(_stats(params), _stats(new), strict=True):
        assert not np.array_equal(old.mean, updated.mean) and not np.array_equal(old.var, updated.var)
    _leaves_equal(fn.split_state(new)[0], fn.split_state(params)[0])
    hidden = fn.Dense(4, fn.relu).apply(params[0], x)  # the first BatchNorm's input, by hand
    np.testing.assert_allclose(new[1].stats.mean, 0.1 * hidden.mean(0), rtol=1e-12)
    np.testing.assert_allclose(new[1].stats.var, 0.9 + 0.1 * np.var(hidden, 0, ddof=1), rtol=1e-12)
    # training mode uses batch statistics, inference the running ones
    assert not np.allclose(y, net.apply(params, x))
    # the same, under jit and with a key (dropout-free: equal)
    jitted = jax.jit(fn.train_apply(net))(params, x, key=KEY)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), jitted, (y, new))


def test_time_distributed_threads_the_state_and_the_row_mask_covers_every_step():
    net = fn.serial(fn.TimeDistributed(fn.serial(fn.Dense(3, fn.tanh), fn.BatchNorm(0.0))), fn.RNN(2))
    _, params = net.init(KEY, (-1, 4, 2))
    x = jnp.asarray(rng.standard_normal((5, 4, 2)))
    mask = jnp.array([True, True, False, True, False])
    _, new = fn.train_apply(net)(params, x, row_mask=mask)
    steps = np.asarray(x)[np.asarray(mask)].reshape(-1, 2)  # the 3 real rows' 4 steps each
    dense = np.tanh(steps @ np.asarray(params[0][0].W) + np.asarray(params[0][0].B))
    np.testing.assert_allclose(new[0][1].stats.mean, dense.mean(0), rtol=1e-12)  # momentum 0: the batch's
    np.testing.assert_allclose(new[0][1].stats.var, dense.var(0, ddof=1), rtol=1e-12)


def test_a_network_without_state_returns_its_params_unchanged():
    net = fn.serial(fn.Dense(4, fn.tanh), fn.residual(fn.LayerNorm()), fn.Dropout(0.5), fn.Dense(2, fn.linear))
    _, params = net.init(KEY, (-1, 3))
    x = jnp.asarray(rng.standard_normal((6, 3)))
    y, same = fn.train_apply(net)(params, x, key=KEY)
    for a, b in zip(jax.tree_util.tree_leaves(same), jax.tree_util.tree_leaves(params), strict=True):
        assert a is b
    np.testing.assert_array_equal(y, fn.train_apply(net)(params, x, key=KEY)[0])  # the key decides the masks
    trainable, state = fn.split_state(params)
    _leaves_equal(trainable, params)
    assert jax.tree_util.tree_leaves(state) == []


def test_split_and_merge_are_complementary():
    _, params = _branchy().init(KEY, (-1, 3))
    trainable, state = fn.split_state(params)
    paths = lambda t: {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(t)}
    assert paths(trainable) | paths(state) == paths(params) and not paths(trainable) & paths(state)
    assert paths(state) == {
        f"[{i}]{rest}.stats.{s}" for i, rest in ((1, ""), (2, "[0]"), (4, "[0]")) for s in ("mean", "var")
    }
    assert fn.param_count(trainable) == fn.param_count(params) == 16 + 8 + 8 + 20 + 8 + 20 + 27
    assert fn.param_count(params, state=True) == fn.param_count(state, state=True) == 3 * 8
    _leaves_equal(fn.merge_state(trainable, state), params)
    with pytest.raises(TypeError, match="merge_state: trainable and state must be the two halves"):
        fn.merge_state(trainable, state[:3])


def test_summary_reports_trained_and_state_sizes_apart():
    text = fn.summary(fn.serial(fn.Dense(4, fn.relu), fn.BatchNorm()), (-1, 3))
    assert "state" in text.splitlines()[0]
    assert re.search(r"\n1  BatchNorm\(momentum=0.9, eps=1e-05\)  \(-1, 4\) +8 +8\n", text)
    assert text.endswith("Total params: 24\nState (not trained): 8")
    assert "state" not in fn.summary(fn.Dense(4), (-1, 3))


def _closure(inner):
    def init(key, input_shape):
        return inner.init(key, input_shape)

    def apply(params, x, *, key=None):
        return inner.apply(params, x, key=key)

    return fn.Layer(init, apply)


def test_a_closure_hiding_a_stateful_layer_is_an_error_never_inference_mode():
    hidden = fn.serial(fn.Dense(3, fn.linear), _closure(fn.serial(fn.Dense(4), fn.BatchNorm())))
    _, params = hidden.init(KEY, (-1, 2))
    x = jnp.ones((4, 2))
    message = r"serial: layer 1 \(init\): train_apply: the Layer of closures 'apply' holds layer state \(params\[1\]"
    with pytest.raises(TypeError, match=message):
        fn.train_apply(hidden)(params, x)
    with pytest.raises(TypeError, match="would silently run in inference mode"):
        fn.fit(
            hidden, fn.mean_squared_error, fn.sgd(0.1), params, (x, jnp.ones((4, 3))), epochs=1, batch_size=4, key=KEY
        )
    # a closure without state is fine in training mode
    plain = fn.serial(_closure(fn.Dense(3, fn.tanh)), fn.BatchNorm())
    _, params = plain.init(KEY, (-1, 2))
    assert fn.train_apply(plain)(params, x + jnp.arange(2.0)[None])[0].shape == (4, 3)


# --- fit and train_step ---------------------------------------------------------------------------

X = rng.standard_normal((22, 3)) * np.array([1.0, 3.0, 0.5]) + np.array([0.0, 2.0, -1.0])
Y = X @ rng.standard_normal((3, 2))


def _first_layer_net(momentum=0.8):
    return fn.serial(fn.BatchNorm(momentum), fn.Dense(5, fn.tanh), fn.Dense(2, fn.linear))


def _ema(batches, momentum, epochs):
    mean, var = np.zeros(3), np.ones(3)
    for _ in range(epochs):
        for rows in batches:
            mean = momentum * mean + (1 - momentum) * rows.mean(0)
            var = momentum * var + (1 - momentum) * rows.var(0, ddof=1)
    return mean, var


@pytest.mark.parametrize("rows", [16, 22])  # two full batches; and a masked last batch of 6 rows
def test_fit_first_layer_statistics_are_the_exponential_average_of_the_batches(rows):
    net = _first_layer_net()
    _, params = net.init(KEY, (-1, 3))
    optimizer = fn.momentum(0.05, weight_decay=0.3)  # decay shrinks weights, never a running variance
    result = fn.fit(net, fn.mean_squared_error, optimizer, params, (X[:rows], Y[:rows]), epochs=3, batch_size=8,
                    shuffle=False, key=KEY)  # fmt: skip
    mean, var = _ema([X[i : i + 8][: rows - i] for i in range(0, rows, 8)], 0.8, 3)
    np.testing.assert_allclose(result.params[0].stats.mean, mean, rtol=1e-10)
    np.testing.assert_allclose(result.params[0].stats.var, var, rtol=1e-10)
    assert not np.allclose(result.params[0].gamma, 1.0)  # gamma and beta do train
    assert jax.tree_util.tree_structure(result.opt_state) == jax.tree_util.tree_structure(
        optimizer.init(fn.split_state(params)[0])
    )


def test_fit_refuses_a_last_batch_of_one_row_for_batch_statistics():
    net = _first_layer_net()
    _, params = net.init(KEY, (-1, 3))
    with pytest.raises(ValueError, match=r"fit: the last batch holds 1 row \(17 rows, batch_size 8\)"):
        fn.fit(net, fn.mean_squared_error, fn.sgd(0.1), params, (X[:17], Y[:17]), epochs=1, batch_size=8, key=KEY)
    with pytest.raises(ValueError, match="at least 2 values per channel, got 1"):
        fn.fit(net, fn.mean_squared_error, fn.sgd(0.1), params, (X, Y), epochs=1, batch_size=1, key=KEY)
    result = fn.fit(net, fn.mean_squared_error, fn.sgd(0.1), params, (X[:17], Y[:17]), epochs=1, batch_size=8,
                    key=KEY, drop_last=True)  # fmt: skip
    assert np.all(np.isfinite(result.params[0].stats.var))


def test_train_step_updates_the_statistics_and_wants_the_trainable_optimizer_state():
    net = _first_layer_net(momentum=0.5)
    _, params = net.init(KEY, (-1, 3))
    optimizer = fn.adam(0.01, weight_decay=0.1)
    step = jax.jit(fn.train_step(net, fn.mean_squared_error, optimizer))
    new, opt_state, loss = step(params, optimizer.init(fn.split_state(params)[0]), X[:8], Y[:8], None)
    np.testing.assert_allclose(new[0].stats.mean, 0.5 * X[:8].mean(0), rtol=1e-12)
    np.testing.assert_allclose(new[0].stats.var, 0.5 + 0.5 * X[:8].var(0, ddof=1), rtol=1e-12)
    assert np.isfinite(loss) and int(opt_state.step) == 1
    with pytest.raises(TypeError, match=r"train_step: opt_state does not belong .*optimizer.init\(funcnet.split_state"):
        step(params, optimizer.init(fn.split_state(params)[0])[:1], X[:8], Y[:8], None)
    with pytest.raises(TypeError, match=r"adam: params hold layer state .*funcnet.split_state\(params\)"):
        optimizer.init(params)  # an optimizer never sees the running statistics
    with pytest.raises(ValueError, match="batch statistics need at least 2 values per channel"):
        step(params, opt_state, X[:1], Y[:1], None)


def test_a_hand_written_gradient_loop_cannot_train_the_running_statistics():
    """The usual optax-style loop, jax.grad then update on the whole params: the statistics pass no
    gradient, and an optimizer refuses a params tree that holds them, naming split_state."""
    net = _first_layer_net()
    _, params = net.init(KEY, (-1, 3))
    grads = jax.grad(lambda p: fn.mean_squared_error(net.apply(p, X[:8]), Y[:8]))(params)
    assert not np.any(np.asarray(grads[0].stats.mean)) and not np.any(np.asarray(grads[0].stats.var))
    optimizer = fn.sgd(0.1)
    with pytest.raises(TypeError, match="split_state"):
        optimizer.update(grads, optimizer.init(fn.split_state(params)[0]), params)


def test_a_network_without_state_compiles_the_same_train_step_program():
    net = fn.serial(fn.Dense(4, fn.tanh), fn.Dropout(0.3), fn.Dense(2, fn.linear))
    _, params = net.init(KEY, (-1, 3))
    optimizer = fn.momentum(0.1)

    def step(params, opt_state, x, y, key):  # the step before layer state existed
        loss = lambda p: fn.mean_squared_error(fn.train_apply(net)(p, x, key=key)[0], y)
        value, grads = jax.value_and_grad(loss)(params)
        params, opt_state = optimizer.update(grads, opt_state, params)
        return params, opt_state, value

    args = (params, optimizer.init(params), X[:8], Y[:8], KEY)
    ours = jax.jit(fn.train_step(net, fn.mean_squared_error, optimizer)).lower(*args).as_text()
    assert ours == jax.jit(step).lower(*args).as_text()


def _eval_fit(**kw):
    net = fn.serial(fn.Dense(6, fn.tanh), fn.BatchNorm(0.7), fn.Dense(2, fn.linear))
    _, params = net.init(KEY, (-1, 3))
    args = dict(epochs=8, batch_size=8, eval_every=2, patience=0, key=KEY)
    args.update(kw)
    return (
        net,
        params,
        fn.fit(net, fn.mean_squared_error, fn.adam(0.05), params, (X, Y), (X[:10] * 1.5, Y[:10]), **args),
    )


def test_early_stopping_returns_the_best_epochs_statistics_and_evaluation_uses_them():
    net, params, result = _eval_fit()
    best = int(result.best_epoch)
    again = fn.fit(net, fn.mean_squared_error, fn.adam(0.05), params, (X, Y), epochs=best, batch_size=8, key=KEY)
    _leaves_equal(result.params, again.params)  # the statistics too
    j = best // 2 - 1
    value = fn.mean_squared_error(net.apply(result.params, X[:10] * 1.5), Y[:10])  # running statistics
    np.testing.assert_allclose(result.history.eval_loss[j], value, rtol=1e-10)


def test_checkpoints_and_resume_carry_the_statistics_bit_for_bit(tmp_path, monkeypatch):
    _, _, whole = _eval_fit(epochs=6, patience=5)
    store = checkpointing.store

    def interrupted(directory, state, done, run):
        store(directory, state, done, run)
        if done == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpointing, "store", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _eval_fit(epochs=6, patience=5, checkpoint_dir=tmp_path)
    monkeypatch.undo()
    _, _, resumed = _eval_fit(epochs=6, patience=5, checkpoint_dir=tmp_path)
    assert int(resumed.resumed_epoch) == 3
    _leaves_equal(resumed._replace(resumed_epoch=whole.resumed_epoch), whole)
    assert not np.allclose(resumed.params[1].stats.var, 1.0)


@pytest.mark.filterwarnings("error::UserWarning")  # a bare vmap of fit: no "donated buffers" warning
def test_a_vmap_ensemble_carries_each_members_statistics():
    net = _first_layer_net()
    _, params = net.init(KEY, (-1, 3))

    def one(key):
        return fn.fit(net, fn.mean_squared_error, fn.sgd(0.05), params, (X, Y), epochs=2, batch_size=8, key=key)

    keys = jax.random.split(KEY, 2)
    together = jax.vmap(one)(keys)
    for i in range(2):
        member = jax.tree_util.tree_map(lambda a, i=i: a[i], together.params)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10), member, one(keys[i]).params)
    assert not np.allclose(together.params[0].stats.mean[0], together.params[0].stats.mean[1])


def test_a_diverged_fit_rolls_the_statistics_back_with_the_weights():
    net = _first_layer_net()
    _, params = net.init(KEY, (-1, 3))
    run = lambda epochs: fn.fit(net, fn.mean_squared_error, fn.sgd(50.0), params, (X, Y), epochs=epochs,
                                batch_size=8, key=KEY)  # fmt: skip
    diverged = run(30)
    assert bool(diverged.diverged) and 0 < int(diverged.best_epoch) < 30
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(diverged.params))
    _leaves_equal(diverged.params, run(int(diverged.best_epoch)).params)  # the last finite epoch's, stats too
