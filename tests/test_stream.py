"""Streamed fits (funcnet/train/stream.py): host data fed a segment at a time gives the
device-resident fit's result bit for bit, in bounded memory, with progress and clear errors."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import with_fusion_emitters

import funcnet as fn
from funcnet.train import stream

HERE = Path(__file__).resolve().parent
KEY = jax.random.PRNGKey(1)
rng = np.random.default_rng(0)
X = rng.standard_normal((100, 5))
Y = (X[:, 0] + X[:, 1] > 0).astype(np.int32) + (X[:, 2] > 0.8).astype(np.int32)
NET = fn.serial(fn.Dense(12, fn.tanh), fn.Dropout(0.2), fn.Dense(3, fn.linear))
PARAMS = NET.init(jax.random.PRNGKey(0), (-1, 5))[1]


class Rows:
    """An indexable host array like an h5py dataset: shape, dtype, rows by an increasing index array."""

    def __init__(self, array, delay=0.0):
        self.array, self.shape, self.dtype, self.delay, self.reads = array, array.shape, array.dtype, delay, 0

    def __getitem__(self, index):
        index = np.asarray(index)
        if index.ndim != 1 or np.any(np.diff(index) <= 0):
            raise TypeError("indices must be increasing")  # as h5py says
        self.reads += 1
        if self.delay:
            import time

            time.sleep(self.delay)
        return self.array[index]


def _fit(train=(X[:70], Y[:70]), eval_data=(X[70:], Y[70:]), **kw):
    # one configuration for most tests, so they share compiled programs: early stopping on a
    # metric with evaluations skipped, 30 eval rows in batches of 8 (the last of 6), 70 training
    # rows in batches of 16 (the last masked), dropout
    args = dict(
        epochs=9,
        batch_size=16,
        eval_every=2,
        patience=0,
        min_delta=0.05,  # accuracy rises by 1/30 per evaluation: training stops at epoch 4
        monitor="accuracy",
        mode="max",
        key=KEY,
        metrics={"accuracy": fn.accuracy},
        eval_batch_size=8,
    )
    args.update(kw)
    if eval_data is None:
        for name in ("metrics", "monitor", "mode"):
            args.pop(name)
    return fn.fit(NET, fn.softmax_cross_entropy, fn.adam(0.01), PARAMS, train, eval_data, **args)


def _equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def _equal_resumed(resumed, plain):
    """Equal but for ``resumed_epoch``, the epoch the resumed call began from."""
    assert int(resumed.resumed_epoch) > 0
    _equal(resumed._replace(resumed_epoch=plain.resumed_epoch), plain)


@pytest.fixture
def small_segments(monkeypatch):
    """Two training batches (16 rows of 5 float64 and an int32 label) per segment, the 5th
    alone; the 3 full eval batches in one segment, then the last: epochs span segments."""
    monkeypatch.setattr(stream, "SEGMENT_BYTES", 1500)


CASES = {
    "early stopping on a metric, eval batches, masked last batch": dict(),
    "eval in one batch, no shuffle, resumed by hand": dict(
        eval_batch_size=64, shuffle=False, start_epoch=3, epochs=8, monitor="loss", mode="min", patience=5
    ),
    "no eval data, drop_last": dict(eval_data=None, drop_last=True, epochs=4),
}


@pytest.mark.parametrize("case", CASES)
def test_a_streamed_fit_equals_the_device_fit_bit_for_bit(case, small_segments):
    kw = CASES[case]
    resident = _fit(stream=False, **kw)
    streamed = _fit(stream=True, **kw)
    _equal(streamed, resident)
    if not kw:
        assert int(streamed.stopped_epoch) < 9  # it did stop early


def test_layer_state_and_a_moving_average_stream_to_the_same_result(small_segments, request):
    """BatchNorm's running statistics ride in the params and the moving average in the optimizer
    state, through the streamed steps and the evaluation of the average, as on the device."""
    if with_fusion_emitters(request):  # bit for bit as users compile (conftest.py)
        return
    net = fn.serial(fn.Dense(12, fn.tanh), fn.BatchNorm(0.8), fn.Dense(3, fn.linear))
    params = net.init(jax.random.PRNGKey(0), (-1, 5))[1]

    def run(stream):
        return fn.fit(
            net, fn.softmax_cross_entropy, fn.adam(0.01), params, (X[:70], Y[:70]), (X[70:], Y[70:]),
            epochs=4, batch_size=16, eval_every=2, eval_batch_size=8, key=KEY, ema_decay=0.9, eval_ema=True,
            stream=stream,
        )  # fmt: skip

    _equal(run(True), run(False))


def test_a_memmap_and_an_h5py_like_object_stream_to_the_same_result(tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "SEGMENT_BYTES", 1000)  # one training batch per segment; eval batches 2 + 1
    path = tmp_path / "x.f64"
    mapped = np.memmap(path, np.float64, "w+", shape=X.shape)
    mapped[:] = X
    mapped.flush()
    x = np.memmap(path, np.float64, "r", shape=X.shape)
    resident = _fit(stream=False)
    by_memmap = _fit(train=(x[:70], Y[:70]), eval_data=(x[70:], Y[70:]), stream=True)
    _equal(by_memmap, resident)
    rows = Rows(X[:70])
    by_rows = _fit(train=(rows, Rows(Y[:70])), eval_data=(Rows(X[70:]), Y[70:]))  # stream=None streams these
    _equal(by_rows, resident)
    assert rows.reads > 9  # several segments per epoch, each read from the object


def test_streamed_checkpoints_equal_and_resume_device_checkpoints(tmp_path, small_segments):
    plain = _fit(stream=False)
    streamed = _fit(stream=True, checkpoint_dir=tmp_path / "s", checkpoint_every=2)
    _equal(streamed, plain)
    # a device-resident run's checkpoints, the newest removed, resumed by a streamed fit
    _fit(stream=False, checkpoint_dir=tmp_path / "d", checkpoint_every=2)
    files = sorted((tmp_path / "d").glob("checkpoint-*.safetensors"))
    files[-1].unlink()
    resumed = _fit(stream=True, checkpoint_dir=tmp_path / "d", checkpoint_every=2)
    _equal_resumed(resumed, plain)
    again = _fit(stream=True, checkpoint_dir=tmp_path / "s", checkpoint_every=2)  # finished: read back
    _equal_resumed(again, plain)


@pytest.mark.parametrize("kind", ["array", "memmap"])
def test_a_large_gather_split_across_threads_is_exact(kind, tmp_path):
    big = rng.standard_normal((20_000, 3))
    if kind == "memmap":
        mapped = np.memmap(tmp_path / "big", np.float64, "w+", shape=big.shape)
        mapped[:] = big
        big = mapped
    index = rng.permutation(20_000)[:9_000].astype(np.int32)
    index[-5:] = index[:5]  # padded batches repeat rows
    np.testing.assert_array_equal(stream._Source("x", big).gather(index), np.asarray(big)[index])


def test_the_stream_none_rule():
    small = (X, Y)
    assert not stream.chooses_stream(None, None, small, None)  # small host arrays go to the device
    assert stream.chooses_stream(None, 0, small, None)  # ...unless over the threshold
    assert not stream.chooses_stream(None, X.nbytes + Y.nbytes, small, None)
    assert stream.chooses_stream(None, X.nbytes + Y.nbytes - 1, small, None)
    assert stream.chooses_stream(None, None, (Rows(X), Y), None)  # not an in-memory array: streamed
    assert not stream.chooses_stream(None, 0, (jnp.asarray(X), jnp.asarray(Y)), None)  # device data never
    assert not stream.chooses_stream(False, 0, small, None)
    assert stream.chooses_stream(True, None, small, None)
    assert 0 < stream.default_threshold()


def test_progress_shows_rows_per_second_and_a_stall(capsys, monkeypatch, small_segments):
    monkeypatch.setattr(stream, "STALL_SECONDS", 0.05)
    slow = Rows(X[:70], delay=0.2)
    _fit(train=(slow, Y[:70]), eval_data=None, epochs=2, progress=True)
    out = "".join(capsys.readouterr())
    assert "stalled" in out
    assert "rows/s" in out


def test_bad_streamed_input_is_clear(tmp_path):
    with pytest.raises(ValueError, match="train_data x has 70 rows but y has 69"):
        _fit(train=(Rows(X[:70]), Y[:69]))
    with pytest.raises(TypeError, match="cannot be indexed by an array of row indices"):
        _fit(train=(NotRows(X[:70]), Y[:70]))
    with pytest.raises(TypeError, match="must be an array, or an object with shape, dtype"):
        _fit(train=(X[:70].tolist(), Y[:70]), stream=True)
    with pytest.raises(TypeError, match=r"jax\.Array already on a device; pass stream=False"):
        _fit(train=(jnp.asarray(X[:70]), Y[:70]), stream=True)
    with pytest.raises(TypeError, match="stream must be None, True or False"):
        _fit(stream="yes")
    with pytest.raises(ValueError, match="stream_threshold must be None or a number of bytes"):
        _fit(stream_threshold=-1)
    bad = X[70:].copy()
    bad[17, 2] = np.nan
    with pytest.raises(ValueError, match=r"eval_data x must be finite, got NaN or Inf values \(first at row 17\)"):
        _fit(eval_data=(Rows(bad), Y[70:]))


class NotRows:
    """Has a shape and dtype but takes one row at a time."""

    def __init__(self, array):
        self.array, self.shape, self.dtype = array, array.shape, array.dtype

    def __getitem__(self, i):
        return self.array[int(i)]


class Growing(Rows):
    """Labels whose every read after the 5th appends a row's bytes to another array's memmap file."""

    def __init__(self, array, path):
        super().__init__(array)
        self.path = path

    def __getitem__(self, index):
        if self.reads >= 5:
            with open(self.path, "ab") as file:
                file.write(b"\0" * 40)
        return super().__getitem__(index)


def test_a_memmap_that_changes_size_while_fitting_is_an_error(tmp_path, small_segments):
    path = tmp_path / "x.f64"
    np.asarray(X[:70]).tofile(path)
    x = np.memmap(path, np.float64, "r", shape=(70, 5))
    with pytest.raises(ValueError, match=r"np\.memmap of .* whose file changed size while fitting"):
        _fit(train=(x, Growing(Y[:70], path)), stream=True, checkpoint_dir=tmp_path / "run", checkpoint_every=1)
    # the checkpoints written before the change are a consistent prefix: the same data resumes them
    path.write_bytes(path.read_bytes()[: 70 * 5 * 8])
    x = np.memmap(path, np.float64, "r", shape=(70, 5))
    assert len(list((tmp_path / "run").glob("checkpoint-*"))) > 0
    resumed = _fit(train=(x, Y[:70]), stream=True, checkpoint_dir=tmp_path / "run", checkpoint_every=1)
    _equal_resumed(resumed, _fit(stream=False))


MEMORY_CASE = """
import os, threading, time, sys
import numpy as np, jax
import funcnet as fn
from funcnet.train import stream

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

