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


# 2. FitResult explains itself and carries the values a user otherwise digs out of the history.


def test_help_of_fit_result_documents_every_field():
    import pydoc

    for kind in (fn.FitResult, fn.History):
        text = pydoc.render_doc(kind, renderer=pydoc.plaintext)
        assert "Alias for field number" not in text  # NamedTuple's placeholder, which says nothing
        for field in kind._fields:
            doc = getattr(kind, field).__doc__
            assert len(doc) > 20 and doc in text, field


def test_fit_result_has_the_best_evaluation_and_the_last_finite_train_loss():
    x, y = _classes(rows=90)
    net = _classifier()
    _, params = net.init(KEY, (-1, 4))
    result = fn.fit(
        net,
        fn.softmax_cross_entropy,
        fn.sgd(3.0),
        params,
        (x[:60], y[:60]),
        (x[60:], y[60:]),
        epochs=40,
        eval_every=2,
        batch_size=10,
        key=KEY,
        metrics={"accuracy": fn.accuracy},
    )
    stopped = int(result.stopped_epoch)
    assert stopped < 40  # the history is NaN-padded after the stop
    assert np.isnan(result.history.train_loss[-1])
    assert float(result.last_train_loss) == float(result.history.train_loss[stopped - 1])
    at_best = np.flatnonzero(np.asarray(result.history.eval_epoch) == int(result.best_epoch))[0]
    assert float(result.best_eval["loss"]) == float(result.history.eval_loss[at_best])
    assert float(result.best_eval["accuracy"]) == float(result.history.eval_metrics["accuracy"][at_best])
    assert float(result.best_eval["loss"]) == float(np.nanmin(result.history.eval_loss))


def test_fit_result_without_eval_data_or_after_divergence():
    x, y = _classes()
    net = _classifier()
    _, params = net.init(KEY, (-1, 4))
    plain = fn.fit(net, fn.softmax_cross_entropy, fn.sgd(0.1), params, (x, y), epochs=3, batch_size=10, key=KEY)
    assert float(plain.last_train_loss) == float(plain.history.train_loss[-1])
    assert np.isnan(plain.best_eval["loss"])
    xr = np.random.default_rng(0).standard_normal((40, 4))
    yr = 1e3 * xr[:, :1]
    reg = fn.serial(fn.Dense(8, fn.linear), fn.Dense(1, fn.linear))
    _, p = reg.init(KEY, (-1, 4))
    blown = fn.fit(reg, fn.mean_squared_error, fn.sgd(1.0), p, (xr, yr), epochs=30, batch_size=10, key=KEY)
    assert bool(blown.diverged)
    finite = np.asarray(blown.history.train_loss)
    finite = finite[np.isfinite(finite)]
    expected = finite[-1] if finite.size else np.nan
    np.testing.assert_equal(float(blown.last_train_loss), expected)


# 3. Early stopping is stated where a user meets it, and can be turned off.


def test_help_of_fit_states_the_early_stopping_rule_without_pointing_into_source_files():
    doc = fn.fit.__doc__
    assert "stops at the first evaluation that does not improve" in " ".join(doc.split())
    assert "patience=None" in doc
    assert ".py" not in doc  # no "see program.py": help() is where the user reads


def _stopping_run(**kwargs):
    kwargs = {"eval_every": 2, **kwargs}
    x, y = _classes(rows=90)
    rng = np.random.default_rng(1)  # a fifth of the training labels random: the net overfits them
    noisy = rng.random(60) < 0.2
    y[:60][noisy] = rng.integers(0, 3, noisy.sum())
    net = _classifier()
    _, params = net.init(KEY, (-1, 4))
    return fn.fit(
        net,
        fn.softmax_cross_entropy,
        fn.sgd(3.0),
        params,
        (x[:60], y[:60]),
        (x[60:], y[60:]),
        batch_size=10,
        key=KEY,
        **kwargs,
    )


def test_patience_none_trains_every_epoch_and_keeps_the_best():
    stopping = _stopping_run(epochs=40)
    assert int(stopping.stopped_epoch) < 40
    full = _stopping_run(epochs=40, patience=None)
    assert int(full.stopped_epoch) == 40 and not np.isnan(full.history.train_loss[-1])
    assert int(full.best_epoch) < 40
    assert float(full.best_eval["loss"]) == float(np.nanmin(full.history.eval_loss))


