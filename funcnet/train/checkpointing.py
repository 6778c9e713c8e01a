"""Checkpoints inside ``fit``: the whole training state, durable, atomic, never mixed.

Contract, stated once:

* ``fit(..., checkpoint_dir=d)`` keeps ``d/checkpoint-<epochs done>.safetensors`` files, each the
  whole ``TrainState`` (params, optimizer state, the best evaluation's params and optimizer
  state, the early-stopping bookkeeping, the history so far and the next epoch) keyed by pytree
  path, written with ``funcnet.checkpoint.write`` (temporary file, fsync, rename, fsync of the
  directory). The newest two are kept: the previous one is deleted only once a newer one is
  durable.
* Each file's metadata holds the run's *fingerprint* (``fingerprint``): the network, loss,
  optimizer with its hyperparameters, metrics, monitor and mode, the params' shapes and a
  digest of their initial values (and of a given ``opt_state``), the data's shapes and dtypes
  (with the inputs beyond x by name, when the data carries them),
  a digest of the data's values (computed in the pass that checks them for NaN, ``checks.py``),
  the key, and every argument of ``fit`` that changes the result but ``epochs``: a run asked
  for more epochs continues from its checkpoint and equals a run of the new length from the
  start (a run that stopped early stays stopped, as that run would have). ``eval_batch_size``
  is not part of it either (it changes evaluations only by rounding). A directory holding
  another run's checkpoint is refused with a ``ValueError`` listing what differs, one per
  line.
* ``read_checkpoint(d, like)`` reads the newest checkpoint's params and best params.
* A building block is described by value: a funcnet spec by its fields, a function by the
  module-level name it is importable as. One whose equality cannot be established (a lambda, a
  closure, a ``partial``, an object without value equality) cannot be matched to another
  process's: without ``run_name`` the fingerprint then holds a token of this call alone, so its
  checkpoints are never resumed (``fit`` warns). ``fit(..., run_name="...")`` names the run
  instead: the caller vouches that equal names mean equal building blocks.
* Each file's metadata also holds a CRC-32 of its arrays. ``restore`` reads the newest
  checkpoint; a torn or unreadable one is skipped with a warning for the one before it; if
  none is readable it raises a ``ValueError`` naming the newest file. Temporary files left by a
  crashed write (``.funcnet-*.tmp``) are removed and never read.
* Across processes (``jax.distributed``) the directory must be one they all share: process 0
  alone removes leftovers and writes each file (from the replicated state), and every process
  waits at a barrier until the file is durable.
* Under FSDP (``fit(..., param_axis=...)``) the params and optimizer states are sharded and are
  never gathered: every process writes its devices' blocks of them to
  ``checkpoint-<epochs>.<token>.process-<p>-of-<n>.safetensors``, and behind a barrier process 0
  writes ``checkpoint-<epochs>.safetensors``: the replicated entries, the run's fingerprint and
  the index of the blocks (``funcnet.checkpoint.write_tree``). That file is the commit; a
  checkpoint whose block files are missing or of another save is torn (skipped as above), and
  block files without their checkpoint are leftovers. A restore places each entry as the fresh
  state is placed, every process reading only the blocks its devices need (in the same mesh, its
  own), so an FSDP checkpoint resumes a replicated fit of the same shards and the other way
  round (``param_axis`` is placement, not part of the run's identity). Every process restores on its own, and they
  compare which checkpoint they resumed from: processes that see different checkpoints raise
  a ``ValueError`` instead of training apart.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import sys
import types
import uuid
import warnings
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from funcnet import _host, checkpoint
from funcnet._values import Method
from funcnet.train import distributed

__all__ = ["FitCheckpoint", "describe", "fingerprint", "prepare", "read_checkpoint", "restore", "store"]

FORMAT = "funcnet.fit/1"
KEEP = 2
_NAME = re.compile(r"checkpoint-(\d+)\.safetensors")


def prepare(directory: Any) -> Path:
    """The checkpoint directory, created if missing; leftovers of a crashed write removed."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"fit: checkpoint_dir must be a path (str or os.PathLike), got {type(directory).__name__}.")
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise ValueError(f"fit: checkpoint_dir must be a directory, got the file {str(path)!r}.")
    path.mkdir(parents=True, exist_ok=True)
    if distributed.is_writer():
        for leftover in path.glob(f"{checkpoint.TEMPORARY_PREFIX}*{checkpoint.TEMPORARY_SUFFIX}"):
            leftover.unlink(missing_ok=True)
        _remove_orphan_blocks(path)
    distributed.barrier("funcnet-checkpoint-prepare")
    return path


