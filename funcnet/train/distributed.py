"""Data parallelism across devices and processes: where the data lives, each shard's order,
processes that agree, one checkpoint writer.

Contract, stated once:

* **Shards.** ``fit`` splits the training rows into ``shards`` equal, contiguous parts (under a
  mesh: one per device of ``data_axis``; without: ``fit(..., shards=n)``, default 1). Under a
  mesh each part lives on its device, placed there once (``place``): data is never replicated.
  The inputs beyond x (``fit``'s ``(x, y, inputs)``) are rows like x's and are split alike.
* **Each shard's order.** Epoch ``e`` shuffles every shard's own rows, shard ``s`` with the key
  ``permutation(key, rows // shards, e, s)`` (``shard_orders``); with one shard the order is
  ``epoch_order(key, e, rows)`` itself. Global batch ``b`` is every shard's local batch ``b``
  (``batch_size / shards`` rows each) side by side, so a step reads on each device only that
  device's rows (``local_rows``: a ``shard_map`` gather) and moves gradients, not data. A fit
  without a mesh given ``shards=n`` computes the same batches on one device, so it reproduces
  an ``n``-device mesh fit up to the rounding of the gradient's sum.
* **Processes.** Under ``jax.distributed`` every process calls ``fit`` with the same arguments
  and its data as global ``jax.Array``s (or the whole data as NumPy; streamed, ``fit(...,
  stream=True)``, each process reads only the rows of its own devices' shards,
  ``local_shards``). ``agree`` compares a digest of every argument (data left on disk, such as
  an ``np.memmap``: its shape and dtype) across processes before anything runs, and raises in every
  process, naming what differs, instead of hanging in a collective. Results are replicated:
  every process reads them (under FSDP, ``fsdp.py``, but for the params and optimizer state,
  which stay sharded, each process holding and checkpointing its own blocks). Only process 0
  writes checkpoints (under FSDP: their index) and shows progress; the others
  wait at a barrier (``barrier``) until each file is durable.
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from funcnet import _host
from funcnet.train.shuffle import dropout_key, permutation

__all__ = [
    "agree",
    "barrier",
    "global_rows",
    "is_writer",
    "local_rows",
    "local_shards",
    "place",
    "put_replicated",
    "replicate",
    "shard_orders",
]


def is_writer() -> bool:
    """True in the one process that writes files and shows progress (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (nothing to do in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _digest(text: str) -> np.ndarray:
    return np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint32)


def agree(
    fn: str,
    described: dict[str, str],
    advice: str = "Every process must pass the same arguments, with its data as global arrays of the "
    "same global shape.",
) -> None:
    """Raise in every process if the processes disagree on any of ``described``'s values.

    Every process must pass the same keys (they are fixed by the caller's code); the values
    are compared by digest, so any length travels.
    """
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    names = sorted(described)
    mine = np.stack([_digest(f"{name}={described[name]}") for name in names])
    everyone = np.asarray(multihost_utils.process_allgather(mine))  # (processes, names, 8)
    differ = [name for i, name in enumerate(names) if not (everyone[:, i] == everyone[0, i]).all()]
    if differ:
        mine_text = "; ".join(f"{name}: {described[name]}" for name in differ)
        raise ValueError(
            f"{fn}: the {jax.process_count()} processes disagree on {', '.join(differ)} (process "
            f"{jax.process_index()} has {mine_text}). {advice}"
        )


def host_description(value: Any) -> str:
    """Shape, dtype and (where the host can read it without gathering) a digest of ``value``."""
    leaves = jax.tree_util.tree_leaves_with_path(value)
    hasher = hashlib.sha256()
    for path, leaf in leaves:
        shape, dtype = np.shape(leaf), getattr(leaf, "dtype", type(leaf).__name__)
        hasher.update(f"{jax.tree_util.keystr(path)}:{dtype}{shape}".encode())
        if isinstance(leaf, jax.core.Tracer) or _host.is_global(leaf) or not _in_memory(leaf):
            continue  # a traced or global array, or data left on disk: its shape and dtype only
        if jnp.issubdtype(getattr(leaf, "dtype", None) or np.float64, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        hasher.update(np.ascontiguousarray(np.asarray(leaf)).data)
    shapes = ", ".join(f"{getattr(leaf, 'dtype', type(leaf).__name__)}{list(np.shape(leaf))}" for _, leaf in leaves)
    return f"{shapes} (digest {hasher.hexdigest()[:16]})"


def _in_memory(leaf: Any) -> bool:
    """Values the host holds: not an ``np.memmap`` or another row-indexable object (an HDF5 or
    zarr dataset), which a streamed fit reads a segment at a time and which are not read whole
    to be compared."""
    return isinstance(leaf, (jax.Array, np.generic, int, float, complex, bool)) or (
        isinstance(leaf, np.ndarray) and not isinstance(leaf, np.memmap)
    )


def data_sharding(mesh: Mesh, data_axis: str) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(data_axis))


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """Inside a program: constrain ``tree`` to be replicated over ``mesh`` (readable by every
    process); without a mesh, ``tree`` as it is."""
    if mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, PartitionSpec()))


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Host (or single-device) values as arrays replicated over ``mesh``: every process places its
    own copy on its own devices (``agree`` has compared the copies; JAX's own comparison in
    ``device_put`` would call the NaNs of a history unequal)."""
    sharding = NamedSharding(mesh, PartitionSpec())

    def put(leaf: Any) -> Any:
        if isinstance(leaf, jax.core.Tracer) or (isinstance(leaf, jax.Array) and leaf.sharding == sharding):
            return jax.device_put(leaf, sharding) if isinstance(leaf, jax.core.Tracer) else leaf
        if jnp.issubdtype(getattr(leaf, "dtype", None) or np.float64, jax.dtypes.prng_key):  # a typed key
            return jax.random.wrap_key_data(put(jax.random.key_data(leaf)), impl=jax.random.key_impl(leaf))
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(put, tree)


def place(fn: str, name: str, array: Any, mesh: Mesh, data_axis: str) -> Any:
    """``array``'s rows sharded along ``data_axis`` of ``mesh``: host and single-device data is
    placed (each device receives its own rows only); data already spread over several devices
    must already be sharded this way, else a ``ValueError`` names both shardings."""
    target = data_sharding(mesh, data_axis)
    if isinstance(array, jax.core.Tracer):
        return array  # fit under an outer jit/vmap: the program constrains it
    if isinstance(array, jax.Array) and len(array.sharding.device_set) > 1:
        if not array.sharding.is_equivalent_to(target, array.ndim):
            raise ValueError(
                f"{fn}: {name} is sharded as {_sharding_text(array.sharding)}, but the mesh wants its "
                f"rows along {data_axis!r}: {_sharding_text(target)}. Build it with "
                f"jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec({data_axis!r})), "
                "local_rows), or pass NumPy data."
            )
        return array
    # Each process places only its own devices' rows (JAX's device_put would first gather the whole
    # array from every process to compare the copies; ``agree`` has compared their digests).
    host = np.asarray(array)
    return jax.make_array_from_callback(host.shape, target, lambda index: host[index])


def _sharding_text(sharding: Any) -> str:
    if isinstance(sharding, NamedSharding):
        return f"NamedSharding(mesh {dict(sharding.mesh.shape)}, {sharding.spec})"
    return repr(sharding)


def check_global_without_mesh(fn: str, name: str, array: Any) -> None:
    """Data spanning several processes needs the mesh that says how to split the work."""
    if _host.is_global(array):
        raise ValueError(
            f"{fn}: {name} spans {jax.process_count()} processes' devices; pass mesh= (a Mesh over "
            "jax.devices()) so that each process trains on its own rows."
        )


def shard_orders(
    key: jax.Array,
    epoch: int | jax.Array,
    rows: int,
    shards: int,
    shuffle: bool = True,
    mesh: Mesh | None = None,
    data_axis: str = "data",
) -> tuple[jax.Array, jax.Array]:
    """Epoch ``epoch``'s order of each shard's rows, ``(shards, rows // shards)`` local indices,
    and the epoch's dropout key: a function of ``(key, epoch, shard)`` alone.

    With one shard, ``epoch_order(key, epoch, rows, shuffle)`` itself (as one row). Under a mesh
    each device computes and holds only its own shard's order (row ``s`` on device ``s``).
    """
    local = rows // shards
    if not shuffle:
        orders = jnp.broadcast_to(jnp.arange(local, dtype=jnp.int32), (shards, local))
    elif shards == 1:
        orders = permutation(key, rows, epoch)[None]  # epoch_order's order; the dropout key once, below
    elif mesh is None:  # one vectorised permutation over the shard numbers, not one per shard unrolled
        shard = jnp.arange(shards, dtype=jnp.uint32)  # ``round_keys`` hashes each salt as uint32 bits
        orders = jax.vmap(lambda s: permutation(key, local, epoch, s))(shard)
    else:
        own = lambda k, e: permutation(k, local, e, jax.lax.axis_index(data_axis))[None]
        specs = (PartitionSpec(), PartitionSpec())
        orders = jax.shard_map(own, mesh=mesh, in_specs=specs, out_specs=PartitionSpec(data_axis))(
            key, jnp.asarray(epoch)
        )
    return orders, dropout_key(key, epoch)


def local_shards(mesh: Mesh | None, data_axis: str) -> tuple[int, ...] | None:
    """The positions along ``data_axis`` whose rows this process's devices hold (the shards it
    reads), or None when it holds them all (one process, or no mesh)."""
    if mesh is None or jax.process_count() == 1:
        return None
    devices = np.moveaxis(mesh.devices, mesh.axis_names.index(data_axis), 0)
    devices = devices.reshape(devices.shape[0], -1)  # each shard's devices (along the other axes)
    me = jax.process_index()
    mine = tuple(s for s, held in enumerate(devices) if any(d.process_index == me for d in held))
    return None if len(mine) == len(devices) else mine


def global_rows(index: np.ndarray, rows: int) -> np.ndarray:
    """On the host: the global row numbers of local ones, ``index`` being ``(..., shards, k)``
    rows of each of ``shards`` equal parts of ``rows`` rows, flattened in ``local_rows``'s order
    (so reading these rows gives the global batch ``local_rows`` gathers on the devices)."""
    shards = index.shape[-2]
    offsets = (np.arange(shards, dtype=np.int64) * (rows // shards))[:, None]
    rows_read: np.ndarray = (np.asarray(index, np.int64) + offsets).reshape(-1)
    return rows_read


def local_rows(data: jax.Array, index: jax.Array, mesh: Mesh | None, data_axis: str) -> jax.Array:
    """The global batch whose rows ``s * k .. (s + 1) * k - 1`` are rows ``index[s]`` of shard
    ``s`` (``index``: ``(shards, k)`` local row numbers). Under a mesh each device gathers from
    its own shard only, so no data crosses devices."""
    shards = index.shape[0]
    if mesh is None:
        if shards == 1:
            return data[index[0]]
        parts = data.reshape(shards, data.shape[0] // shards, *data.shape[1:])
        gathered: jax.Array = jax.vmap(lambda part, i: part[i])(parts, index)
        return gathered.reshape(-1, *data.shape[1:])
    spec = PartitionSpec(data_axis)
    gather = jax.shard_map(lambda part, i: part[i[0]], mesh=mesh, in_specs=(spec, spec), out_specs=spec)
    result: jax.Array = gather(data, index)
    return result
