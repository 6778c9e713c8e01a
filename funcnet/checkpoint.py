"""Save and load pytrees (params, optimizer states, FitResults) as safetensors files.

* Keys are the pytree paths (``jax.tree_util.keystr``, e.g. ``[0].W`` or ``.velocity[1].B``);
  dtypes and shapes are kept exactly.
* Writes are durable and atomic, the POSIX recipe (safetensors itself does no fsync): write a
  temporary file in the target's directory, flush and fsync it, rename it over the target,
  fsync the directory. A crash at any point leaves either the old file or the new one, never a
  mix; a failed write removes its temporary file.
* ``load(path, like)`` rebuilds ``like``'s structure. A file whose keys, shapes or dtypes do
  not match ``like`` raises a ``ValueError`` naming the first mismatching path; a truncated or
  non-safetensors file raises a ``ValueError`` saying so.
* **Sharded trees** (FSDP's params and optimizer state: ``jax.Array``s split over several
  devices, possibly of several processes) are written without gathering them anywhere. Each
  process writes the blocks its devices hold (one copy of each distinct block, by the device of
  the lowest id that holds it) to its own file, ``<stem>.<token>.process-<p>-of-<n>.safetensors``
  beside ``path`` (``<stem>``: ``path`` without ``.safetensors``; a block's tensor is named
  ``<key>@<start>:<stop>,...``, and the file's metadata holds each block's CRC-32); then, behind a
  barrier, process 0 writes ``path`` itself: the unsharded leaves whole, and an index (metadata
  ``funcnet.shards``: each sharded leaf's shape, dtype and blocks, the files that hold them, and
  the save's random ``token``). ``path`` is the commit: a crash before it leaves the previous
  save readable (its blocks are in files of its own token); the files of the previous save are
  removed once the new ``path`` is durable. ``load`` places each leaf as ``like``'s leaf is
  placed (a ``jax.Array`` over several devices, or a ``jax.ShapeDtypeStruct`` with a
  ``sharding``), each process reading only the blocks that overlap its own devices' parts (in the
  mesh it was saved from: exactly its own blocks), so a tree saved over 4 devices loads over 2, or
  replicated, or onto one device; a block whose CRC-32 or token does not match is a ``ValueError``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import uuid
import zlib
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

__all__ = ["load", "save"]

T = TypeVar("T")

TEMPORARY_PREFIX, TEMPORARY_SUFFIX = ".funcnet-", ".tmp"
SHARDS = "funcnet.shards"  # the index's metadata entry
SHARD_FILE = re.compile(r"(?P<stem>.+)\.(?P<token>[0-9a-f]{12})\.process-(?P<p>\d+)-of-(?P<n>\d+)\.safetensors")


def flatten(fn: str, tree: Any) -> tuple[dict[str, np.ndarray], Any]:
    """``tree``'s leaves as NumPy arrays keyed by pytree path, and its structure."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    arrays = {}
    for path, leaf in leaves:
        if not isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float, bool)):
            raise TypeError(
                f"{fn}: every leaf must be an array, got {type(leaf).__name__} at "
                f"{jax.tree_util.keystr(path) or '(root)'}."
            )
        arrays[jax.tree_util.keystr(path) or "(root)"] = np.asarray(leaf)
    return arrays, treedef


def write(path: str | os.PathLike[str], arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write ``arrays`` to ``path`` as safetensors, durably and atomically (module docstring)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, suffix=TEMPORARY_SUFFIX, dir=directory)
    os.close(handle)
    try:
        save_file({k: np.require(v, requirements="C") for k, v in arrays.items()}, temporary, metadata)
        handle = os.open(temporary, os.O_RDONLY)  # fsync flushes the file, whichever descriptor asks
        try:
            os.fsync(handle)
        finally:
            os.close(handle)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    sync_directory(directory)


def sync_directory(directory: str) -> None:
    """fsync a directory, so a rename or unlink in it survives a power cut."""
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def read(fn: str, path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Every array in the safetensors file ``path`` and its metadata; a ``ValueError`` if unreadable."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{fn}: no checkpoint at {path!r}.")
    try:
        with safe_open(path, framework="np") as file:
            arrays: dict[str, Any] = {key: file.get_tensor(key) for key in file.keys()}
            metadata = file.metadata() or {}
    except (SafetensorError, ValueError, OSError) as error:
        raise ValueError(
            f"{fn}: {path!r} is not a readable safetensors checkpoint (truncated or another format?): {error}"
        ) from error
    if SHARDS in metadata:  # a sharded save: its sharded leaves are read block by block when placed
        index = json.loads(metadata[SHARDS])
        for key, entry in index["leaves"].items():
            arrays[key] = Sharded(fn, Path(path), key, entry, index["token"])
    return arrays, metadata


