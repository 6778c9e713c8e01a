"""Long runs: checkpoints inside fit, exact resume after a kill, runs never mixed, metrics,
evaluation in batches."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from test_sweep import compilations

import funcnet as fn
from funcnet import checkpoint
from funcnet.train import checkpointing

HERE = Path(__file__).resolve().parent
KEY = jax.random.PRNGKey(1)
rng = np.random.default_rng(0)
X = rng.standard_normal((100, 5))
Y = (X[:, 0] + X[:, 1] > 0).astype(np.int32) + (X[:, 2] > 0.8).astype(np.int32)
TRAIN, EVAL = (X[:70], Y[:70]), (X[70:], Y[70:])


def _net(width=12):
    return fn.serial(fn.Dense(width, fn.tanh), fn.Dropout(0.2), fn.Dense(3, fn.linear))


PARAMS = _net().init(jax.random.PRNGKey(0), (-1, 5))[1]


def _fit(checkpoint_dir=None, net=None, params=PARAMS, optimizer=None, **kw):
    args = dict(epochs=9, batch_size=16, eval_every=2, patience=50, key=KEY, metrics={"accuracy": fn.accuracy})
    args.update(kw)
    return fn.fit(
        net or _net(),
        fn.softmax_cross_entropy,
        optimizer or fn.adam(0.01),
        params,
        TRAIN,
        EVAL,
        checkpoint_dir=checkpoint_dir,
        **args,
    )


def _equal(a, b):
    """Equal results; where both are FitResults, ``resumed_epoch`` (where a call began) aside."""
    if isinstance(a, fn.FitResult) and isinstance(b, fn.FitResult):
        a = a._replace(resumed_epoch=b.resumed_epoch)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def _files(directory):
    return sorted(p.name for p in Path(directory).iterdir())


def test_a_checkpointed_fit_equals_a_plain_one_bit_for_bit_and_compiles_nothing_new(tmp_path):
    plain = _fit()
    with compilations() as compiled:
        every_epoch = _fit(tmp_path / "a", checkpoint_every=1)
        uneven = _fit(tmp_path / "b", checkpoint_every=4)  # segments 4, 4 and a last one of 1
    assert compiled == []
    _equal(every_epoch, plain)
    _equal(uneven, plain)
    assert _files(tmp_path / "a") == ["checkpoint-000008.safetensors", "checkpoint-000009.safetensors"]
    assert _files(tmp_path / "b") == ["checkpoint-000008.safetensors", "checkpoint-000009.safetensors"]


def _interrupt_after(monkeypatch, epoch):
    """Make fit raise KeyboardInterrupt right after it saved the checkpoint of ``epoch`` epochs."""
    store = checkpointing.store

    def interrupted(directory, state, done, run):
        store(directory, state, done, run)
        if done == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpointing, "store", interrupted)


def test_a_run_interrupted_after_a_checkpoint_resumes_exactly(tmp_path, monkeypatch):
    whole = _fit(epochs=12, patience=1)  # early stopping state is in the checkpoint too
    _interrupt_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path, epochs=12, patience=1)
    monkeypatch.undo()
    assert _files(tmp_path) == ["checkpoint-000002.safetensors", "checkpoint-000003.safetensors"]
    _equal(_fit(tmp_path, epochs=12, patience=1), whole)


def test_a_finished_run_returns_its_result_without_training(tmp_path, monkeypatch):
    first = _fit(tmp_path)

    def train(*args, **kwargs):
        raise AssertionError("a finished run trained again")

    monkeypatch.setattr("funcnet.train.fitting.segment", train)
    _equal(_fit(tmp_path), first)


def _case(out, directory=None, slow=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **({"FUNCNET_TEST_SLOW": slow} if slow else {})}
    args = [sys.executable, str(HERE / "_long_run_case.py"), str(out)] + ([str(directory)] if directory else [])
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_process_killed_mid_run_resumes_and_equals_an_uninterrupted_run(tmp_path):
    directory = tmp_path / "run"
    victim = _case(tmp_path / "never.npz", directory, slow="0.15")
    deadline = time.monotonic() + 120
    while not (directory.is_dir() and any(p.name.startswith("checkpoint-000005") for p in directory.iterdir())):
        assert victim.poll() is None and time.monotonic() < deadline, victim.communicate()[1][-2000:]
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "never.npz").exists()
    resumed, whole = _case(tmp_path / "resumed.npz", directory), _case(tmp_path / "whole.npz")
    for process in (resumed, whole):
        assert process.wait(timeout=300) == 0, process.communicate()[1][-3000:]
    resumed, whole = np.load(tmp_path / "resumed.npz"), np.load(tmp_path / "whole.npz")
    assert int(whole["trained"]) == 24 and 0 < int(resumed["trained"]) <= 24 - 5
    assert set(resumed.files) == set(whole.files)
    assert int(resumed[".resumed_epoch"]) >= 5 and int(whole[".resumed_epoch"]) == 0
    for name in whole.files:
        if name not in ("trained", ".resumed_epoch"):
            np.testing.assert_array_equal(resumed[name], whole[name], err_msg=name)


def test_a_torn_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, monkeypatch):
    whole = _fit()
    _interrupt_after(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path)
    monkeypatch.undo()
    newest = tmp_path / "checkpoint-000004.safetensors"
    data = newest.read_bytes()
    newest.write_bytes(data[:-100] + bytes(100))  # the same length, a zeroed tail: only the CRC sees it
    with pytest.warns(RuntimeWarning, match="skipping the unreadable checkpoint .*checkpoint-000004"):
        resumed = _fit(tmp_path)
    _equal(resumed, whole)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_no_readable_checkpoint_is_an_error_naming_the_file(tmp_path, damage):
    _fit(tmp_path, epochs=2, checkpoint_every=1)
    for path in tmp_path.iterdir():
        path.write_bytes(path.read_bytes()[:50] if damage == "truncate" else b"not a checkpoint")
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match=r"no readable checkpoint .*checkpoint-000002"):
        _fit(tmp_path, epochs=2, checkpoint_every=1)


OTHER_RUNS = {
    "network": dict(net=fn.serial(fn.Dense(12, fn.relu), fn.Dropout(0.2), fn.Dense(3, fn.linear))),
    "params": dict(params=jax.tree_util.tree_map(lambda a: a + 1, PARAMS)),
    "optimizer": dict(optimizer=fn.adam(0.02)),
    "batch_size": dict(batch_size=10),
    "eval_every": dict(eval_every=3),
    "patience": dict(patience=2),
    "key": dict(key=jax.random.PRNGKey(2)),
    "metrics": dict(metrics={}),
    "monitor": dict(monitor="accuracy", mode="max"),
}


@pytest.mark.parametrize("what", OTHER_RUNS)
def test_a_checkpoint_of_another_run_is_refused(tmp_path, what):
    _fit(tmp_path, epochs=9, checkpoint_every=3)
    with pytest.raises(
        ValueError,
        match=rf"holds a checkpoint of another run \(checkpoint-000009.safetensors\); what differs:"
        rf"[\s\S]*\n  [\w ]*{what}: .* there, .* here",
    ):
        _fit(tmp_path, **OTHER_RUNS[what])


def test_another_loss_or_data_shape_is_refused(tmp_path):
    net = fn.serial(fn.Dense(3, fn.linear))
    params = net.init(KEY, (-1, 5))[1]
    one_hot = np.eye(3)[Y]
    run = lambda y, loss: fn.fit(net, loss, fn.sgd(0.1), params, (X, y), epochs=2, key=KEY, checkpoint_dir=tmp_path)
    run(one_hot, fn.mean_squared_error)
    with pytest.raises(ValueError, match=r"loss: .*mean_squared_error there, .*softmax_cross_entropy here"):
        run(one_hot, fn.softmax_cross_entropy)
    with pytest.raises(
        ValueError,
        match=r"train data: float64\[100, 5\] / float64\[100, 3\], values \w+/\w+ there, "
        r"float64\[100, 5\] / int32\[100\], values \w+/\w+ here",
    ):
        run(Y, fn.softmax_cross_entropy)


def test_leftover_temporary_files_are_removed_and_never_read(tmp_path):
    tmp_path.joinpath(".funcnet-crashed.tmp").write_bytes(b"half a checkpoint")
    _fit(tmp_path, epochs=2)
    assert _files(tmp_path) == ["checkpoint-000001.safetensors", "checkpoint-000002.safetensors"]


def test_writes_follow_the_posix_recipe(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(
        checkpoint.os,
        "fsync",
        lambda fd: calls.append(("fsync", os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")))) or real_fsync(fd),
    )
    monkeypatch.setattr(
        checkpoint.os,
        "replace",
        lambda a, b: calls.append(("rename", Path(a).name.startswith(".funcnet-"))) or real_replace(a, b),
    )
    fn.save(tmp_path / "p.safetensors", PARAMS)
    # the temporary file is synced, renamed into place, then the directory is synced
    assert calls == [("fsync", False), ("rename", True), ("fsync", True)]


def test_metrics_are_recorded_and_the_best_evaluation_matches_the_returned_params():
    result = _fit(epochs=20, patience=1)
    evals = np.asarray(result.history.eval_loss)
    best = int(np.nanargmin(evals))
    assert int(result.history.eval_epoch[best]) == int(result.best_epoch)
    accuracy = np.asarray(result.history.eval_metrics["accuracy"])
    assert accuracy.shape == evals.shape and np.array_equal(np.isnan(accuracy), np.isnan(evals))
    predicted = _net().apply(result.params, EVAL[0])
    assert accuracy[best] == pytest.approx(float(fn.accuracy(predicted, EVAL[1])), abs=1e-12)
    assert evals[best] == pytest.approx(float(fn.softmax_cross_entropy(predicted, EVAL[1])), rel=1e-12)


def test_early_stopping_can_watch_a_metric_to_maximise():
    result = _fit(epochs=30, monitor="accuracy", mode="max", patience=2, optimizer=fn.sgd(0.3))
    accuracy = np.asarray(result.history.eval_metrics["accuracy"])
    ran = accuracy[~np.isnan(accuracy)]
    best = int(np.argmax(ran))  # the first maximum: later equal values are not improvements
    assert int(result.best_epoch) == int(result.history.eval_epoch[best])
    assert len(ran) - 1 - best == 3 or len(ran) == 15  # stopped after patience + 1 evaluations without a gain


def test_evaluation_in_batches_equals_one_pass():
    whole = _fit(epochs=6)
    for size in (7, 10):  # a remainder of 2, none
        batched = _fit(epochs=6, eval_batch_size=size)
        np.testing.assert_allclose(batched.history.eval_loss, whole.history.eval_loss, rtol=1e-12)
        np.testing.assert_allclose(
            batched.history.eval_metrics["accuracy"], whole.history.eval_metrics["accuracy"], rtol=1e-12
        )
        _equal(batched.params, whole.params)


BAD = [
    (dict(checkpoint_every=0), ValueError, "fit: checkpoint_every must be >= 1, got 0"),
    (dict(checkpoint_dir=3), TypeError, "fit: checkpoint_dir must be a path"),
    (dict(monitor="acc"), ValueError, r"fit: monitor must be 'loss' or a name in metrics \['accuracy'\], got 'acc'"),
    (dict(mode="up"), ValueError, "fit: mode must be 'min' or 'max', got 'up'"),
    (dict(metrics={"accuracy": "accuracy"}), TypeError, r"fit: metrics\['accuracy'\] must be a callable"),
    (dict(metrics={"loss": fn.accuracy}), ValueError, "metrics names must be strings other than 'loss'"),
    (dict(metrics=[fn.accuracy]), TypeError, "fit: metrics must be a dict"),
    (dict(metrics={"first": lambda p, t: p[0]}), ValueError, "the metric 'first' must return a scalar"),
    (dict(eval_batch_size=0), ValueError, "fit: eval_batch_size must be >= 1, got 0"),
]


@pytest.mark.parametrize("override,error,message", BAD)
def test_bad_input_is_rejected_before_compiling(override, error, message):
    with compilations() as compiled, pytest.raises(error, match=message):
        _fit(**override)
    assert compiled == []


def test_a_file_where_the_directory_should_be_is_rejected(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="fit: checkpoint_dir must be a directory, got the file"):
        _fit(tmp_path / "file")


def test_metrics_need_eval_data_and_checkpoints_need_concrete_values(tmp_path):
    with pytest.raises(ValueError, match=r"metrics \['accuracy'\] are computed on eval_data"):
        fn.fit(
            _net(),
            fn.softmax_cross_entropy,
            fn.sgd(0.1),
            PARAMS,
            TRAIN,
            epochs=2,
            key=KEY,
            metrics={"accuracy": fn.accuracy},
        )
    with pytest.raises(ValueError, match="checkpoint_dir needs concrete values"):
        jax.jit(lambda lr: _fit(tmp_path, optimizer=fn.sgd(lr)).params)(0.1)


def _run_with(tmp_path, activation, **kw):
    net = fn.serial(fn.Dense(4, activation), fn.Dense(3, fn.linear))
    params = net.init(jax.random.PRNGKey(0), (-1, 5))[1]
    return fn.fit(
        net, fn.softmax_cross_entropy, fn.sgd(0.1), params, TRAIN, epochs=2, key=KEY, checkpoint_dir=tmp_path, **kw
    )


def test_lambdas_are_never_matched_to_another_runs_checkpoint(tmp_path):
    """Both described as ``<lambda>``, the relu run returned the tanh run's result untrained."""
    with pytest.warns(RuntimeWarning, match=r"<lambda> \(a function\) cannot be shown equal.*run_name"):
        _run_with(tmp_path, lambda z: fn.tanh(z))
    with (
        pytest.warns(RuntimeWarning),
        pytest.raises(ValueError, match=r"(?s)another run.*building blocks without value equality.*run_name="),
    ):
        _run_with(tmp_path, lambda z: fn.relu(z))