def test_too_few_epochs_for_an_evaluation_says_how_to_fix_it():
    with pytest.raises(ValueError, match=r"evaluates every eval_every epochs.*eval_every=5 or less"):
        _stopping_run(epochs=5, eval_every=10)


# 4. A finished run continues with more epochs; resuming says so; refusals read one per line.


def _long(checkpoint_dir=None, lr=0.01, **kwargs):
    x, y = _classes(rows=90)
    net = fn.serial(fn.Dense(8, fn.tanh), fn.Dropout(0.1), fn.Dense(3, fn.linear))
    _, params = net.init(KEY, (-1, 4))
    args = dict(epochs=6, eval_every=2, patience=None, batch_size=16, key=KEY, metrics={"accuracy": fn.accuracy})
    args.update(kwargs)
    return fn.fit(
        net,
        fn.softmax_cross_entropy,
        fn.adam(lr),
        params,
        (x[:60], y[:60]),
        (x[60:], y[60:]),
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=2,
        **args,
    )


def _equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_a_finished_run_continues_to_more_epochs_and_equals_the_longer_run(tmp_path, capsys):
    first = _long(tmp_path, epochs=6)
    assert int(first.resumed_epoch) == 0
    continued = _long(tmp_path, epochs=10, progress=True)
    assert "resumed from epoch 6" in capsys.readouterr().out
    assert int(continued.resumed_epoch) == 6
    whole = _long(epochs=10)
    _equal(continued._replace(resumed_epoch=whole.resumed_epoch), whole)
    again = _long(tmp_path, epochs=10, eval_batch_size=7)  # not part of the run's identity
    assert int(again.resumed_epoch) == 10
    with pytest.raises(ValueError, match=r"trained to epoch 10 .*beyond epochs=8; ask for epochs >= 10"):
        _long(tmp_path, epochs=8)


def test_a_run_that_stopped_early_stays_stopped_when_asked_for_more(tmp_path):
    stopped = _long(tmp_path, epochs=30, patience=0, lr=0.2)
    assert int(stopped.stopped_epoch) < 30
    longer = _long(tmp_path, epochs=40, patience=0, lr=0.2)
    assert int(longer.resumed_epoch) == int(stopped.stopped_epoch)
    _equal(longer._replace(resumed_epoch=0), _long(epochs=40, patience=0, lr=0.2))


def test_another_run_is_refused_one_difference_per_line_without_private_names(tmp_path):
    _long(tmp_path, epochs=2)
    with pytest.raises(ValueError) as refused:
        _long(tmp_path, epochs=2, batch_size=10, key=jax.random.PRNGKey(5))
    lines = str(refused.value).splitlines()
    assert lines[1].strip().startswith("batch_size: 16 there, 10 here")
    assert lines[2].strip().startswith("key: ")
    assert "_Dense" not in str(refused.value) and "0x" not in str(refused.value)


def test_read_checkpoint_gives_params_and_best_params_without_resuming(tmp_path):
    result = _long(tmp_path, epochs=6)
    net = fn.serial(fn.Dense(8, fn.tanh), fn.Dropout(0.1), fn.Dense(3, fn.linear))
    like = jax.eval_shape(lambda k: net.init(k, (-1, 4))[1], KEY)
    read = fn.read_checkpoint(tmp_path, like)
    assert read.epoch == 6 and read.best_epoch == int(result.best_epoch) and not read.stopped
    _equal(read.best_params, result.params)
    assert jax.tree_util.tree_structure(read.params) == jax.tree_util.tree_structure(result.params)


# 5. A layer a user writes: LayerSpec values compile once; a closure layer can carry a name.


@fn.layer_spec
class _Scale(fn.LayerSpec):
    factor: float

    @property
    def name(self):
        return f"Scale({self.factor})"

    def init(self, key, input_shape):
        del key
        return tuple(input_shape), ()

    def apply(self, params, x, *, key=None):
        del params, key
        return x * self.factor