def _remove_orphan_blocks(directory: Path) -> None:
    """Block files (FSDP) whose checkpoint was never committed, or was committed by another save."""
    for block in directory.glob("checkpoint-*.process-*-of-*.safetensors"):
        match = checkpoint.SHARD_FILE.fullmatch(block.name)
        if match is None:
            continue
        index = directory / f"{match['stem']}.safetensors"
        token = None
        if index.is_file():
            try:
                _, metadata = checkpoint.read("fit", index)
                token = json.loads(metadata.get(checkpoint.SHARDS, "{}")).get("token")
            except ValueError:
                token = None
        if token != match["token"]:
            block.unlink(missing_ok=True)


def _importable(value: Any) -> bool:
    """True when ``value`` is what its ``__module__`` and ``__qualname__`` name (so another process
    importing that name gets the same function); never for lambdas, closures or partials."""
    if isinstance(value, (functools.partial, jax.tree_util.Partial)):
        return False
    module, name = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
    if module is None or name is None:
        name = getattr(value, "__name__", None)
    if not isinstance(module, str) or not isinstance(name, str) or "<" in name:
        return False
    found: Any = sys.modules.get(module)
    for part in name.split("."):
        found = getattr(found, part, None)
    return found is value


def describe(value: Any, unprovable: list[str] | None = None) -> str:
    """A description of a building block that is the same in every process (no addresses).

    What cannot be described by value (``_importable``) is added to ``unprovable``."""
    if isinstance(value, Method):
        return describe(value.owner, unprovable)
    if (
        isinstance(value, tuple)
        and value
        and all(isinstance(v, Method) for v in value)
        and len({id(v.owner) for v in value}) == 1
    ):  # a Layer or Optimizer of one spec
        return describe(value[0], unprovable)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = ", ".join(
            f"{f.name}={describe(getattr(value, f.name), unprovable)}" for f in dataclasses.fields(value)
        )
        return f"{type(value).__name__}({fields})"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__}({', '.join(describe(v, unprovable) for v in value)})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {describe(v, unprovable)}" for k, v in value.items()) + "}"
    if value is None or isinstance(value, (bool, int, float, str, np.dtype)):
        return repr(value)
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        return f"array({np.asarray(value).tolist()!r}, {np.asarray(value).dtype})"
    name = getattr(value, "__qualname__", None) or getattr(value, "__name__", None) or type(value).__qualname__
    described = f"{getattr(value, '__module__', None) or type(value).__module__}.{name}"
    if unprovable is not None and not (isinstance(value, type) or _importable(value)):
        kind = type(value).__name__ if not isinstance(value, types.FunctionType) else "function"
        unprovable.append(f"{described} (a {kind})")
    return described


def _digest(tree: Any) -> str:
    hasher = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if _host.is_global(leaf):  # blocks on other processes' devices: a checksum computed where they live
            hasher.update(f"{jax.tree_util.keystr(path)}:{leaf.dtype}{leaf.shape}".encode())
            hasher.update(np.asarray(_host.reduce_to_host(_checksum, leaf)).tobytes())
            continue
        array = np.ascontiguousarray(np.asarray(leaf))
        hasher.update(f"{jax.tree_util.keystr(path)}:{array.dtype}{array.shape}".encode())
        hasher.update(array.tobytes())
    return hasher.hexdigest()[:16]


