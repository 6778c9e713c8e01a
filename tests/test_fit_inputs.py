"""fit and train_step with inputs beyond x (funcnet/train): ``(x, y, inputs)`` data whose inputs
travel with x's rows (shuffled, batched, padded, sharded, streamed, checkpointed) and reach the
network as keywords, in training and in evaluation."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcnet as fn

HERE = Path(__file__).resolve().parent
KEY = jax.random.PRNGKey(1)
T, F, ROWS = 6, 3, 22  # 22 rows in batches of 8: the last batch is padded and masked


def pool_init(key, input_shape):
    return (input_shape[0], 4), (0.5 * jax.random.normal(key, (input_shape[-1], 4), jnp.float32),)


def pool_apply(params, x, *, key=None, kv_lengths=None):
    """A mean over the first ``kv_lengths`` time steps of ``tanh(x @ W)`` (over all without)."""
    h = jnp.tanh(x @ params[0])
    if kv_lengths is None:
        return jnp.mean(h, axis=1)
    valid = jnp.arange(x.shape[1], dtype=kv_lengths.dtype)[None, :] < kv_lengths[:, None]
    return jnp.sum(jnp.where(valid[..., None], h, 0), axis=1) / kv_lengths[:, None].astype(h.dtype)


NET = fn.serial(fn.Layer(pool_init, pool_apply), fn.Dense(1, fn.linear))


def _data(seed=0, rows=ROWS, dtype=np.float32, pad_value=0.0):
    """Sequences padded after their length with ``pad_value``, their lengths, and targets."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T + 1, rows).astype(np.int32)
    x = rng.standard_normal((rows, T, F)).astype(dtype)
    x[np.arange(T)[None, :] >= lengths[:, None]] = pad_value
    y = rng.standard_normal((rows, 1)).astype(dtype)
    return x, y, lengths


def _params(dtype=np.float32):
    return jax.tree_util.tree_map(lambda a: a.astype(dtype), NET.init(jax.random.PRNGKey(0), (-1, T, F))[1])


def _fit(train, eval_data=None, params=None, optimizer=None, **kw):
    args = dict(epochs=4, batch_size=8, key=KEY, run_name="pool")
    if eval_data is not None:
        args["eval_every"] = 2
    args.update(kw)
    params = _params() if params is None else params
    optimizer = fn.sgd(0.1) if optimizer is None else optimizer
    return fn.fit(NET, fn.mean_squared_error, optimizer, params, train, eval_data, **args)


def _close(a, b, tol=1e-6):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(u, v, rtol=tol, atol=tol), a, b)


def _equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_fit_equals_a_loop_of_train_step_given_the_inputs():
    x, y, lengths = _data(rows=24, dtype=np.float64)
    params = _params(np.float64)
    result = _fit((x, y, {"kv_lengths": lengths}), params=params, epochs=3, shuffle=False)
    optimizer = fn.sgd(0.1)
    step = jax.jit(fn.train_step(NET, fn.mean_squared_error, optimizer))
    opt_state = optimizer.init(params)
    for epoch in range(3):
        losses = []
        for b in range(3):
            rows = slice(8 * b, 8 * b + 8)
            params, opt_state, loss = step(params, opt_state, x[rows], y[rows], None, kv_lengths=lengths[rows])
            losses.append(loss)
        np.testing.assert_allclose(result.history.train_loss[epoch], np.mean(losses), rtol=1e-12)
    _close(result.params, params, tol=1e-12)
    # the inputs made a difference: without them the same fit trains otherwise
    blind = _fit((x, y), params=_params(np.float64), epochs=3, shuffle=False)
    assert not np.allclose(blind.params[1].W, params[1].W, rtol=1e-3)


def test_the_result_does_not_depend_on_the_padding_but_would_without_the_inputs():
    x, y, lengths = _data()
    other = np.where(np.arange(T)[None, :, None] >= lengths[:, None, None], np.float32(7.5), x)
    assert not np.array_equal(other, x)
    runs = [_fit((a, y, {"kv_lengths": lengths}), (a[:10], y[:10], {"kv_lengths": lengths[:10]})) for a in (x, other)]
    _close(runs[0].params, runs[1].params)
    _close(runs[0].history, runs[1].history)
    assert np.isfinite(runs[0].history.eval_loss).all()
    # without the lengths the padding is data: the same two fits differ
    blind = [_fit((a, y), (a[:10], y[:10])) for a in (x, other)]
    assert not np.allclose(blind[0].history.train_loss, blind[1].history.train_loss, rtol=1e-3)
    assert not np.allclose(blind[0].params[1].W, blind[1].params[1].W, rtol=1e-3)


