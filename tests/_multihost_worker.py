"""One process of tests/test_multihost.py: ``python tests/_multihost_worker.py OUT CASE...``.

With ``MH_PROCESSES`` in the environment (``tests/_multihost.py`` sets it) the process joins
the others through ``jax.distributed``; without, it is the single-process reference. Either
way it builds the same global data, each process loading only its own rows, runs each case
and writes what every process can read of the result to ``OUT/<case>-<process>.npz`` (and
messages to ``.json``), so the test compares processes with each other and with the reference.
"""

import json
import os
import sys
from pathlib import Path

import jax

if "MH_PROCESSES" in os.environ:
    jax.distributed.initialize(
        coordinator_address=os.environ["MH_COORDINATOR"],
        num_processes=int(os.environ["MH_PROCESSES"]),
        process_id=int(os.environ["MH_PROCESS_ID"]),
    )
jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

import funcnet as fn  # noqa: E402
from funcnet import checkpoint  # noqa: E402
from funcnet.train import checkpointing, fitting  # noqa: E402

OUT = Path(sys.argv[1])
ME, COUNT = jax.process_index(), jax.process_count()
MESH = Mesh(np.array(jax.devices()), ("data",))
ROWS = NamedSharding(MESH, PartitionSpec("data"))
KEY = jax.random.PRNGKey(3)

rng = np.random.default_rng(0)  # the data set "on disk": every process loads only its own rows
ALL_X, ALL_EVAL_X = rng.standard_normal((32, 4)), rng.standard_normal((16, 4))
ALL_Y, ALL_EVAL_Y = (np.argmax(a @ rng.standard_normal((4, 3)), axis=1).astype(np.int32) for a in (ALL_X, ALL_EVAL_X))


def global_array(whole):
    per = whole.shape[0] // COUNT
    return jax.make_array_from_process_local_data(ROWS, whole[ME * per : (ME + 1) * per])


X, Y, EVAL_X, EVAL_Y = (global_array(a) for a in (ALL_X, ALL_Y, ALL_EVAL_X, ALL_EVAL_Y))
NET = fn.serial(fn.Dense(6, fn.tanh), fn.Dropout(0.1), fn.Dense(3, fn.linear))
PARAMS = NET.init(jax.random.PRNGKey(0), (-1, 4))[1]


def fit(train=(X, Y), evaluate=(EVAL_X, EVAL_Y), **kw):
    arguments = dict(epochs=4, batch_size=8, eval_every=1, patience=10, key=KEY, mesh=MESH)
    arguments.update(kw)
    return fn.fit(
        NET,
        fn.softmax_cross_entropy,
        fn.momentum(0.1),
        PARAMS,
        train,
        evaluate,
        metrics={"accuracy": fn.accuracy},
        **arguments,
    )