def shapes(fn: str, like: Any) -> tuple[dict[str, jax.ShapeDtypeStruct], Any]:
    """``like``'s leaves as shapes and dtypes keyed by pytree path, and its structure. Leaves may
    be arrays or abstract ``jax.ShapeDtypeStruct``s (``jax.eval_shape``'s output)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    specs = {}
    for path, leaf in leaves:
        key = jax.tree_util.keystr(path) or "(root)"
        if isinstance(leaf, jax.ShapeDtypeStruct):
            specs[key] = leaf
        elif isinstance(leaf, jax.Array):  # never fetched: it may span other processes' devices
            specs[key] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
        else:
            flatten(fn, leaf)  # the same check and message as a saved tree's leaves
            specs[key] = jax.ShapeDtypeStruct(np.shape(leaf), np.asarray(leaf).dtype)
    return specs, treedef


def _placement(leaf: Any) -> Any:
    """The sharding a loaded leaf takes from ``like``'s: a ``jax.Array`` over several devices, or a
    ``jax.ShapeDtypeStruct`` with a sharding; ``None``: the default device."""
    sharding = getattr(leaf, "sharding", None)
    if sharding is None or isinstance(leaf, jax.core.Tracer) or len(sharding.device_set) < 2:
        return None
    return sharding


def unflatten(fn: str, path: str, stored: dict[str, Any], like: Any) -> Any:
    """``stored`` (arrays, or ``Sharded`` leaves read block by block) arranged in ``like``'s
    structure, after checking keys, shapes and dtypes; each leaf placed as ``like``'s is
    (``_placement``), each process reading only its own devices' parts."""
    expected, treedef = shapes(fn, like)
    for key, want in expected.items():
        if key not in stored:
            raise ValueError(f"{fn}: {path!r} has no entry {key} that like needs (it has {sorted(stored)[:5]}...).")
        got = stored[key]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise ValueError(
                f"{fn}: {key} in {path!r} is {got.dtype}{list(got.shape)}, but like "
                f"expects {want.dtype}{list(want.shape)}."
            )
    extra = sorted(set(stored) - set(expected))
    if extra:
        raise ValueError(
            f"{fn}: {path!r} has entries like does not, first {extra[0]} (a checkpoint of another network?)."
        )
    placements = [_placement(leaf) for leaf in jax.tree_util.tree_leaves(like)]

    def leaf(key: str, sharding: Any) -> Any:
        source = stored[key]
        if sharding is None:
            return jax.numpy.asarray(np.asarray(source))
        return jax.make_array_from_callback(tuple(source.shape), sharding, lambda index: np.asarray(source[index]))

    return jax.tree_util.tree_unflatten(treedef, [leaf(k, p) for k, p in zip(expected, placements, strict=True)])


def is_sharded(leaf: Any) -> bool:
    """True for a concrete ``jax.Array`` split over several devices (not a replica on each)."""
    return (
        isinstance(leaf, jax.Array)
        and not isinstance(leaf, jax.core.Tracer)
        and len(leaf.sharding.device_set) > 1
        and not leaf.is_fully_replicated
    )


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _token() -> str:
    """A random name for one save, the same in every process (process 0's, broadcast)."""
    words = np.frombuffer(uuid.uuid4().bytes[:8], np.uint32).copy()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        words = np.asarray(multihost_utils.broadcast_one_to_all(words)).astype(np.uint32)
    token: str = words.tobytes().hex()[:12]
    return token


def _stem(path: Path) -> str:
    return path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.name


def shard_file(path: str | os.PathLike[str], token: str, process: int, count: int) -> Path:
    """The file of ``process``'s blocks of the save of ``path`` named ``token``."""
    path = Path(path)
    return path.with_name(f"{_stem(path)}.{token}.process-{process:05d}-of-{count:05d}.safetensors")


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    return tuple((s.indices(n)[0], s.indices(n)[1]) for s, n in zip(index, shape, strict=True))


def _crc(array: np.ndarray) -> str:
    return f"{zlib.crc32(np.ascontiguousarray(array).data):08x}"