def test_eval_inputs_reach_the_network_in_evaluation():
    x, y, lengths = _data()
    shorter = np.maximum(lengths - 2, 1).astype(np.int32)
    train = (x, y, {"kv_lengths": lengths})
    a = _fit(train, (x, y, {"kv_lengths": lengths}), patience=None, eval_batch_size=8)
    b = _fit(train, (x, y, {"kv_lengths": shorter}), patience=None, eval_batch_size=8)
    _equal(a.history.train_loss, b.history.train_loss)  # training is the same...
    assert not np.allclose(a.history.eval_loss, b.history.eval_loss)  # ...its evaluation is not
    # the eval loss is the network's loss on the eval data with its inputs
    prediction = NET.apply(a.params, x, kv_lengths=lengths)
    np.testing.assert_allclose(a.best_eval["loss"], fn.mean_squared_error(prediction, y), rtol=1e-5)


def test_a_resumed_fit_with_inputs_equals_an_uninterrupted_one_bit_for_bit(tmp_path):
    x, y, lengths = _data()
    train, evaluation = (x, y, {"kv_lengths": lengths}), (x[:10], y[:10], {"kv_lengths": lengths[:10]})
    whole = _fit(train, evaluation, patience=None, checkpoint_dir=tmp_path / "whole")
    part = _fit(train, evaluation, patience=None, epochs=2, checkpoint_dir=tmp_path / "parts")
    assert int(part.stopped_epoch) == 2
    resumed = _fit(train, evaluation, patience=None, checkpoint_dir=tmp_path / "parts")
    assert int(resumed.resumed_epoch) == 2
    _equal(resumed._replace(resumed_epoch=whole.resumed_epoch), whole)
    # other inputs are another run: its checkpoint is refused
    changed = (x, y, {"kv_lengths": np.maximum(lengths - 1, 1).astype(np.int32)})
    with pytest.raises(ValueError, match="train data"):
        _fit(changed, evaluation, patience=None, checkpoint_dir=tmp_path / "parts")


def test_a_streamed_fit_with_inputs_equals_the_device_fit(tmp_path, monkeypatch):
    from funcnet.train import stream

    monkeypatch.setattr(stream, "SEGMENT_BYTES", 2 * 8 * (T * F * 8 + 8 + 4))  # two batches a segment
    x, y, lengths = _data(dtype=np.float64)
    params = _params(np.float64)
    on_disk = np.lib.format.open_memmap(tmp_path / "lengths.npy", "w+", np.int32, lengths.shape)
    on_disk[:] = lengths
    on_disk.flush()
    kw = dict(params=params, patience=None, eval_batch_size=4)
    resident = _fit((x, y, {"kv_lengths": lengths}), (x[:10], y[:10], {"kv_lengths": lengths[:10]}), **kw)
    streamed = _fit(
        (x, y, {"kv_lengths": np.load(tmp_path / "lengths.npy", mmap_mode="r")}),
        (x[:10], y[:10], {"kv_lengths": lengths[:10]}),
        stream=True,
        **kw,
    )
    _equal(streamed, resident)


def test_vmap_over_keys_trains_each_member_with_its_inputs():
    x, y, lengths = _data()
    keys = jax.random.split(KEY, 3)
    train = (x, y, {"kv_lengths": lengths})
    ensemble = jax.vmap(lambda k: _fit(train, key=k, run_name=None).params)(keys)
    for i in (0, 2):
        alone = _fit(train, key=keys[i], run_name=None).params
        _close(jax.tree_util.tree_map(lambda a, i=i: a[i], ensemble), alone, tol=1e-5)


def test_a_sweep_over_learning_rates_and_inputs_compiles_once():
    from funcnet.train import program

    x, y, lengths = _data()
    first = _fit((x, y, {"kv_lengths": lengths}), optimizer=fn.sgd(0.1))
    size = program.segment._cache_size()
    shorter = np.maximum(lengths - 1, 1).astype(np.int32)
    second = _fit((x, y, {"kv_lengths": shorter}), optimizer=fn.sgd(0.05))
    assert program.segment._cache_size() == size  # other numbers, other inputs: the same program
    assert not np.allclose(first.params[1].W, second.params[1].W)


def test_shards_split_the_inputs_with_the_rows():
    """``shards=2`` on one device: each shard's rows carry their own lengths (the padding stays out)."""
    x, y, lengths = _data()
    other = np.where(np.arange(T)[None, :, None] >= lengths[:, None, None], np.float32(-3.0), x)
    runs = [_fit((a, y, {"kv_lengths": lengths}), shards=2) for a in (x, other)]
    _close(runs[0], runs[1])


MESH_SCRIPT = """
import sys, jax, numpy as np
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
sys.path.insert(0, {tests!r})
import test_fit_inputs as t
from jax.sharding import Mesh
assert len(jax.devices()) == 2
x, y, lengths = t._data()
train, evaluation = (x, y, {{"kv_lengths": lengths}}), (x[:10], y[:10], {{"kv_lengths": lengths[:10]}})
mesh = Mesh(np.array(jax.devices()), ("data",))
kw = dict(patience=None, eval_batch_size=4)
one = t._fit(train, evaluation, shards=2, **kw)
t._close(t._fit(train, evaluation, mesh=mesh, **kw), one, tol=1e-5)
t._close(t._fit(train, evaluation, mesh=mesh, stream=True, **kw), one, tol=1e-5)
print("ok")
"""


