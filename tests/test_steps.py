"""Training by steps: ``fit(..., steps=N)``, ``random_windows``, ``log_every`` and ``on_log``."""

import json

import jax
import numpy as np
import pytest

import funcnet as fn

KEY = jax.random.PRNGKey(0)


def _regression(rows=50, features=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, features))
    y = np.sin(x @ rng.standard_normal((features, 1)))
    return x, y


def _mlp():
    net = fn.serial(fn.Dense(5, fn.tanh), fn.Dense(1, fn.linear))
    return net, net.init(KEY, (-1, 4))[1]


def _same(a, b):
    for p, q in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(p), np.asarray(q))


def _fit(optimizer=None, data=None, **kwargs):
    net, params = _mlp()
    kwargs.setdefault("batch_size", 8)
    return fn.fit(
        net, fn.mean_squared_error, optimizer or fn.adam(0.01), params, data or _regression(), key=KEY, **kwargs
    )


# --- steps ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [8, 10])  # 50 rows: a masked last batch of 2; none
def test_steps_covering_whole_epochs_equal_epochs(batch_size):
    batches = -(-50 // batch_size)
    by_epochs = _fit(epochs=3, batch_size=batch_size)
    by_steps = _fit(steps=3 * batches, batch_size=batch_size)
    _same(by_epochs.params, by_steps.params)
    assert by_steps.history.train_loss.shape == (3 * batches,)
    assert int(by_steps.stopped_epoch) == 3 * batches


def test_steps_with_accumulate_count_updates_of_k_batches():
    opt = fn.accumulate(fn.adam(0.01), 3)
    by_epochs = _fit(opt, epochs=3)  # 3 epochs of 7 batches: 21 batches, 7 updates
    by_steps = _fit(opt, steps=7)
    _same(by_epochs.params, by_steps.params)
    _same(by_epochs.opt_state, by_steps.opt_state)
    assert by_steps.history.train_loss.shape == (7,)
    assert int(by_steps.opt_state.inner.step) == 7  # the wrapped optimizer's own update count


def test_a_shorter_run_is_the_prefix_of_a_longer_one_across_epoch_boundaries():
    short, long = _fit(steps=10), _fit(steps=23)  # 7 batches an epoch: both end inside an epoch
    np.testing.assert_array_equal(short.history.train_loss, long.history.train_loss[:10])
    again = _fit(steps=10, opt_state=None)
    _same(short.params, again.params)


def test_eval_every_counts_steps_and_restore_best_false_returns_the_last_params():
    x, y = _regression()
    eval_data = _regression(20, seed=1)
    result = _fit(data=(x, y), eval_data=eval_data, steps=12, eval_every=4, patience=None)
    np.testing.assert_array_equal(result.history.eval_epoch, [4, 8, 12])
    assert np.all(np.isfinite(result.history.eval_loss))
    last = _fit(data=(x, y), eval_data=eval_data, steps=12, eval_every=4, patience=None, restore_best=False)
    _same(last.params, _fit(data=(x, y), steps=12).params)
    assert int(last.best_epoch) == int(result.best_epoch)


def test_checkpointed_steps_resume_equals_one_run(tmp_path):
    whole = _fit(steps=17, eval_data=_regression(20, seed=1), eval_every=5, patience=None)
    kwargs = {"eval_data": _regression(20, seed=1), "eval_every": 5, "patience": None}
    first = _fit(steps=9, checkpoint_dir=tmp_path, checkpoint_every=4, **kwargs)  # a run killed at step 9
    assert int(first.stopped_epoch) == 9
    resumed = _fit(steps=17, checkpoint_dir=tmp_path, checkpoint_every=4, **kwargs)
    assert int(resumed.resumed_epoch) == 9
    _same(whole.params, resumed.params)
    np.testing.assert_array_equal(whole.history.train_loss[9:], resumed.history.train_loss[9:])


def test_schedules_count_updates():
    schedule = fn.linear_decay(0.1, 0.02, 4)
    result = _fit(fn.accumulate(fn.sgd(schedule), 2), steps=6, log_every=1)
    np.testing.assert_allclose(result.history.learning_rate, [0.1, 0.08, 0.06, 0.04, 0.02, 0.02], atol=1e-7)


def test_steps_and_epochs_together_or_neither_are_refused():
    with pytest.raises(ValueError, match="either epochs"):
        _fit(steps=3, epochs=2)
    with pytest.raises(ValueError, match="either epochs"):
        _fit()
    with pytest.raises(TypeError, match="restore_best"):
        _fit(steps=3, restore_best=1)


# --- random_windows ------------------------------------------------------------------------------

VOCAB = 5


def _lm():
    net = fn.serial(fn.Embedding(VOCAB, 8), fn.Dense(VOCAB, fn.linear))
    return net, net.init(KEY, (-1, 6))[1]


def _tokens(n=400):
    return np.tile(np.arange(VOCAB, dtype=np.int32), n // VOCAB)


def _fit_windows(tokens, **kwargs):
    net, params = _lm()
    kwargs.setdefault("batch_size", 4)
    return fn.fit(net, fn.softmax_cross_entropy, fn.adam(0.05), params, fn.random_windows(tokens, 6), key=KEY, **kwargs)


def test_windows_are_numpys_windows_at_the_keyed_starts():
    from funcnet.train.steps import window_starts

    rng = np.random.default_rng(3)
    tokens = rng.integers(0, VOCAB, 97).astype(np.int32)
    net, params = _lm()
    result = _fit_windows(tokens, steps=4)
    step = jax.jit(fn.train_step(net, fn.softmax_cross_entropy, fn.adam(0.05)))
    opt_state = fn.adam(0.05).init(params)
    for t in range(4):
        starts = np.asarray(window_starts(KEY, t, 4, 97, 6))
        assert starts.min() >= 0 and starts.max() <= 97 - 6 - 1
        index = starts[:, None] + np.arange(6)[None, :]
        params, opt_state, _ = step(params, opt_state, tokens[index], tokens[index + 1], None)
    _same(result.params, params)


def test_a_periodic_token_stream_is_learned():
    result = _fit_windows(_tokens(), steps=150)
    assert float(result.history.train_loss[-1]) < 0.05 < float(result.history.train_loss[0])


def test_windowed_resume_equals_uninterrupted(tmp_path):
    tokens = _tokens()
    whole = _fit_windows(tokens, steps=12)
    first = _fit_windows(tokens, steps=5, checkpoint_dir=tmp_path, checkpoint_every=2)
    assert int(first.stopped_epoch) == 5
    resumed = _fit_windows(tokens, steps=12, checkpoint_dir=tmp_path, checkpoint_every=2)
    assert int(resumed.resumed_epoch) == 5
    _same(whole.params, resumed.params)


def test_bad_windows_are_refused():
    with pytest.raises(ValueError, match="length"):
        fn.random_windows(np.arange(6), 6)
    with pytest.raises(ValueError, match="1-D"):
        fn.random_windows(np.zeros((3, 4), np.int32), 2)
    with pytest.raises(ValueError, match="steps"):
        _fit_windows(_tokens(), epochs=2)


# --- log_every, on_log -----------------------------------------------------------------------------


def test_log_every_records_means_of_each_block_of_updates():
    result = _fit(fn.adam(0.01), steps=12, log_every=4, ema_decay=0.9)
    h = result.history
    np.testing.assert_array_equal(h.step, [4, 8, 12])
    np.testing.assert_allclose(h.step_loss, np.asarray(h.train_loss).reshape(3, 4).mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(h.learning_rate, [0.01] * 3, rtol=1e-6)
    assert np.all(np.asarray(h.grad_norm) > 0)
    assert _fit(steps=3).history.step is None


def test_grad_norm_is_the_global_norm_of_the_gradient():
    net, params = _mlp()
    x, y = _regression()
    result = _fit(fn.sgd(0.1), data=(x, y), steps=1, batch_size=50, log_every=1)
    grads = jax.grad(lambda p: fn.mean_squared_error(net.apply(p, x), y))(params)
    norm = np.sqrt(sum(float(np.sum(np.square(g))) for g in jax.tree_util.tree_leaves(grads)))
    np.testing.assert_allclose(float(result.history.grad_norm[0]), norm, rtol=1e-5)


def test_grad_norm_is_the_norm_of_each_entrys_last_update():
    net, params = _mlp()
    x, y = _regression()
    result = _fit(fn.sgd(0.5), data=(x, y), steps=4, batch_size=50, log_every=2)
    step = jax.jit(fn.train_step(net, fn.mean_squared_error, fn.sgd(0.5)))
    opt_state, norms = fn.sgd(0.5).init(params), []
    for _ in range(4):  # the gradient each update applies, at the params it starts from
        grads = jax.grad(lambda p: fn.mean_squared_error(net.apply(p, x), y))(params)
        norms.append(np.sqrt(sum(float(np.sum(np.square(g))) for g in jax.tree_util.tree_leaves(grads))))
        params, opt_state, _ = step(params, opt_state, x, y, None)
    assert abs(norms[1] - norms[0]) > 1e-3 * norms[1]  # so the mean of an entry's updates would differ
    np.testing.assert_allclose(np.asarray(result.history.grad_norm), [norms[1], norms[3]], rtol=1e-5)


def test_on_log_is_called_in_order_and_json_lines_are_written(tmp_path):
    calls = []
    result = _fit(steps=10, log_every=3, on_log=lambda step, values: calls.append((step, values)))
    assert [step for step, _ in calls] == [3, 6, 9]
    np.testing.assert_allclose([v["loss"] for _, v in calls], result.history.step_loss, rtol=1e-6)
    path = tmp_path / "log.jsonl"
    _fit(fn.chain(fn.clip_by_global_norm(1.0), fn.sgd(0.1)), steps=4, log_every=2, on_log=fn.JsonLinesLogger(path))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert rows[0]["learning_rate"] is None  # chain does not expose its rate: NaN, written as null
    assert rows[0]["loss"] > 0 and rows[0]["grad_norm"] > 0


def test_a_hook_that_raises_stops_the_run_naming_its_error(tmp_path):
    def hook(step, values):
        raise RuntimeError("the log disk is full")

    with pytest.raises(Exception, match="the log disk is full"):
        _fit(steps=6, log_every=2, on_log=hook, checkpoint_dir=tmp_path, checkpoint_every=3)


def test_log_options_are_checked():
    with pytest.raises(ValueError, match="steps"):
        _fit(epochs=2, log_every=2)
    with pytest.raises(ValueError, match="log_every"):
        _fit(steps=4, on_log=print)
    with pytest.raises(ValueError, match="log_every"):
        _fit(steps=4, log_every=5)


# --- with the rest of fit -------------------------------------------------------------------------


def test_shards_early_stopping_and_restore_best_in_epochs():
    by_epochs = _fit(epochs=2, shards=2, batch_size=8)
    _same(by_epochs.params, _fit(steps=14, shards=2, batch_size=8).params)  # 25 rows a shard: 7 batches of 4
    eval_data = _regression(20, seed=1)
    stopped = _fit(fn.adam(0.5), eval_data=eval_data, steps=200, eval_every=5, patience=0)
    assert int(stopped.stopped_epoch) % 5 == 0 and int(stopped.stopped_epoch) < 200
    last = _fit(eval_data=eval_data, epochs=4, eval_every=2, patience=None, restore_best=False)
    _same(last.params, _fit(epochs=4).params)


def test_a_sweep_over_learning_rates_with_accumulate_compiles_once_and_equals_each_run():
    net, params = _mlp()
    x, y = _regression()

    def run(rate):
        opt = fn.accumulate(fn.adam(rate), 2)
        return fn.fit(net, fn.mean_squared_error, opt, params, (x, y), steps=5, batch_size=8, key=KEY, log_every=5)

    rates = np.array([0.01, 0.03])
    swept = jax.vmap(run)(rates)
    for i, rate in enumerate(rates):
        one = run(float(rate))
        for p, q in zip(jax.tree_util.tree_leaves(one.params), jax.tree_util.tree_leaves(swept.params), strict=True):
            np.testing.assert_allclose(p, q[i], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(swept.history.learning_rate[i], [rate], rtol=1e-6)


def test_a_run_stopped_by_its_hook_resumes_from_its_last_checkpoint(tmp_path):
    def hook(step, values):
        if step >= 4:
            raise RuntimeError("the log disk is full")

    whole = _fit(steps=8, log_every=2)
    with pytest.raises(Exception, match="the log disk is full"):
        _fit(steps=8, log_every=2, on_log=hook, checkpoint_dir=tmp_path, checkpoint_every=3)
    resumed = _fit(steps=8, log_every=2, on_log=lambda step, values: None, checkpoint_dir=tmp_path, checkpoint_every=3)
    assert int(resumed.resumed_epoch) == 3
    _same(whole.params, resumed.params)


def test_a_diverged_update_is_dropped_and_the_run_stops_there():
    result = _fit(fn.sgd(1e3), steps=200)
    stopped = int(result.stopped_epoch)
    assert bool(result.diverged) and 1 < stopped < 200
    assert all(np.all(np.isfinite(p)) for p in jax.tree_util.tree_leaves(result.params))
    _same(result.params, _fit(fn.sgd(1e3), steps=stopped - 1).params)  # the params before the diverged update
    assert int(result.best_epoch) == stopped - 1


def test_on_log_under_vmap_is_refused_clearly_and_history_logs_there():
    def run(key, **kwargs):
        net, params = _mlp()
        return fn.fit(net, fn.mean_squared_error, fn.adam(0.01), params, _regression(), steps=6, key=key, **kwargs)

    keys = jax.random.split(KEY, 2)
    with pytest.raises(ValueError, match="on_log"):
        jax.vmap(lambda k: run(k, log_every=3, on_log=print))(keys)
    assert jax.vmap(lambda k: run(k, log_every=3))(keys).history.step_loss.shape == (2, 2)
