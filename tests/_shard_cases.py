"""Multi-device cases, run by tests/test_shard.py in a subprocess with 4 forced CPU devices
(XLA_FLAGS must be set before JAX starts, so they cannot run in the main test process)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import funcnet as fn

KEY = jax.random.PRNGKey(0)
rng = np.random.default_rng(0)
X, Y = rng.standard_normal((60, 5)), rng.standard_normal((60, 2))
NET = fn.serial(fn.Dense(8, fn.tanh), fn.Dropout(0.1), fn.Dense(2, fn.linear))
PARAMS = NET.init(KEY, (-1, 5))[1]


def mesh(devices, axis="data"):
    return Mesh(np.array(jax.devices()[:devices]), (axis,))


def close(a, b):
    jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-9, atol=1e-12), a, b)


def run(**kw):
    return fn.fit(
        NET,
        fn.mean_squared_error,
        fn.momentum(0.05),
        PARAMS,
        (X, Y),
        (X[:20], Y[:20]),
        epochs=12,
        batch_size=8,
        eval_every=2,
        patience=1,
        key=KEY,
        **kw,
    )


def test_four_devices_are_there():
    assert len(jax.devices()) == 4


def test_one_two_and_four_devices_give_the_same_fit():
    single = run()
    for devices in (1, 2, 4):
        sharded = run(mesh=mesh(devices))
        close(sharded, single)
        assert int(sharded.stopped_epoch) == int(single.stopped_epoch)
        assert int(sharded.best_epoch) == int(single.best_epoch)


def test_data_already_sharded_across_devices():
    m = mesh(4)
    rows = NamedSharding(m, PartitionSpec("data"))
    x, y = jax.device_put(X, rows), jax.device_put(Y, rows)
    sharded = fn.fit(NET, fn.mean_squared_error, fn.sgd(0.05), PARAMS, (x, y), epochs=3, batch_size=8, key=KEY, mesh=m)
    close(sharded, fn.fit(NET, fn.mean_squared_error, fn.sgd(0.05), PARAMS, (X, Y), epochs=3, batch_size=8, key=KEY))


def test_train_step_with_a_mesh():
    optimizer = fn.adam(0.01)
    state = optimizer.init(PARAMS)
    plain = jax.jit(fn.train_step(NET, fn.mean_squared_error, optimizer))
    sharded = jax.jit(fn.train_step(NET, fn.mean_squared_error, optimizer, mesh=mesh(4)))
    close(sharded(PARAMS, state, X[:8], Y[:8], KEY), plain(PARAMS, state, X[:8], Y[:8], KEY))
    with pytest.raises(ValueError, match="x rows \\(6\\) must divide by the 4 devices"):
        sharded(PARAMS, state, X[:6], Y[:6], KEY)


def test_ensemble_with_models_along_the_mesh():
    m = mesh(4, "models")
    keys, rates = jax.random.split(KEY, 4), jnp.array([0.01, 0.02, 0.05, 0.1])

    def one(key, lr):
        return fn.fit(NET, fn.mean_squared_error, fn.sgd(lr), PARAMS, (X, Y), epochs=3, batch_size=8, key=key)

    spread = NamedSharding(m, PartitionSpec("models"))
    sharded = jax.jit(jax.vmap(one), in_shardings=(spread, spread))(keys, rates)
    assert len(sharded.params[0].W.sharding.device_set) == 4
    close(sharded, jax.vmap(one)(keys, rates))


def test_clear_errors():
    with pytest.raises(ValueError, match=r"batch_size \(6\) must divide by the 4 devices of mesh axis 'data'"):
        fn.fit(NET, fn.mean_squared_error, fn.sgd(0.1), PARAMS, (X, Y), epochs=1, batch_size=6, key=KEY, mesh=mesh(4))
    with pytest.raises(ValueError, match="data_axis 'batch' is not an axis of the mesh"):
        fn.fit(
            NET, fn.mean_squared_error, fn.sgd(0.1), PARAMS, (X, Y), epochs=1, key=KEY, mesh=mesh(2), data_axis="batch"
        )
    with pytest.raises(TypeError, match=r"mesh must be a jax\.sharding\.Mesh"):
        fn.fit(NET, fn.mean_squared_error, fn.sgd(0.1), PARAMS, (X, Y), epochs=1, key=KEY, mesh=jax.devices())


def test_batch_norm_statistics_are_global_a_mesh_fit_equals_a_one_device_fit():
    # BatchNorm synchronised across devices: batch statistics are means over the global batch,
    # the masked last batch (60 rows, batches of 8) included.
    net = fn.serial(fn.Dense(8, fn.tanh), fn.BatchNorm(0.8), fn.Dense(2, fn.linear))
    params = net.init(KEY, (-1, 5))[1]

    def bn_run(**kw):
        return fn.fit(net, fn.mean_squared_error, fn.momentum(0.05), params, (X, Y), (X[:20], Y[:20]),
                      epochs=4, batch_size=8, eval_every=2, key=KEY, **kw)  # fmt: skip

    single = bn_run()
    assert not np.allclose(single.params[1].stats.var, 1.0)
    for devices in (2, 4):
        close(bn_run(mesh=mesh(devices)), single)


def test_a_streamed_fit_under_a_mesh_equals_the_device_fit_bit_for_bit(monkeypatch):
    from funcnet.train import stream

    monkeypatch.setattr(stream, "SEGMENT_BYTES", 3 * 8 * (5 + 2) * 8)  # three batches per segment
    for devices in (2, 4):
        resident = run(mesh=mesh(devices))
        streamed = run(mesh=mesh(devices), stream=True)
        jax.tree_util.tree_map(np.testing.assert_array_equal, streamed, resident)