def _checksum(array: jax.Array) -> jax.Array:
    """A checksum of ``array``'s bits that does not depend on how it is split: each element's bits
    times an odd weight of its position, summed modulo 2**32 (exact in any order)."""
    bits = array.reshape(-1)
    if jnp.issubdtype(bits.dtype, jnp.complexfloating):
        bits = jnp.stack([bits.real, bits.imag], axis=-1).reshape(-1)
    width = bits.dtype.itemsize * 8
    unsigned = jax.lax.bitcast_convert_type(bits, jnp.dtype(f"uint{width}")) if width > 1 else bits.astype(jnp.uint8)
    if width == 64:
        unsigned = (unsigned ^ (unsigned >> 32)).astype(jnp.uint32)
    weight = jnp.arange(bits.shape[0], dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
    total: jax.Array = jnp.sum(unsigned.astype(jnp.uint32) * weight, dtype=jnp.uint32)
    return total


def _shapes(tree: Any) -> str:
    return ", ".join(
        f"{jax.tree_util.keystr(p)}: {np.dtype(leaf.dtype)}{list(np.shape(leaf))}"
        for p, leaf in jax.tree_util.tree_leaves_with_path(tree)
    )


UNPROVABLE = "building blocks without value equality"


def fingerprint(
    *,
    net: Any,
    loss: Any,
    optimizer: Any,
    metrics: dict[str, Any],
    params: Any,
    opt_state: Any,
    train_data: tuple[Any, ...],
    eval_data: tuple[Any, ...] | None,
    data_digests: tuple[str | None, str | None],
    key: jax.Array,
    run_name: str | None,
    sources: Any = None,
    **arguments: Any,
) -> dict[str, str]:
    """What identifies a run: two calls with equal fingerprints compute the same training.
    ``sources``: the batch sources made inside the program (``train/sources.py``), if any."""
    key_data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key

    def data(pair: tuple[Any, ...] | None, digest: str | None) -> str:
        """``(x, y)``, or ``(x, y, inputs)`` with the inputs beyond x by name (none: as a pair)."""
        if pair is None:
            return "none"
        shapes = [f"{np.dtype(a.dtype)}{list(a.shape)}" for a in pair[:2]]
        inputs = pair[2] if len(pair) > 2 else {}
        shapes += [f"{name} {np.dtype(a.dtype)}{list(a.shape)}" for name, a in sorted(inputs.items())]
        return " / ".join(shapes) + f", values {digest}"

    unprovable: list[str] = []
    described = {
        "network": describe(net, unprovable),
        "loss": describe(loss, unprovable),
        "optimizer": describe(optimizer, unprovable),
        "metrics": describe(metrics, unprovable),
        "params": _shapes(params),
        "initial params": _digest(params),
        "initial opt_state": "fresh" if opt_state is None else _digest(opt_state),
        "train data": data(train_data, data_digests[0]),
        "eval data": data(eval_data, data_digests[1]),
        "key": str(np.asarray(key_data).tolist()),
        **{name: repr(value) for name, value in arguments.items()},
    }
    if sources is not None:  # absent otherwise: checkpoints of runs without them keep their fingerprint
        described["batch sources"] = describe(sources, unprovable)
    if run_name is not None:
        described["run name"] = repr(run_name)
    elif unprovable:
        warnings.warn(
            f"fit: {', '.join(unprovable)} cannot be shown equal to another run's, so this run's "
            "checkpoints will never be resumed; pass run_name='...' to fit to name the run.",
            RuntimeWarning,
            stacklevel=3,
        )
        described[UNPROVABLE] = f"{', '.join(unprovable)}; this call only ({uuid.uuid4().hex})"
    return described


def _crc(arrays: dict[str, Any]) -> str:
    """A CRC-32 of the arrays a file holds whole (a sharded entry's blocks carry their own)."""
    crc = 0
    for key in sorted(k for k, a in arrays.items() if isinstance(a, np.ndarray)):
        crc = zlib.crc32(np.ascontiguousarray(arrays[key]).data, zlib.crc32(key.encode(), crc))
    return f"{crc:08x}"


def _checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """The checkpoint files, newest first."""
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.fullmatch(p.name))]
    return sorted(found, reverse=True)


def store(directory: Path, state: Any, epoch: int, run: dict[str, str]) -> None:
    """Write ``state`` (replicated) as the checkpoint after ``epoch`` epochs; then drop all but the
    newest ``KEEP``. Process 0 writes; every process returns once the file is durable."""
    if any(checkpoint.is_sharded(leaf) for leaf in jax.tree_util.tree_leaves(state)):
        _write_sharded(directory, state, epoch, run)  # FSDP: every process writes its own blocks
    elif distributed.is_writer():
        _write(directory, jax.device_get(state), epoch, run)
    distributed.barrier(f"funcnet-checkpoint-{epoch}")