@pytest.mark.parametrize(
    "make",
    [
        lambda: lambda z: fn.tanh(z),
        lambda: __import__("functools").partial(fn.tanh),
        lambda: jax.tree_util.Partial(fn.tanh),
        lambda: type("Tanh", (), {"__call__": lambda self, z: fn.tanh(z)})(),
    ],
    ids=["lambda", "partial", "Partial", "object"],
)
def test_what_cannot_be_shown_equal_is_reported(make):
    unprovable = []
    checkpointing.describe(make(), unprovable)
    assert len(unprovable) == 1
    unprovable = []
    checkpointing.describe((fn.tanh, fn.Dense(3, fn.relu), fn.normal(0.1), np.tanh, jax.numpy.tanh), unprovable)
    assert unprovable == []


def test_a_named_run_resumes_with_building_blocks_funcnet_cannot_compare(tmp_path):
    first = _run_with(tmp_path, lambda z: fn.tanh(z), run_name="tanh net")
    written = {p.name: p.stat().st_mtime_ns for p in Path(tmp_path).iterdir()}
    again = _run_with(tmp_path, lambda z: fn.tanh(z), run_name="tanh net")  # resumed: finished, not trained
    assert {p.name: p.stat().st_mtime_ns for p in Path(tmp_path).iterdir()} == written
    _equal(first.params, again.params)
    with pytest.raises(ValueError, match=r"run name: 'tanh net' there, 'other' here"):
        _run_with(tmp_path, lambda z: fn.tanh(z), run_name="other")