def test_a_mesh_of_two_devices_equals_two_shards_on_one():
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    script = textwrap.dedent(MESH_SCRIPT).format(tests=str(HERE))
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]


X, Y, LENGTHS = _data()
BAD = [
    ((X, Y, [LENGTHS]), TypeError, r"train_data's third element must be a dict \{name: array\}.*got list"),
    ((X, Y, {"kv_lengths": LENGTHS}, {}), TypeError, r"train_data must be a pair \(x, y\).*triple.*got a tuple of 4"),
    ((X, Y, {"kv_lengths": LENGTHS[:5]}), ValueError, r"train_data inputs\['kv_lengths'\] has 5 rows but x has 22"),
    ((X, Y, {"kv_lengths": np.int32(3)}), ValueError, r"inputs\['kv_lengths'\] must have the rows first, like x"),
    ((X, Y, {"kv_lengths": LENGTHS.tolist()}), TypeError, r"train_data inputs\['kv_lengths'\] must be an array"),
    (
        (X, Y, {"kv_length": LENGTHS}),
        TypeError,
        r"fit: train_data inputs: no layer inside takes kv_length=.*kv_lengths",
    ),
    ((X, Y, {"key": LENGTHS}), ValueError, r"train_data inputs may not be named 'key'"),
    ((X, Y, {3: LENGTHS}), TypeError, r"train_data inputs' names must be keywords"),
    ((X, Y, {"kv_lengths": LENGTHS.astype(np.str_)}), TypeError, r"must be an array|numeric or bool dtype"),
    ((X, Y, {"kv_lengths": np.full(ROWS, np.nan)}), ValueError, r"inputs\['kv_lengths'\] must be finite"),
]


@pytest.mark.parametrize(("train", "error", "message"), BAD)
@pytest.mark.parametrize("stream", [False, True])
def test_bad_inputs_are_named_before_anything_compiles(train, error, message, stream):
    if stream and "finite" in message:
        pytest.skip("a streamed fit checks finite values as it reads them")
    with pytest.raises(error, match=message):
        _fit(train, epochs=1, stream=stream)


def test_bad_eval_inputs_and_bad_train_step_inputs_are_named():
    with pytest.raises(ValueError, match=r"eval_data inputs\['kv_lengths'\] has 3 rows but x has 10"):
        _fit((X, Y, {"kv_lengths": LENGTHS}), (X[:10], Y[:10], {"kv_lengths": LENGTHS[:3]}), epochs=2)
    with pytest.raises(TypeError, match="fit: eval_data inputs: no layer inside takes mask="):
        _fit((X, Y, {"kv_lengths": LENGTHS}), (X[:10], Y[:10], {"mask": LENGTHS[:10]}), epochs=2)
    plain = fn.serial(fn.Dense(2, fn.tanh), fn.Dense(1, fn.linear))
    params = plain.init(KEY, (-1, 3))[1]
    with pytest.raises(TypeError, match=r"fit: train_data inputs: no layer inside takes kv_lengths=; .* none"):
        fn.fit(
            plain,
            fn.mean_squared_error,
            fn.sgd(0.1),
            params,
            (X[:, 0], Y, {"kv_lengths": LENGTHS}),
            epochs=1,
            batch_size=8,
            key=KEY,
        )
    step = fn.train_step(NET, fn.mean_squared_error, fn.sgd(0.1))
    with pytest.raises(TypeError, match="train_step: inputs: no layer inside takes lengths="):
        step(_params(), fn.sgd(0.1).init(_params()), X, Y, None, lengths=LENGTHS)
    with pytest.raises(ValueError, match=r"train_step: inputs\['kv_lengths'\] has 4 rows but x has 22"):
        step(_params(), fn.sgd(0.1).init(_params()), X, Y, None, kv_lengths=LENGTHS[:4])


def test_padded_targets_marked_by_the_losss_ignore_index_pass_the_label_check():
    """Integer labels are checked against the classes before anything compiles; a loss that leaves
    ``ignore_index`` out lets that label through (and only that one)."""
    import functools

    net = fn.serial(fn.Dense(3, fn.linear))
    _, params = net.init(jax.random.PRNGKey(0), (-1, 2))
    x = np.ones((6, 2))
    y = np.array([0, 1, 2, -1, -1, 1], np.int32)
    loss = functools.partial(fn.softmax_cross_entropy, ignore_index=-1)
    fn.fit(net, loss, fn.sgd(0.1), params, (x, y), epochs=1, batch_size=3, key=jax.random.PRNGKey(1))
    with pytest.raises(ValueError, match="ignore_index"):
        fn.fit(
            net,
            fn.softmax_cross_entropy,
            fn.sgd(0.1),
            params,
            (x, y),
            epochs=1,
            batch_size=3,
            key=jax.random.PRNGKey(1),
        )
    with pytest.raises(ValueError, match="from -1 to 2"):
        fn.fit(
            net,
            functools.partial(fn.softmax_cross_entropy, ignore_index=-100),
            fn.sgd(0.1),
            params,
            (x, y),
            epochs=1,
            batch_size=3,
            key=jax.random.PRNGKey(1),
        )