def test_a_user_layer_spec_is_a_value_and_a_rebuilt_network_compiles_nothing_new():
    from test_sweep import compilations

    assert _Scale(0.5).layer() == _Scale(0.5).layer() and _Scale(0.5).layer() != _Scale(0.25).layer()
    x, y = _classes()
    build = lambda: fn.serial(fn.Dense(8, fn.tanh), _Scale(0.5).layer(), fn.Dense(3, fn.linear))
    _, params = build().init(KEY, (-1, 4))
    run = lambda: fn.fit(build(), fn.softmax_cross_entropy, fn.sgd(0.1), params, (x, y), epochs=1, key=KEY)
    run()
    with compilations() as compiled:
        run()
    assert compiled == []
    assert "Scale(0.5)" in fn.summary(build(), (-1, 4))


def test_a_closure_layer_carries_its_name_into_summary_and_errors():
    def init(key, input_shape):
        return input_shape, ()

    def apply(params, x, *, key=None):
        if x.shape[-1] != 4:
            raise ValueError(f"x must have 4 features, got {x.shape[-1]}")
        return x

    net = fn.serial(fn.Dense(4, fn.tanh), fn.named("Check4", fn.Layer(init, apply)), fn.Dense(2, fn.linear))
    assert "Check4" in fn.summary(net, (-1, 3))
    other = fn.serial(fn.Dense(5, fn.tanh), fn.named("Check4", fn.Layer(init, apply)))
    _, params = other.init(KEY, (-1, 3))
    with pytest.raises(ValueError, match=r"layer 1 \(Check4\): x must have 4 features"):
        other.apply(params, np.ones((2, 3)))


# 6. Recurrent layers take a state in and give it out: sampling compiles once.


@pytest.mark.parametrize("cell", ["RNN", "LSTM", "GRU"])
def test_a_recurrent_layer_fed_step_by_step_equals_the_whole_sequence(cell):
    layer = getattr(fn, cell)(5)
    _, params = layer.init(KEY, (-1, 6, 3))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 3)))
    whole, final = layer.apply(params, x, return_state=True)
    np.testing.assert_array_equal(whole, layer.apply(params, x))
    state, steps = None, []
    for t in range(6):
        h, state = layer.apply(params, x[:, t : t + 1], initial_state=state, return_state=True)
        steps.append(h)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), whole, rtol=1e-12, atol=1e-12)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12), state, final)
    step = jax.jit(lambda p, xt, s: layer.apply(p, xt, initial_state=s, return_state=True))
    s = final
    for t in range(4):
        _, s = step(params, x[:, t : t + 1], s)
    assert step._cache_size() == 1  # one compiled step serves every position


def test_a_recurrent_layer_given_integer_ids_suggests_one_hot_or_embedding():
    layer = fn.LSTM(4)
    _, params = layer.init(KEY, (-1, 5, 3))
    with pytest.raises(TypeError, match=r"one_hot.*or put an Embedding"):
        layer.apply(params, np.zeros((2, 5, 3), np.int32))
    with pytest.raises(TypeError, match=r"initial_state must be the pair \(h, c\)"):
        layer.apply(params, np.zeros((2, 5, 3)), initial_state=np.zeros((2, 4)))


# 7. Defaults readable in help(); entry checks that say what to write.


def test_help_of_dense_shows_its_defaults_by_name_and_says_which_are_the_books():
    import pydoc

    text = pydoc.render_doc(fn.Dense, renderer=pydoc.plaintext)
    assert "activation: 'Callable[[jax.Array], jax.Array]' = <function sigmoid" in text
    assert "checked_custom_vjp object" not in text
    assert "book" in fn.Dense.__doc__ and "glorot_normal" in fn.Dense.__doc__


def test_init_names_a_seed_or_a_missing_key_and_a_none_batch():
    net = fn.serial(fn.Dense(4, fn.tanh), fn.Dense(2, fn.linear))
    with pytest.raises(TypeError, match=r"init's key must be a jax.random key.*got 0"):
        net.init(0, (-1, 3))
    with pytest.raises(TypeError, match=r"init takes \(key, input_shape\), got one argument \(-1, 3\)"):
        net.init((-1, 3))
    with pytest.raises(TypeError, match=r"write an unknown batch size as -1, e.g. \(-1, 3\)"):
        net.init(KEY, (None, 3))
    assert "(-1, 2)" in fn.summary(net, (-1, 3))  # summary traces init: a traced key passes


