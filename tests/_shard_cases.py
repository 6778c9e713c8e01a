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


def test_one_two_and_four_devices_give_the_fit_of_as_many_shards_on_one_device():
    for devices in (1, 2, 4):
        single = run(shards=devices)  # one device, the rows in `devices` parts shuffled on their own
        sharded = run(mesh=mesh(devices))
        close(sharded, single)
        assert int(sharded.stopped_epoch) == int(single.stopped_epoch)
        assert int(sharded.best_epoch) == int(single.best_epoch)
    close(run(mesh=mesh(1)), run())


def test_a_data_axis_beside_another_mesh_axis():
    """On a 2 x 2 mesh the rows split over 'data' (2 shards), replicated over 'model'."""
    m = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
    close(run(mesh=m), run(shards=2))


def test_data_already_sharded_across_devices():
    m = mesh(4)
    rows = NamedSharding(m, PartitionSpec("data"))
    x, y = jax.device_put(X, rows), jax.device_put(Y, rows)
    sharded = fn.fit(NET, fn.mean_squared_error, fn.sgd(0.05), PARAMS, (x, y), epochs=3, batch_size=8, key=KEY, mesh=m)
    plain = fn.fit(NET, fn.mean_squared_error, fn.sgd(0.05), PARAMS, (X, Y), epochs=3, batch_size=8, key=KEY, shards=4)
    close(sharded, plain)


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


@pytest.mark.slow  # its own module's test covers one device; CI's budget
def test_batch_norm_statistics_are_global_a_mesh_fit_equals_a_one_device_fit():
    # BatchNorm synchronised across devices: batch statistics are means over the global batch,
    # the masked last batch (60 rows, batches of 8) included.
    net = fn.serial(fn.Dense(8, fn.tanh), fn.BatchNorm(0.8), fn.Dense(2, fn.linear))
    params = net.init(KEY, (-1, 5))[1]

    def bn_run(**kw):
        return fn.fit(net, fn.mean_squared_error, fn.momentum(0.05), params, (X, Y), (X[:20], Y[:20]),
                      epochs=4, batch_size=8, eval_every=2, key=KEY, **kw)  # fmt: skip

    assert not np.allclose(bn_run().params[1].stats.var, 1.0)
    for devices in (2, 4):  # the one-device fit of as many shards: each device shuffles its own rows
        close(bn_run(mesh=mesh(devices)), bn_run(shards=devices))


# What the compiled program does under a mesh: every assertion below fails when the batch is
# not sharded (replicated data, or each step gathering rows across devices).
ROWS, EVAL_ROWS, BATCH, HIDDEN = 264, 52, 44, 7  # per device: 66, 13 and 11 rows; sizes no other shape has
DATA = rng.standard_normal((ROWS, 3)), rng.standard_normal((ROWS, 2))
EVAL = rng.standard_normal((EVAL_ROWS, 3)), rng.standard_normal((EVAL_ROWS, 2))
PROBED = fn.serial(fn.Dense(HIDDEN, fn.tanh), fn.Dense(2, fn.linear))


def compiled_segment(monkeypatch, **kw):
    """The compiled ``segment`` program of a 4-device fit, and the arguments it ran with."""
    from funcnet.train import fitting, program

    calls = []

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return program.segment(*args, **kwargs)

    monkeypatch.setattr(fitting, "segment", recording)
    params = PROBED.init(KEY, (-1, 3))[1]
    fn.fit(
        PROBED,
        fn.mean_squared_error,
        fn.sgd(0.01),
        params,
        DATA,
        EVAL,
        epochs=2,
        batch_size=BATCH,
        eval_every=1,
        eval_batch_size=24,
        key=KEY,
        mesh=mesh(4),
        **kw,
    )
    args, kwargs = calls[0]
    return program.segment.lower(*args, **kwargs).compile(), args


