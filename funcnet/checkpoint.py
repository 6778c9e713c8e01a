"""Save and load pytrees (params, optimizer states, FitResults) as safetensors files.

* Keys are the pytree paths (``jax.tree_util.keystr``, e.g. ``[0].W`` or ``.velocity[1].B``);
  dtypes and shapes are kept exactly.
* ``save`` writes a temporary file beside the target and renames it over the target, so a
  crash mid-write never leaves a corrupt checkpoint where a good one stood.
* ``load(path, like)`` rebuilds ``like``'s structure. A file whose keys, shapes or dtypes do
  not match ``like`` raises a ``ValueError`` naming the first mismatching path; a truncated or
  non-safetensors file raises a ``ValueError`` saying so.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import jax
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

__all__ = ["save", "load"]


def _flatten(fn: str, tree: Any) -> tuple[dict[str, np.ndarray], Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    arrays = {}
    for path, leaf in leaves:
        if not isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float, bool)):
            raise TypeError(f"{fn}: every leaf must be an array, got {type(leaf).__name__} at "
                            f"{jax.tree_util.keystr(path) or '(root)'}.")
        arrays[jax.tree_util.keystr(path) or "(root)"] = np.asarray(leaf)
    return arrays, treedef


def save(path: str | os.PathLike, tree: Any) -> None:
    """Write ``tree``'s arrays to ``path`` (safetensors), atomically."""
    arrays, _ = _flatten("save", tree)
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=".funcnet-", suffix=".tmp", dir=directory)
    os.close(handle)
    try:
        save_file({k: np.require(v, requirements="C") for k, v in arrays.items()}, temporary)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def load(path: str | os.PathLike, like: Any) -> Any:
    """Read ``path`` into a tree with ``like``'s structure, shapes and dtypes (checked)."""
    expected, treedef = _flatten("load", like)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load: no checkpoint at {path!r}.")
    try:
        stored = load_file(path)
    except (SafetensorError, ValueError, OSError) as error:
        raise ValueError(f"load: {path!r} is not a readable safetensors checkpoint (truncated or "
                         f"another format?): {error}") from error
    for key, want in expected.items():
        if key not in stored:
            raise ValueError(f"load: {path!r} has no entry {key} that like needs (it has "
                             f"{sorted(stored)[:5]}...).")
        got = stored[key]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise ValueError(f"load: {key} in {path!r} is {got.dtype}{list(got.shape)}, but like "
                             f"expects {want.dtype}{list(want.shape)}.")
    extra = sorted(set(stored) - set(expected))
    if extra:
        raise ValueError(f"load: {path!r} has entries like does not, first {extra[0]} "
                         "(a checkpoint of another network?).")
    return jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(stored[k]) for k in expected])