def blocks(array: jax.Array) -> list[tuple[tuple[tuple[int, int], ...], Any]]:
    """The distinct blocks of a sharded array, each with the device that writes it (of the devices
    holding the block, the one of the lowest id): every process computes the same list."""
    owners: dict[tuple[tuple[int, int], ...], Any] = {}
    indices = array.sharding.devices_indices_map(array.shape)
    for device in sorted(indices, key=lambda d: int(getattr(d, "id", 0))):
        owners.setdefault(_bounds(indices[device], array.shape), device)
    return sorted(owners.items(), key=lambda item: item[0])


def write_tree(
    fn: str, path: str | os.PathLike[str], tree: Any, metadata: dict[str, str] | None = None
) -> dict[str, np.ndarray]:
    """Write ``tree`` to ``path``, its sharded leaves block by block (the module's contract), in
    every process (each writes its own blocks; process 0 the index). Returns the unsharded arrays
    written whole (into ``path``). A tree without sharded leaves is written by process 0 alone, as
    one file."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    sharded = {jax.tree_util.keystr(p) or "(root)": leaf for p, leaf in leaves if is_sharded(leaf)}
    if not sharded:  # one file, written by whoever calls (as before sharded saves existed)
        whole, _ = flatten(fn, tree)
        write(path, whole, metadata)
        remove_stale(path, None)  # block files of an earlier sharded save of path
        return whole
    skeleton = jax.tree_util.tree_map(lambda leaf: np.zeros((), np.int8) if is_sharded(leaf) else leaf, tree)
    whole, _ = flatten(fn, skeleton)
    whole = {key: array for key, array in whole.items() if key not in sharded}
    writer = jax.process_index() == 0
    token, me, count = _token(), jax.process_index(), jax.process_count()
    mine: dict[str, np.ndarray] = {}
    index: dict[str, Any] = {}
    for key, array in sharded.items():
        local = {shard.device: shard for shard in array.addressable_shards}
        entries = []
        for bounds, device in blocks(array):
            name = f"{key}@{','.join(f'{a}:{b}' for a, b in bounds)}"
            entries.append([shard_file(path, token, device.process_index, count).name, name, bounds])
            if device.process_index == me:
                mine[name] = np.asarray(local[device].data)
        index[key] = {"shape": list(array.shape), "dtype": np.dtype(array.dtype).name, "blocks": entries}
    if mine:
        crcs = json.dumps({name: _crc(block) for name, block in mine.items()})
        write(shard_file(path, token, me, count), mine, {"token": token, "crc32": crcs})
    _barrier(f"funcnet-save-{token}-blocks")
    if writer:
        write(path, whole, {**(metadata or {}), SHARDS: json.dumps({"token": token, "leaves": index})})
        remove_stale(path, token)
    _barrier(f"funcnet-save-{token}-index")
    return whole


def remove_stale(path: str | os.PathLike[str], keep: str | None) -> None:
    """Remove the block files of ``path``'s earlier saves (all of them with ``keep=None``)."""
    path = Path(path)
    removed = False
    for other in path.parent.glob(f"{_stem(path)}.*.process-*-of-*.safetensors"):
        match = SHARD_FILE.fullmatch(other.name)
        if match and match["stem"] == _stem(path) and match["token"] != keep:
            other.unlink(missing_ok=True)
            removed = True
    if removed:
        sync_directory(str(path.parent))