def _write_sharded(directory: Path, state: Any, epoch: int, run: dict[str, str]) -> None:
    """``state`` with sharded entries (FSDP): blocks per process, then the index (module docstring)."""
    replicated = jax.tree_util.tree_map(
        lambda leaf: np.zeros((), np.int8) if checkpoint.is_sharded(leaf) else leaf, state
    )
    arrays = checkpoint.flatten("fit", replicated)[0]
    sharded = {
        jax.tree_util.keystr(p) for p, leaf in jax.tree_util.tree_leaves_with_path(state) if checkpoint.is_sharded(leaf)
    }
    whole = {k: a for k, a in arrays.items() if k not in sharded}
    metadata = {"format": FORMAT, "run": json.dumps(run, sort_keys=True), "crc32": _crc(whole)}
    checkpoint.write_tree("fit", directory / f"checkpoint-{epoch:06d}.safetensors", state, metadata)
    if distributed.is_writer():
        _remove_stale(directory)


def _remove_stale(directory: Path) -> None:
    """All but the newest ``KEEP`` checkpoints, with their block files."""
    stale = _checkpoints(directory)[KEEP:]
    for _, path in stale:
        path.unlink(missing_ok=True)
        checkpoint.remove_stale(path, None)
    if stale:
        checkpoint.sync_directory(str(directory))


def _write(directory: Path, state: Any, epoch: int, run: dict[str, str]) -> None:
    arrays, _ = checkpoint.flatten("fit", state)
    metadata = {"format": FORMAT, "run": json.dumps(run, sort_keys=True), "crc32": _crc(arrays)}
    checkpoint.write(directory / f"checkpoint-{epoch:06d}.safetensors", arrays, metadata)
    _remove_stale(directory)


# Arguments recorded with a run that do not decide its identity: ``epochs`` (a run continues to
# more epochs) and ``eval_batch_size`` (changes the eval values only by rounding). Checkpoints
# written before this rule hold them in their fingerprint; they are ignored there too.
NOT_IDENTITY = ("epochs", "eval_batch_size")
# The TrainState entries whose length is the number of epochs or evaluations.
_HISTORY = re.compile(r"\.(train_loss|eval_loss|eval_metrics\[.*\]|grad_norm|learning_rate)")


def _public(text: str) -> str:
    """A description as a user reads it: ``Dense(...)``, not the private ``_Dense(...)``."""
    return re.sub(r"(?<![\w.])_(?=[A-Za-z])", "", text).replace("dtype(", "(")


def _differences(stored: dict[str, str], run: dict[str, str]) -> str:
    keys = sorted(set(stored) | set(run))
    return "".join(
        f"\n  {k}: {_public(stored.get(k, '(absent)'))} there, {_public(run.get(k, '(absent)'))} here"
        for k in keys
        if stored.get(k) != run.get(k)
    )


def _identity(run: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in run.items() if k not in NOT_IDENTITY}


def _newest(fn: str, directory: Path) -> tuple[Path, dict[str, np.ndarray], dict[str, str]] | None:
    """The newest readable checkpoint: its path, arrays and run; ``None`` if there is none."""
    found = _checkpoints(directory)
    for i, (_, path) in enumerate(found):
        try:
            arrays, metadata = checkpoint.read(fn, path)
            if metadata.get("format") != FORMAT or metadata.get("crc32") != _crc(arrays):
                raise ValueError(
                    f"{fn}: {str(path)!r} is torn or not a funcnet fit checkpoint (its CRC-32 or format "
                    "does not match)."
                )
            checkpoint.check_blocks(fn, path, metadata)  # FSDP: every block file there, of this save
            stored = json.loads(metadata["run"])
        except (ValueError, KeyError) as error:
            if i + 1 < len(found):
                warnings.warn(
                    f"{fn}: skipping the unreadable checkpoint {str(path)!r} ({error}); using "
                    f"{str(found[i + 1][1])!r}.",
                    RuntimeWarning,
                    stacklevel=4,
                )
                continue
            raise ValueError(
                f"{fn}: no readable checkpoint in {str(directory)!r}: the newest, "
                f"{str(found[0][1])!r}, cannot be read ({error}). Delete the directory to start "
                "afresh."
            ) from error
        return path, arrays, stored
    return None


def _resize(arrays: dict[str, np.ndarray], like: Any) -> dict[str, np.ndarray]:
    """A checkpoint's arrays for a run of another length: the histories padded with NaN (or cut:
    only entries not yet run, NaN, are cut), and a run that has not stopped stops at the new end."""
    wanted = {
        jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(like) if leaf is not None
    }
    out = dict(arrays)
    for key, array in arrays.items():
        if _HISTORY.fullmatch(key) and key in wanted and array.shape != np.shape(wanted[key]):
            length = np.shape(wanted[key])[0]
            padded = np.full((length, *array.shape[1:]), np.nan, array.dtype)
            padded[: min(length, array.shape[0])] = array[:length]
            out[key] = padded
    if ".stopped" in arrays and not bool(arrays[".stopped"]):
        out[".stopped_epoch"] = np.asarray(wanted[".stopped_epoch"], arrays[".stopped_epoch"].dtype)
    return out