rows, features, path, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
stream.SEGMENT_BYTES = int(sys.argv[5])
x = np.memmap(path, np.float32, "r", shape=(rows, features))
y = (np.arange(rows) % 10).astype(np.int32)
net = fn.serial(fn.Dense(10, fn.linear))
params = jax.tree_util.tree_map(lambda a: a.astype(np.float32), net.init(jax.random.PRNGKey(0), (-1, features))[1])
run = lambda: fn.fit(net, fn.softmax_cross_entropy, fn.sgd(0.01), params, (x, y), epochs=1, batch_size=256,
                     key=jax.random.PRNGKey(1), stream=mode == "stream")
if mode == "stream":
    jax.block_until_ready(run())  # compile first: what is measured is the data's memory
base, peak, done = anon(), [0], threading.Event()
def watch():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)
watcher = threading.Thread(target=watch)
watcher.start()
jax.block_until_ready(run())
done.set()
watcher.join()
print(base, max(peak[0], anon()))
"""


def test_one_streamed_epoch_of_a_memmap_keeps_anonymous_memory_bounded(tmp_path):
    """The issue's bound, scaled: a 3 GiB memmap may raise RssAnon by at most 1 GiB, i.e. a third
    of the file; here a 96 MiB file (with segments scaled from 16 MiB to 1 MiB) may raise it by
    32 MiB."""
    _memory_bound(tmp_path, ("stream",))


@pytest.mark.slow
def test_the_memory_bound_fails_a_device_resident_fit(tmp_path):
    """The same check fails the device-resident fit of the same file: it can fail."""
    _memory_bound(tmp_path, ("stream", "device"))


def _memory_bound(tmp_path, modes):
    rows, features = 24_576, 1_024
    path = tmp_path / "big.f32"
    with open(path, "wb") as file:
        for _ in range(0, rows, 4096):
            rng.standard_normal((4096, features), dtype=np.float32).tofile(file)
    bound = path.stat().st_size // 3
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    measured = {}
    for mode in modes:
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                textwrap.dedent(MEMORY_CASE),
                str(rows),
                str(features),
                str(path),
                mode,
                str(1 << 20),
            ],
            cwd=HERE.parent,
            env={**env, "PYTHONPATH": str(HERE.parent)},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        base, peak = map(int, done.stdout.split()[-2:])
        measured[mode] = peak - base
    assert measured["stream"] < bound, measured
    if "device" in measured:
        assert measured["device"] > bound, measured


def _carried(args):
    """Abstract values of a ``_steps_jit`` call's arguments (its donated inputs are gone after it)."""
    abstract = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding) if isinstance(a, jax.Array) else a
    return jax.tree_util.tree_map(abstract, args)