def save(case, tree):
    arrays = {jax.tree_util.keystr(p): np.asarray(leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}
    np.savez(OUT / f"{case}-{ME}.npz", **arrays)


def message(call):
    try:
        call()
    except (ValueError, TypeError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def case_fit():
    result = fit(progress=True)
    replicated = all(leaf.is_fully_replicated for leaf in jax.tree_util.tree_leaves(result))
    save("fit", {"result": result, "replicated": np.array(replicated)})


def case_numpy():
    """The whole data set as NumPy in every process: each places only its own devices' rows."""
    save("numpy", {"result": fit((ALL_X, ALL_Y), (ALL_EVAL_X, ALL_EVAL_Y), progress=True)})  # the same program


class Reads:
    """The whole data set as a host object indexable by rows (as an h5py dataset is) that
    records every row it is asked for."""

    def __init__(self, array):
        self.array, self.shape, self.dtype, self.rows = array, array.shape, array.dtype, set()

    def __getitem__(self, index):
        self.rows.update(np.asarray(index).tolist())
        return self.array[index]


def case_stream():
    """The whole data set on the host in every process, streamed: each reads its own shard's rows."""
    train, evaluate = (Reads(ALL_X), Reads(ALL_Y)), (Reads(ALL_EVAL_X), Reads(ALL_EVAL_Y))
    save("stream", {"result": fit(train, evaluate, stream=True, progress=True)})
    parts = dict(zip(("x", "y", "ex", "ey"), train + evaluate, strict=True))
    save("stream_reads", {name: np.array(sorted(part.rows)) for name, part in parts.items()})
    # more eval rows than a batch holds (full batches, then the rest): the device-resident fit's result exactly
    device = fit((ALL_X, ALL_Y), (ALL_EVAL_X, ALL_EVAL_Y), eval_batch_size=6)
    save("stream_batches", {"stream": fit(train, evaluate, stream=True, eval_batch_size=6), "device": device})


def case_shards():
    """One device, no mesh, the host data in as many shards as the mesh has devices."""
    save("shards", {"result": fit((ALL_X, ALL_Y), (ALL_EVAL_X, ALL_EVAL_Y), mesh=None, shards=len(jax.devices()))})


def case_step():
    optimizer = fn.adam(0.01)
    step = jax.jit(fn.train_step(NET, fn.softmax_cross_entropy, optimizer, mesh=MESH))
    params, state, loss = step(PARAMS, optimizer.init(PARAMS), X, Y, KEY)
    params, state, loss = step(params, state, X, Y, jax.random.fold_in(KEY, 1))
    save("step", {"params": params, "state": state, "loss": loss})


def case_checks():
    bad_y = global_array(np.where(np.arange(32) == 29, 7, ALL_Y).astype(np.int32))
    nan_x = global_array(np.where(np.arange(32)[:, None] == 21, np.nan, ALL_X))
    logits = global_array(ALL_X[:, :3])
    ids = global_array(np.arange(32, dtype=np.int32) % 5)
    found = {
        "labels": message(lambda: fn.softmax_cross_entropy(logits, bad_y)),
        "accuracy": message(lambda: fn.accuracy(logits, Y)),
        "ids": message(lambda: fn.embedding(ids, np.ones((4, 2)))),
        "nan": message(
            lambda: fn.fit(
                NET,
                fn.softmax_cross_entropy,
                fn.sgd(0.1),
                PARAMS,
                (nan_x, Y),
                epochs=1,
                batch_size=8,
                key=KEY,
                mesh=MESH,
            )
        ),
        "no mesh": message(
            lambda: fn.fit(NET, fn.softmax_cross_entropy, fn.sgd(0.1), PARAMS, (X, Y), epochs=1, batch_size=8, key=KEY)
        ),
        "param_count": str(fn.param_count(jax.device_put(PARAMS, NamedSharding(MESH, PartitionSpec())))),
        "summary": fn.summary(NET, (-1, 4)),
    }
    (OUT / f"checks-{ME}.json").write_text(json.dumps(found))


def case_disagree():
    local_x = ALL_X if ME == 0 else ALL_X[:30]
    per = 16 - ME  # process 1 loads a row fewer: the global arrays disagree on their shape
    short_x = jax.make_array_from_process_local_data(ROWS, ALL_X[ME * 16 : ME * 16 + per])
    short_y = jax.make_array_from_process_local_data(ROWS, ALL_Y[ME * 16 : ME * 16 + per])
    found = {
        "global shape": message(lambda: fit((short_x, short_y))),
        "epochs": message(lambda: fit(epochs=2 + ME)),
        "shape": message(
            lambda: fn.fit(
                NET,
                fn.softmax_cross_entropy,
                fn.sgd(0.1),
                PARAMS,
                (local_x, ALL_Y[: len(local_x)]),
                epochs=1,
                batch_size=8,
                key=KEY,
                mesh=MESH,
            )
        ),
    }
    (OUT / f"disagree-{ME}.json").write_text(json.dumps(found))


WRITES = []
_write = checkpointing._write


def counting_write(directory, state, epoch, run):
    WRITES.append(epoch)
    _write(directory, state, epoch, run)


checkpointing._write = counting_write


def case_ckpt_full():
    save("ckpt_full", {"result": fit(checkpoint_dir=str(OUT / "full")), "writes": np.array(WRITES, np.int64)})


def case_ckpt_kill():
    store = fitting.checkpointing.store

    def store_then_die(directory, state, epoch, run):
        store(directory, state, epoch, run)  # durable, and every process past the barrier
        if epoch == 2:
            os._exit(17)  # killed, every process, right after the second checkpoint

    fitting.checkpointing.store = store_then_die
    fit(checkpoint_dir=str(OUT / "killed"))


def case_ckpt_resume():
    save("ckpt_resume", {"result": fit(checkpoint_dir=str(OUT / "killed")), "writes": np.array(WRITES, np.int64)})


# --- FSDP: a 4-layer MLP's params and optimizer state sharded over the same 2 devices as the rows ---

MLP = fn.serial(fn.Dense(16, fn.tanh), fn.Dense(16, fn.tanh), fn.Dense(16, fn.tanh), fn.Dense(3, fn.linear))
MLP_PARAMS = MLP.init(jax.random.PRNGKey(0), (-1, 4))[1]
RULE = fn.FSDP("data", min_size=64)  # the 4 x 16 and 16 x 16 weights sharded, the rest replicated


def fit_mlp(**kw):
    arguments = dict(epochs=3, batch_size=8, eval_every=1, patience=None, key=KEY, mesh=MESH, param_axis=RULE)
    arguments.update(kw)
    data = ((X, Y), (EVAL_X, EVAL_Y)) if arguments["mesh"] is not None else ((ALL_X, ALL_Y), (ALL_EVAL_X, ALL_EVAL_Y))
    return fn.fit(
        MLP, fn.softmax_cross_entropy, fn.adam(0.01), MLP_PARAMS, *data, metrics={"accuracy": fn.accuracy}, **arguments
    )


def gathered(tree):
    """Every leaf whole on this host (a test's view: sharded leaves are gathered from the processes)."""
    from jax.experimental import multihost_utils

    return jax.tree_util.tree_map(
        lambda leaf: multihost_utils.process_allgather(leaf, tiled=True) if not leaf.is_fully_addressable else leaf,
        tree,
    )


def layout(tree):
    """Per leaf: 1 if this process holds only a part of it, and the elements it holds."""
    return {
        "split": np.array([not leaf.is_fully_replicated for leaf in jax.tree_util.tree_leaves(tree)]),
        "held": np.array(
            [sum(s.data.size for s in leaf.addressable_shards) for leaf in jax.tree_util.tree_leaves(tree)]
        ),
    }


BLOCKS = []
_read_block = checkpoint.read_block


def recording_read_block(fn_name, file, name, token):
    BLOCKS.append(file.name)
    return _read_block(fn_name, file, name, token)


checkpoint.read_block = recording_read_block


def case_fsdp():
    result = fit_mlp()
    save("fsdp", {"result": gathered(result), "params": layout(result.params), "opt": layout(result.opt_state)})


def case_fsdp_stream():
    """The whole data set on the host in every process, streamed: the device-resident FSDP fit's result."""
    data = ((Reads(ALL_X), Reads(ALL_Y)), (Reads(ALL_EVAL_X), Reads(ALL_EVAL_Y)))
    arguments = dict(epochs=3, batch_size=8, eval_every=1, patience=None, key=KEY, mesh=MESH, param_axis=RULE)
    metrics = {"accuracy": fn.accuracy}
    result = fn.fit(
        MLP, fn.softmax_cross_entropy, fn.adam(0.01), MLP_PARAMS, *data, stream=True, metrics=metrics, **arguments
    )
    save("fsdp_stream", {"result": gathered(result), "params": layout(result.params)})


def case_fsdp_ref():
    """One device, no mesh, the rows in 2 shards: the data-parallel fit FSDP must equal."""
    save("fsdp_ref", {"result": fit_mlp(mesh=None, param_axis=None, shards=2)})


def case_fsdp_step():
    optimizer = fn.adam(0.01)
    if COUNT > 1:
        step = jax.jit(fn.train_step(MLP, fn.softmax_cross_entropy, optimizer, mesh=MESH, param_axis=RULE))
        params = fn.shard_params(MLP_PARAMS, MESH, RULE)
        state = fn.shard_params(optimizer.init(MLP_PARAMS), MESH, RULE)
        x, y = X, Y
    else:
        step = jax.jit(fn.train_step(MLP, fn.softmax_cross_entropy, optimizer))
        params, state, x, y = MLP_PARAMS, optimizer.init(MLP_PARAMS), ALL_X, ALL_Y
    for _ in range(2):
        params, state, loss = step(params, state, x, y, None)
    save("fsdp_step", {"params": gathered(params), "state": gathered(state), "loss": loss})


def case_fsdp_save():
    """Each process writes its own blocks and, in the same mesh, reads back only its own."""
    tree = {"params": fn.shard_params(MLP_PARAMS, MESH, RULE), "count": np.int32(3)}
    path = OUT / "tree.safetensors"
    fn.save(path, tree)
    BLOCKS.clear()
    same_mesh = fn.load(path, tree)
    own = sorted(set(BLOCKS))
    BLOCKS.clear()
    replicated = fn.load(
        path, {"params": jax.device_put(MLP_PARAMS, NamedSharding(MESH, PartitionSpec())), "count": np.int32(0)}
    )
    save(
        "fsdp_save",
        {
            "same": gathered(same_mesh),
            "replicated": replicated,
            "own": np.array(own),
            "all": np.array(sorted(set(BLOCKS))),
            "files": np.array(sorted(p.name for p in OUT.glob("tree*"))),
        },
    )


def case_fsdp_ckpt_kill():
    store = fitting.checkpointing.store

    def store_then_die(directory, state, epoch, run):
        store(directory, state, epoch, run)
        if epoch == 2:
            os._exit(17)

    fitting.checkpointing.store = store_then_die
    fit_mlp(checkpoint_dir=str(OUT / "fsdp_killed"))


def case_fsdp_ckpt_resume():
    BLOCKS.clear()
    result = fit_mlp(checkpoint_dir=str(OUT / "fsdp_killed"))
    save("fsdp_ckpt_resume", {"result": gathered(result), "read": np.array(sorted(set(BLOCKS)))})


for name in sys.argv[2:]:
    globals()[f"case_{name}"]()
print(f"process {ME} of {COUNT}: done", flush=True)