def test_the_datas_values_are_part_of_the_fingerprint(tmp_path):
    _run_with(tmp_path, fn.tanh)
    y = TRAIN[1].copy()
    y[5] = (y[5] + 1) % 3
    with pytest.raises(ValueError, match=r"train data: float64\[70, 5\] / int\d+\[70\], values \w+/\w+ there"):
        fn.fit(
            fn.serial(fn.Dense(4, fn.tanh), fn.Dense(3, fn.linear)),
            fn.softmax_cross_entropy,
            fn.sgd(0.1),
            fn.serial(fn.Dense(4, fn.tanh), fn.Dense(3, fn.linear)).init(jax.random.PRNGKey(0), (-1, 5))[1],
            (TRAIN[0], y),
            epochs=2,
            key=KEY,
            checkpoint_dir=tmp_path,
        )


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, np.int32, np.int8])
def test_the_data_digest_is_the_same_on_the_host_and_on_the_device(dtype):
    from funcnet.train import checks

    data = (np.random.default_rng(3).standard_normal((33, 4)) * 50).astype(dtype)
    host = checks.check_data("train_data", (data, data[:, 0]))[2]
    device = checks.check_data("train_data", (jax.numpy.asarray(data), jax.numpy.asarray(data[:, 0])))[2]
    assert host == device
    changed = data.copy()
    changed[32, 3] += 1
    assert checks.check_data("train_data", (changed, data[:, 0]))[2] != host
    swapped = data[[1, 0, *range(2, 33)]]
    assert (data[0] == data[1]).all() or checks.check_data("train_data", (swapped, data[:, 0]))[2] != host