class Sharded:
    """A leaf stored in blocks (``write_tree``): ``shape``, ``dtype``, and indexing by a tuple of
    slices, which reads only the blocks that overlap it (each checked against its CRC-32)."""

    def __init__(self, fn: str, path: Path, key: str, entry: dict[str, Any], token: str):
        self.fn, self.path, self.key, self.token = fn, path, key, token
        self.shape = tuple(entry["shape"])
        self.dtype = np.dtype(jax.numpy.dtype(entry["dtype"]))
        self.blocks = [(file, name, tuple(tuple(b) for b in bounds)) for file, name, bounds in entry["blocks"]]

    def __getitem__(self, index: Any) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        index = index + (slice(None),) * (len(self.shape) - len(index))
        want = _bounds(index, self.shape)
        out = np.empty([b - a for a, b in want], self.dtype)
        covered = 0
        for file, name, bounds in self.blocks:
            lo = [max(a, c) for (a, _), (c, _) in zip(want, bounds, strict=True)]
            hi = [min(b, d) for (_, b), (_, d) in zip(want, bounds, strict=True)]
            if any(h <= lo_ for lo_, h in zip(lo, hi, strict=True)):
                continue
            block = read_block(self.fn, self.path.with_name(file), name, self.token)
            source = tuple(slice(lo_ - c, h - c) for lo_, h, (c, _) in zip(lo, hi, bounds, strict=True))
            target = tuple(slice(lo_ - a, h - a) for lo_, h, (a, _) in zip(lo, hi, want, strict=True))
            out[target] = block[source]
            covered += int(np.prod([h - lo_ for lo_, h in zip(lo, hi, strict=True)], dtype=np.int64))
        if covered != out.size:
            raise ValueError(f"{self.fn}: the blocks of {self.key} in {str(self.path)!r} do not cover it (torn?).")
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[tuple(slice(None) for _ in self.shape)]
        return whole if dtype is None else whole.astype(dtype)


def read_block(fn: str, file: Path, name: str, token: str) -> np.ndarray:
    """One block of a sharded save, checked against its save's token and its CRC-32."""
    try:
        with safe_open(str(file), framework="np") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("token") != token:
                raise ValueError(f"it belongs to another save (token {metadata.get('token')}, not {token})")
            block: np.ndarray = handle.get_tensor(name)
        if json.loads(metadata["crc32"]).get(name) != _crc(block):
            raise ValueError(f"block {name} does not match its CRC-32")
    except (SafetensorError, ValueError, OSError, KeyError) as error:
        raise ValueError(f"{fn}: cannot read {name} from {str(file)!r} (torn or missing?): {error}") from error
    return block


def check_blocks(fn: str, path: str | os.PathLike[str], metadata: dict[str, str]) -> None:
    """A ``ValueError`` unless every block file the index at ``path`` names exists and belongs to
    its save (the headers only are read)."""
    if SHARDS not in metadata:
        return
    index = json.loads(metadata[SHARDS])
    files = {file for entry in index["leaves"].values() for file, _, _ in entry["blocks"]}
    for file in sorted(files):
        where = Path(path).with_name(file)
        try:
            with safe_open(str(where), framework="np") as handle:
                token = (handle.metadata() or {}).get("token")
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"{fn}: the block file {str(where)!r} of {str(path)!r} is missing or torn: {error}"
            ) from error
        if token != index["token"]:
            raise ValueError(f"{fn}: the block file {str(where)!r} belongs to another save than {str(path)!r}.")


def save(path: str | os.PathLike[str], tree: Any) -> None:
    """Write ``tree``'s arrays to ``path`` (safetensors), durably and atomically.

    Args:
      path: the file to write; an existing one is replaced whole (temporary file, fsync,
        rename, fsync of the directory), so a crash leaves the old file or the new one.
      tree: a pytree of arrays (params, an optimizer's state). Leaves split over several devices
        (FSDP's params: ``funcnet.shard_params``) are written without gathering them: each
        process writes its devices' blocks to a file of its own beside ``path``, and ``path``
        holds the other leaves and the index (the module docstring). Every process must then
        call ``save`` (it waits at barriers); a tree without such leaves is written by whoever
        calls, as one file.
    """
    write_tree("save", path, tree)


def load(path: str | os.PathLike[str], like: T) -> T:
    """Read ``path`` into a tree with ``like``'s structure, shapes and dtypes (checked).

    Args:
      path: a file written by ``save``.
      like: a tree of the expected structure; its leaves may be arrays or
        ``jax.ShapeDtypeStruct``s, so ``jax.eval_shape(lambda k: net.init(k, input_shape),
        key)[1]`` serves without computing any params. A leaf placed over several devices (a ``jax.Array``, or a
        ``ShapeDtypeStruct`` with ``sharding=``, e.g. from ``funcnet.param_shardings``) is loaded
        placed the same way, each process reading only the blocks its devices need, whatever
        mesh saved it (4 devices into 2, sharded into replicated, or back); other leaves land on
        the default device.

    Returns:
      ``like``'s structure holding the file's arrays; a missing or extra entry, or another
      shape or dtype, is a ``ValueError`` naming it.
    """
    shapes("load", like)  # like's leaves are checked before the file is read
    stored, _ = read("load", path)
    restored: T = unflatten("load", os.fspath(path), stored, like)
    return restored
