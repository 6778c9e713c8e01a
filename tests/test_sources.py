"""Batches made inside fit's program: a sampler ``(key, step) -> batch`` as ``train_data`` and a
per-batch ``transform(key, batch) -> batch`` (``funcnet/train/sources.py``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_steps import _mlp, _same
from test_sweep import compilations

import funcnet as fn
from funcnet.train.sources import sampler_key, transform_key

KEY = jax.random.PRNGKey(0)
W = np.array([[1.0], [-2.0], [0.5], [0.0]])


def regression_sampler(key, step, scale=1.0):
    """8 fresh rows of a linear target, every step: a module-level function, so checkpoints can
    name it."""
    x = jax.random.normal(key, (8, 4)) * scale
    return x, x @ jnp.asarray(W, x.dtype)


def _fit(data=regression_sampler, **kwargs):
    net, params = _mlp()
    return fn.fit(net, fn.mean_squared_error, fn.adam(0.01), params, data, key=KEY, **kwargs)


# --- a sampler as train_data -----------------------------------------------------------------------


def test_a_sampler_trains_on_what_it_draws_for_each_key_and_step():
    result = _fit(steps=5)
    net, params = _mlp()
    step = jax.jit(fn.train_step(net, fn.mean_squared_error, fn.adam(0.01)))
    opt_state = fn.adam(0.01).init(params)
    for t in range(5):  # the batches the contract names: sampler(sampler_key(key, t), t)
        x, y = regression_sampler(sampler_key(KEY, t), t)
        params, opt_state, _ = step(params, opt_state, x, y, None)
    _same(result.params, params)
    keys = {str(jax.random.key_data(sampler_key(KEY, t))) for t in range(5)}
    assert len(keys) == 5  # a key of its own per step


def test_a_sampler_gets_the_step_counted_from_the_runs_start_under_accumulate():
    def ramp(key, step):  # the step alone decides the batch
        x = jnp.ones((8, 4)) * (step.astype(jnp.float64) / 10.0)
        return x, x[:, :1] * 2.0

    net, params = _mlp()
    optimizer = fn.accumulate(fn.sgd(0.1), 2)
    result = fn.fit(net, fn.mean_squared_error, optimizer, params, ramp, steps=3, key=KEY)
    step = jax.jit(fn.train_step(net, fn.mean_squared_error, optimizer))
    opt_state = optimizer.init(params)
    for t in range(6):  # 3 updates of 2 micro-batches each: steps 0..5
        params, opt_state, _ = step(params, opt_state, *ramp(None, jnp.asarray(t)), None)
    for p, q in zip(jax.tree_util.tree_leaves(result.params), jax.tree_util.tree_leaves(params), strict=True):
        np.testing.assert_allclose(p, q, rtol=1e-12)  # a wrong step moves them by 1e-2


def test_a_sampler_learns_and_its_resumed_run_equals_an_uninterrupted_one(tmp_path):
    whole = _fit(steps=120)
    assert float(whole.history.train_loss[-1]) < 0.3 * float(whole.history.train_loss[0])
    first = _fit(steps=50, checkpoint_dir=tmp_path, checkpoint_every=20)
    assert int(first.stopped_epoch) == 50
    resumed = _fit(steps=120, checkpoint_dir=tmp_path, checkpoint_every=20)
    assert int(resumed.resumed_epoch) == 50
    _same(whole.params, resumed.params)


def test_a_sampler_with_inputs_and_accumulate():
    net = fn.serial(fn.Embedding(7, 8), fn.MultiHeadAttention(2, 4, is_causal=True), fn.Dense(7))
    _, params = net.init(KEY, (-1, 5))

    def padded(key, step):
        x = jax.random.randint(key, (4, 5), 0, 7)
        return x, jnp.roll(x, -1, axis=1), {"kv_lengths": jnp.array([5, 3, 4, 2])}

    result = fn.fit(net, fn.softmax_cross_entropy, fn.accumulate(fn.adam(0.01), 2), params, padded, steps=3, key=KEY)
    assert result.history.train_loss.shape == (3,) and np.all(np.isfinite(result.history.train_loss))


def test_a_sweep_over_a_samplers_numbers_compiles_once():
    _fit(data=jax.tree_util.Partial(regression_sampler, scale=jnp.asarray(1.0)), steps=3)
    with compilations() as compiled:
        results = [
            _fit(data=jax.tree_util.Partial(regression_sampler, scale=jnp.asarray(s)), steps=3) for s in (0.5, 2.0)
        ]
    assert compiled == []
    assert float(results[0].history.train_loss[0]) < float(results[1].history.train_loss[0])


def test_bad_samplers_are_refused_before_anything_compiles():
    with pytest.raises(ValueError, match="steps=N"):
        _fit(epochs=2)
    with pytest.raises(ValueError, match="leave batch_size out"):
        _fit(steps=2, batch_size=4)
    with pytest.raises(ValueError, match="mesh and shards"):
        _fit(steps=2, shards=2)

    def by_step(key, step):  # a batch whose size follows the step: not one compiled program
        x = jnp.ones((int(step) + 1, 4))
        return x, x[:, :1]

    with pytest.raises(ValueError, match="cannot depend on step's value"):
        _fit(by_step, steps=2)
    with pytest.raises(TypeError, match="pair"):
        _fit(lambda key, step: jnp.ones((3, 4)), steps=2)


# --- a transform of every training batch -----------------------------------------------------------


def _data(rows=40):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, 4))
    return x, x @ W


def shift(key, batch, by=1.0):
    x, y = batch
    return x + by, y


def test_a_transform_reaches_every_training_batch_and_no_eval_batch():
    x, y = _data()
    moved = _fit((x, y), epochs=3, batch_size=8, transform=shift, eval_data=(x, y), eval_every=1, patience=None)
    direct = _fit((x + 1.0, y), epochs=3, batch_size=8, eval_data=(x, y), eval_every=1, patience=None)
    _same(moved.history.train_loss, direct.history.train_loss)
    _same(moved.history.eval_loss, direct.history.eval_loss)  # the eval data were not shifted


def test_a_random_transform_gets_a_key_per_batch_and_resumes_exactly(tmp_path):
    def noise(key, batch):
        x, y = batch
        return x + 0.1 * jax.random.normal(key, x.shape), y

    x, y = _data()
    whole = _fit((x, y), steps=12, batch_size=8, transform=noise, run_name="noise")
    first = _fit((x, y), steps=5, batch_size=8, transform=noise, run_name="noise", checkpoint_dir=tmp_path)
    resumed = _fit((x, y), steps=12, batch_size=8, transform=noise, run_name="noise", checkpoint_dir=tmp_path)
    assert int(first.stopped_epoch) == 5 and int(resumed.resumed_epoch) == 5
    _same(whole.params, resumed.params)
    # Each batch's key is its own: two batches of one epoch see different noise.
    keys = [transform_key(jax.random.key(0), b) for b in (0, 1)]
    seen = [np.asarray(noise(k, (np.zeros((2, 4)), None))[0]) for k in keys]
    assert not np.array_equal(*seen)


def test_a_transform_with_windows_and_epochs_sweeps_compile_once():
    x, y = _data()
    _fit((x, y), epochs=2, batch_size=8, transform=jax.tree_util.Partial(shift, by=jnp.asarray(1.0)))
    with compilations() as compiled:
        _fit((x, y), epochs=2, batch_size=8, transform=jax.tree_util.Partial(shift, by=jnp.asarray(3.0)))
    assert compiled == []
    net = fn.serial(fn.Embedding(5, 4), fn.Dense(5))
    _, params = net.init(KEY, (-1, 6))
    flip = lambda key, b: (jnp.where(jax.random.bernoulli(key), 4 - b[0], b[0]), jnp.where(True, 4 - b[1], b[1]))
    tokens = np.arange(200) % 5
    windows = fn.fit(
        net, fn.softmax_cross_entropy, fn.adam(0.05), params, fn.random_windows(tokens, 6), steps=4, key=KEY
    )
    flipped = fn.fit(
        net,
        fn.softmax_cross_entropy,
        fn.adam(0.05),
        params,
        fn.random_windows(tokens, 6),
        steps=4,
        key=KEY,
        transform=flip,
    )
    assert not np.array_equal(windows.params[0].W, flipped.params[0].W)


def test_bad_transforms_are_refused_before_anything_compiles():
    x, y = _data()
    with pytest.raises(TypeError, match="transform must be a callable"):
        _fit((x, y), epochs=1, transform=3)
    with pytest.raises(ValueError, match="structure, shapes and dtypes"):
        _fit((x, y), epochs=1, transform=lambda key, b: (b[0][:, :2], b[1]))
    with pytest.raises(ValueError, match="structure, shapes and dtypes"):
        _fit((x, y), epochs=1, transform=lambda key, b: (b[0].astype(jnp.float16), b[1]))
    with pytest.raises(TypeError, match="pair"):
        _fit((x, y), epochs=1, transform=lambda key, b: b[0])


# --- random windows of host tokens (np.memmap) -------------------------------------------------------


def _lm_windows(tokens, **kwargs):
    net = fn.serial(fn.Embedding(7, 8), fn.Dense(7))
    _, params = net.init(KEY, (-1, 6))
    return fn.fit(
        net,
        fn.softmax_cross_entropy,
        fn.adam(0.05),
        params,
        fn.random_windows(tokens, 6),
        steps=kwargs.pop("steps", 8),
        batch_size=4,
        key=KEY,
        **kwargs,
    )


def test_windows_of_a_memmap_are_read_on_the_host_and_equal_device_windows(tmp_path):
    tokens = (np.arange(300) % 7).astype(np.uint16)  # nanoGPT's train.bin dtype
    tokens.tofile(tmp_path / "train.bin")
    memmap = np.memmap(tmp_path / "train.bin", dtype=np.uint16, mode="r")
    on_device = _lm_windows(tokens.astype(np.int32), stream=False)
    from_disk = _lm_windows(memmap)  # a memmap streams by default: it never reaches the device
    _same(on_device.params, from_disk.params)
    _same(on_device.history.train_loss, _lm_windows(tokens, stream=True).history.train_loss)
    with compilations() as compiled:  # the same tokens object: the same program
        _lm_windows(memmap)
    assert compiled == []


def test_windows_of_a_memmap_resume_exactly(tmp_path):
    (np.arange(300) % 7).astype(np.int32).tofile(tmp_path / "train.bin")
    memmap = np.memmap(tmp_path / "train.bin", dtype=np.int32, mode="r")
    whole = _lm_windows(memmap, steps=10)
    first = _lm_windows(memmap, steps=4, checkpoint_dir=tmp_path / "run")
    resumed = _lm_windows(memmap, steps=10, checkpoint_dir=tmp_path / "run")
    assert int(first.stopped_epoch) == 4 and int(resumed.resumed_epoch) == 4
    _same(whole.params, resumed.params)