def test_the_streamed_steps_donate_the_state_they_carry_and_leave_the_callers_params(monkeypatch, small_segments):
    """A streamed fit's peak holds the training state about twice, as the device fit's does, not
    three times: the segment program writes the carried params and optimizer state into the
    buffers of the ones it replaces (``benchmarks/bench_stream.py`` measures it). The caller's
    params are never among them."""
    original, calls = stream._steps_jit, []

    def capture(*args, **kw):
        calls.append((_carried(args), kw))
        return original(*args, **kw)

    monkeypatch.setattr(stream, "_steps_jit", capture)
    params = jax.tree_util.tree_map(jnp.asarray, PARAMS)
    before = jax.tree_util.tree_map(np.array, params)
    result = fn.fit(NET, fn.softmax_cross_entropy, fn.adam(0.01), params, (X[:70], Y[:70]), epochs=2,
                    batch_size=16, key=KEY, stream=True)  # fmt: skip
    assert len(calls) == 6  # 3 segments an epoch: the first and later ones
    assert not any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(params))
    _equal(params, before)  # the caller's params: usable and unchanged
    args, kw = calls[1]
    carry = args[0]
    carried = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(carry))
    memory = original.lower(*args, **kw).compile().memory_analysis()
    assert memory.alias_size_in_bytes >= carried, (memory.alias_size_in_bytes, carried)
    again = fn.fit(NET, fn.softmax_cross_entropy, fn.adam(0.01), params, (X[:70], Y[:70]), epochs=2,
                   batch_size=16, key=KEY, stream=False)  # fmt: skip
    _equal(result.params, again.params)


