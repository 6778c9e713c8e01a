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
  digest of their initial values (and of a given ``opt_state``), the data's shapes and dtypes,
  the key, and every argument of ``fit`` that changes the result. A directory holding another
  run's checkpoint is refused with a ``ValueError`` listing what differs. The data's values
  are not compared, only its shapes and dtypes.
* Each file's metadata also holds a CRC-32 of its arrays. ``restore`` reads the newest
  checkpoint; a torn or unreadable one is skipped with a warning for the one before it; if
  none is readable it raises a ``ValueError`` naming the newest file. Temporary files left by a
  crashed write (``.funcnet-*.tmp``) are removed and never read.
* Across processes (``jax.distributed``) the directory must be one they all share: process 0
  alone removes leftovers and writes each file (from the replicated state), and every process
  waits at a barrier until the file is durable. Every process restores on its own, and they
  compare which checkpoint they resumed from: processes that see different checkpoints raise
  a ``ValueError`` instead of training apart.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import warnings
import zlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from funcnet import checkpoint
from funcnet._values import Method
from funcnet.train import distributed

__all__ = ["describe", "fingerprint", "prepare", "restore", "store"]

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
    distributed.barrier("funcnet-checkpoint-prepare")
    return path


def describe(value: Any) -> str:
    """A description of a building block that is the same in every process (no addresses)."""
    if isinstance(value, Method):
        return describe(value.owner)
    if (
        isinstance(value, tuple)
        and value
        and all(isinstance(v, Method) for v in value)
        and len({id(v.owner) for v in value}) == 1
    ):  # a Layer or Optimizer of one spec
        return describe(value[0])
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = ", ".join(f"{f.name}={describe(getattr(value, f.name))}" for f in dataclasses.fields(value))
        return f"{type(value).__name__}({fields})"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__}({', '.join(describe(v) for v in value)})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in value.items()) + "}"
    if value is None or isinstance(value, (bool, int, float, str, np.dtype)):
        return repr(value)
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        return f"array({np.asarray(value).tolist()!r}, {np.asarray(value).dtype})"
    name = getattr(value, "__qualname__", None) or getattr(value, "__name__", None) or type(value).__qualname__
    return f"{getattr(value, '__module__', None) or type(value).__module__}.{name}"


def _digest(tree: Any) -> str:
    hasher = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        array = np.ascontiguousarray(np.asarray(leaf))
        hasher.update(f"{jax.tree_util.keystr(path)}:{array.dtype}{array.shape}".encode())
        hasher.update(array.tobytes())
    return hasher.hexdigest()[:16]


def _shapes(tree: Any) -> str:
    return ", ".join(
        f"{jax.tree_util.keystr(p)}: {np.dtype(leaf.dtype)}{list(np.shape(leaf))}"
        for p, leaf in jax.tree_util.tree_leaves_with_path(tree)
    )


def fingerprint(
    *,
    net: Any,
    loss: Any,
    optimizer: Any,
    metrics: dict[str, Any],
    params: Any,
    opt_state: Any,
    train_data: tuple[Any, Any],
    eval_data: tuple[Any, Any] | None,
    key: jax.Array,
    **arguments: Any,
) -> dict[str, str]:
    """What identifies a run: two calls with equal fingerprints compute the same training."""
    key_data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    data = lambda pair: "none" if pair is None else " / ".join(f"{np.dtype(a.dtype)}{list(a.shape)}" for a in pair)
    described = {
        "network": describe(net),
        "loss": describe(loss),
        "optimizer": describe(optimizer),
        "metrics": describe(metrics),
        "params": _shapes(params),
        "initial params": _digest(params),
        "initial opt_state": "fresh" if opt_state is None else _digest(opt_state),
        "train data": data(train_data),
        "eval data": data(eval_data),
        "key": str(np.asarray(key_data).tolist()),
        **{name: repr(value) for name, value in arguments.items()},
    }
    return described


def _crc(arrays: dict[str, np.ndarray]) -> str:
    crc = 0
    for key in sorted(arrays):
        crc = zlib.crc32(np.ascontiguousarray(arrays[key]).data, zlib.crc32(key.encode(), crc))
    return f"{crc:08x}"


def _checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """The checkpoint files, newest first."""
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.fullmatch(p.name))]
    return sorted(found, reverse=True)


def store(directory: Path, state: Any, epoch: int, run: dict[str, str]) -> None:
    """Write ``state`` (replicated) as the checkpoint after ``epoch`` epochs; then drop all but the
    newest ``KEEP``. Process 0 writes; every process returns once the file is durable."""
    if distributed.is_writer():
        _write(directory, jax.device_get(state), epoch, run)
    distributed.barrier(f"funcnet-checkpoint-{epoch}")


def _write(directory: Path, state: Any, epoch: int, run: dict[str, str]) -> None:
    arrays, _ = checkpoint.flatten("fit", state)
    metadata = {"format": FORMAT, "run": json.dumps(run, sort_keys=True), "crc32": _crc(arrays)}
    checkpoint.write(directory / f"checkpoint-{epoch:06d}.safetensors", arrays, metadata)
    stale = _checkpoints(directory)[KEEP:]
    for _, path in stale:
        path.unlink(missing_ok=True)
    if stale:
        checkpoint.sync_directory(str(directory))


def _differences(stored: dict[str, str], run: dict[str, str]) -> str:
    keys = sorted(set(stored) | set(run))
    return "; ".join(
        f"{k}: {stored.get(k, '(absent)')} there, {run.get(k, '(absent)')} here"
        for k in keys
        if stored.get(k) != run.get(k)
    )


def restore(directory: Path, like: Any, run: dict[str, str]) -> Any | None:
    """The newest readable checkpoint's state in ``like``'s structure, or ``None`` if there is none;
    every process must resume from the same one (``distributed.agree``)."""
    state, name = _restore(directory, like, run)
    distributed.agree(
        "fit",
        {"checkpoint to resume from": name or "none (starting afresh)"},
        advice=f"checkpoint_dir ({str(directory)!r}) must be one directory that all processes share.",
    )
    return state


def _restore(directory: Path, like: Any, run: dict[str, str]) -> tuple[Any | None, str | None]:
    found = _checkpoints(directory)
    for i, (_, path) in enumerate(found):
        try:
            arrays, metadata = checkpoint.read("fit", path)
            if metadata.get("format") != FORMAT or metadata.get("crc32") != _crc(arrays):
                raise ValueError(
                    f"fit: {str(path)!r} is torn or not a funcnet fit checkpoint (its CRC-32 or format does not match)."
                )
            stored = json.loads(metadata["run"])
        except (ValueError, KeyError) as error:
            if i + 1 < len(found):
                warnings.warn(
                    f"fit: skipping the unreadable checkpoint {str(path)!r} ({error}); resuming from "
                    f"{str(found[i + 1][1])!r}.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                continue
            raise ValueError(
                f"fit: no readable checkpoint in {str(directory)!r}: the newest, "
                f"{str(found[0][1])!r}, cannot be read ({error}). Delete the directory to start "
                "afresh."
            ) from error
        if stored != run:
            raise ValueError(
                f"fit: checkpoint_dir {str(directory)!r} holds a checkpoint of another run "
                f"({path.name}): {_differences(stored, run)}. Use another directory, or delete "
                "this one to start afresh."
            )
        return checkpoint.unflatten("fit", str(path), arrays, like), f"{path.name} (CRC-32 {metadata['crc32']})"
    return None, None
