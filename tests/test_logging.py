"""Step logs and progress: ``TensorBoardLogger`` read back by the readers of the packages that wrote
the files, the bar (tqdm present and absent) and the line that says why a fit ended."""

import builtins
import struct
import sys

import jax
import numpy as np
import pytest
from test_steps import _fit, _regression

import funcnet as fn
from funcnet.train import progress

KEY = jax.random.PRNGKey(0)


# --- TensorBoardLogger -----------------------------------------------------------------------------


def _records(path):
    """The records of a TFRecord file, each length and payload checked against its masked CRC32-C
    with tensorboardX's own checksum."""
    from tensorboardX.record_writer import masked_crc32c

    data, at, out = path.read_bytes(), 0, []
    while at < len(data):
        header = data[at : at + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[at + 8 : at + 12])[0] == masked_crc32c(header)
        payload = data[at + 12 : at + 12 + length]
        assert struct.unpack("<I", data[at + 12 + length : at + 16 + length])[0] == masked_crc32c(payload)
        out.append(payload)
        at += 16 + length
    return out


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """One fit logged to TensorBoard (each hook is a program of its own: compiled once here)."""
    pytest.importorskip("tensorboardX")
    logdir = tmp_path_factory.mktemp("runs")
    with fn.TensorBoardLogger(logdir) as logger:
        result = _fit(steps=12, log_every=4, on_log=logger)
    (events,) = logdir.glob("events.out.tfevents.*")
    return result, events


def test_tensorboard_events_read_back_with_tensorboardx_own_protobufs(logged):
    from tensorboardX.proto.event_pb2 import Event

    result, events = logged
    scalars = {}
    for record in _records(events):
        event = Event.FromString(record)
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    h = result.history
    assert sorted(scalars) == ["train/grad_norm", "train/learning_rate", "train/loss"]
    for tag, expected in (("loss", h.step_loss), ("learning_rate", h.learning_rate), ("grad_norm", h.grad_norm)):
        steps, values = zip(*scalars[f"train/{tag}"], strict=True)
        assert list(steps) == [4, 8, 12]
        np.testing.assert_allclose(values, np.asarray(expected), rtol=1e-6)  # float32 in the file


def test_tensorboard_events_read_back_with_tensorboards_reader(logged):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, events = logged
    reader = EventAccumulator(str(events.parent))
    reader.Reload()
    assert sorted(reader.Tags()["scalars"]) == ["train/grad_norm", "train/learning_rate", "train/loss"]
    loss = reader.Scalars("train/loss")
    assert [e.step for e in loss] == [4, 8, 12]
    np.testing.assert_allclose([e.value for e in loss], np.asarray(result.history.step_loss), rtol=1e-6)


def test_tensorboard_logger_without_tensorboardx_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import tensorboardX raises ImportError
    with pytest.raises(ImportError, match=r'pip install "funcnet\[tensorboard\]"'):
        fn.TensorBoardLogger("runs")


# --- on_log's deliveries ----------------------------------------------------------------------------


def test_every_entry_reaches_on_log_in_order_in_a_few_deliveries(monkeypatch):
    deliveries, calls = [], []
    next_due = progress.Clock.next
    counted = lambda self, *a, **k: (deliveries.append(a), next_due(self, *a, **k))[1]
    monkeypatch.setattr(progress.Clock, "next", counted)
    hook = lambda step, values: calls.append((step, values))
    eval_data = _regression(20, seed=1)  # evaluations end blocks of updates every 10: no delivery there
    result = _fit(fn.sgd(0.01), eval_data=eval_data, eval_every=10, patience=None, steps=1000, log_every=1, on_log=hook)
    assert [step for step, _ in calls] == list(range(1, 1001))
    np.testing.assert_allclose([v["loss"] for _, v in calls], result.history.step_loss, rtol=1e-6)
    assert len(deliveries) < 50  # 1,000 entries: one callback each would cost 0.2 ms apiece


def test_entries_wait_at_most_a_window_when_the_host_asks_for_none(monkeypatch):
    from funcnet.train import program

    calls = []
    monkeypatch.setattr(program, "LOG_WINDOW", 3)
    monkeypatch.setattr(progress.Clock, "next", lambda self, *a, **k: np.asarray(progress.NEVER, np.int32))
    result = _fit(steps=20, log_every=2, on_log=lambda step, values: calls.append((step, values)))
    assert [step for step, _ in calls] == list(range(2, 21, 2))
    np.testing.assert_allclose([v["loss"] for _, v in calls], result.history.step_loss, rtol=1e-6)
    np.testing.assert_allclose([v["grad_norm"] for _, v in calls], result.history.grad_norm, rtol=1e-6)


# --- progress --------------------------------------------------------------------------------------