def test_at_most_three_segments_are_held_ahead_of_the_device(monkeypatch):
    """The stream's back-pressure: with a device slower than the reads, the host waits for
    segment i - 1 before it reads i + 2, so at most three segments are held (read and not yet
    used up by the device). Counted at every read: segments read minus segments whose steps have
    finished (``jax.Array.is_ready``). Without the wait the host reads a whole epoch ahead."""
    monkeypatch.setattr(stream, "SEGMENT_BYTES", 400)  # one batch of 8 rows (8 x 44 bytes) per segment
    steps, dispatched = stream._steps, []

    def slow(carry, hyper, xs, ys, first, dropout_key, *, static, config):  # a slow device: ~10^9 flops
        after, sums = steps(carry, hyper, xs, ys, first, dropout_key, static=static, config=config)
        work = jnp.full((256, 256), 1e-3, jnp.float32) + sums[0].astype(jnp.float32)
        work = jax.lax.fori_loop(0, 40, lambda i, a: jnp.tanh(a @ a), work)
        return after, sums + jnp.isnan(work[0, 0]).astype(sums.dtype)

    slow_jit = jax.jit(slow, static_argnames=("static", "config"))

    def run_steps(*args, **kw):
        after, sums = slow_jit(*args, **kw)
        dispatched.append(sums)
        return after, sums

    train, reads, held = stream._Plan._train, [0], []

    def read(plan, *args):
        job = train(plan, *args)
        reads[0] += 1
        held.append(reads[0] - sum(sums.is_ready() for sums in list(dispatched)))
        return job

    monkeypatch.setattr(stream, "_steps_jit", run_steps)
    monkeypatch.setattr(stream._Plan, "_train", read)
    _fit(eval_data=None, epochs=2, batch_size=8, stream=True)
    assert len(held) == 18  # 9 segments an epoch
    assert max(held) <= 3, held
