"""FSDP cases on 2 and 4 forced CPU devices, run by tests/test_fsdp.py in a subprocess (the device
count is fixed when JAX starts). Equality is normwise per leaf, ``|a - b| / |b| <= 1e-5`` in
float32: the FSDP program reduces the gradient in another order than one device does."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import funcnet as fn
from funcnet import checkpoint
from funcnet.train import fitting

KEY = jax.random.PRNGKey(1)
rng = np.random.default_rng(0)
X = rng.standard_normal((64, 16)).astype(np.float32)
Y = (X @ rng.standard_normal((16, 4)) / 4).astype(np.float32)
MLP = fn.serial(fn.Dense(64, fn.tanh), fn.Dense(64, fn.tanh), fn.Dense(64, fn.tanh), fn.Dense(4, fn.linear))
f32 = lambda tree: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), tree)  # the tests run with x64
MLP_PARAMS = f32(MLP.init(jax.random.PRNGKey(0), (-1, 16))[1])
RULE = fn.FSDP("fsdp", min_size=1024)  # the 64 x 64 and 16 x 64 weights sharded, the biases and 64 x 4 not

VOCAB, T, FEATURES = 24, 8, 32
TOKENS = rng.integers(0, VOCAB, (32, T + 1)).astype(np.int32)


def transformer():
    dense = lambda n, activation: fn.TimeDistributed(fn.Dense(n, activation, w_init=fn.glorot_normal, b_init=fn.zeros))
    block = lambda: (
        fn.residual(fn.LayerNorm(), fn.MultiHeadAttention(4, is_causal=True, block_size=4, use_bias=False)),
        fn.residual(fn.LayerNorm(), dense(64, fn.gelu), dense(FEATURES, fn.linear)),
    )
    return fn.serial(
        fn.Embedding(VOCAB, FEATURES, w_init=fn.normal(0.5)),
        fn.PositionalEmbedding(T),
        *block(),
        *block(),
        fn.LayerNorm(),
        dense(VOCAB, fn.linear),
    )


def mesh(n, axes=("fsdp",)):
    return Mesh(np.array(jax.devices()[:n]).reshape(*([n] if len(axes) == 1 else [2, n // 2])), axes)


def leaves(tree):
    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(tree)]


def relative(a, b):
    """The largest normwise relative difference of any leaf (NaN entries must agree)."""
    worst = 0.0
    for u, v in zip(leaves(a), leaves(b), strict=True):
        assert u.shape == v.shape and u.dtype == v.dtype
        np.testing.assert_array_equal(np.isnan(u), np.isnan(v))
        u, v = np.nan_to_num(u.astype(np.float64)), np.nan_to_num(v.astype(np.float64))
        worst = max(worst, float(np.linalg.norm(u - v) / max(np.linalg.norm(v), 1e-30)))
    return worst


def same_fit(a, b, tolerance=1e-5, state_tolerance=None):
    """Params, optimizer state, history and epochs equal to ``tolerance``; ``state_tolerance``:
    Adam's first moment over more epochs (a running mean of gradients whose mean is near zero
    sums nearly cancelling terms, so their rounding grows relative to it)."""
    assert relative(a.params, b.params) <= tolerance
    assert relative(a.opt_state, b.opt_state) <= (state_tolerance or tolerance)
    assert relative(a.history, b.history) <= tolerance
    assert int(a.best_epoch) == int(b.best_epoch) and int(a.stopped_epoch) == int(b.stopped_epoch)


def sharded_leaves(tree):
    """(sharded, replicated) leaf counts of a tree of global arrays."""
    flags = [not leaf.is_fully_replicated for leaf in jax.tree_util.tree_leaves(tree)]
    return sum(flags), len(flags) - sum(flags)


def fit_mlp(optimizer=None, **kw):
    arguments = dict(epochs=3, batch_size=16, eval_every=1, patience=None, key=KEY)
    arguments.update(kw)
    evaluation = arguments.pop("evaluation", (X[:32], Y[:32]))
    return fn.fit(MLP, fn.mean_squared_error, optimizer or fn.adam(3e-3), MLP_PARAMS, (X, Y), evaluation, **arguments)


def fitter(net, params, optimizer, loss=fn.mean_squared_error, data=(X, Y), **fixed):
    """``run(**kw)``: 3 epochs of ``net`` from ``params`` on ``data``, batch 16."""
    return lambda **kw: fn.fit(net, loss, optimizer, params, data, epochs=3, batch_size=16, key=KEY, **fixed, **kw)


def test_four_devices_are_there():
    assert len(jax.devices()) == 4


@pytest.mark.parametrize("n", [pytest.param(2, marks=pytest.mark.slow), 4])
def test_a_four_layer_mlp_equals_the_fit_of_as_many_shards_on_one_device(n):
    sharded = fit_mlp(mesh=mesh(n), param_axis=RULE)
    same_fit(sharded, fit_mlp(shards=n))
    # the 4 weights but the last are split over the devices, each along its largest dimension
    specs = [leaf.sharding.spec for leaf in jax.tree_util.tree_leaves(sharded.params)]
    assert specs == [PartitionSpec(None, "fsdp"), PartitionSpec()] + [PartitionSpec("fsdp"), PartitionSpec()] * 2 + [
        PartitionSpec(),
        PartitionSpec(),
    ]
    assert sharded_leaves(sharded.opt_state) == (6, 11)  # adam's two moments of the 3 weights; the rest replicated
    assert sharded.history.train_loss.is_fully_replicated and sharded.best_epoch.is_fully_replicated


@pytest.mark.slow
def test_a_two_block_transformer_equals_the_fit_of_as_many_shards_on_one_device():
    net = transformer()
    params = f32(net.init(jax.random.PRNGKey(2), (-1, T))[1])
    data = (TOKENS[:, :-1], TOKENS[:, 1:])
    for n in (2, 4):
        run = lambda **kw: fn.fit(
            net, fn.softmax_cross_entropy, fn.adamw(3e-3), params, data, epochs=3, batch_size=8, key=KEY, **kw
        )
        sharded = run(mesh=mesh(n), param_axis=fn.FSDP("fsdp", min_size=256))
        same_fit(sharded, run(shards=n))
        assert sharded_leaves(sharded.params)[0] >= 12  # embeddings, attention and MLP weights of both blocks


@pytest.mark.slow
def test_a_data_by_fsdp_mesh_and_the_default_rule():
    """Rows over 'data' (2 shards), the state over 'fsdp'; the default rule's threshold (16,384
    elements) leaves this model replicated but for the 128 x 128 weight."""
    net = fn.serial(fn.Dense(128, fn.tanh), fn.Dense(128, fn.tanh), fn.Dense(4, fn.linear))
    params = f32(net.init(jax.random.PRNGKey(0), (-1, 16))[1])
    run = lambda **kw: fn.fit(
        net, fn.mean_squared_error, fn.adam(1e-2), params, (X, Y), epochs=3, batch_size=16, key=KEY, **kw
    )
    sharded = run(mesh=mesh(4, ("data", "fsdp")), param_axis="fsdp")
    same_fit(sharded, run(shards=2))
    assert [leaf.sharding.spec for leaf in jax.tree_util.tree_leaves(sharded.params)][2] == PartitionSpec("fsdp")
    assert sharded_leaves(sharded.params) == (1, 5)


def test_train_step_keeps_the_state_sharded_and_equals_the_replicated_step():
    m = mesh(4)
    optimizer = fn.adam(1e-2)
    plain = jax.jit(fn.train_step(MLP, fn.mean_squared_error, optimizer))
    step = jax.jit(fn.train_step(MLP, fn.mean_squared_error, optimizer, mesh=m, data_axis="fsdp", param_axis=RULE))
    params, state = fn.shard_params(MLP_PARAMS, m, RULE), fn.shard_params(optimizer.init(MLP_PARAMS), m, RULE)
    reference = (MLP_PARAMS, optimizer.init(MLP_PARAMS))
    for i in range(3):
        params, state, loss = step(params, state, X[16 * i : 16 * i + 16], Y[16 * i : 16 * i + 16], None)
        *reference, expected = plain(*reference, X[16 * i : 16 * i + 16], Y[16 * i : 16 * i + 16], None)
        assert abs(float(loss) - float(expected)) <= 1e-6 * abs(float(expected))
    assert relative((params, state), tuple(reference)) <= 1e-5
    assert sharded_leaves(params) == (3, 5) and loss.is_fully_replicated
    # the compiled step: its state arguments are a quarter of the replicated ones' (plus the small
    # replicated leaves), and XLA gathers the sharded weights inside it
    replicated = NamedSharding(m, PartitionSpec())
    whole = jax.jit(fn.train_step(MLP, fn.mean_squared_error, optimizer, mesh=m, data_axis="fsdp"))
    args = lambda p, s: (p, s, jnp.asarray(X[:16]), jnp.asarray(Y[:16]), None)
    compiled = step.lower(*args(params, state)).compile()
    full = whole.lower(*args(*jax.device_put(reference, replicated))).compile()
    sharded_bytes = compiled.memory_analysis().argument_size_in_bytes
    full_bytes = full.memory_analysis().argument_size_in_bytes
    small = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves((params, state)) if leaf.is_fully_replicated)
    assert sharded_bytes <= (full_bytes - small) / 4 + small + X[:16].nbytes + Y[:16].nbytes
    assert "all-gather" in compiled.as_text()
    assert all(not s.is_fully_replicated for s in jax.tree_util.tree_leaves(compiled.output_shardings[0])[2:3])


@pytest.mark.slow
def test_composes_with_mixed_precision_accumulate_ema_batchnorm_and_streaming():
    m = mesh(2)
    # float32 master params sharded, bfloat16 compute
    low = fn.mixed_precision(MLP, jnp.bfloat16)
    run = lambda **kw: fn.fit(
        low, fn.mean_squared_error, fn.adam(1e-2), MLP_PARAMS, (X, Y), epochs=3, batch_size=16, key=KEY, **kw
    )
    sharded = run(mesh=m, param_axis=RULE)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(sharded.params))
    assert sharded_leaves(sharded.params)[0] == 3
    # the data-parallel fit's, to bfloat16's rounding (its gradients are summed in bfloat16)
    assert relative(sharded.params, run(mesh=m, data_axis="fsdp").params) <= 5e-3
    # accumulate and the moving average: the accumulated gradients and the average are sharded too
    kw = dict(ema_decay=0.9)
    sharded = fit_mlp(fn.accumulate(fn.adam(1e-2), 2), mesh=m, param_axis=RULE, **kw)
    plain = fit_mlp(fn.accumulate(fn.adam(1e-2), 2), shards=2, **kw)
    same_fit(sharded, plain)
    assert relative(sharded.ema_params, plain.ema_params) <= 1e-5
    assert sharded_leaves(sharded.ema_params)[0] == 3
    # BatchNorm's running statistics ride in the params (replicated: small)
    # (after the activation: a bias right before BatchNorm gets no gradient but rounding, which Adam
    # scales up to whole steps in any two programs)
    net = fn.serial(fn.Dense(64, fn.tanh), fn.BatchNorm(), fn.Dense(64, fn.tanh), fn.Dense(4, fn.linear))
    params = f32(net.init(jax.random.PRNGKey(0), (-1, 16))[1])
    run = lambda **kw: fn.fit(
        net, fn.mean_squared_error, fn.adam(3e-3), params, (X, Y), epochs=3, batch_size=16, key=KEY, **kw
    )
    same_fit(run(mesh=m, param_axis=RULE), run(shards=2))
    # streamed from the host: the device-resident FSDP fit's result
    streamed = fit_mlp(mesh=m, param_axis=RULE, stream=True)
    resident = fit_mlp(mesh=m, param_axis=RULE)
    same_fit(streamed, resident, tolerance=1e-6)
    assert sharded_leaves(streamed.params)[0] == 3


def test_bad_input_is_refused_before_anything_compiles(monkeypatch):
    def compiled(*args, **kwargs):
        raise AssertionError("compiled before the check")

    monkeypatch.setattr(fitting, "fresh_state", compiled)
    m = mesh(4)
    cases = [
        (
            dict(mesh=m, param_axis="model"),
            ValueError,
            r"param_axis 'model' is not an axis of the mesh, whose axes are \('fsdp',\)",
        ),
        (dict(mesh=m, param_axis=3), TypeError, "param_axis must be a mesh axis name"),
        (dict(param_axis="fsdp"), ValueError, "no mesh was given"),
        (dict(mesh=m, param_axis="fsdp", batch_size=6), ValueError, r"batch_size \(6\) must divide by the 4 devices"),
        (
            dict(mesh=m, param_axis=fn.FSDP("fsdp", dims=lambda path, shape: 0)),
            ValueError,
            r"\[0\].B of shape \(1, 64\) cannot be sharded along dimension 0 \(1\) over the 4 devices",
        ),
        (dict(mesh=m, param_axis=fn.FSDP("fsdp", min_size=-1)), ValueError, "min_size must be an int >= 0"),
    ]
    for kw, kind, message in cases:
        with pytest.raises(kind, match=message):
            fit_mlp(**kw)
    with pytest.raises(ValueError, match="cannot run under vmap"):
        jax.vmap(lambda key: fit_mlp(key=key, mesh=m, param_axis=RULE, evaluation=None).params)(
            jax.random.split(KEY, 2)
        )
    with pytest.raises(ValueError, match=r"cannot run under vmap \(optimizer is batched\)"):  # a sweep of rates
        jax.vmap(lambda rate: fit_mlp(fn.adam(rate), mesh=m, param_axis=RULE, evaluation=None).params)(
            jnp.asarray([1e-3, 2e-3])
        )
    with pytest.raises(ValueError, match="param_axis 'model' is not an axis"):
        fn.train_step(MLP, fn.mean_squared_error, fn.sgd(0.1), mesh=m, param_axis="model")
    step = jax.jit(
        fn.train_step(
            MLP,
            fn.mean_squared_error,
            fn.sgd(0.1),
            mesh=m,
            data_axis="fsdp",
            param_axis=fn.FSDP("fsdp", dims=lambda p, s: 0 if s else None),
        )
    )
    with pytest.raises(ValueError, match=r"\[0\].B of shape \(1, 64\) cannot be sharded along dimension 0"):
        step(MLP_PARAMS, fn.sgd(0.1).init(MLP_PARAMS), X[:16], Y[:16], None)


def test_the_rule():
    m = mesh(4)
    like = {
        "square": jax.ShapeDtypeStruct((128, 128), jnp.float32),  # equal dimensions: the first
        "wide": jax.ShapeDtypeStruct((130, 256), jnp.float32),  # 130 does not divide by 4: the other
        "odd": jax.ShapeDtypeStruct((129, 129), jnp.float32),  # none divides: replicated
        "bias": jax.ShapeDtypeStruct((1, 4096), jnp.float32),  # under 16,384 elements: replicated
        "count": jax.ShapeDtypeStruct((), jnp.int32),
        "big": jax.ShapeDtypeStruct((8, 4096), jnp.float32),
    }
    specs = {k: s.spec for k, s in fn.param_shardings(like, m, "fsdp").items()}
    assert specs == {
        "square": PartitionSpec("fsdp", None),
        "wide": PartitionSpec(None, "fsdp"),
        "odd": PartitionSpec(),
        "bias": PartitionSpec(),
        "count": PartitionSpec(),
        "big": PartitionSpec(None, "fsdp"),
    }
    explicit = fn.FSDP("fsdp", dims=lambda path, shape: 0 if path == "['big']" else None)
    assert fn.param_shardings(like, m, explicit)["big"].spec == PartitionSpec("fsdp", None)
    assert fn.param_shardings(like, m, explicit)["square"].spec == PartitionSpec()


# --- checkpoints ----------------------------------------------------------------------------------


def reads(monkeypatch):
    """Every block a restore reads: ``(file, tensor)`` in order."""
    seen = []
    original = checkpoint.read_block

    def recording(fn_name, file, name, token):
        seen.append((file.name, name))
        return original(fn_name, file, name, token)

    monkeypatch.setattr(checkpoint, "read_block", recording)
    return seen


def test_fit_checkpoints_per_process_resume_after_a_kill_and_into_other_meshes(tmp_path, monkeypatch):
    m = mesh(4)
    directory = tmp_path / "run"
    uninterrupted = fit_mlp(mesh=m, param_axis=RULE)
    store = fitting.checkpointing.store

    def store_then_die(directory, state, epoch, run):
        store(directory, state, epoch, run)
        if epoch == 2:
            raise KeyboardInterrupt  # killed right after the second checkpoint is durable

    monkeypatch.setattr(fitting.checkpointing, "store", store_then_die)
    with pytest.raises(KeyboardInterrupt):
        fit_mlp(mesh=m, param_axis=RULE, checkpoint_dir=directory)
    monkeypatch.setattr(fitting.checkpointing, "store", store)
    names = sorted(p.name for p in directory.iterdir())
    second = [n for n in names if n.startswith("checkpoint-000002")]
    assert len(second) == 2 and "checkpoint-000002.safetensors" in second  # the index, and process 0's blocks
    assert any(re.fullmatch(r"checkpoint-000002\.[0-9a-f]{12}\.process-00000-of-00001\.safetensors", n) for n in second)
    seen = reads(monkeypatch)
    resumed = fit_mlp(mesh=m, param_axis=RULE, checkpoint_dir=directory)
    assert int(resumed.resumed_epoch) == 2
    for a, b in zip(
        leaves(resumed._replace(resumed_epoch=None)), leaves(uninterrupted._replace(resumed_epoch=None)), strict=True
    ):
        np.testing.assert_array_equal(a, b)  # bit for bit
    # the same mesh: each device read its own block, once (params, opt_state and their best copies:
    # 3 sharded leaves each, times 4 blocks, and the moments twice as many)
    assert len(seen) == len(set(seen)) == (3 + 6 + 3 + 6) * 4
    assert sharded_leaves(resumed.params)[0] == 3
    # two checkpoints kept, each with its blocks; the first one's blocks went with it
    assert (
        sorted(n.split(".")[0] for n in (p.name for p in directory.iterdir()))
        == ["checkpoint-000002"] * 2 + ["checkpoint-000003"] * 2
    )
    # FSDP -> replicated: a data-parallel fit of the same shards continues the run
    longer = fit_mlp(mesh=m, data_axis="fsdp", checkpoint_dir=directory, epochs=4)
    assert int(longer.resumed_epoch) == 3 and sharded_leaves(longer.params)[0] == 0
    same_fit(longer, fit_mlp(shards=4, epochs=4))
    # replicated -> FSDP: and an FSDP fit continues the data-parallel checkpoint, blocks placed from whole arrays
    again = fit_mlp(mesh=m, param_axis=RULE, checkpoint_dir=directory, epochs=5)
    assert int(again.resumed_epoch) == 4 and sharded_leaves(again.params)[0] == 3
    same_fit(again, fit_mlp(shards=4, epochs=5), state_tolerance=1e-4)
    # 4 -> 2 devices: the newest checkpoint's params read onto a 2-device mesh, by blocks
    two = fn.param_shardings(MLP_PARAMS, mesh(2), RULE)
    like = jax.tree_util.tree_map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s), MLP_PARAMS, two)
    fn.save(tmp_path / "p.safetensors", fn.shard_params(uninterrupted.params, m, RULE))
    seen.clear()
    moved = fn.load(tmp_path / "p.safetensors", like)
    assert [leaf.sharding for leaf in jax.tree_util.tree_leaves(moved)] == jax.tree_util.tree_leaves(two)
    for a, b in zip(leaves(moved), leaves(uninterrupted.params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(seen) == 3 * 4  # every block once: each of the 2 devices reads the 2 blocks of its half


def test_save_and_load_a_sharded_tree(tmp_path, monkeypatch):
    m = mesh(4)
    tree = {"params": fn.shard_params(MLP_PARAMS, m, RULE), "step": jnp.int32(7)}
    path = tmp_path / "tree.safetensors"
    fn.save(path, tree)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files[1] == "tree.safetensors" and re.fullmatch(
        r"tree\.[0-9a-f]{12}\.process-00000-of-00001\.safetensors", files[0]
    )
    host = {"params": MLP_PARAMS, "step": np.int32(0)}
    for like in (
        host,  # onto the default device
        {"params": jax.device_put(MLP_PARAMS, NamedSharding(m, PartitionSpec())), "step": np.int32(0)},  # replicated
        {"params": fn.shard_params(MLP_PARAMS, mesh(2), RULE), "step": np.int32(0)},  # 2 devices
    ):
        loaded = fn.load(path, like)
        for a, b in zip(leaves(loaded), leaves(tree), strict=True):
            np.testing.assert_array_equal(a, b)
        placed = [getattr(leaf, "sharding", None) for leaf in jax.tree_util.tree_leaves(like["params"])]
        if isinstance(placed[0], NamedSharding):
            assert [leaf.sharding for leaf in jax.tree_util.tree_leaves(loaded["params"])] == placed
    # saved again: a new token, and the previous save's block file is gone
    fn.save(path, tree)
    again = sorted(p.name for p in tmp_path.iterdir())
    assert len(again) == 2 and again[0] != files[0]
    # a torn block is an error, not wrong numbers
    block = tmp_path / again[0]
    raw = bytearray(block.read_bytes())
    raw[-3] ^= 0xFF
    block.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="does not match its CRC-32"):
        fn.load(path, host)
    # an unsharded tree is one file, as before (and a later one drops the blocks of a sharded save)
    fn.save(path, host)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree.safetensors"]