def _without_tqdm(monkeypatch):
    real = builtins.__import__

    def imports(name, *args, **kwargs):
        if name.startswith("tqdm"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", imports)


def test_the_bar_counts_steps_and_ends_saying_the_run_finished(capsys):
    pytest.importorskip("tqdm")
    _fit(steps=30, progress=True)
    out, err = capsys.readouterr()
    assert "30/30" in err and "step" in err and "train " in err
    assert "fit: finished 30 steps, train loss" in out


def test_without_tqdm_lines_are_printed_and_the_end_line_too(capsys, monkeypatch):
    _without_tqdm(monkeypatch)
    eval_data = _regression(20, seed=1)
    _fit(fn.adam(0.5), steps=200, eval_data=eval_data, eval_every=5, patience=0, progress=True)
    out = capsys.readouterr().out
    assert "step 1: train" in out  # the first update is shown at once
    *_, stopped, last = out.strip().splitlines()
    assert last.startswith("fit: early stop at step ") and "best at step " in last
    assert stopped.startswith(f"step {last.split()[5][:-1]}: train ") and " eval " in stopped  # the last evaluation


def test_the_host_asks_for_a_few_reports_a_second_not_one_per_update(monkeypatch):
    reports = []
    original = progress.step_report
    monkeypatch.setattr(progress, "step_report", lambda *a: (reports.append(int(a[0])), original(*a))[1])
    _fit(fn.sgd(0.01), steps=3000, progress=True)
    assert reports[0] == 1 and reports[-1] == 3000
    assert len(reports) < 50  # 3,000 updates, well under a second each way


def test_within_an_epoch_the_bar_shows_the_batch_reached(capsys, monkeypatch):
    pytest.importorskip("tqdm")
    shown, original = [], progress.batch_report
    monkeypatch.setattr(progress, "REPORTS_PER_SECOND", 1e9)  # a report after every batch
    monkeypatch.setattr(progress, "batch_report", lambda *a: (original(*a), shown.append(progress._shown.at))[0])
    _fit(epochs=2, progress=True)
    assert shown == [f"batch {b}/7" for b in range(1, 8)] * 2  # 50 rows, batches of 8: 7 an epoch
    assert "2/2" in capsys.readouterr().err


def test_the_end_line_names_why_the_run_stopped():
    config = fn.train.program.Config(
        rows=50, batch_size=8, batches=7, epochs=100, eval_every=5, patience=1, shuffle=True, masked=True,
        eval_rows=20, eval_batch_size=20, metrics=(), monitor="loss", maximize=False, dtype="float32",
        progress=True, mesh=None, data_axis="data",
    )  # fmt: skip

    def result(stopped, best, diverged=False, best_loss=0.25):
        return fn.FitResult(
            None, None, None, np.int32(best), np.int32(stopped), np.bool_(diverged), {"loss": np.float32(best_loss)},
            np.float32(0.125), np.int32(0),
        )  # fmt: skip

    assert progress.ended(result(100, 100), config) == (
        "fit: finished 100 epochs, train loss 0.125; best at epoch 100 (eval loss 0.25)."
    )
    assert progress.ended(result(40, 30), config) == (
        "fit: early stop at epoch 40: eval loss did not improve for 2 evaluations; best at epoch 30 (eval loss 0.25)."
    )
    assert progress.ended(result(37, 35, diverged=True), config) == (
        "fit: diverged at epoch 37: a loss was not finite; best at epoch 35 (eval loss 0.25)."
    )
    by_steps = config._replace(steps_mode=True, eval_rows=0)
    assert progress.ended(result(12, 11, diverged=True), by_steps) == (
        "fit: diverged at step 12: a loss was not finite; params of step 11 returned."
    )
    members = result(np.array([100, 40, 7]), np.array([100, 30, 6]), np.array([False, False, True]))
    assert progress.ended(members, config) == "fit: 3 runs: 1 finished, 1 stopped early, 1 diverged."


class _SlowRows:
    """Host rows read slowly: a disk that makes a streamed fit wait."""

    def __init__(self, array, delay):
        self.array, self.delay, self.shape, self.dtype = array, delay, array.shape, array.dtype

    def __getitem__(self, index):
        import time

        time.sleep(self.delay)
        return self.array[index]


def test_a_streamed_epoch_shows_rows_per_second_and_rows_done(capsys):
    pytest.importorskip("tqdm")
    x, y = _regression()
    net = fn.serial(fn.Dense(5, fn.tanh), fn.Dense(1, fn.linear))
    params = net.init(KEY, (-1, 4))[1]
    train = (_SlowRows(x, 0.6), y)
    fn.fit(net, fn.mean_squared_error, fn.sgd(0.01), params, train, epochs=1, batch_size=8, key=KEY, progress=True)
    out, err = capsys.readouterr()
    assert "rows/s, 50/50 rows" in err
    assert "fit: finished 1 epoch, train loss" in out