def restore(directory: Path, like: Any, run: dict[str, str], epochs: int) -> tuple[Any, int] | None:
    """The newest readable checkpoint's state in ``like``'s structure (a fresh state of a run of
    ``epochs``) and the epochs it had trained, or ``None`` if there is none. A run of fewer epochs
    continues to ``epochs``, exactly as if it had been asked for ``epochs`` from the start."""
    newest = _newest("fit", directory)
    distributed.agree(  # every process must resume from the same checkpoint, or the collectives hang
        "fit",
        {"checkpoint to resume from": "none" if newest is None else f"{newest[0].name} (CRC-32 {_crc(newest[1])})"},
        advice=f"checkpoint_dir ({str(directory)!r}) must be one directory that all processes share.",
    )
    if newest is None:
        return None
    path, arrays, stored = newest
    if _identity(stored) != _identity(run):
        hint = (
            "\nA lambda, closure, partial or object without value equality cannot be matched to another "
            "run's: name the run with fit(..., run_name='...') (from its first call on)."
            if UNPROVABLE in stored or UNPROVABLE in run
            else ""
        )
        raise ValueError(
            f"fit: checkpoint_dir {str(directory)!r} holds a checkpoint of another run ({path.name}); "
            f"what differs:{_differences(_identity(stored), _identity(run))}\nUse another directory, or "
            f"delete this one to start afresh.{hint}"
        )
    done = int(arrays[".epoch"])
    if done > epochs:
        raise ValueError(
            f"fit: checkpoint_dir {str(directory)!r} holds this run trained to epoch {done} "
            f"({path.name}), beyond epochs={epochs}; ask for epochs >= {done} to continue it, or use "
            f"another directory (read_checkpoint reads its params)."
        )
    return checkpoint.unflatten("fit", str(path), _resize(arrays, like), like), done


class FitCheckpoint(NamedTuple):
    """What ``read_checkpoint`` returns.

    Fields:
      epoch: epochs trained when the checkpoint was written.
      params: the params after ``epoch`` epochs.
      best_params: what ``fit`` returns as ``result.params``: with eval data, the params of the
        best evaluation so far; without, ``params``.
      best_epoch: epochs trained when ``best_params`` were taken.
      stopped: True when early stopping (or divergence) ended the run.
    """

    epoch: int
    params: Any
    best_params: Any
    best_epoch: int
    stopped: bool


def read_checkpoint(checkpoint_dir: Any, like: Any) -> FitCheckpoint:
    """Read the params of the newest checkpoint ``fit(..., checkpoint_dir=...)`` wrote, without
    resuming or training.

    Args:
      checkpoint_dir: the directory given to ``fit``.
      like: a params tree of the network's structure, shapes and dtypes, e.g. the initial params
        or ``jax.eval_shape(lambda k: net.init(k, input_shape), key)[1]`` (shapes only; the
        input shape stays a Python tuple, outside what ``eval_shape`` traces).

    Returns:
      A ``FitCheckpoint``: ``epoch``, ``params``, ``best_params``, ``best_epoch``, ``stopped``.
    """
    fn = "read_checkpoint"
    if not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise TypeError(
            f"{fn}: checkpoint_dir must be a path (str or os.PathLike), got {type(checkpoint_dir).__name__}."
        )
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        raise ValueError(f"{fn}: checkpoint_dir must be an existing directory, got {str(directory)!r}.")
    newest = _newest(fn, directory)
    if newest is None:
        raise ValueError(f"{fn}: {str(directory)!r} holds no fit checkpoint (checkpoint-<epoch>.safetensors).")
    path, arrays, _ = newest
    expected, _ = checkpoint.shapes(fn, like)
    entry = lambda part: {key: arrays[f".{part}{key}"] for key in expected if f".{part}{key}" in arrays}
    params = checkpoint.unflatten(fn, str(path), entry("params"), like)
    best = entry("best_params")
    return FitCheckpoint(
        int(arrays[".epoch"]),
        params,
        checkpoint.unflatten(fn, str(path), best, like) if best else params,
        int(arrays[".best_epoch"]),
        bool(arrays[".stopped"]),
    )