def collectives(hlo):
    """(op, shapes) of every collective in an HLO text."""
    import re

    found = []
    for line in hlo.splitlines():
        m = re.search(r" = (.*?) (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)(-start)?\(", line)
        if m:
            shapes = [tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\[([\d,]*)\]", m.group(1))]
            found.append((m.group(2), shapes))
    return found


def test_the_compiled_program_moves_gradients_not_rows(monkeypatch):
    compiled, args = compiled_segment(monkeypatch)
    found = collectives(compiled.as_text())
    assert any(op == "all-reduce" and (3, HIDDEN) in shapes for op, shapes in found), found  # the gradient
    data_sizes = {ROWS, ROWS // 4, BATCH, BATCH // 4, EVAL_ROWS, EVAL_ROWS // 4}
    moved = [(op, shapes) for op, shapes in found if any(set(s) & data_sizes for s in shapes)]
    assert not moved, f"collectives over data rows: {moved}"
    # the data arguments are sharded along the mesh, not replicated: each device holds its rows only
    x, y, eval_x, eval_y = args[2:6]
    for a in (x, y, eval_x, eval_y):
        assert a.sharding.spec == PartitionSpec("data") and not a.sharding.is_fully_replicated
        assert {s.data.shape[0] for s in a.addressable_shards} == {a.shape[0] // 4}
    shardings = jax.tree_util.tree_leaves(compiled.input_shardings[0][2:6])
    assert all(not s.is_fully_replicated for s in shardings), shardings


def test_each_device_computes_on_its_own_part_of_the_batch():
    seen = []
    dense = fn.Dense(2, fn.linear)

    def apply(params, x, *, key=None):
        jax.debug.inspect_array_sharding(x, callback=lambda s: seen.append(s.shard_shape(x.shape)))
        return dense.apply(params, x, key=key)

    probe = fn.Layer(dense.init, apply)
    params = probe.init(KEY, (-1, 3))[1]
    result = fn.fit(
        probe,
        fn.mean_squared_error,
        fn.sgd(0.01),
        params,
        DATA,
        EVAL,
        epochs=1,
        batch_size=BATCH,
        eval_every=1,
        eval_batch_size=24,
        key=KEY,
        mesh=mesh(4),
    )
    assert (BATCH // 4, 3) in seen and (24 // 4, 3) in seen, seen  # a training and an eval batch, per device
    assert {shape[0] for shape in seen} <= {BATCH // 4, 24 // 4, (EVAL_ROWS // 4) % (24 // 4)}, seen
    # results are replicated over the mesh: every device (and process) holds all of them
    for leaf in jax.tree_util.tree_leaves(result):
        assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 4, leaf.sharding


def test_data_sharded_differently_from_the_mesh_is_refused():
    m = mesh(4)
    other = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
    for sharding in (NamedSharding(m, PartitionSpec(None, "data")), NamedSharding(other, PartitionSpec("model"))):
        x = jax.device_put(np.ones((ROWS, 4)) if sharding.spec[0] is None else DATA[0], sharding)
        with pytest.raises(
            ValueError, match=r"train_data x is sharded as NamedSharding.*but the mesh wants its rows along 'data'"
        ):
            fn.fit(
                PROBED,
                fn.mean_squared_error,
                fn.sgd(0.1),
                PROBED.init(KEY, (-1, x.shape[1]))[1],
                (x, DATA[1]),
                epochs=1,
                batch_size=BATCH,
                key=KEY,
                mesh=m,
            )


def test_rows_that_do_not_divide_over_the_devices_are_refused():
    with pytest.raises(ValueError, match=r"train_data rows \(62\) must divide by the 4 devices of mesh axis 'data'"):
        fn.fit(
            NET,
            fn.mean_squared_error,
            fn.sgd(0.1),
            PARAMS,
            (X[:62], Y[:62]) if len(X) >= 62 else (np.ones((62, 5)), np.ones((62, 2))),
            epochs=1,
            batch_size=8,
            key=KEY,
            mesh=mesh(4),
        )
    with pytest.raises(ValueError, match=r"eval_data rows \(21\) must divide by shards=4"):
        fn.fit(
            NET,
            fn.mean_squared_error,
            fn.sgd(0.1),
            PARAMS,
            (X, Y),
            (X[:21], Y[:21]),
            epochs=1,
            batch_size=8,
            eval_every=1,
            key=KEY,
            shards=4,
        )
    with pytest.raises(ValueError, match=r"shards \(2\) must be the 4 devices of mesh axis 'data'"):
        fn.fit(
            NET,
            fn.mean_squared_error,
            fn.sgd(0.1),
            PARAMS,
            (X, Y),
            epochs=1,
            batch_size=8,
            key=KEY,
            mesh=mesh(4),
            shards=2,
        )


@pytest.mark.slow  # its own module's test covers one device; CI's budget
def test_a_streamed_fit_under_a_mesh_equals_the_device_fit_bit_for_bit(monkeypatch):
    """The host gathers each shard's local batch in each shard's own order (``distributed.shard_orders``),
    so a streamed mesh fit (and a streamed ``shards=n`` fit) equals the device-resident one: with a
    masked last batch in every shard (15 rows a shard, local batches of 2), and eval data read in
    batches of every shard's rows side by side with a partial last one (``eval_batch_size=8``)."""
    from funcnet.train import stream

    monkeypatch.setattr(stream, "SEGMENT_BYTES", 3 * 8 * (5 + 2) * 8)  # three batches per segment
    for kw in ({"mesh": mesh(4), "eval_batch_size": 8}, {"shards": 2}):
        resident = run(**kw)
        streamed = run(**kw, stream=True)
        jax.tree_util.tree_map(np.testing.assert_array_equal, streamed, resident)


def test_random_windows_and_a_sampler_under_a_mesh_equal_one_device():
    """Drawn batches (each step's whole batch from (key, step)) are sharded along the data axis
    as they are made; the tokens are replicated, every device drawing from all of them."""
    tokens = np.asarray(np.arange(300) % 7, np.int32)
    lm = fn.serial(fn.Embedding(7, 8), fn.Dense(7, fn.linear))
    lm_params = lm.init(KEY, (-1, 6))[1]
    windows = lambda **kw: fn.fit(
        lm,
        fn.softmax_cross_entropy,
        fn.adam(0.05),
        lm_params,
        fn.random_windows(tokens, 6),
        steps=6,
        batch_size=8,
        key=KEY,
        **kw,
    )

    def sampler(key, step):
        x = jax.random.normal(key, (8, 5))
        return x, x[:, :2] * 2.0

    sampled = lambda **kw: fn.fit(NET, fn.mean_squared_error, fn.adam(0.01), PARAMS, sampler, steps=6, key=KEY, **kw)
    one_windows, one_sampled = windows(), sampled()
    for devices in (2, 4):
        on_mesh = windows(mesh=mesh(devices))
        close(on_mesh.params, one_windows.params)
        assert on_mesh.params[0].W.sharding.is_fully_replicated
        close(sampled(mesh=mesh(devices)).params, one_sampled.params)


def test_a_transform_under_a_mesh_equals_its_shards_on_one_device():
    """Each batch is transformed whole (its key the batch's own), then sharded as any batch."""

    def noise(key, batch):
        x, y = batch
        return x + 0.1 * jax.random.normal(key, x.shape, x.dtype), y

    close(run(mesh=mesh(2), transform=noise), run(shards=2, transform=noise))
