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
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, TypeVar

import jax
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

__all__ = ["load", "save"]

T = TypeVar("T")

TEMPORARY_PREFIX, TEMPORARY_SUFFIX = ".funcnet-", ".tmp"


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


def read(fn: str, path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every array in the safetensors file ``path`` and its metadata; a ``ValueError`` if unreadable."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{fn}: no checkpoint at {path!r}.")
    try:
        with safe_open(path, framework="np") as file:
            return {key: file.get_tensor(key) for key in file.keys()}, file.metadata() or {}
    except (SafetensorError, ValueError, OSError) as error:
        raise ValueError(
            f"{fn}: {path!r} is not a readable safetensors checkpoint (truncated or another format?): {error}"
        ) from error


def shapes(fn: str, like: Any) -> tuple[dict[str, jax.ShapeDtypeStruct], Any]:
    """``like``'s leaves as shapes and dtypes keyed by pytree path, and its structure. Leaves may
    be arrays or abstract ``jax.ShapeDtypeStruct``s (``jax.eval_shape``'s output)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    specs = {}
    for path, leaf in leaves:
        key = jax.tree_util.keystr(path) or "(root)"
        if isinstance(leaf, jax.ShapeDtypeStruct):
            specs[key] = leaf
        else:
            flatten(fn, leaf)  # the same check and message as a saved tree's leaves
            specs[key] = jax.ShapeDtypeStruct(np.shape(leaf), np.asarray(leaf).dtype)
    return specs, treedef


def unflatten(fn: str, path: str, stored: dict[str, np.ndarray], like: Any) -> Any:
    """``stored`` arranged in ``like``'s structure, after checking keys, shapes and dtypes."""
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
    return jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(stored[k]) for k in expected])


def save(path: str | os.PathLike[str], tree: Any) -> None:
    """Write ``tree``'s arrays to ``path`` (safetensors), durably and atomically."""
    arrays, _ = flatten("save", tree)
    write(path, arrays)


def load(path: str | os.PathLike[str], like: T) -> T:
    """Read ``path`` into a tree with ``like``'s structure, shapes and dtypes (checked). ``like``'s
    leaves may be arrays or ``jax.ShapeDtypeStruct``s, so ``jax.eval_shape(net.init, key, shape)[1]``
    serves without computing any params."""
    shapes("load", like)  # like's leaves are checked before the file is read
    stored, _ = read("load", path)
    restored: T = unflatten("load", os.fspath(path), stored, like)
    return restored