def test_float_class_labels_suggest_integers():
    logits = jnp.zeros((4, 3))
    with pytest.raises(ValueError, match=r"look like class labels: pass them as integers"):
        fn.softmax_cross_entropy(logits, jnp.zeros(4))
    with pytest.raises(ValueError, match=r"look like class labels: pass them as integers"):
        fn.accuracy(logits, jnp.zeros(4))


def test_load_takes_an_abstract_tree(tmp_path):
    net = fn.serial(fn.Dense(4, fn.tanh), fn.Dense(2, fn.linear))
    _, params = net.init(KEY, (-1, 3))
    fn.save(tmp_path / "p.safetensors", params)
    like = jax.eval_shape(lambda k: net.init(k, (-1, 3))[1], KEY)
    _equal(fn.load(tmp_path / "p.safetensors", like), params)


def test_check_vjp_takes_a_layers_params_and_names_the_leaf():
    layer = fn.Dense(3, fn.tanh)
    _, params = layer.init(KEY, (-1, 4))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 4)))
    reference = lambda p, x: jnp.tanh(x @ p.W + p.B)
    fn.check_vjp(layer.apply, reference, params, x)
    wrong = jax.custom_vjp(reference)
    wrong.defvjp(
        lambda p, x: (reference(p, x), (p, x)),
        lambda r, g: (
            jax.vjp(reference, *r)[1](g)[0]._replace(W=jnp.zeros_like(r[0].W)),
            jax.vjp(reference, *r)[1](g)[1],
        ),
    )
    with pytest.raises(AssertionError, match=r"argument 0 \(\.W\)"):
        fn.check_vjp(wrong, reference, params, x)


# Errors that name the fix (issue "Nothing silently wrong, round 4").


def test_init_without_the_batch_dimension_suggests_it():
    with pytest.raises(ValueError, match=r"the batch comes first: \(-1, 64\)"):
        fn.Dense(3).init(KEY, (64,))
    with pytest.raises(ValueError, match=r"serial: layer 0 \(Dense\(4, tanh\)\).*\(-1, 64\)"):
        fn.serial(fn.Dense(4, fn.tanh), fn.Dense(2, fn.linear)).init(KEY, (64,))
    with pytest.raises(ValueError, match=r"the batch comes first: \(-1, 5, 3\)"):
        fn.LSTM(4).init(KEY, (5, 3))


def test_init_output_passed_as_params_says_to_unpack_it():
    """``net.init`` returns ``(output_shape, params)``; passing the pair as params is named."""
    net = _classifier()
    both = net.init(KEY, (-1, 4))
    x, y = _classes()
    unpack = r"_, params = net\.init\(key, input_shape\)"
    with pytest.raises(TypeError, match=unpack):
        net.apply(both, x)
    with pytest.raises(TypeError, match=unpack):
        fn.Dense(3).apply(fn.Dense(3).init(KEY, (-1, 4)), x)
    with pytest.raises(TypeError, match=unpack):
        fn.fit(net, fn.softmax_cross_entropy, fn.sgd(0.1), both, (x, y), epochs=1, key=KEY)


def test_fit_without_a_key_says_what_the_key_is_for():
    x, y = _classes()
    net = _classifier()
    _, params = net.init(KEY, (-1, 4))
    with pytest.raises(TypeError, match=r"missing .*'key'.*shuffle order.*dropout.*key=jax\.random\.PRNGKey\(0\)"):
        fn.fit(net, fn.softmax_cross_entropy, fn.sgd(0.1), params, (x, y), epochs=1, shuffle=False)


def test_the_multihost_example_without_a_launcher_says_to_pass_processes():
    import os
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "multihost.py"
    cluster = ("JAX_COORDINATOR", "SLURM_", "OMPI_", "PMI_", "KUBERNETES_", "JOB_COMPLETION_INDEX")
    env = {k: v for k, v in os.environ.items() if not k.startswith(cluster)}
    done = subprocess.run([sys.executable, str(example)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "pass --processes N" in done.stderr and "Traceback" not in done.stderr, done.stderr
